"""Dry runs of the launch scripts: the right commands, flags propagated, no cloud reached.

gcloud, srun, scontrol and sbatch are replaced on PATH by stubs that record any
call; a dry run must never call them (except `scontrol`, which only reads the
job's host list).
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = ("gcloud", "srun", "sbatch", "gsutil", "ssh", "scp")


@pytest.fixture
def env(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.log"
  for name in STUBS:
    stub = bin_dir / name
    stub.write_text(f'#!/bin/sh\necho {name} "$@" >> {calls}\nexit 99\n')
    stub.chmod(0o755)
  e = dict(os.environ)
  e["PATH"] = f"{bin_dir}:{e['PATH']}"
  for k in list(e):
    if k.startswith("SLURM_"):
      del e[k]
  e["_CALLS"] = str(calls)
  return e


def _run(script, args, env, expect_rc=0, extra_env=None):
  e = dict(env, **(extra_env or {}))
  out = subprocess.run(
    ["bash", str(ROOT / "launch" / script), *args],
    env=e,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == expect_rc, out.stdout + out.stderr
  calls = Path(env["_CALLS"])
  assert not calls.exists(), f"a dry run reached out: {calls.read_text()}"
  return out.stdout, out.stderr


def _commands(stdout):
  """The printed commands, each split into words."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _remote(cmds):
  """The --command strings of `gcloud ... ssh --worker=all`."""
  out = []
  for c in cmds:
    if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == "ssh":
      assert "--worker=all" in c
      out += [w.split("=", 1)[1] for w in c if w.startswith("--command=")]
  return out


POD = ["--name=srft7b", "--zone=us-east5-a", "--bucket=gs://bkt", "--dry-run"]


def test_tpu_pod_fresh_slice(env):
  out, _ = _run(
    "tpu_pod.sh",
    POD
    + [
      "--accelerator-type=v5p-64",
      "--spot",
      "--config=configs/srft_7b_tpu.py:fsdp_tensor",
      "--model-gcs=gs://bkt/models/Q7",
      "--data-gcs=gs://bkt/data",
      "--config.steps=100",
    ],
    env,
  )
  cmds = _commands(out)
  create = next(c for c in cmds if c[4:5] == ["create"])
  assert "srft7b" in create and "--zone=us-east5-a" in create
  assert "--accelerator-type=v5p-64" in create and "--spot" in create
  assert "--version=v2-alpha-tpuv5" in create
  assert any(c[4:5] == ["scp"] and "--worker=all" in c for c in cmds)
  remote = _remote(cmds)
  for r in remote:  # every remote command is valid shell
    subprocess.run(["bash", "-n", "-c", r], check=True)
  install = next(r for r in remote if "pip install" in r and "jax[tpu]" in r)
  assert "jax[tpu]==0.10.2" in install and "-r requirements.txt" in install
  assert "gcsfs==" in install  # Orbax on gs:// needs it (no TensorFlow)
  assert not any("gcloud storage" in r for r in remote)  # the job copies its gs:// inputs
  train = remote[-1]
  assert "-m srft_jax.main" in train and "nohup" in train
  for flag in (
    "--config=configs/srft_7b_tpu.py:fsdp_tensor",
    "--workdir=gs://bkt/runs/srft7b",
    "--config.multihost=True",
    "--config.model.hf_path=gs://bkt/models/Q7",
    "--config.data.tokenizer=gs://bkt/models/Q7",
    "--config.data.data_dir=gs://bkt/data",
    "--config.steps=100",
  ):
    assert flag in train, flag
  assert _pod_steps(cmds) == ["create", "copy", "unpack", "install", "train"]


def _pod_steps(cmds):
  """The fresh-slice steps in the order the dry run prints them, each found once."""

  def remote(c, *parts):  # a worker command holding every one of `parts`
    return any(w.startswith("--command=") and all(p in w for p in parts) for w in c)

  steps = {
    "create": lambda c: c[4:5] == ["create"],
    "copy": lambda c: c[4:5] == ["scp"],
    "unpack": lambda c: remote(c, "tar xzf"),
    "install": lambda c: remote(c, "pip install", "jax[tpu]"),
    "train": lambda c: remote(c, "-m srft_jax.main"),
  }
  at = {}
  for name, is_step in steps.items():
    hits = [i for i, c in enumerate(cmds) if is_step(c)]
    assert len(hits) == 1, f"the {name} step is printed {len(hits)} times"
    at[name] = hits[0]
  return sorted(at, key=at.get)


