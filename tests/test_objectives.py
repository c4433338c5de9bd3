"""Tests for srft_jax.objectives against independent NumPy references (docs/method.md §1-§4)."""

import dataclasses
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from srft_jax import objectives as obj

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Jitted once here: eager dispatch compiles every op separately, slow on 2 cores.
group_advantages = jax.jit(obj.group_advantages, static_argnames=("normalize_std", "eps"))


# --------------------------------------------------------------------------
# NumPy references, written from the docs/method.md formulas (float64, loops)
# --------------------------------------------------------------------------


def np_logp_ent(logits, targets, temperature):
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
  q = np.exp(logq)
  ent = -(q * logq).sum(-1)
  logp = np.take_along_axis(logq, np.asarray(targets)[..., None], -1)[..., 0]
  return logp, ent


def np_loss(logp, ent, batch, cfg, batch_entropy=None):
  """Returns (loss, d loss / d logp, d loss / d ent), all hand-derived."""
  logp = np.asarray(logp, np.float64)
  ent = np.asarray(ent, np.float64)
  mask = np.asarray(batch["response_mask"]) > 0
  demo = np.asarray(batch["is_demo"]).astype(bool)
  rew = np.asarray(batch["rewards"], np.float64)
  adv = np.asarray(batch["advantages"], np.float64)
  old = np.asarray(batch.get("old_logp", np.zeros_like(logp)), np.float64)
  ref = np.asarray(batch.get("ref_logp", np.zeros_like(logp)), np.float64)
  smp = np.asarray(batch.get("sampler_logp", old), np.float64)
  B, T = logp.shape
  tokens = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
  cap = cfg.is_cap

  def is_weight(b, t):
    """The importance weight of rollout token (b, t), from its definition."""
    if cfg.is_correction == "none":
      return 1.0
    if cfg.is_correction.startswith("token"):
      w = np.exp(old[b, t] - smp[b, t])
    else:
      w = np.exp(sum(old[b, s] - smp[b, s] for s in range(T) if mask[b, s]))
    if cfg.is_correction.endswith("truncate"):
      return min(w, cap)
    return w if 1 / cap <= w <= cap else 0.0

  h_batch = np.mean([ent[b, t] for b, t in tokens]) if batch_entropy is None else batch_entropy

  def weight_h(b, t):
    if cfg.entropy_granularity == "token":
      return ent[b, t]
    if cfg.entropy_granularity == "sequence":
      return np.mean([ent[b, s] for s in range(T) if mask[b, s]])
    return h_batch

  num = dict(sft=0.0, rl=0.0, bonus=0.0, kl=0.0)
  g = {k: np.zeros((B, T)) for k in num}
  g_ent_bonus = np.zeros((B, T))
  n_demo = n_roll = n_rl = 0
  rl_rows = set()
  row_val, row_n = np.zeros(B), np.zeros(B)  # per-row RL sums (seq_mean_* aggregations)
  for b, t in tokens:
    l, H = logp[b, t], weight_h(b, t)
    if demo[b]:
      n_demo += 1
      w_sft = {
        "entropy_neg": cfg.sft_coef * np.exp(-H),
        "entropy_pos": cfg.sft_coef * np.exp(H),
        "const": cfg.sft_coef,
      }[cfg.sft_weight]
      if cfg.use_sft:
        num["sft"] += -w_sft * l
        g["sft"][b, t] = -w_sft
      if cfg.use_demo_rl:
        n_rl += 1
        rl_rows.add(b)
        p = np.exp(l)
        if cfg.demo_rl_shaping == "none":
          value, grad = -adv[b] * p, -adv[b] * p
        else:
          gam = cfg.demo_rl_gamma
          value, grad = -adv[b] * p / (p + gam), -adv[b] * p * gam / (p + gam) ** 2
        num["rl"] += value
        g["rl"][b, t] = grad
        row_val[b] += value
        row_n[b] += 1
    else:
      n_roll += 1
      w_rl = cfg.self_rl_coef * (np.exp(H) if cfg.rl_weight == "entropy_pos" else 1.0)
      if cfg.use_self_rl:
        n_rl += 1
        rl_rows.add(b)
        if cfg.self_rl_form == "paper":
          value, grad = (-w_rl * l, -w_rl) if rew[b] > 0 else (l, 1.0)
        else:
          r = np.exp(l - old[b, t])
          value, grad = -adv[b] * r, -adv[b] * r
          if cfg.clip_eps is not None:
            high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
            clipped = -adv[b] * np.clip(r, 1 - cfg.clip_eps, 1 + high)
            if clipped > value:
              value, grad = clipped, 0.0
          if cfg.clip_ratio_c is not None and adv[b] < 0 and value > -adv[b] * cfg.clip_ratio_c:
            value, grad = -adv[b] * cfg.clip_ratio_c, 0.0
          scale = w_rl if adv[b] > 0 else 1.0
          value, grad = scale * value, scale * grad
        w = is_weight(b, t)
        num["rl"] += w * value
        g["rl"][b, t] = w * grad
        row_val[b] += w * value
        row_n[b] += 1
      x = l - ref[b, t]
      k3, dk3 = np.exp(-x) + x - 1, 1 - np.exp(-x)
      kl, dkl = {
        "k1": (x, 1.0),
        "k2": (0.5 * x**2, x),
        "k3": (k3, dk3),
        "low_var_kl": (min(k3, 10.0), dk3 if k3 < 10.0 else 0.0),
      }[cfg.kl_estimator]
      num["kl"] += cfg.kl_coef * kl
      g["kl"][b, t] = cfg.kl_coef * dkl
    num["bonus"] += -cfg.entropy_bonus * ent[b, t]
    g_ent_bonus[b, t] = -cfg.entropy_bonus
  rl_den = {
    "token_mean": n_rl,
    "constant_len": len(rl_rows) * (cfg.max_response_len or 0),
    "seq_mean_token_sum": len(rl_rows),
    "seq_mean_token_mean": len(rl_rows),
  }[cfg.aggregation]
  if cfg.aggregation == "seq_mean_token_mean":  # each row's mean, then the mean over rows
    num["rl"] = sum(row_val[b] / row_n[b] for b in rl_rows)
    g["rl"] = g["rl"] / np.maximum(row_n, 1)[:, None]
  den = dict(sft=n_demo, rl=rl_den, bonus=len(tokens), kl=n_roll)
  loss = sum(num[k] / den[k] for k in num if den[k] > 0)
  g_logp = sum(g[k] / den[k] for k in num if den[k] > 0)
  g_ent = g_ent_bonus / max(den["bonus"], 1)
  return loss, g_logp, g_ent


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


