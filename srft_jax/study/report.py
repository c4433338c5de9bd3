"""The study's report: DIR/report.md and DIR/summary.json from whatever runs exist.

The pre-registered criteria (CRITERIA_MD, also written to DIR/criteria.md before the
first run), ID / OOD accuracy mean ± std over seeds in the layout of the paper's main
table, compute per run, training-dynamics plots (DIR/plots/*.png, one line per method,
mean over seeds), the token-change analysis, and one verdict per claim of
docs/method.md §7.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from srft_jax.study import claims as claims_lib
from srft_jax.study import runner
from srft_jax.study.claims import C1_ENTROPY_EDGE_STEPS
from srft_jax.study.claims import C1_GRPO_ENTROPY_DROP
from srft_jax.study.claims import C1_REWARD_FRACTION
from srft_jax.study.claims import C1_SRFT_ENTROPY_BAND
from srft_jax.study.claims import C2_DIP_EVALS
from srft_jax.study.claims import C2_DIP_MARGIN
from srft_jax.study.claims import C3_SPIKE_EVALS
from srft_jax.study.claims import C3_SPIKE_FACTOR
from srft_jax.study.claims import C4_N_PROBLEMS
from srft_jax.study.claims import C4_THRESHOLD
from srft_jax.study.claims import C4_TOP_SHARE
from srft_jax.study.claims import C5_ACCURACY
from srft_jax.study.claims import fmt_num

CRITERIA_MD = f"""\
Fixed in `srft_jax/study/claims.py` before any run (also written to `criteria.md` when the study starts).

**Learning rates.** One grid, {", ".join(f"{lr:g}" for lr in runner.LR_GRID)}, is swept for each
method family (SFT only: `sft`; RL only: `grpo`; mixed: `srft`, also `srft_opd`'s; the
teacher's term alone: `opd`; only the families of the study's methods) on the `val` split, seed
{runner.SWEEP_SEED}, at the study's step count; each family takes the rate with the best final val
accuracy (ties: the smaller rate). Every method runs at its family's rate; a two-stage method runs
each stage at the rate of that stage's family. The test splits are not evaluated in the sweep.

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

# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------

CURVES = {
  "reward": ("reward/rollout_mean", "rollout reward (mean over seeds)"),
  "entropy_rollout": ("loss/entropy_rollout", "entropy on rollout tokens"),
  "entropy_demo": ("loss/entropy_demo", "entropy on demonstration tokens"),
  "probe_entropy": ("probe/entropy", "probe entropy (32 fixed demos, teacher forced)"),
  "response_length": ("rollout/length_mean", "rollout length (tokens)"),
  "eval_id": ("eval/task_id", "periodic ID accuracy (greedy)"),
}


def plot_curves(
  runs: dict[str, list[runner.Run]], plot_dir: str, switch: int | None = None
) -> list[str]:
  """One PNG per curve, one line per method (mean over seeds)."""
  import matplotlib  # noqa: PLC0415 (heavy; only the report draws)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (after selecting the Agg backend)

  os.makedirs(plot_dir, exist_ok=True)
  written = []
  for name, (key, title) in CURVES.items():
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for i, (method, rs) in enumerate(runs.items()):
      curve = claims_lib.mean_curve(rs, key)
      if curve:
        style = "--" if method in runner.TWO_STAGE_METHODS else "-"
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


# ----------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------


def _pct(m: float, s: float) -> str:
  if not math.isfinite(m):
    return "–"
  return f"{100 * m:.1f} ± {100 * s:.1f}" if math.isfinite(s) else f"{100 * m:.1f}"


