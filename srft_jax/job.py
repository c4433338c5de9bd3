"""The whole job: `run(config, workdir)`.

In order: validate the config (before anything compiles), build the tokenizer,
data and mesh, get the base policy (an HF checkpoint, or a tiny model warmed
up by SFT and cached), evaluate it, train (`trainer.fit`), evaluate again,
export the policy as an HF checkpoint and write results.json.

Everything the job writes lands under the workdir, local or a bucket
(gs://, `srft_jax.paths`): checkpoints, logs, plots, results, caches and the
export. Process 0 writes the shared files; every process reads them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import jax
from flax import nnx

from srft_jax import evaluate as eval_lib
from srft_jax import factory
from srft_jax import hf
from srft_jax import lora as lora_lib
from srft_jax import metrics as metrics_lib
from srft_jax import model as model_lib
from srft_jax import multihost
from srft_jax import paths
from srft_jax import rewards as rewards_lib
from srft_jax import trainer as trainer_lib
from srft_jax.data import task

log = logging.getLogger(__name__)

WARMUP_META = "srft_warmup.json"


def base_model(c, tokenizer, mesh, workdir: str, scorer):
  """The starting policy: an HF checkpoint, or a tiny model warmed up by SFT
  (cached as an HF checkpoint in `warmup.dir`, so studies share one base).
  None when a SIGTERM stopped the warm-up (it resumes from its checkpoint)."""
  if c.model.hf_path:
    return hf.load_model(
      c.model.hf_path,
      mesh=mesh,
      rules=factory.sharding_rules(c),
      dtype=model_lib.DTYPES[c.model.dtype],
      param_dtype=model_lib.DTYPES[c.model.param_dtype],
      remat=c.model.remat,
      **factory.hf_overrides(c),
    )
  mcfg = factory.model_config(c, tokenizer.vocab_size)
  if c.warmup.steps <= 0:
    return model_lib.create_model(mcfg, seed=c.seed, mesh=mesh)
  base_dir = c.warmup.dir or os.path.join(workdir, "base")
  hf_dir = os.path.join(base_dir, "hf")
  meta = warmup_meta(c, mcfg)
  if paths.exists(os.path.join(hf_dir, "config.json")):
    meta_file = os.path.join(hf_dir, WARMUP_META)
    if paths.exists(meta_file):
      cached = paths.read_json(meta_file)
      diff = sorted(k for k in set(cached) | set(meta) if cached.get(k) != meta.get(k))
      if diff:
        raise factory.ConfigError(
          f"config.warmup.dir: {hf_dir} caches a warm-up of other settings "
          f"({', '.join(diff)}); delete it or point warmup.dir elsewhere"
        )
    log.info("base model: %s (cached warm-up)", hf_dir)
    return hf.load_model(hf_dir, mesh=mesh, dtype=mcfg.jnp_dtype, **factory.runtime_overrides(mcfg))
  log.info("base model: SFT warm-up for %d steps", c.warmup.steps)
  model = model_lib.create_model(mcfg, seed=c.seed, mesh=mesh)
  w = factory.warmup_config(c)
  source, _ = factory.datasets(w)
  trainer = trainer_lib.Trainer(model, config=w, tokenizer=tokenizer, scorer=scorer, mesh=mesh)
  info = trainer_lib.fit(
    trainer,
    factory.data_iter(w, source, tokenizer, w.batch.prompts_per_step, w.seed + 1),
    workdir=os.path.join(base_dir, "run"),
    progress=c.log.progress,
  )
  if info["status"] == "preempted":
    return None  # not cached: a half-trained base must not pass for the warm-up
  model = trainer.model()
  save_base(model, hf_dir, meta)
  return model


def warmup_meta(c, mcfg: model_lib.ModelConfig) -> dict:
  """What makes a cached warm-up the one this config asks for (compared on reuse;
  the seed is not: studies share one base across their seeds)."""
  how = ("rules", "remat", "attention", "decode_attention", "dtype")  # how it runs, not what it is
  model = {k: v for k, v in dataclasses.asdict(mcfg).items() if k not in how}
  return json.loads(
    json.dumps(
      {
        "model": model,
        "task_seed": c.data.task_seed,
        # The built-in task's generator and levels: a base warmed up on an
        # older task (same vocabulary size) is refused, not reused.
        "task": (
          {"version": task.GENERATOR_VERSION, "levels": list(c.data.task_levels)}
          if c.data.source == "task"
          else None
        ),
        "warmup": {
          k: c.warmup[k] for k in ("steps", "lr", "schedule", "warmup_steps", "prompts_per_step")
        },
      },
      default=str,
    )
  )


def with_adapters(c, model, mesh):
  """The base with config.lora's adapters on it (fresh, or a PEFT adapter's
  from lora.adapter_path); the base itself when LoRA is off."""
  lcfg = factory.lora_config(c)
  if not lcfg.enabled:
    return model
  if factory.lora_adapter_path(c):
    model = hf.load_peft_adapter(c.lora.adapter_path, model, mesh=mesh)
    lora_lib.set_dropout(model, lcfg.dropout)  # a training setting: this run's, not the file's
    log.info("LoRA: continuing from the PEFT adapter %s", c.lora.adapter_path)
    return model
  model = lora_lib.attach(model, lcfg, mesh)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, lora_lib.ADAPTER)))
  log.info("LoRA: rank %d on %s, %d adapter parameters", lcfg.rank, ",".join(lcfg.targets), n)
  return model


def save_base(model, hf_dir: str, meta: dict | None = None) -> None:
  """The warm-up's HF cache, written aside and published whole (paths.staged_dir:
  config.json last): a kill mid-write never leaves an hf/config.json that the
  next run would take for a finished warm-up."""
  with paths.staged_dir(hf_dir, enabled=multihost.is_main()) as tmp_dir:
    hf.save_model(model, tmp_dir)  # collective: every process gathers, process 0 writes
    if multihost.is_main() and meta is not None:
      paths.write_json(os.path.join(tmp_dir, WARMUP_META), meta)
  multihost.sync_processes("srft_base_saved")


def eval_sets_key(evals: dict, c) -> str:
  """A digest of the eval sets (every prompt and answer) and the evaluation
  settings: a cached before-training evaluation is reused only under the same key."""
  h = hashlib.sha256()
  seed = c.seed if c.eval.temperature > 0 else None  # greedy: the same for every seed
  settings = [c.eval.temperature, c.rollout.require_think, c.data.template, seed]
  h.update(json.dumps([settings, c.data.max_response_len]).encode())
  for name in sorted(evals):
    h.update(json.dumps([name, [(r["prompt"], r["answer"]) for r in evals[name]]]).encode())
  return h.hexdigest()


def evaluate_sets(model, tokenizer, scorer, sets: dict, c, mesh) -> dict[str, float]:

  scfg = factory.sampling_config(c, tokenizer, n=1, temperature=c.eval.temperature)
  out = {}
  for name, rows in sets.items():
    res = eval_lib.accuracy_on_rows(
      model,
      tokenizer,
      rows,
      scorer,
      scfg,
      rng=jax.random.key(c.seed + 17),
      template=c.data.template,
      batch_size=c.eval.batch_size,
      mesh=mesh,
      require_think=c.rollout.require_think,
    )
    out[name] = res["accuracy"]
  return out


def run(c, workdir: str) -> dict:
  """The main job. Writes WORKDIR/results.json and returns it."""
  t_start = time.time()
  if c.multihost and not jax.distributed.is_initialized():
    # On TPU pods and SLURM the arguments come from the environment; locally
    # (tests, one machine) from config.distributed.
    d = c.distributed
    kw = {}
    if d.coordinator:
      kw = dict(
        coordinator_address=d.coordinator, num_processes=d.num_processes, process_id=d.process_id
      )
    jax.distributed.initialize(**kw)
  factory.validate_config(c)
  out = workdir
  paths.makedirs(out)
  mesh = factory.mesh(c)
  tokenizer = factory.tokenizer(c, workdir)
  source, evals = factory.datasets(c)
  with rewards_lib.RewardScorer(require_think=c.rollout.require_think) as scorer:
    model = base_model(c, tokenizer, mesh, workdir, scorer)
    if model is None:
      return {"status": "preempted", "step": 0, "stage": "warmup"}
    model = with_adapters(c, model, mesh)
    before = {}
    if c.eval.before and evals:
      cache = os.path.join(c.warmup.dir or os.path.join(workdir, "base"), "eval_before.json")
      key = eval_sets_key(evals, c)
      cached = {}
      if not c.model.hf_path and not factory.lora_adapter_path(c) and paths.exists(cache):
        cached = paths.read_json(cache)
      if cached.get("key") == key:
        before = cached["accuracy"]
      else:  # none cached, or of other eval sets (other sizes, splits, settings)
        before = evaluate_sets(model, tokenizer, scorer, evals, c, mesh)
        if multihost.is_main():
          paths.write_json(cache, {"key": key, "accuracy": before})
      log.info("before: %s", before)
    base_path = c.model.hf_path or os.path.join(c.warmup.dir or os.path.join(workdir, "base"), "hf")
    trainer = trainer_lib.Trainer(
      model,
      config=c,
      tokenizer=tokenizer,
      scorer=scorer,
      mesh=mesh,
      base_path=base_path if (c.model.hf_path or c.warmup.steps > 0) else "",
    )
    it = factory.data_iter(c, source, tokenizer, c.batch.prompts_per_step, c.seed)
    t_train = time.time()
    hook = eval_lib.make_eval_hook(c, tokenizer, scorer, evals, mesh)
    info = trainer_lib.fit(trainer, it, workdir=workdir, progress=c.log.progress, eval_hook=hook)
    train_s = time.time() - t_train
    if info["status"] == "preempted":
      return {"status": "preempted", "step": info["step"]}
    model = trainer.model()
    after = (
      evaluate_sets(model, tokenizer, scorer, evals, c, mesh) if (c.eval.after and evals) else {}
    )
  results = {
    "before": {"id_acc": before.get("task_id"), "ood_acc": before.get("task_ood")},
    "after": {"id_acc": after.get("task_id"), "ood_acc": after.get("task_ood")},
    "steps": int(c.steps),
    "method": c.stages.replace("{half}", str(c.steps // 2)) or c.method,
    "wall_s": round(time.time() - t_start, 1),
    "train_s": round(train_s, 1),
  }
  if "task_val" in evals:  # eval.n_val > 0: the split hyperparameters are chosen on
    results["before"]["val_acc"] = before.get("task_val")
    results["after"]["val_acc"] = after.get("task_val")
  if lora_lib.has_adapters(model):  # the adapters in the PEFT layout, and merged below
    lcfg = lora_lib.config_of(model)
    results["lora"] = {"rank": lcfg.rank, "alpha": lcfg.alpha, "targets": list(lcfg.targets)}
    hf.save_peft_adapter(model, os.path.join(out, "export", "peft"), base_model=base_path)
    model = lora_lib.merged(model) if c.checkpoint.export_hf else model
  if c.checkpoint.export_hf:  # collective: every process gathers, process 0 writes
    hf.save_model(
      model,
      os.path.join(out, "export", "hf"),
      tokenizer=tokenizer,
      copy_from=c.model.hf_path or None,
    )
  if multihost.is_main():
    if c.log.plots:
      results["plots"] = metrics_lib.plot_metrics(
        os.path.join(out, "logs", "metrics.jsonl"), os.path.join(out, "plots")
      )
    paths.write_json(os.path.join(out, "results.json"), results, indent=2)
  return results
