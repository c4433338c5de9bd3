"""Packaging: `pip install srft-jax` as JAX users do it.

The ranges in pyproject.toml against the lock (requirements*.txt), one version,
the wheel and sdist `python -m build` makes, the core install (jax and numpy
only) running the README's loss example in a fresh venv, and `[train]` in a
fresh venv with every console script's `--help` equal to its `python -m` form.
"""

import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import srft_jax
from srft_jax import console

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = ("requirements.txt", "requirements-dev.txt", "requirements-tpu.txt")
# Pinned in the lock but declared by jax itself (its own dependency / [tpu] extra).
THROUGH_JAX = {"jaxlib": None, "libtpu": "tpu"}
# Entry point -> the module `python -m` runs.
SCRIPTS = {
  "srft-train": "srft_jax.main",
  "srft-eval": "srft_jax.evaluate",
  "srft-data": "srft_jax.data",
  "srft-study": "srft_jax.study",
  "srft-aot": "srft_jax.tools.aot",
  "srft-hf": "srft_jax.hf_cli",
}
# Must not be imported by `import srft_jax.objectives` (the loss is pure JAX).
HEAVY = ("flax", "optax", "orbax", "tensorflow_datasets", "grain", "ml_collections", "torch")


_IMPORT_CHECK = """
import json, sys
import jax, numpy  # the baseline: what jax and numpy import themselves
before = {m.split(".")[0] for m in sys.modules}
import srft_jax, srft_jax.objectives
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} - before)))
"""


_VERSIONS = """
import importlib.metadata as m
def v(n):
  try:
    return m.version(n)
  except m.PackageNotFoundError:
    return "-"
print(" ".join(f"{n} {v(n)}" for n in ("jax", "jaxlib", "numpy", "scipy", "ml_dtypes")))
"""


