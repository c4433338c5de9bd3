"""Train-step throughput and MFU of the jitted SRFT update (the GPU check).

One `step_lib.train_step` (the `srft` loss, AdamW, exact micro-batch gradient
accumulation, donated state) on a random batch of `rows` sequences of
`prompt_len + response_len` tokens, for a model preset (default: the
Qwen2.5-1.5B shape) with float32 master weights and bfloat16 compute.

  MFU = model FLOPs per step / step time / peak dense bf16 FLOP/s
  model FLOPs = 3 x forward, forward per token = 2 x (matmul parameters)
                + 2 x 2 x layers x heads x head_dim x (mean causal context)

Rematerialised recomputation is not counted (that would be HFU); XLA's own
cost-analysis FLOP count is printed beside it (it counts a scanned body once). Prints one JSON
line: {"tokens_per_s", "mfu", "step_s", "model_flops_per_step", ...}.

  python benchmarks/train_throughput.py                       # GPU/TPU
  JAX_PLATFORMS=cpu python benchmarks/train_throughput.py --preset tiny --rows 4 \
      --prompt_len 32 --response_len 32 --microbatches 2    # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import profile_ops  # noqa: E402  (benchmarks/, beside this script)
from flax import nnx

from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import step as step_lib

# Dense bf16 peak (no sparsity), per chip.
PEAK_BF16_FLOPS = {
  "H100": 989.4e12,
  "H200": 989.4e12,
  "A100": 312e12,
  "TPU v5p": 459e12,
  "TPU v5 lite": 197e12,
  "TPU v6 lite": 918e12,
  "TPU v4": 275e12,
}


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="qwen2_5_1_5b")
  p.add_argument("--rows", type=int, default=32, help="sequences per step (rollouts + demos)")
  p.add_argument("--prompt_len", type=int, default=1024)
  p.add_argument("--response_len", type=int, default=1024)
  p.add_argument("--group", type=int, default=8, help="rows per prompt group (7 rollouts + 1 demo)")
  p.add_argument("--microbatches", type=int, default=4)
  p.add_argument("--remat", default="dots", choices=("none", "full", "dots"))
  p.add_argument("--attention", default="chunked", choices=("xla", "chunked", "cudnn"))
  p.add_argument("--logit_chunk", type=int, default=1024, help="tokens of [T, V] logits at a time")
  p.add_argument("--param_dtype", default="float32")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--repeats", type=int, default=5, help="timed steps after one warm-up; median")
  p.add_argument("--profile", type=int, default=0, help="also report the N costliest device ops")
  p.add_argument(
    "--compare_recompute",
    action="store_true",
    help="also time the step with recompute_old_logp and a token_truncate correction, "
    "side by side (the cost of measuring the sampler-trainer mismatch)",
  )
  return p.parse_args(argv)


def model_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward), causal attention."""
  matmul_params = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.embed_dim)
  attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (seq_len + 1) / 2
  return 3.0 * (2.0 * matmul_params + attn)


def _batch(a, vocab: int, seed: int = 0) -> dict:
  rs = np.random.RandomState(seed)
  b, g, p, r = a.rows // a.group, a.group, a.prompt_len, a.response_len
  layout = step_lib.GroupLayout(g - 1, 1)
  args = (
    rs.randint(1, vocab, (b, p)),
    np.ones((b, p)),
    rs.randint(1, vocab, (b * (g - 1), r)),
    np.ones((b * (g - 1), r)),
    -rs.rand(b * (g - 1), r),
    rs.randint(1, vocab, (b, r)),
    np.ones((b, r)),
    rs.randint(0, 2, (b * g,)),
  )
  args = [jnp.asarray(x, jnp.float32 if x.dtype == np.float64 else jnp.int32) for x in args]
  rewards = args[-1].astype(jnp.float32)
  adv = step_lib.rollout_advantages(rewards, layout=layout, cfg=obj.AdvantageConfig())
  return jax.jit(functools.partial(step_lib.assemble_batch, layout=layout))(
    *args[:-1], rewards, adv
  )


def _peak(device) -> float | None:
  kind = device.device_kind
  for name, peak in PEAK_BF16_FLOPS.items():
    if name.upper() in kind.upper():
      return peak
  return None


def run(a) -> dict:
  if a.rows % a.group or a.rows % a.microbatches:
    raise ValueError("--rows must be a multiple of --group and of --microbatches")
  cfg = model_lib.ModelConfig.preset(
    a.preset,
    param_dtype=a.param_dtype,
    dtype=a.dtype,
    remat=a.remat,
    attention=a.attention,
    max_seq_len=a.prompt_len + a.response_len,
  )
  model = model_lib.create_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  del model
  tx, _ = step_lib.make_optimizer(1e-6, steps=100)
  step_cfg = step_lib.StepConfig(
    loss=obj.LossConfig.preset("srft"),
    minibatches=1,
    microbatches=a.microbatches,
    logit_chunk=a.logit_chunk,
  )
  state = step_lib.init_train_state(params, tx)
  batch = _batch(a, cfg.vocab_size)

  def compile_step(step_cfg):
    step = jax.jit(
      functools.partial(step_lib.train_step, graphdef, tx, step_cfg), donate_argnums=(0,)
    )
    return step.lower(state, batch).compile()

  def timed_steps(compiled, state):
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    return times, state, m

  t0 = time.perf_counter()
  compiled = compile_step(step_cfg)
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0)) if cost else None
  mem = compiled.memory_analysis()

  times, state, m = timed_steps(compiled, state)
  step_s = float(np.median(times))
  extra = {}
  if a.compare_recompute:
    loss = dataclasses.replace(step_cfg.loss, is_correction="token_truncate")
    other = compile_step(dataclasses.replace(step_cfg, loss=loss, recompute_old_logp=True))
    other_times, state, _ = timed_steps(other, state)
    extra["recompute_step_s"] = float(np.median(other_times))
    extra["recompute_cost"] = extra["recompute_step_s"] / step_s
  profile = None
  if a.profile:

    def one_step():
      nonlocal state
      state, metrics = compiled(state, batch)
      return metrics

    profile = profile_ops.top_ops(one_step, n=a.profile, compiled_text=compiled.as_text())
  seq = a.prompt_len + a.response_len
  tokens = a.rows * seq
  flops = model_flops_per_token(cfg, seq) * tokens
  device = jax.devices()[0]
  peak = _peak(device)
  return {
    "tokens_per_s": tokens / step_s,
    "mfu": flops / step_s / peak if peak else None,
    "step_s": step_s,
    "model_flops_per_step": flops,
    # XLA's count, for reference only: it counts a scanned body once, so it
    # under-counts the micro-batch loop.
    "xla_flops_per_step": xla_flops,
    "peak_flops": peak,
    "device": device.device_kind,
    "backend": jax.default_backend(),
    "preset": a.preset,
    "params": cfg.num_params(),
    "rows": a.rows,
    "seq_len": seq,
    "microbatches": a.microbatches,
    "remat": a.remat,
    "attention": a.attention,
    "param_dtype": a.param_dtype,
    "dtype": a.dtype,
    "compile_s": compile_s,
    "loss_finite": bool(np.isfinite(float(m["loss"]))),
    **extra,
    "temp_bytes": getattr(mem, "temp_size_in_bytes", None) if mem else None,
    "logit_chunk": a.logit_chunk,
    "all_steps_s": [round(t, 4) for t in times],
    "profile": profile,
  }


def main(argv=None):
  print(json.dumps(run(_args(argv))))


if __name__ == "__main__":
  main()
