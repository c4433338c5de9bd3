"""A teacher in the loop (docs/method.md §19.6): the train step's teacher
pre-pass against plain forwards of both models (another family and size),
teacher = student, exact micro-batches, LoRA beside a teacher with packing,
the sharded step, the config's checks (the teacher's fields, its tokenizer and
vocabulary), the resume check, and an `opd` run end to end.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from srft_jax import checkpoint as ckpt_lib
from srft_jax import factory
from srft_jax import hf
from srft_jax import lora
from srft_jax import model as model_lib
from srft_jax import objectives as obj
from srft_jax import packing
from srft_jax import sharding as shd
from srft_jax import step as step_lib
from srft_jax import trainer as trainer_lib

import helpers

P, R = 6, 10  # prompt and response widths: T = 16
T = P + R
V = 48

STUDENT = model_lib.ModelConfig(
  vocab_size=V,
  embed_dim=32,
  mlp_dim=64,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  max_seq_len=64,
)
# Another family and size (Qwen3: q/k norms, no q/k/v biases, tied embeddings; wider,
# one layer): a teacher shares only the vocabulary.
TEACHER = model_lib.ModelConfig.preset(
  "tiny_qwen3",
  vocab_size=V,
  embed_dim=48,
  mlp_dim=96,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=24,
  max_seq_len=64,
)


def _batch(seed, rows=8):
  """Groups of 4 rows sharing a prompt (helpers.step_batch), the fourth a demonstration."""
  return helpers.step_batch(seed, rows=rows, prompt_len=P, response_len=R, vocab=V, group=4)


@pytest.fixture(scope="module")
def models():
  """(student graphdef, student params, teacher graphdef, teacher params)."""
  graphdef, params = nnx.split(model_lib.Transformer(STUDENT, rngs=nnx.Rngs(1)))
  t_graphdef, t_params = nnx.split(model_lib.Transformer(TEACHER, rngs=nnx.Rngs(2)))
  return graphdef, params, t_graphdef, t_params


_SGD = optax.sgd(1.0)  # one object: a static argument; lr 1, so the update is the gradient


@functools.cache
def _jitted_step(teacher_graphdef):
  """train_step jitted once per teacher graph: a repeated (config, shapes) reuses its program."""
  return jax.jit(
    functools.partial(step_lib.train_step, teacher_graphdef=teacher_graphdef),
    static_argnums=(0, 1, 2),
  )


def _step(models, cfg, batch, teacher=None):
  """One train step (SGD at lr 1, no clipping): (metrics, gradient)."""
  graphdef, params, t_graphdef, t_params = models
  t_graphdef, t_params = teacher or (t_graphdef, t_params)
  state = step_lib.init_train_state(params, _SGD)
  run = _jitted_step(t_graphdef)
  state, metrics = run(graphdef, _SGD, cfg, state, batch, None, None, None, t_params)
  return metrics, jax.tree.map(lambda a, b: a - b, params, state["params"])


def _direct(graphdef, params, batch):
  """Final hidden states [B, T-1, D] of a plain forward, and the unembedding."""
  model = nnx.merge(graphdef, params)
  positions = model_lib.positions_from_mask(batch["mask"])
  out = model(batch["tokens"], positions, batch["mask"], return_hidden=True)
  return out.hidden[:, :-1], model.unembed()


def _reference(models, cfg: step_lib.StepConfig, batch, teacher=None):
  """(loss, aux, gradient) of objectives.srft_loss fed the teacher's log-probs
  or exact KL computed from plain forwards of both models, dense over V."""
  graphdef, params, t_graphdef, t_params = models
  t_graphdef, t_params = teacher or (t_graphdef, t_params)
  targets = batch["tokens"][:, 1:]
  t_temp = cfg.teacher_temperature or cfg.temperature
  ht, wt = _direct(t_graphdef, t_params, batch)
  zt = (ht @ wt).astype(jnp.float32) / t_temp
  logq = jax.nn.log_softmax(zt)
  # The exact KL over the ids both vocabularies have, each side renormalised there.
  vc = min(wt.shape[-1], STUDENT.vocab_size)
  logq_c = jax.nn.log_softmax(zt[..., :vc])

  def loss(params):
    hs, ws = _direct(graphdef, params, batch)
    zs = (hs @ ws).astype(jnp.float32) / cfg.temperature
    logp_all = jax.nn.log_softmax(zs)
    logp = jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    extra = {"teacher_logp": jnp.take_along_axis(logq, targets[..., None], -1)[..., 0]}
    if cfg.distill == "full":
      logp_c = jax.nn.log_softmax(zs[..., :vc])
      p, q = jnp.exp(logp_c), jnp.exp(logq_c)
      extra = {
        "distill_rkl": jnp.sum(p * (logp_c - logq_c), -1),
        "distill_fkl": jnp.sum(q * (logq_c - logp_c), -1),
      }
    return obj.srft_loss(logp, ent, {**batch, **extra}, cfg.loss)

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, aux, grads


def _close(got, want, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


CASES = {
  # the published recipe: sampled estimator, the ratio against the sampler's old_logp
  "opd_sampled": (obj.LossConfig.preset("opd"), {}),
  # SRFT + the exact KL, demonstrations too, a teacher at its own temperature,
  # as the trainer runs it: only the response columns, each prompt once a group
  "srft_opd_full": (
    obj.LossConfig.preset("srft_opd", distill_estimator="full", distill_on_demos=True),
    dict(teacher_temperature=0.7, response_len=R, group=4),
  ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_with_a_teacher_equals_the_pure_loss(models, case):
  """The step's loss, teacher metric and gradient equal srft_loss fed the
  teacher's log-probs (sampled) or the exact KL (full) of plain forwards."""
  loss_cfg, kw = CASES[case]
  cfg = step_lib.StepConfig(loss=loss_cfg, logit_chunk=16, **kw)
  batch = _batch(0)
  metrics, grads = _step(models, cfg, batch)
  value, aux, want = _reference(models, cfg, batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-5, atol=1e-6)
  for k in ("distill", "teacher_kl") + (("distill_demo",) if loss_cfg.distill_on_demos else ()):
    np.testing.assert_allclose(float(metrics[k]), float(aux[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  assert abs(float(aux["teacher_kl"])) > 1e-2  # two different models: a real term
  _close(grads, want)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3


@pytest.mark.parametrize(
  "rows", [pytest.param(V + 16, marks=pytest.mark.slow), V - 8], ids=["wider", "narrower"]
)
def test_a_teacher_with_another_padded_vocabulary(models, rows):
  """One tokenizer, unembeddings padded to different sizes (Qwen2.5-1.5B and
  7B): the exact KL is over the ids both have, each side renormalised there;
  the sampled estimator's teacher log-prob is over the teacher's own rows."""
  graphdef, params, _, _ = models
  t_graphdef, t_params = nnx.split(
    model_lib.Transformer(dataclasses.replace(TEACHER, vocab_size=rows), rngs=nnx.Rngs(2))
  )
  batch = helpers.step_batch(7, rows=8, prompt_len=P, response_len=R, vocab=min(V, rows), group=4)
  for loss_cfg in (
    obj.LossConfig.preset("srft_opd", distill_estimator="full", distill_on_demos=True),
    obj.LossConfig.preset("opd"),
  ):
    cfg = step_lib.StepConfig(loss=loss_cfg, logit_chunk=16)
    metrics, grads = _step(models, cfg, batch, teacher=(t_graphdef, t_params))
    value, aux, want = _reference(models, cfg, batch, teacher=(t_graphdef, t_params))
    np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["teacher_kl"]), float(aux["teacher_kl"]), rtol=1e-5)
    assert abs(float(aux["teacher_kl"])) > 1e-2
    _close(grads, want)


def test_teacher_equal_to_student_gives_zero_full_loss_and_gradient(models):
  """The student as its own teacher (same weights, same graph): the exact KL is
  0 on every token, so `opd` with `full` has zero loss and zero gradient."""
  graphdef, params, _, _ = models
  cfg = step_lib.StepConfig(
    loss=obj.LossConfig.preset("opd", distill_estimator="full", distill_on_demos=True),
    logit_chunk=16,
  )
  metrics, grads = _step(models, cfg, _batch(1), teacher=(graphdef, params))
  assert abs(float(metrics["loss"])) < 1e-6 and abs(float(metrics["teacher_kl"])) < 1e-6
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-6


def test_micro_batches_with_a_teacher_are_exact(models):
  """Two micro-batches (the teacher's pre-pass in micro-batch chunks, its
  hidden states split with the rows) give the one micro-batch's loss, metrics
  and gradient; the sampled estimator's: the packed test below."""
  loss_cfg = obj.LossConfig.preset("srft_opd", distill_estimator="full", distill_on_demos=True)
  one = step_lib.StepConfig(loss=loss_cfg, logit_chunk=16, response_len=R)
  two = dataclasses.replace(one, microbatches=2)
  batch = _batch(2)
  (m1, g1), (m2, g2) = _step(models, one, batch), _step(models, two, batch)
  for k in ("loss", "distill", "distill_demo", "teacher_kl"):
    np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  _close(g2, g1)


@pytest.mark.multidevice
def test_sharded_step_with_a_teacher_equals_single_device(models):
  """Student and teacher sharded by the same rules on a (data, fsdp, tensor)
  mesh of 2 x 2 x 2, the teacher an undonated argument of the jitted step."""
  graphdef, params, t_graphdef, t_params = models
  cfg = step_lib.StepConfig(
    loss=obj.LossConfig.preset("srft_opd", distill_estimator="full", distill_on_demos=True),
    microbatches=2,
    logit_chunk=16,
    response_len=R,
  )
  batch = _batch(3)
  want = _step(models, cfg, batch)
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  # From host copies: the step donates its state, the fixture's params must survive.
  s_params = jax.device_put(
    jax.device_get(params), shd.state_shardings(params, mesh, STUDENT.rules)
  )
  t_sh = shd.state_shardings(t_params, mesh, STUDENT.rules)
  s_teacher = jax.device_put(t_params, t_sh)
  state = step_lib.init_train_state(s_params, _SGD)
  state_sh = step_lib.state_shardings(state, mesh, STUDENT.rules)
  batch_sh = step_lib.batch_shardings(batch, mesh, STUDENT.rules)
  fn = step_lib.jit_train_step(
    graphdef, _SGD, cfg, state_sh, batch_sh, None, None, None, t_sh, t_graphdef
  )
  with jax.set_mesh(mesh):
    state, metrics = fn(
      jax.device_put(state, state_sh), jax.device_put(batch, batch_sh), None, None, None, s_teacher
    )
  assert len(s_teacher["embed"][...].sharding.device_set) > 1  # the teacher is sharded ...
  assert not s_teacher["embed"][...].is_deleted()  # ... and not donated
  grads = jax.tree.map(lambda a, b: a - np.asarray(b), params, state["params"])
  for k in ("loss", "distill", "distill_demo", "teacher_kl"):
    np.testing.assert_allclose(float(metrics[k]), float(want[0][k]), rtol=1e-5, atol=1e-6)
  _close(grads, want[1])


@pytest.mark.parametrize("estimator", ["sampled", pytest.param("full", marks=pytest.mark.slow)])
def test_packed_lora_step_with_a_teacher_equals_unpacked(models, estimator):
  """LoRA adapters train beside a separate teacher, the rows packed in two
  micro-batches (docs/method.md §18): the teacher's log-probs (sampled) or
  hidden states (full) come from the same packed slots, and the step equals
  the unpacked one-micro-batch step."""
  _, _, t_graphdef, t_params = models
  model = lora.attach(
    model_lib.Transformer(STUDENT, rngs=nnx.Rngs(1)), lora.LoRAConfig(rank=4, alpha=8.0)
  )
  graphdef, adapters, base = lora.split(model)
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B != 0: the adapters act
  batch = _batch(5)
  plain = step_lib.StepConfig(
    loss=obj.LossConfig.preset("srft_opd", distill_on_demos=True, distill_estimator=estimator),
    logit_chunk=16,
  )
  packed = dataclasses.replace(plain, microbatches=2, pack_len=T, pack_rows=2)
  starts, lengths = packing.row_extents(np.asarray(batch["mask"]))
  plan = packing.make_plan(
    starts, lengths, row_len=T, pack_len=T, pack_rows=2, minibatches=1, microbatches=2
  )
  run = _jitted_step(t_graphdef)
  out = []
  for cfg, pack in ((plain, None), (packed, jax.tree.map(jnp.asarray, plan))):
    state = step_lib.init_train_state(adapters, _SGD)
    state, metrics = run(graphdef, _SGD, cfg, state, batch, None, base, pack, t_params)
    out.append((metrics, jax.tree.map(lambda a, b: a - b, adapters, state["params"])))
  (m0, g0), (m1, g1) = out
  for k in ("loss", "distill", "distill_demo", "teacher_kl"):
    np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  _close(g1, g0)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 1e-3


def test_a_teacher_term_needs_the_teacher(models):
  graphdef, params, _, _ = models
  cfg = step_lib.StepConfig(loss=obj.LossConfig.preset("opd"), logit_chunk=16)
  state = step_lib.init_train_state(params, _SGD)
  with pytest.raises(ValueError, match="teacher's params"):
    step_lib.train_step(graphdef, _SGD, cfg, state, _batch(4))


# ----------------------------------------------------------------------------
# The run config: the teacher's fields, its tokenizer and vocabulary
# ----------------------------------------------------------------------------


WORDS = [f"w{i}" for i in range(V - 2)]


def _teacher_dir(path, vocab_size, words):
  """A tiny random teacher checkpoint (HF layout) with its tokenizer beside it."""
  cfg = dataclasses.replace(TEACHER, vocab_size=vocab_size)
  hf.save_model(model_lib.create_model(cfg, seed=5), str(path))
  return helpers.word_tokenizer(path, words)


def _spec(tmp_path, teacher, **overrides):
  c = factory.with_overrides(
    factory.load_config(os.path.join(helpers.ROOT, "configs", "default.py")),
    {
      "data.tokenizer": helpers.word_tokenizer(tmp_path / "student_tok", WORDS),
      "warmup.steps": 0,
      "method": "opd",
      "rollout.n_rollouts": 8,  # groups that split over the 8 test devices
      "teacher.hf_path": teacher,
      **overrides,
    },
  )
  return factory.run_spec(c)


def test_the_teacher_shares_the_students_tokenizer_and_vocabulary(tmp_path):
  """Refused before any model is built, naming both sides: another tokenizer
  of the same size, then a teacher with fewer rows than the tokenizer has
  ids; the same tokenizer passes, padded to another size too."""
  from srft_jax import tokenizer as tok_lib

  student_tok = tok_lib.load_tokenizer(helpers.word_tokenizer(tmp_path / "student_tok", WORDS))
  same = _teacher_dir(tmp_path / "same", V, WORDS)
  factory.check_teacher(_spec(tmp_path, same), student_tok)

  other = _teacher_dir(tmp_path / "other_tok", V, [f"x{i}" for i in range(V - 2)])
  with pytest.raises(factory.ConfigError) as e:
    factory.check_teacher(_spec(tmp_path, other), student_tok)
  msg = str(e.value)
  assert msg.startswith("config.teacher.hf_path:") and "tokenizer" in msg
  assert str(tmp_path / "other_tok") in msg and str(tmp_path / "student_tok") in msg

  # Padded to another size (docs/method.md §19.2): accepted while every id of
  # the tokenizer is a row; a teacher with fewer rows than ids is refused.
  factory.check_teacher(
    _spec(tmp_path, _teacher_dir(tmp_path / "wider", V + 16, WORDS)), student_tok
  )
  n = student_tok.vocab_size
  narrow = _teacher_dir(tmp_path / "narrow", n - 1, WORDS)
  with pytest.raises(factory.ConfigError) as e:
    factory.check_teacher(_spec(tmp_path, narrow), student_tok)
  msg = str(e.value)
  assert msg.startswith("config.teacher.hf_path:") and str(tmp_path / "narrow") in msg
  assert f"{n - 1} rows, fewer than the {n} ids" in msg and f"the teacher ({n - 1} rows)" in msg


@pytest.mark.parametrize(
  "overrides, match",
  [
    (
      {"method": "opd", "teacher.hf_path": ""},
      r"config\.teacher\.hf_path: stage 'opd' has a teacher",
    ),
    ({"method": "srft", "loss.distill_coef": 0.5, "teacher.hf_path": ""}, r"config\.teacher\.hf"),
    ({"method": "srft"}, r"config\.teacher\.hf_path: a teacher .* no stage has a teacher term"),
    ({"teacher.dtype": "int8"}, r"config\.teacher\.dtype: unknown dtype"),
    ({"teacher.temperature": -1.0}, r"config\.teacher\.temperature"),
    ({"teacher.hf_path": "/no/such/teacher"}, r"config\.teacher\.hf_path: no HF checkpoint"),
    (
      {"method": "opd", "rollout.dynamic_sampling": True},
      r"config\.rollout\.dynamic_sampling: stage \['opd'\] has no reward term",
    ),
  ],
)
def test_teacher_fields_are_checked_naming_the_field(tmp_path, overrides, match):
  teacher = _teacher_dir(tmp_path / "t", V, WORDS)
  with pytest.raises(factory.ConfigError, match=match):
    _spec(tmp_path, teacher, **overrides)


def test_distill_presets_are_selected_like_the_others(tmp_path):
  teacher = _teacher_dir(tmp_path / "t", V, WORDS)
  seven = {"rollout.n_rollouts": 7}  # 7 rollouts + 1 demonstration a group
  spec = _spec(tmp_path, teacher, method="srft_opd", **seven, **{"teacher.temperature": 0.5})
  (stage,) = spec.stages
  assert stage.loss.distill_coef == 1.0 and stage.step.distill == "sampled"
  assert stage.step.teacher_temperature == 0.5 and spec.distills
  assert spec.warmup_run is None or not spec.warmup_run.teacher.enabled
  spec = _spec(tmp_path, teacher, method="opd")
  assert spec.stages[0].layout.n_rollouts > 0  # the teacher term trains on rollouts
  assert not _spec(tmp_path, "", method="srft", **seven).distills
  c = factory.load_config(os.path.join(helpers.ROOT, "configs", "default.py") + ":srft_opd")
  assert c.method == "srft_opd"  # a config arg, as the other presets
  with pytest.raises(factory.ConfigError, match=r"^config\.teacher\.hf_path: stage 'srft_opd'"):
    factory.run_spec(c)


# ----------------------------------------------------------------------------
# Resume: the checkpoints name the teacher
# ----------------------------------------------------------------------------


def test_resume_with_another_teacher_is_refused(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  state = {"w": jnp.ones((2,), jnp.float32)}
  mine = {"path": "/teachers/a", "hash": "a" * 64}
  ckpt.save(1, state, {}, {"step": 1, "teacher": mine})
  ckpt.wait()
  trainer_lib.check_resume_teacher(ckpt, mine)
  trainer_lib.check_resume_teacher(ckpt, dict(mine, path="/moved/a"))  # same content: resumes
  other = {"path": "/teachers/b", "hash": "b" * 64}
  with pytest.raises(factory.ConfigError, match=r"another teacher: /teachers/a .*/teachers/b"):
    trainer_lib.check_resume_teacher(ckpt, other)
  with pytest.raises(factory.ConfigError, match=r"distilled from /teachers/a.*has no teacher"):
    trainer_lib.check_resume_teacher(ckpt, None)
  ckpt.close()


# ----------------------------------------------------------------------------
# End to end: `opd` through job.run
# ----------------------------------------------------------------------------

E2E = {
  "warmup.steps": 0,
  "method": "opd",
  "batch.prompts_per_step": 4,
  "batch.minibatches": 1,
  "rollout.n_rollouts": 4,
  "data.max_response_len": 16,
  "data.task_train_size": 64,
  "model.embed_dim": 32,
  "model.num_layers": 1,
  "model.mlp_dim": 64,
  "optim.lr": 1e-2,
  # The exact KL: a steady fall in a few steps (the sampled estimate is noisy at this size).
  "loss.distill_estimator": "full",
  "eval.before": False,
  "eval.after": False,
  "log.progress": False,
  "log.tensorboard": False,
  "log.plots": False,
  "checkpoint.every": 0,  # a checkpoint at the end only
  "checkpoint.export_hf": False,
  "seed": 3,
}
E2E_STEPS = 12


def _confident_teacher(path, vocab_size, seed, scale=20.0):
  """A random teacher whose output layer is scaled up: peaked distributions
  that a random student is far from (a large reverse KL to close)."""
  cfg = dataclasses.replace(TEACHER, vocab_size=vocab_size, tie_embeddings=False, max_seq_len=128)
  model = model_lib.create_model(cfg, seed=seed)
  model.lm_head[...] = model.lm_head[...] * scale
  hf.save_model(model, str(path))
  return str(path)


@pytest.fixture(scope="module")
def opd_runs(tmp_path_factory, tokenizer_path):
  """`run(workdir, **overrides)`: job.run of the tiny `opd` run (a confident
  random teacher in bfloat16, the task tokenizer named by teacher.tokenizer),
  every run sharing one persistent compilation cache. The student is an HF
  checkpoint padded 16 rows past the tokenizer, the teacher has exactly its
  rows (one tokenizer padded to two sizes, docs/method.md §19.6)."""
  from srft_jax import job
  from srft_jax import tokenizer as tok_lib

  root = tmp_path_factory.mktemp("opd")
  vocab = tok_lib.load_tokenizer(tokenizer_path).vocab_size
  teachers = {s: _confident_teacher(root / f"teacher{s}", vocab, seed=s) for s in (5, 6)}
  defaults = factory.load_config(os.path.join(helpers.ROOT, "configs", "default.py"))
  spec = factory.run_spec(factory.with_overrides(defaults, E2E), validate=False)
  student = dataclasses.replace(spec.model.config(vocab), vocab_size=vocab + 16)
  hf.save_model(model_lib.create_model(student, seed=0), str(root / "student"))
  base = {
    **E2E,
    "model.hf_path": str(root / "student"),
    "data.tokenizer": tokenizer_path,
    "teacher.hf_path": teachers[5],
    "teacher.tokenizer": tokenizer_path,
    "teacher.dtype": "bfloat16",  # as a large teacher runs: its params and hidden states
    "checkpoint.compile_cache": str(root / "compile_cache"),
  }

  def run(workdir, **overrides):
    c = factory.with_overrides(
      factory.load_config(os.path.join(helpers.ROOT, "configs", "default.py")),
      {**base, "steps": E2E_STEPS, **overrides},
    )
    return job.run(factory.run_spec(c), str(workdir))

  run.teachers, run.root = teachers, root
  return run


def _metric_rows(workdir):
  with open(os.path.join(str(workdir), "logs", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if k.startswith(("loss/", "step"))} for r in rows]


@pytest.mark.slow
def test_opd_run_closes_the_kl_and_refuses_another_teacher(opd_runs, tmp_path):
  """`opd` end to end: the teacher KL falls; the checkpoint names the teacher;
  resuming it with another teacher is refused before any step compiles. (A
  kill and resume bitwise with a teacher: tests/test_train.py, SIGTERM.)
  The student is wider than its teacher: its rollouts draw only ids the
  teacher has (the sampler's vocab_limit); without the limit the random
  student draws padded ids, the teacher's KL turns non-finite and the steps
  are skipped."""
  assert opd_runs(tmp_path)["steps"] == E2E_STEPS
  kl = [r["loss/teacher_kl"] for r in _metric_rows(tmp_path)]
  assert len(kl) == E2E_STEPS and np.mean(kl[-3:]) < 0.9 * np.mean(kl[:3]), kl
  with open(tmp_path / "logs" / "metrics.jsonl") as f:
    assert all(json.loads(line).get("nonfinite/total", 0) == 0 for line in f if line.strip())
  meta = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).read_meta()
  assert meta["step"] == E2E_STEPS and meta["teacher"]["path"] == opd_runs.teachers[5]
  with pytest.raises(factory.ConfigError, match="another teacher"):
    opd_runs(tmp_path, **{"teacher.hf_path": opd_runs.teachers[6]})
