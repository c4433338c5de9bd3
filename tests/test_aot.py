"""The ahead-of-time fit tool: its pieces always, and a real TPU compile of the tiny
preset on a small topology when libtpu (requirements-tpu.txt) is installed."""

import json
from pathlib import Path

import pytest

from srft_jax import factory
from srft_jax.tools import aot

import helpers

ROOT = Path(__file__).resolve().parents[1]


def test_topology_names():
  t = aot.Topology.parse("v5p:2x4x4")
  assert (t.chips, t.accelerator_type, t.hbm_bytes) == (32, "v5p-64", 95e9)
  assert aot.Topology.parse("v5p:4x4x4").accelerator_type == "v5p-128"
  assert aot.Topology.parse("v5litepod:4x4").accelerator_type == "v5litepod-16"
  assert aot.Topology.parse("v4:2x2x1").accelerator_type == "v4-8"
  assert aot.Topology.parse("v6e:2x2").hbm_bytes == 32e9
  for bad in ("v5p", "v9:2x2", "v5e:2by2"):
    with pytest.raises(ValueError, match="--topology"):
      aot.Topology.parse(bad)


def test_model_flops_and_state_bound():
  from srft_jax import model as model_lib

  c = factory.run_spec(
    factory.load_config(str(ROOT / "configs" / "srft_7b_tpu.py")), validate=False
  )
  mcfg = aot.model_config(c)
  assert mcfg == model_lib.ModelConfig.preset(
    "qwen2_5_math_7b_rope40k",
    param_dtype="float32",
    dtype="bfloat16",
    remat="full",
    scan_layers=True,
  )
  f = aot.model_flops(c, mcfg)
  tokens = 128 * 8 * (1024 + 8192)
  # 6 N a token for the matmuls, plus attention: between 6N and 10N a token at 9k context.
  assert 6 * 7e9 * tokens < f["train"] < 10 * 7.7e9 * tokens
  assert f["decode"] * 8192 < f["sample"]
  # fp32 params + 2 Adam moments + grads over a v5p-64 (32 chips): ~3.8 GB a chip.
  lb = aot.state_lower_bound(c, aot.Topology.parse("v5p:2x4x4"))
  assert 3.5e9 < lb < 4.0e9


def test_biggest_arrays_parses_hlo():
  hlo = """
  %param.1 = f32[1024,1024]{1,0} parameter(0)
  %fusion.2 = bf16[8,9216,3584]{2,1,0:T(8,128)(2,1)} fusion(f32[1024,1024]{1,0} %param.1), kind=kLoop
  %convolution.3 = f32[16,128]{1,0} convolution(%a, %b), dim_labels=bf_io->bf
  %tuple.4 = (f32[2]{0}, s32[]) tuple(%x, %y)
  """
  got = aot.biggest_arrays(hlo, k=5)
  assert [g["array"] for g in got] == ["bf16[8,9216,3584]", "f32[16,128]"]
  assert got[0]["bytes"] == 8 * 9216 * 3584 * 2 and got[0]["op"] == "fusion"


def test_dashed_flags():
  assert aot.normalise_argv(
    ["--find-smallest", "--json-out=a-b.json", "--config.model.hf_path=x-y"]
  ) == ["--find_smallest", "--json_out=a-b.json", "--config.model.hf_path=x-y"]


