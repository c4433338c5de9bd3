"""Model configuration: `ModelConfig` (architecture and numerics of one
decoder), the HF families' shared fields and the named presets."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from srft_jax import sharding as shd

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# The allowed values of each enumerated setting (the run config's checks read these too).
REMATS = ("none", "full", "dots")  # activation checkpointing of a layer
ATTENTIONS = ("xla", "chunked", "cudnn")  # training / prefill attention
DECODE_ATTENTIONS = ("xla", "pallas")  # the sampler's decode-step attention
GROUPED_MATMULS = ("auto", "ragged_dot", "megablox")  # MoE experts' matmul


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
  # Layers' parameters stacked on a leading "layers" axis, one stack a run of
  # consecutive layers of one kind (`layer_runs`), each run by one lax.scan:
  # XLA compiles a run's layer once, so compile time stays flat in depth.
  scan_layers: bool = False
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
      "remat": self.remat in REMATS,
      "scan_layers": isinstance(self.scan_layers, bool),
      "attention": self.attention in ATTENTIONS,
      "decode_attention": self.decode_attention in DECODE_ATTENTIONS,
      "num_experts": self.num_experts >= 0,
      "num_experts_per_tok": not moe or 1 <= self.num_experts_per_tok <= self.num_experts,
      "moe_mlp_dim": not moe or self.moe_mlp_dim > 0,
      "decoder_sparse_step": self.decoder_sparse_step >= 1,
      "router_aux_loss_coef": self.router_aux_loss_coef >= 0,
      "grouped_matmul": self.grouped_matmul in GROUPED_MATMULS,
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
  def layer_runs(self) -> tuple[tuple[int, int], ...]:
    """(start, stop) of each maximal run of consecutive layers of one kind
    (dense or MoE), in order: the stacks of the scanned layout (`scan_layers`)."""
    runs, start = [], 0
    for i in range(1, self.num_layers + 1):
      if i == self.num_layers or self.is_moe_layer(i) != self.is_moe_layer(start):
        runs.append((start, i))
        start = i
    return tuple(runs)

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
# The presets `factory.ModelSpec.config` sizes from the run's config and tokenizer.
TINY_PRESETS = ("tiny", "tiny_qwen3", "tiny_qwen3_moe")
