"""SRFT training: sample -> reward -> advantage -> loss -> update (METHOD.md §1).

One step, host side:
  1. a batch of prompts with their demonstrations (data pipeline);
  2. n rollouts per prompt from the project's sampler (same model code);
  3. every rollout and demonstration scored by the reward function;
  4. the augmented group (rollouts + demos) packed on device, group advantages;
  5. `train_step`: one jitted, donated update per mini-batch with exact
     micro-batch gradient accumulation.
Update metrics are fetched one step late so the host never stalls the device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import sharding as shd

log = logging.getLogger(__name__)
Array = jax.Array


# ----------------------------------------------------------------------------
# Static configuration of the jitted pieces (built once from the ConfigDict).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything the jitted train step needs; hashable, never a ConfigDict."""

  loss: obj.LossConfig
  minibatches: int = 1  # optimizer updates per rollout batch (paper: 2)
  microbatches: int = 1  # gradient-accumulation chunks per update
  temperature: float = 1.0  # log-probs / entropy of softmax(logits / T)
  logit_chunk: int = 1024  # rows of [T, V] logits computed at a time
  # > 0: rows are [prompt | response of this many tokens] (assemble_batch), so
  # log-probs/entropy are computed for the response's target columns only and
  # the prompt's LM-head work is skipped (its columns get 0; the loss masks them).
  response_len: int = 0
  # > 1 (with response_len): rows come in prompt-major groups of this many rows
  # sharing one prompt (assemble_batch's layout); the forward then runs each
  # prompt once per group (Transformer.forward_shared_prefix), not once per row.
  group: int = 0


@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """How one prompt's augmented group is laid out: n rollouts then d demos.

  `demos_in_group`: the demonstrations join the rollouts' advantage statistics
  (the augmented group of SRFT / LUFFY, METHOD.md §1.3). Off where no loss term
  uses a demo's advantage (`sft_plus_rl`: GRPO's advantages over its rollouts
  alone, beside plain SFT); demo rows then get advantage 0.
  """

  n_rollouts: int
  n_demos: int
  demos_in_group: bool = True

  @property
  def size(self) -> int:
    return self.n_rollouts + self.n_demos


SCHEDULES = ("constant", "linear", "cosine")


def make_optimizer(
  lr: float,
  *,
  steps: int,
  warmup_steps: int = 0,
  schedule: str = "constant",
  weight_decay: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  clip_norm: float | None = 1.0,
  updates_per_step: int = 1,
):
  """AdamW with global-norm clipping (METHOD.md §5) and the learning-rate schedule.

  The schedule is in training steps (`steps`, `warmup_steps`); a step makes
  `updates_per_step` optimizer updates (its mini-batches), which all use that
  step's rate. Returns (optimizer, schedule of the step).
  """
  if schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif schedule == "linear":
    decay = optax.linear_schedule(lr, 0.0, max(steps - warmup_steps, 1))
  elif schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(steps - warmup_steps, 1))
  else:
    raise ValueError(f"optim.schedule: unknown schedule {schedule!r}")
  sched = (
    decay
    if warmup_steps <= 0
    else optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])
  )
  per_update = sched if updates_per_step == 1 else (lambda count: sched(count // updates_per_step))
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(per_update, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts), sched


# ----------------------------------------------------------------------------
# Pure functions: log-probs, batch assembly, the train step.
# ----------------------------------------------------------------------------


def sequence_logprobs(
  graphdef,
  params,
  tokens_BT,
  mask_BT,
  *,
  temperature=1.0,
  chunk=1024,
  last: int = 0,
  group: int = 0,
):
  """Teacher-forced log-prob of each next token and the full-vocab entropy, [B, T-1].

  Logits are computed in chunks from the final hidden states, so [B, T, V]
  float32 logits never exist (objectives.chunked_logprobs_and_entropy). With
  `last` > 0 only the last `last` target columns are computed; the columns
  before them are 0 (static shapes, no LM-head work spent on the prompt).
  With `group` > 1 as well, rows [i*group, (i+1)*group) share the prompt
  (the first T - last columns) and it runs once per group.
  """
  model = nnx.merge(graphdef, params)
  t = tokens_BT.shape[1]
  first = t - 1 - last if 0 < last < t else 0
  if first and group > 1:
    p = first + 1
    hp, hr = model.forward_shared_prefix(
      tokens_BT[::group, :p], mask_BT[::group, :p], tokens_BT[:, p:], mask_BT[:, p:]
    )
    # Response token 0 is predicted from the prompt's last position (shared).
    hidden = jnp.concatenate([jnp.repeat(hp[:, -1:], group, axis=0), hr[:, :-1]], axis=1)
  else:
    positions = model_lib.positions_from_mask(mask_BT)
    hidden, _ = model(tokens_BT, positions, mask_BT, return_hidden=True)
    hidden = hidden[:, first:-1]
  logp, ent = obj.chunked_logprobs_and_entropy(
    hidden, model.unembed(), tokens_BT[:, first + 1 :], temperature=temperature, chunk_size=chunk
  )
  if first:
    pad = ((0, 0), (first, 0))
    logp, ent = jnp.pad(logp, pad), jnp.pad(ent, pad)
  return logp, ent


def assemble_batch(
  prompt_tokens_bP,
  prompt_mask_bP,
  roll_tokens,
  roll_mask,
  roll_logp,
  demo_tokens_bR,
  demo_mask_bR,
  rewards,
  *,
  layout: GroupLayout,
  adv_normalize_std: bool = True,
  adv_eps: float = 1e-6,
) -> dict[str, Array]:
  """Packs rollouts and demonstrations into one [b*g, P+R] training batch.

  Rows are prompt-major: prompt i owns rows [i*g, (i+1)*g), its n rollouts
  first, then its d demonstrations. `rewards` follows the same order. Loss
  arrays are aligned with next-token targets (columns 0..T-2).
  """
  b, p = prompt_tokens_bP.shape
  n, d, g = layout.n_rollouts, layout.n_demos, layout.size
  r = demo_tokens_bR.shape[1]
  parts_tok, parts_mask, parts_logp = [], [], []
  if n:
    parts_tok.append(roll_tokens.reshape(b, n, r))
    parts_mask.append(roll_mask.reshape(b, n, r))
    parts_logp.append(roll_logp.reshape(b, n, r).astype(jnp.float32))
  if d:
    parts_tok.append(jnp.repeat(demo_tokens_bR[:, None], d, axis=1))
    parts_mask.append(jnp.repeat(demo_mask_bR[:, None], d, axis=1))
    parts_logp.append(jnp.zeros((b, d, r), jnp.float32))
  resp_tok = jnp.concatenate(parts_tok, axis=1).reshape(b * g, r)
  resp_mask = jnp.concatenate(parts_mask, axis=1).reshape(b * g, r).astype(jnp.int32)
  resp_logp = jnp.concatenate(parts_logp, axis=1).reshape(b * g, r)
  prompt_tok = jnp.repeat(prompt_tokens_bP, g, axis=0)
  prompt_mask = jnp.repeat(prompt_mask_bP, g, axis=0).astype(jnp.int32)
  tokens = jnp.concatenate([prompt_tok, resp_tok], axis=1)
  mask = jnp.concatenate([prompt_mask, resp_mask], axis=1)
  # Target column t predicts token t+1: response token j sits at column p+j-1.
  response_mask = jnp.concatenate([jnp.zeros_like(prompt_mask), resp_mask], axis=1)[:, 1:]
  old_logp = jnp.concatenate([jnp.zeros((b * g, p), jnp.float32), resp_logp], axis=1)[:, 1:]
  is_demo = jnp.tile(jnp.arange(g) >= n, b)
  group_ids = jnp.arange(b * g) // g
  if d and not layout.demos_in_group:  # each demo row alone: advantage 0
    group_ids = jnp.where(is_demo, b + jnp.arange(b * g), group_ids)
  rewards = rewards.astype(jnp.float32)
  advantages = obj.group_advantages(
    rewards, group_ids, normalize_std=adv_normalize_std, eps=adv_eps
  )
  return {
    "tokens": tokens,
    "mask": mask,
    "response_mask": response_mask,
    "old_logp": old_logp * response_mask,
    "is_demo": is_demo,
    "rewards": rewards,
    "advantages": advantages,
  }


def _split(tree, n: int):
  """[B, ...] -> [n, B/n, ...] for every leaf."""
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), tree)


