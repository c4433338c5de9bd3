"""Sequence packing for the update (docs/method.md §18): host-side (NumPy)
first-fit-decreasing placement of a step's rows into packed rows, as static
index arrays the jitted step gathers with.

The update's rows are [prompt | response] of width T = P + R, each row's real
tokens one contiguous run (left-padded prompt, right-padded response). A
micro-batch's rows are packed into bins of `pack_len` tokens; `pack_rows`
bins make one slot (one forward); bins beyond a slot spill into the next.
Every micro-batch gets the same number of slots (`slots_for`, the worst
case), so the step's shapes never change; a slot left empty is skipped on
device. Rows are packed one by one: the shared-prefix layout (a group's
prompt once) is not packed.

  row_extents   (first real column, real length) of each row of a [rows, T] mask
  slots_for     the static number of slots a micro-batch may need
  pack_bins     first-fit-decreasing: rows -> bins of at most `pack_len` tokens
  make_plan     the step's gather indices, segment ids and positions
  real_token_fraction   real tokens / tokens the update processes
"""

from __future__ import annotations

import math

import numpy as np

PLAN_KEYS = ("row", "col", "segment", "position")


def row_extents(mask_BT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(first real column, number of real tokens) of each row; a row's real
  tokens must be contiguous (the update's layout), else ValueError."""
  mask = np.asarray(mask_BT) > 0
  lengths = mask.sum(1).astype(np.int64)
  starts = np.where(lengths > 0, np.argmax(mask, axis=1), 0).astype(np.int64)
  cols = np.arange(mask.shape[1])[None]
  run = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
  if not np.array_equal(run, mask):
    bad = np.flatnonzero((run != mask).any(1))
    raise ValueError(f"row_extents: rows {bad[:5].tolist()} have non-contiguous real tokens")
  return starts, lengths


def slots_for(rows: int, row_len: int, pack_len: int, pack_rows: int) -> int:
  """Slots (forwards of `pack_rows` x `pack_len` tokens) that `rows` rows of at
  most `row_len` tokens can need. First fit opens a bin only when the item
  fits no open bin, so every bin but the last holds at least
  k = pack_len // row_len rows: at most ceil(rows / k) bins."""
  if row_len > pack_len:
    raise ValueError(f"slots_for: rows of {row_len} tokens do not fit pack_len={pack_len}")
  per_bin = pack_len // max(row_len, 1)
  return max(1, math.ceil(math.ceil(rows / per_bin) / pack_rows))


def pack_bins(lengths: np.ndarray, pack_len: int) -> list[list[int]]:
  """First-fit decreasing: row indices grouped into bins of at most `pack_len`
  tokens, longest rows first (ties in row order, so deterministic); rows of
  length 0 take no place."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.max() > pack_len:
    raise ValueError(f"pack_bins: a row of {lengths.max()} tokens exceeds pack_len={pack_len}")
  order = np.argsort(-lengths, kind="stable")
  bins: list[list[int]] = []
  free: list[int] = []
  for i in order:
    n = int(lengths[i])
    if n == 0:
      continue
    for b, room in enumerate(free):
      if n <= room:
        bins[b].append(int(i))
        free[b] -= n
        break
    else:
      bins.append([int(i)])
      free.append(pack_len - n)
  return bins


def make_plan(
  starts: np.ndarray,
  lengths: np.ndarray,
  *,
  row_len: int,
  pack_len: int,
  pack_rows: int,
  minibatches: int = 1,
  microbatches: int = 1,
) -> dict[str, np.ndarray]:
  """The step's packing plan: int32 arrays [minibatches, microbatches, slots,
  pack_rows, pack_len] (slots = `slots_for` of a micro-batch's rows):

    row       source row of each packed token, within its micro-batch
    col       its source column
    segment   1, 2, ... per row inside a packed row; 0 = padding
    position  its RoPE position: 0, 1, ... inside its row (the unpacked
              row's `positions_from_mask`)

  Rows are split into mini- then micro-batches in order, as the step splits
  them; each micro-batch's rows are packed on their own (`pack_bins`), bins
  filling slot 0 first and spilling into the next. Padding points at (0, 0).
  """
  starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
  n_chunks = minibatches * microbatches
  if len(lengths) % n_chunks:
    raise ValueError(f"make_plan: {len(lengths)} rows do not split into {n_chunks} micro-batches")
  per = len(lengths) // n_chunks
  slots = slots_for(per, row_len, pack_len, pack_rows)
  shape = (n_chunks, slots * pack_rows, pack_len)
  out = {k: np.zeros(shape, np.int32) for k in PLAN_KEYS}
  for c in range(n_chunks):
    lo = c * per
    bins = pack_bins(lengths[lo : lo + per], pack_len)
    if len(bins) > slots * pack_rows:  # cannot happen (slots_for's bound); never drop a token
      raise AssertionError(f"make_plan: {len(bins)} bins exceed {slots} slots x {pack_rows}")
    for b, rows in enumerate(bins):
      at = 0
      for seg, r in enumerate(rows, start=1):
        n = int(lengths[lo + r])
        span = slice(at, at + n)
        out["row"][c, b, span] = r
        out["col"][c, b, span] = starts[lo + r] + np.arange(n)
        out["segment"][c, b, span] = seg
        out["position"][c, b, span] = np.arange(n)
        at += n
  full = (minibatches, microbatches, slots, pack_rows, pack_len)
  return {k: v.reshape(full) for k, v in out.items()}


def real_token_fraction(lengths: np.ndarray, plan: dict[str, np.ndarray] | None, row_len: int):
  """Real tokens over the tokens the update processes: with a plan, the slots
  holding any token (empty slots are skipped); without, every row's `row_len`."""
  real = float(np.sum(lengths))
  if plan is None:
    return real / max(len(lengths) * row_len, 1)
  seg = plan["segment"]
  per_slot = seg.shape[-2] * seg.shape[-1]
  used = np.any(seg.reshape(-1, per_slot) > 0, axis=1).sum()
  return real / max(used * per_slot, 1)
