"""`python -m srft_jax.data distill`: verified demonstrations from a teacher.

The teacher is a tiny hand-set HF checkpoint that is a bigram model (attention
and MLP write nothing, the embedding is one-hot, lm_head is the table): from
any prompt it answers "<think>[\\n]</think>\\boxed{d}" with d drawn from
{3, 5, 7}. So prompts whose answer is 3, 5 or 7 get correct samples at rate
1/3 and every other prompt gets none: real scorer verdicts, both ways, in a
few seconds. A random teacher checks greedy decoding.
"""

import glob
import json
import math
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from srft_jax import factory
from srft_jax import hf
from srft_jax import model as model_lib
from srft_jax import rewards
from srft_jax import sampler as sampler_lib
from srft_jax import sharding as shd
from srft_jax import tokenizer as tok_lib
from srft_jax.data import __main__ as data_cli
from srft_jax.data import builders
from srft_jax.data import distill
from srft_jax.data import pipeline
from srft_jax.data import task

import helpers

VOCAB = 256  # the task tokenizer's
DIGITS = "357"


def _write_teacher(path, tok_file, successors=None, *, seed=0, scale=1.0):
  """A one-layer Llama HF checkpoint (config.json, model.safetensors,
  tokenizer.model). With `successors` ({token: next tokens}, None: any other
  token) a bigram model; else random weights times `scale`."""
  d = VOCAB if successors is not None else 32
  cfg = model_lib.ModelConfig(
    model_type="llama",
    vocab_size=VOCAB,
    embed_dim=d,
    mlp_dim=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    max_seq_len=128,
    qkv_bias=False,
  )
  rs = np.random.RandomState(seed)

  def r(*shape):
    return (rs.randn(*shape) * scale).astype(np.float32)

  layer = "model.layers.0."
  t = {
    "model.embed_tokens.weight": r(VOCAB, d),
    layer + "input_layernorm.weight": np.ones(d, np.float32),
    layer + "post_attention_layernorm.weight": np.ones(d, np.float32),
    layer + "self_attn.q_proj.weight": r(16, d),
    layer + "self_attn.k_proj.weight": r(8, d),
    layer + "self_attn.v_proj.weight": r(8, d),
    layer + "self_attn.o_proj.weight": r(d, 16),
    layer + "mlp.gate_proj.weight": r(16, d),
    layer + "mlp.up_proj.weight": r(16, d),
    layer + "mlp.down_proj.weight": r(d, 16),
    "model.norm.weight": np.ones(d, np.float32),
    "lm_head.weight": r(VOCAB, d),
  }
  if successors is not None:
    # The residual stream stays the token's one-hot, so after the final RMSNorm
    # logits[u] = sqrt(D) * lm_head[u, current token].
    t["model.embed_tokens.weight"] = np.eye(VOCAB, dtype=np.float32)
    t[layer + "self_attn.o_proj.weight"][:] = 0
    t[layer + "mlp.down_proj.weight"][:] = 0
    table = np.full((VOCAB, VOCAB), -30.0, np.float32)  # [next, current]
    for cur in range(VOCAB):
      table[successors.get(cur, successors[None]), cur] = 0.0
    t["lm_head.weight"] = table / math.sqrt(d)
  os.makedirs(path, exist_ok=True)
  save_file(t, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf.config_to_hf(cfg, "float32"), f)
  with open(tok_file, "rb") as src, open(os.path.join(path, "tokenizer.model"), "wb") as dst:
    dst.write(src.read())
  return str(path)


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return tok_lib.load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer_path, tok):
  (think, nl, end, box, close) = (
    tok.encode(s)[0] for s in ("<think>", "\n", "</think>", "\\boxed{", "}")
  )
  digits = [tok.encode(c)[0] for c in DIGITS]
  succ = {None: [think], think: [nl, end], nl: [end], end: [box], box: digits, close: [tok.eos_id]}
  succ.update({d: [close] for d in digits})
  return _write_teacher(tmp_path_factory.mktemp("teacher"), tokenizer_path, succ)


@pytest.fixture(scope="module")
def scorer():
  with rewards.RewardScorer(num_workers=1, num_spares=0) as s:
    yield s


