"""The distilled regime's pre-registered criteria (srft_jax/study/claims.py,
docs/method.md §16) and the code that measures them (srft_jax/study/regime.py)."""

import json
import os
import subprocess
import sys

import pytest

from srft_jax.study import claims
from srft_jax.study import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _verdict(base, teacher, before, after, level="3"):
  return claims.regime_verdict(
    level, {level: base}, {level: teacher}, {level: before}, {level: after}
  )


def test_regime_criteria_on_hand_made_figures():
  v = _verdict(0.05, 0.8, 0.1, 0.3)
  assert v["met"] and [c["holds"] for c in v["criteria"]] == [True, True, True]
  assert v["criteria"][2]["value"] == pytest.approx(0.2)
  # Each criterion fails alone, at its threshold's edge.
  assert [c["holds"] for c in _verdict(0.11, 0.8, 0.1, 0.3)["criteria"]] == [False, True, True]
  assert [c["holds"] for c in _verdict(0.10, 0.69, 0.1, 0.3)["criteria"]] == [True, False, True]
  assert [c["holds"] for c in _verdict(0.10, 0.70, 0.1, 0.19)["criteria"]] == [True, True, False]
  assert _verdict(0.10, 0.70, 0.1, 0.2)["met"]  # the edges hold: <= 10%, >= 70%, >= 10 points
  # A figure that is missing (no demonstrations: no SFT run) fails its criterion.
  v = claims.regime_verdict("3", {"3": 0.0}, {"3": 0.9}, {}, {})
  assert [c["holds"] for c in v["criteria"]] == [True, True, False] and not v["met"]
  # Another level's figures do not count.
  assert not claims.regime_verdict("3", {"2": 0.0}, {"3": 0.9}, {"3": 0.0}, {"3": 0.5})["met"]
  md = claims.regime_md(_verdict(0.05, 0.8, 0.1, 0.3))
  assert "**met**" in md and "| (c) SFT alone raises level 3's greedy accuracy" in md
  assert "+0.200 (0.100 -> 0.300)" in md


def test_candidates_differ_only_in_the_base_and_are_checked():
  from srft_jax.study import regime

  one, two = (regime.settings({"steps": 7}, "/d", k) for k in (1, 2))
  assert (one["warmup.task_levels"], two["warmup.task_levels"]) == ((1,), (1, 2))
  assert {k: v for k, v in one.items() if k != "warmup.task_levels"} == {
    k: v for k, v in two.items() if k != "warmup.task_levels"
  }
  assert one["data.task_levels"] == (1, 2, 3) and one["steps"] == 7
  with pytest.raises(ValueError, match="--candidate"):
    regime.settings({}, "/d", len(regime.CANDIDATES) + 1)
  res = subprocess.run(
    [sys.executable, "-m", "srft_jax.study", "--out", "/nonexistent", "--candidate=9"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 2 and "--candidate: 1 to 3, got 9" in res.stderr


def test_finished_demonstrations_are_reused(tmp_path):
  """A finished distillation (its summary in DIR/distilled/distill/) is reused as
  it is, by its own DIR or through another candidate's link, never rerun."""
  from srft_jax.study import regime

  work = tmp_path / "distilled" / "distill"
  work.mkdir(parents=True)
  (work / "distill_summary.json").write_text(json.dumps({"kept": 5, "pass@1": 0.9}))
  got = regime.ensure_demos(str(tmp_path), str(tmp_path / "no_teacher"), {}, {})
  assert got == {"kept": 5, "pass@1": 0.9}


@pytest.mark.slow
def test_regime_is_measured_on_a_tiny_configuration(tmp_path):
  """`--regime=distilled --regime-only --quick`: the base (warmed up on level
  1 only), the teacher and its distillation, the sampled success by level of
  both on `val`, and the verdict, written to DIR/regime.json and regime.md.
  A 6-step teacher solves nothing: (b) and (c) fail, the study does not start."""
  out = tmp_path / "study"
  res = subprocess.run(
    [sys.executable, "-m", "srft_jax.study", "--out", str(out), "--quick"]
    + ["--regime=distilled", "--regime-only"],
    cwd=ROOT,
    env=dict(os.environ, XLA_FLAGS=""),  # one CPU device, as on a laptop
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  r = json.loads((out / "regime.json").read_text())
  assert set(r["base_sampled"]) == set(r["teacher_sampled"]) == {"1", "2", "3"}
  assert all(0.0 <= x <= 1.0 for x in r["base_sampled"].values())
  names = [c["name"] for c in r["verdict"]["criteria"]]
  assert names == ["a", "b", "c"] and r["verdict"]["level"] == "3"
  a, b, c = r["verdict"]["criteria"]
  assert a["value"] == r["base_sampled"]["3"] and a["holds"] == (a["value"] <= 0.10)
  assert b["value"] == r["teacher_sampled"]["3"]
  assert r["distill"]["kept"] == 0 and not c["holds"] and not r["verdict"]["met"]
  assert r["settings"]["warmup.task_levels"] == [1]
  # The base was warmed up on level 1 only (its cached settings say so).
  meta = json.loads((out / "base" / "hf" / "srft_warmup.json").read_text())
  assert meta["task"]["levels"] == [1]
  assert "Regime criteria on level 3: **not met**" in res.stdout
  assert (out / "regime.md").read_text() in res.stdout
  assert (out / "teacher" / "export" / "hf" / "config.json").exists()


def test_report_labels_a_study_whose_regime_failed_its_criteria(tmp_path):
  """The report's regime section: none in the teacher-style regime; headed as
  chosen in advance when the criteria were met, as exploratory when not."""
  assert report.regime_section(str(tmp_path)) == ""
  (tmp_path / "regime.md").write_text("criteria table\n")
  for met, head in ((True, "chosen before any RL"), (False, "this study is exploratory")):
    (tmp_path / "regime.json").write_text(json.dumps({"verdict": {"met": met}}))
    got = report.regime_section(str(tmp_path))
    assert got.startswith("### The regime") and head in got.splitlines()[0]
    assert "criteria table" in got
