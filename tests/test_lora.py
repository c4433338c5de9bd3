"""LoRA: adapters start at the base exactly; merged and unmerged
forwards agree; the optimizer and gradients see adapters only; every preset
steps; the KL reference is the base with adapters off; dropout is PEFT's
and training-only; sharded equals single device on the 8-device mesh; PEFT
export loads into `peft` on the transformers base (Qwen2, Llama) and imports
back; checkpoints hold adapters only and refuse another base. The sampler's
agreement with the trainer and the exact resume after SIGKILL run with LoRA on
in tests/test_sampler.py and tests/test_train.py."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax import checkpoint as ckpt_lib
from srft_jax import factory
from srft_jax import hf
from srft_jax import lora
from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import peft as peft_lib
from srft_jax import rewards as rewards_lib
from srft_jax import sharding as shd
from srft_jax import step as step_lib
from srft_jax import trainer as trainer_lib

import helpers

SMALL = model_lib.ModelConfig(
  vocab_size=64,
  embed_dim=32,
  mlp_dim=64,
  num_layers=1,  # one layer: every program compiles fast (LoRA is per layer anyway)
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  max_seq_len=64,
)
LCFG = lora.LoRAConfig(rank=4, alpha=8.0)


def _randomize_b(model, scale=0.2, seed=1):
  """B drawn at random (host values, so any sharding gets the same numbers):
  an adapted model that differs from its base."""
  graphdef, adapters, base = lora.split(model)
  rs = np.random.RandomState(seed)
  flat = []
  for path, v in nnx.to_flat_state(adapters):
    x = v.get_value()
    if str(path[-1]).endswith("_lora_b"):
      new = (scale * rs.standard_normal(x.shape)).astype(np.float32)
      x = jax.device_put(new, x.sharding) if hasattr(x, "sharding") else jnp.asarray(new)
    flat.append((path, v.replace(x)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat), base)


def _adapted(cfg=SMALL, lcfg=LCFG, seed=0, mesh=None, b_scale=0.2):
  model = lora.attach(model_lib.create_model(cfg, seed=seed, mesh=mesh), lcfg, mesh)
  return _randomize_b(model, b_scale) if b_scale else model


def _tokens(b=3, t=12, seed=0, vocab=SMALL.vocab_size):
  rs = np.random.RandomState(seed)
  mask = np.ones((b, t), np.int32)
  mask[1, :3] = 0
  return rs.randint(1, vocab, (b, t)).astype(np.int32), mask


_forward = nnx.jit(model_lib.forward_logits)


# ----------------------------------------------------------------------------
# Model: init, merged vs unmerged, dtypes, config
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_adapted_model_equals_base_exactly_at_init():
  model = model_lib.create_model(SMALL, seed=0)
  tok, mask = _tokens()
  base = np.asarray(_forward(model, tok, mask))
  lora.attach(model, LCFG)
  n_adapters = len(jax.tree.leaves(nnx.state(model, lora.ADAPTER)))
  assert n_adapters == 2 * 7 * SMALL.num_layers
  np.testing.assert_array_equal(np.asarray(_forward(model, tok, mask)), base)
  # The sampler's fused decode weights too: W + scale * A @ 0 is W, bit for bit.
  plain = lora.merged(model)
  weights = nnx.jit(lambda m: m.decode_weights())
  for w_ad, w_base in zip(jax.tree.leaves(weights(model)), jax.tree.leaves(weights(plain))):
    np.testing.assert_array_equal(np.asarray(w_ad), np.asarray(w_base))


@pytest.mark.slow
def test_merged_and_unmerged_forwards_agree():
  model = _adapted()
  tok, mask = _tokens()
  unmerged = np.asarray(_forward(model, tok, mask))
  merged = lora.merged(model)
  assert not lora.has_adapters(merged) and lora.has_adapters(model)
  np.testing.assert_allclose(np.asarray(_forward(merged, tok, mask)), unmerged, atol=2e-5)
  base = np.asarray(_forward(lora.merged(_adapted(b_scale=0)), tok, mask))
  assert np.abs(unmerged - base).max() > 0.05  # the adapters do move the logits


@pytest.mark.slow
def test_adapters_float32_on_a_bfloat16_base_and_targets():
  cfg = dataclasses.replace(SMALL, param_dtype="bfloat16", dtype="bfloat16")
  model = _adapted(cfg, lora.LoRAConfig(rank=2, alpha=4.0, targets=("q", "v")))
  _, adapters, base = lora.split(model)
  assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
  assert {str(p[-1]) for p, _ in nnx.to_flat_state(adapters)} == {
    "q_lora_a",
    "q_lora_b",
    "v_lora_a",
    "v_lora_b",
  }
  assert lora.config_of(model) == lora.LoRAConfig(rank=2, alpha=4.0, targets=("q", "v"))


def _cfg(**lora_fields):
  c = factory.load_config_module(
    os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.py")
  ).get_config()
  with c.unlocked():
    for k, v in lora_fields.items():
      c.lora[k] = v
  return c


@pytest.mark.parametrize(
  "field,value",
  [("rank", -1), ("alpha", 0.0), ("targets", ("q", "attn")), ("dropout", 1.0)],
)
def test_bad_lora_config_names_field(field, value):
  with pytest.raises(factory.ConfigError, match=f"config.lora.{field}"):
    factory.run_spec(_cfg(**{"rank": 8, field: value}))


def test_lora_config_is_frozen_from_the_config():
  assert not factory.run_spec(_cfg(), validate=False).lora.enabled
  lc = factory.run_spec(_cfg(rank=8, alpha=32.0, targets=("q", "k"), init_seed=3)).lora
  assert lc == lora.LoRAConfig(rank=8, alpha=32.0, targets=("q", "k"), init_seed=3)
  assert lc.scale == 4.0
  with pytest.raises(dataclasses.FrozenInstanceError):
    lc.rank = 2


# ----------------------------------------------------------------------------
# Train step: adapters only, presets, KL reference, sharding
# ----------------------------------------------------------------------------


def _batch(layout: step_lib.GroupLayout, seed=0, b=2, p=6, r=10, vocab=SMALL.vocab_size):
  rs = np.random.RandomState(seed)
  n, d = layout.n_rollouts, layout.n_demos
  ptok = rs.randint(1, vocab, (b, p)).astype(np.int32)
  pmask = np.ones((b, p), np.int32)
  pmask[0, :2] = 0
  rlen = rs.randint(3, r + 1, size=b * n)
  rmask = (np.arange(r)[None] < rlen[:, None]).astype(np.int32)
  rtok = rs.randint(1, vocab, (b * n, r)).astype(np.int32) * rmask
  rlogp = -rs.rand(b * n, r).astype(np.float32) * rmask
  dmask = (np.arange(r)[None] < r - 2).astype(np.int32).repeat(b, 0)
  dtok = rs.randint(1, vocab, (b, r)).astype(np.int32) * dmask
  rewards = rs.randint(0, 2, (b, n + d)).astype(np.float32)
  rewards[:, n:] = 1.0
  rewards = jnp.asarray(rewards.reshape(-1))
  adv = step_lib.rollout_advantages(rewards, layout=layout, cfg=obj.AdvantageConfig())
  roll = (rtok, rmask, rlogp) if n else (None, None, None)
  return step_lib.assemble_batch(ptok, pmask, *roll, dtok, dmask, rewards, adv, layout=layout)


def _setup(preset="srft", mesh=None, **loss_overrides):
  model = _adapted(mesh=mesh)
  graphdef, adapters, base = lora.split(model)
  lc = obj.LossConfig.preset(preset, **loss_overrides)
  layout = factory.stage_layout(lc, 3, 1)
  cfg = step_lib.StepConfig(
    loss=lc,
    minibatches=2,
    microbatches=1,
    reference=lc.use_self_rl and lc.kl_coef > 0,
    recompute_old_logp=lc.is_correction != "none",
  )
  tx, _ = step_lib.make_optimizer(1e-2, steps=10)
  return graphdef, adapters, base, cfg, tx, _batch(layout)


@pytest.mark.parametrize("preset", ["srft", "sft"])
@pytest.mark.slow
def test_gradients_reach_adapters_only(preset):
  """The train state is the adapters (+ their Adam moments): the step's
  gradient is taken w.r.t. them alone, each of them moves, the base (an
  argument of the step) comes out bit for bit as it went in."""
  graphdef, adapters, base, cfg, tx, batch = _setup(preset)
  state = step_lib.init_train_state(adapters, tx)
  names = {str(p[-1]) for p, _ in nnx.to_flat_state(state["params"])}
  assert names == {f"{t}_lora_{x}" for t in lora.TARGETS for x in "ab"}
  # No optimizer state for the base: Adam's moments are the adapters' shapes.
  n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
  assert sum(x.size for x in moments) == 2 * n_adapter
  base_before = jax.tree.map(np.asarray, base)
  fn = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, cfg))
  new, metrics = fn(state, batch, None, base)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0
  for before, after in zip(jax.tree.leaves(adapters), jax.tree.leaves(new["params"])):
    assert np.abs(np.asarray(after) - np.asarray(before)).max() > 0  # every adapter moved
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), base_before)
  # More batches of the same shapes: no recompilation once the step's own
  # output state is its input (the first call's fresh state may trace once more).
  layout = factory.stage_layout(cfg.loss, 3, 1)
  new, _ = fn(new, _batch(layout, seed=1), None, base)
  n = fn._cache_size()
  fn(new, _batch(layout, seed=2), None, base)
  assert fn._cache_size() == n <= 2


@pytest.mark.slow
def test_every_preset_traces_a_lora_step():
  """Every loss preset builds its LoRA train step (traced, not compiled): the
  new state is the adapters' tree, the metrics are scalars."""
  for preset in obj.PRESETS:
    graphdef, adapters, base, cfg, tx, batch = _setup(preset)
    ref = lora.zeros_like(adapters) if cfg.reference else None
    state = step_lib.init_train_state(adapters, tx)
    fn = functools.partial(step_lib.train_step, graphdef, tx, cfg)
    new, metrics = jax.eval_shape(fn, state, batch, ref, base)
    assert jax.tree.structure(new["params"]) == jax.tree.structure(adapters), preset
    assert metrics["loss"].shape == () and "grad_norm" in metrics, preset


