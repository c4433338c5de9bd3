"""Rollout sampling: a pure, jitted KV-cache sampler over the trainer's own model.

The sampler runs the same `model.Transformer` code that the trainer
differentiates, so the log-probs it records are the ones the trainer would
recompute (no sampler/trainer mismatch by construction).

Shapes are static. Prompts are left-padded to a length bucket
(`SamplingConfig.prompt_buckets`) and the KV cache holds
`bucket + max_new_tokens` slots, so a new batch in the same bucket reuses the
compiled program. One call prefills the whole prompt; then a `lax.while_loop`
decodes one token per step and stops as soon as every row has emitted an EOS
(or after `max_new_tokens`). Nothing leaves the device inside the loop.

Dimension letters as in srft_jax.model, plus P (bucketed prompt length) and
R (max_new_tokens, the response length).

Sampling distribution at step t, with z = logits / temperature:
  * `temperature == 0`: greedy argmax. Recorded log-probs are then
    log_softmax(logits) at temperature 1 (the greedy policy has no other
    useful log-prob, and this is what a trainer scoring at T=1 recomputes).
  * otherwise: top-k (if `top_k > 0`), then top-p on the renormalised top-k
    distribution (if `top_p < 1`; the smallest prefix of the sorted tokens
    whose mass reaches `top_p`, never empty), then a categorical draw by
    inverting the blocked CDF with one uniform per row (`draw_categorical`).
    Recorded log-probs are log_softmax(z) of the drawn token under the
    *untruncated* distribution, which is what
    `objectives.token_logprobs_and_entropy(logits, tokens, temperature)` gives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import sharding as shd

Array = jax.Array
f32 = jnp.float32

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. Frozen and hashable: it is a static argument of the jitted core."""

  max_new_tokens: int = 256  # R: tokens generated per row (cache = bucket + R)
  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  eos_ids: tuple[int, ...] = ()  # a row stops after emitting any of these
  pad_id: int = 0  # fills prompt padding and tokens after EOS
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS  # allowed padded prompt lengths
  n: int = 1  # samples per prompt (rows are repeated n times)
  cache_dtype: str | None = None  # KV cache dtype; None = the model's compute dtype
  # Decode from fused compute-dtype weights built once per call
  # (`Transformer.decode_weights`): fewer, larger matmuls and no per-step cast of
  # float32 master weights, for one compute-dtype copy of the weights in memory.
  fused_weights: bool = True
  # n > 1: rows come in groups of n copies of one prompt (as `sample` repeats
  # them); each prompt is prefilled once and its keys/values copied to its rows.
  share_prefill: bool = True
  # Draw only ids below this (0 = any row of the unembedding): a student whose
  # padded vocabulary is wider than its teacher's samples only ids the teacher
  # has (docs/method.md §19.6). Log-probs are then under that renormalised softmax.
  vocab_limit: int = 0

  def __post_init__(self):
    # Normalise list inputs so the config stays hashable.
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
    object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
    checks = {
      "max_new_tokens": self.max_new_tokens >= 1,
      "temperature": math.isfinite(self.temperature) and self.temperature >= 0,
      "top_p": 0.0 < self.top_p <= 1.0,
      "top_k": self.top_k >= 0,
      "eos_ids": all(e >= 0 for e in self.eos_ids),
      "pad_id": self.pad_id >= 0,
      "prompt_buckets": (
        len(self.prompt_buckets) > 0
        and all(b > 0 for b in self.prompt_buckets)
        and list(self.prompt_buckets) == sorted(set(self.prompt_buckets))
      ),
      "n": self.n >= 1,
      "vocab_limit": self.vocab_limit >= 0,
      "cache_dtype": self.cache_dtype is None or self.cache_dtype in model_lib.DTYPES,
    }
    for name, ok in checks.items():
      if not ok:
        raise ValueError(f"SamplingConfig.{name}: invalid value {getattr(self, name)!r}")

  def bucket_for(self, prompt_len: int) -> int:
    """The smallest bucket holding `prompt_len` tokens."""
    for b in self.prompt_buckets:
      if prompt_len <= b:
        return b
    raise ValueError(
      f"prompt of {prompt_len} tokens is longer than the largest bucket "
      f"{self.prompt_buckets[-1]} (SamplingConfig.prompt_buckets)"
    )


