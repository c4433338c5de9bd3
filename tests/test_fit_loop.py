"""The host loop's bookkeeping (`trainer.fit`): stages, resume, metrics rows,
checkpoints and the learning-rate schedule.

The loop is the real one (Orbax checkpoints, MetricsWriter, stage switching);
each step's update is one deterministic AdamW update from a gradient that
depends on the step, so two runs agree bitwise exactly when the loop hands
them the same optimizer state, stage and data position. The real SRFT step's
own resume is tested end to end in test_train.py (SIGKILL, SIGTERM).
"""

import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from srft_jax import checkpoint as ckpt_lib
from srft_jax import factory
from srft_jax import job
from srft_jax import metrics as metrics_lib
from srft_jax import model as model_lib
from srft_jax import paths
from srft_jax import sharding as shd
from srft_jax import step as step_lib
from srft_jax import trainer as trainer_lib

import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
DEFAULT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(DEFAULT)

SMALL = model_lib.ModelConfig(
  vocab_size=32,
  embed_dim=16,
  mlp_dim=32,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  max_seq_len=32,
)


class Killed(Exception):
  pass


class Batches:
  """A data iterator with a resumable position; raises Killed at `kill_at`."""

  def __init__(self, kill_at=None):
    self.pos, self.kill_at = 0, kill_at

  def __next__(self):
    if self.pos == self.kill_at:
      raise Killed
    self.pos += 1
    return {"pos": self.pos}

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = state["pos"]

  def stats(self):
    return {}


class StepTrainer(trainer_lib.Trainer):
  """The Trainer with one deterministic AdamW update a step; `nonfinite_from`
  reports a growing non-finite streak from that step on."""

  nonfinite_from = None

  def run_step(self, batch, step, rng):
    s = self.state
    g = jax.tree.map(lambda p: jnp.full_like(p, 0.01 * (step + 1) * (-1) ** step), s["params"])
    updates, opt = self.tx.update(g, s["opt_state"], s["params"])
    self.state = {
      **s,
      "params": optax.apply_updates(s["params"], updates),
      "opt_state": opt,
      "step": s["step"] + 1,
    }
    bad = self.nonfinite_from is not None and step >= self.nonfinite_from
    streak = step - self.nonfinite_from + 1 if bad else 0
    return {"data/pos": float(batch["pos"])}, {
      "loss": jnp.float32(step),
      "nonfinite/streak": jnp.int32(streak),
    }


def _config(stages="sft:2,grpo", steps=5, every=0, **kw):
  c = DEFAULT.get_config()
  with c.unlocked():
    c.steps, c.stages = steps, stages
    c.checkpoint.every, c.checkpoint.async_save = every, False
    c.log.tensorboard = False
    c.log.progress = False
    for k, v in kw.items():
      c[k] = v
  return c


def _trainer(c, cls=StepTrainer):
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  spec = factory.run_spec(c, validate=False)  # one device here, not the config's mesh
  return cls(
    model_lib.Transformer(SMALL, rngs=nnx.Rngs(0)), spec, tokenizer=None, scorer=None, mesh=mesh
  )


def _fit(c, workdir, kill_at=None, cls=StepTrainer):
  t = _trainer(c, cls)
  try:
    info = trainer_lib.fit(t, Batches(kill_at), workdir=str(workdir))
  except Killed:
    return t, None
  return t, info


def _same_state(a, b):
  return all(
    bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state))
  )


def _rows(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, "logs", "metrics.jsonl"))


@pytest.mark.parametrize("kill_at", [2, 3])
@pytest.mark.slow
def test_resume_equals_an_unbroken_run_across_a_stage_switch(tmp_path, kill_at):
  # kill_at=2: the checkpoint of the stage boundary itself; the unbroken run
  # starts grpo there with a fresh optimizer, and so must the resumed one.
  c = _config(every=1)
  straight, _ = _fit(c, tmp_path / "a")
  _fit(c, tmp_path / "b", kill_at=kill_at)
  resumed, info = _fit(c, tmp_path / "b")
  assert info["status"] == "done" and int(resumed.state["step"]) == 5
  assert _same_state(straight, resumed)
  # Every step's metrics row exactly once, as the unbroken run wrote them.
  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
  assert strip(_rows(tmp_path / "b")) == strip(_rows(tmp_path / "a"))
  assert [r["step"] for r in _rows(tmp_path / "b")] == [0, 1, 2, 3, 4]


