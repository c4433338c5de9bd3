"""The method-comparison study: every METHOD.md §4 preset from one base, over seeds (issue 8).

`python -m srft_jax.study --out DIR [--seeds 0,1,2] [--steps N] [--methods a,b] [--quick]`
`python -m srft_jax.study --out DIR --budget [--calibrate]`  (estimate the wall time from
    DIR's finished runs, or first time a short sft and srft run on this machine; prints the
    steps that fit in 60 minutes)
`python -m srft_jax.study --out DIR --report-only`  (rewrite the report from DIR's runs)

1. One shared base: the SFT warm-up of configs/default.py, cached in DIR/base
   (train.base_model) and its before-training evaluation (DIR/base/eval_before.json).
2. Every method of METHODS, each for the same number of optimizer steps, on the
   same problems (data.task_seed fixed). Seed s sets the data order, the
   sampling keys and the evaluation keys of every method at seed s, so runs of
   one seed see the same prompts in the same order: method differences are
   paired by seed. Runs go seed-major (all methods of seed 0 first), so a study
   cut short still has complete comparisons.
3. Runs execute in this process one after another (shared jit caches, one
   persistent compilation cache DIR/jax_cache, one reward-worker forkserver).
   A run whose results.json exists is skipped; an unfinished run resumes from
   its checkpoints (train.run does that when its workdir has them). A run that
   diverged (non-finite updates) leaves failed.json, is reported as such and
   skipped on reruns (delete the file to retry it).
4. DIR/report.md: the pre-registered criteria (also written to DIR/criteria.md
   before the first run), ID / OOD accuracy mean ± std over seeds in the layout
   of the paper's main table, compute per run, training-dynamics plots
   (DIR/plots/*.png, one line per method, mean over seeds), the token-change
   analysis, and one verdict per claim of METHOD.md §7.

Every study setting is an explicit override of configs/default.py (STUDY), so
tuning the default config does not silently change the study.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# METHOD.md §4 presets, then the two-stage RL→SFT schedule of claim 3.
METHODS = (
  "sft",
  "grpo",
  "sft_then_grpo",
  "sft_plus_rl",
  "luffy",
  "srft",
  "srft_code",
  "srft_no_wsft",
  "srft_no_wrl",
  "rl_then_sft",
)
TWO_STAGE_METHODS = ("sft_then_grpo", "rl_then_sft")
SEEDS = (0, 1, 2)
BASE_SEED = 0  # the shared base is warmed up once, with this seed

# The study's settings: explicit overrides of configs/default.py (dotted keys).
# Sized so 10 methods x 3 seeds + the warm-up fit in 60 minutes on a 2-core CPU
# (see `estimate_seconds` and `python -m srft_jax.study --budget`).
STUDY: dict[str, Any] = {
  "steps": 30,  # optimizer steps of every run (two-stage: 15 + 15)
  "batch.prompts_per_step": 8,
  "batch.minibatches": 2,  # paper: 2 optimizer updates a step
  "batch.microbatches": 1,
  "rollout.n_rollouts": 7,  # 7 rollouts + 1 demo (METHOD.md §1); GRPO-only runs: 8
  "rollout.n_demos": 1,
  "rollout.temperature": 1.0,
  "data.max_response_len": 72,  # R (configs/default.py of d66384f)
  "data.prompt_buckets": (48,),
  "data.task_seed": 0,  # the same problems for every method and seed
  "data.task_train_size": 20000,
  "model.preset": "tiny",
  "model.embed_dim": 128,
  "model.num_layers": 4,
  "model.mlp_dim": 512,
  "optim.lr": 2e-4,
  "optim.schedule": "constant",
  "warmup.steps": 720,  # the shared base: SFT warm-up of a random tiny model
  "warmup.lr": 1.5e-3,  # (configs/default.py's warm-up)
  "warmup.prompts_per_step": 16,
  "eval.n_id": 200,  # final ID / OOD test problems (greedy)
  "eval.n_ood": 200,
  "eval.batch_size": 100,
  "eval.temperature": 0.0,
  "eval.every": 5,  # periodic eval (claims 2, 3); divides steps // 2
  "eval.every_n": 64,  # ID problems of a periodic eval (and the 32-demo probe)
  "checkpoint.every": 10,  # resume granularity of an interrupted run
  "checkpoint.keep": 1,
  "checkpoint.export_hf": True,  # the tuned policies feed the token-change analysis
  "log.progress": False,  # the study's own bar counts runs
  "log.tensorboard": False,
  "log.plots": False,  # the study plots all runs together
}
# Methods whose only rollout term is GRPO without demonstrations put every slot
# of the group on rollouts (n_rollouts + n_demos; configs/default.py does this
# for `grpo`): the two-stage runs' GRPO stages then are exactly `grpo`.
ALL_SLOTS_ON_ROLLOUTS = ("grpo", "sft_then_grpo", "rl_then_sft")
# --quick: a smoke run of the whole pipeline in a few minutes.
QUICK: dict[str, Any] = {
  "steps": 4,
  "warmup.steps": 4,
  "warmup.prompts_per_step": 8,
  "batch.prompts_per_step": 2,
  "rollout.n_rollouts": 3,
  "data.max_response_len": 64,
  "data.task_train_size": 500,
  "model.embed_dim": 32,
  "model.num_layers": 1,
  "model.mlp_dim": 64,
  "eval.n_id": 16,
  "eval.n_ood": 16,
  "eval.batch_size": 16,
  "eval.every": 2,
  "eval.every_n": 8,
  "checkpoint.every": 2,
}

# ----------------------------------------------------------------------------
# Pre-registered criteria (METHOD.md §7). Fixed before any run; the report
# prints them before the numbers.
# ----------------------------------------------------------------------------
# Every comparison is a per-seed difference d_s (methods paired by seed). Its
# verdict: "holds" if mean(d) - margin > SE, "does not hold" if mean(d) - margin
# < -SE, else "inconclusive"; SE = sd(d, ddof=1) / sqrt(n) over seeds (0 with
# one seed, which the report flags). A claim with several parts holds if every
# part holds, does not hold if any part does not hold, else is inconclusive.
C1_REWARD_FRACTION = 0.5  # claim 1: mean rollout reward over the first half of the steps
C1_ENTROPY_EDGE_STEPS = 3  # initial / final rollout entropy: mean of the first / last 3 steps
C1_SRFT_ENTROPY_BAND = 0.30  # SRFT: |final / initial - 1| <= 0.30
C1_GRPO_ENTROPY_DROP = 0.20  # GRPO: final / initial < 1 - 0.20
C2_DIP_EVALS = 2  # claim 2: the first 2 periodic evals after the switch ...
C2_DIP_MARGIN = 0.0  # ... min accuracy below the accuracy at the switch
C3_SPIKE_EVALS = 2  # claim 3: max probe entropy in the first 2 evals after the switch
C3_SPIKE_FACTOR = 1.2  # ... exceeds 1.2 x the probe entropy at the switch
C4_THRESHOLD = 0.1  # claim 4: a token "moved" if |p_tuned - p_base| > 0.1
C4_N_PROBLEMS = 128  # demonstrations of the first 128 ID test problems
C4_TOP_SHARE = 0.5  # GRPO: >= half of its moved tokens in the top base-entropy quartile
C5_ACCURACY = "mean of ID and OOD accuracy"  # claim 5: srft minus each ablation > 0

CRITERIA_MD = f"""\
Fixed in `srft_jax/study.py` before any run (also written to `criteria.md` when the study starts).

