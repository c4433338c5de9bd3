"""Ahead-of-time fit check: compile the real train step and sampler for a TPU slice
on a CPU-only host, and print per-chip memory against the chip's HBM.

  python -m srft_jax.tools.aot --config=configs/srft_7b_tpu.py --topology=v5p:2x4x4
  python -m srft_jax.tools.aot --config=configs/srft_7b_tpu.py --find-smallest --rows-per-shard=1
  python -m srft_jax.tools.aot --config=configs/default.py --topology=v5e:2x2 \
      --programs=train,sample --config.batch.microbatches=2

Needs libtpu (requirements-tpu.txt): `jax.experimental.topologies.get_topology_desc`
gives compile-only devices of the named topology; nothing runs and no TPU is
touched. The programs are the ones the trainer runs, built the same way:

  train    step.train_step via step.jit_train_step (state and batch shardings
           from step.state_shardings / step.batch_shardings, state donated),
           on one step's batch: prompts x (rollouts + demos) rows of P + R tokens;
           with a distillation teacher (docs/method.md §19.6), its params
           (config.json's shapes, teacher.dtype) as the step's last argument.
  sample   the sampler's jitted core (prefill + while-loop decode) for
           prompts x rollouts rows and a P + R slot KV cache (donated).
  prefill  one model call with the cache over the P prompt tokens.
  decode   one model call with the cache for one new token per row.

Memory comes from `compiled.memory_analysis()` (per chip); the sampling
programs' totals add the train state that stays on the chip while they run
(optimizer moments, a KL reference, a distillation teacher: `resident_bytes`).
FLOPs come from `compiled.cost_analysis()` (per chip; XLA counts each loop
body once, so for the scanned train step and the decode loop it is a lower
bound) and, for the whole step, from the model: 6 N tokens + causal attention
(what MFU uses).
The last line printed is one JSON object with everything.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx
from jax.experimental import topologies
from ml_collections import config_flags

from srft_jax import console
from srft_jax import factory
from srft_jax import lora
from srft_jax import model as model_lib
from srft_jax import packing
from srft_jax import sampler as sampler_lib
from srft_jax import sharding as shd
from srft_jax import step as step_lib

# Per-chip HBM as the spec sheets give it, taken as GB = 1e9 bytes (the chips'
# GiB are ~7% more: a conservative fit check), and the slice shapes
# --find-smallest tries.
HBM_GB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
FIT_FRACTION = 0.9
SLICES = {
  "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
  "v5e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
  "v6e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
  "v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
}
PROGRAMS = ("train", "sample", "prefill", "decode")  # the trainer's (the default list)
# A frozen teacher's distillation sampler (`python -m srft_jax.data distill`,
# docs/method.md §16): the sampler core and one decode step with the weights in
# the compute dtype and nothing else on the chip. Compiled when named.
DISTILL_PROGRAMS = ("distill", "distill_decode")
ALL_PROGRAMS = PROGRAMS + DISTILL_PROGRAMS
# Per-chip HBM bandwidth (GB/s) and dense bf16 peak (TFLOP/s) from the spec
# sheets: the roofline bound of a distillation decode step.
HBM_GBPS = {"v4": 1228.0, "v5e": 819.0, "v5p": 2765.0, "v6e": 1640.0}
PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
# OpenR1-Math-46k (docs/method.md §5): the prompts of the paper's demonstrations.
OPENR1_PROMPTS = 46_000
_GEN_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
}


# ----------------------------------------------------------------------------
# Topologies
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str  # v4 | v5e | v5p | v6e
  shape: tuple[int, ...]  # chips along each torus axis

  @classmethod
  def parse(cls, name: str) -> Topology:
    """'v5p:4x4x4' (also 'v5litepod:4x4') -> Topology."""
    gen, sep, dims = name.partition(":")
    gen = _GEN_ALIASES.get(gen.lower(), gen.lower())
    if not sep or gen not in HBM_GB or not re.fullmatch(r"\d+(x\d+)+", dims):
      raise ValueError(f"--topology: want GEN:AxB[xC] with GEN in {sorted(HBM_GB)}, got {name!r}")
    return cls(gen, tuple(int(d) for d in dims.split("x")))

  @property
  def name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU name: v4/v5p count TensorCores (2 a chip), v5e/v6e count chips."""
    if self.generation in ("v4", "v5p"):
      return f"{self.generation}-{2 * self.chips}"
    return f"{'v5litepod' if self.generation == 'v5e' else 'v6e'}-{self.chips}"

  @property
  def hbm_bytes(self) -> float:
    return HBM_GB[self.generation] * 1e9

  def devices(self):
    """One compile-only device a chip, as the runtime shows them (v4's two
    TensorCores form one megacore device, so memory is per chip)."""

    kw = {"chip_config_name": "megacore"} if self.generation == "v4" else {}
    return topologies.get_topology_desc(platform="tpu", topology_name=self.name, **kw).devices


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


# ----------------------------------------------------------------------------
# Building the programs (abstract inputs only)
# ----------------------------------------------------------------------------


