"""Retries of transient storage errors, and the job's exit when they last too long.

A remote workdir (gs://) is reached over the network: a connection refused or
reset, a timeout, an HTTP 5xx or 429 are transient, and the operation is
retried with exponential backoff (1 s doubling to 30 s) until a budget runs out
(`checkpoint.io_retry_s`, 600 s by default; docs/method.md §14.3). Every other
error (a missing file, a permission error, a bad request) is raised at once.
Past the budget, `StorageUnavailable` names the path, the operation and the last
error; `srft_jax.main` prints that one line and exits with `EXIT_STORAGE`, which
`--supervise` retries like a crash.
"""

from __future__ import annotations

import errno
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from typing import TypeVar

log = logging.getLogger(__name__)

EXIT_STORAGE = 75  # storage unavailable beyond the retry budget (sysexits EX_TEMPFAIL)
DEFAULT_BUDGET_S = 600.0
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0

T = TypeVar("T")

_budget_s = DEFAULT_BUDGET_S
_lock = threading.Lock()


def set_budget(seconds: float) -> None:
  """The retry budget of this process (the job sets `checkpoint.io_retry_s`)."""
  global _budget_s
  if not seconds > 0:
    raise ValueError(f"the storage retry budget must be positive, got {seconds}")
  with _lock:
    _budget_s = float(seconds)


def budget() -> float:
  return _budget_s


# Orbax's background save threads log their own failure before the save's
# error reaches the caller (Checkpointer.wait), where it is reported or retried;
# the threads of a failed save then log what failed after it (a read of an
# upload that never finished).
_SAVE_THREAD = "_SignalingThread.run() raised an exception"


class _OneLine(logging.Filter):
  """Storage clients (gcsfs, Orbax's save threads) log each transient failure
  with its whole traceback; the retries here report it in one line, so the
  traceback goes and the message stays. So do Orbax's save threads, whose
  error the Checkpointer receives and reports itself."""

  def filter(self, record: logging.LogRecord) -> bool:
    err = record.exc_info[1] if record.exc_info else None
    if err is not None and (is_transient(err) or _SAVE_THREAD in record.getMessage()):
      record.exc_info = None
      record.exc_text = None
    return True


_ONE_LINE = _OneLine()


def _late_callback(exc: BaseException | None) -> bool:
  """A storage client's completion callback that ran after the event loop it
  reports to had closed: TensorStore finishing a write of a failed async save
  (whose loop Orbax already ended) prints one such bare traceback per write.
  Nothing is lost with it; the save's own error is handled where it is raised."""
  return type(exc) is RuntimeError and str(exc) == "Event loop is closed"


def _excepthook(hook):
  def quiet(exc_type, exc, tb):
    if _late_callback(exc):
      log.debug("a storage callback ran after its event loop closed")
      return
    hook(exc_type, exc, tb)

  quiet.srft_quiet = True
  return quiet


def _unraisablehook(hook):
  def quiet(unraisable):
    if _late_callback(unraisable.exc_value):
      log.debug("a storage callback ran after its event loop closed")
      return
    hook(unraisable)

  quiet.srft_quiet = True
  return quiet


def quiet_client_logs() -> None:
  """Tracebacks of transient storage errors out of the log (`_OneLine`), on
  every handler of the root logger (a library's records reach them all); and
  out of stderr, the late callbacks of a failed save (`_late_callback`), which
  reach `sys.excepthook` (or `sys.unraisablehook`) from a client's thread."""
  for handler in logging.getLogger().handlers:
    if _ONE_LINE not in handler.filters:
      handler.addFilter(_ONE_LINE)
  if not getattr(sys.excepthook, "srft_quiet", False):
    sys.excepthook = _excepthook(sys.excepthook)
  if not getattr(sys.unraisablehook, "srft_quiet", False):
    sys.unraisablehook = _unraisablehook(sys.unraisablehook)


class StorageUnavailable(OSError):
  """A storage operation still failed transiently when the retry budget ran out."""

  def __init__(self, op: str, path: str, error: BaseException, waited_s: float):
    self.op, self.path, self.error, self.waited_s = op, str(path), error, waited_s
    super().__init__(
      f"storage unavailable: {op} {path} failed for {waited_s:.0f}s "
      f"(retry budget checkpoint.io_retry_s={_budget_s:g}); last error: "
      f"{type(error).__name__}: {_one_line(error)}"
    )


_TRANSIENT_ERRNOS = {
  errno.ECONNREFUSED,
  errno.ECONNRESET,
  errno.ECONNABORTED,
  errno.ETIMEDOUT,
  errno.EHOSTUNREACH,
  errno.ENETUNREACH,
  errno.ENETDOWN,
  errno.EPIPE,
  errno.EAGAIN,
}
# What the storage clients put in their messages (gcsfs, aiohttp, TensorStore's
# absl status, google-auth) when the cause is the network or the server.
_TRANSIENT_TEXT = re.compile(
  r"connection (refused|reset|aborted|closed)|cannot connect|couldn't connect|"
  r"failed to connect|server disconnected|timed? ?out|deadline[_ ]exceeded|"
  r"\bunavailable\b|temporarily|too many requests|\b(429|500|502|503|504)\b|"
  r"remote end closed|broken pipe|resumable upload|retry limit",
  re.IGNORECASE,
)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


