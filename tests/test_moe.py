"""The Qwen3-MoE block: the dropless grouped matmul against a dense reference
(values and gradients, experts without tokens, one shard's experts), the
router and its load-balancing statistics, the train step's router loss
(micro-batches, shared prompts), and sharded runs (FSDP, FSDP x tensor, experts
over the `expert` axis or over fsdp) against one device on the 8 forced CPU
devices, without recompiling. Parity with transformers lives in test_qwen3.py.
"""

import contextlib
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax import factory
from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import sharding as shd
from srft_jax import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# E=8, X=2; embed divisible by 8 and expert mlp by 4, so every layout splits something.
CFG = model_lib.ModelConfig.preset(
  "tiny_qwen3_moe",
  vocab_size=128,
  embed_dim=32,
  mlp_dim=48,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  moe_mlp_dim=16,
  max_seq_len=64,
  mlp_only_layers=(1,),  # layer 0 sparse, layer 1 dense
  router_aux_loss_coef=0.01,
)


def _dense_reference(x_MD, idx_MX, w_MX, valid_M, gate, up, down):
  """sum_j w[t, j] FFN_{idx[t, j]}(x[t]) by gathering each assignment's weights."""
  g = jnp.einsum("MD,MXDF->MXF", x_MD, gate[idx_MX])
  u = jnp.einsum("MD,MXDF->MXF", x_MD, up[idx_MX])
  y = jnp.einsum("MXF,MXFD->MXD", jax.nn.silu(g) * u, down[idx_MX])
  return jnp.einsum("MXD,MX->MD", y, w_MX * valid_M[:, None])


def _grouped_inputs(seed=0, m=40, e=6, d=8, f=12, xk=2, unused=(2, 4)):
  rng = np.random.default_rng(seed)
  used = [i for i in range(e) if i not in unused]
  idx = np.stack([rng.choice(used, xk, replace=False) for _ in range(m)]).astype(np.int32)
  return (
    jnp.asarray(rng.standard_normal((m, d)), jnp.float32),
    jnp.asarray(idx),
    jnp.asarray(rng.random((m, xk)), jnp.float32),
    jnp.asarray(rng.random(m) > 0.2, jnp.float32),
    jnp.asarray(rng.standard_normal((e, d, f)) * 0.3, jnp.float32),
    jnp.asarray(rng.standard_normal((e, d, f)) * 0.3, jnp.float32),
    jnp.asarray(rng.standard_normal((e, f, d)) * 0.3, jnp.float32),
  )


def _grouped(x, idx, w, valid, gate, up, down, first=0, impl="ragged_dot"):
  m = x.shape[0]
  out = model_lib.grouped_ffn(
    x[None], idx[None], w[None], valid[None], gate, up, down, first_expert=first, impl=impl
  )
  return out.reshape(m, -1)


# ragged_dot: what CPUs and GPUs run; megablox: the TPU kernels, in Pallas' interpreter.
IMPLS = ("ragged_dot", "megablox")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.slow
def test_grouped_matmul_equals_dense_reference_with_empty_experts(impl):
  args = _grouped_inputs()
  x, idx, w, valid, gate, up, down = args
  sizes = np.bincount(np.asarray(idx)[np.asarray(valid) > 0].ravel(), minlength=gate.shape[0])
  assert sizes[2] == sizes[4] == 0 and sizes.sum() > 0  # two experts receive no token
  got = jax.jit(functools.partial(_grouped, impl=impl))(*args)
  want = _dense_reference(*args)
  err = float(jnp.abs(got - want).max())
  print(f"grouped vs dense: max |dy| = {err:.2e}")
  assert err < 1e-5
  np.testing.assert_array_equal(np.asarray(got)[np.asarray(valid) == 0], 0.0)  # padding: 0


@pytest.mark.slow
def test_grouped_matmul_of_one_shard_of_experts():
  """Experts 3..5 of 6 held locally: only assignments to them count (the
  expert-parallel shards' partial sums add up to the whole)."""
  x, idx, w, valid, gate, up, down = _grouped_inputs(unused=())
  whole = _dense_reference(x, idx, w, valid, gate, up, down)
  parts = [
    _grouped(x, idx, w, valid, gate[lo:hi], up[lo:hi], down[lo:hi], first=lo)
    for lo, hi in ((0, 3), (3, 6))
  ]
  local = np.isin(np.asarray(idx), [3, 4, 5])
  want_hi = _dense_reference(x, idx, w * local, valid, gate, up, down)
  assert float(jnp.abs(parts[1] - want_hi).max()) < 1e-5
  assert float(jnp.abs(parts[0] + parts[1] - whole).max()) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.slow
