"""The frozen run spec (srft_jax/factory.py): built once from the ConfigDict,
read everywhere else; every evaluation of a run grades by the same rule."""

import collections
import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from srft_jax import evaluate
from srft_jax import factory
from srft_jax import job
from srft_jax import model as model_lib
from srft_jax.data import task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")


def test_spec_is_frozen_and_carries_the_stages():
  spec = factory.run_spec(factory.load_config(DEFAULT + ":sft_then_grpo"), validate=False)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.steps = 3
  assert spec.method == "sft:30,grpo"
  assert [(s.name, s.start, s.steps) for s in spec.stages] == [("sft", 0, 30), ("grpo", 30, 30)]
  assert spec.stage_at(29).name == "sft" and spec.stage_at(30).name == "grpo"
  assert spec.stage_at(60).name == "grpo"  # the end: the last stage
  # Each stage's step config follows its loss (a KL reference only with a KL term).
  assert [s.step.loss for s in spec.stages] == [s.loss for s in spec.stages]
  assert not spec.reference
  # The warm-up is a spec of its own: the sft preset at its own lr and batch.
  w = spec.warmup_run
  assert (w.name, w.method, w.steps, w.warmup_run) == ("warm-up", "sft", 720, None)
  assert (w.optim.lr, w.batch.prompts_per_step, w.data.demo_style) == (1.5e-3, 16, "terse")
  assert w.config_json != spec.config_json


def test_overrides_name_unknown_fields():
  c = factory.load_config(DEFAULT)
  spec = factory.run_spec(c, {"optim.lr": 1e-3, "data.task_levels": (1, 2)}, validate=False)
  assert (spec.optim.lr, spec.data.task_levels) == (1e-3, (1, 2))
  assert [s.lr for s in spec.stages] == [1e-3]
  assert c.optim.lr == 2e-4  # the ConfigDict itself is left alone
  with pytest.raises(factory.ConfigError, match=r"config\.optim\.learning_rate: no such field"):
    factory.run_spec(c, {"optim.learning_rate": 1e-3})
  with pytest.raises(factory.ConfigError, match=r"config\.optimizer\.lr: no such field"):
    factory.run_spec(c, {"optimizer.lr": 1e-3})


def test_microbatches_replace_every_stage_step():
  spec = factory.run_spec(factory.load_config(DEFAULT + ":sft_then_grpo"), validate=False)
  four = spec.with_microbatches(4)
  assert four.batch.microbatches == 4
  assert [s.step.microbatches for s in four.stages] == [4, 4]
  assert [s.step.microbatches for s in spec.stages] == [1, 1]


def test_device_checks_wait_for_a_multihost_start():
  """A multi-host config is checked against the devices only after
  jax.distributed.initialize (job.run): the spec builds before it."""
  bad = {"batch.prompts_per_step": 4, "warmup.steps": 0}  # 4 rows a micro-batch, 8 devices
  c = factory.load_config(DEFAULT + ":sft")
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  with pytest.raises(factory.ConfigError, match=r"config\.batch\.prompts_per_step"):
    factory.run_spec(c, bad)
  spec = factory.run_spec(c, {**bad, "multihost": True})
  with pytest.raises(factory.ConfigError, match=r"config\.batch\.prompts_per_step"):
    factory.check_devices(spec)


@pytest.mark.slow
def test_every_evaluation_grades_by_the_same_rule(tokenizer_path, tmp_path, monkeypatch):
  """With rollout.require_think=True, the periodic evaluation during training
  and the evaluations before and after it sample and grade alike: the same
  sampling settings, template, batch size, key and reward rule."""
  calls = []
  real = evaluate.accuracy_on_rows

  def recording(model, tokenizer, rows, scorer, cfg, **kw):
    calls.append((len(rows), cfg, kw))
    return real(model, tokenizer, rows, scorer, cfg, **kw)

  monkeypatch.setattr(evaluate, "accuracy_on_rows", recording)
  over = {
    "steps": 1,
    "warmup.steps": 0,
    "rollout.require_think": True,
    "eval.every": 1,
    "eval.every_n": 8,
    "eval.n_id": 8,
    "eval.n_ood": 8,
    "batch.prompts_per_step": 8,
    "data.tokenizer": tokenizer_path,
    "data.max_response_len": 16,
    "data.task_train_size": 64,
    "model.embed_dim": 32,
    "model.num_layers": 1,
    "model.mlp_dim": 64,
    "checkpoint.export_hf": False,
    "log.progress": False,
    "log.plots": False,
    "log.tensorboard": False,
  }
  res = job.run(factory.run_spec(factory.load_config(DEFAULT + ":grpo"), over), str(tmp_path))
  # before (ID, OOD), during (step 0 and the end), after (ID, OOD)
  assert [n for n, _, _ in calls] == [8, 8, 8, 8, 8, 8]

  def settings(kw):
    return {k: v for k, v in kw.items() if k != "rng"}, jax.random.key_data(kw["rng"]).tolist()

  _, cfg0, kw0 = calls[0]
  assert kw0["require_think"] is True and cfg0.temperature == 0.0
  for _, cfg, kw in calls[1:]:
    assert cfg == cfg0 and settings(kw) == settings(kw0)
  # results.json holds the accuracy by difficulty level; the levels add up to the split's.
  for when in ("before", "after"):
    levels = res[when]["levels"]["task_id"]
    rows = task.generate("test_id", 8, 0, "terse")
    counts = collections.Counter(str(task.difficulty(r["prompt"])) for r in rows)
    assert set(levels) == set(counts)
    total = sum(levels[k] * n for k, n in counts.items()) / len(rows)
    assert total == pytest.approx(res[when]["id_acc"])
    assert set(res[when]["levels"]["task_ood"]) == {"4"}


