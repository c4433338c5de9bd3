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
else:
  os.environ["JAX_PLATFORMS"] = _PLATFORM
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

# Float32 parity tests compare against float32 references: no TF32/bf16 passes.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  if jax.device_count() >= 8:
    return
  skip = pytest.mark.skip(reason=f"needs 8 devices; {jax.device_count()} on {_PLATFORM}")
  for item in items:
    if "multidevice" in item.keywords:
      item.add_marker(skip)