def make_batch(seed=0, B=6, T=7):
  """Two groups of 3 (2 rollouts + 1 demo), right padding, one empty row."""
  rng = np.random.default_rng(seed)
  lengths = np.array([7, 4, 5, 3, 0, 6])[:B]
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  logp = -rng.uniform(0.01, 3.0, (B, T)).astype(np.float32)
  ent = rng.uniform(0.1, 2.0, (B, T)).astype(np.float32)
  batch = dict(
    response_mask=mask,
    is_demo=np.array([False, False, True, False, False, True])[:B],
    rewards=np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], np.float32)[:B],
    advantages=np.array([0.7, -1.2, 0.7, -0.4, 0.0, 0.9], np.float32)[:B],
    old_logp=(logp + rng.normal(0, 0.3, (B, T))).astype(np.float32),
    ref_logp=(logp + rng.normal(0, 0.5, (B, T))).astype(np.float32),
  )
  # The sampler's log-probs: near the trainer's old_logp, some tokens past a cap of 2.
  batch["sampler_logp"] = (batch["old_logp"] + rng.normal(0, 0.5, (B, T))).astype(np.float32)
  batch["ref_logp"][0, 0] = logp[0, 0] + 4.0  # k3 = e^4 - 5 > 10: low_var_kl clamps it
  return logp, ent, batch