@pytest.mark.slow
def test_token_change_of_adapters_against_their_base():
  """The token-change probe of a LoRA policy scores its base as the same
  weights with the adapters off: what the merged policy against the plain
  base gives."""
  from srft_jax import token_change as tc

  base = model_lib.create_model(SMALL, seed=0)
  policy = _randomize_b(lora.attach(model_lib.create_model(SMALL, seed=0), LCFG), 0.5)
  tok, mask = _tokens(b=4, t=12)
  resp = np.zeros_like(mask)
  resp[:, 6:] = 1
  # A random tiny model's probabilities are all near 1/64: a small threshold.
  got = tc.token_change(None, policy, tok, mask, resp, threshold=2e-3)
  want = tc.token_change(base, lora.merged(policy), tok, mask, resp, threshold=2e-3)
  assert 0 < got["n_moved"] == want["n_moved"] < got["n_tokens"]
  np.testing.assert_allclose(got["mean_abs_dp"], want["mean_abs_dp"], rtol=1e-4)
  np.testing.assert_allclose(got["entropy_edges"], want["entropy_edges"], rtol=1e-5)


@pytest.mark.slow
def test_kl_reference_is_the_base_with_adapters_off():
  graphdef, adapters, base, cfg, tx, batch = _setup("grpo", kl_coef=0.1)
  assert cfg.reference
  zero = lora.zeros_like(adapters)
  logprobs = jax.jit(step_lib.sequence_logprobs, static_argnums=0)
  ref = logprobs(graphdef, zero, batch["tokens"], batch["mask"], frozen=base)[0]
  plain = lora.merged(nnx.merge(graphdef, zero, base))
  g2, p2 = nnx.split(plain)
  want = logprobs(g2, p2, batch["tokens"], batch["mask"])[0]
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(want))
  state = step_lib.init_train_state(adapters, tx)
  fn = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, cfg))
  _, metrics = fn(state, batch, zero, base)
  # The policy differs from the base (random B): the KL term is positive.
  assert float(metrics["kl"]) > 0


