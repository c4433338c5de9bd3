"""Test setup: 8 forced CPU devices, set before jax is imported anywhere.

`SRFT_TEST_PLATFORM=cuda` (or `tpu`) runs the same tests on an accelerator
instead (benchmarks/gpu_check.sh); tests marked `multidevice` then need 8
devices and are skipped on a single chip.
"""

import os

import pytest

_PLATFORM = os.environ.get("SRFT_TEST_PLATFORM", "cpu")
# The 8 CPU devices share 2 cores with another test process (xdist) and its
# subprocesses: a device can reach a collective tens of seconds after the
# others. XLA:CPU aborts the whole process when a collective's rendezvous
# waits past its termination timeout, so that timeout is 10 minutes here (a
# real deadlock still aborts), and the "may be stuck" warning comes after 2.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8"
  + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
  + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
).strip()
if _PLATFORM == "cpu":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # The AOT tests load libtpu to compile only: beside another process too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
else:
  os.environ["JAX_PLATFORMS"] = _PLATFORM
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

import helpers  # noqa: E402

# Float32 parity tests compare against float32 references: no TF32/bf16 passes.
jax.config.update("jax_default_matmul_precision", "highest")


# The files that take minutes, longest first: collected before the rest, so
# `-n 2 --dist loadfile` (which hands out whole files in collection order) starts
# them early and fills in with short files, instead of ending with one worker
# on a long file while the other idles.
LONG_FILES = (
  "test_train.py",
  "test_gcs.py",
  "test_moe.py",
  "test_multihost.py",
  "test_rl_switches.py",
  "test_packing.py",
  "test_scan_layers.py",
  "test_study.py",
  "test_teacher.py",
  "test_io_retry.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable otherwise
  if jax.device_count() >= 8:
    return
  skip = pytest.mark.skip(reason=f"needs 8 devices; {jax.device_count()} on {_PLATFORM}")
  for item in items:
    if "multidevice" in item.keywords:
      item.add_marker(skip)


# ----------------------------------------------------------------------------
# Inputs built once a session (tests/helpers.py)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
  """The task tokenizer's .model file (seed 0), trained once a session."""
  return helpers.task_tokenizer_path(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
  """kind -> (directory, torch model): a tiny random transformers checkpoint
  of each of helpers.HF_KINDS (tests/test_hf.py, tests/test_lora.py)."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for seed, kind in enumerate(helpers.HF_KINDS):
    path = str(root / kind)
    out[kind] = (path, helpers.save_tiny_hf(helpers.tiny_hf_config(kind), path, seed=seed))
  return out


# ----------------------------------------------------------------------------
# The local GCS emulator (helpers.GcsEmulator) for tests/test_gcs.py, test_io_retry.py, test_multihost.py
# ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """The emulator for the session; this process's gcsfs points at it too."""
  emulator = helpers.GcsEmulator(tmp_path_factory.mktemp("gcs"))
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  yield emulator
  emulator.close()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
