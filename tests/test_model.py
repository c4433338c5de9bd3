"""srft_jax.model properties that need no reference implementation.

Parity with transformers lives in test_hf.py. Here: the KV cache against the
full forward, causality, padding invariance, bf16 compute, remat and chunked
attention against the plain path, and the 7B preset's size from abstract
shapes. Every forward uses one of two batch shapes so each model compiles
once per shape.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax import model as model_lib
from srft_jax.model import attention as attention_lib

CFG = model_lib.ModelConfig(
  model_type="qwen2",
  vocab_size=64,
  embed_dim=32,
  mlp_dim=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  rope_theta=10_000.0,
  qkv_bias=True,
  tie_embeddings=False,
)
B, T = 2, 14
_forward = nnx.jit(model_lib.forward_logits)


def _build(cfg, values):
  """A Transformer with the given parameter values (path -> array), cast to
  cfg's param dtype. Built from abstract shapes: no random init to compile."""
  graphdef, state = nnx.split(model_lib.abstract_model(cfg))
  flat = [
    (path, var.replace(jnp.asarray(np.asarray(values[path]).astype(var.get_value().dtype))))
    for path, var in nnx.to_flat_state(state)
  ]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _make(cfg=CFG, seed=0, std=0.15):
  """Random parameters, biases and norm scales included (norm scales near 1)."""
  rng = np.random.RandomState(seed)
  _, state = nnx.split(model_lib.abstract_model(cfg))
  values = {}
  for path, var in nnx.to_flat_state(state):
    noise = std * rng.standard_normal(var.get_value().shape).astype(np.float32)
    values[path] = noise + 1.0 if path[-1] == "scale" else noise
  return _build(cfg, values)


def _variant(base: model_lib.Transformer, **changes) -> model_lib.Transformer:
  """A model with `base`'s parameters and a modified config."""
  values = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
  return _build(dataclasses.replace(base.cfg, **changes), values)


@pytest.fixture(scope="module")
def model():
  return _make(CFG, seed=0)


def _tokens(seed, shape=(B, T)):
  return np.random.RandomState(seed).randint(0, CFG.vocab_size, shape).astype(np.int32)


# ----------------------------------------------------------------------------
# Decoding with a KV cache
# ----------------------------------------------------------------------------


@nnx.jit
def _step(model, tokens, positions, mask, cache):
  out = model(tokens, positions, mask, cache=cache)
  return out.logits, out.cache


@pytest.mark.slow
def test_kv_cache_decoding_matches_full_forward(model):
  """Left-padded prompt (row 1) and unpadded prompt (row 0), prefilled then fed
  one token at a time, give the full forward's logits at every real token."""
  prompt_len, pads = 8, (0, 3)
  tokens = _tokens(1)
  mask = np.ones((B, T), np.int32)
  for row, n in enumerate(pads):
    mask[row, :n] = 0
  full = np.asarray(_forward(model, tokens, mask))

  cache = model.init_cache(B, 16)  # 2 slots more than needed stay masked out
  positions = np.asarray(model_lib.positions_from_mask(mask))
  logits, cache = _step(
    model, tokens[:, :prompt_len], positions[:, :prompt_len], mask[:, :prompt_len], cache
  )
  real = mask[:, :prompt_len].astype(bool)
  errs = [np.abs(np.asarray(logits) - full[:, :prompt_len])[real].max()]
  for t in range(prompt_len, T):
    logits, cache = _step(
      model, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache
    )
    assert logits.shape == (B, 1, CFG.vocab_size)
    errs.append(np.abs(np.asarray(logits)[:, 0] - full[:, t]).max())
  assert int(cache["index"]) == T
  np.testing.assert_array_equal(np.asarray(cache["mask"])[:, :T], mask)
  assert not np.asarray(cache["mask"])[:, T:].any()
  print(f"KV cache vs full forward: max |dlogits| = {max(errs):.2e}")
  assert max(errs) <= 1e-5


def test_kv_cache_two_chunk_prefill(model):
  """Filling the cache in two 7-token chunks (the second at index 7) equals the full forward."""
  tokens = _tokens(2)
  mask = np.ones((B, T), np.int32)
  mask[1, :5] = 0
  positions = np.asarray(model_lib.positions_from_mask(mask))
  full = np.asarray(_forward(model, tokens, mask))
  cache = model.init_cache(B, 16)
  first, cache = _step(model, tokens[:, :7], positions[:, :7], mask[:, :7], cache)
  second, cache = _step(model, tokens[:, 7:], positions[:, 7:], mask[:, 7:], cache)
  got = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
  assert np.abs(got - full)[mask.astype(bool)].max() <= 1e-5


