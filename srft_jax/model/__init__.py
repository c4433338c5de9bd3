"""Decoder-only transformer (Qwen2 / Qwen2.5, Llama 3, Qwen3 and Qwen3-MoE) in Flax NNX.

One job a module:
  config       ModelConfig, RopeScaling, DTYPES, the family tables and PRESETS
  layers       param (a Param with logical axes), RMSNorm
  lora_hooks   what the layers call for LoRA adapters (srft_jax/lora.py attaches them)
  attention    RoPE, attend / attend_chunked / attend_causal, dense_out_major, Attention
  moe          router statistics and loss, grouped matmuls, moe_ffn, MoE
  transformer  MLP, Block, Transformer (-> ModelOutput), the KV cache, create_model,
               the loop and scanned layer layouts (ModelConfig.scan_layers)
This package re-exports their public names (`from srft_jax import model as
model_lib; model_lib.Transformer`); the trace-time switches stay in their
modules (`attention.WEIGHT_FIRST_BACKENDS`, `moe.MEGABLOX_TILING`).

Qwen3 adds a per-head RMSNorm on q and k before RoPE (`qk_norm`); Qwen3-MoE
replaces the MLP of its sparse layers by `MoE`: a float32 router picks the
top-k experts of each token, tokens are grouped by expert and run through
grouped matmuls (`grouped_matmul`: megablox kernels on TPU, jax.lax.ragged_dot
elsewhere; dropless), and the router's load-balancing statistics come back in
every `ModelOutput` (`router_aux_loss` turns them into the loss).

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

from srft_jax.model.attention import Attention
from srft_jax.model.attention import apply_rope
from srft_jax.model.attention import attend
from srft_jax.model.attention import attend_causal
from srft_jax.model.attention import attend_chunked
from srft_jax.model.attention import dense_out_major
from srft_jax.model.attention import left_align
from srft_jax.model.attention import rope_frequencies
from srft_jax.model.config import ATTENTIONS
from srft_jax.model.config import DECODE_ATTENTIONS
from srft_jax.model.config import DTYPES
from srft_jax.model.config import MODEL_TYPES
from srft_jax.model.config import PRESETS
from srft_jax.model.config import REMATS
from srft_jax.model.config import TINY_PRESETS
from srft_jax.model.config import ModelConfig
from srft_jax.model.config import RopeScaling
from srft_jax.model.layers import RMSNorm
from srft_jax.model.lora_hooks import ADAPTER_ATTRS
from srft_jax.model.lora_hooks import LORA_STREAMS
from srft_jax.model.lora_hooks import adapted_weight
from srft_jax.model.lora_hooks import lora_adapter
from srft_jax.model.lora_hooks import lora_delta
from srft_jax.model.moe import MoE
from srft_jax.model.moe import RouterAux
from srft_jax.model.moe import RouterStats
from srft_jax.model.moe import add_router_stats
from srft_jax.model.moe import grouped_ffn
from srft_jax.model.moe import grouped_matmul
from srft_jax.model.moe import moe_ffn
from srft_jax.model.moe import router_aux
from srft_jax.model.moe import router_aux_loss
from srft_jax.model.transformer import MLP
from srft_jax.model.transformer import Block
from srft_jax.model.transformer import ModelOutput
from srft_jax.model.transformer import SharedPrefixOutput
from srft_jax.model.transformer import Transformer
from srft_jax.model.transformer import abstract_model
from srft_jax.model.transformer import cache_logical_axes
from srft_jax.model.transformer import count_params
from srft_jax.model.transformer import create_model
from srft_jax.model.transformer import forward_logits
from srft_jax.model.transformer import init_cache
from srft_jax.model.transformer import layer_block
from srft_jax.model.transformer import layer_modules
from srft_jax.model.transformer import positions_from_mask
from srft_jax.model.transformer import repeat_cache_rows
from srft_jax.model.transformer import scanned_path
from srft_jax.model.transformer import stacked_blocks
from srft_jax.model.transformer import with_layer_layout

__all__ = [
  "ADAPTER_ATTRS",
  "ATTENTIONS",
  "DECODE_ATTENTIONS",
  "DTYPES",
  "REMATS",
  "LORA_STREAMS",
  "MLP",
  "MODEL_TYPES",
  "PRESETS",
  "TINY_PRESETS",
  "Attention",
  "Block",
  "ModelConfig",
  "ModelOutput",
  "MoE",
  "RMSNorm",
  "RopeScaling",
  "RouterAux",
  "RouterStats",
  "SharedPrefixOutput",
  "Transformer",
  "abstract_model",
  "adapted_weight",
  "add_router_stats",
  "apply_rope",
  "attend",
  "attend_causal",
  "attend_chunked",
  "cache_logical_axes",
  "count_params",
  "create_model",
  "dense_out_major",
  "forward_logits",
  "grouped_ffn",
  "grouped_matmul",
  "init_cache",
  "layer_block",
  "layer_modules",
  "left_align",
  "lora_adapter",
  "lora_delta",
  "moe_ffn",
  "positions_from_mask",
  "repeat_cache_rows",
  "rope_frequencies",
  "router_aux",
  "router_aux_loss",
  "scanned_path",
  "stacked_blocks",
  "with_layer_layout",
]
