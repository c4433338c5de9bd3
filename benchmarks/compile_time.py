"""Compile time and per-chip memory, scanned layers against the layer loop, side by side.

For each program of `--programs` (the AOT tool's: train, sample, ...), the run
of `--config` is compiled for `--topology` twice in this one process, with
`model.scan_layers` off (the loop: every layer compiled on its own) and on
(one layer a run of layers, docs/method.md §17), through
`srft_jax.tools.aot.analyse` (compile only, libtpu; nothing runs on a TPU).

Prints one JSON line:
  {"programs": {name: {"loop": {compile_s, lower_s, total_gb}, "scan": {...},
   "compile_ratio", "memory_ratio"}}, ...}
`compile_ratio` = scan / loop compile seconds (target <= 0.15); `memory_ratio`
= scan / loop per-chip total (target <= 1.05).

  python benchmarks/compile_time.py --config=configs/srft_7b_tpu.py \\
      --topology=v5p:2x4x4 --programs=train,sample [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "srft_7b_tpu.py"))
  p.add_argument("--topology", default="v5p:2x4x4")
  p.add_argument("--programs", default="train,sample")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  return p.parse_args(argv)


def _value(v: str):
  try:
    return json.loads(v)
  except json.JSONDecodeError:
    return v


def main(argv=None) -> int:
  a = _args(argv)
  from srft_jax import factory
  from srft_jax.tools import aot

  if not aot.libtpu_available():
    print("needs libtpu: pip install -r requirements-tpu.txt", file=sys.stderr)
    return 2
  overrides = dict((k, _value(v)) for k, v in (kv.split("=", 1) for kv in a.set))
  topo = aot.Topology.parse(a.topology)
  programs = [p for p in a.programs.split(",") if p]
  out = {"config": os.path.relpath(a.config, ROOT), "topology": topo.name, "programs": {}}
  for name in programs:
    row = {}
    for mode, scan in (("loop", False), ("scan", True)):
      config = factory.load_config(a.config)
      spec = factory.run_spec(config, {**overrides, "model.scan_layers": scan}, validate=False)
      rep = aot.analyse(spec, topo, (name,), log=lambda m: print(m, file=sys.stderr))
      p = rep["programs"][name]
      row[mode] = {
        "compile_s": p["compile_s"],
        "lower_s": p["lower_s"],
        "total_gb": round(p["total_bytes"] / 1e9, 2) if "total_bytes" in p else None,
        "fits": p.get("fits"),
      }
      out.setdefault("model", rep["model"])
      out.setdefault("num_layers", rep["num_layers"])
    loop, scan = row["loop"], row["scan"]
    row["compile_ratio"] = round(scan["compile_s"] / loop["compile_s"], 3)
    if loop["total_gb"] and scan["total_gb"]:
      row["memory_ratio"] = round(scan["total_gb"] / loop["total_gb"], 3)
    out["programs"][name] = row
    print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
  import jax

  out["jax"] = jax.__version__
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