_DISTRIBUTIONS = """
import importlib.metadata, json, re
print(json.dumps({re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
                  for d in importlib.metadata.distributions()}))
"""


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env.update(JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1", **extra)
  return env


# ----------------------------------------------------------------------------
# Ranges, lock and version (no install)
# ----------------------------------------------------------------------------


def _lock(name: str) -> list[Requirement]:
  """The requirements of a lock file, `-r` includes followed."""
  out = []
  for line in (ROOT / name).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line.startswith("-r "):
      out += _lock(line[3:].strip())
    elif line:
      out.append(Requirement(line))
  return out


def _declared() -> dict[str, list[tuple[str, Requirement]]]:
  """canonical name -> [(where, requirement)] over the core dependencies and every extra."""
  out: dict[str, list[tuple[str, Requirement]]] = {}
  groups = {"dependencies": PYPROJECT["project"]["dependencies"]}
  groups |= {f"[{k}]": v for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
  for where, reqs in groups.items():
    for r in map(Requirement, reqs):
      out.setdefault(canonicalize_name(r.name), []).append((where, r))
  return out


def _pin(r: Requirement) -> str:
  (spec,) = r.specifier  # exactly one `==` specifier
  assert spec.operator == "==" and "*" not in spec.version, f"not an exact pin: {r}"
  return spec.version


def test_lock_is_exact_pins():
  for name in LOCKS:
    for r in _lock(name):
      _pin(r)


def test_every_pin_satisfies_its_declared_range():
  declared = _declared()
  pins = {canonicalize_name(r.name): r for name in LOCKS for r in _lock(name)}
  for name, pin in pins.items():
    if name in THROUGH_JAX:
      continue
    version = _pin(pin)
    assert name in declared, f"{pin} is pinned in the lock but declared nowhere in pyproject.toml"
    for where, req in declared[name]:
      assert req.specifier.contains(version, prereleases=True), (
        f"lock {pin} is outside {where} {req}"
      )
      if where in ("dependencies", "[train]"):
        assert req.extras <= pin.extras, f"lock {pin} lacks the extras of {where} {req}"
  # jaxlib and libtpu: against what the pinned jax itself requires.
  if importlib.metadata.version("jax") != _pin(pins["jax"]):
    pytest.skip("jaxlib / libtpu pins: needs the lock's jax installed to read its requirements")
  jax_reqs = [Requirement(s) for s in importlib.metadata.requires("jax") or []]
  for name, extra in THROUGH_JAX.items():
    version = _pin(pins[name])
    reqs = [
      r
      for r in jax_reqs
      if canonicalize_name(r.name) == name
      and (r.marker is None or r.marker.evaluate({"extra": extra or ""}))
    ]
    assert reqs and all(r.specifier.contains(version, prereleases=True) for r in reqs), (
      f"lock {pins[name]} is outside jax {pins['jax']}'s {reqs}"
    )


def test_every_declared_dependency_is_pinned():
  """The lock installs (and so tests) everything the package declares."""
  runtime = {canonicalize_name(r.name) for r in _lock("requirements.txt")}
  dev = {canonicalize_name(r.name) for r in _lock("requirements-dev.txt")}
  project = PYPROJECT["project"]
  for r in map(Requirement, project["dependencies"] + project["optional-dependencies"]["train"]):
    assert canonicalize_name(r.name) in runtime, f"{r} is not pinned in requirements.txt"
  for r in map(Requirement, project["optional-dependencies"]["test"]):
    assert canonicalize_name(r.name) in dev, f"{r} is not pinned in requirements-dev.txt"
  for extra in ("gpu", "cuda13", "tpu"):  # the jax accelerator builds
    assert [Requirement(s).name for s in project["optional-dependencies"][extra]] == ["jax"]


def test_core_needs_only_jax_and_numpy():
  deps = {canonicalize_name(Requirement(s).name) for s in PYPROJECT["project"]["dependencies"]}
  assert deps == {"jax", "numpy"}


def test_one_version():
  """The version lives in srft_jax/__init__.py only; pyproject.toml reads it."""
  project = PYPROJECT["project"]
  assert "version" not in project and "version" in project["dynamic"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "srft_jax.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", srft_jax.__version__)


@pytest.mark.slow
def test_hf_export_records_the_version(tmp_path):
  from flax import nnx

  from srft_jax import hf
  from srft_jax import model as model_lib

  cfg = model_lib.ModelConfig.preset("tiny")
  hf.save_model(model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), str(tmp_path))
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["srft_jax_version"] == srft_jax.__version__
  assert hf.config_from_hf(written) == hf.config_from_hf(hf.config_to_hf(cfg))


def test_scripts_match_pyproject():
  scripts = PYPROJECT["project"]["scripts"]
  assert set(scripts) == set(SCRIPTS)
  for name, target in scripts.items():
    module, _, func = target.partition(":")
    assert module == "srft_jax.console" and callable(getattr(console, func)), name


def test_scripts_run_their_modules(monkeypatch):
  """Each console script runs its module as `python -m` does: runpy, as __main__,
  with sys.argv[0] and the module in sys.modules replaced for the run."""
  import runpy

  calls = []
  monkeypatch.setattr(runpy, "run_module", lambda *a, **k: calls.append((a, k)))
  for name, target in PYPROJECT["project"]["scripts"].items():
    getattr(console, target.partition(":")[2])()
    assert calls.pop() == ((SCRIPTS[name],), {"run_name": "__main__", "alter_sys": True}), name


def test_objectives_imports_nothing_beyond_jax_and_numpy():
  """Here flax, optax, orbax and TFDS are installed: the loss still does not import them."""
  out = subprocess.run(
    [sys.executable, "-c", _IMPORT_CHECK],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
    env=_env(),
  )
  new = json.loads(out.stdout.strip().splitlines()[-1])
  assert not set(new) & set(HEAVY) and new == ["srft_jax"], new


def test_config_paths_resolve(tmp_path, monkeypatch):
  """In a checkout the repo's configs/ (any existing path as given); elsewhere the
  packaged copy; `--config.FIELD=` overrides and other flags untouched."""
  monkeypatch.chdir(ROOT)
  assert console.resolve_config("configs/default.py:grpo") == "configs/default.py:grpo"
  monkeypatch.chdir(tmp_path)
  d = console.configs_dir()
  assert os.path.isfile(os.path.join(d, "srft_7b_tpu.py"))
  assert console.resolve_config("configs/default.py:grpo") == f"{d}/default.py:grpo"
  assert console.resolve_config("default") == f"{d}/default.py"
  assert console.resolve_config("srft_7b_tpu.py:fsdp_tensor") == f"{d}/srft_7b_tpu.py:fsdp_tensor"
  assert console.resolve_config("other/default.py") == "other/default.py"
  assert console.resolve_config("configs/missing.py") == "configs/missing.py"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "default.py").write_text("")
  assert console.resolve_config("configs/default.py") == "configs/default.py"  # yours wins
  argv = ["prog", "--config", "qwen2p5_1p5b_gpu", "--config.steps=3", "--workdir=default"]
  assert console.resolve_config_argv(argv) == [
    "prog",
    "--config",
    f"{d}/qwen2p5_1p5b_gpu.py",
    "--config.steps=3",
    "--workdir=default",
  ]
  assert console.resolve_config_argv(["p", "--config=srft_7b_tpu"]) == [
    "p",
    f"--config={d}/srft_7b_tpu.py",
  ]


