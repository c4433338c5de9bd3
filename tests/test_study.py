"""The comparison study: orchestration on a two-method, one-seed,
few-step miniature (results files, skip of finished runs, resume of an
unfinished one, report with verdicts), the verdict rule, the budget estimate,
and the token-change analysis on a hand-made pair of models.
"""

import copy
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from srft_jax import model as model_lib
from srft_jax import token_change as tc
from srft_jax.study import __main__ as study_cli
from srft_jax.study import claims
from srft_jax.study import report
from srft_jax.study import runner

# The miniature: tiny model, 2 warm-up steps, 2 steps a run; the rows of a
# mini-batch (8 prompts) divide the 8 forced CPU devices.
MINI = {
  "model.embed_dim": 32,
  "model.num_layers": 1,
  "model.mlp_dim": 64,
  "warmup.steps": 2,
  "warmup.prompts_per_step": 8,
  "steps": 2,
  "batch.prompts_per_step": 8,
  "batch.minibatches": 1,
  "rollout.n_rollouts": 3,
  "data.max_response_len": 64,
  "data.task_train_size": 200,
  "eval.n_id": 8,
  "eval.n_ood": 8,
  "eval.batch_size": 8,
  "eval.every": 1,
  "eval.every_n": 8,
  "checkpoint.every": 1,
  "checkpoint.keep": 3,
  "checkpoint.export_hf": True,
}
METHODS = ("sft", "grpo")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("study"))
  first = _run_study(out)
  return {"out": out, "first": first}


def _run_study(out):
  return runner.run_study(
    out,
    seeds=[0],
    methods=METHODS,
    overrides=MINI,
    progress=False,
    criteria=report.CRITERIA_MD,
    write_report=report.write_report,
    lr_grid=(1e-3,),  # the sweep runs (one rate a family), nothing to compare
  )


def _results(out, method, seed=0):
  with open(os.path.join(runner.run_dir(out, method, seed), "results.json")) as f:
    return json.load(f)


def _events(out):
  with open(os.path.join(out, "study_log.jsonl")) as f:
    return [json.loads(x) for x in f if x.strip()]