def model_config(spec: factory.RunSpec, vocab_size: int = 512):
  """The ModelConfig the run would build; `vocab_size` sizes the tiny preset,
  whose vocabulary is the task tokenizer's."""
  return spec.model.config(vocab_size)


def _abstract(tree, shardings):

  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def _train_state(spec: factory.RunSpec, mcfg, tx):
  """(graphdef, abstract train state, frozen LoRA base or None) as the Trainer
  builds them (step.split_policy): with LoRA the state is the adapters and the
  base an argument."""

  def policy():
    model = model_lib.Transformer(mcfg, rngs=nnx.Rngs(0))
    return lora.attach(model, spec.lora) if spec.lora.enabled else model

  graphdef, params, base = step_lib.split_policy(nnx.eval_shape(policy))
  return graphdef, jax.eval_shape(lambda p: step_lib.init_train_state(p, tx), params), base


def _optimizer(spec: factory.RunSpec):
  """The optimizer of the whole run's length (its state's shapes are any stage's)."""
  return spec.optim.make(spec.steps, updates_per_step=spec.batch.minibatches)


def lower_train(spec: factory.RunSpec, mcfg, mesh):
  """step.train_step for one step's batch, jitted as the Trainer jits it."""
  stage = spec.biggest_stage()
  layout = stage.layout
  tx, _ = _optimizer(spec)
  step_cfg = stage.step
  graphdef, state, base = _train_state(spec, mcfg, tx)
  params = state["params"]
  frozen, frozen_sh = (), None
  if base is not None:
    frozen_sh = shd.state_shardings(base, mesh, mcfg.rules)
    frozen = (_abstract(base, frozen_sh),)
  state_sh = step_lib.state_shardings(state, mesh, mcfg.rules)

  b, p, r = spec.batch.prompts_per_step, max(spec.data.prompt_buckets), spec.data.max_response_len
  n = layout.n_rollouts
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  batch = jax.eval_shape(
    lambda *a: step_lib.prepare_batch(*a, layout=layout, cfg=stage.advantage),
    i32(b, p),
    i32(b, p),
    i32(b * n, r) if n else None,
    i32(b * n, r) if n else None,
    f32(b * n, r) if n else None,
    i32(b, r),
    i32(b, r),
    f32(b * layout.size),
  )
  batch_sh = step_lib.batch_shardings(batch, mesh, mcfg.rules)
  # A KL term keeps a frozen copy of the base params (the reference) beside the
  # state; with LoRA zero adapters on the same base (no copy).
  ref_sh = shd.state_shardings(params, mesh, mcfg.rules) if step_cfg.reference else None
  ref = None
  if step_cfg.reference:
    ref = _abstract(jax.eval_shape(step_lib.reference_params, params, base), ref_sh)
  args = (_abstract(state, state_sh), _abstract(batch, batch_sh), ref)
  if step_cfg.distill:  # docs/method.md §19.6: the teacher, an argument after the plan
    teacher_graphdef, teacher, teacher_sh = _teacher(spec, mcfg, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    pack_sh = replicated if step_cfg.pack_len else None
    plan = packed_plan(step_cfg, b * layout.size, p + r, replicated) if step_cfg.pack_len else None
    fn = step_lib.jit_train_step(
      graphdef, tx, step_cfg, state_sh, batch_sh, ref_sh, frozen_sh, pack_sh, teacher_sh,
      teacher_graphdef,
    )  # fmt: skip
    with jax.set_mesh(mesh):
      return fn.lower(*args, frozen[0] if frozen else None, plan, teacher)
  if not step_cfg.pack_len:
    fn = step_lib.jit_train_step(graphdef, tx, step_cfg, state_sh, batch_sh, ref_sh, frozen_sh)
    with jax.set_mesh(mesh):
      return fn.lower(*args, *frozen)
  # Packing (docs/method.md §18): the plan as Trainer.update passes it, replicated,
  # after the frozen base (None without LoRA), at its static worst-case slots.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  plan = packed_plan(step_cfg, b * layout.size, p + r, replicated)
  fn = step_lib.jit_train_step(
    graphdef, tx, step_cfg, state_sh, batch_sh, ref_sh, frozen_sh, replicated
  )
  with jax.set_mesh(mesh):
    return fn.lower(*args, frozen[0] if frozen else None, plan)


def packed_plan(step_cfg: step_lib.StepConfig, rows: int, row_len: int, sharding=None) -> dict:
  """Abstract int32 leaves of `packing.make_plan` for a step of `rows` rows of
  `row_len` tokens: [minibatches, microbatches, slots, pack_rows, pack_len],
  slots = `packing.slots_for` of a micro-batch's rows (every plan's, whatever
  the rows' lengths)."""
  mb, micro = step_cfg.minibatches, step_cfg.microbatches
  per = rows // (mb * micro)
  slots = packing.slots_for(per, row_len, step_cfg.pack_len, step_cfg.pack_rows)
  shape = (mb, micro, slots, step_cfg.pack_rows, step_cfg.pack_len)
  leaf = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
  return {k: leaf for k in packing.PLAN_KEYS}


def _teacher(spec: factory.RunSpec, mcfg, mesh):
  """(graphdef, abstract params, shardings) of the run's teacher (its config.json,
  in teacher.dtype), sharded by the student's rules as the Trainer shards it."""
  graphdef, params = nnx.split(model_lib.abstract_model(spec.teacher.config(spec.model)))
  sh = shd.state_shardings(params, mesh, mcfg.rules)
  return graphdef, _abstract(params, sh), sh


def _per_chip_bytes(tree) -> int:
  """Bytes of one chip's shards of a tree of sharded ShapeDtypeStructs."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )


def resident_bytes(spec: factory.RunSpec, mcfg, mesh) -> int:
  """Bytes a chip keeps through sampling besides the sampling programs' own
  arguments (the policy's parameters and the KV cache): the train state's
  optimizer moments (with LoRA the adapters too; the programs take the base),
  a KL reference and a distillation teacher (docs/method.md §19.6). Added to
  `sample`, `prefill` and `decode`."""
  tx, _ = _optimizer(spec)
  _, state, base = _train_state(spec, mcfg, tx)
  state = _abstract(state, step_lib.state_shardings(state, mesh, mcfg.rules))
  kept = _per_chip_bytes(state) - (0 if base is not None else _per_chip_bytes(state["params"]))
  if spec.reference:  # a copy of the params (LoRA: zeros)
    kept += _per_chip_bytes(state["params"])
  if spec.distills:
    kept += _per_chip_bytes(_teacher(spec, mcfg, mesh)[1])
  return kept


def _inference_config(mcfg):
  """The sampler's model config: remat only matters for a backward pass, and
  nnx.remat inside the decode loop fails to trace (flax TraceContextError), so
  the sampling programs are compiled without it."""
  return dataclasses.replace(mcfg, remat="none")


def _teacher_config(mcfg):
  """A frozen teacher's config: parameters stored in the compute dtype (no
  float32 master copy: nothing is trained)."""
  return dataclasses.replace(_inference_config(mcfg), param_dtype=mcfg.dtype)


def _sampler_inputs(mcfg, mesh, rows: int, length: int):

  graphdef, params = nnx.split(model_lib.abstract_model(mcfg))
  params = _abstract(params, shd.state_shardings(params, mesh, mcfg.rules))
  cache = jax.eval_shape(lambda: model_lib.init_cache(mcfg, rows, length))
  cache = _abstract(cache, sampler_lib.cache_shardings(mcfg, mesh, rows, length))
  return graphdef, params, cache


def _rows_sharding(mesh, mcfg, shape):

  return shd.batch_sharding(mesh, len(shape), mcfg.rules, shape)


def lower_sample(spec: factory.RunSpec, mcfg, mesh):
  """The sampler's jitted core: prefill + decode loop, all rollouts of one step."""

  mcfg = _inference_config(mcfg)
  layout = spec.biggest_stage().layout
  n = max(layout.n_rollouts, 1)
  rows = spec.batch.prompts_per_step * n
  p, r = max(spec.data.prompt_buckets), spec.data.max_response_len
  graphdef, params, cache = _sampler_inputs(mcfg, mesh, rows, p + r)
  scfg = spec.sampling(n=n, eos_ids=(1,), pad_id=0)  # no tokenizer here
  tok_sh = _rows_sharding(mesh, mcfg, (rows, p))
  tokens = jax.ShapeDtypeStruct((rows, p), jnp.int32, sharding=tok_sh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(
    key.shape, key.dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  )
  with jax.set_mesh(mesh):
    return sampler_lib.sample_jit.lower(graphdef, params, tokens, tokens, key, scfg, cache)


def _model_step(graphdef, cfg, decode, state, tokens_BT, positions_BT, mask_BT, cache):
  """One model call with the KV cache, the sampler's own (`sampler.prefill_step`
  or `sampler.decode_step`, with its fused decode weights)."""

  model = nnx.merge(graphdef, state)
  step = sampler_lib.decode_step if decode else sampler_lib.prefill_step
  return step(model, tokens_BT, positions_BT, mask_BT, cache, sampler_lib.weights_kw(model, cfg))


def lower_cache_call(spec: factory.RunSpec, mcfg, mesh, new_tokens: int | None):
  """`prefill` (new_tokens=None: the P prompt tokens) or `decode` (1 token)."""

  mcfg = _inference_config(mcfg)
  layout = spec.biggest_stage().layout
  rows = spec.batch.prompts_per_step * max(layout.n_rollouts, 1)
  p, r = max(spec.data.prompt_buckets), spec.data.max_response_len
  t = p if new_tokens is None else new_tokens
  graphdef, params, cache = _sampler_inputs(mcfg, mesh, rows, p + r)
  sh = _rows_sharding(mesh, mcfg, (rows, t))
  x = jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=sh)
  scfg = spec.sampling(n=max(layout.n_rollouts, 1), eos_ids=(1,), pad_id=0)
  fn = jax.jit(_model_step, static_argnums=(0, 1, 2), donate_argnums=7)
  with jax.set_mesh(mesh):
    return fn.lower(graphdef, scfg, new_tokens is not None, params, x, x, x, cache)


# ----------------------------------------------------------------------------
# Model FLOPs (the MFU convention: no remat recompute)
# ----------------------------------------------------------------------------


def _matmul_params(mcfg) -> int:
  """Parameters touched by a matmul per token (the embedding lookup is not;
  of a MoE layer, the router and the token's top-k experts)."""
  n = mcfg.num_params(active=True)
  return n if mcfg.tie_embeddings else n - mcfg.vocab_size * mcfg.embed_dim


def model_flops(spec: factory.RunSpec, mcfg) -> dict[str, float]:
  """Global FLOPs of one step of each program: 2 N a token forward (6 N with
  the backward pass) plus causal attention 4 L N H (context) a token."""
  layout = spec.biggest_stage().layout
  p, r = max(spec.data.prompt_buckets), spec.data.max_response_len
  t = p + r
  nm = _matmul_params(mcfg)
  attn = 4 * mcfg.num_layers * mcfg.num_heads * mcfg.head_dim  # x context length, per token
  train_rows = spec.batch.prompts_per_step * layout.size
  fwd = train_rows * (2 * nm * t + attn * t * (t + 1) / 2)
  rows = spec.batch.prompts_per_step * max(layout.n_rollouts, 1)
  prefill = rows * (2 * nm * p + attn * p * (p + 1) / 2)
  decode_one = rows * (2 * nm + attn * (p + r / 2))  # mean context over the response
  sample = prefill + r * decode_one
  return {
    "train": 3 * fwd,
    "sample": sample,
    "prefill": prefill,
    "decode": decode_one,
    "distill": sample,
    "distill_decode": decode_one,
  }


# ----------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------


def biggest_arrays(hlo_text: str, k: int = 8) -> list[dict[str, Any]]:
  """The largest per-chip arrays defined in a compiled (partitioned) HLO module.

  Not XLA's buffer assignment (no liveness), but it names what dominates.
  """
  pat = re.compile(r"%([\w.\-]+) = ([a-z0-9]+)\[([\d,]*)\][^ ]* ([\w\-]+)\(")
  seen, out = set(), []
  for m in pat.finditer(hlo_text):
    name, dtype, dims, op = m.groups()
    if dtype not in _DTYPE_BYTES or op in (
      "parameter",
      "get-tuple-element",
      "bitcast",
      "copy-done",
    ):
      continue
    shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    key = (dtype, shape)
    if key in seen:
      continue
    seen.add(key)
    out.append(
      {
        "bytes": math.prod(shape) * _DTYPE_BYTES[dtype],
        "array": f"{dtype}[{','.join(map(str, shape))}]",
        "op": op,
        "name": name,
      }
    )
  out.sort(key=lambda x: -x["bytes"])
  return out[:k]


def oom_summary(msg: str) -> dict[str, Any]:
  """The used/limit numbers and the top allocations of an XLA:TPU out-of-memory error."""
  out: dict[str, Any] = {"error": "out_of_memory"}
  m = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", msg)
  if m:  # XLA:TPU's K/M/G/T are powers of 1024
    unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, None: 1}
    out["used_bytes"] = float(m.group(1)) * unit[m.group(2)]
    out["limit_bytes"] = float(m.group(3)) * unit[m.group(4)]
  lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
  out["message"] = "\n".join(lines[:40])
  return out