# Task problems, chosen by answer, plus rows `prepare` would skip.
N_HIT, N_MISS = 6, 3
BAD_ROWS = {"bad_json": 1, "missing_field": 1, "empty_prompt": 1, "unparseable_answer": 1}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  rows = task.generate("train", 400, seed=0)
  hits = [r for r in rows if r["answer"] in DIGITS][:N_HIT]
  misses = [r for r in rows if int(r["answer"]) >= 10][:N_MISS]
  good = [{"id": r["id"], "problem": r["prompt"], "answer": r["answer"]} for r in hits + misses]
  good = [good[i] for i in (0, 6, 1, 2, 7, 3, 4, 8, 5)]  # misses spread over the shards
  lines = [json.dumps(r) for r in good[:4]]
  lines += [
    "{not json",
    json.dumps({"problem": "How many?"}),
    json.dumps({"problem": " ", "answer": "3"}),
  ]
  lines += [json.dumps({"problem": "Tom has 3 pens. How many pens now?", "answer": "{3"})]
  lines += [json.dumps({"problem": "Tom has 3 pens. " * 20 + "How many pens now?", "answer": "3"})]
  lines += [json.dumps(r) for r in good[4:]]
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path), good, {r["id"] for r in misses}


def _cfg(teacher, prompts, data_dir, **kw):
  base = dict(
    teacher=teacher,
    prompts=prompts,
    data_dir=str(data_dir),
    k=8,
    max_new_tokens=8,
    prompt_buckets=(48,),
    batch_size=2,
    shard_size=4,
    teacher_template="plain",
    progress=False,
  )
  return distill.DistillConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher, prompts_file, scorer):
  """One unbroken distillation of the prompts file: (data_dir, summary, shards)."""
  data_dir = tmp_path_factory.mktemp("distilled")
  summary = distill.run(_cfg(teacher, prompts_file[0], data_dir), scorer=scorer)
  shards = [
    json.load(open(p)) for p in sorted(glob.glob(str(data_dir / "distill" / "shards" / "*.json")))
  ]
  return data_dir, summary, shards


def _dataset_files(data_dir) -> dict[str, bytes]:
  where = builders.dataset_dir(data_dir, distill.DATASET_NAME)
  out = {}
  for name in sorted(os.listdir(where)):
    if name != distill.SUMMARY_FILE:
      with open(os.path.join(where, name), "rb") as f:
        out[name] = f.read()
  with open(os.path.join(data_dir, "distill", "distilled.jsonl"), "rb") as f:
    out["distilled.jsonl"] = f.read()
  return out


@pytest.mark.slow
def test_every_kept_target_scores_one(distilled, scorer):
  data_dir, summary, shards = distilled
  rows = [json.loads(line) for line in open(data_dir / "distill" / "distilled.jsonl")]
  assert summary["status"] == "done" and 0 < len(rows) == summary["kept"] <= N_HIT
  rewards_, outcomes = scorer.score([r["target"] for r in rows], [r["answer"] for r in rows])
  assert rewards_.tolist() == [1.0] * len(rows), outcomes
  # The teacher's own text (its think block kept), and the shortest verified sample.
  assert all(r["target"].startswith("<think>") for r in rows)
  for e in (e for s in shards for e in s["entries"] if e["kept"] is not None):
    usable = [n for n, u in zip(e["lengths"], e["usable"]) if u]
    assert e["lengths"][e["kept"]] == min(usable) and e["outcomes"][e["kept"]] == "correct"


@pytest.mark.slow
def test_no_correct_prompts_and_bad_rows_are_counted(distilled, prompts_file):
  data_dir, s, shards = distilled
  _, good, misses = prompts_file
  entries = [e for sh in shards for e in sh["entries"]]
  assert [e["id"] for e in entries] == [r["id"] for r in good]  # source order, all usable
  kept_ids = {e["id"] for e in entries if e["kept"] is not None}
  assert not kept_ids & misses  # no correct sample: left out ...
  no_correct = [e for e in entries if "correct" not in e["outcomes"]]
  assert {e["id"] for e in no_correct} >= misses
  assert s["no_correct_prompts"] == len(no_correct) == len(good) - len(kept_ids)  # ... and counted
  assert s["bad_prompt_rows"] == {**BAD_ROWS, "prompt_too_long": 1}
  assert s["bad_prompt_rows_total"] == 5
  # The summary adds up: every sample is kept or dropped for one reason.
  assert s["samples"] == 8 * len(good) == sum(s["outcomes"].values())
  assert s["kept"] + sum(s["dropped"].values()) == s["samples"]
  correct = sum(e["outcomes"].count("correct") for e in entries)
  assert s["pass@1"] == pytest.approx(correct / s["samples"], abs=1e-6)
  assert s["pass@k"] == pytest.approx((len(good) - len(no_correct)) / len(good))
  assert s["yield"] == pytest.approx(len(kept_ids) / len(good))
  assert s["dropped"]["wrong"] == s["outcomes"]["wrong"] > 0
  kept = [e["lengths"][e["kept"]] for e in entries if e["kept"] is not None]
  assert s["mean_kept_tokens"] == pytest.approx(np.mean(kept))
  assert s["samples_per_s"] > 0
  on_disk = json.load(open(os.path.join(s["dataset"], distill.SUMMARY_FILE)))
  assert on_disk["kept"] == s["kept"] and "--config.data.name=distilled" in s["train_flags"]


