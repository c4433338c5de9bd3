"""Helpers for runs over several processes (hosts): who writes, sync, gather.

With one process each helper is the plain single-host operation, so the same
code runs on a laptop and on a pod slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_main() -> bool:
  """Process 0: the one that writes the files every process shares."""
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """Every process waits here for all the others (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather(x) -> np.ndarray:
  """Whole rows on every host, as a NumPy array.

  `x` is either a global `jax.Array` (its full value comes back) or a
  host-local array (every host's rows, concatenated in process order).
  Meant for small arrays: prompts, rewards, sampled tokens, eval outputs.
  """
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
