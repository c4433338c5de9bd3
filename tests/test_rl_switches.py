"""The trainer's RL switches (docs/method.md §2.7-§2.8): sampler-trainer
mismatch metrics and importance corrections, DAPO's overlong shaping and
dynamic sampling, the KL reference; compiled once, resumed exactly."""

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax import factory
from srft_jax import job
from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import rewards as rewards_lib
from srft_jax import step as step_lib
from srft_jax import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = factory.load_config_module(os.path.join(REPO, "configs", "default.py"))

TINY = {
  "warmup.steps": 0,
  "model.embed_dim": 32,
  "model.num_layers": 1,
  "model.mlp_dim": 64,
  "data.task_train_size": 256,
  "data.max_response_len": 24,
  "batch.prompts_per_step": 4,
  "eval.before": False,
  "eval.after": False,
  "log.progress": False,
  "log.tensorboard": False,
  "log.plots": False,
}


def _config(tokenizer_path, arg=None, **overrides):
  """The default config (preset `arg`) with TINY, the task tokenizer
  (conftest.py) and `overrides`."""
  return factory.with_overrides(
    DEFAULT.get_config(arg), {**TINY, "data.tokenizer": tokenizer_path, **overrides}
  )


# ----------------------------------------------------------------------------
# Host-side pieces, on hand-made inputs
# ----------------------------------------------------------------------------


def test_overlong_reward_hand_made():
  # L_max = 10, L_c = 4: no penalty up to 6 tokens, then -(L - 6) / 4, -1 if truncated.
  lengths = np.array([3, 6, 7, 9, 10, 10])
  truncated = np.array([False, False, False, False, False, True])
  got = trainer_lib.overlong_reward(lengths, truncated, max_len=10, buffer=4)
  np.testing.assert_allclose(got, [0, 0, -0.25, -0.75, -1.0, -1.0])


def test_informative_groups_keep_data_order_and_fill():
  correct = np.array([[1, 1], [0, 1], [0, 0], [1, 0], [0, 1]], np.float32)
  np.testing.assert_array_equal(trainer_lib.informative_groups(correct, 2), [1, 3])
  np.testing.assert_array_equal(trainer_lib.informative_groups(correct, 4), [1, 3, 4, -1])
  np.testing.assert_array_equal(trainer_lib.informative_groups(correct[[0, 2]], 2), [-1, -1])


def test_merge_batches_left_pads_prompts():
  class Tok:
    pad_id = 9

  a = {
    "prompt_tokens": np.array([[5, 6]]),
    "prompt_mask": np.array([[1, 1]]),
    "demo_tokens": np.array([[1, 2, 3]]),
    "demo_mask": np.array([[1, 1, 0]]),
    "answers": ["a"],
    "ids": ["0"],
  }
  b = dict(a, prompt_tokens=np.array([[7, 8, 4]]), prompt_mask=np.array([[1, 1, 1]]))
  b.update(answers=["b"], ids=["1"])
  m = trainer_lib.merge_batches([a, b], Tok())
  np.testing.assert_array_equal(m["prompt_tokens"], [[9, 5, 6], [7, 8, 4]])
  np.testing.assert_array_equal(m["prompt_mask"], [[0, 1, 1], [1, 1, 1]])
  assert m["demo_tokens"].shape == (2, 3) and m["answers"] == ["a", "b"] and m["ids"] == ["0", "1"]
  assert trainer_lib.merge_batches([a], Tok()) is a