CONFIGS = {name: obj.LossConfig.preset(name, max_response_len=10) for name in obj.PRESETS}
CONFIGS.update(
  batch_entropy=obj.LossConfig(entropy_granularity="batch"),
  token_constlen=obj.LossConfig(
    entropy_granularity="token", aggregation="constant_len", max_response_len=10
  ),
  adv_clip=obj.LossConfig(self_rl_form="advantage", clip_eps=0.2),
  adv_clip_constlen=obj.LossConfig.preset("srft_code", clip_eps=0.1, max_response_len=9),
  kl_bonus=obj.LossConfig(kl_coef=0.05, entropy_bonus=0.01),
  kl_k1=obj.LossConfig.preset("grpo", kl_coef=0.1, kl_estimator="k1"),
  kl_k2=obj.LossConfig.preset("grpo", kl_coef=0.1, kl_estimator="k2"),
  kl_low_var=obj.LossConfig.preset("grpo", kl_coef=0.1, kl_estimator="low_var_kl"),
  is_token_truncate=obj.LossConfig.preset("grpo", is_correction="token_truncate"),
  is_token_mask_paper=obj.LossConfig(is_correction="token_mask", is_cap=1.5),
  is_seq_truncate=obj.LossConfig.preset(
    "srft_code", is_correction="sequence_truncate", max_response_len=10
  ),
  is_seq_mask=obj.LossConfig.preset("grpo", is_correction="sequence_mask", is_cap=3.0),
  dual_clip=obj.LossConfig.preset("grpo", clip_eps=0.2, clip_ratio_c=1.5),
  seq_mean_token_mean=obj.LossConfig(aggregation="seq_mean_token_mean"),
  seq_mean_token_sum=obj.LossConfig.preset(
    "luffy", aggregation="seq_mean_token_sum", clip_eps=0.2, clip_eps_high=0.3
  ),
  mixed=obj.LossConfig(
    sft_weight="entropy_pos",
    rl_weight="const",
    demo_rl_shaping="p_div_p_plus_gamma",
    demo_rl_gamma=0.3,
    sft_coef=0.7,
    self_rl_coef=0.2,
  ),
)


@functools.cache
def _jitted_value_and_grads(cfg):
  # One compile per config and shape, shared by the tests (2 CPU cores).
  def f(logp, ent, batch, denominators, batch_entropy):
    return obj.srft_loss(
      logp, ent, batch, cfg, denominators=denominators, batch_entropy=batch_entropy
    )

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def value_and_grads(cfg, denominators=None, batch_entropy=None):
  return lambda logp, ent, batch: _jitted_value_and_grads(cfg)(
    logp, ent, batch, denominators, batch_entropy
  )


# --------------------------------------------------------------------------
# Log-probs and entropy
# --------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_token_logprobs_and_entropy_matches_numpy(jit):
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (2, 5, 13)).astype(np.float32)
  targets = rng.integers(0, 13, (2, 5))
  fn = (
    jax.jit(obj.token_logprobs_and_entropy, static_argnums=2)
    if jit
    else obj.token_logprobs_and_entropy
  )
  logp, ent = fn(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), targets, 0.6)
  ref_logp, ref_ent = np_logp_ent(
    np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), targets, 0.6
  )
  assert logp.dtype == ent.dtype == jnp.float32
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_bf16_logits_are_upcast():
  logits = jnp.asarray(np.random.default_rng(2).normal(0, 2, (1, 3, 7)), jnp.bfloat16)
  logp, ent = obj.token_logprobs_and_entropy(logits, jnp.zeros((1, 3), jnp.int32))
  assert logp.dtype == ent.dtype == jnp.float32


def test_masked_vocab_minus_inf_is_nan_free():
  logits = jnp.array([[[0.0, 1.0, -jnp.inf, 2.0]]])
  f = lambda x: jnp.sum(sum(obj.token_logprobs_and_entropy(x, jnp.array([[1]]))))
  logp, ent = obj.token_logprobs_and_entropy(logits, jnp.array([[1]]))
  ref_logp, ref_ent = np_logp_ent(np.array([[[0.0, 1.0, 2.0]]]), np.array([[1]]), 1.0)
  np.testing.assert_allclose(logp, ref_logp, atol=1e-6)
  np.testing.assert_allclose(ent, ref_ent, atol=1e-6)
  g = jax.jit(jax.grad(f))(logits)
  assert np.all(np.isfinite(g)) and g[0, 0, 2] == 0


def _tiny_lm(seed=3, B=3, T=7, D=5, V=11):
  rng = np.random.default_rng(seed)  # NumPy: eager jax.random compiles per shape
  return (
    rng.normal(size=(B, T, D)).astype(np.float32),
    rng.normal(size=(D, V)).astype(np.float32),
    rng.integers(0, V, (B, T)).astype(np.int32),
  )


