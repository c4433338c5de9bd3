"""One full SRFT train step, split into sample / score / update.

Shape: 8 prompts x 4 rollouts (+ 1 demonstration each, the SRFT group),
64 prompt tokens + 64 new tokens (no EOS, so no early stop), float32, the
sampler benchmark's Qwen2 shape: vocab 16384, embed 512, mlp 1536, 8 layers,
8 heads (2 kv) x 64, untied embeddings = 40.9M parameters. The update is the
`srft` preset with 2 mini-batches (2 AdamW updates a step, as in the paper),
jitted once with a donated state. Scoring decodes rollouts with the built-in
task's tokenizer (ids taken modulo its vocabulary) and runs the math verifier
pool on them and on real task demonstrations.

Prints one JSON line:
  {"step_s", "sample_s", "score_s", "update_s", "tunix_step_s", "ratio", ...}
`ratio` = step_s / tunix_step_s (target: <= 0.5), null unless
`--tunix_python=/path/to/side/venv/bin/python` (a venv with google-tunix) is
given; Tunix's `GRPOLearner` then runs the same model shape and batch (4
generations a prompt, no demonstrations) in that interpreter.

  python benchmarks/step_time.py [--repeats 3] [--tunix_python PY]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompts", type=int, default=8)
  p.add_argument("--rollouts", type=int, default=4)
  p.add_argument("--demos", type=int, default=1)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--minibatches", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up; median")
  p.add_argument("--vocab", type=int, default=16384)
  p.add_argument("--embed", type=int, default=512)
  p.add_argument("--mlp", type=int, default=1536)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument(
    "--shared_prefix",
    type=int,
    default=1,
    help="1 (the default config's setting): each prompt runs once per group in the update",
  )
  p.add_argument("--tunix_python", default="", help="python of a side venv with google-tunix")
  return p.parse_args(argv)


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tunix_side  # noqa: E402  (benchmarks/, beside this script)
from flax import nnx  # noqa: E402

from srft_jax import model as model_lib  # noqa: E402
from srft_jax import objectives as obj  # noqa: E402
from srft_jax import rewards as rewards_lib  # noqa: E402
from srft_jax import sampler as smp  # noqa: E402
from srft_jax import step as step_lib  # noqa: E402


def _model_cfg(a):
  return model_lib.ModelConfig(
    model_type="qwen2",
    vocab_size=a.vocab,
    embed_dim=a.embed,
    mlp_dim=a.mlp,
    num_layers=a.layers,
    num_heads=a.heads,
    num_kv_heads=a.kv_heads,
    head_dim=a.head_dim,
    max_seq_len=a.prompt_len + a.new_tokens + 8,
    qkv_bias=True,
    tie_embeddings=False,
  )


def _inputs(a, task_tok):
  """Random prompts; real task demonstrations re-encoded into the model's ids."""
  from srft_jax.data import task

  rs = np.random.RandomState(0)
  ptok = rs.randint(1, a.vocab, size=(a.prompts, a.prompt_len)).astype(np.int32)
  pmask = np.ones_like(ptok)
  rows = task.generate("train", a.prompts, 0)
  r = a.new_tokens
  dtok = np.zeros((a.prompts, r), np.int32)
  dmask = np.zeros((a.prompts, r), np.int32)
  for i, row in enumerate(rows):
    ids = (task_tok.encode(row["target"]) + [task_tok.eos_id])[:r]
    dtok[i, : len(ids)] = ids
    dmask[i, : len(ids)] = 1
  return ptok, pmask, dtok, dmask, [row["answer"] for row in rows]


def run_srft(a) -> dict:
  from srft_jax.data import task

  cfg = _model_cfg(a)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  n_params = model_lib.count_params(model)
  with tempfile.TemporaryDirectory() as d:
    task_tok = task.get_task_tokenizer(d, seed=0)
  ptok, pmask, dtok, dmask, answers = _inputs(a, task_tok)
  ptok, pmask, dtok_d, dmask_d = map(jnp.asarray, (ptok, pmask, dtok, dmask))
  n, dn = a.rollouts, a.demos
  layout = step_lib.GroupLayout(n, dn)
  scfg = smp.SamplingConfig(
    max_new_tokens=a.new_tokens,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    eos_ids=(),
    pad_id=0,
    prompt_buckets=(a.prompt_len,),
    n=n,
  )
  graphdef, params = nnx.split(model)
  tx, _ = step_lib.make_optimizer(1e-6, steps=100)
  step_cfg = step_lib.StepConfig(
    loss=obj.LossConfig.preset("srft"),
    minibatches=a.minibatches,
    response_len=a.new_tokens,  # as the trainer builds it
    logit_chunk=2048,  # configs/default.py
    group=layout.size if a.shared_prefix else 0,
  )
  step_fn = jax.jit(
    functools.partial(step_lib.train_step, graphdef, tx, step_cfg), donate_argnums=(0,)
  )
  assemble = jax.jit(functools.partial(step_lib.assemble_batch, layout=layout))
  advantages = jax.jit(
    functools.partial(step_lib.rollout_advantages, layout=layout, cfg=obj.AdvantageConfig())
  )
  state = step_lib.init_train_state(params, tx)
  demo_texts = task_tok.batch_decode(dtok, dmask)

  def one_step(state, seed):
    t0 = time.perf_counter()
    m = nnx.merge(graphdef, state["params"])
    roll = smp.sample(m, ptok, pmask, jax.random.key(seed), scfg)
    roll_tok = np.asarray(roll.tokens)
    roll_mask = np.asarray(roll.mask)
    t1 = time.perf_counter()
    texts = task_tok.batch_decode(roll_tok % task_tok.vocab_size, roll_mask)
    all_texts, truths = [], []
    for i in range(a.prompts):
      all_texts += texts[i * n : (i + 1) * n] + demo_texts[i : i + 1] * dn
      truths += [answers[i]] * (n + dn)
    rewards, _ = scorer.score(all_texts, truths)
    t2 = time.perf_counter()
    rewards = jnp.asarray(rewards, jnp.float32)
    batch = assemble(
      ptok,
      pmask,
      roll.tokens,
      roll.mask,
      roll.logprobs,
      dtok_d,
      dmask_d,
      rewards,
      advantages(rewards),
    )
    state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    t3 = time.perf_counter()
    return state, (t3 - t0, t1 - t0, t2 - t1, t3 - t2)

  with rewards_lib.RewardScorer() as scorer:
    state, _ = one_step(state, 0)  # compile
    times = []
    for r in range(a.repeats):
      state, t = one_step(state, r + 1)
      times.append(t)
  med = np.median(np.asarray(times), axis=0)
  return {
    "params": n_params,
    "step_s": float(med[0]),
    "sample_s": float(med[1]),
    "score_s": float(med[2]),
    "update_s": float(med[3]),
    "all_steps_s": [round(t[0], 3) for t in times],
  }


