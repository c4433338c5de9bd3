"""The LoRA hooks the layers call (srft_jax/lora.py attaches the adapters).

A projection `name` of a layer (Attention: q, k, v, o; MLP: gate, up, down)
may carry an adapter: A [I..., R] and B [R, O...] (nnx.LoRAParam, float32)
stored as the layer's attributes `ADAPTER_ATTRS[name]`, and the layer a
static `lora_scale` (alpha / R) and `lora_dropout`: W_eff = W + scale * A B.
The attribute names are the last element of the adapters' state paths, so
checkpoints and the PEFT export depend on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
f32 = jnp.float32

# The projections an adapter may sit on; each one's dropout stream is the
# layer's key folded with its index here.
LORA_STREAMS = {name: i for i, name in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}
# Projection -> the layer attributes that hold its adapter's A and B.
ADAPTER_ATTRS = {name: (f"{name}_lora_a", f"{name}_lora_b") for name in LORA_STREAMS}


def lora_adapter(module: nnx.Module, name: str):
  """(A, B, scale) of the adapter on projection `name` of `module`, or None."""
  a_attr, b_attr = ADAPTER_ATTRS[name]
  if not hasattr(module, a_attr):
    return None
  return getattr(module, a_attr)[...], getattr(module, b_attr)[...], module.lora_scale


def adapted_weight(module: nnx.Module, name: str) -> Array:
  """W + scale * A B (float32) where `name` has an adapter; else W as stored."""
  w = getattr(module, name)[...]
  ad = lora_adapter(module, name)
  if ad is None:
    return w
  a, b, scale = ad
  return w.astype(f32) + scale * jnp.tensordot(a, b, 1)


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


def plus_delta(y: Array, delta: Array | None) -> Array:
  """y + an adapter's `lora_delta` (y itself where the projection has none)."""
  return y if delta is None else y + delta