@pytest.mark.slow
def test_adapter_dropout_matches_numpy_and_is_training_only():
  """lora.dropout: the adapter's input is dropped (PEFT's lora_dropout) in the
  forward that gets a key, and only there; the dropped delta equals an
  independent NumPy formula on the same mask; its mean over masks is the
  undropped delta; a step is a pure function of (state, batch) (so resume
  stays exact) and draws new masks at the next step."""
  rate = 0.5
  model = _adapted(dataclasses.replace(SMALL, remat="full"))  # keys pass through remat
  lora.set_dropout(model, rate)
  assert lora.config_of(model).dropout == rate
  tok, mask = _tokens()
  # Without a key (sampling, evaluation, old/ref log-probs): no dropout at all.
  plain = nnx.clone(model)
  lora.set_dropout(plain, 0.0)
  np.testing.assert_array_equal(
    np.asarray(_forward(model, tok, mask)), np.asarray(_forward(plain, tok, mask))
  )
  # One projection's delta against NumPy, on the mask the key draws.
  mlp = model.layers[0].mlp
  x = np.random.RandomState(3).standard_normal((2, 5, SMALL.embed_dim)).astype(np.float32)
  key = jax.random.key(7)
  got = np.asarray(model_lib.lora_delta(mlp, "up", jnp.asarray(x), dropout_key=key))
  keep = np.asarray(
    jax.random.bernoulli(jax.random.fold_in(key, model_lib.LORA_STREAMS["up"]), 1 - rate, x.shape)
  )
  assert 0.3 < keep.mean() < 0.7
  a, b, scale = (np.asarray(v, np.float64) for v in model_lib.lora_adapter(mlp, "up"))
  want = scale * ((np.where(keep, x / (1 - rate), 0.0) @ a) @ b)
  np.testing.assert_allclose(got, want, atol=1e-5)
  undropped = scale * ((x.astype(np.float64) @ a) @ b)
  assert np.abs(got - undropped).max() > 1e-3
  deltas = jax.vmap(lambda k: model_lib.lora_delta(mlp, "up", jnp.asarray(x), dropout_key=k))(
    jax.random.split(jax.random.key(0), 4000)
  )
  err = np.abs(np.asarray(deltas).mean(0) - undropped).max()
  assert err < 0.1 * np.abs(undropped).max()
  # The train step: the loss forward drops, deterministically per step.
  graphdef, adapters, base = lora.split(model)
  lc = obj.LossConfig.preset("srft")
  layout = factory.stage_layout(lc, 3, 1)
  cfg = step_lib.StepConfig(loss=lc, dropout_seed=5)
  tx, _ = step_lib.make_optimizer(1e-2, steps=10)
  fn = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, cfg))
  state, batch = step_lib.init_train_state(adapters, tx), _batch(layout)
  s1, m1 = fn(state, batch, None, base)
  s1b, m1b = fn(state, batch, None, base)
  jax.tree.map(np.testing.assert_array_equal, s1["params"], s1b["params"])
  g0, a0, b0 = lora.split(plain)
  fn0 = jax.jit(functools.partial(step_lib.train_step, g0, tx, cfg))
  _, m0 = fn0(step_lib.init_train_state(a0, tx), batch, None, b0)
  assert abs(float(m1["loss"]) - float(m0["loss"])) > 1e-6  # the masks changed the loss
  later = {**state, "step": state["step"] + 1}
  _, m2 = fn(later, batch, None, base)
  assert float(m2["loss"]) != float(m1["loss"])  # another step, other masks