def accuracy_table(out: str, runs: dict[str, list[runner.Run]]) -> tuple[str, dict]:
  """Markdown in the paper's main-table layout (one benchmark per group on the
  built-in task, so each group average is that benchmark), mean ± std over seeds."""
  acc = claims_lib.accuracy
  js = {}
  before = {}
  cache = os.path.join(out, "base", "eval_before.json")
  if os.path.exists(cache):
    with open(cache) as f:
      before = json.load(f)["accuracy"]  # job.run's cache: {"key", "accuracy"}
  lines = ["| method | Task-ID | ID | Task-OOD | OOD | seeds |", "|---|---|---|---|---|---|"]
  if before:
    i, o = before.get("task_id"), before.get("task_ood")
    lines.append(
      f"| base | {_pct(i, float('nan'))} | {_pct(i, float('nan'))} | "
      f"{_pct(o, float('nan'))} | {_pct(o, float('nan'))} | – |"
    )
    js["base"] = {"id": i, "ood": o}
  for method, rs in runs.items():
    im, isd, n = claims_lib.mean_std([acc(r, "id") for r in rs])
    om, osd, _ = claims_lib.mean_std([acc(r, "ood") for r in rs])
    lines.append(
      f"| {method} | {_pct(im, isd)} | {_pct(im, isd)} | {_pct(om, osd)} | {_pct(om, osd)} | {n} |"
    )
    js[method] = {
      "id_mean": im,
      "id_std": isd,
      "ood_mean": om,
      "ood_std": osd,
      "n": n,
      "id_per_seed": {r.seed: acc(r, "id") for r in rs},
      "ood_per_seed": {r.seed: acc(r, "ood") for r in rs},
    }
  return "\n".join(lines) + "\n", js


def levels_table(out: str, runs: dict[str, list[runner.Run]]) -> tuple[str, dict]:
  """Final greedy accuracy (%) by difficulty level of Task-ID, and Task-OOD, mean
  over seeds: where each method gains (results.json's `levels`)."""
  before = {}
  cache = os.path.join(out, "base", "eval_before.json")
  if os.path.exists(cache):
    with open(cache) as f:
      before = json.load(f).get("levels", {})
  rows: dict[str, dict[str, float]] = {}
  if before:
    rows["base"] = {
      **{f"L{k}": v for k, v in before.get("task_id", {}).items()},
      "OOD": next(iter(before.get("task_ood", {}).values()), float("nan")),
    }
  for method, rs in runs.items():
    cells: dict[str, list[float]] = {}
    for r in rs:
      lv = (r.results.get("after") or {}).get("levels") or {}
      for k, v in lv.get("task_id", {}).items():
        cells.setdefault(f"L{k}", []).append(v)
      for v in lv.get("task_ood", {}).values():
        cells.setdefault("OOD", []).append(v)
    if cells:
      rows[method] = {k: float(np.mean(v)) for k, v in cells.items()}
  if not rows:
    return "_no accuracy by level in these runs' results_\n", {}
  cols = sorted({c for r in rows.values() for c in r if c != "OOD"}) + ["OOD"]
  lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  for method, r in rows.items():
    lines.append(
      f"| {method} | " + " | ".join(_pct(r.get(c, float("nan")), float("nan")) for c in cols) + " |"
    )
  return "\n".join(lines) + "\n", rows


def reach_table(
  runs: dict[str, list[runner.Run]], reference: str = "grpo", key: str = "eval/task_id"
) -> tuple[str, dict]:
  """The optimizer steps each method needs to reach `reference`'s final accuracy
  on the periodic evaluations (`key`, the same problems at every evaluation).
  The target is the reference's last evaluation, mean over its seeds; a method
  reaches it at the first evaluated step where its seed-mean curve is at or above
  it (each seed's own first step too). The mean curve holds only the steps
  evaluated on all of the method's seeds."""
  ref = runs.get(reference) or []
  finals = [r.series(key)[max(r.series(key))] for r in ref if r.series(key)]
  if not finals:
    return f"_no periodic evaluations of {reference} in these runs_\n", {}
  target = float(np.mean(finals))
  js: dict[str, Any] = {"reference": reference, "key": key, "target": target, "methods": {}}
  lines = [
    f"| method | steps to reach {100 * target:.1f}% (seed mean) | per seed | final (seed mean) |",
    "|---|---|---|---|",
  ]
  for method, rs in runs.items():
    curves = [r.series(key) for r in rs if r.series(key)]
    if not curves:
      continue
    common = sorted(set.intersection(*(set(c) for c in curves)))
    mean = {st: float(np.mean([c[st] for c in curves])) for st in common}
    first = next((st for st in common if mean[st] >= target - 1e-9), None)
    per_seed = {
      r.seed: next((st for st, v in r.series(key).items() if v >= target - 1e-9), None)
      for r in rs
      if r.series(key)
    }
    final = mean[common[-1]] if common else float("nan")
    js["methods"][method] = {"steps": first, "per_seed": per_seed, "final": final}
    seeds_md = ", ".join(f"{'–' if v is None else v}" for v in per_seed.values())
    lines.append(
      f"| {method} | {'not reached' if first is None else first} | {seeds_md} | "
      f"{_pct(final, float('nan'))} |"
    )
  return "\n".join(lines) + "\n", js