**Decision rule.** Each comparison is a per-seed difference d (methods paired by seed: same
prompts, same data order, same sampling seed). Verdict *holds* if mean(d) − margin > SE,
*does not hold* if mean(d) − margin < −SE, otherwise *inconclusive*; SE = sd(d)/√n over seeds
(0 with a single seed, flagged). A multi-part claim holds if every part holds, does not hold if
any part does not hold, otherwise is inconclusive. A claim whose runs are missing is inconclusive.

1. **SRFT's reward rises faster than GRPO's; its rollout entropy stays in a band while GRPO's
   falls.** (a) d = mean `reward/rollout_mean` over the first {C1_REWARD_FRACTION:.0%} of the steps,
   srft − grpo, margin 0. (b) seed-mean `loss/entropy_rollout`, initial = mean of the first
   {C1_ENTROPY_EDGE_STEPS} steps, final = mean of the last {C1_ENTROPY_EDGE_STEPS}: SRFT holds if
   |final/initial − 1| ≤ {C1_SRFT_ENTROPY_BAND:.0%}. (c) GRPO holds if
   final/initial < 1 − {C1_GRPO_ENTROPY_DROP:.0%}.
   (b) and (c) are threshold tests on the seed mean (holds / does not hold).
2. **Single-stage SFT+RL beats SFT→RL at equal steps; SFT→RL dips when RL starts.**
   (a) d = final ID accuracy, sft_plus_rl − sft_then_grpo, margin 0. (b) d = periodic
   `eval/task_id` at the switch step minus the minimum of the next {C2_DIP_EVALS} periodic evals of
   sft_then_grpo, margin {C2_DIP_MARGIN}.
3. **RL→SFT: entropy spikes when SFT starts.** d = max `probe/entropy` (teacher-forced entropy on
   32 fixed demonstrations) over the {C3_SPIKE_EVALS} periodic evals after the switch of
   rl_then_sft minus {C3_SPIKE_FACTOR} × its value at the switch, margin 0.
4. **SFT moves token probabilities across whole sequences; RL moves few, mostly high-entropy
   tokens.** Teacher-forced probabilities of the demonstrations of the first {C4_N_PROBLEMS} ID test
   problems under the base model and the sft / grpo policies of the same seed; a token moved if
   |Δp| > {C4_THRESHOLD}; quartiles of the base model's entropy at each position.
   (a) d = moved fraction, sft − grpo, margin 0. (b) d = share of GRPO's moved tokens that lie in
   the top entropy quartile, margin {C4_TOP_SHARE} (uniform would be 0.25).
5. **Removing either entropy weight lowers accuracy.** d = accuracy ({C5_ACCURACY}) of srft
   minus srft_no_wsft, and srft minus srft_no_wrl, margin 0; both must hold.
