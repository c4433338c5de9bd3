"""Training metrics: JSONL + TensorBoard event files + PNG plots (process 0 only)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends one JSON line and one TensorBoard scalar set per step."""

  def __init__(self, log_dir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.log_dir = log_dir
    self.path = os.path.join(log_dir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(log_dir, exist_ok=True)
      if tensorboard:
        self._tb = SummaryWriter(os.path.join(log_dir, "tb"))

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = float(np.asarray(v))
      row[k] = v if math.isfinite(v) else str(v)
      if self._tb is not None and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def drop_from(self, step: int):
    """Forgets the JSONL rows of `step` and later (a resumed run writes them again)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    keep = [r for r in read_jsonl(self.path) if r.get("step", 0) < step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, self.path)

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


# Token means whose step may have no such tokens (a stage without rollouts or
# demonstrations): the objective logs 0 there, which is no value, not a collapse.
TOKEN_COUNTS = {
  "loss/entropy_rollout": "loss/n_rollout_tokens",
  "loss/entropy_demo": "loss/n_demo_tokens",
}


def has_value(row: Mapping[str, Any], key: str) -> bool:
  """Whether a metrics row holds a real (finite, counted) value of `key`."""
  v = row.get(key)
  if not isinstance(v, (int, float)) or not math.isfinite(v):
    return False
  count = TOKEN_COUNTS.get(key)
  return count is None or row.get(count) is None or row[count] > 0


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


PLOTS = {
  "reward": ("reward/rollout_mean", "reward/demo_mean"),
  "entropy": ("loss/entropy_rollout", "loss/entropy_demo"),
  "response_length": ("rollout/length_mean",),
}


def plot_metrics(
  jsonl_path: str, out_dir: str, plots: Mapping[str, tuple[str, ...]] = PLOTS
) -> list[str]:
  """One PNG per plot name (reward, entropy, response length over steps)."""
  import matplotlib  # noqa: PLC0415 (plots only (a slow import))

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (plots only)

  rows = read_jsonl(jsonl_path)
  written = []
  if not rows:
    return written
  os.makedirs(out_dir, exist_ok=True)
  for name, keys in plots.items():
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if has_value(r, key)]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=key)
        drawn = True
    if not drawn:
      plt.close(fig)
      continue
    ax.set_xlabel("step")
    ax.set_title(name)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written
