"""Memory of the SRFT loss + gradient: full [B, T, V] logits vs chunked.

Part 1 compiles (never runs) loss + gradient w.r.t. the final hidden states and
the unembedding at the Qwen2.5-Math-7B shape (vocab 151,936, hidden 3,584,
16,384 tokens as 2 rows x 8,192, hidden and unembedding in bfloat16, logits in
float32) from jax.ShapeDtypeStruct inputs, so nothing big is allocated, and
reads XLA's temp-buffer size from memory_analysis(). Part 2 runs both at a
CPU-sized shape (vocab 32k, 2,048 tokens) and times them.

    python benchmarks/loss_memory.py [--chunk_size 1024]

Prints one JSON line.
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from srft_jax import objectives as obj  # noqa: E402

CFG = obj.LossConfig.preset("srft")


def naive_loss(hidden_BTD, unembed_DV, targets_BT, batch):
  logits_BTV = jnp.einsum("btd,dv->btv", hidden_BTD, unembed_DV, preferred_element_type=jnp.float32)
  logp, ent = obj.token_logprobs_and_entropy(logits_BTV, targets_BT)
  return obj.srft_loss(logp, ent, batch, CFG)[0]


def chunked_loss(hidden_BTD, unembed_DV, targets_BT, batch, chunk_size):
  logp, ent = obj.chunked_logprobs_and_entropy(
    hidden_BTD, unembed_DV, targets_BT, chunk_size=chunk_size
  )
  return obj.srft_loss(logp, ent, batch, CFG)[0]


def step_fn(loss_fn):
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))


def batch_spec(B, T, make):
  return dict(
    response_mask=make((B, T), jnp.float32),
    is_demo=make((B,), jnp.bool_),
    rewards=make((B,), jnp.float32),
    advantages=make((B,), jnp.float32),
  )


def temp_bytes(loss_fn, B, T, D, V, dtype):
  sds = jax.ShapeDtypeStruct
  args = (sds((B, T, D), dtype), sds((D, V), dtype), sds((B, T), jnp.int32), batch_spec(B, T, sds))
  compiled = step_fn(loss_fn).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def wall_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--chunk_size", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  cs = args.chunk_size

  # Part 1: 7B shape, compile only.
  B, T, D, V = 2, 8192, 3584, 151936
  naive = temp_bytes(naive_loss, B, T, D, V, jnp.bfloat16)
  chunked = temp_bytes(lambda *a: chunked_loss(*a, cs), B, T, D, V, jnp.bfloat16)

  # Part 2: CPU-sized shape, measured.
  b, t, d, v = 2, 1024, 512, 32768
  rng = np.random.default_rng(0)
  inputs = (
    jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
    jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32),
    jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
    dict(
      response_mask=jnp.ones((b, t), jnp.float32),
      is_demo=jnp.array([True] + [False] * (b - 1)),
      rewards=jnp.ones((b,), jnp.float32),
      advantages=jnp.full((b,), 0.5, jnp.float32),
    ),
  )
  naive_s = wall_seconds(step_fn(naive_loss), inputs, args.repeats)
  chunked_s = wall_seconds(step_fn(lambda *a: chunked_loss(*a, cs)), inputs, args.repeats)

  print(
    json.dumps(
      dict(
        naive_temp_bytes=naive,
        chunked_temp_bytes=chunked,
        ratio=round(chunked / naive, 4),
        memory_shape=dict(
          B=B, T=T, D=D, V=V, hidden_and_unembed_dtype="bfloat16", logits_dtype="float32"
        ),
        chunk_size=cs,
        wall_shape=dict(B=b, T=t, D=d, V=v, dtype="float32"),
        naive_wall_s=round(naive_s, 4),
        chunked_wall_s=round(chunked_s, 4),
        wall_ratio=round(chunked_s / naive_s, 3),
        backend=jax.default_backend(),
        jax=jax.__version__,
      )
    )
  )


if __name__ == "__main__":
  main()
