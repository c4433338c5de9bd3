"""Training batches: tokenise, bucket, pad and shard records with grain.

    records (a TFDS data source from `builders.load_source`, or any random-access
    sequence of {id, prompt, target, answer} dicts)
      -> grain.MapDataset.source -> shuffle(seed) -> repeat(num_epochs)
      -> map(encode: chat template + tokenizer, drop over-long rows)
      -> to_iter_dataset (optional reader threads)
      -> BatchIterator: global batches of `global_batch` kept rows; this host's
         slice of `global_batch // process_count` rows, padded.

Batch layout, numpy, per host, B = global_batch // process_count:
    prompt_tokens int32 [B, P]  left padded; P = the smallest bucket that fits
                                the longest prompt of the *global* batch
    prompt_mask   int32 [B, P]
    demo_tokens   int32 [B, R]  right padded; R = max_response_len; ends with eos
    demo_mask     int32 [B, R]
    answers       list[str], ids list[str]

Why every host walks the whole global stream: the bucket and the row filter
must be identical on all hosts, or their local arrays would have different
shapes (`jax.make_array_from_process_local_data` needs equal shapes) and the
hosts would drift apart in the data. Each host therefore tokenises all
`global_batch` rows of a step (cheap next to a training step) and keeps its own
contiguous slice, so the hosts' slices are disjoint and together are exactly
the global batch a single host would see.

Resuming: `BatchIterator.get_state()` is a small JSON-able dict (grain's reader
position plus the drop counters); `set_state` on a fresh iterator built with
the same data, tokenizer and config continues with exactly the same batches.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from srft_jax.tokenizer import render_prompt

__all__ = ["PipelineConfig", "BatchIterator", "make_iterator", "encode_record", "DROP_REASONS"]

DROP_REASONS = ("prompt_too_long", "demo_too_long", "empty_prompt")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Batching settings (built once from the ConfigDict; plain values only).

  global_batch: prompts per step over all hosts; divisible by process_count.
  prompt_buckets: allowed prompt lengths P, ascending; prompts longer than the
    largest are dropped (counted as prompt_too_long).
  max_response_len: R, the demonstration width (eos included).
  truncate_demos: False drops a demonstration longer than R (demo_too_long);
    True keeps its first R tokens (then it has no eos).
  template / system: chat template for `tokenizer.render_prompt`.
  add_bos: prepend the tokenizer's BOS to prompts.
  seed / shuffle: deterministic shuffle, reshuffled every epoch.
  num_epochs: passes over the data; None repeats forever (the trainer counts steps).
  num_threads: grain reader threads tokenising ahead; 0 reads in the caller's thread.
  prefetch: records buffered ahead by those threads (0: two global batches).
  """

  global_batch: int
  prompt_buckets: tuple[int, ...]
  max_response_len: int
  truncate_demos: bool = False
  template: str = "qwen_math"
  system: str | None = None
  add_bos: bool = False
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  num_threads: int = 0
  prefetch: int = 0

  def __post_init__(self):
    buckets = tuple(int(b) for b in self.prompt_buckets)
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
      raise ValueError(f"prompt_buckets must be positive and strictly ascending, got {buckets}")
    object.__setattr__(self, "prompt_buckets", buckets)
    if self.global_batch <= 0 or self.max_response_len <= 0:
      raise ValueError("global_batch and max_response_len must be positive")