@pytest.mark.parametrize("chunk_size", [3, 6, 1000])
def test_chunked_matches_full_logits(chunk_size):
  # With B = 3 these give 1, 2, 7 positions a chunk: 1 and 7 divide T = 7,
  # 2 leaves a padded last chunk.
  hidden, unembed, targets = _tiny_lm()
  cot = np.random.default_rng(9).normal(size=(2,) + targets.shape).astype(np.float32)

  def full(h, w):
    logp, ent = obj.token_logprobs_and_entropy(jnp.einsum("btd,dv->btv", h, w), targets, 0.7)
    return jnp.sum(logp * cot[0]) + jnp.sum(ent * cot[1]), (logp, ent)

  def chunked(h, w):
    logp, ent = obj.chunked_logprobs_and_entropy(h, w, targets, 0.7, chunk_size)
    return jnp.sum(logp * cot[0]) + jnp.sum(ent * cot[1]), (logp, ent)

  (_, ref), ref_g = jax.jit(jax.value_and_grad(full, (0, 1), has_aux=True))(hidden, unembed)
  (_, got), got_g = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(hidden, unembed)
  for a, b in zip(got + got_g, ref + ref_g):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_chunked_bf16_weights_close_to_float32():
  hidden, unembed, targets = _tiny_lm(B=2, T=9, D=16, V=40)
  f = lambda h, w: jnp.sum(sum(obj.chunked_logprobs_and_entropy(h, w, targets, chunk_size=4)))
  vg = jax.jit(jax.value_and_grad(f, (0, 1)))
  v32, (gh32, gw32) = vg(hidden, unembed)
  v16, (gh16, gw16) = vg(hidden.astype(jnp.bfloat16), unembed.astype(jnp.bfloat16))
  assert gh16.dtype == gw16.dtype == jnp.bfloat16
  np.testing.assert_allclose(v16, v32, rtol=3e-2)
  for a, b in ((gh16, gh32), (gw16, gw32)):
    a = np.asarray(a, np.float32)
    assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(b)


# --------------------------------------------------------------------------
# Group advantages
# --------------------------------------------------------------------------


