"""Pure device code of a training step: log-probs over sequences, batch
assembly, the jitted update and the train state's shardings.

Nothing here touches the host loop, files or configs: every function takes
arrays and frozen configs, so it can be jitted, lowered ahead of time
(`srft_jax.tools.aot`) or called from another project.

  sequence_logprobs   teacher-forced log p(token) and entropy, chunked over V
  rollout_advantages  group advantages of one step's rewards (docs/method.md §1.3)
  assemble_batch      prompts + rollouts + demonstrations -> one [rows, P+R] batch
  prepare_batch       advantages + assembly in one program, rows over the data axes
  packed_logprobs     `sequence_logprobs` of rows run packed (docs/method.md §18)
  split_policy        (graphdef, trainable params, frozen LoRA base) of a policy
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

from srft_jax import lora as lora_lib
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
  # Before any update, recompute `old_logp` with the trainer's forward (the
  # sampler's values become `sampler_logp`; docs/method.md §2.7).
  recompute_old_logp: bool = False
  # The KL term's reference log-probs from `ref_params` (the base model).
  reference: bool = False
  # LoRA dropout's keys (adapters with lora.dropout > 0): this seed folded with
  # the step, the mini-batch and the micro-batch, so a resumed run draws the
  # same masks.
  dropout_seed: int = 0
  # > 0: sequence packing (docs/method.md §18). Each micro-batch's rows run as
  # slots of `pack_rows` packed rows of this many tokens, by the plan the
  # trainer passes (packing.make_plan); `group` is then unused.
  pack_len: int = 0
  pack_rows: int = 0
  # The teacher's softmax temperature (on-policy distillation, docs/method.md §19);
  # 0 = `temperature`. A teacher runs where loss.distill_coef > 0.
  teacher_temperature: float = 0.0

  @property
  def distill(self) -> str:
    """The teacher term's estimator: "sampled" (the pre-pass gives the
    teacher's log-probs), "full" (its hidden states), or "" (no teacher term)."""
    return self.loss.distill_estimator if self.loss.distill_coef > 0 else ""

  def teacher_cfg(self) -> StepConfig:
    """This config with the teacher's temperature: its pre-pass's settings."""
    return dataclasses.replace(self, temperature=self.teacher_temperature or self.temperature)


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


