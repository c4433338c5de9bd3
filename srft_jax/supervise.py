"""Supervision for unattended (spot) runs: keep a run going until WORKDIR/results.json exists.

  python -m srft_jax.supervise --workdir=runs/x -- \\
      python -m srft_jax.main --config=configs/default.py --workdir=runs/x
  bash launch/local.sh --supervise ...    bash launch/gpu.sh --supervise ...
  bash launch/tpu_pod.sh ... --supervise  # the TPU mode, run from a small always-on machine
  bash launch/tpu_pod.sh ... --spot --queued --supervise  # ... through a queued resource

A job (`JobSupervisor`): the command runs; when it ends without results.json it
is started again after a backoff (`Policy`: backoff_s doubling up to
backoff_max_s). The run resumes from its own checkpoints, so a restart loses at
most the steps since the last one. A run that made progress (a new checkpoint
step under WORKDIR/checkpoints) resets the count; after max_stalled_restarts
restarts in a row without progress the supervisor gives up (exit 1). Exit code
EXIT_STORAGE of the job (storage unavailable beyond its retry budget) is
retried like a crash; EXIT_CONFIG (a config or usage error) is never retried.

A Cloud TPU slice (`TpuSupervisor`): each `step()` looks at the slice with
`gcloud compute tpus tpu-vm describe` and acts on its state: READY -> one round
of `launch/tpu_pod.sh ... --foreground` (install, then training on every
worker, waited for; `--resume` once installed); PREEMPTED / TERMINATED /
STOPPED / FAILED -> delete (then create); NOT_FOUND / DELETED -> create (a
quota or capacity error waits with backoff and tries again, without end);
other states (CREATING, ...) -> look again after poll_s. A round that
made no progress counts as stalled unless the slice went away under it. Progress and
results.json are read in the gs:// workdir with `gcloud storage ls`, so the
supervising machine needs no gcsfs and no jax.

A queued resource (`QueuedTpuSupervisor`, `tpu_pod.sh --queued --supervise`):
the slice comes through `gcloud compute tpus queued-resources` (its node is
the TPU VM, named like it) and each `step()` looks at the request's state:
ACTIVE -> a training round as above; ACCEPTED / WAITING_FOR_RESOURCES /
PROVISIONING / CREATING -> wait poll_s (the queue, neither a stall nor a
failure); SUSPENDED (spot capacity reclaimed) / FAILED (its error logged) ->
delete (`--force`: the node too), then create again; NOT_FOUND -> create (the
same backoff on quota errors); SUSPENDING / DELETING -> look again after
poll_s. A request that waits past its `--valid-until-duration` is failed by
the service, and so recreated (docs/method.md §14.2).

Every event is one JSON line with a UTC time in STATE_DIR/supervise.log
(STATE_DIR: the workdir when it is local, else --state_dir, default
~/.cache/srft_jax/supervise/<workdir as a name>). Stop it with Ctrl-C or
`kill PID` (PID printed at the start and in STATE_DIR/supervise.pid): the
running job gets SIGTERM (it checkpoints and exits; on TPU, `tpu_pod.sh
--stop` sends it to every worker's trainer) and nothing is restarted; a second
signal kills the job at once. Exit codes: 0 done, 1 gave up, 128 + signal
when stopped. Only the standard library is imported: jax need not be installed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence

from srft_jax import io_retry
from srft_jax import paths

EXIT_STORAGE = io_retry.EXIT_STORAGE  # the job: storage unavailable beyond its retry budget
EXIT_CONFIG = 2  # srft_jax/main.py's config error, launch/tpu_pod.sh's usage error: not retried
EXIT_DONE = 0
EXIT_GAVE_UP = 1

LOG_NAME = "supervise.log"
PID_NAME = "supervise.pid"
RESULTS = "results.json"

# TPU VM states (`describe --format=value(state)`) and what a round does about them.
RECREATE_STATES = ("PREEMPTED", "TERMINATED", "STOPPED", "FAILED")  # delete, then create
ABSENT_STATES = ("NOT_FOUND", "DELETED")  # create
# Queued-resource states (`queued-resources describe --format=value(state.state)`).
QUEUED_WAITING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING")  # wait
QUEUED_RECREATE = ("SUSPENDED", "FAILED")  # delete --force, then create
QUEUED_LEAVING = ("SUSPENDING", "DELETING")  # wait for the state after
DESCRIBE_ERROR = "DESCRIBE_ERROR"  # gcloud failed for another reason (network, auth)
# A create refused for want of quota or capacity is retried without end.
CAPACITY_ERRORS = re.compile(
  r"resource_exhausted|quota|capacity|insufficient|stockout|unavailable|try again", re.I
)
ALREADY_EXISTS = re.compile(r"already_exists|already exists", re.I)
NO_MATCH = re.compile(r"matched no objects|not found|no urls matched", re.I)


class Stopped(Exception):
  """A stop signal (SIGTERM, SIGINT) arrived: nothing more is started."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
  """When to restart and when to give up."""

  max_stalled_restarts: int = 5  # restarts in a row without a new checkpoint, then give up
  backoff_s: float = 10.0  # the first wait before a restart; doubles per stalled restart
  backoff_max_s: float = 600.0  # the longest wait
  poll_s: float = 30.0  # TPU: between looks at a slice that is being created or deleted

  def __post_init__(self):
    if self.max_stalled_restarts < 0:
      raise ValueError(f"max_stalled_restarts must be >= 0, got {self.max_stalled_restarts}")
    if not 0 <= self.backoff_s <= self.backoff_max_s:
      raise ValueError(
        f"need 0 <= backoff_s <= backoff_max_s, got {self.backoff_s}, {self.backoff_max_s}"
      )
    if self.poll_s < 0:
      raise ValueError(f"poll_s must be >= 0, got {self.poll_s}")

  def delay(self, n: int) -> float:
    """The wait before the n-th retry in a row (n >= 1): backoff_s * 2^(n-1), capped."""
    return min(self.backoff_s * 2.0 ** min(max(n - 1, 0), 60), self.backoff_max_s)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What one `step()` did, and what comes next."""

  action: str  # "done", "give_up", "restart", "train", "delete", "create", "wait", ...
  delay_s: float = 0.0  # the wait before the next step
  exit_code: int | None = None  # set when supervision ends


class EventLog:
  """Appends one JSON line per event ({"time": UTC, "event": ..., ...}) to `path`,
  and echoes it to stderr."""

  def __init__(self, path: str, *, echo: bool = True):
    self.path = path
    self.echo = echo
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def __call__(self, event: str, **fields) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    row = {"time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "event": event, **fields}
    line = json.dumps(row)
    with open(self.path, "a") as f:
      f.write(line + "\n")
    if self.echo:
      print(f"supervise: {line}", file=sys.stderr, flush=True)
    return row


def read_log(path: str) -> list[dict]:
  """The events of a supervise.log, oldest first."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------
