"""On-policy distillation terms of srft_jax.objectives against NumPy (docs/method.md §19)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from srft_jax import objectives as obj

# --------------------------------------------------------------------------
# NumPy references, written from the docs/method.md §19 formulas (float64)
# --------------------------------------------------------------------------


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(zs, zt, temperature=1.0, teacher_temperature=None):
  """Per-token KL(p||q), KL(q||p) and their gradients w.r.t. the student's raw logits."""
  tt = temperature if teacher_temperature is None else teacher_temperature
  logp, logq = np_log_softmax(zs / temperature), np_log_softmax(zt / tt)
  p, q = np.exp(logp), np.exp(logq)
  rkl = (p * (logp - logq)).sum(-1)
  fkl = (q * (logq - logp)).sum(-1)
  d_rkl = p * (logp - logq - rkl[..., None]) / temperature
  d_fkl = (p - q) / temperature
  return rkl, fkl, d_rkl, d_fkl


def np_distill(logp, batch, cfg):
  """The teacher terms alone: (value, d value / d logp), token loops (§19.1, §19.3)."""
  logp = np.asarray(logp, np.float64)
  mask = np.asarray(batch["response_mask"]) > 0
  demo = np.asarray(batch["is_demo"]).astype(bool)
  teacher = np.asarray(batch["teacher_logp"], np.float64)
  old = np.asarray(batch.get("old_logp", logp), np.float64)
  B, T = logp.shape
  n_roll = sum(mask[b, t] and not demo[b] for b in range(B) for t in range(T))
  n_demo = sum(mask[b, t] and demo[b] for b in range(B) for t in range(T))
  value, grad = 0.0, np.zeros((B, T))
  for b in range(B):
    for t in range(T):
      if not mask[b, t]:
        continue
      if demo[b]:
        if cfg.distill_on_demos:
          value += cfg.distill_coef * (teacher[b, t] - logp[b, t]) / n_demo
          grad[b, t] = -cfg.distill_coef / n_demo
        continue
      k1 = logp[b, t] - teacher[b, t]
      r = np.exp(logp[b, t] - old[b, t])
      v, g = k1 * r, k1 * r  # -A * ratio with A = -k1; d/dlogp of ratio = ratio
      if cfg.clip_eps is not None:
        clipped = k1 * np.clip(r, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
        if clipped > v:
          v, g = clipped, 0.0
      value += cfg.distill_coef * v / n_roll
      grad[b, t] = cfg.distill_coef * g / n_roll
  return value, grad


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


def tiny_pair(seed=0, B=3, T=5, D=4, E=6, V=9):
  """Student and teacher hidden states and unembeddings (teacher wider: E != D)."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
  return f(B, T, D), f(D, V), f(B, T, E), f(E, V)


def make_batch(seed=0, B=4, T=6):
  """Rows 0, 1, 3 rollouts, row 2 a demonstration; right padding."""
  rng = np.random.default_rng(seed)
  lengths = np.array([6, 3, 5, 4])[:B]
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  logp = -rng.uniform(0.05, 3.0, (B, T)).astype(np.float32)
  ent = rng.uniform(0.1, 2.0, (B, T)).astype(np.float32)
  batch = dict(
    response_mask=mask,
    is_demo=np.array([False, False, True, False])[:B],
    rewards=np.array([1.0, 0.0, 1.0, 1.0], np.float32)[:B],
    advantages=np.array([0.8, -1.1, 0.8, 0.3], np.float32)[:B],
    old_logp=(logp + rng.normal(0, 0.3, (B, T))).astype(np.float32),
    teacher_logp=(logp + rng.normal(0, 0.7, (B, T))).astype(np.float32),
  )
  return logp, ent, batch


@functools.cache
def _loss_grad(cfg):
  def f(logp, ent, batch):
    return obj.srft_loss(logp, ent, batch, cfg)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


# --------------------------------------------------------------------------
# The exact KL over the vocabulary (§19.2, §19.3)
# --------------------------------------------------------------------------


def test_kl_logit_gradient_formula_by_finite_differences():
  """The §19.2 / §19.3 logit gradients, checked in float64 by central differences."""
  rng = np.random.default_rng(1)
  zs, zt = rng.normal(0, 2, 7), rng.normal(0, 2, 7)
  for tau, tau_t in ((1.0, None), (0.7, 1.3)):
    _, _, d_rkl, d_fkl = np_kl(zs, zt, tau, tau_t)
    eps = 1e-6
    for v in range(7):
      e = np.eye(7)[v] * eps
      hi, lo = np_kl(zs + e, zt, tau, tau_t), np_kl(zs - e, zt, tau, tau_t)
      assert (hi[0] - lo[0]) / (2 * eps) == pytest.approx(d_rkl[v], abs=1e-7)
      assert (hi[1] - lo[1]) / (2 * eps) == pytest.approx(d_fkl[v], abs=1e-7)


@pytest.mark.parametrize("chunk_size,tau,tau_t", [(4, 1.0, None), (1000, 0.7, 1.3)])
def test_chunked_teacher_kl_matches_numpy(chunk_size, tau, tau_t):
  # chunk_size 4 with B = 3: 1 position a chunk (5 chunks); 1000: one chunk.
  hs, ws, ht, wt = tiny_pair()
  cot = np.random.default_rng(2).normal(size=(2,) + hs.shape[:2])

  def f(hs, ws, ht, wt):
    rkl, fkl = obj.chunked_teacher_kl(hs, ws, ht, wt, tau, tau_t, chunk_size)
    return jnp.sum(rkl * cot[0]) + jnp.sum(fkl * cot[1]), (rkl, fkl)

  (_, (rkl, fkl)), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True))(
    hs, ws, ht, wt
  )
  zs = np.einsum("btd,dv->btv", hs.astype(np.float64), ws)
  zt = np.einsum("bte,ev->btv", ht.astype(np.float64), wt)
  ref_rkl, ref_fkl, d_rkl, d_fkl = np_kl(zs, zt, tau, tau_t)
  assert rkl.dtype == fkl.dtype == jnp.float32 and rkl.shape == hs.shape[:2]
  np.testing.assert_allclose(rkl, ref_rkl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fkl, ref_fkl, rtol=1e-5, atol=1e-6)
  assert np.all(ref_rkl > 0.01) and np.all(ref_fkl > 0.01)  # the check is not vacuous
  dz = cot[0][..., None] * d_rkl + cot[1][..., None] * d_fkl  # d sum / d student logits
  np.testing.assert_allclose(grads[0], np.einsum("btv,dv->btd", dz, ws), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads[1], np.einsum("btd,btv->dv", hs, dz), rtol=1e-4, atol=1e-5)
  assert not np.any(grads[2]) and not np.any(grads[3])  # the teacher is frozen


def test_chunked_teacher_kl_bf16_and_validation():
  hs, ws, ht, wt = tiny_pair(B=2, T=7, D=16, E=8, V=40)
  f = lambda hs, ws: jnp.sum(obj.chunked_teacher_kl(hs, ws, ht, wt, chunk_size=4)[0])  # noqa: E731
  vg = jax.jit(jax.value_and_grad(f, (0, 1)))
  v32, g32 = vg(hs, ws)
  v16, g16 = vg(hs.astype(jnp.bfloat16), ws.astype(jnp.bfloat16))
  assert g16[0].dtype == g16[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(v16, v32, rtol=5e-2)
  for a, b in zip(g16, g32):
    assert np.linalg.norm(np.asarray(a, np.float32) - b) < 0.1 * np.linalg.norm(b)
  with pytest.raises(ValueError, match=r"differ in \[B, T\]"):
    obj.chunked_teacher_kl(hs, ws, ht[:, :3], wt)
  with pytest.raises(ValueError, match="chunk_size"):
    obj.chunked_teacher_kl(hs, ws, ht, wt, chunk_size=0)


@pytest.mark.parametrize("teacher_rows", [32, 48], ids=["narrower", "wider"])
def test_chunked_teacher_kl_over_the_ids_both_vocabularies_have(teacher_rows):
  """One tokenizer padded to two sizes (docs/method.md §19.2): the KL between
  the two distributions over the first min(V_s, V_t) ids, each renormalised
  there; its gradient w.r.t. the student's hidden states and unembedding is
  zero on the other ids and keeps the student's shape."""
  hs, ws, ht, wt = tiny_pair(seed=4, B=2, T=5, D=6, E=8, V=40)
  rng = np.random.default_rng(5)
  wt = np.concatenate([wt, rng.normal(size=(8, 8)).astype(np.float32)], 1)[:, :teacher_rows]
  vc = min(40, teacher_rows)
  zs = hs.astype(np.float64) @ ws.astype(np.float64)
  zt = ht.astype(np.float64) @ wt.astype(np.float64)
  rkl, fkl, d_rkl, d_fkl = np_kl(zs[..., :vc], zt[..., :vc], 0.8, 1.3)
  got = obj.chunked_teacher_kl(hs, ws, ht, wt, 0.8, 1.3, chunk_size=4)
  np.testing.assert_allclose(got[0], rkl, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got[1], fkl, rtol=1e-4, atol=1e-6)

  def f(hs, ws):
    r, k = obj.chunked_teacher_kl(hs, ws, ht, wt, 0.8, 1.3, chunk_size=4)
    return jnp.sum(r) + 0.5 * jnp.sum(k)

  g_hs, g_ws = jax.jit(jax.grad(f, (0, 1)))(hs, ws)
  dz = np.zeros(zs.shape)
  dz[..., :vc] = d_rkl + 0.5 * d_fkl
  np.testing.assert_allclose(g_hs, dz @ ws.T.astype(np.float64), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    g_ws, np.einsum("btd,btv->dv", hs.astype(np.float64), dz), rtol=1e-4, atol=1e-5
  )
  assert g_ws.shape == ws.shape
  if vc < ws.shape[1]:  # the student's ids the teacher lacks weigh nothing
    assert np.abs(np.asarray(g_ws)[:, vc:]).max() == 0


def test_teacher_equal_to_student_gives_zero_full_loss_and_gradient():
  hs, ws, _, _ = tiny_pair()
  _, ent, batch = make_batch(B=3, T=5)
  cfg = obj.LossConfig.preset("opd", distill_estimator="full", distill_on_demos=True)

  def loss(hs, ws, ht, wt):
    rkl, fkl = obj.chunked_teacher_kl(hs, ws, ht, wt, chunk_size=6)
    logp = jnp.zeros(hs.shape[:2])  # unused by the full estimator
    return obj.srft_loss(logp, ent, dict(batch, distill_rkl=rkl, distill_fkl=fkl), cfg)[0]

  value, grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(hs, ws, hs, ws)
  assert abs(float(value)) < 1e-7
  assert all(np.max(np.abs(g)) < 1e-7 for g in grads)
  # ... and a different teacher gives a loss and a gradient: the check can fail.
  value, grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(hs, ws, hs, ws[:, ::-1])
  assert float(value) > 0.1 and all(np.max(np.abs(g)) > 1e-3 for g in grads)


def test_full_estimator_loss_and_student_gradients_match_numpy():
  """The whole path: hidden states -> chunked KL -> srft_loss (opd, full, with
  demos), value and gradients w.r.t. the student's hidden states and unembedding."""
  B, T = 4, 6
  hs, ws, ht, wt = tiny_pair(seed=3, B=B, T=T)
  logp, ent, batch = make_batch(B=B, T=T)
  cfg = obj.LossConfig.preset(
    "opd", distill_estimator="full", distill_on_demos=True, distill_coef=0.7
  )

  def loss(hs, ws):
    rkl, fkl = obj.chunked_teacher_kl(hs, ws, ht, wt, chunk_size=8)
    return obj.srft_loss(logp, ent, dict(batch, distill_rkl=rkl, distill_fkl=fkl), cfg)

  (value, aux), (g_hs, g_ws) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(hs, ws)
  zs = np.einsum("btd,dv->btv", hs.astype(np.float64), ws)
  zt = np.einsum("bte,ev->btv", ht.astype(np.float64), wt)
  rkl, fkl, d_rkl, d_fkl = np_kl(zs, zt)
  mask = batch["response_mask"] > 0
  demo = mask & batch["is_demo"][:, None]
  roll = mask & ~batch["is_demo"][:, None]
  w_roll, w_demo = 0.7 * roll / roll.sum(), 0.7 * demo / demo.sum()
  expect = (w_roll * rkl).sum() + (w_demo * fkl).sum()
  dz = w_roll[..., None] * d_rkl + w_demo[..., None] * d_fkl
  np.testing.assert_allclose(value, expect, rtol=1e-5)
  np.testing.assert_allclose(aux["teacher_kl"], rkl[roll].mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["distill_demo"], (w_demo * fkl).sum(), rtol=1e-5)
  np.testing.assert_allclose(g_hs, np.einsum("btv,dv->btd", dz, ws), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_ws, np.einsum("btd,btv->dv", hs, dz), rtol=1e-4, atol=1e-6)


def test_full_kl_memory_no_larger_than_chunked_logprobs():
  """Compiled (never run) value + gradient: the KL's temporaries are those of
  the chunked log-probs at the same chunk_size (up to a few [B, T] vectors),
  and far below one [B, T, V] float32 array."""
  B, T, D, V, chunk = 2, 512, 64, 4096, 128
  sds, f32 = jax.ShapeDtypeStruct, jnp.float32

  def logprobs(h, w, t):
    return sum(jnp.sum(x) for x in obj.chunked_logprobs_and_entropy(h, w, t, chunk_size=chunk))

  def kl(h, w, ht, wt):
    return sum(jnp.sum(x) for x in obj.chunked_teacher_kl(h, w, ht, wt, chunk_size=chunk))

  def temp_bytes(f, *shapes):
    compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  h, w = sds((B, T, D), f32), sds((D, V), f32)
  lp_bytes = temp_bytes(logprobs, h, w, sds((B, T), jnp.int32))
  kl_bytes = temp_bytes(kl, h, w, h, w)
  assert kl_bytes <= lp_bytes + 4 * B * T * 4, (kl_bytes, lp_bytes)
  assert kl_bytes < 0.5 * B * T * V * 4, kl_bytes


# --------------------------------------------------------------------------
# The sampled estimator (§19.1) and the demonstrations' term (§19.3)
# --------------------------------------------------------------------------

SAMPLED = {
  "opd": obj.LossConfig.preset("opd"),
  "opd_demos_clip": obj.LossConfig.preset(
    "opd", distill_on_demos=True, distill_coef=0.4, clip_eps=0.2
  ),
}


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_sampled_estimator_matches_numpy(name):
  cfg = SAMPLED[name]
  logp, ent, batch = make_batch()
  (value, aux), (g_logp, g_ent) = _loss_grad(cfg)(logp, ent, batch)
  ref, ref_g = np_distill(logp, batch, cfg)
  np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_logp, ref_g, rtol=1e-5, atol=1e-7)
  assert not np.any(g_ent)
  roll = (batch["response_mask"] > 0) & ~batch["is_demo"][:, None]
  k1 = (logp - batch["teacher_logp"])[roll]
  np.testing.assert_allclose(aux["teacher_kl"], k1.mean(), rtol=1e-5)
  assert ("distill_demo" in aux) == cfg.distill_on_demos
  if cfg.clip_eps is not None:
    assert 0 < float(aux["distill_clip_frac"]) < 1  # both branches of the clip are tested


