"""Transient storage errors are retried (srft_jax/io_retry.py).

The classification and the backoff on hand-made errors with a fake clock, then
the real path layer and the Checkpointer riding out an outage of the local GCS
emulator (conftest.py `gcs`, objects on disk, so the bucket comes back with
them). The main job's outages are in tests/test_gcs.py.
"""

import errno
import logging
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from srft_jax import checkpoint as ckpt_lib
from srft_jax import io_retry
from srft_jax import paths

BUCKET = "gs://srft-test"


class _Clock:
  """A clock that `sleep` advances: backoff without waiting."""

  def __init__(self):
    self.now = 0.0
    self.sleeps = []

  def __call__(self):
    return self.now

  def sleep(self, s):
    self.sleeps.append(s)
    self.now += s


class _Status(Exception):
  def __init__(self, code):
    super().__init__(f"HTTP {code}")
    self.code = code


def test_which_errors_are_transient():
  import aiohttp
  from gcsfs.retry import HttpError

  transient = [
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    ConnectionResetError(),
    TimeoutError("read timed out"),
    OSError(errno.ETIMEDOUT, "timed out"),
    OSError(errno.EHOSTUNREACH, "no route"),
    aiohttp.ServerDisconnectedError(),
    HttpError({"code": 503, "message": "Service Unavailable"}),
    HttpError({"code": 429, "message": "rate limited"}),
    _Status(500),
    ValueError("UNAVAILABLE: Couldn't connect to server"),  # TensorStore's absl status text
    ValueError("DEADLINE_EXCEEDED: while writing"),
  ]
  transient.append(  # a resumable upload the restarted store forgot: the write starts over
    FileNotFoundError(
      "http://127.0.0.1:1/upload/storage/v1/b/b/o?uploadType=resumable&name=ck%2Fm&upload_id=e9"
    )
  )
  chained = RuntimeError("the commit failed")
  chained.__cause__ = ConnectionResetError()
  transient.append(chained)
  permanent = [
    FileNotFoundError("gs://b/missing"),
    PermissionError("403 forbidden"),
    HttpError({"code": 404, "message": "No such object"}),
    HttpError({"code": 400, "message": "Invalid argument"}),
    _Status(403),
    ValueError("malformed config"),
    KeyError("step"),
    io_retry.StorageUnavailable("write", "gs://b/x", ConnectionResetError(), 600),
  ]
  try:  # a bug met while a storage error was being handled is no storage error
    try:
      raise ConnectionResetError("reset")
    except ConnectionResetError:
      raise RuntimeError("Array has been deleted with shape=float32[256,32].")  # noqa: B904
  except RuntimeError as bug:
    permanent.append(bug)
  assert [io_retry.is_transient(e) for e in transient] == [True] * len(transient)
  assert [io_retry.is_transient(e) for e in permanent] == [False] * len(permanent)


def test_backoff_doubles_to_its_cap_and_succeeds():
  clock, calls = _Clock(), []

  def flaky():
    calls.append(clock())
    if len(calls) <= 7:
      raise ConnectionResetError("reset by peer")
    return "ok"

  out = io_retry.retry("write", "gs://b/f", flaky, budget_s=600, sleep=clock.sleep, clock=clock)
  assert out == "ok"
  assert clock.sleeps == [1, 2, 4, 8, 16, 30, 30]
  assert calls == [0, 1, 3, 7, 15, 31, 61, 91]


def test_budget_runs_out_with_one_line_naming_path_op_and_error():
  clock = _Clock()

  def down():
    raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")

  with pytest.raises(io_retry.StorageUnavailable) as info:
    io_retry.retry("upload", "gs://b/ck/7", down, budget_s=20, sleep=clock.sleep, clock=clock)
  # 0 +1 +2 +4 +8 = 15 s waited; the next wait (16 s) would pass the 20 s budget.
  assert clock.sleeps == [1, 2, 4, 8]
  e = info.value
  assert (e.op, e.path, e.waited_s) == ("upload", "gs://b/ck/7", 15)
  assert isinstance(e.__cause__, ConnectionRefusedError)
  msg = str(e)
  assert "\n" not in msg
  assert msg.startswith("storage unavailable: upload gs://b/ck/7 failed for 15s")
  assert "last error: ConnectionRefusedError: [Errno 111] Connect call failed" in msg
  assert isinstance(e, OSError)


