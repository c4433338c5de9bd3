"""The regime where demonstrations carry what the base lacks (docs/method.md §16),
chosen before any RL or mixed run by the pre-registered criteria (a)-(c) of
`claims.regime_verdict`, measured on the base, the teacher and SFT alone:

1. the base: the study's shared warm-up, on `warmup.task_levels` only (DIR/base);
2. the teacher: configs/default.py:teacher, trained once (DIR/teacher);
3. its demonstrations: `srft_jax.data.distill` over the training prompts
   (DIR/distilled, the dataset the study's runs then train on);
4. (a) and (b): the base's and the teacher's sampled success by level on `val`
   (REGIME_SAMPLES a problem at the rollout temperature);
5. (c): the SFT family's learning-rate sweep on the distilled demonstrations
   (the study's own sweep runs, reused by the study), greedy `val` accuracy by
   level before and after at the chosen rate;
6. DIR/regime.json and DIR/regime.md: the figures, the configuration and the verdict.

`python -m srft_jax.study --regime=distilled --out DIR` runs it before the study.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax

from srft_jax import evaluate as eval_lib
from srft_jax import factory
from srft_jax import hf
from srft_jax import job
from srft_jax import rewards as rewards_lib
from srft_jax.data import distill as distill_lib
from srft_jax.data import task
from srft_jax.study import claims
from srft_jax.study import runner

log = logging.getLogger(__name__)

# The hardest training level: the one the criteria are judged on.
HARDEST_LEVEL = "3"
# The regime's settings (explicit overrides of configs/default.py, on top of the
# study's): the base learns level 1 only, the run trains on every level with the
# teacher's distilled demonstrations, evaluated on the built-in task's splits.
REGIME: dict[str, Any] = {
  "warmup.source": "task",
  "data.task_levels": (1, 2, 3),
  "data.source": "tfds",
  "data.name": "distilled",
  "eval.task_splits": True,
}
# The candidate regimes, numbered from 1 (`--candidate`): what the base is
# warmed up on, and the study's steps. Candidate 1 was registered with the
# criteria; candidate 2 was added after candidate 1 failed criterion (c), and
# candidate 3 (candidate 1's base, 4x the steps: SFT sees 3,200 demonstrations
# instead of 800) after candidate 2 failed (a) and (c), each before any RL or
# mixed run in any candidate. The study runs in a candidate only if its
# criteria are all met. None met them when first measured; the exploratory
# study (`--exploratory`, labelled so in its report) runs in candidate 2, the
# one where SFT alone raises val accuracy most (47.0 -> 64.5%), a choice made
# from the base's and SFT's figures alone, before any RL or mixed run in this
# regime. Re-measured from a fresh base, candidate 2 met them: its figures sit
# within a few problems of the thresholds (docs/reproduction.md §1). The
# teacher and its demonstrations do not depend on the candidate.
CANDIDATES: tuple[dict[str, Any], ...] = (
  {"warmup.task_levels": (1,)},
  {"warmup.task_levels": (1, 2)},
  {"warmup.task_levels": (1,), "steps": 400},
)
# The teacher: configs/default.py:teacher with these overrides.
TEACHER: dict[str, Any] = {
  "eval.n_id": 200,
  "eval.n_ood": 200,
  "log.progress": False,
  "log.plots": False,
  "log.tensorboard": False,
}
# The distillation: the training prompts of every level, k samples each.
DISTILL: dict[str, Any] = {
  "n": 4000,
  "k": 8,
  "temperature": 1.0,
  "keep": "shortest",
  "teacher_template": "plain",
  "batch_size": 32,
  "shard_size": 512,
}


# --quick: the pipeline end to end in minutes (nothing is judged).
QUICK: dict[str, Any] = {
  "teacher": {
    "steps": 6,
    "model.embed_dim": 32,
    "model.num_layers": 1,
    "model.mlp_dim": 64,
    "eval.n_id": 8,
    "eval.n_ood": 8,
    "checkpoint.every": 0,
  },
  "distill": {"n": 32, "k": 2, "batch_size": 8, "shard_size": 16},
  "n_val": 16,
}


def settings(base: dict, data_dir: str, candidate: int = 1) -> dict:
  """The study's settings in the distilled regime's `candidate` (data_dir: DIR/distilled)."""
  if not 1 <= candidate <= len(CANDIDATES):
    raise ValueError(f"--candidate: 1 to {len(CANDIDATES)}, got {candidate}")
  return {
    **base,
    **REGIME,
    **CANDIDATES[candidate - 1],
    "data.data_dir": data_dir,
    "data.demo_style": "terse",
  }


def sampled_by_level(model, tokenizer, scorer, spec, mesh, rows, k: int, seed: int = 0) -> dict:
  """Mean reward of `k` samples a problem at the rollout temperature, by
  difficulty level (`evaluate.accuracy_by_level`)."""
  res = eval_lib.accuracy_on_rows(
    model,
    tokenizer,
    rows,
    scorer,
    spec.sampling(tokenizer, n=k),
    rng=jax.random.key(seed),
    template=spec.data.template,
    batch_size=spec.eval.batch_size,
    mesh=mesh,
    require_think=spec.rollout.require_think,
  )
  return eval_lib.accuracy_by_level(rows, res["per_row"])


def val_rows(spec, n: int) -> list[dict]:
  """The `val` split's first n problems (every level)."""
  return task.generate("val", n, spec.data.task_seed, "terse")