def test_group_advantages_hand_made():
  # group 0: 3 rollouts + 1 demo (last), rewards 1,0,0 | demo 1 -> mean 0.5,
  # unbiased std sqrt(1/3); group 5: singleton; group 2: all equal.
  rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.7, 0.7, 0.7])
  groups = jnp.array([0, 0, 0, 0, 5, 2, 2, 2])
  std = np.sqrt(1 / 3)
  expect = np.array([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (std + 1e-6)
  np.testing.assert_allclose(group_advantages(rewards, groups), expect, rtol=1e-6)
  np.testing.assert_allclose(
    group_advantages(rewards, groups, normalize_std=False),
    [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0],
    atol=1e-7,
  )


def test_group_advantages_equal_rewards_exactly_zero_and_order_free():
  # 0.1 * 7 / 7 != 0.1 in float32: without the equal-rewards guard this
  # rounding, divided by eps, would give a large nonzero advantage.
  rewards = jnp.full((7,), 0.1)
  assert np.all(np.asarray(group_advantages(rewards, jnp.zeros(7, jnp.int32))) == 0.0)
  r = jnp.array([1.0, 0.0, 2.0, 0.0, 1.0, 3.0])
  gid = jnp.array([4, 9, 4, 9, 9, 4])
  perm = np.array([5, 0, 3, 1, 4, 2])
  adv = group_advantages(r, gid)
  np.testing.assert_allclose(group_advantages(r[perm], gid[perm]), adv[perm], rtol=1e-6)
  # group 4: rewards 1, 2, 3 -> mean 2, std 1
  np.testing.assert_allclose(adv[np.array([0, 2, 5])], np.array([-1, 0, 1]) / (1 + 1e-6), rtol=1e-6)


# --------------------------------------------------------------------------
# The loss: every term and switch against NumPy, values and gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loss_value_and_gradients_match_numpy(name):
  cfg = CONFIGS[name]
  logp, ent, batch = make_batch()
  (loss, aux), (g_logp, g_ent) = value_and_grads(cfg)(logp, ent, batch)
  ref_loss, ref_g_logp, ref_g_ent = np_loss(logp, ent, batch, cfg)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(g_logp, ref_g_logp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_ent, ref_g_ent, rtol=1e-5, atol=1e-7)
  if cfg.entropy_bonus == 0:  # sg(H) in the weights: no gradient reaches ent at all
    assert np.all(np.asarray(g_ent) == 0)
  np.testing.assert_allclose(aux["loss"], loss)
  terms = sum(aux[k] for k in obj.LOSS_TERMS)
  np.testing.assert_allclose(terms, loss, rtol=1e-6, atol=1e-7)
  mask = batch["response_mask"]
  demo = mask * batch["is_demo"][:, None]
  assert aux["n_demo_tokens"] == demo.sum() and aux["n_rollout_tokens"] == (mask - demo).sum()
  np.testing.assert_allclose(aux["entropy_demo"], (ent * demo).sum() / demo.sum(), rtol=1e-6)
  assert (aux["w_rl"] == 0) == (not cfg.use_self_rl) and (aux["w_sft"] == 0) == (not cfg.use_sft)


def test_aux_weights_hand_made():
  # one demo row with constant entropy 1 -> w_sft = 0.5 e^-1 (paper).
  logp = np.full((2, 3), -1.0, np.float32)
  ent = np.ones((2, 3), np.float32)
  batch = dict(
    response_mask=np.ones((2, 3), np.float32),
    is_demo=np.array([True, False]),
    rewards=np.array([1.0, 1.0], np.float32),
    advantages=np.array([0.5, 0.5], np.float32),
  )
  loss, aux = obj.srft_loss(logp, ent, batch, obj.LossConfig())
  np.testing.assert_allclose(aux["w_sft"], 0.5 * np.exp(-1), rtol=1e-6)
  np.testing.assert_allclose(aux["w_rl"], 0.1 * np.exp(1), rtol=1e-6)
  # sft = w*1; demo RL = -0.5 * e^-1; self RL (positive) = w_rl * 1, shared RL denominator 6.
  expect = 0.5 * np.exp(-1) + (3 * -0.5 * np.exp(-1) + 3 * 0.1 * np.exp(1)) / 6
  np.testing.assert_allclose(loss, expect, rtol=1e-6)


@pytest.mark.parametrize(
  "name", ["adv_clip_constlen", "kl_bonus", "is_seq_mask", "seq_mean_token_mean", "dual_clip"]
)
def test_padding_invariance_and_nan_free(name):
  cfg = CONFIGS[name]
  logp, ent, batch = make_batch()
  (loss, _), grads = value_and_grads(cfg)(logp, ent, batch)
  B, T = logp.shape
  pad_t, pad_b = 3, 2

  def pad(x, fill):
    x = np.asarray(x)
    widths = [(0, pad_b)] + [(0, pad_t)] * (x.ndim - 1)
    return np.pad(x, widths, constant_values=fill)

  # Garbage (even -inf) where the mask is 0 must not leak.
  p_logp = pad(logp, -np.inf)
  p_logp[np.asarray(pad(batch["response_mask"], 0)) == 0] = -np.inf
  p_ent = pad(ent, 7.0)
  p_batch = dict(
    response_mask=pad(batch["response_mask"], 0),
    is_demo=pad(batch["is_demo"], True),
    rewards=pad(batch["rewards"], 1.0),
    advantages=pad(batch["advantages"], 3.0),
    old_logp=pad(batch["old_logp"], np.inf),
    ref_logp=pad(batch["ref_logp"], -np.inf),
    sampler_logp=pad(batch["sampler_logp"], -np.inf),
  )
  (p_loss, _), p_grads = value_and_grads(cfg)(p_logp, p_ent, p_batch)
  np.testing.assert_allclose(p_loss, loss, rtol=1e-6)
  for g, pg in zip(grads, p_grads):
    assert np.all(np.isfinite(pg))
    np.testing.assert_allclose(pg[:B, :T], g, rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(pg)[np.asarray(p_batch["response_mask"]) == 0] == 0)


@pytest.mark.parametrize("name", ["srft", "srft_code", "sft", "grpo"])
def test_empty_batch_and_missing_kinds_are_finite(name):
  logp, ent, batch = make_batch()
  for keep in (np.zeros(6), np.array([1, 1, 0, 1, 1, 0])):  # nothing at all; no demo tokens
    b = dict(batch, response_mask=batch["response_mask"] * keep[:, None])
    (loss, aux), grads = value_and_grads(CONFIGS[name])(logp, ent, b)
    assert all(np.all(np.isfinite(x)) for x in [loss, *aux.values(), *grads])
    ref_loss, _, _ = np_loss(logp, ent, b, CONFIGS[name]) if keep.any() else (0.0, 0, 0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-7)


def test_jit_equals_no_jit():
  logp, ent, batch = make_batch()
  cfg = CONFIGS["srft_code"]
  eager = obj.srft_loss(logp, ent, batch, cfg)
  jitted = jax.jit(obj.srft_loss, static_argnums=3)(logp, ent, batch, cfg)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
  "name",
  [
    "srft",
    "srft_code",
    "batch_entropy",
    "token_constlen",
    "dapo",
    "dr_grpo",
    "is_seq_truncate",
    "is_token_mask_paper",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "dual_clip",
    "kl_low_var",
  ],
)
def test_micro_batch_accumulation_is_exact(name):
  cfg = CONFIGS[name]
  logp, ent, batch = make_batch()
  (loss, _), (g_logp, g_ent) = value_and_grads(cfg)(logp, ent, batch)
  den = obj.loss_denominators(batch, cfg)
  h = obj.batch_mean_entropy(ent, batch["response_mask"])
  # the global entropy accumulated from micro-batch (sum, count) pairs is the same
  s = [obj.entropy_sum_and_count(ent[i : i + 3], batch["response_mask"][i : i + 3]) for i in (0, 3)]
  np.testing.assert_allclose((s[0][0] + s[1][0]) / (s[0][1] + s[1][1]), h, rtol=1e-6)
  total, grads = 0.0, []
  for rows in (slice(0, 3), slice(3, 6)):
    mb = {k: v[rows] for k, v in batch.items()}
    (l, _), g = value_and_grads(cfg, denominators=den, batch_entropy=h)(logp[rows], ent[rows], mb)
    total += l
    grads.append(g)
  np.testing.assert_allclose(total, loss, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.concatenate([g[0] for g in grads]), g_logp, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(np.concatenate([g[1] for g in grads]), g_ent, rtol=1e-6, atol=1e-8)


@pytest.mark.multidevice
@pytest.mark.slow
def test_sharded_mesh_equals_single_device():
  assert jax.device_count() >= 8
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  _, _, batch = make_batch(B=6)
  B, T, D, V = 6, 7, 8, 16
  hidden, unembed, targets = _tiny_lm(seed=5, B=B, T=T, D=D, V=V)
  cfg = CONFIGS["srft_code"]

  def loss_fn(h, w, batch):
    logp, ent = obj.chunked_logprobs_and_entropy(h, w, targets, chunk_size=8)
    return obj.srft_loss(logp, ent, dict(batch, old_logp=jax.lax.stop_gradient(logp) - 0.1), cfg)[0]

  vg = jax.jit(jax.value_and_grad(loss_fn, (0, 1)))
  ref_v, ref_g = vg(hidden, unembed, batch)
  row = NamedSharding(mesh, P("data"))
  for w_spec in (P(None, "tensor"), P("tensor", None)):  # vocab sharded, then hidden sharded
    h = jax.device_put(hidden, NamedSharding(mesh, P("data", None, None)))
    w = jax.device_put(unembed, NamedSharding(mesh, w_spec))
    b = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, row)
    v, g = vg(h, w, b)
    assert len(g[1].sharding.device_set) == 8
    np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-6)
    for a, r in zip(g, ref_g):
      np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# Config and presets (docs/method.md §4)
