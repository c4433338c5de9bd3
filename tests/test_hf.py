"""srft_jax.hf against transformers (torch CPU, float32, eager attention).

The checkpoints are tiny random Qwen2 / Llama models written by
`save_pretrained` once per session; weights are drawn with std 0.1 (larger
than HF's init; norm scales near 1) so every layer visibly moves the logits.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from srft_jax import hf
from srft_jax import hf_cli
from srft_jax import model as model_lib
from srft_jax import sharding as shd

import helpers

TOL = 1e-4
# The checkpoints' shape (tests/helpers.py tiny_hf_config).
VOCAB, EMBED, MLP, HEADS = helpers.HF_VOCAB, helpers.HF_EMBED, helpers.HF_MLP, helpers.HF_HEADS
HEAD_DIM = helpers.HF_HEAD_DIM
KINDS = helpers.HF_KINDS


@pytest.fixture(scope="session")
def checkpoints(hf_checkpoints):
  """kind -> (directory, torch model): conftest.py's tiny random checkpoints."""
  return hf_checkpoints


@pytest.fixture(scope="session")
def loaded(checkpoints):
  """kind -> our model loaded on one device (float32)."""
  return {kind: hf.load_model(path) for kind, (path, _) in checkpoints.items()}


def _tokens(b=2, t=40, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (b, t)).astype(np.int32)


def _left_pad_mask(b, t, pads):
  mask = np.ones((b, t), np.int32)
  for row, n in enumerate(pads):
    mask[row, :n] = 0
  return mask


# One batch shape for every forward pass, so each model compiles once: rows 0-1
# are unpadded, rows 2-3 left padded.
TOKENS = _tokens(b=4, t=40, seed=1)
MASK = _left_pad_mask(4, 40, pads=(0, 0, 5, 17))


def _hf_logits(ref, tokens, mask=None):
  with torch.no_grad():
    if mask is None:
      return ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return ref(
      torch.tensor(tokens, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      position_ids=torch.tensor(positions, dtype=torch.long),
    ).logits.numpy()


_forward = nnx.jit(model_lib.forward_logits)


@pytest.fixture(scope="session")
def our_logits(loaded):
  """kind -> float32 logits of TOKENS / MASK from the one-device model."""
  return {kind: np.asarray(_forward(model, TOKENS, MASK)) for kind, model in loaded.items()}


def _params(model):
  return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, checkpoints, our_logits):
  _, ref = checkpoints[kind]
  want = _hf_logits(ref, TOKENS[:2])  # HF's plain call: positions 0..T-1, no mask
  got = our_logits[kind][:2]
  assert got.dtype == np.float32 and got.shape == want.shape == (2, 40, VOCAB)
  err = np.abs(got - want).max()
  print(f"{kind}: max |dlogits| = {err:.2e} (max |logit| {np.abs(want).max():.2f})")
  assert err <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_left_padded(kind, checkpoints, our_logits):
  _, ref = checkpoints[kind]
  want = _hf_logits(ref, TOKENS[2:], MASK[2:])
  got = our_logits[kind][2:]
  real = MASK[2:].astype(bool)
  err = np.abs(got - want)[real].max()
  print(f"{kind} left-padded: max |dlogits| on real tokens = {err:.2e}")
  assert err <= TOL
  # and the padded rows' real tokens score as the same text would unpadded
  for row, pad in ((2, 5), (3, 17)):
    alone = _hf_logits(ref, TOKENS[row : row + 1, pad:])[0]
    assert np.abs(our_logits[kind][row, pad:] - alone).max() <= TOL


