"""The trainer: one step as rollout -> reward -> advantage -> assemble -> update,
and `fit`, the loop around it (resume, checkpoints, preemption, metrics).

Host side of a step (`Trainer.run_step`), each stage a named call:
  1. `rollout`:  n samples per prompt from the project's sampler (same model code);
  2. `score`:    every rollout and demonstration scored by the verifier, then
                 `shape_rewards` (DAPO's overlong switches) and, with dynamic
                 sampling, `informative_groups` / `take_groups`: pure functions
                 over host arrays;
  3. `assemble`: group advantages and the training batch, one jitted program
                 whose output rows are split over the data axes;
  4. `update`:   the jitted, donated train step (mini-batch updates with exact
                 micro-batch accumulation, `step.train_step`); with packing, the
                 rows' packing plan is made on the host from host masks first.
Each stage returns its value and its metrics; `run_step` merges the metrics.
Update metrics are fetched one step late so the host never stalls the device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from srft_jax import checkpoint as ckpt_lib
from srft_jax import factory
from srft_jax import lora as lora_lib
from srft_jax import metrics as metrics_lib
from srft_jax import multihost
from srft_jax import packing
from srft_jax import sampler as sampler_lib
from srft_jax import sharding as shd
from srft_jax import step as step_lib

log = logging.getLogger(__name__)
Array = jax.Array

OUTCOMES = ("correct", "wrong", "unparseable", "no_answer", "timeout")


class Trainer:
  """Owns the train state and runs steps; the host loop lives in `fit`."""

  def __init__(
    self,
    model,
    spec: factory.RunSpec,
    *,
    tokenizer,
    scorer,
    mesh,
    rules=None,
    base_path: str = "",
    teacher=None,
    teacher_path: str = "",
  ):
    self.spec = spec
    self.tokenizer = tokenizer
    self.scorer = scorer
    self.mesh = mesh
    self.rules = rules if rules is not None else model.cfg.rules  # the model's layout
    # LoRA (a model with adapters): the train state holds the adapters only;
    # the frozen base is an argument of every step, identified by its content
    # hash (and `base_path`) in the checkpoints.
    self.graphdef, self.params, self.frozen = step_lib.split_policy(model)
    self.frozen_sh = self.lora_meta = None
    if self.frozen is not None:
      self.frozen_sh = shd.state_shardings(self.frozen, mesh, self.rules)
      self.frozen = jax.device_put(self.frozen, self.frozen_sh)
      lcfg = lora_lib.config_of(model)
      self.lora_meta = {
        "base_path": base_path,
        "base_hash": lora_lib.base_hash(self.frozen),
        "rank": lcfg.rank,
        "alpha": lcfg.alpha,
        "targets": list(lcfg.targets),
      }
    # On-policy distillation's frozen teacher (docs/method.md §19): its own
    # graphdef (any family or size), its params sharded by the same rules and
    # passed to every step with a teacher term, never donated, never in the
    # train state; the checkpoints record its path and content hash, not it.
    self.teacher_graphdef = self.teacher = self.teacher_sh = self.teacher_meta = None
    # A teacher with fewer unembedding rows than the student (one tokenizer padded
    # to different sizes): rollouts draw only ids it has (docs/method.md §19.6).
    self.teacher_rows = teacher.cfg.vocab_size if teacher is not None else 0
    if teacher is not None:
      self.teacher_graphdef, teacher_params = nnx.split(teacher)
      self.teacher_sh = shd.state_shardings(teacher_params, mesh, self.rules)
      self.teacher = jax.device_put(teacher_params, self.teacher_sh)
      self.teacher_meta = {"path": teacher_path, "hash": lora_lib.base_hash(self.teacher)}
    self.state = None
    self.stage: factory.Stage | None = None
    # The KL term's reference, sharded like the policy; kept only where a stage
    # has a KL term.
    self.ref_params = self.ref_sh = None
    if spec.reference:
      self.ref_sh = shd.state_shardings(self.params, mesh, self.rules)
      self.ref_params = jax.device_put(
        step_lib.reference_params(self.params, self.frozen), self.ref_sh
      )

  # -- stages and state -------------------------------------------------------
  def enter_stage(self, stage: factory.Stage, *, fresh_optimizer: bool) -> None:
    """This stage's optimizer, sampling and jitted programs; a fresh optimizer
    state (at the stage's first step) keeps the parameters and the step count."""
    self.tx, self.schedule = self.spec.optimizer(stage)
    self.step_cfg = stage.step
    self._sampling = None  # the stage's rollout sampling, built on its first rollout
    self._step_fn = self._prepare_fn = None  # jitted on the stage's first batch (its shapes)
    if fresh_optimizer or self.state is None:
      params = self.params if self.state is None else self.state["params"]
      state = step_lib.init_train_state(params, self.tx)
      if self.state is not None:
        state["step"] = self.state["step"]
      self.state = self._place(state)
    self.stage = stage

  def restore(self, state: dict, stage: factory.Stage, *, at_stage_start: bool) -> None:
    """Continue from a restored train state inside `stage`. At the stage's
    first step an unbroken run starts the stage with a fresh optimizer, so the
    stage is entered again (fresh) on the next step."""
    self.state = None
    self.params = state["params"]
    self.enter_stage(stage, fresh_optimizer=True)
    self.state = self._place(state)
    if at_stage_start:
      self.stage = None

  def _place(self, state):
    self.state_sh = step_lib.state_shardings(state, self.mesh, self.rules)
    return jax.device_put(state, self.state_sh)

  def abstract_state(self, stage: factory.Stage):
    """Sharded ShapeDtypeStructs of the train state (Orbax restore target)."""
    tx, _ = self.spec.optimizer(stage)
    return step_lib.abstract_train_state(self.params, tx, self.mesh, self.rules)

  def model(self):
    params = self.state["params"] if self.state is not None else self.params
    if self.frozen is not None:
      return nnx.merge(self.graphdef, params, self.frozen)
    return nnx.merge(self.graphdef, params)

  # -- one step -----------------------------------------------------------------
  @property
  def draws_per_step(self) -> int:
    """Data batches one step consumes: `rollout.oversample` with dynamic
    sampling (groups are then chosen among them), else 1."""
    r = self.spec.rollout
    on = r.dynamic_sampling and self.stage is not None and self.stage.layout.n_rollouts > 0
    return r.oversample if on else 1

  def run_step(self, batch: dict, step: int, rng: Array) -> tuple[dict, dict]:
    """rollout -> reward -> advantage + assemble -> update.

    `batch` holds `draws_per_step` data batches (`merge_batches`). Returns
    (host metrics, device metrics); the device metrics are not fetched.
    """
    layout, r = self.stage.layout, self.spec.rollout
    t0 = time.perf_counter()
    prompts = self.global_batch(batch)
    rollouts, rollout_metrics = self.rollout(prompts, rng)
    t1 = time.perf_counter()
    raw, outcome_counts = self.score(batch, rollouts)
    scored = shape_rewards(raw, rollouts, layout, r, self.spec.data.max_response_len)
    keep = None
    if r.dynamic_sampling and layout.n_rollouts:
      keep = informative_groups(scored.correct, scored.correct.shape[0] // self.draws_per_step)
    t2 = time.perf_counter()
    host = {
      **rollout_metrics,
      **reward_metrics(scored, layout, outcome_counts),
      **(dynamic_metrics(scored.correct, keep) if keep is not None else {}),
    }
    if keep is not None:
      prompts, rollouts, scored = take_groups(keep, prompts, rollouts, scored, layout)
    train_batch = self.assemble(prompts, rollouts, scored)
    metrics = self.update(train_batch, step, row_mask(prompts, rollouts, layout))
    host["time/sample_s"] = t1 - t0
    host["time/score_s"] = t2 - t1
    host["time/update_dispatch_s"] = time.perf_counter() - t2
    return host, metrics

  def global_batch(self, batch: dict) -> dict[str, np.ndarray]:
    """Every host holds the whole (small) batch of prompts and demonstrations in
    process order, so global row order never depends on the device layout."""
    keys = ("prompt_tokens", "prompt_mask", "demo_tokens", "demo_mask")
    return {k: multihost.gather(batch[k]) for k in keys}

  def rollout(self, prompts: dict, rng: Array) -> tuple[Rollouts | None, dict]:
    """(n on-policy samples a prompt, their metrics); None when the stage has
    no rollout term."""
    n = self.stage.layout.n_rollouts
    if not n:
      return None, {}
    if self._sampling is None:
      self._sampling = self.spec.sampling(self.tokenizer, n=n)
      if 0 < self.teacher_rows < self.model().cfg.vocab_size:
        self._sampling = dataclasses.replace(self._sampling, vocab_limit=self.teacher_rows)
    out = sampler_lib.sample(
      self.model(),
      prompts["prompt_tokens"],
      prompts["prompt_mask"],
      rng,
      self._sampling,
      mesh=self.mesh,
    )
    tokens, mask = multihost.gather(out.tokens), multihost.gather(out.mask)
    lengths = mask.sum(1)
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    truncated = ~np.isin(last, list(self.tokenizer.stop_ids))
    metrics = {
      "rollout/length_mean": float(lengths.mean()),
      "rollout/truncated_frac": float(np.mean(truncated)),
      "tokens/sampled": float(lengths.sum()),
    }
    return Rollouts(out.tokens, out.mask, out.logprobs, tokens, mask, lengths, truncated), metrics

  def score(self, batch: dict, rollouts: Rollouts | None) -> tuple[np.ndarray, np.ndarray]:
    """(the verifier's rewards [prompts, g] of every augmented group: each
    prompt's rollouts, then its demos; outcome counts in OUTCOMES order). Each
    host decodes and scores only its own prompts' rows; both are gathered."""
    layout = self.stage.layout
    n, d, g = layout.n_rollouts, layout.n_demos, layout.size
    b_local = batch["prompt_tokens"].shape[0]
    roll_texts = []
    if n:
      lo = jax.process_index() * b_local * n
      rows = slice(lo, lo + b_local * n)
      roll_texts = self.tokenizer.batch_decode(rollouts.host_tokens[rows], rollouts.host_mask[rows])
    demo_texts = self.tokenizer.batch_decode(batch["demo_tokens"], batch["demo_mask"]) if d else []
    texts, truths = [], []
    for i in range(b_local):
      texts += roll_texts[i * n : (i + 1) * n]
      texts += demo_texts[i : i + 1] * d
      truths += [batch["answers"][i]] * g
    rewards_local, outcomes = self.scorer.score(texts, truths)
    rewards = multihost.gather(rewards_local.astype(np.float32)).reshape(-1, g)
    counts = multihost.gather(np.array([[sum(x == o for x in outcomes) for o in OUTCOMES]]))
    return rewards, counts.sum(0)

  def _put(self, x) -> Array:
    """A host array as a global array, rows over the data axes."""
    return shd.put_global(x, shd.batch_sharding(self.mesh, x.ndim, self.rules, x.shape))

  def assemble(self, prompts: dict, rollouts: Rollouts | None, scored: Scored) -> dict:
    """The training batch: [prompts x g, P + R] rows with their group
    advantages (docs/method.md §1.3), split over the data axes; one program."""
    p = {k: self._put(v) for k, v in prompts.items()}
    r = self.spec.rollout
    # Static per run (a weight array only where a switch can zero rows): one trace.
    row_weight = (
      self._put(scored.weights.reshape(-1)) if (r.overlong_filter or r.dynamic_sampling) else None
    )
    args = (
      p["prompt_tokens"],
      p["prompt_mask"],
      rollouts.tokens if rollouts is not None else None,
      rollouts.mask if rollouts is not None else None,
      rollouts.logprobs if rollouts is not None else None,
      p["demo_tokens"],
      p["demo_mask"],
      self._put(scored.rewards.reshape(-1)),
      row_weight,
    )
    if self._prepare_fn is None:
      self._prepare_fn = step_lib.jit_prepare_batch(
        args, self.stage.layout, self.stage.advantage, self.mesh, self.rules
      )
    return self._prepare_fn(*args)

  def update(self, train_batch: dict, step: int, mask: np.ndarray) -> dict:
    """The jitted train step on `train_batch`, whose real tokens are `mask`
    ([rows, T] on the host: with packing, the plan is made from it);
    returns its (unfetched) metrics."""
    cfg = self.step_cfg
    plan = None
    if cfg.pack_len:  # docs/method.md §18
      starts, lengths = packing.row_extents(mask)
      plan = packing.make_plan(
        starts,
        lengths,
        row_len=mask.shape[1],
        pack_len=cfg.pack_len,
        pack_rows=cfg.pack_rows,
        minibatches=cfg.minibatches,
        microbatches=cfg.microbatches,
      )
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    if cfg.distill and self.teacher is None:
      raise ValueError(f"stage {self.stage.name!r} has a teacher term: the Trainer needs `teacher`")
    if self._step_fn is None:
      batch_sh = step_lib.batch_shardings(train_batch, self.mesh, self.rules)
      ref_sh = self.ref_sh if cfg.reference else None
      pack_sh = None if plan is None else replicated
      teacher = (self.teacher_sh, self.teacher_graphdef) if cfg.distill else (None, None)
      self._step_fn = step_lib.jit_train_step(
        self.graphdef,
        self.tx,
        cfg,
        self.state_sh,
        batch_sh,
        ref_sh,
        self.frozen_sh,
        pack_sh,
        *teacher,
      )
    ref = self.ref_params if cfg.reference else None
    plan_arg = None if plan is None else {k: shd.put_global(v, replicated) for k, v in plan.items()}
    if cfg.distill:  # jit_train_step's argument layouts
      args = (self.frozen, plan_arg, self.teacher)
    elif plan is not None:
      args = (self.frozen, plan_arg)
    else:
      args = () if self.frozen is None else (self.frozen,)
    with jax.set_mesh(self.mesh):  # the model's logical activation constraints apply
      self.state, metrics = self._step_fn(self.state, train_batch, ref, *args)
    metrics = dict(metrics)
    lengths = mask.sum(1)
    metrics["batch/real_token_fraction"] = packing.real_token_fraction(lengths, plan, mask.shape[1])
    metrics["tokens/trained"] = jnp.sum(train_batch["response_mask"])
    metrics["optim/lr"] = self.schedule(step - self.stage.start)
    metrics["optim/grad_norm"] = metrics.pop("grad_norm")
    return metrics


@dataclasses.dataclass
class Rollouts:
  """One step's samples: global device arrays for the batch, host copies for
  decoding and metrics."""

  tokens: Array  # [prompts * n, R] int32
  mask: Array
  logprobs: Array  # the sampler's log-probs of the drawn tokens, [prompts * n, R]
  host_tokens: np.ndarray
  host_mask: np.ndarray
  lengths: np.ndarray  # [prompts * n]
  truncated: np.ndarray  # [prompts * n] bool: no stop token


class Scored(NamedTuple):
  """One step's rewards on the host, [prompts, g] (each prompt's rollouts, then its demos)."""

  rewards: np.ndarray  # the verifier's, plus DAPO's overlong shaping on rollouts
  weights: np.ndarray  # loss weight of each row: 0 where its tokens must not reach the loss
  correct: np.ndarray  # [prompts, n]: the rollouts' raw verifier outcome, before any shaping
  shaping: np.ndarray | None = None  # [prompts, n]: the overlong shaping added (None: off)


def row_mask(prompts: dict, rollouts: Rollouts | None, layout) -> np.ndarray:
  """The real tokens [prompts * g, P + R] of the training batch's rows, on the
  host (`step.assemble_batch`'s layout: each prompt's rollouts, then its demos)."""
  pm, dm = prompts["prompt_mask"], prompts["demo_mask"]
  b, r = dm.shape
  n, d, g = layout.n_rollouts, layout.n_demos, layout.size
  parts = []
  if n:
    parts.append(np.asarray(rollouts.host_mask).reshape(b, n, r))
  if d:
    parts.append(np.repeat(dm[:, None], d, axis=1))
  resp = np.concatenate(parts, axis=1).reshape(b * g, r)
  return np.concatenate([np.repeat(pm, g, axis=0), resp], axis=1).astype(np.int32)


def shape_rewards(raw: np.ndarray, rollouts: Rollouts | None, layout, r, max_len: int) -> Scored:
  """The verifier's rewards `raw` [prompts, g] with DAPO's trainer switches
  (docs/method.md §2.8): overlong shaping added to rollout rewards, and the
  overlong filter's zero weights on truncated rollouts."""
  n = layout.n_rollouts
  rewards, weights, shaping = raw, np.ones_like(raw), None
  if n and r.overlong_buffer:
    shaping = r.overlong_penalty * overlong_reward(
      rollouts.lengths, rollouts.truncated, max_len, r.overlong_buffer
    ).reshape(-1, n)
    rewards = raw.copy()
    rewards[:, :n] += shaping
  if n and r.overlong_filter:
    weights[:, :n] = np.where(rollouts.truncated.reshape(-1, n), 0.0, 1.0)
  return Scored(rewards, weights, raw[:, :n].copy(), shaping)


def reward_metrics(scored: Scored, layout, outcome_counts) -> dict:
  """What the step's rewards say: raw rollout success, solved and all-equal
  groups, the overlong shaping, demonstration rewards, outcome counts."""
  n = layout.n_rollouts
  out = {}
  if n:
    raw = scored.correct
    out["reward/rollout_mean"] = float(raw.mean())
    out["reward/rollout_group_solved"] = float((raw.max(1) > 0).mean())
    out["reward/rollout_group_allsame"] = float((raw.std(1) == 0).mean())
    if scored.shaping is not None:
      out["reward/overlong_mean"] = float(scored.shaping.mean())
  if layout.n_demos:
    out["reward/demo_mean"] = float(scored.rewards[:, n:].mean())
  for o, cnt in zip(OUTCOMES, outcome_counts):
    out[f"outcomes/{o}"] = float(cnt)
  return out


def dynamic_metrics(correct: np.ndarray, keep: np.ndarray) -> dict:
  """Dynamic sampling (DAPO): the drawn groups that were informative, and the
  slots left to zero-weight fillers."""
  informative = np.mean(correct.max(1) != correct.min(1)) if len(correct) else 0.0
  return {
    "dynamic/informative_frac": float(informative),
    "dynamic/filled_slots": float(np.sum(keep < 0)),
  }


def overlong_reward(
  lengths: np.ndarray, truncated: np.ndarray, max_len: int, buffer: int
) -> np.ndarray:
  """DAPO's soft overlong penalty (docs/method.md §2.8), before its scale: 0 up
  to max_len - buffer tokens, then falling linearly to -1 at max_len; -1 for
  a truncated rollout."""
  lengths = np.asarray(lengths, np.float64)
  soft = max_len - buffer
  out = np.where(lengths <= soft, 0.0, (soft - lengths) / buffer)
  return np.where(truncated, -1.0, out).astype(np.float32)


def informative_groups(correct: np.ndarray, want: int) -> np.ndarray:
  """Indices of the first `want` groups (rows of `correct`, [groups, n]) whose
  rollouts are not all equally correct, in data order; -1 fills the slots
  left over (DAPO's dynamic sampling, docs/method.md §2.8)."""
  informative = np.flatnonzero(correct.max(1) != correct.min(1))
  keep = np.full(want, -1, np.int64)
  keep[: min(want, len(informative))] = informative[:want]
  return keep


def take_groups(keep: np.ndarray, prompts: dict, rollouts: Rollouts, scored: Scored, layout):
  """The groups `keep` picks (prompt indices; -1: a zero-weight filler)."""
  n = layout.n_rollouts
  src = np.where(keep < 0, 0, keep)
  prompts = {k: v[src] for k, v in prompts.items()}
  rows = (src[:, None] * n + np.arange(n)[None]).reshape(-1)
  idx = jnp.asarray(rows, jnp.int32)
  rollouts = dataclasses.replace(
    rollouts,
    tokens=jnp.take(rollouts.tokens, idx, axis=0),
    mask=jnp.take(rollouts.mask, idx, axis=0),
    logprobs=jnp.take(rollouts.logprobs, idx, axis=0),
    host_tokens=rollouts.host_tokens[rows],
    host_mask=rollouts.host_mask[rows],
    lengths=rollouts.lengths[rows],
    truncated=rollouts.truncated[rows],
  )
  weights = np.where((keep < 0)[:, None], 0.0, scored.weights[src])
  shaping = None if scored.shaping is None else scored.shaping[src]
  return prompts, rollouts, Scored(scored.rewards[src], weights, scored.correct[src], shaping)


def merge_batches(batches: list[dict], tokenizer) -> dict:
  """Data batches as one: rows concatenated, prompts left padded to the widest."""
  if len(batches) == 1:
    return batches[0]
  width = max(b["prompt_tokens"].shape[1] for b in batches)

  def left_pad(x, value):
    return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)

  out = {}
  for k in batches[0]:
    vals = [b[k] for b in batches]
    if k in ("prompt_tokens", "prompt_mask"):
      pad = tokenizer.pad_id if k == "prompt_tokens" else 0
      out[k] = np.concatenate([left_pad(v, pad) for v in vals])
    elif isinstance(vals[0], np.ndarray):
      out[k] = np.concatenate(vals)
    else:
      out[k] = [x for v in vals for x in v]
  return out


def _progress_postfix(row: dict) -> dict[str, str]:
  """What the progress bar shows: the rollout reward where the step has
  rollouts, the loss, and trained tokens a second."""
  out = {}
  if "reward/rollout_mean" in row:
    out["reward"] = f"{row['reward/rollout_mean']:.3f}"
  out["loss"] = f"{row.get('loss/loss', float('nan')):.3f}"
  if row.get("time/step_s"):
    out["tok/s"] = f"{row.get('tokens/trained', 0.0) / row['time/step_s']:.0f}"
  return out


def check_resume_base(ckpt: ckpt_lib.Checkpointer, lora_meta: dict | None) -> None:
  """Refuses (ConfigError) to resume adapters on another base, or to mix a LoRA
  run and a full fine-tuning run in one checkpoint directory."""
  saved = ckpt.read_meta()
  if saved is None:
    return
  old = saved.get("lora")
  if old is None and lora_meta is None:
    return
  where = f"{ckpt.directory} (step {saved.get('step')})"
  if old is None or lora_meta is None:
    kinds = ("full fine-tuning", "LoRA adapters") if old is None else ("LoRA", "the full model")
    raise factory.ConfigError(
      f"config.lora.rank: {where} holds a {kinds[0]} state, this run trains {kinds[1]} "
      "(give another workdir, or the config that wrote it)"
    )
  if old["base_hash"] != lora_meta["base_hash"]:
    raise factory.ConfigError(
      f"config.model: {where} holds LoRA adapters of another base model: "
      f"{old['base_path'] or '(random init)'} (content hash {old['base_hash'][:16]}), "
      f"this run's base is {lora_meta['base_path'] or '(random init)'} "
      f"(content hash {lora_meta['base_hash'][:16]}); refusing to resume"
    )
  for k in ("rank", "alpha", "targets"):
    if old.get(k) != lora_meta.get(k):
      raise factory.ConfigError(
        f"config.lora.{k}: {where} holds adapters with {k}={old.get(k)!r}, "
        f"this run asks for {lora_meta.get(k)!r}"
      )


def check_resume_teacher(ckpt: ckpt_lib.Checkpointer, teacher_meta: dict | None) -> None:
  """Refuses (ConfigError) to resume a run distilled from one teacher with
  another, or with none (docs/method.md §19.6): the teacher is not in the
  checkpoint, its path and content hash are. A moved teacher (same hash) resumes."""
  saved = ckpt.read_meta()
  if saved is None:
    return
  old = saved.get("teacher")
  if old is None and teacher_meta is None:
    return
  where = f"{ckpt.directory} (step {saved.get('step')})"

  def named(meta):
    return f"{meta['path'] or '(no path)'} (content hash {meta['hash'][:16]})"

  if old is None or teacher_meta is None:
    raise factory.ConfigError(
      f"config.teacher.hf_path: {where} holds a run "
      + ("trained without a teacher" if old is None else f"distilled from {named(old)}")
      + ", this run "
      + (f"distills from {named(teacher_meta)}" if old is None else "has no teacher")
      + "; refusing to resume (give another workdir, or the config that wrote it)"
    )
  if old["hash"] != teacher_meta["hash"]:
    raise factory.ConfigError(
      f"config.teacher.hf_path: {where} holds a run distilled from another teacher: "
      f"{named(old)}, this run's teacher is {named(teacher_meta)}; refusing to resume"
    )


def fit(trainer: Trainer, data_iter, *, workdir: str, eval_hook=None) -> dict:
  """The training loop of `trainer.spec`: resume, steps, checkpoints,
  preemption, metrics, the progress bar (labelled with the spec's name).

  Returns {"status": "done" | "preempted" | "nonfinite", "step": last step}.
  """
  spec = trainer.spec
  steps, stages = spec.steps, spec.stages
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=spec.checkpoint.keep,
    async_save=spec.checkpoint.async_save,
  )
  writer = metrics_lib.MetricsWriter(
    os.path.join(workdir, "logs"), tensorboard=spec.log.tensorboard
  )
  guard = ckpt_lib.PreemptionGuard()
  base_key = jax.random.key(spec.seed)
  meta = {"config": spec.config_json}
  if trainer.lora_meta is not None:
    meta["lora"] = trainer.lora_meta  # the base the adapters belong to (checked on resume)
  if trainer.teacher_meta is not None:
    meta["teacher"] = trainer.teacher_meta  # the teacher distilled from (checked on resume)

  # Resume: the newest readable checkpoint decides the step, stage and data position.
  start = 0
  check_resume_base(ckpt, trainer.lora_meta)
  check_resume_teacher(ckpt, trainer.teacher_meta)
  restored = (
    ckpt.restore(trainer.abstract_state(stages[0]), delete_unreadable=True)
    if ckpt.latest_step() is not None
    else None
  )
  if restored is not None:
    start, state, data_state, _ = restored
    if start > steps:
      raise factory.ConfigError(
        f"config.steps={steps}: {ckpt.directory} already holds step {start}; "
        "give at least that many steps or another workdir"
      )
    data_iter.set_state(data_state)
    stage = spec.stage_at(start)
    trainer.restore(state, stage, at_stage_start=start == stage.start)
    log.info("resumed from step %d (%s)", start, ckpt.directory)
  writer.drop_from(start)  # rows of steps from the checkpoint on (all: none) are written again

  def save(step):
    # A SIGTERM (or the final save) right after a periodic save of the same step
    # must not save twice: Orbax raises StepAlreadyExistsError.
    if ckpt.latest_step() == step:
      return
    writer.flush()  # the rows before `step` reach the workdir (a bucket) before its checkpoint
    ckpt.save(step, trainer.state, data_iter.get_state(), {"step": step, **meta})

  status = "done"
  pending = None  # (step, host metrics, device metrics) of the previous step
  bar = None
  if spec.log.progress and multihost.is_main():
    bar = tqdm(total=steps, initial=start, desc=spec.name, dynamic_ncols=True, leave=True)

  def flush(p):
    step, host, dev = p
    dev = jax.device_get(dev)
    row = {**host, **{k if "/" in k else f"loss/{k}": float(v) for k, v in dev.items()}}
    writer.write(step, row)
    if bar is not None:
      bar.set_postfix(_progress_postfix(row), refresh=False)
      bar.update(1)
    return row

  last = None
  step = start
  try:
    for step in range(start, steps):
      stage = spec.stage_at(step)
      current = trainer.stage
      if current is None or (current.name, current.start) != (stage.name, stage.start):
        trainer.enter_stage(stage, fresh_optimizer=step == stage.start)
      t0 = time.perf_counter()
      evals_now = {}
      if eval_hook is not None and step % spec.eval.every == 0:
        evals_now = eval_hook(trainer.model())
      batch = merge_batches(
        [next(data_iter) for _ in range(trainer.draws_per_step)], trainer.tokenizer
      )
      rng = jax.random.fold_in(base_key, step)
      host, dev = trainer.run_step(batch, step, rng)
      host.update(data_iter.stats())
      diverged = False
      if pending is not None:
        last = flush(pending)
        diverged = last.get("nonfinite/streak", 0) >= spec.max_nonfinite_streak
      host["time/step_s"] = time.perf_counter() - t0
      host.update(evals_now)
      pending = (step, host, dev)
      done = step + 1
      # A checkpoint at `done` holds every metrics row before it (a kill right
      # after it loses none); the state saved is the one after this step.
      if diverged:
        status = "nonfinite"
      elif guard.should_stop():
        status = "preempted"
      periodic = bool(spec.checkpoint.every) and done % spec.checkpoint.every == 0
      if status != "done" or (done < steps and (periodic or done == stage.start + stage.steps)):
        last, pending = flush(pending), None
        save(done)
      if status != "done":
        break
    if pending is not None:
      last = flush(pending)
    if status == "done" and eval_hook is not None and steps % spec.eval.every == 0:
      writer.write(steps, eval_hook(trainer.model()))
    if status == "done":
      save(steps)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    guard.restore_handlers()
    if bar is not None:
      bar.close()
  if status == "nonfinite":
    raise FloatingPointError(
      f"{spec.max_nonfinite_streak} non-finite updates in a row at step {step}; "
      f"checkpoint saved in {os.path.join(workdir, 'checkpoints')}"
    )
  return {
    "status": status,
    "step": int(jax.device_get(trainer.state["step"])) if trainer.state else start,
    "last_metrics": last,
  }