def test_tpu_pod_topology_and_preemptible(env):
  out, _ = _run(
    "tpu_pod.sh",
    POD
    + [
      "--topology=v5e:4x4",
      "--preemptible",
      "--project=p1",
      "--repo=https://example.com/srft-jax.git",
      "--ref=v1",
    ],
    env,
  )
  cmds = _commands(out)
  create = next(c for c in cmds if c[4:5] == ["create"])
  assert "--type=v5litepod" in create and "--topology=4x4" in create and "--preemptible" in create
  assert "--project=p1" in create and "--version=v2-alpha-tpuv5-lite" in create
  assert not any(c[4:5] == ["scp"] for c in cmds)
  assert any("git clone" in r and "--branch v1" in r for r in _remote(cmds))


def test_tpu_pod_resume_only_restarts_training(env):
  out, _ = _run("tpu_pod.sh", POD + ["--accelerator-type=v5p-64", "--resume", "--foreground"], env)
  cmds = _commands(out)
  assert [c[4] for c in cmds] == ["describe", "ssh", "ssh"]
  stop, train = _remote(cmds)
  for r in (stop, train):
    subprocess.run(["bash", "-n", "-c", r], check=True)
  # The earlier trainer is sent SIGTERM and waited for (its checkpoint) before this one starts.
  assert "kill $p" in stop and "kill -0 $p" in stop and "srft_train.pid" in stop
  assert "--workdir=gs://bkt/runs/srft7b" in train and "nohup" not in train
  assert "srft_train.pid" in train  # a later launch can stop this one too
  assert "resume" in out


QR = ["gcloud", "compute", "tpus", "queued-resources"]


def test_tpu_pod_queued(env):
  """--queued: the slice is requested through a queued resource (created, then
  waited for until ACTIVE), then installed and trained on like a created one."""
  out, _ = _run(
    "tpu_pod.sh",
    POD + ["--topology=v6e:4x4", "--spot", "--queued", "--valid-until", "6h", "--project=p1"],
    env,
  )
  cmds = _commands(out)
  loc = ["--zone=us-east5-a", "--project=p1"]
  describe = [*QR, "describe", "srft7b", *loc, "--format=value(state.state)"]
  assert cmds[:3] == [
    describe,
    [
      *(*QR, "create", "srft7b", "--node-id=srft7b", *loc, "--runtime-version=v2-alpha-tpuv6e"),
      *("--type=v6e", "--topology=4x4", "--spot", "--valid-until-duration=6h"),
    ],
    describe,  # the wait until ACTIVE
  ]
  assert "every 30 s until ACTIVE" in out
  assert not any(c[3:5] == ["tpu-vm", "create"] for c in cmds)
  assert _pod_steps(cmds) == ["create", "copy", "unpack", "install", "train"]
  assert not any("kill $p" in r for r in _remote(cmds))  # a new slice: no earlier trainer


def test_tpu_pod_queued_resume(env):
  """An ACTIVE request is reused: no create, no wait, training restarted."""
  out, _ = _run("tpu_pod.sh", POD + ["--accelerator-type=v5p-8", "--queued", "--resume"], env)
  cmds = _commands(out)
  assert cmds[0] == [*QR, "describe", "srft7b", "--zone=us-east5-a", "--format=value(state.state)"]
  assert [c[3:5] for c in cmds[1:]] == [["tpu-vm", "ssh"]] * 2  # stop, train
  assert "reusing queued resource srft7b" in out


@pytest.mark.parametrize(
  "args,msg",
  [
    (["--zone=z", "--accelerator-type=v5p-8", "--bucket=gs://b"], "--name"),
    (["--name=n", "--accelerator-type=v5p-8", "--bucket=gs://b"], "--zone"),
    (["--name=n", "--zone=z", "--bucket=gs://b"], "--accelerator-type"),
    (["--name=n", "--zone=z", "--accelerator-type=v5p-8"], "--bucket"),
    (
      ["--name=n", "--zone=z", "--accelerator-type=v5p-8", "--bucket=gs://b", "--valid-until=1h"],
      "--valid-until needs --queued",
    ),
    (
      [
        "--name=n",
        "--zone=z",
        "--accelerator-type=v5p-8",
        "--bucket=gs://b",
        "--queued",
        "--preemptible",
      ],
      "not --preemptible",
    ),
  ],
)
def test_tpu_pod_required_flags(env, args, msg):
  _, err = _run("tpu_pod.sh", args + ["--dry-run"], env, expect_rc=2)
  assert msg in err


