"""How much RL signal the built-in task gives a base model (docs/method.md §1.1-1.3).

Builds (or loads, from the warm-up cache) the base policy of a config, then
samples `--k` responses a problem at the rollout temperature on `--n`
training problems and reports, per difficulty level and on the training mix:
the sampled success rate, the share of groups of k whose rewards are mixed
(neither all 0 nor all 1: the groups with a nonzero advantage), and greedy
accuracy; then greedy accuracy on the eval splits (val, test_id, test_ood), and
the model's per-token NLL of each demonstration style (how off-policy SFT on it is).

  python benchmarks/task_signal.py --config=configs/default.py --workdir=/tmp/sig \
      [--config.warmup.steps=...] [--n 160] [--k 8]

Prints one JSON line: {"train": {"mix": {...}, "level_1": {...}, ...}, "greedy": {...}}.
"""

from __future__ import annotations

import collections
import json
import logging
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from srft_jax import evaluate as eval_lib
from srft_jax import factory
from srft_jax import job
from srft_jax import rewards as rewards_lib
from srft_jax import token_change
from srft_jax.data import task

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/task_signal", "Where the base is cached.")
_N = flags.DEFINE_integer("n", 160, "training problems sampled")
_K = flags.DEFINE_integer("k", 8, "samples a problem (the group size)")
_N_EVAL = flags.DEFINE_integer("n_eval", 200, "problems of each eval split (greedy)")


def _summary(rewards_NK: np.ndarray) -> dict:
  mixed = (rewards_NK.min(1) < rewards_NK.max(1)).mean()
  return {
    "n": int(rewards_NK.shape[0]),
    "sampled": round(float(rewards_NK.mean()), 4),
    "mixed_groups": round(float(mixed), 4),
    "solved_groups": round(float((rewards_NK.max(1) > 0).mean()), 4),
  }


def measure(spec, model, tokenizer, scorer, mesh, rows, evals, *, k: int, n_eval: int) -> dict:
  """Sampled success (k a problem, rollout temperature), mixed-group share and
  greedy accuracy on `rows` (by level and on the mix); greedy on each eval set."""

  def rewards_of(rows, n, temperature, seed):
    cfg = spec.sampling(tokenizer, n=n, temperature=temperature)
    comps = eval_lib.generate(
      model,
      tokenizer,
      [r["prompt"] for r in rows],
      cfg,
      rng=jax.random.key(seed),
      template=spec.data.template,
      batch_size=spec.eval.batch_size,
      mesh=mesh,
    )
    rewards, _ = eval_lib.score_completions(
      comps, [r["answer"] for r in rows], n, scorer, require_think=spec.rollout.require_think
    )
    return rewards, comps

  out: dict = {"train": {}, "greedy": {}}
  sampled, comps = rewards_of(rows, k, spec.rollout.temperature, 1)
  greedy, _ = rewards_of(rows, 1, 0.0, 2)
  lengths = [len(tokenizer.encode(t)) for cs in comps for t in cs]
  out["train"]["mix"] = {**_summary(sampled), "greedy": round(float(greedy.mean()), 4)}
  by_level = collections.defaultdict(list)
  for i, r in enumerate(rows):
    by_level[task.difficulty(r["prompt"])].append(i)
  for lv in sorted(by_level):
    idx = by_level[lv]
    out["train"][f"level_{lv}"] = {
      **_summary(sampled[idx]),
      "greedy": round(float(greedy[idx].mean()), 4),
    }
  out["rollout_len_mean"] = round(float(np.mean(lengths)), 1)
  out["rollout_len_max"] = int(np.max(lengths))
  out["sample"] = comps[0][0]
  for name, ev in evals.items():
    r, _ = rewards_of(ev[:n_eval], 1, 0.0, 3)
    out["greedy"][name] = round(float(r.mean()), 4)
  out["demo_nll"] = demo_nll(spec, model, tokenizer, rows)
  return out


def demo_nll(spec, model, tokenizer, rows) -> dict:
  """How off-policy each demonstration style is for the model: the mean
  teacher-forced negative log-likelihood per response token (nats) of the same
  problems' demonstrations in each style (the SFT loss a run starts from)."""
  out = {}
  for style in task.DEMO_STYLES:
    styled = [{**r, "target": task.solve(r["prompt"]).target_in(style)} for r in rows[:64]]
    tokens, mask, resp = token_change.demo_batch(tokenizer, styled, template=spec.data.template)
    p, _ = token_change.token_probs(model, tokens, mask)
    resp = resp[:, 1:].astype(bool)  # p[:, t] is the probability of token t + 1
    out[style] = round(float(-np.log(np.maximum(p[resp], 1e-30)).mean()), 3)
  return out


def main(argv) -> None:
  del argv
  logging.basicConfig(level=logging.WARNING)
  spec = factory.run_spec(_CONFIG.value)
  t0 = time.time()
  mesh = spec.make_mesh()
  tokenizer = factory.tokenizer(spec, _WORKDIR.value)
  source, evals = factory.datasets(spec)
  rows = list(source)[: _N.value]
  with rewards_lib.RewardScorer(require_think=spec.rollout.require_think) as scorer:
    model = job.base_model(spec, tokenizer, mesh, _WORKDIR.value, scorer)
    t_base = time.time() - t0
    out = measure(
      spec, model, tokenizer, scorer, mesh, rows, evals, k=_K.value, n_eval=_N_EVAL.value
    )
  out["base_s"] = round(t_base, 1)
  out["total_s"] = round(time.time() - t0, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