def test_collective_retries_take_the_worst_outcome_of_the_processes():
  """With `agree` (a multi-host save) this process follows the worst outcome:
  it tries again after its own success when another failed, stops when another
  spent its budget or hit a permanent error, and returns only when all did."""
  clock = _Clock()
  ok = lambda: "ok"  # noqa: E731

  def run(others, fn=ok, budget_s=600):
    seen, script = [], iter(others)

    def agree(mine):
      seen.append(mine)
      return max(mine, next(script))

    try:
      return io_retry.retry(
        "save", "gs://b/ck/3", fn, budget_s=budget_s, sleep=clock.sleep, clock=clock, agree=agree
      ), seen
    except Exception as e:  # noqa: BLE001
      return e, seen

  R, G, F, OK = io_retry.RETRY, io_retry.GIVE_UP, io_retry.FAIL, io_retry.OK
  assert run([R, R, OK]) == ("ok", [OK, OK, OK])  # tried 3 times for the others
  e, seen = run([G])
  assert isinstance(e, io_retry.StorageUnavailable) and seen == [OK]
  assert "failed on another process" in str(e)
  e, seen = run([F])
  assert isinstance(e, RuntimeError) and "save gs://b/ck/3 failed on another process" in str(e)

  def down():
    raise ConnectionResetError("reset by peer")

  clock.sleeps.clear()
  e, seen = run([OK] * 10, down, budget_s=20)  # its own budget: it gives up, and says so
  assert isinstance(e, io_retry.StorageUnavailable) and seen == [R, R, R, R, G]
  assert clock.sleeps == [1, 2, 4, 8]

  def denied():
    raise PermissionError("gs://b/ck/3")

  e, seen = run([OK], denied)
  assert isinstance(e, PermissionError) and seen == [F]


def test_permanent_errors_are_not_retried():
  clock = _Clock()
  for err in (FileNotFoundError("gs://b/none"), ValueError("bad")):

    def fail(err=err):
      raise err

    with pytest.raises(type(err)):
      io_retry.retry("read", "gs://b/none", fail, sleep=clock.sleep, clock=clock)
  assert clock.sleeps == []


def test_streak_raises_only_past_the_budget_and_resets_on_success(monkeypatch):
  monkeypatch.setattr(io_retry, "_budget_s", 10.0)
  clock = _Clock()
  s = io_retry.Streak("checkpoint save", "gs://b/ck", clock=clock)
  err = ConnectionResetError()
  s.failed(err)
  clock.now = 10.0
  s.failed(err)  # 10 s: at the budget, not past it
  s.succeeded()
  clock.now = 30.0
  s.failed(err)  # a new streak starts here
  clock.now = 40.5
  with pytest.raises(io_retry.StorageUnavailable, match="checkpoint save gs://b/ck failed for 10s"):
    s.failed(err)
  # Collective (multi-host): given up when any process's budget is spent.
  s = io_retry.Streak("checkpoint save", "gs://b/ck", clock=clock)
  told = []
  s.failed(err, agree=lambda mine: told.append(mine) or io_retry.RETRY)
  with pytest.raises(io_retry.StorageUnavailable):
    s.failed(err, agree=lambda mine: told.append(mine) or io_retry.GIVE_UP)
  assert told == [io_retry.RETRY, io_retry.RETRY]  # its own budget was not spent


def test_budget_is_validated():
  with pytest.raises(ValueError, match="positive"):
    io_retry.set_budget(0)


