"""Sequence packing in the update (docs/method.md §18): packed vs padded rows.

One batch of 32 rows = 32-token prompts (16-32 real, left padded) + 256-token
responses whose lengths are long-tailed (log-normal, median 64 = R/4, clipped
to [1, 256]), the `srft` preset (every fourth row a demonstration), one
update. The same jitted train step runs the rows padded to P + R (the
default) and packed first-fit-decreasing into slots of `--pack_rows` rows of
`--pack_len` tokens (0 = 2 (P + R); `srft_jax.packing`); an empty slot is
skipped. Model: a small float32 Qwen2 shape (vocab 2048, embed 128, mlp 384,
2 layers, 4 heads (2 kv) x 32).

Prints one JSON line: the real-token fraction of each (real tokens over the
tokens the update processes; target >= 0.9 packed), the step time of each
(median of `--repeats` after a warm-up, the two timed in turns), the
speed-up, the padded step's loss and the absolute difference of the packed
step's (and the relative difference of the gradient norms).

  python benchmarks/packing.py [--rows 32] [--pack_len 0] [--pack_rows 1] [--repeats 7]
  # on a GPU (benchmarks/gpu_check.sh's `packing` part): Qwen2.5-1.5B's shape, cuDNN
  python benchmarks/packing.py --preset qwen2_5_1_5b --dtype bfloat16 --attention cudnn \\
      --remat full --scan_layers --prompt_len 512 --response_len 2048 --pack_rows 4
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from srft_jax import model as model_lib  # noqa: E402
from srft_jax import objectives as obj  # noqa: E402
from srft_jax import packing  # noqa: E402
from srft_jax import step as step_lib  # noqa: E402


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", type=int, default=32)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--response_len", type=int, default=256)
  p.add_argument("--pack_len", type=int, default=0, help="0: 2 x (prompt_len + response_len)")
  p.add_argument("--pack_rows", type=int, default=1)
  p.add_argument("--repeats", type=int, default=7, help="timed steps after one warm-up; median")
  p.add_argument("--seed", type=int, default=0)
  # An accelerator's run: a real shape, bf16, cuDNN attention (its packed layout), e.g.
  # --preset qwen2_5_1_5b --dtype bfloat16 --attention cudnn --remat full
  p.add_argument("--preset", default="", help="a model preset; '' = the small shape below")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--attention", default="xla", help="xla | chunked | cudnn")
  p.add_argument("--remat", default="none")
  p.add_argument("--scan_layers", action="store_true", help="the layers as one lax.scan")
  return p.parse_args(argv)


def make_batch(rows: int, p: int, r: int, vocab: int, seed: int) -> dict:
  """Rows as the trainer lays them out, long-tailed response lengths."""
  rs = np.random.RandomState(seed)
  plen = rs.randint(p // 2, p + 1, rows)
  rlen = np.clip(np.round(rs.lognormal(np.log(r / 4), 0.8, rows)), 1, r).astype(int)
  pmask = np.arange(p)[None] >= (p - plen)[:, None]
  rmask = np.arange(r)[None] < rlen[:, None]
  mask = np.concatenate([pmask, rmask], 1).astype(np.int32)
  response = np.concatenate([np.zeros_like(pmask), rmask], 1)[:, 1:].astype(np.int32)
  return {
    "tokens": jnp.asarray(rs.randint(1, vocab, mask.shape) * mask, jnp.int32),
    "mask": jnp.asarray(mask),
    "response_mask": jnp.asarray(response),
    "old_logp": jnp.asarray(-rs.rand(rows, p + r - 1) * response, jnp.float32),
    "is_demo": jnp.asarray(np.arange(rows) % 4 == 3),
    "rewards": jnp.asarray(rs.randint(0, 2, rows), jnp.float32),
    "advantages": jnp.asarray(rs.randn(rows), jnp.float32),
  }


def _time(runs, repeats):
  """(metrics, median seconds) of each (fn, args) in `runs`, timed in turns
  (a shared machine's load then falls on both alike), after a warm-up each."""
  # compile; keep the metrics only (a large model's new state is freed at once)
  outs = [jax.block_until_ready(fn(*args)[1]) for fn, args in runs]
  times = [[] for _ in runs]
  for _ in range(repeats):
    for (fn, args), ts in zip(runs, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
  return outs, [float(np.median(ts)) for ts in times]


def main(argv=None):
  a = _args(argv)
  common = dict(dtype=a.dtype, attention=a.attention, remat=a.remat, scan_layers=a.scan_layers)
  if a.preset:
    cfg = model_lib.ModelConfig.preset(a.preset, **common)
  else:
    cfg = model_lib.ModelConfig(
      vocab_size=2048,
      embed_dim=128,
      mlp_dim=384,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      max_seq_len=4 * (a.prompt_len + a.response_len),
      **common,
    )
  graphdef, params = nnx.split(model_lib.create_model(cfg, seed=a.seed))
  tx = optax.adamw(1e-4)
  state = step_lib.init_train_state(params, tx)
  row_len = a.prompt_len + a.response_len
  batch = make_batch(a.rows, a.prompt_len, a.response_len, cfg.vocab_size, a.seed)
  # The padded arm as the factory runs it: no LM head on the prompt (response_len).
  padded_cfg = step_lib.StepConfig(
    loss=obj.LossConfig.preset("srft"), logit_chunk=1024, response_len=a.response_len
  )
  packed_cfg = dataclasses.replace(
    padded_cfg, pack_len=a.pack_len or 2 * row_len, pack_rows=a.pack_rows
  )
  starts, lengths = packing.row_extents(np.asarray(batch["mask"]))
  plan = packing.make_plan(
    starts, lengths, row_len=row_len, pack_len=packed_cfg.pack_len, pack_rows=a.pack_rows
  )
  padded_fn = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, padded_cfg))
  packed_fn = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, packed_cfg))
  pack = jax.tree.map(jnp.asarray, plan)
  (m_pad, m_pack), (t_pad, t_pack) = _time(
    [(padded_fn, (state, batch)), (packed_fn, (state, batch, None, None, pack))], a.repeats
  )
  seg = plan["segment"]
  print(
    json.dumps(
      {
        "rows": a.rows,
        "row_len": row_len,
        "real_tokens": int(lengths.sum()),
        "response_len_median": float(np.median(np.asarray(batch["response_mask"]).sum(1) + 1)),
        "pack_len": packed_cfg.pack_len,
        "pack_rows": a.pack_rows,
        "slots": int(seg.shape[2]),
        "slots_used": int((seg > 0).any(axis=(3, 4)).sum()),
        "real_token_fraction_padded": round(packing.real_token_fraction(lengths, None, row_len), 4),
        "real_token_fraction_packed": round(packing.real_token_fraction(lengths, plan, row_len), 4),
        "step_s_padded": round(t_pad, 4),
        "step_s_packed": round(t_pack, 4),
        "speedup": round(t_pad / t_pack, 3),
        "loss_padded": float(m_pad["loss"]),
        "loss_max_abs_diff": float(abs(float(m_pad["loss"]) - float(m_pack["loss"]))),
        "grad_norm_rel_diff": float(
          abs(float(m_pad["grad_norm"]) - float(m_pack["grad_norm"])) / float(m_pad["grad_norm"])
        ),
        "model": a.preset or "small",
        "dtype": a.dtype,
        "attention": a.attention,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
      }
    )
  )


if __name__ == "__main__":
  main()
