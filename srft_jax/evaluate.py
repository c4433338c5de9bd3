"""Evaluation with the project's sampler: the built-in task and the paper's benchmarks.

`python -m srft_jax.evaluate --config=configs/default.py --checkpoint=PATH`
samples with the same sampler the trainer uses and reports accuracy (avg@k
or pass@1 per benchmark, ID / OOD averages) as Markdown and JSON.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags
from tqdm.auto import tqdm

from srft_jax import checkpoint as ckpt_lib
from srft_jax import console
from srft_jax import factory
from srft_jax import hf
from srft_jax import lora as lora_lib
from srft_jax import metrics_eval
from srft_jax import model as model_lib
from srft_jax import multihost
from srft_jax import paths
from srft_jax import rewards as rewards_lib
from srft_jax import sampler as sampler_lib
from srft_jax import step as step_lib
from srft_jax import token_change
from srft_jax.data import builders
from srft_jax.data import task
from srft_jax.tokenizer import render_prompt

log = logging.getLogger(__name__)


def generate(
  model,
  tokenizer,
  questions: Sequence[str],
  cfg: sampler_lib.SamplingConfig,
  *,
  rng,
  template: str = "plain",
  system: str | None = None,
  batch_size: int = 64,
  mesh=None,
  progress: bool = False,
) -> list[list[str] | None]:
  """`cfg.n` completions per question, decoded; None for a question whose prompt
  is longer than the largest bucket (not asked: `score_completions` counts it
  as `prompt_too_long`, reward 0). Batches have a fixed size (the last one is
  padded with repeats) so evaluation compiles once per bucket."""
  prompts = [render_prompt(q, template=template, system=system) for q in questions]
  lengths = [len(tokenizer.encode(p)) for p in prompts]
  asked = [i for i, n in enumerate(lengths) if n <= cfg.prompt_buckets[-1]]
  if len(asked) < len(prompts):
    log.warning(
      "%d of %d prompts are longer than the largest bucket %d: not asked, scored 0",
      len(prompts) - len(asked),
      len(prompts),
      cfg.prompt_buckets[-1],
    )
  out: list[list[str] | None] = [None] * len(prompts)
  batches = range(0, len(asked), batch_size)
  if progress and multihost.is_main():
    batches = tqdm(batches, desc="eval", leave=False)
  for i, start in enumerate(batches):
    idx = asked[start : start + batch_size]
    real = len(idx)
    idx = idx + [idx[-1]] * (batch_size - real)
    width = cfg.bucket_for(max(lengths[j] for j in idx))
    tokens, mask = tokenizer.batch_encode([prompts[j] for j in idx], max_len=width, left_pad=True)
    res = sampler_lib.sample(model, tokens, mask, jax.random.fold_in(rng, i), cfg, mesh=mesh)
    toks, masks = multihost.gather(res.tokens), multihost.gather(res.mask)  # every host: all rows
    texts = tokenizer.batch_decode(toks, masks)
    for r, j in enumerate(idx[:real]):
      out[j] = texts[r * cfg.n : (r + 1) * cfg.n]
  return out


def score_completions(
  completions: Sequence[list[str] | None],
  answers: Sequence[str],
  n: int,
  scorer,
  *,
  require_think: bool,
) -> tuple[np.ndarray, dict[str, int]]:
  """Rewards [problems, n] and outcome counts of `generate`'s completions; a
  problem that was not asked (None) scores 0 with outcome `prompt_too_long`."""
  asked = [i for i, c in enumerate(completions) if c is not None]
  texts = [t for i in asked for t in completions[i]]
  truths = [answers[i] for i in asked for _ in range(n)]
  rewards, outcomes = scorer.score(texts, truths, require_think=require_think)
  correct = np.zeros((len(completions), n), np.float32)
  correct[asked] = np.asarray(rewards, np.float32).reshape(len(asked), n)
  counts: dict[str, int] = {}
  for o in outcomes:
    counts[o] = counts.get(o, 0) + 1
  if len(asked) < len(completions):
    counts["prompt_too_long"] = (len(completions) - len(asked)) * n
  return correct, counts


def accuracy_on_rows(
  model,
  tokenizer,
  rows: Sequence[dict],
  scorer,
  cfg: sampler_lib.SamplingConfig,
  *,
  rng,
  template: str = "plain",
  batch_size: int = 64,
  mesh=None,
  require_think: bool = False,
) -> dict[str, Any]:
  """Mean reward over rows x cfg.n samples (avg@n; pass@1 for n = 1), with outcome counts."""
  completions = generate(
    model,
    tokenizer,
    [r["prompt"] for r in rows],
    cfg,
    rng=rng,
    template=template,
    batch_size=batch_size,
    mesh=mesh,
  )
  correct, counts = score_completions(
    completions, [r["answer"] for r in rows], cfg.n, scorer, require_think=require_think
  )
  samples = [t for c in completions if c is not None for t in c][:4]
  return {
    "accuracy": float(correct.mean(1).mean()),
    "per_row": correct.mean(1).tolist(),  # each problem's mean reward over its samples
    "n": len(rows),
    "k": cfg.n,
    "outcomes": counts,
    "samples": samples,
  }


def accuracy_by_level(rows: Sequence[dict], per_row: Sequence[float]) -> dict[str, float]:
  """Mean accuracy of the built-in task's rows by difficulty level (steps a
  problem, `task.difficulty`), keyed "1", "2", ...; {} for other rows."""
  by_level: dict[str, list[float]] = {}
  for r, acc in zip(rows, per_row):
    try:
      level = task.difficulty(r["prompt"])
    except ValueError:  # not a built-in task problem
      return {}
    by_level.setdefault(str(level), []).append(float(acc))
  return {k: float(np.mean(v)) for k, v in sorted(by_level.items())}


def accuracy_on_spec(model, tokenizer, rows: Sequence[dict], scorer, spec, mesh) -> dict:
  """`accuracy_on_rows` graded as every evaluation of a run is (before, during
  and after training): the spec's eval sampling, template, batch size, reward
  rule (`rollout.require_think`) and key."""
  return accuracy_on_rows(
    model,
    tokenizer,
    rows,
    scorer,
    spec.eval_sampling(tokenizer),
    rng=jax.random.key(spec.seed + 17),
    template=spec.data.template,
    batch_size=spec.eval.batch_size,
    mesh=mesh,
    require_think=spec.rollout.require_think,
  )


def make_eval_hook(spec, tokenizer, scorer, evals: dict, mesh):
  """Periodic evaluation during training: accuracy on a slice of the ID split
  (graded like the final evaluation, `accuracy_on_spec`), and the policy's mean
  token entropy on a fixed probe of demonstrations (teacher forced), so entropy
  is comparable across stages without rollouts. None when `eval.every` is 0 or
  there is no ID split."""
  if not spec.eval.every or "task_id" not in evals:
    return None
  rows = evals["task_id"][: spec.eval.every_n]
  tokens, mask, resp = token_change.demo_batch(tokenizer, rows[:32], template=spec.data.template)
  resp = resp[:, 1:]

  @functools.partial(jax.jit, static_argnums=0)
  def probe_entropy(graphdef, params):
    logp, ent = step_lib.sequence_logprobs(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask))
    m = jnp.asarray(resp, jnp.float32)
    return jnp.sum(ent * m) / jnp.sum(m), jnp.sum(logp * m) / jnp.sum(m)

  def hook(model) -> dict[str, float]:
    res = accuracy_on_spec(model, tokenizer, rows, scorer, spec, mesh)
    graphdef, params = nnx.split(model)
    ent, logp = jax.device_get(probe_entropy(graphdef, params))
    return {
      "eval/task_id": res["accuracy"],
      "probe/entropy": float(ent),
      "probe/demo_logp": float(logp),
    }

  return hook


def load_policy(spec, checkpoint: str, tokenizer, mesh):
  """A policy from an HF directory, or from a training workdir (its HF export,
  else the params of the newest Orbax checkpoint, restored into their sharded
  layout on `mesh`)."""
  dtype = model_lib.DTYPES[spec.model.dtype]
  rules = spec.model.rules
  for path in (checkpoint, os.path.join(checkpoint, "export", "hf")):
    if paths.exists(os.path.join(path, "config.json")):
      return hf.load_model(path, mesh=mesh, dtype=dtype, rules=rules)
  ckpt_dir = (
    checkpoint
    if os.path.basename(checkpoint.rstrip("/")) == "checkpoints"
    else os.path.join(checkpoint, "checkpoints")
  )
  # The restore target is the last stage's train state (its optimizer's state).
  tx, _ = spec.optimizer(spec.stages[-1])
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
  lmeta = (ckpt.read_meta() or {}).get("lora")
  frozen = None
  if lmeta:  # adapters only: on the base the checkpoint names (same content hash)
    if not lmeta["base_path"]:
      raise ValueError(
        f"--checkpoint: {ckpt_dir} holds LoRA adapters of a randomly initialised "
        "base; evaluate the run's export/hf (merged) instead"
      )
    base = hf.load_model(lmeta["base_path"], mesh=mesh, dtype=dtype, rules=rules)
    lcfg = lora_lib.LoRAConfig(lmeta["rank"], lmeta["alpha"], tuple(lmeta["targets"]))
    graphdef, params, frozen = lora_lib.split(lora_lib.attach(base, lcfg, mesh))
    if lora_lib.base_hash(frozen) != lmeta["base_hash"]:
      raise ValueError(
        f"--checkpoint: the base at {lmeta['base_path']} is not the one {ckpt_dir}'s "
        "adapters were trained on (content hash differs)"
      )
  else:
    mcfg = spec.model.config(tokenizer.vocab_size)
    graphdef, params = nnx.split(model_lib.abstract_model(mcfg))
  restored = ckpt.restore(step_lib.abstract_train_state(params, tx, mesh, rules))
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(
      f"--checkpoint: no HF checkpoint or Orbax checkpoint under {checkpoint}"
    )
  _, state, _, _ = restored
  if frozen is not None:
    return nnx.merge(graphdef, state["params"], frozen)
  return nnx.merge(graphdef, state["params"])


def benchmark_rows(name: str, spec, data_dir: str, limit: int | None) -> list[dict]:
  """Rows {prompt, answer} of one benchmark: the built-in task's splits, or a
  dataset prepared with `python -m srft_jax.data prepare NAME`."""
  if name in ("task_id", "task_ood"):
    n = limit or (spec.eval.n_id if name == "task_id" else spec.eval.n_ood)
    return task.generate("test_id" if name == "task_id" else "test_ood", n, spec.data.task_seed)
  if not data_dir:
    raise ValueError(f"--data_dir: benchmark {name!r} needs a prepared dataset directory")
  source = builders.load_source(data_dir, name, "test")
  rows = []
  for i in range(len(source) if limit is None else min(limit, len(source))):
    r = source[i]
    rows.append(
      {
        k: (v.decode() if isinstance(v, bytes) else v)
        for k, v in r.items()
        if k in ("id", "prompt", "answer")
      }
    )
  return rows


def evaluate_benchmarks(
  model,
  tokenizer,
  names: Sequence[str],
  spec,
  *,
  scorer,
  mesh,
  data_dir: str = "",
  temperature: float = 0.6,
  top_p: float = 1.0,
  k: int | None = None,
  limit: int | None = None,
  max_new_tokens: int | None = None,
  seed: int = 0,
) -> dict[str, Any]:
  """Per benchmark: the registry's metric (avg@k or pass@1) and outcome counts."""
  results = {}
  for name in names:
    spec = metrics_eval.BENCHMARKS[name]
    n = k or spec.k
    rows = benchmark_rows(name, spec, data_dir, limit)
    cfg = spec.sampling(
      tokenizer,
      n=n,
      temperature=temperature,
      top_p=top_p,
      top_k=0,
      max_new_tokens=max_new_tokens,
    )
    t0 = time.time()
    completions = generate(
      model,
      tokenizer,
      [r["prompt"] for r in rows],
      cfg,
      rng=jax.random.key(seed),
      template=spec.data.template,
      batch_size=spec.eval.batch_size,
      mesh=mesh,
      progress=True,
    )
    correct, counts = score_completions(
      completions,
      [r["answer"] for r in rows],
      n,
      scorer,
      require_think=spec.rollout.require_think,
    )
    score = metrics_eval.avg_at_k(correct) if n > 1 else metrics_eval.pass_at_1(correct)
    results[name] = {
      "score": score,
      "metric": f"avg@{n}" if n > 1 else "pass@1",
      "problems": len(rows),
      "outcomes": counts,
      "seconds": round(time.time() - t0, 1),
    }
    levels = accuracy_by_level(rows, correct.mean(1).tolist())
    if levels:  # the built-in task: where the accuracy is (docs/method.md §7.1)
      results[name]["levels"] = levels
  return results


