"""Orbax checkpoints: async saves, keep-last-N, abstract (sharded) restore,
fallback past a corrupted latest step, and SIGTERM-triggered saves.

A checkpoint holds the train state (params, optimizer state, step; restored
straight into its sharded layout), the data-iterator position, the RNG seed
and the config, so a restarted run continues exactly. With LoRA the params
are the adapters only; the meta names the frozen base (path and content hash,
`trainer.check_resume_base`). A checkpoint of the other layer layout
(`model.scan_layers`) is refused (`LayerLayoutError`), never taken for unreadable.

In a bucket (gs://), a save that fails transiently (a connection error, a
timeout, a 5xx) is saved again as a whole, with backoff, while the arrays it
holds still exist (before the next step, and always for a run's last save);
an async save whose arrays the next step has already replaced is dropped with
a warning, the next save taking its place. Either way the last complete
checkpoint stays intact (Orbax marks a finished step last and a new manager
clears unfinished ones), and failures that outlast `checkpoint.io_retry_s`
raise `io_retry.StorageUnavailable` (docs/method.md §14.3). With several
processes every save ends in an agreement (one all-gather of each process's
outcome), so they retry, drop or give up together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from srft_jax import io_retry

log = logging.getLogger(__name__)


class _QuietFailedSaves(logging.Filter):
  """Orbax logs a failed async save with its traceback before re-raising it;
  the Checkpointer reports (and retries) it itself, in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Save Finalize thread" not in record.getMessage()


_QUIET = _QuietFailedSaves()

# Saves that failed in this process. Orbax leaves a failed async save's
# threads waiting for signals that never come (until its own timeout, minutes),
# and the interpreter would wait for them at exit: `srft_jax.main` exits
# without them once the run's files are written.
failed_saves = 0


@contextlib.contextmanager
def _quiet_failed_saves():
  absl_log = logging.getLogger("absl")
  absl_log.addFilter(_QUIET)
  try:
    yield
  finally:
    absl_log.removeFilter(_QUIET)


def tensorstore_retries(budget_s: float) -> dict:
  """TensorStore's per-request GCS retries (Orbax writes and reads arrays
  through it) as a context resource whose backoff (1 s doubling to 30 s) adds
  up to at most `budget_s`, with at least one retry. Its default (32 retries up
  to 32 s apart) keeps a save waiting on a dead bucket for about 15 minutes,
  past any budget of the job's own."""
  retries, total, delay = 0, 0.0, io_retry.FIRST_DELAY_S
  while retries == 0 or total + delay <= budget_s:
    retries, total = retries + 1, total + delay
    delay = min(2 * delay, io_retry.MAX_DELAY_S)
  return {
    "max_retries": retries,
    "initial_delay": f"{io_retry.FIRST_DELAY_S:g}s",
    "max_delay": f"{io_retry.MAX_DELAY_S:g}s",
  }


def bound_tensorstore_retries(budget_s: float) -> None:
  """Every TensorStore context Orbax builds from now on carries
  `tensorstore_retries(budget_s)`. Orbax has no option for it: its contexts
  are copies of two module-level specs, extended here (tests/test_io_retry.py
  fails if an Orbax release builds them otherwise)."""
  spec = tensorstore_retries(budget_s)
  for base in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
    base["gcs_request_retries"] = spec