def train_step(graphdef, tx, cfg: StepConfig, state: dict, batch: dict) -> tuple[dict, dict]:
  """One rollout batch: `cfg.minibatches` optimizer updates, each accumulating
  gradients over `cfg.microbatches` chunks with the full mini-batch's loss
  denominators (exact, METHOD.md §3). Non-finite updates are skipped and counted.
  """
  loss_cfg = cfg.loss

  def loss_fn(params, mb, denominators, batch_entropy):
    logp, ent = sequence_logprobs(
      graphdef,
      params,
      mb["tokens"],
      mb["mask"],
      temperature=cfg.temperature,
      chunk=cfg.logit_chunk,
      last=cfg.response_len,
      group=cfg.group,
    )
    return obj.srft_loss(
      logp, ent, mb, loss_cfg, denominators=denominators, batch_entropy=batch_entropy
    )

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(state, minibatch):
    denominators = obj.loss_denominators(minibatch, loss_cfg)
    micro = _split(minibatch, cfg.microbatches)
    batch_entropy = None
    # With one micro-batch the loss's own forward sees the whole mini-batch and
    # computes H itself (batch_entropy=None): no extra forward pass.
    if loss_cfg.entropy_granularity == "batch" and cfg.microbatches > 1:

      def ent_sums(carry, mb):
        _, ent = sequence_logprobs(
          graphdef,
          state["params"],
          mb["tokens"],
          mb["mask"],
          temperature=cfg.temperature,
          chunk=cfg.logit_chunk,
          last=cfg.response_len,
          group=cfg.group,
        )
        s, c = obj.entropy_sum_and_count(ent, mb["response_mask"])
        return (carry[0] + s, carry[1] + c), None

      (s, c), _ = jax.lax.scan(ent_sums, (0.0, 0.0), micro)
      batch_entropy = jax.lax.stop_gradient(s / jnp.maximum(c, 1.0))

    def accumulate(carry, mb):
      grads, loss = carry
      (l, aux), g = grad_fn(state["params"], mb, denominators, batch_entropy)
      return (jax.tree.map(jnp.add, grads, g), loss + l), aux

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    (grads, loss), aux = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)
    aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), aux)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    new_state = {
      "params": keep(params, state["params"]),
      "opt_state": keep(opt_state, state["opt_state"]),
      "step": state["step"],
      "nonfinite_total": state["nonfinite_total"] + (~ok).astype(jnp.int32),
      "nonfinite_streak": jnp.where(ok, 0, state["nonfinite_streak"] + 1).astype(jnp.int32),
    }
    metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "skipped": (~ok).astype(jnp.float32)}
    return new_state, metrics

  state, metrics = jax.lax.scan(update, state, _split(batch, cfg.minibatches))
  metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), metrics)
  metrics["skipped"] = metrics["skipped"] * cfg.minibatches
  state = {**state, "step": state["step"] + 1}
  metrics["nonfinite/total"] = state["nonfinite_total"]
  metrics["nonfinite/streak"] = state["nonfinite_streak"]
  return state, metrics