def compute_table(
  runs: dict[str, list[runner.Run]], n_params: int | None, prompt_width: int
) -> tuple[str, dict]:
  lines = [
    "| method | tokens sampled | tokens trained | prompt tokens prefilled | FLOPs | "
    "train time (s) |",
    "|---|---|---|---|---|---|",
  ]
  js = {}
  for method, rs in runs.items():
    cs = [claims_lib.run_compute(r, n_params or 0, prompt_width) for r in rs]
    agg = {k: claims_lib.mean_std([c[k] for c in cs]) for k in cs[0]}
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
  fmt = lambda xs: " / ".join(fmt_num(x, "{:.2f}") for x in xs)  # noqa: E731
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


def sweep_table(out: str) -> tuple[str, dict]:
  """The learning-rate sweep (DIR/sweep/chosen.json) as Markdown: val accuracy by rate."""
  path = os.path.join(out, "sweep", "chosen.json")
  if not os.path.exists(path):
    return "No sweep in this study (every run at `optim.lr`).\n", {}
  with open(path) as f:
    chosen = json.load(f)
  rates = sorted({float(k) for v in chosen.values() for k in v["val"]})
  head = " | ".join(f"lr {lr:g}" for lr in rates)
  lines = [f"| family (method swept) | {head} | chosen |", "|---|" + "---|" * (len(rates) + 1)]
  for family, v in chosen.items():
    cells = " | ".join(_pct(v["val"].get(f"{lr:g}", float("nan")), float("nan")) for lr in rates)
    lines.append(f"| {family} (`{v['method']}`) | {cells} | **{v['lr']:g}** |")
  return "\n".join(lines) + "\n", chosen


def regime_line(runs: dict[str, list[runner.Run]]) -> str:
  """The base policy's RL signal, read off GRPO's first step (rollouts of the base)."""
  first = [r.steps.get(0, {}) for r in runs.get("grpo", [])]
  first = [x for x in first if "reward/rollout_mean" in x]
  if not first:
    return ""
  reward = sum(x["reward/rollout_mean"] for x in first) / len(first)
  same = [x["reward/rollout_group_allsame"] for x in first if "reward/rollout_group_allsame" in x]
  mixed = (
    f", {100 * (1 - sum(same) / len(same)):.0f}% of its groups of rollouts mixed" if same else ""
  )
  return (
    f"At GRPO's first step the base's sampled rollouts are right {100 * reward:.0f}% of the "
    f"time{mixed} (mean over seeds): RL has a signal from the start.\n"
  )


def regime_section(out: str) -> str:
  """The distilled regime's criteria (docs/method.md §16), headed by whether
  they were met: a study in a regime that failed them (`--exploratory`) is
  labelled so. Empty in the teacher-style regime."""
  if not os.path.exists(os.path.join(out, "regime.md")):
    return ""
  with open(os.path.join(out, "regime.md"), encoding="utf-8") as f:
    body = f.read()
  met = True
  if os.path.exists(os.path.join(out, "regime.json")):
    with open(os.path.join(out, "regime.json"), encoding="utf-8") as f:
      met = json.load(f)["verdict"]["met"]
  head = (
    "### The regime, chosen before any RL or mixed run"
    if met
    else "### The regime: its criteria are not met, so this study is exploratory "
    "(`--exploratory`; its verdicts test no claim)"
  )
  return f"{head}\n\n{body}\n"


