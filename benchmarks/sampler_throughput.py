"""Sampler throughput: srft_jax vs transformers `generate` (and Tunix when given).

CPU mode (default): the same Qwen2-like float32 model shape (~41M params) in
both frameworks, 32 prompts x 64 tokens, 128 new tokens with no EOS (so no
early stop), temperature-1 sampling. Prints one JSON line:
  {"tokens_per_s": {"srft_jax": ..., "transformers": ..., "tunix": ...},
   "ratio_vs_transformers": ..., "ratio_vs_tunix": ..., ...}

`--tunix_python=/path/to/venv/bin/python` also times Tunix's `Sampler` in that
(side) interpreter with the same shapes; Tunix is never installed here.

`--device`: a Qwen2.5-1.5B-shaped bfloat16 model on the accelerator; reports
tokens/s and the fraction of peak HBM bandwidth a decode step achieves:
(bytes of weights + KV cache read per step) / step time / peak.
The step time is (t(R new tokens) - t(1 new token)) / (R - 1), i.e. decode only.

  python benchmarks/sampler_throughput.py [--threads N] [--repeats 3]
  python benchmarks/sampler_throughput.py --device [--preset qwen2_5_1_5b]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; median")
  p.add_argument(
    "--threads",
    type=int,
    default=0,
    help="CPU threads for both frameworks (0 = all cores; 1 also makes XLA single-threaded)",
  )
  p.add_argument("--vocab", type=int, default=16384)
  p.add_argument("--embed", type=int, default=512)
  p.add_argument("--mlp", type=int, default=1536)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--tunix_python", default="", help="python of a side venv with google-tunix")
  p.add_argument("--skip_transformers", action="store_true")
  p.add_argument("--device", action="store_true", help="accelerator mode (bf16 1.5B shape)")
  p.add_argument("--preset", default="qwen2_5_1_5b", help="model preset for --device")
  p.add_argument("--dtype", default="bfloat16", help="params and compute dtype for --device")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument(
    "--profile",
    type=int,
    default=0,
    help="--device: also report the N costliest device ops of one sample call",
  )
  p.add_argument("--param_dtype", default="", help="--device: params dtype (default: --dtype)")
  p.add_argument(
    "--attention",
    default="chunked",
    help="--device: model attention (prefill of long prompts wants chunked)",
  )
  p.add_argument(
    "--variants",
    default="fused,plain",
    help="--device: comma list of fused (the sampler's default: fused "
    "compute-dtype weights), plain (the params as they are) and "
    "fused_wfirst (fused, multiplied weight-first as on CPU), "
    "fused_pallas (fused, Pallas decode-attention kernel); "
    "the first gives the headline figures, the others ratios",
  )
  p.add_argument(
    "--decode_only",
    action="store_true",
    help="--device: time the decode loop alone (sampler.decode_jit) over a cache "
    "prefilled with random keys/values: no prefill program, one compile",
  )
  p.add_argument(
    "--decode_tuning",
    default="",
    help="--device: JSON file of decode_attention.TUNING settings for fused_pallas "
    "(from benchmarks/decode_attention.py --best); ignored if absent",
  )
  return p.parse_args(argv)


ARGS = _args()
if ARGS.threads == 1:  # must precede the jax import
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import profile_ops  # noqa: E402  (benchmarks/, beside this script)
import tunix_side  # noqa: E402
from flax import nnx  # noqa: E402

from srft_jax import decode_attention  # noqa: E402
from srft_jax import model as model_lib  # noqa: E402
from srft_jax import sampler as smp  # noqa: E402
from srft_jax.model import attention as attention_lib  # noqa: E402

PEAK_HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def _prompts(batch, length, vocab, seed=0):
  rs = np.random.RandomState(seed)
  return rs.randint(1, vocab, size=(batch, length)).astype(np.int32), np.ones(
    (batch, length), np.int32
  )


def _median_time(fn, repeats):
  fn()  # warm-up (compile)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _time_srft(model, tokens, mask, new_tokens, repeats, temperature=1.0, profile=0, fused=True):
  cfg = smp.SamplingConfig(
    max_new_tokens=new_tokens,
    temperature=temperature,
    eos_ids=(),
    prompt_buckets=(tokens.shape[1],),
    fused_weights=fused,
  )
  keys = iter(range(10_000))

  def run():
    out = smp.sample(model, tokens, mask, jax.random.key(next(keys)), cfg)
    jax.block_until_ready(out.tokens)
    assert int(out.lengths.min()) == new_tokens  # no early stop

  seconds = _median_time(run, repeats)
  if not profile:
    return seconds
  graphdef, state = nnx.split(model)
  cache = smp.make_cache(model.cfg, *tokens.shape, cfg)
  text = (
    smp.sample_jit.lower(graphdef, state, tokens, mask, jax.random.key(0), cfg, cache)
    .compile()
    .as_text()
  )
  return seconds, profile_ops.top_ops(run, n=profile, compiled_text=text)


def _model_cfg(a) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(
    model_type="qwen2",
    vocab_size=a.vocab,
    embed_dim=a.embed,
    mlp_dim=a.mlp,
    num_layers=a.layers,
    num_heads=a.heads,
    num_kv_heads=a.kv_heads,
    head_dim=a.head_dim,
    rope_theta=1e6,
    max_seq_len=4096,
    qkv_bias=True,
    tie_embeddings=False,
  )


def _time_transformers(cfg: model_lib.ModelConfig, tokens, mask, new_tokens, repeats, threads):
  import torch
  import transformers

  torch.set_num_threads(threads or os.cpu_count())
  hf_cfg = transformers.Qwen2Config(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.embed_dim,
    intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    max_position_embeddings=cfg.max_seq_len,
    rope_theta=cfg.rope_theta,
    tie_word_embeddings=cfg.tie_embeddings,
    rms_norm_eps=cfg.norm_eps,
  )
  hf = transformers.Qwen2ForCausalLM(hf_cfg).eval().to(torch.float32)
  ids = torch.tensor(tokens, dtype=torch.long)
  att = torch.tensor(mask, dtype=torch.long)

  def run():
    with torch.inference_mode():
      out = hf.generate(
        input_ids=ids,
        attention_mask=att,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
      )
    assert out.shape[1] == tokens.shape[1] + new_tokens

  return _median_time(run, repeats)


# Tunix's Sampler, in the side interpreter (after tunix_side.PREAMBLE).
_TUNIX_BODY = r"""
from tunix.generate import sampler as sampler_lib
model = make_model()
cache = sampler_lib.CacheConfig(cache_size=spec["prompt_len"] + spec["new_tokens"] + 8,
                                num_layers=spec["layers"], num_kv_heads=spec["kv_heads"],
                                head_dim=spec["head_dim"])