def ensure_teacher(out: str, teacher_overrides: dict, base_settings: dict) -> str:
  """DIR/teacher: configs/default.py:teacher trained once (a normal run,
  resumed if it was stopped); its workdir."""
  wd = os.path.join(out, "teacher")
  if os.path.exists(os.path.join(wd, "results.json")):
    return wd
  shared = {
    k: v
    for k, v in base_settings.items()
    if k.startswith(("data.prompt_buckets", "data.max_response_len", "data.task_seed"))
  }
  over = {
    **shared,
    **TEACHER,
    **teacher_overrides,
    "data.tokenizer": tokenizer_of(out, base_settings),
  }
  config = factory.load_config_module(runner.DEFAULT_CONFIG).get_config("teacher")
  res = job.run(factory.run_spec(config, over), wd)
  if res.get("status") == "preempted":
    raise SystemExit("regime: SIGTERM while training the teacher; rerun to resume it")
  return wd


def tokenizer_of(out: str, s: dict) -> str:
  return runner.tokenizer_path(out, int(s.get("data.task_seed", 0)))


def ensure_demos(out: str, teacher_wd: str, s: dict, distill_overrides: dict) -> dict:
  """DIR/distilled: the teacher's verified demonstrations of the training
  prompts (resumed shard by shard); the distillation summary."""
  data_dir = os.path.join(out, "distilled")
  summary = os.path.join(data_dir, distill_lib.WORK_DIR, distill_lib.SUMMARY_FILE)
  if os.path.exists(summary):  # done: reused as it is (also from another candidate's DIR)
    with open(summary) as f:
      return json.load(f)
  opts = {**DISTILL, **distill_overrides}
  cfg = distill_lib.DistillConfig(
    teacher=teacher_wd,
    prompts="task:train",
    data_dir=data_dir,
    tokenizer=tokenizer_of(out, s),
    task_levels=tuple(s.get("data.task_levels", ())),
    task_seed=int(s.get("data.task_seed", 0)),
    max_new_tokens=int(s["data.max_response_len"]),
    prompt_buckets=tuple(s["data.prompt_buckets"]),
    progress=False,
    **opts,
  )
  try:
    return distill_lib.run(cfg)
  except distill_lib.NoDemonstrations as e:  # a teacher that solves nothing: (b) fails
    log.warning("%s", e)
    return {"pass@1": 0.0, "pass@k": 0.0, "yield": 0.0, "kept": 0}


def measure(
  out: str,
  base_settings: dict,
  *,
  lr_grid: Sequence[float],
  teacher_overrides: dict | None = None,
  distill_overrides: dict | None = None,
  n_val: int = 300,
  level: str = HARDEST_LEVEL,
  candidate: int = 1,
) -> dict:
  """Steps 1-6 of the module docstring; returns (and writes) DIR/regime.json."""
  os.makedirs(out, exist_ok=True)
  data_dir = os.path.join(out, "distilled")
  s = settings(base_settings, data_dir, candidate)
  runner.ensure_base(out, s)
  teacher_wd = ensure_teacher(out, teacher_overrides or {}, s)
  summary = ensure_demos(out, teacher_wd, s, distill_overrides or {})
  spec = runner.run_spec("grpo", runner.BASE_SEED, out, s)
  mesh = spec.make_mesh()
  tokenizer = factory.tokenizer(spec, out)
  rows = val_rows(spec, n_val)
  k = claims.REGIME_SAMPLES
  with rewards_lib.RewardScorer(require_think=spec.rollout.require_think) as scorer:
    base = hf.load_model(os.path.join(out, "base", "hf"), mesh=mesh)
    base_sampled = sampled_by_level(base, tokenizer, scorer, spec, mesh, rows, k)
    teacher = hf.load_model(os.path.join(teacher_wd, "export", "hf"), mesh=mesh)
    teacher_sampled = sampled_by_level(teacher, tokenizer, scorer, spec, mesh, rows, k)
  sft_before, sft_after, sft_lr = {}, {}, None
  if summary.get("kept"):  # (c) needs demonstrations to imitate
    chosen = runner.run_sweep(out, s, lr_grid, families=("sft",))["sft"]
    sft_lr = chosen["lr"]
    with open(os.path.join(runner.sweep_dir(out, "sft", sft_lr), "results.json")) as f:
      sft = json.load(f)
    sft_before = sft["before"].get("levels", {}).get("task_val", {})
    sft_after = sft["after"].get("levels", {}).get("task_val", {})
  verdict = claims.regime_verdict(level, base_sampled, teacher_sampled, sft_before, sft_after)
  result = {
    "verdict": verdict,
    "base_sampled": base_sampled,
    "teacher_sampled": teacher_sampled,
    "sft": {"lr": sft_lr, "val_before": sft_before, "val_after": sft_after},
    "distill": {k_: summary.get(k_) for k_ in ("pass@1", "pass@k", "yield", "kept")},
    "n_val": n_val,
    "samples": k,
    "candidate": candidate,
    "settings": {
      k_: list(v) if isinstance(v, tuple) else v
      for k_, v in {**REGIME, **CANDIDATES[candidate - 1]}.items()
    },
    "teacher": {**TEACHER, **(teacher_overrides or {})},
    "distill_options": {**DISTILL, **(distill_overrides or {})},
  }
  with open(os.path.join(out, "regime.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out, "regime.md"), "w", encoding="utf-8") as f:
    f.write(claims.regime_md(verdict))
  return result