def test_transient_tracebacks_leave_the_log_in_one_line():
  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(self.format(record))

  handler = Keep()
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    io_retry.quiet_client_logs()
    log = logging.getLogger("gcsfs")
    for err in (ConnectionRefusedError(111, "refused"), ValueError("a bug")):
      try:
        raise err
      except Exception as e:  # noqa: BLE001
        log.error("request failed: %s", e, exc_info=True)
    try:  # an Orbax save thread's failure: the Checkpointer gets and reports it
      raise ValueError("NOT_FOUND: Error reading step/.zarray")
    except ValueError as e:
      logging.getLogger("absl").error(
        "[thread=array_type_handler] _SignalingThread.run() raised an exception: %s",
        e,
        exc_info=True,
      )
  finally:
    root.removeHandler(handler)
  assert records[0] == "request failed: [Errno 111] refused"  # retried: one line
  assert "Traceback" in records[1] and "ValueError: a bug" in records[1]  # a bug keeps its own
  assert records[2] == (
    "[thread=array_type_handler] _SignalingThread.run() raised an exception: "
    "NOT_FOUND: Error reading step/.zarray"
  )


_LATE_CALLBACK = """
import asyncio, os, sys, time
os.environ["TENSORSTORE_GCS_HTTP_URL"] = "http://127.0.0.1:9"  # nothing listens
os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "x"
import tensorstore as ts
if sys.argv[1] == "quiet":
  from srft_jax import io_retry
  io_retry.quiet_client_logs()
retries = {"max_retries": 2, "initial_delay": "0.2s", "max_delay": "0.5s"}
ctx = ts.Context({"gcs_request_retries": retries})

async def save():  # an async save that ends (fails) before its write does
  write = ts.open({"driver": "zarr", "kvstore": "gs://bucket-x/x"}, create=True,
                  dtype=ts.float32, shape=[4], context=ctx)
  asyncio.ensure_future(write)
  await asyncio.sleep(0.05)

loop = asyncio.new_event_loop()
loop.run_until_complete(save())
loop.close()
time.sleep(2)  # the write gives up and reports to the closed loop
raise RuntimeError("the main thread's own error is still printed")
"""


def test_late_callbacks_of_a_failed_save_print_no_traceback():
  """TensorStore reports a write that outlived its event loop (a failed async
  save's) through sys.excepthook: a bare traceback per write, which the job
  drops; any other error is printed as before."""
  import subprocess
  import sys

  def run(mode):
    p = subprocess.run(
      [sys.executable, "-c", _LATE_CALLBACK, mode], capture_output=True, text=True, timeout=120
    )
    return p.stderr

  loud, quiet = run("loud"), run("quiet")
  assert "RuntimeError: Event loop is closed" in loud  # what the job's log showed
  assert "Event loop is closed" not in quiet, quiet[-2000:]
  assert "RuntimeError: the main thread's own error is still printed" in quiet
  assert quiet.count("Traceback") == 1


# ----------------------------------------------------------------------------
# Against the emulator: an outage while writing, the bucket back with its data
# ----------------------------------------------------------------------------


def _outage(gcs, seconds):
  """Stops the emulator now and starts it again `seconds` later (a thread)."""
  gcs.stop()
  t = threading.Timer(seconds, gcs.start)
  t.start()
  return t


def test_paths_ride_out_an_outage(gcs):
  f = f"{BUCKET}/blip/a.json"
  paths.write_json(f, {"x": 1})
  t0 = time.monotonic()
  timer = _outage(gcs, 3)
  try:
    paths.write_json(f, {"x": 2})  # waits for the bucket, then writes
    assert paths.read_json(f) == {"x": 2}
  finally:
    timer.join()
  assert time.monotonic() - t0 >= 3
  assert paths.list_files(f"{BUCKET}/blip") == {"a.json": 8}


def test_tensorstore_retries_add_up_to_the_budget():
  # backoff 1, 2, 4, 8, 16, then 30 s: the most retries whose delays fit
  spec = ckpt_lib.tensorstore_retries
  assert spec(0.5)["max_retries"] == 1  # at least one
  assert spec(3)["max_retries"] == 2  # 1 + 2
  assert spec(6.9)["max_retries"] == 2  # 1 + 2 (+ 4 > 6.9)
  assert spec(7)["max_retries"] == 3
  assert spec(300)["max_retries"] == 13  # 31 + 8 * 30 = 271 (+ 30 > 300)
  assert spec(300)["initial_delay"] == "1s" and spec(300)["max_delay"] == "30s"


