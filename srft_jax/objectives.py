"""The SRFT objective as pure JAX functions (docs/method.md §1-§4).

Standalone on purpose: this module imports nothing else from srft_jax, so other
JAX projects can copy or import it alone.

Pipeline, per training step::

    logp_BT, ent_BT = chunked_logprobs_and_entropy(hidden_BTD, unembed_DV, targets_BT)
    adv_B = group_advantages(rewards_B, group_ids_B, normalize_std=adv_cfg.normalize_std)
    loss, aux = srft_loss(logp_BT, ent_BT, batch, cfg)

On-policy distillation (docs/method.md §19) adds a teacher term: the batch
carries the teacher's per-token log-probs (``teacher_logp``) or the per-token
KL of ``chunked_teacher_kl`` (``distill_rkl``, ``distill_fkl``).

Exact micro-batch / multi-host accumulation. The loss is a sum of ratios
``sum_k numerator_k / denominator_k`` (one per term, docs/method.md §3). Numerators are
sums over tokens, so they split over micro-batches; denominators are token (or
row) counts of the *whole* batch. A trainer that splits a batch into micro-batches
therefore:

1. computes ``den = loss_denominators(full_batch, cfg)`` from the masks of the
   full batch (no model needed), and, only for ``entropy_granularity="batch"``,
   the global mean entropy ``h = batch_mean_entropy(ent_BT, response_mask_BT)``
   (from a no-grad forward over the full batch, or accumulated from
   ``entropy_sum_and_count`` over micro-batches);
2. for each micro-batch calls ``srft_loss(..., denominators=den,
   batch_entropy=h)``: that micro-batch's loss is exactly its share of the
   full-batch loss, so the micro-batch losses *and gradients* simply add up.

Under ``jax.jit`` on a mesh with global arrays the sums are global already; with
``shard_map`` ``psum`` the ``LossParts`` from ``srft_loss_parts`` and call
``combine``. The metrics in ``aux`` are per call (local) means.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = [
  "token_logprobs_and_entropy",
  "chunked_logprobs_and_entropy",
  "chunked_teacher_kl",
  "limit_vocab",
  "group_advantages",
  "LossConfig",
  "PRESETS",
  "DISTILL_PRESETS",
  "LossParts",
  "LOSS_TERMS",
  "DISTILL_TERMS",
  "loss_denominators",
  "entropy_sum_and_count",
  "batch_mean_entropy",
  "srft_loss_parts",
  "combine",
  "srft_loss",
]


# --------------------------------------------------------------------------
# Per-token log-probs and entropy (docs/method.md §1 step 4)
# --------------------------------------------------------------------------


def _stats_from_scaled_logits(z_NV: Array, targets_N: Array) -> tuple[Array, Array, Array, Array]:
  """float32 scaled logits -> (logp of target, entropy, p_NV, safe log p_NV).

  ``safe log p`` is 0 where p == 0 so -inf logits (masked vocabulary) give
  0 * finite instead of 0 * -inf = NaN, in the value and in the gradient.
  """
  lse_N = jax.nn.logsumexp(z_NV, axis=-1)
  logp_NV = z_NV - lse_N[..., None]
  p_NV = jnp.exp(logp_NV)
  safe_logp_NV = jnp.where(p_NV > 0, logp_NV, 0.0)
  ent_N = -jnp.sum(p_NV * safe_logp_NV, axis=-1)
  # Select the target by comparison with an iota, not a gather: elementwise
  # over V, so a vocab-sharded chunk needs only a reduction, never a gather.
  vocab_ids = lax.broadcasted_iota(jnp.int32, z_NV.shape, z_NV.ndim - 1)
  is_target = vocab_ids == targets_N[..., None].astype(jnp.int32)
  logp_N = jnp.sum(jnp.where(is_target, logp_NV, 0.0), axis=-1)
  return logp_N, ent_N, p_NV, safe_logp_NV


def token_logprobs_and_entropy(
  logits_BTV: Array, targets_BT: Array, temperature: float = 1.0
) -> tuple[Array, Array]:
  """float32 log p(target) and full-vocabulary entropy of softmax(logits / T).

  Returns ``(logp_BT, ent_BT)``. ``temperature`` is the rollout temperature,
  so log-probs match what the sampler scored (docs/method.md §1 step 4).
  """
  z_BTV = logits_BTV.astype(jnp.float32) / temperature
  logp_BT, ent_BT, _, _ = _stats_from_scaled_logits(z_BTV, targets_BT)
  return logp_BT, ent_BT


def _chunk_logits(h_BCD: Array, w_DV: Array, temperature: float) -> Array:
  # float32 accumulation even for bf16 weights: log-softmax needs it.
  return jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32) / temperature


def _chunked_forward(h_NBCD, w_DV, t_NBC, temperature):
  def one_chunk(_, xs):
    h_BCD, t_BC = xs
    logp, ent, _, _ = _stats_from_scaled_logits(_chunk_logits(h_BCD, w_DV, temperature), t_BC)
    return None, (logp, ent)

  _, (logp_NBC, ent_NBC) = lax.scan(one_chunk, None, (h_NBCD, t_NBC))
  return logp_NBC, ent_NBC


# custom_vjp rather than jax.checkpoint: the backward pass recomputes each
# chunk's logits (never stored), and the unembedding gradient accumulates in
# float32 across chunks even when the weights are bf16.
_chunked_core = jax.custom_vjp(_chunked_forward, nondiff_argnums=(3,))


def _chunked_core_fwd(h_NBCD, w_DV, t_NBC, temperature):
  return _chunked_forward(h_NBCD, w_DV, t_NBC, temperature), (h_NBCD, w_DV, t_NBC)


def _chunked_core_bwd(temperature, residuals, cotangents):
  h_NBCD, w_DV, t_NBC = residuals
  g_logp_NBC, g_ent_NBC = cotangents
  compute_dtype = jnp.result_type(h_NBCD.dtype, w_DV.dtype)

  def one_chunk(dw_DV, xs):
    h_BCD, t_BC, g_logp, g_ent = xs
    z = _chunk_logits(h_BCD, w_DV, temperature)
    _, ent, p, safe_logp = _stats_from_scaled_logits(z, t_BC)
    is_target = lax.broadcasted_iota(jnp.int32, z.shape, 2) == t_BC[..., None].astype(jnp.int32)
    # d logp_t / dz = onehot - p;  d H / dz = -p (log p + H).
    dz = g_logp[..., None] * (is_target.astype(jnp.float32) - p)
    dz = dz - g_ent[..., None] * p * (safe_logp + ent[..., None])
    dlogits = (dz / temperature).astype(compute_dtype)
    dh_BCD = jnp.einsum("bcv,dv->bcd", dlogits, w_DV, preferred_element_type=jnp.float32)
    dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h_BCD, dlogits, preferred_element_type=jnp.float32)
    return dw_DV, dh_BCD.astype(h_NBCD.dtype)

  dw_DV, dh_NBCD = lax.scan(
    one_chunk,
    jnp.zeros(w_DV.shape, jnp.float32),
    (h_NBCD, t_NBC, g_logp_NBC.astype(jnp.float32), g_ent_NBC.astype(jnp.float32)),
  )
  return dh_NBCD, dw_DV.astype(w_DV.dtype), None


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def chunked_logprobs_and_entropy(
  hidden_BTD: Array,
  unembed_DV: Array,
  targets_BT: Array,
  temperature: float = 1.0,
  chunk_size: int = 1024,
) -> tuple[Array, Array]:
  """``token_logprobs_and_entropy(hidden @ unembed, ...)`` without [B, T, V] logits.

  Logits exist for at most about ``chunk_size`` tokens at a time (all B rows x
  up to ``max(1, chunk_size // B)`` positions, so batch sharding stays on the
  batch axis of every chunk) and are recomputed in the backward pass. T need not be
  a multiple of the chunk: it is padded internally and the pad sliced off.
  Works with the batch axis sharded and with unembed's D or V axis sharded
  (GSPMD inserts the reductions). ``temperature`` must be a Python number.
  """
  if hidden_BTD.ndim != 3 or unembed_DV.ndim != 2 or targets_BT.ndim != 2:
    raise ValueError(
      "chunked_logprobs_and_entropy wants hidden [B,T,D], unembed [D,V], targets [B,T]; got "
      f"{hidden_BTD.shape}, {unembed_DV.shape}, {targets_BT.shape}"
    )
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  plan = _ChunkPlan.of(hidden_BTD.shape, chunk_size)
  logp_NBC, ent_NBC = _chunked_core(
    plan.split(hidden_BTD), unembed_DV, plan.split(targets_BT.astype(jnp.int32)), float(temperature)
  )
  return plan.join(logp_NBC), plan.join(ent_NBC)


class _ChunkPlan(NamedTuple):
  """How the T axis of [B, T, ...] splits into n chunks of C positions (all B rows)."""

  batch: int
  length: int
  n_chunks: int
  positions: int

  @classmethod
  def of(cls, shape_BT: tuple[int, ...], chunk_size: int) -> _ChunkPlan:
    batch, length = shape_BT[:2]
    # The fewest chunks of at most chunk_size // B positions, evened out so the
    # padding is under one position per chunk (64 positions at a 51 limit: 2 x 32).
    n_chunks = -(-length // max(1, min(length, chunk_size // batch)))
    return cls(batch, length, n_chunks, -(-length // n_chunks))

  def split(self, x_BT: Array) -> Array:
    """[B, T, ...] -> [n, B, C, ...], T padded at the end: scan over chunks of T."""
    pad = self.n_chunks * self.positions - self.length
    x = jnp.pad(x_BT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT.ndim - 2))
    x = x.reshape(self.batch, self.n_chunks, self.positions, *x_BT.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def join(self, x_NBC: Array) -> Array:
    """[n, B, C] -> [B, T], the padding sliced off."""
    x = x_NBC.transpose(1, 0, 2).reshape(self.batch, self.n_chunks * self.positions)
    return x[:, : self.length]


# --------------------------------------------------------------------------
# Per-token KL to a teacher over the whole vocabulary (docs/method.md §19.2)
# --------------------------------------------------------------------------


def _kl_stats(zs_NV: Array, zt_NV: Array) -> tuple[Array, Array, Array, Array, Array]:
  """Scaled student / teacher logits -> (KL(p||q), KL(q||p), p, log p - log q, q).

  A vocabulary entry with zero probability on the side that weighs the sum
  contributes 0 (as 0 log 0 = 0), so -inf logits masked on both sides are NaN-free.
  """
  logp_NV = zs_NV - jax.nn.logsumexp(zs_NV, axis=-1, keepdims=True)
  logq_NV = zt_NV - jax.nn.logsumexp(zt_NV, axis=-1, keepdims=True)
  p_NV, q_NV = jnp.exp(logp_NV), jnp.exp(logq_NV)
  log_ratio_NV = logp_NV - logq_NV
  rkl_N = jnp.sum(jnp.where(p_NV > 0, p_NV * log_ratio_NV, 0.0), axis=-1)
  fkl_N = jnp.sum(jnp.where(q_NV > 0, -q_NV * log_ratio_NV, 0.0), axis=-1)
  return rkl_N, fkl_N, p_NV, jnp.where(p_NV > 0, log_ratio_NV, 0.0), q_NV


def limit_vocab(z_BCV: Array, vocab_limit: int) -> Array:
  """Logits with -inf at the ids >= `vocab_limit` (0, or not below the last
  axis's size: unchanged): those ids get zero probability, the rest renormalise."""
  if not 0 < vocab_limit < z_BCV.shape[-1]:
    return z_BCV
  ids = lax.broadcasted_iota(jnp.int32, z_BCV.shape, z_BCV.ndim - 1)
  return jnp.where(ids < vocab_limit, z_BCV, -jnp.inf)


def _kl_logits(hs_BCD, ws_DV, ht_BCE, wt_EV, temperature, teacher_temperature, vocab_limit):
  zs = limit_vocab(_chunk_logits(hs_BCD, ws_DV, temperature), vocab_limit)
  zt = limit_vocab(_chunk_logits(ht_BCE, wt_EV, teacher_temperature), vocab_limit)
  return zs, zt


def _kl_forward(hs_NBCD, ws_DV, ht_NBCE, wt_EV, temperature, teacher_temperature, vocab_limit):
  def one_chunk(_, xs):
    hs_BCD, ht_BCE = xs
    zs, zt = _kl_logits(hs_BCD, ws_DV, ht_BCE, wt_EV, temperature, teacher_temperature, vocab_limit)
    rkl, fkl, _, _, _ = _kl_stats(zs, zt)
    return None, (rkl, fkl)

  _, (rkl_NBC, fkl_NBC) = lax.scan(one_chunk, None, (hs_NBCD, ht_NBCE))
  return rkl_NBC, fkl_NBC


# As _chunked_core: each chunk's logits (student and teacher) are recomputed in
# the backward pass, never stored; the teacher gets no gradient.
_kl_core = jax.custom_vjp(_kl_forward, nondiff_argnums=(4, 5, 6))


def _kl_core_fwd(hs_NBCD, ws_DV, ht_NBCE, wt_EV, temperature, teacher_temperature, vocab_limit):
  out = _kl_forward(hs_NBCD, ws_DV, ht_NBCE, wt_EV, temperature, teacher_temperature, vocab_limit)
  return out, (hs_NBCD, ws_DV, ht_NBCE, wt_EV)


def _kl_core_bwd(temperature, teacher_temperature, vocab_limit, residuals, cotangents):
  hs_NBCD, ws_DV, ht_NBCE, wt_EV = residuals
  g_rkl_NBC, g_fkl_NBC = cotangents
  compute_dtype = jnp.result_type(hs_NBCD.dtype, ws_DV.dtype)

  def one_chunk(dw_DV, xs):
    hs_BCD, ht_BCE, g_rkl, g_fkl = xs
    zs, zt = _kl_logits(hs_BCD, ws_DV, ht_BCE, wt_EV, temperature, teacher_temperature, vocab_limit)
    rkl, _, p, log_ratio, q = _kl_stats(zs, zt)
    # docs/method.md §19.2: d KL(p||q) / dz = p (log p - log q - KL);
    # d KL(q||p) / dz = p - q (z the student's scaled logits).
    dz = g_rkl[..., None] * p * (log_ratio - rkl[..., None]) + g_fkl[..., None] * (p - q)
    dlogits = (dz / temperature).astype(compute_dtype)
    dh_BCD = jnp.einsum("bcv,dv->bcd", dlogits, ws_DV, preferred_element_type=jnp.float32)
    dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", hs_BCD, dlogits, preferred_element_type=jnp.float32)
    return dw_DV, dh_BCD.astype(hs_NBCD.dtype)

  dw_DV, dh_NBCD = lax.scan(
    one_chunk,
    jnp.zeros(ws_DV.shape, jnp.float32),
    (hs_NBCD, ht_NBCE, g_rkl_NBC.astype(jnp.float32), g_fkl_NBC.astype(jnp.float32)),
  )
  return dh_NBCD, dw_DV.astype(ws_DV.dtype), None, None


_kl_core.defvjp(_kl_core_fwd, _kl_core_bwd)


def chunked_teacher_kl(
  student_hidden_BTD: Array,
  student_unembed_DV: Array,
  teacher_hidden_BTE: Array,
  teacher_unembed_EV: Array,
  temperature: float = 1.0,
  teacher_temperature: float | None = None,
  chunk_size: int = 1024,
) -> tuple[Array, Array]:
  """Per-token reverse and forward KL between student and teacher, without [B, T, V].

  With p = softmax(student_hidden @ student_unembed / temperature) and q the
  teacher's (``teacher_temperature``; None = ``temperature``) at every position,
  returns ``(rkl_BT, fkl_BT)``: KL(p||q) = sum_v p (log p - log q) and
  KL(q||p) = sum_v q (log q - log p), float32 (docs/method.md §19.2-§19.3).
  Chunked like ``chunked_logprobs_and_entropy``, a chunk holding the logits of
  about ``chunk_size // 2`` tokens for each model (so about ``chunk_size``
  logit rows in all: the same memory), with a custom VJP that recomputes each
  chunk's logits. Gradients reach the student's hidden states and unembedding
  only; the teacher's inputs get zero cotangents. Student and teacher may
  differ in width (D, E) and in padded vocabulary size (one tokenizer, padded to
  different multiples: Qwen2.5-1.5B's 151,936 rows, 7B's 152,064): then both
  distributions are taken over the ids both models have, the first
  min(V_s, V_t), each renormalised there (docs/method.md §19.2). Batch, D and V
  sharding work as in ``chunked_logprobs_and_entropy``.
  """
  if (
    student_hidden_BTD.ndim != 3
    or teacher_hidden_BTE.ndim != 3
    or student_unembed_DV.ndim != 2
    or teacher_unembed_EV.ndim != 2
  ):
    raise ValueError(
      "chunked_teacher_kl wants student hidden [B,T,D], unembed [D,V], teacher hidden "
      f"[B,T,E], unembed [E,V]; got {student_hidden_BTD.shape}, {student_unembed_DV.shape}, "
      f"{teacher_hidden_BTE.shape}, {teacher_unembed_EV.shape}"
    )
  if student_hidden_BTD.shape[:2] != teacher_hidden_BTE.shape[:2]:
    raise ValueError(
      f"student and teacher hidden states differ in [B, T]: {student_hidden_BTD.shape[:2]} "
      f"vs {teacher_hidden_BTE.shape[:2]}"
    )
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
  # Half the positions of chunked_logprobs_and_entropy's chunk: a chunk holds the
  # student's and the teacher's logits, so at most about chunk_size rows in all.
  plan = _ChunkPlan.of(student_hidden_BTD.shape, max(1, chunk_size // 2))
  sg = lax.stop_gradient
  # The teacher's unembedding at the student's width (never the student's: its
  # gradient keeps its shape): the ids past the student's sliced off, or zero
  # columns past the teacher's, masked on both sides.
  v_s, v_t = student_unembed_DV.shape[1], teacher_unembed_EV.shape[1]
  teacher_unembed_EV = sg(teacher_unembed_EV)
  if v_t > v_s:
    teacher_unembed_EV = teacher_unembed_EV[:, :v_s]
  elif v_t < v_s:
    teacher_unembed_EV = jnp.pad(teacher_unembed_EV, ((0, 0), (0, v_s - v_t)))
  rkl_NBC, fkl_NBC = _kl_core(
    plan.split(student_hidden_BTD),
    student_unembed_DV,
    plan.split(sg(teacher_hidden_BTE)),
    teacher_unembed_EV,
    float(temperature),
    float(teacher_temperature),
    v_t if v_t < v_s else 0,
  )
  return plan.join(rkl_NBC), plan.join(fkl_NBC)


# --------------------------------------------------------------------------
# Group advantages (docs/method.md §1 step 3, paper Eq. 7)
# --------------------------------------------------------------------------


def group_advantages(
  rewards_B: Array, group_ids_B: Array, normalize_std: bool = True, eps: float = 1e-6
) -> Array:
  """A = (r - mean_group) / (std_group + eps), std unbiased; or r - mean.

  A group is all rows sharing a group id (rollouts and the demonstration of
  one prompt). A group of one, or one whose rewards are all equal, gets
  exactly 0 (without this, rounding in the mean divided by eps would not be
  0). Give padded rows unique ids (singletons) to keep them out of real
  groups. Elementwise [B, B] sums instead of a matmul so TPU matmul
  precision cannot touch the mean.
  """
  r_B = rewards_B.astype(jnp.float32)
  same_BB = group_ids_B[:, None] == group_ids_B[None, :]
  same_f = same_BB.astype(jnp.float32)
  n_B = jnp.sum(same_f, axis=1)
  mean_B = jnp.sum(same_f * r_B[None, :], axis=1) / n_B
  dev_B = r_B - mean_B
  # Every member of a group has the same mean, so summing members' squared
  # deviations gives the group's sum of squares.
  ss_B = jnp.sum(same_f * (dev_B**2)[None, :], axis=1)
  std_B = jnp.sqrt(ss_B / jnp.maximum(n_B - 1.0, 1.0))
  gmax_B = jnp.max(jnp.where(same_BB, r_B[None, :], -jnp.inf), axis=1)
  gmin_B = jnp.min(jnp.where(same_BB, r_B[None, :], jnp.inf), axis=1)
  degenerate_B = (gmax_B == gmin_B) | (n_B <= 1.0)
  adv_B = dev_B / (std_B + eps) if normalize_std else dev_B
  return jnp.where(degenerate_B, 0.0, adv_B)


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """How `group_advantages` turns a group's rewards into advantages (docs/method.md §1.3).

  Paper (Eq. 7): (r - mean) / (std + eps); the released code's script: r - mean.
  """

  normalize_std: bool = True
  eps: float = 1e-6

  def __post_init__(self):
    if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
      raise ValueError(f"AdvantageConfig.eps={self.eps!r}: expected a finite number > 0")

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> AdvantageConfig:
    """The advantage form that goes with loss preset `name` (default: the paper's)."""
    if name not in PRESETS and name not in DISTILL_PRESETS:
      raise ValueError(f"unknown preset {name!r}; known: {sorted({**PRESETS, **DISTILL_PRESETS})}")
    return cls(**{**ADVANTAGE_PRESETS.get(name, {}), **overrides})


# --------------------------------------------------------------------------
# Loss configuration and presets (docs/method.md §2, §4)
# --------------------------------------------------------------------------

_CHOICES = {
  "sft_weight": ("entropy_neg", "entropy_pos", "const"),
  "demo_rl_shaping": ("none", "p_div_p_plus_gamma"),
  "self_rl_form": ("paper", "advantage"),
  "rl_weight": ("entropy_pos", "const"),
  "entropy_granularity": ("sequence", "token", "batch"),
  "aggregation": ("token_mean", "constant_len", "seq_mean_token_mean", "seq_mean_token_sum"),
  "is_correction": ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
  "kl_estimator": ("k1", "k2", "k3", "low_var_kl"),
  "distill_estimator": ("sampled", "full"),
}
# Aggregations that average per-row values over the rows with RL tokens.
SEQ_MEAN = ("seq_mean_token_mean", "seq_mean_token_sum")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Every switch of the SRFT loss (docs/method.md §2-§3). Defaults = the paper.

  Frozen and hashable, so it can be a static argument of ``jax.jit``.
  """

  # SFT on demonstrations, Eq. 8: w_sft = sft_coef * sg(exp(-H)) ("entropy_neg",
  # paper) | sft_coef * sg(exp(+H)) ("entropy_pos", released code) | sft_coef ("const").
  sft_coef: float = 0.5
  sft_weight: str = "entropy_neg"
  # Off-policy RL on demonstrations, Eq. 9-10: -A*p ("none", paper) or LUFFY's
  # policy shaping -A*p/(p+gamma) ("p_div_p_plus_gamma", released code).
  demo_rl_shaping: str = "none"
  demo_rl_gamma: float = 0.1
  # On-policy RL on rollouts, Eq. 11-12: "paper" = positives (r > 0)
  # w_rl*(-logp), negatives +logp; "advantage" = -A*ratio with
  # ratio = exp(logp - old_logp), rows with A > 0 scaled by w_rl (released code).
  self_rl_form: str = "paper"
  self_rl_coef: float = 0.1
  # w_rl = self_rl_coef * sg(exp(+H)) ("entropy_pos") | self_rl_coef ("const").
  rl_weight: str = "entropy_pos"
  # PPO clip for the advantage form; None = no clipping (the paper, docs/method.md §2).
  # The ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (None: clip_eps;
  # DAPO's clip-higher: 0.28). Dual clip (docs/method.md §2.6): for A < 0 a
  # token's loss is at most -clip_ratio_c * A (None = off; verl's 3.0).
  clip_eps: float | None = None
  clip_eps_high: float | None = None
  clip_ratio_c: float | None = None
  # Sampler-trainer mismatch (docs/method.md §2.7): rollout tokens' on-policy RL
  # terms times an importance weight from old_logp (the trainer's) over
  # sampler_logp (the sampler's), truncated at or masked outside is_cap.
  is_correction: str = "none"
  is_cap: float = 2.0
  # H inside the weights: per-row mean ("sequence"), per token, or one scalar
  # over all response tokens of the (global) batch.
  entropy_granularity: str = "sequence"
  # RL aggregation (docs/method.md §3): "token_mean" over all RL tokens;
  # "constant_len" = sum / (rows x max_response_len) (Dr.GRPO);
  # "seq_mean_token_mean" / "seq_mean_token_sum": the mean over RL rows of each
  # row's token mean / token sum.
  aggregation: str = "token_mean"
  max_response_len: int | None = None
  # - entropy_bonus * token-mean entropy (keeps its gradient); 0.001 in the code.
  entropy_bonus: float = 0.0
  # kl_coef * a KL estimator to the reference (base) model, token mean over
  # rollout tokens (baselines): k1, k2, k3 (default) or low_var_kl (k3 clamped).
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  # On-policy distillation from a frozen teacher (docs/method.md §19): distill_coef
  # * token mean over rollout tokens of the reverse KL to the teacher, estimated
  # on the sampled token ("sampled": -A * ratio with A = -sg(logp - teacher_logp))
  # or exact over the vocabulary ("full": batch["distill_rkl"]). 0 = off.
  # distill_on_demos: also distill_coef * the forward KL on demonstration tokens.
  distill_coef: float = 0.0
  distill_estimator: str = "sampled"
  distill_on_demos: bool = False
  use_sft: bool = True
  use_demo_rl: bool = True
  use_self_rl: bool = True

  def __post_init__(self):
    for name, allowed in _CHOICES.items():
      value = getattr(self, name)
      if value not in allowed:
        raise ValueError(f"LossConfig.{name}={value!r}: expected one of {allowed}")
    for name in ("sft_coef", "self_rl_coef", "entropy_bonus", "kl_coef", "distill_coef"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"LossConfig.{name}={value!r}: expected a finite number >= 0")
    if not (isinstance(self.demo_rl_gamma, (int, float)) and self.demo_rl_gamma > 0):
      raise ValueError(f"LossConfig.demo_rl_gamma={self.demo_rl_gamma!r}: expected > 0")
    if self.clip_eps is not None and not (0 < self.clip_eps < 1):
      raise ValueError(f"LossConfig.clip_eps={self.clip_eps!r}: expected None or in (0, 1)")
    if self.clip_eps_high is not None:
      if self.clip_eps is None:
        raise ValueError("LossConfig.clip_eps_high needs clip_eps (the lower clip width)")
      if not (isinstance(self.clip_eps_high, (int, float)) and self.clip_eps_high > 0):
        raise ValueError(f"LossConfig.clip_eps_high={self.clip_eps_high!r}: expected > 0")
    if self.clip_ratio_c is not None and not (
      isinstance(self.clip_ratio_c, (int, float)) and self.clip_ratio_c > 1
    ):
      raise ValueError(f"LossConfig.clip_ratio_c={self.clip_ratio_c!r}: expected None or > 1")
    if not (
      isinstance(self.is_cap, (int, float)) and math.isfinite(self.is_cap) and self.is_cap > 1
    ):
      raise ValueError(f"LossConfig.is_cap={self.is_cap!r}: expected a finite number > 1")
    if self.max_response_len is not None and not (
      isinstance(self.max_response_len, int) and self.max_response_len > 0
    ):
      raise ValueError(
        f"LossConfig.max_response_len={self.max_response_len!r}: expected a positive int"
      )
    if self.clip_ratio_c is not None and self.self_rl_form != "advantage":
      raise ValueError("LossConfig.clip_ratio_c applies to self_rl_form='advantage' only")
    if self.aggregation == "constant_len" and self.max_response_len is None:
      raise ValueError("LossConfig.max_response_len is required when aggregation='constant_len'")
    if not isinstance(self.distill_on_demos, bool):
      raise ValueError(f"LossConfig.distill_on_demos={self.distill_on_demos!r}: expected a bool")
    if self.distill_on_demos and self.distill_coef == 0:
      raise ValueError("LossConfig.distill_on_demos needs distill_coef > 0")
    if not (self.use_sft or self.use_demo_rl or self.use_self_rl or self.distill_coef > 0):
      raise ValueError(
        "LossConfig.use_sft/use_demo_rl/use_self_rl: at least one must be True "
        "(or distill_coef > 0)"
      )

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> LossConfig:
    """A docs/method.md §4 or §19.5 preset, optionally with field overrides."""
    presets = {**PRESETS, **DISTILL_PRESETS}
    if name not in presets:
      raise ValueError(f"unknown LossConfig preset {name!r}; known: {sorted(presets)}")
    return cls(**{**presets[name], **overrides})


# Plain GRPO on rollouts: -A*ratio on every rollout token, weight 1.
_GRPO_ROLLOUTS = dict(self_rl_form="advantage", rl_weight="const", self_rl_coef=1.0)

PRESETS: dict[str, dict[str, Any]] = {
  # The full method with the paper's switches (all LossConfig defaults).
  "srft": {},
  # The full method with the released code's switches (docs/method.md §2-§3):
  # w_sft = 0.5*exp(+H), LUFFY shaping p/(p+0.1) on demos, GRPO-style
  # advantage form on rollouts with 0.1*exp(H) on positive-advantage rows,
  # per-token entropy, entropy bonus 0.001, Dr.GRPO constant normaliser over
  # the paper's max response 8,192 (docs/method.md §5); advantages without std
  # (ADVANTAGE_PRESETS).
  "srft_code": dict(
    sft_weight="entropy_pos",
    demo_rl_shaping="p_div_p_plus_gamma",
    demo_rl_gamma=0.1,
    self_rl_form="advantage",
    entropy_granularity="token",
    entropy_bonus=0.001,
    aggregation="constant_len",
    max_response_len=8192,
  ),
  # SFT baseline: demonstrations only, w_sft = 1 constant, no rollouts.
  "sft": dict(sft_coef=1.0, sft_weight="const", use_demo_rl=False, use_self_rl=False),
  # On-policy GRPO: advantages with std, no demonstrations used, PPO clip 0.2
  # (as TRL and verl run it: a step makes several updates on one rollout batch).
  "grpo": dict(use_sft=False, use_demo_rl=False, **_GRPO_ROLLOUTS, clip_eps=0.2),
  # The paper's naive single-stage "SFT+RL": unweighted SFT (w = 1) on demos
  # plus GRPO on rollouts; no RL term on demonstrations, so the demo stays out
  # of the rollouts' advantage group (step.GroupLayout.demos_in_group).
  "sft_plus_rl": dict(sft_coef=1.0, sft_weight="const", use_demo_rl=False, **_GRPO_ROLLOUTS),
  # LUFFY: mixed group (the demo is in the advantage group: trainer's
  # business), shaped demo RL with gamma = 0.1, GRPO on rollouts, no SFT.
  "luffy": dict(
    use_sft=False, demo_rl_shaping="p_div_p_plus_gamma", demo_rl_gamma=0.1, **_GRPO_ROLLOUTS
  ),
  # Ablations (docs/method.md §4, §6): one entropy weight replaced by its constant.
  "srft_no_wsft": dict(sft_weight="const"),  # w_sft = 0.5
  "srft_no_wrl": dict(rl_weight="const"),  # w_rl = 0.1
  # DAPO (Yu et al. 2025): GRPO on rollouts with clip-higher [0.8, 1.28] and a
  # token mean over the whole batch; no demonstrations, no KL. Its trainer
  # switches (dynamic sampling, overlong shaping) are the config's
  # (configs/default.py:dapo).
  "dapo": dict(
    use_sft=False, use_demo_rl=False, **_GRPO_ROLLOUTS, clip_eps=0.2, clip_eps_high=0.28
  ),
  # Dr.GRPO (Liu et al. 2025): advantages without std (ADVANTAGE_PRESETS) and a
  # constant normaliser (rows x the run's max response length), PPO clip 0.2.
  "dr_grpo": dict(
    use_sft=False,
    use_demo_rl=False,
    **_GRPO_ROLLOUTS,
    clip_eps=0.2,
    aggregation="constant_len",
    max_response_len=8192,
  ),
}
# On-policy distillation presets (docs/method.md §19.5). Apart from PRESETS because
# their batches carry the teacher's keys (teacher_logp, or distill_rkl /
# distill_fkl), which a trainer must supply before it runs them.
DISTILL_PRESETS: dict[str, dict[str, Any]] = {
  # Distillation alone: the reverse KL to the teacher on the student's rollouts,
  # sampled estimator (the on-policy distillation recipe); no reward term, no SFT.
  "opd": dict(use_sft=False, use_demo_rl=False, use_self_rl=False, distill_coef=1.0),
  # The full method (`srft`) plus the same teacher term on its rollouts.
  "srft_opd": dict(distill_coef=1.0),
}
# Presets whose advantages differ from the paper's (AdvantageConfig.preset).
ADVANTAGE_PRESETS: dict[str, dict[str, Any]] = {
  "srft_code": dict(normalize_std=False),  # the released code's script: r - mean
  "dr_grpo": dict(normalize_std=False),
}
# (`sft_then_grpo` is a two-stage schedule of the `sft` and `grpo` presets: the
# trainer's business, not a loss config.)


# --------------------------------------------------------------------------
# The loss as (sum, count) parts (docs/method.md §3)
# --------------------------------------------------------------------------

LOSS_TERMS = ("sft", "rl_demo", "rl_self", "entropy_bonus", "kl")
# Terms present in LossParts only when their switch is on (docs/method.md §19):
# distill_coef > 0, distill_on_demos.
DISTILL_TERMS = ("distill", "distill_demo")


def _terms(parts_keys) -> tuple[str, ...]:
  """The loss terms of a LossParts: LOSS_TERMS and the teacher terms it holds."""
  return LOSS_TERMS + tuple(k for k in DISTILL_TERMS if k in parts_keys)


class LossParts(NamedTuple):
  """Numerators and denominators; loss = sum over the terms of sums/counts.

  The terms: LOSS_TERMS, plus those of DISTILL_TERMS that are on.

  ``sums`` and ``counts`` share keys: the LOSS_TERMS, then metric keys.
  """

  sums: dict[str, Array]
  counts: dict[str, Array]


def _term_masks(batch: Mapping[str, Array]) -> tuple[Array, Array, Array]:
  mask_BT = batch["response_mask"].astype(jnp.float32)
  demo_B = jnp.asarray(batch["is_demo"]).astype(jnp.float32)
  return mask_BT, mask_BT * demo_B[:, None], mask_BT * (1.0 - demo_B)[:, None]


def loss_denominators(batch: Mapping[str, Array], cfg: LossConfig) -> dict[str, Array]:
  """Denominator of each loss term, from the masks alone (docs/method.md §3).

  Compute it on the full batch and pass it to ``srft_loss(denominators=...)``
  of every micro-batch for exact accumulation.
  """
  mask_BT, demo_BT, roll_BT = _term_masks(batch)
  rl_BT = jnp.zeros_like(mask_BT)
  if cfg.use_demo_rl:
    rl_BT = rl_BT + demo_BT
  if cfg.use_self_rl:
    rl_BT = rl_BT + roll_BT
  rl_rows = jnp.sum(jnp.any(rl_BT > 0, axis=1).astype(jnp.float32))
  if cfg.aggregation == "token_mean":
    rl_den = jnp.sum(rl_BT)
  elif cfg.aggregation == "constant_len":  # rows with any RL token x max_response_len
    # (Dr.GRPO); rows outside every RL term (e.g. demos under grpo) are not counted.
    rl_den = rl_rows * cfg.max_response_len
  else:  # seq_mean_*: the number of rows with RL tokens
    rl_den = rl_rows
  den = {
    "sft": jnp.sum(demo_BT),
    "rl_demo": rl_den,
    "rl_self": rl_den,
    "entropy_bonus": jnp.sum(mask_BT),
    "kl": jnp.sum(roll_BT),
  }
  # The teacher terms (docs/method.md §19) are keys only when on: an off term
  # adds no key, no metric and no op.
  if cfg.distill_coef > 0:
    den["distill"] = jnp.sum(roll_BT)
  if cfg.distill_on_demos:
    den["distill_demo"] = jnp.sum(demo_BT)
  return den


def entropy_sum_and_count(ent_BT: Array, response_mask_BT: Array) -> tuple[Array, Array]:
  """(sum, count) of token entropy over response tokens; add over micro-batches."""
  mask = response_mask_BT.astype(jnp.float32)
  ent = jnp.where(mask > 0, lax.stop_gradient(ent_BT).astype(jnp.float32), 0.0)
  return jnp.sum(ent * mask), jnp.sum(mask)


def batch_mean_entropy(ent_BT: Array, response_mask_BT: Array) -> Array:
  """Mean token entropy over all response tokens: H for entropy_granularity='batch'."""
  total, count = entropy_sum_and_count(ent_BT, response_mask_BT)
  return total / jnp.maximum(count, 1.0)


def _weight_entropy(ent_BT, mask_BT, granularity, batch_entropy):
  """sg(H) in the shape that broadcasts against [B, T] (docs/method.md §2)."""
  ent_BT = lax.stop_gradient(ent_BT)
  if granularity == "token":
    return ent_BT
  if granularity == "sequence":
    n_B = jnp.sum(mask_BT, axis=1)
    return (jnp.sum(ent_BT * mask_BT, axis=1) / jnp.maximum(n_B, 1.0))[:, None]
  if batch_entropy is None:
    return batch_mean_entropy(ent_BT, mask_BT)
  return lax.stop_gradient(jnp.asarray(batch_entropy, jnp.float32))


def importance_weights(
  old_logp_BT: Array, sampler_logp_BT: Array, mask_BT: Array, correction: str, cap: float
) -> Array:
  """Importance weights of the sampler-trainer mismatch (docs/method.md §2.7), sg.

  r_t = exp(old_t - sampler_t) per token, or rho = exp(sum_t of the row's
  (old_t - sampler_t)) per row ("sequence_*", shape [B, 1]): the product of
  its token ratios. "*_truncate": min(w, cap); "*_mask": w inside [1/cap, cap],
  else 0. "none": ones.
  """
  mask = mask_BT.astype(jnp.float32)
  if correction == "none":
    return jnp.ones_like(mask)
  d = jnp.where(
    mask > 0, old_logp_BT.astype(jnp.float32) - sampler_logp_BT.astype(jnp.float32), 0.0
  )
  d = lax.stop_gradient(d)
  w = jnp.exp(d) if correction.startswith("token") else jnp.exp(jnp.sum(d, axis=1))[:, None]
  if correction.endswith("truncate"):
    return jnp.minimum(w, cap)
  return jnp.where((w >= 1.0 / cap) & (w <= cap), w, 0.0)


def _check_batch(logp_BT, ent_BT, batch, cfg):
  if logp_BT.ndim != 2 or logp_BT.shape != ent_BT.shape:
    raise ValueError(f"logp and ent must both be [B, T]; got {logp_BT.shape}, {ent_BT.shape}")
  b, t = logp_BT.shape
  want = {"response_mask": (b, t), "is_demo": (b,), "rewards": (b,), "advantages": (b,)}
  if cfg.use_self_rl and cfg.self_rl_form == "advantage":
    want["old_logp"] = (b, t)
  if cfg.kl_coef > 0:
    want["ref_logp"] = (b, t)
  if cfg.is_correction != "none":
    want["old_logp"] = (b, t)
    want["sampler_logp"] = (b, t)
  why = {}
  if cfg.distill_coef > 0:  # docs/method.md §19.4
    keys = ["teacher_logp"] if cfg.distill_estimator == "sampled" else ["distill_rkl"]
    if cfg.distill_on_demos and cfg.distill_estimator == "full":
      keys.append("distill_fkl")
    for key in keys:
      want[key] = (b, t)
      why[key] = f" (distill_coef > 0, distill_estimator={cfg.distill_estimator!r})"
  for key, shape in want.items():
    if key not in batch:
      raise ValueError(f"batch[{key!r}] is required for this LossConfig{why.get(key, '')}")
    if tuple(jnp.shape(batch[key])) != shape:
      raise ValueError(f"batch[{key!r}] has shape {jnp.shape(batch[key])}, expected {shape}")


def _policy_gradient(adv: Array, ratio_BT: Array, cfg: LossConfig) -> tuple[Array, Array, Array]:
  """-A * ratio, PPO-clipped and dual-clipped as cfg says (docs/method.md §2.3, §2.6).

  ``adv`` broadcasts against [B, T] (a row's [B, 1] or a token's [B, T]).
  Returns (per-token loss, clipped indicator, dual-clipped indicator).
  """
  per_token = -adv * ratio_BT
  clipped = jnp.zeros_like(ratio_BT)
  dual_clipped = jnp.zeros_like(ratio_BT)
  if cfg.clip_eps is not None:
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    clipped_pg = -adv * jnp.clip(ratio_BT, 1.0 - cfg.clip_eps, 1.0 + high)
    clipped = (clipped_pg > per_token).astype(jnp.float32)
    per_token = jnp.maximum(per_token, clipped_pg)
  if cfg.clip_ratio_c is not None:  # A < 0: at most -c * A (docs/method.md §2.6)
    bound = -adv * cfg.clip_ratio_c
    dual_clipped = ((adv < 0) & (per_token > bound)).astype(jnp.float32)
    per_token = jnp.where(adv < 0, jnp.minimum(per_token, bound), per_token)
  return per_token, clipped, dual_clipped


def _distill_parts(logp, valid, roll_BT, demo_BT, is_w, batch, cfg):
  """Sums and counts of the teacher terms (docs/method.md §19); distill_coef > 0."""
  sg = lax.stop_gradient
  coef = cfg.distill_coef
  sums, counts = {}, {}

  def given(key):  # a batch entry, zeroed off the response (garbage there stays out)
    return jnp.where(valid, jnp.asarray(batch[key], jnp.float32), 0.0)

  if cfg.distill_estimator == "sampled":
    # §19.1: k1 = log p_student(y) - log p_teacher(y) on the sampled token y; its
    # mean under the student's sampling is KL(student || teacher). A = -sg(k1) in
    # the policy-gradient surrogate -A * ratio (clip and IS weights as rl_self).
    teacher = given("teacher_logp")
    k1 = sg(logp) - teacher
    old = given("old_logp") if "old_logp" in batch else sg(logp)
    per_token, clipped, _ = _policy_gradient(-k1, jnp.exp(logp - old), cfg)
    if cfg.is_correction != "none":
      per_token = per_token * is_w
    sums["distill"] = coef * jnp.sum(roll_BT * per_token)
    sums["teacher_kl"] = sg(jnp.sum(roll_BT * k1))
    sums["distill_clip_frac"] = sg(jnp.sum(roll_BT * clipped))
    counts["distill_clip_frac"] = jnp.sum(roll_BT)
    if cfg.distill_on_demos:
      # §19.3: teacher-forced on the demonstration; value log q(y) - log p(y), the
      # forward KL's estimate if the demonstration is a teacher sample; gradient
      # -grad log p(y), SFT's.
      sums["distill_demo"] = coef * jnp.sum(demo_BT * (teacher - logp))
  else:
    # §19.2: the exact reverse KL, batch["distill_rkl"] from chunked_teacher_kl
    # computed inside the differentiated function (it carries the gradient).
    rkl = given("distill_rkl")
    sums["distill"] = coef * jnp.sum(roll_BT * rkl)
    sums["teacher_kl"] = sg(jnp.sum(roll_BT * rkl))
    if cfg.distill_on_demos:  # §19.3: KL(teacher || student) on demonstration tokens
      sums["distill_demo"] = coef * jnp.sum(demo_BT * given("distill_fkl"))
  counts["teacher_kl"] = jnp.sum(roll_BT)
  return sums, counts


def srft_loss_parts(
  logp_BT: Array,
  ent_BT: Array,
  batch: Mapping[str, Array],
  cfg: LossConfig,
  *,
  batch_entropy: Array | None = None,
) -> LossParts:
  """Numerators and this batch's denominators of every term (docs/method.md §2-§3).

  ``batch_entropy``: precomputed global H for ``entropy_granularity="batch"``
  (micro-batching); None = this batch's own mean.
  """
  _check_batch(logp_BT, ent_BT, batch, cfg)
  mask_BT, demo_BT, roll_BT = _term_masks(batch)
  valid = mask_BT > 0
  # Zero the inputs off the response first: garbage there (e.g. -inf
  # log-probs on padding) can then reach neither the value nor the gradient.
  logp = jnp.where(valid, logp_BT.astype(jnp.float32), 0.0)
  ent = jnp.where(valid, ent_BT.astype(jnp.float32), 0.0)
  adv_B1 = jnp.asarray(batch["advantages"], jnp.float32)[:, None]
  h = _weight_entropy(ent, mask_BT, cfg.entropy_granularity, batch_entropy)
  zero = jnp.zeros((), jnp.float32)
  sums = dict.fromkeys(LOSS_TERMS, zero)

  # L_sft_demo, docs/method.md §2 Eq. 8: w_sft * (-log p) on demo tokens.
  w_sft = {
    "entropy_neg": lambda: cfg.sft_coef * jnp.exp(-h),
    "entropy_pos": lambda: cfg.sft_coef * jnp.exp(h),
    "const": lambda: jnp.full_like(h, cfg.sft_coef),
  }[cfg.sft_weight]()
  if cfg.use_sft:
    sums["sft"] = jnp.sum(demo_BT * w_sft * -logp)

  def rl_sum(per_token_BT, term_BT):
    """Numerator of an RL term: a sum over its tokens, or (seq_mean_*) over its
    rows of each row's token mean / sum (docs/method.md §3)."""
    if cfg.aggregation not in SEQ_MEAN:
      return jnp.sum(term_BT * per_token_BT)
    row_B = jnp.sum(term_BT * per_token_BT, axis=1)
    if cfg.aggregation == "seq_mean_token_mean":
      row_B = row_B / jnp.maximum(jnp.sum(term_BT, axis=1), 1.0)
    return jnp.sum(row_B)

  # L_rl_demo, docs/method.md §2 Eq. 9-10: pi_beta = 1, no clip -> -A * p_t,
  # or LUFFY's policy shaping -A * p_t / (p_t + gamma).
  if cfg.use_demo_rl:
    p = jnp.exp(logp)
    shaped = p if cfg.demo_rl_shaping == "none" else p / (p + cfg.demo_rl_gamma)
    sums["rl_demo"] = rl_sum(-adv_B1 * shaped, demo_BT)

  # L_rl_self, docs/method.md §2 Eq. 11-12.
  w_rl = (
    jnp.exp(h) * cfg.self_rl_coef
    if cfg.rl_weight == "entropy_pos"
    else jnp.full_like(h, cfg.self_rl_coef)
  )
  ratio = jnp.exp(
    logp - jnp.where(valid, jnp.asarray(batch.get("old_logp", logp), jnp.float32), 0.0)
  )
  clipped = jnp.zeros_like(logp)
  dual_clipped = jnp.zeros_like(logp)
  if cfg.self_rl_form == "paper":
    # Positives (r > 0): w_rl * (-log p); negatives: +log p (weight 1).
    positive_B1 = (jnp.asarray(batch["rewards"], jnp.float32) > 0)[:, None]
    per_token = jnp.where(positive_B1, w_rl * -logp, logp)
  else:
    # Released code: GRPO -A * ratio (optionally PPO-clipped to
    # [1 - eps, 1 + eps_high], optionally dual-clipped), rows with A > 0
    # scaled by w_rl.
    positive_B1 = adv_B1 > 0
    per_token, clipped, dual_clipped = _policy_gradient(adv_B1, ratio, cfg)
    per_token = jnp.where(positive_B1, w_rl * per_token, per_token)
  is_w = importance_weights(
    batch.get("old_logp", logp),
    batch.get("sampler_logp", logp),
    roll_BT,
    cfg.is_correction,
    cfg.is_cap,
  )
  if cfg.is_correction != "none":
    per_token = per_token * is_w
  if cfg.use_self_rl:
    sums["rl_self"] = rl_sum(per_token, roll_BT)

  # Entropy bonus (docs/method.md §2): keeps its gradient, unlike H in the weights.
  if cfg.entropy_bonus > 0:
    sums["entropy_bonus"] = -cfg.entropy_bonus * jnp.sum(mask_BT * ent)

  # KL to the reference (baselines), docs/method.md §2.5: with x = logp - ref,
  # k1 = x, k2 = x^2 / 2, k3 = exp(-x) + x - 1, low_var_kl = k3 clamped to [-10, 10].
  if cfg.kl_coef > 0:
    x = logp - jnp.where(valid, jnp.asarray(batch["ref_logp"], jnp.float32), 0.0)
    k3 = lambda: jnp.exp(-x) + x - 1.0  # noqa: E731
    kl = {
      "k1": lambda: x,
      "k2": lambda: 0.5 * x**2,
      "k3": k3,
      "low_var_kl": lambda: jnp.clip(k3(), -10.0, 10.0),
    }[cfg.kl_estimator]()
    sums["kl"] = cfg.kl_coef * jnp.sum(roll_BT * kl)

  counts = loss_denominators(batch, cfg)
  if cfg.distill_coef > 0:  # docs/method.md §19
    distill_sums, distill_counts = _distill_parts(logp, valid, roll_BT, demo_BT, is_w, batch, cfg)
    sums.update(distill_sums)
    counts.update(distill_counts)
  # Report a weight only where its term is on (an off term's weight reads 0).
  w_sft_mask = demo_BT * float(cfg.use_sft)
  w_rl_mask = roll_BT * positive_B1 * float(cfg.use_self_rl)
  sg = lax.stop_gradient
  sums.update(
    w_sft=sg(jnp.sum(w_sft_mask * w_sft)),
    w_rl=sg(jnp.sum(w_rl_mask * w_rl)),
    entropy_demo=sg(jnp.sum(demo_BT * ent)),
    entropy_rollout=sg(jnp.sum(roll_BT * ent)),
    ratio=sg(jnp.sum(roll_BT * ratio)),
    clip_frac=sg(jnp.sum(roll_BT * clipped)),
    dual_clip_frac=sg(jnp.sum(roll_BT * dual_clipped)),
    is_weight=sg(jnp.sum(roll_BT * is_w)),
  )
  counts.update(
    w_sft=jnp.sum(w_sft_mask),
    w_rl=jnp.sum(w_rl_mask),
    entropy_demo=jnp.sum(demo_BT),
    entropy_rollout=jnp.sum(roll_BT),
    ratio=jnp.sum(roll_BT),
    clip_frac=jnp.sum(roll_BT),
    dual_clip_frac=jnp.sum(roll_BT),
    is_weight=jnp.sum(roll_BT),
  )
  return LossParts(sums, counts)


def _safe_div(num: Array, den: Array) -> Array:
  # An empty term (den == 0) has num == 0: report 0, never 0/0.
  return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0)


def combine(parts: LossParts) -> tuple[Array, dict[str, Array]]:
  """(loss, aux) from parts: loss = sum over the terms (LOSS_TERMS, and the
  DISTILL_TERMS that are on) of sums / counts."""
  aux = {k: _safe_div(parts.sums[k], parts.counts[k]) for k in parts.sums}
  loss = sum(aux[k] for k in _terms(parts.sums))
  aux["rl"] = aux["rl_demo"] + aux["rl_self"]
  aux["loss"] = loss
  aux["n_demo_tokens"] = parts.counts["entropy_demo"]
  aux["n_rollout_tokens"] = parts.counts["entropy_rollout"]
  aux = {k: lax.stop_gradient(v) for k, v in aux.items()}
  return loss, aux


def srft_loss(
  logp_BT: Array,
  ent_BT: Array,
  batch: Mapping[str, Array],
  cfg: LossConfig,
  *,
  denominators: Mapping[str, Array] | None = None,
  batch_entropy: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The SRFT loss L_sft_demo + L_rl_demo + L_rl_self (+ bonus, + KL, + teacher).

  batch: ``response_mask`` [B,T], ``is_demo`` [B], ``rewards`` [B],
  ``advantages`` [B], ``old_logp`` [B,T] (advantage form), ``ref_logp``
  [B,T] (kl_coef > 0), ``sampler_logp`` [B,T] (is_correction on: the
  sampler's log-probs, while ``old_logp`` holds the trainer's); with
  distill_coef > 0 (docs/method.md §19.4): ``teacher_logp`` [B,T] (the teacher's
  log-prob of each response token, no gradient; "sampled"; ``old_logp``
  optional there), or ``distill_rkl`` [B,T] and, with distill_on_demos,
  ``distill_fkl`` [B,T] ("full": ``chunked_teacher_kl`` of this call's student
  forward, so they carry the student's gradient). ``denominators``:
  ``loss_denominators`` of the full batch when this call is one micro-batch
  (see the module docstring);
  ``batch_entropy``: the full batch's mean entropy for granularity 'batch'.
  Returns ``(loss, aux)``; aux holds each term, mean w_sft / w_rl, mean
  entropy on demo and rollout tokens, ratio and clip fraction, token counts
  (and with distill_coef > 0: ``distill``, ``teacher_kl``, the mean reverse-KL
  estimate over rollout tokens, and ``distill_demo`` / ``distill_clip_frac``
  where they apply).
  """
  parts = srft_loss_parts(logp_BT, ent_BT, batch, cfg, batch_entropy=batch_entropy)
  if denominators is not None:
    parts = with_denominators(parts, denominators)
  return combine(parts)


def with_denominators(parts: LossParts, denominators: Mapping[str, Array]) -> LossParts:
  """`parts` with the loss terms' denominators replaced (e.g. by the full
  batch's `loss_denominators`, for one micro-batch)."""
  counts = dict(parts.counts)
  counts.update({k: jnp.asarray(denominators[k], jnp.float32) for k in _terms(parts.counts)})
  return LossParts(parts.sums, counts)
