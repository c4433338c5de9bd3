"""Training tests: an end-to-end run, exact resume after SIGKILL,
SIGTERM preemption, checkpoint fallback, non-finite skips, config validation,
the 7B step traced abstractly, and no recompiles after warm-up.

Runs share one in-process end-to-end run (module fixture) and one task
tokenizer; subprocess runs share a persistent compilation cache so each
process after the first skips most compile time.
"""

import dataclasses
import functools
import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax import checkpoint as ckpt_lib
from srft_jax import factory
from srft_jax import job
from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import step as step_lib
from srft_jax import supervise

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_file(name):
  """A file of configs/ (a folder of files, not a package), as a module."""
  return factory.load_config_module(os.path.join(REPO, "configs", f"{name}.py"))


def _assemble(*arrays, rewards, layout, adv=None):
  """assemble_batch with the advantages the trainer computes for `rewards`."""
  rewards = jnp.asarray(rewards)
  adv = step_lib.rollout_advantages(rewards, layout=layout, cfg=adv or obj.AdvantageConfig())
  return step_lib.assemble_batch(*arrays, rewards, adv, layout=layout)


DEFAULT = _config_file("default")

# Tiny settings shared by the in-process run and the subprocess runs.
TINY = {
  "warmup.steps": 0,
  "batch.prompts_per_step": 4,
  "batch.minibatches": 2,  # paper's mini-batching: 2 optimizer updates a step
  "rollout.n_rollouts": 3,
  "data.max_response_len": 64,
  "data.task_train_size": 200,
  "model.embed_dim": 32,
  "model.num_layers": 1,
  "model.mlp_dim": 64,
  "eval.n_id": 8,
  "eval.n_ood": 8,
  "eval.batch_size": 8,
  "log.progress": False,
}


def _config(tokenizer_path, **overrides):
  """The default config with TINY, the task tokenizer (conftest.py) and `overrides`."""
  return factory.with_overrides(
    DEFAULT.get_config(), {**TINY, "data.tokenizer": tokenizer_path, **overrides}
  )


# ----------------------------------------------------------------------------
# 1 + 8. End to end through job.run, with compile counting per step.
# ----------------------------------------------------------------------------

_COMPILES = {"on": False, "n": 0}


def _on_event(name, *_args, **_kw):
  if _COMPILES["on"] and name == "/jax/core/compile/backend_compile_duration":
    _COMPILES["n"] += 1


class _CountingIter:
  """Wraps a data iterator; records the compile count at each `next()`."""

  def __init__(self, inner):
    self.inner = inner
    self.counts = []

  def __iter__(self):
    return self

  def __next__(self):
    self.counts.append(_COMPILES["n"])
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, s):
    self.inner.set_state(s)

  def stats(self):
    return self.inner.stats()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tokenizer_path):
  """One `job.run` of a tiny Qwen3-MoE (q/k norms, 8 experts, top-2, the
  router's load-balancing loss) on a (data=4, expert=2) mesh: an SFT warm-up (6 steps, the random base
  model's start point is measured) then 5 SRFT steps, TensorBoard on."""
  workdir = str(tmp_path_factory.mktemp("e2e"))
  c = _config(
    tokenizer_path,
    **{
      "steps": 5,
      "warmup.steps": 6,
      "warmup.prompts_per_step": 8,
      "warmup.lr": 3e-3,
      "model.preset": "tiny_qwen3_moe",
      # experts over an `expert` mesh axis, rows over data x expert (8 devices)
      **({"mesh.data": 4, "mesh.expert": 2} if jax.device_count() >= 8 else {}),
      "model.embed_dim": 64,
      "model.num_layers": 2,
      "model.mlp_dim": 128,
      "log.tensorboard": True,
      "log.plots": True,
      "checkpoint.every": 2,
    },
  )
  iters = []
  real = factory.data_iter

  def counting(*a, **kw):
    it = _CountingIter(real(*a, **kw))
    iters.append(it)
    return it

  step_fns = []
  real_step = step_lib.jit_train_step

  def recording(*a):
    fn = real_step(*a)
    step_fns.append(fn)
    return fn

  jax.monitoring.register_event_duration_secs_listener(_on_event)
  _COMPILES.update(on=True, n=0)
  t0 = time.time()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(factory, "data_iter", counting)
    mp.setattr(step_lib, "jit_train_step", recording)
    results = job.run(factory.run_spec(c), workdir)
  _COMPILES["on"] = False
  return {
    "workdir": workdir,
    "config": c,
    "results": results,
    "iters": iters,
    "step_fns": step_fns,
    "wall_s": time.time() - t0,
  }


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


EXPECTED_KEYS = [
  "reward/rollout_mean",
  "reward/demo_mean",
  "loss/router_aux",
  "loss/entropy_rollout",
  "loss/entropy_demo",
  "loss/w_sft",
  "loss/w_rl",
  "loss/loss",
  "loss/sft",
  "loss/rl_demo",
  "loss/rl_self",
  "rollout/length_mean",
  "optim/grad_norm",
  "optim/lr",
  "tokens/sampled",
  "tokens/trained",
  "batch/real_token_fraction",
  "time/sample_s",
  "time/score_s",
  "time/step_s",
  "outcomes/correct",
  "nonfinite/total",
]


