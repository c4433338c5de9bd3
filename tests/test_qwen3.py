"""Qwen3 and Qwen3-MoE against transformers (torch CPU, float32, eager attention):
logits, the router's load-balancing loss, HF export / import round trips, greedy
decoding through the sampler (its KV cache and fused decode weights) against
`generate`, and sharded loading and sampling on the forced 8-device mesh.

Checkpoints are tiny random `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` models
written by `save_pretrained` once per session (weights std 0.1, norm scales
near 1); head_dim 12 with 4 heads of a 32-wide model (Qwen3's head_dim is its
own); expert counts 4, 6 and 8, top-k 1 and 2, tied and untied embeddings,
dense layers among the sparse ones (mlp_only_layers, decoder_sparse_step).
"""

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from srft_jax import hf
from srft_jax import model as model_lib
from srft_jax import sampler as smp
from srft_jax import sharding as shd

import helpers

TOL = 1e-4
VOCAB = 96
COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=12,
  max_position_embeddings=128,
  rms_norm_eps=1e-6,
)
KINDS = {
  "qwen3_tied": ("qwen3", dict(tie_word_embeddings=True)),
  "qwen3_untied": ("qwen3", dict(tie_word_embeddings=False)),
  "moe_e4_top2_norm": (
    "qwen3_moe",
    dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
  ),
  "moe_e8_top1_tied_dense1": (
    "qwen3_moe",
    dict(num_experts=8, num_experts_per_tok=1, mlp_only_layers=[1], tie_word_embeddings=True),
  ),
  "moe_e6_top2_step2": (
    "qwen3_moe",
    dict(num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True),
  ),
}
MOE_KINDS = [k for k, (t, _) in KINDS.items() if t == "qwen3_moe"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
  """kind -> (directory, torch model)."""
  root = tmp_path_factory.mktemp("qwen3")
  out = {}
  for seed, (kind, (model_type, kw)) in enumerate(KINDS.items()):
    if model_type == "qwen3":
      cfg = transformers.Qwen3Config(**COMMON, **kw)
    else:
      cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=16, **COMMON, **kw)
    path = str(root / kind)
    out[kind] = (path, helpers.save_tiny_hf(cfg, path, seed=100 + seed))
  return out


@pytest.fixture(scope="session")
def loaded(checkpoints):
  return {kind: hf.load_model(path) for kind, (path, _) in checkpoints.items()}


# Rows 0-1 unpadded, rows 2-3 left padded: one shape, so each model compiles once.
TOKENS = np.random.RandomState(1).randint(0, VOCAB, (4, 24)).astype(np.int32)
MASK = np.ones((4, 24), np.int32)
MASK[2, :5] = 0
MASK[3, :13] = 0


def _hf(ref, tokens, mask):
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return ref(
      torch.tensor(tokens, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      position_ids=torch.tensor(positions, dtype=torch.long),
      output_router_logits=isinstance(ref, transformers.Qwen3MoeForCausalLM),
    )


@nnx.jit
def _forward(model, tokens, mask):
  return model(tokens, model_lib.positions_from_mask(mask), mask)


def _params(model):
  return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.slow
def test_logits_match_transformers(kind, checkpoints, loaded):
  _, ref = checkpoints[kind]
  want = _hf(ref, TOKENS, MASK).logits.numpy()
  out = _forward(loaded[kind], TOKENS, MASK)
  got, stats = out.logits, out.router_stats
  real = MASK.astype(bool)
  err = np.abs(np.asarray(got) - want)[real].max()
  print(f"{kind}: max |dlogits| on real tokens = {err:.2e} (max |logit| {np.abs(want).max():.2f})")
  assert err <= TOL
  assert (stats is None) == (kind not in MOE_KINDS)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_router_aux_loss_matches_transformers(kind, checkpoints, loaded):
  """HF's `load_balancing_loss_func` over every sparse layer, padding masked out."""
  _, ref = checkpoints[kind]
  want = float(_hf(ref, TOKENS, MASK).aux_loss)
  stats = _forward(loaded[kind], TOKENS, MASK).router_stats
  got = float(model_lib.router_aux_loss(stats, loaded[kind].cfg.num_experts))
  cfg = loaded[kind].cfg
  assert float(stats.tokens) == MASK.sum() * cfg.num_moe_layers
  print(f"{kind}: router aux {got:.7f} vs transformers {want:.7f}")
  assert abs(got - want) <= 1e-5


def test_configs_read_and_write(checkpoints, loaded):
  for kind, model in loaded.items():
    cfg, ref = model.cfg, checkpoints[kind][1]
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.head_dim == 12
    assert model_lib.count_params(model) == cfg.num_params() == ref.num_parameters()
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  moe = loaded["moe_e8_top1_tied_dense1"].cfg
  assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_mlp_dim) == (8, 1, 16)
  assert moe.mlp_only_layers == (1,) and moe.tie_embeddings and not moe.norm_topk_prob
  assert moe.router_aux_loss_coef == 0.001
  step2 = loaded["moe_e6_top2_step2"].cfg
  assert [step2.is_moe_layer(i) for i in range(3)] == [False, True, False]
  for name in ("qwen3_0_6b", "qwen3_1_7b", "qwen3_8b", "qwen3_30b_a3b"):
    preset = model_lib.ModelConfig.preset(name)
    assert hf.config_from_hf(hf.config_to_hf(preset)) == preset, name