def test_sampled_without_old_logp_is_on_policy():
  """No old_logp: ratio 1, loss = coef * mean k1, gradient coef * k1 / n per token."""
  logp, ent, batch = make_batch()
  batch.pop("old_logp")
  cfg = obj.LossConfig.preset("opd", distill_coef=2.0)
  (value, _), (g_logp, _) = _loss_grad(cfg)(logp, ent, batch)
  roll = (batch["response_mask"] > 0) & ~batch["is_demo"][:, None]
  k1 = np.where(roll, logp - batch["teacher_logp"], 0.0)
  np.testing.assert_allclose(value, 2.0 * k1.sum() / roll.sum(), rtol=1e-5)
  np.testing.assert_allclose(g_logp, 2.0 * k1 / roll.sum(), rtol=1e-5, atol=1e-7)


def test_srft_opd_adds_the_teacher_term_to_srft():
  """srft_opd = srft + the sampled teacher term: the difference, value and
  gradient, is the NumPy reference of the term alone."""
  logp, ent, batch = make_batch()
  cfg = obj.LossConfig.preset("srft_opd")
  (value, aux), grads = _loss_grad(cfg)(logp, ent, batch)
  (base, _), base_grads = _loss_grad(obj.LossConfig.preset("srft"))(logp, ent, batch)
  ref, ref_g = np_distill(logp, batch, cfg)
  assert abs(ref) > 0.01  # a term that shows
  np.testing.assert_allclose(value - base, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["distill"], ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[0] - base_grads[0], ref_g, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[1], base_grads[1])