@pytest.mark.slow
def test_study_writes_runs_and_report(mini):
  out, first = mini["out"], mini["first"]
  assert sorted(first["ran"]) == [("grpo", 0), ("sft", 0)] and not first["failed"]
  # One shared base, every run from it, same steps.
  assert os.path.exists(os.path.join(out, "base", "hf", "config.json"))
  assert os.path.exists(os.path.join(out, "criteria.md"))
  for m in METHODS:
    r = _results(out, m)
    assert r["steps"] == 2 and r["method"] == m
    assert 0.0 <= r["after"]["id_acc"] <= 1.0 and 0.0 <= r["after"]["ood_acc"] <= 1.0
    assert os.path.exists(os.path.join(runner.run_dir(out, m, 0), "export", "hf", "config.json"))
  # The sweep ran each family the methods train with once on `val` (not on the
  # test splits; `mixed` is no family of sft or grpo), and the runs train at its rate.
  chosen = json.load(open(os.path.join(out, "sweep", "chosen.json")))
  assert {f: v["lr"] for f, v in chosen.items()} == {"sft": 1e-3, "rl": 1e-3}
  assert not os.path.exists(runner.sweep_dir(out, "mixed", 1e-3))
  for family in ("sft", "rl"):
    with open(os.path.join(runner.sweep_dir(out, family, 1e-3), "results.json")) as f:
      after = json.load(f)["after"]
    assert after["id_acc"] is None and after["ood_acc"] is None
    assert 0.0 <= after["val_acc"] <= 1.0
  rows = [
    json.loads(x)
    for x in open(os.path.join(runner.run_dir(out, "grpo", 0), "logs", "metrics.jsonl"))
  ]
  assert [r["optim/lr"] for r in rows if "optim/lr" in r] == pytest.approx([1e-3, 1e-3])
  # The GRPO-only run puts every slot on rollouts (3 + 1).
  cfg = runner.run_spec("grpo", 0, out, runner.study_settings(overrides=MINI))
  assert cfg.rollout.n_rollouts == 4 and cfg.seed == 0
  assert cfg.warmup.dir == os.path.join(out, "base")

  with open(first["report"]) as f:
    md = f.read()
  assert "| sft (`sft`) |" in md and "| **0.001** |" in md  # the sweep's table
  # Criteria come before the numbers; every claim has a verdict.
  assert md.index("Pre-registered criteria") < md.index("## Results")
  # Accuracy by difficulty level: each method's final Task-ID levels (results.json).
  levels = json.load(open(os.path.join(out, "summary.json")))["levels"]
  res = json.load(open(os.path.join(runner.run_dir(out, "grpo", 0), "results.json")))
  want = {f"L{k}": v for k, v in res["after"]["levels"]["task_id"].items()}
  assert {k: v for k, v in levels["grpo"].items() if k != "OOD"} == pytest.approx(want)
  assert "### Accuracy by difficulty level" in md and "| grpo |" in md
  for k in range(1, 6):
    assert f"#### Claim {k}:" in md
  summary = json.load(open(os.path.join(out, "summary.json")))
  verdicts = {c["claim"]: c["verdict"] for c in summary["claims"]}
  assert set(verdicts.values()) <= {"holds", "does not hold", "inconclusive"}
  # Claims needing missing methods are inconclusive, and say which are missing.
  for k in (2, 3, 5):
    assert verdicts[k] == "inconclusive"
  assert "sft_then_grpo" in next(c for c in summary["claims"] if c["claim"] == 2)["missing"]
  # Claim 4 ran on the sft / grpo policies of seed 0.
  tcr = summary["token_change"]["per_seed"]["0"]
  assert set(tcr) == {"sft", "grpo"} and tcr["sft"]["n_tokens"] > 0
  # Tables and compute.
  assert "| sft |" in md and "| grpo |" in md and "| base |" in md
  comp = summary["compute"]
  assert comp["grpo"]["tokens_sampled"] > 0 and comp["sft"]["tokens_sampled"] == 0
  assert comp["sft"]["tokens_trained"] > 0 and comp["grpo"]["flops"] > 0
  n = summary["n_params"]
  c = comp["grpo"]
  assert c["flops"] == pytest.approx(
    6 * n * c["tokens_trained"] + 2 * n * (c["tokens_sampled"] + c["prompt_tokens_prefilled"])
  )
  plots = os.listdir(os.path.join(out, "plots"))
  for name in (
    "reward.png",
    "entropy_rollout.png",
    "entropy_demo.png",
    "probe_entropy.png",
    "response_length.png",
    "eval_id.png",
  ):
    assert name in plots


@pytest.mark.slow
def test_study_resumes_and_skips_finished_runs(mini):
  """Second invocation: the finished run is skipped (results untouched), the
  run with its results and last checkpoint removed resumes from step 1."""
  out = mini["out"]
  sft_results = os.path.join(runner.run_dir(out, "sft", 0), "results.json")
  mtime = os.path.getmtime(sft_results)
  grpo = runner.run_dir(out, "grpo", 0)
  os.remove(os.path.join(grpo, "results.json"))
  shutil.rmtree(os.path.join(grpo, "checkpoints", "2"))
  metrics = os.path.join(grpo, "logs", "metrics.jsonl")
  before = [json.loads(x) for x in open(metrics)]

  second = _run_study(out)
  assert second["skipped"] == [("sft", 0)] and second["ran"] == [("grpo", 0)]
  assert os.path.getmtime(sft_results) == mtime
  ev = _events(out)
  assert [e["action"] for e in ev if e.get("run") == "grpo/seed0"][-2:] == ["resume", "finished"]
  assert [e["action"] for e in ev if e.get("run") == "sft/seed0"][-1] == "skipped"
  # Only step 1 (and the final evaluation row) was redone: step 0's row is the
  # first run's, and the resumed run's rows replace (not repeat) the later ones.
  rows = [json.loads(x) for x in open(metrics)]
  assert [r["step"] for r in rows if "tokens/trained" in r] == [0, 1]
  assert rows[0] == before[0] and rows[0]["step"] == 0
  assert _results(out, "grpo")["steps"] == 2
  # The report still reads the resumed run (duplicate rows merged by step).
  run = runner.load_run(out, "grpo", 0)
  assert sorted(t for t, r in run.steps.items() if "tokens/trained" in r) == [0, 1]
  assert os.path.exists(second["report"])


