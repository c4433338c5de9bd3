"""The study's runs: settings, per-run configs, the shared base, running (or resuming) the runs,
loading their results, and the wall-time estimate.

1. One shared base: the SFT warm-up of configs/default.py, cached in DIR/base
   (job.base_model) and its before-training evaluation (DIR/base/eval_before.json).
2. Every method of METHODS, each for the same number of optimizer steps, on the
   same problems (data.task_seed fixed). Seed s sets the data order, the
   sampling keys and the evaluation keys of every method at seed s, so runs of
   one seed see the same prompts in the same order: method differences are
   paired by seed. Runs go seed-major (all methods of seed 0 first), so a study
   cut short still has complete comparisons.
3. Runs execute in this process one after another (shared jit caches, one
   persistent compilation cache DIR/jax_cache, one reward-worker forkserver).
   A run whose results.json exists is skipped; an unfinished run resumes from
   its checkpoints (job.run does that when its workdir has them). A run that
   diverged (non-finite updates) leaves failed.json, is reported as such and
   skipped on reruns (delete the file to retry it).

Every study setting is an explicit override of configs/default.py (STUDY), so
tuning the default config does not silently change the study.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from srft_jax import console
from srft_jax import factory
from srft_jax import job
from srft_jax import metrics as metrics_lib
from srft_jax import rewards as rewards_lib
from srft_jax.data import task

log = logging.getLogger(__name__)

DEFAULT_CONFIG = os.path.join(console.configs_dir(), "default.py")

# docs/method.md §4 presets, then the two-stage RL→SFT schedule of claim 3.
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
# The on-policy distillation presets (docs/method.md §19): they need the
# distilled regime's trained teacher (DIR/teacher, `--regime=distilled`), so
# they run only when named (`--methods`), never by default.
TEACHER_METHODS = ("opd", "srft_opd")
ALL_METHODS = METHODS + TEACHER_METHODS
SEEDS = (0, 1, 2)
BASE_SEED = 0  # the shared base is warmed up once, with this seed

# The study's settings: explicit overrides of configs/default.py (dotted keys).
# The regime (docs/method.md §7.1): problems of 1-3 steps on which the warmed-up
# base's sampled rollouts succeed about half the time (most groups mixed), and
# demonstrations in the teacher's style, which the base was not warmed up on.
STUDY: dict[str, Any] = {
  "steps": 100,  # optimizer steps of every run (two-stage: 50 + 50)
  "batch.prompts_per_step": 8,
  "batch.minibatches": 2,  # paper: 2 optimizer updates a step
  "batch.microbatches": 1,
  "rollout.n_rollouts": 7,  # 7 rollouts + 1 demo (docs/method.md §1); GRPO-only runs: 8
  "rollout.n_demos": 1,
  "rollout.temperature": 1.0,
  "data.max_response_len": 72,  # R: every ID teacher demonstration fits
  "data.prompt_buckets": (48,),
  "data.task_seed": 0,  # the same problems for every method and seed
  "data.task_train_size": 20000,
  "data.demo_style": "teacher",  # off-policy demonstrations (the base knows the terse style)
  "model.preset": "tiny",
  "model.embed_dim": 128,
  "model.num_layers": 4,
  "model.mlp_dim": 512,
  "optim.lr": 2e-4,  # replaced by each family's rate from the sweep (LR_GRID)
  "optim.schedule": "constant",
  "warmup.steps": 720,  # the shared base: SFT warm-up of a random tiny model
  "warmup.lr": 1.5e-3,  # (configs/default.py's warm-up)
  "warmup.prompts_per_step": 16,
  "eval.n_id": 200,  # final ID / OOD test problems (greedy)
  "eval.n_ood": 200,
  "eval.n_val": 0,  # the sweep's split; the final runs report the test splits
  "eval.batch_size": 100,
  "eval.temperature": 0.0,
  "eval.every": 10,  # periodic eval (claims 2, 3); divides steps // 2
  "eval.every_n": 64,  # ID problems of a periodic eval (and the 32-demo probe)
  "checkpoint.every": 50,  # resume granularity of an interrupted run
  "checkpoint.keep": 1,
  "checkpoint.export_hf": True,  # the tuned policies feed the token-change analysis
  "log.progress": False,  # the study's own bar counts runs
  "log.tensorboard": False,
  "log.plots": False,  # the study plots all runs together
}
# Learning rates, chosen up front and fairly: one pre-registered grid, swept for
# each method family on the `val` split (SWEEP_SEED, the study's steps); each
# family's best final val accuracy picks its rate (ties: the smaller rate).
LR_GRID = (5e-5, 2e-4, 8e-4)
# family -> the method swept. `srft_opd` is SRFT with one more term: the mixed
# family's rate, like SRFT's other variants; `opd` (the teacher's term alone) is
# a family of its own.
FAMILIES = {"sft": "sft", "rl": "grpo", "mixed": "srft", "distill": "opd"}
SWEEP_SEED = 0
SWEEP: dict[str, Any] = {
  "eval.n_id": 0,  # the test splits stay untouched while choosing ...
  "eval.n_ood": 0,  # ... and `val` takes the ID test split's size (sweep_settings)
  "eval.every": 0,
  "checkpoint.export_hf": False,
}


def families_of(method: str) -> tuple[str, ...]:
  """A method's family per stage: sft-only, rl-only, or mixed (both at once)."""
  return {
    "sft": ("sft",),
    "grpo": ("rl",),
    "sft_then_grpo": ("sft", "rl"),
    "rl_then_sft": ("rl", "sft"),
    "opd": ("distill",),
  }.get(method, ("mixed",))