def test_grouped_matmul_gradients_equal_dense_reference(impl):
  args = _grouped_inputs(seed=1)
  cot = jax.random.normal(jax.random.key(0), (args[0].shape[0], args[0].shape[1]))
  wrt = (0, 2, 4, 5, 6)  # x, router weights, gate, up, down

  def loss(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=wrt))

  got, want = loss(functools.partial(_grouped, impl=impl))(*args), loss(_dense_reference)(*args)
  for name, g, r in zip(("x", "weights", "gate", "up", "down"), got, want):
    err = float(jnp.abs(g - r).max())
    print(f"d{name}: max err {err:.2e} (max |g| {float(jnp.abs(r).max()):.2f})")
    assert err < 1e-5, name
  assert float(jnp.abs(got[2][2]).max()) == 0.0  # an expert without tokens gets no gradient


def _moe_layer(cfg=CFG, seed=0):
  return model_lib.MoE(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.slow
def test_moe_layer_routes_like_a_per_token_reference():
  """Router in float32, top-k, renormalised; padding routed nowhere, outside the stats."""
  for norm in (True, False):
    cfg = dataclasses.replace(CFG, norm_topk_prob=norm)
    layer = _moe_layer(cfg)
    x = jax.random.normal(jax.random.key(1), (3, 7, cfg.embed_dim))
    mask = jnp.asarray(np.arange(7)[None] >= np.array([[0], [2], [5]]), jnp.int32)
    y, stats = nnx.jit(lambda m, x, k: m(x, k))(layer, x, mask)
    probs = jax.nn.softmax(x @ layer.router[...], axis=-1)
    top_p, top_i = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if norm:
      top_p = top_p / top_p.sum(-1, keepdims=True)
    flat = lambda a: a.reshape((21,) + a.shape[2:])  # noqa: E731
    want = _dense_reference(
      flat(x),
      flat(top_i),
      flat(top_p),
      flat(mask).astype(jnp.float32),
      layer.gate[...],
      layer.up[...],
      layer.down[...],
    ).reshape(x.shape)
    assert float(jnp.abs(y - want).max()) < 1e-5
    m = np.asarray(mask, bool)
    np.testing.assert_array_equal(np.asarray(y)[~m], 0.0)
    counts = np.bincount(np.asarray(top_i)[m].ravel(), minlength=cfg.num_experts)
    np.testing.assert_array_equal(np.asarray(stats.counts), counts)
    np.testing.assert_allclose(np.asarray(stats.probs), np.asarray(probs)[m].sum(0), rtol=1e-5)
    assert float(stats.tokens) == m.sum()


def test_router_aux_loss_is_x_when_balanced():
  e, xk, n = 8, 2, 16.0
  stats = model_lib.RouterStats(
    counts=jnp.full((e,), n * xk / e), probs=jnp.full((e,), n / e), tokens=jnp.asarray(n)
  )
  assert float(model_lib.router_aux_loss(stats, e)) == pytest.approx(xk)
  skewed = stats._replace(counts=jnp.zeros(e).at[0].set(n * xk), probs=jnp.zeros(e).at[0].set(n))
  assert float(model_lib.router_aux_loss(skewed, e)) == pytest.approx(e * xk)


def test_config_checks_and_sparse_layers():
  with pytest.raises(ValueError, match="num_experts_per_tok"):
    dataclasses.replace(CFG, num_experts_per_tok=9)
  with pytest.raises(ValueError, match="moe_mlp_dim"):
    dataclasses.replace(CFG, moe_mlp_dim=0)
  cfg = dataclasses.replace(CFG, num_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
  assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
  assert cfg.mlp_only_layers == (3,) and hash(cfg)  # lists become hashable tuples
  model = model_lib.abstract_model(CFG)
  assert isinstance(model.layers[0].mlp, model_lib.MoE)
  assert isinstance(model.layers[1].mlp, model_lib.MLP)
  assert model_lib.count_params(model) == CFG.num_params()
  gate = model.layers[0].mlp.gate
  assert gate.get_value().shape == (8, 32, 16)
  assert gate.get_metadata()["logical_axes"] == ("expert", "embed", "mlp")


@pytest.mark.slow
def test_presets_have_the_real_sizes():
  moe = model_lib.ModelConfig.preset("qwen3_30b_a3b")
  assert 30.4e9 < moe.num_params() < 30.6e9  # Qwen3-30B-A3B: 30.5B total ...
  assert 3.3e9 < moe.num_params(active=True) < 3.4e9  # ... 3.3B active
  assert moe.num_moe_layers == 48 and moe.num_experts == 128 and moe.norm_topk_prob
  assert 0.59e9 < model_lib.ModelConfig.preset("qwen3_0_6b").num_params() < 0.61e9
  assert 1.7e9 < model_lib.ModelConfig.preset("qwen3_1_7b").num_params() < 1.75e9
  assert 8.1e9 < model_lib.ModelConfig.preset("qwen3_8b").num_params() < 8.3e9
  # and the abstract model agrees with the formula (no allocation)
  assert model_lib.count_params(model_lib.abstract_model(moe)) == moe.num_params()


def test_tiny_presets_take_the_task_vocabulary():
  c = factory.load_config(str(ROOT / "configs" / "default.py"))
  for name in ("tiny_qwen3", "tiny_qwen3_moe"):
    with c.unlocked():
      c.model.preset = name
    mcfg = factory.run_spec(c, validate=False).model.config(vocab_size=301)
    assert (mcfg.vocab_size, mcfg.embed_dim, mcfg.num_layers) == (301, 128, 4)
    assert mcfg.model_type == name.removeprefix("tiny_") and mcfg.qk_norm
    assert mcfg.max_seq_len == max(c.data.prompt_buckets) + c.data.max_response_len
  assert mcfg.num_experts == 8 and mcfg.router_aux_loss_coef == 0.001


# ----------------------------------------------------------------------------
# The train step's router loss
# ----------------------------------------------------------------------------

LAYOUT = step_lib.GroupLayout(n_rollouts=3, n_demos=1)
PROMPTS, P, R = 4, 8, 8  # 16 rows of 16 tokens


def _host_batch(seed=0):
  rng = np.random.default_rng(seed)
  b, n = PROMPTS, LAYOUT.n_rollouts
  ptok = rng.integers(3, CFG.vocab_size, (b, P)).astype(np.int32)
  plen = rng.integers(2, P + 1, b)
  pmask = (np.arange(P)[None] >= P - plen[:, None]).astype(np.int32)
  rtok = rng.integers(3, CFG.vocab_size, (b * n, R)).astype(np.int32)
  rlen = rng.integers(1, R + 1, b * n)
  rmask = (np.arange(R)[None] < rlen[:, None]).astype(np.int32)
  rlogp = (-rng.random((b * n, R)) * 3 * rmask).astype(np.float32)
  dtok = rng.integers(3, CFG.vocab_size, (b, R)).astype(np.int32)
  dlen = rng.integers(2, R + 1, b)
  dmask = (np.arange(R)[None] < dlen[:, None]).astype(np.int32)
  rewards = rng.integers(0, 2, b * LAYOUT.size).astype(np.float32)
  rewards[LAYOUT.size - 1 :: LAYOUT.size] = 1.0
  arrays = [ptok * pmask, pmask, rtok * rmask, rmask, rlogp, dtok * dmask, dmask]
  arrays, rewards = list(map(jnp.asarray, arrays)), jnp.asarray(rewards)
  adv = step_lib.rollout_advantages(rewards, layout=LAYOUT, cfg=obj.AdvantageConfig())
  return jax.device_get(step_lib.assemble_batch(*arrays, rewards, adv, layout=LAYOUT))


def _step_cfg(minibatches=1, microbatches=1, group=0):
  return step_lib.StepConfig(
    loss=factory.loss_config("srft", None, R),
    minibatches=minibatches,
    microbatches=microbatches,
    logit_chunk=64,
    response_len=R,
    group=group,
  )


def _aux(model, batch, group=0):
  graphdef, params = nnx.split(model)
  fn = jax.jit(
    lambda p, t, m: step_lib.sequence_logprobs(
      graphdef, p, t, m, last=R, group=group, router_aux=True
    )[2]
  )
  return fn(params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))


@pytest.fixture(scope="module")
def moe_model():
  return model_lib.create_model(CFG, seed=0)


@pytest.mark.slow
def test_shared_prompt_counts_each_prompt_once_per_row(moe_model):
  """forward_shared_prefix's statistics equal the full rows' (a prompt counted g times)."""
  batch = _host_batch()
  plain, shared = _aux(moe_model, batch), _aux(moe_model, batch, group=LAYOUT.size)
  assert plain.coef == CFG.router_aux_loss_coef
  assert float(plain.loss) > 0
  assert abs(float(shared.loss) - float(plain.loss)) < 1e-5


@pytest.mark.slow
def test_router_loss_in_the_step_and_its_micro_batches(moe_model):
  """`loss/router_aux` is the mini-batch's aux with one micro-batch, the real-token
  weighted mean of the micro-batches' aux values with two; coef * that is in the loss."""
  batch = _host_batch()
  params = nnx.state(moe_model)
  tx, _ = step_lib.make_optimizer(1e-3, steps=1)
  metrics = {}
  for micro in (1, 2):
    for coef in (0.0, CFG.router_aux_loss_coef):  # the coefficient lives in the graphdef's cfg
      cfg = dataclasses.replace(CFG, router_aux_loss_coef=coef)
      graphdef = nnx.graphdef(model_lib.abstract_model(cfg))
      step = functools.partial(step_lib.train_step, graphdef, tx, _step_cfg(microbatches=micro))
      _, metrics[micro, coef] = jax.jit(step)(step_lib.init_train_state(params, tx), batch)
  whole = float(_aux(moe_model, batch).loss)
  halves = [{k: v[i * 8 : (i + 1) * 8] for k, v in batch.items()} for i in (0, 1)]
  n = [float(h["mask"].sum()) for h in halves]
  mean = sum(ni * float(_aux(moe_model, h).loss) for ni, h in zip(n, halves)) / sum(n)
  got1 = float(metrics[1, 0.01]["loss/router_aux"])
  got2 = float(metrics[2, 0.01]["loss/router_aux"])
  print(
    f"router aux: whole {whole:.6f} / step {got1:.6f}; halves' mean {mean:.6f} / step {got2:.6f}"
  )
  assert got1 == pytest.approx(whole, rel=1e-5)
  assert got2 == pytest.approx(mean, rel=1e-5)
  for micro, aux in ((1, got1), (2, got2)):
    added = float(metrics[micro, 0.01]["loss"]) - float(metrics[micro, 0.0]["loss"])
    assert added == pytest.approx(0.01 * aux, rel=1e-3, abs=1e-7)


@pytest.mark.slow
def test_dense_step_has_no_router_metric():
  cfg = model_lib.ModelConfig.preset("tiny_qwen3", vocab_size=128, embed_dim=32, num_layers=1)
  graphdef, params = nnx.split(model_lib.create_model(cfg))
  tx, _ = step_lib.make_optimizer(1e-3, steps=1)
  _, metrics = jax.jit(lambda s, b: step_lib.train_step(graphdef, tx, _step_cfg(), s, b))(
    step_lib.init_train_state(params, tx), _host_batch()
  )
  assert "loss/router_aux" not in metrics and np.isfinite(float(metrics["loss"]))


# ----------------------------------------------------------------------------
# Sharded equals one device
# ----------------------------------------------------------------------------


@pytest.mark.multidevice
@pytest.mark.slow
def test_expert_layout_is_a_config_edit(tmp_path):
  """`mesh.expert` and `sharding_rules="expert=fsdp"` (config fields, no code)
  reach the model's parameters and the trainer's state (Adam moments too), for
  a random preset and an HF checkpoint (the run's base and `evaluate`'s
  policy), and the rows split over every axis the `batch` rule names."""
  from srft_jax import evaluate
  from srft_jax import hf
  from srft_jax import job
  from srft_jax import trainer as trainer_lib

  c = factory.load_config(str(ROOT / "configs" / "default.py"))
  hf_dir = str(tmp_path / "moe")
  with c.unlocked():
    c.model.preset, c.warmup.steps = "tiny_qwen3_moe", 0
  mcfg = factory.run_spec(c, validate=False).model.config(vocab_size=64)
  hf.save_model(model_lib.create_model(mcfg), hf_dir)

  def gate_spec(model):
    return tuple(model.layers[0].mlp.gate[...].sharding.spec)

  def expert_spec(mesh_shape, rules_text, hf_path=""):
    with c.unlocked():
      c.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **mesh_shape})
      c.sharding_rules = rules_text
      c.model.hf_path = hf_path
    spec = factory.run_spec(c)
    mesh = spec.make_mesh()
    if hf_path:
      model = job.base_model(spec, None, mesh, str(tmp_path), None)
      assert gate_spec(evaluate.load_policy(spec, hf_path, None, mesh)) == gate_spec(model)
    else:
      model = model_lib.create_model(spec.model.config(vocab_size=64), mesh=mesh)
    trainer = trainer_lib.Trainer(model, spec, tokenizer=None, scorer=None, mesh=mesh)
    trainer.enter_stage(trainer.spec.stages[0], fresh_optimizer=True)
    flat = jax.tree_util.tree_flatten_with_path(
      trainer.state_sh, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)
    )[0]
    specs = [
      tuple(sh.spec) for path, sh in flat if "[0]['mlp']['gate']" in jax.tree_util.keystr(path)
    ]
    assert len(specs) == 3 and set(specs) == {gate_spec(model)}, specs  # params, mu, nu alike
    return specs[0], shd.batch_shards(dict(mesh.shape), model.cfg.rules)

  # [experts, embed, mlp]: by default experts over `expert` (size 1 here), embed over fsdp
  assert expert_spec({"data": 2, "fsdp": 4}, "") == ((None, "fsdp", None), 8)
  assert expert_spec({"data": 2, "fsdp": 4}, "expert=fsdp") == (("fsdp", None, None), 8)
  assert expert_spec({"fsdp": 4, "expert": 2}, "") == (("expert", "fsdp", None), 8)
  assert expert_spec({"data": 2, "fsdp": 4}, "batch=data") == ((None, "fsdp", None), 2)
  assert expert_spec({"data": 2, "fsdp": 4}, "expert=fsdp", hf_dir) == (("fsdp", None, None), 8)
  for bad in ("expert=model", "expert=fsdp,expert=data"):
    with pytest.raises(factory.ConfigError, match=r"config\.sharding_rules"):
      expert_spec({"fsdp": 8}, bad)