def init_train_state(params, tx) -> dict:
  return {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "nonfinite_total": jnp.zeros((), jnp.int32),
    "nonfinite_streak": jnp.zeros((), jnp.int32),
  }


def state_shardings(state, mesh, rules):
  """Shardings of the train state: params (and optimizer moments) by logical
  axes; everything else replicated."""
  param_sh = shd.state_shardings(state["params"], mesh, rules)
  param_leaves = jax.tree.leaves(param_sh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  flat_params = jax.tree.leaves(state["params"])
  by_shape = {}
  for leaf, sh in zip(flat_params, param_leaves):
    by_shape.setdefault((leaf.shape, str(leaf.dtype)), sh)

  def opt_leaf(x):
    # Adam moments mirror their parameter's shape; share its sharding.
    return by_shape.get((x.shape, str(x.dtype)), replicated) if x.ndim else replicated

  return {
    "params": param_sh,
    "opt_state": jax.tree.map(opt_leaf, state["opt_state"]),
    "step": replicated,
    "nonfinite_total": replicated,
    "nonfinite_streak": replicated,
  }


@functools.cache
def _jitted_step(graphdef, tx, cfg: StepConfig, state_sh, batch_sh):
  fn = functools.partial(train_step, graphdef, tx, cfg)
  return jax.jit(
    fn,
    in_shardings=(state_sh.tree, batch_sh.tree),
    out_shardings=(state_sh.tree, None),
    donate_argnums=(0,),
  )


# ----------------------------------------------------------------------------
# Host side: config -> data, model, sampler, scorer; the loop.
# ----------------------------------------------------------------------------


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


def stage_layout(loss_cfg: obj.LossConfig, n_rollouts: int, n_demos: int) -> GroupLayout:
  """Rollouts only when a rollout term is on; demos only when a demo term is on;
  demos in the advantage group only when their RL term is on."""
  n = n_rollouts if loss_cfg.use_self_rl else 0
  d = n_demos if (loss_cfg.use_sft or loss_cfg.use_demo_rl) else 0
  if n + d == 0:
    raise ValueError("loss preset uses neither rollouts nor demonstrations")
  return GroupLayout(n, d, demos_in_group=loss_cfg.use_demo_rl)


def local_dir(workdir: str) -> str:
  """Where the files other than checkpoints go (logs, results, plots, the HF export,
  caches): the workdir itself, or for a remote workdir (gs://..., which only Orbax
  writes) the same path under ~/srft_outputs on this host (process 0's disk)."""
  if "://" not in workdir:
    return workdir
  scheme, _, rest = workdir.partition("://")
  return os.path.join(os.path.expanduser("~"), "srft_outputs", scheme, rest.strip("/"))


def sync_processes(name: str) -> None:
  """Every process waits here for all the others (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def write_json_atomic(path: str, obj) -> None:
  """A reader (a restarted job) never sees half a file: write aside, then rename."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def gather_all(x: Array) -> np.ndarray:
  """The whole global array on every host (small arrays: prompts, eval outputs)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_rows(local: np.ndarray) -> np.ndarray:
  """Every host's rows of a host-local array, concatenated in process order."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def loss_config(name: str, overrides: dict | None, max_response_len: int) -> obj.LossConfig:
  """A loss preset with config overrides; Dr.GRPO's constant normaliser uses
  this run's response length unless the config pins one."""
  overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
  aggregation = overrides.get("aggregation", obj.PRESETS.get(name, {}).get("aggregation"))
  if aggregation == "constant_len" and "max_response_len" not in overrides:
    overrides["max_response_len"] = max_response_len  # also replaces a preset's (srft_code: 8192)
  return obj.LossConfig.preset(name, **overrides)


@dataclasses.dataclass
class Stage:
  name: str
  start: int  # first global step of this stage
  steps: int
  loss: obj.LossConfig
  layout: GroupLayout


class Trainer:
  """Owns the train state and runs steps; the host loop lives in `fit`."""

  def __init__(self, model, *, config, tokenizer, scorer, mesh, rules=None):
    from srft_jax import sampler as sampler_lib

    self.config = config
    self.tokenizer = tokenizer
    self.scorer = scorer
    self.mesh = mesh
    self.rules = rules
    self.sampler_lib = sampler_lib
    self.graphdef, params = nnx.split(model)
    self.params = params
    self.state = None
    self.stage: Stage | None = None

  # -- stages -----------------------------------------------------------------
  def stages(self) -> list[Stage]:
    c = self.config
    out, start = [], 0
    overrides = dict(c.loss) if not c.stages else None
    for name, n in parse_stages(c.stages, c.steps, c.method):
      lc = loss_config(name, overrides, c.data.max_response_len)
      out.append(
        Stage(name, start, n, lc, stage_layout(lc, c.rollout.n_rollouts, c.rollout.n_demos))
      )
      start += n
    return out

  def _build_stage(self, stage: Stage, *, fresh_optimizer: bool):
    c = self.config
    self.tx, self.schedule = self._make_tx(stage)
    self.step_cfg = StepConfig(
      loss=stage.loss,
      minibatches=c.batch.minibatches,
      microbatches=c.batch.microbatches,
      temperature=c.rollout.temperature,
      logit_chunk=c.logit_chunk,
      response_len=c.data.max_response_len,
      group=stage.layout.size if c.get("shared_prefix") else 0,
    )
    if fresh_optimizer or self.state is None:
      params = self.params if self.state is None else self.state["params"]
      state = init_train_state(params, self.tx)
      if self.state is not None:
        state["step"] = self.state["step"]
      self.state = self._place_state(state)
    self.stage = stage

  def _make_tx(self, stage: Stage):
    o = self.config.optim
    return make_optimizer(
      o.lr,
      steps=stage.steps,
      warmup_steps=o.warmup_steps,
      schedule=o.schedule,
      weight_decay=o.weight_decay,
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      clip_norm=o.clip_norm or None,
      updates_per_step=self.config.batch.minibatches,
    )

  def _place_state(self, state):
    self.state_sh = state_shardings(state, self.mesh, self.rules)
    return jax.device_put(state, self.state_sh)

  def abstract_state(self, stage: Stage):
    """Sharded ShapeDtypeStructs of the train state (Orbax restore target)."""
    tx, _ = self._make_tx(stage)
    state = jax.eval_shape(lambda p: init_train_state(p, tx), self.params)
    sh = state_shardings(state, self.mesh, self.rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)

  def step_fn(self, batch):
    batch_sh = {
      k: shd.batch_sharding(self.mesh, v.ndim, self.rules, v.shape) for k, v in batch.items()
    }
    return _jitted_step(
      self.graphdef, self.tx, self.step_cfg, _freeze(self.state_sh), _freeze(batch_sh)
    )

  # -- one step -----------------------------------------------------------------
  def sampling_config(self, n: int, *, temperature=None, greedy=False):
    c = self.config
    t = 0.0 if greedy else (c.rollout.temperature if temperature is None else temperature)
    return self.sampler_lib.SamplingConfig(
      max_new_tokens=c.data.max_response_len,
      temperature=t,
      top_p=c.rollout.top_p,
      top_k=c.rollout.top_k,
      eos_ids=tuple(self.tokenizer.stop_ids),
      pad_id=self.tokenizer.pad_id,
      prompt_buckets=tuple(c.data.prompt_buckets),
      n=n,
    )

  def model(self):
    params = self.state["params"] if self.state is not None else self.params
    return nnx.merge(self.graphdef, params)

  def run_step(self, batch: dict, step: int, rng: Array) -> tuple[dict, dict]:
    """Sample, score, assemble and update; returns (host metrics, device metrics)."""
    layout = self.stage.layout
    n, d = layout.n_rollouts, layout.n_demos
    b_local = batch["prompt_tokens"].shape[0]
    g = layout.size
    host = {}
    t0 = time.perf_counter()
    # Every host holds the whole (small) batch of prompts, demos and rewards in
    # process order, so global row order never depends on the device layout;
    # each host decodes and scores only its own slice of the rollouts.
    full = {
      k: allgather_rows(batch[k])
      for k in ("prompt_tokens", "prompt_mask", "demo_tokens", "demo_mask")
    }
    put = lambda x: shd.put_global(x, shd.batch_sharding(self.mesh, x.ndim, self.rules, x.shape))  # noqa: E731
    ptok, pmask = put(full["prompt_tokens"]), put(full["prompt_mask"])
    dtok, dmask = put(full["demo_tokens"]), put(full["demo_mask"])
    lo = jax.process_index() * b_local
    texts, truths = [], []
    roll = None
    if n:
      roll = self.sampler_lib.sample(
        self.model(),
        full["prompt_tokens"],
        full["prompt_mask"],
        rng,
        self.sampling_config(n),
        mesh=self.mesh,
      )
      roll_tok_all, roll_mask_all = gather_all(roll.tokens), gather_all(roll.mask)
      roll_tok = roll_tok_all[lo * n : (lo + b_local) * n]
      roll_mask = roll_mask_all[lo * n : (lo + b_local) * n]
      roll_texts = self.tokenizer.batch_decode(roll_tok, roll_mask)
      lengths = roll_mask_all.sum(1)
      last = roll_tok_all[np.arange(len(roll_tok_all)), np.maximum(lengths - 1, 0)]
      host["rollout/length_mean"] = float(lengths.mean())
      host["rollout/truncated_frac"] = float(np.mean(~np.isin(last, list(self.tokenizer.stop_ids))))
      host["tokens/sampled"] = float(lengths.sum())
    t1 = time.perf_counter()
    demo_texts = self.tokenizer.batch_decode(batch["demo_tokens"], batch["demo_mask"]) if d else []
    for i in range(b_local):
      texts += roll_texts[i * n : (i + 1) * n] if n else []
      texts += demo_texts[i : i + 1] * d
      truths += [batch["answers"][i]] * g
    rewards_local, outcomes = self.scorer.score(texts, truths)
    rewards = allgather_rows(rewards_local.astype(np.float32)).reshape(-1, g)
    if n:
      host["reward/rollout_mean"] = float(rewards[:, :n].mean())
      host["reward/rollout_group_solved"] = float((rewards[:, :n].max(1) > 0).mean())
      host["reward/rollout_group_allsame"] = float((rewards[:, :n].std(1) == 0).mean())
    if d:
      host["reward/demo_mean"] = float(rewards[:, n:].mean())
    kinds = ("correct", "wrong", "unparseable", "no_answer", "timeout")
    counts = allgather_rows(np.array([[sum(x == o for x in outcomes) for o in kinds]], np.int64))
    for o, cnt in zip(kinds, counts.sum(0)):
      host[f"outcomes/{o}"] = float(cnt)
    t2 = time.perf_counter()
    rewards_g = put(rewards.reshape(-1))
    assemble = _jitted_assemble(
      layout, self.step_cfg.loss.adv_normalize_std, self.step_cfg.loss.adv_eps
    )
    rt = roll.tokens if n else None
    rm = roll.mask if n else None
    rl = roll.logprobs if n else None
    train_batch = assemble(ptok, pmask, rt, rm, rl, dtok, dmask, rewards_g)
    # Constant leaves (is_demo) come out of `assemble` replicated; the step's
    # in_shardings want every batch leaf split over the data axes.
    train_batch = jax.device_put(
      train_batch,
      {
        k: shd.batch_sharding(self.mesh, v.ndim, self.rules, v.shape)
        for k, v in train_batch.items()
      },
    )
    step_fn = self.step_fn(train_batch)
    with jax.set_mesh(self.mesh):  # the model's logical activation constraints apply
      self.state, metrics = step_fn(self.state, train_batch)
    metrics = dict(metrics)
    metrics["tokens/trained"] = jnp.sum(train_batch["response_mask"])
    metrics["optim/lr"] = self.schedule(step - self.stage.start)
    metrics["optim/grad_norm"] = metrics.pop("grad_norm")
    host["time/sample_s"] = t1 - t0
    host["time/score_s"] = t2 - t1
    host["time/update_dispatch_s"] = time.perf_counter() - t2
    return host, metrics


def _freeze(tree):
  """Hashable wrapper of a sharding pytree for the jit cache."""
  return _Hashable(tree)


class _Hashable:
  def __init__(self, tree):
    self.tree = tree
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    self._key = (treedef, tuple(leaves))

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Hashable) and self._key == other._key


