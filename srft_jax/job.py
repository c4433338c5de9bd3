"""The whole job: `run(spec, workdir)` (the spec: `factory.run_spec(config)`).

In order (the config was validated when the spec was built, before anything
compiles): build the tokenizer,
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

from srft_jax import compile_cache
from srft_jax import evaluate as eval_lib
from srft_jax import factory
from srft_jax import hf
from srft_jax import io_retry
from srft_jax import lora as lora_lib
from srft_jax import metrics as metrics_lib
from srft_jax import model as model_lib
from srft_jax import multihost
from srft_jax import paths
from srft_jax import peft as peft_lib
from srft_jax import rewards as rewards_lib
from srft_jax import trainer as trainer_lib

log = logging.getLogger(__name__)

WARMUP_META = "srft_warmup.json"


def base_model(spec: factory.RunSpec, tokenizer, mesh, workdir: str, scorer):
  """The starting policy: an HF checkpoint, or a tiny model warmed up by SFT
  (cached as an HF checkpoint in `warmup.dir`, so studies share one base).
  None when a SIGTERM stopped the warm-up (it resumes from its checkpoint)."""
  if spec.model.hf_path:
    return spec.model.load(spec.model.hf_path, mesh)
  mcfg = spec.model.config(tokenizer.vocab_size)
  if spec.warmup_run is None:
    return model_lib.create_model(mcfg, seed=spec.seed, mesh=mesh)
  hf_dir = os.path.join(spec.base_dir(workdir), "hf")
  meta = warmup_meta(spec, mcfg)
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
  w = spec.warmup_run
  log.info("base model: SFT warm-up for %d steps", w.steps)
  model = model_lib.create_model(mcfg, seed=spec.seed, mesh=mesh)
  source, _ = factory.datasets(w)
  trainer = trainer_lib.Trainer(model, w, tokenizer=tokenizer, scorer=scorer, mesh=mesh)
  info = trainer_lib.fit(
    trainer,
    factory.data_iter(w, source, tokenizer, seed=w.seed + 1),
    workdir=os.path.join(spec.base_dir(workdir), "run"),
  )
  if info["status"] == "preempted":
    return None  # not cached: a half-trained base must not pass for the warm-up
  model = trainer.model()
  save_base(model, hf_dir, meta)
  return model


def warmup_meta(spec: factory.RunSpec, mcfg: model_lib.ModelConfig) -> dict:
  """What makes a cached warm-up the one this spec asks for (compared on reuse;
  the seed is not: studies share one base across their seeds)."""
  how = ("rules", "remat", "attention", "decode_attention", "dtype", "scan_layers")  # how it runs
  model = {k: v for k, v in dataclasses.asdict(mcfg).items() if k not in how}
  settings = dict(spec.warmup.settings)
  task_info = settings["task"]
  return json.loads(
    json.dumps(
      {
        "model": model,
        "task_seed": settings["task_seed"],
        # The built-in task's generator and levels: a base warmed up on an
        # older task (same vocabulary size) is refused, not reused.
        "task": (
          {"version": dict(task_info)["version"], "levels": list(dict(task_info)["levels"])}
          if task_info is not None
          else None
        ),
        "warmup": dict(settings["warmup"]),
      },
      default=str,
    )
  )


def with_adapters(spec: factory.RunSpec, model, mesh):
  """The base with the spec's LoRA adapters on it (fresh, or a PEFT adapter's
  from lora.adapter_path); the base itself when LoRA is off."""
  lcfg = spec.lora
  if not lcfg.enabled:
    return model
  if spec.lora_adapter_path:
    model = peft_lib.load_peft_adapter(spec.lora_adapter_path, model, mesh=mesh)
    lora_lib.set_dropout(model, lcfg.dropout)  # a training setting: this run's, not the file's
    log.info("LoRA: continuing from the PEFT adapter %s", spec.lora_adapter_path)
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


def eval_sets_key(evals: dict, spec: factory.RunSpec) -> str:
  """A digest of the eval sets (every prompt and answer) and the evaluation
  settings: a cached before-training evaluation is reused only under the same key."""
  h = hashlib.sha256()
  seed = spec.seed if spec.eval.temperature > 0 else None  # greedy: the same for every seed
  settings = [spec.eval.temperature, spec.rollout.require_think, spec.data.template, seed]
  h.update(json.dumps([settings, spec.data.max_response_len, "by-level"]).encode())
  for name in sorted(evals):
    h.update(json.dumps([name, [(r["prompt"], r["answer"]) for r in evals[name]]]).encode())
  return h.hexdigest()


def evaluate_sets(model, tokenizer, scorer, sets: dict, spec: factory.RunSpec, mesh):
  """({name: accuracy}, {name: {level: accuracy}}) on each eval set, graded as
  every evaluation of the run is (evaluate.accuracy_on_spec); levels for the
  built-in task's sets."""
  acc, levels = {}, {}
  for name, rows in sets.items():
    res = eval_lib.accuracy_on_spec(model, tokenizer, rows, scorer, spec, mesh)
    acc[name] = res["accuracy"]
    levels[name] = eval_lib.accuracy_by_level(rows, res["per_row"])
  return acc, levels


