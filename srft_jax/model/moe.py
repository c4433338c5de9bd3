"""Mixture of experts (Qwen3-MoE): the router's load-balancing statistics and
loss, grouped matmuls and the dropless expert FFN (sharded under a mesh), and
the `MoE` layer.

A float32 router picks the top-k experts of each token; tokens are grouped by
expert and run through grouped matmuls (`grouped_matmul`: megablox kernels on
TPU, jax.lax.ragged_dot elsewhere; dropless), and the router's
load-balancing loss (`router_aux_loss`) goes to the trainer on request.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from srft_jax import sharding as shd
from srft_jax.model.config import ModelConfig
from srft_jax.model.layers import param

Array = jax.Array
f32 = jnp.float32


class RouterStats(NamedTuple):
  """Load-balancing statistics of MoE layers, summed over layers and real
  tokens (what HF's `load_balancing_loss_func` reduces, attention mask
  included); sums, so micro-batches and shared prompts add up."""

  counts: Array  # [E] float32: top-k assignments to each expert
  probs: Array  # [E] float32: router probability of each expert
  tokens: Array  # [] float32: real tokens, once per MoE layer


def add_router_stats(a: RouterStats | None, b: RouterStats | None, scale_a=1) -> RouterStats | None:
  """scale_a * a + b, either may be None (no MoE layer)."""
  if a is None:
    return b
  if scale_a != 1:
    a = jax.tree.map(lambda x: x * scale_a, a)
  return a if b is None else jax.tree.map(jnp.add, a, b)


def router_aux_loss(stats: RouterStats, num_experts: int) -> Array:
  """The Switch-Transformer load-balancing loss as HF Qwen3-MoE computes it:
  E * sum_e f_e * P_e, f_e the fraction of top-k assignments to expert e and
  P_e its mean router probability, both over every MoE layer's real tokens.
  X (experts a token) when the load is perfectly balanced: f sums to X, P to 1."""
  n = jnp.maximum(stats.tokens, 1.0)
  return num_experts * jnp.sum((stats.counts / n) * (stats.probs / n))


class RouterAux(NamedTuple):
  """A forward's router load-balancing loss and the weight training gives it."""

  loss: Array  # router_aux_loss over the forward's real tokens
  coef: float  # ModelConfig.router_aux_loss_coef


def router_aux(cfg: ModelConfig, stats: RouterStats | None) -> RouterAux | None:
  """`RouterAux` of a forward's router statistics; None without MoE layers."""
  if stats is None:
    return None
  return RouterAux(router_aux_loss(stats, cfg.num_experts), cfg.router_aux_loss_coef)


# megablox (m, k, n) tile sizes, MaxText's defaults; each is cut to its dim.
MEGABLOX_TILING = (512, 1024, 1024)


def _megablox_gmm(x_AK, w_GKN, sizes_G, interpret=False):
  a, k = x_AK.shape
  tiling = tuple(min(t, d) for t, d in zip(MEGABLOX_TILING, (a, k, w_GKN.shape[2])))
  pad = (-a) % tiling[0]  # rows: a whole number of tiles
  x = jnp.pad(x_AK, ((0, pad), (0, 0)))
  y = megablox.gmm(x, w_GKN, sizes_G, x_AK.dtype, tiling, None, None, False, interpret)
  return y[:a]


def grouped_matmul(x_AK: Array, w_GKN: Array, sizes_G: Array, impl: str = "auto") -> Array:
  """Rows of x grouped in order (group g: the next sizes[g] rows) times w[g], [A, N].

  Rows past sum(sizes) are unspecified (the caller masks them). jax.lax.ragged_dot
  runs natively forward on TPU, but XLA:TPU expands its weight gradient (a
  ragged contraction) into a dense masked matmul over all G groups (G x the
  FLOPs); megablox' `gmm` / `tgmm` Pallas kernels (its custom VJP) are
  grouped in both directions. `impl` "auto" picks megablox where the program
  is lowered for TPU (`platform_dependent`: the AOT tool compiles for TPU on a
  CPU host) and ragged_dot elsewhere; "megablox" runs the kernels' interpreter
  off TPU.
  """
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x_AK, w_GKN, sizes_G)
  if impl == "megablox":
    other = lambda *a: _megablox_gmm(*a, interpret=True)  # noqa: E731
  else:
    other = jax.lax.ragged_dot
  return jax.lax.platform_dependent(x_AK, w_GKN, sizes_G, tpu=_megablox_gmm, default=other)


