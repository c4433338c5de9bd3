"""srft-jax: SRFT (Supervised Reinforcement Fine-Tuning) in JAX / Flax NNX.

Submodules are imported by users (`from srft_jax import objectives`), so
importing the package itself stays cheap and pulls in no model or trainer code.
"""

import glob
import importlib.util
import os

__version__ = "0.1.0"


def _skip_tpu_probe() -> None:
  """With libtpu installed (the AOT tool's extra) on a machine without a TPU,
  JAX's first backend call probes for one and prints initialisation errors.
  Where no Google TPU sits on the PCI bus and JAX_PLATFORMS is unset, name the
  platforms that can run here instead (the AOT tool compiles for TPU
  topologies without a TPU backend, so it is unaffected)."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == "0x1ae0":  # Google: a TPU chip
          return
    except OSError:
      continue
  gpu = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if gpu else "cpu"


_skip_tpu_probe()
