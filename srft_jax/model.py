"""Decoder-only transformer (Qwen2 / Qwen2.5, Llama 3, Qwen3 and Qwen3-MoE) in Flax NNX.

The trainer and the sampler call this one model: the sampler passes a KV
cache, the trainer asks for final hidden states and computes log-probs in
chunks from them (objectives.chunked_logprobs_and_entropy).

Qwen3 adds a per-head RMSNorm on q and k before RoPE (`qk_norm`); Qwen3-MoE
replaces the MLP of its sparse layers by `MoE`: a float32 router picks the
top-k experts of each token, tokens are grouped by expert and run through
grouped matmuls (`grouped_matmul`: megablox kernels on TPU, jax.lax.ragged_dot
elsewhere; dropless), and the router's load-balancing loss (`router_aux_loss`)
is returned to the trainer on request.

Dimension letters used in names and einsum strings:
  B  batch rows              T  query (sequence) length
  S  key length (cache slots) D  embed (hidden) size
  F  mlp (ffn) size          N  query heads
  K  key/value heads         G  query heads per kv head (N // K)
  H  head dim                V  vocabulary
  L  layers                  E  experts
  X  experts a token (top-k) M  tokens of a MoE call (B * T, flattened)
  A  token-expert assignments (M * X)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from srft_jax import decode_attention
from srft_jax import sharding as shd

Array = jax.Array
f32 = jnp.float32

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 RoPE frequency scaling (HF `rope_type: llama3`)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one decoder. Frozen: jitted code may close over it."""

  model_type: str = "qwen2"  # "qwen2" | "llama" | "qwen3" | "qwen3_moe" (HF model_type)
  vocab_size: int = 512
  embed_dim: int = 128  # D (HF hidden_size)
  mlp_dim: int = 384  # F (HF intermediate_size)
  num_layers: int = 4  # L
  num_heads: int = 4  # N
  num_kv_heads: int = 2  # K
  head_dim: int = 32  # H
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  max_seq_len: int = 2048  # context window (HF max_position_embeddings)
  norm_eps: float = 1e-6
  qkv_bias: bool = True  # Qwen2: True, Llama and Qwen3: False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each q and k head before RoPE
  tie_embeddings: bool = False
  # Mixture of experts (Qwen3-MoE); num_experts 0: every layer is dense.
  num_experts: int = 0  # E
  num_experts_per_tok: int = 0  # X: top-k experts a token
  moe_mlp_dim: int = 0  # one expert's F (HF moe_intermediate_size)
  norm_topk_prob: bool = False  # rescale the top-k router probabilities to sum to 1
  decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
  mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
  router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training
  # The experts' grouped matmuls (`grouped_matmul`): "auto" (megablox' Pallas
  # kernels where compiled for TPU, jax.lax.ragged_dot elsewhere), "ragged_dot",
  # or "megablox" (its interpreter off TPU: tests).
  grouped_matmul: str = "auto"
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype; norms, softmax, logits stay float32
  remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs)
  # "xla" (one einsum) | "chunked" (query blocks) | "cudnn": jax.nn.dot_product_attention,
  # cuDNN flash attention on GPU in bf16 (XLA elsewhere); training/scoring rows must hold
  # their real tokens contiguously (left-padded prompt + right-padded response).
  attention: str = "xla"
  attention_chunk: int = 512  # query block size for attention="chunked"
  # The sampler's decode-step attention over the KV cache (one new token a row): "xla"
  # (`attend`) or "pallas" (`decode_attention.decode_attention`: one Triton kernel on GPUs
  # that reads only the filled slots; Pallas' interpreter on CPU, for tests).
  decode_attention: str = "xla"
  rules: tuple = shd.DEFAULT_RULES  # logical axis -> mesh axes

  def __post_init__(self):
    object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
    moe = self.num_experts > 0
    checks = {
      "model_type": self.model_type in MODEL_TYPES,
      "num_heads": self.num_heads % max(self.num_kv_heads, 1) == 0,
      "param_dtype": self.param_dtype in DTYPES,
      "dtype": self.dtype in DTYPES,
      "remat": self.remat in ("none", "full", "dots"),
      "attention": self.attention in ("xla", "chunked", "cudnn"),
      "decode_attention": self.decode_attention in ("xla", "pallas"),
      "num_experts": self.num_experts >= 0,
      "num_experts_per_tok": not moe or 1 <= self.num_experts_per_tok <= self.num_experts,
      "moe_mlp_dim": not moe or self.moe_mlp_dim > 0,
      "decoder_sparse_step": self.decoder_sparse_step >= 1,
      "router_aux_loss_coef": self.router_aux_loss_coef >= 0,
      "grouped_matmul": self.grouped_matmul in ("auto", "ragged_dot", "megablox"),
    }
    for name, ok in checks.items():
      if not ok:
        raise ValueError(f"ModelConfig.{name}: invalid value {getattr(self, name)!r}")
    for name in (
      "vocab_size",
      "embed_dim",
      "mlp_dim",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "max_seq_len",
      "attention_chunk",
    ):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ModelConfig.{name}: must be positive, got {getattr(self, name)}")

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer i has a sparse MoE block (HF Qwen3-MoE's rule)."""
    return (
      self.num_experts > 0
      and i not in self.mlp_only_layers
      and (i + 1) % self.decoder_sparse_step == 0
    )

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))

  def num_params(self, active: bool = False) -> int:
    """Parameter count; `active`: the parameters one token uses (top-k of the
    experts of each MoE layer), the N of a MoE model's 6 N FLOPs a token."""
    d, f, n, k, h, v = (
      self.embed_dim,
      self.mlp_dim,
      self.num_heads,
      self.num_kv_heads,
      self.head_dim,
      self.vocab_size,
    )
    attn = d * n * h + 2 * d * k * h + n * h * d
    if self.qkv_bias:
      attn += n * h + 2 * k * h
    if self.qk_norm:
      attn += 2 * h
    experts = self.num_experts_per_tok if active else self.num_experts
    moe = d * self.num_experts + experts * 3 * d * self.moe_mlp_dim
    mlps = self.num_moe_layers * moe + (self.num_layers - self.num_moe_layers) * 3 * d * f
    layers = self.num_layers * (attn + 2 * d) + mlps
    return v * d * (1 if self.tie_embeddings else 2) + layers + d

  @classmethod
  def preset(cls, name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


MODEL_TYPES = ("qwen2", "llama", "qwen3", "qwen3_moe")

# What a family's checkpoints share; a preset is its family's fields plus its own.
_QWEN = dict(vocab_size=151_936, head_dim=128, rope_theta=1e6, norm_eps=1e-6)
_FAMILIES: dict[str, dict] = {
  # Qwen2 / Qwen2.5: q/k/v bias, 32k window, tied embeddings (the small ones).
  "qwen2": dict(_QWEN, model_type="qwen2", max_seq_len=32_768, qkv_bias=True, tie_embeddings=True),
  # Qwen3: q/k RMSNorm before RoPE, no q/k/v bias, 40k window.
  "qwen3": dict(
    _QWEN,
    model_type="qwen3",
    num_heads=16,
    num_kv_heads=8,
    max_seq_len=40_960,
    qkv_bias=False,
    qk_norm=True,
  ),
}
_FAMILIES["qwen3_moe"] = dict(
  _FAMILIES["qwen3"], model_type="qwen3_moe", norm_topk_prob=True, router_aux_loss_coef=0.001
)


def _preset(family: str, **fields) -> ModelConfig:
  return ModelConfig(**{**_FAMILIES[family], **fields})


# Tiny random Qwen3 and Qwen3-MoE (tests, the default run): head_dim 64 with 4
# heads of a 128-wide model, head_dim independent of embed / heads as in Qwen3.
_TINY_QWEN3 = dict(
  vocab_size=512,
  embed_dim=128,
  mlp_dim=384,
  num_layers=4,
  num_heads=4,
  num_kv_heads=2,
  head_dim=64,
  max_seq_len=2048,
)
_QWEN2_5_MATH_7B = _preset(
  "qwen2",
  vocab_size=152_064,
  embed_dim=3584,
  mlp_dim=18_944,
  num_layers=28,
  num_heads=28,
  num_kv_heads=4,
  rope_theta=10_000.0,
  max_seq_len=4096,
  tie_embeddings=False,
  param_dtype="bfloat16",
  dtype="bfloat16",
  remat="full",
  attention="chunked",
)

PRESETS: dict[str, ModelConfig] = {
  # CPU tests and the default run; vocab is replaced by the task tokenizer's.
  "tiny": ModelConfig(),
  "tiny_qwen3": _preset("qwen3", **_TINY_QWEN3, tie_embeddings=True),
  "tiny_qwen3_moe": _preset(
    "qwen3_moe", **_TINY_QWEN3, num_experts=8, num_experts_per_tok=2, moe_mlp_dim=96
  ),
  "qwen3_0_6b": _preset("qwen3", embed_dim=1024, mlp_dim=3072, num_layers=28, tie_embeddings=True),
  "qwen3_1_7b": _preset("qwen3", embed_dim=2048, mlp_dim=6144, num_layers=28, tie_embeddings=True),
  "qwen3_8b": _preset("qwen3", embed_dim=4096, mlp_dim=12_288, num_layers=36, num_heads=32),
  "qwen3_30b_a3b": _preset(
    "qwen3_moe",
    embed_dim=2048,
    mlp_dim=6144,
    num_layers=48,
    num_heads=32,
    num_kv_heads=4,
    num_experts=128,
    num_experts_per_tok=8,
    moe_mlp_dim=768,
  ),
  "qwen2_5_0_5b": _preset(
    "qwen2", embed_dim=896, mlp_dim=4864, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64
  ),
  "qwen2_5_1_5b": _preset(
    "qwen2", embed_dim=1536, mlp_dim=8960, num_layers=28, num_heads=12, num_kv_heads=2
  ),
  "qwen2_5_math_7b": _QWEN2_5_MATH_7B,
  # The paper's variant (docs/method.md §5): RoPE theta 40k and a 16,384-token window.
  "qwen2_5_math_7b_rope40k": dataclasses.replace(
    _QWEN2_5_MATH_7B, rope_theta=40_000.0, max_seq_len=16_384
  ),
  "llama3_2_1b": ModelConfig(
    model_type="llama",
    vocab_size=128_256,
    embed_dim=2048,
    mlp_dim=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    rope_theta=500_000.0,
    rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
    max_seq_len=131_072,
    norm_eps=1e-5,
    qkv_bias=False,
    tie_embeddings=True,
  ),
}
# The presets `factory.model_config` sizes from the run's config and tokenizer.
TINY_PRESETS = ("tiny", "tiny_qwen3", "tiny_qwen3_moe")


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal"):
  if init == "zeros":
    value = jnp.zeros(shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = (0.02 * jax.random.normal(rngs.params(), shape, f32)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


# LoRA (srft_jax/lora.py attaches the adapters): a projection `name` of a layer
# may carry `{name}_lora_a` [I..., R] and `{name}_lora_b` [R, O...] (nnx.LoRAParam,
# float32) and the layer a static `lora_scale` (alpha / R): W_eff = W + scale * A B.


def lora_adapter(module: nnx.Module, name: str):
  """(A, B, scale) of the adapter on projection `name` of `module`, or None."""
  a = getattr(module, f"{name}_lora_a", None)
  if a is None:
    return None
  return a[...], getattr(module, f"{name}_lora_b")[...], module.lora_scale


def adapted_weight(module: nnx.Module, name: str) -> Array:
  """W + scale * A B (float32) where `name` has an adapter; else W as stored."""
  w = getattr(module, name)[...]
  ad = lora_adapter(module, name)
  if ad is None:
    return w
  a, b, scale = ad
  return w.astype(f32) + scale * jnp.tensordot(a, b, 1)


# Each projection's dropout stream: the layer's key folded with its index here.
LORA_STREAMS = {name: i for i, name in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}


def lora_delta(
  module: nnx.Module, name: str, x: Array, n_in: int = 1, dropout_key: Array | None = None
) -> Array | None:
  """scale * (drop(x) A) B in x's dtype (x's last `n_in` dims are W's inputs), or None.

  drop(x) is PEFT's `lora_dropout` on the adapter's input (the base path sees
  x as it is): each element zeroed with the layer's `lora_dropout` rate and
  the rest scaled by 1 / (1 - rate), only when a `dropout_key` is given (the
  trainer's loss forward); without one (sampling, evaluation, old and
  reference log-probs) drop(x) = x.
  """
  ad = lora_adapter(module, name)
  if ad is None:
    return None
  a, b, scale = ad
  rate = getattr(module, "lora_dropout", 0.0)
  if dropout_key is not None and rate > 0:
    keep = jax.random.bernoulli(
      jax.random.fold_in(dropout_key, LORA_STREAMS[name]), 1.0 - rate, x.shape
    )
    x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
  xa = jnp.tensordot(x, a.astype(x.dtype), n_in)  # [..., R]
  return (scale * jnp.tensordot(xa, b.astype(x.dtype), 1)).astype(x.dtype)


def _plus(y: Array, delta: Array | None) -> Array:
  return y if delta is None else y + delta


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


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.eps = eps
    self.scale = _param(None, (dim,), ("norm",), dtype, init="ones")

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(f32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(f32)).astype(x.dtype)


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
  on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
  impl = "cudnn" if on_gpu and q_BTNH.dtype in (jnp.bfloat16, jnp.float16) else "xla"
  return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=impl)


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
    self.q = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
    self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.o = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      self.q_bias = _param(None, (n, h), ("heads", "head_dim"), pd, init="zeros")
      self.k_bias = _param(None, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
      self.v_bias = _param(None, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
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
      _plus(y, lora_delta(self, name, x_BTD, dropout_key=dropout_key))
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
      return _plus(y, lora_delta(self, "o", out_BTNH, n_in=2, dropout_key=dropout_key))
    return dense_out_major(out_BTNH, w["o"], n_in=2)


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, pd = cfg.embed_dim, cfg.mlp_dim, cfg.jnp_param_dtype
    self.cfg = cfg
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.down = _param(rngs, (f, d), ("mlp", "embed"), pd)

  def decode_weights(self) -> dict[str, Array]:
    """Output-major weights in the compute dtype, gate and up stacked:
    gate_up [2, F, D], down [D, F]."""
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    gate, up, down = (adapted_weight(self, name) for name in ("gate", "up", "down"))  # + LoRA
    gate_up = jnp.stack([gate.T, up.T]).astype(dt)
    return {
      "gate_up": shd.constrain(gate_up, (None, "mlp", "embed"), cfg.rules),
      "down": shd.constrain(down.T.astype(dt), ("embed", "mlp"), cfg.rules),
    }

  def __call__(self, x_BTD, w=None, dropout_key=None):
    dt = self.cfg.jnp_dtype
    key = dropout_key
    if w is None:
      g = _plus(
        jnp.einsum("BTD,DF->BTF", x_BTD, self.gate[...].astype(dt)),
        lora_delta(self, "gate", x_BTD, dropout_key=key),
      )
      u = _plus(
        jnp.einsum("BTD,DF->BTF", x_BTD, self.up[...].astype(dt)),
        lora_delta(self, "up", x_BTD, dropout_key=key),
      )
    else:  # one matmul for gate and up
      gu = dense_out_major(x_BTD, w["gate_up"])  # [B, T, 2, F]
      g, u = gu[:, :, 0], gu[:, :, 1]
    h = shd.constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"), self.cfg.rules)
    if w is None:
      return _plus(
        jnp.einsum("BTF,FD->BTD", h, self.down[...].astype(dt)),
        lora_delta(self, "down", h, dropout_key=key),
      )
    return dense_out_major(h, w["down"])


class RouterStats(NamedTuple):
  """Load-balancing statistics of MoE layers, summed over layers and real
  tokens (what HF's `load_balancing_loss_func` reduces, attention mask
  included); sums, so micro-batches and shared prompts add up."""

  counts: Array  # [E] float32: top-k assignments to each expert
  probs: Array  # [E] float32: router probability of each expert
  tokens: Array  # [] float32: real tokens, once per MoE layer


def add_router_stats(a: RouterStats | None, b: RouterStats | None, scale_a=1) -> RouterStats | None:
  """scale_a * a + b, either may be None (no MoE layer)."""
  if a is None:
    return b
  if scale_a != 1:
    a = jax.tree.map(lambda x: x * scale_a, a)
  return a if b is None else jax.tree.map(jnp.add, a, b)


def router_aux_loss(stats: RouterStats, num_experts: int) -> Array:
  """The Switch-Transformer load-balancing loss as HF Qwen3-MoE computes it:
  E * sum_e f_e * P_e, f_e the fraction of top-k assignments to expert e and
  P_e its mean router probability, both over every MoE layer's real tokens.
  X (experts a token) when the load is perfectly balanced: f sums to X, P to 1."""
  n = jnp.maximum(stats.tokens, 1.0)
  return num_experts * jnp.sum((stats.counts / n) * (stats.probs / n))


class RouterAux(NamedTuple):
  """A forward's router load-balancing loss and the weight training gives it."""

  loss: Array  # router_aux_loss over the forward's real tokens
  coef: float  # ModelConfig.router_aux_loss_coef


def router_aux(cfg: ModelConfig, stats: RouterStats | None) -> RouterAux | None:
  """`RouterAux` of a forward's router statistics; None without MoE layers."""
  if stats is None:
    return None
  return RouterAux(router_aux_loss(stats, cfg.num_experts), cfg.router_aux_loss_coef)


# megablox (m, k, n) tile sizes, MaxText's defaults; each is cut to its dim.
MEGABLOX_TILING = (512, 1024, 1024)


def _megablox_gmm(x_AK, w_GKN, sizes_G, interpret=False):
  a, k = x_AK.shape
  tiling = tuple(min(t, d) for t, d in zip(MEGABLOX_TILING, (a, k, w_GKN.shape[2])))
  pad = (-a) % tiling[0]  # rows: a whole number of tiles
  x = jnp.pad(x_AK, ((0, pad), (0, 0)))
  y = megablox.gmm(x, w_GKN, sizes_G, x_AK.dtype, tiling, None, None, False, interpret)
  return y[:a]


def grouped_matmul(x_AK: Array, w_GKN: Array, sizes_G: Array, impl: str = "auto") -> Array:
  """Rows of x grouped in order (group g: the next sizes[g] rows) times w[g], [A, N].

  Rows past sum(sizes) are unspecified (the caller masks them). jax.lax.ragged_dot
  runs natively forward on TPU, but XLA:TPU expands its weight gradient (a
  ragged contraction) into a dense masked matmul over all G groups (G x the
  FLOPs); megablox' `gmm` / `tgmm` Pallas kernels (its custom VJP) are
  grouped in both directions. `impl` "auto" picks megablox where the program
  is lowered for TPU (`platform_dependent`: the AOT tool compiles for TPU on a
  CPU host) and ragged_dot elsewhere; "megablox" runs the kernels' interpreter
  off TPU.
  """
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x_AK, w_GKN, sizes_G)
  if impl == "megablox":
    other = lambda *a: _megablox_gmm(*a, interpret=True)  # noqa: E731
  else:
    other = jax.lax.ragged_dot
  return jax.lax.platform_dependent(x_AK, w_GKN, sizes_G, tpu=_megablox_gmm, default=other)


def grouped_ffn(
  x_BTD: Array,
  experts_BTX: Array,
  weights_BTX: Array,
  valid_BT: Array,
  gate_EDF: Array,
  up_EDF: Array,
  down_EFD: Array,
  first_expert=0,
  impl: str = "auto",
) -> Array:
  """sum_j weights[t, j] * FFN_{experts[t, j]}(x[t]) for each token, [B, T, D].

  Dropless: the M * X token-expert assignments are sorted by expert and run
  through three grouped matmuls (`grouped_matmul`: group e is the rows of
  expert e), then unsorted and summed with their weights (float32
  accumulation). The weights hold experts first_expert .. first_expert + E - 1
  (one shard's); assignments to other experts, and every assignment of a token
  with valid 0, form a trailing group that no matmul reads (output 0).
  """
  b, t, d = x_BTD.shape
  xk, e = experts_BTX.shape[-1], gate_EDF.shape[0]
  x_MD = x_BTD.reshape(b * t, d)
  local_MX = experts_BTX.reshape(b * t, xk) - first_expert
  keep_MX = (valid_BT.reshape(b * t, 1) > 0) & (local_MX >= 0) & (local_MX < e)
  group_A = jnp.where(keep_MX, local_MX, e).reshape(-1)
  order_A = jnp.argsort(group_A, stable=True)
  sizes_E = jnp.bincount(group_A, length=e + 1)[:e].astype(jnp.int32)
  in_groups_A = jnp.arange(order_A.shape[0]) < jnp.sum(sizes_E)
  # Rows past the groups are zeroed on the way in and the way out: grouped
  # matmuls leave them unspecified, in values and in gradients.
  xs_AD = jnp.where(in_groups_A[:, None], jnp.take(x_MD, order_A // xk, axis=0), 0)
  g_AF = grouped_matmul(xs_AD, gate_EDF, sizes_E, impl)
  u_AF = grouped_matmul(xs_AD, up_EDF, sizes_E, impl)
  ys_AD = grouped_matmul(jax.nn.silu(g_AF) * u_AF, down_EFD, sizes_E, impl)
  inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0]))
  y_MXD = jnp.take(ys_AD, inverse_A, axis=0).reshape(b * t, xk, d)
  y_MXD = jnp.where(keep_MX[..., None], y_MXD, 0)
  w_MX = jnp.where(keep_MX, weights_BTX.reshape(b * t, xk), 0).astype(y_MXD.dtype)
  y_MD = jnp.einsum("MXD,MX->MD", y_MXD, w_MX, preferred_element_type=f32)
  return y_MD.astype(x_BTD.dtype).reshape(b, t, d)


def moe_ffn(
  x_BTD, experts_BTX, weights_BTX, valid_BT, gate_EDF, up_EDF, down_EFD, rules=None, impl="auto"
) -> Array:
  """`grouped_ffn` of every token over every expert, under the ambient mesh.

  One device: `grouped_ffn` itself. Under a mesh, one `shard_map` over the
  layouts the rules give: each shard runs its rows (the batch axes) through
  the experts it holds (the `expert` axes) and its slice of F (the `mlp` axes).
  The weights' `embed` split (FSDP) is all-gathered inside, after a barrier
  that ties the gather to this layer's input: XLA can then neither hoist every
  layer's gathered experts out of the micro-batch loop (all of them alive at
  once: 58 GB a chip for Qwen3-30B-A3B) nor start them early; their gradient
  is reduce-scattered. Expert and mlp axes that also split the rows gather
  those rows first and reduce-scatter the result (expert parallelism by
  all-gather); the others are summed (psum).
  """
  mesh = jax.sharding.get_abstract_mesh()
  args = (x_BTD, experts_BTX, weights_BTX, valid_BT.astype(jnp.int32), gate_EDF, up_EDF, down_EFD)
  if mesh is None or mesh.empty or mesh.size == 1:
    return grouped_ffn(*args, impl=impl)
  P = jax.sharding.PartitionSpec
  tok = shd.logical_to_spec(("batch", "length", None), rules, mesh, x_BTD.shape)
  w_in = shd.logical_to_spec(("expert", "embed", "mlp"), rules, mesh, gate_EDF.shape)
  w_out = shd.logical_to_spec(("expert", "mlp", "embed"), rules, mesh, down_EFD.shape)
  expert_axes, embed_axes, mlp_axes = map(shd.mesh_axes, w_in)
  if (expert_axes, mlp_axes, embed_axes) != tuple(map(shd.mesh_axes, w_out)):
    raise NotImplementedError(f"moe_ffn: gate/up {w_in} and down {w_out} split differently")
  row_axes = set(shd.mesh_axes(tok[0]))
  split = expert_axes + mlp_axes
  gather = tuple(a for a in split if a in row_axes)
  reduce = tuple(a for a in split if a not in row_axes)
  if set(split) & set(shd.mesh_axes(tok[1])):
    raise NotImplementedError("moe_ffn: a sequence split over the expert or mlp axes")
  tok3, tok2 = P(tok[0], tok[1], None), P(tok[0], tok[1])

  def shard(x, idx, wt, valid, gate, up, down):
    if embed_axes:  # FSDP: this layer's experts, gathered when its input exists
      x, gate, up, down = jax.lax.optimization_barrier((x, gate, up, down))
      gate, up = (jax.lax.all_gather(w, embed_axes, axis=1, tiled=True) for w in (gate, up))
      down = jax.lax.all_gather(down, embed_axes, axis=2, tiled=True)
    if gather:
      x, idx, wt, valid = (
        jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (x, idx, wt, valid)
      )
    first = jax.lax.axis_index(expert_axes) * gate.shape[0] if expert_axes else 0
    y = grouped_ffn(x, idx, wt, valid, gate, up, down, first, impl)
    if gather:
      y = jax.lax.psum_scatter(y, gather, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, reduce) if reduce else y

  return jax.shard_map(
    shard,
    mesh=mesh,
    in_specs=(tok3, tok3, tok3, tok2, w_in, w_in, w_out),
    out_specs=tok3,
    # Unchecked (megablox' Pallas calls carry no varying-axes types): the
    # backward pass then sums the inputs' cotangents over the axes their
    # specs leave out (each expert / mlp shard's share of d(x), d(weights)).
    check_vma=False,
  )(*args)


class MoE(nnx.Module):
  """Qwen3-MoE's sparse MLP block: router, top-k, dropless grouped experts.

  The router runs in float32 (logits, softmax, top-k, renormalisation when
  `norm_topk_prob`); expert weights are gate/up [E, D, F] and down [E, F, D],
  logical axes ("expert", "embed", "mlp"). Padding tokens are routed nowhere
  (output 0: no real token reads them) and are left out of the statistics.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, e, f, pd = cfg.embed_dim, cfg.num_experts, cfg.moe_mlp_dim, cfg.jnp_param_dtype
    self.cfg = cfg
    self.router = _param(rngs, (d, e), ("embed", None), pd)
    self.gate = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd)
    self.up = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd)
    self.down = _param(rngs, (e, f, d), ("expert", "mlp", "embed"), pd)

  def decode_weights(self) -> dict[str, Array]:
    """Expert weights in the compute dtype (the router in float32): the
    sampler's decode steps run the normal path on them, uncast."""
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    up_names, down_names = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
    return {
      "router": self.router[...].astype(f32),
      "gate": shd.constrain(self.gate[...].astype(dt), up_names, cfg.rules),
      "up": shd.constrain(self.up[...].astype(dt), up_names, cfg.rules),
      "down": shd.constrain(self.down[...].astype(dt), down_names, cfg.rules),
    }

  def __call__(self, x_BTD, mask_BT=None, w=None) -> tuple[Array, RouterStats]:
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    if w is None:
      w = {
        "router": self.router[...],
        "gate": self.gate[...].astype(dt),
        "up": self.up[...].astype(dt),
        "down": self.down[...].astype(dt),
      }
    e, xk = cfg.num_experts, cfg.num_experts_per_tok
    logits_BTE = jnp.einsum("BTD,DE->BTE", x_BTD.astype(f32), w["router"].astype(f32))
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    top_p_BTX, top_i_BTX = jax.lax.top_k(probs_BTE, xk)
    if cfg.norm_topk_prob:
      top_p_BTX = top_p_BTX / jnp.sum(top_p_BTX, axis=-1, keepdims=True)
    valid_BT = jnp.ones(x_BTD.shape[:2], f32) if mask_BT is None else (mask_BT > 0).astype(f32)
    valid_A = jnp.broadcast_to(valid_BT[..., None], top_i_BTX.shape).reshape(-1)
    stats = RouterStats(
      counts=jnp.zeros((e,), f32).at[top_i_BTX.reshape(-1)].add(valid_A),
      probs=jnp.einsum("BTE,BT->E", probs_BTE, valid_BT),
      tokens=jnp.sum(valid_BT),
    )
    y = moe_ffn(
      x_BTD,
      top_i_BTX,
      top_p_BTX.astype(dt),
      valid_BT,
      w["gate"],
      w["up"],
      w["down"],
      cfg.rules,
      cfg.grouped_matmul,
    )
    return shd.constrain(y, ("batch", "length", "act_embed"), cfg.rules), stats


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool = False):
    pd = cfg.jnp_param_dtype
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pd)
    self.mlp = MoE(cfg, rngs) if moe else MLP(cfg, rngs)

  def __call__(
    self,
    x_BTD,
    positions_BT,
    inv_freq,
    allowed_BTS,
    kv=None,
    index=None,
    w=None,
    mask_BT=None,
    decode=False,
    dropout_key=None,
  ):
    """(x, kv, router stats: None for a dense MLP); mask_BT: real tokens (MoE
    routing); dropout_key: this layer's LoRA dropout key (training only)."""
    y, kv = self.attn(
      self.attn_norm(x_BTD),
      positions_BT,
      inv_freq,
      allowed_BTS,
      kv,
      index,
      None if w is None else w["attn"],
      decode,
      dropout_key,
    )
    x = x_BTD + y
    stats = None
    if isinstance(self.mlp, MoE):
      y, stats = self.mlp(self.mlp_norm(x), mask_BT, None if w is None else w["mlp"])
      x = x + y
    else:
      x = x + self.mlp(self.mlp_norm(x), None if w is None else w["mlp"], dropout_key)
    x = shd.constrain(x, ("batch", "length", "act_embed"), self.cfg.rules)
    return x, kv, stats


_REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _run_block(block: Block, x, positions, inv_freq, allowed, kv, index, w, mask, dropout_key):
  return block(x, positions, inv_freq, allowed, kv, index, w, mask, dropout_key=dropout_key)


class Transformer(nnx.Module):
  """The decoder. `__call__` serves training (no cache) and decoding (cache)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.jnp_param_dtype
    self.embed = _param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), pd)
    self.layers = nnx.List(
      [Block(cfg, rngs, moe=cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
    )
    self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pd)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), pd)

  def unembed(self) -> Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    if self.cfg.tie_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def init_cache(self, batch: int, length: int, dtype=None) -> dict[str, Any]:
    return init_cache(self.cfg, batch, length, dtype)

  def decode_weights(self) -> dict[str, Any]:
    """Every matmul weight in the compute dtype, output-major, q/k/v and gate/up fused.

    Built once per sampler call (inside its jit), then read by every decode
    step: fewer, larger matmuls, no per-step cast of float32 master weights,
    and the layout XLA:CPU's skinny matmuls want (`dense_out_major`). Costs
    one compute-dtype copy of the weights while it lives. unembed is [V, D]:
    the embedding table itself when tied.
    """
    cfg = self.cfg
    unembed = self.embed[...] if cfg.tie_embeddings else self.lm_head[...].T
    weights = {
      "layers": tuple(
        {"attn": blk.attn.decode_weights(), "mlp": blk.mlp.decode_weights()} for blk in self.layers
      ),
      "unembed": shd.constrain(unembed.astype(cfg.jnp_dtype), ("vocab", "embed"), cfg.rules),
    }
    # Materialised once: XLA must not fold the casts and transposes back into
    # each matmul that reads them (XLA:CPU then also meets a transposed bf16
    # dot it cannot run: "Unsupported element type for DotThunk").
    return jax.lax.optimization_barrier(weights)

  def __call__(
    self,
    tokens_BT: Array,
    positions_BT: Array,
    mask_BT: Array | None = None,
    cache: dict[str, Any] | None = None,
    return_hidden: bool = False,
    weights: dict[str, Any] | None = None,
    remat: bool | None = None,
    decode: bool = False,
    router_stats: bool = False,
    lora_dropout_key: Array | None = None,
  ):
    """Logits [B, T, V] float32 (or final hidden states) and the updated cache.

    `decode=True` marks the sampler's decode step (one new token a row, a
    cache, no backward pass): only there does `cfg.decode_attention` apply.
    `router_stats=True` also returns the MoE layers' `RouterStats` over the
    real tokens of `mask_BT` (None for a dense model): (out, cache, stats).
    `lora_dropout_key` switches on the adapters' dropout (`lora_delta`; the
    trainer's loss forward), layer i with the key folded with i.
    """
    cfg = self.cfg
    dt = cfg.jnp_dtype
    b, t = tokens_BT.shape
    if mask_BT is None:
      mask_BT = jnp.ones((b, t), jnp.int32)
    # attention="cudnn" without a cache: each row's real tokens (contiguous, as
    # the trainer lays rows out) move to the front, so causal attention needs
    # no padding mask; hidden states move back after the last layer.
    align = cache is None and cfg.attention == "cudnn"
    if align:
      to_front, to_back = left_align(mask_BT)
      tokens_BT = jnp.take_along_axis(tokens_BT, to_front, axis=1)
      positions_BT = jnp.take_along_axis(positions_BT, to_front, axis=1)
      mask_BT = jnp.take_along_axis(mask_BT, to_front, axis=1)
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
    x = shd.constrain(x, ("batch", "length", "act_embed"), cfg.rules)
    inv_freq = rope_frequencies(cfg)

    if align:
      allowed, index = None, None
    elif cache is None:
      idx = jnp.arange(t)
      allowed = (idx[None, :] <= idx[:, None])[None] & (mask_BT[:, None, :] > 0)
      index = None
    else:
      index = cache["index"]
      kv_mask = jax.lax.dynamic_update_slice(
        cache["mask"], mask_BT.astype(cache["mask"].dtype), (0, index)
      )
      slots = jnp.arange(kv_mask.shape[1])
      allowed = (slots[None, :] <= index + jnp.arange(t)[:, None])[None] & (kv_mask[:, None, :] > 0)

    run = _run_block
    # Remat only where there is a backward pass: by default not with a cache
    # (decoding); `remat=True` asks for it there (the shared-prefix training forward).
    if cfg.remat != "none" and (cache is None if remat is None else remat):
      run = nnx.remat(_run_block, policy=_REMAT_POLICIES[cfg.remat])
    new_k, new_v = [], []
    stats = None
    for i, block in enumerate(self.layers):
      kv = None if cache is None else (cache["k"][i], cache["v"][i])
      w = None if weights is None else weights["layers"][i]
      if decode:  # the sampler's decode step (no backward pass, never rematerialised)
        x, kv, st = block(x, positions_BT, inv_freq, allowed, kv, index, w, mask_BT, decode=True)
      else:
        key = None if lora_dropout_key is None else jax.random.fold_in(lora_dropout_key, i)
        x, kv, st = run(block, x, positions_BT, inv_freq, allowed, kv, index, w, mask_BT, key)
      stats = add_router_stats(stats, st)
      if cache is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    x = self.final_norm(x)
    if align:
      x = jnp.take_along_axis(x, to_back[..., None], axis=1)
    if cache is not None:
      cache = {"k": tuple(new_k), "v": tuple(new_v), "mask": kv_mask, "index": index + t}
    out = x if return_hidden else self.logits(x, weights)
    return (out, cache, stats) if router_stats else (out, cache)

  def forward_shared_prefix(
    self,
    prompt_tokens_GP: Array,
    prompt_mask_GP: Array,
    resp_tokens_BR: Array,
    resp_mask_BR: Array,
    router_stats: bool = False,
    lora_dropout_key: Array | None = None,
  ) -> tuple[Array, ...]:
    """Final hidden states of rows that share their prompt within groups.

    Row i of the responses continues prompt i // g (g = B // G, the trainer's
    prompt-major group layout). The sampler's own cache path does it: the
    prompts fill a KV cache (once per group), the cache is repeated to the
    group's rows, and the responses run on top of it. The result is the full
    forward of the [prompt | response] rows (left-padded prompt, right-padded
    response) for (g - 1) / g less prompt work; gradients reach each prompt
    from every row of its group (through the cache).
    Returns (prompt hidden [G, P, D], response hidden [B, R, D]), final-normed,
    and with `router_stats` the MoE `RouterStats` of the full rows (a prompt's
    counted g times, as the full forward counts it). `lora_dropout_key`: as in
    `__call__`; a prompt's dropout mask is then shared by its group's rows.
    """
    g_count, p = prompt_tokens_GP.shape
    b, r = resp_tokens_BR.shape
    if b % g_count:
      raise ValueError(
        f"forward_shared_prefix: {b} response rows do not split into {g_count} prompt groups"
      )
    group = b // g_count
    pm = prompt_mask_GP.astype(jnp.int32)
    rm = resp_mask_BR.astype(jnp.int32)
    cache = init_cache(self.cfg, g_count, p + r)
    kw = dict(return_hidden=True, remat=True, router_stats=router_stats)
    keys = (None, None) if lora_dropout_key is None else jax.random.split(lora_dropout_key)
    hp, cache, *stats_p = self(
      prompt_tokens_GP, positions_from_mask(pm), pm, cache=cache, lora_dropout_key=keys[0], **kw
    )
    cache = repeat_cache_rows(cache, group)
    n_prompt = jnp.sum(cache["mask"], axis=-1, keepdims=True)
    pos_r = jnp.maximum(n_prompt + jnp.cumsum(rm, axis=-1) - 1, 0).astype(jnp.int32)
    hr, _, *stats_r = self(resp_tokens_BR, pos_r, rm, cache=cache, lora_dropout_key=keys[1], **kw)
    if not router_stats:
      return hp, hr
    return hp, hr, add_router_stats(stats_p[0], stats_r[0], scale_a=group)

  def logits(self, hidden_BTD: Array, weights: dict[str, Any] | None = None) -> Array:
    """Float32 logits of final hidden states (the output of `return_hidden=True`)."""
    cfg = self.cfg
    x = hidden_BTD.astype(cfg.jnp_dtype)
    if weights is None:
      logits = jnp.einsum(
        "BTD,DV->BTV", x, self.unembed().astype(cfg.jnp_dtype), preferred_element_type=f32
      )
    else:
      logits = dense_out_major(x, weights["unembed"], preferred_element_type=f32)
    return shd.constrain(logits, ("batch", "length", "act_vocab"), cfg.rules)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict[str, Any]:
  """An empty KV cache: per-layer keys [B, K, H, S] and values [B, K, S, H]
  (the layouts `attend` reads), a slot mask and the fill index."""
  dtype = dtype or cfg.jnp_dtype
  b, k, h = batch, cfg.num_kv_heads, cfg.head_dim
  return {
    "k": tuple(jnp.zeros((b, k, h, length), dtype) for _ in range(cfg.num_layers)),
    "v": tuple(jnp.zeros((b, k, length, h), dtype) for _ in range(cfg.num_layers)),
    "mask": jnp.zeros((batch, length), jnp.int32),
    "index": jnp.zeros((), jnp.int32),
  }


def repeat_cache_rows(cache: dict[str, Any], n: int) -> dict[str, Any]:
  """Each row of a cache n times in a row (row i -> rows i*n .. i*n+n-1):
  one prompt's prefill shared by the n rows of its group."""
  rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
  return {
    "k": tuple(map(rep, cache["k"])),
    "v": tuple(map(rep, cache["v"])),
    "mask": rep(cache["mask"]),
    "index": cache["index"],
  }