@functools.cache
def _jitted_assemble(layout: GroupLayout, normalize_std: bool, eps: float):
  return jax.jit(
    functools.partial(assemble_batch, layout=layout, adv_normalize_std=normalize_std, adv_eps=eps)
  )


def make_eval_hook(c, tokenizer, scorer, evals: dict, mesh):
  """Periodic evaluation: greedy accuracy on a slice of the ID split, and the
  policy's mean token entropy on a fixed probe of demonstrations (teacher
  forced), so entropy is comparable across stages that have no rollouts."""
  if not c.eval.every or "task_id" not in evals:
    return None
  from srft_jax import evaluate as eval_lib
  from srft_jax.token_change import demo_batch

  rows = evals["task_id"][: c.eval.every_n]
  tokens, mask, resp = demo_batch(tokenizer, rows[:32], template=c.data.template)
  resp = resp[:, 1:]
  scfg = sampler_config(c, tokenizer, n=1, temperature=0.0)

  @functools.partial(jax.jit, static_argnums=0)
  def probe_entropy(graphdef, params):
    logp, ent = sequence_logprobs(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask))
    m = jnp.asarray(resp, jnp.float32)
    return jnp.sum(ent * m) / jnp.sum(m), jnp.sum(logp * m) / jnp.sum(m)

  def hook(model) -> dict[str, float]:
    res = eval_lib.accuracy_on_rows(
      model,
      tokenizer,
      rows,
      scorer,
      scfg,
      rng=jax.random.key(0),
      template=c.data.template,
      batch_size=c.eval.batch_size,
      mesh=mesh,
    )
    graphdef, params = nnx.split(model)
    ent, logp = jax.device_get(probe_entropy(graphdef, params))
    return {
      "eval/task_id": res["accuracy"],
      "probe/entropy": float(ent),
      "probe/demo_logp": float(logp),
    }

  return hook


