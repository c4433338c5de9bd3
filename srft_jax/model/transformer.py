"""The decoder: `MLP`, `Block`, `Transformer`, its KV cache, and the helpers
that build and run it (`create_model`, `abstract_model`, `forward_logits`).

The trainer and the sampler call this one model: the sampler passes a KV
cache, the trainer asks for final hidden states and computes log-probs in
chunks from them (objectives.chunked_logprobs_and_entropy). Every forward
returns one `ModelOutput`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from srft_jax import sharding as shd
from srft_jax.model.attention import Attention
from srft_jax.model.attention import PackedRuns
from srft_jax.model.attention import dense_out_major
from srft_jax.model.attention import left_align
from srft_jax.model.attention import packed_runs
from srft_jax.model.attention import rope_frequencies
from srft_jax.model.config import ModelConfig
from srft_jax.model.layers import RMSNorm
from srft_jax.model.layers import param
from srft_jax.model.lora_hooks import adapted_weight
from srft_jax.model.lora_hooks import lora_delta
from srft_jax.model.lora_hooks import plus_delta
from srft_jax.model.moe import MoE
from srft_jax.model.moe import RouterStats
from srft_jax.model.moe import add_router_stats

Array = jax.Array
f32 = jnp.float32


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, pd = cfg.embed_dim, cfg.mlp_dim, cfg.jnp_param_dtype
    self.cfg = cfg
    self.gate = param(rngs, (d, f), ("embed", "mlp"), pd)
    self.up = param(rngs, (d, f), ("embed", "mlp"), pd)
    self.down = param(rngs, (f, d), ("mlp", "embed"), pd)

  def decode_weights(self) -> dict[str, Array]:
    """Output-major weights in the compute dtype, gate and up stacked:
    gate_up [2, F, D], down [D, F]."""
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    gate, up, down = (adapted_weight(self, name) for name in ("gate", "up", "down"))  # + LoRA
    gate_up = jnp.stack([gate.T, up.T]).astype(dt)
    return {
      "gate_up": shd.constrain(gate_up, (None, "mlp", "embed"), cfg.rules),
      "down": shd.constrain(down.T.astype(dt), ("embed", "mlp"), cfg.rules),
    }

  def __call__(self, x_BTD, w=None, dropout_key=None):
    dt = self.cfg.jnp_dtype
    key = dropout_key
    if w is None:
      g = plus_delta(
        jnp.einsum("BTD,DF->BTF", x_BTD, self.gate[...].astype(dt)),
        lora_delta(self, "gate", x_BTD, dropout_key=key),
      )
      u = plus_delta(
        jnp.einsum("BTD,DF->BTF", x_BTD, self.up[...].astype(dt)),
        lora_delta(self, "up", x_BTD, dropout_key=key),
      )
    else:  # one matmul for gate and up
      gu = dense_out_major(x_BTD, w["gate_up"])  # [B, T, 2, F]
      g, u = gu[:, :, 0], gu[:, :, 1]
    h = shd.constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"), self.cfg.rules)
    if w is None:
      return plus_delta(
        jnp.einsum("BTF,FD->BTD", h, self.down[...].astype(dt)),
        lora_delta(self, "down", h, dropout_key=key),
      )
    return dense_out_major(h, w["down"])


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool = False):
    pd = cfg.jnp_param_dtype
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pd)
    self.mlp = MoE(cfg, rngs) if moe else MLP(cfg, rngs)

  def __call__(
    self,
    x_BTD,
    positions_BT,
    inv_freq,
    allowed_BTS,
    kv=None,
    index=None,
    w=None,
    mask_BT=None,
    decode=False,
    dropout_key=None,
  ):
    """(x, kv, router stats: None for a dense MLP); mask_BT: real tokens (MoE
    routing); dropout_key: this layer's LoRA dropout key (training only)."""
    y, kv = self.attn(
      self.attn_norm(x_BTD),
      positions_BT,
      inv_freq,
      allowed_BTS,
      kv,
      index,
      None if w is None else w["attn"],
      decode,
      dropout_key,
    )
    x = x_BTD + y
    stats = None
    if isinstance(self.mlp, MoE):
      y, stats = self.mlp(self.mlp_norm(x), mask_BT, None if w is None else w["mlp"])
      x = x + y
    else:
      x = x + self.mlp(self.mlp_norm(x), None if w is None else w["mlp"], dropout_key)
    x = shd.constrain(x, ("batch", "length", "act_embed"), self.cfg.rules)
    return x, kv, stats


_REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _run_block(block: Block, x, positions, inv_freq, allowed, kv, index, w, mask, dropout_key):
  return block(x, positions, inv_freq, allowed, kv, index, w, mask, dropout_key=dropout_key)


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, count: int, moe: bool) -> Block:
  """`count` Blocks of one kind as one Block whose parameters are stacked on a
  leading "layers" axis (the scanned layout), each layer with its own init."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(
    in_axes=(0,),
    out_axes=0,
    transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"},
  )
  def make(rngs):
    return Block(cfg, rngs, moe=moe)

  return make(rngs)


def layer_block(model: Transformer, i: int) -> tuple[Block, int | None]:
  """The Block that holds layer i, and layer i's index in its stack (None: the
  loop layout's own Block; ModelConfig.scan_layers)."""
  if not model.cfg.scan_layers:
    return model.layers[i], None
  for stack, (start, stop) in zip(model.layer_stacks, model.cfg.layer_runs):
    if start <= i < stop:
      return stack, i - start
  raise IndexError(f"layer {i} of a {model.cfg.num_layers}-layer model")


def layer_modules(model: Transformer) -> list[Block]:
  """The model's Blocks: one a layer, or one a stack (ModelConfig.scan_layers)."""
  return list(model.layer_stacks if model.cfg.scan_layers else model.layers)


def scanned_path(cfg: ModelConfig, path: tuple) -> tuple[tuple, int | None]:
  """A loop-layout state path ("layers", i, ...) as (its scanned-layout path
  ("layer_stacks", j, ...), layer i's index in stack j); other paths as they are."""
  if path[:1] != ("layers",):
    return path, None
  i = int(path[1])
  for j, (start, stop) in enumerate(cfg.layer_runs):
    if start <= i < stop:
      return ("layer_stacks", j) + tuple(path[2:]), i - start
  raise IndexError(f"layer {i} of a {cfg.num_layers}-layer model")


def _stack_decode_weights(stack: Block) -> dict[str, Any]:
  """`decode_weights` of each layer of a stack, stacked [layers, ...]."""
  graphdef, state = nnx.split(stack)

  def one(layer_state):
    blk = nnx.merge(graphdef, layer_state)
    return {"attn": blk.attn.decode_weights(), "mlp": blk.mlp.decode_weights()}

  return jax.vmap(one)(state)


class _LayerInputs(NamedTuple):
  """What every layer reads besides x, its cache and its weights."""

  positions: Array  # [B, T]
  inv_freq: Array  # [H/2]
  # [B, T, S]; None: packed causal rows, PackedRuns: packed segments (attention="cudnn")
  allowed: Array | PackedRuns | None
  index: Array | None  # the cache's fill index; None without a cache
  mask: Array  # [B, T] real tokens


class ModelOutput(NamedTuple):
  """One forward of the decoder (`Transformer.__call__`); None where a field does not apply."""

  logits: Array | None  # [B, T, V] float32; None with return_hidden=True
  hidden: Array | None  # [B, T, D] final-normed hidden states with return_hidden=True; else None
  cache: dict[str, Any] | None  # the updated KV cache; None without one
  router_stats: RouterStats | None  # MoE layers' over the real tokens of mask_BT; None: dense


class SharedPrefixOutput(NamedTuple):
  """Final-normed hidden states of `Transformer.forward_shared_prefix`."""

  prompt_hidden: Array  # [G, P, D], once per prompt group
  response_hidden: Array  # [B, R, D]
  router_stats: RouterStats | None  # of the full rows (a prompt counted g times); None: dense


class Transformer(nnx.Module):
  """The decoder. `__call__` serves training (no cache) and decoding (cache)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.jnp_param_dtype
    self.embed = param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), pd)
    if cfg.scan_layers:  # one stack a run of layers of one kind
      self.layer_stacks = nnx.List(
        [
          stacked_blocks(cfg, rngs, stop - start, cfg.is_moe_layer(start))
          for start, stop in cfg.layer_runs
        ]
      )
    else:
      self.layers = nnx.List(
        [Block(cfg, rngs, moe=cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
      )
    self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pd)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), pd)

  def unembed(self) -> Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    if self.cfg.tie_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def init_cache(self, batch: int, length: int, dtype=None) -> dict[str, Any]:
    return init_cache(self.cfg, batch, length, dtype)

  def decode_weights(self) -> dict[str, Any]:
    """Every matmul weight in the compute dtype, output-major, q/k/v and gate/up fused.

    Built once per sampler call (inside its jit), then read by every decode
    step: fewer, larger matmuls, no per-step cast of float32 master weights,
    and the layout XLA:CPU's skinny matmuls want (`dense_out_major`). Costs
    one compute-dtype copy of the weights while it lives. unembed is [V, D]:
    the embedding table itself when tied.
    """
    cfg = self.cfg
    unembed = self.embed[...] if cfg.tie_embeddings else self.lm_head[...].T
    if cfg.scan_layers:  # one stacked dict a stack (scanned layout)
      layers = tuple(_stack_decode_weights(stack) for stack in self.layer_stacks)
    else:
      layers = tuple(
        {"attn": blk.attn.decode_weights(), "mlp": blk.mlp.decode_weights()} for blk in self.layers
      )
    weights = {
      "layers": layers,
      "unembed": shd.constrain(unembed.astype(cfg.jnp_dtype), ("vocab", "embed"), cfg.rules),
    }
    # Materialised once: XLA must not fold the casts and transposes back into
    # each matmul that reads them (XLA:CPU then also meets a transposed bf16
    # dot it cannot run: "Unsupported element type for DotThunk").
    return jax.lax.optimization_barrier(weights)

  def __call__(
    self,
    tokens_BT: Array,
    positions_BT: Array,
    mask_BT: Array | None = None,
    *,
    cache: dict[str, Any] | None = None,
    return_hidden: bool = False,
    weights: dict[str, Any] | None = None,
    remat: bool | None = None,
    decode: bool = False,
    lora_dropout_key: Array | None = None,
    segment_ids_BT: Array | None = None,
    max_segments: int | None = None,
  ) -> ModelOutput:
    """Logits [B, T, V] float32 (or with `return_hidden` the final hidden
    states), the updated `cache` and the MoE router statistics: a `ModelOutput`.

    `weights`: `decode_weights()` (the sampler's fused weights) instead of the
    parameters. `remat` (default: only without a cache) rematerialises the
    layers as `cfg.remat` says. `decode=True` marks the sampler's decode step
    (one new token a row, a cache, no backward pass): only there does
    `cfg.decode_attention` apply. `lora_dropout_key` switches on the
    adapters' dropout (`lora_delta`; the trainer's loss forward), layer i
    with the key folded with i. `segment_ids_BT` (no cache): packed rows
    (docs/method.md §18), a token attending only to earlier tokens of its own
    segment (id > 0; 0 is padding); `positions_BT` then restart per segment.
    `max_segments` bounds the segments a packed row holds (default T): with
    attention="cudnn" the rows go to cuDNN's packed layout, sized by it.
    """
    cfg = self.cfg
    dt = cfg.jnp_dtype
    b, t = tokens_BT.shape
    if mask_BT is None:
      mask_BT = jnp.ones((b, t), jnp.int32)
    # attention="cudnn" without a cache: each row's real tokens (contiguous, as
    # the trainer lays rows out) move to the front, so causal attention needs
    # no padding mask; hidden states move back after the last layer.
    align = cache is None and cfg.attention == "cudnn" and segment_ids_BT is None
    if align:
      to_front, to_back = left_align(mask_BT)
      tokens_BT = jnp.take_along_axis(tokens_BT, to_front, axis=1)
      positions_BT = jnp.take_along_axis(positions_BT, to_front, axis=1)
      mask_BT = jnp.take_along_axis(mask_BT, to_front, axis=1)
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
    x = shd.constrain(x, ("batch", "length", "act_embed"), cfg.rules)
    inv_freq = rope_frequencies(cfg)

    if align:
      allowed, index = None, None
    elif cache is None and segment_ids_BT is not None and cfg.attention == "cudnn":
      # each segment, and the padding tail, one sequence of cuDNN's packed layout
      room = t if max_segments is None else min(int(max_segments) + 1, t)
      runs = packed_runs(segment_ids_BT, max(room, 2))  # 1 would mean "not packed" to jax
      # sharded like the rows: cuDNN's partitioned call reads each shard's own offsets
      allowed = PackedRuns(*(shd.constrain(x, ("batch", None), cfg.rules) for x in runs))
      index = None
    elif cache is None and segment_ids_BT is not None:
      idx, seg = jnp.arange(t), segment_ids_BT
      same = (seg[:, None, :] == seg[:, :, None]) & (seg[:, None, :] > 0)
      allowed = (idx[None, :] <= idx[:, None])[None] & same
      index = None
    elif cache is None:
      idx = jnp.arange(t)
      allowed = (idx[None, :] <= idx[:, None])[None] & (mask_BT[:, None, :] > 0)
      index = None
    else:
      index = cache["index"]
      kv_mask = jax.lax.dynamic_update_slice(
        cache["mask"], mask_BT.astype(cache["mask"].dtype), (0, index)
      )
      slots = jnp.arange(kv_mask.shape[1])
      allowed = (slots[None, :] <= index + jnp.arange(t)[:, None])[None] & (kv_mask[:, None, :] > 0)

    # Remat only where there is a backward pass: by default not with a cache
    # (decoding); `remat=True` asks for it there (the shared-prefix training forward).
    rematerialise = cfg.remat != "none" and (cache is None if remat is None else remat)
    run_layers = self._scan_layers if cfg.scan_layers else self._loop_layers
    ctx = _LayerInputs(positions_BT, inv_freq, allowed, index, mask_BT)
    x, kv, stats = run_layers(x, ctx, cache, weights, rematerialise, decode, lora_dropout_key)
    x = self.final_norm(x)
    if align:
      x = jnp.take_along_axis(x, to_back[..., None], axis=1)
    if cache is not None:
      cache = {"k": kv[0], "v": kv[1], "mask": kv_mask, "index": index + t}
    if return_hidden:
      return ModelOutput(None, x, cache, stats)
    return ModelOutput(self.logits(x, weights), None, cache, stats)

  def _loop_layers(
    self, x, ctx: _LayerInputs, cache, weights, rematerialise, decode, lora_dropout_key
  ):
    """The layers one after the other (each compiled on its own): (x, (keys,
    values) or None without a cache, router stats)."""
    run = _run_block
    if rematerialise:
      run = nnx.remat(_run_block, policy=_REMAT_POLICIES[self.cfg.remat])
    new_k, new_v = [], []
    stats = None
    for i, block in enumerate(self.layers):
      kv = None if cache is None else (cache["k"][i], cache["v"][i])
      w = None if weights is None else weights["layers"][i]
      if decode:  # the sampler's decode step (no backward pass, never rematerialised)
        x, kv, st = block(x, *ctx[:3], kv, ctx.index, w, ctx.mask, decode=True)
      else:
        key = None if lora_dropout_key is None else jax.random.fold_in(lora_dropout_key, i)
        x, kv, st = run(block, x, *ctx[:3], kv, ctx.index, w, ctx.mask, key)
      stats = add_router_stats(stats, st)
      if cache is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    return x, None if cache is None else (tuple(new_k), tuple(new_v)), stats

  def _scan_layers(
    self, x, ctx: _LayerInputs, cache, weights, rematerialise, decode, lora_dropout_key
  ):
    """The scanned layout: one lax.scan a stack (its layer compiled once), the
    remat policy applied to each layer inside the scan body. The stacked KV
    cache [L, ...] goes in and out of the scan per layer. Returns (x, (keys,
    values) or None, stats): the stats summed layer by layer in order, as the
    loop sums them."""
    cfg = self.cfg
    runs = cfg.layer_runs
    new_k, new_v = [], []
    stats = None
    for (start, stop), stack, w in zip(
      runs, self.layer_stacks, weights["layers"] if weights is not None else (None,) * len(runs)
    ):
      graphdef, state = nnx.split(stack)
      kv = None
      if cache is not None:  # this stack's layers of the stacked cache
        whole = len(runs) == 1
        kv = tuple(c if whole else c[start:stop] for c in (cache["k"], cache["v"]))

      def body(x, xs, graphdef=graphdef):
        layer_state, kv, w, i = xs
        block = nnx.merge(graphdef, layer_state)
        key = None
        if lora_dropout_key is not None and not decode:  # layer i's key, as the loop folds it
          key = jax.random.fold_in(lora_dropout_key, i)
        x, kv, st = block(x, *ctx[:3], kv, ctx.index, w, ctx.mask, decode=decode, dropout_key=key)
        return x, (kv, st)

      if rematerialise and not decode:
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
      layer_ids = jnp.arange(start, stop, dtype=jnp.int32)
      x, (kv, st) = jax.lax.scan(body, x, (state, kv, w, layer_ids))
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
      for j in range(stop - start) if st is not None else ():
        stats = add_router_stats(stats, jax.tree.map(lambda a, j=j: a[j], st))
    kv = None
    if cache is not None:
      cat = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts)  # noqa: E731
      kv = (cat(new_k), cat(new_v))
    return x, kv, stats

  def forward_shared_prefix(
    self,
    prompt_tokens_GP: Array,
    prompt_mask_GP: Array,
    resp_tokens_BR: Array,
    resp_mask_BR: Array,
    lora_dropout_key: Array | None = None,
  ) -> SharedPrefixOutput:
    """Final hidden states of rows that share their prompt within groups.

    Row i of the responses continues prompt i // g (g = B // G, the trainer's
    prompt-major group layout). The sampler's own cache path does it: the
    prompts fill a KV cache (once per group), the cache is repeated to the
    group's rows, and the responses run on top of it. The result is the full
    forward of the [prompt | response] rows (left-padded prompt, right-padded
    response) for (g - 1) / g less prompt work; gradients reach each prompt
    from every row of its group (through the cache).
    Returns the prompt hidden states [G, P, D] and the response hidden states
    [B, R, D], final-normed, and the MoE `RouterStats` of the full rows (a
    prompt's counted g times, as the full forward counts it). `lora_dropout_key`:
    as in `__call__`; a prompt's dropout mask is then shared by its group's rows.
    """
    g_count, p = prompt_tokens_GP.shape
    b, r = resp_tokens_BR.shape
    if b % g_count:
      raise ValueError(
        f"forward_shared_prefix: {b} response rows do not split into {g_count} prompt groups"
      )
    group = b // g_count
    pm = prompt_mask_GP.astype(jnp.int32)
    rm = resp_mask_BR.astype(jnp.int32)
    cache = init_cache(self.cfg, g_count, p + r)
    kw = dict(return_hidden=True, remat=True)
    keys = (None, None) if lora_dropout_key is None else jax.random.split(lora_dropout_key)
    prompt = self(
      prompt_tokens_GP, positions_from_mask(pm), pm, cache=cache, lora_dropout_key=keys[0], **kw
    )
    cache = repeat_cache_rows(prompt.cache, group)
    n_prompt = jnp.sum(cache["mask"], axis=-1, keepdims=True)
    pos_r = jnp.maximum(n_prompt + jnp.cumsum(rm, axis=-1) - 1, 0).astype(jnp.int32)
    resp = self(resp_tokens_BR, pos_r, rm, cache=cache, lora_dropout_key=keys[1], **kw)
    stats = add_router_stats(prompt.router_stats, resp.router_stats, scale_a=group)
    return SharedPrefixOutput(prompt.hidden, resp.hidden, stats)

  def logits(self, hidden_BTD: Array, weights: dict[str, Any] | None = None) -> Array:
    """Float32 logits of final hidden states (`ModelOutput.hidden` of `return_hidden=True`)."""
    cfg = self.cfg
    x = hidden_BTD.astype(cfg.jnp_dtype)
    if weights is None:
      logits = jnp.einsum(
        "BTD,DV->BTV", x, self.unembed().astype(cfg.jnp_dtype), preferred_element_type=f32
      )
    else:
      logits = dense_out_major(x, weights["unembed"], preferred_element_type=f32)
    return shd.constrain(logits, ("batch", "length", "act_vocab"), cfg.rules)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict[str, Any]:
  """An empty KV cache: per-layer keys [B, K, H, S] and values [B, K, S, H]
  (the layouts `attend` reads), a slot mask and the fill index. The scanned
  layout (`scan_layers`) stacks them: keys [L, B, K, H, S], values [L, B, K, S, H]."""
  dtype = dtype or cfg.jnp_dtype
  b, k, h = batch, cfg.num_kv_heads, cfg.head_dim
  if cfg.scan_layers:
    n = cfg.num_layers
    return {
      "k": jnp.zeros((n, b, k, h, length), dtype),
      "v": jnp.zeros((n, b, k, length, h), dtype),
      "mask": jnp.zeros((batch, length), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
    }
  return {
    "k": tuple(jnp.zeros((b, k, h, length), dtype) for _ in range(cfg.num_layers)),
    "v": tuple(jnp.zeros((b, k, length, h), dtype) for _ in range(cfg.num_layers)),
    "mask": jnp.zeros((batch, length), jnp.int32),
    "index": jnp.zeros((), jnp.int32),
  }


def repeat_cache_rows(cache: dict[str, Any], n: int) -> dict[str, Any]:
  """Each row of a cache n times in a row (row i -> rows i*n .. i*n+n-1):
  one prompt's prefill shared by the n rows of its group."""
  rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
  if not isinstance(cache["k"], tuple):  # stacked [L, B, ...] (scan_layers): rows are axis 1
    rep_kv = lambda x: jnp.repeat(x, n, axis=1)  # noqa: E731
    return {
      "k": rep_kv(cache["k"]),
      "v": rep_kv(cache["v"]),
      "mask": rep(cache["mask"]),
      "index": cache["index"],
    }
  return {
    "k": tuple(map(rep, cache["k"])),
    "v": tuple(map(rep, cache["v"])),
    "mask": rep(cache["mask"]),
    "index": cache["index"],
  }


def cache_logical_axes(cfg: ModelConfig) -> dict[str, Any]:
  """Logical axis names of the cache pytree (same structure as `init_cache`)."""
  if cfg.scan_layers:
    return {
      "k": ("layers", "batch", "kv_heads", "head_dim", "cache_length"),
      "v": ("layers", "batch", "kv_heads", "cache_length", "head_dim"),
      "mask": ("batch", "cache_length"),
      "index": (),
    }
  return {
    "k": tuple(("batch", "kv_heads", "head_dim", "cache_length") for _ in range(cfg.num_layers)),
    "v": tuple(("batch", "kv_heads", "cache_length", "head_dim") for _ in range(cfg.num_layers)),
    "mask": ("batch", "cache_length"),
    "index": (),
  }


def positions_from_mask(mask_BT: Array) -> Array:
  """Positions that count real tokens only (left padding safe, as HF generate)."""
  return jnp.maximum(jnp.cumsum(mask_BT, axis=-1) - 1, 0).astype(jnp.int32)


def forward_logits(model: Transformer, tokens_BT: Array, mask_BT: Array | None = None) -> Array:
  """Float32 logits [B, T, V] of a full forward pass (scoring and tests)."""
  if mask_BT is None:
    mask_BT = jnp.ones(tokens_BT.shape, jnp.int32)
  mask_BT = jnp.asarray(mask_BT, jnp.int32)
  return model(jnp.asarray(tokens_BT), positions_from_mask(mask_BT), mask_BT).logits


def create_model(cfg: ModelConfig, *, seed: int = 0, mesh=None) -> Transformer:
  """A randomly initialised model, created directly in its sharded layout on `mesh`."""
  return shd.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh, cfg.rules)


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model's shapes and dtypes only (no allocation)."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def with_layer_layout(model: Transformer, scan_layers: bool) -> Transformer:
  """The same parameters in the loop or the scanned layout (ModelConfig.scan_layers):
  per-layer tensors stacked into their stack, or each stack cut into its layers.
  LoRA adapters are not moved (attach them after)."""
  if model.cfg.scan_layers == scan_layers:
    return model
  if any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model))):
    raise ValueError("with_layer_layout: detach the LoRA adapters first")
  src_cfg = model.cfg
  cfg = dataclasses.replace(src_cfg, scan_layers=scan_layers)
  source = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  flat = []
  for path, var in nnx.to_flat_state(abs_state):
    if not scan_layers:  # one layer of a stack
      stacked, j = scanned_path(src_cfg, path)
      value = source[stacked] if j is None else source[stacked][j]
    elif path[:1] == ("layer_stacks",):  # the stack of its layers
      start, stop = cfg.layer_runs[int(path[1])]
      value = jnp.stack([source[("layers", i) + tuple(path[2:])] for i in range(start, stop)])
    else:
      value = source[path]
    flat.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def count_params(model: nnx.Module) -> int:
  state = nnx.state(model, nnx.Param)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