def _arrays_alive(tree: Any) -> bool:
  """Whether every array of `tree` still holds its buffers (not donated away)."""
  return not any(
    isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree_util.tree_leaves(tree)
  )


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the project's item layout."""

  ITEMS = ("state", "data", "meta")

  def __init__(self, directory, *, keep: int = 2, async_save: bool = True):
    directory = str(directory)
    if "://" not in directory:  # Orbax needs absolute local paths (gs:// stays as is)
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    self._options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    # Saves are retried in a bucket. A multi-host save is collective (Orbax's
    # barriers), so the processes agree after every save and every try on what
    # they all do next (`_agree`): a retry on one host alone would hang.
    self._retry = "://" in directory
    if self._retry:
      # A request's own retries take half the budget: a failed save is saved again.
      bound_tensorstore_retries(io_retry.budget() / 2)
    # (step, args, state) of the save in flight: `state` is the train state it
    # holds, whose arrays the next step may donate away.
    self._pending: tuple[int, Any, Any] | None = None
    self._streak = io_retry.Streak("checkpoint save", directory)
    self._mgr = self._open()

  def _open(self) -> ocp.CheckpointManager:
    def open_manager():
      return ocp.CheckpointManager(self.directory, options=self._options, item_names=self.ITEMS)

    if not self._retry:
      return open_manager()
    return io_retry.retry(
      "open checkpoints", str(self.directory), open_manager, agree=self._agreement()
    )

  def _agreement(self):
    """`_agree` when several processes save together, else None (alone, a
    process's own outcome decides)."""
    return self._agree if jax.process_count() > 1 else None

  def _agree(self, outcome: int) -> int:
    """The worst of the processes' outcomes (`io_retry.OK` ... `FAIL`), by one
    small all-gather: every process then takes the same way."""
    if jax.process_count() == 1:
      return outcome
    return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))

  def _decide(self, err: BaseException | None, what: str) -> int:
    """The agreed outcome of a save (or its wait) that raised `err` here (None:
    it did not); raises when no retry cures it, here or on another process."""
    mine = io_retry.outcome(err) if self._retry or err is None else io_retry.FAIL
    worst = self._agree(mine)
    if worst == io_retry.FAIL:
      if err is not None:
        raise err
      raise RuntimeError(f"{what} in {self.directory} failed on another process")
    return worst

  @staticmethod
  def _elsewhere(err: BaseException | None, what: str) -> BaseException:
    return err if err is not None else ConnectionError(f"{what} failed on another process")

  def _reopen(self) -> None:
    """A new manager after a failed save (the old one re-raises its error on
    every later call); it clears the failed step's unfinished directory."""
    try:
      self._mgr.close()
    except Exception:  # noqa: BLE001 - the failure being handled, raised again
      pass
    self._mgr = self._open()

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = True):
    """Starts an (async) save; returns at once. `wait()` blocks until it is on disk."""
    self._settle()
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta),
    )
    err = None
    try:
      self._mgr.save(step, args=args, force=force)
    except Exception as e:  # noqa: BLE001 - `_decide` raises what no retry cures
      err = e
    if self._decide(err, f"checkpoint step {step}") == io_retry.OK:
      self._pending = (step, args, state)
      return
    self._failed(step, args, state, self._elsewhere(err, f"checkpoint step {step}"))

  def wait(self):
    self._settle()

  def _settle(self) -> None:
    """Waits for the save in flight; a failed one is saved again or dropped (`_failed`)."""
    pending, self._pending = self._pending, None
    err = None
    try:
      with _quiet_failed_saves():
        self._mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - raised below unless a retry cures it
      err = e
    if pending is None:  # (the same on every process: saves are collective)
      if err is not None:
        raise err
      return
    what = f"checkpoint step {pending[0]}"
    if self._decide(err, what) == io_retry.OK:
      self._streak.succeeded()
      return
    self._failed(*pending, self._elsewhere(err, what))

  def _failed(self, step: int, args: Any, state: Any, e: BaseException) -> None:
    global failed_saves
    failed_saves += 1
    self._reopen()
    alive = self._agree(io_retry.OK if _arrays_alive(state) else io_retry.RETRY) == io_retry.OK
    if not alive:  # the next step replaced them: the next save takes its place
      log.warning(
        "checkpoint step %d in %s was not saved (%s: %s); the next save takes its place",
        step,
        self.directory,
        type(e).__name__,
        str(e)[:200],
      )
      self._streak.failed(e, agree=self._agreement())
      return
    log.warning(
      "checkpoint step %d in %s failed (%s: %s); saving it again",
      step,
      self.directory,
      type(e).__name__,
      str(e)[:200],
    )

    tries = 0

    def save_now():
      nonlocal tries
      if tries:  # after a failed try, on every process (a manager opens collectively)
        self._reopen()
      tries += 1
      if step in self._mgr.all_steps():  # finished before the error
        return
      self._mgr.save(step, args=args, force=True)
      self._mgr.wait_until_finished()

    with _quiet_failed_saves():
      io_retry.retry(
        "checkpoint save", f"{self.directory}/{step}", save_now, agree=self._agreement()
      )
    self._streak.succeeded()

  def restore(
    self, abstract_state: Any, step: int | None = None, *, delete_unreadable: bool = False
  ):
    """Restores the newest readable checkpoint into `abstract_state`'s shardings.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding`.
    A latest checkpoint that fails to read (truncated, half-written) is
    skipped with a warning (and deleted with `delete_unreadable`, as a
    resuming run does) and the previous one is used. Returns
    `(step, state, data_state, meta)` or None when there is no checkpoint.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    want = layer_layout(abstract_state)
    for s in steps:
      self._check_layer_layout(s, want)  # refused, never skipped as unreadable (nor deleted)
      try:
        out = self._mgr.restore(
          s,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
          ),
        )
        return s, out["state"], out["data"], out["meta"]
      except Exception as e:  # noqa: BLE001 - any read failure means "unusable"
        if step is not None:
          raise
        log.warning(
          "checkpoint step %d in %s is unreadable (%s: %s); trying an older one%s",
          s,
          self.directory,
          type(e).__name__,
          str(e)[:200],
          " (deleted)" if delete_unreadable else "",
        )
        if delete_unreadable:  # a resuming run saves this step again; keep-N counts good ones
          self._mgr.delete(s)
    return None

  def _check_layer_layout(self, step: int, want: str | None):
    """`LayerLayoutError` when step's params hold the other layer layout."""
    try:
      saved = layer_layout(self._mgr.item_metadata(step)["state"])
    except Exception:  # noqa: BLE001 - unreadable metadata: `restore` decides
      return
    if saved and want and saved != want:
      raise LayerLayoutError(
        f"model.scan_layers: {self.directory} (step {step}) holds the model's layers in the "
        f"{saved} layout (model.scan_layers={saved == 'scanned'}), this run builds the {want} "
        f"layout (model.scan_layers={want == 'scanned'}); set model.scan_layers="
        f"{saved == 'scanned'} to resume it, or give another workdir"
      )

  def read_meta(self) -> dict | None:
    """The `meta` item of the newest checkpoint whose meta reads (None: none)."""
    for s in reversed(self.all_steps()):
      try:
        return dict(
          self._mgr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        )
      except Exception:  # noqa: BLE001 - an unreadable step: `restore` decides
        continue
    return None

  def close(self):
    self._settle()
    self._mgr.close()


class LayerLayoutError(ValueError):
  """A checkpoint of the other layer layout (ModelConfig.scan_layers) than the restore target."""


def layer_layout(tree: Any) -> str | None:
  """The layer layout of a train state's params (ModelConfig.scan_layers):
  "scanned" (stacks under "layer_stacks"), "loop" (one entry a layer under
  "layers"), or None (neither found, e.g. no model in the tree)."""
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = {str(getattr(k, "key", getattr(k, "name", ""))) for k in path}
    if "layer_stacks" in names:
      return "scanned"
    if "layers" in names:
      return "loop"
  return None


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing a pytree of arrays."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


class PreemptionGuard:
  """Turns SIGTERM (what Cloud TPU and SLURM send) into a flag read at step boundaries."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self.requested = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    log.warning("signal %d received: will checkpoint at the next step boundary and exit", signum)
    self.requested = True

  def should_stop(self) -> bool:
    """True on every host once any host was signalled (multi-host agreement)."""
    if jax.process_count() == 1:
      return self.requested

    flags = multihost_utils.process_allgather(jax.numpy.array(int(self.requested)))
    return bool(flags.max())

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