# --------------------------------------------------------------------------


def test_presets_match_method_table():
  c = obj.LossConfig.preset
  srft = c("srft")
  assert srft == obj.LossConfig()
  assert (
    srft.sft_weight,
    srft.sft_coef,
    srft.demo_rl_shaping,
    srft.self_rl_form,
    srft.rl_weight,
    srft.self_rl_coef,
    srft.entropy_granularity,
    srft.aggregation,
    srft.entropy_bonus,
    obj.AdvantageConfig.preset("srft").normalize_std,
  ) == (
    "entropy_neg",
    0.5,
    "none",
    "paper",
    "entropy_pos",
    0.1,
    "sequence",
    "token_mean",
    0.0,
    True,
  )
  code = c("srft_code")
  assert (
    code.sft_weight,
    code.demo_rl_shaping,
    code.demo_rl_gamma,
    code.self_rl_form,
    code.entropy_granularity,
    code.entropy_bonus,
    code.aggregation,
    obj.AdvantageConfig.preset("srft_code").normalize_std,
  ) == (
    "entropy_pos",
    "p_div_p_plus_gamma",
    0.1,
    "advantage",
    "token",
    0.001,
    "constant_len",
    False,
  )
  sft = c("sft")
  assert (sft.use_sft, sft.use_demo_rl, sft.use_self_rl, sft.sft_weight, sft.sft_coef) == (
    True,
    False,
    False,
    "const",
    1.0,
  )
  for name in ("grpo", "sft_plus_rl", "luffy"):
    p = c(name)
    adv = obj.AdvantageConfig.preset(name)
    assert (p.use_self_rl, p.self_rl_form, p.rl_weight, p.self_rl_coef, adv.normalize_std) == (
      True,
      "advantage",
      "const",
      1.0,
      True,
    ), name
  assert (c("grpo").use_sft, c("grpo").use_demo_rl) == (False, False)
  assert (
    c("sft_plus_rl").use_sft,
    c("sft_plus_rl").sft_weight,
    c("sft_plus_rl").sft_coef,
    c("sft_plus_rl").use_demo_rl,
  ) == (True, "const", 1.0, False)
  assert (
    c("luffy").use_sft,
    c("luffy").use_demo_rl,
    c("luffy").demo_rl_shaping,
    c("luffy").demo_rl_gamma,
  ) == (False, True, "p_div_p_plus_gamma", 0.1)
  assert c("srft_no_wsft") == dataclasses.replace(srft, sft_weight="const")
  assert c("srft_no_wrl") == dataclasses.replace(srft, rl_weight="const")
  assert c("srft", sft_coef=0.3).sft_coef == 0.3


