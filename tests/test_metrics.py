"""Training metrics: the plots' smoothing and the TensorBoard viewer a run prints."""

import json
import os
import re
import shlex
import subprocess

import matplotlib
import numpy as np
import pytest

from srft_jax import main
from srft_jax import metrics


def centred_mean(y, window):
  """The reference: a box filter over the points there are (edges averaged over fewer)."""
  box = np.ones(window)
  return np.convolve(y, box, mode="same") / np.convolve(np.ones(len(y)), box, mode="same")


@pytest.mark.parametrize("n,window", [(60, 7), (10, 3), (11, 5), (9, 9), (200, 51)])
def test_moving_average_is_a_centred_box_filter(n, window):
  y = np.random.default_rng(n).normal(size=n)
  np.testing.assert_allclose(metrics.moving_average(y, window), centred_mean(y, window))
  np.testing.assert_allclose(metrics.moving_average(y, 1), y)


def test_smoothing_window():
  assert [metrics.smoothing_window(n) for n in (3, 9, 10, 60, 100, 1000)] == [1, 1, 3, 7, 11, 51]


def _write_rows(path, rewards):
  with open(path, "w") as f:
    for step, r in enumerate(rewards):
      f.write(json.dumps({"step": step, "reward/rollout_mean": r}) + "\n")


def _drawn_lines(monkeypatch, jsonl, out_dir):
  """plot_metrics' reward figure: {label: (x, y)} of each line it drew."""
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figs = []
  monkeypatch.setattr(plt, "close", figs.append)  # keep the figures it closes
  written = metrics.plot_metrics(jsonl, out_dir, {"reward": ("reward/rollout_mean",)})
  assert written == [os.path.join(out_dir, "reward.png")] and os.path.getsize(written[0]) > 0
  (ax,) = figs[0].axes
  return {ln.get_label(): (ln.get_xdata(), ln.get_ydata()) for ln in ax.get_lines()}


def test_reward_plot_draws_the_centred_mean_over_the_raw_points(tmp_path, monkeypatch):
  rewards = np.random.default_rng(0).uniform(size=60)  # make run's 60 noisy steps
  _write_rows(tmp_path / "metrics.jsonl", rewards)
  lines = _drawn_lines(monkeypatch, str(tmp_path / "metrics.jsonl"), str(tmp_path))
  raw = lines["reward/rollout_mean (per step)"]
  smooth = lines["reward/rollout_mean (centred mean of 7 steps)"]
  np.testing.assert_allclose(raw[1], rewards)
  np.testing.assert_array_equal(smooth[0], np.arange(60))
  np.testing.assert_allclose(smooth[1], centred_mean(rewards, 7))
  assert np.std(np.diff(smooth[1])) < np.std(np.diff(rewards)) / 3  # it does smooth


def test_short_runs_plot_the_points_alone(tmp_path, monkeypatch):
  _write_rows(tmp_path / "metrics.jsonl", [0.1, 0.5, 0.2])
  lines = _drawn_lines(monkeypatch, str(tmp_path / "metrics.jsonl"), str(tmp_path))
  assert list(lines) == ["reward/rollout_mean"]


def test_the_printed_tensorboard_command_reads_the_run(tmp_path):
  """The command `make run` prints (`.venv/bin/tensorboard --logdir WORKDIR/logs/tb`)
  is installed and reads the event files the run writes."""
  writer = metrics.MetricsWriter(str(tmp_path / "logs"), enabled=True)
  for step in range(3):
    writer.write(step, {"reward/rollout_mean": 0.5})
  writer.close()
  results = {"method": "srft", "steps": 3, "wall_s": 1.0, "train_s": 1.0}
  results |= {"before": {"id_acc": 0.5, "ood_acc": None}, "after": {"id_acc": 0.6, "ood_acc": 0.1}}
  (line,) = [s for s in main.format_results(results, str(tmp_path)).splitlines() if "--logdir" in s]
  command = shlex.split(line.split("(", 1)[1].rstrip(")"))
  assert command == [main.tensorboard_command(), "--logdir", f"{tmp_path}/logs/tb"]
  out = subprocess.run(
    [*command, "--inspect"], capture_output=True, text=True, timeout=120, check=True
  ).stdout
  assert "reward/rollout_mean" in out and re.search(r"num_steps\s+3\n", out)
