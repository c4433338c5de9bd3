"""`python -m srft_jax.hf_cli info PATH` (the `srft-hf` entry point): an HF
checkpoint's architecture, parameter count and dtype from config.json and the
safetensors headers only (no weights read)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

from srft_jax import hf
from srft_jax import paths


def checkpoint_info(path: str) -> dict[str, Any]:
  """Architecture, parameter count and dtypes from config.json and headers only."""
  hf_config = hf.read_config(path)
  cfg = hf.config_from_hf(hf_config)
  infos = hf.read_tensor_infos(paths.local_copy(path))
  used = {n: i for n, i in infos.items() if not hf.ignorable(n, cfg)}
  dtypes: dict[str, int] = {}
  for info in used.values():
    dtypes[info.dtype] = dtypes.get(info.dtype, 0) + math.prod(info.shape)
  return {
    "architecture": hf.SUPPORTED[cfg.model_type],
    "model_type": cfg.model_type,
    "num_params": sum(math.prod(i.shape) for i in used.values()),
    "config_num_params": cfg.num_params(),
    "num_tensors": len(used),
    "num_files": len({i.file for i in infos.values()}),
    "dtype": hf.checkpoint_dtype(hf_config),
    "tensor_dtypes": dtypes,
    "config": cfg,
  }


def _human(n: int) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(n)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m srft_jax.hf_cli", description="Inspect Hugging Face checkpoints."
  )
  sub = parser.add_subparsers(dest="command", required=True)
  info_p = sub.add_parser("info", help="architecture, parameter count, dtype (headers only)")
  info_p.add_argument("path")
  args = parser.parse_args(argv)
  try:
    info = checkpoint_info(args.path)
  except hf.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  cfg = info["config"]
  tensor_dtypes = ", ".join(f"{k} ({_human(v)})" for k, v in sorted(info["tensor_dtypes"].items()))
  print(f"architecture: {info['architecture']} (model_type {info['model_type']})")
  print(f"parameters: {info['num_params']} ({_human(info['num_params'])})")
  print(f"dtype: {info['dtype']}; tensors: {tensor_dtypes}")
  print(
    f"shape: layers={cfg.num_layers} embed={cfg.embed_dim} mlp={cfg.mlp_dim} "
    f"heads={cfg.num_heads} kv_heads={cfg.num_kv_heads} head_dim={cfg.head_dim} "
    f"vocab={cfg.vocab_size} tied={cfg.tie_embeddings}"
    + (
      f" experts={cfg.num_experts} top_k={cfg.num_experts_per_tok} "
      f"moe_mlp={cfg.moe_mlp_dim} moe_layers={cfg.num_moe_layers}"
      if cfg.num_experts
      else ""
    )
  )
  print(f"files: {info['num_files']}, tensors: {info['num_tensors']}")
  if info["num_params"] != info["config_num_params"]:
    print(f"warning: config.json implies {info['config_num_params']} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