def test_config_matches_checkpoint(checkpoints, loaded):
  cfg = loaded["llama_tied"].cfg
  assert cfg.model_type == "llama" and cfg.tie_embeddings and not cfg.qkv_bias
  assert cfg.rope_theta == 500_000.0
  assert cfg.rope_scaling == model_lib.RopeScaling(8.0, 1.0, 4.0, 16)
  assert not hasattr(loaded["llama_tied"], "lm_head")
  assert not loaded["llama_untied"].cfg.tie_embeddings
  q = loaded["qwen2"].cfg
  assert (q.model_type, q.qkv_bias, q.num_kv_heads, q.head_dim) == ("qwen2", True, 2, HEAD_DIM)
  for kind, model in loaded.items():
    n_ref = sum(p.numel() for p in checkpoints[kind][1].parameters())
    assert model_lib.count_params(model) == model.cfg.num_params() == n_ref


def test_config_reads_transformers_4x_keys():
  v4 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 123.0,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
      "type": "llama3",
      "factor": 4.0,
      "low_freq_factor": 2.0,
      "high_freq_factor": 8.0,
      "original_max_position_embeddings": 64,
    },
    "tie_word_embeddings": True,
  }
  cfg = hf.config_from_hf(v4)
  assert cfg.rope_theta == 123.0
  assert cfg.rope_scaling == model_lib.RopeScaling(4.0, 2.0, 8.0, 64)
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.norm_eps) == (8, 2, 1e-5)
  assert cfg.param_dtype == "bfloat16" and cfg.tie_embeddings and not cfg.qkv_bias
  # and back: what we write reads back to the same architecture
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  for name in ("qwen2_5_math_7b_rope40k", "llama3_2_1b", "qwen2_5_0_5b"):
    preset = model_lib.ModelConfig.preset(name)
    back = hf.config_from_hf(
      hf.config_to_hf(preset), remat=preset.remat, attention=preset.attention
    )
    assert back == preset, name


# ----------------------------------------------------------------------------
# Export and round trips
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2", "llama_tied"])
def test_export_loads_in_transformers(kind, checkpoints, loaded, tmp_path):
  _, ref = checkpoints[kind]
  # a small shard limit forces model-0000i-of-0000n files + the index
  files = hf.save_model(loaded[kind], str(tmp_path), max_shard_bytes=20_000)
  assert len(files) > 1 and os.path.exists(tmp_path / hf.INDEX_FILE)
  back = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), attn_implementation="eager"
  )
  assert type(back) is type(ref)
  err = np.abs(_hf_logits(back, TOKENS, MASK) - _hf_logits(ref, TOKENS, MASK)).max()
  print(f"{kind}: export -> transformers: max |dlogits| = {err:.2e}")
  assert err == 0.0  # float32 weights written unchanged
  ref_state = ref.state_dict()
  for name, value in back.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), ref_state[name].numpy(), err_msg=name)


def test_export_keeps_token_ids_and_tokenizer_files(checkpoints, loaded, tmp_path):
  import types

  src = tmp_path / "src"
  src.mkdir()
  (src / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
  (src / "generation_config.json").write_text(
    json.dumps({"eos_token_id": [7, 5], "pad_token_id": 6, "temperature": 0.6})
  )
  tok = types.SimpleNamespace(bos_id=None, eos_id=5, pad_id=6, stop_ids=(5, 7))
  hf.save_model(loaded["llama_tied"], str(tmp_path / "plain"), tokenizer=tok)
  config = transformers.AutoConfig.from_pretrained(str(tmp_path / "plain"))
  # Not LlamaConfig's defaults (bos 1, eos 2): the tokenizer's, and generate stops on every stop id.
  assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (None, 5, 6)
  gen = transformers.GenerationConfig.from_pretrained(str(tmp_path / "plain"))
  assert (gen.eos_token_id, gen.pad_token_id) == ([5, 7], 6)
  hf.save_model(loaded["llama_tied"], str(tmp_path / "copied"), tokenizer=tok, copy_from=str(src))
  for name in ("tokenizer_config.json", "generation_config.json"):  # the source's own, as is
    assert (tmp_path / "copied" / name).read_bytes() == (src / name).read_bytes()


def test_import_export_import_is_exact(checkpoints, loaded, tmp_path):
  for kind, shard_bytes in (("qwen2", 20_000), ("llama_tied", 5_000_000_000)):
    first = loaded[kind]
    files = hf.save_model(first, str(tmp_path / kind), max_shard_bytes=shard_bytes)
    assert (len(files) > 1) == (shard_bytes == 20_000)  # sharded + index, and single file
    second = hf.load_model(str(tmp_path / kind))
    a, b = _params(first), _params(second)
    assert a.keys() == b.keys()
    for key in a:
      x, y = np.asarray(a[key].get_value()), np.asarray(b[key].get_value())
      assert x.dtype == y.dtype and x.shape == y.shape
      assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), (kind, key)  # bitwise


