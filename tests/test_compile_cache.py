"""The persistent compilation cache (srft_jax/compile_cache.py): where each
setting puts it, that a second process's compile is a hit and a changed program
a miss, that jax versions never share a directory, that a cache set outside the
run is kept, and that a gs:// cache works on the bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache as jax_cache

from srft_jax import compile_cache
from srft_jax import paths


@pytest.fixture
def restore_jax_cache():
  """Leaves JAX's cache settings as the test found them."""
  saved = (
    jax.config.jax_compilation_cache_dir,
    jax.config.jax_persistent_cache_min_compile_time_secs,
    jax.config.jax_persistent_cache_min_entry_size_bytes,
  )
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", saved[2])
  jax_cache.reset_cache()


def _entries(directory) -> set[str]:
  """The cache's entries of `_program`'s jitted function."""
  return {
    f for f in paths.list_files(str(directory)) if f.startswith("jit_f-") and f.endswith("-cache")
  }


def _new_process() -> None:
  """What a restarted process sees: no in-memory executables, the cache reopened."""
  jax.clear_caches()
  jax_cache.reset_cache()


def _program(scale: float):
  @jax.jit
  def f(x):
    return jnp.tanh(x @ x.T * scale).sum()

  return f


def test_where_each_setting_puts_the_cache():
  tag = compile_cache.version_tag()
  assert tag == f"jax-{jax.__version__}_jaxlib-{__import__('jaxlib').__version__}"
  assert compile_cache.resolve("auto", "/w/run") == f"/w/run/compile_cache/{tag}"
  assert compile_cache.resolve("auto", "gs://b/run/") == f"gs://b/run/compile_cache/{tag}"
  assert compile_cache.resolve("/c", "/w/run") == f"/c/{tag}"
  assert compile_cache.resolve("", "/w/run") is None


def test_a_new_jax_never_reads_an_old_directory(monkeypatch):
  before = compile_cache.resolve("auto", "/w")
  monkeypatch.setattr(jax, "__version__", jax.__version__ + ".post1")
  assert compile_cache.resolve("auto", "/w") != before


def test_a_restart_hits_and_a_changed_program_misses(tmp_path, restore_jax_cache, monkeypatch):
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  jax.config.update("jax_compilation_cache_dir", None)
  used = compile_cache.configure("auto", str(tmp_path))
  assert used == str(tmp_path / "compile_cache" / compile_cache.version_tag())
  assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_S
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny programs too
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32))
  first = float(_program(0.5)(x))
  stored = _entries(used)
  assert len(stored) == 1

  hits = []
  jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
  )
  _new_process()
  assert float(_program(0.5)(x)) == first  # the same program: loaded, not compiled
  assert hits.count("/jax/compilation_cache/cache_hits") == 1
  assert _entries(used) == stored

  _new_process()
  _program(0.25)(x)  # a changed program (another constant): a new entry
  assert len(_entries(used)) == 2
  assert hits.count("/jax/compilation_cache/cache_hits") == 1


def test_a_cache_set_outside_the_run_is_kept(tmp_path, restore_jax_cache):
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
  assert compile_cache.configure("auto", str(tmp_path / "run")) == str(tmp_path / "mine")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
  assert compile_cache.configure("", str(tmp_path / "run")) == str(tmp_path / "mine")
  # An explicit path is the run's choice.
  named = compile_cache.configure(str(tmp_path / "named"), str(tmp_path / "run"))
  assert (
    jax.config.jax_compilation_cache_dir
    == named
    == str(tmp_path / "named" / compile_cache.version_tag())
  )


def test_a_gs_workdir_keeps_the_cache_on_the_bucket(gcs, restore_jax_cache):
  jax.config.update("jax_compilation_cache_dir", None)
  used = compile_cache.configure("auto", "gs://srft-test/cache_run")
  assert used.startswith("gs://srft-test/cache_run/compile_cache/")
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  x = jnp.ones((8, 8), jnp.float32)
  _new_process()
  _program(0.125)(x)
  assert len(_entries(used)) == 1
