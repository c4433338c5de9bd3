"""Supervision for unattended runs (srft_jax/supervise.py).

A job under the supervisor: a real `python -m srft_jax.main` run SIGKILLed
mid-way finishes unattended, its export bitwise the unbroken run's; restarts
back off and give up after stalled restarts; progress resets the count; a
storage exit is retried and a config error is not; SIGTERM / SIGINT reach
the job and nothing restarts. A TPU slice: the state machine against a
stand-in `gcloud` (a scripted fake slice and bucket that records every call),
through `launch/tpu_pod.sh --supervise` end to end and `step()` by `step()`.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srft_jax import paths
from srft_jax import supervise

ROOT = Path(__file__).resolve().parents[1]
TPU_POD = str(ROOT / "launch" / "tpu_pod.sh")


def _events(state_dir) -> list[dict]:
  path = Path(state_dir) / supervise.LOG_NAME
  return supervise.read_log(str(path)) if path.exists() else []


def _names(events) -> list[str]:
  return [e["event"] for e in events]


def _wait_for(cond, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    got = cond()
    if got:
      return got
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftovers():
  """A failed test leaves no supervisor running (the stand-in jobs then end too)."""
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _popen(*args, **kw) -> subprocess.Popen:
  _STARTED.append(subprocess.Popen(*args, **kw))
  return _STARTED[-1]


def _supervise(workdir, command, *opts, log=None, env=None) -> subprocess.Popen:
  """`python -m srft_jax.supervise --workdir=... OPTS -- COMMAND` in the background."""
  return _popen(
    [sys.executable, "-m", "srft_jax.supervise", f"--workdir={workdir}", *opts, "--", *command],
    cwd=ROOT,
    env=env,
    stdout=log or subprocess.DEVNULL,
    stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
  )


# ----------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------


def test_imports_no_jax():
  """The supervisor runs on a laptop beside a TPU slice: the standard library only."""
  code = "import sys, srft_jax.supervise; bad = {'jax', 'numpy', 'fsspec'} & set(sys.modules); print(sorted(bad))"
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_backoff_doubles_to_its_cap():
  p = supervise.Policy(backoff_s=10, backoff_max_s=600)
  assert [p.delay(n) for n in range(1, 9)] == [10, 20, 40, 80, 160, 320, 600, 600]
  assert p.delay(10_000) == 600
  for bad in (dict(backoff_s=5, backoff_max_s=1), dict(max_stalled_restarts=-1)):
    with pytest.raises(ValueError):
      supervise.Policy(**bad)


def test_workdir_files_local_and_in_the_bucket(gcs, tmp_path):
  """Final checkpoint steps only: a local step directory (renamed into place
  whole), a bucket step with its commit_success.txt; Orbax's temporaries not."""
  local = tmp_path / "wd"
  for d in ("checkpoints/3", "checkpoints/10", "checkpoints/11.orbax-checkpoint-tmp-1"):
    (local / d).mkdir(parents=True)
  files = supervise.WorkdirFiles(str(local))
  assert files.checkpoint_steps() == {3, 10} and not files.done()
  (local / "results.json").write_text("{}")
  assert files.done()
  assert supervise.WorkdirFiles(str(tmp_path / "none")).checkpoint_steps() == set()
  remote = "gs://srft-test/supervise_files"  # conftest.py's emulated bucket
  files = supervise.WorkdirFiles(remote)
  assert files.checkpoint_steps() == set() and not files.done()
  paths.write_text(f"{remote}/checkpoints/4/commit_success.txt", "")
  paths.write_text(f"{remote}/checkpoints/4/state/x", "")
  paths.write_text(f"{remote}/checkpoints/5/state/x", "")  # not committed yet
  paths.write_json(f"{remote}/results.json", {})
  assert files.checkpoint_steps() == {4} and files.done()


def test_default_state_dir(monkeypatch, tmp_path):
  assert supervise.default_state_dir("runs/x") == "runs/x"
  monkeypatch.setenv("SRFT_JAX_CACHE", str(tmp_path))
  assert supervise.default_state_dir("gs://b/runs/x/") == str(tmp_path / "supervise" / "b_runs_x")


# ----------------------------------------------------------------------------
# A job: restarts, backoff, give-up, signals (a scripted stand-in job)
# ----------------------------------------------------------------------------

