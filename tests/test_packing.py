"""Sequence packing in the update (docs/method.md §18): the host packer's
properties, segment-aware attention and positions, packed loss and gradients
equal to the unpacked step's, no recompile when rows spill, the sharded step,
the config fields and the trainer's host mask."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from srft_jax import factory
from srft_jax import job
from srft_jax import lora
from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import packing
from srft_jax import sharding as shd
from srft_jax import step as step_lib
from srft_jax import trainer as trainer_lib
from srft_jax.model import attention as attn_lib

import helpers

P, R = 6, 10  # prompt and response widths of the test rows: T = 16
T = P + R

TINY = model_lib.ModelConfig(
  vocab_size=48,
  embed_dim=32,
  mlp_dim=64,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  max_seq_len=64,
)


def _batch(seed, rows=8, vocab=TINY.vocab_size):
  return helpers.step_batch(seed, rows=rows, prompt_len=P, response_len=R, vocab=vocab)


def _plan(batch, cfg: step_lib.StepConfig):
  starts, lengths = packing.row_extents(np.asarray(batch["mask"]))
  return packing.make_plan(
    starts,
    lengths,
    row_len=T,
    pack_len=cfg.pack_len,
    pack_rows=cfg.pack_rows,
    minibatches=cfg.minibatches,
    microbatches=cfg.microbatches,
  )


# ----------------------------------------------------------------------------
# The packer (host, NumPy)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_packer_places_every_real_token_once_without_overflow(seed):
  rs = np.random.RandomState(seed)
  rows, row_len, pack_len, pack_rows = 24, 20, 48, 2
  lengths = rs.randint(0, row_len + 1, rows)
  starts = rs.randint(0, row_len - lengths + 1)
  plan = packing.make_plan(
    starts, lengths, row_len=row_len, pack_len=pack_len, pack_rows=pack_rows, microbatches=2
  )
  slots = packing.slots_for(rows // 2, row_len, pack_len, pack_rows)
  assert plan["row"].shape == (1, 2, slots, pack_rows, pack_len)
  seg = plan["segment"]
  for c in range(2):
    real = seg[0, c] > 0
    placed = sorted(
      zip(plan["row"][0, c][real].tolist(), plan["col"][0, c][real].tolist(), strict=True)
    )
    lo = c * rows // 2
    want = sorted(
      (r, int(starts[lo + r]) + k) for r in range(rows // 2) for k in range(lengths[lo + r])
    )
    assert placed == want  # every real token exactly once, none invented
    # Within a packed row: segments are contiguous runs in order, positions 0.. inside each.
    for prow_seg, prow_pos, prow_col in zip(
      seg[0, c].reshape(-1, pack_len),
      plan["position"][0, c].reshape(-1, pack_len),
      plan["col"][0, c].reshape(-1, pack_len),
    ):
      used = prow_seg > 0
      assert not np.any(used[np.argmin(used) :]) or used.all()  # padding only at the end
      for s in set(prow_seg[used].tolist()):
        at = np.flatnonzero(prow_seg == s)
        assert np.array_equal(at, np.arange(at[0], at[0] + len(at)))
        assert np.array_equal(prow_pos[at], np.arange(len(at)))
        assert np.all(np.diff(prow_col[at]) == 1)
  again = packing.make_plan(
    starts, lengths, row_len=row_len, pack_len=pack_len, pack_rows=pack_rows, microbatches=2
  )
  assert all(np.array_equal(plan[k], again[k]) for k in packing.PLAN_KEYS)  # deterministic


def test_rows_that_do_not_fit_spill_into_the_next_slot():
  # Three rows of 9 tokens in bins of 16: one a bin; one bin a slot -> three slots.
  lengths = np.array([9, 9, 9, 4])
  plan = packing.make_plan(np.zeros(4), lengths, row_len=10, pack_len=16, pack_rows=1)
  used = (plan["segment"][0, 0] > 0).any(axis=(1, 2))
  assert plan["segment"].shape[2] == packing.slots_for(4, 10, 16, 1) == 4
  assert used.tolist() == [True, True, True, False]  # the 4-token row joined bin 0
  assert sorted(plan["segment"][0, 0, 0, 0].tolist())[-1] == 2
  # Short rows need fewer slots than the static worst case: the rest are empty.
  short = packing.make_plan(np.zeros(4), np.full(4, 3), row_len=10, pack_len=16, pack_rows=1)
  assert (short["segment"][0, 0] > 0).any(axis=(1, 2)).tolist() == [True, False, False, False]
  with pytest.raises(ValueError, match="pack_len"):
    packing.pack_bins(np.array([17]), 16)
  with pytest.raises(ValueError, match="pack_len"):
    packing.slots_for(4, 20, 16, 1)


def test_row_extents_and_real_token_fraction():
  mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
  starts, lengths = packing.row_extents(mask)
  assert starts.tolist() == [1, 0, 0] and lengths.tolist() == [2, 4, 0]
  with pytest.raises(ValueError, match="non-contiguous"):
    packing.row_extents(np.array([[1, 0, 1]]))
  assert packing.real_token_fraction(lengths, None, 4) == 6 / 12
  plan = packing.make_plan(starts, lengths, row_len=4, pack_len=6, pack_rows=1)
  # bins {row 1, row 0} = 6 tokens in one slot of 6: nothing wasted; slots 2-3 skipped
  assert packing.real_token_fraction(lengths, plan, 4) == 1.0


# ----------------------------------------------------------------------------
# The model: attention inside segments, positions per segment
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("attention,scan", [("xla", False), ("chunked", False), ("cudnn", True)])
def test_packed_forward_equals_rows_and_never_crosses_segments(attention, scan):
  """Packed logits equal each row's own forward at its columns (positions
  restart per segment, as `positions_from_mask` counts a padded row's), and
  changing one segment's tokens leaves the other segments' logits alone."""
  cfg = dataclasses.replace(TINY, attention=attention, attention_chunk=4, scan_layers=scan)
  model = model_lib.create_model(cfg, seed=0)
  batch = _batch(1, rows=4)
  starts, lengths = packing.row_extents(np.asarray(batch["mask"]))
  plan = packing.make_plan(starts, lengths, row_len=T, pack_len=3 * T, pack_rows=1)
  pl = {k: jnp.asarray(v[0, 0, 0]) for k, v in plan.items()}  # one packed row holds all
  assert int(pl["segment"].max()) == 4

  def packed(tokens_BT):
    tok = tokens_BT[pl["row"], pl["col"]]
    seg = pl["segment"]
    return model(tok, pl["position"], (seg > 0).astype(jnp.int32), segment_ids_BT=seg).logits[0]

  rows = model_lib.forward_logits(model, batch["tokens"], batch["mask"])
  got = packed(batch["tokens"])
  real = np.asarray(pl["segment"][0]) > 0
  want = np.asarray(rows)[np.asarray(pl["row"][0]), np.asarray(pl["col"][0])]
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-5)

  changed_row = int(pl["row"][0, 0])  # the first segment's source row
  other = batch["tokens"].at[changed_row].set((batch["tokens"][changed_row] + 7) % 48)
  moved = np.abs(np.asarray(packed(other)) - np.asarray(got)).max(-1)
  seg = np.asarray(pl["segment"][0])
  assert moved[seg == 1].max() > 1e-3  # the perturbed segment changed
  assert moved[(seg > 1)].max() == 0.0  # no other segment saw it


def _numpy_runs(seg_BT):
  """Each row's runs of equal ids as (start, length) lists, the NumPy way."""
  out = []
  for row in np.asarray(seg_BT):
    edges = np.flatnonzero(np.diff(row)) + 1
    starts = np.concatenate([[0], edges])
    out.append((starts.tolist(), np.diff(np.append(starts, len(row))).tolist()))
  return out