def test_mismatch_metrics_hand_made():
  old = np.array([[0.0, -1.0, -2.0, 0.0], [-0.5, -0.5, 0.0, 0.0]], np.float32)
  smp = np.array([[0.0, -0.5, -3.0, 5.0], [-0.5, -0.5 - np.log(3), 0.0, 0.0]], np.float32)
  roll = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)  # (0, 3): padding
  m = jax.device_get(step_lib.mismatch_metrics(old, smp, roll))
  d = [0.0, -0.5, 1.0, 0.0, np.log(3)]  # rollout tokens' old - sampler
  np.testing.assert_allclose(m["mismatch/abs_mean"], np.mean(np.abs(d)), rtol=1e-6)
  np.testing.assert_allclose(m["mismatch/abs_max"], 1.0986123, rtol=1e-6)
  # nearest rank: ceil(0.95 * 5) = 5th of the sorted |d| = the largest
  np.testing.assert_allclose(m["mismatch/abs_p95"], np.log(3), rtol=1e-6)
  # ratios e^d outside [0.5, 2]: e^1 and 3
  np.testing.assert_allclose(m["mismatch/ratio_outside_frac"], 2 / 5, rtol=1e-6)
  np.testing.assert_allclose(m["mismatch/row_sum_mean"], (0.5 + np.log(3)) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------
# The trainer with a real sampler, scorer and update
# ----------------------------------------------------------------------------


def _trainer(c, scorer):
  spec = factory.run_spec(c)
  mesh = spec.make_mesh()
  tok = factory.tokenizer(spec, "/unused")
  source, _ = factory.datasets(spec)
  model = model_lib.create_model(spec.model.config(tok.vocab_size), seed=0, mesh=mesh)
  t = trainer_lib.Trainer(model, spec, tokenizer=tok, scorer=scorer, mesh=mesh)
  it = factory.data_iter(spec, source, tok, seed=0)
  return t, it


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_sampler_mismatch_measured_and_every_correction_runs(tokenizer_path, dtype):
  """float32 on CPU: the sampler's log-probs equal the trainer's (mismatch ~0,
  weights 1). bfloat16 compute (fused bf16 decode weights in the sampler, the
  float32 master unembedding in the trainer's loss): a real mismatch, weights
  != 1, and the correction modes give a finite update."""
  c = _config(tokenizer_path, "grpo", **{"model.dtype": dtype})
  with rewards_lib.RewardScorer() as scorer:
    t, it = _trainer(c, scorer)
    batch = next(it)
    base = t.spec.stages[0]
    # One token-level and one sequence-level mode (each mode's weights against
    # NumPy: tests/test_objectives.py); float32: the mismatch is the sampler's,
    # not the mode's, so one mode shows it.
    modes = ("token_truncate", "sequence_mask")
    for i, mode in enumerate(modes if dtype == "bfloat16" else modes[:1]):
      loss = dataclasses.replace(base.loss, is_correction=mode)
      step = dataclasses.replace(base.step, loss=loss, recompute_old_logp=True)
      stage = dataclasses.replace(base, loss=loss, step=step)
      t.enter_stage(stage, fresh_optimizer=True)
      assert t.step_cfg.recompute_old_logp
      _, dev = t.run_step(batch, 0, jax.random.key(i))
      m = jax.device_get(dev)
      assert np.isfinite(m["loss"]) and np.isfinite(m["optim/grad_norm"]), mode
      if dtype == "float32":
        assert m["mismatch/abs_max"] < 1e-4, m["mismatch/abs_max"]
        np.testing.assert_allclose(m["is_weight"], 1.0, atol=1e-4)
      else:
        assert m["mismatch/abs_mean"] > 1e-5 and m["mismatch/abs_max"] > 1e-4, m
        assert abs(m["is_weight"] - 1.0) > 1e-6, (mode, m["is_weight"])


class _Killed(Exception):
  pass


def _run(c, workdir, kill_at_draw=None, counts=None):
  """job.run; optionally raises at the data iterator's `kill_at_draw`-th draw,
  and records the backend compile count at every draw."""
  real = factory.data_iter
  compiles = {"n": 0}

  def on_event(name, *_a, **_k):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles["n"] += 1

  class Iter:
    def __init__(self, inner):
      self.inner, self.draws = inner, 0

    def __next__(self):
      self.draws += 1
      if counts is not None:
        counts.append(compiles["n"])
      if kill_at_draw is not None and self.draws >= kill_at_draw:
        raise _Killed()
      return next(self.inner)

    def __iter__(self):
      return self

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, s):
      self.inner.set_state(s)

    def stats(self):
      return self.inner.stats()

  jax.monitoring.register_event_duration_secs_listener(on_event)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(factory, "data_iter", lambda *a, **k: Iter(real(*a, **k)))
    try:
      return job.run(factory.run_spec(c), workdir)
    except _Killed:
      return None