class SampleOutput(NamedTuple):
  """A batch of rollouts. B = prompts x n (rows of one prompt are adjacent)."""

  tokens: Array  # int32 [B, R]  generated tokens, pad_id after EOS
  logprobs: Array  # float32 [B, R] log-prob of each token (0 where mask is 0)
  mask: Array  # int32 [B, R]  1 up to and including the EOS token, 0 after
  lengths: Array  # int32 [B]     number of generated tokens (mask.sum(-1))
  prompt_tokens: Array  # int32 [B, P]  the prompts as fed: left-padded to the bucket
  prompt_mask: Array  # int32 [B, P]


# ----------------------------------------------------------------------------
# Token selection
# ----------------------------------------------------------------------------


def _filtered_scores(z_BV: Array, top_k: int, top_p: float) -> tuple[Array, Array | None]:
  """Scores restricted by top-k / top-p: (candidate scores [B, C], their token ids or None).

  Filtering happens on the descending-sorted scores: top-k keeps the first k,
  top-p keeps the shortest prefix whose renormalised mass reaches top_p.
  Excluded candidates get -inf; the first candidate is always kept.
  """
  v = z_BV.shape[-1]
  if top_k <= 0 and top_p >= 1.0:
    return z_BV, None
  k = v if top_k <= 0 else min(top_k, v)
  vals_BC, ids_BC = jax.lax.top_k(z_BV, k)  # sorted, descending
  if top_p < 1.0:
    probs = jax.nn.softmax(vals_BC, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep = keep.at[:, 0].set(True)
    vals_BC = jnp.where(keep, vals_BC, -jnp.inf)
  return vals_BC, ids_BC


def _last_positive(p: Array) -> Array:
  """Index of the last positive entry along the last axis (0 if none)."""
  idx = jnp.arange(p.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(p > 0, idx, 0), axis=-1)


def draw_categorical(key: Array, scores_BC: Array, block: int = 128) -> Array:
  """One draw per row from softmax(scores_BC), int32 [B]; -inf scores are never drawn.

  Inverse-CDF sampling with one uniform per row, in two levels: the row's
  probabilities are summed in blocks of `block`, the block is found on the
  (short) cumulative sum of block masses, then the token inside it. This reads
  the scores about twice and draws B random numbers, where Gumbel-max
  (`jax.random.categorical`) draws B x C numbers and takes two logs of each:
  14x faster at [32, 16k] on a 2-core CPU. Both index choices are clipped to
  the last entry of positive mass, so rounding never selects a zero-mass token
  (underflowed or -inf scores).
  """
  b, c = scores_BC.shape
  z = scores_BC.astype(f32)
  p = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
  pad = (-c) % block
  p_BNK = jnp.pad(p, ((0, 0), (0, pad))).reshape(b, -1, block)
  mass_BN = jnp.sum(p_BNK, axis=-1)
  cum_BN = jnp.cumsum(mass_BN, axis=-1)
  u_B1 = jax.random.uniform(key, (b, 1), f32) * cum_BN[:, -1:]
  blk = jnp.minimum(jnp.sum(cum_BN <= u_B1, axis=-1), _last_positive(mass_BN))
  # Exclusive prefix (exactly the cumsum entry before the block): the block's
  # leading zero-mass entries then compare equal to it and are skipped.
  excl_BN = jnp.pad(cum_BN[:, :-1], ((0, 0), (1, 0)))
  before = jnp.take_along_axis(excl_BN, blk[:, None], axis=-1)
  inner_BK = jnp.take_along_axis(p_BNK, blk[:, None, None], axis=1)[:, 0]
  within = jnp.sum(before + jnp.cumsum(inner_BK, axis=-1) <= u_B1, axis=-1)
  within = jnp.minimum(within, _last_positive(inner_BK))
  return (blk * block + within).astype(jnp.int32)


def select_tokens(
  logits_BV: Array,
  key: Array,
  temperature: float,
  top_k: int,
  top_p: float,
  vocab_limit: int = 0,
) -> tuple[Array, Array]:
  """Draws one token per row. Returns (tokens int32 [B], log-probs float32 [B]).

  Log-probs are under the untruncated softmax(logits / temperature), or
  softmax(logits) for greedy (temperature 0); with `vocab_limit` > 0 the ids
  from it on are masked out first (zero probability, the rest renormalised).
  """
  z = obj.limit_vocab(logits_BV.astype(f32), vocab_limit)
  if temperature == 0.0:
    tok = jnp.argmax(z, axis=-1).astype(jnp.int32)
  else:
    z = z / temperature
    cand_BC, ids_BC = _filtered_scores(z, top_k, top_p)
    choice = draw_categorical(key, cand_BC)
    if ids_BC is None:
      tok = choice.astype(jnp.int32)
    else:
      tok = jnp.take_along_axis(ids_BC, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  # log softmax at the drawn token only: z[tok] - logsumexp(z), never a [B, V] array
  logp = jnp.take_along_axis(z, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)
  return tok, logp


# ----------------------------------------------------------------------------
# The jitted core
# ----------------------------------------------------------------------------


def _constrain_tree(tree, names_tree, rules):
  return jax.tree.map(
    lambda x, n: shd.constrain(x, n, rules),
    tree,
    names_tree,
    is_leaf=lambda n: isinstance(n, tuple) and all(isinstance(a, (str, type(None))) for a in n),
  )


def _is_eos(tok_B: Array, eos_ids: tuple[int, ...]) -> Array:
  if not eos_ids:
    return jnp.zeros(tok_B.shape, bool)
  return jnp.any(tok_B[:, None] == jnp.asarray(eos_ids, jnp.int32)[None, :], axis=-1)


def weights_kw(model, cfg: SamplingConfig) -> dict[str, Any]:
  """The fused decode weights as the model's `weights=` argument (built once a
  call); none when switched off or for a model without them (a test double,
  which decodes from its own params)."""
  if cfg.fused_weights and hasattr(model, "decode_weights"):
    return {"weights": model.decode_weights()}
  return {}


def prefill_step(model, tokens_BT, positions_BT, mask_BT, cache, wkw: dict):
  """The sampler's prefill call: the prompt into the KV cache, then logits of
  the last column only (from its hidden state: [B, T, V] is never built).
  Returns (logits [B, 1, V], cache). `wkw`: `weights_kw`."""
  out = model(tokens_BT, positions_BT, mask_BT, cache=cache, return_hidden=True, **wkw)
  return model.logits(out.hidden[:, -1:], **wkw), out.cache


def decode_step(model, tok_B1, pos_B1, live_B1, cache, wkw: dict):
  """The sampler's decode call: one token a row through the model's decode-step
  path (ModelConfig.decode_attention; test doubles have none). Returns
  (logits [B, 1, V], cache)."""
  dkw = dict(wkw, decode=True) if hasattr(model, "decode_weights") else dict(wkw)
  out = model(tok_B1, pos_B1, live_B1, cache=cache, **dkw)
  return out.logits, out.cache


def sample_core(
  graphdef,
  state,
  tokens_BP: Array,
  mask_BP: Array,
  rng: Array,
  cfg: SamplingConfig,
  cache: dict[str, Any] | None = None,
):
  """Prefill + while_loop decode. Pure; jitted below as `sample_tokens`."""
  model = nnx.merge(graphdef, state)
  mcfg = model.cfg
  rules = mcfg.rules
  b, p = tokens_BP.shape
  r = cfg.max_new_tokens
  tokens_BP = tokens_BP.astype(jnp.int32)
  mask_BP = mask_BP.astype(jnp.int32)
  batch_names = ("batch", None)
  tokens_BP = shd.constrain(tokens_BP, batch_names, rules)
  mask_BP = shd.constrain(mask_BP, batch_names, rules)

  cache_names = model_lib.cache_logical_axes(mcfg)
  if cache is None:
    cache = model_lib.init_cache(mcfg, b, p + r, _cache_dtype(mcfg, cfg))
  else:
    # A reused (donated) cache: forget its contents. Stale keys/values stay in
    # slots whose mask is 0, which attention never reads.
    cache = dict(cache, mask=jnp.zeros_like(cache["mask"]), index=jnp.zeros_like(cache["index"]))
  cache = _constrain_tree(cache, cache_names, rules)

  wkw = weights_kw(model, cfg)
  # Prefill: the whole (left-padded) prompt at once; its last column is real.
  # Only the last column's logits are needed: [B, P, V] float32 is never built.
  group = cfg.n if cfg.share_prefill and cfg.n > 1 and b % cfg.n == 0 else 1
  if group > 1:  # once per prompt, into a P-slot cache, then copied to the group's rows
    u_tok, u_mask = tokens_BP[::group], mask_BP[::group]
    small = _constrain_tree(
      model_lib.init_cache(mcfg, b // group, p, _cache_dtype(mcfg, cfg)), cache_names, rules
    )
    logits_B1V, small = prefill_step(
      model, u_tok, model_lib.positions_from_mask(u_mask), u_mask, small, wkw
    )
    logits_B1V = jnp.repeat(logits_B1V, group, axis=0)
    small = model_lib.repeat_cache_rows(small, group)
    put = lambda big, new: jax.lax.dynamic_update_slice(big, new, (0,) * big.ndim)  # noqa: E731
    cache = {
      # per-layer tuples, or one stacked array each (ModelConfig.scan_layers)
      "k": jax.tree.map(put, cache["k"], small["k"]),
      "v": jax.tree.map(put, cache["v"], small["v"]),
      "mask": put(cache["mask"], small["mask"]),
      "index": small["index"],
    }
    cache = _constrain_tree(cache, cache_names, rules)
  else:
    positions_BP = model_lib.positions_from_mask(mask_BP)
    logits_B1V, cache = prefill_step(model, tokens_BP, positions_BP, mask_BP, cache, wkw)
  next_pos_B = jnp.sum(mask_BP, axis=-1).astype(jnp.int32)  # position of token 0

  tok0, logp0 = select_tokens(
    logits_B1V[:, 0],
    jax.random.fold_in(rng, 0),
    cfg.temperature,
    cfg.top_k,
    cfg.top_p,
    cfg.vocab_limit,
  )
  out_tok_BR, out_logp_BR, out_mask_BR, cache = _decode_loop(
    model, wkw, cache, tok0, logp0, next_pos_B, rng, cfg
  )
  out = SampleOutput(
    tokens=shd.constrain(out_tok_BR, batch_names, rules),
    logprobs=shd.constrain(out_logp_BR, batch_names, rules),
    mask=shd.constrain(out_mask_BR, batch_names, rules),
    lengths=shd.constrain(jnp.sum(out_mask_BR, axis=-1), ("batch",), rules),
    prompt_tokens=tokens_BP,
    prompt_mask=mask_BP,
  )
  return out, cache


def _decode_loop(
  model, wkw, cache, tok0, logp0, next_pos_B, rng, cfg: SamplingConfig, done_B=None, key_offset=0
):
  """Tokens 1 .. R-1 after the drawn token 0 (position next_pos_B), in one
  while_loop over the cache: (tokens, log-probs, mask [B, R], final cache).
  Rows in `done_B` (default: token 0 is an EOS) only pad; token j is drawn
  with key fold_in(rng, j + key_offset)."""
  rules = model.cfg.rules
  cache_names = model_lib.cache_logical_axes(model.cfg)
  b, r = tok0.shape[0], cfg.max_new_tokens
  out_tok_BR = jnp.full((b, r), cfg.pad_id, jnp.int32).at[:, 0].set(tok0)
  out_logp_BR = jnp.zeros((b, r), f32).at[:, 0].set(logp0)
  out_mask_BR = jnp.zeros((b, r), jnp.int32).at[:, 0].set(1)
  done_B = _is_eos(tok0, cfg.eos_ids) if done_B is None else done_B

  def cond(carry):
    step, _, _, _, _, _, done = carry
    return (step < r) & ~jnp.all(done)

  def body(carry):
    # Feed token step-1, then draw token step.
    step, cache, last_tok, out_tok, out_logp, out_mask, done = carry
    live = (~done).astype(jnp.int32)
    pos = (next_pos_B + step - 1)[:, None]
    logits_B1V, cache = decode_step(model, last_tok[:, None], pos, live[:, None], cache, wkw)
    cache = _constrain_tree(cache, cache_names, rules)
    tok, logp = select_tokens(
      logits_B1V[:, 0],
      jax.random.fold_in(rng, step + key_offset),
      cfg.temperature,
      cfg.top_k,
      cfg.top_p,
      cfg.vocab_limit,
    )
    tok = jnp.where(done, cfg.pad_id, tok)
    logp = jnp.where(done, 0.0, logp)
    col = (0, step)
    out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], col)
    out_logp = jax.lax.dynamic_update_slice(out_logp, logp[:, None], col)
    out_mask = jax.lax.dynamic_update_slice(out_mask, live[:, None], col)
    done = done | _is_eos(tok, cfg.eos_ids)
    return step + 1, cache, tok, out_tok, out_logp, out_mask, done

  carry = (jnp.asarray(1, jnp.int32), cache, tok0, out_tok_BR, out_logp_BR, out_mask_BR, done_B)
  _, cache, _, out_tok_BR, out_logp_BR, out_mask_BR, _ = jax.lax.while_loop(cond, body, carry)
  return out_tok_BR, out_logp_BR, out_mask_BR, cache


def _decode_core(graphdef, state, cache, last_tok_B, next_pos_B, rng, cfg, done_B=None, drawn=None):
  model = nnx.merge(graphdef, state)
  last_tok_B = last_tok_B.astype(jnp.int32)
  if done_B is None:
    done_B = _is_eos(last_tok_B, cfg.eos_ids)
  tok, logp, mask, cache = _decode_loop(
    model,
    weights_kw(model, cfg),
    cache,
    last_tok_B,
    jnp.zeros(last_tok_B.shape, f32),
    next_pos_B.astype(jnp.int32),
    rng,
    cfg,
    done_B=done_B.astype(bool),
    key_offset=0 if drawn is None else drawn - 1,
  )
  return tok[:, 1:], logp[:, 1:], mask[:, 1:], cache


# Decoding on from a filled cache: cfg.max_new_tokens - 1 tokens after
# `last_tok_B` (already drawn, not yet in the cache; its position next_pos_B).
# `done_B` marks rows that have finished (default: last_tok_B is an EOS; a row
# that ended earlier has a pad there, so pass the previous call's
# `(mask[:, -1] == 0) | is_eos(tokens[:, -1])`): they only pad. `drawn` = tokens
# drawn before (default 1): token j of the continuation uses key
# fold_in(rng, drawn + j - 1), so continuing a call of N tokens with its rng
# and drawn = N draws what one longer call would. The cache is donated. Returns
# (tokens, log-probs, mask [B, R-1], cache), as `sample_tokens` records them.
# The sampler's own decode loop; benchmarks time a decode step with it on a
# synthetic cache.
decode_jit = jax.jit(_decode_core, static_argnames=("graphdef", "cfg"), donate_argnames=("cache",))


# Traced-function counter: the recompile test reads it (one increment per trace).
TRACE_COUNT = {"sample_tokens": 0}


def _counted_core(graphdef, state, tokens_BP, mask_BP, rng, cfg, cache):
  TRACE_COUNT["sample_tokens"] += 1
  return sample_core(graphdef, state, tokens_BP, mask_BP, rng, cfg, cache)


# The jitted core; `sample_tokens` calls it (tests and tools lower it directly).
sample_jit = jax.jit(_counted_core, static_argnames=("graphdef", "cfg"), donate_argnames=("cache",))


def sample_tokens(
  graphdef,
  state,
  tokens_BP: Array,
  mask_BP: Array,
  rng: Array,
  cfg: SamplingConfig,
  cache: dict[str, Any] | None = None,
) -> tuple[SampleOutput, dict[str, Any]]:
  """The jitted sampler core, for JAX callers: returns (SampleOutput, final cache).

  `tokens_BP`/`mask_BP` are already left-padded (every row's last column
  real) and already repeated for `cfg.n` (this core does not repeat): rows
  i*n .. i*n+n-1 hold the same prompt, which `cfg.share_prefill` relies on. `cache`
  (optional) is a cache of `bucket + max_new_tokens` slots from `make_cache`
  or a previous call; it is donated and its buffers are reused. Without it, a
  fresh cache is allocated inside the program. Call under `jax.set_mesh(mesh)`
  for sharded sampling (the model's logical constraints need the mesh).
  """
  return sample_jit(graphdef, state, tokens_BP, mask_BP, rng, cfg, cache)


def _cache_dtype(mcfg: model_lib.ModelConfig, cfg: SamplingConfig):
  return model_lib.DTYPES[cfg.cache_dtype] if cfg.cache_dtype else mcfg.jnp_dtype


def cache_shardings(mcfg: model_lib.ModelConfig, mesh, batch: int, length: int):
  """NamedSharding per cache leaf, from the cache's logical axes."""
  shapes = jax.eval_shape(lambda: model_lib.init_cache(mcfg, batch, length))
  names = model_lib.cache_logical_axes(mcfg)
  return jax.tree.map(
    lambda s, n: shd.named_sharding(mesh, n, mcfg.rules, s.shape),
    shapes,
    names,
    is_leaf=lambda n: isinstance(n, tuple) and all(isinstance(a, (str, type(None))) for a in n),
  )


@functools.cache
def _cache_maker(mcfg, batch, length, dtype_name, mesh):
  dtype = model_lib.DTYPES[dtype_name] if dtype_name else None
  out_shardings = None if mesh is None else cache_shardings(mcfg, mesh, batch, length)
  return jax.jit(
    lambda: model_lib.init_cache(mcfg, batch, length, dtype), out_shardings=out_shardings
  )


def make_cache(
  mcfg: model_lib.ModelConfig, batch: int, bucket: int, cfg: SamplingConfig, mesh=None
) -> dict[str, Any]:
  """An empty cache of `bucket + max_new_tokens` slots, created in its sharded layout."""
  return _cache_maker(
    mcfg, batch, bucket + cfg.max_new_tokens, cfg.cache_dtype or mcfg.dtype, mesh
  )()


# ----------------------------------------------------------------------------
# Host-side wrapper
# ----------------------------------------------------------------------------


def prepare_prompts(
  prompt_tokens_BT, prompt_mask_BT, cfg: SamplingConfig, vocab_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Validates left-padded prompts and re-pads them on the left to their bucket.

  Returns numpy int32 (tokens [B, P], mask [B, P]), P = the bucket of the
  longest prompt. Raises ValueError on empty, right-padded or too-long prompts.
  """
  tokens = np.asarray(prompt_tokens_BT)
  mask = np.asarray(prompt_mask_BT)
  if tokens.ndim != 2 or tokens.shape != mask.shape:
    raise ValueError(f"prompt tokens {tokens.shape} and mask {mask.shape} must be equal [B, T]")
  if tokens.shape[0] == 0:
    raise ValueError("empty batch of prompts")
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError("prompt mask must hold only 0 and 1")
  mask = mask.astype(np.int32)
  lens = mask.sum(-1)
  if np.any(lens == 0):
    raise ValueError(f"empty prompt in rows {np.flatnonzero(lens == 0).tolist()}")
  if np.any(np.diff(mask, axis=-1) < 0):
    raise ValueError("prompts must be left-padded (mask 0...0 1...1 in every row)")
  if vocab_size is not None and (
    tokens[mask > 0].min() < 0 or tokens[mask > 0].max() >= vocab_size
  ):
    raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
  longest = int(lens.max())
  bucket = cfg.bucket_for(longest)
  b = tokens.shape[0]
  out_tok = np.full((b, bucket), cfg.pad_id, np.int32)
  out_mask = np.zeros((b, bucket), np.int32)
  out_tok[:, bucket - longest :] = tokens[:, -longest:]
  out_mask[:, bucket - longest :] = mask[:, -longest:]
  out_tok = np.where(out_mask > 0, out_tok, cfg.pad_id).astype(np.int32)
  return out_tok, out_mask


def check_request(mcfg: model_lib.ModelConfig, cfg: SamplingConfig, longest_prompt: int):
  """Errors that depend on the model: window, token ids."""
  if longest_prompt + cfg.max_new_tokens > mcfg.max_seq_len:
    raise ValueError(
      f"SamplingConfig.max_new_tokens: prompt of {longest_prompt} tokens + "
      f"{cfg.max_new_tokens} new tokens exceeds the model window {mcfg.max_seq_len}"
    )
  for name, ids in (("eos_ids", cfg.eos_ids), ("pad_id", (cfg.pad_id,))):
    if any(i >= mcfg.vocab_size for i in ids):
      raise ValueError(f"SamplingConfig.{name}: {ids} outside the vocabulary ({mcfg.vocab_size})")


def sample(
  model: model_lib.Transformer,
  prompt_tokens_BT,
  prompt_mask_BT,
  rng: Array,
  cfg: SamplingConfig,
  *,
  mesh=None,
) -> SampleOutput:
  """Samples `cfg.n` continuations of each left-padded prompt.

  Output rows are grouped by prompt: rows i*n .. i*n+n-1 continue prompt i.
  With `mesh`, rows are sharded over the data axes and the cache per its
  logical axes; the model's state should already be sharded on `mesh`.
  All validation happens here, before anything is compiled.
  """
  mcfg = model.cfg
  tokens, mask = prepare_prompts(prompt_tokens_BT, prompt_mask_BT, cfg, mcfg.vocab_size)
  check_request(mcfg, cfg, int(mask.sum(-1).max()))
  if cfg.n > 1:
    tokens = np.repeat(tokens, cfg.n, axis=0)
    mask = np.repeat(mask, cfg.n, axis=0)
  b, p = tokens.shape
  graphdef, state = nnx.split(model)
  if mesh is None:
    cache = make_cache(mcfg, b, p, cfg)
    out, _ = sample_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), rng, cfg, cache)
    return out
  data = shd.batch_sharding(mesh, 2, mcfg.rules, tokens.shape)
  tokens = shd.put_global(tokens, data)  # multi-host safe: every host holds the batch
  mask = shd.put_global(mask, data)
  rng = shd.put_global(rng, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  cache = make_cache(mcfg, b, p, cfg, mesh)
  with jax.set_mesh(mesh):
    out, _ = sample_tokens(graphdef, state, tokens, mask, rng, cfg, cache)
  return out