# The workdir, seen from the supervisor
# ----------------------------------------------------------------------------


def _step_of(name: str) -> int | None:
  """The step of a checkpoint listing entry: `N` (a local step directory, final
  once renamed into place) or `N/commit_success.txt` (a final step on GCS)."""
  head, _, rest = name.strip("/").partition("/")
  if head.isdigit() and rest in ("", "commit_success.txt"):
    return int(head)
  return None


class WorkdirFiles:
  """A local or gs:// workdir through srft_jax.paths (fsspec, gcsfs): the host that runs the job."""

  def __init__(self, workdir: str):
    self.workdir = workdir.rstrip("/")

  def done(self) -> bool:
    return paths.exists(f"{self.workdir}/{RESULTS}")

  def checkpoint_steps(self) -> set[int]:
    d = f"{self.workdir}/checkpoints"
    if paths.is_remote(d):
      names = list(paths.list_files(d)) if paths.isdir(d) else []
    else:
      names = os.listdir(d) if os.path.isdir(d) else []
    return {s for s in map(_step_of, names) if s is not None}


class GcloudFiles:
  """A gs:// workdir through `gcloud storage ls`: a supervising machine without gcsfs."""

  def __init__(self, workdir: str, *, gcloud: str = "gcloud", run: Callable | None = None):
    self.workdir = workdir.rstrip("/")
    self.gcloud = gcloud
    self._run = run or _capture

  def _ls(self, url: str) -> list[str]:
    rc, out, err = self._run([self.gcloud, "storage", "ls", url])
    if rc != 0:
      if NO_MATCH.search(err):
        return []
      raise OSError(f"gcloud storage ls {url}: exit {rc}: {err.strip()[-500:]}")
    return [line.strip() for line in out.splitlines() if line.strip()]

  def done(self) -> bool:
    return bool(self._ls(f"{self.workdir}/{RESULTS}"))

  def checkpoint_steps(self) -> set[int]:
    prefix = f"{self.workdir}/checkpoints/"
    names = [u[len(prefix) :] for u in self._ls(f"{prefix}*/commit_success.txt")]
    return {s for s in map(_step_of, names) if s is not None}


