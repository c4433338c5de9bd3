"""The method-comparison study: every docs/method.md §4 preset from one base, over seeds.

`python -m srft_jax.study --out DIR [--seeds 0,1,2] [--steps N] [--methods a,b] [--quick]`
`python -m srft_jax.study --out DIR --budget [--calibrate]`  (estimate the wall time from
    DIR's finished runs, or first time a short sft and srft run on this machine; prints the
    steps that fit in two hours)
`python -m srft_jax.study --out DIR --report-only`  (rewrite the report from DIR's runs)
`python -m srft_jax.study --out DIR --regime=distilled [--regime-only]`  (first choose the
    regime where the demonstrations are a teacher's, distilled, and teach what the base
    lacks: criteria (a)-(c) of docs/method.md §16 on the base, the teacher and SFT alone;
    the study then runs in it only if they are met)
`python -m srft_jax.study --out DIR --regime=distilled --methods=opd,srft_opd,grpo,srft`
    (on-policy distillation from that regime's teacher beside GRPO and SRFT; the
    report adds the steps each method needs to reach GRPO's final accuracy)

The runs (`runner`) share one warmed-up base, go seed-major and resume where a
previous invocation stopped; the report (`report`) gives accuracy, compute,
training-dynamics plots, the token-change analysis and one verdict per claim of
docs/method.md §7 under the pre-registered criteria (`claims`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax

from srft_jax.study import regime
from srft_jax.study import report
from srft_jax.study import runner

log = logging.getLogger(__name__)


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
    help="comma-separated subset of methods (default: the ten of the study; --report-only: "
    "the study's; opd and srft_opd only when named, with --regime=distilled)",
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
  p.add_argument(
    "--regime",
    choices=("teacher-style", "distilled"),
    default="teacher-style",
    help="the demonstrations: the built-in teacher style (default), or a trained "
    "teacher's distilled answers, chosen by the criteria of docs/method.md §16",
  )
  p.add_argument(
    "--regime-only", action="store_true", help="--regime=distilled: measure the criteria, stop"
  )
  p.add_argument(
    "--candidate",
    type=int,
    default=1,
    help="--regime=distilled: which candidate regime (study/regime.py CANDIDATES; "
    "each in its own --out)",
  )
  p.add_argument(
    "--exploratory",
    action="store_true",
    help="--regime=distilled: run the study in the candidate even though its criteria "
    "are not met; the report says so, and its verdicts test no claim",
  )
  p.add_argument("--no-compile-cache", action="store_true")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in (
    "absl",
    "orbax",
    "jax._src",
    "tensorflow_datasets",
    "srft_jax.job",
    "srft_jax.trainer",
  ):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  named = [m.strip() for m in (a.methods or "").split(",") if m.strip()]
  if [m for m in named if m not in runner.ALL_METHODS]:
    print(
      f"--methods: unknown {[m for m in named if m not in runner.ALL_METHODS]}; "
      f"known: {list(runner.ALL_METHODS)}",
      file=sys.stderr,
    )
    return 2
  teacher_methods = [m for m in named if m in runner.TEACHER_METHODS]
  if teacher_methods and a.regime != "distilled" and not a.report_only:
    print(
      f"--methods: {teacher_methods} distil from the distilled regime's teacher: "
      "add --regime=distilled",
      file=sys.stderr,
    )
    return 2
  if not 1 <= a.candidate <= len(regime.CANDIDATES):
    print(f"--candidate: 1 to {len(regime.CANDIDATES)}, got {a.candidate}", file=sys.stderr)
    return 2
  if a.report_only and not os.path.exists(os.path.join(a.out, "study.json")):
    print(f"--report-only: {a.out} holds no study (no study.json)", file=sys.stderr)
    return 2
  if a.report_only:  # the study's own seeds and methods (study.json) unless named
    print(
      report.write_report(
        a.out,
        seeds=[int(s) for s in a.seeds.split(",")] if a.seeds else None,
        methods=[m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None,
      )
    )
    return 0
  seeds = [
    int(s) for s in (a.seeds or ("0" if a.quick else ",".join(map(str, runner.SEEDS)))).split(",")
  ]
  methods = [m.strip() for m in (a.methods or ",".join(runner.METHODS)).split(",") if m.strip()]
  overrides = dict(_parse_override(kv) for kv in a.set)
  if str(overrides.get("multihost", False)).lower() in ("true", "1"):
    print(
      "study: runs one process on one host (its files and runs are not coordinated "
      "across processes); drop --set multihost=...",
      file=sys.stderr,
    )
    return 2
  settings = runner.study_settings(quick=a.quick, steps=a.steps, overrides=overrides)
  if not a.no_compile_cache and (a.calibrate or not a.budget):
    # Runs of different seeds (and resumed runs) reuse each other's executables.
    jax.config.update(
      "jax_compilation_cache_dir", os.path.join(os.path.abspath(a.out), "jax_cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if a.budget:
    cached = os.path.exists(os.path.join(a.out, "base", "hf", "config.json"))
    if a.calibrate:
      timing = runner.calibrate(a.out, settings, criteria=report.CRITERIA_MD)
      cached = True
    else:
      timing = runner.measured_timing(a.timing_from or a.out)
    print(
      runner.budget_text(
        runner.estimate_seconds(settings, methods, seeds, timing, base_cached=cached), len(seeds)
      )
    )
    print(
      f"steps a run that fit in {runner.BUDGET_MIN} min with this timing: "
      f"{runner.steps_that_fit(settings, methods, seeds, timing, base_cached=cached)} "
      f"(now {settings['steps']}; change with --steps)"
    )
    return 0
  if a.regime == "distilled":
    quick = regime.QUICK if a.quick else {}
    res = regime.measure(
      a.out,
      settings,
      lr_grid=runner.QUICK_LR_GRID if a.quick else runner.LR_GRID,
      teacher_overrides=quick.get("teacher"),
      distill_overrides=quick.get("distill"),
      n_val=quick.get("n_val", 300),
      candidate=a.candidate,
    )
    with open(os.path.join(a.out, "regime.md"), encoding="utf-8") as f:
      print(f.read())
    if a.regime_only:
      return 0
    if not res["verdict"]["met"]:
      if not a.exploratory:
        print(
          "the regime does not meet criteria (a)-(c): no study in it (--exploratory runs "
          "one anyway, labelled as such)",
          file=sys.stderr,
        )
        return 1
      print("the regime does not meet criteria (a)-(c): an exploratory study", file=sys.stderr)
    overrides = {
      **overrides,
      **regime.settings({}, os.path.join(a.out, "distilled"), a.candidate),
    }
    settings = runner.study_settings(quick=a.quick, steps=a.steps, overrides=overrides)
  est = runner.estimate_seconds(
    settings,
    methods,
    seeds,
    runner.measured_timing(a.out),
    base_cached=os.path.exists(os.path.join(a.out, "base", "hf", "config.json")),
  )
  log.info("%s", runner.budget_text(est, len(seeds)))
  res = runner.run_study(
    a.out,
    seeds=seeds,
    methods=methods,
    steps=a.steps,
    quick=a.quick,
    overrides=overrides,
    criteria=report.CRITERIA_MD,
    write_report=report.write_report,
  )
  if res.get("preempted"):
    print("preempted: rerun the same command to resume")
    return 0
  print(f"ran {len(res['ran'])}, skipped {len(res['skipped'])}, failed {len(res['failed'])}")
  print(f"report: {res['report']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