def test_packed_runs_are_cudnns_packed_layout():
  """`packed_runs` (attention="cudnn"'s packed layout): every segment and the
  padding tail a run, -1 past the last (q_offsets [B, M+1], q_seqlen [B, M]),
  and the mask those runs mean (`runs_allowed`) is the segment mask on every
  real token: causal, never across segments."""
  rs = np.random.RandomState(0)
  lengths = rs.randint(1, 12, size=9)
  plan = packing.make_plan(np.zeros(9), lengths, row_len=12, pack_len=24, pack_rows=6)
  seg = plan["segment"][0, 0].reshape(-1, 24)
  seg = np.concatenate([seg, np.zeros((1, 24), np.int32), np.ones((1, 24), np.int32)])
  m = 10  # room for 9 segments and the tail
  runs = jax.jit(attn_lib.packed_runs, static_argnums=1)(jnp.asarray(seg), m)
  assert runs.starts_BM.shape == (len(seg), m + 1) and runs.lengths_BM.shape == (len(seg), m)
  for b, (starts, lens) in enumerate(_numpy_runs(seg)):
    want_s = starts + [-1] * (m + 1 - len(starts))
    want_l = lens + [-1] * (m - len(lens))
    assert np.asarray(runs.starts_BM[b]).tolist() == want_s, b
    assert np.asarray(runs.lengths_BM[b]).tolist() == want_l, b
  assert np.asarray(runs.starts_BM[-2]).tolist()[:2] == [0, -1]  # all padding: one run
  ok = np.asarray(attn_lib.runs_allowed(runs, 24))
  i, j = np.arange(24)[:, None], np.arange(24)[None]
  for b in range(len(seg)):
    same = seg[b][:, None] == seg[b][None]
    np.testing.assert_array_equal(ok[b], same & (j <= i))
  real = seg > 0
  seg_mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & (j <= i)[None]
  np.testing.assert_array_equal(ok[real], seg_mask[real])
  # Too little room: a row keeps its first m runs, the last offset stays -1.
  few = attn_lib.packed_runs(jnp.asarray(seg), 2)
  for b, (starts, lens) in enumerate(_numpy_runs(seg)):
    assert np.asarray(few.starts_BM[b]).tolist() == (starts[:2] + [-1] * 3)[:3], b
    assert np.asarray(few.lengths_BM[b]).tolist() == (lens[:2] + [-1])[:2], b