# Run k (counted in WORKDIR/attempts) does plan[k]: make checkpoint steps,
# write results.json, wait for a signal, then exit with rc. On SIGTERM it notes
# the signal in WORKDIR/got_signal and exits 0 (as srft_jax.main does).
FAKE_JOB = r"""
import json, os, signal, sys, time
wd, plan = sys.argv[1], json.load(open(sys.argv[2]))
os.makedirs(wd, exist_ok=True)
n_file = os.path.join(wd, "attempts")
n = int(open(n_file).read()) if os.path.exists(n_file) else 0
open(n_file, "w").write(str(n + 1))
run = plan[n]
def on_term(signum, frame):
  open(os.path.join(wd, "got_signal"), "a").write(signal.Signals(signum).name + "\n")
  sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if run.get("ignore_term") else on_term)
for s in run.get("steps", []):
  os.makedirs(os.path.join(wd, "checkpoints", str(s)), exist_ok=True)
if run.get("results"):
  open(os.path.join(wd, "results.json"), "w").write("{}")
if run.get("wait"):
  open(os.path.join(wd, "ready"), "w").write(str(os.getpid()))
  parent = os.getppid()
  while os.getppid() == parent:  # ends with its supervisor
    time.sleep(0.05)
  sys.exit(1)
sys.exit(run.get("rc", 0))
"""


@pytest.fixture
def fake_job(tmp_path):
  """`make(plan)`: (workdir, command) of the scripted job."""
  script = tmp_path / "fake_job.py"
  script.write_text(FAKE_JOB)

  def make(plan):
    wd = tmp_path / "wd"
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    return wd, [sys.executable, str(script), str(wd), str(plan_file)]

  return make


def test_gives_up_after_stalled_restarts(tmp_path):
  wd = tmp_path / "wd"
  cmd = [sys.executable, "-c", "import sys; sys.exit(3)"]
  opts = ["--max_stalled_restarts=2", "--backoff_s=0.05", "--backoff_max_s=0.08"]
  t0 = time.time()
  rc = _supervise(wd, cmd, *opts).wait(timeout=60)
  assert rc == supervise.EXIT_GAVE_UP
  events = _events(wd)
  assert _names(events) == [
    "supervise",
    *["start", "exit", "restart"] * 2,
    "start",
    "exit",
    "give_up",
  ]
  assert [e["attempt"] for e in events if e["event"] == "start"] == [1, 2, 3]
  assert all(e["cmd"] == cmd for e in events if e["event"] == "start")
  exits = [e for e in events if e["event"] == "exit"]
  assert [(e["rc"], e["reason"], e["progress"]) for e in exits] == [(3, "crashed", False)] * 3
  assert [e["delay_s"] for e in events if e["event"] == "restart"] == [0.05, 0.08]
  assert events[-1]["max_stalled_restarts"] == 2
  times = [e["time"] for e in events]
  assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", t) for t in times)
  assert times == sorted(times) and time.time() - t0 < 30
  assert not (wd / supervise.PID_NAME).exists()


def test_progress_resets_the_stall_count_and_storage_is_retried(fake_job):
  """Two stalled runs, one with progress (a storage exit), two stalled, then
  done: with max_stalled_restarts=2 it never gives up; the backoff starts over."""
  plan = [
    {"rc": 1},
    {"rc": 1},
    {"steps": [1, 2], "rc": supervise.EXIT_STORAGE},
    {"rc": 1},
    {"rc": -1 % 256},
    {"steps": [3], "results": True},
  ]
  wd, cmd = fake_job(plan)
  rc = _supervise(wd, cmd, "--max_stalled_restarts=2", "--backoff_s=0.01").wait(timeout=60)
  assert rc == supervise.EXIT_DONE
  events = _events(wd)
  assert _names(events) == ["supervise", *["start", "exit", "restart"] * 5, "start", "exit", "done"]
  exits = [(e["rc"], e["latest_step"], e["progress"]) for e in events if e["event"] == "exit"]
  assert exits == [
    (1, -1, False),
    (1, -1, False),
    (75, 2, True),
    (1, 2, False),
    (255, 2, False),
    (0, 3, True),
  ]
  assert [e["reason"] for e in events if e["event"] == "exit"][2] == "storage unavailable"
  assert [e["delay_s"] for e in events if e["event"] == "restart"] == [0.01, 0.02, 0.01, 0.01, 0.02]
  assert [e["stalled"] for e in events if e["event"] == "restart"] == [1, 2, 0, 1, 2]


def test_config_error_is_not_retried_and_done_is_not_rerun(fake_job):
  wd, cmd = fake_job([{"rc": supervise.EXIT_CONFIG}])
  assert _supervise(wd, cmd, "--backoff_s=0.01").wait(timeout=60) == supervise.EXIT_GAVE_UP
  assert _names(_events(wd)) == ["supervise", "start", "exit", "give_up"]
  (wd / "results.json").write_text("{}")  # a finished run: nothing is started
  assert _supervise(wd, cmd).wait(timeout=60) == supervise.EXIT_DONE
  assert _names(_events(wd))[4:] == ["supervise", "done"]
  assert (wd / "attempts").read_text() == "1"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_reaches_the_job_and_nothing_restarts(fake_job, sig):
  wd, cmd = fake_job([{"wait": True}, {"results": True}])
  sup = _supervise(wd, cmd, "--backoff_s=0")
  _wait_for(lambda: (wd / "ready").exists(), 30, "the job")
  assert (wd / supervise.PID_NAME).read_text().strip() == str(sup.pid)
  sup.send_signal(sig)
  assert sup.wait(timeout=30) == 128 + sig
  assert (wd / "got_signal").read_text() == "SIGTERM\n"  # the job's checkpoint signal
  events = _events(wd)
  assert _names(events) == ["supervise", "start", "exit", "stop"]
  assert events[2]["rc"] == 0 and events[3]["signal"] == sig.name
  assert (wd / "attempts").read_text() == "1"
  assert not (wd / supervise.PID_NAME).exists()