def cache_logical_axes(cfg: ModelConfig) -> dict[str, Any]:
  """Logical axis names of the cache pytree (same structure as `init_cache`)."""
  return {
    "k": tuple(("batch", "kv_heads", "head_dim", "cache_length") for _ in range(cfg.num_layers)),
    "v": tuple(("batch", "kv_heads", "cache_length", "head_dim") for _ in range(cfg.num_layers)),
    "mask": ("batch", "cache_length"),
    "index": (),
  }


def positions_from_mask(mask_BT: Array) -> Array:
  """Positions that count real tokens only (left padding safe, as HF generate)."""
  return jnp.maximum(jnp.cumsum(mask_BT, axis=-1) - 1, 0).astype(jnp.int32)


def forward_logits(model: Transformer, tokens_BT: Array, mask_BT: Array | None = None) -> Array:
  """Float32 logits [B, T, V] of a full forward pass (scoring and tests)."""
  if mask_BT is None:
    mask_BT = jnp.ones(tokens_BT.shape, jnp.int32)
  mask_BT = jnp.asarray(mask_BT, jnp.int32)
  logits, _ = model(jnp.asarray(tokens_BT), positions_from_mask(mask_BT), mask_BT)
  return logits


def create_model(cfg: ModelConfig, *, seed: int = 0, mesh=None) -> Transformer:
  """A randomly initialised model, created directly in its sharded layout on `mesh`."""
  return shd.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh, cfg.rules)


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model's shapes and dtypes only (no allocation)."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
  state = nnx.state(model, nnx.Param)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