def _emulate_cudnn_packed(q, k, v, q_len, kv_len, q_off, kv_off):
  """What cuDNN computes from jax's packed-layout operands, in NumPy: jax
  (`_fix_seqlen_offsets`) flattens the runs of all rows into one list of
  sequences with element offsets into the flat q [B*T*N*H] and k [B*S*K*H]
  buffers; each sequence is causal attention on its own. Tokens in no
  sequence stay NaN."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

  b, t, n, h = q.shape
  kh = k.shape[2]
  lens_q, lens_k, offs_q, offs_k = (
    np.asarray(x).ravel() for x in cudnn_fa._fix_seqlen_offsets(q_len, kv_len, q_off, kv_off, q, k)
  )
  qf = np.asarray(q, np.float64).reshape(b * t, n, h)
  kf, vf = (np.asarray(x, np.float64).reshape(b * t, kh, h) for x in (k, v))
  out = np.full((b * t, n, h), np.nan)
  for i in range(len(lens_q)):
    lq, lk = int(lens_q[i]), int(lens_k[i])
    if lq <= 0:
      continue
    a, c = int(offs_q[i]) // (n * h), int(offs_k[i]) // (kh * h)  # the buffers' real strides
    assert 0 <= c and c + lk <= b * t, "a sequence past the key buffer"
    for head in range(n):
      g = head // (n // kh)
      sc = qf[a : a + lq, head] @ kf[c : c + lk, g].T / np.sqrt(h)
      sc = np.where(np.tril(np.ones((lq, lk), bool)), sc, -np.inf)
      p = np.exp(sc - sc.max(-1, keepdims=True))
      out[a : a + lq, head] = (p / p.sum(-1, keepdims=True)) @ vf[c : c + lk, g]
  return out.reshape(b, t, n, h)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_cudnn_operands_mean_the_segment_mask(heads, kv_heads):
  """The operands `attend_packed` hands jax's cuDNN attention, run through
  jax's own offset arithmetic and an emulation of cuDNN's packed layout,
  give the segment-masked attention on every real token and finite values
  on padding; with grouped-query keys too (jax 0.10 strides key offsets by
  the query's heads: the keys are repeated to match). A row with more runs
  than the room leaves the other row exact."""
  rs = np.random.RandomState(2)
  lengths = np.array([100, 60, 40, 30, 128, 90, 20])
  plan = packing.make_plan(np.zeros(7), lengths, row_len=128, pack_len=256, pack_rows=2)
  seg = np.asarray(plan["segment"][0, 0, 0])
  q, k, v = (rs.randn(2, 256, x, 16).astype(np.float32) for x in (heads, kv_heads, kv_heads))
  kk, vv = (np.repeat(x, heads // kv_heads, 2) for x in (k, v))
  i, j = np.arange(256)[:, None], np.arange(256)[None]
  ok = (seg[:, :, None] == seg[:, None, :]) & (j <= i)[None]
  sc = np.einsum("btnh,bsnh->bnts", q, kk) / 4.0
  p = np.exp(np.where(ok[:, None], sc, -np.inf) - sc.max(-1, keepdims=True))
  want = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), vv)
  real = seg > 0
  runs_per_row = [len(r[0]) for r in _numpy_runs(seg)]
  for room in (8, min(runs_per_row)):  # enough; too little for the longer row
    runs = attn_lib.packed_runs(jnp.asarray(seg), room)
    ops = attn_lib.cudnn_packed_operands(*(jnp.asarray(x) for x in (q, k, v)), runs)
    got = _emulate_cudnn_packed(*ops)
    fits = np.array(runs_per_row) <= room
    np.testing.assert_allclose(got[fits][real[fits]], want[fits][real[fits]], atol=1e-5)
    assert np.isfinite(got[fits]).all()  # the padding tail is a run of its own
  assert not fits.all()  # the second pass did overflow a row


@pytest.mark.skipif(
  not attn_lib.cudnn_available(jnp.bfloat16), reason="cuDNN: SRFT_TEST_PLATFORM=cuda on a GPU"
)
def test_cudnn_packed_attention_equals_the_segment_mask():
  """On a GPU: cuDNN's packed layout (`attend_packed`) equals XLA attention
  under the segment mask on every real token, values and gradients (bf16)."""
  rs = np.random.RandomState(1)
  b, t, n, k, h = 2, 256, 4, 2, 64
  lengths = np.array([100, 60, 40, 30, 128, 90, 20])
  plan = packing.make_plan(np.zeros(7), lengths, row_len=128, pack_len=t, pack_rows=b)
  seg = jnp.asarray(plan["segment"][0, 0, 0])
  q, kk, v = (jnp.asarray(rs.randn(b, t, x, h), jnp.bfloat16) for x in (n, k, k))
  runs = attn_lib.packed_runs(seg, 8)
  real = np.asarray(seg) > 0

  def masked(q, kk, v):
    idx = jnp.arange(t)
    ok = (seg[:, None, :] == seg[:, :, None]) & (idx[None] <= idx[:, None])[None]
    return attn_lib.attend(q, kk.transpose(0, 2, 3, 1), v.swapaxes(1, 2), ok)

  def loss(fn, q, kk, v):
    w = jnp.asarray(real, jnp.float32)[:, :, None, None]
    return jnp.sum(fn(q, kk, v).astype(jnp.float32) ** 2 * w)

  cudnn = lambda q, kk, v: attn_lib.attend_packed(q, kk, v, runs, 64)  # noqa: E731
  assert "cudnn" in jax.jit(cudnn).lower(q, kk, v).as_text()  # cuDNN ran, not the fallback
  got, want = jax.jit(cudnn)(q, kk, v), jax.jit(masked)(q, kk, v)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  np.testing.assert_allclose(f32(got)[real], f32(want)[real], atol=2e-2)
  g_got = jax.jit(jax.grad(functools.partial(loss, cudnn), argnums=(0, 1, 2)))(q, kk, v)
  g_want = jax.jit(jax.grad(functools.partial(loss, masked), argnums=(0, 1, 2)))(q, kk, v)
  for a, w in zip(g_got, g_want):
    scale = np.abs(f32(w)).max()
    np.testing.assert_allclose(f32(a) / scale, f32(w) / scale, atol=3e-2)


# ----------------------------------------------------------------------------
# The train step: packed equals unpacked
# ----------------------------------------------------------------------------


_SGD = {lr: optax.sgd(lr) for lr in (1.0, 1e-3)}  # one object a rate: a static argument


def _grads_step(graphdef, step_cfg, batch, params, plan=None, frozen=None, ref=None, lr=1.0):
  """One train step with SGD, no clipping: (metrics, (params - new params) / lr),
  the gradient of a step of one mini-batch."""
  tx = _SGD[lr]
  state = step_lib.init_train_state(params, tx)
  pack = None if plan is None else jax.tree.map(jnp.asarray, plan)
  run = jax.jit(step_lib.train_step, static_argnums=(0, 1, 2))
  state, metrics = run(graphdef, tx, step_cfg, state, batch, ref, frozen, pack)
  return metrics, jax.tree.map(lambda a, b: (a - b) / lr, params, state["params"])


@pytest.fixture(scope="module")
def tiny():
  graphdef, params = nnx.split(model_lib.create_model(TINY, seed=1))
  return graphdef, params


def _assert_same_step(want, got):
  """Equal metrics and gradients up to float32 rounding: 1e-6 absolute, or
  1e-5 relative where a value is large (a gradient norm of 60, entries of 3)."""
  (mw, gw), (mg, gg) = want, got
  for k in mw:
    np.testing.assert_allclose(float(mg[k]), float(mw[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  for x, y in zip(jax.tree.leaves(gw), jax.tree.leaves(gg), strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(gw)) > 1e-3  # a real gradient


# Two presets here and srft_code below cover every loss path (paper weights; the
# released code's shaping, token entropy and bonus; PPO clip, a constant
# normaliser); the rest are `slow`.
FAST_PRESETS = ("srft", "dr_grpo")


@pytest.mark.parametrize(
  "preset",
  [
    p if p in FAST_PRESETS else pytest.param(p, marks=pytest.mark.slow) for p in sorted(obj.PRESETS)
  ],
)
def test_packed_step_equals_unpacked_for_every_preset(tiny, preset):
  """Each loss preset: the packed step's loss, metrics and gradients (SGD at
  lr 1: the update is the gradient) equal the unpacked step's; the rows spill
  over two slots, so the loss is also summed over slots."""
  graphdef, params = tiny
  batch = _batch(2)
  loss_cfg = obj.LossConfig.preset(preset)
  if loss_cfg.aggregation == "constant_len":
    loss_cfg = dataclasses.replace(loss_cfg, max_response_len=R)
  base = step_lib.StepConfig(loss=loss_cfg, logit_chunk=16)
  packed_cfg = dataclasses.replace(base, pack_len=2 * T, pack_rows=1)
  plan = _plan(batch, packed_cfg)
  assert (plan["segment"][0, 0] > 0).any(axis=(1, 2)).sum() >= 2  # spilled
  want = _grads_step(graphdef, base, batch, params)
  got = _grads_step(graphdef, packed_cfg, batch, params, plan)
  _assert_same_step(want, got)


@pytest.mark.slow
def test_packed_step_equals_unpacked_with_cudnn_attention():
  """attention="cudnn", scanned: the packed step (segments as cuDNN's packed
  runs) equals the unpacked one (left-aligned causal rows). On CPU both run
  XLA under the same masks; `test_cudnn_packed_attention_equals_the_segment_mask`
  checks cuDNN's kernel itself on a GPU."""
  cfg = dataclasses.replace(TINY, attention="cudnn", scan_layers=True)
  graphdef, params = nnx.split(model_lib.create_model(cfg, seed=1))
  batch = _batch(2)
  base = step_lib.StepConfig(loss=obj.LossConfig.preset("srft"), logit_chunk=16)
  packed_cfg = dataclasses.replace(base, pack_len=2 * T, pack_rows=1)
  plan = _plan(batch, packed_cfg)
  want = _grads_step(graphdef, base, batch, params)
  got = _grads_step(graphdef, packed_cfg, batch, params, plan)
  _assert_same_step(want, got)


