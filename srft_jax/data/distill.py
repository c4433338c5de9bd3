"""Demonstrations distilled from a teacher: `python -m srft_jax.data distill`.

    teacher (HF checkpoint dir, or a training workdir: WORKDIR/export/hf)
    prompts (task:SPLIT | tfds:DATA_DIR/NAME[:SPLIT] | a local JSONL / JSON / Parquet file)
      -> render with the teacher's chat template, tokenize, drop over-long prompts
      -> shards of `shard_size` prompts; each: batches of `batch_size` prompts
         -> k samples a prompt (srft_jax.sampler, sharded over the mesh)
         -> every finished sample scored (srft_jax.rewards.RewardScorer)
         -> one verified-correct response kept a prompt (`keep` rule)
         -> DATA_DIR/distill/shards/shard-NNNNN.json, written atomically
      -> DATA_DIR/distill/distilled.jsonl (prompt order)
      -> DATA_DIR/srft_data/distilled/1.0.0 (the TFDS dataset `prepare` writes;
         train on it with --config.data.source=tfds --config.data.name=distilled)
         + distill_summary.json beside it

Teacher. An HF checkpoint directory (config.json + safetensors, any family
`srft_jax.hf.load_model` reads) or a training workdir, whose export/hf is read.
Its tokenizer: `--tokenizer`, else the checkpoint's own tokenizer files, else
WORKDIR/tokenizer (the built-in task's sentencepiece model a run caches there).

Verification. A sample that ends without a stop token within
`max_new_tokens` is `truncated` (never kept: a student would learn not to
stop). Every other sample is scored against the prompt's answer by the reward
the trainer uses (same extraction, math-verify behind a time limit), giving
correct / wrong / unparseable / no_answer / timeout. pass@1 is the mean of
`correct` over all samples, pass@k the share of prompts with at least one.

Targets. A row's `target` is the teacher's own response text (decoded without
special tokens, the stop token not included) to the prompt rendered with
`teacher_template`. Datasets store the bare question and the bare response,
never chat markup, so the student renders the same question with its own
template (`student_template`, recorded in the summary and the training flags
it prints): the two templates may differ. `think=strip` keeps only the text
after the last `</think>` (a response with an unclosed `<think>` then has no
target); `think=keep` keeps the response whole. A kept target is scored again
as transformed, so every target in the dataset scores 1 against its answer.

Keep rule, among a prompt's samples whose target verifies: `shortest` (fewest
teacher tokens, the earliest on ties), `first` (lowest sample index) or
`random` (uniform, seeded by `seed` and the prompt's index). A prompt with no
such sample is left out and counted (`no_correct_prompts`); prompt rows that
cannot be read, lack a prompt or an answer, or are too long for the largest
prompt bucket are skipped and counted by reason (`bad_prompt_rows`).

Resume. Shard s holds prompts [s*shard_size, (s+1)*shard_size) of the usable
prompt list; batch b of a shard samples with key fold_in(PRNGKey(seed), index
of its first prompt), so a prompt's samples depend on the seed, its index and
the batch layout, never on which shards ran before. A rerun skips finished
shards (a killed run leaves at most a temporary file); the options that
decide the content are stored in distill/settings.json and a rerun with other
ones is refused (`overwrite` starts over). A run killed and rerun therefore
ends with the same dataset, bitwise, as one run straight through (on the same
mesh: sharded arithmetic may round differently on another).

Multi-host: every process loads the prompts and the teacher's shards; the
sampler runs over the global mesh; each process scores its contiguous share of
every batch's prompts; the outcomes are gathered and process 0 writes. Every
process reads the finished shards back, so DATA_DIR must be one place they all
see (gs://, or a shared disk), as a training workdir is.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from srft_jax import hf
from srft_jax import model as model_lib
from srft_jax import multihost
from srft_jax import paths
from srft_jax import rewards as rewards_lib
from srft_jax import sampler as sampler_lib
from srft_jax import sharding as shd
from srft_jax import tokenizer as tok_lib
from srft_jax.data import builders
from srft_jax.data import task

__all__ = [
  "DistillConfig",
  "KEEP_RULES",
  "THINK_MODES",
  "DATASET_NAME",
  "DROP_REASONS",
  "Prompt",
  "Teacher",
  "resolve_teacher",
  "load_prompts",
  "target_text",
  "choose",
  "sample_batch",
  "run",
]

KEEP_RULES = ("shortest", "first", "random")
THINK_MODES = ("keep", "strip")
DATASET_NAME = "distilled"  # builders.NAMES entry the output is prepared as
# A sample's fate, one code each (the index into this tuple): the scorer's
# outcomes, then `truncated` (no stop token within max_new_tokens, not scored).
SAMPLE_OUTCOMES = (*rewards_lib.OUTCOMES, "truncated")
_CORRECT, _TRUNCATED = SAMPLE_OUTCOMES.index("correct"), SAMPLE_OUTCOMES.index("truncated")
# Why a sample did not become the prompt's demonstration. `think_strip`: correct,
# but its target after `think=strip` no longer verifies; `not_chosen`: another
# sample of the prompt was kept.
DROP_REASONS = (
  "wrong",
  "unparseable",
  "no_answer",
  "timeout",
  "truncated",
  "think_strip",
  "not_chosen",
)
THINK_CLOSE = "</think>"
THINK_OPEN = "<think>"
WORK_DIR = "distill"  # under DATA_DIR: settings, shards, the final JSONL
SUMMARY_FILE = "distill_summary.json"
_SHARD = "shard-{:05d}.json"


class NoDemonstrations(ValueError):
  """The teacher solved none of the prompts: there is no dataset to write."""


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Every option of a distillation (the CLI's flags, same names).

  teacher: HF checkpoint directory or training workdir. tokenizer: overrides
    the teacher's. dtype: the teacher's compute and parameter dtype.
  prompts: "task:SPLIT", "tfds:DATA_DIR/NAME[:SPLIT]" or a JSONL/JSON/Parquet
    path. n: at most this many prompts (the first usable ones; task: how many to
    generate, required). task_levels / task_seed: the built-in task's.
  data_dir: where the work area and the dataset go.
  k: samples a prompt. temperature / top_p / top_k / max_new_tokens /
    prompt_buckets: the sampler's. batch_size: prompts a sampler call (a
    multiple of the process count; batch_size * k rows split over the mesh's
    data axes when they divide it, else every device samples every row).
    shard_size: prompts a shard file.
  keep: KEEP_RULES. seed: sampling keys and the `random` rule.
  teacher_template / student_template ("" = the teacher's) / system: chat
    templates (tokenizer.TEMPLATES) and an optional system prompt for the teacher.
  think: THINK_MODES. require_think / timeout_s: the scorer's.
  mesh: mesh axis sizes {data, fsdp, tensor, expert}; sharding_rules: overrides.
  save_responses: also store every sample's text in the shard files (audits).
  stop_after: finish at most this many new shards, then return (None: all).
  overwrite: discard earlier shards and dataset. progress: a progress bar.
  """

  teacher: str
  prompts: str
  data_dir: str
  tokenizer: str = ""
  dtype: str = "float32"
  n: int | None = None
  task_levels: tuple[int, ...] = ()
  task_seed: int = 0
  k: int = 8
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 1024
  prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
  batch_size: int = 8
  shard_size: int = 256
  keep: str = "shortest"
  seed: int = 0
  teacher_template: str = "qwen_math"
  student_template: str = ""
  system: str | None = None
  add_bos: bool = False
  think: str = "keep"
  require_think: bool = False
  timeout_s: float = rewards_lib.DEFAULT_TIMEOUT_S
  max_answer_chars: int = 512
  mesh: tuple[tuple[str, int], ...] = (("data", -1),)
  sharding_rules: str = ""
  save_responses: bool = False
  stop_after: int | None = None
  overwrite: bool = False
  progress: bool = True

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    set_("task_levels", tuple(int(x) for x in self.task_levels))
    set_("prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
    mesh = self.mesh.items() if isinstance(self.mesh, dict) else self.mesh
    set_("mesh", tuple((str(a), int(s)) for a, s in mesh))
    set_("student_template", self.student_template or self.teacher_template)
    checks = {
      "k": self.k >= 1,
      "n": self.n is None or self.n >= 1,
      "batch_size": self.batch_size >= 1,
      "shard_size": self.shard_size >= 1,
      "keep": self.keep in KEEP_RULES,
      "think": self.think in THINK_MODES,
      "teacher_template": self.teacher_template in tok_lib.TEMPLATES,
      "student_template": self.student_template in tok_lib.TEMPLATES,
      "dtype": self.dtype in model_lib.DTYPES,
      "timeout_s": self.timeout_s > 0,
      "stop_after": self.stop_after is None or self.stop_after >= 0,
      "mesh": all(a in shd.MESH_AXES for a, _ in self.mesh),
    }
    for name, ok in checks.items():
      if not ok:
        raise ValueError(f"distill: invalid {name}={getattr(self, name)!r}")
    if self.think == "strip" and self.require_think:
      raise ValueError("distill: think=strip leaves no </think> for require_think to grade")
    # The sampler's own checks (temperature, top_p, buckets) run here, not mid-run.
    self.sampling(eos_ids=(), pad_id=0)

  def sampling(self, eos_ids: Sequence[int], pad_id: int) -> sampler_lib.SamplingConfig:
    return sampler_lib.SamplingConfig(
      max_new_tokens=self.max_new_tokens,
      temperature=self.temperature,
      top_p=self.top_p,
      top_k=self.top_k,
      eos_ids=tuple(eos_ids),
      pad_id=pad_id,
      prompt_buckets=self.prompt_buckets,
      n=self.k,
    )

  def content_settings(self) -> dict[str, Any]:
    """The options that decide the dataset (a resumed run must repeat them)."""
    skip = {"stop_after", "overwrite", "progress", "mesh", "sharding_rules", "save_responses"}
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One usable prompt: its row, the teacher's token ids, and its task level (or None)."""

  id: str
  prompt: str
  answer: str
  ids: tuple[int, ...]
  level: int | None = None


# ---------------------------------------------------------------------------
# Inputs: the teacher and the prompts.


def resolve_teacher(
  teacher: str, tokenizer: str = "", *, flag: str = "--teacher", tokenizer_flag: str = "--tokenizer"
) -> tuple[str, str]:
  """(HF checkpoint directory, tokenizer path) of a checkpoint dir or a training
  workdir; errors name `flag` / `tokenizer_flag` (a CLI flag or a config field)."""
  export = os.path.join(teacher, "export", "hf")
  if paths.exists(os.path.join(teacher, "config.json")):
    hf_dir, workdir = teacher, None
  elif paths.exists(os.path.join(export, "config.json")):
    hf_dir, workdir = export, teacher
  else:
    raise FileNotFoundError(
      f"{flag}: no HF checkpoint (config.json) at {teacher} or {export}; a training "
      "workdir has one once its run ends (checkpoint.export_hf)"
    )
  if tokenizer:
    if not paths.exists(tokenizer):
      raise FileNotFoundError(f"{tokenizer_flag}: no file or directory {tokenizer}")
    return hf_dir, tokenizer
  if any(paths.exists(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer.model")):
    return hf_dir, hf_dir
  if workdir is not None and paths.isdir(os.path.join(workdir, "tokenizer")):
    return hf_dir, os.path.join(workdir, "tokenizer")
  raise FileNotFoundError(
    f"{flag}: {hf_dir} holds no tokenizer.json / tokenizer.model"
    + (f" and {workdir}/tokenizer does not exist" if workdir else "")
    + f"; pass {tokenizer_flag}"
  )


def _task_rows(split: str, cfg: DistillConfig):
  if cfg.n is None:
    raise ValueError("--prompts=task:SPLIT needs --n (how many problems to generate)")
  levels = cfg.task_levels or None
  if split == "test_ood":
    levels = None  # one level only (task.OOD_STEPS)
  for i, row in enumerate(task.generate(split, cfg.n, cfg.task_seed, levels=levels), 1):
    yield f"task:{split}:{i}", row


def _tfds_rows(spec: str):
  where, split = spec, None
  head, sep, tail = spec.rpartition(":")
  if sep and "/" not in tail:
    where, split = head, tail
  data_dir, name = os.path.split(where.rstrip("/"))
  if name not in builders.NAMES:
    raise ValueError(f"--prompts=tfds:DATA_DIR/NAME: unknown dataset {name!r}")
  local = (
    paths.local_copy(data_dir, sub=f"srft_data/{name}") if paths.is_remote(data_dir) else data_dir
  )
  source = builders.load_source(local, name, split)
  for i in range(len(source)):
    record = source[i]
    yield f"{name}:{i + 1}", {f: _text(record[f]) for f in ("id", "prompt", "answer")}


def _text(value) -> str:
  """TFDS data sources return text features as bytes."""
  return bytes(value).decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _raw_rows(cfg: DistillConfig):
  """(location, row dict or SkipRow) of the prompt source."""
  spec = cfg.prompts
  if spec.startswith("task:"):
    split = spec.split(":", 1)[1]
    if split not in task.SPLITS:
      raise ValueError(f"--prompts=task:SPLIT: unknown split {split!r}; choose from {task.SPLITS}")
    return _task_rows(split, cfg)
  if spec.startswith("tfds:"):
    return _tfds_rows(spec.split(":", 1)[1])
  return builders.read_rows(spec.removeprefix("file:"))


def load_prompts(
  cfg: DistillConfig, tokenizer, window: int
) -> tuple[list[Prompt], collections.Counter]:
  """The usable prompts in source order (at most `cfg.n`), and bad rows counted by reason.

  Rows are read with `prepare`'s readers and field mapping (builders.read_rows,
  builders.prompt_and_answer); a prompt longer than the largest bucket, or
  than the teacher's `window` leaves room for beside `max_new_tokens`, is
  `prompt_too_long`.
  """
  limit = min(cfg.prompt_buckets[-1], window - cfg.max_new_tokens)
  out: list[Prompt] = []
  bad: collections.Counter = collections.Counter()
  is_task = cfg.prompts.startswith("task:")
  for loc, row in _raw_rows(cfg):
    if cfg.n is not None and len(out) >= cfg.n:
      break
    if isinstance(row, builders.SkipRow):
      bad[row.reason] += 1
      continue
    try:
      rec = builders.prompt_and_answer(row, f"{loc}", cfg.max_answer_chars)
    except builders.SkipRow as e:
      bad[e.reason] += 1
      continue
    text = tok_lib.render_prompt(rec["prompt"], cfg.teacher_template, cfg.system)
    ids = tokenizer.encode(text, add_bos=cfg.add_bos)
    if not ids or len(ids) > limit:
      bad["prompt_too_long" if ids else "empty_prompt"] += 1
      continue
    level = task.difficulty(rec["prompt"]) if is_task else None
    out.append(Prompt(rec["id"], rec["prompt"], rec["answer"], tuple(ids), level))
  return out, bad


def _digest(prompts: Sequence[Prompt]) -> str:
  h = hashlib.sha256()
  for p in prompts:
    h.update(json.dumps([p.id, p.prompt, p.answer, p.ids]).encode())
  return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# Targets and the keep rule (pure).


def target_text(response: str, think: str) -> str | None:
  """The demonstration a response gives: whole (`keep`), or the text after its
  last `</think>` (`strip`; None for an unclosed `<think>`, nothing left)."""
  if think == "keep":
    return response
  cut = response.rfind(THINK_CLOSE)
  if cut >= 0:
    rest = response[cut + len(THINK_CLOSE) :].lstrip()
  elif THINK_OPEN in response:
    return None
  else:
    rest = response
  return rest if rest.strip() else None


def choose(usable: Sequence[bool], lengths: Sequence[int], rule: str, seed: int, index: int):
  """The kept sample's index among a prompt's samples, or None when none is usable."""
  candidates = [j for j, ok in enumerate(usable) if ok]
  if not candidates:
    return None
  if rule == "first":
    return candidates[0]
  if rule == "shortest":
    return min(candidates, key=lambda j: (lengths[j], j))
  if rule == "random":
    # String seeds hash with SHA-512 in `random`: the same on every host and run.
    return random.Random(f"distill:{seed}:{index}").choice(candidates)
  raise ValueError(f"unknown keep rule {rule!r}; choose from {KEEP_RULES}")


# ---------------------------------------------------------------------------
# Sampling and scoring one batch.


class Teacher:
  """The teacher model with what sampling it needs: tokenizer, sampler config, mesh."""

  def __init__(self, cfg: DistillConfig, mesh=None):
    hf_dir, tok_path = resolve_teacher(cfg.teacher, cfg.tokenizer)
    self.tokenizer = tok_lib.load_tokenizer(tok_path)
    self.mesh = mesh if mesh is not None else shd.make_mesh(dict(cfg.mesh))
    rules = shd.with_rules(shd.DEFAULT_RULES, **shd.parse_rules(cfg.sharding_rules))
    dtype = model_lib.DTYPES[cfg.dtype]
    self.model = hf.load_model(hf_dir, mesh=self.mesh, dtype=dtype, rules=rules)
    if self.tokenizer.vocab_size > self.model.cfg.vocab_size:
      raise ValueError(
        f"--tokenizer: {self.tokenizer.vocab_size} tokens, more than the teacher's "
        f"vocabulary ({self.model.cfg.vocab_size})"
      )
    self.stop_ids = tuple(self.tokenizer.stop_ids or (self.tokenizer.eos_id,))
    self.scfg = cfg.sampling(self.stop_ids, self.tokenizer.pad_id)
    self.hf_dir, self.tok_path = hf_dir, tok_path

  def lengths(self, tokens_BR: np.ndarray, mask_BR: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens a row generated, its stop token not counted; whether it stopped)."""
    n_B = mask_BR.sum(-1)
    last_B = np.take_along_axis(tokens_BR, np.maximum(n_B - 1, 0)[:, None], axis=-1)[:, 0]
    finished_B = (n_B > 0) & np.isin(last_B, self.stop_ids)
    return n_B - finished_B, finished_B

  def text(self, tokens_R: np.ndarray, length: int) -> str:
    """A row's response text: its first `length` tokens, special tokens dropped."""
    return self.tokenizer.decode(tokens_R[:length], skip_special=True)


def sample_batch(teacher: Teacher, prompts: Sequence[Prompt], key) -> sampler_lib.SampleOutput:
  """k samples of each prompt (rows prompt-major), dispatched, not waited for."""
  width = max(len(p.ids) for p in prompts)
  tokens = np.full((len(prompts), width), teacher.tokenizer.pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p.ids) :] = p.ids
    mask[i, width - len(p.ids) :] = 1
  return sampler_lib.sample(teacher.model, tokens, mask, key, teacher.scfg, mesh=teacher.mesh)


def _score_share(teacher, cfg, scorer, prompts, tokens, mask) -> tuple[np.ndarray, np.ndarray]:
  """(outcome codes [p, k], usable [p, k]) of this process's prompts of a batch."""
  k = cfg.k
  lengths, finished = teacher.lengths(tokens, mask)
  texts = [teacher.text(tokens[r], lengths[r]) for r in range(tokens.shape[0])]
  codes = np.full((len(prompts), k), _TRUNCATED, np.int32)
  usable = np.zeros((len(prompts), k), np.int32)
  rows = [r for r in range(len(texts)) if finished[r]]
  if rows:
    _, outcomes = scorer.score([texts[r] for r in rows], [prompts[r // k].answer for r in rows])
    for r, o in zip(rows, outcomes):
      codes[r // k, r % k] = SAMPLE_OUTCOMES.index(o)
  # The target as it will be stored must itself verify (it differs from the
  # response only when think=strip cut it).
  correct = [r for r in rows if codes[r // k, r % k] == _CORRECT]
  targets = {r: target_text(texts[r], cfg.think) for r in correct}
  for r in correct:
    usable[r // k, r % k] = int(targets[r] == texts[r])
  recheck = [r for r in correct if targets[r] is not None and targets[r] != texts[r]]
  if recheck:
    _, outcomes = scorer.score(
      [targets[r] for r in recheck], [prompts[r // k].answer for r in recheck]
    )
    for r, o in zip(recheck, outcomes):
      usable[r // k, r % k] = int(o == "correct")
  return codes, usable


def _finish_batch(teacher, cfg, scorer, prompts, start: int, out) -> list[dict]:
  """Gather a sampled batch, score this process's share, gather the outcomes and
  apply the keep rule: one entry per real prompt (process 0 gets the rows)."""
  k, b = cfg.k, cfg.batch_size
  tokens = multihost.gather(out.tokens)  # [b*k, R] on every host
  mask = multihost.gather(out.mask)
  per = b // jax.process_count()
  lo = jax.process_index() * per
  share = list(prompts[lo : lo + per])
  share += [prompts[-1]] * (per - len(share))  # past the last real prompt: scored, ignored
  codes, usable = _score_share(
    teacher, cfg, scorer, share, tokens[lo * k : (lo + per) * k], mask[lo * k : (lo + per) * k]
  )
  codes = multihost.gather(codes)  # [b, k], process-major = batch order
  usable = multihost.gather(usable)
  lengths_BK = teacher.lengths(tokens, mask)[0].reshape(b, k)
  entries = []
  for i, p in enumerate(prompts):
    lengths = [int(n) for n in lengths_BK[i]]
    kept = choose(usable[i] > 0, lengths, cfg.keep, cfg.seed, start + i)
    entry = {
      "index": start + i,
      "id": p.id,
      "level": p.level,
      "outcomes": [SAMPLE_OUTCOMES[c] for c in codes[i]],
      "lengths": lengths,
      "usable": [int(u) for u in usable[i]],
      "kept": kept,
    }
    if cfg.save_responses and multihost.is_main():
      entry["responses"] = [
        teacher.text(tokens[r], lengths[r % k]) for r in range(i * k, (i + 1) * k)
      ]
    if kept is not None:
      text = teacher.text(tokens[i * k + kept], lengths[kept])
      entry["row"] = {
        "id": p.id,
        "prompt": p.prompt,
        "target": target_text(text, cfg.think),
        "answer": p.answer,
      }
    entries.append(entry)
  return entries


def _distill_shard(teacher, cfg, scorer, prompts, start: int, bar) -> dict:
  """One shard's entries; a batch is scored while the next one samples."""
  t0 = time.time()
  entries: list[dict] = []
  pending = None
  base = jax.random.PRNGKey(cfg.seed)
  for b0 in range(0, len(prompts), cfg.batch_size):
    real = prompts[b0 : b0 + cfg.batch_size]
    padded = list(real) + [real[-1]] * (cfg.batch_size - len(real))  # one static shape
    out = sample_batch(teacher, padded, jax.random.fold_in(base, start + b0))
    if pending is not None:
      entries += _finish_batch(teacher, cfg, scorer, *pending)
      bar.update(len(pending[0]))
    pending = (real, start + b0, out)
  entries += _finish_batch(teacher, cfg, scorer, *pending)
  bar.update(len(pending[0]))
  return {
    "start": start,
    "stop": start + len(prompts),
    "entries": entries,
    "samples": len(prompts) * cfg.k,
    "seconds": time.time() - t0,
  }


# ---------------------------------------------------------------------------
# The run: shards, resume, the dataset and its summary.


def _summary(cfg: DistillConfig, shards: list[dict], bad, teacher, wall_s: float) -> dict:
  entries = [e for s in shards for e in s["entries"]]
  outcomes = collections.Counter(o for e in entries for o in e["outcomes"])
  samples = sum(len(e["outcomes"]) for e in entries)
  kept = [e for e in entries if e["kept"] is not None]
  dropped = {r: outcomes[r] for r in DROP_REASONS if r in SAMPLE_OUTCOMES}
  dropped["think_strip"] = sum(
    1 for e in entries for o, u in zip(e["outcomes"], e["usable"]) if o == "correct" and not u
  )
  dropped["not_chosen"] = sum(sum(e["usable"]) - 1 for e in kept)
  n = len(entries)

  def rates(group: list[dict]) -> dict[str, float]:
    m = len(group)
    s = sum(len(e["outcomes"]) for e in group)
    return {
      "prompts": m,
      "pass@1": sum(e["outcomes"].count("correct") for e in group) / max(s, 1),
      "pass@k": sum("correct" in e["outcomes"] for e in group) / max(m, 1),
      "yield": sum(e["kept"] is not None for e in group) / max(m, 1),
    }

  seconds = sum(s["seconds"] for s in shards)
  data_dir = cfg.data_dir
  summary = {
    "teacher": cfg.teacher,
    "teacher_hf": teacher.hf_dir,
    "tokenizer": teacher.tok_path,
    "prompts_source": cfg.prompts,
    "k": cfg.k,
    "keep": cfg.keep,
    "think": cfg.think,
    "teacher_template": cfg.teacher_template,
    "student_template": cfg.student_template,
    **rates(entries),
    "samples": samples,
    "kept": len(kept),
    "mean_kept_tokens": float(np.mean([e["lengths"][e["kept"]] for e in kept])) if kept else 0.0,
    "outcomes": {o: outcomes[o] for o in SAMPLE_OUTCOMES},
    "dropped": dropped,
    "no_correct_prompts": n - len(kept),
    "bad_prompt_rows": dict(sorted(bad.items())),
    "bad_prompt_rows_total": sum(bad.values()),
    "samples_per_s": samples / seconds if seconds > 0 else 0.0,
    "sampling_s": round(seconds, 2),
    "wall_s": round(wall_s, 2),
    "dataset": builders.dataset_dir(data_dir, DATASET_NAME),
    "train_flags": (
      f"--config.data.source=tfds --config.data.data_dir={data_dir} "
      f"--config.data.name={DATASET_NAME} --config.data.template={cfg.student_template}"
    ),
  }
  summary["pass@1"] = round(summary["pass@1"], 6)
  levels = sorted({e["level"] for e in entries if e["level"] is not None})
  if levels:
    summary["by_level"] = {
      str(lv): rates([e for e in entries if e["level"] == lv]) for lv in levels
    }
  return summary


def format_summary(s: dict) -> str:
  dropped = ", ".join(f"{r}={n}" for r, n in s["dropped"].items() if n) or "none"
  bad = ", ".join(f"{r}={n}" for r, n in s["bad_prompt_rows"].items()) or "none"
  lines = [
    f"distilled {s['kept']} demonstrations from {s['prompts']} prompts x {s['k']} samples",
    f"  pass@1 {s['pass@1']:.3f}  pass@k {s['pass@k']:.3f}  yield {s['yield']:.3f}  "
    f"mean kept length {s['mean_kept_tokens']:.1f} tokens",
    f"  dropped samples: {dropped}",
    f"  prompts with no correct sample: {s['no_correct_prompts']}; bad prompt rows skipped: "
    f"{s['bad_prompt_rows_total']} ({bad})",
    f"  {s['samples_per_s']:.2f} samples/s",
  ]
  for lv, r in s.get("by_level", {}).items():
    lines.append(
      f"  level {lv}: {r['prompts']} prompts, pass@1 {r['pass@1']:.3f}, "
      f"pass@k {r['pass@k']:.3f}, yield {r['yield']:.3f}"
    )
  lines.append(f"written to {s['dataset']}; train on it with {s['train_flags']}")
  return "\n".join(lines)


def _write_dataset(cfg: DistillConfig, shards: list[dict], work: str) -> None:
  """distilled.jsonl in prompt order, then the TFDS dataset from it (process 0)."""
  rows = [e["row"] for s in shards for e in s["entries"] if e["kept"] is not None]
  text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
  paths.write_text(os.path.join(work, "distilled.jsonl"), text)
  remote = paths.is_remote(cfg.data_dir)
  with tempfile.TemporaryDirectory(prefix="srft_distill_") as tmp:
    src = os.path.join(work, "distilled.jsonl")  # named in the dataset's report
    if remote:
      src = os.path.join(tmp, "distilled.jsonl")
      with open(src, "w", encoding="utf-8") as f:
        f.write(text)
    local = os.path.join(tmp, "data") if remote else cfg.data_dir
    report = builders.prepare(
      DATASET_NAME, local, src, overwrite=True, max_target_chars=1 << 40, max_answer_chars=1 << 20
    )
    if report["splits"]["train"]["kept"] != len(rows):
      raise AssertionError(f"distill: prepare skipped rows: {report['splits']['train']}")
    if remote:
      paths.publish_dir(
        builders.dataset_dir(local, DATASET_NAME),
        builders.dataset_dir(cfg.data_dir, DATASET_NAME),
        last=("dataset_info.json",),
      )


def run(cfg: DistillConfig, *, scorer: rewards_lib.RewardScorer | None = None, mesh=None) -> dict:
  """Distil (or resume distilling) `cfg`; returns the summary, with
  "status": "done", or "partial" when `cfg.stop_after` ended it early."""
  t0 = time.time()
  work = os.path.join(cfg.data_dir, WORK_DIR)
  shard_dir = os.path.join(work, "shards")
  if cfg.overwrite and multihost.is_main():
    paths.remove(work)
    paths.remove(builders.dataset_dir(cfg.data_dir, DATASET_NAME))
  multihost.sync_processes("srft_distill_start")
  if cfg.batch_size % jax.process_count():
    raise ValueError(
      f"--batch_size={cfg.batch_size}: not a multiple of {jax.process_count()} hosts"
    )

  teacher = Teacher(cfg, mesh)
  prompts, bad = load_prompts(cfg, teacher.tokenizer, teacher.model.cfg.max_seq_len)
  if not prompts:
    raise ValueError(f"--prompts: no usable prompt in {cfg.prompts} (skipped: {dict(bad)})")
  settings = {
    **cfg.content_settings(),
    "teacher_config": hf.read_config(teacher.hf_dir),
    "prompts_usable": len(prompts),
    "prompts_digest": _digest(prompts),
  }
  settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
  settings_file = os.path.join(work, "settings.json")
  if paths.exists(settings_file):
    before = paths.read_json(settings_file)
    if before != settings:
      diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
      raise ValueError(
        f"distill: {work} holds shards of other settings ({', '.join(diff)}); rerun with the "
        "same options, or pass --overwrite to start over"
      )
  elif multihost.is_main():
    paths.write_json(settings_file, settings, indent=2)

  starts = list(range(0, len(prompts), cfg.shard_size))
  done: dict[int, dict] = {}
  for s, start in enumerate(starts):
    path = os.path.join(shard_dir, _SHARD.format(s))
    if paths.exists(path):
      shard = paths.read_json(path)
      if shard.get("start") == start:
        done[s] = shard
  todo = [s for s in range(len(starts)) if s not in done]
  if cfg.stop_after is not None:
    todo = todo[: cfg.stop_after]
  own_scorer = scorer is None
  if own_scorer:
    scorer = rewards_lib.RewardScorer(timeout_s=cfg.timeout_s, require_think=cfg.require_think)
  finished = sum(done[s]["stop"] - done[s]["start"] for s in done)
  bar = tqdm(
    total=len(prompts),
    initial=finished,
    desc="distill",
    unit="prompt",
    dynamic_ncols=True,
    disable=not (cfg.progress and multihost.is_main()),
  )
  try:
    for s in todo:
      start = starts[s]
      shard = _distill_shard(
        teacher, cfg, scorer, prompts[start : start + cfg.shard_size], start, bar
      )
      if multihost.is_main():
        paths.write_json(os.path.join(shard_dir, _SHARD.format(s)), shard)
      done[s] = shard
  finally:
    bar.close()
    if own_scorer:
      scorer.close()
  multihost.sync_processes("srft_distill_shards")
  if len(done) < len(starts):
    return {"status": "partial", "shards_done": len(done), "shards": len(starts)}

  shards = [done[s] for s in range(len(starts))]
  if not any(e["kept"] is not None for sh in shards for e in sh["entries"]):
    raise NoDemonstrations(
      f"distill: no prompt has a verified-correct sample (shards in {shard_dir}); nothing to write"
    )
  summary = _summary(cfg, shards, bad, teacher, time.time() - t0)
  summary["status"] = "done"
  if multihost.is_main():
    _write_dataset(cfg, shards, work)
    for where in (builders.dataset_dir(cfg.data_dir, DATASET_NAME), work):
      paths.write_json(os.path.join(where, SUMMARY_FILE), summary, indent=2)
  multihost.sync_processes("srft_distill_done")
  return summary