@pytest.mark.slow
def test_end_to_end_outputs(e2e):
  wd, r = e2e["workdir"], e2e["results"]
  rows = _rows(os.path.join(wd, "logs", "metrics.jsonl"))
  assert [x["step"] for x in rows] == list(range(5))
  for row in rows:
    missing = [k for k in EXPECTED_KEYS if k not in row]
    assert not missing, f"metrics.jsonl lacks {missing}"
    for k in EXPECTED_KEYS:
      assert isinstance(row[k], float) and np.isfinite(row[k]), (k, row[k])
    assert row["nonfinite/total"] == 0.0
    assert row["tokens/sampled"] > 0 and row["tokens/trained"] >= row["tokens/sampled"]
  assert glob.glob(os.path.join(wd, "logs", "tb", "events.out.tfevents.*"))
  for name in ("reward", "entropy", "response_length"):
    assert os.path.getsize(os.path.join(wd, "plots", f"{name}.png")) > 0
  with open(os.path.join(wd, "results.json")) as f:
    saved = json.load(f)
  assert saved["steps"] == 5 and saved["wall_s"] > 0
  for when in ("before", "after"):
    assert set(saved[when]) == {"id_acc", "ood_acc", "levels"}
    assert 0.0 <= saved[when]["id_acc"] <= 1.0 and 0.0 <= saved[when]["ood_acc"] <= 1.0
    # accuracy by difficulty level: Task-ID's levels 1-3, Task-OOD's 4 (its whole split)
    levels = saved[when]["levels"]
    assert set(levels) == {"task_id", "task_ood"} and set(levels["task_id"]) <= {"1", "2", "3"}
    assert levels["task_ood"] == {"4": saved[when]["ood_acc"]}
    assert all(0.0 <= v <= 1.0 for v in levels["task_id"].values())
  assert r["after"] == saved["after"]
  # The final checkpoint is the last step.
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints")).latest_step() == 5


@pytest.mark.slow
def test_end_to_end_sft_warmup_learns(e2e):
  """The demo negative log-likelihood of the random base model (loss at warm-up
  step 0, before any update) drops clearly after 5 SFT updates."""
  rows = _rows(os.path.join(e2e["workdir"], "base", "run", "logs", "metrics.jsonl"))
  nll = [x["loss/sft"] for x in rows]
  assert len(nll) == 6 and all(np.isfinite(nll))
  assert nll[0] > 4.0  # ~ log(vocab) for a random model
  assert nll[-1] < nll[0] - 1.0, nll


def _flat_params(tree):
  """{"layers/0/attn/k": array}: a parameter tree (an nnx State, or Orbax's
  plain dicts of it) by path, without the variables' trailing "value"."""
  out = {}
  for path, x in jax.tree.flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    out["/".join(n for n in names if n != "value")] = np.asarray(x)
  return out


@pytest.mark.slow
def test_end_to_end_hf_export_loads(e2e):
  """The HF export is a Qwen3-MoE checkpoint that loads, runs, and holds the
  final checkpoint's parameters exactly (every tensor: name, dtype, shape, values)."""
  import orbax.checkpoint as ocp

  from srft_jax import hf

  wd = e2e["workdir"]
  model = hf.load_model(os.path.join(wd, "export", "hf"))
  with open(os.path.join(wd, "export", "hf", "config.json")) as f:
    hf_config = json.load(f)
  assert hf_config["architectures"] == ["Qwen3MoeForCausalLM"]
  assert (hf_config["num_experts"], hf_config["num_experts_per_tok"]) == (8, 2)
  eos = hf_config["eos_token_id"]  # the task tokenizer's, so HF generate stops too
  with open(os.path.join(wd, "export", "hf", "generation_config.json")) as f:
    assert isinstance(eos, int) and eos in np.atleast_1d(json.load(f)["eos_token_id"])
  logits = model_lib.forward_logits(model, jnp.ones((1, 4), jnp.int32))
  assert bool(jnp.all(jnp.isfinite(logits)))
  mgr = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"))
  raw = mgr._mgr.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  ck, ex = _flat_params(raw["state"]["params"]), _flat_params(nnx.state(model, nnx.Param))
  assert sorted(ex) == sorted(ck)
  for name, want in ck.items():
    assert (ex[name].dtype, ex[name].shape) == (want.dtype, want.shape), name
    np.testing.assert_array_equal(ex[name], want, err_msg=name)