def test_second_signal_kills_a_job_that_does_not_stop(fake_job):
  wd, cmd = fake_job([{"wait": True, "ignore_term": True}])
  sup = _supervise(wd, cmd)
  job_pid = int(
    _wait_for(lambda: (wd / "ready").exists() and (wd / "ready").read_text(), 30, "job")
  )
  sup.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  assert sup.poll() is None  # waits for the job's checkpoint ...
  sup.send_signal(signal.SIGTERM)  # ... until told again
  assert sup.wait(timeout=30) == 128 + signal.SIGTERM
  events = _events(wd)
  assert _names(events) == ["supervise", "start", "exit", "stop"] and events[2]["rc"] == -9
  with pytest.raises(ProcessLookupError):
    os.kill(job_pid, 0)


def test_one_supervisor_per_workdir(fake_job):
  wd, cmd = fake_job([{"wait": True}])
  first = _supervise(wd, cmd)
  try:
    _wait_for(lambda: (wd / "ready").exists(), 30, "the job")
    second = subprocess.run(
      [sys.executable, "-m", "srft_jax.supervise", f"--workdir={wd}", "--", *cmd],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=30,
    )
    assert second.returncode != 0 and f"pid {first.pid}" in second.stderr
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=30)
  assert (wd / "attempts").read_text() == "1"


# The real job under the supervisor (SIGKILL, restarted, bitwise the unbroken
# run): tests/test_train.py::test_exact_resume_after_sigkill_under_the_supervisor.


# ----------------------------------------------------------------------------
# A TPU slice: the state machine against a stand-in gcloud
# ----------------------------------------------------------------------------

# The fake cloud lives in $FAKE_CLOUD: `state` (the slice's state), queues
# `describe` (states to report first), `create` (ok | quota | denied) and
# `train` (a training round: preempt | preempt_early | crash | crash_early |
# finish | hang; on a queued resource also reclaim | reclaim_early |
# node_lost_early), the bucket under bucket/, and every call in calls.jsonl.
# A queued resource: its state in `qr`, `qr_walk` the states its next describes
# move it to (one each), `qr_plan` one walk per create (comma-separated; default
# ACTIVE), `qr_error` a FAILED request's message; its node is the slice above.
FAKE_GCLOUD = r"""#!PYTHON
import glob, json, os, re, sys, time
HERE = os.environ["FAKE_CLOUD"]
args = sys.argv[1:]
with open(os.path.join(HERE, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\n")
def pop(name):
  path = os.path.join(HERE, name)
  words = open(path).read().split() if os.path.exists(path) else []
  if words:
    open(path, "w").write("\n".join(words[1:]))
  return words[0] if words else None
def state(new=None):
  path = os.path.join(HERE, "state")
  if new:
    open(path, "w").write(new)
  return open(path).read().strip() if os.path.exists(path) else "NOT_FOUND"
def local(url):
  return os.path.join(HERE, "bucket", url[len("gs://"):])
def qr_state(new=None):
  path = os.path.join(HERE, "qr")
  old = open(path).read().strip() if os.path.exists(path) else "NOT_FOUND"
  if new:
    open(path, "w").write(new)
    if new == "ACTIVE" and old != "ACTIVE":  # provisioned: its node is up
      state("READY")
  return new or old
def walk(states):
  open(os.path.join(HERE, "qr_walk"), "w").write("\n".join(states))
def reclaim():  # spot capacity taken back: the node first, then the request
  state("PREEMPTED")
  qr_state("SUSPENDING")
  walk(["SUSPENDING", "SUSPENDED"])
if args[:3] == ["compute", "tpus", "queued-resources"]:
  verb = args[3]
  if verb == "describe" and any("failedData" in a for a in args):
    print(open(os.path.join(HERE, "qr_error")).read())
  elif verb == "describe":
    s = qr_state(pop("qr_walk"))
    if s == "NOT_FOUND":
      sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found")
    print(s)
  elif verb == "delete":
    qr_state("NOT_FOUND")
    walk([])
    state("NOT_FOUND")
  elif verb == "create":
    outcome = pop("create") or "ok"
    if outcome == "quota":
      sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.create) RESOURCE_EXHAUSTED: Quota")
    if outcome == "denied":
      sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.create) PERMISSION_DENIED: nope")
    if qr_state() != "NOT_FOUND":
      sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS")
    qr_state("ACCEPTED")
    walk((pop("qr_plan") or "ACTIVE").split(","))
  else:
    sys.exit(f"fake gcloud: unexpected call {args}")
elif args[:3] == ["compute", "tpus", "tpu-vm"]:
  verb = args[3]
  if verb == "describe":
    s = pop("describe") or state()
    if s == "NOT_FOUND":
      sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found")
    print(s)
  elif verb == "delete":
    state("NOT_FOUND")
  elif verb == "create":
    outcome = pop("create") or "ok"
    if outcome == "quota":
      sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: no more capacity")
    if outcome == "denied":
      sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: nope")
    state("READY")
  elif verb == "ssh":
    cmd = [a for a in args if a.startswith("--command=")][0]
    if "kill $p" in cmd:  # tpu_pod.sh's stop: the trainer checkpoints and exits
      open(os.path.join(HERE, "stopped"), "w").write("1")
    if "srft_jax.main" not in cmd:
      sys.exit(0)
    ckpt = local(re.search(r"--workdir=(\S+)", cmd).group(1)) + "/checkpoints"
    have = [int(d) for d in os.listdir(ckpt)] if os.path.isdir(ckpt) else []
    outcome = pop("train") or "finish"
    if outcome == "hang":
      if os.path.exists(os.path.join(HERE, "stopped")):
        os.remove(os.path.join(HERE, "stopped"))  # the round's own stop came before
      deadline = time.time() + 60
      while not os.path.exists(os.path.join(HERE, "stopped")) and time.time() < deadline:
        time.sleep(0.05)
      sys.exit(0)
    if outcome == "preempt_early":  # reclaimed before its first checkpoint
      state("PREEMPTED")
      sys.exit(255)
    if outcome == "crash_early":
      sys.exit(1)
    if outcome == "reclaim_early":
      reclaim()
      sys.exit(255)
    if outcome == "node_lost_early":  # the request still says ACTIVE when the round ends
      state("PREEMPTED")
      walk(["ACTIVE", "SUSPENDED"])
      sys.exit(255)
    os.makedirs(f"{ckpt}/{max(have, default=0) + 1}")
    open(f"{ckpt}/{max(have, default=0) + 1}/commit_success.txt", "w").close()
    if outcome == "preempt":
      state("PREEMPTED")
      sys.exit(255)
    if outcome == "crash":
      sys.exit(1)
    if outcome == "reclaim":
      reclaim()
      sys.exit(255)
    open(os.path.dirname(ckpt) + "/results.json", "w").write("{}")
elif args[:2] == ["storage", "ls"]:
  hits = sorted(glob.glob(local(args[2])))
  if not hits:
    sys.exit("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.")
  for h in hits:
    print("gs://" + os.path.relpath(h, os.path.join(HERE, "bucket")))
else:
  sys.exit(f"fake gcloud: unexpected call {args}")
"""