def test_teacher_equal_to_student_gives_zero_sampled_loss_and_gradient():
  """Teacher logits == student logits: k1 is exactly 0 on every token."""
  hs, ws, _, _ = tiny_pair(B=4, T=6)
  targets = np.random.default_rng(4).integers(0, ws.shape[1], (4, 6))
  _, ent, batch = make_batch()
  cfg = SAMPLED["opd_demos_clip"]

  def loss(hs, ws):
    logp, _ = obj.chunked_logprobs_and_entropy(hs, ws, targets, chunk_size=8)
    teacher = jax.lax.stop_gradient(logp)  # the same computation, frozen
    return obj.srft_loss(logp, ent, dict(batch, teacher_logp=teacher, old_logp=teacher), cfg)

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(hs, ws)
  assert float(aux["teacher_kl"]) == 0.0 and float(aux["distill"]) == 0.0
  # Demonstration tokens still get SFT's gradient (-log p(y) teacher-forced),
  # rollout tokens none: only the demo row's hidden states move.
  demo_rows = batch["is_demo"]
  assert float(value) == 0.0 and not np.any(grads[0][~demo_rows])
  assert np.any(grads[0][demo_rows])


def test_sampled_estimator_is_unbiased_monte_carlo():
  """Tokens sampled from the student: the mean of k1 estimates KL(student||teacher)
  and the mean of its policy gradient the exact KL's logit gradient, each within
  4.5 standard errors; teacher == student gives exactly 0 on every token."""
  rng = np.random.default_rng(5)
  V, N = 6, 40_000
  zs, zt = rng.normal(0, 1.5, V), rng.normal(0, 1.5, V)
  p = np.exp(np_log_softmax(zs))
  y = rng.choice(V, size=N, p=p)
  logits = jnp.asarray(np.broadcast_to(zs, (1, N, V)), jnp.float32)
  logp, ent = obj.token_logprobs_and_entropy(logits, y[None])
  teacher, _ = obj.token_logprobs_and_entropy(jnp.asarray(np.broadcast_to(zt, (1, N, V))), y[None])
  batch = dict(
    response_mask=np.ones((1, N), np.float32),
    is_demo=np.array([False]),
    rewards=np.zeros(1, np.float32),
    advantages=np.zeros(1, np.float32),
    teacher_logp=teacher,
  )
  (value, aux), (g_logp, _) = _loss_grad(SAMPLED["opd"])(logp, ent, batch)
  k1 = np.asarray(logp - teacher, np.float64)[0]
  rkl, _, d_rkl, _ = np_kl(zs, zt)
  se = k1.std() / np.sqrt(N)
  assert abs(float(value) - rkl) < 4.5 * se and se < 0.2 * rkl
  # Per token: d loss / d logits = g_t (onehot(y_t) - p), g_t = k1_t / N.
  score = np.eye(V)[y] - p
  per_token = np.asarray(g_logp, np.float64)[0][:, None] * score * N
  mc, mc_se = per_token.mean(0), per_token.std(0) / np.sqrt(N)
  assert np.all(np.abs(mc - d_rkl) < 4.5 * mc_se), (mc, d_rkl, mc_se)
  assert np.max(np.abs(d_rkl)) > 5 * np.max(mc_se)  # resolvable: the check can fail
  (same, _), (g_same, _) = _loss_grad(SAMPLED["opd"])(logp, ent, dict(batch, teacher_logp=logp))
  assert float(same) == 0.0 and not np.any(g_same)