def split_results(acc: dict, levels: dict, names) -> dict:
  """results.json's block of one evaluation: ID / OOD (/ val) accuracy, and
  accuracy by difficulty level of each split."""
  out = {"id_acc": acc.get("task_id"), "ood_acc": acc.get("task_ood")}
  if "task_val" in names:  # eval.n_val > 0: the split hyperparameters are chosen on
    out["val_acc"] = acc.get("task_val")
  out["levels"] = {name: lv for name, lv in levels.items() if lv}
  return out


def run(spec: factory.RunSpec, workdir: str) -> dict:
  """The main job. Writes WORKDIR/results.json and returns it."""
  t_start = time.time()
  d = spec.distributed
  if d.multihost and not jax.distributed.is_initialized():
    # On TPU pods and SLURM the arguments come from the environment; locally
    # (tests, one machine) from config.distributed.
    kw = {}
    if d.coordinator:
      kw = dict(
        coordinator_address=d.coordinator, num_processes=d.num_processes, process_id=d.process_id
      )
    jax.distributed.initialize(**kw)
  factory.check_devices(spec)  # before anything compiles, now that every process is known
  # Every remote read and write (paths, checkpoints) rides out transient errors.
  io_retry.set_budget(spec.checkpoint.io_retry_s)
  io_retry.quiet_client_logs()
  compile_cache.configure(spec.checkpoint.compile_cache, workdir)
  out = workdir
  paths.makedirs(out)
  mesh = spec.make_mesh()
  tokenizer = factory.tokenizer(spec, workdir)
  factory.check_teacher(spec, tokenizer)  # one tokenizer and vocabulary, before any model
  source, evals = factory.datasets(spec)
  with rewards_lib.RewardScorer(require_think=spec.rollout.require_think) as scorer:
    model = base_model(spec, tokenizer, mesh, workdir, scorer)
    if model is None:
      return {"status": "preempted", "step": 0, "stage": "warmup"}
    model = with_adapters(spec, model, mesh)
    before, before_levels = {}, {}
    if spec.eval.before and evals:
      cache = os.path.join(spec.base_dir(workdir), "eval_before.json")
      key = eval_sets_key(evals, spec)
      cached = {}
      if not spec.model.hf_path and not spec.lora_adapter_path and paths.exists(cache):
        cached = paths.read_json(cache)
      if cached.get("key") == key:
        before, before_levels = cached["accuracy"], cached["levels"]
      else:  # none cached, or of other eval sets (other sizes, splits, settings)
        before, before_levels = evaluate_sets(model, tokenizer, scorer, evals, spec, mesh)
        if multihost.is_main():
          paths.write_json(cache, {"key": key, "accuracy": before, "levels": before_levels})
      log.info("before: %s", before)
    base_path = spec.model.hf_path or os.path.join(spec.base_dir(workdir), "hf")
    teacher = None
    if spec.teacher.enabled:  # docs/method.md §19: loaded once, sharded like the student
      teacher = spec.teacher.load(spec.model, mesh)
      log.info("teacher: %s (%s)", spec.teacher.hf_path, spec.teacher.dtype)
    trainer = trainer_lib.Trainer(
      model,
      spec,
      tokenizer=tokenizer,
      scorer=scorer,
      mesh=mesh,
      base_path=base_path if (spec.model.hf_path or spec.warmup_run is not None) else "",
      teacher=teacher,
      teacher_path=spec.teacher.hf_path,
    )
    it = factory.data_iter(spec, source, tokenizer)
    t_train = time.time()
    hook = eval_lib.make_eval_hook(spec, tokenizer, scorer, evals, mesh)
    info = trainer_lib.fit(trainer, it, workdir=workdir, eval_hook=hook)
    train_s = time.time() - t_train
    if info["status"] == "preempted":
      return {"status": "preempted", "step": info["step"]}
    model = trainer.model()
    after, after_levels = {}, {}
    if spec.eval.after and evals:
      after, after_levels = evaluate_sets(model, tokenizer, scorer, evals, spec, mesh)
  results = {
    "before": split_results(before, before_levels, evals),
    "after": split_results(after, after_levels, evals),
    "steps": spec.steps,
    "method": spec.method,
    "wall_s": round(time.time() - t_start, 1),
    "train_s": round(train_s, 1),
  }
  if lora_lib.has_adapters(model):  # the adapters in the PEFT layout, and merged below
    lcfg = lora_lib.config_of(model)
    results["lora"] = {"rank": lcfg.rank, "alpha": lcfg.alpha, "targets": list(lcfg.targets)}
    peft_lib.save_peft_adapter(model, os.path.join(out, "export", "peft"), base_model=base_path)
    model = lora_lib.merged(model) if spec.checkpoint.export_hf else model
  if spec.checkpoint.export_hf:  # collective: every process gathers, process 0 writes
    hf.save_model(
      model,
      os.path.join(out, "export", "hf"),
      tokenizer=tokenizer,
      copy_from=spec.model.hf_path or None,
    )
  if multihost.is_main():
    if spec.log.plots:
      results["plots"] = metrics_lib.plot_metrics(
        os.path.join(out, "logs", "metrics.jsonl"), os.path.join(out, "plots")
      )
    paths.write_json(os.path.join(out, "results.json"), results, indent=2)
  return results
