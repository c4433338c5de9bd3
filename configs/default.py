"""Default: SRFT on the built-in reasoning task with the tiny model, on a laptop CPU.

`python -m srft_jax.main --config=configs/default.py --workdir=runs/default`
First warms a tiny random model up with a short SFT run (so it starts with
some, not much, accuracy), then trains SRFT from it and reports ID / OOD
accuracy before and after. Preset args select other methods on the same
data: `--config=configs/default.py:grpo` (any name of docs/method.md §4, plus
`sft_then_grpo` and `rl_then_sft`). The on-policy distillation presets
(`opd`, `srft_opd`, docs/method.md §19) need a teacher:
`--config=configs/default.py:opd --config.teacher.hf_path=TEACHER_WORKDIR`.
"""

import dataclasses

from ml_collections import config_dict

from srft_jax import objectives as obj

# Two-stage schedules of single-stage loss presets (docs/method.md §4, §7 claim 3).
TWO_STAGE = {
  "sft_then_grpo": "sft:{half},grpo",
  "rl_then_sft": "grpo:{half},sft",
}


def optional_fields(cls) -> config_dict.ConfigDict:
  """Every field of a frozen config dataclass as an optional override (None = the preset's value)."""
  fields = {}
  for f in dataclasses.fields(cls):
    kind = {"float": float, "int": int, "bool": bool, "str": str}.get(
      str(f.type).replace("Optional[", "").rstrip("]").removesuffix(" | None"), None
    )
    fields[f.name] = config_dict.placeholder(kind) if kind else None
  return config_dict.ConfigDict(fields)


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 0  # model init, data order, sampling keys
  c.steps = 60  # optimizer steps of the main run (all stages)
  c.method = "srft"  # loss preset (objectives.PRESETS or DISTILL_PRESETS) for a single stage
  c.stages = ""  # two-stage schedule, e.g. "sft:60,grpo" (overrides method)
  c.loss = optional_fields(obj.LossConfig)  # per-field overrides of the preset (single stage only)
  # Group advantages (docs/method.md §1.3): normalize_std, eps; None = the preset's.
  c.advantage = optional_fields(obj.AdvantageConfig)
  c.logit_chunk = 2048  # rows of logits computed at a time in the loss
  c.shared_prefix = True  # the update runs each prompt once per group, not once per row
  c.max_nonfinite_streak = 5  # stop (with a checkpoint) after this many skipped updates

  c.model = config_dict.ConfigDict()
  # Presets also: tiny_qwen3, tiny_qwen3_moe (shaped by the fields below), qwen3_0_6b,
  # qwen3_1_7b, qwen3_8b, qwen3_30b_a3b, e.g. --config.model.preset=tiny_qwen3_moe.
  c.model.preset = "tiny"  # model.PRESETS name (random init) ...
  c.model.hf_path = ""  # ... or an HF checkpoint directory to start from
  c.model.dtype = "float32"  # compute dtype
  c.model.param_dtype = "float32"
  c.model.remat = "none"  # "none" | "full" | "dots"
  c.model.scan_layers = False  # stack the layers and lax.scan them (compile time flat in depth)
  c.model.rope_theta = 0.0  # >0 overrides the checkpoint's RoPE theta (paper: 40000)
  c.model.max_seq_len = 0  # >0 overrides the context window (paper: 16384)
  c.model.attention = ""  # "" keeps the preset's; "xla" | "chunked" | "cudnn"
  c.model.decode_attention = ""  # "" keeps the preset's; "xla" | "pallas" (a GPU kernel)
  c.model.embed_dim = 128  # tiny-model shape (ignored for hf_path / other presets)
  c.model.num_layers = 4
  c.model.mlp_dim = 512

  # LoRA (srft_jax/lora.py): train low-rank adapters on the projections, the base
  # frozen (base may be bfloat16, adapters and their Adam state float32).
  c.lora = config_dict.ConfigDict()
  c.lora.rank = 0  # adapter rank R; 0 = off (full fine-tuning)
  c.lora.alpha = 16.0  # the update is (alpha / R) A B
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # projections adapted
  c.lora.dropout = 0.0  # PEFT's lora_dropout: the adapters' input, in the loss forward only
  c.lora.init_seed = 0  # A's random init (B starts at zero: the run starts at the base)
  c.lora.adapter_path = ""  # a PEFT adapter directory to continue from ("" = fresh adapters)

  # A frozen teacher for on-policy distillation (docs/method.md §19): it scores every
  # token of the student's rollouts in the update's no-gradient pre-pass. Needed by
  # the distill presets (opd, srft_opd) and any loss.distill_coef > 0; refused otherwise.
  c.teacher = config_dict.ConfigDict()
  c.teacher.hf_path = ""  # HF checkpoint directory or training workdir (its export/hf); gs:// ok
  c.teacher.tokenizer = ""  # its tokenizer where the directory holds none ("" = found beside it)
  c.teacher.dtype = (
    "float32"  # compute and parameter dtype of the teacher (bfloat16 for large ones)
  )
  c.teacher.temperature = 0.0  # the teacher's softmax temperature; 0 = the student's (rollout's)

  c.data = config_dict.ConfigDict()
  c.data.source = "task"  # "task" (built-in) | "tfds" (prepared with srft_jax.data)
  c.data.data_dir = ""  # TFDS data_dir for source="tfds"
  c.data.name = "openr1"  # prepared dataset name for source="tfds"
  c.data.tokenizer = ""  # tokenizer path ("" = the task's sentencepiece model)
  c.data.template = "plain"  # chat template: "plain" | "qwen_math" | "chatml_plain"
  c.data.prompt_buckets = (48,)  # padded prompt lengths P
  c.data.max_response_len = 72  # R: demonstration width and max new tokens
  c.data.task_train_size = 20000  # built-in task: training problems
  c.data.task_seed = 0
  # Built-in task demonstrations: "terse" (the style the base is warmed up on) or
  # "teacher" (as correct, but longer and in another order: SFT on it is off-policy).
  c.data.demo_style = "terse"
  c.data.task_levels = ()  # difficulty levels (steps) of the training problems; () = all

  c.rollout = config_dict.ConfigDict()
  c.rollout.n_rollouts = 7  # on-policy samples per prompt (docs/method.md §1: 7 + 1 demo)
  c.rollout.n_demos = 1
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  c.rollout.require_think = False  # reward 0 without </think> (docs/method.md §1.2 switch)
  # Sampler-trainer mismatch (docs/method.md §2.7): recompute old_logp with the
  # trainer's forward before any update (None: on exactly when loss.is_correction is).
  c.rollout.recompute_old_logp = config_dict.placeholder(bool)
  # DAPO's trainer switches (docs/method.md §2.8), off by default:
  c.rollout.overlong_buffer = 0  # L_c tokens: soft length penalty before the max length (0 = off)
  c.rollout.overlong_penalty = 1.0  # scale of that penalty (added to the reward)
  c.rollout.overlong_filter = False  # truncated rollouts get zero loss weight
  c.rollout.dynamic_sampling = False  # drop groups whose rollouts all score the same ...
  c.rollout.oversample = 1  # ... drawing this many times the step's prompts to fill it

  c.batch = config_dict.ConfigDict()
  c.batch.prompts_per_step = 8  # global prompts per step (paper: 128)
  c.batch.minibatches = 2  # optimizer updates per step (paper: 128 / 64 = 2)
  c.batch.microbatches = 1  # gradient accumulation chunks per update
  # Sequence packing in the update (docs/method.md §18): each micro-batch's rows
  # (prompt + response) packed first-fit-decreasing into rows of pack_len tokens,
  # pack_rows of them a forward, spilling into further forwards that run only
  # when used. Same loss and gradients; less compute on padding.
  c.batch.packing = False
  c.batch.pack_len = 0  # tokens per packed row; 0 = max(data.prompt_buckets) + max_response_len
  c.batch.pack_rows = 0  # packed rows per forward; 0 = a quarter of a micro-batch's rows

  c.optim = config_dict.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.stage_lrs = ()  # one peak lr per stage of a schedule (config.stages); () = optim.lr
  c.optim.schedule = "constant"  # "constant" | "linear" | "cosine"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0

  c.mesh = config_dict.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
  # Overrides of the logical-axis rules (sharding.DEFAULT_RULES), comma-separated
  # logical=axis[+axis]: e.g. "expert=fsdp" puts a MoE layer's experts over fsdp
  # (the default puts them over the `expert` mesh axis: mesh.expert > 1).
  c.sharding_rules = ""
  c.multihost = False  # call jax.distributed.initialize() first
  c.distributed = config_dict.ConfigDict()
  c.distributed.coordinator = ""  # "host:port" for a manual cluster ("" = from the environment)
  c.distributed.num_processes = 1
  c.distributed.process_id = 0

  c.warmup = config_dict.ConfigDict()
  c.warmup.steps = 720  # SFT steps that make the base model (0 = none)
  c.warmup.lr = 1.5e-3
  c.warmup.schedule = "constant"  # "constant" | "linear" | "cosine" (decays to 0 at the end)
  c.warmup.warmup_steps = 0  # linear lr ramp at the start of the warm-up
  c.warmup.prompts_per_step = 16  # many small steps learn the task far faster than few big ones
  c.warmup.dir = ""  # base-model cache ("" = WORKDIR/base); shared by studies
  # Difficulty levels the warm-up trains on; () = the run's data.task_levels. Easier
  # levels than the run's make a base that is weak where the training mix is hard.
  c.warmup.task_levels = ()
  # The warm-up's training data: "" = the run's data.source; "task" = the built-in
  # task (its terse demonstrations) when the run trains on a prepared dataset.
  c.warmup.source = ""

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every = 50
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True
  c.checkpoint.export_hf = True  # write the final policy as an HF checkpoint
  # Persistent compilation cache (srft_jax/compile_cache.py): "auto" =
  # WORKDIR/compile_cache (a gs:// workdir's on the bucket), "" = none, or a path.
  c.checkpoint.compile_cache = "auto"
  # Transient storage errors (connection, timeout, 5xx/429) of a gs:// workdir are
  # retried with backoff this long; then the job exits with code 75 (io_retry.py).
  c.checkpoint.io_retry_s = 600.0

  c.eval = config_dict.ConfigDict()
  c.eval.n_id = 300  # test problems (in-distribution split)
  c.eval.n_ood = 300  # test problems (out-of-distribution split)
  c.eval.n_val = 0  # validation problems (ID levels; for choosing hyperparameters)
  c.eval.batch_size = 100
  c.eval.temperature = 0.0  # greedy for the built-in task
  c.eval.every = 0  # also evaluate every N steps during training (0 = off)
  c.eval.every_n = 100  # ID problems used by those periodic evaluations
  c.eval.before = True
  c.eval.after = True
  # Evaluate on the built-in task's splits when training on a prepared dataset
  # too (data.source="tfds", e.g. task demonstrations distilled from a teacher).
  c.eval.task_splits = False

  c.log = config_dict.ConfigDict()
  c.log.tensorboard = True
  c.log.progress = True
  c.log.plots = True

  if arg:
    name = arg
    if name in TWO_STAGE:
      c.stages = TWO_STAGE[name]  # {half}: half of the final config.steps (factory.parse_stages)
      c.rollout.n_rollouts = 8  # the RL stage is plain GRPO: 8 on-policy slots
    elif name == "teacher":
      # A teacher for demonstrations that carry what the base lacks (docs/method.md
      # §16): a larger model (~5M parameters) trained by SFT from scratch on the
      # terse demonstrations of every level; distill its verified answers with
      # `python -m srft_jax.data distill --teacher=WORKDIR`.
      c.method = "sft"
      c.steps = 2400
      c.warmup.steps = 0
      c.model.embed_dim, c.model.num_layers, c.model.mlp_dim = 256, 6, 1024
      c.optim.lr = 1e-3
      c.optim.schedule = "cosine"
      c.optim.warmup_steps = 50
      c.batch.prompts_per_step = 16
      c.batch.minibatches = 1
      c.checkpoint.every = 400
    elif name in obj.PRESETS or name in obj.DISTILL_PRESETS:
      c.method = name  # a distill preset also needs --config.teacher.hf_path
    else:
      raise ValueError(
        f"configs/default.py: unknown preset arg {arg!r}; known: "
        f"{sorted(obj.PRESETS) + sorted(obj.DISTILL_PRESETS) + sorted(TWO_STAGE) + ['teacher']}"
      )
    if name in ("grpo", "dapo", "dr_grpo", "opd"):
      c.rollout.n_rollouts = 8  # same 8 slots a prompt, all on-policy (opd: no demo term)
    if name == "dapo":  # DAPO's trainer side: dynamic sampling, overlong shaping
      c.rollout.dynamic_sampling = True
      c.rollout.oversample = 2
      c.rollout.overlong_buffer = c.data.max_response_len // 4
  c.lock()
  return c