def test_checkpoint_holds_every_metrics_row_before_it(tmp_path):
  # Killed right after the checkpoint at step 3: rows 0..2 are already on disk.
  c = _config(stages="", steps=5, every=3)
  _fit(c, tmp_path, kill_at=3)
  assert [r["step"] for r in _rows(tmp_path)] == [0, 1, 2]


class DivergingTrainer(StepTrainer):
  nonfinite_from = 1


def test_nonfinite_stop_saves_the_state_under_its_own_step(tmp_path):
  c = _config(stages="", steps=8, max_nonfinite_streak=2)
  with pytest.raises(FloatingPointError):
    _fit(c, tmp_path, cls=DivergingTrainer)
  # Step 2's row shows the second bad update in a row; the loop sees it while
  # running step 3, then stops: rows 0..3 once each, state after step 3 saved as 4.
  assert [r["step"] for r in _rows(tmp_path)] == [0, 1, 2, 3]
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  t = _trainer(c)
  step, state, data, _ = ck.restore(t.abstract_state(t.spec.stages[0]))
  ck.close()
  assert (step, int(state["step"]), data) == (4, 4, {"pos": 4})


@pytest.mark.filterwarnings(
  "ignore::pytest.PytestUnraisableExceptionWarning"
)  # Orbax, after the failed read
def test_a_corrupted_final_checkpoint_is_saved_again(tmp_path):
  c = _config(stages="", steps=4, every=2)
  _fit(c, tmp_path)
  for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"")
  resumed, info = _fit(c, tmp_path)  # falls back to 2, trains 2 and 3, saves 4
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  step, state, _, _ = ck.restore(resumed.abstract_state(resumed.spec.stages[0]))
  ck.close()
  assert step == 4 and int(state["step"]) == 4
  assert all(
    bool(jnp.array_equal(x, y))
    for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(resumed.state["params"]))
  )


def _lr_formula(schedule, s, *, lr, steps, warmup):
  """The rate of training step `s` (docs/method.md §5, written out here, not
  with optax): a linear warm-up from 0 over the first `warmup` steps, then over
  the n = steps - warmup steps left (t = s - warmup) `constant` lr,
  `linear` lr (1 - t/n) or `cosine` lr (1 + cos(pi t/n)) / 2, as transformers'
  get_{linear,cosine}_schedule_with_warmup: the last step still learns."""
  if s < warmup:
    return lr * s / warmup
  frac = (s - warmup) / max(steps - warmup, 1)
  if schedule == "constant":
    return lr
  if schedule == "linear":
    return lr * (1.0 - frac)
  assert schedule == "cosine", schedule
  return lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def test_lr_formula_by_hand():
  f = functools.partial(_lr_formula, lr=2.0, steps=4)
  assert [f("linear", s, warmup=0) for s in range(4)] == [2.0, 1.5, 1.0, 0.5]
  assert [f("linear", s, warmup=2) for s in range(4)] == [0.0, 1.0, 2.0, 1.0]
  assert [f("constant", s, warmup=2) for s in range(4)] == [0.0, 1.0, 2.0, 2.0]
  assert [f("cosine", s, warmup=0) for s in range(4)] == pytest.approx(
    [2.0, 1.0 + 2**-0.5, 1.0, 1.0 - 2**-0.5]
  )


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 2])
def test_schedule_is_per_step_across_minibatch_updates(schedule, warmup):
  # Adam with b1 = b2 = 0 moves a parameter by exactly lr (sign of the gradient):
  # the move of each update is the rate it used.
  steps, per_step, lr = 5, 2, 1.0
  tx, sched = step_lib.make_optimizer(
    lr,
    steps=steps,
    warmup_steps=warmup,
    schedule=schedule,
    b1=0.0,
    b2=0.0,
    eps=1e-12,
    weight_decay=0.0,
    clip_norm=None,
    updates_per_step=per_step,
  )
  x = jnp.zeros(())
  opt = tx.init(x)
  moves = []
  for _ in range(steps * per_step):
    u, opt = tx.update(jnp.ones(()), opt, x)
    moves.append(-float(u))
  rates = [_lr_formula(schedule, s, lr=lr, steps=steps, warmup=warmup) for s in range(steps)]
  np.testing.assert_allclose([float(sched(s)) for s in range(steps)], rates, rtol=1e-6, atol=1e-7)
  # Every mini-batch update of a step at that step's rate.
  np.testing.assert_allclose(moves, np.repeat(rates, per_step), rtol=1e-5, atol=1e-7)
  if warmup == 0:
    assert moves[0] == pytest.approx(lr)  # no hidden warm-up step at lr 0
  assert min(moves[-per_step:]) > 0  # the last step still learns