EXPERTS_OVER_FSDP = shd.with_rules(shd.DEFAULT_RULES, expert="fsdp")
# Rows that cannot split over the expert axis (summed over it, not gathered) are
# covered by test_sharded_grouped_matmul_values_and_gradients.
# FSDP x tensor x an expert axis, and data x FSDP with the experts over FSDP
# (pure FSDP and FSDP x tensor steps of dense models: tests/test_layouts.py).
LAYOUTS = {
  "fsdp2_tensor2_expert2": ({"fsdp": 2, "tensor": 2, "expert": 2}, None),
  "data2_fsdp4_experts_over_fsdp": ({"data": 2, "fsdp": 4}, EXPERTS_OVER_FSDP),
}
STEPS = 2


def _run(mesh, rules=None):
  """STEPS train steps (2 mini-batches x 2 micro-batches, shared prompts) on `mesh`."""
  cfg = CFG if rules is None else dataclasses.replace(CFG, rules=rules)
  tx, _ = step_lib.make_optimizer(1e-2, steps=STEPS, eps=0.1, clip_norm=1.0)
  step_cfg = _step_cfg(minibatches=2, microbatches=2, group=LAYOUT.size)
  host_batch = _host_batch()
  model = model_lib.create_model(cfg, seed=0, mesh=mesh)
  router = model.layers[0].mlp.router
  # A decisive router (HF's init is near uniform): float noise of a different
  # layout must not flip a near-tie top-k choice, which moves the router loss.
  router.set_value(router[...] * 40.0)
  graphdef, params = nnx.split(model)
  state = step_lib.init_train_state(params, tx)
  if mesh is None:
    fn = jax.jit(lambda s, b: step_lib.train_step(graphdef, tx, step_cfg, s, b))
    call, batch = fn, jax.tree.map(jnp.asarray, host_batch)
  else:
    state_sh = step_lib.state_shardings(state, mesh, cfg.rules)
    state = jax.device_put(state, state_sh)
    batch_sh = step_lib.batch_shardings(host_batch, mesh, cfg.rules)
    batch = jax.device_put(host_batch, batch_sh)
    fn = step_lib.jit_train_step(graphdef, tx, step_cfg, state_sh, batch_sh)
    call = lambda s, b: fn(s, b, None)  # noqa: E731
  out = []
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for _ in range(STEPS):
      state, metrics = call(state, batch)
      out.append((float(metrics["loss"]), float(metrics["loss/router_aux"])))
  assert fn._cache_size() == 1  # the second step reused the first's program
  return out, state