@pytest.mark.parametrize(
  "field,value",
  [
    ("sft_weight", "exp"),
    ("demo_rl_shaping", "p"),
    ("self_rl_form", "ppo"),
    ("rl_weight", "x"),
    ("entropy_granularity", "row"),
    ("aggregation", "mean"),
    ("sft_coef", -1.0),
    ("demo_rl_gamma", 0.0),
    ("clip_eps", 1.5),
    ("max_response_len", 0),
    ("kl_coef", float("nan")),
  ],
)
def test_config_validation_names_field(field, value):
  with pytest.raises(ValueError, match=field):
    obj.LossConfig(**{field: value})


def test_config_cross_field_validation():
  with pytest.raises(ValueError, match="max_response_len"):
    obj.LossConfig(aggregation="constant_len")
  with pytest.raises(ValueError, match="use_sft"):
    obj.LossConfig(use_sft=False, use_demo_rl=False, use_self_rl=False)
  with pytest.raises(ValueError, match="unknown"):
    obj.LossConfig.preset("ppo")
  logp, ent, batch = make_batch()
  with pytest.raises(ValueError, match="ref_logp"):
    obj.srft_loss(
      logp, ent, {k: v for k, v in batch.items() if k != "ref_logp"}, obj.LossConfig(kl_coef=0.1)
    )
  with pytest.raises(ValueError, match="old_logp"):
    obj.srft_loss(logp, ent, {k: v for k, v in batch.items() if k != "old_logp"}, CONFIGS["grpo"])


def test_module_is_standalone():
  src = (ROOT / "srft_jax" / "objectives.py").read_text()
  assert not re.search(r"^\s*(from\s+(srft_jax|\.)|import\s+srft_jax)", src, re.M)