def test_packed_step_equals_unpacked_with_micro_batches_and_pre_passes(tiny):
  """Four micro-batches, the batch-level entropy pre-pass,
  the IS-correction pre-pass (recompute_old_logp) and a KL reference, run packed."""
  graphdef, params = tiny
  batch = _batch(3, rows=16)
  ref = jax.tree.map(lambda x: x * 1.01, params)
  loss_cfg = obj.LossConfig.preset(
    "srft_code",
    entropy_granularity="batch",
    is_correction="sequence_truncate",
    is_cap=5.0,
    clip_eps=0.2,
    aggregation="seq_mean_token_mean",
    kl_coef=0.05,
  )
  base = step_lib.StepConfig(
    loss=loss_cfg,
    microbatches=4,
    logit_chunk=16,
    recompute_old_logp=True,
    reference=True,
  )
  packed_cfg = dataclasses.replace(base, pack_len=2 * T, pack_rows=1)
  plan = _plan(batch, packed_cfg)
  want = _grads_step(graphdef, base, batch, params, ref=ref)
  got = _grads_step(graphdef, packed_cfg, batch, params, plan, ref=ref)
  assert float(want[0]["mismatch/abs_mean"]) > 0.1 and float(want[0]["kl"]) > 0
  _assert_same_step(want, got)