@pytest.mark.parametrize(
  "changes,weight_first",
  [
    ({}, True),  # qwen2: qkv bias, untied head
    ({}, False),  # the accelerators' operand order
    ({"model_type": "llama", "qkv_bias": False, "tie_embeddings": True}, True),
    ({"num_kv_heads": 1}, True),  # all query heads in one group
    ({"num_kv_heads": 4}, True),  # one query head per kv head
  ],
  ids=["qwen2", "qwen2_x_first", "llama_tied", "mqa", "mha"],
)
@pytest.mark.slow
def test_decode_weights_give_the_plain_logits(changes, weight_first, monkeypatch):
  """Prefill + decode from `decode_weights()` (fused q/k/v and gate/up) gives
  the logits and cache of the model's own parameters, with either operand
  order of `dense_out_major` (CPU's default and the one GPUs/TPUs get)."""
  monkeypatch.setattr(attention_lib, "WEIGHT_FIRST_BACKENDS", ("cpu",) if weight_first else ())

  @nnx.jit  # a new function each test: the backends are read when it is traced
  def fused_step(m, tokens, positions, mask, cache):
    out = m(tokens, positions, mask, cache=cache, weights=m.decode_weights())
    return out.logits, out.cache

  m = _make(dataclasses.replace(CFG, **changes), seed=3)
  tokens = _tokens(4)
  mask = np.ones((B, T), np.int32)
  mask[1, :3] = 0
  positions = np.asarray(model_lib.positions_from_mask(mask))
  caches, outs = [], []
  for step in (_step, fused_step):
    cache = m.init_cache(B, 16)
    logits, cache = step(m, tokens[:, :8], positions[:, :8], mask[:, :8], cache)
    got = [np.asarray(logits)]
    for t in range(8, T):
      logits, cache = step(
        m, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache
      )
      got.append(np.asarray(logits))
    outs.append(np.concatenate(got, axis=1))
    caches.append(cache)
  real = mask.astype(bool)
  assert np.abs(outs[0] - outs[1])[real].max() <= 1e-5
  for a, b in zip(caches[0]["k"] + caches[0]["v"], caches[1]["k"] + caches[1]["v"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("n_in,shape_w", [(1, (3, 5, 16)), (2, (16, 4, 6)), (1, (64, 16))])
def test_dense_out_major_orders_agree_with_einsum(n_in, shape_w):
  """Both operand orders of `dense_out_major` (CPU's weight-first and the
  other backends' x-first) equal the plain contraction, output dims last."""
  rs = np.random.RandomState(0)
  w = rs.randn(*shape_w).astype(np.float32)
  x = rs.randn(2, 3, *shape_w[len(shape_w) - n_in :]).astype(np.float32)
  want = np.tensordot(x, w, axes=(list(range(2, 2 + n_in)), list(range(w.ndim - n_in, w.ndim))))
  for first in (True, False):
    got = model_lib.dense_out_major(jnp.asarray(x), jnp.asarray(w), n_in, weight_first=first)
    assert got.shape == (2, 3) + shape_w[: w.ndim - n_in]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_decode_weights_layout_and_dtype():
  """Output-major, in the compute dtype: qkv[k, j] is query head k*G + j for
  j < G, then kv head k's key and value; gate_up stacks gate then up."""
  cfg = dataclasses.replace(CFG, num_heads=6, num_kv_heads=2, dtype="bfloat16")
  m = _make(cfg, seed=5)
  w = m.decode_weights()
  attn, mlp = m.layers[1].attn, m.layers[1].mlp
  lw = w["layers"][1]
  d, g, h, f = cfg.embed_dim, 3, cfg.head_dim, cfg.mlp_dim
  assert lw["attn"]["qkv"].shape == (2, g + 2, h, d)
  assert lw["attn"]["o"].shape == (d, 6, h)
  assert lw["mlp"]["gate_up"].shape == (2, f, d) and lw["mlp"]["down"].shape == (d, f)
  assert w["unembed"].shape == (cfg.vocab_size, d)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(w))
  bf = lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16))  # noqa: E731
  qkv, bias = np.asarray(lw["attn"]["qkv"]), np.asarray(lw["attn"]["qkv_bias"])
  for k in range(2):
    for j in range(g):
      np.testing.assert_array_equal(qkv[k, j], bf(attn.q[...][:, k * g + j]).T)
      np.testing.assert_array_equal(bias[k, j], bf(attn.q_bias[...][k * g + j]))
    np.testing.assert_array_equal(qkv[k, g], bf(attn.k[...][:, k]).T)
    np.testing.assert_array_equal(qkv[k, g + 1], bf(attn.v[...][:, k]).T)
    np.testing.assert_array_equal(bias[k, g + 1], bf(attn.v_bias[...][k]))
  np.testing.assert_array_equal(np.asarray(lw["attn"]["o"]), bf(attn.o[...]).transpose(2, 0, 1))
  np.testing.assert_array_equal(np.asarray(lw["mlp"]["gate_up"])[0], bf(mlp.gate[...]).T)
  np.testing.assert_array_equal(np.asarray(lw["mlp"]["gate_up"])[1], bf(mlp.up[...]).T)
  np.testing.assert_array_equal(np.asarray(lw["mlp"]["down"]), bf(mlp.down[...]).T)
  np.testing.assert_array_equal(np.asarray(w["unembed"]), bf(m.lm_head[...]).T)