def _text(value: Any) -> str:
  """TFDS data sources return text features as bytes; plain rows hold str."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


def encode_record(
  record: dict, *, tokenizer, cfg: PipelineConfig, render: Callable[[str], str]
) -> dict:
  """One record -> token ids, or {"drop": reason} (kept in the stream so it is counted)."""
  prompt_ids = tokenizer.encode(render(_text(record["prompt"])), add_bos=cfg.add_bos)
  if not prompt_ids:
    return {"drop": "empty_prompt"}
  if len(prompt_ids) > cfg.prompt_buckets[-1]:
    return {"drop": "prompt_too_long"}
  demo_ids = tokenizer.encode(_text(record["target"])) + [tokenizer.eos_id]
  if len(demo_ids) > cfg.max_response_len:
    if not cfg.truncate_demos:
      return {"drop": "demo_too_long"}
    demo_ids = demo_ids[: cfg.max_response_len]
  return {
    "prompt_ids": np.asarray(prompt_ids, np.int32),
    "demo_ids": np.asarray(demo_ids, np.int32),
    "answer": _text(record["answer"]),
    "id": _text(record["id"]),
  }


class BatchIterator:
  """Per-host training batches with an exactly restorable position."""

  def __init__(
    self,
    element_iter,
    cfg: PipelineConfig,
    pad_id: int,
    process_index: int,
    process_count: int,
    num_records: int,
  ):
    if cfg.global_batch % process_count:
      raise ValueError(
        f"global_batch={cfg.global_batch} is not divisible by process_count={process_count}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    self._it = element_iter
    self._cfg = cfg
    self._pad_id = int(pad_id)
    self._index = process_index
    self.per_host = cfg.global_batch // process_count
    self._num_records = num_records
    self._dropped: collections.Counter = collections.Counter()
    self._batches = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = []
    # StopIteration from the reader (finite num_epochs) ends the iteration;
    # a partial last global batch is dropped so every step has full shape.
    while len(rows) < self._cfg.global_batch:
      element = next(self._it)
      if "drop" in element:
        self._dropped[element["drop"]] += 1
        continue
      rows.append(element)
    self._batches += 1
    return self._pad(rows)

  def _pad(self, rows: Sequence[dict]) -> dict:
    cfg = self._cfg
    longest = max(len(r["prompt_ids"]) for r in rows)  # over the global batch
    width = next(b for b in cfg.prompt_buckets if b >= longest)
    mine = rows[self._index * self.per_host : (self._index + 1) * self.per_host]
    n, r_len = len(mine), cfg.max_response_len
    prompt_tokens = np.full((n, width), self._pad_id, np.int32)
    prompt_mask = np.zeros((n, width), np.int32)
    demo_tokens = np.full((n, r_len), self._pad_id, np.int32)
    demo_mask = np.zeros((n, r_len), np.int32)
    for i, row in enumerate(mine):
      p, d = row["prompt_ids"], row["demo_ids"]
      prompt_tokens[i, width - len(p) :] = p  # left: every prompt ends at column P-1
      prompt_mask[i, width - len(p) :] = 1
      demo_tokens[i, : len(d)] = d
      demo_mask[i, : len(d)] = 1
    return {
      "prompt_tokens": prompt_tokens,
      "prompt_mask": prompt_mask,
      "demo_tokens": demo_tokens,
      "demo_mask": demo_mask,
      "answers": [row["answer"] for row in mine],
      "ids": [row["id"] for row in mine],
    }

  def get_state(self) -> dict:
    """Position + counters as a JSON-able dict (save it with the checkpoint)."""
    return {
      "reader": dict(self._it.get_state()),
      "batches": self._batches,
      "dropped": dict(self._dropped),
    }

  def set_state(self, state: dict) -> None:
    self._it.set_state(dict(state["reader"]))
    self._batches = int(state["batches"])
    self._dropped = collections.Counter({k: int(v) for k, v in state["dropped"].items()})

  def stats(self) -> dict[str, float]:
    """Counters for the training metrics (identical on every host)."""
    seen = int(self._it.get_state().get("next_index", 0))
    out = {
      "data/batches": float(self._batches),
      "data/records_read": float(seen),
      "data/epoch": seen / max(self._num_records, 1),
    }
    for reason in DROP_REASONS:
      out[f"data/dropped_{reason}"] = float(self._dropped[reason])
    return out


def make_iterator(
  source: Sequence,
  tokenizer,
  cfg: PipelineConfig,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
  render: Callable[[str], str] | None = None,
) -> BatchIterator:
  """Batches of `source` for this host.

  `tokenizer` follows srft_jax.tokenizer.Tokenizer (`encode`, `eos_id`,
  `pad_id`). `render` maps a question to prompt text; by default the chat
  template `cfg.template` of `srft_jax.tokenizer.render_prompt`.
  `process_index`/`process_count` default to jax's.
  """
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if render is None:
    render = functools.partial(render_prompt, template=cfg.template, system=cfg.system)
  if len(source) == 0:
    raise ValueError("empty data source")
  ds = grain.MapDataset.source(source)
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)  # repeat() below reshuffles each epoch
  ds = ds.repeat(cfg.num_epochs)
  ds = ds.map(functools.partial(encode_record, tokenizer=tokenizer, cfg=cfg, render=render))
  # Reader threads need a buffer to fill; default it to two global batches.
  prefetch = cfg.prefetch or (2 * cfg.global_batch if cfg.num_threads else 0)
  read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=prefetch)
  element_iter = iter(ds.to_iter_dataset(read))
  return BatchIterator(
    element_iter, cfg, tokenizer.pad_id, process_index, process_count, len(source)
  )