# The learning-rate schedules after the warm-up ramp: name -> (peak lr, decay steps) -> schedule.
# The one table of allowed names (factory validates optim.schedule against it).
SCHEDULES = {
  "constant": lambda lr, steps: optax.constant_schedule(lr),
  "linear": lambda lr, steps: optax.linear_schedule(lr, 0.0, steps),
  "cosine": lambda lr, steps: optax.cosine_decay_schedule(lr, steps),
}


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
  if schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule: unknown schedule {schedule!r}; known: {tuple(SCHEDULES)}")
  decay = SCHEDULES[schedule](lr, max(steps - warmup_steps, 1))
  sched = (
    decay
    if warmup_steps <= 0
    else optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])
  )
  per_update = sched if updates_per_step == 1 else (lambda count: sched(count // updates_per_step))
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(per_update, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts), sched


def _target_hidden(model, tokens_BT, mask_BT, *, last: int, group: int, dropout_key=None):
  """(final hidden states [B, C, D] of the target columns, first target column,
  the model's output): C = T - 1, or the last `last` columns (`sequence_logprobs`)."""
  t = tokens_BT.shape[1]
  first = t - 1 - last if 0 < last < t else 0
  if first and group > 1:
    p = first + 1
    out = model.forward_shared_prefix(
      tokens_BT[::group, :p],
      mask_BT[::group, :p],
      tokens_BT[:, p:],
      mask_BT[:, p:],
      lora_dropout_key=dropout_key,
    )
    # Response token 0 is predicted from the prompt's last position (shared).
    hp, hr = out.prompt_hidden, out.response_hidden
    hidden = jnp.concatenate([jnp.repeat(hp[:, -1:], group, axis=0), hr[:, :-1]], axis=1)
  else:
    positions = model_lib.positions_from_mask(mask_BT)
    out = model(tokens_BT, positions, mask_BT, return_hidden=True, lora_dropout_key=dropout_key)
    hidden = out.hidden[:, first:-1]
  return hidden, first, out


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
  router_aux: bool = False,
  frozen=None,
  dropout_key=None,
  teacher=None,
):
  """Teacher-forced log-prob of each next token and the full-vocab entropy, [B, T-1].

  Logits are computed in chunks from the final hidden states, so [B, T, V]
  float32 logits never exist (objectives.chunked_logprobs_and_entropy). With
  `last` > 0 only the last `last` target columns are computed; the columns
  before them are 0 (static shapes, no LM-head work spent on the prompt).
  With `group` > 1 as well, rows [i*group, (i+1)*group) share the prompt
  (the first T - last columns) and it runs once per group.
  `router_aux=True` also returns the MoE router's load-balancing loss over
  the rows' real tokens (`model.RouterAux`; None for a dense model).
  `frozen`: the state that is not trained (LoRA's base, `lora.split`), merged
  with `params` (the adapters) into the model. `dropout_key` switches on the
  adapters' dropout (the loss forward; model.lora_delta).
  `teacher`: (its hidden states [B, C, E] of the same target columns,
  `teacher_hidden`; its unembedding [E, V]; its temperature) also returns, after
  the entropy, the per-token (reverse, forward) KL to it, [B, T-1] each, from
  these hidden states (objectives.chunked_teacher_kl, docs/method.md §19.2).
  """
  model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
  hidden, first, out = _target_hidden(
    model, tokens_BT, mask_BT, last=last, group=group, dropout_key=dropout_key
  )
  unembed = model.unembed()
  logp, ent = obj.chunked_logprobs_and_entropy(
    hidden, unembed, tokens_BT[:, first + 1 :], temperature=temperature, chunk_size=chunk
  )
  outs = [logp, ent]
  if teacher is not None:
    hidden_t, unembed_t, temperature_t = teacher
    outs += obj.chunked_teacher_kl(
      hidden, unembed, hidden_t, unembed_t, temperature, temperature_t, chunk_size=chunk
    )
  if first:
    outs = [jnp.pad(x, ((0, 0), (first, 0))) for x in outs]
  if teacher is not None:
    outs = outs[:2] + [tuple(outs[2:])]
  if router_aux:
    outs.append(model_lib.router_aux(model.cfg, out.router_stats))
  return tuple(outs)


def teacher_hidden(graphdef, params, tokens_BT, mask_BT, *, last: int = 0, group: int = 0):
  """A teacher's final hidden states [B, C, E] of `sequence_logprobs`'s target
  columns (the same `last` and `group`), for its `teacher` argument."""
  model = nnx.merge(graphdef, params)
  return _target_hidden(model, tokens_BT, mask_BT, last=last, group=group)[0]


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
  row_weight=None,
  *,
  layout: GroupLayout,
) -> dict[str, Array]:
  """Packs rollouts and demonstrations into one [b*g, P+R] training batch.

  Rows are prompt-major: prompt i owns rows [i*g, (i+1)*g), its n rollouts
  first, then its d demonstrations. `rewards` and `advantages` (from
  `rollout_advantages`) follow the same order, and so does `row_weight`
  (optional, [b*g]): a row of weight 0 reaches no loss term (its response
  mask is cleared; DAPO's overlong filter, dynamic sampling's fillers). Loss
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
  if row_weight is not None:
    resp_mask = resp_mask * (row_weight > 0).astype(jnp.int32)[:, None]
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


def _logprobs(
  graphdef,
  params,
  mb: dict,
  cfg: StepConfig,
  router_aux: bool = False,
  frozen=None,
  key=None,
  teacher=None,
):
  return sequence_logprobs(
    graphdef,
    params,
    mb["tokens"],
    mb["mask"],
    temperature=cfg.temperature,
    chunk=cfg.logit_chunk,
    last=cfg.response_len,
    group=cfg.group,
    router_aux=router_aux,
    frozen=frozen,
    dropout_key=key,
    teacher=teacher,
  )


def _teacher_pass(graphdef, params, mb: dict, cfg: StepConfig) -> Array:
  """The teacher's part of the pre-pass on one chunk: its log-probs [B, T-1]
  ("sampled") or its hidden states of the target columns ("full")."""
  if cfg.distill == "full":
    return teacher_hidden(
      graphdef, params, mb["tokens"], mb["mask"], last=cfg.response_len, group=cfg.group
    )
  return _logprobs(graphdef, params, mb, cfg.teacher_cfg())[0]


def packed_logprobs(
  graphdef,
  params,
  tokens_BT,
  plan: dict,
  *,
  temperature=1.0,
  chunk=1024,
  router_aux: bool = False,
  frozen=None,
  dropout_key=None,
  teacher=None,
):
  """`sequence_logprobs` [B, T-1] of the rows one packed slot holds
  (docs/method.md §18); rows it does not hold get 0.

  `plan`: one slot of `packing.make_plan`, "row", "col", "segment" and
  "position" [Q, L]. The slot's tokens are gathered from `tokens_BT`, run as
  Q packed rows (attention inside a segment, positions restarting per
  segment), and each token's log-prob of its row's next token and its
  entropy are scattered back to the row's column.
  `teacher`: (its hidden states [Q, L, E] of this slot, `packed_hidden`; its
  unembedding; its temperature) also returns, after the entropy, the per-token
  (reverse, forward) KL to it, [B, T-1] each, as `sequence_logprobs`'s.
  """
  model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
  row, col, seg = plan["row"], plan["col"], plan["segment"]
  tok_QL = tokens_BT[row, col]
  out = _packed_forward(model, tok_QL, plan, tokens_BT.shape[0], dropout_key)
  unembed = model.unembed()
  outs = list(
    obj.chunked_logprobs_and_entropy(
      out.hidden[:, :-1], unembed, tok_QL[:, 1:], temperature=temperature, chunk_size=chunk
    )
  )
  if teacher is not None:
    hidden_t, unembed_t, temperature_t = teacher
    outs += obj.chunked_teacher_kl(
      out.hidden[:, :-1],
      unembed,
      hidden_t[:, :-1],
      unembed_t,
      temperature,
      temperature_t,
      chunk_size=chunk,
    )
  # A packed token predicts the next packed token only inside its own segment.
  b, t = tokens_BT.shape
  target = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  to_row = jnp.where(target, row[:, :-1], b)  # out of range: dropped
  to_col = col[:, :-1]
  outs = [jnp.zeros((b, t - 1), x.dtype).at[to_row, to_col].add(x, mode="drop") for x in outs]
  if teacher is not None:
    outs = outs[:2] + [tuple(outs[2:])]
  if router_aux:
    outs.append(model_lib.router_aux(model.cfg, out.router_stats))
  return tuple(outs)


def _packed_forward(model, tok_QL, plan: dict, rows: int, dropout_key=None):
  """The model over one packed slot's gathered tokens [Q, L] from `rows`
  source rows (a packed row holds at most that many segments): attention
  inside a segment, positions restarting per segment; final hidden states."""
  seg = plan["segment"]
  return model(
    tok_QL,
    plan["position"],
    (seg > 0).astype(jnp.int32),
    return_hidden=True,
    lora_dropout_key=dropout_key,
    segment_ids_BT=seg,
    max_segments=rows,
  )


def packed_hidden(graphdef, params, tokens_BT, plan: dict) -> Array:
  """A teacher's final hidden states [Q, L, E] of one packed slot (`plan` as
  `packed_logprobs`'s), for its `teacher` argument."""
  model = nnx.merge(graphdef, params)
  tok_QL = tokens_BT[plan["row"], plan["col"]]
  return _packed_forward(model, tok_QL, plan, tokens_BT.shape[0]).hidden