@pytest.mark.slow
def test_packed_step_equals_unpacked_with_lora(tiny):
  model = lora.attach(model_lib.create_model(TINY, seed=1), lora.LoRAConfig(rank=4, alpha=8.0))
  graphdef, adapters, base_state = lora.split(model)
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B != 0: the adapters act
  batch = _batch(4)
  base = step_lib.StepConfig(loss=obj.LossConfig.preset("srft"), microbatches=2, logit_chunk=16)
  packed_cfg = dataclasses.replace(base, pack_len=T, pack_rows=2)
  want = _grads_step(graphdef, base, batch, adapters, frozen=base_state)
  got = _grads_step(
    graphdef, packed_cfg, batch, adapters, _plan(batch, packed_cfg), frozen=base_state
  )
  _assert_same_step(want, got)


def test_packed_step_does_not_recompile_when_rows_spill(tiny):
  graphdef, params = tiny
  cfg = step_lib.StepConfig(loss=obj.LossConfig.preset("srft"), minibatches=2, logit_chunk=16)
  cfg = dataclasses.replace(cfg, pack_len=2 * T, pack_rows=1)
  tx = optax.sgd(1e-3)
  fn = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, cfg))
  state = step_lib.init_train_state(params, tx)
  short = _batch(5)
  short["mask"] = short["mask"].at[:, P + 2 :].set(0)  # responses of at most 2 tokens
  short["response_mask"] = short["response_mask"].at[:, P + 1 :].set(0)
  used = []
  for batch in (short, _batch(6), _batch(7)):
    plan = _plan(batch, cfg)
    used.append(int((plan["segment"][:, 0] > 0).any(axis=(2, 3)).sum(1).max()))
    state, m = fn(state, batch, None, None, jax.tree.map(jnp.asarray, plan))
    assert np.isfinite(float(m["loss"]))
  assert used[0] == 1 and max(used) > 1  # one slot, then spilled into the next
  assert fn._cache_size() == 1