@pytest.fixture(scope="module")
def reference():
  return _run(None)


@pytest.mark.multidevice
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.slow
def test_sharded_train_step_equals_one_device(name, reference):
  shape, rules = LAYOUTS[name]
  mesh = shd.make_mesh(shape)
  ref_metrics, ref_state = reference
  metrics, state = _run(mesh, rules)
  print(f"{name}: (loss, router aux) {metrics} vs one device {ref_metrics}")
  np.testing.assert_allclose(metrics, ref_metrics, rtol=2e-5, atol=1e-6)
  assert metrics[0][0] != metrics[1][0]
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # The experts are laid out as the rules say.
  gate = state["params"]["layers"][0]["mlp"]["gate"].get_value()
  want = shd.logical_to_spec(("expert", "embed", "mlp"), rules or CFG.rules, mesh, gate.shape)
  assert gate.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), 3), gate.sharding
  expert_axes = shd.mesh_axes(want[0])
  assert expert_axes == {"fsdp2_tensor2_expert2": ("expert",)}.get(name, ("fsdp",) if rules else ())


def test_rules_place_experts():
  mesh = shd.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
  shape = (8, 32, 16)
  spec = shd.logical_to_spec(("expert", "embed", "mlp"), None, mesh, shape)
  assert tuple(spec) == ("expert", "fsdp", "tensor")
  spec = shd.logical_to_spec(("expert", "embed", "mlp"), EXPERTS_OVER_FSDP, mesh, shape)
  assert tuple(spec) == ("fsdp", None, "tensor")  # fsdp taken by the experts: embed replicated
  rows = shd.logical_to_spec(("batch", None), None, mesh, (16, 4))
  assert tuple(rows) == (("fsdp", "expert"), None)  # rows split over the expert axis too
  assert shd.make_mesh((2, 2, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


@pytest.mark.multidevice
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize(
  "shape,impl",
  [
    ({"expert": 8}, "ragged_dot"),
    ({"tensor": 8}, "ragged_dot"),
    ({"tensor": 2, "expert": 4}, "ragged_dot"),
    ({"fsdp": 4, "expert": 2}, "ragged_dot"),
    ({"tensor": 2, "expert": 4}, "megablox"),
    ({"fsdp": 4, "expert": 2}, "megablox"),
  ],
  ids=lambda v: "_".join(f"{k}{n}" for k, n in v.items()) if isinstance(v, dict) else v,
)
@pytest.mark.slow
def test_sharded_grouped_matmul_values_and_gradients(shape, impl, rows):
  """`moe_ffn` under a mesh: rows that split over the expert axes (gathered and
  reduce-scattered, rows=8) and rows that cannot (summed, rows=1)."""
  x, idx, w, valid, gate, up, down = _grouped_inputs(m=40, e=8, unused=(5,))
  split = lambda a: a.reshape((rows, -1) + a.shape[1:])  # noqa: E731
  x, idx, w, valid = map(split, (x, idx, w, valid))
  cot = jax.random.normal(jax.random.key(0), x.shape)

  def loss(x, w, gate, up, down):
    return jnp.sum(model_lib.moe_ffn(x, idx, w, valid, gate, up, down, impl=impl) * cot)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
  want = grad(x, w, gate, up, down)
  with jax.set_mesh(shd.make_mesh(shape)):
    got = grad(x, w, gate, up, down)
  for name, a, b in zip(
    ("y", "x", "w", "gate", "up", "down"), jax.tree.leaves(got), jax.tree.leaves(want)
  ):
    assert float(jnp.abs(a - b).max()) < 1e-5, name