# ----------------------------------------------------------------------------
# The built wheel in fresh venvs
# ----------------------------------------------------------------------------


def _run(cmd, cwd, check=True, **kw) -> subprocess.CompletedProcess:
  out = subprocess.run(
    [str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=_env(), **kw
  )
  if check and out.returncode != 0:
    raise AssertionError(
      f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    )
  return out


# The venvs' dependencies are kept between runs (a core install and a [train]
# install are ~0.5 and ~1 GB, minutes to unpack on 2 cores), keyed by what
# decides what pip installs into them: the interpreter, the packages asked for
# and the wheel's Requires-Dist for that install; a kept venv is used only while
# each of its distributions still has the version this environment pins
# (`constraints`). Each run then installs the freshly built wheel into it with
# --no-deps --force-reinstall and checks the venv against the wheel's metadata,
# so a dependency dropped from pyproject.toml makes a new key (a new venv), never
# a stale pass. SRFT_JAX_FRESH_VENVS=1 rebuilds them from nothing.
VENV_CACHE = pathlib.Path(
  os.environ.get("SRFT_JAX_VENV_CACHE")
  or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "srft-jax-test-venvs")
).expanduser()


def _wheel_requires(wheel: pathlib.Path, extra: str = "") -> list[Requirement]:
  """The wheel's Requires-Dist that a plain install (or one with `extra`) installs."""
  with zipfile.ZipFile(wheel) as z:
    (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    text = z.read(meta).decode()
  reqs = [
    Requirement(x.split(":", 1)[1]) for x in text.splitlines() if x.startswith("Requires-Dist:")
  ]
  return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": extra})]


def _venv(name: str, packages: list[str], built: dict, extra: str = "") -> pathlib.Path:
  """A venv (no system site-packages) holding `packages` and their dependencies
  at this environment's versions (`built["constraints"]`), reused between runs
  while its key holds (above); the returned python is ready for the wheel."""
  import fcntl
  import hashlib

  requires = [str(r) for r in _wheel_requires(built["wheel"], extra)]
  key = "\n".join([sys.version, *packages, *requires])
  path = VENV_CACHE / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
  python = path / "bin" / "python"
  VENV_CACHE.mkdir(parents=True, exist_ok=True)
  with open(VENV_CACHE / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once share one build
    if (path / "ready").exists() and not os.environ.get("SRFT_JAX_FRESH_VENVS"):
      kept = json.loads((path / "ready").read_text())
      if all(built["versions"].get(n, v) == v for n, v in kept.items() if n != "srft-jax"):
        return python
    for old in VENV_CACHE.glob(f"{name}-*"):  # earlier keys, and a half-built venv
      shutil.rmtree(old)
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=VENV_CACHE)
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile"]
    wheel = built["wheel"].as_uri()
    reqs = [p.format(wheel=wheel) for p in packages]
    _run([*pip, "-c", built["constraints"], *reqs], cwd=VENV_CACHE, timeout=1800)
    listed = _run([python, "-c", _DISTRIBUTIONS], cwd=VENV_CACHE).stdout.strip().splitlines()[-1]
    (path / "ready").write_text(listed)
  return python


def _install_wheel(python: pathlib.Path, built: dict, extra: str = "") -> dict[str, str]:
  """The built wheel into `python`'s venv, replacing the one there (--no-deps);
  then every dependency the wheel declares (with `extra`) must be installed at a
  version it allows. Returns the venv's distributions: name -> version."""
  pip = [sys.executable, "-m", "pip", "--python", python]
  _run(
    [*pip, "install", "-q", "--no-compile", "--no-deps", "--force-reinstall", built["wheel"]],
    cwd=built["tmp"],
  )
  listed = _run([python, "-c", _DISTRIBUTIONS], cwd=built["tmp"]).stdout.strip().splitlines()[-1]
  installed = json.loads(listed)
  for r in _wheel_requires(built["wheel"], extra):
    name = canonicalize_name(r.name)
    assert name in installed, f"{r} (declared by the wheel) is not installed"
    assert r.specifier.contains(installed[name], prereleases=True), f"{r}: {installed[name]}"
  _run([*pip, "check"], cwd=built["tmp"])  # and their own dependencies
  return installed


def _readme_loss_example() -> str:
  """The python blocks of the README's loss section (what tests/test_objectives.py runs)."""
  section = (ROOT / "README.md").read_text().split("### (d) The loss in another JAX project", 1)[1]
  section = section.split("\n### ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert blocks, "README's loss section lost its python example"
  return "\n".join(blocks)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """`python -m build` on a copy of the sources: sdist, then the wheel from it."""
  tmp = tmp_path_factory.mktemp("build")
  src = tmp / "src"
  src.mkdir()
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("srft_jax", "configs"):
    shutil.copytree(ROOT / name, src / name, ignore=ignore)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", src], cwd=tmp)
  (wheel,) = (tmp / "dist").glob("srft_jax-*.whl")
  (sdist,) = (tmp / "dist").glob("srft_jax-*.tar.gz")
  constraints = tmp / "constraints.txt"
  versions = {}  # this environment's versions (the first of a name on sys.path wins)
  for d in importlib.metadata.distributions():
    name = d.metadata["Name"]
    if name and canonicalize_name(name) != "srft-jax":
      versions.setdefault(canonicalize_name(name), d.version)
  constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(versions.items())))
  return {
    "tmp": tmp,
    "wheel": wheel,
    "sdist": sdist,
    "constraints": constraints,
    "versions": versions,
  }


