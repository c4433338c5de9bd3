"""Multi-host training: two local processes (gloo, 4 CPU devices each) on one
(data=2, fsdp=4) mesh spanning both, with a gs:// workdir on the GCS emulator
(conftest.py `gcs`: process 0 writes the shared files, both read them), killed
after a checkpoint and resumed, end with bitwise the same parameters as one
process with 8 devices (that process also reduces through gloo). The run is
`srft_opd`: a distillation teacher of another family and width, which each
process loads from its HF directory into its own shards (docs/method.md §19.6)."""

import os
import socket
import time

import numpy as np
import pytest

import helpers

STEPS = 4

pytestmark = pytest.mark.slow

OVERRIDES = {
  "steps": STEPS,
  "warmup.steps": 0,
  "eval.before": False,
  "eval.after": False,
  "log.progress": False,
  "log.tensorboard": False,
  "log.plots": False,
  "checkpoint.every": 1,
  "checkpoint.keep": 10,
  "batch.prompts_per_step": 4,
  "rollout.n_rollouts": 3,
  "data.max_response_len": 48,
  "data.task_train_size": 200,
  "model.embed_dim": 32,
  "model.num_layers": 1,
  "model.mlp_dim": 64,
  "mesh.data": 2,
  "mesh.fsdp": 4,
  "seed": 5,
}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for every process this module starts:
  only the first of each kind compiles."""
  cache = helpers.compilation_cache_env(tmp_path_factory.mktemp("jax_cache"))
  saved = {k: os.environ.get(k) for k in cache}
  os.environ.update(cache)
  yield
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, tokenizer_path):
  """OVERRIDES with a teacher: a random Qwen3-family model (q/k norms, tied
  embeddings, wider) on the task tokenizer, saved in HF layout."""

  from srft_jax import hf
  from srft_jax import model as model_lib
  from srft_jax import tokenizer as tok_lib

  vocab = tok_lib.load_tokenizer(tokenizer_path).vocab_size
  cfg = model_lib.ModelConfig.preset(
    "tiny_qwen3", vocab_size=vocab, embed_dim=48, mlp_dim=96, num_layers=1, max_seq_len=256
  )
  path = str(tmp_path_factory.mktemp("teacher") / "hf")
  hf.save_model(model_lib.create_model(cfg, seed=7), path)
  return {
    **OVERRIDES,
    "method": "srft_opd",
    "teacher.hf_path": path,
    "teacher.tokenizer": tokenizer_path,
  }


def _two_process(workdir, port, log_dir, overrides) -> list[helpers.MainJob]:
  return [
    helpers.MainJob(
      workdir,
      {
        **overrides,
        "multihost": True,
        "distributed.coordinator": f"127.0.0.1:{port}",
        "distributed.num_processes": 2,
        "distributed.process_id": pid,
      },
      env=_env(4),
      log=log_dir / f"proc{pid}_{port}.log",
      log_mode="w",
    )
    for pid in range(2)
  ]


def _final_params(workdir) -> dict:
  from safetensors.numpy import load

  from srft_jax import paths

  return load(paths.read_bytes(f"{workdir}/export/hf/model.safetensors"))


def _rows(workdir) -> dict[int, dict]:
  from srft_jax import metrics as metrics_lib

  rows = metrics_lib.read_jsonl(f"{workdir}/logs/metrics.jsonl")
  assert len({r["step"] for r in rows}) == len(rows), "a step logged twice"
  return {r["step"]: r for r in rows}


def _assert_same_run(single, multi) -> None:
  """Same trajectory: identical rewards and losses at every logged step, and
  bitwise the same final parameters: both runs reduce across devices with gloo
  (XLA's in-process all-reduce sums in another order, which left differences
  of 3.6e-7 when the single process did not initialise it)."""
  rows = {w: _rows(w) for w in (single, multi)}
  common = sorted(set(rows[single]) & set(rows[multi]))
  assert len(common) >= 2
  for step in common:
    r1, r2 = rows[single][step], rows[multi][step]
    assert r1["reward/rollout_mean"] == r2["reward/rollout_mean"], step
    assert r1["tokens/sampled"] == r2["tokens/sampled"], step
    for k in ("loss/loss", "loss/teacher_kl"):  # the teacher's term: it ran on both
      np.testing.assert_allclose(r1[k], r2[k], rtol=1e-5, err_msg=f"{k} {step}")
    assert r1["loss/teacher_kl"] > 0
  a, b = _final_params(single), _final_params(multi)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _steps(workdir) -> list[int]:
  """The checkpoint steps Orbax has finished in the bucket (commit_success.txt)."""
  from srft_jax import paths

  if not paths.exists(f"{workdir}/checkpoints"):
    return []
  names = paths.list_files(f"{workdir}/checkpoints")
  done = (n.split("/") for n in names if n.endswith("/commit_success.txt"))
  return sorted({int(parts[0]) for parts in done if parts[0].isdigit()})


@pytest.fixture(scope="module")
def single(tmp_path_factory, overrides):
  """One process, 8 devices, with the distributed runtime up so its
  cross-device reductions run through gloo as the two processes' do."""
  from srft_jax.data import task

  single = tmp_path_factory.mktemp("single")
  task.get_task_tokenizer(single / "tokenizer")
  gloo = {
    "multihost": True,
    "distributed.coordinator": f"127.0.0.1:{_free_port()}",
    "distributed.num_processes": 1,
    "distributed.process_id": 0,
  }
  rc, log = helpers.run_main(single, {**overrides, **gloo}, env=_env(8), timeout=600)
  assert rc == 0, log[-6000:]
  return single


