"""From a run's ConfigDict to one frozen run spec, checked first.

`run_spec(config)` validates the ConfigDict once (every error names its field,
before anything compiles) and returns a `RunSpec`: frozen dataclasses holding
the model, the stages (loss, advantages, group layout, learning rate, step
config), optimizer, rollout and evaluation sampling, mesh and sharding rules,
data, checkpoint, evaluation and log settings. The job, the trainer and its
loop, evaluation, the method study and the AOT tool read only the spec: this
module is the only reader of the ConfigDict (tests/test_structure.py checks
it). Jitted code sees only the frozen configs inside the spec.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax

from srft_jax import hf
from srft_jax import lora as lora_lib
from srft_jax import model as model_lib
from srft_jax import multihost
from srft_jax import objectives as obj
from srft_jax import paths
from srft_jax import sampler as sampler_lib
from srft_jax import sharding as shd
from srft_jax import step as step_lib
from srft_jax import tokenizer as tok_lib
from srft_jax.data import builders
from srft_jax.data import distill
from srft_jax.data import pipeline
from srft_jax.data import task

# Where a run's training prompts come from: the built-in task, or a dataset
# prepared with `python -m srft_jax.data prepare`.
DATA_SOURCES = ("task", "tfds")

# Every loss preset a run can select (config.method, config.stages): the paper's
# and the on-policy distillation presets, which need config.teacher (§19.5).
LOSS_PRESETS = {**obj.PRESETS, **obj.DISTILL_PRESETS}


class ConfigError(ValueError):
  """A config (or workdir) that cannot run, named by its field; raised before compiling."""


# ----------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------


def load_config_module(path: str):
  """The module of a config file (`configs/*.py` is a folder of files, not a package)."""
  name = "srft_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise FileNotFoundError(f"no config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str, overrides: dict | None = None):
  """`get_config(arg)` of 'path/to/config.py[:arg]', as `--config=` takes it,
  with `overrides` ({"optim.lr": 1e-3, ...}, `with_overrides`) applied."""
  path, _, arg = spec.partition(":")
  return with_overrides(load_config_module(path).get_config(arg or None), overrides)


def with_overrides(c, overrides: dict | None):
  """A copy of ConfigDict `c` with dotted-key overrides ({"data.task_levels": (1,)}),
  as `--config.FIELD=VALUE` sets them; an unknown field raises ConfigError."""
  c = c.copy_and_resolve_references()
  for key, value in (overrides or {}).items():
    *groups, name = key.split(".")
    node = c
    for g in groups:
      if g not in node:
        raise ConfigError(f"config.{key}: no such field")
      node = node[g]
    if name not in node:
      raise ConfigError(f"config.{key}: no such field")
    with node.unlocked():
      node[name] = value
  return c


# ----------------------------------------------------------------------------
# Stages: which loss, advantages and group layout each step uses
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
  """A run of consecutive steps with one loss preset (a run has one or two)."""

  name: str
  start: int  # first global step of this stage
  steps: int
  loss: obj.LossConfig
  advantage: obj.AdvantageConfig
  layout: step_lib.GroupLayout
  lr: float  # peak learning rate (config.optim.lr, or this stage's optim.stage_lrs entry)
  step: step_lib.StepConfig  # what the jitted train step of this stage needs


def parse_stages(stages: str, steps: int, default_method: str) -> list[tuple[str, int]]:
  """'sft:40,grpo:60' -> [('sft', 40), ('grpo', 60)]; '' -> [(method, steps)].

  The last stage may omit its length (it takes the remaining steps); `{half}`
  stands for steps // 2 of the final config (`--config.steps` included).
  """
  if not stages:
    return [(default_method, steps)]
  stages = stages.replace("{half}", str(steps // 2))
  out, used = [], 0
  items = [s.strip() for s in stages.split(",") if s.strip()]
  for i, item in enumerate(items):
    name, _, n = item.partition(":")
    if name not in LOSS_PRESETS:
      raise ValueError(
        f"config.stages: unknown loss preset {name!r}; known: {sorted(LOSS_PRESETS)}"
      )
    if not n:
      if i != len(items) - 1:
        raise ValueError(f"config.stages: only the last stage may omit its length ({stages!r})")
      n = steps - used
    n = int(n)
    if n <= 0:
      raise ValueError(f"config.stages: stage {item!r} has no steps (config.steps={steps})")
    out.append((name, n))
    used += n
  if used != steps:
    raise ValueError(f"config.stages: stage lengths sum to {used}, config.steps is {steps}")
  return out


def stage_layout(loss_cfg: obj.LossConfig, n_rollouts: int, n_demos: int) -> step_lib.GroupLayout:
  """Rollouts only when a rollout term is on (the RL term or the teacher's);
  demos only when a demo term is on; demos in the advantage group only when
  their RL term is on."""
  n = n_rollouts if (loss_cfg.use_self_rl or loss_cfg.distill_coef > 0) else 0
  d = n_demos if (loss_cfg.use_sft or loss_cfg.use_demo_rl or loss_cfg.distill_on_demos) else 0
  if n + d == 0:
    raise ValueError("loss preset uses neither rollouts nor demonstrations")
  return step_lib.GroupLayout(n, d, demos_in_group=loss_cfg.use_demo_rl)


def _set_fields(group) -> dict:
  return {k: v for k, v in dict(group or {}).items() if v is not None}


def loss_config(name: str, overrides: dict | None, max_response_len: int) -> obj.LossConfig:
  """A loss preset with config overrides; Dr.GRPO's constant normaliser uses
  this run's response length unless the config pins one."""
  overrides = _set_fields(overrides)
  aggregation = overrides.get("aggregation", LOSS_PRESETS.get(name, {}).get("aggregation"))
  if aggregation == "constant_len" and "max_response_len" not in overrides:
    overrides["max_response_len"] = max_response_len  # also replaces a preset's (srft_code: 8192)
  return obj.LossConfig.preset(name, **overrides)


def advantage_config(name: str, overrides: dict | None) -> obj.AdvantageConfig:
  """The preset's advantage form with the config's `advantage` overrides."""
  return obj.AdvantageConfig.preset(name, **_set_fields(overrides))


# ----------------------------------------------------------------------------
# The run spec: one frozen object per run
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What model the run trains and how it runs (config.model, the rules)."""

  preset: str  # model.PRESETS name (random init) ...
  hf_path: str  # ... or an HF checkpoint directory ("" = none)
  dtype: str
  param_dtype: str
  remat: str
  scan_layers: bool  # layers stacked and scanned (model.ModelConfig.scan_layers)
  rope_theta: float  # > 0 overrides the checkpoint's
  max_seq_len: int  # > 0 overrides the checkpoint's window
  attention: str  # "" keeps the preset's / checkpoint's
  decode_attention: str
  embed_dim: int  # the tiny presets' shape
  num_layers: int
  mlp_dim: int
  rules: tuple  # logical-axis rules (sharding.DEFAULT_RULES + config.sharding_rules)
  context: int  # max prompt bucket + response length: the tiny presets' window

  def hf_overrides(self) -> dict:
    """Architecture overrides for an imported checkpoint (e.g. the paper's RoPE
    theta 40k and 16k window for Qwen2.5-Math-7B, docs/method.md §5)."""
    out = {}
    if self.rope_theta:
      out["rope_theta"] = float(self.rope_theta)
    if self.max_seq_len:
      out["max_seq_len"] = int(self.max_seq_len)
    for name in ("attention", "decode_attention"):
      if getattr(self, name):
        out[name] = getattr(self, name)
    return out

  def config(self, vocab_size: int) -> model_lib.ModelConfig:
    """The ModelConfig the run builds: from hf_path's config.json (with the
    run's overrides) when it has one, else the preset; the tiny presets
    (model.TINY_PRESETS) take the tokenizer's `vocab_size` and this shape."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, rules=self.rules)
    kw["scan_layers"] = self.scan_layers
    if self.hf_path and paths.exists(os.path.join(self.hf_path, "config.json")):
      return hf.config_from_hf(hf.read_config(self.hf_path), **kw, **self.hf_overrides())
    for name in ("attention", "decode_attention"):  # "" keeps the preset's
      if getattr(self, name):
        kw[name] = getattr(self, name)
    if self.preset in model_lib.TINY_PRESETS:  # tiny, tiny_qwen3, tiny_qwen3_moe
      kw.update(
        vocab_size=vocab_size,
        embed_dim=self.embed_dim,
        num_layers=self.num_layers,
        mlp_dim=self.mlp_dim,
        max_seq_len=self.context,
      )
    return model_lib.ModelConfig.preset(self.preset, **kw)

  def load(self, path: str, mesh):
    """An HF checkpoint loaded the way this run runs a model (its dtypes,
    remat, rules and architecture overrides)."""
    return hf.load_model(
      path,
      mesh=mesh,
      rules=self.rules,
      dtype=model_lib.DTYPES[self.dtype],
      param_dtype=model_lib.DTYPES[self.param_dtype],
      remat=self.remat,
      scan_layers=self.scan_layers,
      **self.hf_overrides(),
    )


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """The frozen teacher of on-policy distillation (config.teacher, docs/method.md §19)."""

  hf_path: str  # HF checkpoint directory or training workdir ("" = no teacher)
  tokenizer: str  # its tokenizer where the directory holds none ("" = found beside it)
  dtype: str  # compute and parameter dtype
  temperature: float  # its softmax temperature; 0 = the student's

  @property
  def enabled(self) -> bool:
    return bool(self.hf_path)

  def resolve(self) -> tuple[str, str]:
    """(HF checkpoint directory, tokenizer path) of `hf_path`, a checkpoint
    directory or a training workdir (its export/hf); ConfigError naming the field."""
    try:
      return distill.resolve_teacher(
        self.hf_path,
        self.tokenizer,
        flag="config.teacher.hf_path",
        tokenizer_flag="config.teacher.tokenizer",
      )
    except FileNotFoundError as e:
      raise ConfigError(str(e)) from None

  def _overrides(self, model: ModelSpec) -> dict:
    """How the teacher runs: the student's rules, layer layout and attention."""
    kw = dict(rules=model.rules, scan_layers=model.scan_layers)
    return kw | ({"attention": model.attention} if model.attention else {})

  def load(self, model: ModelSpec, mesh):
    """The teacher, loaded as the student is (hf.load_model, any family) and
    sharded on `mesh` by the student's rules, parameters in `dtype`."""
    hf_dir, _ = self.resolve()
    dtype = model_lib.DTYPES[self.dtype]
    return hf.load_model(
      hf_dir, mesh=mesh, dtype=dtype, param_dtype=dtype, **self._overrides(model)
    )

  def config(self, model: ModelSpec) -> model_lib.ModelConfig:
    """The ModelConfig `load` builds, from config.json alone (the AOT tool)."""
    export = os.path.join(self.hf_path, "export", "hf")
    where = self.hf_path if paths.exists(os.path.join(self.hf_path, "config.json")) else export
    kw = dict(dtype=self.dtype, param_dtype=self.dtype, **self._overrides(model))
    return hf.config_from_hf(hf.read_config(where), **kw)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  source: str  # "task" (built-in) | "tfds" (prepared with srft_jax.data)
  data_dir: str
  name: str
  tokenizer: str  # "" = the built-in task's sentencepiece model
  template: str
  prompt_buckets: tuple[int, ...]
  max_response_len: int
  task_train_size: int
  task_seed: int
  demo_style: str
  task_levels: tuple[int, ...]  # () = every level


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  n_rollouts: int
  n_demos: int
  temperature: float
  top_p: float
  top_k: int
  require_think: bool  # the reward rule, for training and every evaluation
  overlong_buffer: int
  overlong_penalty: float
  overlong_filter: bool
  dynamic_sampling: bool
  oversample: int


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  prompts_per_step: int
  minibatches: int
  microbatches: int


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  lr: float
  schedule: str
  warmup_steps: int
  weight_decay: float
  b1: float
  b2: float
  eps: float
  clip_norm: float

  def make(self, steps: int, lr: float | None = None, updates_per_step: int = 1):
    """(optax transformation, schedule of the step) for `steps` steps at peak
    learning rate `lr` (None: this spec's)."""
    return step_lib.make_optimizer(
      self.lr if lr is None else lr,
      steps=steps,
      warmup_steps=self.warmup_steps,
      schedule=self.schedule,
      weight_decay=self.weight_decay,
      b1=self.b1,
      b2=self.b2,
      eps=self.eps,
      clip_norm=self.clip_norm or None,
      updates_per_step=updates_per_step,
    )


@dataclasses.dataclass(frozen=True)
class WarmupSpec:
  steps: int  # SFT steps that make the base model (0 = none)
  dir: str  # the base-model cache ("" = WORKDIR/base)
  settings: tuple  # ((name, value), ...): what a cached warm-up must match


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  every: int
  keep: int
  async_save: bool
  export_hf: bool
  compile_cache: str  # "auto" | "" | a path (srft_jax/compile_cache.py)
  io_retry_s: float = 600.0  # transient storage errors retried this long (srft_jax/io_retry.py)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  n_id: int
  n_ood: int
  n_val: int
  batch_size: int
  temperature: float
  every: int
  every_n: int
  before: bool
  after: bool
  task_splits: bool  # the built-in task's splits also when training on a prepared dataset


@dataclasses.dataclass(frozen=True)
class LogSpec:
  tensorboard: bool
  progress: bool
  plots: bool


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  multihost: bool  # call jax.distributed.initialize() first
  coordinator: str  # "host:port" ("" = from the environment)
  num_processes: int
  process_id: int


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything a run reads, validated and frozen (`run_spec`)."""

  name: str  # "train", or "warm-up" for the base model's SFT run
  seed: int
  steps: int
  method: str  # what the run trains: a preset, or a schedule like "sft:30,grpo"
  stages: tuple[Stage, ...]
  model: ModelSpec
  lora: lora_lib.LoRAConfig
  lora_adapter_path: str  # a PEFT adapter the run continues from ("" = none)
  teacher: TeacherSpec  # on-policy distillation's teacher (hf_path "" = none)
  data: DataSpec
  rollout: RolloutSpec
  batch: BatchSpec
  optim: OptimSpec
  mesh: tuple[tuple[str, int], ...]  # axis sizes (-1: the remaining devices)
  distributed: DistributedSpec
  warmup: WarmupSpec
  warmup_run: RunSpec | None  # the warm-up's own spec (None: no warm-up)
  checkpoint: CheckpointSpec
  eval: EvalSpec
  log: LogSpec
  max_nonfinite_streak: int
  config_json: str  # the ConfigDict as JSON, recorded in every checkpoint

  def make_mesh(self) -> jax.sharding.Mesh:
    return shd.make_mesh(dict(self.mesh))

  def optimizer(self, stage: Stage):
    """(optax transformation, schedule of the step) of a stage."""
    return self.optim.make(stage.steps, stage.lr, updates_per_step=self.batch.minibatches)

  def stage_at(self, step: int) -> Stage:
    """The stage that trains global step `step` (the last one at the end)."""
    for s in self.stages:
      if s.start <= step < s.start + s.steps:
        return s
    return self.stages[-1]

  def biggest_stage(self) -> Stage:
    """The stage with the biggest group: the largest batch a step trains on."""
    return max(self.stages, key=lambda st: st.layout.size)

  def with_microbatches(self, microbatches: int) -> RunSpec:
    """This spec with another micro-batch count (the AOT tool's --rows_per_shard);
    the caller checks the split (check_batch_split)."""
    stages = tuple(
      dataclasses.replace(s, step=dataclasses.replace(s.step, microbatches=microbatches))
      for s in self.stages
    )
    batch = dataclasses.replace(self.batch, microbatches=microbatches)
    return dataclasses.replace(self, batch=batch, stages=stages)

  @property
  def distills(self) -> bool:
    """Whether some stage has a teacher term (distill_coef > 0): it needs the teacher."""
    return any(s.loss.distill_coef > 0 for s in self.stages)

  @property
  def reference(self) -> bool:
    """Whether some stage keeps a KL reference (a frozen copy of the base)."""
    return any(s.step.reference for s in self.stages)

  def base_dir(self, workdir: str) -> str:
    """The warm-up cache and the before-training evaluation: warmup.dir or WORKDIR/base."""
    return self.warmup.dir or os.path.join(workdir, "base")

  def sampling(
    self,
    tokenizer=None,
    *,
    n: int,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int | None = None,
    eos_ids: tuple[int, ...] | None = None,
    pad_id: int | None = None,
  ) -> sampler_lib.SamplingConfig:
    """The sampler's settings: the rollout settings unless given; stop and pad
    ids from the tokenizer unless given."""
    r = self.rollout
    return sampler_lib.SamplingConfig(
      max_new_tokens=max_new_tokens or self.data.max_response_len,
      temperature=r.temperature if temperature is None else temperature,
      top_p=r.top_p if top_p is None else top_p,
      top_k=r.top_k if top_k is None else top_k,
      eos_ids=tuple(tokenizer.stop_ids if eos_ids is None else eos_ids),
      pad_id=tokenizer.pad_id if pad_id is None else pad_id,
      prompt_buckets=self.data.prompt_buckets,
      n=n,
    )

  def eval_sampling(self, tokenizer) -> sampler_lib.SamplingConfig:
    """How every evaluation of the run samples (before, during and after
    training): one completion a problem at `eval.temperature`."""
    return self.sampling(tokenizer, n=1, temperature=self.eval.temperature)


def packing_shape(c, layout: step_lib.GroupLayout) -> tuple[int, int]:
  """(pack_len, pack_rows) of sequence packing (docs/method.md §18); (0, 0) when
  `batch.packing` is off. pack_len 0: the longest row, max(prompt_buckets) +
  max_response_len; pack_rows 0: a quarter of a micro-batch's rows (at least 1)."""
  b = c.batch
  if not b.get("packing", False):
    return 0, 0
  row_len = max(c.data.prompt_buckets) + c.data.max_response_len
  rows = b.prompts_per_step // b.minibatches * layout.size // b.microbatches
  return int(b.pack_len) or row_len, int(b.pack_rows) or max(1, -(-rows // 4))


def _stage_step_config(c, loss: obj.LossConfig, layout: step_lib.GroupLayout):
  pack_len, pack_rows = packing_shape(c, layout)
  return step_lib.StepConfig(
    loss=loss,
    minibatches=c.batch.minibatches,
    microbatches=c.batch.microbatches,
    temperature=c.rollout.temperature,
    logit_chunk=c.logit_chunk,
    response_len=c.data.max_response_len,
    group=layout.size if c.shared_prefix and not pack_len else 0,  # packing runs rows alone
    recompute_old_logp=recompute_old_logp(c.rollout.get("recompute_old_logp"), loss),
    reference=loss.use_self_rl and loss.kl_coef > 0,
    dropout_seed=int(c.seed),
    pack_len=pack_len,
    pack_rows=pack_rows,
    teacher_temperature=_teacher(c).temperature if loss.distill_coef > 0 else 0.0,
  )


def recompute_old_logp(value: bool | None, loss: obj.LossConfig) -> bool:
  """`rollout.recompute_old_logp`, or (None) on exactly when an importance
  correction is on (it needs the trainer's log-probs beside the sampler's)."""
  return loss.is_correction != "none" if value is None else bool(value)


def _stages(c) -> tuple[Stage, ...]:
  """The run's stages; `config.loss` / `config.advantage` overrides apply to a
  single-stage run only (a schedule's stages are the presets as they are)."""
  single = not c.stages
  out, start = [], 0
  parsed = parse_stages(c.stages, c.steps, c.method)
  lrs = tuple(c.optim.stage_lrs) or (c.optim.lr,) * len(parsed)
  for (name, n), lr in zip(parsed, lrs, strict=True):
    lc = loss_config(name, dict(c.loss) if single else None, c.data.max_response_len)
    ac = advantage_config(name, dict(c.advantage) if single else None)
    layout = stage_layout(lc, c.rollout.n_rollouts, c.rollout.n_demos)
    step = _stage_step_config(c, lc, layout)
    out.append(Stage(name, start, n, lc, ac, layout, float(lr), step))
    start += n
  return tuple(out)


def _lora(c) -> tuple[lora_lib.LoRAConfig, str]:
  """config.lora as a frozen LoRAConfig (rank 0, or no lora block: LoRA off)
  and the PEFT adapter path it continues from."""
  lc = c.get("lora")
  if lc is None:
    return lora_lib.LoRAConfig(), ""
  targets = lc.targets.split(",") if isinstance(lc.targets, str) else lc.targets
  cfg = lora_lib.LoRAConfig(
    rank=int(lc.rank),
    alpha=float(lc.alpha),
    targets=tuple(t.strip() for t in targets),
    dropout=float(lc.dropout),
    init_seed=int(lc.init_seed),
  )
  return cfg, (lc.get("adapter_path") or "") if lc.rank > 0 else ""


def _teacher(c) -> TeacherSpec:
  """config.teacher as a TeacherSpec (no teacher block: none)."""
  t = c.get("teacher")
  if t is None:
    return TeacherSpec("", "", "float32", 0.0)
  return TeacherSpec(
    hf_path=t.get("hf_path") or "",
    tokenizer=t.get("tokenizer") or "",
    dtype=t.get("dtype") or "float32",
    temperature=float(t.get("temperature") or 0.0),
  )


def _rules(c) -> tuple:
  """The logical-axis rules of the run: sharding.DEFAULT_RULES with
  config.sharding_rules' overrides (e.g. "expert=fsdp")."""
  return shd.with_rules(shd.DEFAULT_RULES, **shd.parse_rules(c.get("sharding_rules") or ""))


def _warmup_settings(c) -> tuple:
  """What makes a cached warm-up the one this config asks for (with the
  model, compared on reuse; the seed is not: studies share one base)."""
  task_info = (
    (("version", task.GENERATOR_VERSION), ("levels", _warmup_levels(c)))
    if _warmup_source(c) == "task"
    else None
  )
  w = c.warmup
  return (
    ("task_seed", c.data.task_seed),
    ("task", task_info),
    (
      "warmup",
      tuple((k, w[k]) for k in ("steps", "lr", "schedule", "warmup_steps", "prompts_per_step")),
    ),
  )


def _build(c, name: str) -> RunSpec:
  lcfg, adapter = _lora(c)
  d, r, b, o, e = c.data, c.rollout, c.batch, c.optim, c.eval
  warmup_run = None
  if c.warmup.steps > 0 and not c.model.hf_path:
    warmup_run = _build(_warmup_config(c), "warm-up")
  return RunSpec(
    name=name,
    seed=int(c.seed),
    steps=int(c.steps),
    method=c.stages.replace("{half}", str(c.steps // 2)) or c.method,
    stages=_stages(c),
    model=ModelSpec(
      preset=c.model.preset,
      hf_path=c.model.hf_path,
      dtype=c.model.dtype,
      param_dtype=c.model.param_dtype,
      remat=c.model.remat,
      scan_layers=bool(c.model.get("scan_layers", False)),
      rope_theta=float(c.model.get("rope_theta") or 0.0),
      max_seq_len=int(c.model.get("max_seq_len") or 0),
      attention=c.model.get("attention") or "",
      decode_attention=c.model.get("decode_attention") or "",
      embed_dim=int(c.model.embed_dim),
      num_layers=int(c.model.num_layers),
      mlp_dim=int(c.model.mlp_dim),
      rules=_rules(c),
      context=max(d.prompt_buckets) + d.max_response_len,
    ),
    lora=lcfg,
    lora_adapter_path=adapter,
    teacher=_teacher(c),
    data=DataSpec(
      source=d.source,
      data_dir=d.data_dir,
      name=d.name,
      tokenizer=d.tokenizer,
      template=d.template,
      prompt_buckets=tuple(int(x) for x in d.prompt_buckets),
      max_response_len=int(d.max_response_len),
      task_train_size=int(d.task_train_size),
      task_seed=int(d.task_seed),
      demo_style=d.demo_style,
      task_levels=tuple(int(x) for x in d.task_levels),
    ),
    rollout=RolloutSpec(
      n_rollouts=int(r.n_rollouts),
      n_demos=int(r.n_demos),
      temperature=float(r.temperature),
      top_p=float(r.top_p),
      top_k=int(r.top_k),
      require_think=bool(r.require_think),
      overlong_buffer=int(r.overlong_buffer),
      overlong_penalty=float(r.overlong_penalty),
      overlong_filter=bool(r.overlong_filter),
      dynamic_sampling=bool(r.dynamic_sampling),
      oversample=int(r.oversample),
    ),
    batch=BatchSpec(int(b.prompts_per_step), int(b.minibatches), int(b.microbatches)),
    optim=OptimSpec(
      lr=float(o.lr),
      schedule=o.schedule,
      warmup_steps=int(o.warmup_steps),
      weight_decay=float(o.weight_decay),
      b1=float(o.b1),
      b2=float(o.b2),
      eps=float(o.eps),
      clip_norm=float(o.clip_norm or 0.0),
    ),
    mesh=tuple((k, int(v)) for k, v in dict(c.mesh).items()),
    distributed=DistributedSpec(
      multihost=bool(c.multihost),
      coordinator=c.distributed.coordinator,
      num_processes=int(c.distributed.num_processes),
      process_id=int(c.distributed.process_id),
    ),
    warmup=WarmupSpec(int(c.warmup.steps), c.warmup.dir, _warmup_settings(c)),
    warmup_run=warmup_run,
    checkpoint=CheckpointSpec(
      int(c.checkpoint.every),
      int(c.checkpoint.keep),
      bool(c.checkpoint.async_save),
      bool(c.checkpoint.export_hf),
      str(c.checkpoint.compile_cache),
      float(c.checkpoint.io_retry_s),
    ),
    eval=EvalSpec(
      n_id=int(e.n_id),
      n_ood=int(e.n_ood),
      n_val=int(e.n_val),
      batch_size=int(e.batch_size),
      temperature=float(e.temperature),
      every=int(e.every),
      every_n=int(e.every_n),
      before=bool(e.before),
      after=bool(e.after),
      task_splits=bool(e.get("task_splits", False)),
    ),
    log=LogSpec(bool(c.log.tensorboard), bool(c.log.progress), bool(c.log.plots)),
    max_nonfinite_streak=int(c.max_nonfinite_streak),
    config_json=c.to_json_best_effort(),
  )


def run_spec(c, overrides: dict | None = None, *, validate: bool = True) -> RunSpec:
  """The run's frozen spec: `c` (with dotted-key `overrides`) validated, each
  error naming its field (ConfigError), then built. The checks against the
  devices (`check_devices`) run here too, except in a multi-host run before
  `jax.distributed.initialize` (the job runs them after it). `validate=False`
  skips every check (evaluation of a run trained with another config)."""
  if overrides:
    c = with_overrides(c, overrides)
  if validate:
    _validate(c)
  spec = _build(c, "train")
  if validate and (not spec.distributed.multihost or jax.distributed.is_initialized()):
    check_devices(spec)
  return spec


def check_devices(spec: RunSpec) -> None:
  """The spec's checks against this machine's devices and processes (ConfigError
  naming the field): the mesh, and every stage's batch split over the data shards."""
  try:
    _check_devices(spec)
  except ConfigError:
    raise
  except ValueError as e:
    if not str(e).startswith("config."):
      raise
    raise ConfigError(str(e)) from None
  if spec.warmup_run is not None:  # its own SFT job: its batch must split the same way
    try:
      check_devices(spec.warmup_run)
    except ConfigError as e:
      raise ConfigError(
        f"config.warmup.prompts_per_step={spec.warmup_run.batch.prompts_per_step}: the "
        f"SFT warm-up's batches fail a check: {e}"
      ) from None


def _check_devices(spec: RunSpec) -> None:
  try:
    mesh_shape = spec.make_mesh().shape
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from None
  b = spec.batch
  for stage in spec.stages:
    check_batch_split(
      b.prompts_per_step,
      b.minibatches,
      b.microbatches,
      stage.layout,
      shd.batch_shards(mesh_shape, spec.model.rules),
      shared_prefix=stage.step.group > 0,
      label=stage.name,
    )
  shards = shd.batch_shards(mesh_shape, spec.model.rules)
  for stage in spec.stages:
    pack_rows = stage.step.pack_rows
    if stage.step.pack_len and pack_rows % shards:
      raise ValueError(
        f"config.batch.pack_rows: a packed slot's {pack_rows} rows (0 takes a quarter "
        f"of a micro-batch's) do not split over the mesh's {shards} data shards, so "
        f"every shard would run every slot; set a multiple of {shards}"
      )
  if b.prompts_per_step % jax.process_count():
    raise ValueError(
      f"config.batch.prompts_per_step: must divide over {jax.process_count()} processes"
    )


def runtime_overrides(mcfg: model_lib.ModelConfig) -> dict:
  """What a model saved by this run (the warm-up cache) takes back from the
  run's ModelConfig when loaded: how it runs, which config.json does not say."""
  return {
    "remat": mcfg.remat,
    "scan_layers": mcfg.scan_layers,
    "rules": mcfg.rules,
    "param_dtype": mcfg.jnp_param_dtype,
    "attention": mcfg.attention,
    "decode_attention": mcfg.decode_attention,
  }


def check_batch_split(
  prompts_per_step: int,
  minibatches: int,
  microbatches: int,
  layout: step_lib.GroupLayout,
  data_shards: int,
  *,
  shared_prefix: bool,
  label: str = "",
) -> None:
  """The one check that a step's batch splits: mini-batches divide the
  prompts, micro-batches divide a mini-batch's rows (whole groups with
  shared_prefix), and a micro-batch's rows split over the data shards.
  Raises ValueError naming the config field; used by validation and the AOT tool."""

  def need(ok, field, msg):
    if not ok:
      raise ValueError(f"config.{field}: {msg}")

  need(
    minibatches > 0 and prompts_per_step % minibatches == 0,
    "batch.minibatches",
    f"must divide batch.prompts_per_step={prompts_per_step}",
  )
  per_mini = prompts_per_step // minibatches
  need(microbatches > 0, "batch.microbatches", "must be positive")
  need(
    not shared_prefix or per_mini % microbatches == 0,
    "batch.microbatches",
    f"must divide the prompts of one mini-batch ({per_mini}): with shared_prefix a "
    "micro-batch holds whole groups (shared_prefix=False splits rows)",
  )
  rows_mini = per_mini * layout.size  # rows of one mini-batch: prompts x (rollouts + demos)
  need(
    rows_mini % microbatches == 0,
    "batch.microbatches",
    f"must divide the {rows_mini} rows of one mini-batch "
    f"({per_mini} prompts x {layout.size} slots{', ' + label if label else ''})",
  )
  rows = rows_mini // microbatches  # rows of one micro-batch
  if rows % data_shards:  # (the message only: no device is asked for before a multi-host start)
    fewer = rows_mini % data_shards == 0  # fewer micro-batches would split
    need(
      False,
      "batch.microbatches" if fewer else "batch.prompts_per_step",
      f"a micro-batch of {rows_mini} rows / {microbatches} = {rows} rows"
      f"{' (' + label + ')' if label else ''} does not split over the {data_shards} data "
      f"shards of {jax.device_count()} devices"
      + (f" (micro-batches: a divisor of {rows_mini // data_shards})" if fewer else ""),
    )


# ----------------------------------------------------------------------------
# Host-side objects: tokenizer and data
# ----------------------------------------------------------------------------


def tokenizer(spec: RunSpec, workdir: str):
  """`data.tokenizer`, or the built-in task's sentencepiece model (trained once
  and cached under the workdir; deterministic in `data.task_seed`)."""
  d = spec.data
  if d.tokenizer:
    if not paths.exists(d.tokenizer):
      raise ConfigError(f"config.data.tokenizer: no file or directory {d.tokenizer!r}")
    return tok_lib.load_tokenizer(d.tokenizer)
  cache = os.path.join(workdir, "tokenizer")
  if multihost.is_main():  # trains and caches it once; the others then load it
    task.get_task_tokenizer(cache, seed=d.task_seed)
  multihost.sync_processes("srft_task_tokenizer")
  return task.get_task_tokenizer(cache, seed=d.task_seed)


def check_teacher(spec: RunSpec, tokenizer) -> None:
  """The teacher shares the student's tokenizer, and both unembeddings have a
  row for each of its ids (docs/method.md §19), or ConfigError naming both:
  read from their files (config.json and the tokenizers), before any model is
  built or anything compiles."""
  if not spec.teacher.enabled:
    return
  hf_dir, tok_path = spec.teacher.resolve()
  student_tok = spec.data.tokenizer or "the built-in task's tokenizer (WORKDIR/tokenizer)"
  student = spec.model.hf_path or f"model.preset={spec.model.preset!r}"
  teacher_tok = tok_lib.load_tokenizer(tok_path)
  mine, theirs = tok_lib.vocabulary_digest(tokenizer), tok_lib.vocabulary_digest(teacher_tok)
  if mine != theirs:
    raise ConfigError(
      f"config.teacher.hf_path: the teacher's tokenizer {tok_path} ({teacher_tok.vocab_size} "
      f"tokens, vocabulary digest {theirs[:12]}) is not the student's {student_tok} "
      f"({tokenizer.vocab_size} tokens, digest {mine[:12]}): the teacher scores the "
      "student's token ids, so both must use one tokenizer"
    )
  # Padded sizes may differ (one tokenizer padded to different multiples): the
  # exact KL is taken over the ids both have (docs/method.md §19.2). Every id
  # the tokenizer can give must be a row of both unembeddings.
  v_student = spec.model.config(tokenizer.vocab_size).vocab_size
  v_teacher = hf.config_from_hf(hf.read_config(hf_dir)).vocab_size
  for who, rows in ((f"the teacher {hf_dir}", v_teacher), (f"the student ({student})", v_student)):
    if rows < tokenizer.vocab_size:
      raise ConfigError(
        f"config.teacher.hf_path: {who} has a vocabulary of {rows} rows, fewer than the "
        f"{tokenizer.vocab_size} ids of the tokenizer {tok_path} the student "
        f"({v_student} rows) and the teacher ({v_teacher} rows) share: it cannot score "
        "every token"
      )


def eval_sets(spec: RunSpec) -> dict[str, list[dict]]:
  """The evaluation sets {name: rows} of the built-in task (for a prepared
  dataset only with eval.task_splits)."""
  d, e = spec.data, spec.eval
  if d.source != "task" and not e.task_splits:
    return {}
  sizes = {"task_id": e.n_id, "task_ood": e.n_ood, "task_val": e.n_val}
  splits = {"task_id": "test_id", "task_ood": "test_ood", "task_val": "val"}
  # A split of size 0 is not evaluated (a sweep on `val` leaves the test splits alone).
  return {k: task.generate(splits[k], n, d.task_seed, d.demo_style) for k, n in sizes.items() if n}


def datasets(spec: RunSpec) -> tuple[Any, dict[str, list[dict]]]:
  """(training source, eval sets {name: rows})."""
  d = spec.data
  if d.source == "task":
    levels = d.task_levels or None
    train = task.generate("train", d.task_train_size, d.task_seed, d.demo_style, levels)
    return train, eval_sets(spec)
  where = os.path.join(d.data_dir, "srft_data", d.name)
  if not paths.isdir(where):
    raise ConfigError(
      f"config.data.data_dir: no prepared dataset {d.name!r} in "
      f"{d.data_dir!r}; make it with `python -m srft_jax.data prepare "
      f"{d.name} --src FILE --data_dir DIR`"
    )
  # A bucket's dataset is read from a local copy (array_record files are local).
  data_dir = paths.local_copy(d.data_dir, sub=f"srft_data/{d.name}")
  return builders.load_source(data_dir, d.name, "train"), eval_sets(spec)


def data_iter(spec: RunSpec, source, tokenizer, seed: int | None = None):
  """The training batches: prompts with their demonstrations, resumable
  (`seed`: the data order's, default the run's seed)."""
  pcfg = pipeline.PipelineConfig(
    global_batch=spec.batch.prompts_per_step,
    prompt_buckets=spec.data.prompt_buckets,
    max_response_len=spec.data.max_response_len,
    template=spec.data.template,
    seed=spec.seed if seed is None else seed,
  )
  return pipeline.make_iterator(source, tokenizer, pcfg)


def _warmup_source(c) -> str:
  """The warm-up's training data: warmup.source, else the run's data.source."""
  return c.warmup.get("source") or c.data.source


def _warmup_levels(c) -> tuple[int, ...]:
  """The warm-up's difficulty levels: warmup.task_levels, else the run's."""
  return tuple(c.warmup.get("task_levels") or ()) or tuple(c.data.task_levels)


def _warmup_config(c):
  """The base-model warm-up: the same job with the `sft` preset and its own lr/batch."""
  w = c.copy_and_resolve_references()
  with w.unlocked():
    w.method, w.stages, w.steps = "sft", "", c.warmup.steps
    for k in w.loss:
      w.loss[k] = None
    w.optim.lr, w.optim.stage_lrs = c.warmup.lr, ()
    w.optim.schedule = c.warmup.schedule
    w.optim.warmup_steps = c.warmup.warmup_steps
    w.batch.prompts_per_step = c.warmup.prompts_per_step
    w.batch.minibatches = 1
    w.checkpoint.every = 0
    w.warmup.steps = 0  # the warm-up has no warm-up of its own
    w.data.demo_style = "terse"  # the base learns the canonical style; the run may use another
    w.data.task_levels = _warmup_levels(c)
    w.data.source = _warmup_source(c)
    if "lora" in w:
      w.lora.rank = 0  # the warm-up makes the (full) base the adapters then sit on
      w.lora.adapter_path = ""
    if "teacher" in w:
      w.teacher.hf_path = ""  # plain SFT: no teacher term
  return w


# ----------------------------------------------------------------------------
# Validation: every error names its field, before anything compiles
# ----------------------------------------------------------------------------


def _validate(c) -> None:
  """Config errors before anything compiles, each naming its field (ConfigError)."""
  try:
    _check(c)
  except ConfigError:
    raise
  except ValueError as e:
    if not str(e).startswith("config."):
      raise
    raise ConfigError(str(e)) from None


def _check_teacher_fields(c, need) -> None:
  """config.teacher against the stages' teacher terms (docs/method.md §19): a
  teacher term needs a teacher, a teacher needs a teacher term."""
  teacher = _teacher(c)
  distills = [s for s in _stages(c) if s.loss.distill_coef > 0]
  if distills:
    s = distills[0]
    need(
      teacher.enabled,
      "teacher.hf_path",
      f"stage {s.name!r} has a teacher term (loss.distill_coef={s.loss.distill_coef} > 0): "
      "give the teacher, an HF checkpoint directory or a training workdir",
    )
  need(
    bool(distills) or not teacher.enabled,
    "teacher.hf_path",
    f"a teacher ({teacher.hf_path!r}) but no stage has a teacher term (method {c.method!r}, "
    f"loss.distill_coef 0): choose a distill preset {sorted(obj.DISTILL_PRESETS)}, set "
    "loss.distill_coef > 0, or leave teacher.hf_path empty",
  )
  blind = [s.name for s in distills if not (s.loss.use_self_rl or s.loss.use_demo_rl)]
  need(
    not (c.rollout.get("dynamic_sampling", False) and blind),
    "rollout.dynamic_sampling",
    f"stage {blind[:1]} has no reward term (the teacher term alone): filtering its groups "
    "by reward would only drop rollouts the teacher scores; set it False",
  )
  if not teacher.enabled:
    return
  need(
    teacher.dtype in model_lib.DTYPES,
    "teacher.dtype",
    f"unknown dtype {teacher.dtype!r}; known: {sorted(model_lib.DTYPES)}",
  )
  need(
    teacher.temperature >= 0,
    "teacher.temperature",
    f"must be >= 0 (0: the student's), got {teacher.temperature}",
  )
  teacher.resolve()  # its checkpoint and tokenizer exist (ConfigError naming the field)


def _check(c) -> None:
  def need(ok, field, msg):
    if not ok:
      raise ValueError(f"config.{field}: {msg}")

  need(c.steps > 0, "steps", f"must be positive, got {c.steps}")
  need(
    c.method in LOSS_PRESETS,
    "method",
    f"unknown loss preset {c.method!r}; known: {sorted(LOSS_PRESETS)}",
  )
  n_stages = len(parse_stages(c.stages, c.steps, c.method))
  need(
    len(c.optim.stage_lrs) in (0, n_stages) and all(lr > 0 for lr in c.optim.stage_lrs),
    "optim.stage_lrs",
    f"one positive learning rate per stage ({n_stages}), or () for optim.lr; "
    f"got {tuple(c.optim.stage_lrs)}",
  )
  need(c.batch.prompts_per_step > 0, "batch.prompts_per_step", "must be positive")
  need(
    c.rollout.n_rollouts >= 0 and c.rollout.n_demos >= 0,
    "rollout.n_rollouts",
    "counts must be >= 0",
  )
  need(c.data.max_response_len > 0, "data.max_response_len", "must be positive")
  packing = c.batch.get("packing", False)
  need(isinstance(packing, bool), "batch.packing", f"must be True or False, got {packing!r}")
  row_len = max(c.data.prompt_buckets) + c.data.max_response_len
  for field in ("pack_len", "pack_rows"):
    value = c.batch.get(field, 0)
    need(
      isinstance(value, int) and value >= 0, f"batch.{field}", f"must be an int >= 0, got {value!r}"
    )
  need(
    not packing or not c.batch.get("pack_len", 0) or c.batch.pack_len >= row_len,
    "batch.pack_len",
    f"must hold the longest row, max(data.prompt_buckets) + data.max_response_len = {row_len} "
    f"tokens (or 0 for exactly that), got {c.batch.get('pack_len')}",
  )
  need(
    isinstance(c.checkpoint.compile_cache, str),
    "checkpoint.compile_cache",
    f'"auto", "" (none) or a directory, got {c.checkpoint.compile_cache!r}',
  )
  need(
    isinstance(c.checkpoint.io_retry_s, int | float) and c.checkpoint.io_retry_s > 0,
    "checkpoint.io_retry_s",
    f"seconds to retry transient storage errors, > 0; got {c.checkpoint.io_retry_s!r}",
  )
  need(c.rollout.oversample >= 1, "rollout.oversample", f"must be >= 1, got {c.rollout.oversample}")
  need(
    0 <= c.rollout.overlong_buffer < c.data.max_response_len,
    "rollout.overlong_buffer",
    f"must be in [0, data.max_response_len={c.data.max_response_len}), "
    f"got {c.rollout.overlong_buffer}",
  )
  need(c.optim.lr > 0, "optim.lr", f"must be positive, got {c.optim.lr}")
  for field, value in (
    ("optim.schedule", c.optim.schedule),
    ("warmup.schedule", c.warmup.schedule),
  ):
    need(
      value in step_lib.SCHEDULES,
      field,
      f"unknown schedule {value!r}; known: {tuple(step_lib.SCHEDULES)}",
    )
  need(
    c.warmup.steps <= 0 or (c.warmup.lr > 0 and c.warmup.prompts_per_step > 0),
    "warmup.lr",
    "a warm-up needs a positive lr and prompts_per_step",
  )
  for field, source in (("data.source", c.data.source), ("warmup.source", _warmup_source(c))):
    need(source in DATA_SOURCES, field, f"unknown source {source!r}; known: {DATA_SOURCES}")
  need(
    c.data.template in tok_lib.TEMPLATES,
    "data.template",
    f"unknown chat template {c.data.template!r}; known: {tok_lib.TEMPLATES}",
  )
  need(
    c.data.demo_style in task.DEMO_STYLES,
    "data.demo_style",
    f"unknown style {c.data.demo_style!r}; known: {task.DEMO_STYLES}",
  )
  for field, levels in (
    ("data.task_levels", c.data.task_levels),
    ("warmup.task_levels", c.warmup.get("task_levels") or ()),
  ):
    need(
      set(levels) <= set(task.ID_STEPS),
      field,
      f"levels are steps of ID problems, a subset of {task.ID_STEPS}; got {tuple(levels)}",
    )
  need(
    c.data.source != "tfds" or c.data.data_dir,
    "data.data_dir",
    "source=tfds reads a prepared dataset: give the directory `python -m srft_jax.data "
    "prepare NAME --src FILE --data_dir DIR` wrote",
  )
  need(
    c.model.hf_path or c.model.preset in model_lib.PRESETS,
    "model.preset",
    f"unknown preset {c.model.preset!r}; known: {sorted(model_lib.PRESETS)}",
  )
  for field, allowed in (
    ("remat", model_lib.REMATS),
    ("attention", model_lib.ATTENTIONS),
    ("decode_attention", model_lib.DECODE_ATTENTIONS),
  ):
    value = c.model.get(field) or ""
    need(
      value in ("",) + allowed if field != "remat" else value in allowed,
      f"model.{field}",
      f"unknown {field} {value!r}; known: {allowed}",
    )
  need(
    isinstance(c.model.get("scan_layers", False), bool),
    "model.scan_layers",
    f"must be True or False, got {c.model.get('scan_layers')!r}",
  )
  if c.get("lora") is not None:
    lc = c.lora
    need(
      isinstance(lc.rank, int) and lc.rank >= 0,
      "lora.rank",
      f"must be an int >= 0, got {lc.rank!r}",
    )
    need(lc.alpha > 0, "lora.alpha", f"must be positive, got {lc.alpha}")
    targets = lc.targets.split(",") if isinstance(lc.targets, str) else tuple(lc.targets)
    need(
      len(targets) > 0 and set(t.strip() for t in targets) <= set(lora_lib.TARGETS),
      "lora.targets",
      f"a non-empty subset of {lora_lib.TARGETS}; got {tuple(targets)}",
    )
    need(0 <= lc.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lc.dropout}")
    need(
      not lc.get("adapter_path") or lc.rank > 0,
      "lora.adapter_path",
      "continuing from a PEFT adapter needs lora.rank > 0 (its rank)",
    )
    need(
      not lc.get("adapter_path")
      or paths.exists(os.path.join(lc.adapter_path, "adapter_config.json")),
      "lora.adapter_path",
      f"no adapter_config.json in {lc.get('adapter_path')!r}",
    )
  overrides = _set_fields(c.loss)
  try:
    loss_config(c.method, overrides, c.data.max_response_len)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.loss: {e}") from None
  try:
    advantage_config(c.method, dict(c.advantage))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.advantage: {e}") from None
  for stage in _stages(c) if not c.stages else []:
    need(
      stage.loss.is_correction == "none" or stage.step.recompute_old_logp,
      "rollout.recompute_old_logp",
      f"loss.is_correction={stage.loss.is_correction!r} needs the trainer's old_logp "
      "(leave recompute_old_logp unset or True)",
    )
  _check_teacher_fields(c, need)
  try:
    _rules(c)
  except ValueError as e:
    raise ValueError(f"config.sharding_rules: {e}") from None
  for stage in _stages(c):  # the split over devices: check_devices, once they are known
    check_batch_split(
      c.batch.prompts_per_step,
      c.batch.minibatches,
      c.batch.microbatches,
      stage.layout,
      1,
      shared_prefix=bool(c.shared_prefix),
      label=stage.name,
    )
  need(
    c.max_nonfinite_streak > 0,
    "max_nonfinite_streak",
    f"must be positive (non-finite updates in a row that stop the run), got {c.max_nonfinite_streak}",
  )
  if c.warmup.steps > 0 and not c.model.hf_path:
    # The warm-up is its own SFT job (warmup_config): its batch must split the same way.
    w = _warmup_config(c)
    try:
      _validate(w)
    except ValueError as e:
      raise ValueError(
        f"config.warmup.prompts_per_step={c.warmup.prompts_per_step}: the SFT "
        f"warm-up's batches fail a check: {e}"
      ) from None
