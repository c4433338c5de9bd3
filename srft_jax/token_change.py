"""Which tokens does fine-tuning move? (docs/method.md §7 claim 4.)

The paper claims SFT changes token probabilities across whole sequences while
RL changes few tokens, mostly high-entropy ones. Here: teacher-force the same
responses (e.g. the demonstrations of fixed eval problems) through a base
model and a tuned model, and count the response tokens whose probability of
the taken token moved by more than `threshold` (0.1), overall and split by the
*base* model's entropy quartile at that position.

Everything is a pure function of (models, token batch); `demo_batch` builds
the batch the study uses. A tuned model with LoRA adapters is its own base:
the same weights with the adapters switched off (no second copy).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srft_jax import lora
from srft_jax import step as step_lib
from srft_jax.tokenizer import render_prompt

THRESHOLD = 0.1  # |p_tuned - p_base| above this counts as "moved"
QUARTILES = 4


@functools.partial(jax.jit, static_argnums=0)
def _probs_and_entropy(graphdef, params, tokens_BT, mask_BT, frozen=None):
  logp, ent = step_lib.sequence_logprobs(graphdef, params, tokens_BT, mask_BT, frozen=frozen)
  return jnp.exp(logp), ent


def token_probs(
  model, tokens_BT, mask_BT, *, adapters_off: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """(p of each next token, full-vocabulary entropy), both float32 [B, T-1],
  teacher forced (the trainer's own log-prob path, temperature 1).
  `adapters_off`: a model with LoRA adapters scores as its base (zero adapters)."""
  tokens_BT, mask_BT = jnp.asarray(tokens_BT, jnp.int32), jnp.asarray(mask_BT, jnp.int32)
  if lora.has_adapters(model):
    graphdef, adapters, base = lora.split(model)
    if adapters_off:
      adapters = lora.zeros_like(adapters)
    p, ent = _probs_and_entropy(graphdef, adapters, tokens_BT, mask_BT, base)
  elif adapters_off:
    raise ValueError("token_probs: adapters_off needs a model with LoRA adapters")
  else:
    graphdef, params = nnx.split(model)
    p, ent = _probs_and_entropy(graphdef, params, tokens_BT, mask_BT)
  return np.asarray(jax.device_get(p)), np.asarray(jax.device_get(ent))


def entropy_quartiles(ent_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(quartile index 0..3 of each value, the 3 inner edges). Quartile 3 is the
  highest-entropy quarter; a value equal to an edge goes to the lower quartile."""
  edges = np.quantile(ent_N, [0.25, 0.5, 0.75]) if ent_N.size else np.zeros(3)
  return np.searchsorted(edges, ent_N, side="left"), edges


def change_fractions(p_base_N, p_tuned_N, ent_base_N, *, threshold: float = THRESHOLD) -> dict:
  """Moved-token statistics over N response tokens (flat arrays).

  moved_frac: fraction of all tokens with |Δp| > threshold;
  moved_frac_by_quartile[q]: that fraction among the tokens of base-entropy quartile q;
  moved_share_by_quartile[q]: the share of the moved tokens that lie in quartile q
    (sums to 1; NaN when nothing moved).
  """
  p0 = np.asarray(p_base_N, np.float64).reshape(-1)
  p1 = np.asarray(p_tuned_N, np.float64).reshape(-1)
  h0 = np.asarray(ent_base_N, np.float64).reshape(-1)
  dp = np.abs(p1 - p0)
  moved = dp > threshold
  q, edges = entropy_quartiles(h0)
  n_q = np.array([(q == i).sum() for i in range(QUARTILES)])
  moved_q = np.array([(moved & (q == i)).sum() for i in range(QUARTILES)])
  n_moved = int(moved.sum())
  return {
    "n_tokens": int(p0.size),
    "n_moved": n_moved,
    "moved_frac": float(n_moved / max(p0.size, 1)),
    "moved_frac_by_quartile": [float(m / n) if n else float("nan") for m, n in zip(moved_q, n_q)],
    "moved_share_by_quartile": [float(m / n_moved) if n_moved else float("nan") for m in moved_q],
    "tokens_by_quartile": n_q.tolist(),
    "entropy_edges": [float(e) for e in edges],
    "mean_abs_dp": float(dp.mean()) if dp.size else float("nan"),
    "threshold": threshold,
  }


def token_change(
  base_model, tuned_model, tokens_BT, mask_BT, response_mask_BT, *, threshold: float = THRESHOLD
) -> dict:
  """`change_fractions` of the response tokens of a teacher-forced batch.

  tokens_BT / mask_BT: prompt + response rows (right padded); response_mask_BT
  marks response tokens in the same [B, T] layout (1 on each response token).
  `base_model=None`: the tuned model carries LoRA adapters, and its base is the
  same model with them switched off.
  """
  if base_model is None:
    p0, h0 = token_probs(tuned_model, tokens_BT, mask_BT, adapters_off=True)
  else:
    p0, h0 = token_probs(base_model, tokens_BT, mask_BT)
  p1, _ = token_probs(tuned_model, tokens_BT, mask_BT)
  # Column t scores token t+1: the targets' response mask is shifted by one.
  sel = np.asarray(response_mask_BT)[:, 1:] > 0
  return change_fractions(p0[sel], p1[sel], h0[sel], threshold=threshold)


def demo_batch(
  tokenizer, rows: Sequence[dict], *, template: str = "plain"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, mask, response_mask) [B, T] of prompt + demonstration + EOS rows,
  the same rendering as the trainer's probe (evaluate.make_eval_hook)."""
  prompts = [tokenizer.encode(render_prompt(r["prompt"], template=template)) for r in rows]
  demos = [tokenizer.encode(r["target"]) + [tokenizer.eos_id] for r in rows]
  width = max(len(p) + len(d) for p, d in zip(prompts, demos))
  tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)
  mask = np.zeros_like(tokens)
  resp = np.zeros_like(tokens)
  for i, (p, d) in enumerate(zip(prompts, demos)):
    tokens[i, : len(p) + len(d)] = p + d
    mask[i, : len(p) + len(d)] = 1
    resp[i, len(p) : len(p) + len(d)] = 1
  return tokens, mask, resp
