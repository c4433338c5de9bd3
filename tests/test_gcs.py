"""A run whose workdir is a bucket (gs://) keeps everything there.

Against a local GCS emulator (conftest.py `gcs`): the path layer itself, the
main job writing every output to the bucket and nothing to local disk, a run
killed with SIGKILL whose local disk is wiped resuming from the bucket alone
(bitwise the unbroken run's parameters, every metrics row once), and gs://
inputs (an HF checkpoint, a prepared dataset, a tokenizer, a PEFT adapter) read
through hash-checked copies.
"""

import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from srft_jax import paths

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gs://srft-test"
STEPS = 4

OVERRIDES = helpers.TINY_BUCKET_RUN
assert OVERRIDES["steps"] == STEPS


def _local_dirs(base) -> dict[str, str]:
  """Where a run could leave files on this machine: HOME, TMPDIR and its cwd.
  TMPDIR is a short path of its own: the reward workers' forkserver puts its
  socket there, and a socket path is at most 107 bytes (a test's tmp_path
  under pytest's numbered folders came to more)."""
  out = {name: os.path.join(str(base), name) for name in ("home", "cwd")}
  for d in out.values():
    os.makedirs(d, exist_ok=True)
  out["tmp"] = tempfile.mkdtemp(prefix="srft-")
  return out