@pytest.mark.slow
def test_cli_budget(mini, capsys):
  assert (
    study_cli.main(["--out", mini["out"], "--budget", "--methods", "sft,grpo", "--seeds", "0"]) == 0
  )
  text = capsys.readouterr().out
  assert "estimated study wall time" in text and "grpo" in text


# ----------------------------------------------------------------------------
# Pure pieces: verdict rule, claims on synthetic runs, budget.
# ----------------------------------------------------------------------------


def test_sweep_picks_each_familys_best_val_rate(tmp_path):
  # Finished sweep runs are read, not rerun: hand-made val accuracies decide.
  out, grid = str(tmp_path), (1e-4, 1e-3, 1e-2)
  val = {"sft": (0.30, 0.50, 0.10), "rl": (0.40, 0.40, 0.20), "mixed": (0.1, 0.2, 0.6)}
  for family, accs in val.items():
    for lr, a in zip(grid, accs):
      os.makedirs(runner.sweep_dir(out, family, lr))
      with open(os.path.join(runner.sweep_dir(out, family, lr), "results.json"), "w") as f:
        json.dump({"after": {"val_acc": a}}, f)
  chosen = runner.run_sweep(out, runner.study_settings(), grid)
  lrs = {f: v["lr"] for f, v in chosen.items()}
  assert lrs == {"sft": 1e-3, "rl": 1e-4, "mixed": 1e-2}  # rl: a tie goes to the smaller rate
  # Each method trains at its family's rate; a two-stage method stage by stage.
  settings = runner.study_settings()

  def stage_lrs(method):
    # (the study's 8 prompts a step do not split over the 8 forced devices)
    return [s.lr for s in runner.run_spec(method, 0, out, settings, lrs, validate=False).stages]

  assert stage_lrs("sft") == [1e-3]
  assert stage_lrs("luffy") == [1e-2]
  assert stage_lrs("sft_then_grpo") == [1e-3, 1e-4]
  assert stage_lrs("rl_then_sft") == [1e-4, 1e-3]
  # A sweep run is evaluated on `val` only, as many problems as the ID test split.
  s = runner.sweep_settings(settings)
  assert (s["eval.n_id"], s["eval.n_ood"], s["eval.n_val"]) == (0, 0, settings["eval.n_id"])
  md, _ = report.sweep_table(out)
  assert "| rl (`grpo`) | 40.0 | 40.0 | 20.0 | **0.0001** |" in md
  # The distillation family is swept on its own later (another --methods): the
  # earlier families' choices stay in chosen.json.
  for lr, a in zip(grid, (0.2, 0.1, 0.1)):
    os.makedirs(runner.sweep_dir(out, "distill", lr))
    with open(os.path.join(runner.sweep_dir(out, "distill", lr), "results.json"), "w") as f:
      json.dump({"after": {"val_acc": a}}, f)
  assert runner.run_sweep(out, settings, grid, families=("distill",))["distill"]["lr"] == 1e-4
  with open(os.path.join(out, "sweep", "chosen.json")) as f:
    assert {k: v["lr"] for k, v in json.load(f).items()} == {**lrs, "distill": 1e-4}