@pytest.mark.slow
def test_killed_and_resumed_is_bitwise_the_same(teacher, prompts_file, tmp_path):
  """Stopped after one shard (a kill leaves at most a temporary file), then the
  same command again: the dataset equals an unbroken run's byte for byte."""
  args = ["distill", "--teacher", teacher, "--prompts", prompts_file[0]]
  args += ["--data_dir", str(tmp_path), "--k", "8", "--max_new_tokens", "8"]
  args += ["--prompt_buckets", "48", "--batch_size", "2", "--shard_size", "4"]
  args += ["--teacher_template", "plain", "--no_progress"]
  assert data_cli.main([*args, "--stop_after", "1"]) == 0
  shards = tmp_path / "distill" / "shards"
  assert sorted(os.listdir(shards)) == ["shard-00000.json"]
  (shards / "shard-00001.json.tmp999").write_text('{"half": ')  # a killed write
  assert not os.path.exists(builders.dataset_dir(tmp_path, distill.DATASET_NAME))
  first = (shards / "shard-00000.json").read_bytes()
  assert data_cli.main(args) == 0
  assert (shards / "shard-00000.json").read_bytes() == first  # finished shards are not redone
  resumed = _dataset_files(tmp_path)
  # Other content settings on the same work area are refused ...
  assert data_cli.main([*args[:-1], "--k", "4", "--no_progress"]) == 1
  # ... and an unbroken run from scratch (same paths) writes the same bytes.
  assert data_cli.main([*args, "--overwrite"]) == 0
  assert _dataset_files(tmp_path) == resumed
  assert len(json.loads(resumed["dataset_info.json"])["splits"]) == 1


@pytest.mark.slow
def test_output_trains_through_the_pipeline(distilled, tok, tokenizer_path, tmp_path):
  data_dir, summary, _ = distilled
  source = builders.load_source(data_dir, distill.DATASET_NAME, "train")
  assert len(source) == summary["kept"]
  cfg = pipeline.PipelineConfig(
    global_batch=2, prompt_buckets=(48,), max_response_len=16, template="plain", shuffle=False
  )
  batch = next(pipeline.make_iterator(source, tok, cfg, process_index=0, process_count=1))
  rows = {r["id"]: r for r in map(json.loads, open(data_dir / "distill" / "distilled.jsonl"))}
  for i, rid in enumerate(batch["ids"]):
    demo = batch["demo_tokens"][i][batch["demo_mask"][i] > 0]
    assert demo[-1] == tok.eos_id and tok.decode(demo[:-1]) == rows[rid]["target"]
    assert batch["answers"][i] == rows[rid]["answer"]
  overrides = {
    "data.source": "tfds",
    "data.data_dir": str(data_dir),
    "data.name": distill.DATASET_NAME,
    "data.tokenizer": tokenizer_path,
    "data.max_response_len": 16,
    "warmup.steps": 0,
    "steps": 2,
    "batch.prompts_per_step": 2,
    "batch.minibatches": 1,
    "rollout.n_rollouts": 2,
    "model.num_layers": 1,
    "model.embed_dim": 32,
    "model.mlp_dim": 64,
    "eval.before": False,
    "eval.after": False,
    "checkpoint.export_hf": False,
    "checkpoint.async_save": False,
    "log.plots": False,
    "log.tensorboard": False,
    "log.progress": False,
  }
  # Evaluated on the built-in task's splits when asked (the distilled regime's
  # runs, whose sweep reads val), and on none otherwise.
  config = factory.load_config(os.path.join(helpers.ROOT, helpers.DEFAULT_CONFIG))
  sizes = {"eval.n_id": 4, "eval.n_ood": 3, "eval.n_val": 5}
  for splits, want in ((True, {"task_id": 4, "task_ood": 3, "task_val": 5}), (False, {})):
    spec = factory.run_spec(
      config, {**overrides, **sizes, "eval.task_splits": splits}, validate=False
    )
    _, evals = factory.datasets(spec)
    assert {k: len(v) for k, v in evals.items()} == want
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  rc, log = helpers.run_main(tmp_path / "run", overrides, env=env, timeout=240)
  assert rc == 0, log[-3000:]
  metrics = [json.loads(line) for line in open(tmp_path / "run" / "logs" / "metrics.jsonl")]
  losses = [m["loss/loss"] for m in metrics if "loss/loss" in m]
  assert len(losses) == 2 and all(math.isfinite(v) for v in losses), metrics