def fit(
  trainer: Trainer, data_iter, *, workdir: str, progress: bool = True, eval_hook=None
) -> dict:
  """The training loop: resume, steps, checkpoints, preemption, metrics.

  Returns {"status": "done" | "preempted" | "nonfinite", "step": last step}.
  """
  from srft_jax import checkpoint as ckpt_lib
  from srft_jax import metrics as metrics_lib

  c = trainer.config
  stages = trainer.stages()
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=c.checkpoint.keep, async_save=c.checkpoint.async_save
  )
  writer = metrics_lib.MetricsWriter(
    os.path.join(local_dir(workdir), "logs"), tensorboard=c.log.tensorboard
  )
  guard = ckpt_lib.PreemptionGuard()
  base_key = jax.random.key(c.seed)
  meta = {"config": c.to_json_best_effort() if hasattr(c, "to_json_best_effort") else str(c)}

  # Resume: the newest readable checkpoint decides the step, stage and data position.
  start = 0
  restored = (
    ckpt.restore(trainer.abstract_state(stages[0]), delete_unreadable=True)
    if ckpt.latest_step() is not None
    else None
  )
  if restored is not None:
    start, state, data_state, _ = restored
    if start > c.steps:
      raise ConfigError(
        f"config.steps={c.steps}: {ckpt.directory} already holds step {start}; "
        "give at least that many steps or another workdir"
      )
    data_iter.set_state(data_state)
    stage = (
      next(s for s in stages if s.start <= start < s.start + s.steps)
      if start < c.steps
      else stages[-1]
    )
    trainer.state = None
    trainer.params = state["params"]
    trainer._build_stage(stage, fresh_optimizer=True)
    trainer.state = trainer._place_state(state)
    if start == stage.start:
      trainer.stage = None  # an unbroken run starts this stage with a fresh optimizer here
    writer.drop_from(start)  # rows of steps after the checkpoint are written again
    log.info("resumed from step %d (%s)", start, ckpt.directory)

  def save(step):
    # A SIGTERM (or the final save) right after a periodic save of the same step
    # must not save twice: Orbax raises StepAlreadyExistsError.
    if ckpt.latest_step() == step:
      return
    ckpt.save(step, trainer.state, data_iter.get_state(), {"step": step, **meta})

  status = "done"
  pending = None  # (step, host metrics, device metrics) of the previous step
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm

    bar = tqdm(total=c.steps, initial=start, desc="train", dynamic_ncols=True, leave=True)

  def flush(p):
    step, host, dev = p
    dev = jax.device_get(dev)
    row = {**host, **{k if "/" in k else f"loss/{k}": float(v) for k, v in dev.items()}}
    writer.write(step, row)
    if bar is not None:
      bar.set_postfix(
        reward=f"{row.get('reward/rollout_mean', float('nan')):.3f}",
        loss=f"{row.get('loss/loss', float('nan')):.3f}",
        refresh=False,
      )
      bar.update(1)
    return row

  last = None
  step = start
  try:
    for step in range(start, c.steps):
      stage = next(s for s in stages if s.start <= step < s.start + s.steps)
      current = trainer.stage
      if current is None or (current.name, current.start) != (stage.name, stage.start):
        trainer._build_stage(stage, fresh_optimizer=step == stage.start)
      t0 = time.perf_counter()
      evals_now = {}
      if eval_hook is not None and step % c.eval.every == 0:
        evals_now = eval_hook(trainer.model())
      batch = next(data_iter)
      rng = jax.random.fold_in(base_key, step)
      host, dev = trainer.run_step(batch, step, rng)
      host.update(data_iter.stats())
      diverged = False
      if pending is not None:
        last = flush(pending)
        diverged = last.get("nonfinite/streak", 0) >= c.max_nonfinite_streak
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
      periodic = bool(c.checkpoint.every) and done % c.checkpoint.every == 0
      if status != "done" or (done < c.steps and (periodic or done == stage.start + stage.steps)):
        last, pending = flush(pending), None
        save(done)
      if status != "done":
        break
    if pending is not None:
      last = flush(pending)
    if status == "done" and eval_hook is not None and c.steps % c.eval.every == 0:
      writer.write(c.steps, eval_hook(trainer.model()))
    if status == "done":
      save(c.steps)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    guard.restore_handlers()
    if bar is not None:
      bar.close()
  if status == "nonfinite":
    raise FloatingPointError(
      f"{c.max_nonfinite_streak} non-finite updates in a row at step {step}; "
      f"checkpoint saved in {os.path.join(workdir, 'checkpoints')}"
    )
  return {
    "status": status,
    "step": int(jax.device_get(trainer.state["step"])) if trainer.state else start,
    "last_metrics": last,
  }