@pytest.mark.slow
def test_no_recompile_after_warmup(e2e):
  """After the first two steps (step 1 is the first to fetch the previous
  step's metrics), a step of the same stage compiles nothing: sampler,
  assembly, train step, metrics (backend compiles counted per step start)."""
  counts = e2e["iters"][-1].counts
  assert len(counts) == 5
  assert counts[4] - counts[2] == 0, f"compile count at each step start: {counts}"
  # Each stage's jitted, donated, sharded train step (warm-up SFT, then SRFT)
  # is built once and holds exactly one executable after all its steps.
  fns = {id(f): f for f in e2e["step_fns"]}
  assert len(fns) == 2 and len(e2e["step_fns"]) == 2
  for f in fns.values():
    assert f._cache_size() == 1


# ----------------------------------------------------------------------------
# 5 + 8. The train step directly: non-finite skip, one compilation.
# ----------------------------------------------------------------------------

SMALL = model_lib.ModelConfig(
  vocab_size=64,
  embed_dim=32,
  mlp_dim=64,
  num_layers=1,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  max_seq_len=64,
)


def _tiny_batch(seed, b=2, n=3, p=6, r=10, vocab=SMALL.vocab_size):
  """An assembled [b*(n+1), p+r] batch with random rollouts and rewards."""
  rs = np.random.RandomState(seed)
  ptok = rs.randint(1, vocab, (b, p)).astype(np.int32)
  pmask = np.ones((b, p), np.int32)
  pmask[0, :2] = 0
  rlen = rs.randint(3, r + 1, size=b * n)
  rmask = (np.arange(r)[None] < rlen[:, None]).astype(np.int32)
  rtok = rs.randint(1, vocab, (b * n, r)).astype(np.int32) * rmask
  rlogp = -rs.rand(b * n, r).astype(np.float32) * rmask
  dmask = (np.arange(r)[None] < r - 2).astype(np.int32).repeat(b, 0)
  dtok = rs.randint(1, vocab, (b, r)).astype(np.int32) * dmask
  rewards = rs.randint(0, 2, (b, n + 1)).astype(np.float32)
  rewards[:, -1] = 1.0
  return _assemble(
    ptok,
    pmask,
    rtok,
    rmask,
    rlogp,
    dtok,
    dmask,
    rewards=rewards.reshape(-1),
    layout=step_lib.GroupLayout(n, 1),
  )


@pytest.fixture(scope="module")
def tiny_step():
  model = model_lib.Transformer(SMALL, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tx, _ = step_lib.make_optimizer(1e-3, steps=10)
  cfg = step_lib.StepConfig(loss=obj.LossConfig.preset("srft"), minibatches=2)
  fn = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, cfg))
  return fn, params, tx