@pytest.mark.parametrize(
  "field,value,known",
  [
    ("data.template", "alpaca", "'qwen_math', 'chatml_plain', 'plain'"),
    ("data.source", "web", "'task', 'tfds'"),
    ("optim.schedule", "step", "'constant', 'linear', 'cosine'"),
  ],
)
def test_enumerated_settings_list_their_allowed_values(field, value, known):
  with pytest.raises(factory.ConfigError, match=rf"config\.{field}: .*{value}.*known: \({known}\)"):
    factory.run_spec(factory.load_config(DEFAULT), {field: value})


def test_warmup_levels_are_set_apart_from_the_runs():
  """warmup.task_levels: the base learns levels of its own (() = the run's);
  the cached warm-up is keyed by them."""
  c = factory.load_config(DEFAULT)
  same = factory.run_spec(c, {"data.task_levels": (1, 2, 3)}, validate=False)
  apart = factory.run_spec(
    c, {"data.task_levels": (1, 2, 3), "warmup.task_levels": (1,)}, validate=False
  )
  assert same.warmup_run.data.task_levels == (1, 2, 3)
  assert apart.warmup_run.data.task_levels == (1,) and apart.data.task_levels == (1, 2, 3)
  assert dict(dict(apart.warmup.settings)["task"])["levels"] == (1,)
  assert dict(dict(same.warmup.settings)["task"])["levels"] == (1, 2, 3)
  with pytest.raises(factory.ConfigError, match=r"config\.warmup\.task_levels"):
    factory.run_spec(c, {"warmup.task_levels": (4,)})


def test_accuracy_by_level_on_hand_made_rows():
  rows = task.generate("test_id", 12, 0, "terse")
  per_row = [float(i % 2) for i in range(12)]
  want = collections.defaultdict(list)
  for r, a in zip(rows, per_row):
    want[str(task.difficulty(r["prompt"]))].append(a)
  got = evaluate.accuracy_by_level(rows, per_row)
  assert got == {k: sum(v) / len(v) for k, v in sorted(want.items())}
  assert evaluate.accuracy_by_level([{"prompt": "What is 2 + 2?"}], [1.0]) == {}
  table = evaluate.levels_table({"base": {"task_id": {"1": 0.5, "2": 0.25}}})
  assert table.splitlines()[2] == "| base | 50.0 | 25.0 |"


@pytest.mark.parametrize(
  "field,value,known",
  [
    ("model.attention", "flash", "'xla', 'chunked', 'cudnn'"),
    ("model.decode_attention", "triton", "'xla', 'pallas'"),
    ("model.remat", "some", "'none', 'full', 'dots'"),
  ],
)
def test_model_settings_are_checked_against_the_models_tables(field, value, known):
  """One table of allowed values per setting (srft_jax/model/config.py), read by
  the model config and the run config's checks alike."""
  with pytest.raises(factory.ConfigError, match=rf"config\.{field}: .*{value}.*known: \({known}\)"):
    factory.run_spec(factory.load_config(DEFAULT), {field: value})
  name = field.split(".")[1]
  with pytest.raises(ValueError, match=rf"ModelConfig\.{name}: invalid value '{value}'"):
    model_lib.ModelConfig.preset("tiny", **{name: value})


def test_a_multihost_spec_is_built_without_touching_jax():
  """`jax.distributed.initialize` must come before any JAX call: building a
  multi-host run's spec (main.py, before job.run) asks for no device."""
  code = (
    "import jax, sys\n"
    "from jax._src import xla_bridge\n"
    "from srft_jax import factory\n"
    f"c = factory.load_config({DEFAULT!r})\n"
    "spec = factory.run_spec(c, {'multihost': True})\n"
    "sys.exit(1 if xla_bridge.backends_are_initialized() else 0)\n"
  )
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
