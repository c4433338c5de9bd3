"""Evaluation with the project's sampler: the built-in task and the paper's benchmarks.

`python -m srft_jax.evaluate --config=configs/default.py --checkpoint=PATH`
samples with the same sampler the trainer uses and reports accuracy (avg@k
or pass@1 per benchmark, ID / OOD averages) as Markdown and JSON.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from srft_jax import sampler as sampler_lib
from srft_jax.tokenizer import render_prompt

log = logging.getLogger(__name__)


def generate(model, tokenizer, questions: Sequence[str], cfg: sampler_lib.SamplingConfig, *,
             rng, template: str = "plain", system: str | None = None, batch_size: int = 64,
             mesh=None, progress: bool = False) -> list[list[str]]:
  """`cfg.n` completions per question, decoded. Batches have a fixed size (the
  last one is padded with repeats) so evaluation compiles once per bucket."""
  prompts = [render_prompt(q, template=template, system=system) for q in questions]
  out: list[list[str]] = []
  batches = range(0, len(prompts), batch_size)
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    batches = tqdm(batches, desc="eval", leave=False)
  for i, start in enumerate(batches):
    chunk = prompts[start:start + batch_size]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - real)
    longest = max(len(tokenizer.encode(p)) for p in chunk)
    width = cfg.bucket_for(longest)
    tokens, mask = tokenizer.batch_encode(chunk, max_len=width, left_pad=True)
    res = sampler_lib.sample(model, tokens, mask, jax.random.fold_in(rng, i), cfg, mesh=mesh)
    toks = np.asarray(jax.device_get(res.tokens))
    masks = np.asarray(jax.device_get(res.mask))
    texts = tokenizer.batch_decode(toks, masks)
    for j in range(real):
      out.append(texts[j * cfg.n:(j + 1) * cfg.n])
  return out


def accuracy_on_rows(model, tokenizer, rows: Sequence[dict], scorer, cfg: sampler_lib.SamplingConfig,
                     *, rng, template: str = "plain", batch_size: int = 64, mesh=None,
                     require_think: bool = False) -> dict[str, Any]:
  """Mean reward over rows x cfg.n samples (avg@n; pass@1 for n = 1), with outcome counts."""
  completions = generate(model, tokenizer, [r["prompt"] for r in rows], cfg, rng=rng,
                         template=template, batch_size=batch_size, mesh=mesh)
  texts = [t for c in completions for t in c]
  truths = [r["answer"] for r, c in zip(rows, completions) for _ in c]
  rewards, outcomes = scorer.score(texts, truths, require_think=require_think)
  counts: dict[str, int] = {}
  for o in outcomes:
    counts[o] = counts.get(o, 0) + 1
  per_problem = rewards.reshape(len(rows), -1).mean(1)
  return {"accuracy": float(per_problem.mean()), "n": len(rows), "k": cfg.n,
          "outcomes": counts, "samples": texts[:4]}