@pytest.mark.skipif(
  not aot.libtpu_available(), reason="libtpu not installed (requirements-tpu.txt)"
)
@pytest.mark.slow
def test_tiny_on_v5e_2x2(tmp_path):
  out_json = tmp_path / "aot.json"
  # helpers.run_cli: on the CPU without forced devices (the tool's host needs none).
  res = helpers.run_cli(
    "srft_jax.tools.aot",
    "--config=configs/default.py",
    "--topology=v5e:2x2",
    "--programs=train,sample,distill,distill_decode",
    f"--json-out={out_json}",
    "--config.model.num_layers=1",
    "--config.model.dtype=bfloat16",
    "--config.batch.prompts_per_step=8",
    "--config.data.max_response_len=16",
    "--config.data.prompt_buckets=(16,)",
    timeout=900,
  )
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  last = json.loads(res.stdout.strip().splitlines()[-1])
  assert last == json.loads(out_json.read_text())
  (rep,) = last["reports"]
  assert (
    rep["topology"] == "v5e:2x2" and rep["chips"] == 4 and rep["accelerator_type"] == "v5litepod-4"
  )
  assert rep["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1}
  assert rep["rows"] == 8 * 8 and rep["length"] == 32
  for name in ("train", "sample"):
    p = rep["programs"][name]
    for k in (
      "argument_bytes",
      "output_bytes",
      "total_bytes",
      "xla_flops_per_chip",
      "model_flops_step",
    ):
      assert p[k] > 0, (name, k, p[k])
    assert p["temp_bytes"] >= 0  # a 1-layer model can live in its arguments and outputs
    assert p["fits"] and 0 < p["hbm_fraction"] < 0.9
  assert rep["programs"]["train"]["alias_bytes"] > 0  # the state is donated
  # Sampling leaves the train state on the chip: Adam's two float32 moments of
  # every parameter (replicated on a pure data mesh) plus a few int32 counters.
  c = factory.load_config(str(ROOT / "configs" / "default.py"))
  spec = factory.run_spec(c, {"model.num_layers": 1}, validate=False)
  moments = 2 * 4 * aot.model_config(spec).num_params()
  s, t = rep["programs"]["sample"], rep["programs"]["train"]
  assert moments <= s["resident_bytes"] <= moments + 64 and "resident_bytes" not in t
  parts = ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes", "resident_bytes")
  assert s["total_bytes"] == sum(s[k] for k in parts) - s["alias_bytes"]
  assert rep["fits"]
  assert "| train |" in res.stdout and "| sample |" in res.stdout
  # The teacher's distillation sampler: bfloat16 weights (half the policy's
  # float32 master), no train state beside it, the same KV cache.
  d, dd = rep["programs"]["distill"], rep["programs"]["distill_decode"]
  params = aot.model_config(spec).num_params()
  assert "resident_bytes" not in d and "resident_bytes" not in dd
  assert s["argument_bytes"] - d["argument_bytes"] == pytest.approx(2 * params, rel=0.01)
  bound = max(
    dd["xla_bytes_accessed_per_chip"] / (aot.HBM_GBPS["v5e"] * 1e9),
    dd["xla_flops_per_chip"] / (aot.PEAK_TFLOPS["v5e"] * 1e12),
  )
  assert dd["roofline_step_s"] == bound > 0
  est = rep["distill_estimate"]
  assert (est["prompts"], est["k"], est["calls"]) == (aot.OPENR1_PROMPTS, 7, 46_000 // 8)
  assert est["hours"] == pytest.approx(est["calls"] * 16 * bound / 3600)
  assert "distillation of 46,000 prompts x 7 samples" in res.stdout


def test_oom_message_units_are_binary():
  # XLA:TPU's "G" is GiB: v5e's 16 GiB chip reports 15.48G usable.
  got = aot.oom_summary(
    "RESOURCE_EXHAUSTED: Used 30.21G of 15.48G hbm. Exceeded hbm capacity by 14.73G."
  )
  assert got["used_bytes"] == pytest.approx(30.21 * 2**30)
  assert got["limit_bytes"] == pytest.approx(15.48 * 2**30)


def test_hf_checkpoint_gets_the_runs_overrides(tmp_path):
  # With model.hf_path, the tool compiles what job.base_model loads: the
  # checkpoint's architecture plus the config's RoPE theta, window and attention.
  from srft_jax import hf
  from srft_jax import model as model_lib

  (tmp_path / "config.json").write_text(
    json.dumps(hf.config_to_hf(model_lib.ModelConfig.preset("qwen2_5_math_7b")))
  )
  c = factory.load_config(str(ROOT / "configs" / "srft_7b_tpu.py"))
  spec = factory.run_spec(c, {"model.hf_path": str(tmp_path)}, validate=False)
  mcfg = aot.model_config(spec)
  want = {k: getattr(spec.model, k) for k in ("rope_theta", "max_seq_len", "attention")}
  want = {k: v for k, v in want.items() if v}
  assert want and {k: getattr(mcfg, k) for k in want} == want


@pytest.mark.parametrize(
  "args,message",
  [
    (["--topology=v9:2x2"], "--topology"),
    (["--find-smallest", "--generations=v5litepod,v7x"], "--generations: unknown ['v7x']"),
    (["--topology=v5e:2x2", "--programs="], "--programs: give at least one"),
    (["--topology=v5e:2x2", "--rows-per-shard=-1"], "--rows_per_shard"),
  ],
)
@pytest.mark.slow
def test_bad_arguments_exit_2_with_a_message(args, message):
  if not aot.libtpu_available():
    pytest.skip("the tool checks for libtpu first")
  res = helpers.run_cli("srft_jax.tools.aot", "--config=configs/default.py", *args)
  assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]


@pytest.mark.skipif(
  not aot.libtpu_available(), reason="libtpu not installed (requirements-tpu.txt)"
)
def test_v4_devices_are_chips():
  # One megacore device a v4 chip, as the runtime shows them (memory is per chip).
  assert len(aot.Topology.parse("v4:2x2x1").devices()) == 4
  assert len(aot.Topology.parse("v5p:2x2x1").devices()) == 4


@pytest.mark.skipif(
  not aot.libtpu_available(), reason="libtpu not installed (requirements-tpu.txt)"
)
def test_rows_per_shard_sets_the_micro_batches():
  """--rows_per_shard: the 7B recipe's 512 rows a mini-batch over each slice's
  FSDP shards; a config with shared_prefix keeps whole groups or says why not;
  the count must split every stage."""
  config = factory.load_config(str(ROOT / "configs" / "srft_7b_tpu.py"))
  c = factory.run_spec(config, validate=False)
  got = {
    (t, n): aot.microbatches_for(c, aot.Topology.parse(t), n)
    for t, n in (("v5p:2x2x1", 1), ("v5p:2x2x4", 1), ("v5p:2x4x4", 1), ("v5p:2x4x4", 2))
  }
  assert list(got.values()) == [128, 32, 16, 8]
  v5p32 = aot.Topology.parse("v5p:2x2x4")
  assert aot.with_rows_per_shard(c, v5p32, 0) is c
  assert aot.with_rows_per_shard(c, v5p32, 1).batch.microbatches == 32
  # SFT: 64 rows a mini-batch, 2 a micro-batch over 16 shards
  two = factory.run_spec(config, {"stages": "sft:10,grpo"}, validate=False)
  with pytest.raises(
    ValueError, match=r"config\.batch\.microbatches: must divide the 64 rows .*sft"
  ):
    aot.microbatches_for(two, v5p32, 1)
  # 4 prompts x 8 a mini-batch
  tiny = factory.run_spec(factory.load_config(str(ROOT / "configs" / "default.py")), validate=False)
  v5e4 = aot.Topology.parse("v5e:2x2")
  assert aot.microbatches_for(tiny, v5e4, 2) == 4
  with pytest.raises(ValueError, match="whole groups"):
    aot.microbatches_for(tiny, v5e4, 1)
  with pytest.raises(ValueError, match="do not split"):
    aot.microbatches_for(tiny, v5e4, 3)


@pytest.mark.multidevice
@pytest.mark.parametrize(
  "teacher", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["student", "teacher"]
)
def test_packed_train_step_is_the_trainers(tmp_path, teacher):
  """With batch.packing, `lower_train` lowers the step Trainer.update jits
  (docs/method.md §18): compiled on this host's mesh, the AOT program takes the
  trainer's own state, batch and packing plan (a compiled program refuses any
  other shape, dtype, sharding or argument structure) and gives its update.
  With a distillation teacher (`srft_opd`, docs/method.md §19.6) the program
  takes the Trainer's teacher params too, and the sampling programs' resident
  bytes count them."""
  import dataclasses

  import jax
  import numpy as np

  from srft_jax import hf
  from srft_jax import model as model_lib
  from srft_jax import packing
  from srft_jax import sharding as shd
  from srft_jax import trainer as trainer_lib

  over = {
    "model.num_layers": 1,
    "model.embed_dim": 32,
    "model.mlp_dim": 64,
    "data.prompt_buckets": (8,),
    "data.max_response_len": 8,
    "mesh.data": 2,
    "mesh.fsdp": 4,
    "batch.packing": True,
    "batch.pack_rows": 8,  # 32 rows a micro-batch of <= 16 tokens: 16 bins, 2 slots
  }
  vocab = 64
  config = factory.load_config(str(ROOT / "configs" / "default.py"))
  plain = factory.run_spec(config, over)
  if teacher:  # another shape than the student's, the same vocabulary
    tcfg = dataclasses.replace(
      model_lib.ModelConfig.preset("tiny"), vocab_size=vocab, embed_dim=48, num_layers=2
    )
    hf.save_model(model_lib.create_model(tcfg, seed=7), str(tmp_path / "teacher"))
    helpers.word_tokenizer(tmp_path / "teacher", [f"w{i}" for i in range(vocab - 2)])
    over |= {"method": "srft_opd", "teacher.hf_path": str(tmp_path / "teacher")}
  spec = factory.run_spec(config, over)
  mesh = spec.make_mesh()
  model = model_lib.create_model(spec.model.config(vocab), seed=0, mesh=mesh)
  t_model = spec.teacher.load(spec.model, mesh) if teacher else None
  tr = trainer_lib.Trainer(
    model, spec, tokenizer=None, scorer=None, mesh=mesh, teacher=t_model, teacher_path="t"
  )
  tr.enter_stage(spec.stages[0], fresh_optimizer=True)
  cfg = tr.step_cfg
  assert (cfg.pack_len, cfg.pack_rows) == (16, 8)

  # One step's rows as the trainer has them: left-padded prompts, right-padded responses.
  layout = tr.stage.layout
  b, n, p, r = spec.batch.prompts_per_step, layout.n_rollouts, 8, 8
  rs = np.random.RandomState(0)
  pmask = (np.arange(p)[None] >= rs.randint(0, p - 1, (b, 1))).astype(np.int32)
  rmask = (np.arange(r)[None] < rs.randint(1, r + 1, (b * n, 1))).astype(np.int32)
  dmask = (np.arange(r)[None] < rs.randint(1, r + 1, (b, 1))).astype(np.int32)
  tok = lambda m: (rs.randint(1, vocab, m.shape) * m).astype(np.int32)  # noqa: E731
  rtok = tok(rmask)
  rollouts = trainer_lib.Rollouts(
    rtok, rmask, (-rs.rand(*rmask.shape) * rmask).astype(np.float32), rtok, rmask,
    rmask.sum(1), np.zeros(b * n, bool),
  )  # fmt: skip
  prompts = {
    "prompt_tokens": tok(pmask),
    "prompt_mask": pmask,
    "demo_tokens": tok(dmask),
    "demo_mask": dmask,
  }
  rewards = rs.randint(0, 2, (b, layout.size)).astype(np.float32)
  scored = trainer_lib.Scored(rewards, np.ones_like(rewards), rewards[:, :n])
  train_batch = tr.assemble(prompts, rollouts, scored)
  mask = trainer_lib.row_mask(prompts, rollouts, layout)
  starts, lengths = packing.row_extents(mask)
  plan = packing.make_plan(
    starts,
    lengths,
    row_len=p + r,
    pack_len=cfg.pack_len,
    pack_rows=cfg.pack_rows,
    minibatches=cfg.minibatches,
    microbatches=cfg.microbatches,
  )
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  plan = {k: shd.put_global(v, replicated) for k, v in plan.items()}

  mcfg = aot.model_config(spec, vocab)
  compiled = aot.lower_train(spec, mcfg, mesh).compile()
  state = jax.device_put(jax.device_get(tr.state), tr.state_sh)  # a copy: the step donates it
  with jax.set_mesh(mesh):
    got_state, got = compiled(state, train_batch, None, None, plan, *[tr.teacher][:teacher])
  want = jax.device_get(tr.update(train_batch, 1, mask))
  assert tr._step_fn._cache_size() == 1
  if teacher:
    np.testing.assert_allclose(got["teacher_kl"], want["teacher_kl"], rtol=1e-6)
    t_bytes = sum(x.nbytes for x in jax.tree.leaves(jax.device_get(tr.teacher)))
    extra = aot.resident_bytes(spec, mcfg, mesh) - aot.resident_bytes(plain, mcfg, mesh)
    assert t_bytes / 4 <= extra < t_bytes  # one chip's shards over fsdp = 4
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose(got[k], want["optim/" + k if k == "grad_norm" else k], rtol=1e-6)
  jax.tree.map(
    lambda a, w: np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-6, atol=1e-7),
    jax.device_get(got_state["params"]),
    jax.device_get(tr.state["params"]),
  )


def test_packed_plan_has_make_plans_shapes():
  """The 7B recipe (packed): the abstract plan `lower_train` compiles for is
  the one packing.make_plan gives the trainer, whatever the rows' lengths."""
  import numpy as np

  from srft_jax import packing

  config = factory.load_config(str(ROOT / "configs" / "srft_7b_tpu.py"))
  spec = factory.run_spec(config, validate=False)
  step = spec.biggest_stage().step
  rows, t = 1024, 1024 + 8192
  abstract = aot.packed_plan(step, rows, t)
  for lengths in (np.full(rows, t), np.random.RandomState(0).randint(1, 2000, rows)):
    plan = packing.make_plan(
      np.zeros(rows, np.int64),
      lengths,
      row_len=t,
      pack_len=step.pack_len,
      pack_rows=step.pack_rows,
      minibatches=step.minibatches,
      microbatches=step.microbatches,
    )
    assert {k: (v.shape, v.dtype) for k, v in plan.items()} == {
      k: (v.shape, v.dtype) for k, v in abstract.items()
    }
  assert abstract["row"].shape == (2, 4, 4, 32, t)  # 128 rows a micro-batch, 32 a slot
