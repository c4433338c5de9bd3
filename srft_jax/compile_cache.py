"""The persistent compilation cache (docs/method.md §14.1): a restarted or resumed
run loads its compiled programs (the sampler, the train step, the evaluation)
from disk instead of compiling them again.

`checkpoint.compile_cache`:
  "auto"  WORKDIR/compile_cache/<versions>: local disk for a local workdir, the
          bucket for a gs:// workdir, so that a preempted pod's restart finds it
          (JAX reads and writes it through etils.epath / gcsfs; only process 0
          writes). A cache the user already set (JAX_COMPILATION_CACHE_DIR or
          jax.config) is left as it is.
  ""      none of the run's own (the user's, if any, stays).
  a path  PATH/<versions>, local or remote.

Keys. JAX's own key hashes the lowered program, the compile options, the
devices and the backend, so a changed config that changes any program never
hits an old entry. <versions> (`version_tag`) names jax and jaxlib, so a new
jax starts an empty directory and old ones can be deleted whole.
"""

from __future__ import annotations

import logging
import os

import jax
import jaxlib
from jax._src import compilation_cache as _jax_cache

log = logging.getLogger(__name__)

AUTO = "auto"
SUBDIR = "compile_cache"
# Programs that compile faster than this are not stored (JAX's default is 1 s;
# the evaluation's and the data path's small programs add up at a restart).
MIN_COMPILE_S = 0.2


def version_tag() -> str:
  return f"jax-{jax.__version__}_jaxlib-{jaxlib.__version__}"


def _join(root: str, *parts: str) -> str:
  return "/".join([root.rstrip("/"), *parts])


def resolve(setting: str, workdir: str) -> str | None:
  """The directory `setting` names for a run in `workdir` (None: off)."""
  if not setting:
    return None
  root = _join(workdir, SUBDIR) if setting == AUTO else setting
  return _join(root, version_tag())


def current() -> str | None:
  return jax.config.jax_compilation_cache_dir or None


def configure(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent cache where `setting` says (module docstring);
  returns the directory in use (None: none). Call before anything compiles."""
  if setting == AUTO and current():
    log.info("compilation cache: %s (set outside the run)", current())
    return current()
  path = resolve(setting, workdir)
  if path is None:
    return current()
  if path != current():
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    _jax_cache.reset_cache()  # JAX opens its cache once a process; reopen it here
  log.info("compilation cache: %s", path)
  return path