def test_teacher_methods_distil_from_the_regimes_teacher(tmp_path):
  out, settings = str(tmp_path), runner.study_settings()
  assert runner.study_families(["grpo", "srft", "opd", "srft_opd"]) == ("rl", "mixed", "distill")
  assert runner.study_families(runner.METHODS) == ("sft", "rl", "mixed")  # the default study
  with pytest.raises(ValueError, match=r"need the distilled regime's teacher.*--regime=distilled"):
    runner.run_spec("opd", 0, out, settings, validate=False)
  teacher = os.path.join(out, "teacher")
  os.makedirs(os.path.join(teacher, "export", "hf"))
  with open(os.path.join(teacher, "export", "hf", "config.json"), "w") as f:
    f.write("{}")
  lrs = {"sft": 1e-3, "rl": 1e-4, "mixed": 1e-2, "distill": 5e-5}
  opd = runner.run_spec("opd", 0, out, settings, lrs, validate=False)
  mixed = runner.run_spec("srft_opd", 0, out, settings, lrs, validate=False)
  grpo = runner.run_spec("grpo", 0, out, settings, lrs, validate=False)
  assert opd.teacher.hf_path == mixed.teacher.hf_path == teacher
  assert opd.teacher.tokenizer == opd.data.tokenizer  # the study's, which the teacher learned on
  assert [s.lr for s in opd.stages] == [5e-5] and [s.lr for s in mixed.stages] == [1e-2]
  # opd has no demonstration term: every slot of a group is a rollout, as GRPO's.
  assert opd.stages[0].layout == grpo.stages[0].layout
  assert (opd.stages[0].layout.n_rollouts, opd.stages[0].layout.n_demos) == (8, 0)
  assert mixed.stages[0].layout.n_demos == 1
  assert study_cli.main(["--out", out, "--methods", "opd,grpo"]) == 2  # needs the regime


def test_steps_to_reach_the_references_final_accuracy():
  # GRPO ends at 0.5 and 0.7 (target 0.6); evaluations every 2 steps.
  def run(method, seed, curve):
    return _run(method, seed, steps=8, evals=lambda t: curve.get(t, float("nan")))

  runs = {
    "grpo": [run("grpo", 0, {0: 0.1, 4: 0.4, 8: 0.5}), run("grpo", 1, {0: 0.1, 4: 0.5, 8: 0.7})],
    # mean 0.55 at step 4, 0.65 at step 6: reached at 6; seed 1 alone at 4.
    "opd": [
      run("opd", 0, {0: 0.1, 4: 0.5, 6: 0.6, 8: 0.6}),
      run("opd", 1, {0: 0.1, 4: 0.6, 6: 0.7, 8: 0.8}),
    ],
    "srft": [run("srft", 0, {0: 0.1, 8: 0.3}), run("srft", 1, {0: 0.1, 8: 0.65})],
  }
  md, js = report.reach_table(runs)
  assert js["target"] == pytest.approx(0.6)
  assert js["methods"]["grpo"] == {
    "steps": 8,
    "per_seed": {0: None, 1: 8},
    "final": pytest.approx(0.6),
  }
  assert js["methods"]["opd"]["steps"] == 6 and js["methods"]["opd"]["per_seed"] == {0: 6, 1: 4}
  assert js["methods"]["srft"]["steps"] is None and js["methods"]["srft"]["per_seed"] == {
    0: None,
    1: 8,
  }
  assert "| opd | 6 | 6, 4 | 70.0 |" in md and "| srft | not reached | –, 8 | 47.5 |" in md
  assert "no periodic evaluations" in report.reach_table({"srft": runs["srft"]})[0]


def test_verdict_rule():
  assert claims.verdict([0.05, 0.06, 0.04])[0] == "holds"
  assert claims.verdict([-0.05, -0.06, -0.04])[0] == "does not hold"
  assert claims.verdict([0.05, -0.06, 0.02])[0] == "inconclusive"
  assert claims.verdict([0.3, 0.2], margin=0.5)[0] == "does not hold"
  assert claims.verdict([])[0] == "inconclusive"
  v, info = claims.verdict([0.1])
  assert v == "holds" and "1 seed" in info["note"]
  assert claims.combine(["holds", "holds"]) == "holds"
  assert claims.combine(["holds", "inconclusive"]) == "inconclusive"
  assert claims.combine(["inconclusive", "does not hold"]) == "does not hold"