def study_families(methods: Sequence[str]) -> tuple[str, ...]:
  """The families `methods` train with: the ones the sweep chooses a rate for."""
  return tuple(f for f in FAMILIES if any(f in families_of(m) for m in methods))


# Methods whose only terms are on rollouts (GRPO, or the teacher's) put every slot
# of the group on rollouts (n_rollouts + n_demos; configs/default.py does this
# for `grpo`): the two-stage runs' GRPO stages then are exactly `grpo`.
ALL_SLOTS_ON_ROLLOUTS = ("grpo", "sft_then_grpo", "rl_then_sft", "opd")
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
QUICK_LR_GRID = (2e-4,)  # one rate: the sweep's plumbing runs, nothing is compared


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


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


def run_spec(
  method: str, seed: int, out: str, settings: dict, lrs: dict | None = None, validate: bool = True
) -> factory.RunSpec:
  """configs/default.py:`method` with the study's settings, as a run spec.
  `lrs` ({family: lr}, from the sweep) sets each stage's rate by its family."""
  mod = factory.load_config_module(DEFAULT_CONFIG)
  overrides = {**settings, **method_overrides(method, settings)}
  overrides["seed"] = int(seed)
  overrides["warmup.dir"] = os.path.join(out, "base")
  if method in TEACHER_METHODS:
    overrides["teacher.hf_path"] = teacher_dir(out)
  if method in mod.TWO_STAGE:
    overrides["stages"] = mod.TWO_STAGE[method].format(half=switch_step(settings))
  if lrs:
    rates = tuple(float(lrs[f]) for f in families_of(method))
    if len(rates) > 1:
      overrides["optim.stage_lrs"] = rates
    else:
      overrides["optim.lr"] = rates[0]
  config = mod.get_config(method)
  task_seed = factory.run_spec(config, overrides, validate=False).data.task_seed
  overrides["data.tokenizer"] = tokenizer_path(out, task_seed)
  if method in TEACHER_METHODS:  # the teacher was trained on the study's tokenizer
    overrides["teacher.tokenizer"] = overrides["data.tokenizer"]
  return factory.run_spec(config, overrides, validate=validate)


def tokenizer_path(out: str, task_seed: int) -> str:
  return os.path.join(
    out, "tokenizer", task.task_tokenizer_filename(task_seed, task.DEFAULT_VOCAB_SIZE)
  )


def teacher_dir(out: str) -> str:
  """The distilled regime's teacher workdir (study/regime.py), which the
  on-policy distillation methods (TEACHER_METHODS) distil from."""
  wd = os.path.join(out, "teacher")
  if not os.path.exists(os.path.join(wd, "export", "hf", "config.json")):
    raise ValueError(
      f"methods {list(TEACHER_METHODS)} need the distilled regime's teacher, and {wd} "
      "holds none: run the study with --regime=distilled"
    )
  return wd


def run_dir(out: str, method: str, seed: int) -> str:
  return os.path.join(out, "runs", method, f"seed{seed}")


def finished(out: str, method: str, seed: int) -> bool:
  """Whether the run wrote its results.json."""
  return os.path.exists(os.path.join(run_dir(out, method, seed), "results.json"))


# ----------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------


def ensure_base(out: str, settings: dict) -> None:
  """The shared task tokenizer and warmed-up base model (cached; idempotent)."""
  spec = run_spec("sft", BASE_SEED, out, settings)
  task.get_task_tokenizer(os.path.dirname(spec.data.tokenizer), seed=spec.data.task_seed)
  if os.path.exists(os.path.join(out, "base", "hf", "config.json")) or spec.warmup_run is None:
    return
  tokenizer = factory.tokenizer(spec, out)
  mesh = spec.make_mesh()
  with rewards_lib.RewardScorer(require_think=spec.rollout.require_think) as scorer:
    if job.base_model(spec, tokenizer, mesh, out, scorer) is None:
      raise SystemExit("study: SIGTERM during the base model's warm-up; rerun to resume it")


