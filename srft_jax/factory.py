"""From a run's ConfigDict to the frozen objects everyone uses, checked first.

The trainer, the job, evaluation, the method study and the AOT tool all build
their model config, loss and advantage configs, optimizer, step config,
sampling config, mesh, tokenizer and data through these functions, so one
config means one set of objects wherever it is read. Jitted code only ever
sees the frozen dataclasses built here, never a ConfigDict.
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
from srft_jax.data import pipeline
from srft_jax.data import task


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


def load_config(spec: str):
  """`get_config(arg)` of 'path/to/config.py[:arg]', as `--config=` takes it."""
  path, _, arg = spec.partition(":")
  return load_config_module(path).get_config(arg or None)


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
    if name not in obj.PRESETS:
      raise ValueError(f"config.stages: unknown loss preset {name!r}; known: {sorted(obj.PRESETS)}")
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
  """Rollouts only when a rollout term is on; demos only when a demo term is on;
  demos in the advantage group only when their RL term is on."""
  n = n_rollouts if loss_cfg.use_self_rl else 0
  d = n_demos if (loss_cfg.use_sft or loss_cfg.use_demo_rl) else 0
  if n + d == 0:
    raise ValueError("loss preset uses neither rollouts nor demonstrations")
  return step_lib.GroupLayout(n, d, demos_in_group=loss_cfg.use_demo_rl)


def _set_fields(group) -> dict:
  return {k: v for k, v in dict(group or {}).items() if v is not None}


def loss_config(name: str, overrides: dict | None, max_response_len: int) -> obj.LossConfig:
  """A loss preset with config overrides; Dr.GRPO's constant normaliser uses
  this run's response length unless the config pins one."""
  overrides = _set_fields(overrides)
  aggregation = overrides.get("aggregation", obj.PRESETS.get(name, {}).get("aggregation"))
  if aggregation == "constant_len" and "max_response_len" not in overrides:
    overrides["max_response_len"] = max_response_len  # also replaces a preset's (srft_code: 8192)
  return obj.LossConfig.preset(name, **overrides)


def advantage_config(name: str, overrides: dict | None) -> obj.AdvantageConfig:
  """The preset's advantage form with the config's `advantage` overrides."""
  return obj.AdvantageConfig.preset(name, **_set_fields(overrides))


def stages(c) -> list[Stage]:
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
    out.append(Stage(name, start, n, lc, ac, layout, float(lr)))
    start += n
  return out


# ----------------------------------------------------------------------------
# Device-side objects
# ----------------------------------------------------------------------------


def mesh(c) -> jax.sharding.Mesh:
  return shd.make_mesh(dict(c.mesh))


def sharding_rules(c) -> tuple:
  """The logical-axis rules of the run: sharding.DEFAULT_RULES with
  config.sharding_rules' overrides (e.g. "expert=fsdp")."""
  return shd.with_rules(shd.DEFAULT_RULES, **shd.parse_rules(c.get("sharding_rules") or ""))


def optimizer(c, steps: int, lr: float | None = None):
  """(optax transformation, schedule of the step) for a stage of `steps` steps
  at peak learning rate `lr` (None: config.optim.lr)."""
  o = c.optim
  return step_lib.make_optimizer(
    o.lr if lr is None else lr,
    steps=steps,
    warmup_steps=o.warmup_steps,
    schedule=o.schedule,
    weight_decay=o.weight_decay,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    clip_norm=o.clip_norm or None,
    updates_per_step=c.batch.minibatches,
  )


def lora_config(c) -> lora_lib.LoRAConfig:
  """config.lora as a frozen LoRAConfig (rank 0, or no lora block: LoRA off)."""
  lc = c.get("lora")
  if lc is None:
    return lora_lib.LoRAConfig()
  targets = lc.targets.split(",") if isinstance(lc.targets, str) else lc.targets
  return lora_lib.LoRAConfig(
    rank=int(lc.rank),
    alpha=float(lc.alpha),
    targets=tuple(t.strip() for t in targets),
    dropout=float(lc.dropout),
    init_seed=int(lc.init_seed),
  )


def lora_adapter_path(c) -> str:
  """config.lora.adapter_path: a PEFT adapter the run continues from ("" = none)."""
  lc = c.get("lora")
  return (lc.get("adapter_path") or "") if lc is not None and lc.rank > 0 else ""