# ----------------------------------------------------------------------------
# The whole job: data, base model (warm-up), before/after evaluation, training.
# ----------------------------------------------------------------------------


class ConfigError(ValueError):
  """A config (or workdir) that cannot run, named by its field; raised before compiling."""


def validate_config(c) -> None:
  """Config errors before anything compiles, each naming its field (ConfigError)."""
  try:
    _validate_config(c)
  except ConfigError:
    raise
  except ValueError as e:
    if not str(e).startswith("config."):
      raise
    raise ConfigError(str(e)) from None


def _validate_config(c) -> None:
  def need(ok, field, msg):
    if not ok:
      raise ValueError(f"config.{field}: {msg}")

  need(c.steps > 0, "steps", f"must be positive, got {c.steps}")
  need(
    c.method in obj.PRESETS,
    "method",
    f"unknown loss preset {c.method!r}; known: {sorted(obj.PRESETS)}",
  )
  parse_stages(c.stages, c.steps, c.method)
  need(c.batch.prompts_per_step > 0, "batch.prompts_per_step", "must be positive")
  need(
    c.batch.minibatches > 0 and c.batch.prompts_per_step % c.batch.minibatches == 0,
    "batch.minibatches",
    f"must divide batch.prompts_per_step={c.batch.prompts_per_step}",
  )
  per_mini = c.batch.prompts_per_step // c.batch.minibatches
  need(
    c.batch.microbatches > 0 and per_mini % c.batch.microbatches == 0,
    "batch.microbatches",
    f"must divide the prompts of one mini-batch ({per_mini})",
  )
  need(
    c.rollout.n_rollouts >= 0 and c.rollout.n_demos >= 0,
    "rollout.n_rollouts",
    "counts must be >= 0",
  )
  need(c.data.max_response_len > 0, "data.max_response_len", "must be positive")
  need(c.optim.lr > 0, "optim.lr", f"must be positive, got {c.optim.lr}")
  for field, value in (
    ("optim.schedule", c.optim.schedule),
    ("warmup.schedule", c.warmup.schedule),
  ):
    need(value in SCHEDULES, field, f"unknown schedule {value!r}; known: {SCHEDULES}")
  need(
    c.warmup.steps <= 0 or (c.warmup.lr > 0 and c.warmup.prompts_per_step > 0),
    "warmup.lr",
    "a warm-up needs a positive lr and prompts_per_step",
  )
  need(c.data.source in ("task", "tfds"), "data.source", f"unknown source {c.data.source!r}")
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
  overrides = {k: v for k, v in dict(c.loss).items() if v is not None}
  try:
    loss_config(c.method, overrides, c.data.max_response_len)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.loss: {e}") from None
  n_dev = jax.device_count()
  sizes = dict(c.mesh)
  try:
    mesh_shape = shd.make_mesh(sizes).shape
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from None
  data_par = mesh_shape["data"] * mesh_shape["fsdp"]
  prompts = per_mini // c.batch.microbatches
  for name, _ in parse_stages(c.stages, c.steps, c.method):
    lc = loss_config(name, overrides if not c.stages else None, c.data.max_response_len)
    layout = stage_layout(lc, c.rollout.n_rollouts, c.rollout.n_demos)
    rows = prompts * layout.size  # rows of one micro-batch: prompts x (rollouts + demos)
    need(
      rows % data_par == 0,
      "batch.prompts_per_step",
      f"a micro-batch of {prompts} prompts x {layout.size} slots ({name}) = {rows} rows "
      f"does not divide the data axes ({data_par} of {n_dev} devices)",
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


def _model_config(c, tokenizer) -> model_lib.ModelConfig:
  kw = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat)
  for name in ("attention", "decode_attention"):  # "" keeps the preset's
    if c.model.get(name):
      kw[name] = c.model.get(name)
  if c.model.preset == "tiny":
    kw.update(
      vocab_size=tokenizer.vocab_size,
      embed_dim=c.model.embed_dim,
      num_layers=c.model.num_layers,
      mlp_dim=c.model.mlp_dim,
      max_seq_len=max(c.data.prompt_buckets) + c.data.max_response_len,
    )
  return model_lib.ModelConfig.preset(c.model.preset, **kw)