# Tunix's GRPOLearner, in the side interpreter (after tunix_side.PREAMBLE).
_TUNIX_BODY = r"""
import optax
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
actor, reference = make_model(), make_model()
mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
steps = spec["repeats"] + 1  # global steps; the first compiles
cluster_cfg = rl_cluster_lib.ClusterConfig(
    role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                  rl_cluster_lib.Role.ROLLOUT: mesh},
    rollout_engine="vanilla", offload_to_cpu=False,
    training_config=rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adamw(1e-6, weight_decay=0.01), eval_every_n_steps=10**9,
        max_steps=steps * spec["minibatches"], mini_batch_size=spec["prompts"] // spec["minibatches"],
        train_micro_batch_size=spec["prompts"] // spec["minibatches"]),
    rollout_config=base_rollout.RolloutConfig(
        max_tokens_to_generate=spec["new_tokens"], max_prompt_length=spec["prompt_len"],
        kv_cache_size=spec["prompt_len"] + spec["new_tokens"] + 8, temperature=1.0, top_p=1.0,
        top_k=None))
cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=hf_tok,
                                   cluster_config=cluster_cfg)
learner = grpo_learner.GRPOLearner(
    rl_cluster=cluster, reward_fns=[lambda prompts, completions, **kw: [0.0] * len(completions)],
    algo_config=grpo_learner.GRPOConfig(num_generations=spec["rollouts"], num_iterations=1,
                                        beta=0.0, epsilon=0.2))
def batch():
  return {"prompts": [random_prompt() for _ in range(spec["prompts"])]}
# One global step = sample + score + advantages + `minibatches` updates; data
# is prepared on a worker thread inside it, so time the global step itself.
per_step = []
run_global_step = learner._run_global_step
def timed_global_step(*args, **kwargs):
  t0 = time.perf_counter()
  out = run_global_step(*args, **kwargs)
  jax.block_until_ready(nnx.state(actor))
  per_step.append(time.perf_counter() - t0)
  return out
learner._run_global_step = timed_global_step
learner.train(iter([batch() for _ in range(steps)]))
assert len(per_step) == steps, per_step
per_step = per_step[1:]  # the first step compiles
print(json.dumps({"seconds": float(np.median(per_step))}))
"""


def run_tunix(a) -> float:
  spec = {
    k: getattr(a, k)
    for k in tunix_side.MODEL_KEYS
    + ("prompt_len", "new_tokens", "prompts", "rollouts", "minibatches", "repeats")
  }
  return tunix_side.run(a.tunix_python, _TUNIX_BODY, spec)


def main(argv=None):
  a = _args(argv)
  result = {
    "backend": jax.default_backend(),
    "devices": jax.device_count(),
    "prompts": a.prompts,
    "rollouts": a.rollouts,
    "demos": a.demos,
    "prompt_len": a.prompt_len,
    "new_tokens": a.new_tokens,
    "minibatches": a.minibatches,
    "repeats": a.repeats,
    "shared_prefix": a.shared_prefix,
  }
  result.update(run_srft(a))
  result["tunix_step_s"] = None
  if a.tunix_python:
    try:
      result["tunix_step_s"] = run_tunix(a)
    except Exception as e:  # noqa: BLE001  (reported, not hidden)
      result["tunix_error"] = f"{type(e).__name__}: {e}"
  t = result["tunix_step_s"]
  result["ratio"] = result["step_s"] / t if t else None
  keys = ("step_s", "sample_s", "score_s", "update_s", "tunix_step_s", "ratio")
  print(json.dumps({**{k: result[k] for k in keys}, **result}))


if __name__ == "__main__":
  main()
