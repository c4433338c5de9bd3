"""Pure device code of a training step: log-probs over sequences, batch
assembly, the jitted update and the train state's shardings.

Nothing here touches the host loop, files or configs: every function takes
arrays and frozen configs, so it can be jitted, lowered ahead of time
(`srft_jax.tools.aot`) or called from another project.

  sequence_logprobs   teacher-forced log p(token) and entropy, chunked over V
  rollout_advantages  group advantages of one step's rewards (docs/method.md §1.3)
  assemble_batch      prompts + rollouts + demonstrations -> one [rows, P+R] batch
  train_step          mini-batch updates with exact micro-batch accumulation
  jit_train_step      `train_step` jitted with shardings and the state donated
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import sharding as shd

Array = jax.Array


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
  (the augmented group of SRFT / LUFFY, docs/method.md §1.3). Off where no loss term
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
  """AdamW with global-norm clipping (docs/method.md §5) and the learning-rate schedule.

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


def group_ids(layout: GroupLayout, prompts: int) -> Array:
  """The advantage group of each row of `assemble_batch`'s prompt-major layout.

  Prompt i owns rows [i*g, (i+1)*g). Where demonstrations stay out of the
  group (`layout.demos_in_group` off), each demo row is a group of its own and
  so gets advantage 0.
  """
  g = layout.size
  ids = jnp.arange(prompts * g) // g
  if layout.n_demos and not layout.demos_in_group:
    is_demo = jnp.tile(jnp.arange(g) >= layout.n_rollouts, prompts)
    ids = jnp.where(is_demo, prompts + jnp.arange(prompts * g), ids)
  return ids


def rollout_advantages(rewards: Array, *, layout: GroupLayout, cfg: obj.AdvantageConfig) -> Array:
  """Group advantages of one step's rewards, rows in `assemble_batch`'s order
  (docs/method.md §1.3)."""
  rewards = rewards.astype(jnp.float32)
  return obj.group_advantages(
    rewards,
    group_ids(layout, rewards.shape[0] // layout.size),
    normalize_std=cfg.normalize_std,
    eps=cfg.eps,
  )


def assemble_batch(
  prompt_tokens_bP,
  prompt_mask_bP,
  roll_tokens,
  roll_mask,
  roll_logp,
  demo_tokens_bR,
  demo_mask_bR,
  rewards,
  advantages,
  *,
  layout: GroupLayout,
) -> dict[str, Array]:
  """Packs rollouts and demonstrations into one [b*g, P+R] training batch.

  Rows are prompt-major: prompt i owns rows [i*g, (i+1)*g), its n rollouts
  first, then its d demonstrations. `rewards` and `advantages` (from
  `rollout_advantages`) follow the same order. Loss
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
  return {
    "tokens": tokens,
    "mask": mask,
    "response_mask": response_mask,
    "old_logp": old_logp * response_mask,
    "is_demo": is_demo,
    "rewards": rewards.astype(jnp.float32),
    "advantages": advantages.astype(jnp.float32),
  }


def _split(tree, n: int):
  """[B, ...] -> [n, B/n, ...] for every leaf."""
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), tree)


def train_step(graphdef, tx, cfg: StepConfig, state: dict, batch: dict) -> tuple[dict, dict]:
  """One rollout batch: `cfg.minibatches` optimizer updates, each accumulating
  gradients over `cfg.microbatches` chunks with the full mini-batch's loss
  denominators (exact, docs/method.md §8). Non-finite updates are skipped and counted.
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


def abstract_train_state(params, tx, mesh, rules=None):
  """Sharded ShapeDtypeStructs of the train state for `params` (concrete or
  abstract) and optimizer `tx`: an Orbax restore target, or the AOT tool's input."""
  state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
  sh = state_shardings(state, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)


def batch_shardings(batch: dict, mesh, rules=None) -> dict:
  """Every batch leaf split over the data axes (rows)."""
  return {k: shd.batch_sharding(mesh, v.ndim, rules, v.shape) for k, v in batch.items()}


def jit_train_step(graphdef, tx, cfg: StepConfig, state_sh, batch_sh):
  """`train_step` jitted with explicit shardings and the state donated."""
  return jax.jit(
    functools.partial(train_step, graphdef, tx, cfg),
    in_shardings=(state_sh, batch_sh),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )
