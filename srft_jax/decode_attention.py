"""One decode step's attention over the KV cache as a single Pallas kernel.

XLA runs a decode step's attention as five or more kernels a layer (the score
matmul, the mask and softmax, the cast, the probability-value matmul), writes
float32 scores to memory and reads them back, and reads every slot of the
static cache, filled or not. This kernel reads each row's keys and values once,
only up to the last filled slot, with an online softmax in registers: one
program per (row, kv head) holds that head's G query heads, or, when few rows
leave the GPU short of programs, per slot range of one (flash decoding, the
ranges' partial softmaxes merged after).

Layouts are the cache's own (`model.init_cache`): queries [B, K, G, H], keys
[B, K, H, S], values [B, K, S, H], the per-slot mask [B, S]. Compiled through
Triton on GPUs; on CPU it runs in Pallas' interpreter (slow, for tests); other
backends are refused. Selected by `ModelConfig.decode_attention="pallas"`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from srft_jax import sharding as shd

Array = jax.Array
f32 = jnp.float32

_NEG = -1e30  # finite: fully masked blocks keep m finite and contribute p = 0


def block_size(cache_len: int) -> int | None:
  """The kernel's slot block for a cache length: the largest of 64, 32, 16
  dividing it (Triton wants power-of-two tiles), or None. 64 beat 128 on an
  H200 (`benchmarks/decode_attention.py`, 128 rows x 1,152 slots)."""
  for bs in (64, 32, 16):
    if cache_len % bs == 0:
      return bs
  return None


def supported(head_dim: int, cache_len: int) -> bool:
  """Whether the kernel takes these shapes: a power-of-two head_dim >= 16 (Triton's
  tiles and dots) and a cache length divisible by 16. The model attends with XLA
  otherwise."""
  return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and block_size(cache_len) is not None


# Launch settings, read at trace time (benchmarks sweep them; None = the default):
# splits (programs a row's slots are divided over: flash decoding), slots per
# loop step (must divide the cache length), Triton warps and pipeline stages.
TUNING: dict[str, int | None] = {
  "splits": None,
  "block_s": None,
  "num_warps": None,
  "num_stages": None,
}


def launch_settings(b: int, kh: int, s: int) -> tuple[int, int, int, int]:
  """(block_s, splits, num_warps, num_stages). Defaults from a sweep on an H200
  at 64 x 320 and 128 x 1,152 (rows x slots): one program a (row, kv head), 4
  warps, 2 stages were fastest or within noise of it at both. Splits only
  when rows x kv heads leave the GPU's ~132 multiprocessors short of programs
  (few rows over a long cache); never more splits than blocks."""
  t = TUNING
  bs = t["block_s"] or block_size(s)
  if s % bs:
    raise ValueError(f"decode_attention.TUNING: block_s {bs} does not divide cache length {s}")
  n_blocks = s // bs
  splits = t["splits"] or max(1, min(8, 128 // max(b * kh, 1)))
  return bs, min(splits, n_blocks), t["num_warps"] or 4, t["num_stages"] or 2


def _kernel(
  bound_ref,
  q_ref,
  k_ref,
  v_ref,
  ok_ref,
  *out_refs,
  block_s: int,
  blocks_per_split: int,
  n_blocks: int,
  scale: float,
  precision,
):
  """Grid (B, K, J). q [Gp, H], k [H, S], v [S, H], ok [S]. Program j runs
  blocks [j * blocks_per_split, ...) up to the last one holding a slot below
  the bound. One split: o [Gp, H], normalised. Several: the unnormalised
  accumulator [Gp, H] and the running max and sum [Gp] (combined by `_combine`)."""
  q = q_ref[...]
  gp, h = q.shape
  j = pl.program_id(2)
  lo = j * blocks_per_split
  # slots at or past the bound are never read
  hi = jnp.minimum(jnp.minimum(lo + blocks_per_split, n_blocks), pl.cdiv(bound_ref[0], block_s))

  def body(i, carry):
    acc, m, l = carry
    s0 = pl.multiple_of(i * block_s, block_s)
    k = k_ref[:, pl.ds(s0, block_s)]  # [H, bs]
    s = jnp.dot(q, k, preferred_element_type=f32, precision=precision) * scale
    ok = (ok_ref[pl.ds(s0, block_s)] != 0)[None, :]  # [1, bs]
    s = jnp.where(ok, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    v = v_ref[pl.ds(s0, block_s), :]  # [bs, H]
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=f32, precision=precision)
    return acc * corr[:, None] + pv, m_new, l * corr + jnp.sum(p, axis=1)

  init = (jnp.zeros((gp, h), f32), jnp.full((gp,), _NEG, f32), jnp.zeros((gp,), f32))
  acc, m, l = jax.lax.fori_loop(lo, jnp.maximum(hi, lo), body, init)
  if len(out_refs) == 1:
    out_refs[0][...] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(out_refs[0].dtype)
  else:
    acc_ref, m_ref, l_ref = out_refs
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _combine(acc_BKJGH, m_BKJG, l_BKJG, dtype):
  """Merges the splits' partial softmaxes (each relative to its own max)."""
  top = jnp.max(m_BKJG, axis=2, keepdims=True)
  w = jnp.exp(m_BKJG - top)  # empty split: m = _NEG -> 0
  num = jnp.sum(acc_BKJGH * w[..., None], axis=2)
  den = jnp.sum(l_BKJG * w, axis=2)
  return (num / jnp.maximum(den, 1e-30)[..., None]).astype(dtype)