def _sha(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


# The resume test in both model/update layouts (docs/method.md §17, §18): the
# layers in a Python loop with padded rows, and scanned layers with packed rows
# (two layers, so the scan has a length; 8 packed rows a slot split over the 8
# data shards), fewer steps there.
LAYOUTS = {
  "loop_padded": (8, {}),
  "scanned_packed": (
    6,
    {
      "model.scan_layers": True,
      "model.num_layers": 2,
      "batch.packing": True,
      "batch.pack_rows": 8,
    },
  ),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dapo_with_corrections_and_kl_compiles_once_and_resumes_exactly(
  tokenizer_path, tmp_path, layout
):
  """The dapo preset (dynamic sampling over 2x the prompts, overlong shaping)
  with an importance correction and a KL term: after the first steps and the
  first checkpoint nothing compiles; a run killed mid-way resumes to the
  unbroken run's parameters bitwise, with the same metrics rows."""
  steps, extra = LAYOUTS[layout]
  over = {
    "steps": steps,
    "checkpoint.every": 2,
    "checkpoint.async_save": False,
    "loss.is_correction": "token_truncate",
    "loss.kl_coef": 0.01,
    "loss.kl_estimator": "low_var_kl",
    "rollout.overlong_filter": True,
    **extra,
  }
  c = _config(tokenizer_path, "dapo", **over)
  counts = []
  a = _run(c, str(tmp_path / "a"), counts=counts)
  assert a["after"] == {"id_acc": None, "ood_acc": None, "levels": {}}
  per_step = counts[::2]  # two draws a step (oversample 2)
  # Steps 0-1 compile the programs, the first checkpoint (at 2) its own; then nothing.
  assert len(per_step) == steps and per_step[-1] == per_step[3], per_step
  # Killed at the first draw of the step after the second checkpoint (at 4), then rerun.
  assert _run(c, str(tmp_path / "b"), kill_at_draw=2 * 5 + 1) is None
  _run(c, str(tmp_path / "b"))
  for f in ("export/hf/model.safetensors",):
    assert _sha(tmp_path / "a" / f) == _sha(tmp_path / "b" / f)
  rows = {}
  for name in ("a", "b"):
    with open(tmp_path / name / "logs" / "metrics.jsonl") as f:
      rows[name] = [json.loads(line) for line in f]
  assert [r["step"] for r in rows["b"]] == list(range(steps))
  if extra.get("batch.packing"):
    assert all(0 < r["batch/real_token_fraction"] <= 1 for r in rows["a"])
  keys = ("loss/loss", "dynamic/filled_slots", "mismatch/abs_max", "reward/overlong_mean")
  for ra, rb in zip(rows["a"], rows["b"]):
    for k in keys:
      assert ra[k] == rb[k], (k, ra["step"])
  assert all(r["dynamic/filled_slots"] <= 4 for r in rows["a"])
  assert all(np.isfinite(r["loss/kl"]) for r in rows["a"])


def test_config_errors_name_the_new_fields(tokenizer_path):
  for field, value in (("rollout.oversample", 0), ("rollout.overlong_buffer", 24)):
    with pytest.raises(factory.ConfigError, match=field.replace(".", r"\.")):
      factory.run_spec(_config(tokenizer_path, **{field: value}))
  c = _config(
    tokenizer_path, **{"loss.is_correction": "token_mask", "rollout.recompute_old_logp": False}
  )
  with pytest.raises(factory.ConfigError, match=r"rollout\.recompute_old_logp"):
    factory.run_spec(c)
  c = _config(tokenizer_path, **{"loss.clip_eps_high": 0.3})
  with pytest.raises(factory.ConfigError, match=r"config\.loss: .*clip_eps_high"):
    factory.run_spec(c)


@pytest.mark.slow
def test_step_with_every_new_switch_accumulates_micro_batches_exactly():
  """recompute_old_logp + a sequence correction + clip-higher + dual clip +
  per-row aggregation + a KL term to a reference: two micro-batches give the
  update, the loss and every metric of one (metrics from summed (sum, count)
  pairs, not means of micro-batch means)."""
  # remat: the no-gradient pre-pass must trace a rematerialised model too.
  cfg = model_lib.ModelConfig(
    vocab_size=48,
    embed_dim=32,
    mlp_dim=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    remat="dots",
  )
  graphdef, params = nnx.split(model_lib.create_model(cfg, seed=1))
  ref = jax.tree.map(lambda x: x * 1.01, params)
  tx, _ = step_lib.make_optimizer(1e-2, steps=10)
  rs = np.random.RandomState(3)
  b, t = 8, 10
  mask = np.ones((b, t), np.int32)
  mask[::3, -3:] = 0
  response = mask[:, 1:].copy()
  response[:, :4] = 0
  batch = {
    "tokens": jnp.asarray(rs.randint(1, 48, (b, t)), jnp.int32),
    "mask": jnp.asarray(mask),
    "response_mask": jnp.asarray(response),
    # the sampler's log-probs: far from the trainer's, so weights and clips act
    "old_logp": jnp.asarray(-3.0 * rs.rand(b, t - 1) * response, jnp.float32),
    "is_demo": jnp.asarray(np.arange(b) % 4 == 3),
    "rewards": jnp.asarray(rs.randint(0, 2, b), jnp.float32),
    "advantages": jnp.asarray(rs.randn(b), jnp.float32),
  }
  loss_cfg = obj.LossConfig.preset(
    "srft_code",
    entropy_granularity="batch",  # its own pre-pass over the micro-batches
    is_correction="sequence_truncate",
    is_cap=5.0,
    clip_eps=0.2,
    clip_eps_high=0.28,
    clip_ratio_c=2.0,
    aggregation="seq_mean_token_mean",
    kl_coef=0.05,
  )

  def run(micro):
    step_cfg = step_lib.StepConfig(
      loss=loss_cfg,
      microbatches=micro,
      logit_chunk=16,
      recompute_old_logp=True,
      reference=True,
    )
    state = step_lib.init_train_state(params, tx)
    fn = jax.jit(step_lib.train_step, static_argnums=(0, 1, 2))
    return jax.device_get(fn(graphdef, tx, step_cfg, state, batch, ref))

  (s1, m1), (s2, m2) = run(1), run(2)
  assert m1["mismatch/abs_mean"] > 0.1 and m1["kl"] > 0 and m1["is_weight"] != 1.0
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
  for a, c in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-5)
