"""Attention: rotary embeddings, softmax attention over a KV cache or plain
causal rows, and the `Attention` layer (grouped-query, Qwen2 q/k/v biases,
Qwen3 q/k norms, LoRA hooks on q, k, v, o).

`dense_out_major` is the matmul of the sampler's fused decode weights
(`Transformer.decode_weights`), which the MLP and the unembedding use too.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from srft_jax import decode_attention
from srft_jax import sharding as shd
from srft_jax.model.config import ModelConfig
from srft_jax.model.layers import RMSNorm
from srft_jax.model.layers import param
from srft_jax.model.lora_hooks import adapted_weight
from srft_jax.model.lora_hooks import lora_delta
from srft_jax.model.lora_hooks import plus_delta

Array = jax.Array
f32 = jnp.float32
log = logging.getLogger(__name__)


def rope_frequencies(cfg: ModelConfig) -> Array:
  """Inverse frequencies [H/2], with Llama 3 scaling when configured."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=f32) / h))
  s = cfg.rope_scaling
  if s is None:
    return inv
  wavelen = 2 * math.pi / inv
  low_wl = s.original_max_position / s.low_freq_factor
  high_wl = s.original_max_position / s.high_freq_factor
  smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  medium = (1 - smooth) * inv / s.factor + smooth * inv
  return jnp.where(wavelen > low_wl, inv / s.factor, jnp.where(wavelen < high_wl, inv, medium))