def test_checkpoint_errors_name_the_problem(checkpoints, tmp_path):
  path, _ = checkpoints["moe_e4_top2_norm"]
  bad = hf.read_config(path)
  bad["attention_bias"] = True
  with pytest.raises(hf.CheckpointError, match="attention_bias"):
    hf.config_from_hf(bad)
  # an expert's tensor missing from the files
  from safetensors.numpy import load_file
  from safetensors.numpy import save_file

  tensors = load_file(os.path.join(path, "model.safetensors"))
  del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
  os.makedirs(tmp_path / "bad")
  save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
  with open(os.path.join(path, "config.json")) as src:
    (tmp_path / "bad" / "config.json").write_text(src.read())
  with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model.layers.2.mlp.experts.3"):
    hf.load_model(str(tmp_path / "bad"))


@pytest.mark.parametrize(
  "kind", ["qwen3_tied", "qwen3_untied", "moe_e4_top2_norm", "moe_e8_top1_tied_dense1"]
)
def test_hf_round_trips_are_bitwise(kind, checkpoints, loaded, tmp_path):
  """ours -> HF files -> transformers: every tensor equal to the source's; and
  ours -> HF files -> ours: every parameter bit-identical (sharded files too)."""
  _, ref = checkpoints[kind]
  files = hf.save_model(loaded[kind], str(tmp_path), max_shard_bytes=40_000)
  assert len(files) > 1 and os.path.exists(tmp_path / hf.INDEX_FILE)
  back = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), attn_implementation="eager"
  )
  assert type(back) is type(ref)
  ref_state = ref.state_dict()
  assert back.state_dict().keys() == ref_state.keys()
  for name, value in back.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), ref_state[name].numpy(), err_msg=name)
  again = hf.load_model(str(tmp_path))
  a, b = _params(loaded[kind]), _params(again)
  assert a.keys() == b.keys()
  for key in a:
    x, y = np.asarray(a[key].get_value()), np.asarray(b[key].get_value())
    assert x.dtype == y.dtype and np.array_equal(x.view(np.uint32), y.view(np.uint32)), key


# ----------------------------------------------------------------------------
# Decoding through the sampler
# ----------------------------------------------------------------------------

BUCKETS = (8, 16)


def _prompts(seed, b=3, t=7):
  rs = np.random.RandomState(seed)
  lens = rs.randint(2, t + 1, size=b)
  lens[0] = t
  toks, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for i, n in enumerate(lens):
    toks[i, t - n :] = rs.randint(1, VOCAB, size=n)
    mask[i, t - n :] = 1
  return toks, mask


def _generate(ref, toks, mask, r):
  with torch.no_grad():
    out = ref.generate(
      input_ids=torch.tensor(toks, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      max_new_tokens=r,
      min_new_tokens=r,
      do_sample=False,
      pad_token_id=0,
      eos_token_id=None,
      top_k=None,
      top_p=None,
      temperature=None,
    )
  return out[:, toks.shape[1] :].numpy()


@pytest.mark.parametrize("kind", ["qwen3_untied", "moe_e4_top2_norm", "moe_e8_top1_tied_dense1"])
@pytest.mark.slow
def test_greedy_decode_equals_transformers_generate(kind, checkpoints, loaded):
  """Prefill + KV-cache decode from the fused decode weights (the sampler's
  default) and from the params both give `generate`'s tokens, token for token."""
  _, ref = checkpoints[kind]
  toks, mask = _prompts(seed=4)
  r = 12
  want = _generate(ref, toks, mask, r)
  for fused in (True, False):
    cfg = smp.SamplingConfig(
      max_new_tokens=r, temperature=0.0, prompt_buckets=BUCKETS, fused_weights=fused
    )
    out = smp.sample(loaded[kind], toks, mask, jax.random.key(0), cfg)
    np.testing.assert_array_equal(np.asarray(out.tokens), want, err_msg=f"fused={fused}")


@pytest.mark.slow
def test_moe_sampler_does_not_recompile(loaded):
  model = loaded["moe_e4_top2_norm"]
  cfg = smp.SamplingConfig(max_new_tokens=5, temperature=1.0, prompt_buckets=BUCKETS)
  toks, mask = _prompts(seed=5, b=2, t=6)
  smp.sample(model, toks, mask, jax.random.key(0), cfg)
  traces, compiled = smp.TRACE_COUNT["sample_tokens"], smp.sample_jit._cache_size()
  toks2, mask2 = _prompts(seed=6, b=2, t=4)  # other prompts, same bucket
  smp.sample(model, toks2, mask2, jax.random.key(1), cfg).tokens.block_until_ready()
  assert smp.TRACE_COUNT["sample_tokens"] == traces
  assert smp.sample_jit._cache_size() == compiled


@pytest.mark.multidevice
@pytest.mark.slow
def test_sharded_load_and_greedy_equal_one_device(checkpoints, loaded):
  """Loaded straight into fsdp x tensor x expert shards: the same logits, and
  greedy sampling (rows over the data axes, experts over `expert`) the same tokens."""
  path, _ = checkpoints["moe_e4_top2_norm"]
  mesh = shd.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
  sharded = hf.load_model(path, mesh=mesh)
  gate = sharded.layers[0].mlp.gate[...]
  assert gate.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
  assert gate.addressable_shards[0].data.shape == (2, 16, 8)
  with jax.set_mesh(mesh):
    got = np.asarray(_forward(sharded, TOKENS, MASK).logits)
  want = np.asarray(_forward(loaded["moe_e4_top2_norm"], TOKENS, MASK).logits)
  assert np.abs(got - want)[MASK > 0].max() <= 1e-5
  toks, mask = _prompts(seed=8, b=4, t=6)
  cfg = smp.SamplingConfig(max_new_tokens=8, temperature=0.0, n=2, prompt_buckets=BUCKETS)
  one = smp.sample(loaded["moe_e4_top2_norm"], toks, mask, jax.random.key(0), cfg)
  out = smp.sample(sharded, toks, mask, jax.random.key(0), cfg, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(one.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(one.logprobs), atol=1e-5)
