"""Evaluation metrics (pure): avg@k, pass@k, multiple-choice shuffling, ID/OOD tables.

docs/method.md §6: AIME24 and AMC report avg@32 (mean accuracy over 32 samples a
problem), the other benchmarks pass@1; ID and OOD averages are unweighted means
over the benchmarks of each group; multiple-choice options are shuffled with a
fixed seed. `correct` arguments are boolean/0-1 arrays [problems, samples].
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
  name: str
  kind: str  # 'answer' (graded by math verification) | 'mc' (graded by letter)
  group: str  # 'id' | 'ood'
  k: int  # samples a problem: k > 1 reports avg@k, k == 1 reports pass@1
  title: str  # column header, as in the paper's table

  @property
  def metric(self) -> str:
    return f"avg@{self.k}" if self.k > 1 else "pass@1"


# Order is the paper's column order (docs/method.md §6); the built-in task comes last.
BENCHMARKS: dict[str, BenchmarkSpec] = {
  spec.name: spec
  for spec in (
    BenchmarkSpec("aime24", "answer", "id", 32, "AIME24"),
    BenchmarkSpec("amc", "answer", "id", 32, "AMC"),
    BenchmarkSpec("math500", "answer", "id", 1, "MATH500"),
    BenchmarkSpec("minerva", "answer", "id", 1, "Minerva"),
    BenchmarkSpec("olympiadbench", "answer", "id", 1, "Olympiad"),
    BenchmarkSpec("arc_c", "mc", "ood", 1, "ARC-C"),
    BenchmarkSpec("gpqa_diamond", "mc", "ood", 1, "GPQA-D"),
    BenchmarkSpec("mmlu_pro", "mc", "ood", 1, "MMLU-Pro"),
    BenchmarkSpec("task_id", "answer", "id", 1, "Task-ID"),
    BenchmarkSpec("task_ood", "answer", "ood", 1, "Task-OOD"),
  )
}
GROUPS = ("id", "ood")


def _as_matrix(correct) -> np.ndarray:
  """float64 [P, n] from a 0/1 array or a list of equal-length per-problem lists."""
  m = np.asarray(correct, dtype=np.float64)
  if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
    raise ValueError(f"expected [problems, samples] with both > 0, got shape {m.shape}")
  return m


def avg_at_k(correct) -> float:
  """Mean over the k samples of each problem, then over problems."""
  return float(_as_matrix(correct).mean(axis=1).mean())


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
  """Unbiased pass@k for one problem with c correct out of n samples: 1 - C(n-c,k)/C(n,k).

  Computed as a product so large n does not overflow (Chen et al., 2021).
  """
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k(correct, k: int) -> float:
  """Mean over problems of the unbiased pass@k estimate from all n samples a problem."""
  m = _as_matrix(correct)
  n = m.shape[1]
  counts = m.sum(axis=1).astype(int)
  return float(np.mean([pass_at_k_estimate(n, int(c), k) for c in counts]))


def pass_at_1(correct) -> float:
  """pass@1: the fraction correct, averaged over however many samples each problem has."""
  return pass_at_k(correct, 1)


def benchmark_score(name: str, correct) -> float:
  """The registry's metric for one benchmark: avg@k over the first k samples, or pass@1."""
  spec = BENCHMARKS[name]
  m = _as_matrix(correct)
  if spec.k > 1:
    if m.shape[1] < spec.k:
      raise ValueError(f"{name} reports avg@{spec.k} but got {m.shape[1]} samples a problem")
    return avg_at_k(m[:, : spec.k])
  return pass_at_1(m)


def shuffle_choices(
  question: str, choices: Sequence[str], answer_index: int, seed: int
) -> tuple[str, str]:
  """(prompt text with lettered options in a seeded order, letter of the right option).

  The same (choices, seed) always gives the same order; the letter follows the
  right option wherever it lands.
  """
  if not 0 <= answer_index < len(choices):
    raise ValueError(f"answer_index {answer_index} out of range for {len(choices)} choices")
  if len(choices) > 26:
    raise ValueError(f"at most 26 choices can be lettered, got {len(choices)}")
  order = list(range(len(choices)))
  random.Random(seed).shuffle(order)
  letters = string.ascii_uppercase
  lines = [f"({letters[pos]}) {choices[src]}" for pos, src in enumerate(order)]
  correct_letter = letters[order.index(answer_index)]
  return question.rstrip() + "\n\n" + "\n".join(lines), correct_letter


def group_averages(scores: Mapping[str, float]) -> dict[str, float | None]:
  """{'id': mean, 'ood': mean} over the benchmarks present; None for a group with none."""
  out: dict[str, float | None] = {}
  for group in GROUPS:
    values = [v for name, v in scores.items() if BENCHMARKS[name].group == group]
    out[group] = float(np.mean(values)) if values else None
  return out


def table_columns(benchmark_names) -> list[str]:
  """Registry-ordered columns: ID benchmarks, 'id_avg', OOD benchmarks, 'ood_avg'."""
  for name in benchmark_names:
    if name not in BENCHMARKS:
      raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
  present = set(benchmark_names)
  columns: list[str] = []
  for group in GROUPS:
    members = [n for n, s in BENCHMARKS.items() if s.group == group and n in present]
    if members:
      columns += members + [f"{group}_avg"]
  return columns


def results_table(rows: Mapping[str, Mapping[str, float]]) -> tuple[str, dict]:
  """(Markdown table, JSON-ready dict) in docs/method.md §6's layout, values in percent.

  `rows` maps a method name to {benchmark: accuracy in [0, 1]}. A group
  average is reported only when the row has every benchmark of that group in
  the table, so averages are always comparable across rows; a missing cell is
  '–' in Markdown and null in JSON.
  """
  columns = table_columns({b for scores in rows.values() for b in scores})
  json_rows: dict[str, dict[str, float | None]] = {}
  for method, scores in rows.items():
    cells: dict[str, float | None] = {}
    for col in columns:
      if col.endswith("_avg"):
        group = col[: -len("_avg")]
        members = [c for c in columns if c in BENCHMARKS and BENCHMARKS[c].group == group]
        values = [cells[m] for m in members]
        cells[col] = None if None in values else float(np.mean(values))
      else:
        cells[col] = 100.0 * scores[col] if col in scores else None
    json_rows[method] = cells

  def title(col: str) -> str:
    return col[: -len("_avg")].upper() if col.endswith("_avg") else BENCHMARKS[col].title

  def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"

  lines = [
    "| method | " + " | ".join(title(c) for c in columns) + " |",
    "|---|" + "---|" * len(columns),
  ]
  for method, cells in json_rows.items():
    lines.append(f"| {method} | " + " | ".join(fmt(cells[c]) for c in columns) + " |")
  metrics = {c: BENCHMARKS[c].metric for c in columns if c in BENCHMARKS}
  return "\n".join(lines) + "\n", {"columns": columns, "metrics": metrics, "rows": json_rows}
