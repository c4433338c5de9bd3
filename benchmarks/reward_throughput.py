"""Reward scoring throughput: RewardScorer vs a naive in-process math-verify loop.

Scores training-like batches (128 prompts x 8 responses, each a ~1.5 kB
`<think>` trace followed by a boxed answer) with a warm `RewardScorer`, each
repeat on a fresh batch so no cache carries over, and the first batch again with
a naive sequential loop (math-verify `parse` on the whole response, `verify`
with its own alarm timeout, in this process). Prints one JSON line.

    python benchmarks/reward_throughput.py [--repeats 3] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from srft_jax import rewards  # noqa: E402

# (ground truth, equivalent forms, wrong forms): answer kinds in rough proportion
# to a math training set; integers dominate as in NuminaMath-style data.
_KINDS = [
  (0.50, lambda r: _integer_item(r)),
  (0.12, lambda r: _fraction_item(r)),
  (0.10, lambda r: _sqrt_item(r)),
  (0.06, lambda r: _interval_item(r)),
  (0.06, lambda r: _poly_item(r)),
  (0.06, lambda r: _decimal_item(r)),
  (0.10, lambda r: _mc_item(r)),
]


def _integer_item(r):
  n = r.randint(-50, 2000)
  return str(n), [str(n), f"{n}.0" if r.random() < 0.2 else str(n)], [str(n + r.randint(1, 9))]


def _fraction_item(r):
  a, b = r.randint(1, 20), r.choice([3, 7, 9, 11, 13])
  return (
    f"\\frac{{{a}}}{{{b}}}",
    [f"\\dfrac{{{a}}}{{{b}}}", f"{a}/{b}"],
    [f"\\frac{{{a + 1}}}{{{b}}}", f"\\frac{{{b}}}{{{a}}}"],
  )


def _sqrt_item(r):
  k, m = r.randint(2, 9), r.choice([2, 3, 5, 7])
  return (
    f"{k}\\sqrt{{{m}}}",
    [f"{k}\\sqrt{{{m}}}", f"\\sqrt{{{k * k * m}}}"],
    [f"{k + 1}\\sqrt{{{m}}}", f"\\sqrt{{{k * m}}}"],
  )


def _interval_item(r):
  a = r.randint(-9, 5)
  b = a + r.randint(1, 9)
  return f"[{a}, {b})", [f"[{a},{b})", f"\\left[{a}, {b}\\right)"], [f"({a}, {b})", f"[{a}, {b}]"]


def _poly_item(r):
  a, b = r.randint(2, 9), r.randint(1, 9)
  return f"{a}x^2+{b}", [f"{b}+{a}x^2", f"{a}x^{{2}}+{b}"], [f"{a}x^2-{b}", f"{a}x+{b}"]


def _decimal_item(r):
  v = r.randint(1, 999) / 100
  return f"{v}", [f"{v}", f"{v}0"], [f"{v + 0.5:.2f}"]


def _mc_item(r):
  letters = "ABCD"
  g = r.choice(letters)
  other = r.choice([c for c in letters if c != g])
  return g, [g, f"\\text{{({g})}}"], [other]


_FILLER = (
  "Let me work through this step by step. First we set up the equation and "
  "simplify both sides, checking each intermediate value carefully. "
)


def _response(answer: str | None, r: random.Random, truncated: bool = False) -> str:
  think = "<think>\n" + _FILLER * r.randint(8, 14) + "\n</think>\n"
  if answer is None:
    return think + "I am not sure about the final answer."
  tail = f"The final answer is \\boxed{{{answer}}}."
  return think + (tail[: len(tail) // 2] if truncated else tail)


def make_batch(seed: int, prompts: int = 128, group: int = 8):
  """(responses, ground_truths): `group` responses per prompt, mixed outcomes."""
  r = random.Random(seed)
  weights = [w for w, _ in _KINDS]
  responses, truths = [], []
  for _ in range(prompts):
    make = r.choices([f for _, f in _KINDS], weights)[0]
    truth, right, wrong = make(r)
    for _ in range(group):
      u = r.random()
      if u < 0.55:
        responses.append(_response(r.choice(right), r))
      elif u < 0.88:
        responses.append(_response(r.choice(wrong), r))
      elif u < 0.95:
        responses.append(_response(None, r))
      else:
        responses.append(_response(r.choice(right), r, truncated=True))
      truths.append(truth)
  return responses, truths


def naive_loop(responses, truths) -> list[bool]:
  """What a first implementation does: parse + verify each pair sequentially, in-process."""
  from math_verify import parse
  from math_verify import verify

  # The truth is boxed so math-verify reads bare LaTeX like `4\\sqrt{2}` at all.
  return [verify(parse("\\boxed{" + t + "}"), parse(resp)) for resp, t in zip(responses, truths)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workers", type=int, default=None)
  parser.add_argument("--timeout_s", type=float, default=rewards.DEFAULT_TIMEOUT_S)
  args = parser.parse_args()
  logging.getLogger("math_verify").setLevel(logging.ERROR)

  batches = [make_batch(seed) for seed in range(args.repeats)]
  n = len(batches[0][0])
  t0 = time.perf_counter()
  scorer = rewards.RewardScorer(args.workers, timeout_s=args.timeout_s).start()
  scorer.wait_ready()
  startup_s = time.perf_counter() - t0
  try:
    seconds, counts = [], None
    for responses, truths in batches:
      before = scorer.verifier_items
      t0 = time.perf_counter()
      rewards_n, outcomes = scorer.score(responses, truths, require_think=True)
      seconds.append(time.perf_counter() - t0)
      if counts is None:
        counts = rewards.outcome_counts(outcomes)
        verifier_fraction = (scorer.verifier_items - before) / n
        first_rewards = rewards_n
  finally:
    scorer.close()

  t0 = time.perf_counter()
  naive = naive_loop(*batches[0])
  naive_s = time.perf_counter() - t0
  agreement = sum(int(a) == int(b) for a, b in zip(naive, first_rewards)) / n

  median_s = statistics.median(seconds)
  print(
    json.dumps(
      {
        "benchmark": "reward_throughput",
        "responses": n,
        "workers": scorer.num_workers,
        "cpu_count": os.cpu_count(),
        "startup_s": round(startup_s, 3),
        "seconds_1024": round(median_s * 1024 / n, 4),
        "seconds_per_repeat": [round(s, 4) for s in seconds],
        "responses_per_s": round(n / median_s, 1),
        "naive_seconds_1024": round(naive_s * 1024 / n, 3),
        "speedup_vs_naive": round(naive_s / median_s, 2),
        "verifier_distinct_fraction": round(verifier_fraction, 4),
        "agreement_with_naive": round(agreement, 4),
        "outcomes": counts,
      }
    )
  )


if __name__ == "__main__":
  main()
