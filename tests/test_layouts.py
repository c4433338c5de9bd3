"""The train step under several mesh layouts equals the one-device step.

Same path as the Trainer: model.create_model on the mesh, step.state_shardings,
sharding.batch_sharding for the batch, step.jit_train_step (state donated), called
under jax.set_mesh. Layouts on the 8 forced CPU devices: pure data, pure FSDP,
FSDP x tensor and data x FSDP x tensor.
"""

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

LAYOUTS = {
  "data8": {"data": 8},
  "fsdp8": {"fsdp": 8},
  "fsdp2_tensor4": {"fsdp": 2, "tensor": 4},
  "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}
# GQA with heads, kv heads, mlp and vocab divisible by 4 and embed by 8, so every
# rule of every layout really splits something.
CFG = model_lib.ModelConfig(
  vocab_size=256,
  embed_dim=64,
  mlp_dim=128,
  num_layers=1,
  num_heads=8,
  num_kv_heads=4,
  head_dim=16,
  max_seq_len=64,
)
LAYOUT = step_lib.GroupLayout(n_rollouts=3, n_demos=1)
PROMPTS, P, R = 4, 8, 8  # 16 rows of 16 tokens
STEPS = 2


def _host_batch(seed=0):
  """A hand-made step: left-padded prompts, right-padded rollouts and demos, mixed rewards."""
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
  rewards[LAYOUT.size - 1 :: LAYOUT.size] = 1.0  # demos are correct
  return ptok * pmask, pmask, rtok * rmask, rmask, rlogp, dtok * dmask, dmask, rewards


def _setup():
  lc = factory.loss_config("srft", None, R)
  # eps=0.1: Adam's first step is ~lr*sign(g); a large eps keeps the update
  # smooth in g, so float reduction-order noise cannot flip a sign.
  tx, _ = step_lib.make_optimizer(1e-2, steps=STEPS, eps=0.1, clip_norm=1.0)
  step_cfg = step_lib.StepConfig(loss=lc, minibatches=2, microbatches=2, logit_chunk=64)
  *arrays, rewards = map(jnp.asarray, _host_batch())
  adv = step_lib.rollout_advantages(rewards, layout=LAYOUT, cfg=obj.AdvantageConfig())
  batch = step_lib.assemble_batch(*arrays, rewards, adv, layout=LAYOUT)
  return tx, step_cfg, jax.device_get(batch)


def _run(mesh):
  """STEPS train steps on `mesh` (None: one device). Returns (losses, params, state)."""
  tx, step_cfg, host_batch = _setup()
  model = model_lib.create_model(CFG, seed=0, mesh=mesh)
  graphdef, params = nnx.split(model)
  state = step_lib.init_train_state(params, tx)
  if mesh is None:
    fn = jax.jit(lambda s, b: step_lib.train_step(graphdef, tx, step_cfg, s, b))
    batch = jax.tree.map(jnp.asarray, host_batch)
    losses = []
    for _ in range(STEPS):
      state, metrics = fn(state, batch)
      losses.append(float(metrics["loss"]))
    return losses, state
  state_sh = step_lib.state_shardings(state, mesh, CFG.rules)
  state = jax.device_put(state, state_sh)
  batch_sh = {
    k: shd.batch_sharding(mesh, v.ndim, CFG.rules, v.shape) for k, v in host_batch.items()
  }
  batch = jax.device_put(host_batch, batch_sh)
  fn = step_lib.jit_train_step(graphdef, tx, step_cfg, state_sh, batch_sh)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(STEPS):
      state, metrics = fn(state, batch, None)
      losses.append(float(metrics["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def reference():
  return _run(None)


def _expected_spec(var, mesh):
  value = var.get_value()
  names = var.get_metadata()["logical_axes"]
  return shd.logical_to_spec(names, CFG.rules, mesh, value.shape)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.slow
def test_layout_matches_one_device(name, reference):
  assert jax.device_count() == 8
  mesh = shd.make_mesh(LAYOUTS[name])
  ref_losses, ref_state = reference
  losses, state = _run(mesh)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=1e-6)
  assert losses[0] != losses[1]  # the first update changed the policy
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert int(state["step"]) == STEPS

  # Params (and Adam moments) are laid out as the rules say.
  split = 0
  for path, var in nnx.to_flat_state(state["params"]):
    arr = var.get_value()
    want = jax.sharding.NamedSharding(mesh, _expected_spec(var, mesh))
    assert arr.sharding.is_equivalent_to(want, arr.ndim), (path, arr.sharding.spec, want.spec)
    shard = arr.addressable_shards[0].data.shape
    split += shard != arr.shape
  assert split > 0 or set(LAYOUTS[name]) == {"data"}, "nothing was sharded"
  adam = state["opt_state"][1][0]
  for moments in (adam.mu, adam.nu):
    for m, p in zip(jax.tree.leaves(moments), jax.tree.leaves(state["params"])):
      assert m.shape == p.shape and m.sharding.is_equivalent_to(p.sharding, p.ndim)


def test_rules_split_the_expected_axes():
  """Spot checks of what each layout does to a [D, F] MLP weight and [V, D] embedding."""
  cases = {
    "data8": ((None, None), (None, None)),
    "fsdp8": (("fsdp", None), (None, "fsdp")),
    "fsdp2_tensor4": (("fsdp", "tensor"), ("tensor", "fsdp")),
    "data2_fsdp2_tensor2": (("fsdp", "tensor"), ("tensor", "fsdp")),
  }
  for name, (mlp, embed) in cases.items():
    mesh = shd.make_mesh(LAYOUTS[name])
    got_mlp = shd.logical_to_spec(("embed", "mlp"), CFG.rules, mesh, (CFG.embed_dim, CFG.mlp_dim))
    got_emb = shd.logical_to_spec(
      ("vocab", "embed"), CFG.rules, mesh, (CFG.vocab_size, CFG.embed_dim)
    )
    assert tuple(got_mlp) == mlp, (name, got_mlp)
    assert tuple(got_emb) == embed, (name, got_emb)
    rows = shd.batch_sharding(mesh, 2, CFG.rules, (PROMPTS * LAYOUT.size, P + R)).spec[0]
    data_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    assert (rows if isinstance(rows, tuple) else (rows,)) == data_axes, (name, rows)


@pytest.mark.parametrize(
  "shape,message",
  [
    ({"data": 0}, "must be positive"),
    ({"data": -2, "fsdp": 4}, "must be positive"),
    ({"data": -1, "fsdp": -1}, "at most one axis"),
    ({"data": 3}, "need 3 devices"),
    ({"pipeline": 2}, "unknown axis"),
  ],
)
def test_bad_mesh_shapes_name_the_problem(shape, message):
  with pytest.raises(ValueError, match=message):
    shd.make_mesh(shape)
