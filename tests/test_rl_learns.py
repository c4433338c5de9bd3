"""Guard: the RL path learns. GRPO alone on an easy variant of the built-in
task must raise its rollout reward well above where it started; a sign or
alignment error, or a lost advantage (docs/method.md §1.3, §2, §11), leaves
it flat or pushes it down.

The easy variant: 1-step problems, a pool of POOL of them, so each prompt comes
back every few steps and what GRPO reinforces on it shows in later rollouts
(on the full task a few dozen CPU steps do not move a policy measurably). The
base is a small model warmed up by SFT on 1-step problems of the full
training split (`job.base_model`), so it solves some of the pool, not all.
Then `job.run` trains it with the `grpo` preset, from that HF checkpoint.
Fixed seeds; deterministic on CPU.
"""

import json
import os

import jax
import numpy as np
import pytest

from srft_jax import factory
from srft_jax import job
from srft_jax import rewards as rewards_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POOL = 16
STEPS = 20
# Rollout reward: mean over the first / last WINDOW steps (each window sees
# every prompt of the pool WINDOW * 8 / POOL times); the last must beat the
# first by MARGIN (absolute).
WINDOW = 4
MARGIN = 0.15

SHARED = {
  "seed": 0,
  "data.task_levels": (1,),
  "data.prompt_buckets": (32,),
  "data.max_response_len": 28,
  "model.embed_dim": 64,
  "model.num_layers": 2,
  "model.mlp_dim": 256,
  "eval.before": False,
  "eval.after": False,
  "checkpoint.every": 0,
  "checkpoint.export_hf": False,
  "log.progress": False,
  "log.tensorboard": False,
  "log.plots": False,
}
WARMUP = {
  "data.task_train_size": 4000,
  "warmup.steps": 300,
  "warmup.lr": 3e-3,
  "warmup.schedule": "cosine",
}
GRPO = {
  "steps": STEPS,
  "data.task_train_size": POOL,
  "batch.prompts_per_step": 8,
  "optim.lr": 3e-4,
  "warmup.steps": 0,
}


def _spec(arg, overrides):
  c = factory.load_config(os.path.join(REPO, "configs", "default.py") + (f":{arg}" if arg else ""))
  return factory.run_spec(c, overrides)


@pytest.mark.slow
def test_grpo_raises_rollout_reward(tmp_path):
  warm = _spec(None, {**SHARED, **WARMUP})
  mesh = warm.make_mesh()
  tokenizer = factory.tokenizer(warm, str(tmp_path))
  with rewards_lib.RewardScorer() as scorer:
    job.base_model(warm, tokenizer, mesh, str(tmp_path), scorer)
  spec = _spec("grpo", {**SHARED, **GRPO, "model.hf_path": str(tmp_path / "base" / "hf")})
  job.run(spec, str(tmp_path))
  with open(tmp_path / "logs" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  reward = [r["reward/rollout_mean"] for r in rows if "reward/rollout_mean" in r]
  allsame = [r["reward/rollout_group_allsame"] for r in rows if "reward/rollout_mean" in r]
  assert len(reward) == STEPS
  first, last = np.mean(reward[:WINDOW]), np.mean(reward[-WINDOW:])
  print(f"rollout reward first {first:.3f} last {last:.3f}: {np.round(reward, 2).tolist()}")
  # The base solves some rollouts, not all: GRPO has groups to learn from.
  assert 0.05 < first < 0.7 and np.mean(allsame[:WINDOW]) < 0.9, (first, allsame)
  assert last > first + MARGIN, (first, last, reward)
  jax.clear_caches()