@pytest.mark.parametrize(
  "changes",
  [{}, {"remat": "dots"}, {"attention": "chunked", "attention_chunk": 4}],
  ids=["plain", "remat", "chunked"],
)
@pytest.mark.slow
def test_shared_prefix_forward_equals_full_rows(changes):
  """Groups of 3 rows sharing a (left-padded) prompt, with right-padded
  responses: the prompt run once per group gives the full forward's hidden
  states at every real position of every row."""
  m = _make(dataclasses.replace(CFG, **changes), seed=1)
  groups, g, p, r = 2, 3, 6, 5
  rs = np.random.RandomState(0)
  pt, rt = rs.randint(1, 64, (groups, p)), rs.randint(1, 64, (groups * g, r))
  pm, rm = np.ones((groups, p), np.int32), np.ones((groups * g, r), np.int32)
  pm[1, :2] = 0
  rm[1, 3:] = 0
  rm[4, 1:] = 0
  tokens = np.concatenate([np.repeat(pt, g, 0), rt], 1)
  mask = np.concatenate([np.repeat(pm, g, 0), rm], 1)
  full = nnx.jit(
    lambda m, t, k: m(t, model_lib.positions_from_mask(k), k, return_hidden=True).hidden
  )(m, tokens, mask)
  shared = nnx.jit(lambda m, *a: m.forward_shared_prefix(*a))(m, pt, pm, rt, rm)
  hp, hr = shared.prompt_hidden, shared.response_hidden
  full = np.asarray(full)
  assert hp.shape == (groups, p, CFG.embed_dim) and hr.shape == (groups * g, r, CFG.embed_dim)
  err_p = np.abs(np.repeat(np.asarray(hp), g, 0) - full[:, :p])[np.repeat(pm, g, 0) > 0].max()
  err_r = np.abs(np.asarray(hr) - full[:, p:])[rm > 0].max()
  assert max(err_p, err_r) <= 1e-5, (err_p, err_r)
  with pytest.raises(ValueError, match="prompt groups"):
    m.forward_shared_prefix(pt, pm, rt[:5], rm[:5])


# ----------------------------------------------------------------------------
# Causality and padding
# ----------------------------------------------------------------------------


def test_causality(model):
  tokens = _tokens(3)
  changed = tokens.copy()
  changed[:, 9] = (changed[:, 9] + 1) % CFG.vocab_size
  a = np.asarray(_forward(model, tokens, np.ones_like(tokens)))
  b = np.asarray(_forward(model, changed, np.ones_like(tokens)))
  np.testing.assert_array_equal(a[:, :9], b[:, :9])  # the past cannot see the future
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-3  # the present and future do


def test_padding_invariance(model):
  """The same 11 real tokens, left padded (row 0) or right padded (row 1) with
  arbitrary pad ids, give the same logits; the pad ids themselves do not matter."""
  text = _tokens(4, (11,))
  pad = 3
  mask = np.zeros((B, T), np.int32)
  mask[0, pad:] = 1
  mask[1, : T - pad] = 1
  outs = []
  for junk_seed in (5, 6):
    tokens = _tokens(junk_seed)
    tokens[0, pad:] = text
    tokens[1, : T - pad] = text
    outs.append(np.asarray(_forward(model, tokens, mask)))
  for out in outs:
    assert np.abs(out[0, pad:] - out[1, : T - pad]).max() <= 1e-5
  np.testing.assert_allclose(
    outs[0][mask.astype(bool)], outs[1][mask.astype(bool)], rtol=0, atol=1e-6
  )