def _packed(
  graphdef,
  params,
  tokens_BT,
  plan,
  cfg: StepConfig,
  router_aux=False,
  frozen=None,
  key=None,
  teacher=None,
):
  return packed_logprobs(
    graphdef,
    params,
    tokens_BT,
    plan,
    temperature=cfg.temperature,
    chunk=cfg.logit_chunk,
    router_aux=router_aux,
    frozen=frozen,
    dropout_key=key,
    teacher=teacher,
  )


def _slot_holds(plan: dict, rows: int) -> Array:
  """[rows] int32: 1 where the packed slot `plan` holds the row."""
  at = jnp.where(plan["segment"] > 0, plan["row"], rows)
  return jnp.zeros((rows,), jnp.int32).at[at].max(1, mode="drop")


def _packed_micro_logprobs(graphdef, params, tokens_BT, plan_S: dict, cfg: StepConfig, frozen=None):
  """(log-probs, entropy) [B, T-1] of one micro-batch's rows from its packed
  slots (plan leaves [S, Q, L]), no gradient; a slot holding nothing is skipped."""
  b, t = tokens_BT.shape
  zeros = jnp.zeros((b, t - 1), jnp.float32)

  def slot(carry, plan):
    ps, fz, logp, ent = carry  # params in the carry, as in _chunked_logprobs

    def run(ops):
      return _packed(graphdef, ops[0], tokens_BT, plan, cfg, frozen=ops[1])

    lp, en = jax.lax.cond(jnp.any(plan["segment"] > 0), run, lambda ops: (zeros, zeros), (ps, fz))
    return (ps, fz, logp + lp, ent + en), None

  (_, _, logp, ent), _ = jax.lax.scan(slot, (params, frozen, zeros, zeros), plan_S)
  return logp, ent


