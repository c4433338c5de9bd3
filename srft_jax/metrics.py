"""Training metrics: JSONL + TensorBoard event files + PNG plots (process 0 only).

The log directory is local or remote (gs://, `srft_jax.paths`). Locally each
row is appended as it comes; remotely the rows are kept and the whole file is
uploaded at each `flush()` (the trainer flushes before every checkpoint, so a
preempted run's bucket holds every row up to its last checkpoint). TensorBoard
event files go to the same place, written synchronously (a flush holds every
scalar written before it); remote ones are uploaded whole at each flush.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tensorboardX import record_writer
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2

from srft_jax import paths


class _RemoteEventFile:
  """An event file in a remote store: written in memory, uploaded whole (one
  object) at each flush, so a reader never sees a torn record."""

  def __init__(self, path: str):
    self.path = path
    self._buf = io.BytesIO()
    self._uploaded = -1

  def write(self, data: bytes):
    self._buf.write(data)

  def flush(self):
    if self._buf.tell() != self._uploaded:
      paths.write_bytes(self.path, self._buf.getvalue())
      self._uploaded = self._buf.tell()

  def close(self):
    self.flush()


class _RemoteEventFiles:
  """tensorboardX's writer factory for a URL scheme (srft_jax.paths, not its own clients)."""

  def open(self, path):
    return _RemoteEventFile(path)

  def directory_check(self, path):
    del path  # object stores have no directories


class _Scalars:
  """One TensorBoard event file of scalars. tensorboardX's SummaryWriter
  writes from a background thread, so its flush may miss the newest events;
  this writes in the caller's thread."""

  def __init__(self, log_dir: str, purge_step: int | None):
    paths.makedirs(log_dir)
    self._events = EventsWriter(os.path.join(log_dir, "events"))
    if purge_step is not None:  # TensorBoard drops earlier files' events from this step on
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._events.write_event(
        event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start)
      )

  def write(self, step: int, values: Mapping[str, float]):
    summary = summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
    )
    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def flush(self):
    self._events.flush()

  def close(self):
    self._events.close()


class MetricsWriter:
  """Appends one JSON line and one TensorBoard scalar set per step."""

  def __init__(self, log_dir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.log_dir = log_dir
    self.path = os.path.join(log_dir, "metrics.jsonl")
    self._remote = paths.is_remote(log_dir)
    self._tensorboard = tensorboard
    self._tb = None
    self._purge_step = None
    self._text = ""  # remote: the file's whole text (uploaded at flush)
    self._dirty = False
    if self.enabled:
      paths.makedirs(log_dir)
      if self._remote:
        self._text = paths.read_text(self.path) if paths.exists(self.path) else ""
        record_writer.register_writer_factory(log_dir.split("://")[0], _RemoteEventFiles())

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = float(np.asarray(v))
      row[k] = v if math.isfinite(v) else str(v)
    if self._tensorboard:
      if self._tb is None:  # opened at the first row: a resumed run knows its purge step
        self._tb = _Scalars(os.path.join(self.log_dir, "tb"), self._purge_step)
      self._tb.write(int(step), {k: v for k, v in row.items() if k != "step" and type(v) is float})
    line = json.dumps(row) + "\n"
    if self._remote:
      self._text += line
      self._dirty = True
    else:
      with open(self.path, "a") as f:
        f.write(line)

  def flush(self):
    """Everything written so far is in the log directory (rows and event files)."""
    if not self.enabled:
      return
    if self._remote and self._dirty:
      paths.write_text(self.path, self._text)
      self._dirty = False
    if self._tb is not None:
      self._tb.flush()

  def drop_from(self, step: int):
    """Forgets the JSONL rows of `step` and later (a resumed run writes them again)."""
    if not self.enabled:
      return
    self._purge_step = int(step)
    if not paths.exists(self.path):
      return
    keep = [r for r in read_jsonl(self.path) if r.get("step", 0) < step]
    self._text = "".join(json.dumps(r) + "\n" for r in keep)
    self._dirty = False
    paths.write_text(self.path, self._text)

  def close(self):
    self.flush()
    if self._tb is not None:
      self._tb.close()
      self._tb = None


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
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


PLOTS = {
  "reward": ("reward/rollout_mean", "reward/demo_mean"),
  "entropy": ("loss/entropy_rollout", "loss/entropy_demo"),
  "response_length": ("rollout/length_mean",),
}


def smoothing_window(n: int) -> int:
  """An odd window of about a tenth of the `n` points (3 to 51); 1 (none) under 10 points."""
  if n < 10:
    return 1
  return min(51, max(3, (n // 10) | 1))


def moving_average(values, window: int) -> np.ndarray:
  """Centred moving average: point i is the mean of the `window` points around it
  (`window` odd); at the ends the window is cut to the points there are."""
  y = np.asarray(values, np.float64)
  half = window // 2
  cum = np.concatenate([[0.0], np.cumsum(y)])
  i = np.arange(len(y))
  lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(y))
  return (cum[hi] - cum[lo]) / (hi - lo)


def plot_metrics(
  jsonl_path: str, out_dir: str, plots: Mapping[str, tuple[str, ...]] = PLOTS
) -> list[str]:
  """One PNG per plot name (reward, entropy, response length over steps): each
  curve's per-step values, faint, under their centred moving average (the
  per-step reward of a few groups is noisy; the average shows the trend)."""
  import matplotlib  # noqa: PLC0415 (plots only (a slow import))

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (plots only)

  rows = read_jsonl(jsonl_path)
  written = []
  if not rows:
    return written
  for name, keys in plots.items():
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if has_value(r, key)]
      if pts:
        xs, ys = zip(*pts)
        window = smoothing_window(len(ys))
        if window == 1:
          ax.plot(xs, ys, label=key)
        else:
          (raw,) = ax.plot(xs, ys, alpha=0.3, linewidth=0.8, label=f"{key} (per step)")
          label = f"{key} (centred mean of {window} steps)"
          ax.plot(xs, moving_average(ys, window), color=raw.get_color(), label=label)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    paths.write_bytes(path, buf.getvalue())
    written.append(path)
  return written