def _equal_trees(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_nonfinite_update_is_skipped_and_counted(tiny_step):
  fn, params, tx = tiny_step
  state = step_lib.init_train_state(params, tx)
  state, m = fn(state, _tiny_batch(0))
  assert float(m["skipped"]) == 0 and int(state["nonfinite_streak"]) == 0
  before = jax.tree.map(jnp.copy, state)
  bad = dict(_tiny_batch(1))
  bad["advantages"] = jnp.full_like(bad["advantages"], jnp.nan)
  for i in range(2):
    state, m = fn(state, bad)
    assert not np.isfinite(float(m["loss"]))
    assert float(m["skipped"]) == 2  # both mini-batch updates skipped
    assert int(state["nonfinite_total"]) == 2 * (i + 1)
    assert int(state["nonfinite_streak"]) == 2 * (i + 1)
    assert _equal_trees(state["params"], before["params"])
    assert _equal_trees(state["opt_state"], before["opt_state"])
  assert int(state["step"]) == 3
  state, m = fn(state, _tiny_batch(2))
  assert float(m["skipped"]) == 0 and np.isfinite(float(m["loss"]))
  assert int(state["nonfinite_streak"]) == 0 and int(state["nonfinite_total"]) == 4
  assert not _equal_trees(state["params"], before["params"])


def test_train_step_compiles_once(tiny_step):
  fn, params, tx = tiny_step
  state = step_lib.init_train_state(params, tx)
  n0 = fn._cache_size()
  for seed in range(3):
    state, _ = fn(state, _tiny_batch(10 + seed))
  assert fn._cache_size() - n0 <= 1 and fn._cache_size() >= 1
  state, _ = fn(state, _tiny_batch(20))
  assert fn._cache_size() - n0 <= 1


# ----------------------------------------------------------------------------
# 4. Checkpoints: a corrupted latest step falls back to the previous one.
# ----------------------------------------------------------------------------


def _small_state():
  model = model_lib.Transformer(SMALL, rngs=nnx.Rngs(0))
  _, params = nnx.split(model)
  tx, _ = step_lib.make_optimizer(1e-3, steps=10)
  return step_lib.init_train_state(params, tx)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_checkpoint_falls_back_past_corrupted_latest(tmp_path, caplog, damage):
  state = _small_state()
  d = str(tmp_path / "ck")
  ck = ckpt_lib.Checkpointer(d, keep=3, async_save=True)
  later = {**state, "step": state["step"] + 7}
  ck.save(1, state, {"pos": 1}, {"step": 1})
  ck.save(2, later, {"pos": 2}, {"step": 2})
  ck.wait()
  ck.close()
  # Damage every data file of step 2's state item.
  files = [
    f
    for f in glob.glob(os.path.join(d, "2", "state", "**", "*"), recursive=True)
    if os.path.isfile(f) and os.sep + "d" + os.sep in f
  ]
  assert files
  for f in files:
    if damage == "truncate":
      with open(f, "r+b") as fh:
        fh.truncate(max(os.path.getsize(f) // 3, 1))
    else:
      os.remove(f)
  ck = ckpt_lib.Checkpointer(d, keep=3)
  abstract = ckpt_lib.abstract_like(state)
  with caplog.at_level(logging.WARNING, logger="srft_jax.checkpoint"):
    out = ck.restore(abstract)
  assert out is not None
  step, restored, data_state, meta = out
  assert step == 1 and data_state == {"pos": 1} and meta == {"step": 1}
  assert int(restored["step"]) == 0
  assert _equal_trees(restored["params"], state["params"])
  assert any("unreadable" in r.getMessage() for r in caplog.records)
  # An explicit step does not fall back: TensorStore's read error of step 2 (a
  # ValueError: OUT_OF_RANGE when truncated, NOT_FOUND when deleted) comes through.
  unreadable = 'Error reading .* local file "' + re.escape(os.path.join(d, "2", "state"))
  with pytest.raises(ValueError, match=unreadable):
    ck.restore(abstract, step=2)
  ck.close()


def test_checkpoint_relative_directory(tmp_path, monkeypatch):
  # `--workdir=runs/x` is relative; Orbax itself only takes absolute paths.
  monkeypatch.chdir(tmp_path)
  state = _small_state()
  ck = ckpt_lib.Checkpointer(os.path.join("runs", "ck"), keep=2)
  ck.save(3, state, {"pos": 3}, {"step": 3})
  ck.wait()
  ck.close()
  assert os.path.isdir(tmp_path / "runs" / "ck" / "3")
  step, restored, data_state, _ = ckpt_lib.Checkpointer("runs/ck").restore(
    ckpt_lib.abstract_like(state)
  )
  assert step == 3 and data_state == {"pos": 3}
  assert _equal_trees(restored["params"], state["params"])


# ----------------------------------------------------------------------------
# 6. Config presets and validation.
# ----------------------------------------------------------------------------

PRESET_ARGS = sorted(obj.PRESETS) + sorted(DEFAULT.TWO_STAGE)


def test_sft_micro_batch_must_divide_the_data_axes():
  c = DEFAULT.get_config("sft")  # 4 prompts x 1 demo a micro-batch on 8 devices
  with pytest.raises(ValueError, match=r"config\.batch\.prompts_per_step: .*4 rows"):
    factory.run_spec(c)


@pytest.mark.parametrize("arg", [None] + PRESET_ARGS)
def test_default_presets_validate(arg):
  c = DEFAULT.get_config(arg)
  if jax.device_count() > 1:
    # The defaults size one laptop CPU; on the 8 forced devices every stage's
    # micro-batch must split over the data axis.
    with c.unlocked():
      c.batch.prompts_per_step = 16
  factory.run_spec(c)
  stages = factory.parse_stages(c.stages, c.steps, c.method)
  assert sum(n for _, n in stages) == c.steps
  for name, _ in stages:
    lc = factory.loss_config(name, dict(c.loss) if not c.stages else None, c.data.max_response_len)
    factory.stage_layout(lc, c.rollout.n_rollouts, c.rollout.n_demos)


@pytest.mark.parametrize("method", ["srft", "grpo", "luffy", "srft_code"])
def test_constant_len_takes_this_runs_response_length(method):
  # Dr.GRPO's normaliser is rows x this run's max response unless the config
  # pins it; switching aggregation on a preset that has no length must not fail.
  c = DEFAULT.get_config()
  with c.unlocked():
    c.method = method
    c.loss.aggregation = "constant_len"
    if method == "grpo":
      c.rollout.n_rollouts = 8  # as configs/default.py:grpo: 8 slots a prompt
    if jax.device_count() > 1:
      c.batch.prompts_per_step = 16  # as test_default_presets_validate
  factory.run_spec(c)
  lc = factory.loss_config(method, dict(c.loss), c.data.max_response_len)
  assert (lc.aggregation, lc.max_response_len) == ("constant_len", c.data.max_response_len)
  with c.unlocked():
    c.loss.max_response_len = 7
  assert factory.loss_config(method, dict(c.loss), c.data.max_response_len).max_response_len == 7


def _advantages(preset, rollout_rewards, demo_reward):
  """Rollout and demo advantages of one prompt's group as assemble_batch builds them."""
  n = len(rollout_rewards)
  layout = factory.stage_layout(obj.LossConfig.preset(preset), n, 1)
  b, p, r = 1, 3, 4
  ones = lambda *s: np.ones(s, np.int32)  # noqa: E731
  rewards = np.array(list(rollout_rewards) + [demo_reward], np.float32)
  batch = _assemble(
    ones(b, p),
    ones(b, p),
    ones(b * n, r),
    ones(b * n, r),
    np.zeros((b * n, r), np.float32),
    ones(b, r),
    ones(b, r),
    rewards=rewards,
    layout=layout,
    adv=obj.AdvantageConfig.preset(preset),
  )
  adv = np.asarray(batch["advantages"])
  return adv[:n], adv[n:]


def test_demo_joins_the_advantage_group_only_with_a_demo_rl_term():
  # sft_plus_rl = plain SFT beside GRPO: its rollouts' advantages are GRPO's,
  # over the rollouts alone (a successful demo must not push failed rollouts down).
  r = [1, 0, 0, 0, 0, 0, 0]
  mean, std = np.mean(r), np.std(r, ddof=1)
  grpo = (np.array(r) - mean) / (std + 1e-6)
  roll, demo = _advantages("sft_plus_rl", r, 1.0)
  np.testing.assert_allclose(roll, grpo, rtol=1e-6)
  assert demo.tolist() == [0.0]
  roll, _ = _advantages("sft_plus_rl", [0] * 7, 1.0)
  assert roll.tolist() == [0.0] * 7
  # SRFT and LUFFY: the augmented group (demo included, docs/method.md §1.3).
  aug = np.array(r + [1], np.float32)
  want = (aug - aug.mean()) / (aug.std(ddof=1) + 1e-6)
  for preset in ("srft", "luffy"):
    roll, demo = _advantages(preset, r, 1.0)
    np.testing.assert_allclose(np.concatenate([roll, demo]), want, rtol=1e-6)


@pytest.mark.parametrize(
  "name,arg",
  [
    ("srft_7b_tpu", None),
    ("srft_7b_tpu", "fsdp_tensor"),
    ("srft_7b_tpu", "lora"),
    ("srft_7b_tpu", "lora,fsdp_tensor"),
    ("srft_7b_tpu", "qwen3_30b_a3b"),
    ("srft_7b_tpu", "qwen3_30b_a3b,lora"),
    ("qwen2p5_1p5b_gpu", None),
  ],
)
def test_other_config_files_validate(name, arg):
  c = _config_file(name).get_config(arg)
  spec = factory.run_spec(c)
  if arg and "qwen3_30b_a3b" in arg:  # the AOT fit's step (docs/benchmarks.md); its own RoPE
    assert (c.model.preset, c.batch.microbatches) == ("qwen3_30b_a3b", 32)
    assert set(spec.model.hf_overrides()) == {"attention"}
  if arg and "lora" in arg:
    assert spec.lora.rank == 32 and spec.model.param_dtype == "bfloat16"
  assert (c.mesh.tensor == 4) == bool(arg and "fsdp_tensor" in arg)


def test_config_file_args_are_checked():
  with pytest.raises(ValueError, match="unknown args \\['lora2'\\]"):
    _config_file("srft_7b_tpu").get_config("lora2")


def test_model_attention_settings_reach_the_model():
  """config.model.attention / decode_attention override the preset's ("" keeps it)."""
  c = DEFAULT.get_config()
  vocab = types.SimpleNamespace(vocab_size=64)
  base = factory.run_spec(c, validate=False).model.config(vocab.vocab_size)
  with c.unlocked():
    c.model.attention = "chunked"
    c.model.decode_attention = "pallas"
  mcfg = factory.run_spec(c, validate=False).model.config(vocab.vocab_size)
  assert (mcfg.attention, mcfg.decode_attention) == ("chunked", "pallas")
  assert (base.attention, base.decode_attention) == ("xla", "xla")
  gpu = _config_file("qwen2p5_1p5b_gpu").get_config()
  assert (
    factory.run_spec(gpu, validate=False).model.config(vocab.vocab_size).decode_attention
    == "pallas"
  )


def _bad(field, value):
  return factory.with_overrides(DEFAULT.get_config(), {field: value})


@pytest.mark.parametrize(
  "field,value,named",
  [
    ("method", "ppo", "config.method"),
    ("batch.minibatches", 3, "config.batch.minibatches"),
    ("batch.microbatches", 3, "config.batch.microbatches"),
    ("loss.aggregation", "mean_of_means", "config.loss"),
    ("loss.sft_weight", "entropy_sq", "config.loss"),
    ("stages", "sft:10,dpo", "config.stages"),
    ("steps", 0, "config.steps"),
    ("optim.lr", -1.0, "config.optim.lr"),
    ("optim.schedule", "step", "config.optim.schedule"),
    ("warmup.schedule", "cosine_restarts", "config.warmup.schedule"),
    ("warmup.lr", 0.0, "config.warmup.lr"),
    ("data.source", "web", "config.data.source"),
    ("model.preset", "gpt5", "config.model.preset"),
    ("model.attention", "flash", "config.model.attention"),
    ("model.decode_attention", "triton", "config.model.decode_attention"),
    ("sharding_rules", "experts=fsdp", "config.sharding_rules"),
    ("sharding_rules", "expert=fsdp+fsdp", "config.sharding_rules"),
    ("checkpoint.io_retry_s", 0.0, "config.checkpoint.io_retry_s"),
  ],
)
def test_bad_config_names_field(field, value, named):
  with pytest.raises(ValueError) as e:
    factory.run_spec(_bad(field, value))
  assert named in str(e.value)
  if named == "config.loss":
    assert field.split(".")[1] in str(e.value)


@pytest.mark.multidevice
def test_micro_batches_split_rows_without_shared_prefix():
  """The 7B recipe (shared_prefix off) takes one row a data shard: 512 rows a
  mini-batch in 128 micro-batches of 4 rows, each split over 4 FSDP shards
  (a group of 8 rows spans 2 micro-batches, as the step allows: see
  test_micro_batches_and_response_only_logprobs_match_plain_step). With
  shared_prefix a micro-batch must hold whole groups."""
  c = _config_file("srft_7b_tpu").get_config()
  with c.unlocked():
    c.batch.microbatches = 128
    c.mesh.update(data=1, fsdp=4, tensor=2)
  factory.run_spec(c)
  for field, value in (("batch.microbatches", 96), ("shared_prefix", True)):
    bad = factory.with_overrides(c, {field: value})
    with pytest.raises(ValueError, match=r"config\.batch\.microbatches"):
      factory.run_spec(bad)


def test_unknown_config_key_is_rejected():
  c = DEFAULT.get_config()
  with pytest.raises(AttributeError):
    c.optim.learning_rate = 1e-3  # locked ConfigDict: unknown keys never slip through


def test_bad_config_fails_before_compiling(tmp_path):
  """`run` validates before building anything (no compile, no workdir files)."""
  c = _bad("batch.minibatches", 3)
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  _COMPILES.update(on=True, n=0)
  try:
    with pytest.raises(ValueError, match="batch.minibatches"):
      job.run(factory.run_spec(c), str(tmp_path / "w"))
  finally:
    _COMPILES["on"] = False
  assert _COMPILES["n"] == 0
  assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------
# 7. The 7B preset's train step traces abstractly (no allocation).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["preset", "config_file"])
@pytest.mark.slow
def test_7b_train_step_eval_shape(source):
  """`qwen2_5_math_7b` as preset (bf16 params) and as configs/srft_7b_tpu.py
  builds it (rope 40k, bf16 compute, f32 master weights, remat)."""
  if source == "preset":
    cfg = model_lib.ModelConfig.preset("qwen2_5_math_7b")
  else:
    cfg = factory.run_spec(_config_file("srft_7b_tpu").get_config(), validate=False).model.config(0)
  abstract = model_lib.abstract_model(cfg)
  graphdef, params = nnx.split(abstract)
  assert model_lib.count_params(abstract) > 7e9
  tx, _ = step_lib.make_optimizer(1e-6, steps=500)
  state = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx), params)
  b, t = 2, 1024
  sds = jax.ShapeDtypeStruct
  batch = {
    "tokens": sds((b, t), jnp.int32),
    "mask": sds((b, t), jnp.int32),
    "response_mask": sds((b, t - 1), jnp.int32),
    "old_logp": sds((b, t - 1), jnp.float32),
    "is_demo": sds((b,), jnp.bool_),
    "rewards": sds((b,), jnp.float32),
    "advantages": sds((b,), jnp.float32),
  }
  step_cfg = step_lib.StepConfig(
    loss=obj.LossConfig.preset("srft"), minibatches=2, microbatches=1, logit_chunk=512
  )
  new_state, metrics = jax.eval_shape(
    functools.partial(step_lib.train_step, graphdef, tx, step_cfg), state, batch
  )
  for a, b_ in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert a.shape == b_.shape and a.dtype == b_.dtype
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
  assert metrics["grad_norm"].shape == ()
  if cfg.param_dtype == "float32":
    assert metrics["grad_norm"].dtype == jnp.float32


@functools.cache
def _micro_batch_case():
  """One SRFT batch (two groups of 4 rows sharing a prompt), the model, and the
  reference update: one micro-batch over the full rows (computed once)."""
  cfg = model_lib.ModelConfig(
    vocab_size=48, embed_dim=32, mlp_dim=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16
  )
  graphdef, params = nnx.split(model_lib.create_model(cfg, seed=4))
  tx, _ = step_lib.make_optimizer(1e-2, steps=10)
  rs = np.random.RandomState(0)
  b, t = 8, 12
  mask = np.ones((b, t), np.int32)
  mask[4:, :3] = 0  # left padding on the second group's prompt (columns 0..5)
  mask[::2, -4:] = 0  # right padding on some responses
  mask[3, 7:] = 0
  response = mask[:, 1:].copy()
  response[:, :5] = 0  # targets 5..10 are the response: its last 6 target columns
  tokens = rs.randint(1, 48, (b, t))
  tokens[:, :6] = np.repeat(tokens[::4, :6], 4, axis=0)  # groups of 4 rows share a prompt
  batch = {
    "tokens": jnp.asarray(tokens, jnp.int32),
    "mask": jnp.asarray(mask),
    "response_mask": jnp.asarray(response),
    "old_logp": jnp.asarray(-rs.rand(b, t - 1), jnp.float32),
    "is_demo": jnp.asarray(np.arange(b) % 4 == 3),
    "rewards": jnp.asarray(rs.randint(0, 2, b), jnp.float32),
    "advantages": jnp.asarray(rs.randn(b), jnp.float32),
  }
  loss_cfg = dataclasses.replace(obj.LossConfig.preset("srft"), entropy_granularity="batch")

  def step(micro, response_len, group):
    step_cfg = step_lib.StepConfig(
      loss=loss_cfg,
      minibatches=1,
      microbatches=micro,
      logit_chunk=16,
      response_len=response_len,
      group=group,
    )
    state = step_lib.init_train_state(params, tx)
    return jax.jit(functools.partial(step_lib.train_step, graphdef, tx, step_cfg))(state, batch)

  return params, step, step(1, 0, 0)


@pytest.mark.parametrize(
  "micro,response_len,group", [(2, 0, 0), (1, 6, 0), (4, 6, 0), (1, 6, 4), (2, 6, 4)]
)
@pytest.mark.slow
def test_micro_batches_and_response_only_logprobs_match_plain_step(micro, response_len, group):
  """Two or four micro-batches (an entropy pre-pass for the batch-level H, then
  summed gradients; four split each group of 4 rows, as shared_prefix=False
  allows), response-only log-probs (`response_len`: no LM head on the
  prompt) and the shared-prefix forward (`group`: each group's prompt runs
  once) give the update of one micro-batch over the full rows."""
  params, step, (s1, m1) = _micro_batch_case()
  s2, m2 = step(micro, response_len, group)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
  moved = 0.0
  for a, c, p0 in zip(
    jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), jax.tree.leaves(params)
  ):
    # Adam's first step is ~lr * sign(g): 1e-5 is 1/1000 of it.
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-5)
    moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(p0)).max()))
  assert moved > 1e-3  # the step really updated the parameters


