"""The scanned layer layout (ModelConfig.scan_layers) against the loop layout.

Each test builds a loop model, moves its very parameters into the scanned
layout (`model.with_layer_layout`) and asserts that the two agree: logits,
gradients, a train step, the shared-prefix forward, sampling, HF and PEFT
exports (byte for byte), LoRA; and that an Orbax checkpoint of one layout is
refused by the other.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from srft_jax import checkpoint as ckpt_lib
from srft_jax import hf
from srft_jax import lora as lora_lib
from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import peft
from srft_jax import sampler as sampler_lib
from srft_jax import sharding as shd
from srft_jax import step as step_lib

import helpers

TOL = 1e-6
SHAPE = dict(
  vocab_size=64,
  embed_dim=32,
  mlp_dim=48,
  num_layers=4,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  max_seq_len=64,
)
# kind -> (preset, fields): the MoE model mixes dense and sparse layers: runs
# [0], [1] (mlp_only) and [2, 3], each scanned on its own.
KINDS = {
  "qwen2": ("tiny", {}),
  "qwen3": ("tiny_qwen3", {}),
  "qwen3_moe": ("tiny_qwen3_moe", dict(moe_mlp_dim=24, mlp_only_layers=(1,))),
}


def _cfg(kind, **fields):
  preset, own = KINDS[kind]
  return model_lib.ModelConfig.preset(preset, **{**SHAPE, **own, **fields})


def _pair(kind, **fields):
  """(loop model, the same parameters in the scanned layout)."""
  loop = model_lib.create_model(_cfg(kind, **fields), seed=0)
  scanned = model_lib.with_layer_layout(loop, True)
  assert scanned.cfg.scan_layers and not hasattr(scanned, "layers")
  assert len(scanned.layer_stacks) == len(scanned.cfg.layer_runs)
  return loop, scanned


def _as_loop(tree_of_scanned, scanned_model):
  """A state of the scanned model (params, grads) in the loop layout."""
  graphdef = nnx.graphdef(scanned_model)
  return nnx.state(model_lib.with_layer_layout(nnx.merge(graphdef, tree_of_scanned), False))


def _assert_trees_close(a, b, atol=TOL, rtol=0.0):
  fa, fb = dict(nnx.to_flat_state(a)), dict(nnx.to_flat_state(b))
  assert set(fa) == set(fb)
  for p in fa:
    x, y = np.asarray(fa[p].get_value()), np.asarray(fb[p].get_value())
    np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=str(p))


def _inputs(b=3, t=12, seed=0):
  rs = np.random.RandomState(seed)
  tokens = rs.randint(0, SHAPE["vocab_size"], (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[1, :3] = 0  # left padded
  mask[2, -4:] = 0  # right padded (the trainer's rows)
  return jnp.asarray(tokens), jnp.asarray(mask)


_forward = nnx.jit(lambda m, tok, mask: m(tok, model_lib.positions_from_mask(mask), mask))


# ----------------------------------------------------------------------------
# Layout: runs, stacks, init, cache
# ----------------------------------------------------------------------------


def test_layer_runs_stack_shapes_axes_and_init():
  cfg = _cfg("qwen3_moe", num_layers=6, mlp_only_layers=(1, 4))
  assert cfg.layer_runs == ((0, 1), (1, 2), (2, 4), (4, 5), (5, 6))
  assert _cfg("qwen2").layer_runs == ((0, 4),)
  m = model_lib.create_model(_cfg("qwen3_moe", scan_layers=True), seed=0)
  dense, moe = m.layer_stacks[1], m.layer_stacks[2]
  assert isinstance(moe.mlp, model_lib.MoE) and isinstance(dense.mlp, model_lib.MLP)
  q = moe.attn.q
  assert q.get_value().shape == (2, 32, 4, 16)
  assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
  assert moe.mlp.gate.get_value().shape == (2, 8, 32, 24)
  assert not np.allclose(q[...][0], q[...][1])  # each layer its own init
  assert np.allclose(moe.attn_norm.scale[...], 1.0)
  assert model_lib.layer_block(m, 3) == (moe, 1)
  mesh = shd.make_mesh({"fsdp": 8})
  sh = shd.state_shardings(nnx.state(model_lib.abstract_model(m.cfg)), mesh, m.cfg.rules)
  spec = sh["layer_stacks"][2]["attn"]["q"].get_value().spec
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)  # layers: unsharded


def test_stacked_cache_layout():
  cfg = _cfg("qwen2", scan_layers=True)
  cache = model_lib.init_cache(cfg, 2, 10)
  assert cache["k"].shape == (4, 2, 2, 16, 10) and cache["v"].shape == (4, 2, 2, 10, 16)
  names = model_lib.cache_logical_axes(cfg)
  assert names["k"] == ("layers", "batch", "kv_heads", "head_dim", "cache_length")
  k = jnp.arange(4 * 2).reshape(4, 2, 1, 1, 1) * jnp.ones((4, 2, 2, 16, 10))
  rep = model_lib.repeat_cache_rows(dict(cache, k=k, v=cache["v"]), 3)
  assert rep["k"].shape == (4, 6, 2, 16, 10) and rep["mask"].shape == (6, 10)
  np.testing.assert_array_equal(rep["k"][1, :, 0, 0, 0], [2, 2, 2, 3, 3, 3])


# ----------------------------------------------------------------------------
# Forward, gradients, the train step
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kind, remat, attention",
  [  # every kind, remat and CPU attention at least once (each case compiles two models)
    ("qwen2", "full", "chunked"),
    ("qwen3", "dots", "cudnn"),
    ("qwen3_moe", "none", "xla"),
  ],
)
def test_logits_match_loop(kind, remat, attention):
  loop, scanned = _pair(kind, remat=remat, attention=attention, attention_chunk=4)
  tokens, mask = _inputs()
  a, b = _forward(loop, tokens, mask), _forward(scanned, tokens, mask)
  np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), atol=TOL, rtol=0)
  assert (a.router_stats is None) == (b.router_stats is None) == (kind != "qwen3_moe")
  if a.router_stats is not None:  # summed over the MoE layers in order, as the loop sums
    for x, y in zip(a.router_stats, b.router_stats):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=TOL, atol=TOL)


def _loss(model, tokens, mask, key=None):
  out = model(tokens, model_lib.positions_from_mask(mask), mask, lora_dropout_key=key)
  w = jnp.sin(jnp.arange(out.logits.size, dtype=jnp.float32)).reshape(out.logits.shape)
  loss = jnp.sum(out.logits * w * mask[..., None]) / 100.0
  aux = model_lib.router_aux(model.cfg, out.router_stats)
  return loss if aux is None else loss + aux.loss


@pytest.mark.parametrize(
  "kind, remat",
  [("qwen3_moe", "dots")],
)
def test_gradients_match_loop(kind, remat):
  loop, scanned = _pair(kind, remat=remat)
  tokens, mask = _inputs()
  grad = nnx.jit(nnx.grad(_loss))
  g_loop, g_scan = grad(loop, tokens, mask), grad(scanned, tokens, mask)
  _assert_trees_close(_as_loop(g_scan, scanned), g_loop, atol=1e-5, rtol=1e-5)


def _tiny_batch(seed, b=2, n=3, p=6, r=8, vocab=SHAPE["vocab_size"]):
  """An assembled [b*(n+1), p+r] batch: random rollouts, rewards and a demo row."""
  rs = np.random.RandomState(seed)
  ptok = rs.randint(1, vocab, (b, p)).astype(np.int32)
  pmask = np.ones((b, p), np.int32)
  pmask[0, :2] = 0
  rmask = (np.arange(r)[None] < rs.randint(3, r + 1, size=b * n)[:, None]).astype(np.int32)
  rtok = rs.randint(1, vocab, (b * n, r)).astype(np.int32) * rmask
  rlogp = -rs.rand(b * n, r).astype(np.float32) * rmask
  dmask = (np.arange(r)[None] < r - 2).astype(np.int32).repeat(b, 0)
  dtok = rs.randint(1, vocab, (b, r)).astype(np.int32) * dmask
  rewards = rs.randint(0, 2, (b * (n + 1),)).astype(np.float32)
  layout = step_lib.GroupLayout(n, 1)
  adv = step_lib.rollout_advantages(jnp.asarray(rewards), layout=layout, cfg=obj.AdvantageConfig())
  arrays = (ptok, pmask, rtok, rmask, rlogp, dtok, dmask)
  return step_lib.assemble_batch(*arrays, jnp.asarray(rewards), adv, layout=layout)


@pytest.mark.parametrize("kind, shared_prefix", [("qwen2", True)])
def test_train_step_matches_loop(kind, shared_prefix):
  """One `step.train_step` (two optimizer updates; with shared_prefix, the
  prompt once a group through forward_shared_prefix, forward and backward)
  from equal params."""
  loop, scanned = _pair(kind, remat="full")
  tx, _ = step_lib.make_optimizer(1e-3, steps=10)
  extra = dict(response_len=8, group=4) if shared_prefix else {}
  cfg = step_lib.StepConfig(loss=obj.LossConfig.preset("srft"), minibatches=2, **extra)
  batch = _tiny_batch(0)
  out = {}
  for name, model in (("loop", loop), ("scanned", scanned)):
    graphdef, params = nnx.split(model)
    fn = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, cfg))
    state, metrics = fn(step_lib.init_train_state(params, tx), batch)
    out[name] = (state, metrics)
  (s_loop, m_loop), (s_scan, m_scan) = out["loop"], out["scanned"]
  np.testing.assert_allclose(float(m_scan["loss"]), float(m_loop["loss"]), rtol=1e-5, atol=TOL)
  moved = jax.tree.map(jnp.subtract, s_loop["params"], nnx.state(loop))
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(moved)) > 1e-4  # it stepped
  _assert_trees_close(_as_loop(s_scan["params"], scanned), s_loop["params"], atol=1e-5)


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kind, temperature, n, fields",
  [
    ("qwen2", 0.0, 1, {}),
    ("qwen3_moe", 1.0, 2, {}),  # the kernel's interpreter on CPU
  ],
)
def test_sampling_matches_loop_token_for_token(kind, temperature, n, fields):
  loop, scanned = _pair(kind, **fields)
  tokens = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], np.int32)
  mask = np.array([[0, 0, 1, 1, 1], [1] * 5], np.int32)
  cfg = sampler_lib.SamplingConfig(
    max_new_tokens=8, temperature=temperature, n=n, prompt_buckets=(8,), top_k=20
  )
  a = sampler_lib.sample(loop, tokens, mask, jax.random.key(7), cfg)
  b = sampler_lib.sample(scanned, tokens, mask, jax.random.key(7), cfg)
  np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
  np.testing.assert_array_equal(np.asarray(b.mask), np.asarray(a.mask))
  np.testing.assert_allclose(np.asarray(b.logprobs), np.asarray(a.logprobs), atol=1e-5)
  assert len(set(map(tuple, np.asarray(a.tokens).tolist()))) > 1  # rows differ: not degenerate


def test_stacked_decode_weights_give_the_plain_logits():
  loop, scanned = _pair("qwen3_moe")
  w = nnx.jit(lambda m: m.decode_weights())(scanned)
  assert [x["attn"]["qkv"].shape[0] for x in w["layers"]] == [1, 1, 2]
  tokens, mask = _inputs(t=6)
  cache = model_lib.init_cache(scanned.cfg, 3, 8)
  run = nnx.jit(
    lambda m, c, w: m(tokens, model_lib.positions_from_mask(mask), mask, cache=c, weights=w)
  )
  fused = run(scanned, cache, w)
  plain = run(loop, model_lib.init_cache(loop.cfg, 3, 8), None)
  np.testing.assert_allclose(np.asarray(fused.logits), np.asarray(plain.logits), atol=1e-5)
  for i in range(4):  # the stacked cache holds the loop's per-layer keys and values
    np.testing.assert_allclose(
      np.asarray(fused.cache["k"][i]), np.asarray(plain.cache["k"][i]), atol=1e-5
    )


# ----------------------------------------------------------------------------
# HF import / export
# ----------------------------------------------------------------------------


def _files(path):
  return {
    name: open(os.path.join(path, name), "rb").read()
    for name in sorted(os.listdir(path))
    if name.endswith((".safetensors", ".json"))
  }


@pytest.mark.parametrize("kind", ["qwen2"])
def test_hf_load_and_export_scanned(kind, hf_checkpoints, tmp_path):
  path, ref = hf_checkpoints[kind]
  scanned = hf.load_model(path, scan_layers=True)
  loop = hf.load_model(path)
  assert scanned.cfg.scan_layers and scanned.layer_stacks[0].attn.q.get_value().shape[0] == 2
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, helpers.HF_VOCAB, (2, 10)), jnp.int32)
  ours = np.asarray(_forward(scanned, tokens, jnp.ones_like(tokens)).logits)
  with torch.no_grad():
    theirs = ref(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  hf.save_model(scanned, str(tmp_path / "scanned"), max_shard_bytes=40_000)
  hf.save_model(loop, str(tmp_path / "loop"), max_shard_bytes=40_000)
  a, b = _files(tmp_path / "loop"), _files(tmp_path / "scanned")
  assert len([n for n in a if n.endswith(".safetensors")]) > 1  # sharded export, index file
  assert a == b


def test_moe_export_is_the_loops_and_loads_back_stacked(tmp_path):
  loop, scanned = _pair("qwen3_moe")
  hf.save_model(loop, str(tmp_path / "loop"))
  hf.save_model(scanned, str(tmp_path / "scanned"))
  assert _files(tmp_path / "loop") == _files(tmp_path / "scanned")
  back = hf.load_model(str(tmp_path / "scanned"), scan_layers=True)
  _assert_trees_close(nnx.state(back), nnx.state(scanned), atol=0.0)


def test_sharded_scanned_load(hf_checkpoints):
  path, _ = hf_checkpoints["qwen2"]
  mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
  model = hf.load_model(path, mesh=mesh, scan_layers=True)
  one = hf.load_model(path, scan_layers=True)
  q = model.layer_stacks[0].attn.q.get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 8, 2, 8)
  _assert_trees_close(nnx.state(model), nnx.state(one), atol=0.0)


# ----------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_adapters_logits_dropout_and_exports(tmp_path):
  base = model_lib.create_model(_cfg("qwen2"), seed=0)
  loop, scanned = nnx.clone(base), model_lib.with_layer_layout(base, True)
  lcfg = lora_lib.LoRAConfig(rank=4, alpha=8.0, dropout=0.25)
  values = {}  # random A and B (B is zero at init), the same on both layouts
  for s in lora_lib.adapter_specs(loop, lcfg):
    ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(s.layer), len(values)))
    values[(s.layer, s.target)] = tuple(
      np.asarray(0.1 * jax.random.normal(k, shape))
      for k, shape in ((ka, s.a_shape), (kb, s.b_shape))
    )
  assert lora_lib.adapter_specs(scanned, lcfg) == lora_lib.adapter_specs(loop, lcfg)
  lora_lib.attach(loop, lcfg, values=values)
  lora_lib.attach(scanned, lcfg, values=values)
  stack = scanned.layer_stacks[0].attn  # layers 0-3: adapters stacked like q
  assert stack.q_lora_a.get_value().shape == (4, 32, 4)
  assert stack.q_lora_a.get_metadata()["logical_axes"] == ("layers", "embed", None)
  assert len(lora_lib.adapter_values(scanned)) == len(values) == 4 * 7  # 7 targets a layer
  assert lora_lib.config_of(scanned) == lora_lib.config_of(loop)
  tokens, mask = _inputs()
  for key in (None, jax.random.key(5)):  # plain, and the training forward's dropout
    fwd = nnx.jit(
      lambda m, key=key: (
        m(tokens, model_lib.positions_from_mask(mask), mask, lora_dropout_key=key).logits
      )
    )
    np.testing.assert_allclose(np.asarray(fwd(scanned)), np.asarray(fwd(loop)), atol=TOL)
  grad = nnx.jit(nnx.grad(_loss, argnums=nnx.DiffState(0, lora_lib.ADAPTER)))
  key = jax.random.key(6)
  g_loop, g_scan = grad(loop, tokens, mask, key), grad(scanned, tokens, mask, key)
  ga, gb = _per_layer_adapters(scanned, g_scan), _per_layer_adapters(loop, g_loop)
  assert set(ga) == set(gb) == set(values)
  for k in gb:
    for x, y in zip(ga[k], gb[k]):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
  peft.save_peft_adapter(loop, str(tmp_path / "peft_loop"))
  peft.save_peft_adapter(scanned, str(tmp_path / "peft_scanned"))
  assert _files(tmp_path / "peft_loop") == _files(tmp_path / "peft_scanned")
  hf.save_model(lora_lib.merged(loop), str(tmp_path / "merged_loop"))
  hf.save_model(lora_lib.merged(scanned), str(tmp_path / "merged_scanned"))
  assert _files(tmp_path / "merged_loop") == _files(tmp_path / "merged_scanned")
  fresh = model_lib.with_layer_layout(model_lib.create_model(_cfg("qwen2"), seed=0), True)
  back = peft.load_peft_adapter(str(tmp_path / "peft_loop"), fresh)  # onto a scanned base
  np.testing.assert_allclose(
    np.asarray(_forward(back, tokens, mask).logits),
    np.asarray(_forward(loop, tokens, mask).logits),
    atol=TOL,
  )


def _per_layer_adapters(model, grads):
  """{(layer, target): (dA, dB)} of an adapters-only gradient state."""
  with_grads = nnx.merge(nnx.graphdef(model), grads, nnx.state(model, lora_lib.BASE))
  return lora_lib.adapter_values(with_grads)


# ----------------------------------------------------------------------------
# Orbax: one layout's checkpoint is refused by the other
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("saved_scan", [True])
def test_checkpoint_of_the_other_layout_is_refused(saved_scan, tmp_path):
  loop, scanned = _pair("qwen2")
  tx, _ = step_lib.make_optimizer(1e-3, steps=10)
  saved, other = (scanned, loop) if saved_scan else (loop, scanned)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", async_save=False)
  ckpt.save(3, step_lib.init_train_state(nnx.state(saved, nnx.Param), tx), {}, {"step": 3})
  ckpt.wait()
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  target = step_lib.abstract_train_state(nnx.state(other, nnx.Param), tx, mesh)
  with pytest.raises(ckpt_lib.LayerLayoutError, match=r"model\.scan_layers"):
    ckpt.restore(target, delete_unreadable=True)
  assert ckpt.all_steps() == [3]  # refused, not deleted as unreadable
  same = step_lib.abstract_train_state(nnx.state(saved, nnx.Param), tx, mesh)
  step, state, _, _ = ckpt.restore(same)
  assert step == 3
  _assert_trees_close(state["params"], nnx.state(saved, nnx.Param), atol=0.0)
  ckpt.close()