def _claim_md(c: dict) -> str:
  lines = [f"#### Claim {c['claim']}: {c['title']} — **{c['verdict']}**", ""]
  if c["missing"]:
    lines += [f"Missing: {', '.join(c['missing'])}.", ""]
  for p in c["parts"]:
    nums = []
    for k in ("mean", "se", "n", "margin", "srft", "grpo", "initial", "final", "ratio"):
      if k in p and p[k] is not None:
        nums.append(f"{k} = {fmt_num(p[k]) if isinstance(p[k], float) else p[k]}")
    if "per_seed" in p:
      nums.append("per seed = [" + ", ".join(fmt_num(x) for x in p["per_seed"]) + "]")
    if p.get("note"):
      nums.append(p["note"])
    lines.append(f"- {p['part']}: **{p['verdict']}** ({'; '.join(nums) or 'no data'})")
    for s in p.get("seeds", []):
      lines.append(
        f"  - seed {s['seed']}: at switch {fmt_num(s['at_switch'])}, max after "
        f"{fmt_num(s['max_after'])}, final {fmt_num(s['final'])}"
      )
  if c.get("limits"):
    lines.append(f"- Limits of this test (descriptive, not part of the verdict): {c['limits']}.")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------


def write_report(
  out: str, *, seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None
) -> str:
  """DIR/report.md and DIR/plots/*.png from whatever runs exist."""
  with open(os.path.join(out, "study.json")) as f:
    info = json.load(f)
  seeds = list(seeds if seeds is not None else info["seeds"])
  methods = list(methods if methods is not None else info["methods"])
  settings = info["settings"]
  runs = runner.load_runs(out, methods, seeds)
  tc = claims_lib.token_change_analysis(out, seeds, settings)
  claims = claims_lib.claim_verdicts(runs, tc)
  switch = runner.switch_step(settings)
  plots = plot_curves(runs, os.path.join(out, "plots"), switch=switch)
  n_params = claims_lib.base_num_params(out)
  width = max(settings.get("data.prompt_buckets") or [64])
  acc_md, acc_js = accuracy_table(out, runs)
  lv_md, lv_js = levels_table(out, runs)
  regime_md = regime_section(out)
  sweep_md, sweep_js = sweep_table(out)
  comp_md, comp_js = compute_table(runs, n_params, width)
  reach_md, reach_js = reach_table(runs) if len(runs) > 1 and "grpo" in runs else ("", {})
  if reach_md:
    reach_md = (
      "### Steps to reach GRPO's final accuracy\n\n"
      f"Periodic greedy evaluations (every {settings.get('eval.every')} steps, the same "
      f"{settings.get('eval.every_n')} Task-ID problems each time); the target is GRPO's last "
      "one, mean over seeds. Per seed: the first step that seed's own curve reaches it "
      "(– = never).\n\n" + reach_md + "\n"
    )
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
    f"""# SRFT at small scale: method comparison (docs/method.md §4, §6, §7)

Generated by `python -m srft_jax.study --out {out}`{quick_note};
{n_runs} finished runs of {len(methods)} methods × {len(seeds)} seed(s); total run wall time
{run_s / 60:.1f} min (excluding the shared warm-up). Built-in reasoning task, tiny model
({fmt_num(n_params, "{:,}")} parameters), every method from the same warmed-up base
(`DIR/base`), {settings["steps"]} optimizer steps each (two-stage methods switch at step {switch}).
Seed s fixes the data order, rollout sampling and evaluation of every method at seed s.
Training problems have 1-3 steps (Task-ID likewise, Task-OOD 4); demonstrations are in the
`{settings.get("data.demo_style", "terse")}` style (the base was warmed up on the terse one).
{regime_line(runs)}{failed_note}

## Pre-registered criteria

{CRITERIA_MD}
## Results

{regime_md}### Learning rates (final val accuracy of the sweep, greedy, %)

{sweep_md}
### Verdicts

| # | claim | verdict |
|---|---|---|
{verdict_md}

### Accuracy (greedy, %, mean ± std over seeds)

Layout of the paper's main table (docs/method.md §6): the built-in task has one in-distribution
split (Task-ID, {settings["eval.n_id"]} problems) and one out-of-distribution split (Task-OOD,
{settings["eval.n_ood"]} problems), so each group average equals its one benchmark.

{acc_md}
### Accuracy by difficulty level (greedy, %, mean over seeds)

Task-ID's levels (steps a problem) and Task-OOD (4 steps): where each method gains.

{lv_md}
{reach_md}### Compute per run (mean over seeds)

{claims_lib.FLOPS_FORMULA}

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
        "levels": lv_js,
        "sweep": sweep_js,
        "compute": comp_js,
        "reach": reach_js,
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