def _files_under(d: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


@pytest.fixture(scope="module")
def job_cli(gcs, tmp_path_factory):
  """`start(workdir, local)`: `python -m srft_jax.main --workdir=gs://...`
  (helpers.MainJob) with its HOME, TMPDIR and cwd in the empty local folders
  `local`; a compilation cache (outside them) shared by every run."""
  shared = tmp_path_factory.mktemp("gcs_job")
  env = dict(
    os.environ,
    **gcs.env,
    **helpers.compilation_cache_env(shared / "jax_cache"),
    JAX_PLATFORMS="cpu",
    MPLCONFIGDIR=str(shared / "mpl"),
    PYTHONDONTWRITEBYTECODE="1",
  )

  def start(workdir, local, overrides=None, prefix=()):
    return helpers.MainJob(
      workdir,
      {**OVERRIDES, **(overrides or {})},
      prefix=prefix,
      config=f"{ROOT}/configs/default.py",
      env=dict(env, HOME=local["home"], TMPDIR=local["tmp"]),
      cwd=local["cwd"],
      log=shared / (workdir.rsplit("/", 1)[-1] + ".log"),
    )

  return start


@pytest.fixture(scope="module")
def straight(job_cli, tmp_path_factory):
  """One unbroken run in the bucket (several tests read it)."""
  workdir = f"{BUCKET}/straight"
  local = _local_dirs(tmp_path_factory.mktemp("straight_local"))
  t0 = time.time()
  rc, out = job_cli(workdir, local).wait(timeout=420)
  assert rc == 0, out[-4000:]
  return {"workdir": workdir, "local": local, "out": out, "wall_s": time.time() - t0}


# ----------------------------------------------------------------------------
# The path layer
# ----------------------------------------------------------------------------


def test_paths_behave_the_same_locally_and_in_the_bucket(gcs, tmp_path):
  for root in (str(tmp_path / "local"), f"{BUCKET}/paths"):
    f = os.path.join(root, "a", "b.json")
    assert not paths.exists(f)
    paths.write_json(f, {"x": 1})
    assert paths.exists(f) and paths.read_json(f) == {"x": 1}
    paths.write_json(f, {"x": 2})  # overwritten whole
    assert paths.read_json(f) == {"x": 2}
    assert paths.list_files(root) == {os.path.join("a", "b.json"): 8}  # no temp file left
    stage = os.path.join(root, "hf")
    with paths.staged_dir(stage) as d:
      for name in ("config.json", "w.bin"):
        with open(os.path.join(d, name), "w") as fh:
          fh.write(name)
      assert not paths.exists(os.path.join(stage, "config.json"))  # not before the exit
    assert paths.list_files(stage) == {"config.json": 11, "w.bin": 5}
    with pytest.raises(RuntimeError), paths.staged_dir(stage) as d:  # a failed write ...
      raise RuntimeError("killed")
    assert paths.list_files(stage) == {"config.json": 11, "w.bin": 5}  # ... publishes nothing
    paths.remove(root)
    assert not paths.exists(f)
  assert not [p for p in os.listdir(tmp_path) if p != "local"]


def test_local_copy_is_checked_and_follows_the_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.setenv("SRFT_JAX_CACHE", str(tmp_path / "cache"))
  src = f"{BUCKET}/inputs/ckpt"
  paths.write_bytes(f"{src}/weights.bin", b"w" * 1000)
  paths.write_bytes(f"{src}/sub/tokenizer.json", b"{}")
  local = paths.local_copy(src)
  assert paths.list_files(local) == {"weights.bin": 1000, os.path.join("sub", "tokenizer.json"): 2}
  assert paths.local_copy(src) == local  # once per process
  paths.forget_copies()  # a new process: the manifest matches, nothing is fetched again
  os.utime(os.path.join(local, "weights.bin"), (0, 0))
  assert paths.local_copy(src) == local
  assert os.stat(os.path.join(local, "weights.bin")).st_mtime == 0
  paths.write_bytes(f"{src}/weights.bin", b"v" * 1000)  # the bucket changed: copied again
  paths.forget_copies()
  with open(os.path.join(paths.local_copy(src), "weights.bin"), "rb") as f:
    assert f.read() == b"v" * 1000
  with pytest.raises(FileNotFoundError, match="no gs://"):
    paths.local_copy(f"{BUCKET}/inputs/missing")


def test_local_copy_of_many_files_is_whole_or_refused(gcs, tmp_path, monkeypatch):
  """A checkpoint's shards are fetched several at a time, each one checked; a
  file that arrives other than the bucket says is an error, and no copy counts."""
  monkeypatch.setenv("SRFT_JAX_CACHE", str(tmp_path / "cache"))
  rng = np.random.default_rng(0)
  src = f"{BUCKET}/inputs/sharded"
  shards = {
    f"model-{i:05d}.safetensors": rng.bytes(int(rng.integers(1, 50_000))) for i in range(12)
  }
  for name, data in shards.items():
    paths.write_bytes(f"{src}/{name}", data)
  local = paths.local_copy(src)
  for name, data in shards.items():
    with open(os.path.join(local, name), "rb") as f:
      assert f.read() == data, name
  paths.forget_copies()
  real = paths.file_hash

  def corrupt(file, want):  # one shard arrives damaged
    got = real(file, want)
    return dict(got, md5="AAAA") if file.endswith("model-00007.safetensors.partial") else got

  paths.write_bytes(f"{src}/model-00000.safetensors", b"changed")  # forces a new copy
  monkeypatch.setattr(paths, "file_hash", corrupt)
  with pytest.raises(OSError, match="model-00007.safetensors: the copy does not match"):
    paths.local_copy(src)
  assert not os.path.exists(os.path.join(os.path.dirname(local), paths.COPY_MANIFEST))
  monkeypatch.setattr(paths, "file_hash", real)  # the next try copies it all again
  with open(os.path.join(paths.local_copy(src), "model-00000.safetensors"), "rb") as f:
    assert f.read() == b"changed"


# ----------------------------------------------------------------------------
# The main job in a bucket
# ----------------------------------------------------------------------------


def _bucket_files(workdir) -> dict[str, int]:
  return paths.list_files(workdir)


def _metric_rows(workdir) -> list[dict]:
  from srft_jax import metrics as metrics_lib

  return metrics_lib.read_jsonl(f"{workdir}/logs/metrics.jsonl")


def _tb_scalars(workdir, tag) -> list[int]:
  """Steps of `tag` in the run's TensorBoard event files (TFRecord framing read here)."""
  from tensorboardX.proto import event_pb2

  steps = []
  for name in sorted(_bucket_files(f"{workdir}/logs/tb")):
    data = paths.read_bytes(f"{workdir}/logs/tb/{name}")
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      i += 12 + n + 4
      if event.HasField("session_log"):  # a resumed run: later steps are purged
        steps = [s for s in steps if s < event.step]
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


@pytest.mark.slow
def test_every_output_lands_in_the_bucket(straight):
  wd = straight["workdir"]
  files = _bucket_files(wd)
  want = [
    "results.json",
    "logs/metrics.jsonl",
    "plots/reward.png",
    "export/hf/config.json",
    "export/hf/model.safetensors",
    "export/hf/generation_config.json",
    f"checkpoints/{STEPS}/commit_success.txt",
    "base/hf/config.json",
    "base/hf/model.safetensors",
    "base/hf/srft_warmup.json",
    "base/eval_before.json",
    "base/run/logs/metrics.jsonl",
    "base/run/checkpoints/2/commit_success.txt",
  ]
  missing = [f for f in want if f not in files]
  assert not missing, (missing, sorted(files))
  assert any(f.startswith("tokenizer/task_sp_") for f in files)
  assert any(f.startswith("logs/tb/events.out.tfevents.") for f in files)
  assert not [f for f in files if ".partial" in f or ".tmp" in f]
  results = paths.read_json(f"{wd}/results.json")
  assert results["steps"] == STEPS and results["before"]["id_acc"] is not None
  assert results["plots"] and all(p.startswith(f"{wd}/plots/") for p in results["plots"])
  assert f"results:     {wd}/results.json" in straight["out"]
  assert f"tensorboard --logdir {wd}/logs/tb" in straight["out"]


@pytest.mark.slow
def test_nothing_is_written_outside_the_bucket(straight):
  left = {name: _files_under(d) for name, d in straight["local"].items()}
  assert left == {"home": [], "tmp": [], "cwd": []}, left


@pytest.mark.slow
def test_metrics_rows_and_tensorboard_in_the_bucket(straight):
  wd = straight["workdir"]
  assert [r["step"] for r in _metric_rows(wd)] == list(range(STEPS))
  assert _tb_scalars(wd, "loss/loss") == list(range(STEPS))


@pytest.mark.slow
def test_evaluate_reads_the_run_from_the_bucket(straight, tmp_path, monkeypatch):
  """`srft_jax.evaluate`'s loading: the task tokenizer and the HF export, both
  read from the bucket (the export through a checked local copy)."""
  from flax import nnx
  from safetensors.numpy import load

  from srft_jax import evaluate
  from srft_jax import factory

  monkeypatch.setenv("SRFT_JAX_CACHE", str(tmp_path / "cache"))
  wd = straight["workdir"]
  c = factory.load_config(f"{ROOT}/configs/default.py")
  with c.unlocked():
    c.data.task_seed = 0
  spec = factory.run_spec(c, validate=False)
  tokenizer = factory.tokenizer(spec, wd)
  model = evaluate.load_policy(spec, wd, tokenizer, mesh=None)
  assert model.cfg.num_layers == 1 and model.cfg.vocab_size == tokenizer.vocab_size
  ours = load(paths.read_bytes(f"{wd}/export/hf/model.safetensors"))
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  embed = np.asarray(jax.device_get(params[("embed",)].get_value()))
  np.testing.assert_array_equal(embed, ours["model.embed_tokens.weight"])
  assert os.listdir(tmp_path / "cache" / "remote")  # the copy, in the cache


# ----------------------------------------------------------------------------
# Preemption: SIGKILL, local disk wiped, resumed from the bucket alone
# ----------------------------------------------------------------------------


def _checkpoint_steps(workdir) -> list[int]:
  steps = set()
  for name in _bucket_files(f"{workdir}/checkpoints") if paths.exists(workdir) else ():
    head, _, rest = name.partition("/")
    if head.isdigit() and rest == "commit_success.txt":  # Orbax on GCS: the step is final
      steps.add(int(head))
  return sorted(steps)


def _assert_same_as_straight(wd, straight):
  """The unbroken run's export, bitwise, and each of its metrics rows once (TensorBoard too)."""
  export = "export/hf/model.safetensors"
  assert paths.read_bytes(f"{wd}/{export}") == paths.read_bytes(f"{straight['workdir']}/{export}")
  rows, ref = _metric_rows(wd), _metric_rows(straight["workdir"])
  assert [r["step"] for r in rows] == list(range(STEPS))
  for r, s in zip(rows, ref):
    assert r["loss/loss"] == s["loss/loss"] and r["reward/rollout_mean"] == s["reward/rollout_mean"]
  assert _tb_scalars(wd, "loss/loss") == list(range(STEPS))
  assert paths.read_json(f"{wd}/results.json")["steps"] == STEPS


def _final_state(workdir):
  import orbax.checkpoint as ocp

  from srft_jax import checkpoint as ckpt_lib

  mgr = ocp.CheckpointManager(f"{workdir}/checkpoints", item_names=ckpt_lib.Checkpointer.ITEMS)
  out = mgr.restore(
    STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
  )
  mgr.close()
  return jax.tree.map(np.asarray, out["state"]), out["data"]


@pytest.mark.slow
def test_sigkill_wiped_disk_resumes_from_the_bucket(job_cli, straight, tmp_path):
  wd = f"{BUCKET}/killed"
  local = _local_dirs(tmp_path)
  run = job_cli(wd, local)
  deadline = time.time() + 420
  while time.time() < deadline and run.poll() is None and max(_checkpoint_steps(wd), default=0) < 2:
    time.sleep(0.2)
  run.kill()
  rc, out = run.wait(timeout=420)
  assert rc == -signal.SIGKILL, out[-4000:]
  killed_at = max(_checkpoint_steps(wd))
  assert 2 <= killed_at < STEPS, killed_at
  # The worker is gone: its disk (warm-up copy, temp files, HOME) with it.
  for d in local.values():
    shutil.rmtree(d)
  local = _local_dirs(tmp_path)
  rc, out = job_cli(wd, local).wait(timeout=420)
  assert rc == 0, out[-4000:]
  assert f"resumed from step {killed_at}" in out and "cached warm-up" in out

  # Bitwise the unbroken run: the train state, the data position and the export.
  (sa, da), (sb, db) = _final_state(straight["workdir"]), _final_state(wd)
  assert da == db
  la, ta = jax.tree.flatten_with_path(sa)
  lb, tb = jax.tree.flatten_with_path(sb)
  assert ta == tb
  diff = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(la, lb) if x.tobytes() != y.tobytes()]
  assert not diff, diff[:5]
  _assert_same_as_straight(wd, straight)