# ----------------------------------------------------------------------------
# 2 + 3. Subprocess runs: exact resume after SIGKILL, SIGTERM preemption.
# ----------------------------------------------------------------------------

N_STEPS = 6


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tokenizer_path):
  """`start(workdir, extra=None)`: a `python -m srft_jax.main` process
  (helpers.MainJob, logging to `<workdir>.log`) with tiny overrides (a tiny
  dense Qwen3) and `extra`; a shared persistent compilation cache makes every
  process after the first start fast."""
  env = dict(os.environ, **helpers.compilation_cache_env(tmp_path_factory.mktemp("jax_cache")))
  overrides = {
    **TINY,
    "model.preset": "tiny_qwen3",
    "steps": N_STEPS,
    "data.tokenizer": tokenizer_path,
    "eval.before": False,
    "eval.after": False,
    "log.tensorboard": False,
    "log.plots": False,
    "checkpoint.every": 1,
    "checkpoint.keep": 3,
    "checkpoint.async_save": True,
    "seed": 3,
  }

  def start(workdir, extra=None):
    return helpers.MainJob(workdir, {**overrides, **(extra or {})}, env=env)

  start.overrides, start.env = overrides, env
  return start


def _finished_steps(workdir):
  d = os.path.join(str(workdir), "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def _wait_for_checkpoint(run, workdir, min_step, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    steps = _finished_steps(workdir)
    if steps and steps[-1] >= min_step:
      return steps[-1]
    if run.poll() is not None:
      return None
    time.sleep(0.05)
  return None


def _final_state(workdir, step):
  import orbax.checkpoint as ocp

  mgr = ocp.CheckpointManager(
    os.path.join(str(workdir), "checkpoints"), item_names=ckpt_lib.Checkpointer.ITEMS
  )
  out = mgr.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
  )
  mgr.close()
  return jax.tree.map(np.asarray, out["state"]), out["data"]