def _call(bound, q_BKGH, k_BKHS, v_BKSH, ok_BS, *, interpret):
  b, kh, gp, h = q_BKGH.shape
  s = k_BKHS.shape[-1]
  bs, splits, num_warps, num_stages = launch_settings(b, kh, s)
  n_blocks = s // bs
  per_split = -(-n_blocks // splits)
  splits = -(-n_blocks // per_split)  # no split left without blocks
  precision = jax.lax.Precision.HIGHEST if q_BKGH.dtype == f32 else None
  kernel = functools.partial(
    _kernel,
    block_s=bs,
    blocks_per_split=per_split,
    n_blocks=n_blocks,
    scale=h**-0.5,
    precision=precision,
  )
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415 (the GPU backend, on GPUs only)

    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if splits == 1:
    out_specs = pl.BlockSpec((None, None, gp, h), lambda i, k, j: (i, k, 0, 0))
    out_shape = jax.ShapeDtypeStruct((b, kh, gp, h), q_BKGH.dtype)
  else:
    out_specs = [
      pl.BlockSpec((None, None, None, gp, h), lambda i, k, j: (i, k, j, 0, 0)),
      pl.BlockSpec((None, None, None, gp), lambda i, k, j: (i, k, j, 0)),
      pl.BlockSpec((None, None, None, gp), lambda i, k, j: (i, k, j, 0)),
    ]
    out_shape = [
      jax.ShapeDtypeStruct((b, kh, splits, gp, h), f32),
      jax.ShapeDtypeStruct((b, kh, splits, gp), f32),
      jax.ShapeDtypeStruct((b, kh, splits, gp), f32),
    ]
  out = pl.pallas_call(
    kernel,
    grid=(b, kh, splits),
    in_specs=[
      pl.BlockSpec((1,), lambda i, k, j: (0,)),
      pl.BlockSpec((None, None, gp, h), lambda i, k, j: (i, k, 0, 0)),
      pl.BlockSpec((None, None, h, s), lambda i, k, j: (i, k, 0, 0)),
      pl.BlockSpec((None, None, s, h), lambda i, k, j: (i, k, 0, 0)),
      pl.BlockSpec((None, s), lambda i, k, j: (i, 0)),
    ],
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=compiler_params,
    interpret=interpret,
    name="srft_decode_attention",
  )(bound, q_BKGH, k_BKHS, v_BKSH, ok_BS)
  return out if splits == 1 else _combine(*out, q_BKGH.dtype)


def decode_attention(
  q_BNH: Array,
  k_BKHS: Array,
  v_BKSH: Array,
  ok_BS: Array,
  bound: Array,
  *,
  rules=None,
  interpret: bool | None = None,
) -> Array:
  """Softmax attention of one new token per row over the KV cache -> [B, N, H].

  q_BNH: the new token's queries (RoPE applied); k_BKHS / v_BKSH: the cache
  with this token already written; ok_BS: nonzero where a slot may be attended
  (filled, not padding, at or before this token); bound: int32 scalar, the
  number of leading slots that may hold attended entries (the cache index + 1).
  Same result as `model.attend` for the rows' one query (scores and softmax in
  float32; probabilities meet the values in their dtype), except that a row
  with no attended slot gets zeros. Under a mesh of several devices the kernel
  runs per shard (`shard_map`: rows over the batch axes, kv heads over the
  tensor axes of `rules`).
  """
  b, n, h = q_BNH.shape
  kh, s = k_BKHS.shape[1], k_BKHS.shape[-1]
  g = n // kh
  if not supported(h, s):
    raise ValueError(
      f"decode_attention: head_dim {h} (a power of two >= 16) and cache "
      f"length {s} (a multiple of 16) are needed"
    )
  if interpret is None:
    backend = jax.default_backend()
    if backend not in ("gpu", "cpu"):
      raise ValueError(
        f"decode_attention='pallas' is a Triton (GPU) kernel; on {backend} use "
        "decode_attention='xla'"
      )
    interpret = backend == "cpu"  # Pallas' interpreter: tests on CPU
  gp = max(16, pl.next_power_of_2(g))  # Triton's dot wants >= 16 rows
  q = jnp.pad(q_BNH.reshape(b, kh, g, h), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  bound = jnp.reshape(bound, (1,)).astype(jnp.int32)
  ok = ok_BS.astype(jnp.int32)
  call = functools.partial(_call, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    P = jax.sharding.PartitionSpec
    spec4 = shd.logical_to_spec(("batch", "act_kv_heads", None, None), rules, mesh, q.shape)
    spec2 = P(spec4[0], None)
    call = jax.shard_map(
      call, mesh=mesh, in_specs=(P(), spec4, spec4, spec4, spec2), out_specs=spec4, check_vma=False
    )
  out = call(bound, q, k_BKHS, v_BKSH, ok)
  return out[:, :, :g].reshape(b, n, h)