def _run(
  method,
  seed,
  *,
  steps=10,
  id_acc=0.5,
  ood_acc=0.5,
  reward=None,
  entropy=None,
  evals=None,
  probe=None,
):
  rows = {}
  for t in range(steps):
    r = {"step": t}
    if reward:
      r["reward/rollout_mean"] = reward(t)
    if entropy:
      r["loss/entropy_rollout"] = entropy(t)
    rows[t] = r
  for key, fn in (("eval/task_id", evals), ("probe/entropy", probe)):
    if fn:
      for t in range(0, steps + 1, 1):
        rows.setdefault(t, {"step": t})[key] = fn(t)
  return runner.Run(
    method, seed, {"steps": steps, "after": {"id_acc": id_acc, "ood_acc": ood_acc}}, rows
  )


def test_claim_verdicts_on_synthetic_runs():
  seeds = (0, 1, 2)
  runs = {
    "srft": [
      _run(
        "srft",
        s,
        reward=lambda t: 0.1 * t,
        entropy=lambda t: 1.0,
        id_acc=0.6 + 0.01 * s,
        ood_acc=0.5,
      )
      for s in seeds
    ],
    "grpo": [
      _run("grpo", s, reward=lambda t: 0.05 * t, entropy=lambda t: 1.0 - 0.08 * t) for s in seeds
    ],
    "sft_plus_rl": [_run("sft_plus_rl", s, id_acc=0.7 + 0.01 * s) for s in seeds],
    # accuracy at the switch (step 5) 0.6, then 0.4, 0.5: a dip.
    "sft_then_grpo": [
      _run("sft_then_grpo", s, id_acc=0.5, evals=lambda t: {5: 0.6, 6: 0.4, 7: 0.5}.get(t, 0.55))
      for s in seeds
    ],
    # probe entropy flat: no spike.
    "rl_then_sft": [_run("rl_then_sft", s, probe=lambda t: 1.0) for s in seeds],
    "srft_no_wsft": [_run("srft_no_wsft", s, id_acc=0.5 + 0.01 * s) for s in seeds],
    # no_wsft is worse than srft, no_wrl better: claim 5 does not hold.
    "srft_no_wrl": [_run("srft_no_wrl", s, id_acc=0.65 + 0.01 * s, ood_acc=0.5) for s in seeds],
  }
  token = {
    "per_seed": {
      str(s): {
        "sft": {"moved_frac": 0.4, "moved_share_by_quartile": [0.25] * 4},
        "grpo": {"moved_frac": 0.05 + 0.01 * s, "moved_share_by_quartile": [0.1, 0.1, 0.1, 0.7]},
      }
      for s in seeds
    }
  }
  v = {c["claim"]: c["verdict"] for c in claims.claim_verdicts(runs, token)}
  assert v == {1: "holds", 2: "holds", 3: "does not hold", 4: "holds", 5: "does not hold"}


def test_budget_estimate():
  settings = runner.study_settings()
  t = runner.Timing(sft_step_s=1.0, rl_step_s=2.0, warmup_step_s=1.0, run_overhead_s=10.0)
  est = runner.estimate_seconds(
    {**settings, "steps": 10, "warmup.steps": 5},
    ["sft", "grpo", "rl_then_sft"],
    [0, 1],
    t,
    lr_grid=(1e-4, 1e-3),
  )
  assert est["per_run_s"] == {"sft": 20.0, "grpo": 30.0, "rl_then_sft": 25.0}
  # warm-up + the sweep (2 rates x the families these methods train with: sft,
  # grpo; no srft, as run_study sweeps) + 2 seeds of the runs
  assert est["sweep_s"] == pytest.approx(2 * (20 + 30))
  assert est["total_s"] == pytest.approx(5 + 10 + 100 + 2 * 75)
  # The chosen defaults fit the budget with the default timing.
  full = runner.estimate_seconds(settings, runner.METHODS, runner.SEEDS)
  assert full["total_s"] < 0.9 * runner.BUDGET_MIN * 60
  assert runner.switch_step(settings) % settings["eval.every"] == 0
  n = runner.steps_that_fit(settings, runner.METHODS, runner.SEEDS, runner.Timing())
  assert n >= settings["steps"] and n % (2 * settings["eval.every"]) == 0
  over = runner.estimate_seconds(
    {**settings, "steps": n + 2 * settings["eval.every"]}, runner.METHODS, runner.SEEDS
  )
  assert over["total_s"] > runner.BUDGET_MIN * 60