def levels_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
  """Markdown: accuracy (%) by difficulty level of each split, one row per name
  ({name: {split: {level: accuracy}}})."""
  cols = sorted(
    {
      (split, lv)
      for by_split in rows.values()
      for split, lv_acc in by_split.items()
      for lv in lv_acc
    },
    key=lambda x: (x[0], int(x[1])),
  )
  lines = [
    "| | " + " | ".join(f"{split} L{lv}" for split, lv in cols) + " |",
    "|---|" + "---|" * len(cols),
  ]
  for name, by_split in rows.items():
    cells = [by_split.get(split, {}).get(lv) for split, lv in cols]
    lines.append(
      f"| {name} | " + " | ".join("–" if v is None else f"{100 * v:.1f}" for v in cells) + " |"
    )
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Command line: python -m srft_jax.evaluate --config=... --checkpoint=...
# ----------------------------------------------------------------------------


def define_flags() -> None:
  """The CLI's flags (defined on use, so importing this module defines none)."""
  config_flags.DEFINE_config_file(
    "config", console.resolve_config("configs/default.py"), "Run config."
  )
  flags.DEFINE_string(
    "checkpoint", None, "HF checkpoint dir, or a training workdir.", required=True
  )
  flags.DEFINE_string("benchmarks", "task_id,task_ood", "Comma-separated benchmark names.")
  flags.DEFINE_string("data_dir", "", "TFDS dir of prepared benchmarks (srft_jax.data prepare).")
  flags.DEFINE_string(
    "tokenizer_dir", "", "Where the task tokenizer is cached (default: the checkpoint's workdir)."
  )
  flags.DEFINE_float("temperature", 0.6, "Sampling temperature (paper: 0.6).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus mass (paper: 1.0).")
  flags.DEFINE_integer("k", 0, "Samples a problem (0 = the benchmark's default: avg@32 or pass@1).")
  flags.DEFINE_integer("limit", 0, "Evaluate only the first N problems (0 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("name", "policy", "Row name in the table.")
  flags.DEFINE_string("out", "", "Directory for eval.json and eval.md.")


def main(argv) -> int:
  del argv
  f = flags.FLAGS
  logging.basicConfig(level=logging.INFO)
  # The run's settings as trained (a config for another machine evaluates here too).
  spec = factory.run_spec(f.config, validate=False)
  names = [n for n in f.benchmarks.split(",") if n]
  unknown = [n for n in names if n not in metrics_eval.BENCHMARKS]
  problems = []
  if unknown:
    problems.append(f"--benchmarks: unknown {unknown}; known: {sorted(metrics_eval.BENCHMARKS)}")
  if not paths.isdir(f.checkpoint):
    problems.append(f"--checkpoint: no directory {f.checkpoint!r}")
  needs_data = [
    n for n in names if n not in ("task_id", "task_ood") and n in metrics_eval.BENCHMARKS
  ]
  if needs_data and not f.data_dir:
    problems.append(
      f"--data_dir: {needs_data} need the directory `python -m srft_jax.data "
      "prepare NAME --data_dir DIR` wrote"
    )
  if problems:
    print("error: " + "\n       ".join(problems), file=sys.stderr)
    return 2
  mesh = spec.make_mesh()
  # The task tokenizer is deterministic: rebuilt (or reused) under the checkpoint dir.
  tokenizer = factory.tokenizer(spec, f.tokenizer_dir or f.checkpoint)
  model = load_policy(spec, f.checkpoint, tokenizer, mesh)
  with rewards_lib.RewardScorer(require_think=spec.rollout.require_think) as scorer:
    res = evaluate_benchmarks(
      model,
      tokenizer,
      names,
      spec,
      scorer=scorer,
      mesh=mesh,
      data_dir=f.data_dir,
      temperature=f.temperature,
      top_p=f.top_p,
      k=f.k or None,
      limit=f.limit or None,
      seed=f.seed,
    )
  table, table_json = metrics_eval.results_table({f.name: {n: r["score"] for n, r in res.items()}})
  levels = {n: r["levels"] for n, r in res.items() if r.get("levels")}
  if levels:
    table += "\n" + levels_table({f.name: levels})
  out = {"benchmarks": res, "table": table_json, "checkpoint": f.checkpoint}
  if f.out and multihost.is_main():  # a local directory or a bucket (gs://)
    paths.write_json(os.path.join(f.out, "eval.json"), out, indent=2)
    paths.write_text(os.path.join(f.out, "eval.md"), table)
  print(table)
  print(json.dumps({n: round(r["score"], 4) for n, r in res.items()}))
  return 0


def cli() -> None:
  """Runs `main` on the command line (`python -m srft_jax.evaluate`, `srft-eval`)."""
  define_flags()
  app.run(main, argv=console.resolve_config_argv(sys.argv))


if __name__ == "__main__":
  cli()