def _capture(cmd: Sequence[str], timeout: float | None = None) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of a short command; a missing program is exit 127."""
  try:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
  except FileNotFoundError as e:
    return 127, "", str(e)
  except subprocess.TimeoutExpired as e:
    return 124, "", f"timed out after {e.timeout} s"
  return out.returncode, out.stdout, out.stderr


def default_state_dir(workdir: str) -> str:
  """Where the log and pid file go: the workdir itself when local."""
  if not paths.is_remote(workdir):
    return workdir
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", workdir.split("://", 1)[1].strip("/"))
  return os.path.join(paths.cache_root(), "supervise", name)


# ----------------------------------------------------------------------------
# The loop: step() until an exit code, signals forwarded
# ----------------------------------------------------------------------------


class Supervisor:
  """The loop around `step()`, the child processes, signals and the pid file.
  Subclasses define `step()` (one decision and its action) and `forward_stop`."""

  def __init__(self, *, workdir: str, files, policy: Policy, log: EventLog, env=None):
    self.workdir = workdir
    self.files = files
    self.policy = policy
    self.log = log
    self.env = env
    self.stalled = 0  # restarts in a row without a new checkpoint
    self.best_step: int | None = None  # the newest checkpoint step seen
    self.stop_signal: int | None = None
    self._signals = 0
    self._wake = threading.Event()
    self._procs: list[subprocess.Popen] = []

  def step(self) -> Outcome:
    raise NotImplementedError

  def forward_stop(self, proc: subprocess.Popen) -> None:
    """Asks a running child to stop (it should checkpoint and exit). Here: SIGTERM
    to its own process only, for srft_jax.main checkpoints on SIGTERM and its
    reward workers must live until it has."""
    with contextlib.suppress(ProcessLookupError):
      os.kill(proc.pid, signal.SIGTERM)

  # -- the workdir

  def done(self) -> bool:
    try:
      return self.files.done()
    except OSError as e:
      self.log("files_error", error=str(e)[-500:])
      return False

  def latest_step(self) -> int | None:
    """The newest checkpoint step (-1: none); None when the listing failed."""
    try:
      return max(self.files.checkpoint_steps(), default=-1)
    except OSError as e:
      self.log("files_error", error=str(e)[-500:])
      return None

  def progressed(self, latest: int | None) -> bool:
    """Whether `latest` is a step past every one seen so far (and remember it)."""
    if latest is None:
      return False
    if self.best_step is None or latest > self.best_step:
      self.best_step = latest
      return True
    return False

  def after_failure(self, progress: bool, rc: int | None, what: str) -> Outcome:
    """A run of the job ended without results.json: restart after a backoff, or give up."""
    self.stalled = 0 if progress else self.stalled + 1
    if rc == EXIT_CONFIG and not progress:
      self.log("give_up", reason=f"exit {EXIT_CONFIG}: a config or usage error", rc=rc)
      return Outcome("give_up", exit_code=EXIT_GAVE_UP)
    if self.stalled > self.policy.max_stalled_restarts:
      self.log(
        "give_up",
        reason=f"{self.stalled} runs in a row without a new checkpoint",
        max_stalled_restarts=self.policy.max_stalled_restarts,
      )
      return Outcome("give_up", exit_code=EXIT_GAVE_UP)
    delay = self.policy.delay(max(self.stalled, 1))
    self.log("restart", delay_s=delay, stalled=self.stalled, what=what)
    return Outcome("restart", delay_s=delay)

  # -- children

  def _start(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
    # Its own session: a terminal's Ctrl-C reaches the supervisor only, which decides.
    proc = subprocess.Popen(list(cmd), start_new_session=True, env=self.env, **kw)
    self._procs.append(proc)
    return proc

  def run_child(self, cmd: Sequence[str], **fields) -> int:
    """Runs a long command (the job, a training round) to its end; its exit code.
    A stop signal meanwhile is forwarded (`forward_stop`), once; after one,
    nothing long is started (short gcloud calls still are: `capture`)."""
    if self.stop_signal is not None:
      raise Stopped
    try:
      proc = self._start(cmd)
    except OSError as e:  # no such program: a failed run like any other
      self.log("start", cmd=list(cmd), pid=None, error=str(e), **fields)
      return 127
    self.log("start", cmd=list(cmd), pid=proc.pid, **fields)
    forwarded = False
    try:
      while True:
        try:
          rc = proc.wait(timeout=0.2)
          break
        except subprocess.TimeoutExpired:
          if self.stop_signal is not None and not forwarded:
            forwarded = True
            self.forward_stop(proc)
    finally:
      self._procs.remove(proc)
    return rc

  def capture(self, cmd: Sequence[str], timeout: float | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a gcloud call; a second signal kills it."""
    try:
      proc = self._start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as e:
      return 127, "", str(e)
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      _kill_group(proc)
      out, err = proc.communicate()
      return 124, out, err + f"\ntimed out after {timeout} s"
    finally:
      self._procs.remove(proc)
    return proc.returncode, out, err

  # -- signals, pid file, loop

  def _on_signal(self, signum, frame):
    del frame
    self._signals += 1
    if self.stop_signal is None:
      self.stop_signal = signum
    self._wake.set()
    if self._signals > 1:  # a second signal: no more waiting for checkpoints
      for proc in list(self._procs):
        _kill_group(proc)

  @contextlib.contextmanager
  def _signals_handled(self):
    previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield
    finally:
      for s, h in previous.items():
        signal.signal(s, h)

  def run(self, state_dir: str) -> int:
    """Steps until done, given up or stopped; the exit code."""
    with _pid_file(os.path.join(state_dir, PID_NAME)) as pid_path, self._signals_handled():
      print(
        f"supervise: pid {os.getpid()} (stop: Ctrl-C or kill {os.getpid()}; pid file {pid_path})\n"
        f"supervise: log {self.log.path}",
        file=sys.stderr,
        flush=True,
      )
      self.log("supervise", pid=os.getpid(), workdir=self.workdir, **self.setup_fields())
      try:
        while True:
          out = self.step()
          if out.exit_code is not None:
            return out.exit_code
          if self._wake.wait(out.delay_s) or self.stop_signal is not None:
            raise Stopped
      except Stopped:
        sig = self.stop_signal or signal.SIGTERM
        self.log("stop", signal=signal.Signals(sig).name)
        return 128 + sig

  def setup_fields(self) -> dict:
    return dataclasses.asdict(self.policy)


