"""Sampler tests: greedy parity (no-cache forward, transformers), log-prob
agreement with the trainer, sampling distributions, EOS, recompiles, sharding."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from srft_jax import lora
from srft_jax import model as model_lib
from srft_jax import objectives
from srft_jax import sampler as smp
from srft_jax import sharding as shd

TINY = model_lib.ModelConfig(
  vocab_size=64,
  embed_dim=32,
  mlp_dim=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  max_seq_len=64,
)
BUCKETS = (8, 16)


def _model(cfg=TINY, seed=0, scale=8.0):
  """Tiny random model with weights scaled up so logits are far from ties."""
  m = model_lib.Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(m)
  state = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, state)
  return nnx.merge(graphdef, state)


def _prompts(seed=0, b=3, t=6, vocab=TINY.vocab_size, min_len=2):
  """Left-padded random prompts of different lengths (pad id 0)."""
  rs = np.random.RandomState(seed)
  lens = rs.randint(min_len, t + 1, size=b)
  lens[0] = t
  toks = np.zeros((b, t), np.int32)
  mask = np.zeros((b, t), np.int32)
  for i, n in enumerate(lens):
    toks[i, t - n :] = rs.randint(1, vocab, size=n)
    mask[i, t - n :] = 1
  return toks, mask


@pytest.fixture(scope="module")
def model():
  return _model()


def _with_lora(model, seed=1, scale=0.5):
  """A copy of `model` with rank-4 adapters on every projection, B drawn at
  random (so the adapted model differs from the base)."""
  m = lora.attach(nnx.clone(model), lora.LoRAConfig(rank=4, alpha=8.0))
  rs = np.random.RandomState(seed)
  for block in m.layers:
    for part in (block.attn, block.mlp):
      for t in lora.TARGETS:
        b = getattr(part, f"{t}_lora_b", None)
        if b is not None:
          b.set_value(jnp.asarray(scale * rs.standard_normal(b.get_value().shape), jnp.float32))
  return m


# ----------------------------------------------------------------------------
# A model whose logits are a fixed table (same call signature as Transformer).
# ----------------------------------------------------------------------------


class TableModel(nnx.Module):
  """Logits = the same known vector at every position; keeps the cache contract."""

  def __init__(self, logits_V):
    v = len(logits_V)
    self.cfg = model_lib.ModelConfig(
      vocab_size=v,
      embed_dim=8,
      mlp_dim=8,
      num_layers=1,
      num_heads=1,
      num_kv_heads=1,
      head_dim=8,
      max_seq_len=4096,
    )
    self.table = nnx.Param(jnp.asarray(logits_V, jnp.float32))

  def __call__(self, tokens_BT, positions_BT, mask_BT=None, cache=None, return_hidden=False):
    b, t = tokens_BT.shape
    hidden = jnp.zeros((b, t, 1), jnp.float32)
    if cache is not None:
      m = jax.lax.dynamic_update_slice(
        cache["mask"], mask_BT.astype(jnp.int32), (0, cache["index"])
      )
      cache = dict(cache, mask=m, index=cache["index"] + t)
    if return_hidden:
      return model_lib.ModelOutput(None, hidden, cache, None)
    return model_lib.ModelOutput(self.logits(hidden), None, cache, None)

  def logits(self, hidden_BTD):
    b, t, _ = hidden_BTD.shape
    return jnp.broadcast_to(self.table[...], (b, t, self.cfg.vocab_size))


LOGITS = np.array([2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.5], np.float32)


def _draws(cfg, rows=2000, seed=0, logits=LOGITS):
  m = TableModel(logits)
  toks = np.ones((rows, 1), np.int32)
  out = smp.sample(m, toks, np.ones_like(toks), jax.random.key(seed), cfg)
  return np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.mask)


def _expected(logits, temperature, top_k=0, top_p=1.0):
  """NumPy reference of the filtered sampling distribution."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(len(z), bool)
  k = len(z) if top_k == 0 else top_k
  cand = order[:k]
  p = np.exp(z[cand] - z[cand].max())
  p /= p.sum()
  before = np.cumsum(p) - p
  cand = cand[(before < top_p) | (np.arange(len(cand)) == 0)]
  keep[cand] = True
  q = np.where(keep, np.exp(z - z.max()), 0.0)
  return q / q.sum()