# LoRA on (adapters with dropout: the masks must be redrawn alike on resume).
LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tokenizer_path):
  """Overrides of an `srft_opd` run (docs/method.md §19.6): a tiny random
  teacher of another shape on the task tokenizer, the exact KL on rollouts
  and demonstrations."""
  from srft_jax import hf
  from srft_jax import tokenizer as tok_lib

  path = str(tmp_path_factory.mktemp("teacher") / "hf")
  vocab = tok_lib.load_tokenizer(tokenizer_path).vocab_size
  cfg = dataclasses.replace(SMALL, vocab_size=vocab, embed_dim=48, num_layers=1, max_seq_len=256)
  hf.save_model(model_lib.create_model(cfg, seed=11), path)
  return {
    "method": "srft_opd",
    "loss.distill_estimator": "full",
    "loss.distill_on_demos": True,
    "teacher.hf_path": path,
    "teacher.tokenizer": tokenizer_path,
  }


@pytest.fixture(scope="module")
def straight(cli, tmp_path_factory):
  wd = tmp_path_factory.mktemp("straight") / "run"
  rc, out = cli(wd).wait()
  assert rc == 0, out[-3000:]
  return wd


@pytest.fixture(scope="module")
def straight_lora(cli, tmp_path_factory):
  wd = tmp_path_factory.mktemp("straight_lora") / "run"
  rc, out = cli(wd, extra=LORA).wait()
  assert rc == 0, out[-3000:]
  return wd