def _kill_group(proc: subprocess.Popen) -> None:
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _pid_file(path: str):
  """This process's pid in `path`, held under a lock: a second supervisor of
  the same workdir is refused."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  f = open(path, "a+")
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise SystemExit(
        f"supervise: another supervisor (pid {f.read().strip() or '?'}) holds {path}"
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    yield path
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  finally:
    f.close()


# ----------------------------------------------------------------------------
# A job on this machine
# ----------------------------------------------------------------------------


class JobSupervisor(Supervisor):
  """Restarts `command` until the workdir holds results.json."""

  def __init__(self, command: Sequence[str], **kw):
    super().__init__(**kw)
    self.command = list(command)
    self.attempt = 0

  def step(self) -> Outcome:
    if self.done():
      self.log("done", attempts=self.attempt)
      return Outcome("done", exit_code=EXIT_DONE)
    if self.best_step is None:
      self.progressed(self.latest_step())
    self.attempt += 1
    rc = self.run_child(self.command, attempt=self.attempt)
    latest = self.latest_step()
    progress = self.progressed(latest)
    done = self.done()
    self.log("exit", rc=rc, reason=_reason(rc, done), latest_step=latest, progress=progress)
    if self.stop_signal is not None:
      raise Stopped
    if done:
      self.log("done", attempts=self.attempt)
      return Outcome("done", exit_code=EXIT_DONE)
    return self.after_failure(progress, rc, "job")


def _reason(rc: int | None, done: bool) -> str:
  if done:
    return "finished"
  if rc is None:
    return "unknown"
  if rc < 0:
    return f"killed by {signal.Signals(-rc).name}" if -rc in signal.valid_signals() else "killed"
  if rc == EXIT_STORAGE:
    return "storage unavailable"
  if rc == EXIT_CONFIG:
    return "config or usage error"
  if rc == 0:
    return "exited without results (preempted?)"
  return "crashed"


# ----------------------------------------------------------------------------
# A Cloud TPU slice, from outside it
# ----------------------------------------------------------------------------


class TpuSupervisor(Supervisor):
  """One `step()` per look at the slice (module docstring).

  `launch`: one round, `launch/tpu_pod.sh ... --foreground` (it creates a
  missing slice too, reinstalls, stops an earlier trainer and trains in the
  foreground on every worker); `--resume` is appended once the slice is
  installed, `--stop` for a stop (SIGTERM to every worker's trainer).
  `create`: the `gcloud ... create` command (tpu_pod.sh builds it). The
  class attributes name the states that train, recreate, create or wait.
  """

  ready_states: tuple[str, ...] = ("READY",)
  recreate_states: tuple[str, ...] = RECREATE_STATES
  absent_states: tuple[str, ...] = ABSENT_STATES
  leaving_states: tuple[str, ...] = ()  # on the way to absent: no "recreate" of its own

  def __init__(
    self,
    *,
    name: str,
    zone: str,
    project: str = "",
    launch: Sequence[str],
    create: Sequence[str],
    gcloud: str = "gcloud",
    **kw,
  ):
    kw.setdefault("files", GcloudFiles(kw["workdir"], gcloud=gcloud, run=self._files_call))
    super().__init__(**kw)
    self.launch = list(launch)
    self.create_cmd = list(create)
    self.loc = loc = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    self.describe_cmd = [gcloud, "compute", "tpus", "tpu-vm", "describe", name, *loc]
    self.describe_cmd.append("--format=value(state)")
    self.delete_cmd = [gcloud, "compute", "tpus", "tpu-vm", "delete", name, *loc, "--quiet"]
    self.gcloud = gcloud
    self.name = name
    self.installed = False  # this supervisor ran a round on the slice as it is now
    self.rounds = 0
    self.capacity_waits = 0  # creates refused in a row for quota / capacity
    self.describe_errors = 0
    self.last_state: str | None = None
    self.checked_done = False

  def _files_call(self, cmd):
    return self.capture(cmd, timeout=300)

  def setup_fields(self) -> dict:
    return {"tpu": self.name, "launch": self.launch, **super().setup_fields()}

  def forward_stop(self, proc):
    # The round's ssh session going away does not stop the remote trainers:
    # tpu_pod.sh --stop sends them SIGTERM and waits for their checkpoint.
    stop = [*self.launch, "--stop"]
    self.log("stop_workers", cmd=stop)
    proc_stop = self._start(stop)
    try:
      rc = proc_stop.wait()
    finally:
      self._procs.remove(proc_stop)
    self.log("stop_workers_exit", rc=rc)
    with contextlib.suppress(ProcessLookupError, PermissionError):
      os.killpg(proc.pid, signal.SIGTERM)

  def state(self) -> str:
    """The slice's state, NOT_FOUND, or DESCRIBE_ERROR."""
    return self._describe(self.describe_cmd)

  def _describe(self, cmd: Sequence[str]) -> str:
    """The last line `cmd` (a `describe --format=value(...)`) prints, NOT_FOUND, or DESCRIBE_ERROR."""
    rc, out, err = self.capture(cmd, timeout=300)
    if rc == 0:
      return out.strip().splitlines()[-1].strip() if out.strip() else "UNKNOWN"
    if re.search(r"not_found|not found", err, re.I):
      return "NOT_FOUND"
    self.log("describe_error", rc=rc, error=err.strip()[-500:])
    return DESCRIBE_ERROR

  def step(self) -> Outcome:
    if not self.checked_done:
      self.checked_done = True
      if self.done():
        self.log("done", rounds=self.rounds)
        return Outcome("done", exit_code=EXIT_DONE)
    state, previous = self.state(), self.last_state
    if state != previous:
      self.log_state(state)
      self.last_state = state
    if state in self.ready_states:
      self.describe_errors = 0
      return self._train()
    if state in self.recreate_states:
      self.log("recreate", state=state, **self.failure(state))
      rc, _, err = self.capture(self.delete_cmd)
      self.log("delete", rc=rc, **({"error": err.strip()[-500:]} if rc else {}))
      self.installed = False
      return Outcome("delete") if rc == 0 else self.after_failure(False, rc, "delete")
    if state in self.absent_states:
      # Found gone (not after our own delete): say so.
      if previous not in (state, *self.recreate_states, *self.leaving_states):
        self.log("recreate", state=state)
      return self._create(state)
    if state == DESCRIBE_ERROR:
      self.describe_errors += 1
      return Outcome("wait", delay_s=self.policy.delay(self.describe_errors))
    return self.wait(state)

  def log_state(self, state: str) -> None:
    """A new state of the slice: one `state` event."""
    self.log("state", state=state)

  def failure(self, state: str) -> dict:
    """What a recreated slice's event says beside its state."""
    del state
    return {}

  def wait(self, state: str) -> Outcome:
    """Any other state: look again after poll_s."""
    del state
    return Outcome("wait", delay_s=self.policy.poll_s)  # CREATING, DELETING, REPAIRING, ...

  def lost(self) -> bool:
    """Whether the slice went away (reclaimed, deleted): a round's failure is then no stall."""
    return self.state() in (*self.recreate_states, *self.absent_states)

  def _create(self, state: str) -> Outcome:
    self.log("create", state=state, cmd=self.create_cmd)
    rc, _, err = self.capture(self.create_cmd)
    self.installed = False
    if rc == 0:
      self.capacity_waits = 0
      self.log("created")
      return Outcome("create")
    error = err.strip()[-500:]
    if CAPACITY_ERRORS.search(err):
      self.capacity_waits += 1
      delay = self.policy.delay(self.capacity_waits)
      self.log("capacity", rc=rc, delay_s=delay, waits=self.capacity_waits, error=error)
      return Outcome("wait_capacity", delay_s=delay)
    if ALREADY_EXISTS.search(err):  # a slice on its way out or in: look again
      self.log("create_error", rc=rc, error=error)
      return Outcome("wait", delay_s=self.policy.poll_s)
    self.log("create_error", rc=rc, error=error)
    return self.after_failure(False, rc, "create")

  def _train(self) -> Outcome:
    if self.best_step is None:
      self.progressed(self.latest_step())
    self.rounds += 1
    cmd = self.launch + (["--resume"] if self.installed else [])
    rc = self.run_child(cmd, round=self.rounds, installed=self.installed)
    latest = self.latest_step()
    progress = self.progressed(latest)
    done = self.done()
    # A round that failed before any progress may have left a half install.
    self.installed = rc == 0 or progress
    self.log("exit", rc=rc, reason=_reason(rc, done), latest_step=latest, progress=progress)
    if self.stop_signal is not None:
      raise Stopped
    if done:
      self.log("done", rounds=self.rounds)
      return Outcome("done", exit_code=EXIT_DONE)
    # A slice reclaimed under a round (before its first checkpoint) is no stall
    # of the run: spot capacity is retried without end, as a refused create is.
    if not progress and self.lost():
      self.log("lost_slice", rc=rc)
      return Outcome("lost_slice")
    return self.after_failure(progress, rc, "round")


class QueuedTpuSupervisor(TpuSupervisor):
  """A slice through a queued resource named like its node (module docstring):
  `create` is the `gcloud compute tpus queued-resources create` command; the
  request is described and deleted here, its node (the TPU VM) only looked at
  when a round fails, to tell a reclaimed slice from a crash."""

  ready_states = ("ACTIVE",)
  recreate_states = QUEUED_RECREATE
  absent_states = ("NOT_FOUND",)
  leaving_states = QUEUED_LEAVING

  def __init__(self, **kw):
    super().__init__(**kw)
    qr = [self.gcloud, "compute", "tpus", "queued-resources"]
    self.node_describe_cmd = self.describe_cmd
    self.describe_cmd = [*qr, "describe", self.name, *self.loc, "--format=value(state.state)"]
    self.error_cmd = [*self.describe_cmd[:-1], "--format=value(state.failedData.error.message)"]
    # --force: the request's node is deleted with it.
    self.delete_cmd = [*qr, "delete", self.name, *self.loc, "--quiet", "--force"]
    self.queued_since: float | None = None  # when the request entered the queue's states

  def setup_fields(self) -> dict:
    return {"queued": True, **super().setup_fields()}

  def log_state(self, state: str) -> None:
    if state not in QUEUED_WAITING:
      waited = self._waited()
      self.queued_since = None
      self.log("state", state=state, **({"waited_s": waited} if waited is not None else {}))
      return
    if self.queued_since is None:
      self.queued_since = time.monotonic()
    self.log("queued", state=state, waited_s=self._waited())

  def _waited(self) -> float | None:
    if self.queued_since is None:
      return None
    return round(time.monotonic() - self.queued_since, 3)

  def failure(self, state: str) -> dict:
    """A FAILED request's error message (an expired --valid-until-duration, a bad
    flag ...), read before the request is deleted."""
    if state != "FAILED":
      return {}
    rc, out, err = self.capture(self.error_cmd, timeout=300)
    return {"error": (out if rc == 0 else err).strip()[-500:]}

  def wait(self, state: str) -> Outcome:
    # The queue is not the run's failure: no stall counted, no backoff.
    return Outcome("queued" if state in QUEUED_WAITING else "wait", delay_s=self.policy.poll_s)

  def lost(self) -> bool:
    state = self.state()
    if state in (*self.recreate_states, *self.leaving_states, *self.absent_states):
      return True
    # ACTIVE a little while after its spot node was reclaimed.
    return self._describe(self.node_describe_cmd) in (*RECREATE_STATES, *ABSENT_STATES)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(options, command): the command is everything after `--`."""
  argv = list(argv)
  if "--" not in argv:
    raise SystemExit("supervise: give the command to supervise after `--`")
  i = argv.index("--")
  p = argparse.ArgumentParser(
    prog="python -m srft_jax.supervise",
    description="Restart a run until WORKDIR/results.json exists (srft_jax/supervise.py).",
  )
  p.add_argument("--workdir", required=True, help="the run's workdir (local or gs://)")
  p.add_argument("--max_stalled_restarts", type=int, default=Policy.max_stalled_restarts)
  p.add_argument("--backoff_s", type=float, default=Policy.backoff_s)
  p.add_argument("--backoff_max_s", type=float, default=Policy.backoff_max_s)
  p.add_argument("--poll_s", type=float, default=Policy.poll_s)
  p.add_argument("--state_dir", default="", help="log and pid file (default: the local workdir)")
  tpu = p.add_argument_group("TPU mode (launch/tpu_pod.sh --supervise): the command is one round")
  tpu.add_argument("--tpu_name", default="", help="the TPU VM's name: TPU mode")
  tpu.add_argument("--zone", default="")
  tpu.add_argument("--project", default="")
  tpu.add_argument("--create_cmd", default="", help="the shell-quoted `gcloud ... create` line")
  tpu.add_argument(
    "--queued",
    action="store_true",
    help="the slice is a queued resource named like the TPU VM (create_cmd: queued-resources create)",
  )
  tpu.add_argument("--gcloud", default="gcloud")
  opts = p.parse_args(argv[:i])
  command = argv[i + 1 :]
  if not command:
    p.error("no command after `--`")
  if opts.tpu_name and not (opts.zone and opts.create_cmd):
    p.error("TPU mode needs --zone and --create_cmd")
  if opts.queued and not opts.tpu_name:
    p.error("--queued needs --tpu_name (TPU mode)")
  return opts, command


def build(opts: argparse.Namespace, command: list[str]) -> tuple[Supervisor, str]:
  """The supervisor the options describe, and its state directory."""
  policy = Policy(
    max_stalled_restarts=opts.max_stalled_restarts,
    backoff_s=opts.backoff_s,
    backoff_max_s=opts.backoff_max_s,
    poll_s=opts.poll_s,
  )
  state_dir = opts.state_dir or default_state_dir(opts.workdir)
  log = EventLog(os.path.join(state_dir, LOG_NAME))
  if opts.tpu_name:
    cls = QueuedTpuSupervisor if opts.queued else TpuSupervisor
    sup = cls(
      name=opts.tpu_name,
      zone=opts.zone,
      project=opts.project,
      launch=command,
      create=shlex.split(opts.create_cmd),
      gcloud=opts.gcloud,
      workdir=opts.workdir,
      policy=policy,
      log=log,
    )
  else:
    files = WorkdirFiles(opts.workdir)
    sup = JobSupervisor(command, workdir=opts.workdir, files=files, policy=policy, log=log)
  return sup, state_dir


def main(argv: Sequence[str] | None = None) -> int:
  opts, command = parse(sys.argv[1:] if argv is None else argv)
  sup, state_dir = build(opts, command)
  return sup.run(state_dir)


if __name__ == "__main__":
  sys.exit(main())