@pytest.mark.slow
def test_k1_at_temperature_0_is_greedy(tmp_path, tokenizer_path, tok, scorer):
  """A random teacher's samples (saved in the shards) equal the sampler's greedy
  decode of each prompt alone; no sample is correct, so nothing is written."""
  teacher = _write_teacher(tmp_path / "t", tokenizer_path, seed=1, scale=2.0)
  cfg = _cfg(
    teacher,
    "task:train",
    tmp_path / "d",
    n=5,
    k=1,
    temperature=0.0,
    save_responses=True,
    batch_size=4,
  )
  one_device = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  with pytest.raises(distill.NoDemonstrations, match="no prompt has a verified-correct sample"):
    distill.run(cfg, scorer=scorer, mesh=one_device)
  entries = [
    e
    for p in sorted(glob.glob(str(tmp_path / "d/distill/shards/*.json")))
    for e in json.load(open(p))["entries"]
  ]
  model = hf.load_model(teacher)
  scfg = sampler_lib.SamplingConfig(
    max_new_tokens=8,
    temperature=0.0,
    eos_ids=(tok.eos_id,),
    pad_id=tok.pad_id,
    prompt_buckets=(48,),
  )
  rows = task.generate("train", 5, seed=0)
  assert [e["id"] for e in entries] == [r["id"] for r in rows]
  assert len({e["responses"][0] for e in entries}) > 2  # the prompts' rows are told apart
  for e, r in zip(entries, rows):
    ids = tok.encode(tok_lib.render_prompt(r["prompt"], "plain"))
    out = sampler_lib.sample(
      model, np.asarray([ids]), np.ones((1, len(ids))), jax.random.PRNGKey(9), scfg
    )
    n = int(out.lengths[0]) - int(out.tokens[0, int(out.lengths[0]) - 1] == tok.eos_id)
    assert e["responses"] == [tok.decode(np.asarray(out.tokens[0, :n]))]
    assert e["lengths"] == [n]


@pytest.mark.slow
def test_keep_rules_and_think_strip(teacher, prompts_file, tmp_path, scorer):
  assert distill.choose([0, 1, 1, 0], [3, 9, 4, 1], "shortest", 0, 0) == 2
  assert distill.choose([0, 1, 1, 0], [3, 9, 4, 1], "first", 0, 0) == 1
  assert distill.choose([0, 0], [1, 1], "first", 0, 0) is None
  picks = {distill.choose([1] * 4, [1] * 4, "random", 7, i) for i in range(40)}
  assert picks == {0, 1, 2, 3}  # uniform over the candidates, fixed by (seed, index) ...
  assert distill.choose([1] * 4, [1] * 4, "random", 7, 5) == distill.choose(
    [1] * 4, [1] * 4, "random", 7, 5
  )
  assert distill.target_text("<think>\na\n</think>\n\\boxed{3}", "strip") == "\\boxed{3}"
  assert distill.target_text("<think>\na", "strip") is None  # unclosed: nothing to keep
  assert distill.target_text("\\boxed{3}", "strip") == "\\boxed{3}"
  assert distill.target_text("<think></think>\\boxed{3}", "keep") == "<think></think>\\boxed{3}"
  # Through a run: stripped targets still verify, and the student template is recorded.
  cfg = _cfg(
    teacher, prompts_file[0], tmp_path, think="strip", keep="random", student_template="qwen_math"
  )
  summary = distill.run(cfg, scorer=scorer)
  rows = [json.loads(line) for line in open(tmp_path / "distill" / "distilled.jsonl")]
  assert rows and all(r["target"].startswith("\\boxed{") for r in rows)
  assert scorer.score([r["target"] for r in rows], [r["answer"] for r in rows])[0].all()
  assert "--config.data.template=qwen_math" in summary["train_flags"]
