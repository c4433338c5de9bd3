"""The study's statistics and verdicts: the pre-registered criteria (docs/method.md §7) as
constants, means over seeds, the decision rule on per-seed differences, one verdict per claim,
the token-change analysis (claim 4) and the compute of a run.

Every comparison is a per-seed difference d_s (methods paired by seed). Its
verdict: "holds" if mean(d) - margin > SE, "does not hold" if mean(d) - margin
< -SE, else "inconclusive"; SE = sd(d, ddof=1) / sqrt(n) over seeds (0 with
one seed, which the report flags). A claim with several parts holds if every
part holds, does not hold if any part does not hold, else is inconclusive.
The criteria are fixed before any run; the report prints them before the numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from srft_jax import factory
from srft_jax import hf
from srft_jax import peft as peft_lib
from srft_jax import token_change as tc
from srft_jax.data import task
from srft_jax.study import runner

# ----------------------------------------------------------------------------
# Pre-registered criteria (docs/method.md §7)
# ----------------------------------------------------------------------------
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

# The regime where demonstrations carry what the base lacks (docs/method.md §16),
# chosen before any RL or mixed run from the base, the teacher and SFT alone, on
# the hardest training level and the `val` split:
REGIME_BASE_MAX = 0.10  # (a) the base's sampled success <= 10%: RL alone has little signal
REGIME_TEACHER_MIN = 0.70  # (b) the teacher's pass@1 (sampled) >= 70%
REGIME_SFT_GAIN = 0.10  # (c) SFT alone on the distilled demos: greedy accuracy +10 points
REGIME_SAMPLES = 8  # samples a problem for (a) and (b), at the rollout temperature

FLOPS_FORMULA = (
  "FLOPs ≈ 6·N·tokens_trained + 2·N·(tokens_sampled + prompt_tokens_prefilled); "
  "N = parameters incl. embeddings; tokens_trained = response tokens of every "
  "trained row (rollouts and demonstrations); tokens_sampled = generated tokens; "
  "prompt_tokens_prefilled = rollout rows × the padded prompt width (largest "
  "bucket). Prompt positions of trained rows and all evaluation are not counted."
)


def fmt_num(x, fmt="{:.3f}") -> str:
  """`x` formatted, or "–" for None and non-finite floats."""
  return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


# ----------------------------------------------------------------------------
# Means over seeds, compute
# ----------------------------------------------------------------------------


def mean_std(xs) -> tuple[float, float, int]:
  xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
  if not xs:
    return float("nan"), float("nan"), 0
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan"), len(xs)


def mean_curve(runs: Sequence[runner.Run], key: str) -> dict[int, float]:
  """Mean over seeds at the steps every seed logged."""
  series = [r.series(key) for r in runs]
  series = [s for s in series if s]
  if not series:
    return {}
  common = sorted(set.intersection(*(set(s) for s in series)))
  return {t: float(np.mean([s[t] for s in series])) for t in common}


def run_compute(run: runner.Run, n_params: int, prompt_width: int) -> dict[str, float]:
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
  path = os.path.join(out, "base", "hf")
  if not os.path.exists(os.path.join(path, "config.json")):
    return None
  return hf.config_from_hf(hf.read_config(path)).num_params()


# ----------------------------------------------------------------------------
# Verdicts (pure)
# ----------------------------------------------------------------------------

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


def verdict(diffs: Sequence[float], margin: float = 0.0) -> tuple[str, dict]:
  """The pre-registered decision rule on per-seed differences (see report.CRITERIA_MD)."""
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


def paired_diffs(runs: dict[str, list[runner.Run]], a: str, b: str, fn) -> list[float]:
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


def accuracy(run: runner.Run, split: str) -> float | None:
  """The run's final accuracy on `split` ("id" or "ood"); None if it has none."""
  return (run.results.get("after") or {}).get(f"{split}_acc")


def _acc_mean(run: runner.Run) -> float | None:
  i, o = accuracy(run, "id"), accuracy(run, "ood")
  return None if i is None or o is None else (i + o) / 2


def _early_reward(run: runner.Run) -> float | None:
  steps = int(run.results.get("steps", 0))
  s = run.series("reward/rollout_mean")
  vals = [v for t, v in s.items() if t < max(1, int(steps * C1_REWARD_FRACTION))]
  return float(np.mean(vals)) if vals else None


def _entropy_ratio(
  runs: Sequence[runner.Run],
) -> tuple[float | None, float | None, float | None]:
  curve = mean_curve(runs, "loss/entropy_rollout")
  if len(curve) < 2 * C1_ENTROPY_EDGE_STEPS:
    return None, None, None
  vals = [curve[t] for t in sorted(curve)]
  first = float(np.mean(vals[:C1_ENTROPY_EDGE_STEPS]))
  last = float(np.mean(vals[-C1_ENTROPY_EDGE_STEPS:]))
  return first, last, (last / first if first > 0 else None)


def _evals_around_switch(run: runner.Run, key: str, k: int) -> tuple[float | None, list[float]]:
  """(value at the switch step, values of the next k periodic evals)."""
  half = int(run.results.get("steps", 0)) // 2
  s = run.series(key)
  after = [s[t] for t in sorted(s) if t > half][:k]
  return s.get(half), after


