"""Device mesh and logical-axis sharding.

Parameters and activations carry *logical* axis names (`embed`, `mlp`, `heads`,
`expert`, ...). One rules table maps each logical name to mesh axes (`data`,
`fsdp`, `tensor`, `expert`), so switching FSDP for tensor parallelism, or
placing a mixture-of-experts layer's experts over the `fsdp` or the `expert`
axis, is a config edit, never a code edit (MaxText's `logical_axis_rules`).
Layers never name mesh axes: code that must (a `shard_map`) asks `mesh_axes`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

# `expert` last: positional mesh shapes (data, fsdp, tensor) keep their meaning.
MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axes (None = replicated). Order of preference matters:
# an axis already used by an earlier dimension of the same array is skipped.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  # Rows also split over `expert`: expert parallelism is data parallel outside
  # the MoE layers (model.MoE gathers a layer's tokens over it).
  ("batch", ("data", "fsdp", "expert")),
  ("length", None),
  ("cache_length", None),
  ("act_embed", None),
  ("act_mlp", "tensor"),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("vocab", "tensor"),
  ("norm", None),
  # A MoE layer's experts: over the `expert` mesh axis (size 1 unless the mesh
  # has one). with_rules(DEFAULT_RULES, expert="fsdp") puts them over fsdp instead.
  ("expert", "expert"),
  # The stacked layers of the scanned layout (ModelConfig.scan_layers): each
  # device holds every layer of its shard; lax.scan walks the axis.
  ("layers", None),
)


def with_rules(rules, **overrides) -> tuple[tuple[str, Any], ...]:
  """`rules` with some logical names mapped anew, e.g. `with_rules(DEFAULT_RULES,
  expert="fsdp")`; names not in `rules` are appended."""
  rules = tuple(rules if rules is not None else DEFAULT_RULES)
  out = tuple((name, overrides.get(name, axes)) for name, axes in rules)
  known = {name for name, _ in rules}
  return out + tuple((n, a) for n, a in overrides.items() if n not in known)


def make_mesh(
  shape: Mapping[str, int] | Sequence[int] | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """Builds a (data, fsdp, tensor, expert) mesh with Auto axes (classic GSPMD).

  `shape` maps axis -> size; one size may be -1 (fills the remaining devices).
  Missing axes get size 1.
  """
  devices = list(devices if devices is not None else jax.devices())
  if shape is None:
    shape = {"data": -1}
  if not isinstance(shape, Mapping):
    shape = dict(zip(MESH_AXES, shape))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  bad = {a: s for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1}
  if bad:
    raise ValueError(f"mesh: axis sizes must be positive (or one -1), got {bad}")
  if sizes.count(-1) > 1:
    raise ValueError("mesh: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
      f"have {len(devices)}"
    )
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    dev_array = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # irregular device sets (e.g. CPU processes): plain reshape
    dev_array = np.asarray(devices).reshape(sizes)
  return jax.sharding.Mesh(dev_array, MESH_AXES, axis_types=axis_types)


def parse_rules(text: str) -> dict[str, tuple[str, ...] | None]:
  """Overrides of DEFAULT_RULES written as text (the config's `sharding_rules`):
  comma-separated `logical=axis[+axis]`, an empty right side for replicated,
  e.g. "expert=fsdp" or "batch=data+fsdp,vocab=". For `with_rules`."""
  known = [name for name, _ in DEFAULT_RULES]
  out = {}
  for item in (x.strip() for x in text.split(",")):
    if not item:
      continue
    name, eq, rhs = (x.strip() for x in item.partition("="))
    if not eq or name not in known:
      raise ValueError(f"{item!r}: want logical=axis[+axis], logical one of {known}")
    if name in out:
      raise ValueError(f"{item!r}: {name!r} is given twice")
    axes = tuple(a.strip() for a in rhs.split("+") if a.strip())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad or len(set(axes)) != len(axes):
      raise ValueError(f"{item!r}: mesh axes must be distinct names of {MESH_AXES}")
    out[name] = axes or None
  return out


def batch_shards(mesh_shape: Mapping[str, int], rules=None) -> int:
  """How many ways a batch's rows split: the product of the mesh axes that the
  logical `batch` axis maps to."""
  return math.prod(mesh_shape.get(a, 1) for a in _rules_dict(rules).get("batch", ()))


def _rules_dict(rules) -> dict[str, tuple[str, ...]]:
  out = {}
  for name, axes in rules if rules is not None else DEFAULT_RULES:
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    out[name] = tuple(axes)
  return out


def logical_to_spec(
  names: Sequence[str | None], rules=None, mesh=None, shape: Sequence[int] | None = None
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  Mesh axes absent from `mesh` (or of size 1), already used by an earlier
  dimension, or (when `shape` is given) not dividing the dimension are dropped,
  so every rules table gives a valid spec for every array.
  """
  table = _rules_dict(rules)
  mesh_sizes = dict(mesh.shape) if mesh is not None else None
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"sharding rules: no rule for logical axis {name!r}")
    chosen = []
    dim = None if shape is None else shape[i]
    for axis in table[name]:
      if axis in used:
        continue
      if mesh_sizes is not None:
        size = mesh_sizes.get(axis)
        if size is None or size == 1:
          continue
        if dim is not None:
          prod = math.prod(mesh_sizes[a] for a in chosen) * size
          if dim % prod:
            continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def named_sharding(mesh, names, rules=None, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def constrain(x: jax.Array, names: Sequence[str | None], rules=None) -> jax.Array:
  """Sharding constraint by logical names under the ambient mesh (no-op without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  spec = logical_to_spec(names, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


def mesh_axes(spec_entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh, rules=None) -> Any:
  """NamedSharding for every variable of an (abstract) NNX state (same tree)."""

  def one(v):
    names = v.get_metadata().get("logical_axes")
    shape = tuple(v.get_value().shape)
    if names is None:
      names = (None,) * len(shape)
    return v.replace(named_sharding(mesh, names, rules, shape))

  return jax.tree.map(one, state, is_leaf=_is_variable)


def create_sharded(module_fn, mesh=None, rules=None):
  """Initialises `module_fn()` directly into its sharded layout.

  The module is traced abstractly (`nnx.eval_shape`), shardings are derived
  from the logical axes, and the real initialiser runs under `jax.jit` with
  those `out_shardings`: no full-size array ever lands on one device.
  """
  abstract = nnx.eval_shape(module_fn)
  graphdef, abs_state = nnx.split(abstract)
  if mesh is None:
    return module_fn()
  shardings = state_shardings(abs_state, mesh, rules)

  init = jax.jit(lambda: nnx.split(module_fn())[1], out_shardings=shardings)
  state = init()
  return nnx.merge(graphdef, state)


def shard_module(module, mesh, rules=None):
  """Moves an existing module's variables onto `mesh` per their logical axes."""
  graphdef, state = nnx.split(module)
  shardings = state_shardings(state, mesh, rules)
  state = jax.device_put(state, shardings)
  return nnx.merge(graphdef, state)


def put_global(x, sharding: NamedSharding) -> jax.Array:
  """A host value that every process holds in full -> a global array.

  (`jax.device_put` refuses non-addressable shardings in multi-process runs.)
  """
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    data = np.asarray(jax.random.key_data(x))
    return jax.random.wrap_key_data(put_global(data, sharding), impl=jax.random.key_impl(x))
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def batch_sharding(mesh, ndim: int, rules=None, shape=None) -> NamedSharding:
  """Sharding for a [batch, ...] data array: batch over the data axes."""
  names = ("batch",) + (None,) * (ndim - 1)
  return named_sharding(mesh, names, rules, shape)