@pytest.mark.multidevice
@pytest.mark.parametrize(
  "scan", [pytest.param(False, marks=pytest.mark.slow), True], ids=["loop", "scanned_cudnn"]
)
def test_sharded_packed_step_equals_single_device(tiny, scan):
  """Packed rows on a (data, fsdp, tensor) mesh of 2 x 2 x 2, the layers in a
  loop or scanned (their stacked params sharded by the same rules; attention
  "cudnn", whose packed runs are sharded like the rows)."""
  attention = "cudnn" if scan else TINY.attention
  model_cfg = dataclasses.replace(TINY, scan_layers=scan, attention=attention)
  graphdef, params = tiny if not scan else nnx.split(model_lib.create_model(model_cfg, seed=1))
  batch = _batch(8)
  cfg = step_lib.StepConfig(loss=obj.LossConfig.preset("srft"), microbatches=2, logit_chunk=16)
  cfg = dataclasses.replace(cfg, pack_len=2 * T, pack_rows=2)
  plan = _plan(batch, cfg)
  want = _grads_step(graphdef, cfg, batch, params, plan)
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  s_params = nnx.state(model_lib.create_model(model_cfg, seed=1, mesh=mesh))
  tx = _SGD[1.0]
  s_state = step_lib.init_train_state(s_params, tx)
  state_sh = step_lib.state_shardings(s_state, mesh, TINY.rules)
  batch_sh = step_lib.batch_shardings(batch, mesh, TINY.rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = step_lib.jit_train_step(graphdef, tx, cfg, state_sh, batch_sh, None, None, replicated)
  with jax.set_mesh(mesh):
    state, metrics = fn(
      jax.device_put(s_state, state_sh),
      jax.device_put(batch, batch_sh),
      None,
      None,
      jax.device_put(plan, replicated),
    )
  grads = jax.tree.map(lambda a, b: a - np.asarray(b), params, state["params"])
  _assert_same_step(want, (metrics, grads))


# ----------------------------------------------------------------------------
# The run spec and the trainer's host side
# ----------------------------------------------------------------------------


def test_config_fields_reach_the_step_and_are_checked(tokenizer_path):
  c = factory.with_overrides(
    factory.load_config(helpers.ROOT + "/configs/default.py"),
    {"batch.packing": True, "data.tokenizer": tokenizer_path},
  )
  spec = factory.run_spec(c, validate=False)
  step = spec.stages[0].step
  row_len = max(spec.data.prompt_buckets) + spec.data.max_response_len
  assert (step.pack_len, step.group) == (row_len, 0)  # P + R; rows packed alone
  assert step.pack_rows >= 1
  off = factory.run_spec(factory.load_config(helpers.ROOT + "/configs/default.py"), validate=False)
  assert off.stages[0].step.pack_len == 0 and off.stages[0].step.group > 0
  with pytest.raises(factory.ConfigError, match=r"config\.batch\.pack_len"):
    factory.run_spec(c, {"batch.pack_len": row_len - 1})
  with pytest.raises(factory.ConfigError, match=r"config\.batch\.pack_rows"):
    factory.run_spec(c, {"batch.pack_rows": -1})


def test_pack_rows_must_split_over_the_data_shards(tokenizer_path):
  """A slot whose rows do not split over the data shards would run whole on
  every shard: refused before anything compiles, naming the field."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  c = factory.with_overrides(
    factory.load_config(helpers.ROOT + "/configs/default.py"),
    {"batch.packing": True, "data.tokenizer": tokenizer_path, "warmup.steps": 0},
  )
  assert factory.run_spec(c, {"batch.pack_rows": 8}).stages[0].step.pack_rows == 8
  with pytest.raises(factory.ConfigError, match=r"config\.batch\.pack_rows: .* 8 data shards"):
    factory.run_spec(c, {"batch.pack_rows": 12})
  four = {"batch.pack_rows": 12, "mesh.data": 4, "mesh.tensor": 2}  # 4 data shards: 12 splits
  assert factory.run_spec(c, four).stages[0].step.pack_rows == 12


def test_host_row_mask_is_the_assembled_batch_mask():
  """The trainer plans from host masks: they equal the assembled batch's,
  also after dynamic sampling's `take_groups` re-indexes the rollouts."""
  rs = np.random.RandomState(0)
  b, n, d = 3, 2, 1
  layout = step_lib.GroupLayout(n, d)
  pmask = (np.arange(P)[None] >= rs.randint(0, P - 1, (b, 1))).astype(np.int32)
  rmask = (np.arange(R)[None] < rs.randint(1, R + 1, (b * n, 1))).astype(np.int32)
  dmask = (np.arange(R)[None] < rs.randint(1, R + 1, (b, 1))).astype(np.int32)
  tok = lambda m: (rs.randint(1, 40, m.shape) * m).astype(np.int32)  # noqa: E731
  rollouts = trainer_lib.Rollouts(
    jnp.asarray(tok(rmask)),
    jnp.asarray(rmask),
    jnp.zeros(rmask.shape, jnp.float32),
    tok(rmask),
    rmask,
    rmask.sum(1),
    np.zeros(b * n, bool),
  )
  prompts = {
    "prompt_tokens": tok(pmask),
    "prompt_mask": pmask,
    "demo_tokens": tok(dmask),
    "demo_mask": dmask,
  }
  rewards = np.zeros((b, n + d), np.float32)
  scored = trainer_lib.Scored(rewards, np.ones_like(rewards), rewards[:, :n])
  keep = np.array([2, -1, 0])
  prompts, rollouts, scored = trainer_lib.take_groups(keep, prompts, rollouts, scored, layout)
  batch = step_lib.assemble_batch(
    prompts["prompt_tokens"],
    prompts["prompt_mask"],
    rollouts.tokens,
    rollouts.mask,
    rollouts.logprobs,
    prompts["demo_tokens"],
    prompts["demo_mask"],
    jnp.zeros(b * (n + d)),
    jnp.zeros(b * (n + d)),
    layout=layout,
  )
  host = trainer_lib.row_mask(prompts, rollouts, layout)
  np.testing.assert_array_equal(host, np.asarray(batch["mask"]))
  assert np.array_equal(rollouts.lengths, rollouts.host_mask.sum(1))


@pytest.mark.slow
def test_a_packed_run_compiles_once_and_logs_the_fraction(tokenizer_path, tmp_path):
  """job.run with packing on (the dapo preset: dynamic sampling re-indexes the
  rollouts, whose host masks the plan reads): after the first step nothing
  compiles, and every step logs `batch/real_token_fraction`."""
  over = {
    "warmup.steps": 0,
    "steps": 4,
    "model.embed_dim": 32,
    "model.num_layers": 1,
    "model.mlp_dim": 64,
    "data.task_train_size": 256,
    "data.max_response_len": 24,
    "data.tokenizer": tokenizer_path,
    "batch.prompts_per_step": 4,
    "batch.packing": True,
    "batch.pack_rows": 8,  # a multiple of the 8 data shards
    "checkpoint.every": 0,
    "eval.before": False,
    "eval.after": False,
    "log.progress": False,
    "log.tensorboard": False,
    "log.plots": False,
  }
  c = factory.with_overrides(factory.load_config(helpers.ROOT + "/configs/default.py:dapo"), over)
  spec = factory.run_spec(c)
  assert spec.stages[0].step.pack_len == max(spec.data.prompt_buckets) + 24
  compiles, counts = {"n": 0}, []

  def on_event(name, *_a, **_k):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles["n"] += 1

  real = factory.data_iter

  class Counting:
    def __init__(self, inner):
      self.inner = inner

    def __iter__(self):
      return self

    def __next__(self):
      counts.append(compiles["n"])
      return next(self.inner)

    def __getattr__(self, name):
      return getattr(self.inner, name)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(factory, "data_iter", lambda *a, **k: Counting(real(*a, **k)))
    job.run(spec, str(tmp_path))
  per_step = counts[::2]  # two draws a step (dapo oversamples 2x)
  assert len(per_step) == 4 and per_step[3] == per_step[1], per_step
  with open(tmp_path / "logs" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if '"loss/loss"' in line]
  fractions = [r["batch/real_token_fraction"] for r in rows]
  assert len(fractions) == 4 and all(0 < x <= 1 for x in fractions), fractions
