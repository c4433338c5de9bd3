"""SRFT on one GPU from a Qwen2.5-1.5B HF checkpoint (a scaled-down paper recipe).

  bash launch/gpu.sh --config=configs/qwen2p5_1p5b_gpu.py --workdir=runs/q15 \
      --config.model.hf_path=/models/Qwen2.5-1.5B --config.data.data_dir=/data/tfds

The checkpoint directory holds config.json, model.safetensors and tokenizer.json.
Same loss, group (7 rollouts + 1 demonstration) and optimizer as the paper; the
batch and lengths are cut so one 80 GB GPU holds the step and the KV cache.
"""

import os

from ml_collections import config_dict

from srft_jax import factory


def _default_config():
  """configs/default.py's get_config (configs/ is a folder of files, not a package)."""
  here = os.path.dirname(os.path.abspath(__file__))
  return factory.load_config_module(os.path.join(here, "default.py")).get_config()


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = _default_config()
  with c.unlocked():
    c.method = "srft"
    c.steps = 500
    c.logit_chunk = 8192
    c.shared_prefix = False  # cuDNN flash attention needs whole packed rows

    c.model.preset = "qwen2_5_1_5b"  # shapes for AOT checks; the run loads model.hf_path
    c.model.hf_path = "/models/Qwen2.5-1.5B"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"  # float32 master weights (lr 1e-6 updates)
    c.model.remat = "full"
    # One lax.scan over the stacked layers: the 7B train step compiles in 0.12x the
    # loop's time and needs 0.26x its memory a chip (docs/benchmarks.md, scanned layers).
    c.model.scan_layers = True
    c.model.attention = "cudnn"  # cuDNN flash attention (1.7x the step of "chunked")
    c.model.decode_attention = "pallas"  # the sampler's Triton decode-attention kernel

    c.data.source = "tfds"
    c.data.data_dir = "data/tfds"  # python -m srft_jax.data prepare openr1 --data_dir ...
    c.data.name = "openr1"
    c.data.tokenizer = "/models/Qwen2.5-1.5B"
    c.data.template = "qwen_math"
    c.data.prompt_buckets = (512, 1024)
    c.data.max_response_len = 4096

    c.rollout.n_rollouts = 7
    c.rollout.n_demos = 1
    c.rollout.require_think = True

    c.batch.prompts_per_step = 16  # 128 sequences a step
    c.batch.minibatches = 2
    c.batch.microbatches = 8  # 8 sequences per gradient chunk
    # Sequence packing (docs/method.md §18) runs cuDNN's packed layout here
    # (attention="cudnn", Hopper or newer); it is off until that layout has been
    # measured on a GPU (benchmarks/gpu_check.sh, PARTS="packing packing_tests").
    c.batch.packing = False

    c.optim.lr = 1e-6
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0

    c.mesh = config_dict.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.multihost = False

    c.warmup.steps = 0
    c.checkpoint.every = 25
    c.eval.before = False
    c.eval.after = False
  if arg:
    raise ValueError(f"configs/qwen2p5_1p5b_gpu.py: takes no arg, got {arg!r}")
  c.lock()
  return c