def _packed_chunked_logprobs(
  graphdef, params_list, batch: dict, plan: dict, cfg: StepConfig, frozen=None
) -> list[Array]:
  """`_chunked_logprobs` with every micro-batch's rows run packed (plan
  leaves [minibatches, microbatches, S, Q, L])."""
  n = cfg.minibatches * cfg.microbatches
  chunks = _split({"tokens": batch["tokens"]}, n)
  plans = {k: v.reshape((n,) + v.shape[2:]) for k, v in plan.items()}

  def body(carry, xs):
    ps, fz = carry
    mb, pl = xs
    return carry, [_packed_micro_logprobs(graphdef, p, mb["tokens"], pl, cfg, fz)[0] for p in ps]

  _, out = jax.lax.scan(body, (params_list, frozen), (chunks, plans))
  return [jax.lax.stop_gradient(x.reshape((-1,) + x.shape[2:])) for x in out]


def _packed_teacher_hidden(graphdef, params, batch: dict, plan: dict, cfg: StepConfig) -> Array:
  """The teacher's hidden states of every packed slot, [minibatches,
  microbatches, S, Q, L, E] like the plan's leaves, no gradient; a slot holding
  nothing is zeros."""
  n = cfg.minibatches * cfg.microbatches
  chunks = _split({"tokens": batch["tokens"]}, n)
  plans = {k: v.reshape((n,) + v.shape[2:]) for k, v in plan.items()}

  def body(ps, xs):
    mb, pl = xs

    def slot(ps, p):
      run = lambda ops: packed_hidden(graphdef, ops, mb["tokens"], p)  # noqa: E731
      empty = jax.eval_shape(run, ps)
      zeros = lambda ops: jnp.zeros(empty.shape, empty.dtype)  # noqa: E731
      return ps, jax.lax.cond(jnp.any(p["segment"] > 0), run, zeros, ps)

    return jax.lax.scan(slot, ps, pl)  # params in the carry, as in _chunked_logprobs

  _, h = jax.lax.scan(body, params, (chunks, plans))
  lead = next(iter(plan.values())).shape[:2]
  return jax.lax.stop_gradient(h.reshape(lead + h.shape[1:]))


def _chunked_logprobs(
  graphdef, params_list, batch: dict, cfg: StepConfig, frozen=None, teacher=None
) -> list[Array]:
  """Log-probs [B, T-1] of the whole batch under each params (no gradient), one
  pass over micro-batch-sized chunks so memory stays that of one micro-batch.
  `teacher` (its graphdef, params): its `_teacher_pass` of each chunk comes last."""
  n = cfg.minibatches * cfg.microbatches
  chunks = _split({"tokens": batch["tokens"], "mask": batch["mask"]}, n)
  t_graphdef, t_params = teacher if teacher is not None else (None, None)

  # The params ride in the carry: a closed-over outer value cannot be merged
  # into a module inside the scan when the model is rematerialised (flax).
  def body(carry, mb):
    ps, fz, tp = carry
    out = [_logprobs(graphdef, p, mb, cfg, frozen=fz)[0] for p in ps]
    if tp is not None:
      out.append(_teacher_pass(t_graphdef, tp, mb, cfg))
    return carry, out

  _, out = jax.lax.scan(body, (params_list, frozen, t_params), chunks)
  return [jax.lax.stop_gradient(x.reshape((-1,) + x.shape[2:])) for x in out]