@pytest.mark.parametrize(
  "temperature,top_k,top_p",
  [
    (0.7, 0, 1.0),
    (1.0, 3, 1.0),
    (1.0, 0, 0.8),
    (1.3, 5, 0.7),
  ],
)
def test_sampling_distribution_matches_target(temperature, top_k, top_p):
  cfg = smp.SamplingConfig(
    max_new_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p, prompt_buckets=(1,)
  )
  toks, logp, mask = _draws(cfg)
  assert mask.all()
  target = _expected(LOGITS, temperature, top_k, top_p)
  counts = np.bincount(toks.ravel(), minlength=len(LOGITS))
  # Tokens outside top-k / top-p never appear.
  assert counts[target == 0].sum() == 0, (counts, target)
  kept = target > 0
  chi = stats.chisquare(counts[kept], target[kept] * counts.sum())
  assert chi.pvalue > 1e-3, (counts, target, chi)
  # Power check: the same counts reject a wrong temperature.
  wrong = _expected(LOGITS, temperature * 1.6, top_k, top_p)
  assert stats.chisquare(counts[kept], wrong[kept] / wrong[kept].sum() * counts.sum()).pvalue < 1e-6
  # Recorded log-probs are under the *untruncated* softmax(logits / T).
  full = jax.nn.log_softmax(LOGITS / temperature)
  np.testing.assert_allclose(logp, np.asarray(full)[toks], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.8, 3), (0.0, 0)])
def test_vocab_limit_draws_only_the_ids_below_it(temperature, top_k):
  """`vocab_limit` (a student wider than its teacher): the most likely ids lie
  past the limit and are never drawn; the rest keep their renormalised
  frequencies, and the log-probs are under that renormalised softmax."""
  logits, limit = LOGITS[::-1].copy(), 5  # ids 5-7 hold most of the mass
  cfg = smp.SamplingConfig(
    max_new_tokens=4, temperature=temperature, top_k=top_k, vocab_limit=limit, prompt_buckets=(1,)
  )
  toks, logp, _ = _draws(cfg, logits=logits)
  assert toks.max() < limit
  z = logits[:limit] / (temperature or 1.0)
  np.testing.assert_allclose(logp, np.asarray(jax.nn.log_softmax(z))[toks], rtol=1e-6, atol=1e-6)
  if temperature == 0.0:
    assert (toks == limit - 1).all()  # greedy: the best id below the limit
    return
  target = _expected(logits[:limit], temperature, top_k)
  counts = np.bincount(toks.ravel(), minlength=limit)
  assert counts[target == 0].sum() == 0
  kept = target > 0
  assert stats.chisquare(counts[kept], target[kept] * counts.sum()).pvalue > 1e-3


def test_draw_categorical_across_blocks_never_draws_zero_mass():
  """Blocked inverse-CDF draws: right frequencies across blocks and padding,
  and never a token whose mass is zero (-inf or underflowed scores)."""
  c = 300  # 3 blocks of 128, the last one padded
  scores = np.full((c,), -np.inf, np.float32)
  live = {0: 0.0, 127: 0.5, 128: -1.0, 200: 0.3, 299: 1.0}
  for i, v in live.items():
    scores[i] = v
  scores[5] = scores[130] = scores[298] = -500.0  # finite, but exp underflows to 0
  rows = 4000
  keys = jax.random.split(jax.random.key(3), 4)
  draws = np.concatenate(
    [
      np.asarray(jax.jit(smp.draw_categorical)(k, jnp.broadcast_to(scores, (rows, c))))
      for k in keys
    ]
  )
  counts = np.bincount(draws, minlength=c)
  assert set(np.flatnonzero(counts)) <= set(live), np.flatnonzero(counts)
  ids = np.array(sorted(live))
  target = np.exp(np.array([live[i] for i in ids]))
  target /= target.sum()
  assert stats.chisquare(counts[ids], target * counts.sum()).pvalue > 1e-3
  # A row whose mass sits in one token (the rest underflows) always draws it.
  one = jnp.asarray(np.where(np.arange(c) == 257, 0.0, -1e4)[None].repeat(64, 0), jnp.float32)
  assert np.all(np.asarray(smp.draw_categorical(jax.random.key(0), one)) == 257)


def test_greedy_on_table_and_logprob_at_temperature_one():
  cfg = smp.SamplingConfig(max_new_tokens=3, temperature=0.0, prompt_buckets=(1,))
  toks, logp, _ = _draws(cfg, rows=4)
  assert (toks == 0).all()
  np.testing.assert_allclose(logp, np.asarray(jax.nn.log_softmax(LOGITS))[0], rtol=1e-6)