# --------------------------------------------------------------------------
# Config, presets, batch keys
# --------------------------------------------------------------------------


def test_presets_validate_and_select_the_teacher_term():
  opd, srft_opd = obj.LossConfig.preset("opd"), obj.LossConfig.preset("srft_opd")
  assert (opd.use_sft, opd.use_demo_rl, opd.use_self_rl) == (False, False, False)
  assert (opd.distill_coef, opd.distill_estimator, opd.distill_on_demos) == (1.0, "sampled", False)
  assert srft_opd == obj.LossConfig(distill_coef=1.0)
  assert obj.LossConfig() == obj.LossConfig.preset("srft") and obj.LossConfig().distill_coef == 0
  assert obj.AdvantageConfig.preset("srft_opd") == obj.AdvantageConfig()
  # Kept apart from the trainer's presets (their batches need the teacher keys).
  assert not set(obj.DISTILL_PRESETS) & set(obj.PRESETS)
  full = obj.LossConfig.preset("opd", distill_estimator="full", distill_on_demos=True)
  assert full.distill_estimator == "full"
  with pytest.raises(ValueError, match="use_sft"):  # opd without its term has no loss
    obj.LossConfig.preset("opd", distill_coef=0.0)


@pytest.mark.parametrize(
  "overrides,field",
  [
    (dict(distill_coef=-0.1), "distill_coef"),
    (dict(distill_coef=float("inf")), "distill_coef"),
    (dict(distill_estimator="k3"), "distill_estimator"),
    (dict(distill_on_demos=True), "distill_on_demos"),  # needs distill_coef > 0
    (dict(distill_coef=1.0, distill_on_demos=1), "distill_on_demos"),
  ],
)
def test_config_validation_names_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    obj.LossConfig(**overrides)