def apply_rope(x_BTNH: Array, positions_BT: Array, inv_freq: Array) -> Array:
  """Rotary embedding, HF "rotate half" layout, computed in float32."""
  angles = positions_BT.astype(f32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BTNH.astype(f32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


# Backends on which `dense_out_major` multiplies big-operand-first by default;
# read at trace time (benchmarks A/B it on accelerators: clear jit caches after a change).
WEIGHT_FIRST_BACKENDS = ("cpu",)


def dense_out_major(
  x: Array, w: Array, n_in: int = 1, preferred_element_type=None, weight_first: bool | None = None
) -> Array:
  """x [..., I...] times an output-major weight w [O..., I...] -> [..., O...].

  The decode weights (`Transformer.decode_weights`) are stored output-major.
  XLA:CPU runs a skinny decode matmul ([B, D] rows, B ~ 32) 1.3-2.5x faster
  as `w @ x.T` (the big operand first, a small transpose after) than as
  `x @ w.T` or from an input-major weight; other backends take `x @ w.T`
  directly (transposed operands are native to cuBLAS and the MXU).
  `weight_first` overrides that choice (None: `WEIGHT_FIRST_BACKENDS`).
  """
  nx, nw = x.ndim, w.ndim
  x_in, w_in = tuple(range(nx - n_in, nx)), tuple(range(nw - n_in, nw))
  if weight_first is None:
    weight_first = jax.default_backend() in WEIGHT_FIRST_BACKENDS
  if not weight_first:
    return jax.lax.dot_general(
      x, w, ((x_in, w_in), ((), ())), preferred_element_type=preferred_element_type
    )
  y = jax.lax.dot_general(
    w, x, ((w_in, x_in), ((), ())), preferred_element_type=preferred_element_type
  )
  n_out = nw - n_in
  return y.transpose(tuple(range(n_out, y.ndim)) + tuple(range(n_out)))


def attend(q_BTNH: Array, k_BKHS: Array, v_BKSH: Array, allowed_BTS: Array) -> Array:
  """Grouped-query softmax attention, float32 scores and softmax.

  Keys are [B, K, H, S] and values [B, K, S, H] (the KV cache's layouts), and
  the queries of one kv head are laid out [B, K, G*T, H] first, so both
  matmuls are plain batched matmuls, batch dims leading and the contraction
  dim of each right operand leading: no cache-sized transposes. XLA:CPU runs
  a decode step's score matmul 1.6-1.8x faster from [H, S] keys than from
  [S, H] keys; GPUs and TPUs take either operand orientation natively.
  """
  b, t, n, h = q_BTNH.shape
  k, s = k_BKHS.shape[1], k_BKHS.shape[3]
  g = n // k
  q = q_BTNH.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  scores = jnp.einsum("BKMH,BKHS->BKMS", q, k_BKHS, preferred_element_type=f32)
  scores = scores.reshape(b, k, g, t, s) * (h**-0.5)
  # finfo.min, not -inf: a fully masked row (a padding query) stays finite.
  scores = jnp.where(allowed_BTS[:, None, None, :, :], scores, jnp.finfo(f32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype).reshape(b, k, g * t, s)
  out = jnp.einsum("BKMS,BKSH->BKMH", probs, v_BKSH, preferred_element_type=f32)
  out = out.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4)
  return out.reshape(b, t, n, h).astype(q_BTNH.dtype)


def attend_chunked(q_BTNH, k_BKHS, v_BKSH, allowed_BTS, chunk: int) -> Array:
  """`attend` over blocks of queries: peak score memory [B, N, chunk, S].

  Each block is rematerialised in the backward pass, so long training
  sequences (8k+ tokens) never hold a full [T, S] score matrix per head.
  """
  b, t, n, h = q_BTNH.shape
  if t <= chunk:
    return attend(q_BTNH, k_BKHS, v_BKSH, allowed_BTS)
  pad = (-t) % chunk
  q = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  allowed = jnp.pad(allowed_BTS, ((0, 0), (0, pad), (0, 0)))
  nblk = (t + pad) // chunk
  q = q.reshape(b, nblk, chunk, n, h).swapaxes(0, 1)
  allowed = allowed.reshape(b, nblk, chunk, -1).swapaxes(0, 1)
  block = jax.checkpoint(lambda qa: attend(qa[0], k_BKHS, v_BKSH, qa[1]))
  out = jax.lax.map(block, (q, allowed))  # [nblk, B, chunk, N, H]
  return out.swapaxes(0, 1).reshape(b, t + pad, n, h)[:, :t]


def attend_causal(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array) -> Array:
  """Plain causal attention through `jax.nn.dot_product_attention`.

  cuDNN flash attention (it skips the masked upper triangle and never stores
  scores) when running on a GPU in bf16/fp16; XLA's implementation elsewhere,
  so the same model runs and is tested on CPU.
  """
  impl = "cudnn" if cudnn_available(q_BTNH.dtype) else "xla"
  return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=impl)


class PackedRuns(NamedTuple):
  """A packed row's segments for cuDNN's packed (THD) layout: each run of equal
  segment ids, the padding tail included as a run of its own (so every token
  has finite outputs), as (start, length) pairs, -1 past a row's last run."""

  starts_BM: Array  # int32 [B, M + 1]: first column of each run (cuDNN's q_offsets)
  lengths_BM: Array  # int32 [B, M]: tokens in each run (cuDNN's q_seqlen)


def packed_runs(segment_ids_BT: Array, max_runs: int) -> PackedRuns:
  """The runs of `segment_ids_BT` (docs/method.md §18: a packed row is segments
  1, 2, ... one after the other, then padding 0) as `PackedRuns` with room for
  `max_runs` runs a row. A row's runs past `max_runs` are left out (their
  tokens attend to nothing; the other rows are unaffected), so the caller
  bounds it: the step by its rows a micro-batch, plus the tail."""
  b, t = segment_ids_BT.shape
  seg = segment_ids_BT
  first = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  run = jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1  # [B, T]: each token's run
  rows = jnp.arange(b, dtype=jnp.int32)[:, None]
  cols = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  # Runs past max_runs are dropped by the scatters' mode.
  lengths = jnp.zeros((b, max_runs), jnp.int32).at[rows, run].add(1, mode="drop")
  starts = jnp.full((b, max_runs), t, jnp.int32).at[rows, run].min(cols, mode="drop")
  used = jnp.arange(max_runs)[None] < run[:, -1:] + 1
  # The offsets' last column is never a start: -1 (the packed layout's [B, M + 1]).
  starts = jnp.concatenate([jnp.where(used, starts, -1), jnp.full((b, 1), -1, jnp.int32)], 1)
  return PackedRuns(starts, jnp.where(used, lengths, -1))


def runs_allowed(runs: PackedRuns, t: int) -> Array:
  """[B, T, T]: query i sees key j when both lie in one run and j <= i, the
  mask cuDNN's packed layout with a causal padding mask applies."""
  cols = jnp.arange(t)
  starts = runs.starts_BM[:, :-1]
  ends = jnp.where(runs.lengths_BM >= 0, starts + runs.lengths_BM, -1)
  # each token's run: the last start at or before it
  inside = (cols[None, :, None] >= starts[:, None, :]) & (cols[None, :, None] < ends[:, None, :])
  run = jnp.argmax(inside, axis=-1)  # [B, T]
  return (run[:, :, None] == run[:, None, :]) & (cols[None, None, :] <= cols[None, :, None])


def cudnn_available(dtype) -> bool:
  """cuDNN flash attention applies: a CUDA backend and a 16-bit compute dtype."""
  on_gpu = jax.default_backend() in ("gpu", "cuda")
  return on_gpu and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_packed_operands(q_BTNH, k_BTKH, v_BTKH, runs: PackedRuns) -> tuple[Array, ...]:
  """(q, k, v, q_seqlen, kv_seqlen, q_offsets, kv_offsets) as `_cudnn_packed`
  hands them to jax's cuDNN attention. Keys and values are repeated to the
  query's head count: jax 0.10's packed layout turns the key offsets into
  element offsets with the query's heads as the token stride, which is wrong
  for grouped-query keys (it reads other segments' keys, without an error)."""
  n, kh = q_BTNH.shape[2], k_BTKH.shape[2]
  if kh != n:
    k_BTKH = jnp.repeat(k_BTKH, n // kh, axis=2)  # query head i reads kv head i // (n / kh)
    v_BTKH = jnp.repeat(v_BTKH, n // kh, axis=2)
  lengths, starts = runs.lengths_BM, runs.starts_BM
  return q_BTNH, k_BTKH, v_BTKH, lengths, lengths, starts, starts


def _cudnn_packed(q_BTNH, k_BTKH, v_BTKH, runs: PackedRuns) -> Array | None:
  """cuDNN flash attention over its packed layout, or None where this jax,
  cuDNN or GPU has none (it needs Hopper or newer): the caller falls back."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # noqa: PLC0415 (GPUs only; jax has no public packed API)
  except ImportError as e:
    _warn_once(f"this jax has no cuDNN packed attention ({e}); using chunked attention")
    return None
  q, k, v, q_len, kv_len, q_off, kv_off = cudnn_packed_operands(q_BTNH, k_BTKH, v_BTKH, runs)
  try:
    return cudnn_fa.dot_product_attention(
      q,
      k,
      v,
      q_seqlen=q_len,
      kv_seqlen=kv_len,
      q_offsets=q_off,
      kv_offsets=kv_off,
      scale=q.shape[-1] ** -0.5,
      mask_type=cudnn_fa.MaskType.PADDING_CAUSAL,
    )
  except NotImplementedError as e:  # before Hopper, or a shape cuDNN refuses
    _warn_once(f"cuDNN's packed attention is not available here ({e}); using chunked attention")
    return None


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
  if msg not in _WARNED:
    _WARNED.add(msg)
    log.warning(msg)


def attend_packed(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, runs: PackedRuns, chunk: int):
  """Causal attention inside each run of a packed row.

  On a GPU in bf16/fp16: cuDNN flash attention over its packed layout (each
  run a sequence of its own: no [T, T] mask, no score matrix, nothing computed
  across runs). Elsewhere, or where cuDNN has no packed layout (before
  Hopper): `attend_chunked` under `runs_allowed`, the same mask, so the CPU
  tests check the runs themselves.
  """
  if cudnn_available(q_BTNH.dtype):
    out = _cudnn_packed(q_BTNH, k_BTKH, v_BTKH, runs)
    if out is not None:
      return out
  t = q_BTNH.shape[1]
  k = k_BTKH.transpose(0, 2, 3, 1)  # the cache layouts `attend` reads
  v = v_BTKH.swapaxes(1, 2)
  return attend_chunked(q_BTNH, k, v, runs_allowed(runs, t), chunk)


def left_align(mask_BT: Array) -> tuple[Array, Array]:
  """Row gathers that move each row's real tokens to the front, and back.

  A row whose real tokens are contiguous (left-padded prompt + right-padded
  response, the trainer's layout) becomes real tokens first, padding last, so
  plain causal attention is exact for every real token. Returns
  (to_front_BT, to_back_BT) index arrays for `take_along_axis` on axis 1.
  """
  t = mask_BT.shape[1]
  shift = jnp.argmax(mask_BT > 0, axis=-1).astype(jnp.int32)[:, None]
  idx = jnp.arange(t, dtype=jnp.int32)[None]
  return (idx + shift) % t, (idx - shift) % t


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, k, h, pd = (
      cfg.embed_dim,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.jnp_param_dtype,
    )
    self.cfg = cfg
    self.q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
    self.k = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      self.q_bias = param(None, (n, h), ("heads", "head_dim"), pd, init="zeros")
      self.k_bias = param(None, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
      self.v_bias = param(None, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
    if cfg.qk_norm:  # Qwen3: one [H] scale shared by every head
      self.q_norm = RMSNorm(h, cfg.norm_eps, pd)
      self.k_norm = RMSNorm(h, cfg.norm_eps, pd)

  def decode_weights(self) -> dict[str, Array]:
    """Output-major projections in the compute dtype (see `dense_out_major`),
    q/k/v fused per kv head: qkv [K, G+2, H, D], o [D, N, H].

    Slot j < G of kv head k is query head k*G + j (the GQA grouping `attend`
    uses); slots G and G+1 are that head's key and value. Sharded on the
    kv-head axis, a tensor shard holds whole groups.
    """
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w = {name: adapted_weight(self, name) for name in ("q", "k", "v", "o")}  # + LoRA's A B
    q = w["q"].reshape(d, k, n // k, h)
    qkv = jnp.concatenate([q, w["k"][:, :, None], w["v"][:, :, None]], axis=2)
    qkv = qkv.astype(dt).transpose(1, 2, 3, 0)
    out = {
      "qkv": shd.constrain(qkv, ("kv_heads", None, "head_dim", "embed"), cfg.rules),
      "o": shd.constrain(
        w["o"].astype(dt).transpose(2, 0, 1), ("embed", "heads", "head_dim"), cfg.rules
      ),
    }
    if cfg.qkv_bias:
      bias = jnp.concatenate(
        [
          self.q_bias[...].reshape(k, n // k, h),
          self.k_bias[...][:, None],
          self.v_bias[...][:, None],
        ],
        axis=1,
      )
      out["qkv_bias"] = bias.astype(dt)
    return out

  def _project(self, x_BTD, w, dropout_key=None):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    if w is not None:  # one matmul for q, k and v
      b, t, _ = x_BTD.shape
      g = cfg.num_heads // cfg.num_kv_heads
      qkv = dense_out_major(x_BTD, w["qkv"])  # [B, T, K, G+2, H]
      if cfg.qkv_bias:
        qkv = qkv + w["qkv_bias"]
      q = qkv[:, :, :, :g].reshape(b, t, cfg.num_heads, cfg.head_dim)
      return q, qkv[:, :, :, g], qkv[:, :, :, g + 1]
    q = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q[...].astype(dt))
    k = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k[...].astype(dt))
    v = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.v[...].astype(dt))
    q, k, v = (
      plus_delta(y, lora_delta(self, name, x_BTD, dropout_key=dropout_key))
      for y, name in zip((q, k, v), "qkv")
    )
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    return q, k, v

  def __call__(
    self,
    x_BTD,
    positions_BT,
    inv_freq,
    allowed_BTS,
    kv=None,
    index=None,
    w=None,
    decode=False,
    dropout_key=None,
  ):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    rules = cfg.rules
    q, k, v = self._project(x_BTD, w, dropout_key)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = shd.constrain(
      apply_rope(q, positions_BT, inv_freq), ("batch", "length", "act_heads", "head_dim"), rules
    )
    k = apply_rope(k, positions_BT, inv_freq)
    if allowed_BTS is None:  # packed causal rows (attention="cudnn", no cache)
      k = shd.constrain(k, ("batch", "length", "act_kv_heads", "head_dim"), rules)
      return self._out(attend_causal(q, k, v), w, dropout_key), None
    if isinstance(allowed_BTS, PackedRuns):  # packed segments (attention="cudnn", no cache)
      k = shd.constrain(k, ("batch", "length", "act_kv_heads", "head_dim"), rules)
      out = attend_packed(q, k, v, allowed_BTS, cfg.attention_chunk)
      return self._out(out, w, dropout_key), None
    # The cache layouts: keys [B, K, H, T], values [B, K, T, H] (see `attend`).
    k = k.transpose(0, 2, 3, 1)
    v = v.swapaxes(1, 2)
    if kv is not None:  # write the new keys/values into the cache at `index`
      k_cache, v_cache = kv
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, 0, index))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
      kv = (k, v)
    length = "cache_length" if kv is not None else "length"
    k = shd.constrain(k, ("batch", "act_kv_heads", "head_dim", length), rules)
    v = shd.constrain(v, ("batch", "act_kv_heads", length, "head_dim"), rules)
    if (
      decode
      and kv is not None
      and q.shape[1] == 1
      and cfg.decode_attention == "pallas"
      and k.dtype == q.dtype
      and decode_attention.supported(cfg.head_dim, k.shape[-1])
    ):
      # the new token sits in slot `index`: nothing past it is read
      out = decode_attention.decode_attention(
        q[:, 0], k, v, allowed_BTS[:, 0], index + 1, rules=rules
      )[:, None]
    # With a cache, "cudnn" attends in query blocks too (cuDNN needs packed causal rows).
    elif cfg.attention in ("chunked", "cudnn"):
      out = attend_chunked(q, k.astype(dt), v.astype(dt), allowed_BTS, cfg.attention_chunk)
    else:
      out = attend(q, k.astype(dt), v.astype(dt), allowed_BTS)
    return self._out(out, w, dropout_key), kv

  def _out(self, out_BTNH, w, dropout_key=None):
    if w is None:
      y = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o[...].astype(self.cfg.jnp_dtype))
      return plus_delta(y, lora_delta(self, "o", out_BTNH, n_in=2, dropout_key=dropout_key))
    return dense_out_major(out_BTNH, w["o"], n_in=2)