def mismatch_metrics(old_logp_BT: Array, sampler_logp_BT: Array, rollout_mask_BT: Array) -> dict:
  """How far the sampler's log-probs are from the trainer's on rollout tokens
  (docs/method.md §2.7): |old - sampler| mean, p95 (nearest rank) and max;
  the fraction of tokens whose ratio exp(old - sampler) is outside [0.5, 2];
  the mean over rollout rows of the row's sum of (old - sampler)."""
  m = rollout_mask_BT.astype(jnp.float32)
  d = jnp.where(m > 0, old_logp_BT - sampler_logp_BT, 0.0)
  a = jnp.abs(d)
  n = jnp.sum(m)
  flat = jnp.sort(jnp.where(m > 0, a, -1.0).reshape(-1))  # masked entries sort first
  rank = jnp.ceil(0.95 * n).astype(jnp.int32) - 1
  p95 = flat[jnp.clip(flat.shape[0] - n.astype(jnp.int32) + rank, 0, flat.shape[0] - 1)]
  rows = jnp.any(m > 0, axis=1).astype(jnp.float32)
  safe = lambda x, c: jnp.where(c > 0, x / jnp.maximum(c, 1.0), 0.0)  # noqa: E731
  return {
    "mismatch/abs_mean": safe(jnp.sum(a), n),
    "mismatch/abs_p95": jnp.where(n > 0, p95, 0.0),
    "mismatch/abs_max": jnp.max(a),
    "mismatch/ratio_outside_frac": safe(jnp.sum(m * ((d < -jnp.log(2.0)) | (d > jnp.log(2.0)))), n),
    "mismatch/row_sum_mean": safe(jnp.sum(jnp.sum(d, axis=1) * rows), jnp.sum(rows)),
  }