def test_missing_teacher_keys_are_named():
  logp, ent, batch = make_batch()
  no_teacher = {k: v for k, v in batch.items() if k != "teacher_logp"}
  with pytest.raises(ValueError, match=r"teacher_logp.*distill_estimator='sampled'"):
    obj.srft_loss(logp, ent, no_teacher, obj.LossConfig.preset("opd"))
  full = obj.LossConfig.preset("opd", distill_estimator="full", distill_on_demos=True)
  with pytest.raises(ValueError, match="distill_rkl"):
    obj.srft_loss(logp, ent, batch, full)
  with pytest.raises(ValueError, match="distill_fkl"):
    obj.srft_loss(logp, ent, dict(batch, distill_rkl=logp), full)
  with pytest.raises(ValueError, match=r"teacher_logp.*shape"):
    obj.srft_loss(logp, ent, dict(batch, teacher_logp=logp[:, :3]), obj.LossConfig.preset("opd"))
  obj.srft_loss(logp, ent, no_teacher, obj.LossConfig())  # off: no teacher key needed


def _compiled(cfg, args):
  """(compiled loss + gradients, its ops without source locations)."""
  f = lambda logp, ent, batch: obj.srft_loss(logp, ent, batch, cfg)  # noqa: E731
  compiled = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True)).lower(*args).compile()
  lines = compiled.as_text().splitlines()
  ops = [ln for ln in lines if not re.match(r"^(\d+ |[A-Z]\w+$)", ln)]  # location tables
  return compiled, [re.sub(r",?\s*metadata=\{.*?\}", "", ln) for ln in ops]