def test_gpu(env):
  out, _ = _run("gpu.sh", ["--install", "--dry-run", "--workdir=runs/g", "--config.steps=7"], env)
  cmds = _commands(out)
  assert any("jax[cuda12]==0.10.2" in c and "requirements.txt" in c for c in cmds)
  run = cmds[-1]
  i = run.index("-m")
  assert run[i + 1] == "srft_jax.main"
  assert "--config=configs/qwen2p5_1p5b_gpu.py" in run and "--workdir=runs/g" in run
  assert "--config.steps=7" in run and "--config.multihost=True" not in run
  out, _ = _run("gpu.sh", ["--install", "--cuda=13", "--gpus=0,1", "--dry-run"], env)
  cmds = _commands(out)
  assert any("jax[cuda13]==0.10.2" in c for c in cmds)
  assert "CUDA_VISIBLE_DEVICES=0,1" in cmds[-1]
  out, _ = _run("gpu.sh", ["--dry-run"], env)
  assert len(_commands(out)) == 1  # no install unless asked
  _run("gpu.sh", ["--cuda=11", "--dry-run"], env, expect_rc=2)
  # The documented space-separated forms too.
  out, _ = _run(
    "gpu.sh",
    ["--dry-run", "--venv", "/opt/v", "--workdir", "runs/s", "--config", "configs/default.py"],
    env,
  )
  run = _commands(out)[-1]
  assert "/opt/v/bin/python" in run and "--workdir=runs/s" in run
  assert "--config=configs/default.py" in run and "--venv" not in run