# Libraries whose errors raised while handling another one (implicit chaining)
# are taken to wrap it; any other error's context is only where it happened (a
# bug hit while a storage error was being handled is no storage error).
_WRAPPERS = ("gcsfs", "fsspec", "aiohttp", "orbax", "etils", "tensorstore", "google")


def _chain(e: BaseException):
  """`e` and the errors it was raised from (`raise ... from`), and the error it
  was raised during when `e` is a storage library's own or an OSError."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    wraps = isinstance(e, OSError) or type(e).__module__.split(".")[0] in _WRAPPERS
    e = e.__cause__ or (e.__context__ if wraps and not e.__suppress_context__ else None)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text[:300] + ("..." if len(text) > 300 else "")


def is_transient(e: BaseException) -> bool:
  """Whether `e` (or an error it was raised from) is one a retry can cure."""
  for err in _chain(e):
    if isinstance(err, StorageUnavailable):
      return False  # a budget already spent
    if isinstance(err, FileNotFoundError) and "upload_id=" in str(err):
      return True  # a resumable upload the store forgot (a restart): the write starts over
    if isinstance(err, _PERMANENT):
      return False
    if isinstance(err, ConnectionError | TimeoutError):
      return True
    code = getattr(err, "code", None) or getattr(err, "status", None)
    if isinstance(code, int) and (code == 429 or 500 <= code < 600):
      return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
      return True
    name = type(err).__module__ + "." + type(err).__name__
    if name.startswith("aiohttp.") and "Client" in name and "Response" not in name:
      return True  # ClientConnectorError, ServerDisconnectedError, ClientOSError, ...
    if _TRANSIENT_TEXT.search(str(err)):
      return True
  return False


# A try's outcome, ordered: the worst over the processes decides what they all do.
OK, RETRY, GIVE_UP, FAIL = 0, 1, 2, 3


def outcome(err: BaseException | None, *, past_budget: bool = False) -> int:
  """`OK` (no error), `RETRY` (transient, budget left), `GIVE_UP` (transient,
  budget spent) or `FAIL` (an error no retry cures)."""
  if err is None:
    return OK
  if not is_transient(err):
    return FAIL
  return GIVE_UP if past_budget else RETRY


def retry(
  op: str,
  path: str,
  fn: Callable[[], T],
  *,
  budget_s: float | None = None,
  sleep: Callable[[float], Any] = time.sleep,
  clock: Callable[[], float] = time.monotonic,
  agree: Callable[[int], int] | None = None,
) -> T:
  """`fn()`, retried with backoff while it fails transiently, for up to the
  budget; then `StorageUnavailable`. Non-transient errors pass through.

  `agree` makes the retries collective (a multi-host checkpoint save): every
  process calls `fn` the same number of times and leaves together. After each
  try it maps this process's outcome (`OK`, `RETRY`, `GIVE_UP`, `FAIL`) to the
  worst over all processes: one failure retries everyone, one spent budget or
  non-transient error ends it for all."""
  budget_s = _budget_s if budget_s is None else budget_s
  start = clock()
  delay = FIRST_DELAY_S
  attempt = 0
  while True:
    attempt += 1
    err = None
    try:
      out = fn()
    except Exception as e:  # noqa: BLE001 - classified just below
      err = e
    waited = clock() - start
    if agree is None:
      if err is None:
        break
      if not is_transient(err):
        raise err
      if waited + delay > budget_s:
        raise StorageUnavailable(op, path, err, waited) from err
    else:  # every process takes the worst outcome's way
      mine = outcome(err, past_budget=waited + delay > budget_s)
      worst = agree(mine)
      if worst == OK:
        break
      if err is None:  # this process's try succeeded, another one's did not
        err = ConnectionError(f"{op} {path} failed on another process")
      if worst == FAIL:
        if mine == FAIL:
          raise err
        raise RuntimeError(f"{op} {path} failed on another process") from err
      if worst == GIVE_UP:
        raise StorageUnavailable(op, path, err, waited) from err
    log.warning(
      "%s %s: %s: %s; retry %d in %.0fs (%.0fs of the %.0fs budget used)",
      op,
      path,
      type(err).__name__,
      _one_line(err),
      attempt,
      delay,
      waited,
      budget_s,
    )
    sleep(delay)
    delay = min(2 * delay, MAX_DELAY_S)
  if attempt > 1:
    log.warning("%s %s: succeeded on try %d after %.0fs", op, path, attempt, clock() - start)
  return out


class Streak:
  """Failures of an operation that is not retried in place (an async
  checkpoint save whose arrays are gone): the first failure starts the clock,
  a success stops it, and a failure past the budget raises."""

  def __init__(self, op: str, path: str, clock: Callable[[], float] = time.monotonic):
    self.op, self.path, self._clock = op, str(path), clock
    self.since: float | None = None

  def failed(self, e: BaseException, agree: Callable[[int], int] | None = None) -> None:
    """Counts a failure; past the budget raises. With `agree` (a collective
    save) the processes give up together, when any one's budget is spent."""
    now = self._clock()
    if self.since is None:
      self.since = now
    past = now - self.since > _budget_s
    if agree is not None:
      past = agree(GIVE_UP if past else RETRY) == GIVE_UP
    if past:
      raise StorageUnavailable(self.op, self.path, e, now - self.since) from e

  def succeeded(self) -> None:
    self.since = None