def step_config(c, stage: Stage) -> step_lib.StepConfig:
  return step_lib.StepConfig(
    loss=stage.loss,
    minibatches=c.batch.minibatches,
    microbatches=c.batch.microbatches,
    temperature=c.rollout.temperature,
    logit_chunk=c.logit_chunk,
    response_len=c.data.max_response_len,
    group=stage.layout.size if c.get("shared_prefix") else 0,
    recompute_old_logp=recompute_old_logp(c, stage.loss),
    reference=stage.loss.use_self_rl and stage.loss.kl_coef > 0,
    dropout_seed=int(c.seed),
  )


def recompute_old_logp(c, loss: obj.LossConfig) -> bool:
  """`rollout.recompute_old_logp`, or (None) on exactly when an importance
  correction is on (it needs the trainer's log-probs beside the sampler's)."""
  value = c.rollout.get("recompute_old_logp")
  return loss.is_correction != "none" if value is None else bool(value)


def sampling_config(
  c,
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
  """The sampler's settings: the config's rollout settings unless given; stop
  and pad ids from the tokenizer unless given."""
  return sampler_lib.SamplingConfig(
    max_new_tokens=max_new_tokens or c.data.max_response_len,
    temperature=c.rollout.temperature if temperature is None else temperature,
    top_p=c.rollout.top_p if top_p is None else top_p,
    top_k=c.rollout.top_k if top_k is None else top_k,
    eos_ids=tuple(tokenizer.stop_ids if eos_ids is None else eos_ids),
    pad_id=tokenizer.pad_id if pad_id is None else pad_id,
    prompt_buckets=tuple(c.data.prompt_buckets),
    n=n,
  )


def model_config(c, vocab_size: int) -> model_lib.ModelConfig:
  """The ModelConfig the run builds: from model.hf_path's config.json (with the
  run's overrides) when it has one, else the preset; the tiny presets
  (model.TINY_PRESETS) take the tokenizer's `vocab_size` and the config's shape."""
  kw = dict(
    dtype=c.model.dtype,
    param_dtype=c.model.param_dtype,
    remat=c.model.remat,
    rules=sharding_rules(c),
  )
  if c.model.hf_path and paths.exists(os.path.join(c.model.hf_path, "config.json")):
    return hf.config_from_hf(hf.read_config(c.model.hf_path), **kw, **hf_overrides(c))
  for name in ("attention", "decode_attention"):  # "" keeps the preset's
    if c.model.get(name):
      kw[name] = c.model.get(name)
  if c.model.preset in model_lib.TINY_PRESETS:  # tiny, tiny_qwen3, tiny_qwen3_moe
    kw.update(
      vocab_size=vocab_size,
      embed_dim=c.model.embed_dim,
      num_layers=c.model.num_layers,
      mlp_dim=c.model.mlp_dim,
      max_seq_len=max(c.data.prompt_buckets) + c.data.max_response_len,
    )
  return model_lib.ModelConfig.preset(c.model.preset, **kw)


def hf_overrides(c) -> dict:
  """Architecture overrides for an imported checkpoint (e.g. the paper's RoPE
  theta 40k and 16k window for Qwen2.5-Math-7B, docs/method.md §5)."""
  out = {}
  if c.model.get("rope_theta"):
    out["rope_theta"] = float(c.model.rope_theta)
  if c.model.get("max_seq_len"):
    out["max_seq_len"] = int(c.model.max_seq_len)
  for name in ("attention", "decode_attention"):
    if c.model.get(name):
      out[name] = c.model.get(name)
  return out


def runtime_overrides(mcfg: model_lib.ModelConfig) -> dict:
  """What a model saved by this run (the warm-up cache) takes back from the
  run's ModelConfig when loaded: how it runs, which config.json does not say."""
  return {
    "remat": mcfg.remat,
    "rules": mcfg.rules,
    "param_dtype": mcfg.jnp_param_dtype,
    "attention": mcfg.attention,
    "decode_attention": mcfg.decode_attention,
  }


# ----------------------------------------------------------------------------
# Host-side objects: tokenizer and data
# ----------------------------------------------------------------------------


def tokenizer(c, workdir: str):
  """`data.tokenizer`, or the built-in task's sentencepiece model (trained once
  and cached under the workdir; deterministic in `data.task_seed`)."""
  if c.data.tokenizer:
    if not paths.exists(c.data.tokenizer):
      raise ConfigError(f"config.data.tokenizer: no file or directory {c.data.tokenizer!r}")
    return tok_lib.load_tokenizer(c.data.tokenizer)
  cache = os.path.join(workdir, "tokenizer")
  if multihost.is_main():  # trains and caches it once; the others then load it
    task.get_task_tokenizer(cache, seed=c.data.task_seed)
  multihost.sync_processes("srft_task_tokenizer")
  return task.get_task_tokenizer(cache, seed=c.data.task_seed)


def datasets(c) -> tuple[Any, dict[str, list[dict]]]:
  """(training source, eval sets {name: rows})."""
  if c.data.source == "task":
    seed, style = c.data.task_seed, c.data.demo_style
    levels = tuple(c.data.task_levels) or None
    train = task.generate("train", c.data.task_train_size, seed, style, levels)
    sizes = {"task_id": c.eval.n_id, "task_ood": c.eval.n_ood, "task_val": c.eval.n_val}
    splits = {"task_id": "test_id", "task_ood": "test_ood", "task_val": "val"}
    # A split of size 0 is not evaluated (a sweep on `val` leaves the test splits alone).
    evals = {k: task.generate(splits[k], n, seed, style) for k, n in sizes.items() if n}
    return train, evals
  where = os.path.join(c.data.data_dir, "srft_data", c.data.name)
  if not paths.isdir(where):
    raise ConfigError(
      f"config.data.data_dir: no prepared dataset {c.data.name!r} in "
      f"{c.data.data_dir!r}; make it with `python -m srft_jax.data prepare "
      f"{c.data.name} --src FILE --data_dir DIR`"
    )
  # A bucket's dataset is read from a local copy (array_record files are local).
  data_dir = paths.local_copy(c.data.data_dir, sub=f"srft_data/{c.data.name}")
  return builders.load_source(data_dir, c.data.name, "train"), {}


def data_iter(c, source, tokenizer, prompts_per_step: int, seed: int):
  """The training batches: prompts with their demonstrations, resumable."""
  pcfg = pipeline.PipelineConfig(
    global_batch=prompts_per_step,
    prompt_buckets=tuple(c.data.prompt_buckets),
    max_response_len=c.data.max_response_len,
    template=c.data.template,
    seed=seed,
  )
  return pipeline.make_iterator(source, tokenizer, pcfg)


def warmup_config(c):
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
    w.data.demo_style = "terse"  # the base learns the canonical style; the run may use another
    if "lora" in w:
      w.lora.rank = 0  # the warm-up makes the (full) base the adapters then sit on
      w.lora.adapter_path = ""
  return w


# ----------------------------------------------------------------------------
# Validation: every error names its field, before anything compiles
# ----------------------------------------------------------------------------


def validate_config(c) -> None:
  """Config errors before anything compiles, each naming its field (ConfigError)."""
  try:
    _check(c)
  except ConfigError:
    raise
  except ValueError as e:
    if not str(e).startswith("config."):
      raise
    raise ConfigError(str(e)) from None


def _check(c) -> None:
  def need(ok, field, msg):
    if not ok:
      raise ValueError(f"config.{field}: {msg}")

  need(c.steps > 0, "steps", f"must be positive, got {c.steps}")
  need(
    c.method in obj.PRESETS,
    "method",
    f"unknown loss preset {c.method!r}; known: {sorted(obj.PRESETS)}",
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
    c.batch.minibatches > 0 and c.batch.prompts_per_step % c.batch.minibatches == 0,
    "batch.minibatches",
    f"must divide batch.prompts_per_step={c.batch.prompts_per_step}",
  )
  per_mini = c.batch.prompts_per_step // c.batch.minibatches
  need(c.batch.microbatches > 0, "batch.microbatches", "must be positive")
  need(
    not c.shared_prefix or per_mini % c.batch.microbatches == 0,
    "batch.microbatches",
    f"must divide the prompts of one mini-batch ({per_mini}): with shared_prefix a "
    "micro-batch holds whole groups (shared_prefix=False splits rows)",
  )
  need(
    c.rollout.n_rollouts >= 0 and c.rollout.n_demos >= 0,
    "rollout.n_rollouts",
    "counts must be >= 0",
  )
  need(c.data.max_response_len > 0, "data.max_response_len", "must be positive")
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
      f"unknown schedule {value!r}; known: {step_lib.SCHEDULES}",
    )
  need(
    c.warmup.steps <= 0 or (c.warmup.lr > 0 and c.warmup.prompts_per_step > 0),
    "warmup.lr",
    "a warm-up needs a positive lr and prompts_per_step",
  )
  need(c.data.source in ("task", "tfds"), "data.source", f"unknown source {c.data.source!r}")
  need(
    c.data.demo_style in task.DEMO_STYLES,
    "data.demo_style",
    f"unknown style {c.data.demo_style!r}; known: {task.DEMO_STYLES}",
  )
  need(
    set(c.data.task_levels) <= set(task.ID_STEPS),
    "data.task_levels",
    f"levels are steps of ID problems, a subset of {task.ID_STEPS}; got {c.data.task_levels}",
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
  need(
    c.model.get("attention", "") in ("", "xla", "chunked", "cudnn"),
    "model.attention",
    f"unknown attention {c.model.get('attention')!r}; known: xla, chunked, cudnn",
  )
  need(
    c.model.get("decode_attention", "") in ("", "xla", "pallas"),
    "model.decode_attention",
    f"unknown decode attention {c.model.get('decode_attention')!r}; known: xla, pallas",
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
  for stage in stages(c) if not c.stages else []:
    need(
      stage.loss.is_correction == "none" or recompute_old_logp(c, stage.loss),
      "rollout.recompute_old_logp",
      f"loss.is_correction={stage.loss.is_correction!r} needs the trainer's old_logp "
      "(leave recompute_old_logp unset or True)",
    )
  n_dev = jax.device_count()
  try:
    mesh_shape = mesh(c).shape
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from None
  try:
    rules = sharding_rules(c)
  except ValueError as e:
    raise ValueError(f"config.sharding_rules: {e}") from None
  data_par = shd.batch_shards(mesh_shape, rules)
  micro = c.batch.microbatches
  for name, _ in parse_stages(c.stages, c.steps, c.method):
    lc = loss_config(name, overrides if not c.stages else None, c.data.max_response_len)
    layout = stage_layout(lc, c.rollout.n_rollouts, c.rollout.n_demos)
    rows_mini = per_mini * layout.size  # rows of one mini-batch: prompts x (rollouts + demos)
    need(
      rows_mini % micro == 0,
      "batch.microbatches",
      f"must divide the {rows_mini} rows of one mini-batch "
      f"({per_mini} prompts x {layout.size} slots, {name})",
    )
    rows = rows_mini // micro  # rows of one micro-batch
    fewer = rows_mini % data_par == 0  # fewer micro-batches would split
    need(
      rows % data_par == 0,
      "batch.microbatches" if fewer else "batch.prompts_per_step",
      f"a micro-batch of {rows_mini} rows / {micro} = {rows} rows ({name}) does not "
      f"split over the {data_par} data shards of {n_dev} devices"
      + (f" (micro-batches: a divisor of {rows_mini // data_par})" if fewer else ""),
    )
  need(
    c.batch.prompts_per_step % jax.process_count() == 0,
    "batch.prompts_per_step",
    f"must divide over {jax.process_count()} processes",
  )
  need(
    c.max_nonfinite_streak > 0,
    "max_nonfinite_streak",
    f"must be positive (non-finite updates in a row that stop the run), got {c.max_nonfinite_streak}",
  )
  if c.warmup.steps > 0 and not c.model.hf_path:
    # The warm-up is its own SFT job (warmup_config): its batch must split the same way.
    w = warmup_config(c)
    with w.unlocked():
      w.warmup.steps = 0
    try:
      validate_config(w)
    except ValueError as e:
      raise ValueError(
        f"config.warmup.prompts_per_step={c.warmup.prompts_per_step}: the SFT "
        f"warm-up's batches fail a check: {e}"
      ) from None