COMPILER_OPTIONS: dict[str, Any] = {}  # e.g. {"xla_dump_to": DIR} (--dump_dir)


def compile_program(lowered, topo: Topology, model_flops_step: float) -> dict[str, Any]:
  """Compiles one lowered program; returns its per-chip memory and FLOPs."""
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options=dict(COMPILER_OPTIONS) or None)
  except Exception as e:  # XLA:TPU refuses programs that exceed HBM
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "memory" in msg.lower():
      res = oom_summary(msg)
      res.update(
        compile_s=round(time.perf_counter() - t0, 1), fits=False, model_flops_step=model_flops_step
      )
      return res
    raise
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  code = mem.generated_code_size_in_bytes
  total = args + out - alias + temp + code
  return {
    "argument_bytes": args,
    "output_bytes": out,
    "alias_bytes": alias,
    "temp_bytes": temp,
    "code_bytes": code,
    "total_bytes": total,
    "hbm_fraction": total / topo.hbm_bytes,
    "fits": total <= FIT_FRACTION * topo.hbm_bytes,
    "xla_flops_per_chip": float(cost.get("flops", 0.0)),
    "xla_bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0)),
    "model_flops_step": model_flops_step,
    "compile_s": round(compile_s, 1),
    "biggest": biggest_arrays(compiled.as_text()),
  }