def test_wheel_and_sdist_contents(built):
  wheel, sdist = built["wheel"], built["sdist"]
  assert wheel.name == f"srft_jax-{srft_jax.__version__}-py3-none-any.whl"
  assert sdist.name == f"srft_jax-{srft_jax.__version__}.tar.gz"
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    meta = z.read(f"srft_jax-{srft_jax.__version__}.dist-info/METADATA").decode()
    entry_points = z.read(f"srft_jax-{srft_jax.__version__}.dist-info/entry_points.txt").decode()
  package = {
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "srft_jax").rglob("*.py")
    if "__pycache__" not in p.parts
  }
  configs = {f"srft_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
  assert "srft_jax/configs/default.py" in configs
  code = {n for n in names if ".dist-info/" not in n}
  assert code == package | configs, sorted(code ^ (package | configs))  # no tests, nothing missed
  assert f"Version: {srft_jax.__version__}" in meta
  for name in SCRIPTS:
    assert re.search(rf"^{name} = srft_jax\.console:\w+$", entry_points, re.M), name
  with tarfile.open(sdist) as t:
    members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
  assert {"pyproject.toml", "README.md", "configs/default.py", "srft_jax/objectives.py"} <= members


@pytest.mark.slow
def test_core_install_runs_the_readme_loss_example(built):
  """`pip install srft-jax`: the wheel with --no-deps plus only jax and numpy,
  in a venv of its own; the README's loss example runs there, outside the repo."""
  tmp = built["tmp"]
  python = _venv("core", ["jax", "numpy"], built)
  installed = _install_wheel(python, built)
  assert not installed.keys() & {"flax", "optax", "orbax-checkpoint", "tensorflow-datasets"}
  assert installed.keys() <= {
    "srft-jax",
    "jax",
    "jaxlib",
    "numpy",
    "ml-dtypes",
    "opt-einsum",
    "scipy",
  }
  work = tmp / "core-work"
  work.mkdir()
  check = _IMPORT_CHECK + (
    "import importlib.metadata\n"
    f"assert srft_jax.__file__.startswith({str(python.parent.parent)!r}), srft_jax.__file__\n"
    "assert importlib.metadata.version('srft-jax') == srft_jax.__version__\n"
  )
  out = _run([python, "-c", check], cwd=work).stdout.strip().splitlines()
  assert json.loads(out[-1]) == ["srft_jax"]
  (work / "loss_example.py").write_text(_readme_loss_example())
  out = _run([python, "loss_example.py"], cwd=work)
  assert re.search(r"loss -?\d+\.\d+ +sft \d+\.\d+", out.stdout), out.stdout


@pytest.mark.slow
def test_train_install_entry_points(built):
  """`pip install 'srft-jax[train]'` in a venv of its own: the package imports
  no training stack until asked, every console script is installed and its
  module imports from the wheel, srft-train's --help equals `python -m
  srft_jax.main --help`, and the packaged configs load from a directory
  outside the repo."""
  from concurrent.futures import ThreadPoolExecutor

  tmp = built["tmp"]
  python = _venv("train", ["srft-jax[train] @ {wheel}"], built, extra="train")
  _install_wheel(python, built, extra="train")
  bindir = python.parent
  work = tmp / "train-work"
  work.mkdir()
  # Each script's --help; srft-train's equals `python -m srft_jax.main --help`
  # (test_scripts_run_their_modules checks every script's module in-process),
  # and the packaged config (with a preset and an override) reaches validation.
  train = [bindir / "srft-train", "--config=configs/default.py:grpo", "--config.steps=0"]
  modules = "import importlib\n" + "".join(
    f"importlib.import_module({m!r})\n" for m in SCRIPTS.values()
  )
  cmds = [[bindir / "srft-train", "--help"], [python, "-m", SCRIPTS["srft-train"], "--help"]]
  cmds += [[*train, "--workdir=w"], [python, "-c", modules + "print('ok')"]]
  cmds += [[python, "-c", _IMPORT_CHECK + "import flax, optax, orbax.checkpoint"]]
  with ThreadPoolExecutor(4) as pool:  # each one imports jax, flax, orbax, TFDS ...
    a, module_help, out, every, imports = pool.map(lambda c: _run(c, cwd=work, check=False), cmds)
  assert imports.returncode == 0, imports.stderr[-2000:]
  assert json.loads(imports.stdout.strip().splitlines()[-1]) == ["srft_jax"]
  assert every.returncode == 0 and every.stdout.strip() == "ok", every.stderr[-2000:]
  assert all((bindir / script).is_file() for script in SCRIPTS), sorted(os.listdir(bindir))
  assert a.returncode in (0, 1) and "--" in a.stdout, a  # absl's --help exits 1
  assert "Traceback" not in a.stderr, a.stderr[-2000:]
  assert (a.returncode, a.stdout) == (module_help.returncode, module_help.stdout), (a, module_help)
  assert out.returncode == 2 and "config.steps: must be positive" in out.stderr, out.stderr[-2000:]


def _served(name: str, python: str | None = None) -> list[str]:
  """The versions of `name` the registry serves for this platform and for the
  Python `python` (X.Y; this interpreter's when None)."""
  cmd = [sys.executable, "-m", "pip", "index", "versions", name]
  if python:
    cmd += ["--python-version", python, "--only-binary=:all:"]
  out = _run(cmd, cwd=ROOT)
  line = next(x for x in out.stdout.splitlines() if x.startswith("Available versions:"))
  return [v.strip() for v in line.split(":", 1)[1].split(",")]


@pytest.mark.skipif(
  not os.environ.get("SRFT_JAX_MATRIX"),
  reason="SRFT_JAX_MATRIX=all (or =0.4.30,0.6.2,...): the loss on every jax in the declared range",
)
def test_loss_across_jax_versions(built):
  """The core install on each jax release inside the declared range (not only
  the lock's): a fresh venv with jax==V (jaxlib==V where served), the wheel,
  the README example and tests/test_objectives.py, outside the repo. Also the
  range's floor with numpy's floor. About 30 s a version; not in `make test`.
  SRFT_JAX_MATRIX_PYTHON=/path/to/python3.12 makes the venvs from another
  interpreter (jax >= 0.11 needs Python 3.12; the registry serves it there)."""
  from packaging.version import Version

  core = {
    canonicalize_name(Requirement(s).name): Requirement(s)
    for s in PYPROJECT["project"]["dependencies"]
  }
  base = os.environ.get("SRFT_JAX_MATRIX_PYTHON", sys.executable)
  pyver = _run([base, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], cwd=ROOT)
  pyver = pyver.stdout.strip()
  served_for = None if base == sys.executable else pyver
  jaxlibs = set(_served("jaxlib", served_for))
  wanted = os.environ["SRFT_JAX_MATRIX"]
  served = _served("jax", served_for)
  versions = sorted((v for v in served if core["jax"].specifier.contains(v)), key=Version)
  if wanted != "all":
    versions = [v for v in versions if v in wanted.split(",")]
  numpy_floor = str(min(Version(s.version) for s in core["numpy"].specifier if s.operator == ">="))
  cases = [(v, None) for v in versions]
  floor = min(Version(v) for v in served if core["jax"].specifier.contains(v))
  if versions and Version(versions[0]) == floor:
    cases.insert(0, (versions[0], numpy_floor))  # the range's floor with numpy's floor
  tmp = built["tmp"]
  tree = tmp / "matrix-tests"  # the tests beside the README they read, no srft_jax source
  (tree / "tests").mkdir(parents=True, exist_ok=True)
  for name in ("tests/conftest.py", "tests/test_objectives.py", "README.md", "pyproject.toml"):
    shutil.copy(ROOT / name, tree / name)
  pytest_pin = f"pytest=={importlib.metadata.version('pytest')}"
  failures = {}
  for v, numpy in cases:
    tag = f"py{pyver}-jax{v}" + (f"-numpy{numpy}" if numpy else "")
    pkgs = [f"jax=={v}", pytest_pin] + ([f"jaxlib=={v}"] if v in jaxlibs else [])
    pkgs += [f"numpy=={numpy}"] if numpy else []
    venv = tmp / tag
    _run([base, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile"]
    _run([*pip, *pkgs], cwd=tmp, timeout=900)
    _run([*pip, "--no-deps", built["wheel"]], cwd=tmp)
    got = _run([python, "-c", _VERSIONS], cwd=tmp).stdout.strip()
    # (test_module_is_standalone reads the repo's source: not an install check.)
    tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    out = _run([*tests, "-k", "not test_module_is_standalone"], cwd=tree, check=False)
    failed = sorted(set(re.findall(r"^FAILED \S+::(\w+)", out.stdout, re.M)))
    # The sharded test builds its mesh with make_mesh(axis_types=...), an API
    # of newer jax than the loss needs: allowed to fail where jax lacks it.
    probe = "import jax; jax.make_mesh((1,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))"
    has_api = _run([python, "-c", probe], cwd=tmp, check=False).returncode == 0
    allowed = set() if has_api else {"test_sharded_mesh_equals_single_device"}
    summary = out.stdout.strip().splitlines()[-1]
    print(f"{tag} ({got}): {summary}" + (f"; failed {', '.join(failed)}" if failed else ""))
    if (
      out.returncode not in (0, 1) or set(failed) - allowed or "test_readme_example_runs" in failed
    ):
      failures[tag] = f"{failed}: {summary}"
      print(out.stdout[-3000:])
    shutil.rmtree(venv)
  assert not failures, failures