@pytest.mark.multidevice
@pytest.mark.slow
def test_sharded_step_equals_single_device():
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, adapters, base, cfg, tx, batch = _setup("srft")
  state = step_lib.init_train_state(adapters, tx)
  want, m_want = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, cfg))(
    state, batch, None, base
  )
  _, s_adapters, s_base, *_ = _setup("srft", mesh=mesh)
  # The adapters shard like the layer they adapt.
  a = nnx.state(nnx.merge(graphdef, s_adapters, s_base), lora.ADAPTER)
  spec = a["layers"][0]["mlp"]["gate_lora_b"].get_value().sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, "tensor")
  s_state = step_lib.init_train_state(s_adapters, tx)
  state_sh = step_lib.state_shardings(s_state, mesh, SMALL.rules)
  s_state = jax.device_put(s_state, state_sh)
  batch_sh = step_lib.batch_shardings(batch, mesh, SMALL.rules)
  frozen_sh = shd.state_shardings(s_base, mesh, SMALL.rules)
  fn = step_lib.jit_train_step(graphdef, tx, cfg, state_sh, batch_sh, None, frozen_sh)
  with jax.set_mesh(mesh):
    got, m_got = fn(s_state, jax.device_put(batch, batch_sh), None, s_base)
  np.testing.assert_allclose(float(m_got["loss"]), float(m_want["loss"]), rtol=1e-5)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6),
    got["params"],
    want["params"],
  )


# ----------------------------------------------------------------------------
# Sampler: fused W + scale A B; log-probs equal the trainer's recomputation
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# PEFT: export loads into `peft` on the transformers base; import continues
# ----------------------------------------------------------------------------