def analyse(
  spec: factory.RunSpec,
  topo: Topology,
  programs=PROGRAMS,
  vocab_size: int = 512,
  log=print,
  num_layers: int | None = None,
) -> dict[str, Any]:
  """Compiles `programs` of the run `spec` for `topo`; a JSON-ready report.

  `num_layers` compiles a shallower copy of the model (see `extrapolate`).
  """

  mcfg = model_config(spec, vocab_size)
  if num_layers:
    mcfg = dataclasses.replace(mcfg, num_layers=num_layers)
  devices = topo.devices()
  mesh = shd.make_mesh(dict(spec.mesh), devices=devices)
  flops = model_flops(spec, mcfg)
  layout = spec.biggest_stage().layout
  b = spec.batch
  report = {
    "topology": topo.name,
    "accelerator_type": topo.accelerator_type,
    "chips": topo.chips,
    "device_kind": devices[0].device_kind,
    "hbm_gb": HBM_GB[topo.generation],
    "mesh": dict(mesh.shape),
    "model": spec.model.hf_path or spec.model.preset,
    "params": mcfg.num_params(),
    "active_params": mcfg.num_params(active=True),  # a token's (MoE: top-k experts)
    "param_dtype": mcfg.param_dtype,
    "dtype": mcfg.dtype,
    "remat": mcfg.remat,
    "attention": mcfg.attention,
    "prompts": b.prompts_per_step,
    "group": layout.size,
    "rows": b.prompts_per_step * layout.size,
    "length": max(spec.data.prompt_buckets) + spec.data.max_response_len,
    "minibatches": b.minibatches,
    "microbatches": b.microbatches,
    "logit_chunk": spec.biggest_stage().step.logit_chunk,
    "programs": {},
  }
  step_cfg = spec.biggest_stage().step
  if step_cfg.pack_len:  # docs/method.md §18: a slot's packed rows split over the data shards
    shards = shd.batch_shards(dict(mesh.shape), mcfg.rules)
    plan = packed_plan(step_cfg, report["rows"], report["length"])
    report["packing"] = {
      "pack_len": step_cfg.pack_len,
      "pack_rows": step_cfg.pack_rows,
      "slots": plan["row"].shape[2],
      "data_shards": shards,
      "replicated": step_cfg.pack_rows % shards != 0,
    }
  lowerers = {
    "train": lambda: lower_train(spec, mcfg, mesh),
    "sample": lambda: lower_sample(spec, mcfg, mesh),
    "prefill": lambda: lower_cache_call(spec, mcfg, mesh, None),
    "decode": lambda: lower_cache_call(spec, mcfg, mesh, 1),
    "distill": lambda: lower_sample(spec, _teacher_config(mcfg), mesh),
    "distill_decode": lambda: lower_cache_call(spec, _teacher_config(mcfg), mesh, 1),
  }
  resident = None
  for name in programs:
    t0 = time.perf_counter()
    lowered = lowerers[name]()
    lower_s = time.perf_counter() - t0
    res = compile_program(lowered, topo, flops[name])
    res["lower_s"] = round(lower_s, 1)
    if name == "distill_decode" and "error" not in res:
      res["roofline_step_s"] = roofline_s(res, topo)
    if name in PROGRAMS and name != "train" and "error" not in res:
      # sampling: the train state stays on the chip
      resident = resident_bytes(spec, mcfg, mesh) if resident is None else resident
      res["resident_bytes"] = resident
      res["total_bytes"] += resident
      res["hbm_fraction"] = res["total_bytes"] / topo.hbm_bytes
      res["fits"] = res["total_bytes"] <= FIT_FRACTION * topo.hbm_bytes
    report["programs"][name] = res
    log(
      f"  {topo.name} {name}: lowered in {lower_s:.0f}s, compiled in {res['compile_s']:.0f}s"
      + ("" if res.get("fits", True) else "  (does not fit)")
    )
  report["fits"] = all(p.get("fits", False) for p in report["programs"].values())
  report["num_layers"] = mcfg.num_layers
  if "roofline_step_s" in report["programs"].get("distill_decode", {}):
    report["distill_estimate"] = distill_estimate(spec, topo, report["programs"]["distill_decode"])
  return report


