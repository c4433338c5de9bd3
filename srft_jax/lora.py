"""LoRA: low-rank adapters on the decoder's projections; the base stays frozen.

`attach(model, cfg)` puts an adapter on each targeted projection W of every
layer: A [I..., R] (W's input dims, then the rank) and B [R, O...] (the rank,
then W's output dims), both float32 and of their own NNX variable type
(`nnx.LoRAParam`), with W's logical axes on their W-side dims so they shard
like the layer they adapt. The layer then computes x W + (alpha / R) (x A) B
(model.lora_delta); the sampler's fused decode weights are built from
W + (alpha / R) A B (model.adapted_weight), so decoding costs what it costs
without LoRA. B starts at zero: the adapted model equals the base exactly.
With `dropout` > 0 the trainer's loss forward drops the adapters' inputs
(PEFT's lora_dropout; model.lora_delta); sampling and every other forward
see the adapters without dropout.

The trainer splits a model with adapters into the trainable adapters and the
frozen base (`split`): the optimizer and its state see the adapters only, the
base is an argument of the jitted step, and the KL reference is the same base
with zero adapters (`zeros_like`), never a second copy of the weights.

Letters as in srft_jax.model, plus R (the adapter rank), I / O (a projection's
input / output dims).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srft_jax import model as model_lib
from srft_jax import sharding as shd

Array = jax.Array

# The projections an adapter may target, in HF PEFT's module names: their
# module in a Block and how many leading dims of the weight are its inputs.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_MODULES = {
  "q": "self_attn.q_proj",
  "k": "self_attn.k_proj",
  "v": "self_attn.v_proj",
  "o": "self_attn.o_proj",
  "gate": "mlp.gate_proj",
  "up": "mlp.up_proj",
  "down": "mlp.down_proj",
}
_BLOCK_PART = {"q": "attn", "k": "attn", "v": "attn", "o": "attn"}  # else "mlp"
_N_IN = {"o": 2}  # o [N, H, D] reads heads x head_dim; every other weight one dim

ADAPTER = nnx.LoRAParam  # the adapters' variable type: the optimizer's `wrt`
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # every other parameter (frozen)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Adapters of one run (config.lora); rank 0 switches LoRA off."""

  rank: int = 0  # R
  alpha: float = 16.0  # the update is (alpha / R) A B
  targets: tuple[str, ...] = TARGETS
  dropout: float = 0.0  # PEFT's lora_dropout on the adapters' input, training only
  init_seed: int = 0  # A's random init (B starts at zero)

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    checks = {
      "rank": self.rank >= 0,
      "alpha": math.isfinite(self.alpha) and self.alpha > 0,
      "targets": len(self.targets) > 0 and set(self.targets) <= set(TARGETS),
      "dropout": 0.0 <= self.dropout < 1.0,
    }
    for name, ok in checks.items():
      if not ok:
        raise ValueError(f"LoRAConfig.{name}: invalid value {getattr(self, name)!r}")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Where one adapter lives and its shapes / logical axes."""

  layer: int
  target: str
  a_shape: tuple[int, ...]
  a_axes: tuple
  b_shape: tuple[int, ...]
  b_axes: tuple

  @property
  def part(self) -> str:
    return _BLOCK_PART.get(self.target, "mlp")

  @property
  def hf_module(self) -> str:
    return f"model.layers.{self.layer}.{HF_MODULES[self.target]}"


def _module(model, layer: int, part: str):
  """The module of `part` that holds `layer`: its own, or its stack's
  (ModelConfig.scan_layers; adapters are then stacked like their weights)."""
  return getattr(model_lib.layer_block(model, layer)[0], part)


def adapter_specs(model, cfg: LoRAConfig) -> list[AdapterSpec]:
  """Every adapter `cfg` puts on `model` (a MoE block's experts get none); one
  a layer in either layer layout."""
  out = []
  stacked = model.cfg.scan_layers
  for i in range(model.cfg.num_layers):
    for t in cfg.targets:
      part = _BLOCK_PART.get(t, "mlp")
      module = _module(model, i, part)
      if not isinstance(module, (model_lib.Attention, model_lib.MLP)):
        continue  # model.MoE: no adapters on the experts
      w = getattr(module, t)
      shape, axes = tuple(w.get_value().shape), tuple(w.get_metadata()["logical_axes"])
      if stacked:  # one layer of a stack
        shape, axes = shape[1:], axes[1:]
      n = _N_IN.get(t, 1)
      out.append(
        AdapterSpec(
          i,
          t,
          shape[:n] + (cfg.rank,),
          axes[:n] + (None,),
          (cfg.rank,) + shape[n:],
          (None,) + axes[n:],
        )
      )
  return out


def has_adapters(model) -> bool:
  return bool(jax.tree.leaves(nnx.state(model, ADAPTER)))


def _init_values(specs: list[AdapterSpec], seed: int) -> dict:
  """A uniform in +-1/sqrt(fan_in) (PEFT's Kaiming-uniform default), B zero;
  each adapter's key depends on its layer and target only."""
  key = jax.random.key(seed)
  out = {}
  for s in specs:
    k = jax.random.fold_in(jax.random.fold_in(key, s.layer), TARGETS.index(s.target))
    bound = 1.0 / math.sqrt(math.prod(s.a_shape[:-1]))
    a = jax.random.uniform(k, s.a_shape, jnp.float32, -bound, bound)
    out[(s.layer, s.target)] = (a, jnp.zeros(s.b_shape, jnp.float32))
  return out


def attach(model, cfg: LoRAConfig, mesh=None, values: dict | None = None):
  """`model` with adapters on `cfg.targets` (in place; returned for chaining).

  `values` {(layer, target): (A, B)} (host or device arrays, e.g. an imported
  PEFT adapter) replace the fresh init. With `mesh`, adapters are created
  directly in their sharded layout.
  """
  if not cfg.enabled:
    return model
  if has_adapters(model):
    raise ValueError("lora.attach: the model already has adapters")
  specs = adapter_specs(model, cfg)
  rules = model.cfg.rules
  if values is not None:
    for s in specs:
      a, b = values[(s.layer, s.target)]
      if tuple(a.shape) != s.a_shape or tuple(b.shape) != s.b_shape:
        raise ValueError(
          f"lora.attach: layer {s.layer} {s.target}: A {a.shape} / B {b.shape}, "
          f"expected {s.a_shape} / {s.b_shape}"
        )
  # One slot a layer's adapter, or a stack's (ModelConfig.scan_layers): its
  # layers' adapters stacked on a leading "layers" axis, as their weights are.
  stacked = model.cfg.scan_layers
  slots: dict[tuple, list[AdapterSpec]] = {}  # (layer or stack, target) -> its layers' specs
  for s in specs:
    where = model_lib.scanned_path(model.cfg, ("layers", s.layer))[0][1] if stacked else s.layer
    slots.setdefault((where, s.target), []).append(s)
  lead = ("layers",) if stacked else ()

  def axes(key):
    s = slots[key][0]
    return lead + s.a_axes, lead + s.b_axes

  def gather(per_layer: dict, key, xp):
    """A slot's (A, B) from the per-layer ones (stacked in the scanned layout)."""
    pairs = [per_layer[(s.layer, s.target)] for s in slots[key]]
    if not stacked:
      return pairs[0]
    return tuple(xp.stack([p[k] for p in pairs]) for k in (0, 1))

  def sharding(key, which, shape):
    return None if mesh is None else shd.named_sharding(mesh, axes(key)[which], rules, shape)

  if values is not None:  # host arrays: each placed straight into its sharding
    host = {k: tuple(np.asarray(x, np.float32) for x in v) for k, v in values.items()}
    made = {}
    for key in slots:
      a, b = gather(host, key, np)
      if mesh is not None:
        a, b = (shd.put_global(x, sharding(key, i, x.shape)) for i, x in enumerate((a, b)))
      made[key] = (jnp.asarray(a), jnp.asarray(b))
  else:

    def init():
      fresh = _init_values(specs, cfg.init_seed)
      return {k: gather(fresh, k, jnp) for k in slots}

    if mesh is None:
      made = init()
    else:  # initialised directly in the adapters' sharded layout
      shapes = jax.eval_shape(init)
      out_sh = {k: tuple(sharding(k, i, x.shape) for i, x in enumerate(shapes[k])) for k in slots}
      made = jax.jit(init, out_shardings=out_sh)()
  for key, group in slots.items():
    a, b = made[key]
    a_axes, b_axes = axes(key)
    module = _module(model, group[0].layer, group[0].part)
    a_attr, b_attr = model_lib.ADAPTER_ATTRS[group[0].target]
    setattr(module, a_attr, ADAPTER(a, logical_axes=a_axes))
    setattr(module, b_attr, ADAPTER(b, logical_axes=b_axes))
    module.lora_scale = cfg.scale
    module.lora_dropout = cfg.dropout
  return model


def adapter_values(model) -> dict:
  """{(layer, target): (A, B)} of the model's adapters (device arrays)."""
  out = {}
  for i in range(model.cfg.num_layers):
    block, j = model_lib.layer_block(model, i)
    for t in TARGETS:
      ad = model_lib.lora_adapter(getattr(block, _BLOCK_PART.get(t, "mlp")), t)
      if ad is not None:
        out[(i, t)] = ad[:2] if j is None else (ad[0][j], ad[1][j])  # a stack's layer j
  return out


def config_of(model) -> LoRAConfig | None:
  """The LoRAConfig the model's adapters were attached with (init_seed aside)."""
  values = adapter_values(model)
  if not values:
    return None
  (i, t), (a, _) = next(iter(values.items()))
  module = _module(model, i, _BLOCK_PART.get(t, "mlp"))
  rank = int(a.shape[-1])
  targets = tuple(x for x in TARGETS if any(k[1] == x for k in values))
  return LoRAConfig(
    rank=rank, alpha=module.lora_scale * rank, targets=targets, dropout=module.lora_dropout
  )


def set_dropout(model, rate: float):
  """Sets the adapters' dropout rate (training only; a continued PEFT adapter
  takes the run's config.lora.dropout)."""
  LoRAConfig(dropout=rate)  # validated as a config field
  for block in model_lib.layer_modules(model):
    for part in ("attn", "mlp"):
      module = getattr(block, part)
      if hasattr(module, "lora_scale"):
        module.lora_dropout = float(rate)
  return model


def split(model):
  """(graphdef, adapters, base) of a model with adapters: the trainable and the
  frozen states; `nnx.merge(graphdef, adapters, base)` is the model again."""
  return nnx.split(model, ADAPTER, ...)


def zeros_like(adapters):
  """The adapters switched off: B = 0 (and A = 0), so the model is the base exactly."""
  return jax.tree.map(jnp.zeros_like, adapters)


def merged(model):
  """A model without adapters whose weights are W + (alpha / R) A B in the
  parameter dtype (the merged checkpoint); `model` is left as it is."""
  values = adapter_values(model)
  new = nnx.clone(model)
  done = set()
  for i, t in values:
    module = _module(new, i, _BLOCK_PART.get(t, "mlp"))
    if (id(module), t) in done:  # a stack, merged at its first layer
      continue
    done.add((id(module), t))
    w = getattr(module, t)
    if model.cfg.scan_layers:  # layer by layer, as the loop layout merges each
      stack = w.get_value()
      a, b = (getattr(module, x)[...] for x in model_lib.ADAPTER_ATTRS[t])
      scale = module.lora_scale
      merged_w = jnp.stack([_merge_one(stack[j], a[j], b[j], scale) for j in range(len(stack))])
    else:
      merged_w = model_lib.adapted_weight(module, t).astype(w.get_value().dtype)
    w.set_value(merged_w)
    for attr in model_lib.ADAPTER_ATTRS[t]:
      delattr(module, attr)
  for block in model_lib.layer_modules(new):
    for part in ("attn", "mlp"):
      for attr in ("lora_scale", "lora_dropout"):
        if hasattr(getattr(block, part), attr):
          delattr(getattr(block, part), attr)
  return new


def _merge_one(w: Array, a: Array, b: Array, scale: float) -> Array:
  """One layer's W + scale * A B in W's dtype (model.adapted_weight's arithmetic)."""
  return (w.astype(jnp.float32) + scale * jnp.tensordot(a, b, 1)).astype(w.dtype)


def _fingerprint_leaf(x: Array) -> Array:
  """Two 32-bit sums over the bits of x, each bit pattern weighted by a
  function of its index; integer sums wrap, so the value does not depend on
  the reduction order (or the sharding)."""
  bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.itemsize])
  bits = bits.reshape(-1).astype(jnp.uint32)
  idx = jax.lax.iota(jnp.uint32, bits.shape[0])
  h1 = jnp.sum(bits * (idx * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)
  h2 = jnp.sum((bits ^ (idx * jnp.uint32(40503))) * jnp.uint32(2246822519), dtype=jnp.uint32)
  return jnp.stack([h1, h2])


_fingerprints = jax.jit(lambda leaves: [_fingerprint_leaf(x) for x in leaves])


def base_hash(base_state) -> str:
  """A content hash of the frozen base (computed on device: only 8 bytes a
  tensor reach the host), with every tensor's path, shape and dtype."""
  flat = sorted(nnx.to_flat_state(base_state), key=lambda kv: tuple(map(str, kv[0])))
  leaves = [v.get_value() for _, v in flat]
  fps = np.asarray(jax.device_get(jnp.stack(_fingerprints(leaves)))) if leaves else []
  h = hashlib.sha256()
  for (path, _), x, fp in zip(flat, leaves, fps):
    h.update(repr((tuple(map(str, path)), tuple(x.shape), str(x.dtype))).encode())
    h.update(np.asarray(fp, np.uint32).tobytes())
  return h.hexdigest()