@pytest.mark.parametrize("name", sorted(obj.PRESETS))
def test_existing_presets_are_unchanged_by_the_teacher_fields(name):
  """distill_coef == 0 adds no term, no metric and no op: the loss, its
  gradients and its compiled program equal those with the teacher fields at
  their defaults, bit for bit, whatever the (inert) estimator."""
  logp, ent, batch = make_batch()
  batch = dict(batch, ref_logp=batch["old_logp"])
  base = obj.LossConfig.preset(name, max_response_len=10)
  other = obj.LossConfig.preset(name, max_response_len=10, distill_estimator="full")
  (f0, ops0), (f1, ops1) = (_compiled(c, (logp, ent, batch)) for c in (base, other))
  assert ops0 == ops1
  ((v0, aux0), g0), ((v1, aux1), g1) = f0(logp, ent, batch), f1(logp, ent, batch)
  assert sorted(aux0) == sorted(aux1) and not {"distill", "teacher_kl"} & set(aux0)
  for a, b in zip(jax.tree.leaves((v0, aux0, g0)), jax.tree.leaves((v1, aux1, g1))):
    np.testing.assert_array_equal(a, b)
  assert "distill" not in obj.loss_denominators(batch, base)


@pytest.mark.parametrize("name", ["opd_full_demos", "srft_opd_demos_clip"])
def test_micro_batch_accumulation_is_exact(name):
  """Micro-batches with the full batch's denominators add up to the full batch."""
  cfg = {
    "opd_full_demos": obj.LossConfig.preset("opd", distill_estimator="full", distill_on_demos=True),
    "srft_opd_demos_clip": obj.LossConfig.preset(
      "srft_opd", distill_on_demos=True, self_rl_form="advantage", clip_eps=0.2
    ),
  }[name]
  logp, ent, batch = make_batch()
  rng = np.random.default_rng(6)
  batch["distill_rkl"] = rng.uniform(0, 2, logp.shape).astype(np.float32)
  batch["distill_fkl"] = rng.uniform(0, 2, logp.shape).astype(np.float32)
  (loss, _), (g_logp, _) = _loss_grad(cfg)(logp, ent, batch)
  den = obj.loss_denominators(batch, cfg)
  assert "distill" in den and "distill_demo" in den
  f = jax.jit(jax.value_and_grad(lambda l, e, b: obj.srft_loss(l, e, b, cfg, denominators=den)[0]))
  total, grads = 0.0, []
  for rows in (slice(0, 2), slice(2, 4)):
    value, g = f(logp[rows], ent[rows], {k: v[rows] for k, v in batch.items()})
    total, grads = total + value, grads + [g]
  np.testing.assert_allclose(total, loss, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.concatenate(grads), g_logp, rtol=1e-6, atol=1e-8)