def test_eos_rows_stop_independently_and_loop_exits_early():
  # Token 7 (EOS) has probability ~0.3, so rows stop at different steps.
  logits = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], np.float32)
  m = TableModel(logits)
  r = 40
  cfg = smp.SamplingConfig(
    max_new_tokens=r, temperature=1.0, eos_ids=(7, 99), pad_id=5, prompt_buckets=(4,)
  )
  rows = 64
  toks_in = np.ones((rows, 2), np.int32)
  graphdef, state = nnx.split(m)
  p_tok, p_mask = smp.prepare_prompts(toks_in, np.ones_like(toks_in), cfg)
  out, cache = smp.sample_tokens(
    graphdef, state, jnp.asarray(p_tok), jnp.asarray(p_mask), jax.random.key(3), cfg
  )
  toks, mask, logp, lengths = map(np.asarray, (out.tokens, out.mask, out.logprobs, out.lengths))
  for i in range(rows):
    hits = np.flatnonzero(toks[i] == 7)
    n = hits[0] + 1 if len(hits) else r
    assert lengths[i] == n
    assert mask[i, :n].all() and not mask[i, n:].any()
    assert (toks[i, n:] == 5).all() and (logp[i, n:] == 0).all()
    assert (toks[i, : n - 1] != 7).all()
  assert len(set(lengths.tolist())) > 5  # rows stop independently
  assert lengths.max() < r
  # The loop ran one decode step per generated token after the first, no more.
  assert int(cache["index"]) == 4 + lengths.max() - 1
  # Every slot written for a finished row is masked out of the cache.
  cmask = np.asarray(cache["mask"])
  np.testing.assert_array_equal(cmask[:, 4 : 4 + r - 1].sum(-1), lengths - 1)


@pytest.mark.slow
def test_determinism_and_distinct_rows(model):
  toks, mask = _prompts(b=2)
  cfg = smp.SamplingConfig(max_new_tokens=6, temperature=1.0, n=3, prompt_buckets=BUCKETS)
  a = smp.sample(model, toks, mask, jax.random.key(1), cfg)
  b = smp.sample(model, toks, mask, jax.random.key(1), cfg)
  c = smp.sample(model, toks, mask, jax.random.key(2), cfg)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert not np.array_equal(a.tokens, c.tokens)
  assert a.tokens.shape == (6, 6)
  # Rows of one prompt are adjacent, share the prompt and differ in samples.
  pt = np.asarray(a.prompt_tokens)
  assert (pt[0] == pt[1]).all() and (pt[0] == pt[2]).all() and not (pt[2] == pt[3]).all()
  t = np.asarray(a.tokens)
  assert len({tuple(r) for r in t[:3]}) == 3 and len({tuple(r) for r in t[3:]}) == 3


# ----------------------------------------------------------------------------
# Parity with the model and the trainer
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_equals_stepwise_full_forward(model):
  toks, mask = _prompts(seed=1, b=3, t=6)
  r = 7
  cfg = smp.SamplingConfig(max_new_tokens=r, temperature=0.0, prompt_buckets=BUCKETS)
  out = smp.sample(model, toks, mask, jax.random.key(0), cfg)
  # The no-cache forward over one fixed-length buffer (one compile): the
  # columns not generated yet are masked padding, which causal attention
  # never lets the earlier positions see.
  t = toks.shape[1]
  seq = np.concatenate([toks, np.zeros((3, r), np.int32)], 1)
  msk = np.concatenate([mask, np.zeros((3, r), np.int32)], 1)
  for i in range(r):
    logits = model_lib.forward_logits(model, seq, msk)
    seq[:, t + i] = np.argmax(np.asarray(logits[:, t + i - 1]), -1)
    msk[:, t + i] = 1
  np.testing.assert_array_equal(np.asarray(out.tokens), seq[:, -r:])
  assert np.asarray(out.mask).all() and (np.asarray(out.lengths) == r).all()
  # The returned prompt is the input re-padded on the left to its bucket.
  assert out.prompt_tokens.shape == (3, 8)
  np.testing.assert_array_equal(np.asarray(out.prompt_tokens)[:, 2:], toks)
  np.testing.assert_array_equal(np.asarray(out.prompt_mask)[:, 2:], mask)