sampler = sampler_lib.Sampler(transformer=model, tokenizer=hf_tok, cache_config=cache)
prompts = [random_prompt() for _ in range(spec["batch"])]
def run(seed):
  out = sampler(prompts, max_generation_steps=spec["new_tokens"], temperature=1.0, top_p=1.0,
                top_k=None, seed=seed, echo=False, max_prompt_length=spec["prompt_len"])
  jax.block_until_ready(out.tokens)
run(0)
times = []
for r in range(spec["repeats"]):
  t0 = time.perf_counter(); run(r + 1); times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": float(np.median(times))}))
"""


def _time_tunix(a):
  spec = {
    k: getattr(a, k)
    for k in tunix_side.MODEL_KEYS + ("prompt_len", "new_tokens", "batch", "repeats")
  }
  env = dict(os.environ)
  if a.threads == 1:
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  return tunix_side.run(a.tunix_python, _TUNIX_BODY, spec, env)


def run_cpu(a):
  cfg = _model_cfg(a)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens, mask = _prompts(a.batch, a.prompt_len, a.vocab)
  generated = a.batch * a.new_tokens
  result = {
    "mode": "cpu",
    "backend": jax.default_backend(),
    "params": model_lib.count_params(model),
    "batch": a.batch,
    "prompt_len": a.prompt_len,
    "new_tokens": a.new_tokens,
    "threads": a.threads or os.cpu_count(),
    "seconds": {},
    "tokens_per_s": {},
  }
  t = _time_srft(model, tokens, mask, a.new_tokens, a.repeats, a.temperature)
  result["seconds"]["srft_jax"] = t
  result["tokens_per_s"]["srft_jax"] = generated / t
  del model
  if not a.skip_transformers:
    t = _time_transformers(cfg, tokens, mask, a.new_tokens, a.repeats, a.threads)
    result["seconds"]["transformers"] = t
    result["tokens_per_s"]["transformers"] = generated / t
  if a.tunix_python:
    try:
      t = _time_tunix(a)
      result["seconds"]["tunix"] = t
      result["tokens_per_s"]["tunix"] = generated / t
    except Exception as e:  # noqa: BLE001  (reported, not hidden)
      result["tunix_error"] = f"{type(e).__name__}: {e}"
  tps = result["tokens_per_s"]
  result["ratio_vs_transformers"] = (
    tps["srft_jax"] / tps["transformers"] if "transformers" in tps else None
  )
  result["ratio_vs_tunix"] = tps["srft_jax"] / tps["tunix"] if "tunix" in tps else None
  return result


def _peak_bandwidth(device) -> float | None:
  kind = device.device_kind.upper()
  for name, peak in PEAK_HBM_BYTES_PER_S.items():
    if name in kind:
      return peak
  return None


def _decode_step(model, tokens, mask, a, variant):
  """Decode seconds per step of one variant: (t(R) - t(1)) / (R - 1), and t(R), t(1)."""
  if variant not in ("fused", "plain", "fused_wfirst", "fused_pallas"):
    raise ValueError(f"--variants: unknown variant {variant!r}")
  if variant == "fused_pallas":  # the Pallas decode-attention kernel (decode_attention="pallas")
    # the same parameter arrays under a config that selects the kernel
    alt = model_lib.abstract_model(dataclasses.replace(model.cfg, decode_attention="pallas"))
    nnx.update(alt, nnx.state(model))
    return _decode_step(alt, tokens, mask, a, "fused")
  if variant == "fused_wfirst":  # the CPU operand order (w @ x.T) on this backend too
    saved = attention_lib.WEIGHT_FIRST_BACKENDS
    attention_lib.WEIGHT_FIRST_BACKENDS = saved + (jax.default_backend(),)
    smp.sample_jit.clear_cache()
    try:
      return _decode_step(model, tokens, mask, a, "fused")
    finally:
      attention_lib.WEIGHT_FIRST_BACKENDS = saved
      smp.sample_jit.clear_cache()
  fused = variant == "fused"
  if a.decode_only:
    step, profile = _time_decode_only(model, a, fused)
    return step, None, None, profile
  profile = None
  if a.profile:
    t_full, profile = _time_srft(
      model, tokens, mask, a.new_tokens, a.repeats, a.temperature, a.profile, fused
    )
  else:
    t_full = _time_srft(model, tokens, mask, a.new_tokens, a.repeats, a.temperature, fused=fused)
  t_one = _time_srft(model, tokens, mask, 1, a.repeats, a.temperature, fused=fused)
  return (t_full - t_one) / (a.new_tokens - 1), t_full, t_one, profile


def _time_decode_only(model, a, fused):
  """Seconds per decode step, timed on the sampler's own decode loop
  (`sampler.decode_jit`) over a cache whose first prompt_len slots hold random
  keys and values: no prefill, one compile. Median of the repeats of
  t(new_tokens - 1 steps) / (new_tokens - 1); each call also builds the fused
  decode weights once (a ~3 GB copy at the 1.5B shape, ~1 ms)."""
  cfg = smp.SamplingConfig(
    max_new_tokens=a.new_tokens,
    temperature=a.temperature,
    eos_ids=(),
    prompt_buckets=(a.prompt_len,),
    fused_weights=fused,
  )
  graphdef, state = nnx.split(model)
  b, p = a.batch, a.prompt_len
  template = jax.eval_shape(lambda: smp.make_cache(model.cfg, b, p, cfg))

  @jax.jit
  def filled(key):
    leaves = [
      jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(
        jax.random.split(key, 2 * model.cfg.num_layers), template["k"] + template["v"]
      )
    ]
    n = model.cfg.num_layers
    s = template["mask"].shape[1]
    mask = jnp.broadcast_to(jnp.arange(s) < p, (b, s)).astype(template["mask"].dtype)
    return {
      "k": tuple(leaves[:n]),
      "v": tuple(leaves[n:]),
      "mask": mask,
      "index": jnp.asarray(p, template["index"].dtype),
    }

  last = jnp.asarray(np.random.RandomState(0).randint(1, model.cfg.vocab_size, size=b), jnp.int32)
  pos = jnp.full((b,), p, jnp.int32)
  times = []
  for r in range(a.repeats + 1):  # the first call compiles
    cache = jax.block_until_ready(filled(jax.random.key(r)))
    t0 = time.perf_counter()
    tok, _, mask, cache = smp.decode_jit(graphdef, state, cache, last, pos, jax.random.key(r), cfg)
    jax.block_until_ready(tok)
    times.append(time.perf_counter() - t0)
    assert int(np.asarray(mask).sum()) == b * (a.new_tokens - 1)  # no early stop
    del cache
  step = float(np.median(times[1:])) / (a.new_tokens - 1)
  if not a.profile:
    return step, None
  # One more call under the profiler (its cache is filled before the trace starts).
  pending = [filled(jax.random.key(99))]
  jax.block_until_ready(pending)
  text = (
    smp.decode_jit.lower(graphdef, state, pending[0], last, pos, jax.random.key(0), cfg)
    .compile()
    .as_text()
  )
  run = lambda: smp.decode_jit(
    graphdef,
    state,
    pending.pop(),
    last,
    pos,  # noqa: E731
    jax.random.key(0),
    cfg,
  )[0]
  return step, profile_ops.top_ops(run, n=a.profile, compiled_text=text)


def run_device(a):
  cfg = model_lib.ModelConfig.preset(
    a.preset,
    param_dtype=a.param_dtype or a.dtype,
    dtype=a.dtype,
    remat="none",
    attention=a.attention,
  )
  model = model_lib.create_model(cfg, seed=0)
  tokens, mask = _prompts(a.batch, a.prompt_len, cfg.vocab_size)
  # Bytes a decode step must read: every matmul weight once, in the compute
  # dtype (the fused variants read a compute-dtype copy; "plain" with float32
  # master weights reads float32 and so does worse than this counts).
  compute_bytes = jnp.dtype(cfg.jnp_dtype).itemsize
  n_weights = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if not cfg.tie_embeddings:  # an untied embedding is only gathered (B rows per step)
    n_weights -= cfg.vocab_size * cfg.embed_dim - a.batch * cfg.embed_dim
  weight_bytes = n_weights * compute_bytes
  # XLA's attention (`model.attend`) reads every slot of the static cache each
  # step (masked or not).
  cache_len = a.prompt_len + a.new_tokens
  kv_bytes = (
    2 * cfg.num_layers * a.batch * cache_len * cfg.num_kv_heads * cfg.head_dim * compute_bytes
  )
  device = jax.devices()[0]
  peak = _peak_bandwidth(device)
  if a.decode_tuning and os.path.exists(a.decode_tuning):
    with open(a.decode_tuning) as f:
      decode_attention.TUNING.update(json.load(f))
  # The Pallas kernel reads only the filled slots (rounded up to its block):
  # the cache bytes it reads, averaged over the timed decode steps 1 .. R-1.
  bs = decode_attention.block_size(cache_len) or cache_len
  filled = np.arange(1, a.new_tokens) + a.prompt_len  # slots attended at each step
  read_slots = float(np.mean(np.minimum(-(-filled // bs) * bs, cache_len)))
  kv_bytes_filled = kv_bytes * read_slots / cache_len
  variants = {}
  for name in a.variants.split(","):
    step, t_full, t_one, profile = _decode_step(model, tokens, mask, a, name)
    pallas = name == "fused_pallas" and decode_attention.supported(cfg.head_dim, cache_len)
    step_kv = kv_bytes_filled if pallas else kv_bytes
    achieved = (weight_bytes + step_kv) / step
    variants[name] = {
      "decode_step_s": step,
      "total_s": t_full,
      "prefill_plus_first_s": t_one,
      # decode_only: no prefill timed, so tokens/s is the decode rate
      "tokens_per_s": a.batch * a.new_tokens / t_full if t_full else a.batch / step,
      "decode_tokens_per_s": a.batch / step,
      "kv_bytes_read": int(step_kv),
      "hbm_bandwidth_fraction": achieved / peak if peak else None,
      "profile": profile,
    }
  head_name = a.variants.split(",")[0]
  head = variants[head_name]
  return {
    "mode": "device",
    "device": device.device_kind,
    "preset": a.preset,
    "dtype": a.dtype,
    "param_dtype": cfg.param_dtype,
    "attention": cfg.attention,
    "params": model_lib.count_params(model),
    "batch": a.batch,
    "prompt_len": a.prompt_len,
    "new_tokens": a.new_tokens,
    "variant": head_name,
    "tokens_per_s": {"srft_jax": head["tokens_per_s"]},
    "decode_tokens_per_s": head["decode_tokens_per_s"],
    "seconds": {
      "total": head["total_s"],
      "prefill_plus_first": head["prefill_plus_first_s"],
      "decode_step": head["decode_step_s"],
    },
    "bytes_per_step": {"weights": int(weight_bytes), "kv_cache": int(kv_bytes)},
    "peak_bytes_per_s": peak,
    "hbm_bandwidth_fraction": head["hbm_bandwidth_fraction"],
    # decode-step time of each other variant / the headline variant's
    "step_ratio_vs_head": {
      k: v["decode_step_s"] / head["decode_step_s"] for k, v in variants.items() if k != head_name
    },
    "variants": variants,
    "temperature": a.temperature,
    "decode_only": a.decode_only,
    "decode_tuning": dict(decode_attention.TUNING),
  }


def main():
  result = run_device(ARGS) if ARGS.device else run_cpu(ARGS)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