POD = [
  "--name=n1",
  "--zone=z1",
  "--accelerator-type=v5p-8",
  "--bucket=gs://bkt",
  "--repo=https://example.com/srft-jax.git",
  "--spot",
  "--config.steps=9",
]
CREATE = "gcloud compute tpus tpu-vm create n1 --zone=z1 --version=v2-alpha-tpuv5"
CREATE += " --accelerator-type=v5p-8 --spot"


@pytest.fixture
def cloud(tmp_path):
  """The stand-in cloud: `.env` (gcloud on PATH), `.set(name, *lines)`, `.calls()`."""
  here = tmp_path / "cloud"
  (here / "bin").mkdir(parents=True)
  stub = here / "bin" / "gcloud"
  stub.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable, 1))
  stub.chmod(0o755)

  class Cloud:
    dir = here
    env = dict(
      os.environ,
      PATH=f"{here / 'bin'}:{os.environ['PATH']}",
      FAKE_CLOUD=str(here),
      PY=sys.executable,
    )

    def set(self, name, *lines):
      (here / name).write_text("\n".join(lines))

    def calls(self):
      f = here / "calls.jsonl"
      return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []

  return Cloud()


def _label(args) -> str:
  """A gcloud call in a word: describe, create, delete, stop, clone, install, train, ls ..."""
  if args[:2] == ["storage", "ls"]:
    return "ls results" if args[2].endswith("/results.json") else "ls checkpoints"
  verb = args[3]
  if args[2] == "queued-resources":
    return "qr error" if any("failedData" in a for a in args) else f"qr {verb}"
  if verb != "ssh":
    return verb
  cmd = next(a for a in args if a.startswith("--command="))
  for word, label in (
    ("srft_jax.main", "train"),
    ("pip install", "install"),
    ("git clone", "clone"),
  ):
    if word in cmd:
      return label
  assert "kill $p" in cmd, cmd
  return "stop"


ROUND = [
  "describe",
  "stop",
  "clone",
  "install",
  "train",
]  # tpu_pod.sh --foreground on a READY slice
RESUME_ROUND = ["describe", "stop", "train"]  # ... with --resume