class LrTrainer(StepTrainer):
  """Records the stage schedule's lr and the update's largest move."""

  def run_step(self, batch, step, rng):
    before = self.state["params"]
    host, dev = super().run_step(batch, step, rng)
    move = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(self.state["params"]), jax.tree.leaves(before))
    )
    return {**host, "lr": float(self.schedule(step - self.stage.start)), "move": move}, dev


def test_each_stage_trains_at_its_own_learning_rate(tmp_path):
  # optim.stage_lrs: a schedule's stages at their own peak lr (the study's
  # two-stage runs take each family's chosen rate).
  c = _config()
  with c.unlocked():
    c.optim.stage_lrs = (1e-3, 3e-5)
    c.optim.weight_decay = 0.0
  _fit(c, tmp_path, cls=LrTrainer)
  rows = _rows(tmp_path)
  assert [r["lr"] for r in rows] == pytest.approx([1e-3] * 2 + [3e-5] * 3)
  # Adam's first update of each stage (a fresh optimizer) moves by the lr itself.
  assert rows[0]["move"] == pytest.approx(1e-3, rel=1e-3)
  assert rows[2]["move"] == pytest.approx(3e-5, rel=1e-3)
  with c.unlocked():
    c.optim.stage_lrs = (1e-3,)
  with pytest.raises(ValueError, match=r"config\.optim\.stage_lrs"):
    factory.run_spec(c)


def test_two_stage_half_follows_the_final_step_count():
  c = DEFAULT.get_config("sft_then_grpo")
  with c.unlocked():
    c.steps = 200  # as --config.steps=200 after the preset arg
  assert factory.parse_stages(c.stages, c.steps, c.method) == [("sft", 100), ("grpo", 100)]


@pytest.mark.parametrize(
  "field,value,named",
  [
    ("max_nonfinite_streak", 0, "config.max_nonfinite_streak"),
    ("warmup.prompts_per_step", 6, "config.warmup.prompts_per_step"),
  ],
)
def test_config_errors_name_the_field(field, value, named):
  overrides = {field: value}
  if field.startswith("warmup."):
    # 4 micro-batches divide the run's 16 prompts, not the warm-up's 6
    overrides.update({"batch.microbatches": 4, "batch.prompts_per_step": 16})
  with pytest.raises(ValueError, match=named.replace(".", r"\.")):
    factory.run_spec(DEFAULT.get_config(), overrides)


def test_base_cache_is_complete_or_absent(tmp_path, monkeypatch):
  from srft_jax import hf

  model = model_lib.Transformer(dataclasses.replace(SMALL, attention="chunked"), rngs=nnx.Rngs(0))
  hf_dir = str(tmp_path / "base" / "hf")
  real = hf.write_safetensors

  def killed(*a, **k):
    raise KeyboardInterrupt("killed mid-write")

  monkeypatch.setattr(hf, "write_safetensors", killed)
  with pytest.raises(KeyboardInterrupt):
    job.save_base(model, hf_dir)
  assert not os.path.exists(os.path.join(hf_dir, "config.json"))  # no "finished" cache
  monkeypatch.setattr(hf, "write_safetensors", real)
  job.save_base(model, hf_dir)
  # The cached base comes back with the run's settings that config.json does not hold.
  back = hf.load_model(hf_dir, **factory.runtime_overrides(model.cfg))
  assert back.cfg == model.cfg
  a, b = nnx.state(model, nnx.Param), nnx.state(back, nnx.Param)
  assert all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_json_cache_written_atomically(tmp_path):
  path = str(tmp_path / "eval_before.json")
  paths.write_json(path, {"task_id": 0.25})
  assert json.loads(open(path).read()) == {"task_id": 0.25}
  assert os.listdir(tmp_path) == ["eval_before.json"]


