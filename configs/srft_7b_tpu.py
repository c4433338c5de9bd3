"""The paper's SRFT recipe (docs/method.md §5) for Qwen2.5-Math-7B on a Cloud TPU pod.

  bash launch/tpu_pod.sh --name=srft --accelerator-type=v5p-64 --zone=us-east5-a \
      --bucket=gs://BUCKET --config=configs/srft_7b_tpu.py \
      --model-gcs=gs://BUCKET/models/Qwen2.5-Math-7B --data-gcs=gs://BUCKET/data

Data: OpenR1-Math-46k prepared once with
  python -m srft_jax.data prepare openr1 --src openr1.parquet --data_dir gs://BUCKET/data
Fit check from any CPU host (needs requirements-tpu.txt):
  python -m srft_jax.tools.aot --config=configs/srft_7b_tpu.py --topology=v5p:2x4x4
Preset args (comma-separated): `fsdp_tensor` shards 4-way tensor x fsdp
instead of pure FSDP; `lora` trains rank-32 adapters on a bfloat16 base
(`...:lora` fits v5p-8); `qwen3_30b_a3b` runs the same recipe on Qwen3-30B-A3B
(its own RoPE and window, one row a chip on v5p-32: the smallest v5p slice
that fits). See docs/benchmarks.md.
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
    c.method = "srft"  # docs/method.md §4: the full method, paper switches
    c.steps = 500  # docs/method.md §5: 500 steps
    c.logit_chunk = 16_384  # logits for ~16k tokens at a time (f32 [B, C, V] chunk)
    c.shared_prefix = False  # the fit above was compiled with whole rows (prompts: 1/9 of tokens)
    c.max_nonfinite_streak = 5

    # Qwen2.5-Math-7B with RoPE theta 40k and a 16,384-token window (docs/method.md §5).
    # The real run starts from the HF checkpoint: --config.model.hf_path=/path/on/every/host
    # or gs://... (each host copies it once into ~/.cache/srft_jax, checked against the
    # bucket's hashes; launch/tpu_pod.sh --model-gcs passes it through).
    c.model.preset = "qwen2_5_math_7b_rope40k"
    c.model.hf_path = ""
    c.model.dtype = "bfloat16"  # compute dtype (norms, softmax, logits stay float32)
    # float32 master weights: an AdamW step at lr 1e-6 is below bf16's resolution
    # for weights of size ~1e-2 (ulp ~6e-5), so bf16 params would never move.
    c.model.param_dtype = "float32"
    c.model.remat = "full"  # recompute each layer in the backward pass
    # One lax.scan over the stacked layers: the 7B train step compiles in 0.12x the
    # loop's time and needs 0.26x its memory a chip (docs/benchmarks.md, scanned layers).
    c.model.scan_layers = True
    # Applied to an imported checkpoint too (model.hf_path): the paper raises
    # RoPE theta 10k -> 40k and uses a 16,384-token window (docs/method.md §5).
    c.model.rope_theta = 40_000.0
    c.model.max_seq_len = 16_384
    c.model.attention = "chunked"

    c.data.source = "tfds"  # prepared with `python -m srft_jax.data prepare openr1`
    c.data.data_dir = "gs://BUCKET/data"
    c.data.name = "openr1"
    c.data.tokenizer = ""  # the checkpoint's tokenizer.json (set to model.hf_path)
    c.data.template = "qwen_math"  # system prompt + "Question: {q} Answer:" via chat template
    c.data.prompt_buckets = (1024,)  # max prompt 1,024 tokens: one compiled shape
    c.data.max_response_len = 8192  # max response 8,192 tokens

    c.rollout.n_rollouts = 7  # 7 rollouts + 1 demonstration = 8 slots a prompt
    c.rollout.n_demos = 1
    c.rollout.temperature = 1.0
    c.rollout.require_think = True  # no </think> -> reward 0 (reference code)

    c.batch.prompts_per_step = 128  # 128 prompts x 8 slots = 1,024 sequences a step
    c.batch.minibatches = 2  # mini-batch 64 prompts: 2 optimizer updates a step
    # Sequence packing (docs/method.md §18): 128 rows a gradient chunk packed into up
    # to 4 slots of 32 rows x 9,216 tokens, one packed row a chip on v5p-64 (fsdp=32);
    # AOT on v5p-64: 13.95 GB a chip (14.7%), padded 13.63 GB (docs/benchmarks.md).
    # Padded (packing off), 16 chunks of 32 rows are one row a chip there.
    c.batch.packing = True
    c.batch.pack_rows = 32  # a multiple of the data shards, else the slot runs replicated
    c.batch.microbatches = 4

    c.optim.lr = 1e-6  # AdamW, constant, no warmup
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 1.0

    # FSDP over every chip of the slice (the batch is sharded over it too).
    c.mesh = config_dict.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.multihost = True  # one process per TPU VM worker

    c.warmup.steps = 0  # start from the checkpoint, no SFT warm-up
    c.checkpoint.every = 10  # steps are minutes long: bound the work lost to preemption
    c.checkpoint.keep = 2
    c.eval.before = False  # benchmark evaluation is a separate job (evaluate.py)
    c.eval.after = False
    c.log.progress = False  # no tqdm bar in pod logs
  args = [a for a in (arg or "").split(",") if a]
  known = ("fsdp_tensor", "lora", "qwen3_30b_a3b")
  unknown = sorted(set(args) - set(known))
  if unknown:
    raise ValueError(f"configs/srft_7b_tpu.py: unknown args {unknown}; known: {', '.join(known)}")
  if "fsdp_tensor" in args:
    c.mesh.tensor = 4  # divides 28 heads, 4 kv heads, mlp 18,944, vocab 152,064
  if "lora" in args:
    # LoRA (docs/method.md §13): rank-32 adapters on every projection, float32
    # with their Adam moments; the frozen base in bfloat16 (it takes no updates,
    # so the master-weight argument above does not apply to it).
    c.lora.rank = 32
    c.lora.alpha = 64.0
    c.model.param_dtype = "bfloat16"
    # Adapters start at zero update and move only through the rank-32 product:
    # they take a larger rate than full fine-tuning (1e-6); 1e-5 is a starting
    # point, not tuned at 7B.
    c.optim.lr = 1e-5
    # Rows a chip per gradient chunk: the state is ~4 GB a chip on v5p-8, so
    # the micro-batch holds 2 rows a chip there (64 chunks of 8 rows) instead
    # of the full fine-tuning row's 1 (128 chunks).
    c.batch.microbatches = 64
    c.batch.packing = False  # these micro-batches were fitted padded, not packed
  if "qwen3_30b_a3b" in args:
    # Qwen3-30B-A3B (docs/method.md §15): the paper's RoPE / window change is
    # Qwen2.5-Math's, so the checkpoint keeps its own (theta 1e6, 40,960 tokens).
    # Experts FSDP-sharded over `embed` (the default rules). 512 rows a mini-batch
    # in 32 micro-batches: one row a chip on v5p-32 (train step 64.4 GB a chip, 68%;
    # sampler with the train state 80.2 GB, 84%); with
    # `lora` too (set after it: its micro-batches are the 7B's on v5p-8).
    c.model.preset = "qwen3_30b_a3b"
    c.model.rope_theta = 0.0
    c.model.max_seq_len = 0
    c.batch.microbatches = 32
    c.batch.packing = False  # these micro-batches were fitted padded, not packed
  c.lock()
  return c