def test_tpu_pod_supervise_preempted_recreated_resumed(cloud, tmp_path):
  """READY -> a round (preempted after a checkpoint) -> PREEMPTED -> deleted ->
  created -> a round with the install (crashes after a checkpoint) -> a round
  with --resume -> results.json in the bucket: done."""
  cloud.set("state", "READY")
  cloud.set("train", "preempt", "crash", "finish")
  state_dir = tmp_path / "state"
  out = subprocess.run(
    ["bash", TPU_POD, *POD, "--supervise", "--backoff-s=0", "--poll-s", "0"]
    + [f"--state-dir={state_dir}"],
    env=cloud.env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  calls = cloud.calls()
  assert [_label(c) for c in calls] == [
    "ls results",
    "describe",
    "ls checkpoints",
    *ROUND,  # preempted
    "ls checkpoints",
    "ls results",
    "describe",  # PREEMPTED
    "delete",
    "describe",  # NOT_FOUND
    "create",
    "describe",  # READY
    *ROUND,  # crashed
    "ls checkpoints",
    "ls results",
    "describe",
    *RESUME_ROUND,  # finished
    "ls checkpoints",
    "ls results",
  ]
  zone = ["--zone=z1"]
  assert calls[1] == ["compute", "tpus", "tpu-vm", "describe", "n1", *zone, "--format=value(state)"]
  assert calls[11] == ["compute", "tpus", "tpu-vm", "delete", "n1", *zone, "--quiet"]
  assert ["gcloud", *calls[13]] == shlex.split(CREATE)
  assert calls[2] == ["storage", "ls", "gs://bkt/runs/n1/checkpoints/*/commit_success.txt"]
  train = [c for c in calls if _label(c) == "train"]
  assert len(train) == 3 and all("--workdir=gs://bkt/runs/n1" in c[-1] for c in train)
  assert all("--config.steps=9" in c[-1] and "nohup" not in c[-1] for c in train)

  events = _events(state_dir)
  assert _names(events) == [
    "supervise",
    "state",
    "start",
    "exit",
    "restart",
    "state",
    "recreate",
    "delete",
    "state",
    "create",
    "created",
    "state",
    "start",
    "exit",
    "restart",
    "start",
    "exit",
    "done",
  ]
  assert [e["state"] for e in events if e["event"] == "state"] == [
    "READY",
    "PREEMPTED",
    "NOT_FOUND",
    "READY",
  ]
  starts = [e for e in events if e["event"] == "start"]
  assert [e["cmd"][-1] for e in starts] == ["--foreground", "--foreground", "--resume"]
  assert starts[0]["cmd"][:2] == ["bash", TPU_POD] and "--supervise" not in starts[0]["cmd"]
  assert "--config.steps=9" in starts[0]["cmd"] and "--spot" in starts[0]["cmd"]
  exits = [(e["rc"], e["latest_step"], e["progress"]) for e in events if e["event"] == "exit"]
  assert exits == [(255, 1, True), (1, 2, True), (0, 3, True)]


def _tpu_supervisor(cloud, tmp_path, **policy):
  launch = ["bash", TPU_POD, *POD, "--foreground"]
  return supervise.TpuSupervisor(
    name="n1",
    zone="z1",
    launch=launch,
    create=shlex.split(CREATE),
    workdir="gs://bkt/runs/n1",
    policy=supervise.Policy(**{"backoff_s": 0.0, "poll_s": 0.0, **policy}),
    log=supervise.EventLog(str(tmp_path / "state" / "supervise.log"), echo=False),
    env=cloud.env,
  )


def _steps(sup, n=20):
  """Outcomes of step() until one ends the supervision."""
  out = []
  while len(out) < n:
    out.append(sup.step())
    if out[-1].exit_code is not None:
      return out
  raise AssertionError(f"no end after {n} steps: {out}")


def test_tpu_deleted_slice_is_created(cloud, tmp_path):
  cloud.set("state", "DELETED")
  sup = _tpu_supervisor(cloud, tmp_path)
  assert [o.action for o in _steps(sup)] == ["create", "done"]
  assert [_label(c) for c in cloud.calls()] == [
    "ls results",
    "describe",
    "create",
    "describe",
    "ls checkpoints",
    *ROUND,
    "ls checkpoints",
    "ls results",
  ]
  assert _names(_events(tmp_path / "state"))[:4] == ["state", "recreate", "create", "created"]


def test_tpu_quota_error_waits_with_backoff(cloud, tmp_path):
  cloud.set("create", "quota", "quota", "ok")
  sup = _tpu_supervisor(cloud, tmp_path, backoff_s=1.0, backoff_max_s=1.5)
  outcomes = _steps(sup)
  assert [(o.action, o.delay_s) for o in outcomes] == [
    ("wait_capacity", 1.0),
    ("wait_capacity", 1.5),
    ("create", 0.0),
    ("done", 0.0),
  ]
  assert [_label(c) for c in cloud.calls()] == [
    "ls results",
    *["describe", "create"] * 3,
    "describe",
    "ls checkpoints",
    *ROUND,
    "ls checkpoints",
    "ls results",
  ]
  events = _events(tmp_path / "state")
  assert _names(events).count("capacity") == 2 and _names(events).count("recreate") == 1
  assert sup.stalled == 0  # capacity waits are not the run's failures


def test_tpu_create_error_gives_up(cloud, tmp_path):
  cloud.set("create", "denied", "denied")
  sup = _tpu_supervisor(cloud, tmp_path, max_stalled_restarts=1)
  assert [(o.action, o.exit_code) for o in _steps(sup)] == [("restart", None), ("give_up", 1)]
  assert [_label(c) for c in cloud.calls()] == ["ls results", *["describe", "create"] * 2]


def test_tpu_stop_stops_the_workers_trainers(cloud, tmp_path):
  """SIGTERM to the supervisor mid-round: tpu_pod.sh --stop sends SIGTERM to
  every worker's trainer (the fake one then exits), nothing is restarted."""
  cloud.set("state", "READY")
  cloud.set("train", "hang")
  state_dir = tmp_path / "state"
  sup = _popen(
    ["bash", TPU_POD, *POD, "--supervise", f"--state-dir={state_dir}"],
    env=cloud.env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  _wait_for(lambda: "train" in [_label(c) for c in cloud.calls()], 60, "the training round")
  sup.send_signal(signal.SIGTERM)
  assert sup.wait(timeout=60) == 128 + signal.SIGTERM
  labels = [_label(c) for c in cloud.calls()]
  assert labels[labels.index("train") + 1 :] == ["stop", "ls checkpoints", "ls results"]
  events = _events(state_dir)
  assert _names(events)[-5:] == ["start", "stop_workers", "stop_workers_exit", "exit", "stop"]
  assert events[-4]["cmd"][-1] == "--stop"


def test_tpu_early_preemptions_are_not_stalls(cloud, tmp_path):
  """A slice reclaimed before the round's first checkpoint costs no stalled
  restart (spot capacity is retried without end); a crash before one does."""
  cloud.set("state", "READY")
  cloud.set("train", "preempt_early", "preempt_early", "crash_early", "crash_early")
  sup = _tpu_supervisor(cloud, tmp_path, max_stalled_restarts=1)
  actions = [o.action for o in _steps(sup)]
  assert actions == [
    *["lost_slice", "delete", "create"] * 2,
    "restart",  # the first crash: a stall
    "give_up",  # the second
  ]
  labels = [_label(c) for c in cloud.calls()]
  assert labels[: 2 + 1 + len(ROUND) + 3] == [
    "ls results",
    "describe",
    "ls checkpoints",
    *ROUND,
    "ls checkpoints",
    "ls results",
    "describe",  # the round's end: the slice is gone
  ]
  starts = [e for e in _events(tmp_path / "state") if e["event"] == "start"]
  # A new slice is installed; so is one after a round that failed before any progress.
  assert [e["installed"] for e in starts] == [False] * 4


def test_missing_program_is_a_failed_run(tmp_path):
  wd = tmp_path / "wd"
  rc = _supervise(wd, [str(tmp_path / "no_such_program")], "--max_stalled_restarts=0").wait(30)
  assert rc == supervise.EXIT_GAVE_UP
  events = _events(wd)
  assert _names(events) == ["supervise", "start", "exit", "give_up"]
  assert events[1]["pid"] is None and "no_such_program" in events[1]["error"]
  assert events[2]["rc"] == 127


# ----------------------------------------------------------------------------
# A queued resource: the request's states against the same stand-in gcloud
# ----------------------------------------------------------------------------

QR_CREATE = "gcloud compute tpus queued-resources create n1 --node-id=n1 --zone=z1"
QR_CREATE += " --runtime-version=v2-alpha-tpuv5 --accelerator-type=v5p-8 --spot"
QROUND = ["qr describe", "stop", "clone", "install", "train"]  # tpu_pod.sh --queued --foreground


def test_tpu_pod_queued_supervise_waits_reclaimed_recreated(cloud, tmp_path):
  """No request -> created -> WAITING_FOR_RESOURCES (twice) -> PROVISIONING ->
  ACTIVE -> a round (reclaimed after a checkpoint) -> SUSPENDING -> SUSPENDED ->
  deleted -> created -> WAITING_FOR_RESOURCES -> ACTIVE -> a round on the new
  slice that resumes from the checkpoint and finishes: done."""
  cloud.set(
    "qr_plan",
    "WAITING_FOR_RESOURCES,WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE",
    "WAITING_FOR_RESOURCES,ACTIVE",
  )
  cloud.set("train", "reclaim", "finish")
  state_dir = tmp_path / "state"
  out = subprocess.run(
    ["bash", TPU_POD, *POD, "--queued", "--supervise", "--backoff-s=0", "--poll-s=0.01"]
    + [f"--state-dir={state_dir}", "--max-stalled-restarts=0"],
    env=cloud.env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  calls = cloud.calls()
  assert [_label(c) for c in calls] == [
    "ls results",
    "qr describe",  # NOT_FOUND
    "qr create",
    *["qr describe"] * 3,  # WAITING_FOR_RESOURCES, WAITING_FOR_RESOURCES, PROVISIONING
    "qr describe",  # ACTIVE
    "ls checkpoints",
    *QROUND,  # reclaimed after checkpoint 1
    "ls checkpoints",
    "ls results",
    "qr describe",  # SUSPENDING
    "qr describe",  # SUSPENDED
    "qr delete",
    "qr describe",  # NOT_FOUND
    "qr create",
    "qr describe",  # WAITING_FOR_RESOURCES
    "qr describe",  # ACTIVE
    *QROUND,  # a new slice: installed again, then checkpoint 2 and results.json
    "ls checkpoints",
    "ls results",
  ]
  qr = ["compute", "tpus", "queued-resources"]
  assert calls[1] == [*qr, "describe", "n1", "--zone=z1", "--format=value(state.state)"]
  assert ["gcloud", *calls[2]] == shlex.split(QR_CREATE) == ["gcloud", *calls[19]]
  assert calls[17] == [*qr, "delete", "n1", "--zone=z1", "--quiet", "--force"]
  assert not any(c[3:4] in (["create"], ["delete"]) and c[2] == "tpu-vm" for c in calls)
  train = [c[-1] for c in calls if _label(c) == "train"]
  assert len(train) == 2 and all("--workdir=gs://bkt/runs/n1" in t for t in train)

  events = _events(state_dir)
  assert events[0]["queued"] is True and events[0]["max_stalled_restarts"] == 0
  assert [(e["event"], e.get("state")) for e in events[1:]] == [
    ("state", "NOT_FOUND"),
    ("recreate", "NOT_FOUND"),
    ("create", "NOT_FOUND"),
    ("created", None),
    ("queued", "WAITING_FOR_RESOURCES"),
    ("queued", "PROVISIONING"),
    ("state", "ACTIVE"),
    ("start", None),
    ("exit", None),
    ("restart", None),
    ("state", "SUSPENDING"),
    ("state", "SUSPENDED"),
    ("recreate", "SUSPENDED"),
    ("delete", None),
    ("state", "NOT_FOUND"),
    ("create", "NOT_FOUND"),
    ("created", None),
    ("queued", "WAITING_FOR_RESOURCES"),
    ("state", "ACTIVE"),
    ("start", None),
    ("exit", None),
    ("done", None),
  ]
  queued = [e for e in events if e["event"] == "queued"]
  assert queued[0]["waited_s"] == 0 and queued[1]["waited_s"] > 0  # time in the queue
  active = [e for e in events if e.get("state") == "ACTIVE"]
  assert all(e["waited_s"] >= q["waited_s"] for e, q in zip(active, queued[1:]))
  assert [e["cmd"] for e in events if e["event"] == "create"] == [shlex.split(QR_CREATE)] * 2
  starts = [e for e in events if e["event"] == "start"]
  assert [e["installed"] for e in starts] == [False, False]
  assert all("--queued" in e["cmd"] and e["cmd"][-1] == "--foreground" for e in starts)
  exits = [(e["rc"], e["latest_step"], e["progress"]) for e in events if e["event"] == "exit"]
  assert exits == [(255, 1, True), (0, 2, True)]


def _queued_supervisor(cloud, tmp_path, **policy):
  launch = ["bash", TPU_POD, *POD, "--queued", "--foreground"]
  return supervise.QueuedTpuSupervisor(
    name="n1",
    zone="z1",
    launch=launch,
    create=shlex.split(QR_CREATE),
    workdir="gs://bkt/runs/n1",
    policy=supervise.Policy(**{"backoff_s": 0.0, "poll_s": 0.0, **policy}),
    log=supervise.EventLog(str(tmp_path / "state" / "supervise.log"), echo=False),
    env=cloud.env,
  )


def test_queued_failed_request_is_recreated(cloud, tmp_path):
  """A FAILED request (here: its --valid-until-duration ran out) is deleted with
  its error message logged, and created again."""
  cloud.set("qr", "FAILED")
  cloud.set("qr_error", "The queued resource request expired")
  sup = _queued_supervisor(cloud, tmp_path, max_stalled_restarts=0)
  assert [o.action for o in _steps(sup)] == ["delete", "create", "done"]
  assert [_label(c) for c in cloud.calls()] == [
    "ls results",
    "qr describe",  # FAILED
    "qr error",
    "qr delete",
    "qr describe",  # NOT_FOUND
    "qr create",
    "qr describe",  # ACTIVE
    "ls checkpoints",
    *QROUND,
    "ls checkpoints",
    "ls results",
  ]
  assert cloud.calls()[2][-1] == "--format=value(state.failedData.error.message)"
  events = _events(tmp_path / "state")
  assert _names(events) == [
    *("state", "recreate", "delete", "state", "create", "created", "state"),
    *("start", "exit", "done"),
  ]
  assert events[1] == {**events[1], "state": "FAILED"}
  assert events[1]["error"] == "The queued resource request expired"


def test_queued_quota_error_waits_with_backoff(cloud, tmp_path):
  cloud.set("create", "quota", "quota", "ok")
  cloud.set("qr_plan", "WAITING_FOR_RESOURCES,ACTIVE")
  sup = _queued_supervisor(cloud, tmp_path, backoff_s=1.0, backoff_max_s=1.5, poll_s=0.25)
  outcomes = _steps(sup)
  assert [(o.action, o.delay_s) for o in outcomes] == [
    ("wait_capacity", 1.0),
    ("wait_capacity", 1.5),
    ("create", 0.0),
    ("queued", 0.25),  # the queue: poll_s, not the backoff
    ("done", 0.0),
  ]
  assert [_label(c) for c in cloud.calls()] == [
    "ls results",
    *["qr describe", "qr create"] * 3,
    "qr describe",  # WAITING_FOR_RESOURCES
    "qr describe",  # ACTIVE
    "ls checkpoints",
    *QROUND,
    "ls checkpoints",
    "ls results",
  ]
  events = _events(tmp_path / "state")
  capacity = [e for e in events if e["event"] == "capacity"]
  assert [(e["delay_s"], e["waits"]) for e in capacity] == [(1.0, 1), (1.5, 2)]
  assert "RESOURCE_EXHAUSTED" in capacity[0]["error"]
  assert sup.stalled == 0 and sup.capacity_waits == 0


def test_queued_waiting_and_reclaims_are_not_stalls(cloud, tmp_path):
  """With max_stalled_restarts=0 any stall gives up: the queue's states, a
  request reclaimed before the round's first checkpoint (SUSPENDING) and a node
  reclaimed while the request still says ACTIVE are none; a crash is."""
  cloud.set(
    "qr_plan",
    "WAITING_FOR_RESOURCES,WAITING_FOR_RESOURCES,WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE",
    "ACCEPTED,ACTIVE",
    "ACTIVE",
  )
  cloud.set("train", "reclaim_early", "node_lost_early", "crash_early")
  sup = _queued_supervisor(cloud, tmp_path, max_stalled_restarts=0)
  outcomes = _steps(sup)
  assert [o.action for o in outcomes] == [
    "create",
    *["queued"] * 4,
    "lost_slice",  # the request: SUSPENDING
    "delete",
    "create",
    "queued",
    "lost_slice",  # the request ACTIVE, its node PREEMPTED
    "delete",
    "create",
    "give_up",  # a crash before a checkpoint on an ACTIVE request: a stall
  ]
  labels = [_label(c) for c in cloud.calls()]
  lost = [i for i, c in enumerate(cloud.calls()) if c[2:4] == ["tpu-vm", "describe"]]
  assert len(lost) == 2 and labels[lost[0] - 1] == "qr describe"  # the node, after the request
  events = _events(tmp_path / "state")
  assert [e["state"] for e in events if e["event"] == "queued"] == [
    "WAITING_FOR_RESOURCES",
    "PROVISIONING",
    "ACCEPTED",
  ]
  assert _names(events).count("lost_slice") == 2 and _names(events)[-1] == "give_up"
  assert [e["installed"] for e in events if e["event"] == "start"] == [False] * 3


def test_tpu_pod_queued_waits_for_active(cloud):
  """Without the supervisor: `tpu_pod.sh --queued` creates the request, polls it
  until ACTIVE, installs and trains; a request that FAILED while waited for
  ends the script (exit 2) with its error message."""
  cloud.set("qr_plan", "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
  env = dict(cloud.env, QUEUE_POLL_S="0")
  cmd = ["bash", TPU_POD, *POD, "--queued", "--valid-until=1h", "--foreground"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  calls = cloud.calls()
  assert [_label(c) for c in calls] == [
    "qr describe",  # NOT_FOUND
    "qr create",
    *["qr describe"] * 3,  # WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE
    "clone",
    "install",
    "train",
  ]
  assert ["gcloud", *calls[1]] == shlex.split(QR_CREATE) + ["--valid-until-duration=1h"]
  assert "queued resource n1: WAITING_FOR_RESOURCES (waiting)" in out.stdout
  assert "queued resource n1: PROVISIONING (waiting)" in out.stdout

  cloud.set("qr", "SUSPENDED")  # reclaimed: deleted, created again, then it fails
  cloud.set("qr_plan", "WAITING_FOR_RESOURCES,FAILED")
  cloud.set("qr_error", "request expired")
  (cloud.dir / "calls.jsonl").unlink()
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stdout + out.stderr
  assert "queued resource n1 is FAILED" in out.stderr and "request expired" in out.stderr
  assert [_label(c) for c in cloud.calls()] == [
    *("qr describe", "qr delete", "qr create", "qr describe", "qr describe", "qr error"),
  ]
