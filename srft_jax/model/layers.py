"""What every layer builds on: parameters with logical axes, and RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
f32 = jnp.float32


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal") -> nnx.Param:
  """A parameter with its logical axes (`init`: "normal" (std 0.02), "zeros" or "ones")."""
  if init == "zeros":
    value = jnp.zeros(shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = (0.02 * jax.random.normal(rngs.params(), shape, f32)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.eps = eps
    self.scale = param(None, (dim,), ("norm",), dtype, init="ones")

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(f32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(f32)).astype(x.dtype)