def roofline_s(program: dict[str, Any], topo: Topology) -> float:
  """A lower bound on one run of a (memory- or compute-bound) program: its
  bytes accessed at the chip's HBM bandwidth, or its FLOPs at peak."""
  return max(
    program["xla_bytes_accessed_per_chip"] / (HBM_GBPS[topo.generation] * 1e9),
    program["xla_flops_per_chip"] / (PEAK_TFLOPS[topo.generation] * 1e12),
  )


def distill_estimate(
  spec: factory.RunSpec, topo: Topology, decode: dict[str, Any], prompts: int = OPENR1_PROMPTS
) -> dict[str, Any]:
  """Distilling `prompts` prompts, k = the run's rollouts each, at the decode
  step's roofline: a sampler call (prompts_per_step prompts) decodes until its
  longest response ends, at most R steps; the bound takes R (reasoning traces
  have a long tail) and leaves out the prefill (P tokens once, under 1%)."""
  layout = spec.biggest_stage().layout
  per_call = spec.batch.prompts_per_step
  calls = math.ceil(prompts / per_call)
  r = spec.data.max_response_len
  call_s = r * decode["roofline_step_s"]
  return {
    "prompts": prompts,
    "k": max(layout.n_rollouts, 1),
    "prompts_per_call": per_call,
    "calls": calls,
    "decode_steps_per_call": r,
    "call_s": call_s,
    "hours": calls * call_s / 3600,
    "chip_hours": calls * call_s * topo.chips / 3600,
  }