def test_bfloat16_checkpoints(checkpoints, loaded, tmp_path):
  """bf16 files (which safetensors' numpy backend cannot read) load exactly."""
  path, ref = checkpoints["qwen2"]
  ref16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
  ref16.save_pretrained(str(tmp_path / "hf_bf16"))
  assert (
    hf.read_header(str(tmp_path / "hf_bf16" / "model.safetensors"))[
      "model.embed_tokens.weight"
    ].dtype
    == "BF16"
  )
  model = hf.load_model(str(tmp_path / "hf_bf16"), dtype=jnp.float32)
  q_hf = ref16.state_dict()["model.layers.1.self_attn.q_proj.weight"].float().numpy()
  q = np.asarray(model.layers[1].attn.q[...])  # [D, N, H]
  np.testing.assert_array_equal(q, q_hf.reshape(HEADS, HEAD_DIM, EMBED).transpose(2, 0, 1))
  # our own bf16 export reads back bit-identical to a float32 -> bf16 cast
  hf.save_model(loaded["qwen2"], str(tmp_path / "ours_bf16"), dtype=jnp.bfloat16)
  again = hf.load_model(str(tmp_path / "ours_bf16"), dtype=jnp.bfloat16)
  for key, var in _params(again).items():
    want = np.asarray(_params(loaded["qwen2"])[key].get_value()).astype(ml_dtypes.bfloat16)
    got = np.asarray(var.get_value())
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint16), want.view(np.uint16))


# ----------------------------------------------------------------------------
# Sharded loading on the forced 8-device mesh
# ----------------------------------------------------------------------------


@pytest.mark.multidevice
@pytest.mark.parametrize(
  "mesh_shape,q_spec,embed_spec,down_spec",
  [
    ({"data": 2, "tensor": 4}, P(None, "tensor", None), P("tensor", None), P("tensor", None)),
    ({"fsdp": 2, "tensor": 4}, P("fsdp", "tensor", None), P("tensor", "fsdp"), P("tensor", "fsdp")),
  ],
)
def test_sharded_load(mesh_shape, q_spec, embed_spec, down_spec, checkpoints, loaded, our_logits):
  path, _ = checkpoints["qwen2"]
  mesh = shd.make_mesh(mesh_shape)
  model = hf.load_model(path, mesh=mesh)
  sizes = dict(mesh.shape)

  def shard_shape(shape, spec):
    out = list(shape)
    for i, axes in enumerate(spec):
      for axis in (axes,) if isinstance(axes, str) else (axes or ()):
        out[i] //= sizes[axis]
    return tuple(out)

  single = _params(loaded["qwen2"])
  expected = {
    ("layers", 0, "attn", "q"): q_spec,
    ("layers", 1, "attn", "o"): P("tensor", None, "fsdp" if "fsdp" in mesh_shape else None),
    # K=2 kv heads do not divide tensor=4: replicated over tensor
    ("layers", 1, "attn", "k"): P("fsdp" if "fsdp" in mesh_shape else None, None, None),
    ("layers", 0, "mlp", "down"): down_spec,
    ("layers", 0, "attn", "q_bias"): P("tensor", None),
    ("embed",): embed_spec,
    ("lm_head",): P(embed_spec[1], "tensor"),
    ("final_norm", "scale"): P(None),
  }
  params = _params(model)
  for key, spec in expected.items():
    array = params[key].get_value()
    assert array.sharding.spec == spec, (key, array.sharding.spec)
    assert array.sharding.mesh.shape == mesh.shape
    full = np.asarray(single[key].get_value())
    assert len(array.addressable_shards) == 8
    for piece in array.addressable_shards:
      assert piece.data.shape == shard_shape(full.shape, spec), key
      np.testing.assert_array_equal(np.asarray(piece.data), full[piece.index])
  # every parameter is sharded exactly as the default rules say
  for key, var in params.items():
    names = var.get_metadata()["logical_axes"]
    array = var.get_value()
    want = shd.logical_to_spec(names, shd.DEFAULT_RULES, mesh, array.shape)
    assert array.sharding.spec == want, key

  with jax.set_mesh(mesh):  # batch 4 divides data * fsdp
    got = np.asarray(_forward(model, TOKENS, MASK))
  err = np.abs(got - our_logits["qwen2"])[MASK.astype(bool)].max()
  print(f"{mesh_shape}: sharded vs one device max |dlogits| = {err:.2e}")
  assert err <= 1e-5