def test_readme_example_runs():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("### (d) The loss in another JAX project", 1)[1]
  section = re.split(r"\n##+ ", section, maxsplit=1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert blocks, "README's loss section lost its python example"
  exec(compile("\n".join(blocks), "README-loss", "exec"), {"__name__": "loss_usage"})


def test_advantage_config():
  """The advantage form is its own config: the paper's by default, r - mean for
  the released code's preset; overrides and bad values named by field."""
  assert obj.AdvantageConfig.preset("srft") == obj.AdvantageConfig(normalize_std=True, eps=1e-6)
  assert obj.AdvantageConfig.preset("srft_code", eps=1e-3) == obj.AdvantageConfig(False, 1e-3)
  with pytest.raises(ValueError, match="AdvantageConfig.eps"):
    obj.AdvantageConfig(eps=0.0)
  with pytest.raises(ValueError, match="unknown preset"):
    obj.AdvantageConfig.preset("nope")
  assert "adv_normalize_std" not in {f.name for f in dataclasses.fields(obj.LossConfig)}


@pytest.mark.parametrize(
  "correction", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
)
def test_exact_sampler_makes_every_correction_a_no_op(correction):
  """sampler_logp == old_logp: every weight is 1 and the loss is the uncorrected one."""
  logp, ent, batch = make_batch()
  batch = dict(batch, sampler_logp=batch["old_logp"])
  for base in ("grpo", "srft"):
    plain = obj.srft_loss(logp, ent, batch, obj.LossConfig.preset(base))[0]
    cfg = obj.LossConfig.preset(base, is_correction=correction)
    loss, aux = obj.srft_loss(logp, ent, batch, cfg)
    np.testing.assert_allclose(loss, plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux["is_weight"], 1.0, rtol=1e-6)


def test_importance_weights_hand_made():
  """d = old - sampler per token of two rows (the last token of row 1 is padding)."""
  d = np.array([[np.log(3.0), np.log(0.25), 0.0], [np.log(1.5), np.log(1.2), 9.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  old, smp = d, np.zeros_like(d)
  w = lambda c, cap=2.0: np.asarray(obj.importance_weights(old, smp, mask, c, cap))  # noqa: E731
  np.testing.assert_allclose(w("token_truncate")[0], [2.0, 0.25, 1.0], rtol=1e-6)
  np.testing.assert_allclose(w("token_mask")[0], [0.0, 0.0, 1.0], rtol=1e-6)
  # rho: row 0 = 3 * 0.25 * 1 = 0.75; row 1 = 1.5 * 1.2 = 1.8 (padding ignored).
  np.testing.assert_allclose(w("sequence_truncate")[:, 0], [0.75, 1.8], rtol=1e-6)
  np.testing.assert_allclose(w("sequence_mask", cap=1.5)[:, 0], [0.75, 0.0], rtol=1e-6)
  np.testing.assert_allclose(w("none"), np.ones_like(d))


def test_dual_clip_and_clip_higher_hand_made():
  """One rollout token, A = -1: -A * ratio = ratio, clipped at c = 3; A = +1 with
  clip-higher 0.28: -min(r, 1.28) once r > 1.28."""
  one = lambda x: np.array([[x]], np.float32)  # noqa: E731
  batch = dict(
    response_mask=one(1.0),
    is_demo=np.array([False]),
    rewards=np.array([0.0], np.float32),
    advantages=np.array([-1.0], np.float32),
    old_logp=one(0.0),
  )
  grpo = functools.partial(obj.LossConfig.preset, "grpo")
  logp = one(np.log(5.0))  # ratio 5
  assert float(obj.srft_loss(logp, one(1.0), batch, grpo())[0]) == pytest.approx(5.0)
  loss, aux = obj.srft_loss(logp, one(1.0), batch, grpo(clip_eps=0.2, clip_ratio_c=3.0))
  assert float(loss) == pytest.approx(3.0) and float(aux["dual_clip_frac"]) == 1.0
  pos = dict(batch, advantages=np.array([1.0], np.float32), rewards=np.array([1.0], np.float32))
  loss = obj.srft_loss(logp, one(1.0), pos, grpo(clip_eps=0.2, clip_eps_high=0.28))[0]
  assert float(loss) == pytest.approx(-1.28, rel=1e-6)


def test_seq_mean_aggregations_hand_made():
  """Two rollout rows of 1 and 3 tokens, every per-token term -A * 1 (ratio 1):
  token_mean over the 4 tokens; seq_mean_* over the 2 rows."""
  mask = np.array([[1, 0, 0], [1, 1, 1]], np.float32)
  batch = dict(
    response_mask=mask,
    is_demo=np.array([False, False]),
    rewards=np.array([0.0, 1.0], np.float32),
    advantages=np.array([-2.0, 1.0], np.float32),
    old_logp=np.zeros((2, 3), np.float32),
  )
  z = np.zeros((2, 3), np.float32)
  loss = lambda agg: float(  # noqa: E731
    obj.srft_loss(z, z, batch, obj.LossConfig.preset("grpo", aggregation=agg))[0]
  )
  # per-token terms: row 0: +2 (one token); row 1: -1 (three tokens)
  assert loss("token_mean") == pytest.approx((2 - 3) / 4)
  assert loss("seq_mean_token_mean") == pytest.approx((2 + -1) / 2)
  assert loss("seq_mean_token_sum") == pytest.approx((2 + -3) / 2)


def test_new_switches_validate():
  with pytest.raises(ValueError, match="clip_eps_high needs clip_eps"):
    obj.LossConfig(clip_eps_high=0.28)
  with pytest.raises(ValueError, match="clip_ratio_c"):
    obj.LossConfig.preset("grpo", clip_ratio_c=1.0)
  with pytest.raises(ValueError, match="is_cap"):
    obj.LossConfig(is_cap=1.0)
  with pytest.raises(ValueError, match="is_correction"):
    obj.LossConfig(is_correction="token")
  with pytest.raises(ValueError, match="kl_estimator"):
    obj.LossConfig(kl_estimator="k4")
  logp, ent, batch = make_batch()
  with pytest.raises(ValueError, match="sampler_logp"):
    obj.srft_loss(
      logp,
      ent,
      {k: v for k, v in batch.items() if k != "sampler_logp"},
      obj.LossConfig(is_correction="token_mask"),
    )
  dapo, dr = obj.LossConfig.preset("dapo"), obj.LossConfig.preset("dr_grpo")
  assert (dapo.clip_eps, dapo.clip_eps_high, dapo.aggregation, dapo.use_sft) == (
    0.2,
    0.28,
    "token_mean",
    False,
  )
  assert (dr.aggregation, dr.use_sft, obj.AdvantageConfig.preset("dr_grpo").normalize_std) == (
    "constant_len",
    False,
    False,
  )