@pytest.fixture(scope="module")
def straight_teacher(cli, teacher_run, tmp_path_factory):
  wd = tmp_path_factory.mktemp("straight_teacher") / "run"
  rc, out = cli(wd, extra=teacher_run).wait()
  assert rc == 0, out[-3000:]
  return wd


def _assert_bitwise_equal(wd_a, wd_b, lora=False):
  sa, da = _final_state(wd_a, N_STEPS)
  sb, db = _final_state(wd_b, N_STEPS)
  assert da == db
  la, ta = jax.tree.flatten_with_path(sa)
  lb, tb = jax.tree.flatten_with_path(sb)
  assert ta == tb
  diff = [
    jax.tree_util.keystr(p)
    for (p, x), (_, y) in zip(la, lb)
    if x.dtype != y.dtype or x.tobytes() != y.tobytes()
  ]
  assert not diff, f"{len(diff)} leaves differ, e.g. {diff[:5]}"
  exported = ["hf/model.safetensors"] + (["peft/adapter_model.safetensors"] if lora else [])
  for name in exported:
    with open(os.path.join(str(wd_a), "export", name), "rb") as f:
      ha = f.read()
    with open(os.path.join(str(wd_b), "export", name), "rb") as f:
      hb = f.read()
    assert ha == hb, name


