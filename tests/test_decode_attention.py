"""The Pallas decode-attention kernel: an independent NumPy formula, the
model's XLA attention, the sampler end to end, sharding, and its shape rules.
(Pallas' interpreter on CPU; the Triton kernel itself under SRFT_TEST_PLATFORM=cuda.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax import decode_attention as da
from srft_jax import model as model_lib
from srft_jax import sampler as smp
from srft_jax import sharding as shd


def _numpy_reference(q_BNH, k_BKHS, v_BKSH, ok_BS):
  """softmax(q.k / sqrt(H)) over the allowed slots, then . v, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BNH, k_BKHS, v_BKSH))
  b, n, h = q.shape
  kh = k.shape[1]
  out = np.zeros((b, n, h))
  for i in range(b):
    for j in range(n):
      kv = j // (n // kh)
      s = q[i, j] @ k[i, kv] / np.sqrt(h)
      s = np.where(ok_BS[i], s, -np.inf)
      p = np.exp(s - s.max())
      out[i, j] = (p / p.sum()) @ v[i, kv]
  return out


def _case(seed, b=3, kh=2, g=3, h=16, s=96, bound=70, dtype=jnp.float32):
  """Random queries/cache; slots at or past `bound` hold garbage in the kernel's
  last block (masked) and NaN past it (never read); left padding (row 1 starts
  at slot 40) and random holes before `bound`."""
  rs = np.random.RandomState(seed)
  q = rs.randn(b, kh * g, h)
  k = rs.randn(b, kh, h, s)
  v = rs.randn(b, kh, s, h)
  bs = da.block_size(s) or s
  unread = -(-bound // bs) * bs
  k[..., bound:] = 1e3
  v[:, :, bound:] = -1e3
  k[..., unread:] = np.nan
  v[:, :, unread:] = np.nan
  ok = (rs.rand(b, s) > 0.3) & (np.arange(s)[None] < bound)
  ok[1, :40] = False
  ok[:, bound - 1] = True  # the new token itself
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), ok)


@pytest.fixture
def tuning():
  """Sets decode_attention.TUNING for one test, restoring it after."""
  saved = dict(da.TUNING)
  yield da.TUNING
  da.TUNING.clear()
  da.TUNING.update(saved)


F32, BF16 = (jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)


@pytest.mark.parametrize(
  "bound,s,splits,dtype,atol",
  [
    (70, 96, None, *F32),
    (96, 96, 1, *F32),
    (1, 32, None, *F32),
    (130, 160, 4, *F32),
    (130, 160, 1, *BF16),
    (70, 96, None, *BF16),
  ],
)
@pytest.mark.slow
def test_kernel_matches_numpy_formula(bound, s, splits, dtype, atol, tuning):
  """One program a (row, kv head) or the slots split over several (flash decoding:
  splits past the bound stay empty and the partial softmaxes are merged)."""
  tuning.update(splits=splits)
  q, k, v, ok = _case(0, s=s, bound=bound, dtype=dtype)
  out = da.decode_attention(q, k, v, jnp.asarray(ok), jnp.int32(bound))
  assert out.shape == q.shape and out.dtype == dtype
  ref = _numpy_reference(
    q.astype(jnp.float32),
    np.nan_to_num(np.asarray(k, np.float32)),
    np.nan_to_num(np.asarray(v, np.float32)),
    ok,
  )
  bs = da.block_size(s)
  # the case poisons the slots past the kernel's last block whenever there are any
  assert np.isnan(np.asarray(k, np.float32)).any() == (s > -(-bound // bs) * bs)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=atol, rtol=0)


@pytest.mark.slow
def test_kernel_matches_model_attend_on_a_clean_cache():
  """Same function as `model.attend` for one query (no NaN slots: attend reads them)."""
  q, k, v, ok = _case(1, b=4, kh=2, g=6, h=32, s=128, bound=128)
  out = da.decode_attention(q, k, v, jnp.asarray(ok), jnp.int32(128))
  ref = model_lib.attend(q[:, None], k, v, jnp.asarray(ok)[:, None, :])[:, 0]
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=0)


def test_shape_rules():
  assert [da.block_size(n) for n in (320, 1280, 48, 16, 24)] == [64, 64, 16, 16, None]
  assert da.supported(128, 320) and da.supported(16, 16)
  assert not da.supported(8, 320)  # Triton's dot needs >= 16
  assert not da.supported(96, 320)  # not a power of two
  assert not da.supported(128, 100)  # cache length not a multiple of 16
  q, k, v, ok = _case(0, h=16, s=40, bound=30)
  with pytest.raises(ValueError, match="cache length 40"):
    da.decode_attention(q, k, v, jnp.asarray(ok), jnp.int32(30))
  assert da.launch_settings(64, 2, 320) == (64, 1, 4, 2)
  assert da.launch_settings(4, 2, 8192)[:2] == (64, 8)  # few rows, long cache: split
  assert da.launch_settings(4, 2, 128)[:2] == (64, 2)  # never more splits than blocks


def test_config_validation_names_field():
  with pytest.raises(ValueError, match="ModelConfig.decode_attention"):
    model_lib.ModelConfig(decode_attention="flash")


CFG = model_lib.ModelConfig(
  vocab_size=64,
  embed_dim=64,
  mlp_dim=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  max_seq_len=128,
)


def _prompts(b=4, t=8, seed=0):
  rs = np.random.RandomState(seed)
  toks = np.zeros((b, t), np.int32)
  mask = np.zeros((b, t), np.int32)
  for i, n in enumerate(rs.randint(2, t + 1, size=b)):
    toks[i, t - n :] = rs.randint(1, CFG.vocab_size, size=n)
    mask[i, t - n :] = 1
  return toks, mask


def _scaled_model(cfg, seed=0):
  m = model_lib.Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(m)
  state = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, state)
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_sampler_with_kernel_samples_what_xla_attention_samples(dtype):
  """Same tokens, masks and (float32: 1e-5) log-probs as decoding with XLA's
  attention: temperature sampling with EOS, left-padded prompts, a 32-slot
  cache filled from 17 to 31 slots (the kernel reads only the filled blocks)."""
  outs = []
  for impl in ("xla", "pallas"):
    m = _scaled_model(dataclasses.replace(CFG, dtype=dtype, decode_attention=impl), seed=1)
    toks, mask = _prompts(seed=2)
    outs.append(
      smp.sample(
        m,
        toks,
        mask,
        jax.random.key(3),
        smp.SamplingConfig(max_new_tokens=16, temperature=0.9, eos_ids=(5,), prompt_buckets=(16,)),
      )
    )
  np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
  np.testing.assert_array_equal(np.asarray(outs[0].mask), np.asarray(outs[1].mask))
  atol = 1e-5 if dtype == "float32" else 5e-2
  np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=atol)