def build_tokenizer(c, workdir: str):
  from srft_jax import tokenizer as tok_lib
  from srft_jax.data import task

  if c.data.tokenizer:
    return tok_lib.load_tokenizer(c.data.tokenizer)
  cache = os.path.join(local_dir(workdir), "tokenizer")
  if jax.process_index() == 0:  # trains and caches it once; the others then load it
    task.get_task_tokenizer(cache, seed=c.data.task_seed)
  sync_processes("srft_task_tokenizer")
  return task.get_task_tokenizer(cache, seed=c.data.task_seed)


def build_data(c) -> tuple[Any, dict[str, list[dict]]]:
  """(training source, eval sets {name: rows})."""
  from srft_jax.data import task

  if c.data.source == "task":
    train = task.generate("train", c.data.task_train_size, c.data.task_seed)
    evals = {
      "task_id": task.generate("test_id", c.eval.n_id, c.data.task_seed),
      "task_ood": task.generate("test_ood", c.eval.n_ood, c.data.task_seed),
    }
    return train, evals
  from srft_jax.data import builders

  where = os.path.join(c.data.data_dir, "srft_data", c.data.name)
  if "://" not in c.data.data_dir and not os.path.isdir(where):
    raise ConfigError(
      f"config.data.data_dir: no prepared dataset {c.data.name!r} in "
      f"{c.data.data_dir!r}; make it with `python -m srft_jax.data prepare "
      f"{c.data.name} --src FILE --data_dir DIR`"
    )
  return builders.load_source(c.data.data_dir, c.data.name, "train"), {}


def make_data_iter(c, source, tokenizer, prompts_per_step: int, seed: int):
  from srft_jax.data import pipeline

  pcfg = pipeline.PipelineConfig(
    global_batch=prompts_per_step,
    prompt_buckets=tuple(c.data.prompt_buckets),
    max_response_len=c.data.max_response_len,
    template=c.data.template,
    seed=seed,
  )
  return pipeline.make_iterator(source, tokenizer, pcfg)


def evaluate_sets(model, tokenizer, scorer, sets: dict, c, mesh) -> dict[str, float]:
  from srft_jax import evaluate as eval_lib

  scfg = sampler_config(c, tokenizer, n=1, temperature=c.eval.temperature)
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


def sampler_config(c, tokenizer, *, n: int, temperature: float):
  from srft_jax import sampler as sampler_lib

  return sampler_lib.SamplingConfig(
    max_new_tokens=c.data.max_response_len,
    temperature=temperature,
    top_p=c.rollout.top_p,
    top_k=c.rollout.top_k,
    eos_ids=tuple(tokenizer.stop_ids),
    pad_id=tokenizer.pad_id,
    prompt_buckets=tuple(c.data.prompt_buckets),
    n=n,
  )


def warmup_config(c):
  """The base-model warm-up: the same job with the `sft` preset and its own lr/batch."""
  w = c.copy_and_resolve_references()
  with w.unlocked():
    w.method, w.stages, w.steps = "sft", "", c.warmup.steps
    for k in w.loss:
      w.loss[k] = None
    w.optim.lr = c.warmup.lr
    w.optim.schedule = c.warmup.schedule
    w.optim.warmup_steps = c.warmup.warmup_steps
    w.batch.prompts_per_step = c.warmup.prompts_per_step
    w.batch.minibatches = 1
    w.checkpoint.every = 0
  return w


def base_model(c, tokenizer, mesh, workdir: str, scorer):
  """The starting policy: an HF checkpoint, or a tiny model warmed up by SFT
  (cached as an HF checkpoint in `warmup.dir`, so studies share one base).
  None when a SIGTERM stopped the warm-up (it resumes from its checkpoint)."""
  from srft_jax import hf

  if c.model.hf_path:
    return hf.load_model(
      c.model.hf_path,
      mesh=mesh,
      dtype=model_lib.DTYPES[c.model.dtype],
      param_dtype=model_lib.DTYPES[c.model.param_dtype],
      remat=c.model.remat,
      **_hf_config_overrides(c),
    )
  mcfg = _model_config(c, tokenizer)
  if c.warmup.steps <= 0:
    return model_lib.create_model(mcfg, seed=c.seed, mesh=mesh)
  base_dir = c.warmup.dir or os.path.join(workdir, "base")
  hf_dir = os.path.join(base_dir, "hf")
  meta = warmup_meta(c, mcfg)
  if os.path.exists(os.path.join(hf_dir, "config.json")):
    meta_file = os.path.join(hf_dir, WARMUP_META)
    if os.path.exists(meta_file):
      with open(meta_file) as f:
        cached = json.load(f)
      diff = sorted(k for k in set(cached) | set(meta) if cached.get(k) != meta.get(k))
      if diff:
        raise ConfigError(
          f"config.warmup.dir: {hf_dir} caches a warm-up of other settings "
          f"({', '.join(diff)}); delete it or point warmup.dir elsewhere"
        )
    log.info("base model: %s (cached warm-up)", hf_dir)
    return hf.load_model(hf_dir, mesh=mesh, dtype=mcfg.jnp_dtype, **_hf_overrides(mcfg))
  log.info("base model: SFT warm-up for %d steps", c.warmup.steps)
  model = model_lib.create_model(mcfg, seed=c.seed, mesh=mesh)
  w = warmup_config(c)
  source, _ = build_data(w)
  trainer = Trainer(model, config=w, tokenizer=tokenizer, scorer=scorer, mesh=mesh)
  info = fit(
    trainer,
    make_data_iter(w, source, tokenizer, w.batch.prompts_per_step, w.seed + 1),
    workdir=os.path.join(base_dir, "run"),
    progress=c.log.progress,
  )
  if info["status"] == "preempted":
    return None  # not cached: a half-trained base must not pass for the warm-up
  model = trainer.model()
  save_base(model, hf_dir, meta)
  return model


