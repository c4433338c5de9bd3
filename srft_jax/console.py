"""The console entry points (srft-train, srft-eval, ...) and where the config files are.

Each entry point runs its module exactly as `python -m MODULE` does (`runpy`, as
the interpreter's `-m`), so flags, `--help` and exit codes are the same in both
forms: `srft-train` is `python -m srft_jax.main`, `srft-eval` is
`python -m srft_jax.evaluate`, `srft-data` is `python -m srft_jax.data`,
`srft-study` is `python -m srft_jax.study`, `srft-aot` is
`python -m srft_jax.tools.aot` and `srft-hf` is `python -m srft_jax.hf_cli`.

Config files: the repo's `configs/` folder ships in the wheel as
`srft_jax/configs/`. `--config=configs/NAME.py[:ARG]` (or just `NAME[:ARG]`)
names the file in the current directory where it exists (a checkout, a copy
you edit), and the installed copy otherwise. Stdlib only: importing this module
imports no JAX.
"""

from __future__ import annotations

import os
import runpy

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def configs_dir() -> str:
  """The folder of the config files: the wheel's `srft_jax/configs/`, or in a
  source checkout the repo's `configs/`."""
  for d in (os.path.join(_PACKAGE, "configs"), os.path.join(os.path.dirname(_PACKAGE), "configs")):
    if os.path.isfile(os.path.join(d, "default.py")):
      return d
  raise FileNotFoundError(f"no configs/default.py beside or inside {_PACKAGE}")


def resolve_config(spec: str) -> str:
  """'PATH[:ARG]' as `--config=` takes it, with PATH made a file that exists.

  An existing PATH stays as it is. Otherwise `configs/NAME.py`, `NAME.py` or
  `NAME` becomes the packaged `NAME.py` where there is one; anything else stays
  (the config flag then reports the missing file)."""
  path, sep, arg = spec.partition(":")
  if os.path.exists(path):
    return spec
  head, name = os.path.split(path)
  if head not in ("", "configs", os.path.join(".", "configs")):
    return spec
  if not name.endswith(".py"):
    name += ".py"
  try:
    packaged = os.path.join(configs_dir(), name)
  except FileNotFoundError:
    return spec
  return packaged + sep + arg if os.path.isfile(packaged) else spec


def resolve_config_argv(argv: list[str], flag: str = "config") -> list[str]:
  """`argv` with the value of `--config=X` / `--config X` through resolve_config
  (overrides such as `--config.steps=5` are left alone)."""
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    for dashes in ("--", "-"):
      if a == dashes + flag and i + 1 < len(argv):
        out += [a, resolve_config(argv[i + 1])]
        i += 2
        break
      if a.startswith(f"{dashes}{flag}="):
        out.append(f"{dashes}{flag}=" + resolve_config(a.split("=", 1)[1]))
        i += 1
        break
    else:
      out.append(a)
      i += 1
  return out


def _run(module: str) -> None:
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
  """`srft-train`: `python -m srft_jax.main`."""
  _run("srft_jax.main")


def evaluate() -> None:
  """`srft-eval`: `python -m srft_jax.evaluate`."""
  _run("srft_jax.evaluate")


def data() -> None:
  """`srft-data`: `python -m srft_jax.data`."""
  _run("srft_jax.data")


def study() -> None:
  """`srft-study`: `python -m srft_jax.study`."""
  _run("srft_jax.study")


def aot() -> None:
  """`srft-aot`: `python -m srft_jax.tools.aot`."""
  _run("srft_jax.tools.aot")


def hf() -> None:
  """`srft-hf`: `python -m srft_jax.hf_cli`."""
  _run("srft_jax.hf_cli")
