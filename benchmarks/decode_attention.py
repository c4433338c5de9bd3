"""One decode step's attention: the Pallas kernel's launch settings vs XLA's `attend`.

Times the attention of one new token a row over a bf16 KV cache (Qwen2.5-1.5B
heads: 12 query heads, 2 kv heads, head_dim 128) for every kernel setting in
the sweep and for XLA's attention (which reads every slot of the static cache),
side by side in one run: each inside one jitted loop over `--layers` cache
copies (as a decode step runs its layers), so the cache is read from HBM, not
L2, and host dispatch is not timed. Prints one JSON line: each setting's microseconds and
fraction of peak HBM bandwidth (bytes of cache actually read / time / peak),
XLA's, and the best setting; `--best FILE` also writes that setting as JSON
(`sampler_throughput.py --decode_tuning FILE` reads it).

  python benchmarks/decode_attention.py --batch 64 --cache_len 320 --fill 192
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from srft_jax import decode_attention as da
from srft_jax import model as model_lib

PEAK_HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--cache_len", type=int, default=320)
  p.add_argument("--fill", type=int, default=192, help="filled slots (the kernel's bound)")
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--layers", type=int, default=8, help="cache copies rotated through")
  p.add_argument("--iters", type=int, default=20, help="loop iterations (x layers calls)")
  p.add_argument("--splits", default="1,2,4,8")
  p.add_argument("--warps", default="4,8")
  p.add_argument("--stages", default="2,3")
  p.add_argument(
    "--blocks", default="", help="slot blocks to try (default: the largest that divides)"
  )
  p.add_argument("--best", default="", help="write the best setting here (JSON)")
  return p.parse_args(argv)


def _time(attn, inputs, fill, reps):
  """Seconds per call of attn(q, k, v, ok, bound): one jitted loop of `reps`
  iterations, each calling it once per cache copy (as a decode step calls it
  once per layer), so host dispatch stays out of the figure. The bound moves
  by one slot every other iteration, so nothing is loop-invariant."""
  s = inputs[0][1].shape[-1]

  @jax.jit
  def loop(inputs):
    def body(i, acc):
      bound = fill - (i % 2)
      ok = jnp.broadcast_to(jnp.arange(s) < bound, inputs[0][3].shape)
      outs = [attn(q, k, v, ok, bound) for q, k, v, _ in inputs]
      return acc + sum(o[0, 0, 0].astype(jnp.float32) for o in outs)

    return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

  jax.block_until_ready(loop(inputs))  # compile + warm
  rounds = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(inputs))
    rounds.append((time.perf_counter() - t0) / (reps * len(inputs)))
  return float(np.median(rounds))


def main():
  a = _args()
  b, s, n, kh, h = a.batch, a.cache_len, a.heads, a.kv_heads, a.head_dim
  dt = jnp.bfloat16
  keys = jax.random.split(jax.random.key(0), 3 * a.layers)
  ok = jnp.broadcast_to(jnp.arange(s) < a.fill, (b, s))
  inputs = []
  for i in range(a.layers):
    q = jax.random.normal(keys[3 * i], (b, n, h), dt)
    k = jax.random.normal(keys[3 * i + 1], (b, kh, h, s), dt)
    v = jax.random.normal(keys[3 * i + 2], (b, kh, s, h), dt)
    inputs.append((q, k, v, ok))
  bound = jnp.int32(a.fill)
  itemsize = 2
  full_bytes = 2 * b * kh * h * s * itemsize
  device = jax.devices()[0]
  peak = next(
    (p for name, p in PEAK_HBM_BYTES_PER_S.items() if name in device.device_kind.upper()), None
  )

  xla = lambda q, k, v, o, bound: model_lib.attend(q[:, None], k, v, o[:, None, :])[:, 0]  # noqa: E731
  t_xla = _time(xla, inputs, a.fill, a.iters)
  ref = np.asarray(jax.jit(xla)(*inputs[0], bound), np.float32)
  result = {
    "device": device.device_kind,
    "batch": b,
    "cache_len": s,
    "fill": a.fill,
    "xla": {
      "us": t_xla * 1e6,
      "bytes": full_bytes,
      "hbm_fraction": full_bytes / t_xla / peak if peak else None,
    },
    "settings": [],
  }
  blocks = [int(x) for x in a.blocks.split(",") if x] or [da.block_size(s)]
  best = None
  saved = dict(da.TUNING)
  for bs, splits, warps, stages in itertools.product(
    blocks,
    [int(x) for x in a.splits.split(",")],
    [int(x) for x in a.warps.split(",")],
    [int(x) for x in a.stages.split(",")],
  ):
    if s % bs:
      continue
    da.TUNING.update(splits=splits, block_s=bs, num_warps=warps, num_stages=stages)
    read = 2 * b * kh * h * min(-(-a.fill // bs) * bs, s) * itemsize
    row = {"block_s": bs, "splits": splits, "num_warps": warps, "num_stages": stages}
    try:
      fn = lambda q, k, v, o, bound: da.decode_attention(q, k, v, o, bound)  # noqa: E731
      err = float(np.max(np.abs(np.asarray(jax.jit(fn)(*inputs[0], bound), np.float32) - ref)))
      t = _time(fn, inputs, a.fill, a.iters)
      row.update(
        us=t * 1e6,
        max_abs_err_vs_xla=err,
        bytes=read,
        hbm_fraction=read / t / peak if peak else None,
        speedup_vs_xla=t_xla / t,
      )
      if err < 5e-2 and (best is None or t < best[0]):
        best = (t, dict(block_s=bs, splits=splits, num_warps=warps, num_stages=stages))
    except Exception as e:  # noqa: BLE001  (a setting Triton rejects is reported, not fatal)
      row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    result["settings"].append(row)
  da.TUNING.clear()
  da.TUNING.update(saved)
  if best:
    result["best"] = dict(best[1], us=best[0] * 1e6, speedup_vs_xla=t_xla / best[0])
    if a.best:
      with open(a.best, "w") as f:
        json.dump(best[1], f)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