def _write_run(out, method, seed, *, steps=4, id_acc=0.5, ood_acc=0.25):
  wd = runner.run_dir(out, method, seed)
  os.makedirs(os.path.join(wd, "logs"))
  with open(os.path.join(wd, "results.json"), "w") as f:
    json.dump(
      {
        "method": method,
        "steps": steps,
        "wall_s": 12.0,
        "train_s": 10.0,
        "after": {"id_acc": id_acc, "ood_acc": ood_acc},
      },
      f,
    )
  rl = method != "sft"
  with open(os.path.join(wd, "logs", "metrics.jsonl"), "w") as f:
    for t in range(steps):
      row = {"step": t, "tokens/trained": 100.0, "time/step_s": 1.0 + rl}
      if rl:
        row.update(
          {
            "tokens/sampled": 80.0,
            "rollout/length_mean": 10.0,
            "reward/rollout_mean": 0.1 * t,
            "loss/entropy_rollout": 1.0,
          }
        )
      f.write(json.dumps(row) + "\n")


def test_report_and_cli_on_synthetic_runs(tmp_path, capsys):
  """The report, --report-only and --budget from hand-written run files (no training)."""
  out = str(tmp_path)
  settings = {
    k: list(v) if isinstance(v, tuple) else v
    for k, v in runner.study_settings(overrides={"steps": 4}).items()
  }
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump({"settings": settings, "seeds": [0, 1], "methods": list(METHODS), "quick": False}, f)
  for s in (0, 1):
    _write_run(out, "sft", s, id_acc=0.4 + 0.1 * s)
    _write_run(out, "grpo", s, id_acc=0.3)
  path = report.write_report(out)
  md = open(path).read()
  assert md.index("Pre-registered criteria") < md.index("## Results")
  assert report.CRITERIA_MD in md and "docs/method.md" in md and "METHOD.md" not in md
  assert "| sft | 45.0 ± 7.1 | 45.0 ± 7.1 | 25.0 ± 0.0 |" in md
  assert "_not computed" in md  # no base model: no token-change analysis
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["compute"]["grpo"]["tokens_sampled"] == 4 * 80.0
  assert summary["compute"]["grpo"]["flops"] is None  # no base model: no parameter count
  assert [c["verdict"] for c in summary["claims"]] == ["inconclusive"] * 5
  assert "reward.png" in os.listdir(os.path.join(out, "plots"))
  os.remove(path)

  assert study_cli.main(["--out", out, "--report-only"]) == 0
  assert capsys.readouterr().out.strip() == path and os.path.exists(path)
  assert study_cli.main(["--out", out, "--budget", "--methods", "sft,grpo", "--seeds", "0"]) == 0
  text = capsys.readouterr().out
  assert "estimated study wall time" in text and "steps a run that fit in 120 min" in text
  t = runner.measured_timing(out)
  assert t.sft_step_s == 1.0 and t.rl_step_s == 2.0  # steps after the first two
  assert t.run_overhead_s == pytest.approx(12.0 - 4 * 1.5)  # median of 8 s (sft) and 4 s (grpo)


# ----------------------------------------------------------------------------
# Token change on a hand-made pair of models.
# ----------------------------------------------------------------------------

SMALL = model_lib.ModelConfig(
  vocab_size=32,
  embed_dim=32,
  mlp_dim=64,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  max_seq_len=64,
)


def _batch(seed=0, b=4, t=20, prompt=6):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, SMALL.vocab_size, (b, t)).astype(np.int32)
  lengths = np.array([t, t - 3, t - 5, t - 1])[:b]
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  resp = mask.copy()
  resp[:, :prompt] = 0
  return tokens, mask, resp


