"""The package's structure: no import cycles, imports at module top, public
names only across modules. (The code style is checked by `make test`, which
runs ruff's linter and formatter before pytest.)"""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "srft_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, known: set[str]) -> list[tuple[str, bool]]:
  """(imported srft_jax module, at module top?) for every import in the file,
  function-level ones included."""
  tree = ast.parse(path.read_text())
  top = {id(n) for n in tree.body}
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
        base = base.strip(".")
      for a in node.names:
        full = f"{base}.{a.name}"
        targets.append(full if full in known else base)
    for t in targets:
      if t.startswith("srft_jax"):
        out.append((t, id(node) in top))
  return out


def _graph() -> dict[str, set[str]]:
  mods = _modules()
  known = set(mods)
  graph = {}
  for name, path in mods.items():
    graph[name] = {t for t, _ in _imports(path, known) if t in known and t != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` as a path [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"a2"}, "a2": {"b"}, "b": {"a2"}}) == ["a2", "b", "a2"]


def test_no_import_cycles():
  graph = _graph()
  assert len(graph) > 20 and "srft_jax.trainer" in graph
  assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_package_imports_at_module_top():
  """Every import of a srft_jax module sits at its file's top (no hidden cycles)."""
  mods = _modules()
  late = [
    f"{name} imports {t}"
    for name, p in mods.items()
    for t, top in _imports(p, set(mods))
    if not top
  ]
  assert not late, late


def test_layers():
  """Lower layers never import higher ones: the loss is pure JAX, the step
  code knows no trainer, evaluation restores checkpoints without the trainer."""
  graph = _graph()

  def reach(start):
    seen, todo = set(), [start]
    while todo:
      for nxt in graph.get(todo.pop(), ()):
        if nxt not in seen:
          seen.add(nxt)
          todo.append(nxt)
    return seen

  assert reach("srft_jax.objectives") == set()
  assert not reach("srft_jax.step") & {"srft_jax.trainer", "srft_jax.job", "srft_jax.factory"}
  assert not reach("srft_jax.evaluate") & {"srft_jax.trainer", "srft_jax.job"}
  assert not reach("srft_jax.factory") & {"srft_jax.trainer", "srft_jax.job"}


def _private_uses(path: pathlib.Path) -> list[str]:
  """`alias._name` where `alias` is an imported srft_jax module."""
  tree = ast.parse(path.read_text())
  aliases = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("srft_jax"):
      aliases |= {a.asname or a.name for a in node.names}
    elif isinstance(node, ast.Import):
      aliases |= {a.asname or a.name for a in node.names if a.name.startswith("srft_jax")}
  return [
    f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}"
    for node in ast.walk(tree)
    if isinstance(node, ast.Attribute)
    and isinstance(node.value, ast.Name)
    and node.value.id in aliases
    and node.attr.startswith("_")
    and not node.attr.startswith("__")
  ]


def test_no_private_names_across_modules():
  """Modules, tests, benchmarks and configs use each other's public names only."""
  files = [
    p for d in ("srft_jax", "tests", "benchmarks", "configs") for p in (ROOT / d).rglob("*.py")
  ]
  found = [use for p in files for use in _private_uses(p)]
  assert not found, found


@pytest.mark.parametrize("name", sorted(n for n in _modules() if not n.endswith("__main__")))
def test_every_module_imports(name):
  importlib.import_module(name)


# The ConfigDict's groups (configs/default.py): `x.<group>.<field>` on a config.
_CONFIG_GROUPS = {
  "model", "data", "rollout", "batch", "optim", "warmup", "checkpoint",
  "eval", "log", "lora", "loss", "advantage", "distributed", "mesh",
}  # fmt: skip
_CONFIG_METHODS = {"unlocked", "copy_and_resolve_references", "to_json_best_effort", "get_ref"}
_CONFIG_NAMES = {"c", "config", "cfg", "w", "cfg_dict"}
_FLAG_CLIS = {"srft_jax.main", "srft_jax.evaluate", "srft_jax.tools.aot"}


def config_reads(path: pathlib.Path, module: str) -> list[str]:
  """Places in a module that read a ConfigDict: its methods, a `c.group.field`
  chain on a config-named variable, an ml_collections import other than a
  CLI's config_flags, and a `--config` flag value used other than as the
  argument of a `factory.` call."""
  tree = ast.parse(path.read_text())
  parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
  out = []
  for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
    where = f"{module}:{getattr(node, 'lineno', '?')}"
    if isinstance(node, ast.Attribute) and node.attr in _CONFIG_METHODS:
      out.append(f"{where}: .{node.attr}")
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Attribute)
      and node.value.attr in _CONFIG_GROUPS
      and isinstance(node.value.value, ast.Name)
      and node.value.value.id in _CONFIG_NAMES
    ):
      out.append(f"{where}: {node.value.value.id}.{node.value.attr}.{node.attr}")
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ml_collections"):
      names = {a.name for a in node.names}
      if names != {"config_flags"} or module not in _FLAG_CLIS:
        out.append(f"{where}: from {node.module} import {sorted(names)}")
    if isinstance(node, ast.Import) and any(
      a.name.startswith("ml_collections") for a in node.names
    ):
      out.append(f"{where}: import ml_collections")
    is_flag = isinstance(node, ast.Attribute) and (
      (node.attr == "config" and isinstance(node.value, ast.Name) and node.value.id == "f")
      or (node.attr == "value" and isinstance(node.value, ast.Name) and node.value.id == "_CONFIG")
    )
    if is_flag:
      call = parents.get(id(node))
      ok = (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "factory"
      )
      if not ok:
        out.append(f"{where}: the --config flag's value used outside a factory call")
  return out


def test_only_factory_reads_the_config_dict():
  """The ConfigDict is validated and turned into a frozen RunSpec once, by
  srft_jax/factory.py; every other module reads the spec."""
  reads = [
    r
    for name, path in _modules().items()
    if name != "srft_jax.factory"
    for r in config_reads(path, name)
  ]
  assert reads == []


def test_config_reads_finds_reads(tmp_path):
  """The check above can fail: each kind of read is found in a sample module."""
  src = tmp_path / "sample.py"
  src.write_text(
    "from ml_collections import config_dict\n"
    "def f(c, spec):\n"
    "  a = c.rollout.require_think\n"
    "  b = spec.rollout.require_think\n"
    "  with c.unlocked():\n"
    "    pass\n"
    "def main(f):\n"
    "  return job.run(f.config, '.')\n"
  )
  found = config_reads(src, "srft_jax.sample")
  assert [x.split(": ", 1)[1] for x in found] == [
    "from ml_collections import ['config_dict']",
    "c.rollout.require_think",
    ".unlocked",
    "the --config flag's value used outside a factory call",
  ]