def grouped_ffn(
  x_BTD: Array,
  experts_BTX: Array,
  weights_BTX: Array,
  valid_BT: Array,
  gate_EDF: Array,
  up_EDF: Array,
  down_EFD: Array,
  first_expert=0,
  impl: str = "auto",
) -> Array:
  """sum_j weights[t, j] * FFN_{experts[t, j]}(x[t]) for each token, [B, T, D].

  Dropless: the M * X token-expert assignments are sorted by expert and run
  through three grouped matmuls (`grouped_matmul`: group e is the rows of
  expert e), then unsorted and summed with their weights (float32
  accumulation). The weights hold experts first_expert .. first_expert + E - 1
  (one shard's); assignments to other experts, and every assignment of a token
  with valid 0, form a trailing group that no matmul reads (output 0).
  """
  b, t, d = x_BTD.shape
  xk, e = experts_BTX.shape[-1], gate_EDF.shape[0]
  x_MD = x_BTD.reshape(b * t, d)
  local_MX = experts_BTX.reshape(b * t, xk) - first_expert
  keep_MX = (valid_BT.reshape(b * t, 1) > 0) & (local_MX >= 0) & (local_MX < e)
  group_A = jnp.where(keep_MX, local_MX, e).reshape(-1)
  order_A = jnp.argsort(group_A, stable=True)
  sizes_E = jnp.bincount(group_A, length=e + 1)[:e].astype(jnp.int32)
  in_groups_A = jnp.arange(order_A.shape[0]) < jnp.sum(sizes_E)
  # Rows past the groups are zeroed on the way in and the way out: grouped
  # matmuls leave them unspecified, in values and in gradients.
  xs_AD = jnp.where(in_groups_A[:, None], jnp.take(x_MD, order_A // xk, axis=0), 0)
  g_AF = grouped_matmul(xs_AD, gate_EDF, sizes_E, impl)
  u_AF = grouped_matmul(xs_AD, up_EDF, sizes_E, impl)
  ys_AD = grouped_matmul(jax.nn.silu(g_AF) * u_AF, down_EFD, sizes_E, impl)
  inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0]))
  y_MXD = jnp.take(ys_AD, inverse_A, axis=0).reshape(b * t, xk, d)
  y_MXD = jnp.where(keep_MX[..., None], y_MXD, 0)
  w_MX = jnp.where(keep_MX, weights_BTX.reshape(b * t, xk), 0).astype(y_MXD.dtype)
  y_MD = jnp.einsum("MXD,MX->MD", y_MXD, w_MX, preferred_element_type=f32)
  return y_MD.astype(x_BTD.dtype).reshape(b, t, d)


def moe_ffn(
  x_BTD, experts_BTX, weights_BTX, valid_BT, gate_EDF, up_EDF, down_EFD, rules=None, impl="auto"
) -> Array:
  """`grouped_ffn` of every token over every expert, under the ambient mesh.

  One device: `grouped_ffn` itself. Under a mesh, one `shard_map` over the
  layouts the rules give: each shard runs its rows (the batch axes) through
  the experts it holds (the `expert` axes) and its slice of F (the `mlp` axes).
  The weights' `embed` split (FSDP) is all-gathered inside, after a barrier
  that ties the gather to this layer's input: XLA can then neither hoist every
  layer's gathered experts out of the micro-batch loop (all of them alive at
  once: 58 GB a chip for Qwen3-30B-A3B) nor start them early; their gradient
  is reduce-scattered. Expert and mlp axes that also split the rows gather
  those rows first and reduce-scatter the result (expert parallelism by
  all-gather); the others are summed (psum).
  """
  mesh = jax.sharding.get_abstract_mesh()
  args = (x_BTD, experts_BTX, weights_BTX, valid_BT.astype(jnp.int32), gate_EDF, up_EDF, down_EFD)
  if mesh is None or mesh.empty or mesh.size == 1:
    return grouped_ffn(*args, impl=impl)
  P = jax.sharding.PartitionSpec
  tok = shd.logical_to_spec(("batch", "length", None), rules, mesh, x_BTD.shape)
  w_in = shd.logical_to_spec(("expert", "embed", "mlp"), rules, mesh, gate_EDF.shape)
  w_out = shd.logical_to_spec(("expert", "mlp", "embed"), rules, mesh, down_EFD.shape)
  expert_axes, embed_axes, mlp_axes = map(shd.mesh_axes, w_in)
  if (expert_axes, mlp_axes, embed_axes) != tuple(map(shd.mesh_axes, w_out)):
    raise NotImplementedError(f"moe_ffn: gate/up {w_in} and down {w_out} split differently")
  row_axes = set(shd.mesh_axes(tok[0]))
  split = expert_axes + mlp_axes
  gather = tuple(a for a in split if a in row_axes)
  reduce = tuple(a for a in split if a not in row_axes)
  if set(split) & set(shd.mesh_axes(tok[1])):
    raise NotImplementedError("moe_ffn: a sequence split over the expert or mlp axes")
  tok3, tok2 = P(tok[0], tok[1], None), P(tok[0], tok[1])

  def shard(x, idx, wt, valid, gate, up, down):
    if embed_axes:  # FSDP: this layer's experts, gathered when its input exists
      x, gate, up, down = jax.lax.optimization_barrier((x, gate, up, down))
      gate, up = (jax.lax.all_gather(w, embed_axes, axis=1, tiled=True) for w in (gate, up))
      down = jax.lax.all_gather(down, embed_axes, axis=2, tiled=True)
    if gather:
      x, idx, wt, valid = (
        jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (x, idx, wt, valid)
      )
    first = jax.lax.axis_index(expert_axes) * gate.shape[0] if expert_axes else 0
    y = grouped_ffn(x, idx, wt, valid, gate, up, down, first, impl)
    if gather:
      y = jax.lax.psum_scatter(y, gather, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, reduce) if reduce else y

  return jax.shard_map(
    shard,
    mesh=mesh,
    in_specs=(tok3, tok3, tok3, tok2, w_in, w_in, w_out),
    out_specs=tok3,
    # Unchecked (megablox' Pallas calls carry no varying-axes types): the
    # backward pass then sums the inputs' cotangents over the axes their
    # specs leave out (each expert / mlp shard's share of d(x), d(weights)).
    check_vma=False,
  )(*args)