def test_slurm(env):
  text = (ROOT / "launch" / "slurm.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=" in text
  out, _ = _run(
    "slurm.sbatch",
    ["--dry-run", "--config=configs/srft_7b_tpu.py", "--workdir=/shared/r", "--config.steps=3"],
    env,
    extra_env={"SLURM_JOB_ID": "1234", "HEAD_NODE": "node001", "GPUS_PER_NODE": "4"},
  )
  (cmd,) = _commands(out)
  assert cmd[0] == "srun" and "--ntasks-per-node=1" in cmd
  coord = next(w for w in cmd if w.startswith("JAX_COORDINATOR_ADDRESS="))
  assert coord.startswith("JAX_COORDINATOR_ADDRESS=node001:")
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in cmd
  i = cmd.index("-m")
  assert cmd[i + 1] == "srft_jax.main"
  for flag in (
    "--config.multihost=True",
    "--config=configs/srft_7b_tpu.py",
    "--workdir=/shared/r",
    "--config.steps=3",
  ):
    assert flag in cmd


def test_local(env):
  out, _ = _run(
    "local.sh", ["--dry-run", "--workdir=runs/x", "--config.steps=5", "--config.notes=a b"], env
  )
  words = shlex.split(out)  # the printed line is shell-quoted
  assert "srft_jax.main" in words and "--workdir=runs/x" in words and "--config.steps=5" in words
  assert "--config.notes=a b" in words


# ----------------------------------------------------------------------------
# --supervise: the same job under srft_jax/supervise.py (tests/test_supervise.py runs it)
# ----------------------------------------------------------------------------


def _supervised(words):
  """(supervisor options, the supervised command) of a printed `-m srft_jax.supervise` line."""
  i = words.index("-m")
  assert words[i + 1] == "srft_jax.supervise"
  j = words.index("--")
  return words[i + 2 : j], words[j + 1 :]


def test_local_supervise(env):
  out, _ = _run(
    "local.sh",
    ["--dry-run", "--supervise", "--workdir", "runs/s", "--backoff-s=3", "--config.steps=5"],
    env,
  )
  opts, cmd = _supervised(shlex.split(out))
  assert opts == ["--workdir=runs/s", "--backoff_s=3"]
  assert cmd[1:3] == ["-m", "srft_jax.main"] and "--config.steps=5" in cmd
  assert "--supervise" not in cmd and "--backoff-s=3" not in cmd
  out, _ = _run("local.sh", ["--dry-run", "--supervise"], env)
  assert _supervised(shlex.split(out))[0] == ["--workdir=runs/default"]  # main.py's default


def test_gpu_supervise(env):
  out, _ = _run(
    "gpu.sh",
    ["--dry-run", "--supervise", "--gpus=0", "--workdir=runs/g", "--max_stalled_restarts=2"],
    env,
  )
  (words,) = _commands(out)
  assert words[:3] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92", "CUDA_VISIBLE_DEVICES=0"]
  opts, cmd = _supervised(words)
  assert opts == ["--workdir=runs/g", "--max_stalled_restarts=2"]
  assert cmd[1:3] == ["-m", "srft_jax.main"] and "--workdir=runs/g" in cmd


def test_tpu_pod_supervise(env):
  out, _ = _run(
    "tpu_pod.sh",
    POD
    + ["--accelerator-type=v5p-64", "--spot", "--project=p1", "--supervise", "--resume"]
    + ["--max-stalled-restarts", "3", "--poll-s=5", "--config.steps=100"],
    env,
  )
  (words,) = _commands(out)  # only the supervisor: it describes and creates, each round
  # This tree first on the path (then any PYTHONPATH the caller set).
  assert words[0] == "env" and words[1].split(":")[0] == f"PYTHONPATH={ROOT}"
  opts, cmd = _supervised(words)
  create = next(o for o in opts if o.startswith("--create_cmd="))
  assert shlex.split(create.split("=", 1)[1]) == [
    *("gcloud", "compute", "tpus", "tpu-vm", "create", "srft7b", "--zone=us-east5-a"),
    *("--project=p1", "--version=v2-alpha-tpuv5", "--accelerator-type=v5p-64", "--spot"),
  ]
  assert [o for o in opts if o != create] == [
    "--workdir=gs://bkt/runs/srft7b",
    "--state_dir=runs/supervise/srft7b",
    "--tpu_name=srft7b",
    "--zone=us-east5-a",
    "--project=p1",
    "--max_stalled_restarts=3",
    "--poll_s=5",
  ]
  # Each round is this script again, in the foreground, without the supervisor's flags.
  assert cmd == [
    *("bash", str(ROOT / "launch" / "tpu_pod.sh")),
    *("--name=srft7b", "--zone=us-east5-a", "--bucket=gs://bkt"),
    *("--accelerator-type=v5p-64", "--spot", "--project=p1", "--config.steps=100", "--foreground"),
  ]


def test_tpu_pod_queued_supervise(env):
  """--queued --supervise: the supervisor's queued mode, a queued-resource create
  line, and rounds that keep --queued (each looks at the request, not a VM)."""
  out, _ = _run(
    "tpu_pod.sh",
    POD + ["--accelerator-type=v5p-64", "--spot", "--queued", "--valid-until=2d", "--supervise"],
    env,
  )
  (words,) = _commands(out)
  opts, cmd = _supervised(words)
  create = next(o for o in opts if o.startswith("--create_cmd="))
  assert shlex.split(create.split("=", 1)[1]) == [
    *(*QR, "create", "srft7b", "--node-id=srft7b", "--zone=us-east5-a"),
    *("--runtime-version=v2-alpha-tpuv5", "--accelerator-type=v5p-64", "--spot"),
    "--valid-until-duration=2d",
  ]
  assert [o for o in opts if o != create] == [
    "--workdir=gs://bkt/runs/srft7b",
    "--state_dir=runs/supervise/srft7b",
    "--tpu_name=srft7b",
    "--zone=us-east5-a",
    "--queued",
  ]
  assert cmd[2:] == [
    *("--name=srft7b", "--zone=us-east5-a", "--bucket=gs://bkt", "--accelerator-type=v5p-64"),
    *("--spot", "--queued", "--valid-until=2d", "--foreground"),
  ]


def test_tpu_pod_stop(env):
  out, _ = _run("tpu_pod.sh", POD + ["--accelerator-type=v5p-64", "--stop"], env)
  cmds = _commands(out)
  assert [c[4] for c in cmds] == ["ssh"]  # no describe, no create
  (stop,) = _remote(cmds)
  subprocess.run(["bash", "-n", "-c", stop], check=True)
  assert "kill $p" in stop and "srft_train.pid" in stop