def regime_verdict(
  level: str,
  base_sampled: dict[str, float],
  teacher_pass1: dict[str, float],
  sft_before: dict[str, float],
  sft_after: dict[str, float],
) -> dict[str, Any]:
  """Whether a regime meets the pre-registered criteria (a)-(c) on difficulty
  `level` (accuracies by level, in [0, 1]): {"level", "criteria": [(a), (b),
  (c) each with its value, threshold and whether it holds], "met": all hold}.
  A missing figure fails its criterion."""

  def get(d, k):
    v = d.get(k)
    return None if v is None else float(v)

  base, teacher = get(base_sampled, level), get(teacher_pass1, level)
  before, after = get(sft_before, level), get(sft_after, level)
  gain = None if before is None or after is None else after - before
  criteria = [
    {
      "name": "a",
      "what": f"base sampled success on level {level} <= {REGIME_BASE_MAX:.0%}",
      "value": base,
      "holds": base is not None and base <= REGIME_BASE_MAX,
    },
    {
      "name": "b",
      "what": f"teacher pass@1 on level {level} >= {REGIME_TEACHER_MIN:.0%}",
      "value": teacher,
      "holds": teacher is not None and teacher >= REGIME_TEACHER_MIN,
    },
    {
      "name": "c",
      "what": f"SFT alone raises level {level}'s greedy accuracy by >= "
      f"{100 * REGIME_SFT_GAIN:.0f} points",
      "value": gain,
      "before": before,
      "after": after,
      "holds": gain is not None and gain >= REGIME_SFT_GAIN - 1e-9,
    },
  ]
  return {"level": level, "criteria": criteria, "met": all(c["holds"] for c in criteria)}


def regime_md(v: dict[str, Any]) -> str:
  """The regime's figures and verdicts as a Markdown table."""
  lines = [
    f"Regime criteria on level {v['level']}: **{'met' if v['met'] else 'not met'}**",
    "",
    "| criterion | figure | holds |",
    "|---|---|---|",
  ]
  for c in v["criteria"]:
    fig = fmt_num(c["value"], "{:+.3f}" if c["name"] == "c" else "{:.3f}")
    if c["name"] == "c":
      fig += f" ({fmt_num(c['before'])} -> {fmt_num(c['after'])})"
    lines.append(f"| ({c['name']}) {c['what']} | {fig} | {'yes' if c['holds'] else 'no'} |")
  return "\n".join(lines) + "\n"


def claim_verdicts(runs: dict[str, list[runner.Run]], token_change: dict | None) -> list[dict]:
  """The five claims of docs/method.md §7 under the pre-registered criteria."""
  claims = []

  def missing(*names):
    return [n for n in names if n not in runs]

  # 1. Reward rises faster; entropy stable for SRFT, falling for GRPO.
  miss = missing("srft", "grpo")
  v_a, i_a = verdict(paired_diffs(runs, "srft", "grpo", _early_reward))
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
  v_a, i_a = verdict(
    paired_diffs(runs, "sft_plus_rl", "sft_then_grpo", lambda r: accuracy(r, "id"))
  )
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
      "after the switch (recovery), per seed = [" + ", ".join(fmt_num(x) for x in recovery) + "]",
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
  tcr = token_change or {}
  per_seed = tcr.get("per_seed", {})
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
      "sft's own top-quartile share, per seed = [" + ", ".join(fmt_num(x) for x in sft_share) + "]",
    }
  )

  # 5. Each ablation lowers accuracy.
  parts, miss = [], missing("srft", "srft_no_wsft", "srft_no_wrl")
  for abl in ("srft_no_wsft", "srft_no_wrl"):
    v, i = verdict(paired_diffs(runs, "srft", abl, _acc_mean))
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
  cache = os.path.join(out, "token_change.json")
  tuned = {
    (m, s): os.path.join(runner.run_dir(out, m, s), "export", "hf")
    for m in ("sft", "grpo")
    for s in seeds
  }
  tuned = {k: p for k, p in tuned.items() if os.path.exists(os.path.join(p, "config.json"))}
  base_hf = os.path.join(out, "base", "hf")
  if not tuned or not os.path.exists(os.path.join(base_hf, "config.json")):
    return {}
  # Keyed by each policy's results.json time, so a redone run is analysed again.
  key = sorted(
    f"{m}/{s}@{os.path.getmtime(os.path.join(runner.run_dir(out, m, s), 'results.json')):.0f}"
    for m, s in tuned
    if runner.finished(out, m, s)
  )
  if os.path.exists(cache):
    with open(cache) as f:
      prev = json.load(f)
    if prev.get("runs") == key:
      return prev
  spec = runner.run_spec("sft", runner.BASE_SEED, out, settings)
  tokenizer = factory.tokenizer(spec, out)
  # The demonstrations in the style the runs trained on (data.demo_style).
  n = max(spec.eval.n_id, C4_N_PROBLEMS)
  rows = task.generate("test_id", n, spec.data.task_seed, spec.data.demo_style)[:C4_N_PROBLEMS]
  tokens, mask, resp = tc.demo_batch(tokenizer, rows, template=spec.data.template)
  base = hf.load_model(base_hf)
  result: dict[str, Any] = {
    "runs": key,
    "n_problems": len(rows),
    "threshold": C4_THRESHOLD,
    "per_seed": {},
  }
  for (m, s), path in sorted(tuned.items()):
    peft = os.path.join(os.path.dirname(path), "peft")
    if os.path.exists(os.path.join(peft, peft_lib.PEFT_CONFIG)):  # LoRA: base = adapters off
      policy = peft_lib.load_peft_adapter(peft, hf.load_model(base_hf))
      res = tc.token_change(None, policy, tokens, mask, resp, threshold=C4_THRESHOLD)
    else:
      res = tc.token_change(base, hf.load_model(path), tokens, mask, resp, threshold=C4_THRESHOLD)
    result["per_seed"].setdefault(str(s), {})[m] = res
  with open(cache, "w") as f:
    json.dump(result, f, indent=2)
  return result
