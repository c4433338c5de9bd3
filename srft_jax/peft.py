"""LoRA adapters <-> HF PEFT adapter directories (`adapter_config.json` +
`adapter_model.safetensors`), the layout `peft.PeftModel.from_pretrained`
loads onto the transformers base.

PEFT's lora_A is [R, in] and lora_B [out, R] (HF linear layout); ours are
A [I..., R] and B [R, O...] (srft_jax/lora.py) with HF's flattening of
heads x head_dim.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors.numpy import save_file as save_numpy_file

from srft_jax import hf
from srft_jax import lora as lora_lib
from srft_jax import model as model_lib
from srft_jax import paths

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _peft_keys(spec: lora_lib.AdapterSpec) -> tuple[str, str]:
  m = _PEFT_PREFIX + spec.hf_module
  return f"{m}.lora_A.weight", f"{m}.lora_B.weight"


def save_peft_adapter(model: model_lib.Transformer, path: str, *, base_model: str = "") -> str:
  """Writes the model's adapters as a PEFT LoRA adapter directory
  (`adapter_config.json` + `adapter_model.safetensors`, float32) that
  `peft.PeftModel.from_pretrained(base, path)` loads onto the transformers
  base; returns the weights file. Every process calls it; process 0 writes."""
  lcfg = lora_lib.config_of(model)
  if lcfg is None:
    raise ValueError("save_peft_adapter: the model has no LoRA adapters")
  values = lora_lib.adapter_values(model)
  tensors = {}
  for spec in lora_lib.adapter_specs(model, lcfg):
    a, b = (hf.to_host(x).astype(np.float32) for x in values[(spec.layer, spec.target)])
    ka, kb = _peft_keys(spec)
    tensors[ka] = np.ascontiguousarray(a.reshape(-1, lcfg.rank).T)
    tensors[kb] = np.ascontiguousarray(b.reshape(lcfg.rank, -1).T)
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model or None,
    "r": lcfg.rank,
    "lora_alpha": lcfg.alpha,
    "lora_dropout": lcfg.dropout,
    "target_modules": sorted({lora_lib.HF_MODULES[t].split(".")[-1] for t in lcfg.targets}),
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "inference_mode": True,
    "modules_to_save": None,
  }
  file = os.path.join(path, PEFT_WEIGHTS)
  if jax.process_index() == 0:
    # Remote: written on local disk, uploaded with adapter_config.json last.
    with (
      paths.staged_dir(path, last=(PEFT_CONFIG,))
      if paths.is_remote(path)
      else contextlib.nullcontext(path)
    ) as out:
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, PEFT_CONFIG), "w") as fh:
        json.dump(config, fh, indent=2)
      save_numpy_file(tensors, os.path.join(out, PEFT_WEIGHTS), metadata={"format": "pt"})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("srft_save_peft_adapter")
  return file


def read_peft_config(path: str) -> lora_lib.LoRAConfig:
  """The LoRAConfig of a PEFT adapter directory; what this model cannot
  represent (DoRA, rsLoRA, per-module ranks, biases, extra trained modules)
  is an error."""
  file = os.path.join(path, PEFT_CONFIG)
  if not paths.exists(file):
    raise hf.CheckpointError(f"{path}: no {PEFT_CONFIG}")
  pc = paths.read_json(file)
  unsupported = {
    "peft_type": pc.get("peft_type", "LORA") != "LORA",
    "use_dora": bool(pc.get("use_dora")),
    "use_rslora": bool(pc.get("use_rslora")),
    "fan_in_fan_out": bool(pc.get("fan_in_fan_out")),
    "bias": pc.get("bias", "none") != "none",
    "rank_pattern": bool(pc.get("rank_pattern")),
    "alpha_pattern": bool(pc.get("alpha_pattern")),
    "modules_to_save": bool(pc.get("modules_to_save")),
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise hf.CheckpointError(f"{path}: unsupported PEFT adapter settings {bad}")
  names = pc.get("target_modules") or []
  if isinstance(names, str):  # a regex: the targets are read from the tensors
    names = list(lora_lib.HF_MODULES.values())
  short = {v.split(".")[-1]: k for k, v in lora_lib.HF_MODULES.items()}
  targets = tuple(t for t in lora_lib.TARGETS if lora_lib.HF_MODULES[t].split(".")[-1] in names)
  unknown = sorted(set(n.split(".")[-1] for n in names) - set(short))
  if unknown or not targets:
    raise hf.CheckpointError(f"{path}: target_modules {names}: known are {sorted(short)}")
  return lora_lib.LoRAConfig(
    rank=int(pc["r"]),
    alpha=float(pc["lora_alpha"]),
    targets=targets,
    dropout=float(pc.get("lora_dropout") or 0.0),
    init_seed=0,
  )


def load_peft_adapter(
  path: str, model: model_lib.Transformer, *, mesh: jax.sharding.Mesh | None = None
) -> model_lib.Transformer:
  """Attaches the PEFT LoRA adapter in `path` to `model` (the base it was
  trained on, without adapters) and returns it: training can continue from it.
  A missing, unexpected or misshapen tensor is an `hf.CheckpointError`."""
  lcfg = read_peft_config(path)
  infos = _read_weights_header(os.path.join(paths.local_copy(path), PEFT_WEIGHTS))
  reader = hf.SafetensorsReader(infos)
  specs = lora_lib.adapter_specs(model, lcfg)
  values, used = {}, set()
  try:
    for spec in specs:
      ka, kb = _peft_keys(spec)
      r = lcfg.rank
      want = {ka: (r, math.prod(spec.a_shape[:-1])), kb: (math.prod(spec.b_shape[1:]), r)}
      for k, shape in want.items():
        if k not in infos:
          raise hf.CheckpointError(f"{path}: adapter tensor {k!r} is missing")
        if tuple(infos[k].shape) != shape:
          raise hf.CheckpointError(f"{path}: {k} has shape {infos[k].shape}, expected {shape}")
      a = reader(ka, (slice(None),) * 2).astype(np.float32).T.reshape(spec.a_shape)
      b = reader(kb, (slice(None),) * 2).astype(np.float32).T.reshape(spec.b_shape)
      values[(spec.layer, spec.target)] = (a, b)
      used |= {ka, kb}
  finally:
    reader.close()
  extra = sorted(set(infos) - used)
  if extra:
    raise hf.CheckpointError(f"{path}: adapter tensors this model has no place for: {extra[:4]}")
  return lora_lib.attach(model, lcfg, mesh, values)


def _read_weights_header(file: str) -> dict[str, hf.TensorInfo]:
  if not os.path.exists(file):
    raise hf.CheckpointError(f"no {file}")
  return hf.read_header(file)