@pytest.mark.multidevice
def test_sharded_load_with_custom_rules(checkpoints, loaded, monkeypatch):
  """Rules that split head_dim (inside o_proj's merged N x H columns) and the
  vocabulary over fsdp still hand every device exactly its slice, and each
  device's slice is all that is read from disk for it."""
  path, _ = checkpoints["qwen2"]
  reads = []
  real_read = hf.SafetensorsReader.__call__

  def spy(self, name, index):
    block = real_read(self, name, index)
    reads.append((name, block.size))
    return block

  monkeypatch.setattr(hf.SafetensorsReader, "__call__", spy)
  mesh = shd.make_mesh({"fsdp": 2, "tensor": 4})
  rules = tuple(
    (
      name,
      {
        "head_dim": "tensor",
        "heads": "fsdp",
        "kv_heads": "fsdp",
        "vocab": "fsdp",
        "embed": "tensor",
        "mlp": None,
      }.get(name, axes),
    )
    for name, axes in shd.DEFAULT_RULES
  )
  model = hf.load_model(path, mesh=mesh, rules=rules)
  assert model.cfg.rules == rules
  params = _params(model)
  specs = {
    ("layers", 0, "attn", "q"): P("tensor", "fsdp", None),  # tensor taken by embed
    # o_proj [D, N*H]: both parts of the merged dim cut
    ("layers", 0, "attn", "o"): P("fsdp", "tensor", None),
    ("layers", 0, "attn", "k_bias"): P("fsdp", "tensor"),
    ("layers", 1, "mlp", "up"): P("tensor", None),
    ("embed",): P("fsdp", "tensor"),
  }
  for key, spec in specs.items():
    assert params[key].get_value().sharding.spec == spec, key
  lm_head = [size for name, size in reads if name == "lm_head.weight"]
  assert lm_head == [VOCAB * EMBED // 8] * 8  # 8 distinct 1/8 slices, no full read
  norm = [size for name, size in reads if name == "model.norm.weight"]
  assert norm == [EMBED]  # replicated: read once for all 8 devices
  for key, var in _params(loaded["qwen2"]).items():
    full = np.asarray(var.get_value())
    for piece in params[key].get_value().addressable_shards:
      np.testing.assert_array_equal(np.asarray(piece.data), full[piece.index], err_msg=str(key))


# ----------------------------------------------------------------------------
# Malformed checkpoints
# ----------------------------------------------------------------------------


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  if edit_config:
    with open(os.path.join(dst, "config.json")) as fh:
      cfg = json.load(fh)
    edit_config(cfg)
    with open(os.path.join(dst, "config.json"), "w") as fh:
      json.dump(cfg, fh)
  return dst


def test_malformed_checkpoints_name_the_problem(checkpoints, tmp_path):
  src, _ = checkpoints["qwen2"]
  name = "model.layers.1.mlp.up_proj.weight"

  missing = _copy_with(src, str(tmp_path / "missing"), lambda t: t.pop(name))
  with pytest.raises(
    hf.CheckpointError, match=rf"missing tensor '{name}' \(expected shape \[64, 32\]\)"
  ):
    hf.load_model(missing)

  def reshape(t):
    t[name] = np.zeros((MLP, EMBED + 1), np.float32)

  wrong = _copy_with(src, str(tmp_path / "wrong"), reshape)
  with pytest.raises(
    hf.CheckpointError, match=rf"tensor '{name}' has shape \[64, 33\], expected \[64, 32\]"
  ):
    hf.load_model(wrong)

  def extra(t):
    t["model.layers.0.mlp.up_proj.bias"] = np.zeros((MLP,), np.float32)

  unexpected = _copy_with(src, str(tmp_path / "extra"), extra)
  with pytest.raises(
    hf.CheckpointError, match=r"unexpected tensor 'model.layers.0.mlp.up_proj.bias'"
  ):
    hf.load_model(unexpected)

  def gpt2(cfg):
    cfg["model_type"] = "gpt2"

  unknown = _copy_with(src, str(tmp_path / "gpt2"), edit_config=gpt2)
  with pytest.raises(hf.CheckpointError, match=r"unknown model_type 'gpt2'"):
    hf.load_model(unknown)

  def mistral(cfg):
    cfg["architectures"] = ["Qwen2ForSequenceClassification"]

  unknown_arch = _copy_with(src, str(tmp_path / "arch"), edit_config=mistral)
  with pytest.raises(hf.CheckpointError, match=r"Qwen2ForSequenceClassification"):
    hf.load_model(unknown_arch)

  def yarn(cfg):
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}

  with pytest.raises(hf.CheckpointError, match=r"rope_type 'yarn'"):
    hf.load_model(_copy_with(src, str(tmp_path / "yarn"), edit_config=yarn))

  def yarn_legacy(cfg):  # Qwen2.5's documented edit: a 4.x block beside 5.x's "default"
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

  with pytest.raises(hf.CheckpointError, match=r"rope_type 'yarn'"):
    hf.load_model(_copy_with(src, str(tmp_path / "yarn_legacy"), edit_config=yarn_legacy))
  with pytest.raises(hf.CheckpointError, match=r"needs a 'factor'"):
    hf.config_from_hf(
      {
        **hf.config_to_hf(model_lib.ModelConfig.preset("llama3_2_1b")),
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5},
        "rope_scaling": None,
      }
    )

  llama_cfg = hf.config_to_hf(model_lib.ModelConfig.preset("llama3_2_1b"))
  with pytest.raises(hf.CheckpointError, match=r"attention_bias"):
    hf.config_from_hf({**llama_cfg, "attention_bias": True})


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def test_info_cli(checkpoints, tmp_path, capsys):
  path, ref = checkpoints["llama_tied"]
  n_ref = sum(p.numel() for p in ref.parameters())  # tied: embedding counted once
  # what `python -m srft_jax.hf_cli info PATH` runs
  assert hf_cli.main(["info", path]) == 0
  out = capsys.readouterr().out
  assert "architecture: LlamaForCausalLM" in out
  assert f"parameters: {n_ref} " in out
  assert "dtype: float32" in out and "warning" not in out

  path, ref = checkpoints["qwen2"]
  hf.save_model(
    hf.load_model(path), str(tmp_path / "sharded"), dtype=jnp.bfloat16, max_shard_bytes=10_000
  )
  info = hf_cli.checkpoint_info(str(tmp_path / "sharded"))
  assert info["num_params"] == sum(p.numel() for p in ref.parameters())
  assert info["num_files"] > 1 and info["dtype"] == "bfloat16"
  assert set(info["tensor_dtypes"]) == {"BF16"}