def test_garbage_off_the_response_does_not_leak():
  """-inf / NaN teacher values on padding reach neither the loss nor its gradient."""
  logp, ent, batch = make_batch()
  off = batch["response_mask"] == 0
  for cfg in (
    SAMPLED["opd_demos_clip"],
    obj.LossConfig.preset("opd", distill_estimator="full", distill_on_demos=True),
  ):
    kl = np.ones_like(logp)
    clean = dict(batch, distill_rkl=kl, distill_fkl=kl)
    dirty = dict(clean, distill_fkl=np.where(off, np.nan, kl))
    for key in ("teacher_logp", "old_logp", "distill_rkl"):
      dirty[key] = np.where(off, -np.inf, clean[key])
    (v0, _), g0 = _loss_grad(cfg)(logp, ent, clean)
    (v1, _), g1 = _loss_grad(cfg)(np.where(off, -np.inf, logp), ent, dirty)
    np.testing.assert_array_equal(v0, v1)
    assert np.all(np.isfinite(g1[0])) and not np.any(np.asarray(g1[0])[off])
    np.testing.assert_allclose(g0[0], g1[0])


@pytest.mark.multidevice
@pytest.mark.slow
def test_chunked_teacher_kl_sharded_equals_single_device():
  """Rows on the data axis, both unembeddings' V (then D) on the tensor axis."""
  assert jax.device_count() >= 8
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  hs, ws, ht, wt = tiny_pair(seed=7, B=4, T=6, D=8, E=8, V=16)
  cot = np.random.default_rng(8).normal(size=(2, 4, 6)).astype(np.float32)

  def f(hs, ws, ht, wt):
    rkl, fkl = obj.chunked_teacher_kl(hs, ws, ht, wt, chunk_size=8)
    return jnp.sum(rkl * cot[0]) + jnp.sum(fkl * cot[1])

  vg = jax.jit(jax.value_and_grad(f, (0, 1)))
  ref_v, ref_g = vg(hs, ws, ht, wt)
  rows = NamedSharding(mesh, P("data", None, None))
  for w_spec in (P(None, "tensor"), P("tensor", None)):
    w_sharding = NamedSharding(mesh, w_spec)
    args = [jax.device_put(x, s) for x, s in zip((hs, ws, ht, wt), (rows, w_sharding) * 2)]
    v, g = vg(*args)
    assert len(g[1].sharding.device_set) == 8
    np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-6)
    for a, r in zip(g, ref_g):
      np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