# ----------------------------------------------------------------------------
# Numerics and memory-saving variants
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_bfloat16_compute_is_close_to_float32(model):
  tokens = _tokens(7)
  mask = np.ones_like(tokens)
  ref = np.asarray(_forward(model, tokens, mask))
  for changes in ({"dtype": "bfloat16", "param_dtype": "bfloat16"},):  # as the 7B preset
    low = _variant(model, **changes)
    assert low.layers[0].mlp.up[...].dtype == low.cfg.jnp_param_dtype
    out = np.asarray(_forward(low, tokens, mask))
    assert out.dtype == np.float32  # logits stay float32
    err = np.abs(out - ref).max()
    print(f"{changes}: max |dlogits| vs float32 = {err:.3f} (max |logit| {np.abs(ref).max():.2f})")
    assert err <= 0.05 * np.abs(ref).max()
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.999
  hidden = low(
    jnp.asarray(tokens), model_lib.positions_from_mask(mask), jnp.asarray(mask), return_hidden=True
  ).hidden
  assert hidden.dtype == jnp.bfloat16 and hidden.shape == (B, T, CFG.embed_dim)


def _loss_and_grads(model, tokens, mask, weights):
  def loss(m):
    logits = model_lib.forward_logits(m, tokens, mask)
    return jnp.sum(jax.nn.log_softmax(logits) * weights), logits

  (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return value, logits, grads


_loss_and_grads_jit = nnx.jit(_loss_and_grads)


@pytest.mark.parametrize(
  "changes",
  [
    {"remat": "full"},
    # 14 queries = 3 blocks of 4 + padding; "dots" saves matmul outputs only
    {"remat": "dots", "attention": "chunked", "attention_chunk": 4},
    # real tokens moved to the front, plain causal attention (XLA's off the GPU)
    {"remat": "dots", "attention": "cudnn"},
  ],
)
@pytest.mark.slow
def test_remat_and_chunked_attention_match_plain(model, changes):
  tokens = _tokens(8)
  mask = np.ones((B, T), np.int32)
  mask[1, :4] = 0  # a left-padded prompt ...
  mask[1, -3:] = 0  # ... and a right-padded response, as the trainer lays rows out
  mask[0, -1:] = 0
  weights = np.random.RandomState(9).normal(size=(B, T, CFG.vocab_size)).astype(np.float32)
  weights *= mask[..., None]
  ref_value, ref_logits, ref_grads = _loss_and_grads_jit(model, tokens, mask, weights)
  value, logits, grads = _loss_and_grads_jit(_variant(model, **changes), tokens, mask, weights)
  real = mask[..., None] > 0  # padding positions' outputs are never used
  assert np.abs(np.where(real, np.asarray(logits) - np.asarray(ref_logits), 0)).max() <= 1e-5
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
  flat_ref = dict(nnx.to_flat_state(ref_grads))
  flat = dict(nnx.to_flat_state(grads))
  assert flat.keys() == flat_ref.keys()
  worst = 0.0
  for key, g in flat.items():
    g, r = np.asarray(g.get_value()), np.asarray(flat_ref[key].get_value())
    assert np.abs(r).max() > 0, key  # every parameter gets a gradient
    worst = max(worst, np.abs(g - r).max() / np.abs(r).max())
  print(f"{changes}: max relative |dgrad| = {worst:.2e}")
  assert worst <= 1e-5


# ----------------------------------------------------------------------------
# The 7B preset from abstract shapes
# ----------------------------------------------------------------------------


def test_qwen2_5_math_7b_eval_shape_has_7_6b_params():
  cfg = model_lib.ModelConfig.preset("qwen2_5_math_7b")
  abstract = model_lib.abstract_model(cfg)
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  n = model_lib.count_params(abstract)
  assert n == cfg.num_params() == 7_615_616_512  # Qwen2.5-Math-7B's published count
  print(f"qwen2_5_math_7b: {n / 1e9:.2f}B parameters")
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  assert abstract.layers[27].attn.q.get_value().shape == (3584, 28, 128)
  assert model_lib.ModelConfig.preset("qwen2_5_math_7b_rope40k").num_params() == n