class MoE(nnx.Module):
  """Qwen3-MoE's sparse MLP block: router, top-k, dropless grouped experts.

  The router runs in float32 (logits, softmax, top-k, renormalisation when
  `norm_topk_prob`); expert weights are gate/up [E, D, F] and down [E, F, D],
  logical axes ("expert", "embed", "mlp"). Padding tokens are routed nowhere
  (output 0: no real token reads them) and are left out of the statistics.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, e, f, pd = cfg.embed_dim, cfg.num_experts, cfg.moe_mlp_dim, cfg.jnp_param_dtype
    self.cfg = cfg
    self.router = param(rngs, (d, e), ("embed", None), pd)
    self.gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd)
    self.up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd)
    self.down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), pd)

  def decode_weights(self) -> dict[str, Array]:
    """Expert weights in the compute dtype (the router in float32): the
    sampler's decode steps run the normal path on them, uncast."""
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    up_names, down_names = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
    return {
      "router": self.router[...].astype(f32),
      "gate": shd.constrain(self.gate[...].astype(dt), up_names, cfg.rules),
      "up": shd.constrain(self.up[...].astype(dt), up_names, cfg.rules),
      "down": shd.constrain(self.down[...].astype(dt), down_names, cfg.rules),
    }

  def __call__(self, x_BTD, mask_BT=None, w=None) -> tuple[Array, RouterStats]:
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    if w is None:
      w = {
        "router": self.router[...],
        "gate": self.gate[...].astype(dt),
        "up": self.up[...].astype(dt),
        "down": self.down[...].astype(dt),
      }
    e, xk = cfg.num_experts, cfg.num_experts_per_tok
    logits_BTE = jnp.einsum("BTD,DE->BTE", x_BTD.astype(f32), w["router"].astype(f32))
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    top_p_BTX, top_i_BTX = jax.lax.top_k(probs_BTE, xk)
    if cfg.norm_topk_prob:
      top_p_BTX = top_p_BTX / jnp.sum(top_p_BTX, axis=-1, keepdims=True)
    valid_BT = jnp.ones(x_BTD.shape[:2], f32) if mask_BT is None else (mask_BT > 0).astype(f32)
    valid_A = jnp.broadcast_to(valid_BT[..., None], top_i_BTX.shape).reshape(-1)
    stats = RouterStats(
      counts=jnp.zeros((e,), f32).at[top_i_BTX.reshape(-1)].add(valid_A),
      probs=jnp.einsum("BTE,BT->E", probs_BTE, valid_BT),
      tokens=jnp.sum(valid_BT),
    )
    y = moe_ffn(
      x_BTD,
      top_i_BTX,
      top_p_BTX.astype(dt),
      valid_BT,
      w["gate"],
      w["up"],
      w["down"],
      cfg.rules,
      cfg.grouped_matmul,
    )
    return shd.constrain(y, ("batch", "length", "act_embed"), cfg.rules), stats
