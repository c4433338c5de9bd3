"""Where a jitted program spends device time: the top ops of a profiler trace.

`top_ops(fn, compiled_text=...)` runs `fn` under `jax.profiler`, reads the
trace back with `jax.profiler.ProfileData` (no TensorBoard needed), sums the
device time of each op (GPU kernels, or CPU thunks) and returns the largest,
each with the JAX source op it came from when the optimised HLO text is given.
The benchmarks use it behind `--profile N` so a GPU run explains its own
numbers in its JSON line.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

import jax

_HLO_LINE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name="([^"]*)"')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> JAX op_name metadata, from optimised HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def _device_events(profile):
  """(name, hlo_op, duration_ns) of every device-side op in the trace."""
  for plane in profile.planes:
    if plane.name.startswith("/device:") and "CUSTOM" not in plane.name:
      lines = list(plane.lines)
      ops = [l for l in lines if l.name == "XLA Ops"]
      use = ops or [l for l in lines if l.name.startswith("Stream")]
      for line in use:
        for ev in line.events:
          stats = dict(ev.stats)
          yield ev.name, str(stats.get("hlo_op", ev.name)), ev.duration_ns
    elif plane.name == "/host:CPU":  # CPU backend: thunks on the PjRt client threads
      for line in plane.lines:
        if "XLAPjRtCpuClient" in line.name or "XLAEigen" in line.name:
          for ev in line.events:
            stats = dict(ev.stats)
            if "hlo_op" in stats:
              yield ev.name, str(stats["hlo_op"]), ev.duration_ns


def kernel_class(kernel: str) -> str:
  """A coarse class of a device kernel name: matmul, attention, copy or fusion."""
  k = kernel.lower()
  if any(w in k for w in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "ynn")):
    return "matmul"
  if any(w in k for w in ("fmha", "flash", "cudnn", "sdpa", "attention")):
    return "attention"
  if "memcpy" in k or "memset" in k or k.startswith("copy"):
    return "copy"
  if k.startswith(("loop_", "input_", "wrapped_", "fusion", "triton")):
    return "fusion:" + re.sub(r"[._]\d+$", "", k.split("_")[1]) if "_" in k else "fusion"
  return "other"


def top_ops(fn, *, n: int = 20, runs: int = 1, compiled_text: str | None = None) -> dict:
  """Profiles `runs` calls of `fn` (already warmed up); returns the `n` costliest ops.

  Result: {"wall_ms": per run, "device_ms": summed op time per run,
  "ops": [{"op", "kernel", "ms", "count", "share", "source"}...]} with times
  per run and `share` of the summed device time.
  """
  from jax.profiler import ProfileData

  names = hlo_op_names(compiled_text) if compiled_text else {}
  logdir = tempfile.mkdtemp(prefix="srft_profile_")
  jax.profiler.start_trace(logdir)
  t0 = time.perf_counter()
  for _ in range(runs):
    jax.block_until_ready(fn())
  wall = (time.perf_counter() - t0) / runs
  jax.profiler.stop_trace()
  paths = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
  if not paths:
    return {"error": f"no trace written under {logdir}"}
  total = collections.Counter()
  count = collections.Counter()
  classes = collections.Counter()
  kernel = {}
  for name, op, dur in _device_events(ProfileData.from_file(paths[0])):
    if op.startswith("command_buffer"):  # a CUDA graph: its kernels keep their own names
      op = re.sub(r"_(\d+)$", r".\1", name)
    total[op] += dur
    count[op] += 1
    classes[kernel_class(name)] += dur
    kernel.setdefault(op, name)
  busy = sum(total.values())
  ops = [
    {
      "op": op,
      "kernel": kernel[op][:80],
      "ms": round(ns / 1e6 / runs, 4),
      "count": count[op] // runs,
      "share": round(ns / busy, 4) if busy else None,
      "source": names.get(op, "")[-120:],
    }
    for op, ns in total.most_common(n)
  ]
  return {
    "wall_ms": round(wall * 1e3, 3),
    "device_ms": round(busy / 1e6 / runs, 3),
    "classes_ms": {c: round(ns / 1e6 / runs, 3) for c, ns in classes.most_common()},
    "ops": ops,
  }