@pytest.mark.slow
def test_exact_resume_after_sigkill_under_the_supervisor(cli, straight, tmp_path):
  """The job SIGKILLed after a checkpoint, under `python -m srft_jax.supervise`
  (launch/*.sh --supervise): restarted unattended, it resumes and ends bitwise
  the unbroken run, each metrics row once."""
  wd = tmp_path / "killed"
  env = dict(cli.env, PYTHONUNBUFFERED="1")
  env.pop("PYTEST_CURRENT_TEST", None)
  with open(tmp_path / "supervised.log", "w") as log:
    sup = subprocess.Popen(
      [sys.executable, "-m", "srft_jax.supervise", f"--workdir={wd}", "--backoff_s=0.2"]
      + ["--max_stalled_restarts=1", "--", *helpers.main_command(wd, cli.overrides)],
      cwd=helpers.ROOT,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    try:
      k = _wait_for_checkpoint(sup, wd, 2)
      (start,) = [
        e for e in supervise.read_log(str(wd / supervise.LOG_NAME)) if e["event"] == "start"
      ]
      os.killpg(start["pid"], signal.SIGKILL)  # the job's machine is gone, not the supervisor's
      rc = sup.wait(timeout=300)
    finally:
      if sup.poll() is None:
        sup.kill()
  out = (tmp_path / "supervised.log").read_text()
  assert k is not None and rc == supervise.EXIT_DONE, out[-3000:]
  events = supervise.read_log(str(wd / supervise.LOG_NAME))
  assert [e["event"] for e in events] == "supervise start exit restart start exit done".split()
  killed = events[2]
  assert killed["rc"] == -signal.SIGKILL and 1 <= killed["latest_step"] < N_STEPS
  assert _resumed_step(out) >= 1
  _assert_bitwise_equal(straight, wd)
  rows = [json.loads(x) for x in (wd / "logs" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(N_STEPS))


def _resumed_step(log_text):
  m = re.findall(r"resumed from step (\d+)", log_text)
  return int(m[-1]) if m else -1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "teacher"])
def test_sigterm_saves_and_resumes(cli, kind, request, tmp_path):
  """SIGTERM saves the current step; the rerun resumes there and ends bitwise
  where the unbroken run ends: with LoRA (adapters, their Adam state, the
  dropout masks, the PEFT export) and with a distillation teacher (loaded
  again, checked against the checkpoint's hash, never saved). Both run the
  SIGTERM path a plain run takes; a plain run's exact resume is
  test_exact_resume_after_sigkill_under_the_supervisor's."""
  lora = kind == "lora"
  straight = request.getfixturevalue({"full": "straight"}.get(kind, f"straight_{kind}"))
  extra = {"lora": LORA, "teacher": request.getfixturevalue("teacher_run")}.get(kind)
  wd = tmp_path / "term"
  run = cli(wd, extra)
  assert _wait_for_checkpoint(run, wd, 1) is not None
  run.signal(signal.SIGTERM)
  rc, out = run.wait()
  assert rc == 0, out[-3000:]
  assert "preempted at step" in out
  k = _finished_steps(wd)[-1]
  assert k < N_STEPS, "the run ended before SIGTERM was handled"
  rc, out = cli(wd, extra).wait()
  assert rc == 0, out[-3000:]
  assert _resumed_step(out) == k
  _assert_bitwise_equal(straight, wd, lora=lora)