def test_two_processes_in_a_bucket_match_one_process_after_kill_and_resume(
  single, gcs, tmp_path, overrides
):
  """Every shared file in the bucket (the task tokenizer process 0 makes and
  process 1 reads after it, checkpoints, metrics, the export); both processes
  SIGKILLed once a checkpoint past step 1 is there, rerun: the same run."""
  from srft_jax import paths

  multi = "gs://srft-test/multihost"
  procs = _two_process(multi, _free_port(), tmp_path, overrides)
  deadline = time.time() + 420
  while time.time() < deadline and not any(s >= 2 for s in _steps(multi)):
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.5)
  for p in procs:
    p.kill()
    p.wait()
  killed_at = _steps(multi)
  assert killed_at and max(killed_at) < STEPS, f"not killed mid-run: {killed_at}"

  procs = _two_process(multi, _free_port(), tmp_path, overrides)
  codes = [p.wait(timeout=600)[0] for p in procs]
  logs = {f.name: f.read_text() for f in sorted(tmp_path.glob("proc*.log"))}
  assert codes == [0, 0], "".join(text[-2000:] for text in logs.values())
  assert sum("resumed from step" in text for text in logs.values()) == 2
  files = paths.list_files(multi)
  assert f"checkpoints/{STEPS}/_CHECKPOINT_METADATA" in files
  assert "results.json" in files and any(f.startswith("tokenizer/task_sp_") for f in files)
  _assert_same_run(single, multi)


# ----------------------------------------------------------------------------
# Failed saves across hosts: the processes agree, so none waits at a barrier
# ----------------------------------------------------------------------------

# Each process saves a (4,)-sharded array over both processes' devices at steps
# 1-5 in the bucket, with storage faults injected into Orbax's manager (a
# ConnectionError is what gcsfs raises when the bucket is away): step 2 fails on
# both hosts as the save starts; step 3 on host 1 only, after the save finished
# (its wait raises); step 4 on host 0 only, with a permanent error; step 5 on
# both, for good (past the 4 s budget). Prints one JSON line.
_SAVES = r"""
import json, sys
import jax, numpy as np
import orbax.checkpoint as ocp
pid, port, wd = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from jax.sharding import NamedSharding, PartitionSpec as P
from srft_jax import checkpoint as ckpt_lib, io_retry

io_retry.set_budget(4)
mesh = jax.make_mesh((4,), ("d",), devices=jax.devices())
sh = NamedSharding(mesh, P("d"))

def state(step):
  return {"w": jax.make_array_from_callback((8,), sh, lambda i: np.arange(8.0)[i] * step)}

faults = {"save": [], "wait": []}  # the errors the next calls raise, one a call
real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished

def save(self, *a, **k):
  if faults["save"]:
    raise faults["save"].pop()
  return real_save(self, *a, **k)

def wait(self):
  real_wait(self)
  if faults["wait"]:
    raise faults["wait"].pop()

ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished = save, wait
ck = ckpt_lib.Checkpointer(f"{wd}/checkpoints", keep=10)
out = {}
for step, where, kind in [
  (1, (), None), (2, (0, 1), "save"), (3, (1,), "wait"), (4, (0,), "perm"), (5, (0, 1), "down")
]:
  mine = pid in where
  if mine and kind == "save":
    faults["save"] = [ConnectionError("injected: the bucket blinked")]
  if mine and kind == "down":
    faults["save"] = [ConnectionError("injected: the bucket is gone")] * 10**6
  try:
    ck.save(step, state(step), {"i": step}, {"step": step})
    if mine and kind == "wait":  # the save's own wait (Checkpointer.wait)
      faults["wait"] = [ConnectionError("injected: the upload was cut")]
    if mine and kind == "perm":
      faults["wait"] = [PermissionError("injected: the bucket refuses")]
    ck.wait()
    out[step] = "ok"
  except Exception as e:
    out[step] = type(e).__name__ + ": " + str(e)[:160]
  faults = {"save": [], "wait": []}
  out[f"failed_{step}"] = ckpt_lib.failed_saves
steps = ck.all_steps()
_, got, data, meta = ck.restore({"w": jax.ShapeDtypeStruct((8,), np.float64, sharding=sh)}, 3)
out["restored_3"] = np.asarray(jax.experimental.multihost_utils.process_allgather(got["w"], tiled=True)).tolist()
out["steps"] = steps
print("RESULT " + json.dumps(out), flush=True)
"""


def test_failed_saves_are_agreed_across_hosts(gcs, tmp_path):
  """Retried together, dropped together, given up together: both processes
  see the same outcome at every step and neither hangs at Orbax's barriers."""
  import json
  import subprocess
  import sys

  port, wd = _free_port(), "gs://srft-test/mh_saves"
  env = {**_env(2), "JAX_ENABLE_X64": "1"}
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _SAVES, str(pid), str(port), wd],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in range(2)
  ]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  results = []
  for p, text in zip(procs, outs):
    assert p.returncode == 0, text[-4000:]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    results.append(json.loads(line[len("RESULT ") :]))
  r0, r1 = results
  for r in results:
    assert r["1"] == r["2"] == r["3"] == "ok", r  # 2 and 3 saved again by both
    assert r["failed_1"] == 0 and r["failed_2"] == 1 and r["failed_3"] == 2, r
    assert r["5"].startswith("StorageUnavailable: storage unavailable: checkpoint save"), r
    assert "checkpoint.io_retry_s=4" in r["5"], r
    assert r["restored_3"] == [3.0 * i for i in range(8)], r
  assert r0["4"].startswith("PermissionError: injected"), r0  # the host that failed
  assert r1["4"].startswith("RuntimeError: checkpoint step 4 in gs://srft-test/mh_saves"), r1
  assert r0["steps"] == r1["steps"] and {1, 2, 3} <= set(r0["steps"]), r0