def _torch_logits(ref, tokens, mask):
  import torch

  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return ref(
      torch.tensor(tokens, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      position_ids=torch.tensor(positions, dtype=torch.long),
    ).logits.numpy()


def _load_hf(path):
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(
    path, attn_implementation="eager", torch_dtype="float32"
  ).eval()


@pytest.mark.parametrize("kind", ["qwen2", "llama_tied"])
@pytest.mark.slow
def test_peft_export_import_parity(kind, hf_checkpoints, tmp_path):
  """On conftest.py's tiny random transformers checkpoints (Qwen2; Llama 3, tied)."""
  import peft
  import torch

  base_dir = hf_checkpoints[kind][0]
  ours_dir, theirs_dir, merged_dir = (str(tmp_path / n) for n in ("ours", "theirs", "merged"))
  tok, mask = _tokens(b=3, t=16, seed=3, vocab=helpers.HF_VOCAB)
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
  model = _randomize_b(lora.attach(hf.load_model(base_dir), lcfg), scale=0.1)
  ours = np.asarray(_forward(model, tok, mask))

  # Ours -> PEFT on the transformers base.
  peft_lib.save_peft_adapter(model, ours_dir, base_model=base_dir)
  with open(os.path.join(ours_dir, "adapter_config.json")) as fh:
    assert json.load(fh)["r"] == 4
  theirs = peft.PeftModel.from_pretrained(_load_hf(base_dir), ours_dir).eval()
  np.testing.assert_allclose(_torch_logits(theirs, tok, mask), ours, atol=1e-4)

  # A merged full checkpoint: plain transformers.
  hf.save_model(lora.merged(model), merged_dir)
  np.testing.assert_allclose(_torch_logits(_load_hf(merged_dir), tok, mask), ours, atol=1e-4)

  # Import: our own export back (exactly), and an adapter PEFT itself wrote.
  back = peft_lib.load_peft_adapter(ours_dir, hf.load_model(base_dir))
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.tree.map(np.asarray, nnx.state(back, lora.ADAPTER)),
    jax.tree.map(np.asarray, nnx.state(model, lora.ADAPTER)),
  )
  torch.manual_seed(1)
  pcfg = peft.LoraConfig(
    r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
  )
  written = peft.get_peft_model(_load_hf(base_dir), pcfg).eval()
  written.save_pretrained(theirs_dir)
  imported = peft_lib.load_peft_adapter(theirs_dir, hf.load_model(base_dir))
  assert lora.config_of(imported) == lora.LoRAConfig(rank=2, alpha=6.0, targets=("q", "v", "down"))
  np.testing.assert_allclose(
    np.asarray(_forward(imported, tok, mask)), _torch_logits(written, tok, mask), atol=1e-4
  )
  with pytest.raises(ValueError, match="already has adapters"):
    peft_lib.load_peft_adapter(theirs_dir, imported)


# ----------------------------------------------------------------------------
# Checkpoints: adapters + optimizer state only; exact resume; another base refused
# ----------------------------------------------------------------------------


def _fit_config(tokenizer_path, steps):
  c = _cfg(rank=4, alpha=8.0)
  with c.unlocked():
    c.steps = steps
    c.warmup.steps = 0
    c.batch.prompts_per_step = 4
    c.rollout.n_rollouts = 3
    c.data.max_response_len = 16
    c.data.prompt_buckets = (48,)
    c.data.task_train_size = 64
    c.data.tokenizer = tokenizer_path
    c.model.embed_dim, c.model.num_layers, c.model.mlp_dim = 32, 1, 64
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
    c.log.progress = False
    c.log.tensorboard = False
  return c


def _fit(c, workdir, base_seed=0):
  spec = factory.run_spec(c, validate=False)
  tok = factory.tokenizer(spec, workdir)
  mesh = spec.make_mesh()
  source, _ = factory.datasets(spec)
  mcfg = spec.model.config(tok.vocab_size)
  base = model_lib.create_model(mcfg, seed=base_seed, mesh=mesh)
  model = lora.attach(base, spec.lora, mesh)
  with rewards_lib.RewardScorer(num_workers=1) as scorer:
    tr = trainer_lib.Trainer(
      model, spec, tokenizer=tok, scorer=scorer, mesh=mesh, base_path=f"seed{base_seed}"
    )
    it = factory.data_iter(spec, source, tok)
    info = trainer_lib.fit(tr, it, workdir=workdir)
  return tr, info


@pytest.mark.slow
def test_checkpoint_holds_adapters_and_refuses_another_base(tokenizer_path, tmp_path):
  """A LoRA checkpoint holds the adapters (+ their Adam state) and names its
  base by path and content hash; resuming it on another base is refused.
  (Bitwise resume after SIGKILL with LoRA on: tests/test_train.py.)"""
  workdir = str(tmp_path / "run")
  trained, _ = _fit(_fit_config(tokenizer_path, 1), workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [1]
  meta = ckpt.read_meta()
  ckpt.close()
  assert meta["lora"]["base_path"] == "seed0" and len(meta["lora"]["base_hash"]) == 64
  names = {str(p[-1]) for p, _ in nnx.to_flat_state(trained.state["params"])}
  assert names == {f"{t}_lora_{x}" for t in lora.TARGETS for x in "ab"}
  with pytest.raises(factory.ConfigError, match="another base model"):
    _fit(_fit_config(tokenizer_path, 2), workdir, base_seed=1)