"""

FLOPS_FORMULA = (
  "FLOPs ≈ 6·N·tokens_trained + 2·N·(tokens_sampled + prompt_tokens_prefilled); "
  "N = parameters incl. embeddings; tokens_trained = response tokens of every "
  "trained row (rollouts and demonstrations); tokens_sampled = generated tokens; "
  "prompt_tokens_prefilled = rollout rows × the padded prompt width (largest "
  "bucket). Prompt positions of trained rows and all evaluation are not counted."
)


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


def default_config_module():
  """configs/default.py (configs/ is a folder of files, not a package)."""
  spec = importlib.util.spec_from_file_location(
    "srft_study_default_config", os.path.join(REPO, "configs", "default.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _set(c, key: str, value) -> None:
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def study_settings(
  *, quick: bool = False, steps: int | None = None, overrides: dict | None = None
) -> dict[str, Any]:
  """The overrides every run of the study applies (STUDY, then QUICK, then the caller's)."""
  s = dict(STUDY)
  if quick:
    s.update(QUICK)
  if steps is not None:
    s["steps"] = int(steps)
  s.update(overrides or {})
  return s


def method_overrides(method: str, settings: dict) -> dict[str, Any]:
  """Per-method settings on top of the study's (ALL_SLOTS_ON_ROLLOUTS)."""
  if method in ALL_SLOTS_ON_ROLLOUTS:
    return {
      "rollout.n_rollouts": int(settings["rollout.n_rollouts"]) + int(settings["rollout.n_demos"])
    }
  return {}


def switch_step(settings: dict) -> int:
  """The step at which a two-stage run changes stage (configs/default.py: steps // 2)."""
  return int(settings["steps"]) // 2


def run_config(method: str, seed: int, out: str, settings: dict):
  """configs/default.py:`method` with the study's settings; a locked ConfigDict."""
  mod = default_config_module()
  c = mod.get_config(method)
  with c.unlocked():
    for k, v in {**settings, **method_overrides(method, settings)}.items():
      _set(c, k, v)
    c.seed = int(seed)
    c.warmup.dir = os.path.join(out, "base")
    c.data.tokenizer = tokenizer_path(out, c)
    if method in mod.TWO_STAGE:
      c.stages = mod.TWO_STAGE[method].format(half=switch_step(settings))
  c.lock()
  return c


def tokenizer_path(out: str, c) -> str:
  from srft_jax.data import task

  return os.path.join(
    out, "tokenizer", task.task_tokenizer_filename(c.data.task_seed, task.DEFAULT_VOCAB_SIZE)
  )


def run_dir(out: str, method: str, seed: int) -> str:
  return os.path.join(out, "runs", method, f"seed{seed}")


# ----------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------


def ensure_base(out: str, settings: dict) -> None:
  """The shared task tokenizer and warmed-up base model (cached; idempotent)."""
  from srft_jax import rewards as rewards_lib
  from srft_jax import sharding as shd
  from srft_jax import train
  from srft_jax.data import task

  c = run_config("sft", BASE_SEED, out, settings)
  task.get_task_tokenizer(os.path.dirname(c.data.tokenizer), seed=c.data.task_seed)
  if os.path.exists(os.path.join(out, "base", "hf", "config.json")) or c.warmup.steps <= 0:
    return
  tokenizer = train.build_tokenizer(c, out)
  mesh = shd.make_mesh(dict(c.mesh))
  with rewards_lib.RewardScorer(require_think=c.rollout.require_think) as scorer:
    if train.base_model(c, tokenizer, mesh, out, scorer) is None:
      raise SystemExit("study: SIGTERM during the base model's warm-up; rerun to resume it")


def _event(out: str, **row) -> None:
  with open(os.path.join(out, "study_log.jsonl"), "a") as f:
    f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")


def run_study(
  out: str,
  *,
  seeds: Sequence[int] = SEEDS,
  methods: Sequence[str] = METHODS,
  steps: int | None = None,
  quick: bool = False,
  overrides: dict | None = None,
  progress: bool = True,
  report: bool = True,
) -> dict:
  """Runs (or resumes) the study in DIR=`out`, then writes the report.

  Returns {"ran": [(method, seed)...], "skipped": [...], "failed": [...], "report": path}.
  """
  from srft_jax import train

  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
  settings = study_settings(quick=quick, steps=steps, overrides=overrides)
  half = switch_step(settings)
  if settings["eval.every"] and half % settings["eval.every"]:
    log.warning(
      "eval.every=%s does not divide the stage switch at step %d: claims 2 and 3 "
      "need an evaluation at the switch",
      settings["eval.every"],
      half,
    )
  os.makedirs(out, exist_ok=True)
  _write_study_json(out, settings, seeds, methods, quick)
  crit = os.path.join(out, "criteria.md")
  if not os.path.exists(crit):
    with open(crit, "w") as f:
      f.write(
        f"# Pre-registered criteria (written {time.strftime('%Y-%m-%d %H:%M:%S')})\n\n"
        + CRITERIA_MD
      )
  t0 = time.time()
  ensure_base(out, settings)
  runs = [(m, s) for s in seeds for m in methods]
  done = [
    r
    for r in runs
    if _finished(out, *r) or os.path.exists(os.path.join(run_dir(out, *r), "failed.json"))
  ]
  ran, skipped, failed = [], [], []
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(
      total=len(runs), initial=len(done), desc="study runs", unit="run", dynamic_ncols=True
    )
  try:
    for method, seed in runs:
      wd = run_dir(out, method, seed)
      if _finished(out, method, seed) or os.path.exists(os.path.join(wd, "failed.json")):
        skipped.append((method, seed))
        _event(out, run=f"{method}/seed{seed}", action="skipped")
        continue
      if bar is not None:
        bar.set_postfix_str(f"{method} seed {seed}")
      c = run_config(method, seed, out, settings)
      resumed = bool(glob.glob(os.path.join(wd, "checkpoints", "*")))
      _event(out, run=f"{method}/seed{seed}", action="resume" if resumed else "start")
      t_run = time.time()
      try:
        res = train.run(c, wd)
      except FloatingPointError as e:  # a diverged run is a result, not a study failure
        failed.append((method, seed))
        with open(os.path.join(wd, "failed.json"), "w") as f:
          json.dump({"error": str(e)}, f)
        _event(out, run=f"{method}/seed{seed}", action="failed", error=str(e))
        log.error("%s seed %d failed: %s", method, seed, e)
        if bar is not None:
          bar.update(1)
        continue
      if res.get("status") == "preempted":
        _event(out, run=f"{method}/seed{seed}", action="preempted", step=res.get("step"))
        log.warning("preempted during %s seed %d; rerun the same command to resume", method, seed)
        return {"ran": ran, "skipped": skipped, "failed": failed, "preempted": True}
      ran.append((method, seed))
      _event(
        out, run=f"{method}/seed{seed}", action="finished", wall_s=round(time.time() - t_run, 1)
      )
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  _event(out, action="study_done", wall_s=round(time.time() - t0, 1))
  path = write_report(out, seeds=seeds, methods=methods) if report else None
  return {"ran": ran, "skipped": skipped, "failed": failed, "report": path, "preempted": False}


def _finished(out: str, method: str, seed: int) -> bool:
  return os.path.exists(os.path.join(run_dir(out, method, seed), "results.json"))


def _write_study_json(out, settings, seeds, methods, quick):
  path = os.path.join(out, "study.json")
  prev = {}
  if os.path.exists(path):
    with open(path) as f:
      prev = json.load(f)
  info = {
    "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
    "seeds": list(seeds),
    "methods": list(methods),
    "quick": quick,
    "method_overrides": {
      m: method_overrides(m, settings) for m in methods if method_overrides(m, settings)
    },
    "created": prev.get("created", time.strftime("%Y-%m-%d %H:%M:%S")),
  }
  if prev and prev.get("settings") != info["settings"]:
    log.warning(
      "study settings differ from the ones DIR was started with; finished runs "
      "keep theirs (delete DIR/runs to redo)"
    )
  with open(path, "w") as f:
    json.dump(info, f, indent=2)


# ----------------------------------------------------------------------------
# Collecting results
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  method: str
  seed: int
  results: dict
  steps: dict[int, dict]  # step -> merged metrics row (a resumed run's repeats overwritten)

  def series(self, key: str) -> dict[int, float]:
    """key over steps; a step without the tokens a metric averages has no value."""
    from srft_jax import metrics as metrics_lib

    return {
      s: float(r[key]) for s, r in sorted(self.steps.items()) if metrics_lib.has_value(r, key)
    }


def load_run(out: str, method: str, seed: int) -> Run | None:
  from srft_jax import metrics as metrics_lib

  wd = run_dir(out, method, seed)
  path = os.path.join(wd, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    results = json.load(f)
  steps: dict[int, dict] = {}
  for row in metrics_lib.read_jsonl(os.path.join(wd, "logs", "metrics.jsonl")):
    steps.setdefault(int(row["step"]), {}).update(row)
  return Run(method, seed, results, steps)


def load_runs(out: str, methods: Iterable[str], seeds: Iterable[int]) -> dict[str, list[Run]]:
  runs = {}
  for m in methods:
    rs = [r for r in (load_run(out, m, s) for s in seeds) if r is not None]
    if rs:
      runs[m] = rs
  return runs


def mean_std(xs) -> tuple[float, float, int]:
  xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
  if not xs:
    return float("nan"), float("nan"), 0
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan"), len(xs)


def mean_curve(runs: Sequence[Run], key: str) -> dict[int, float]:
  """Mean over seeds at the steps every seed logged."""
  series = [r.series(key) for r in runs]
  series = [s for s in series if s]
  if not series:
    return {}
  common = sorted(set.intersection(*(set(s) for s in series)))
  return {t: float(np.mean([s[t] for s in series])) for t in common}


def run_compute(run: Run, n_params: int, prompt_width: int) -> dict[str, float]:
  """Tokens and FLOPs of one run's training (FLOPS_FORMULA)."""
  sampled = trained = prefilled = 0.0
  for row in run.steps.values():
    trained += float(row.get("tokens/trained", 0.0) or 0.0)
    s = float(row.get("tokens/sampled", 0.0) or 0.0)
    sampled += s
    length = row.get("rollout/length_mean")
    if s and isinstance(length, (int, float)) and length > 0:
      prefilled += round(s / length) * prompt_width  # rollout rows x padded prompt width
  flops = 6.0 * n_params * trained + 2.0 * n_params * (sampled + prefilled)
  return {
    "tokens_sampled": sampled,
    "tokens_trained": trained,
    "prompt_tokens_prefilled": prefilled,
    "flops": flops,
    "train_s": float(run.results.get("train_s", float("nan"))),
  }


def base_num_params(out: str) -> int | None:
  from srft_jax import hf

  path = os.path.join(out, "base", "hf")
  if not os.path.exists(os.path.join(path, "config.json")):
    return None
  return hf.config_from_hf(hf.read_config(path)).num_params()


# ----------------------------------------------------------------------------
# Verdicts (pure)
# ----------------------------------------------------------------------------

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


def verdict(diffs: Sequence[float], margin: float = 0.0) -> tuple[str, dict]:
  """The pre-registered decision rule on per-seed differences (see CRITERIA_MD)."""
  d = np.asarray([x for x in diffs if x is not None and math.isfinite(x)], np.float64)
  if d.size == 0:
    return INCONCLUSIVE, {"n": 0, "note": "no data"}
  m = float(d.mean())
  se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
  v = HOLDS if m - margin > se else FAILS if m - margin < -se else INCONCLUSIVE
  info = {"mean": m, "se": se, "n": int(d.size), "margin": margin, "per_seed": d.tolist()}
  if d.size == 1:
    info["note"] = "1 seed: no noise estimate"
  return v, info


def threshold_verdict(ok: bool | None) -> str:
  return INCONCLUSIVE if ok is None else HOLDS if ok else FAILS


def combine(parts: Sequence[str]) -> str:
  if parts and all(p == HOLDS for p in parts):
    return HOLDS
  if any(p == FAILS for p in parts):
    return FAILS
  return INCONCLUSIVE


def _paired(runs: dict[str, list[Run]], a: str, b: str, fn) -> list[float]:
  """fn(run_a) - fn(run_b) for every seed both methods have."""
  if a not in runs or b not in runs:
    return []
  rb = {r.seed: r for r in runs[b]}
  out = []
  for ra in runs[a]:
    if ra.seed in rb:
      x, y = fn(ra), fn(rb[ra.seed])
      if x is not None and y is not None:
        out.append(x - y)
  return out


def _acc(run: Run, split: str) -> float | None:
  return (run.results.get("after") or {}).get(f"{split}_acc")


def _acc_mean(run: Run) -> float | None:
  i, o = _acc(run, "id"), _acc(run, "ood")
  return None if i is None or o is None else (i + o) / 2


def _early_reward(run: Run) -> float | None:
  steps = int(run.results.get("steps", 0))
  s = run.series("reward/rollout_mean")
  vals = [v for t, v in s.items() if t < max(1, int(steps * C1_REWARD_FRACTION))]
  return float(np.mean(vals)) if vals else None


def _entropy_ratio(runs: Sequence[Run]) -> tuple[float | None, float | None, float | None]:
  curve = mean_curve(runs, "loss/entropy_rollout")
  if len(curve) < 2 * C1_ENTROPY_EDGE_STEPS:
    return None, None, None
  vals = [curve[t] for t in sorted(curve)]
  first = float(np.mean(vals[:C1_ENTROPY_EDGE_STEPS]))
  last = float(np.mean(vals[-C1_ENTROPY_EDGE_STEPS:]))
  return first, last, (last / first if first > 0 else None)


def _evals_around_switch(run: Run, key: str, k: int) -> tuple[float | None, list[float]]:
  """(value at the switch step, values of the next k periodic evals)."""
  half = int(run.results.get("steps", 0)) // 2
  s = run.series(key)
  after = [s[t] for t in sorted(s) if t > half][:k]
  return s.get(half), after


def claim_verdicts(runs: dict[str, list[Run]], token_change: dict | None) -> list[dict]:
  """The five claims of METHOD.md §7 under the pre-registered criteria."""
  claims = []

  def missing(*names):
    return [n for n in names if n not in runs]

  # 1. Reward rises faster; entropy stable for SRFT, falling for GRPO.
  miss = missing("srft", "grpo")
  v_a, i_a = verdict(_paired(runs, "srft", "grpo", _early_reward))
  s_first, s_last, s_ratio = _entropy_ratio(runs.get("srft", []))
  g_first, g_last, g_ratio = _entropy_ratio(runs.get("grpo", []))
  v_b = threshold_verdict(None if s_ratio is None else abs(s_ratio - 1) <= C1_SRFT_ENTROPY_BAND)
  v_c = threshold_verdict(None if g_ratio is None else g_ratio < 1 - C1_GRPO_ENTROPY_DROP)
  early = {m: mean_std([_early_reward(r) for r in runs.get(m, [])])[0] for m in ("srft", "grpo")}
  claims.append(
    {
      "claim": 1,
      "title": "SRFT's reward rises faster than GRPO's; its entropy is stable, GRPO's falls",
      "verdict": INCONCLUSIVE if miss else combine([v_a, v_b, v_c]),
      "missing": miss,
      "parts": [
        {
          "part": "a: early reward srft − grpo",
          "verdict": v_a,
          **i_a,
          "srft": early["srft"],
          "grpo": early["grpo"],
        },
        {
          "part": "b: srft entropy final/initial within band",
          "verdict": v_b,
          "initial": s_first,
          "final": s_last,
          "ratio": s_ratio,
        },
        {
          "part": "c: grpo entropy final/initial falls",
          "verdict": v_c,
          "initial": g_first,
          "final": g_last,
          "ratio": g_ratio,
        },
      ],
    }
  )

  # 2. Single-stage beats two-stage; two-stage dips at the switch.
  miss = missing("sft_plus_rl", "sft_then_grpo")
  v_a, i_a = verdict(_paired(runs, "sft_plus_rl", "sft_then_grpo", lambda r: _acc(r, "id")))
  dips = []
  for r in runs.get("sft_then_grpo", []):
    at, after = _evals_around_switch(r, "eval/task_id", C2_DIP_EVALS)
    if at is not None and after:
      dips.append(at - min(after))
  v_b, i_b = verdict(dips, C2_DIP_MARGIN)
  recovery = []
  for r in runs.get("sft_then_grpo", []):
    ev = r.series("eval/task_id")
    after = [v for s, v in ev.items() if s > int(r.results.get("steps", 0)) // 2]
    if after:
      recovery.append(after[-1] - min(after))
  claims.append(
    {
      "claim": 2,
      "title": "single-stage sft_plus_rl beats sft_then_grpo; sft_then_grpo dips when RL starts",
      "verdict": INCONCLUSIVE if miss else combine([v_a, v_b]),
      "missing": miss,
      "parts": [
        {"part": "a: final ID acc sft_plus_rl − sft_then_grpo", "verdict": v_a, **i_a},
        {"part": "b: eval at switch − min(next evals), sft_then_grpo", "verdict": v_b, **i_b},
      ],
      "limits": "b does not ask whether the dip is transient: the last eval minus the lowest "
      "after the switch (recovery), per seed = [" + ", ".join(_num(x) for x in recovery) + "]",
    }
  )

  # 3. RL then SFT: probe entropy spikes when SFT starts.
  miss = missing("rl_then_sft")
  spikes, detail = [], []
  for r in runs.get("rl_then_sft", []):
    at, after = _evals_around_switch(r, "probe/entropy", C3_SPIKE_EVALS)
    if at is not None and after:
      spikes.append(max(after) - C3_SPIKE_FACTOR * at)
      detail.append(
        {
          "seed": r.seed,
          "at_switch": at,
          "max_after": max(after),
          "final": r.series("probe/entropy").get(int(r.results.get("steps", 0))),
        }
      )
  v, i = verdict(spikes)
  claims.append(
    {
      "claim": 3,
      "title": "rl_then_sft: entropy spikes when SFT starts",
      "verdict": INCONCLUSIVE if miss else v,
      "missing": miss,
      "parts": [
        {
          "part": f"max probe entropy after − {C3_SPIKE_FACTOR} × at switch",
          "verdict": v,
          **i,
          "seeds": detail,
        }
      ],
      "limits": f"only the spike is tested, at the {C3_SPIKE_EVALS} evals after the switch "
      "(not the per-step entropy between them, nor the claim's 'hurts' and 'plateaus')",
    }
  )

  # 4. Token change: SFT moves more tokens; GRPO's moved tokens are high-entropy.
  tc = token_change or {}
  per_seed = tc.get("per_seed", {})
  d_frac, d_share = [], []
  for res in per_seed.values():
    if "sft" in res and "grpo" in res:
      d_frac.append(res["sft"]["moved_frac"] - res["grpo"]["moved_frac"])
      share = res["grpo"]["moved_share_by_quartile"][-1]
      if math.isfinite(share):
        d_share.append(share)
  v_a, i_a = verdict(d_frac)
  v_b, i_b = verdict(d_share, C4_TOP_SHARE)
  sft_share = [
    res["sft"]["moved_share_by_quartile"][-1] for res in per_seed.values() if "sft" in res
  ]
  miss = [] if d_frac else ["token-change analysis (the sft and grpo policies of a seed)"]
  claims.append(
    {
      "claim": 4,
      "title": "SFT moves many tokens; GRPO moves few, mostly high-entropy ones",
      "verdict": INCONCLUSIVE if miss else combine([v_a, v_b]),
      "missing": miss,
      "parts": [
        {"part": "a: moved fraction sft − grpo", "verdict": v_a, **i_a},
        {
          "part": "b: share of grpo's moved tokens in the top entropy quartile",
          "verdict": v_b,
          **i_b,
        },
      ],
      "limits": "b cannot tell RL from SFT: a token moves by more than the threshold only where "
      "its probability is not near 1, i.e. at high entropy, under any fine-tuning; "
      "sft's own top-quartile share, per seed = [" + ", ".join(_num(x) for x in sft_share) + "]",
    }
  )

  # 5. Each ablation lowers accuracy.
  parts, miss = [], missing("srft", "srft_no_wsft", "srft_no_wrl")
  for abl in ("srft_no_wsft", "srft_no_wrl"):
    v, i = verdict(_paired(runs, "srft", abl, _acc_mean))
    parts.append({"part": f"srft − {abl} ({C5_ACCURACY})", "verdict": v, **i})
  claims.append(
    {
      "claim": 5,
      "title": "removing either entropy weight lowers accuracy",
      "verdict": INCONCLUSIVE if miss else combine([p["verdict"] for p in parts]),
      "missing": miss,
      "parts": parts,
    }
  )
  return claims


# ----------------------------------------------------------------------------
# Token change (claim 4) on the study's policies
# ----------------------------------------------------------------------------


def token_change_analysis(out: str, seeds: Sequence[int], settings: dict) -> dict:
  """Base vs the sft / grpo policies of each seed; cached in DIR/token_change.json."""
  from srft_jax import hf, train
  from srft_jax import token_change as tc
  from srft_jax.data import task

  cache = os.path.join(out, "token_change.json")
  tuned = {
    (m, s): os.path.join(run_dir(out, m, s), "export", "hf") for m in ("sft", "grpo") for s in seeds
  }
  tuned = {k: p for k, p in tuned.items() if os.path.exists(os.path.join(p, "config.json"))}
  base_hf = os.path.join(out, "base", "hf")
  if not tuned or not os.path.exists(os.path.join(base_hf, "config.json")):
    return {}
  # Keyed by each policy's results.json time, so a redone run is analysed again.
  key = sorted(
    f"{m}/{s}@{os.path.getmtime(os.path.join(run_dir(out, m, s), 'results.json')):.0f}"
    for m, s in tuned
    if _finished(out, m, s)
  )
  if os.path.exists(cache):
    with open(cache) as f:
      prev = json.load(f)
    if prev.get("runs") == key:
      return prev
  c = run_config("sft", BASE_SEED, out, settings)
  tokenizer = train.build_tokenizer(c, out)
  rows = task.generate("test_id", max(c.eval.n_id, C4_N_PROBLEMS), c.data.task_seed)[:C4_N_PROBLEMS]
  tokens, mask, resp = tc.demo_batch(tokenizer, rows, template=c.data.template)
  base = hf.load_model(base_hf)
  result: dict[str, Any] = {
    "runs": key,
    "n_problems": len(rows),
    "threshold": C4_THRESHOLD,
    "per_seed": {},
  }
  for (m, s), path in sorted(tuned.items()):
    res = tc.token_change(base, hf.load_model(path), tokens, mask, resp, threshold=C4_THRESHOLD)
    result["per_seed"].setdefault(str(s), {})[m] = res
  with open(cache, "w") as f:
    json.dump(result, f, indent=2)
  return result


# ----------------------------------------------------------------------------
# Plots and the report
# ----------------------------------------------------------------------------

CURVES = {
  "reward": ("reward/rollout_mean", "rollout reward (mean over seeds)"),
  "entropy_rollout": ("loss/entropy_rollout", "entropy on rollout tokens"),
  "entropy_demo": ("loss/entropy_demo", "entropy on demonstration tokens"),
  "probe_entropy": ("probe/entropy", "probe entropy (32 fixed demos, teacher forced)"),
  "response_length": ("rollout/length_mean", "rollout length (tokens)"),
  "eval_id": ("eval/task_id", "periodic ID accuracy (greedy)"),
}


def plot_curves(runs: dict[str, list[Run]], plot_dir: str, switch: int | None = None) -> list[str]:
  """One PNG per curve, one line per method (mean over seeds)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(plot_dir, exist_ok=True)
  written = []
  for name, (key, title) in CURVES.items():
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for i, (method, rs) in enumerate(runs.items()):
      curve = mean_curve(rs, key)
      if curve:
        style = "--" if method in TWO_STAGE_METHODS else "-"
        ax.plot(
          list(curve),
          list(curve.values()),
          style,
          label=f"{method} (n={len(rs)})",
          color=plt.cm.tab10(i % 10),
          marker="." if len(curve) < 20 else None,
        )
        drawn += 1
    if not drawn:
      plt.close(fig)
      continue
    if switch:
      ax.axvline(switch, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = os.path.join(plot_dir, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def _pct(m: float, s: float) -> str:
  if not math.isfinite(m):
    return "–"
  return f"{100 * m:.1f} ± {100 * s:.1f}" if math.isfinite(s) else f"{100 * m:.1f}"


def _num(x, fmt="{:.3f}") -> str:
  return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def accuracy_table(out: str, runs: dict[str, list[Run]]) -> tuple[str, dict]:
  """Markdown in the paper's main-table layout (one benchmark per group on the
  built-in task, so each group average is that benchmark), mean ± std over seeds."""
  js = {}
  before = {}
  cache = os.path.join(out, "base", "eval_before.json")
  if os.path.exists(cache):
    with open(cache) as f:
      before = json.load(f)
  lines = ["| method | Task-ID | ID | Task-OOD | OOD | seeds |", "|---|---|---|---|---|---|"]
  if before:
    i, o = before.get("task_id"), before.get("task_ood")
    lines.append(
      f"| base | {_pct(i, float('nan'))} | {_pct(i, float('nan'))} | "
      f"{_pct(o, float('nan'))} | {_pct(o, float('nan'))} | – |"
    )
    js["base"] = {"id": i, "ood": o}
  for method, rs in runs.items():
    im, isd, n = mean_std([_acc(r, "id") for r in rs])
    om, osd, _ = mean_std([_acc(r, "ood") for r in rs])
    lines.append(
      f"| {method} | {_pct(im, isd)} | {_pct(im, isd)} | {_pct(om, osd)} | {_pct(om, osd)} | {n} |"
    )
    js[method] = {
      "id_mean": im,
      "id_std": isd,
      "ood_mean": om,
      "ood_std": osd,
      "n": n,
      "id_per_seed": {r.seed: _acc(r, "id") for r in rs},
      "ood_per_seed": {r.seed: _acc(r, "ood") for r in rs},
    }
  return "\n".join(lines) + "\n", js


def compute_table(
  runs: dict[str, list[Run]], n_params: int | None, prompt_width: int
) -> tuple[str, dict]:
  lines = [
    "| method | tokens sampled | tokens trained | prompt tokens prefilled | FLOPs | "
    "train time (s) |",
    "|---|---|---|---|---|---|",
  ]
  js = {}
  for method, rs in runs.items():
    cs = [run_compute(r, n_params or 0, prompt_width) for r in rs]
    agg = {k: mean_std([c[k] for c in cs]) for k in cs[0]}
    js[method] = {k: v[0] for k, v in agg.items()}
    if not n_params:
      js[method]["flops"] = None
    flops = "–" if not n_params else f"{agg['flops'][0]:.3g}"
    lines.append(
      f"| {method} | {agg['tokens_sampled'][0]:,.0f} | {agg['tokens_trained'][0]:,.0f} | "
      f"{agg['prompt_tokens_prefilled'][0]:,.0f} | {flops} | "
      f"{agg['train_s'][0]:.0f} |"
    )
  return "\n".join(lines) + "\n", js


def token_change_table(tc: dict) -> str:
  if not tc.get("per_seed"):
    return "_not computed (needs the sft and grpo runs and the base model)_\n"
  lines = [
    "| policy | seed | moved frac | moved frac by base-entropy quartile (Q1 low … Q4 high) | "
    "share of moved tokens in Q1…Q4 | mean abs Δp |",
    "|---|---|---|---|---|---|",
  ]
  fmt = lambda xs: " / ".join(_num(x, "{:.2f}") for x in xs)  # noqa: E731
  for seed, res in sorted(tc["per_seed"].items()):
    for m in ("sft", "grpo"):
      if m in res:
        r = res[m]
        lines.append(
          f"| {m} | {seed} | {r['moved_frac']:.3f} | {fmt(r['moved_frac_by_quartile'])} | "
          f"{fmt(r['moved_share_by_quartile'])} | {r['mean_abs_dp']:.4f} |"
        )
  n_tokens = next(iter(next(iter(tc["per_seed"].values())).values()))["n_tokens"]
  return (
    f"{tc['n_problems']} demonstrations ({n_tokens} response tokens), moved = "
    f"|Δp| > {tc['threshold']}, quartiles of the base model's entropy.\n\n"
    + "\n".join(lines)
    + "\n"
  )


def _claim_md(c: dict) -> str:
  lines = [f"#### Claim {c['claim']}: {c['title']} — **{c['verdict']}**", ""]
  if c["missing"]:
    lines += [f"Missing: {', '.join(c['missing'])}.", ""]
  for p in c["parts"]:
    nums = []
    for k in ("mean", "se", "n", "margin", "srft", "grpo", "initial", "final", "ratio"):
      if k in p and p[k] is not None:
        nums.append(f"{k} = {_num(p[k]) if isinstance(p[k], float) else p[k]}")
    if "per_seed" in p:
      nums.append("per seed = [" + ", ".join(_num(x) for x in p["per_seed"]) + "]")
    if p.get("note"):
      nums.append(p["note"])
    lines.append(f"- {p['part']}: **{p['verdict']}** ({'; '.join(nums) or 'no data'})")
    for s in p.get("seeds", []):
      lines.append(
        f"  - seed {s['seed']}: at switch {_num(s['at_switch'])}, max after "
        f"{_num(s['max_after'])}, final {_num(s['final'])}"
      )
  if c.get("limits"):
    lines.append(f"- Limits of this test (descriptive, not part of the verdict): {c['limits']}.")
  return "\n".join(lines) + "\n"


def write_report(
  out: str, *, seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None
) -> str:
  """DIR/report.md and DIR/plots/*.png from whatever runs exist."""
  with open(os.path.join(out, "study.json")) as f:
    info = json.load(f)
  seeds = list(seeds if seeds is not None else info["seeds"])
  methods = list(methods if methods is not None else info["methods"])
  settings = info["settings"]
  runs = load_runs(out, methods, seeds)
  tc = token_change_analysis(out, seeds, settings)
  claims = claim_verdicts(runs, tc)
  switch = switch_step(settings)
  plots = plot_curves(runs, os.path.join(out, "plots"), switch=switch)
  n_params = base_num_params(out)
  width = max(settings.get("data.prompt_buckets") or [64])
  acc_md, acc_js = accuracy_table(out, runs)
  comp_md, comp_js = compute_table(runs, n_params, width)
  events = []
  if os.path.exists(os.path.join(out, "study_log.jsonl")):
    with open(os.path.join(out, "study_log.jsonl")) as f:
      events = [json.loads(x) for x in f if x.strip()]
  run_s = sum(float(r.results.get("wall_s", 0)) for rs in runs.values() for r in rs)
  failed = sorted(
    os.path.relpath(os.path.dirname(p), os.path.join(out, "runs"))
    for p in glob.glob(os.path.join(out, "runs", "*", "seed*", "failed.json"))
  )
  n_runs = sum(len(rs) for rs in runs.values())
  setting_md = "\n".join(f"| `{k}` | `{v}` |" for k, v in settings.items())
  quick_note = " --quick (smoke run: tiny sizes, numbers meaningless)" if info.get("quick") else ""
  failed_note = (
    f"Diverged runs (non-finite updates; excluded from every table): {', '.join(failed)}."
    if failed
    else ""
  )
  verdict_md = "\n".join(f"| {c['claim']} | {c['title']} | **{c['verdict']}** |" for c in claims)
  md = (
    f"""# SRFT at small scale: method comparison (METHOD.md §4, §6, §7)

Generated by `python -m srft_jax.study --out {out}`{quick_note};
{n_runs} finished runs of {len(methods)} methods × {len(seeds)} seed(s); total run wall time
{run_s / 60:.1f} min (excluding the shared warm-up). Built-in reasoning task, tiny model
({_num(n_params, "{:,}")} parameters), every method from the same warmed-up base
(`DIR/base`), {settings["steps"]} optimizer steps each (two-stage methods switch at step {switch}).
Seed s fixes the data order, rollout sampling and evaluation of every method at seed s.
{failed_note}

## Pre-registered criteria

{CRITERIA_MD}
## Results

### Verdicts

| # | claim | verdict |
|---|---|---|
{verdict_md}

### Accuracy (greedy, %, mean ± std over seeds)

Layout of the paper's main table (METHOD.md §6): the built-in task has one in-distribution
split (Task-ID, {settings["eval.n_id"]} problems) and one out-of-distribution split (Task-OOD,
{settings["eval.n_ood"]} problems), so each group average equals its one benchmark.

{acc_md}
### Compute per run (mean over seeds)

{FLOPS_FORMULA}

{comp_md}
### Training dynamics

One line per method, mean over seeds; dashed = two-stage; dotted vertical line = stage switch.

"""
    + "\n".join(f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots)
    + f"""

### Token change (claim 4)

{token_change_table(tc)}
### Claims in detail

"""
    + "\n".join(_claim_md(c) for c in claims)
    + f"""
## Settings (overrides of configs/default.py)

| key | value |
|---|---|
{setting_md}

Per-method overrides: `{json.dumps(info.get("method_overrides", {}))}`.
"""
  )
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write(md)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(
      {
        "accuracy": acc_js,
        "compute": comp_js,
        "claims": claims,
        "token_change": tc,
        "n_params": n_params,
        "events": len(events),
      },
      f,
      indent=2,
      default=str,
    )
  return path


# ----------------------------------------------------------------------------
# Budget
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds on the target machine. Defaults: an idle 2-core CPU with the STUDY
  settings (scaled from the lead's measurements: RL step ~4-5 s at 16 prompts x 8
  slots, SFT step ~0.9 s); `measured_timing` replaces them from finished runs."""

  sft_step_s: float = 0.5  # a demo-only step (prompts_per_step rows)
  rl_step_s: float = 2.5  # a step with rollouts (prompts_per_step x 8 slots)
  warmup_step_s: float = 0.35  # a warm-up SFT step (warmup.prompts_per_step rows)
  run_overhead_s: float = 30.0  # per run: start-up, compiles, periodic + final evals, export


def stage_kinds(method: str, steps: int) -> dict[str, int]:
  """Optimizer steps of each kind ('sft' = no rollouts, 'rl' = with rollouts)."""
  half = steps // 2
  if method == "sft":
    return {"sft": steps, "rl": 0}
  if method == "sft_then_grpo":
    return {"sft": half, "rl": steps - half}
  if method == "rl_then_sft":
    return {"sft": steps - half, "rl": half}
  return {"sft": 0, "rl": steps}


def estimate_seconds(
  settings: dict,
  methods: Sequence[str],
  seeds: Sequence[int],
  timing: Timing = Timing(),
  *,
  base_cached: bool = False,
) -> dict:
  """Wall-time estimate: warm-up + Σ over runs of (steps x step time + per-run overhead)."""
  steps = int(settings["steps"])
  per_method = {}
  for m in methods:
    k = stage_kinds(m, steps)
    per_method[m] = (
      k["sft"] * timing.sft_step_s + k["rl"] * timing.rl_step_s + timing.run_overhead_s
    )
  warm = (
    0.0
    if base_cached
    else int(settings["warmup.steps"]) * timing.warmup_step_s + timing.run_overhead_s
  )
  total = warm + len(seeds) * sum(per_method.values())
  return {
    "total_s": total,
    "warmup_s": warm,
    "per_run_s": per_method,
    "timing": dataclasses.asdict(timing),
  }


def measured_timing(out: str, default: Timing = Timing()) -> Timing:
  """Timing from DIR's finished runs: median step time by kind (steps after the
  first two, which compile), and the median per-run overhead (wall time minus
  steps x median step time: compiles, evaluations, export). Fields without
  data keep `default`."""
  from srft_jax import metrics as metrics_lib

  runs = []
  for path in glob.glob(os.path.join(out, "runs", "*", "seed*", "results.json")):
    wd = os.path.dirname(path)
    r = load_run(out, os.path.basename(os.path.dirname(wd)), int(os.path.basename(wd)[4:]))
    if r is not None:
      runs.append(r)
  by_kind: dict[str, list[float]] = {"sft": [], "rl": []}
  for r in runs:
    timed = [row for _, row in sorted(r.steps.items()) if "time/step_s" in row]
    for row in timed[2:]:
      by_kind["rl" if "tokens/sampled" in row else "sft"].append(float(row["time/step_s"]))
  med = lambda xs, d: float(np.median(xs)) if xs else d  # noqa: E731
  sft_s, rl_s = med(by_kind["sft"], default.sft_step_s), med(by_kind["rl"], default.rl_step_s)
  overheads = []
  for r in runs:
    k = stage_kinds(r.method, int(r.results.get("steps", 0)))
    if "wall_s" in r.results:
      overheads.append(float(r.results["wall_s"]) - k["sft"] * sft_s - k["rl"] * rl_s)
  base = os.path.join(out, "base", "run", "logs", "metrics.jsonl")
  warm = [float(x["time/step_s"]) for x in metrics_lib.read_jsonl(base)[2:] if "time/step_s" in x]
  return Timing(
    sft_step_s=sft_s,
    rl_step_s=rl_s,
    warmup_step_s=med(warm, default.warmup_step_s),
    run_overhead_s=med(overheads, default.run_overhead_s),
  )


CALIBRATION_METHODS = ("sft", "srft")
CALIBRATION_STEPS = 10


def calibrate(out: str, settings: dict, *, progress: bool = True) -> Timing:
  """Measures this machine: a short sft and srft run (seed 0, CALIBRATION_STEPS
  steps, the study's other settings) in DIR/calibrate, sharing the study's base."""
  ensure_base(out, settings)
  cal = os.path.join(out, "calibrate")
  os.makedirs(cal, exist_ok=True)
  link = os.path.join(cal, "base")
  if not os.path.exists(link):
    os.symlink(os.path.abspath(os.path.join(out, "base")), link)
  run_study(
    cal,
    seeds=[0],
    methods=CALIBRATION_METHODS,
    overrides={**settings, "steps": CALIBRATION_STEPS},
    progress=progress,
    report=False,
  )
  # The calibration's overhead has fewer periodic evals than a full run's; the
  # difference is small next to compiles and the final evaluation.
  return measured_timing(cal)


BUDGET_MIN = 60  # the study must fit in an hour on a 2-core CPU


def steps_that_fit(
  settings: dict,
  methods: Sequence[str],
  seeds: Sequence[int],
  timing: Timing,
  *,
  minutes: float = BUDGET_MIN,
  base_cached: bool = False,
) -> int:
  """Most steps a run (a multiple of 2 x eval.every, so two-stage switches get an
  evaluation) with which the study's estimate stays within `minutes`."""
  f = lambda n: estimate_seconds(
    {**settings, "steps": n},
    methods,
    seeds,
    timing,  # noqa: E731
    base_cached=base_cached,
  )["total_s"]
  fixed, slope = f(0), f(1) - f(0)
  quantum = 2 * max(int(settings.get("eval.every") or 1), 1)
  if slope <= 0:
    return 0
  return max(int((minutes * 60 - fixed) / slope) // quantum * quantum, 0)


def budget_text(est: dict, n_seeds: int) -> str:
  lines = [
    f"estimated study wall time: {est['total_s'] / 60:.1f} min "
    f"(warm-up {est['warmup_s'] / 60:.1f} min)",
    f"timing (s): {est['timing']}",
  ]
  for m, s in est["per_run_s"].items():
    lines.append(f"  {m:14s} {s:6.0f}s x {n_seeds} seeds")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _parse_override(kv: str) -> tuple[str, Any]:
  k, _, v = kv.partition("=")
  try:
    return k, json.loads(v)
  except json.JSONDecodeError:
    return k, v


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m srft_jax.study", description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="study directory (resumable)")
  p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
  p.add_argument("--steps", type=int, default=None, help="optimizer steps of every run")
  p.add_argument(
    "--methods",
    default=None,
    help="comma-separated subset of methods (default: all; --report-only: the study's)",
  )
  p.add_argument("--quick", action="store_true", help="tiny smoke run of the whole pipeline")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="extra config override for every run, e.g. --set optim.lr=1e-3",
  )
  p.add_argument(
    "--budget",
    action="store_true",
    help="print the wall-time estimate (timing from DIR's finished runs) and exit",
  )
  p.add_argument(
    "--calibrate",
    action="store_true",
    help="--budget: first time a short sft and srft run on this machine (DIR/calibrate)",
  )
  p.add_argument(
    "--timing-from",
    default=None,
    metavar="DIR",
    help="--budget: take step times from this (calibration) study directory",
  )
  p.add_argument("--report-only", action="store_true", help="rewrite the report from DIR's runs")
  p.add_argument("--no-compile-cache", action="store_true")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets", "srft_jax.train"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  named = [m.strip() for m in (a.methods or "").split(",") if m.strip()]
  if [m for m in named if m not in METHODS]:
    print(
      f"--methods: unknown {[m for m in named if m not in METHODS]}; known: {list(METHODS)}",
      file=sys.stderr,
    )
    return 2
  if a.report_only and not os.path.exists(os.path.join(a.out, "study.json")):
    print(f"--report-only: {a.out} holds no study (no study.json)", file=sys.stderr)
    return 2
  if a.report_only:  # the study's own seeds and methods (study.json) unless named
    print(
      write_report(
        a.out,
        seeds=[int(s) for s in a.seeds.split(",")] if a.seeds else None,
        methods=[m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None,
      )
    )
    return 0
  seeds = [int(s) for s in (a.seeds or ("0" if a.quick else ",".join(map(str, SEEDS)))).split(",")]
  methods = [m.strip() for m in (a.methods or ",".join(METHODS)).split(",") if m.strip()]
  overrides = dict(_parse_override(kv) for kv in a.set)
  if str(overrides.get("multihost", False)).lower() in ("true", "1"):
    print(
      "study: runs one process on one host (its files and runs are not coordinated "
      "across processes); drop --set multihost=...",
      file=sys.stderr,
    )
    return 2
  settings = study_settings(quick=a.quick, steps=a.steps, overrides=overrides)
  if not a.no_compile_cache and (a.calibrate or not a.budget):
    # Runs of different seeds (and resumed runs) reuse each other's executables.
    import jax

    jax.config.update(
      "jax_compilation_cache_dir", os.path.join(os.path.abspath(a.out), "jax_cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if a.budget:
    cached = os.path.exists(os.path.join(a.out, "base", "hf", "config.json"))
    if a.calibrate:
      timing = calibrate(a.out, settings)
      cached = True
    else:
      timing = measured_timing(a.timing_from or a.out)
    print(
      budget_text(
        estimate_seconds(settings, methods, seeds, timing, base_cached=cached), len(seeds)
      )
    )
    print(
      f"steps a run that fit in {BUDGET_MIN} min with this timing: "
      f"{steps_that_fit(settings, methods, seeds, timing, base_cached=cached)} "
      f"(now {settings['steps']}; change with --steps)"
    )
    return 0
  est = estimate_seconds(
    settings,
    methods,
    seeds,
    measured_timing(a.out),
    base_cached=os.path.exists(os.path.join(a.out, "base", "hf", "config.json")),
  )
  log.info("%s", budget_text(est, len(seeds)))
  res = run_study(
    a.out, seeds=seeds, methods=methods, steps=a.steps, quick=a.quick, overrides=overrides
  )
  if res.get("preempted"):
    print("preempted: rerun the same command to resume")
    return 0
  print(f"ran {len(res['ran'])}, skipped {len(res['skipped'])}, failed {len(res['failed'])}")
  print(f"report: {res['report']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