@pytest.mark.parametrize(
  "temperature,top_k,top_p,adapters",
  [(0.8, 5, 0.9, False), (0.0, 0, 1.0, False), (0.8, 5, 0.9, True)],
)
@pytest.mark.slow
def test_logprobs_equal_trainer_recomputation(model, temperature, top_k, top_p, adapters):
  """The sampler's recorded log-probs are the trainer's forward's (with LoRA
  too: decoding reads fused W + scale A B, the trainer x W + scale (x A) B)."""
  if adapters:
    model = _with_lora(model)
  toks, mask = _prompts(seed=2, b=4, t=5)
  cfg = smp.SamplingConfig(
    max_new_tokens=8,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_ids=(3, 4, 5, 6, 7),
    pad_id=0,
    prompt_buckets=BUCKETS,
  )
  out = smp.sample(model, toks, mask, jax.random.key(7), cfg)
  full_tok = jnp.concatenate([out.prompt_tokens, out.tokens], 1)
  full_mask = jnp.concatenate([out.prompt_mask, out.mask], 1)
  logits = model_lib.forward_logits(model, full_tok, full_mask)
  p = out.prompt_tokens.shape[1]
  t_rec = 1.0 if temperature == 0 else temperature
  logp, _ = objectives.token_logprobs_and_entropy(logits[:, p - 1 : -1], out.tokens, t_rec)
  m = np.asarray(out.mask) > 0
  np.testing.assert_allclose(np.asarray(out.logprobs)[m], np.asarray(logp)[m], atol=1e-5)
  assert (np.asarray(out.logprobs)[~m] == 0).all()


@pytest.mark.parametrize(
  "param_dtype,dtype,adapters",
  [("float32", "float32", False), ("float32", "bfloat16", False), ("float32", "float32", True)],
)
@pytest.mark.slow
def test_fused_decode_weights_sample_what_the_params_sample(param_dtype, dtype, adapters):
  """The default decode from fused compute-dtype weights draws the same tokens
  with the same log-probs as decoding from the parameters as they are (float32
  master weights with bfloat16 compute included: both cast the same values;
  with LoRA the fused weights are W + scale A B)."""
  m = _model(dataclasses.replace(TINY, param_dtype=param_dtype, dtype=dtype), seed=1)
  if adapters:
    m = _with_lora(m)
  toks, mask = _prompts(seed=4, b=4, t=6)
  outs = [
    smp.sample(
      m,
      toks,
      mask,
      jax.random.key(3),
      smp.SamplingConfig(
        max_new_tokens=8,
        temperature=0.9,
        top_k=6,
        eos_ids=(3,),
        prompt_buckets=BUCKETS,
        fused_weights=fused,
      ),
    )
    for fused in (False, True)
  ]
  np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
  np.testing.assert_array_equal(np.asarray(outs[0].mask), np.asarray(outs[1].mask))
  atol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=atol)


@pytest.mark.slow
def test_decode_jit_continues_from_a_cache(model):
  """4 sampled tokens, then `decode_jit` on from the returned cache (feeding the
  4th token, told which rows have ended and how many tokens were drawn) gives
  tokens 5-8 of one 8-token call with the same rng: tokens, log-probs, mask."""
  toks, mask = _prompts(seed=9, b=4, t=6)
  cfg8 = smp.SamplingConfig(max_new_tokens=8, temperature=1.0, prompt_buckets=BUCKETS)
  free = np.asarray(smp.sample(model, toks, mask, jax.random.key(0), cfg8).tokens)
  # An EOS that row 0 draws second, so row 0 ends early while others go on.
  cfg8 = dataclasses.replace(cfg8, eos_ids=(int(free[0, 1]),))
  ref = smp.sample(model, toks, mask, jax.random.key(0), cfg8)
  ended = np.asarray(ref.lengths) <= 4
  assert ended[0] and not ended.all()
  cfg4 = dataclasses.replace(cfg8, max_new_tokens=4)
  ptok, pmask = smp.prepare_prompts(toks, mask, cfg4)
  graphdef, state = nnx.split(model)
  cache = smp.make_cache(model.cfg, *ptok.shape, cfg8)  # room for all 8
  out, cache = smp.sample_tokens(graphdef, state, ptok, pmask, jax.random.key(0), cfg4, cache)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens)[:, :4])
  done = (out.mask[:, -1] == 0) | jnp.isin(out.tokens[:, -1], jnp.asarray(cfg8.eos_ids))
  np.testing.assert_array_equal(np.asarray(done), ended)
  tok, logp, live, _ = smp.decode_jit(
    graphdef,
    state,
    cache,
    out.tokens[:, 3],
    pmask.sum(-1) + 3,
    jax.random.key(0),
    dataclasses.replace(cfg8, max_new_tokens=5),
    done_B=done,
    drawn=4,
  )
  np.testing.assert_array_equal(np.asarray(tok), np.asarray(ref.tokens)[:, 4:])
  np.testing.assert_array_equal(np.asarray(live), np.asarray(ref.mask)[:, 4:])
  np.testing.assert_allclose(np.asarray(logp), np.asarray(ref.logprobs)[:, 4:], atol=1e-5)