def train_step(
  graphdef,
  tx,
  cfg: StepConfig,
  state: dict,
  batch: dict,
  ref_params=None,
  frozen=None,
  pack=None,
  teacher=None,
  *,
  teacher_graphdef=None,
) -> tuple[dict, dict]:
  """One rollout batch: `cfg.minibatches` optimizer updates, each accumulating
  gradients over `cfg.microbatches` chunks with the full mini-batch's loss
  denominators (exact, docs/method.md §8). Non-finite updates are skipped and counted.

  With `cfg.recompute_old_logp` the trainer's own log-probs under the current
  params become `old_logp` before any update and the sampler's become
  `sampler_logp`; with `cfg.reference` the reference params (`ref_params`,
  the base) give `ref_logp` for the KL term, in the same pass.

  With LoRA, `state["params"]` holds the adapters only (the optimizer and its
  state see nothing else) and `frozen` the base (`lora.split`); the reference
  is then the base with zero adapters (`lora.zeros_like`), not a second copy.

  `pack` (with `cfg.pack_len`): the packing plan (`packing.make_plan`, leaves
  [minibatches, microbatches, slots, pack_rows, pack_len]); every forward then
  runs packed slots (docs/method.md §18), the loss sees the same [rows, T-1]
  arrays. Without it the rows run as they are.

  `teacher` (with `teacher_graphdef`; needed where `cfg.distill`): the frozen
  teacher's params, never updated (docs/method.md §19). The same pre-pass gives
  `teacher_logp` ("sampled"), or its hidden states of the target columns
  ("full"), from which the loss forward computes the exact per-token KL.
  """
  loss_cfg = cfg.loss
  pre = {}
  if cfg.distill and teacher is None:
    raise ValueError(f"loss.distill_coef > 0 ({cfg.distill} estimator) needs the teacher's params")
  t_pass = (teacher_graphdef, teacher) if cfg.distill else None
  t_unembed = None
  if cfg.distill == "full":
    t_unembed = jax.lax.stop_gradient(nnx.merge(teacher_graphdef, teacher).unembed())
  if cfg.recompute_old_logp or cfg.reference or t_pass is not None:
    params_list = ([state["params"]] if cfg.recompute_old_logp else []) + (
      [ref_params] if cfg.reference else []
    )
    if pack is None:
      out = _chunked_logprobs(graphdef, params_list, batch, cfg, frozen, t_pass)
    else:
      out = _packed_chunked_logprobs(graphdef, params_list, batch, pack, cfg, frozen)
      if cfg.distill == "sampled":
        out += _packed_chunked_logprobs(teacher_graphdef, [teacher], batch, pack, cfg.teacher_cfg())
      elif cfg.distill == "full":  # slot by slot, carried with the plan to the loss forward
        pack = {**pack, "teacher_hidden": _packed_teacher_hidden(*t_pass, batch, pack, cfg)}
    mask = batch["response_mask"].astype(jnp.float32)
    batch = dict(batch)
    if cfg.recompute_old_logp:
      old = out.pop(0) * mask
      rollout = mask * (1.0 - batch["is_demo"].astype(jnp.float32))[:, None]
      pre = mismatch_metrics(old, batch["old_logp"], rollout)
      batch["sampler_logp"], batch["old_logp"] = batch["old_logp"], old
    if cfg.reference:
      batch["ref_logp"] = out.pop(0) * mask
    if cfg.distill == "sampled":
      batch["teacher_logp"] = out.pop(0) * mask
    elif cfg.distill == "full" and pack is None:
      batch["teacher_hidden"] = out.pop(0)  # [rows, target columns, E], split like the rows

  def loss_fn(trainable, mb, denominators, batch_entropy, key):
    # LoRA's frozen base rides with the adapters through value_and_grad, so both
    # are traced alike (nnx.remat refuses a module mixing trace levels), and
    # stop_gradient gives it a zero tangent: no gradient work, no base gradient.
    params, frozen = trainable[0], jax.lax.stop_gradient(trainable[1])
    if cfg.distill == "full":  # docs/method.md §19.2: the KL from the student's own forward
      t_in = (mb["teacher_hidden"], t_unembed, cfg.teacher_cfg().temperature)
      logp, ent, (rkl, fkl), router = _logprobs(
        graphdef, params, mb, cfg, router_aux=True, frozen=frozen, key=key, teacher=t_in
      )
      mb = {**mb, "distill_rkl": rkl, "distill_fkl": fkl}
    else:
      logp, ent, router = _logprobs(
        graphdef, params, mb, cfg, router_aux=True, frozen=frozen, key=key
      )
    parts = obj.srft_loss_parts(logp, ent, mb, loss_cfg, batch_entropy=batch_entropy)
    parts = obj.with_denominators(parts, denominators)
    loss = obj.combine(parts)[0]
    return with_router(loss, parts, router, mb["mask"], denominators)

  def with_router(loss, parts, router, mask, denominators):
    if router is not None:
      # MoE load balancing: coef * aux of this micro-batch, weighted by its share
      # n / N of the mini-batch's real tokens, so the micro-batches add up to the
      # token-weighted mean of their aux values: with one micro-batch exactly the
      # mini-batch's (HF's) value; aux is bilinear in two batch means, so with
      # several it is that mean, not the product of the full batch's means.
      # Logged as `loss/router_aux` from a (sum, count) pair, n * aux over n.
      n = jnp.sum(mask).astype(jnp.float32)
      loss = loss + router.coef * router.loss * n / denominators["router_tokens"]
      parts = obj.LossParts(
        {**parts.sums, "loss/router_aux": router.loss * n},
        {**parts.counts, "loss/router_aux": n},
      )
    return loss, parts

  def packed_loss_fn(trainable, mb, plan, denominators, batch_entropy, key):
    # loss_fn over one packed slot: rows it does not hold leave every sum and count.
    params, frozen = trainable[0], jax.lax.stop_gradient(trainable[1])
    if cfg.distill == "full":  # the teacher's hidden states of this slot (the pre-pass)
      t_in = (plan["teacher_hidden"], t_unembed, cfg.teacher_cfg().temperature)
      logp, ent, (rkl, fkl), router = _packed(
        graphdef, params, mb["tokens"], plan, cfg, True, frozen, key, teacher=t_in
      )
      mb = {**mb, "distill_rkl": rkl, "distill_fkl": fkl}
    else:
      logp, ent, router = _packed(
        graphdef, params, mb["tokens"], plan, cfg, router_aux=True, frozen=frozen, key=key
      )
    held = _slot_holds(plan, mb["tokens"].shape[0])
    mb = {**mb, "response_mask": mb["response_mask"] * held[:, None]}
    parts = obj.srft_loss_parts(logp, ent, mb, loss_cfg, batch_entropy=batch_entropy)
    parts = obj.with_denominators(parts, denominators)
    loss = obj.combine(parts)[0]
    return with_router(loss, parts, router, plan["segment"] > 0, denominators)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  packed_grad_fn = jax.value_and_grad(packed_loss_fn, has_aux=True)
  step_key = jax.random.fold_in(jax.random.key(cfg.dropout_seed), state["step"])

  def packed_grads(state, micro, plan_m, denominators, i):
    """(grads, loss, parts [microbatches * slots]) of one mini-batch's
    micro-batches, each run as its packed slots; empty slots are skipped."""
    slots = plan_m["segment"].shape[1]
    batch_entropy = None
    if loss_cfg.entropy_granularity == "batch" and cfg.microbatches * slots > 1:

      def ent_sums(carry, xs):
        params, fz, s, c = carry  # params in the carry, as in _chunked_logprobs
        mb, pl = xs
        _, ent = _packed_micro_logprobs(graphdef, params, mb["tokens"], pl, cfg, fz)
        ds, dc = obj.entropy_sum_and_count(ent, mb["response_mask"])
        return (params, fz, s + ds, c + dc), None

      (_, _, s, c), _ = jax.lax.scan(ent_sums, (state["params"], frozen, 0.0, 0.0), (micro, plan_m))
      batch_entropy = jax.lax.stop_gradient(s / jnp.maximum(c, 1.0))

    def micro_step(carry, xs):
      mb, plan_s, j = xs

      def slot_step(carry, xs):
        grads, loss, fz = carry
        plan, s = xs
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(step_key, i), j), s)

        def run(ops):
          (l, parts), (g, _) = packed_grad_fn(ops, mb, plan, denominators, batch_entropy, key)
          return g, l, parts

        def skip(ops):
          return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(run, ops))

        g, l, parts = jax.lax.cond(jnp.any(plan["segment"] > 0), run, skip, (state["params"], fz))
        return (jax.tree.map(jnp.add, grads, g), loss + l, fz), parts

      return jax.lax.scan(slot_step, carry, (plan_s, jnp.arange(slots)))

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    (grads, loss, _), parts = jax.lax.scan(
      micro_step,
      (zeros, jnp.zeros((), jnp.float32), frozen),
      (micro, plan_m, jnp.arange(cfg.microbatches)),
    )
    parts = jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), parts)
    return grads, loss, parts

  def update(state, xs):
    minibatch, i = xs[0], xs[1]
    denominators = obj.loss_denominators(minibatch, loss_cfg)
    denominators["router_tokens"] = jnp.sum(minibatch["mask"]).astype(jnp.float32)  # N (MoE)
    micro = _split(minibatch, cfg.microbatches)
    if pack is None:
      batch_entropy = None
      # With one micro-batch the loss's own forward sees the whole mini-batch and
      # computes H itself (batch_entropy=None): no extra forward pass.
      if loss_cfg.entropy_granularity == "batch" and cfg.microbatches > 1:

        def ent_sums(carry, mb):
          params, fz, s, c = carry  # params in the carry, as in _chunked_logprobs
          _, ent = _logprobs(graphdef, params, mb, cfg, frozen=fz)
          ds, dc = obj.entropy_sum_and_count(ent, mb["response_mask"])
          return (params, fz, s + ds, c + dc), None

        (_, _, s, c), _ = jax.lax.scan(ent_sums, (state["params"], frozen, 0.0, 0.0), micro)
        batch_entropy = jax.lax.stop_gradient(s / jnp.maximum(c, 1.0))

      def accumulate(carry, xs):
        mb, j = xs
        grads, loss, fz = carry  # the frozen base in the carry, as the params above
        key = jax.random.fold_in(jax.random.fold_in(step_key, i), j)  # LoRA dropout only
        (l, parts), (g, _) = grad_fn((state["params"], fz), mb, denominators, batch_entropy, key)
        return (jax.tree.map(jnp.add, grads, g), loss + l, fz), parts

      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      (grads, loss, _), parts = jax.lax.scan(
        accumulate,
        (zeros, jnp.zeros((), jnp.float32), frozen),
        (micro, jnp.arange(cfg.microbatches)),
      )
    else:
      grads, loss, parts = packed_grads(state, micro, xs[2], denominators, i)
    # Metrics of the whole mini-batch from the micro-batches' (sum, count) pairs.
    total = obj.LossParts(
      {k: jnp.sum(v, axis=0) for k, v in parts.sums.items()},
      {k: jnp.sum(v, axis=0) for k, v in parts.counts.items()},
    )
    _, aux = obj.combine(obj.with_denominators(total, denominators))
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

  xs = (_split(batch, cfg.minibatches), jnp.arange(cfg.minibatches))
  state, metrics = jax.lax.scan(update, state, xs if pack is None else xs + (pack,))
  metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), metrics)
  metrics["skipped"] = metrics["skipped"] * cfg.minibatches
  metrics.update(pre)
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