def sweep_dir(out: str, family: str, lr: float) -> str:
  return os.path.join(out, "sweep", family, f"lr{lr:g}")


def sweep_settings(settings: dict) -> dict:
  """A sweep run's settings: the study's, evaluated on `val` only (as many
  problems as the ID test split)."""
  return {**settings, **SWEEP, "eval.n_val": int(settings["eval.n_id"])}


def run_sweep(
  out: str,
  settings: dict,
  grid: Sequence[float],
  *,
  bar=None,
  families: Sequence[str] | None = None,
) -> dict:
  """The learning-rate sweep: each of `families`' method (default: the ten
  methods' families) at each rate of `grid` on the `val` split (finished runs
  are skipped, like the study's). Writes and
  returns these families' {family: {"lr": chosen, "val": {lr: accuracy}}}, merged
  into DIR/sweep/chosen.json (other families' entries are kept)."""
  s = sweep_settings(settings)
  families = study_families(METHODS) if families is None else families
  for family in families:
    method = FAMILIES[family]
    for lr in grid:
      wd = sweep_dir(out, family, lr)
      if os.path.exists(os.path.join(wd, "results.json")):
        continue
      if bar is not None:
        bar.set_postfix_str(f"sweep {family} lr {lr:g}")
      spec = run_spec(method, SWEEP_SEED, out, s, {f: lr for f in FAMILIES})
      _event(out, run=f"sweep/{family}/lr{lr:g}", action="start")
      t = time.time()
      try:
        res = job.run(spec, wd)
      except FloatingPointError as e:  # a diverged rate scores 0 on val
        res = {"after": {"val_acc": 0.0}, "error": str(e)}
        with open(os.path.join(wd, "results.json"), "w") as f:
          json.dump(res, f)
      if res.get("status") == "preempted":
        raise SystemExit("study: preempted during the sweep; rerun the same command to resume")
      _event(out, run=f"sweep/{family}/lr{lr:g}", action="finished", wall_s=round(time.time() - t))
      if bar is not None:
        bar.update(1)
  chosen = {}
  for family in families:
    val = {}
    for lr in grid:
      with open(os.path.join(sweep_dir(out, family, lr), "results.json")) as f:
        val[f"{lr:g}"] = float(json.load(f)["after"]["val_acc"])
    best = max(grid, key=lambda lr: (val[f"{lr:g}"], -lr))  # ties: the smaller rate
    chosen[family] = {"lr": best, "val": val, "method": FAMILIES[family]}
  path = os.path.join(out, "sweep", "chosen.json")
  kept = {}  # other families' choices (an earlier sweep of other methods) stay
  if os.path.exists(path):
    with open(path) as f:
      kept = {k: v for k, v in json.load(f).items() if k not in chosen}
  with open(path, "w") as f:
    json.dump({**kept, **chosen}, f, indent=2)
  return chosen


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
  criteria: str | None = None,
  write_report: Callable[..., str] | None = None,
  lr_grid: Sequence[float] | None = None,
) -> dict:
  """Runs (or resumes) the study in DIR=`out`, then writes the report.

  `criteria` (Markdown) goes to DIR/criteria.md before the first run unless that
  file exists; `write_report(out, seeds=, methods=)` writes the report after the
  runs (`report.CRITERIA_MD` and `report.write_report`; this module does not
  import the report). `lr_grid`: the sweep's rates (None: LR_GRID, --quick:
  QUICK_LR_GRID; empty: no sweep, every run at optim.lr). Returns {"ran": [(method, seed)...], "skipped": [...],
  "failed": [...], "report": path (None without `write_report`)}.
  """
  unknown = [m for m in methods if m not in ALL_METHODS]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; known: {list(ALL_METHODS)}")
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
  if criteria is not None and not os.path.exists(crit):
    with open(crit, "w") as f:
      f.write(
        f"# Pre-registered criteria (written {time.strftime('%Y-%m-%d %H:%M:%S')})\n\n" + criteria
      )
  t0 = time.time()
  ensure_base(out, settings)
  grid = tuple(lr_grid if lr_grid is not None else (QUICK_LR_GRID if quick else LR_GRID))
  runs = [(m, s) for s in seeds for m in methods]
  # Only the families these methods train with are swept.
  families = study_families(methods)
  done = [
    r
    for r in runs
    if finished(out, *r) or os.path.exists(os.path.join(run_dir(out, *r), "failed.json"))
  ]
  ran, skipped, failed = [], [], []
  bar = None
  if progress:
    n_sweep = len(grid) * len(families)
    n_swept = len(glob.glob(os.path.join(out, "sweep", "*", "lr*", "results.json")))
    bar = tqdm(
      total=len(runs) + n_sweep,
      initial=len(done) + min(n_swept, n_sweep),
      desc="study runs",
      unit="run",
      dynamic_ncols=True,
    )
  try:
    lrs = None
    if grid:
      chosen = run_sweep(out, settings, grid, bar=bar, families=families)
      lrs = {f: v["lr"] for f, v in chosen.items()}
    for method, seed in runs:
      wd = run_dir(out, method, seed)
      if finished(out, method, seed) or os.path.exists(os.path.join(wd, "failed.json")):
        skipped.append((method, seed))
        _event(out, run=f"{method}/seed{seed}", action="skipped")
        continue
      if bar is not None:
        bar.set_postfix_str(f"{method} seed {seed}")
      spec = run_spec(method, seed, out, settings, lrs)
      resumed = bool(glob.glob(os.path.join(wd, "checkpoints", "*")))
      _event(out, run=f"{method}/seed{seed}", action="resume" if resumed else "start")
      t_run = time.time()
      try:
        res = job.run(spec, wd)
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
  path = write_report(out, seeds=seeds, methods=methods) if write_report is not None else None
  return {"ran": ran, "skipped": skipped, "failed": failed, "report": path, "preempted": False}


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
    return {
      s: float(r[key]) for s, r in sorted(self.steps.items()) if metrics_lib.has_value(r, key)
    }


def load_run(out: str, method: str, seed: int) -> Run | None:
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


# ----------------------------------------------------------------------------
# Budget
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds on the target machine. Defaults: an idle 2-core CPU with the STUDY
  settings (scaled from the lead's measurements: RL step ~4-5 s at 16 prompts x 8
  slots, SFT step ~0.9 s); `measured_timing` replaces them from finished runs."""

  sft_step_s: float = 0.3  # a demo-only step (prompts_per_step rows)
  rl_step_s: float = 1.0  # a step with rollouts (prompts_per_step x 8 slots)
  warmup_step_s: float = 0.35  # a warm-up SFT step (warmup.prompts_per_step rows)
  run_overhead_s: float = 35.0  # per run: start-up, compiles, periodic + final evals, export


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
  lr_grid: Sequence[float] = LR_GRID,
) -> dict:
  """Wall-time estimate: warm-up + the sweep (each family's method at each rate
  of `lr_grid`) + Σ over runs of (steps x step time + per-run overhead)."""
  steps = int(settings["steps"])

  def run_s(m: str) -> float:
    k = stage_kinds(m, steps)
    return k["sft"] * timing.sft_step_s + k["rl"] * timing.rl_step_s + timing.run_overhead_s

  per_method = {m: run_s(m) for m in methods}
  warm = (
    0.0
    if base_cached
    else int(settings["warmup.steps"]) * timing.warmup_step_s + timing.run_overhead_s
  )
  sweep = len(lr_grid) * sum(run_s(FAMILIES[f]) for f in study_families(methods))
  total = warm + sweep + len(seeds) * sum(per_method.values())
  return {
    "total_s": total,
    "warmup_s": warm,
    "sweep_s": sweep,
    "per_run_s": per_method,
    "timing": dataclasses.asdict(timing),
  }


def measured_timing(out: str, default: Timing = Timing()) -> Timing:
  """Timing from DIR's finished runs: median step time by kind (steps after the
  first two, which compile), and the median per-run overhead (wall time minus
  steps x median step time: compiles, evaluations, export). Fields without
  data keep `default`."""
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


def calibrate(
  out: str, settings: dict, *, progress: bool = True, criteria: str | None = None
) -> Timing:
  """Measures this machine: a short sft and srft run (seed 0, CALIBRATION_STEPS
  steps, the study's other settings) in DIR/calibrate, sharing the study's base.
  `criteria`: as for `run_study` (DIR/calibrate/criteria.md)."""
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
    criteria=criteria,
  )
  # The calibration's overhead has fewer periodic evals than a full run's; the
  # difference is small next to compiles and the final evaluation.
  return measured_timing(cal)


BUDGET_MIN = 120  # the study (sweep included) must fit in two hours on a 2-core CPU


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
    f"(warm-up {est['warmup_s'] / 60:.1f} min, lr sweep {est.get('sweep_s', 0) / 60:.1f} min)",
    f"timing (s): {est['timing']}",
  ]
  for m, s in est["per_run_s"].items():
    lines.append(f"  {m:14s} {s:6.0f}s x {n_seeds} seeds")
  return "\n".join(lines)