@pytest.mark.slow
def test_shared_prefill_samples_what_per_row_prefill_samples(model):
  """n samples a prompt: one prefill per prompt, its cache copied to the n rows,
  gives the tokens, log-probs and lengths of prefilling every row."""
  toks, mask = _prompts(seed=6, b=3, t=6)
  outs = [
    smp.sample(
      model,
      toks,
      mask,
      jax.random.key(5),
      smp.SamplingConfig(
        max_new_tokens=7,
        temperature=1.0,
        top_p=0.9,
        eos_ids=(3, 4),
        prompt_buckets=BUCKETS,
        n=3,
        share_prefill=share,
      ),
    )
    for share in (False, True)
  ]
  for name in ("tokens", "mask", "lengths", "prompt_tokens", "prompt_mask"):
    np.testing.assert_array_equal(
      np.asarray(getattr(outs[0], name)), np.asarray(getattr(outs[1], name))
    )
  np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-5)
  assert len({tuple(r) for r in np.asarray(outs[1].tokens)[:3]}) > 1  # the 3 rows differ


@pytest.mark.slow
def test_greedy_equals_transformers_generate(tmp_path):
  import torch
  import transformers

  from srft_jax import hf

  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.3,
  )
  hf_model = transformers.Qwen2ForCausalLM(hf_cfg).eval().to(torch.float32)
  with torch.no_grad():  # random (nonzero) biases, so the q/k/v bias layout is exercised
    for layer in hf_model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        proj.bias.normal_(0.0, 0.3)
  hf_model.save_pretrained(tmp_path)
  ours = hf.load_model(str(tmp_path))

  toks, mask = _prompts(seed=4, b=3, t=7, vocab=96)
  r = 10
  with torch.no_grad():
    ref = hf_model.generate(
      input_ids=torch.tensor(toks, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      max_new_tokens=r,
      min_new_tokens=r,
      do_sample=False,
      pad_token_id=0,
      eos_token_id=None,
      top_k=None,
      top_p=None,
      temperature=None,
    )
  ref = ref[:, toks.shape[1] :].numpy()
  cfg = smp.SamplingConfig(max_new_tokens=r, temperature=0.0, prompt_buckets=BUCKETS)
  out = smp.sample(ours, toks, mask, jax.random.key(0), cfg)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


# ----------------------------------------------------------------------------
# Compilation, sharding, validation
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_second_batch_in_same_bucket_does_not_recompile(model):
  cfg = smp.SamplingConfig(max_new_tokens=5, temperature=1.0, top_k=8, prompt_buckets=BUCKETS)
  toks, mask = _prompts(seed=5, b=2, t=6)
  smp.sample(model, toks, mask, jax.random.key(0), cfg)
  traces = smp.TRACE_COUNT["sample_tokens"]
  compiled = smp.sample_jit._cache_size()
  # Different prompts, different (shorter) width, same bucket 8, new rng.
  toks2, mask2 = _prompts(seed=6, b=2, t=4)
  out = smp.sample(model, toks2, mask2, jax.random.key(1), cfg)
  out.tokens.block_until_ready()
  assert smp.TRACE_COUNT["sample_tokens"] == traces
  assert smp.sample_jit._cache_size() == compiled
  # A longer prompt lands in the next bucket: exactly one new program.
  toks3, mask3 = _prompts(seed=7, b=2, t=12)
  smp.sample(model, toks3, mask3, jax.random.key(2), cfg)
  assert smp.TRACE_COUNT["sample_tokens"] == traces + 1
  assert smp.sample_jit._cache_size() == compiled + 1


@pytest.mark.multidevice
@pytest.mark.slow
def test_sharded_greedy_equals_single_device(model):
  assert len(jax.devices()) == 8
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = shd.shard_module(model, mesh, model.cfg.rules)
  toks, mask = _prompts(seed=8, b=4, t=6)
  cfg = smp.SamplingConfig(max_new_tokens=6, temperature=0.0, n=2, prompt_buckets=BUCKETS)
  ref = smp.sample(model, toks, mask, jax.random.key(0), cfg)
  out = smp.sample(sharded, toks, mask, jax.random.key(0), cfg, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
  # Rows are split over the data axes.
  spec = out.tokens.sharding.spec
  assert spec[0] in (("data", "fsdp"), "data"), spec
  assert len(out.tokens.sharding.device_set) == 8


@pytest.mark.multidevice
def test_sharded_cache_layout():
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = smp.SamplingConfig(max_new_tokens=4)
  cache = smp.make_cache(TINY, 8, 8, cfg, mesh)
  assert cache["k"][0].shape == (8, 2, 8, 12)  # keys [B, K, H, S]
  assert cache["v"][0].shape == (8, 2, 12, 8)  # values [B, K, S, H]
  for leaf in (cache["k"][0], cache["v"][0]):
    assert leaf.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None)
  assert cache["mask"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)


@pytest.mark.parametrize(
  "field,value",
  [
    ("max_new_tokens", 0),
    ("temperature", -1.0),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("pad_id", -1),
    ("eos_ids", (-3,)),
    ("prompt_buckets", ()),
    ("prompt_buckets", (16, 8)),
    ("n", 0),
    ("cache_dtype", "int8"),
  ],
)
def test_config_validation_names_field(field, value):
  with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
    smp.SamplingConfig(**{field: value})


def test_bad_requests_raise_before_compiling(model):
  before = smp.TRACE_COUNT["sample_tokens"]
  cfg = smp.SamplingConfig(max_new_tokens=4, prompt_buckets=BUCKETS)
  toks, mask = _prompts(b=2, t=6)
  long_toks = np.ones((2, 17), np.int32)
  with pytest.raises(ValueError, match="largest bucket"):
    smp.sample(model, long_toks, np.ones_like(long_toks), jax.random.key(0), cfg)
  empty = mask.copy()
  empty[1] = 0
  with pytest.raises(ValueError, match="empty prompt"):
    smp.sample(model, toks, empty, jax.random.key(0), cfg)
  right = np.ones((2, 6), np.int32)
  right[:, -1] = 0
  with pytest.raises(ValueError, match="left-padded"):
    smp.sample(model, toks, right, jax.random.key(0), cfg)
  window = dataclasses.replace(cfg, max_new_tokens=TINY.max_seq_len)
  with pytest.raises(ValueError, match="window"):
    smp.sample(model, toks, mask, jax.random.key(0), window)
  with pytest.raises(ValueError, match="eos_ids"):
    smp.sample(model, toks, mask, jax.random.key(0), dataclasses.replace(cfg, eos_ids=(64,)))
  assert smp.TRACE_COUNT["sample_tokens"] == before


def _all_avals(jaxpr):
  """Every variable's abstract value in a jaxpr and its sub-jaxprs (while, jit, cond)."""
  for eqn in jaxpr.eqns:
    for v in list(eqn.invars) + list(eqn.outvars):
      if hasattr(v, "aval"):
        yield v.aval
    for p in eqn.params.values():
      subs = p if isinstance(p, (tuple, list)) else (p,)
      for sub in subs:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_avals(inner)


def test_prefill_never_builds_full_prompt_logits():
  # Only the last prompt column's logits are needed to draw the first token;
  # at a 152k vocabulary a [B, P, V] float32 block would be gigabytes.
  model = model_lib.Transformer(dataclasses.replace(TINY, vocab_size=97), rngs=nnx.Rngs(0))
  b, p, r = 4, 16, 5
  toks, mask = _prompts(seed=9, b=b, t=p, vocab=97)
  cfg = smp.SamplingConfig(max_new_tokens=r, temperature=1.0, prompt_buckets=(p,))
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t, m, k: smp.sample_core(graphdef, s, t, m, k, cfg))(
    state, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0)
  )
  v = model.cfg.vocab_size
  vocab_shapes = {
    tuple(a.shape)
    for a in _all_avals(jaxpr.jaxpr)
    if getattr(a, "shape", None) and a.shape[-1] == v
  }
  assert vocab_shapes, "expected some [.., V] logits"
  assert all(math.prod(s[1:-1]) == 1 for s in vocab_shapes), vocab_shapes