WARMUP_META = "srft_warmup.json"


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
        "warmup": {
          k: c.warmup[k] for k in ("steps", "lr", "schedule", "warmup_steps", "prompts_per_step")
        },
      },
      default=str,
    )
  )


def save_base(model, hf_dir: str, meta: dict | None = None) -> None:
  """The warm-up's HF cache, written aside and renamed: a kill mid-write never
  leaves an hf/config.json that the next run would take for a finished warm-up."""
  import shutil

  from srft_jax import hf

  tmp_dir = f"{hf_dir}.partial"
  hf.save_model(model, tmp_dir)  # collective: every process gathers, process 0 writes
  if jax.process_index() == 0:
    if meta is not None:
      write_json_atomic(os.path.join(tmp_dir, WARMUP_META), meta)
    shutil.rmtree(hf_dir, ignore_errors=True)  # a half cache an older version left
    os.replace(tmp_dir, hf_dir)
  sync_processes("srft_base_saved")


def _hf_config_overrides(c) -> dict:
  """Architecture overrides for an imported checkpoint (e.g. the paper's RoPE
  theta 40k and 16k window for Qwen2.5-Math-7B, METHOD.md §5)."""
  out = {}
  if c.model.get("rope_theta"):
    out["rope_theta"] = float(c.model.rope_theta)
  if c.model.get("max_seq_len"):
    out["max_seq_len"] = int(c.model.max_seq_len)
  for name in ("attention", "decode_attention"):
    if c.model.get(name):
      out[name] = c.model.get(name)
  return out


def _hf_overrides(mcfg: model_lib.ModelConfig) -> dict:
  """What a cached base keeps from the run's model config (not in its config.json)."""
  return {
    "remat": mcfg.remat,
    "rules": mcfg.rules,
    "param_dtype": mcfg.jnp_param_dtype,
    "attention": mcfg.attention,
    "decode_attention": mcfg.decode_attention,
  }


def run(c, workdir: str) -> dict:
  """The main job. Writes WORKDIR/results.json and returns it."""
  from srft_jax import hf
  from srft_jax import metrics as metrics_lib
  from srft_jax import rewards as rewards_lib

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
  validate_config(c)
  if c.warmup.steps > 0 and not c.model.hf_path and "://" in (c.warmup.dir or workdir):
    raise ConfigError(
      "config.warmup.dir: the SFT warm-up caches its model as an HF checkpoint "
      "with plain file I/O; give a local or shared path (or warmup.steps=0) "
      f"when the workdir is remote ({workdir})"
    )
  out = local_dir(workdir)  # == workdir unless it is remote (gs://): then only checkpoints go there
  os.makedirs(out, exist_ok=True)
  mesh = shd.make_mesh(dict(c.mesh))
  tokenizer = build_tokenizer(c, workdir)
  source, evals = build_data(c)
  with rewards_lib.RewardScorer(require_think=c.rollout.require_think) as scorer:
    model = base_model(c, tokenizer, mesh, workdir, scorer)
    if model is None:
      return {"status": "preempted", "step": 0, "stage": "warmup"}
    before = {}
    if c.eval.before and evals:
      cache = os.path.join(
        local_dir(c.warmup.dir or os.path.join(workdir, "base")), "eval_before.json"
      )
      if os.path.exists(cache) and not c.model.hf_path:
        with open(cache) as f:
          before = json.load(f)
      else:
        before = evaluate_sets(model, tokenizer, scorer, evals, c, mesh)
        if jax.process_index() == 0:
          os.makedirs(os.path.dirname(cache), exist_ok=True)
          write_json_atomic(cache, before)
      log.info("before: %s", before)
    trainer = Trainer(model, config=c, tokenizer=tokenizer, scorer=scorer, mesh=mesh)
    it = make_data_iter(c, source, tokenizer, c.batch.prompts_per_step, c.seed)
    t_train = time.time()
    hook = make_eval_hook(c, tokenizer, scorer, evals, mesh)
    info = fit(trainer, it, workdir=workdir, progress=c.log.progress, eval_hook=hook)
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
  if c.checkpoint.export_hf:  # collective: every process gathers, process 0 writes
    hf.save_model(
      model,
      os.path.join(out, "export", "hf"),
      tokenizer=tokenizer,
      copy_from=c.model.hf_path or None,
    )
  if jax.process_index() == 0:
    if c.log.plots:
      results["plots"] = metrics_lib.plot_metrics(
        os.path.join(out, "logs", "metrics.jsonl"), os.path.join(out, "plots")
      )
    with open(os.path.join(out, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