# ----------------------------------------------------------------------------
# Storage outages: ridden out within the retry budget, a clean exit past it
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_30s_outage_during_a_checkpoint_upload_is_ridden_out(gcs, job_cli, straight, tmp_path):
  wd = f"{BUCKET}/outage"
  run = job_cli(wd, _local_dirs(tmp_path))
  helpers.wait_for_checkpoint_upload(run, wd)
  gcs.stop()
  try:
    time.sleep(30)
    assert run.poll() is None, run.log_text()[-4000:]  # still running through the outage
  finally:
    gcs.start()
  back = time.time()
  rc, out = run.wait(timeout=600)
  assert rc == 0, out[-4000:]
  # Done soon after the bucket is back: a failed save's stranded Orbax threads
  # (they time out after 300 s) do not hold the exit.
  assert time.time() - back < 200
  assert "resumed from step" not in out  # one start
  _assert_same_as_straight(wd, straight)


@pytest.mark.slow
def test_an_outage_past_the_budget_exits_cleanly_and_supervise_finishes(
  gcs, job_cli, straight, tmp_path
):
  from srft_jax import io_retry

  wd = f"{BUCKET}/past_budget"
  local = _local_dirs(tmp_path)
  budget = {"checkpoint.io_retry_s": 5}
  run = job_cli(wd, local, budget)
  helpers.wait_for_checkpoint_upload(run, wd)
  gcs.stop()
  try:
    rc, out = run.wait(timeout=300)
  finally:
    gcs.start()
  assert rc == io_retry.EXIT_STORAGE, out[-4000:]
  (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
  assert line.startswith("error: storage unavailable: ") and "gs://srft-test/past_budget" in line
  assert "checkpoint.io_retry_s=5" in line and "last error: " in line
  assert line == out.rstrip().splitlines()[-1]  # the last words: no cascade after it
  assert "Traceback" not in out, out[-6000:]

  # --supervise, started while the bucket is still away, finishes once it is back.
  gcs.stop()
  sup = job_cli(
    wd,
    local,
    budget,
    prefix=(sys.executable, "-m", "srft_jax.supervise", f"--workdir={wd}", "--backoff_s=1", "--"),
  )
  try:
    time.sleep(10)
  finally:
    gcs.start()
  rc, out = sup.wait(timeout=600)
  assert rc == 0, out[-4000:]
  events = [
    json.loads(ln.split(": ", 1)[1]) for ln in out.splitlines() if ln.startswith("supervise: {")
  ]
  assert [e["event"] for e in events][-3:] == ["start", "exit", "done"], events
  assert events[-2]["rc"] == 0 and events[-2]["latest_step"] == STEPS
  _assert_same_as_straight(wd, straight)


# ----------------------------------------------------------------------------
# gs:// inputs: a prepared dataset and an HF checkpoint
# ----------------------------------------------------------------------------


def test_dataset_in_the_bucket(gcs, tmp_path, monkeypatch):
  from srft_jax import factory
  from srft_jax.data import builders

  monkeypatch.setenv("SRFT_JAX_CACHE", str(tmp_path / "cache"))
  builders.prepare("task", tmp_path / "data", task_sizes={"train": 6, "test_id": 2, "test_ood": 2})
  data_dir = f"{BUCKET}/data"
  for name in paths.list_files(str(tmp_path / "data")):
    paths.write_bytes(f"{data_dir}/{name}", paths.read_bytes(str(tmp_path / "data" / name)))
  c = factory.load_config(f"{ROOT}/configs/default.py")
  with c.unlocked():
    c.data.source, c.data.name, c.data.data_dir = "tfds", "task", data_dir
  source, _ = factory.datasets(factory_spec(c))
  local, _ = factory.datasets(_with(c, data_dir=str(tmp_path / "data")))
  assert len(source) == len(local) == 6
  assert [source[i]["prompt"] for i in range(6)] == [local[i]["prompt"] for i in range(6)]
  with pytest.raises(factory.ConfigError, match=r"config\.data\.data_dir"):
    factory.datasets(_with(c, data_dir=f"{BUCKET}/nothing"))


def test_tokenizer_in_the_bucket(gcs, tmp_path, monkeypatch):
  from srft_jax import factory
  from srft_jax.data import task

  monkeypatch.setenv("SRFT_JAX_CACHE", str(tmp_path / "cache"))
  task.get_task_tokenizer(f"{BUCKET}/tok", seed=0)  # trained, uploaded as one object
  (name,) = paths.list_files(f"{BUCKET}/tok")
  c = factory.load_config(f"{ROOT}/configs/default.py")
  local = factory.tokenizer(factory_spec(c), str(tmp_path / "wd"))
  remote = factory.tokenizer(_with(c, tokenizer=f"{BUCKET}/tok/{name}"), "unused")
  text = "Question: 12 + 30 = ? Answer: 42"
  assert remote.encode(text) == local.encode(text)
  with pytest.raises(factory.ConfigError, match=r"config\.data\.tokenizer"):
    factory.tokenizer(_with(c, tokenizer=f"{BUCKET}/tok/missing.model"), "unused")


def _with(c, **data):
  """The run spec of `c` with `data.*` overrides."""
  return factory_spec(c, {f"data.{k}": v for k, v in data.items()})


def factory_spec(c, overrides=None):
  from srft_jax import factory

  return factory.run_spec(c, overrides, validate=False)


@pytest.mark.slow
def test_peft_adapter_in_the_bucket(gcs, tmp_path, monkeypatch):
  """A PEFT adapter written to gs:// (config last) and continued from there
  (`lora.adapter_path`): the same adapter values, bit for bit."""
  from flax import nnx

  from srft_jax import factory
  from srft_jax import lora
  from srft_jax import model as model_lib
  from srft_jax import peft as peft_lib

  monkeypatch.setenv("SRFT_JAX_CACHE", str(tmp_path / "cache"))
  mcfg = model_lib.ModelConfig.preset("tiny_qwen3", vocab_size=64, embed_dim=32, num_layers=2)
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.05)
  base = lambda: model_lib.Transformer(mcfg, rngs=nnx.Rngs(0))  # noqa: E731
  rng = np.random.default_rng(0)
  values = {
    (s.layer, s.target): (rng.normal(size=s.a_shape), rng.normal(size=s.b_shape))
    for s in lora.adapter_specs(base(), lcfg)
  }
  values = {k: tuple(x.astype(np.float32) for x in v) for k, v in values.items()}
  path = f"{BUCKET}/adapters/run1"
  peft_lib.save_peft_adapter(lora.attach(base(), lcfg, values=values), path)
  assert sorted(paths.list_files(path)) == ["adapter_config.json", "adapter_model.safetensors"]
  assert peft_lib.read_peft_config(path) == lcfg
  loaded = lora.adapter_values(peft_lib.load_peft_adapter(path, base()))
  assert loaded.keys() == values.keys()
  for k, (a, b) in values.items():
    np.testing.assert_array_equal(np.asarray(loaded[k][0]), a, err_msg=str(k))
    np.testing.assert_array_equal(np.asarray(loaded[k][1]), b, err_msg=str(k))
  # the run's config takes the gs:// adapter (and names the field when it is not there)
  c = factory.load_config(f"{ROOT}/configs/default.py")
  with c.unlocked():
    c.model.preset, c.lora.rank, c.lora.adapter_path = "tiny_qwen3", 4, path
  assert factory.run_spec(c).lora_adapter_path == path
  with c.unlocked():
    c.lora.adapter_path = f"{BUCKET}/adapters/missing"
  with pytest.raises(factory.ConfigError, match=r"config\.lora\.adapter_path"):
    factory.run_spec(c)