def _reference(model_a, model_b, tokens, mask, resp, threshold):
  """NumPy from full logits: moved mask and base entropy of each response target."""

  def stats(m):
    logits = np.asarray(model_lib.forward_logits(m, tokens, mask), np.float64)[:, :-1]
    logp = (
      logits
      - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - logits.max(-1, keepdims=True)
    )
    p = np.exp(logp)
    tgt = np.take_along_axis(p, tokens[:, 1:, None], -1)[..., 0]
    return tgt, -(p * logp).sum(-1)

  p0, h0 = stats(model_a)
  p1, _ = stats(model_b)
  sel = resp[:, 1:] > 0
  return np.abs(p1 - p0)[sel] > threshold, h0[sel], tokens[:, 1:][sel]


def test_change_fractions_exact():
  """Hand-made probabilities: 8 tokens, base entropies 1..8 (quartiles of 2)."""
  ent = np.arange(1.0, 9.0)
  p0 = np.full(8, 0.5)
  p1 = p0 + np.array([0.0, 0.05, 0.0, 0.2, 0.0, 0.0, -0.3, 0.11])
  r = tc.change_fractions(p0, p1, ent, threshold=0.1)
  assert r["n_tokens"] == 8 and r["n_moved"] == 3 and r["moved_frac"] == 3 / 8
  assert r["tokens_by_quartile"] == [2, 2, 2, 2]
  assert r["moved_frac_by_quartile"] == [0.0, 0.5, 0.0, 1.0]
  assert r["moved_share_by_quartile"] == pytest.approx([0.0, 1 / 3, 0.0, 2 / 3])
  none = tc.change_fractions(p0, p0, ent)
  assert none["moved_frac"] == 0.0 and all(np.isnan(none["moved_share_by_quartile"]))


@pytest.mark.slow
def test_token_change_identical_models_move_nothing():
  base = model_lib.create_model(SMALL, seed=0)
  tokens, mask, resp = _batch()
  r = tc.token_change(base, base, tokens, mask, resp)
  assert r["n_moved"] == 0 and r["mean_abs_dp"] == 0.0
  assert r["n_tokens"] == int(resp[:, 1:].sum())


@pytest.mark.slow
def test_token_change_one_unembedding_row():
  """The tuned copy differs only in the unembedding row of token v (its lm_head
  column): the moved tokens are exactly those the full-logit reference finds,
  and the tokens whose target is v move far more often than the others."""
  base = model_lib.create_model(SMALL, seed=0)
  tuned = copy.deepcopy(base)
  v = 7
  w = np.array(tuned.lm_head[...])
  w[:, v] += 0.6 * np.random.default_rng(1).standard_normal(w.shape[0]).astype(np.float32)
  tuned.lm_head[...] = jnp.asarray(w)
  tokens, mask, resp = _batch(b=4, t=24)
  tokens[:, 6::2] = v  # many targets are v
  r = tc.token_change(base, tuned, tokens, mask, resp, threshold=0.1)
  moved, h0, targets = _reference(base, tuned, tokens, mask, resp, 0.1)
  assert r["n_tokens"] == moved.size
  assert r["n_moved"] == int(moved.sum()) > 0
  assert r["moved_frac"] == pytest.approx(moved.mean())
  q = np.searchsorted(np.quantile(h0, [0.25, 0.5, 0.75]), h0, side="left")
  expect_q = [moved[q == i].mean() for i in range(4)]
  np.testing.assert_allclose(r["moved_frac_by_quartile"], expect_q, atol=1e-12)
  assert moved[targets == v].mean() > 2 * moved[targets != v].mean()

  # A change to a parameter only v's logit reads leaves the other logits alone.
  def logits(m):
    return np.asarray(model_lib.forward_logits(m, tokens, mask))

  d = np.abs(logits(tuned) - logits(base))
  assert d[..., v].max() > 0.1 and np.delete(d, v, axis=-1).max() == 0.0
