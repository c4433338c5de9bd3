"""Hugging Face checkpoints <-> srft_jax models (Qwen2, Llama, Qwen3, Qwen3-MoE).

Import: `load_model(path)` reads `config.json` and the `*.safetensors` files
and places every tensor straight into its sharded layout: each device reads
only its own slice from disk (`jax.make_array_from_callback`), so no
full-size copy ever sits on one device.

Export: `save_model(model, path)` writes `config.json` and safetensors files
(sharded with `model.safetensors.index.json` when large) that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Each parameter is
gathered to the host once and streamed to disk; process 0 writes.

Either path may be remote (gs://, `srft_jax.paths`): an import reads a local
copy made once per machine (hash-checked); an export is written on local disk
and uploaded with its config.json last.

Checks: an unknown architecture, a missing tensor, an unexpected tensor and a
tensor of the wrong shape are all errors (`CheckpointError`) that name the
problem. Silently dropping an unexpected tensor would hide a model the
decoder does not implement (e.g. MLP biases), so only tensors known to be
redundant are skipped: rotary `inv_freq` buffers and `lm_head.weight` of a
tied model.

LoRA adapters in the PEFT layout: `srft_jax.peft`; the command line
(`python -m srft_jax.hf_cli info PATH`): `srft_jax.hf_cli`.

HF linear weights are [out, in]; ours are einsum layouts (srft_jax.model glossary):
q [D,N,H], k/v [D,K,H], o [N,H,D], gate/up [D,F], down [F,D],
embed [V,D], lm_head [D,V]; Qwen3's q_norm / k_norm [H]; a Qwen3-MoE layer's
router [D,E] (HF `mlp.gate.weight` [E,D]) and experts gate/up [E,D,F],
down [E,F,D], each stacked from the E tensors `mlp.experts.{e}.*_proj.weight`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open

import srft_jax
from srft_jax import lora as lora_lib
from srft_jax import model as model_lib
from srft_jax import paths
from srft_jax import sharding as shd

SUPPORTED = {
  "qwen2": "Qwen2ForCausalLM",
  "llama": "LlamaForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "qwen3_moe": "Qwen3MoeForCausalLM",
}
QWEN3 = ("qwen3", "qwen3_moe")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype tag <-> numpy dtype (bf16/fp8 through ml_dtypes).
_ST_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_ST_TAGS = {v: k for k, v in _ST_DTYPES.items()}
# Dtypes safetensors' numpy backend cannot build; read through a memory map instead.
_NUMPY_UNREADABLE = {"BF16", "F8_E4M3", "F8_E5M2"}


class CheckpointError(ValueError):
  """A checkpoint that does not match the model it claims to be."""


# ----------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, model_lib.RopeScaling | None]:
  """(theta, llama3 scaling) from 5.x `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  # A 4.x `rope_scaling` block wins over `rope_parameters` (as in transformers):
  # Qwen2.5's docs have users add {"type": "yarn", ...} to a 5.x config.json,
  # whose rope_parameters already say "default".
  legacy = dict(hf.get("rope_scaling") or {})
  rope_type = (
    legacy.get("rope_type")
    or legacy.get("type")
    or params.get("rope_type")
    or params.get("type")
    or "default"
  )
  params.update(legacy)
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  if rope_type == "default":
    return float(theta), None
  if rope_type != "llama3":
    raise CheckpointError(
      f"config.json: rope_type {rope_type!r} is not supported (supported: 'default', 'llama3')"
    )
  if "factor" not in params:
    raise CheckpointError("config.json: rope_type 'llama3' needs a 'factor'")
  scaling = model_lib.RopeScaling(
    factor=float(params["factor"]),
    low_freq_factor=float(params.get("low_freq_factor", 1.0)),
    high_freq_factor=float(params.get("high_freq_factor", 4.0)),
    original_max_position=int(params.get("original_max_position_embeddings", 8192)),
  )
  return float(theta), scaling


def checkpoint_dtype(hf: dict[str, Any]) -> str | None:
  """The dtype config.json declares (5.x `dtype`, 4.x `torch_dtype`), if any."""
  dtype = hf.get("dtype") or hf.get("torch_dtype")
  return str(dtype).removeprefix("torch.") if dtype else None


def config_from_hf(hf: dict[str, Any], **overrides) -> model_lib.ModelConfig:
  """A ModelConfig from a transformers 4.x or 5.x `config.json` dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise CheckpointError(
      f"config.json: unknown model_type {model_type!r}; supported: {sorted(SUPPORTED)}"
    )
  archs = hf.get("architectures") or [SUPPORTED[model_type]]
  unknown = [a for a in archs if a != SUPPORTED[model_type]]
  if unknown:
    raise CheckpointError(
      f"config.json: unknown architectures {unknown} for model_type "
      f"{model_type!r}; supported: {SUPPORTED[model_type]!r}"
    )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
  if hf.get("mlp_bias"):
    raise CheckpointError("config.json: mlp_bias=True is not supported")
  if model_type == "llama" and hf.get("attention_bias"):
    # Llama's attention_bias also puts a bias on o_proj, which the decoder lacks.
    raise CheckpointError(
      "config.json: Llama attention_bias=True (q/k/v/o biases) is not supported"
    )
  if model_type in QWEN3 and hf.get("attention_bias"):
    raise CheckpointError(
      "config.json: Qwen3 attention_bias=True (q/k/v/o biases) is not supported"
    )
  if model_type in ("qwen2",) + QWEN3 and hf.get("use_sliding_window"):
    raise CheckpointError("config.json: use_sliding_window=True is not supported")
  theta, scaling = _rope_from_hf(hf)
  d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  fields = dict(
    model_type=model_type,
    vocab_size=int(hf["vocab_size"]),
    embed_dim=d,
    mlp_dim=int(hf["intermediate_size"]),
    num_layers=int(hf["num_hidden_layers"]),
    num_heads=n,
    num_kv_heads=int(hf.get("num_key_value_heads") or n),
    head_dim=int(hf.get("head_dim") or d // n),
    rope_theta=theta,
    rope_scaling=scaling,
    max_seq_len=int(hf.get("max_position_embeddings", 2048)),
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v biases, Llama and Qwen3 none
    qk_norm=model_type in QWEN3,
    # Qwen2Config, LlamaConfig and the Qwen3 configs all default to untied.
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )
  if model_type == "qwen3_moe":  # defaults: transformers' Qwen3MoeConfig
    fields.update(
      num_experts=int(hf.get("num_experts", hf.get("num_local_experts", 128))),
      num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
      moe_mlp_dim=int(hf.get("moe_intermediate_size", 768)),
      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
      decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
      mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
      router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
    )
  dtype = checkpoint_dtype(hf)
  if dtype in model_lib.DTYPES:
    fields["param_dtype"] = fields["dtype"] = dtype
  fields.update(overrides)
  return model_lib.ModelConfig(**fields)


def config_to_hf(cfg: model_lib.ModelConfig, dtype: str | None = None) -> dict[str, Any]:
  """A `config.json` dict that transformers 4.x and 5.x both read."""
  dtype = dtype or cfg.param_dtype
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope = {
      "rope_type": "llama3",
      "rope_theta": cfg.rope_theta,
      "factor": s.factor,
      "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_position,
    }
  hf = {
    "architectures": [SUPPORTED[cfg.model_type]],
    "model_type": cfg.model_type,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.embed_dim,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_seq_len,
    "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "rope_theta": cfg.rope_theta,  # 4.x
    "rope_parameters": rope,  # 5.x
    "dtype": dtype,  # 5.x
    "torch_dtype": dtype,  # 4.x
    "use_cache": True,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
  }
  if cfg.rope_scaling is not None:
    hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}  # 4.x
  if cfg.qk_norm != (cfg.model_type in QWEN3):
    raise ValueError(f"config_to_hf: {cfg.model_type} checkpoints have q/k norms iff Qwen3")
  if cfg.num_experts and cfg.model_type != "qwen3_moe":
    raise ValueError(f"config_to_hf: a {cfg.model_type} checkpoint has no experts")
  if cfg.model_type == "qwen2":
    if not cfg.qkv_bias:
      raise ValueError("config_to_hf: Qwen2 checkpoints always have q/k/v biases")
  elif cfg.qkv_bias:
    raise ValueError(
      f"config_to_hf: HF {cfg.model_type} has no q/k/v-only bias "
      "(attention_bias also adds an o_proj bias)"
    )
  if cfg.model_type == "llama":
    hf["attention_bias"] = False
    hf["mlp_bias"] = False
    return hf
  hf["use_sliding_window"] = False
  hf["sliding_window"] = None
  hf["max_window_layers"] = cfg.num_layers
  if cfg.model_type in QWEN3:
    hf["attention_bias"] = False
  if cfg.model_type == "qwen3_moe":
    hf.update(
      num_experts=cfg.num_experts,
      num_experts_per_tok=cfg.num_experts_per_tok,
      moe_intermediate_size=cfg.moe_mlp_dim,
      norm_topk_prob=cfg.norm_topk_prob,
      decoder_sparse_step=cfg.decoder_sparse_step,
      mlp_only_layers=list(cfg.mlp_only_layers),
      router_aux_loss_coef=cfg.router_aux_loss_coef,
      output_router_logits=False,
    )
  return hf


# ----------------------------------------------------------------------------
# Parameter names and layouts
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one of our parameters sits in its HF tensor.

  The HF tensor (shape `hf_shape`) is reshaped to `split` (each HF dim is a
  run of consecutive split dims, `groups`), then transposed by `perm` to ours.
  With `experts` > 0 ours has a leading expert axis: slice e is the HF tensor
  `name.format(e=e)`, laid out as above. With `layers` (the scanned layout,
  ModelConfig.scan_layers) ours is a stack: slice j is the parameter of layer
  layout `layers[j]`, and the fields above are those of `layers[0]`.
  """

  name: str
  hf_shape: tuple[int, ...]
  split: tuple[int, ...]
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  experts: int = 0
  layers: tuple[_Layout, ...] = ()

  @property
  def shape(self) -> tuple[int, ...]:
    if self.layers:
      return (len(self.layers),) + self.layers[0].shape
    inner = tuple(self.split[p] for p in self.perm)
    return (self.experts,) + inner if self.experts else inner

  def tensors(self) -> list[_Layout]:
    """One layout per HF tensor: itself, or each expert's (each layer's) slice."""
    if self.layers:
      return [one for lay in self.layers for one in lay.tensors()]
    if not self.experts:
      return [self]
    return [
      dataclasses.replace(self, name=self.name.format(e=e), experts=0) for e in range(self.experts)
    ]

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    inverse = tuple(int(i) for i in np.argsort(self.perm))
    return np.transpose(x, inverse).reshape(self.hf_shape)


def _layout(name, split, groups, perm) -> _Layout:
  hf_shape = tuple(math.prod(split[i] for i in g) for g in groups)
  return _Layout(name, hf_shape, tuple(split), tuple(tuple(g) for g in groups), tuple(perm))


def _same(name, shape) -> _Layout:
  return _layout(name, shape, [[i] for i in range(len(shape))], range(len(shape)))


def _transposed(name, hf_shape, experts: int = 0) -> _Layout:
  """A 2-D HF linear weight [out, in] as ours [in, out] (per expert with `experts`)."""
  return dataclasses.replace(_layout(name, hf_shape, [[0], [1]], (1, 0)), experts=experts)


def param_layouts(cfg: model_lib.ModelConfig) -> dict[tuple, _Layout]:
  """Our state path -> HF tensor name and layout, for every parameter of `cfg`."""
  d, f, n, k, h, v = (
    cfg.embed_dim,
    cfg.mlp_dim,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.vocab_size,
  )
  out = {
    ("embed",): _same("model.embed_tokens.weight", (v, d)),
    ("final_norm", "scale"): _same("model.norm.weight", (d,)),
  }
  if not cfg.tie_embeddings:  # HF [V, D] -> ours [D, V]
    out[("lm_head",)] = _layout("lm_head.weight", (v, d), [[0], [1]], (1, 0))
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    a = ("layers", i, "attn")
    out[a + ("q",)] = _layout(p + "self_attn.q_proj.weight", (n, h, d), [[0, 1], [2]], (2, 0, 1))
    out[a + ("k",)] = _layout(p + "self_attn.k_proj.weight", (k, h, d), [[0, 1], [2]], (2, 0, 1))
    out[a + ("v",)] = _layout(p + "self_attn.v_proj.weight", (k, h, d), [[0, 1], [2]], (2, 0, 1))
    out[a + ("o",)] = _layout(p + "self_attn.o_proj.weight", (d, n, h), [[0], [1, 2]], (1, 2, 0))
    if cfg.qkv_bias:
      out[a + ("q_bias",)] = _layout(p + "self_attn.q_proj.bias", (n, h), [[0, 1]], (0, 1))
      out[a + ("k_bias",)] = _layout(p + "self_attn.k_proj.bias", (k, h), [[0, 1]], (0, 1))
      out[a + ("v_bias",)] = _layout(p + "self_attn.v_proj.bias", (k, h), [[0, 1]], (0, 1))
    if cfg.qk_norm:
      out[a + ("q_norm", "scale")] = _same(p + "self_attn.q_norm.weight", (h,))
      out[a + ("k_norm", "scale")] = _same(p + "self_attn.k_norm.weight", (h,))
    m = ("layers", i, "mlp")
    if cfg.is_moe_layer(i):
      e, fe = cfg.num_experts, cfg.moe_mlp_dim
      x = p + "mlp.experts.{e}."
      out[m + ("router",)] = _transposed(p + "mlp.gate.weight", (e, d))
      out[m + ("gate",)] = _transposed(x + "gate_proj.weight", (fe, d), experts=e)
      out[m + ("up",)] = _transposed(x + "up_proj.weight", (fe, d), experts=e)
      out[m + ("down",)] = _transposed(x + "down_proj.weight", (d, fe), experts=e)
    else:
      out[m + ("gate",)] = _transposed(p + "mlp.gate_proj.weight", (f, d))
      out[m + ("up",)] = _transposed(p + "mlp.up_proj.weight", (f, d))
      out[m + ("down",)] = _transposed(p + "mlp.down_proj.weight", (d, f))
    out[("layers", i, "attn_norm", "scale")] = _same(p + "input_layernorm.weight", (d,))
    out[("layers", i, "mlp_norm", "scale")] = _same(p + "post_attention_layernorm.weight", (d,))
  return out


def model_layouts(cfg: model_lib.ModelConfig) -> dict[tuple, _Layout]:
  """`param_layouts` keyed by the model's own state paths: in the scanned
  layout (ModelConfig.scan_layers) one stacked layout a stack's parameter."""
  layouts = param_layouts(cfg)
  if not cfg.scan_layers:
    return layouts
  stacks: dict[tuple, list[_Layout]] = {}
  for path, lay in layouts.items():  # layers in order
    stacks.setdefault(model_lib.scanned_path(cfg, path)[0], []).append(lay)
  return {
    p: dataclasses.replace(lays[0], layers=tuple(lays)) if p[0] == "layer_stacks" else lays[0]
    for p, lays in stacks.items()
  }


def layer_values(model: model_lib.Transformer) -> dict[tuple, Any]:
  """The base parameters keyed by `param_layouts`' per-layer paths: arrays, or
  (scanned layout) callables that cut a layer out of its stack when called."""
  flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, lora_lib.BASE))}
  if not model.cfg.scan_layers:
    return flat
  out = {}
  for path in param_layouts(model.cfg):
    stacked, j = model_lib.scanned_path(model.cfg, path)
    if stacked in flat:
      out[path] = flat[stacked] if j is None else lambda x=flat[stacked], j=j: x[j]
  return out | {p: x for p, x in flat.items() if p[0] != "layer_stacks"}


def ignorable(name: str, cfg: model_lib.ModelConfig) -> bool:
  """Tensors that carry no information for our model (see module docstring)."""
  return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


# ----------------------------------------------------------------------------
# Reading safetensors
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: str  # safetensors tag, e.g. "BF16"
  shape: tuple[int, ...]
  data_start: int  # absolute byte offset in the file


def read_header(file: str) -> dict[str, TensorInfo]:
  """Tensor name -> dtype, shape and offset, from a safetensors header only."""
  with open(file, "rb") as fh:
    (size,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(size))
  header.pop("__metadata__", None)
  return {
    name: TensorInfo(file, e["dtype"], tuple(e["shape"]), 8 + size + e["data_offsets"][0])
    for name, e in header.items()
  }


def checkpoint_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory (index file first)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as fh:
      weight_map = json.load(fh)["weight_map"]
    return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
  return files


def read_tensor_infos(path: str) -> dict[str, TensorInfo]:
  infos: dict[str, TensorInfo] = {}
  for file in checkpoint_files(path):
    if not os.path.exists(file):
      raise CheckpointError(
        f"{path}: {os.path.basename(file)} is listed in {INDEX_FILE} but missing"
      )
    for name, info in read_header(file).items():
      if name in infos:
        raise CheckpointError(f"{path}: tensor {name!r} appears in two files")
      infos[name] = info
  return infos


def read_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, "config.json")
  if not paths.exists(file):
    raise CheckpointError(f"{path}: no config.json")
  return paths.read_json(file)


class SafetensorsReader:
  """Reads slices of HF tensors: safetensors `get_slice` where numpy supports
  the dtype, a read-only memory map (bf16 / fp8 via ml_dtypes) otherwise.
  Either way only the requested rows are read from disk."""

  def __init__(self, infos: dict[str, TensorInfo]):
    self.infos = infos
    self._handles: dict[str, Any] = {}

  def __call__(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    info = self.infos[name]
    if info.dtype not in _ST_DTYPES:
      raise CheckpointError(f"tensor {name!r}: unsupported dtype {info.dtype}")
    if info.dtype in _NUMPY_UNREADABLE:
      full = np.memmap(
        info.file, dtype=_ST_DTYPES[info.dtype], mode="r", offset=info.data_start, shape=info.shape
      )
      return np.array(full[index])
    if info.file not in self._handles:
      self._handles[info.file] = safe_open(info.file, framework="numpy")
    return np.asarray(self._handles[info.file].get_slice(name)[index])

  def close(self):
    self._handles.clear()


def _normalize(index, shape) -> tuple[slice, ...]:
  index = tuple(index) if index is not None else ()
  index = index + (slice(None),) * (len(shape) - len(index))
  out = []
  for s, dim in zip(index, shape):
    start, stop, step = s.indices(dim)
    if step != 1:
      raise ValueError(f"strided shard index {s} is not supported")
    out.append(slice(start, stop))
  return tuple(out)


def _read_block(reader: SafetensorsReader, lay: _Layout, index_ours, dtype) -> np.ndarray:
  """The block `index_ours` of our parameter, read from its HF tensor.

  An HF dim that merges several of our dims (q_proj rows = N x H) is read as
  the covering range of its outermost dim; inner dims are then cut in memory.
  An expert-stacked parameter reads each expert's tensor in the block.
  """
  ours = _normalize(index_ours, lay.shape)
  if lay.layers:  # a stack: each layer's block from its own tensors
    return np.stack([_read_block(reader, one, ours[1:], dtype) for one in lay.layers[ours[0]]])
  if lay.experts:
    slices = lay.tensors()[ours[0]]
    return np.stack([_read_block(reader, one, ours[1:], dtype) for one in slices])
  split_idx = [None] * len(lay.split)
  for i, p in enumerate(lay.perm):
    split_idx[p] = ours[i]
  hf_idx, block_split, inner_cut = [], [], []
  for group in lay.groups:
    outer, inner = group[0], group[1:]
    span = math.prod(lay.split[j] for j in inner)
    s = split_idx[outer]
    hf_idx.append(slice(s.start * span, s.stop * span))
    block_split.append(s.stop - s.start)
    inner_cut.append(slice(None))
    for j in inner:
      block_split.append(lay.split[j])
      inner_cut.append(split_idx[j])
  block = reader(lay.name, tuple(hf_idx)).reshape(block_split)[tuple(inner_cut)]
  return np.ascontiguousarray(np.transpose(block, lay.perm).astype(dtype))


def _check_tensors(
  infos: dict[str, TensorInfo],
  layouts: dict[tuple, _Layout],
  cfg: model_lib.ModelConfig,
  path: str,
):
  expected = {one.name: one for lay in layouts.values() for one in lay.tensors()}
  problems = []
  for name, lay in expected.items():
    if name not in infos:
      problems.append(f"missing tensor {name!r} (expected shape {list(lay.hf_shape)})")
    elif infos[name].shape != lay.hf_shape:
      problems.append(
        f"tensor {name!r} has shape {list(infos[name].shape)}, expected {list(lay.hf_shape)}"
      )
  for name in sorted(set(infos) - set(expected)):
    if not ignorable(name, cfg):
      problems.append(
        f"unexpected tensor {name!r} (shape {list(infos[name].shape)}) "
        f"not used by a {cfg.model_type} model"
      )
  if problems:
    raise CheckpointError(
      f"{path}: checkpoint does not match its config.json:\n  " + "\n  ".join(problems)
    )


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def load_model(
  path: str,
  *,
  dtype=jnp.float32,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence | None = None,
  param_dtype=None,
  **config_overrides,
) -> model_lib.Transformer:
  """Loads an HF Qwen2 / Llama / Qwen3 / Qwen3-MoE checkpoint directory as a `Transformer`.

  `dtype` is the compute dtype; `param_dtype` (default: `dtype`) the dtype
  parameters are stored in. With `mesh`, every parameter is created directly
  in the sharding its logical axes give under `rules` (default: the config's
  rules); without, on the first local device. `config_overrides` replace
  ModelConfig fields (e.g. `remat="full"`, `attention="chunked"`).
  """
  hf = read_config(path)
  overrides = dict(config_overrides)
  overrides["dtype"] = _dtype_name(dtype)
  overrides["param_dtype"] = _dtype_name(param_dtype if param_dtype is not None else dtype)
  if rules is not None:
    overrides["rules"] = tuple(rules)
  cfg = config_from_hf(hf, **overrides)

  layouts = model_layouts(cfg)  # stacked in the scanned layout: a device reads its shard
  infos = read_tensor_infos(paths.local_copy(path))  # safetensors are memory mapped
  _check_tensors(infos, layouts, cfg, path)

  graphdef, abs_state = nnx.split(model_lib.abstract_model(cfg))
  if mesh is not None:
    shardings = shd.state_shardings(abs_state, mesh, cfg.rules)
    sharding_of = dict(nnx.to_flat_state(shardings))
  else:
    sharding_of = None
  single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  reader = SafetensorsReader(infos)
  flat = []
  try:
    for path_key, var in nnx.to_flat_state(abs_state):
      if path_key not in layouts:
        raise CheckpointError(f"model variable {'/'.join(map(str, path_key))} has no HF name")
      lay = layouts[path_key]
      abstract = var.get_value()
      if tuple(abstract.shape) != lay.shape:  # layout table and model disagree
        raise AssertionError(f"{lay.name}: layout {lay.shape} vs model {abstract.shape}")
      sharding = sharding_of[path_key].get_value() if sharding_of else single
      memo: dict[tuple, np.ndarray] = {}  # replicated shards read once

      def callback(index, lay=lay, dt=abstract.dtype, memo=memo):
        key = tuple((s.start, s.stop) for s in _normalize(index, lay.shape))
        if key not in memo:
          memo[key] = _read_block(reader, lay, index, dt)
        return memo[key]

      array = jax.make_array_from_callback(abstract.shape, sharding, callback)
      flat.append((path_key, var.replace(array)))
  finally:
    reader.close()
  state = nnx.from_flat_state(flat)
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------
# Writing safetensors
# ----------------------------------------------------------------------------


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _value(x):
  """An array, or the array a callable gives (a slice taken when it is written)."""
  return x() if callable(x) else x


def write_safetensors(
  file: str, entries: list[tuple[str, _Layout, Any]], np_dtype, write: bool
) -> None:
  """Streams tensors to `file`: header first (shapes known), then one tensor at a time."""
  itemsize = np_dtype.itemsize
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, lay, _ in entries:
    nbytes = math.prod(lay.hf_shape) * itemsize
    header[name] = {
      "dtype": _ST_TAGS[np_dtype],
      "shape": list(lay.hf_shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
  fh = open(file, "wb") if write else None
  try:
    if fh:
      fh.write(struct.pack("<Q", len(blob)))
      fh.write(blob)
    for _name, lay, value in entries:
      host = to_host(
        _value(value)
      )  # an expert's (a layer's) slice is taken when written  # a collective when sharded across hosts: all processes
      if fh:
        x = np.ascontiguousarray(lay.to_hf(host).astype(np_dtype))
        if sys.byteorder != "little":  # safetensors is little endian
          x = x.byteswap()
        fh.write(x.reshape(-1).view(np.uint8).data)
  finally:
    if fh:
      fh.close()


# Files of an HF checkpoint directory that describe its tokenizer and decoding.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.model",
  "chat_template.jinja",
  "generation_config.json",
)


def save_model(
  model: model_lib.Transformer,
  path: str,
  *,
  dtype=None,
  max_shard_bytes: int = 5_000_000_000,
  tokenizer=None,
  copy_from: str | None = None,
) -> list[str]:
  """Writes `model` as an HF checkpoint directory; returns the safetensors files.

  `tokenizer` (a `srft_jax.tokenizer.Tokenizer`) puts its BOS / EOS / pad ids
  in config.json and generation_config.json (its stop ids as EOS), so HF
  `generate` stops where the sampler does; `copy_from` (the source checkpoint
  directory) copies its tokenizer files and generation_config.json beside.

  `dtype` (default: the parameter dtype) is the dtype written. Checkpoints
  larger than `max_shard_bytes` are split into `model-0000i-of-0000n` files
  with `model.safetensors.index.json`; stale `*.safetensors` files and index
  in `path` are removed first (loading would otherwise mix them in). Every
  process must call this (arrays sharded across hosts are gathered
  collectively); only process 0 writes.
  """
  cfg = model.cfg
  np_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else cfg.jnp_param_dtype))
  if np_dtype not in _ST_TAGS:
    raise ValueError(f"save_model: cannot write dtype {np_dtype}")
  layouts = param_layouts(cfg)  # per layer in either layout: the same files from both
  # A model with LoRA adapters writes its base here (`lora.merged` first for the
  # merged checkpoint; `save_peft_adapter` writes the adapters).
  values = layer_values(model)
  if set(values) != set(layouts):
    raise ValueError(
      f"save_model: model parameters {sorted(set(values) ^ set(layouts))} have no HF name"
    )
  writer = jax.process_index() == 0

  # HF order: embeddings, layers in order, final norm, lm_head.
  order = sorted(
    layouts,
    key=lambda p: (
      0 if p == ("embed",) else 2 if p[0] == "final_norm" else 3 if p[0] == "lm_head" else 1,
      p[1] if p[0] == "layers" else 0,
    ),
  )
  entries = []
  for p in order:
    lay, value = layouts[p], values[p]  # an array, or a callable that cuts it from its stack
    if not lay.experts:
      entries.append((lay.name, lay, value))
      continue
    for e, one in enumerate(lay.tensors()):  # E tensors, each sliced when written
      entries.append((one.name, one, lambda value=value, e=e: _value(value)[e]))
  shards: list[list] = [[]]
  size = 0
  total = 0
  for entry in entries:
    nbytes = math.prod(entry[1].hf_shape) * np_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
    total += nbytes

  if len(shards) == 1:
    names = [SINGLE_FILE]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  final = path
  # Remote: written on local disk, then uploaded whole with config.json last.
  with (
    paths.staged_dir(final, enabled=writer)
    if paths.is_remote(final)
    else contextlib.nullcontext(final)
  ) as path:
    if writer:
      os.makedirs(path, exist_ok=True)
      stale_files = glob.glob(os.path.join(path, "*.safetensors"))
      for stale in stale_files + [os.path.join(path, INDEX_FILE)]:
        if os.path.exists(stale):
          os.remove(stale)
      hf_cfg, gen = config_to_hf(cfg, np_dtype.name), {"do_sample": False}
      hf_cfg["srft_jax_version"] = srft_jax.__version__  # the package that wrote this export
      if tokenizer is not None:
        ids = {
          "bos_token_id": tokenizer.bos_id,
          "eos_token_id": tokenizer.eos_id,
          "pad_token_id": tokenizer.pad_id,
        }
        hf_cfg.update(ids)
        stops = list(dict.fromkeys(tokenizer.stop_ids or (tokenizer.eos_id,)))
        gen.update(ids, eos_token_id=stops if len(stops) > 1 else stops[0])
      with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf_cfg, fh, indent=2)
      with open(os.path.join(path, "generation_config.json"), "w") as fh:
        json.dump(gen, fh, indent=2)
      if copy_from and os.path.abspath(copy_from) != os.path.abspath(final):
        source = paths.local_copy(copy_from)
        for name in TOKENIZER_FILES:  # the source's own generation config wins
          if os.path.exists(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(path, name))

    for name, shard in zip(names, shards):  # every process gathers, process 0 writes
      write_safetensors(os.path.join(path, name), shard, np_dtype, writer)
    if writer and len(shards) > 1:
      weight_map = {entry[0]: name for name, shard in zip(names, shards) for entry in shard}
      with open(os.path.join(path, INDEX_FILE), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
  if jax.process_count() > 1:  # nobody goes on (and reads) before process 0 has written
    multihost_utils.sync_global_devices("srft_save_model")
  return [os.path.join(final, n) for n in names]