def jit_train_step(
  graphdef,
  tx,
  cfg: StepConfig,
  state_sh,
  batch_sh,
  ref_sh=None,
  frozen_sh=None,
  pack_sh=None,
  teacher_sh=None,
  teacher_graphdef=None,
):
  """`train_step` jitted with explicit shardings and the state donated; called
  as fn(state, batch, ref_params) (ref_params None unless `cfg.reference`),
  with `frozen_sh` (LoRA) as fn(state, batch, ref_params, frozen), with
  `pack_sh` (packing) as fn(state, batch, ref_params, frozen or None, plan),
  and with `teacher_sh` (a teacher, `teacher_graphdef`) as fn(state, batch,
  ref_params, frozen or None, plan or None, teacher params): the teacher is an
  argument like the frozen base, never donated."""
  in_sh = (state_sh, batch_sh, ref_sh) + (() if frozen_sh is None else (frozen_sh,))
  if pack_sh is not None:
    in_sh = (state_sh, batch_sh, ref_sh, frozen_sh, pack_sh)
  if teacher_sh is not None:
    in_sh = (state_sh, batch_sh, ref_sh, frozen_sh, pack_sh, teacher_sh)
  return jax.jit(
    functools.partial(train_step, graphdef, tx, cfg, teacher_graphdef=teacher_graphdef),
    in_shardings=in_sh,
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )


def prepare_batch(
  prompt_tokens_bP,
  prompt_mask_bP,
  roll_tokens,
  roll_mask,
  roll_logp,
  demo_tokens_bR,
  demo_mask_bR,
  rewards,
  row_weight=None,
  *,
  layout: GroupLayout,
  cfg: obj.AdvantageConfig,
) -> dict[str, Array]:
  """One step's training batch from its samples and rewards: group advantages
  (`rollout_advantages`), then `assemble_batch`."""
  advantages = rollout_advantages(rewards, layout=layout, cfg=cfg)
  return assemble_batch(
    prompt_tokens_bP,
    prompt_mask_bP,
    roll_tokens,
    roll_mask,
    roll_logp,
    demo_tokens_bR,
    demo_mask_bR,
    rewards,
    advantages,
    row_weight,
    layout=layout,
  )


def jit_prepare_batch(args: tuple, layout: GroupLayout, cfg: obj.AdvantageConfig, mesh, rules):
  """`prepare_batch` jitted for arguments shaped like `args`, its output rows
  split over the data axes (out_shardings: the train step's batch shardings)."""
  fn = functools.partial(prepare_batch, layout=layout, cfg=cfg)
  out = jax.eval_shape(fn, *args)
  return jax.jit(fn, out_shardings=batch_shardings(out, mesh, rules))


def split_policy(model):
  """(graphdef, trainable params, frozen base or None) of a policy, concrete or
  abstract (`nnx.eval_shape`): with LoRA adapters the train state holds the
  adapters and the frozen base is an argument of every step."""
  if lora_lib.has_adapters(model):
    return lora_lib.split(model)
  graphdef, params = nnx.split(model)
  return graphdef, params, None


def reference_params(params, frozen):
  """The KL term's reference (docs/method.md §2.5): a copy of the starting
  params; with LoRA (`frozen` not None) zero adapters on the same frozen base,
  so the weights are never copied."""
  return jax.tree.map(jnp.zeros_like if frozen is not None else jnp.copy, params)