_LINEAR = (
  "argument_bytes",
  "output_bytes",
  "alias_bytes",
  "temp_bytes",
  "code_bytes",
  "resident_bytes",
  "total_bytes",
  "xla_flops_per_chip",
  "xla_bytes_accessed_per_chip",
)


def extrapolate(
  spec: factory.RunSpec,
  topo: Topology,
  programs,
  layers: tuple[int, int],
  vocab_size: int = 512,
  log=print,
) -> dict[str, Any]:
  """Compiles the model at two depths and extrapolates every size linearly to the
  full depth (params, moments, saved activations and FLOPs grow one layer at a
  time; the embedding, logits and loss buffers do not). For when compiling the
  full model on this host is too slow; an estimate, marked as such."""
  full = model_config(spec, vocab_size)
  lo, hi = (analyse(spec, topo, programs, vocab_size, log, num_layers=n) for n in layers)
  out = dict(
    hi,
    num_layers=full.num_layers,
    params=full.num_params(),
    active_params=full.num_params(active=True),
    extrapolated_from_layers=list(layers),
    programs={},
  )
  flops = model_flops(spec, full)
  for name in programs:
    a, b = lo["programs"][name], hi["programs"][name]
    if "error" in a or "error" in b:
      out["programs"][name] = dict(b, extrapolated=True)
      continue
    keys = [k for k in _LINEAR if k in b]
    slope = {k: (b[k] - a[k]) / (layers[1] - layers[0]) for k in keys}
    p = {k: b[k] + slope[k] * (full.num_layers - layers[1]) for k in keys}
    p.update(
      hbm_fraction=p["total_bytes"] / topo.hbm_bytes,
      fits=p["total_bytes"] <= FIT_FRACTION * topo.hbm_bytes,
      model_flops_step=flops[name],
      compile_s=a["compile_s"] + b["compile_s"],
      biggest=b["biggest"],
      extrapolated=True,
    )
    if name == "distill_decode":
      p["roofline_step_s"] = roofline_s(p, topo)
      out["distill_estimate"] = distill_estimate(spec, topo, p)
    out["programs"][name] = p
  out["fits"] = all(p.get("fits", False) for p in out["programs"].values())
  return out


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------


def _gb(x) -> str:
  return "-" if x is None else f"{x / 1e9:.2f}"


def _packing_note(pk: dict[str, Any] | None) -> str:
  if not pk:
    return ""
  note = (
    f", packed: {pk['slots']} slots x {pk['pack_rows']} rows x {pk['pack_len']} tokens "
    f"a micro-batch"
  )
  if pk["replicated"]:
    note += (
      f" (WARNING: {pk['pack_rows']} packed rows do not split over {pk['data_shards']} "
      f"data shards: every shard runs the whole slot)"
    )
  return note