def test_study_refuses_multihost(tmp_path, capsys):
  from srft_jax.study import __main__ as study_cli

  assert study_cli.main(["--out", str(tmp_path), "--set", "multihost=True"]) == 2
  assert "one process" in capsys.readouterr().err


def test_fewer_steps_than_done_is_refused(tmp_path):
  _fit(_config(stages="", steps=4, every=2), tmp_path)
  with pytest.raises(factory.ConfigError, match=r"config\.steps=2"):
    _fit(_config(stages="", steps=2), tmp_path)


@pytest.mark.slow
def test_cached_warmup_of_other_settings_is_refused(tmp_path):
  import types

  c = DEFAULT.get_config()
  with c.unlocked():
    c.warmup.dir = str(tmp_path / "base")
  tok = types.SimpleNamespace(vocab_size=64)
  spec = factory.run_spec(c, validate=False)
  mcfg = spec.model.config(tok.vocab_size)
  model = model_lib.Transformer(mcfg, rngs=nnx.Rngs(0))
  job.save_base(model, os.path.join(spec.warmup.dir, "hf"), job.warmup_meta(spec, mcfg))
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  same = job.base_model(spec, tok, mesh, str(tmp_path), scorer=None)  # the cache, reused
  assert all(
    bool(jnp.array_equal(x, y))
    for x, y in zip(
      jax.tree.leaves(nnx.state(same, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))
    )
  )
  for field, value in (("warmup.lr", 1e-2), ("model.num_layers", 2)):
    other = factory.run_spec(c, {field: value}, validate=False)
    with pytest.raises(factory.ConfigError, match=r"config\.warmup\.dir: .*" + field.split(".")[0]):
      job.base_model(other, tok, mesh, str(tmp_path), scorer=None)


@pytest.mark.slow
def test_command_line_mistakes_exit_2_with_a_message(tmp_path):
  res = helpers.run_cli(
    "srft_jax.main",
    "--config=configs/default.py",
    "--config.method=foo",
    f"--workdir={tmp_path / 'w'}",
  )
  assert res.returncode == 2 and "error: config.method" in res.stderr, res.stderr[-2000:]
  res = helpers.run_cli(
    "srft_jax.evaluate", f"--checkpoint={tmp_path / 'missing'}", "--benchmarks=foo,math500"
  )
  assert res.returncode == 2, res.stderr[-2000:]
  for part in ("--benchmarks: unknown ['foo']", "--checkpoint: no directory", "--data_dir"):
    assert part in res.stderr
  assert not (tmp_path / "missing").exists()  # nothing created under a wrong path
  from srft_jax.data import __main__ as data_cli
  from srft_jax.study import __main__ as study_cli

  assert study_cli.main(["--out", str(tmp_path / "s"), "--methods", "foo", "--budget"]) == 2
  assert study_cli.main(["--out", str(tmp_path / "s"), "--report-only"]) == 2
  assert (
    data_cli.main(
      ["prepare", "task", "--task_sizes", "train4096", "--data_dir", str(tmp_path / "d")]
    )
    == 2
  )
  # Splits not named keep their default sizes (was: KeyError on test_id).
  assert (
    data_cli.main(["prepare", "task", "--task_sizes", "train=8", "--data_dir", str(tmp_path / "d")])
    == 0
  )
  from srft_jax.data import builders

  assert len(builders.load_source(str(tmp_path / "d"), "task", "train")) == 8
  assert (
    len(builders.load_source(str(tmp_path / "d"), "task", "test_id"))
    == builders.DEFAULT_TASK_SIZES["test_id"]
  )