def test_kernel_is_in_the_decode_step():
  """The pallas setting reaches the decode loop (and only it: prefill attends with XLA)."""
  m = _scaled_model(dataclasses.replace(CFG, decode_attention="pallas"))
  toks, mask = _prompts()
  cfg = smp.SamplingConfig(max_new_tokens=8, temperature=0.0, prompt_buckets=(8,))
  graphdef, state = nnx.split(m)
  jaxpr = jax.make_jaxpr(
    lambda s: smp.sample_core(graphdef, s, toks, mask, jax.random.key(0), cfg)
  )(state)
  text = str(jaxpr)
  assert text.count("pallas_call") == CFG.num_layers  # one a layer, inside the while body
  assert "srft_decode_attention" in text


def test_kernel_only_in_the_decode_step_so_one_token_training_rows_differentiate():
  """A one-token forward over a cache outside the sampler (the shared-prefix
  training forward with 1-token responses) attends with XLA and has gradients."""
  m = _scaled_model(dataclasses.replace(CFG, decode_attention="pallas"))
  toks, mask = _prompts(b=2)
  graphdef, state = nnx.split(m)

  def loss(state):
    model = nnx.merge(graphdef, state)
    out = model.forward_shared_prefix(
      toks, mask, jnp.ones((4, 1), jnp.int32), jnp.ones((4, 1), jnp.int32)
    )
    return jnp.sum(out.response_hidden**2) + jnp.sum(out.prompt_hidden**2)

  assert "pallas_call" not in str(jax.make_jaxpr(jax.value_and_grad(loss))(state))


@pytest.mark.multidevice
@pytest.mark.slow
def test_sharded_kernel_equals_single_device():
  """Under a (data 2, fsdp 2, tensor 2) mesh the kernel runs per shard
  (rows over data x fsdp, kv heads over tensor) and gives the same output."""
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  q, k, v, ok = _case(3, b=4, kh=2, g=2, h=16, s=64, bound=50)
  k, v = jnp.nan_to_num(k), jnp.nan_to_num(v)
  ref = da.decode_attention(q, k, v, jnp.asarray(ok), jnp.int32(50))
  P = jax.sharding.PartitionSpec
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
  args = (
    put(q, P(("data", "fsdp"), "tensor", None)),
    put(k, P(("data", "fsdp"), "tensor")),
    put(v, P(("data", "fsdp"), "tensor")),
    put(jnp.asarray(ok), P(("data", "fsdp"))),
  )
  with jax.set_mesh(mesh):
    out = jax.jit(lambda *a: da.decode_attention(*a, jnp.int32(50)))(*args)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6, rtol=0)
  assert len(out.sharding.device_set) == 8


@pytest.mark.multidevice
@pytest.mark.slow
def test_sharded_sampler_with_kernel_equals_single_device():
  """The whole sampler on a (data 2, fsdp 2, tensor 2) mesh with the kernel in
  its decode step: the same greedy tokens and log-probs as one device."""
  m = _scaled_model(dataclasses.replace(CFG, decode_attention="pallas"), seed=2)
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = shd.shard_module(m, mesh, m.cfg.rules)
  toks, mask = _prompts(seed=5)
  cfg = smp.SamplingConfig(max_new_tokens=8, temperature=0.0, n=2, prompt_buckets=(8,))
  ref = smp.sample(m, toks, mask, jax.random.key(0), cfg)
  out = smp.sample(sharded, toks, mask, jax.random.key(0), cfg, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
  assert len(out.tokens.sharding.device_set) == 8