def format_table(report: dict[str, Any]) -> str:
  r = report
  lines = [
    f"{r['model']} ({r['params'] / 1e9:.2f}B params, {r['param_dtype']} weights, {r['dtype']} "
    f"compute, remat={r['remat']}) on {r['topology']} = {r['accelerator_type']} "
    f"({r['chips']} chips x {r['hbm_gb']:.0f} GB, {r['device_kind']}), mesh {r['mesh']}",
    f"step: {r['prompts']} prompts x {r['group']} = {r['rows']} rows x {r['length']} tokens, "
    f"{r['minibatches']} mini-batches x {r['microbatches']} micro-batches, "
    f"logit chunk {r['logit_chunk']}"
    + _packing_note(r.get("packing"))
    + (
      f"  [EXTRAPOLATED from {r['extrapolated_from_layers']} layers to {r['num_layers']}]"
      if r.get("extrapolated_from_layers")
      else ""
    ),
    "",
    "| program | args GB | out GB | alias GB | temp GB | + state GB** | total GB/chip | % HBM "
    "| fits | XLA GFLOP/chip* | model TFLOP/step |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, p in r["programs"].items():
    if "error" in p:
      used = p.get("used_bytes")
      pct = "-" if used is None else f"{100 * used / (r['hbm_gb'] * 1e9):.0f}"
      lines.append(
        f"| {name} | - | - | - | - | - | {_gb(used)} | {pct} | no (compiler OOM) | - | "
        f"{p['model_flops_step'] / 1e12:.1f} |"
      )
      continue
    lines.append(
      f"| {name} | {_gb(p['argument_bytes'])} | {_gb(p['output_bytes'])} | "
      f"{_gb(p['alias_bytes'])} | {_gb(p['temp_bytes'])} | {_gb(p.get('resident_bytes'))} | "
      f"{_gb(p['total_bytes'])} | "
      f"{100 * p['hbm_fraction']:.1f} | {'yes' if p['fits'] else 'NO'} | "
      f"{p['xla_flops_per_chip'] / 1e9:.1f} | {p['model_flops_step'] / 1e12:.1f} |"
    )
  lines.append(
    f"* XLA cost analysis counts each loop body once (scans, decode loop): a lower "
    f"bound. ** The train state the sampling programs leave on the chip (optimizer "
    f"moments, a KL reference), in their total. fits = total <= {int(FIT_FRACTION * 100)}% of HBM."
  )
  est = r.get("distill_estimate")
  if est:
    lines.append(
      f"distillation of {est['prompts']:,} prompts x {est['k']} samples, "
      f"{est['prompts_per_call']} prompts a call, up to {est['decode_steps_per_call']:,} decode "
      f"steps a call at the decode step's roofline "
      f"({1e3 * r['programs']['distill_decode']['roofline_step_s']:.2f} ms): "
      f"{est['calls']} calls x {est['call_s']:.0f} s = {est['hours']:.1f} h "
      f"({est['chip_hours']:,.0f} chip-hours), a lower bound"
    )
  for name, p in r["programs"].items():
    if "error" in p:
      lines += ["", f"{name}: XLA out of memory:", p["message"]]
    elif p.get("biggest"):
      lines.append(
        f"{name}: biggest per-chip arrays: "
        + ", ".join(f"{b['array']} {b['op']} {b['bytes'] / 1e9:.2f} GB" for b in p["biggest"][:5])
      )
  return "\n".join(lines)


def state_lower_bound(spec: factory.RunSpec, topo: Topology, vocab_size: int = 512) -> float:
  """Bytes a chip needs for params + Adam moments + gradients, perfectly sharded
  (with LoRA: the frozen base alone, a lower bound that ignores the adapters)."""

  mcfg = model_config(spec, vocab_size)
  pbytes = np.dtype(mcfg.jnp_param_dtype).itemsize
  copies = 1 if spec.lora.enabled else 4
  return copies * mcfg.num_params() * pbytes / topo.chips


def microbatches_for(spec: factory.RunSpec, topo: Topology, rows_per_shard: int) -> int:
  """`batch.microbatches` that puts `rows_per_shard` rows of the biggest stage's
  micro-batch on each data shard of `topo` (the axes the `batch` rule names in
  the config's mesh there: one chip a shard under pure FSDP); a ValueError
  when some stage's mini-batch does not split that way (factory.check_batch_split)."""
  mesh_shape = shd.make_mesh(dict(spec.mesh), devices=topo.devices()).shape
  data_par = shd.batch_shards(mesh_shape, spec.model.rules)
  b = spec.batch
  per_mini = b.prompts_per_step // b.minibatches
  rows_mini = per_mini * spec.biggest_stage().layout.size
  micro, rest = divmod(rows_mini, data_par * rows_per_shard)
  if micro == 0 or rest:
    raise ValueError(
      f"{rows_mini} rows a mini-batch do not split into micro-batches of "
      f"{rows_per_shard} row(s) on each of {data_par} data shards"
    )
  for stage in spec.stages:  # the same micro-batch count serves every stage
    factory.check_batch_split(
      b.prompts_per_step,
      b.minibatches,
      micro,
      stage.layout,
      data_par,
      shared_prefix=stage.step.group > 0,
      label=stage.name,
    )
  return micro


def with_rows_per_shard(spec: factory.RunSpec, topo: Topology, rows_per_shard: int):
  """`spec` with `batch.microbatches` set for `rows_per_shard` (0: unchanged)."""
  if not rows_per_shard:
    return spec
  return spec.with_microbatches(microbatches_for(spec, topo, rows_per_shard))


def _report(spec, topo, programs, vocab_size, layers, log=print, rows_per_shard: int = 0):
  spec = with_rows_per_shard(spec, topo, rows_per_shard)
  if layers:
    return extrapolate(spec, topo, programs, layers, vocab_size, log)
  return analyse(spec, topo, programs, vocab_size, log)


def find_smallest(
  spec: factory.RunSpec,
  generation: str,
  programs,
  vocab_size: int,
  log=print,
  layers: tuple[int, int] | None = None,
  rows_per_shard: int = 0,
) -> dict[str, Any]:
  """Tries slices of `generation` from small to large; the first that fits."""
  tried = []
  for shape in SLICES[generation]:
    topo = Topology.parse(f"{generation}:{shape}")
    lb = state_lower_bound(spec, topo, vocab_size)
    if lb > FIT_FRACTION * topo.hbm_bytes:
      log(f"  {topo.name}: skipped, params + Adam + grads alone need {lb / 1e9:.1f} GB a chip")
      tried.append({"topology": topo.name, "fits": False, "skipped": "state lower bound"})
      continue
    try:
      rep = _report(spec, topo, programs, vocab_size, layers, log, rows_per_shard)
    except (ValueError, RuntimeError) as e:  # a mesh that does not divide it; libtpu refusing it
      log(f"  {topo.name}: {e}")
      tried.append({"topology": topo.name, "fits": False, "error": str(e)})
      continue
    tried.append(rep)
    if rep["fits"]:
      return {
        "generation": generation,
        "smallest": topo.name,
        "accelerator_type": topo.accelerator_type,
        "tried": tried,
      }
  return {"generation": generation, "smallest": None, "tried": tried}


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _define_flags():
  config_flags.DEFINE_config_file(
    "config", console.resolve_config("configs/default.py"), "Training config.", lock_config=True
  )
  flags.DEFINE_multi_string("topology", [], "TPU topology, e.g. v5p:2x4x4 (repeatable).")
  flags.DEFINE_bool(
    "find_smallest", False, "Try growing v5p and v5e slices; report the smallest that fits."
  )
  flags.DEFINE_list("generations", ["v5p", "v5e"], "Generations --find_smallest tries.")
  flags.DEFINE_list(
    "programs",
    list(PROGRAMS),
    f"Programs to compile, of {ALL_PROGRAMS} (the distill ones: a frozen teacher's "
    "distillation sampler, k = rollout.n_rollouts samples of batch.prompts_per_step prompts).",
  )
  flags.DEFINE_integer("vocab_size", 512, "Vocabulary of the tiny preset (no tokenizer here).")
  flags.DEFINE_string("json_out", "", "Also write the JSON report to this file.")
  flags.DEFINE_string(
    "dump_dir",
    "",
    "Dump the compiled HLO and XLA's buffer assignment "
    "(*buffer-assignment.txt: every allocation, by size) here.",
  )
  flags.DEFINE_integer(
    "rows_per_shard",
    0,
    "Set batch.microbatches on each topology so that a micro-batch puts this many "
    "rows on each data shard (a chip under pure FSDP; 1: the least activation "
    "memory); 0 keeps the config's.",
  )
  flags.DEFINE_list(
    "extrapolate_layers",
    [],
    "Two depths, e.g. 2,4: compile those and extrapolate linearly to the full "
    "model (an estimate, for hosts where the full compile is too slow).",
  )


def main(argv) -> int:
  del argv
  f = flags.FLAGS
  if not libtpu_available():
    print("srft_jax.tools.aot needs libtpu: pip install -r requirements-tpu.txt", file=sys.stderr)
    return 2
  # The run as configured, checked against the slice's devices, not this host's.
  try:
    spec = factory.run_spec(f.config, validate=False)
  except factory.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  unknown = set(f.programs) - set(ALL_PROGRAMS)
  if unknown:
    print(f"--programs: unknown {sorted(unknown)}; known: {ALL_PROGRAMS}", file=sys.stderr)
    return 2
  if not f.topology and not f.find_smallest:
    print("give --topology=GEN:AxBxC (repeatable) and/or --find-smallest", file=sys.stderr)
    return 2
  if not f.programs:
    print(f"--programs: give at least one of {ALL_PROGRAMS}", file=sys.stderr)
    return 2
  try:
    topos = [Topology.parse(name) for name in f.topology]
  except ValueError as e:
    print(e, file=sys.stderr)
    return 2
  gens = [_GEN_ALIASES.get(g.lower(), g.lower()) for g in f.generations] if f.find_smallest else []
  bad = [g for g in gens if g not in SLICES]
  if bad:
    print(f"--generations: unknown {bad}; known: {sorted(SLICES)}", file=sys.stderr)
    return 2
  if f.rows_per_shard < 0:
    print("--rows_per_shard: want 0 (the config's micro-batches) or more", file=sys.stderr)
    return 2
  if f.dump_dir:
    COMPILER_OPTIONS["xla_dump_to"] = f.dump_dir
  layers = tuple(int(x) for x in f.extrapolate_layers) or None
  if layers is not None and (len(layers) != 2 or layers[0] >= layers[1]):
    print("--extrapolate_layers: want two increasing depths, e.g. 2,4", file=sys.stderr)
    return 2
  out: dict[str, Any] = {"reports": [], "smallest": []}
  for topo in topos:
    try:
      rep = _report(spec, topo, f.programs, f.vocab_size, layers, rows_per_shard=f.rows_per_shard)
    except (ValueError, RuntimeError) as e:  # e.g. a shape libtpu has no slice for
      print(f"--topology={topo.name}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
      return 2
    print(format_table(rep), flush=True)
    print(flush=True)
    out["reports"].append(rep)
  if f.find_smallest:
    for gen in gens:
      res = find_smallest(
        spec, gen, f.programs, f.vocab_size, layers=layers, rows_per_shard=f.rows_per_shard
      )
      for rep in res["tried"]:
        if "programs" in rep:
          print(format_table(rep), flush=True)
          print(flush=True)
      print(
        f"smallest {gen} slice that fits: "
        f"{res['smallest'] or 'none tried'}"
        + (f" ({res['accelerator_type']})" if res["smallest"] else ""),
        flush=True,
      )
      out["smallest"].append(res)
  text = json.dumps(out, default=str)
  if f.json_out:
    with open(f.json_out, "w") as fh:
      fh.write(text + "\n")
  print(text)
  return 0


def normalise_argv(argv: list[str]) -> list[str]:
  """Accept dashed spellings of this tool's flags (--find-smallest, --json-out)."""
  out = []
  for a in argv:
    head, eq, tail = a.partition("=")
    if head.startswith("--") and not head.startswith("--config"):
      head = "--" + head[2:].replace("-", "_")
    out.append(head + eq + tail)
  return out


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host itself never uses a TPU
  # Compile-only use touches no TPU: let several checks (and CI jobs) load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)

  _define_flags()
  app.run(main, argv=console.resolve_config_argv([sys.argv[0]] + normalise_argv(sys.argv[1:])))