def test_orbax_writes_to_a_dead_bucket_give_up_within_the_budget(gcs, monkeypatch):
  """Orbax writes arrays through TensorStore, whose own GCS retries (32, up to
  32 s apart) would keep a save waiting on a dead bucket for ~15 minutes: a
  Checkpointer in a bucket bounds them by the budget, in every context Orbax
  builds."""
  import tensorstore as ts
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

  for base in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
    monkeypatch.setitem(base, "gcs_request_retries", None)  # put back after the test
  monkeypatch.setattr(io_retry, "_budget_s", 6.0)
  ckpt_lib.Checkpointer(f"{BUCKET}/ts_bound").close()
  want = ckpt_lib.tensorstore_retries(3.0)  # half the budget: the Checkpointer retries too
  for ocdbt in (False, True):
    got = ts_utils.get_ts_context(use_ocdbt=ocdbt).spec.to_json()["gcs_request_retries"]
    assert (got["max_retries"], got["max_delay"]) == (want["max_retries"], want["max_delay"])

  ctx = ts_utils.get_ts_context(use_ocdbt=False)
  gcs.stop()
  t0 = time.monotonic()
  try:
    with pytest.raises(ValueError, match="retry attempts failed"):
      ts.open(
        {"driver": "zarr", "kvstore": f"{BUCKET}/ts_bound/x"},
        create=True,
        dtype=ts.float32,
        shape=[4],
        context=ctx,
      ).result()
  finally:
    gcs.start()
  assert time.monotonic() - t0 < 20  # 1 + 2 s of backoff, not minutes


@pytest.mark.slow
def test_checkpoint_save_in_an_outage_is_saved_again_whole(gcs, monkeypatch):
  """A save whose upload fails (gcsfs gives up after its own ~30 s of retries)
  is saved again while its arrays exist; the earlier step stays readable."""
  monkeypatch.setattr(io_retry, "_budget_s", 600.0)
  ck = ckpt_lib.Checkpointer(f"{BUCKET}/ck_outage", keep=5)
  one = {"w": jnp.arange(64.0)}
  ck.save(1, one, {"i": 1}, {"step": 1})
  ck.wait()
  two = {"w": jnp.arange(64.0) * 2}
  timer = _outage(gcs, 40)
  try:
    ck.save(2, two, {"i": 2}, {"step": 2})
    ck.wait()
  finally:
    timer.join()
  assert ck.all_steps() == [1, 2]
  for step, want in ((1, one), (2, two)):
    s, state, data, meta = ck.restore(ckpt_lib.abstract_like(want), step)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(want["w"]))
    assert (data, meta) == ({"i": step}, {"step": step})
  ck.close()


def test_a_failed_save_is_saved_again_while_its_arrays_exist_else_dropped(tmp_path, caplog):
  """`Checkpointer._failed`, the decision after a save failed transiently: a
  state whose arrays still exist is saved again whole (synchronously); one
  whose arrays the next step donated away is dropped, the failure streak
  started, nothing retried."""
  import orbax.checkpoint as ocp

  ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=5)
  ck._retry = True  # as in a bucket (the decision is the same)

  def args(state, step):
    return ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({"i": step}),
      meta=ocp.args.JsonSave({"step": step}),
    )

  alive = {"w": jnp.arange(4.0)}
  ck._failed(3, args(alive, 3), alive, ConnectionResetError("reset"))
  assert ck.all_steps() == [3] and ck._streak.since is None
  gone = {"w": jnp.arange(4.0) + 1}
  gone["w"].delete()  # what donation to the next step does
  with caplog.at_level(logging.WARNING, logger="srft_jax.checkpoint"):
    ck._failed(4, args(gone, 4), gone, ConnectionResetError("reset"))
  assert ck.all_steps() == [3] and ck._streak.since is not None
  assert "checkpoint step 4" in caplog.text and "the next save takes its place" in caplog.text
  restored = ck.restore(ckpt_lib.abstract_like(alive), 3)[1]
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
  ck.close()
