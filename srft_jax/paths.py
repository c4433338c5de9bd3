"""One path layer for everything a job writes and reads back.

A workdir (and `warmup.dir`, `model.hf_path`, `data.data_dir`, `data.tokenizer`)
is a local path or a remote URL (`gs://bucket/...`, through fsspec and gcsfs,
the library Orbax's own gs:// files go through): the functions here behave the
same on both. Paths stay strings; `os.path.join` builds them for either kind.

Writes are atomic on both: a reader (a restarted job, another process) never
sees half a file. Locally a file is written aside and renamed; remotely it is
one object upload, which the store makes visible only once complete (GCS has
no atomic rename: a "move" there is a copy and a delete). A directory (an HF
checkpoint) is staged on local disk and published with its marker file
(`config.json`) last, so a reader that checks for the marker never takes a
half-published directory for a finished one.

Remote inputs that libraries read as local files (safetensors are memory
mapped, TFDS array_record files, tokenizer files) are copied once per machine
into a cache (`$SRFT_JAX_CACHE`, default `~/.cache/srft_jax`), each file checked
against the store's MD5 (or CRC32C) as it is copied; a later run reuses the
copy while the remote files' sizes and hashes still match.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from srft_jax import io_retry

COPY_MANIFEST = ".srft_copy.json"  # written last into a finished local copy
COPY_THREADS = 8  # files of a remote directory fetched (and hashed) at once


def is_remote(path: str | os.PathLike) -> bool:
  """A URL (gs://...) rather than a local path."""
  return "://" in os.fspath(path)


def _remote_fs(path: str):
  """The fsspec filesystem of a remote URL. Listings are not cached: another
  process (or a restarted run) may have written since."""
  import fsspec  # noqa: PLC0415 (remote paths only: gcsfs is the optional `gcs` extra)

  protocol = os.fspath(path).split("://", 1)[0]
  try:
    return fsspec.filesystem(protocol, use_listings_cache=False)
  except (ImportError, ValueError) as e:
    raise ImportError(
      f"{path}: {protocol}:// paths need fsspec's {protocol} backend "
      f"(for gs://: pip install 'srft-jax[gcs]', i.e. gcsfs): {e}"
    ) from e


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def _retried(op: str, path: str, fn):
  """`fn()` retried through transient storage errors (`io_retry.retry`)."""
  return io_retry.retry(op, path, fn)


def exists(path: str) -> bool:
  path = os.fspath(path)
  if is_remote(path):
    return _retried("exists", path, lambda: _remote_fs(path).exists(path))
  return os.path.exists(path)


def isdir(path: str) -> bool:
  path = os.fspath(path)
  if is_remote(path):
    return _retried("isdir", path, lambda: _remote_fs(path).isdir(path))
  return os.path.isdir(path)


def makedirs(path: str) -> None:
  """A local directory (and its parents); remote stores have no directories."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  path = os.fspath(path)
  if is_remote(path):
    return _retried("read", path, lambda: _remote_fs(path).cat_file(path))
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode()


def read_json(path: str) -> Any:
  return json.loads(read_bytes(path))


def write_bytes(path: str, data: bytes) -> None:
  """Writes the whole file at once: a reader sees the old file or the new one."""
  path = os.fspath(path)
  if is_remote(path):
    data = bytes(data)
    _retried("write", path, lambda: _remote_fs(path).pipe_file(path, data))  # one object upload
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, obj: Any, indent: int | None = None) -> None:
  write_text(path, json.dumps(obj, indent=indent))


def remove(path: str) -> None:
  """Deletes a file or a directory tree; a missing one is no error."""
  path = os.fspath(path)
  if is_remote(path):
    fs = _remote_fs(path)

    def rm():
      if fs.exists(path):
        fs.rm(path, recursive=True)

    _retried("remove", path, rm)
  elif os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.exists(path):
    os.remove(path)


def list_files(path: str) -> dict[str, int]:
  """{relative path: size} of every file under directory `path` (recursive)."""
  path = os.fspath(path).rstrip("/")
  out = {}
  if is_remote(path):
    fs = _remote_fs(path)
    prefix = fs._strip_protocol(path).rstrip("/") + "/"
    found = _retried("list", path, lambda: fs.find(path, detail=True))
    for name, info in found.items():
      if info.get("type", "file") == "file" and name.startswith(prefix):
        out[name[len(prefix) :]] = int(info["size"])
    return out
  for root, _, files in os.walk(path):
    for f in files:
      full = os.path.join(root, f)
      out[os.path.relpath(full, path)] = os.path.getsize(full)
  return out


# ----------------------------------------------------------------------------
# Directories: staged locally, published whole
# ----------------------------------------------------------------------------


def publish_dir(local_dir: str, dst: str, *, last: tuple[str, ...] = ("config.json",)) -> None:
  """Puts the files of `local_dir` at `dst`, replacing what was there.

  Locally the old directory is removed and the new one renamed into place.
  Remotely `dst` is cleared, then every file is uploaded, the `last` ones
  (the marker a reader checks for) after the rest.
  """
  if not is_remote(dst):
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    os.replace(local_dir, dst)
    return
  fs = _remote_fs(dst)
  remove(dst)
  names = sorted(list_files(local_dir), key=lambda n: (n in last, n))
  for name in names:
    src, url = os.path.join(local_dir, name), f"{dst.rstrip('/')}/{name}"
    _retried("upload", url, functools.partial(fs.put_file, src, url))


@contextlib.contextmanager
def staged_dir(dst: str, *, enabled: bool = True, last: tuple[str, ...] = ("config.json",)):
  """A local directory to write `dst`'s files into, published to `dst` on a
  clean exit (`publish_dir`): beside `dst` when local, a temporary directory
  when remote. With `enabled=False` (a process that writes nothing) it
  yields a path nobody writes to and publishes nothing."""
  if not enabled:
    yield f"{dst}.partial"
    return
  if is_remote(dst):
    tmp = tempfile.mkdtemp(prefix="srft_stage_")
  else:
    tmp = f"{os.fspath(dst)}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # a half copy a killed run left
    os.makedirs(tmp)
  try:
    yield tmp
    publish_dir(tmp, dst, last=last)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------
# Remote inputs as local files
# ----------------------------------------------------------------------------

_COPIES: dict[str, str] = {}  # this process's copies: url -> local path


def forget_copies() -> None:
  """Forgets which copies this process has made: the next `local_copy` checks
  the cache against the store again, as a new process would."""
  _COPIES.clear()


def cache_root() -> str:
  return os.environ.get("SRFT_JAX_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "srft_jax"
  )


def _remote_hashes(fs, path: str) -> dict[str, dict]:
  """{relative path: {size, md5 | crc32c}} of the files under a remote path (or the file)."""
  if fs.isdir(path):
    prefix = fs._strip_protocol(path).rstrip("/") + "/"
    infos = {
      n[len(prefix) :]: i
      for n, i in fs.find(path, detail=True).items()
      if i.get("type", "file") == "file" and n.startswith(prefix)
    }
  else:
    infos = {os.path.basename(path.rstrip("/")): fs.info(path)}
  return {
    name: {
      "size": int(i["size"]),
      **({"md5": i["md5Hash"]} if i.get("md5Hash") else {}),
      **({"crc32c": i["crc32c"]} if i.get("crc32c") and not i.get("md5Hash") else {}),
    }
    for name, i in infos.items()
  }


def file_hash(file: str, want: dict) -> dict:
  """The size and the hash kind `want` has, of a local file (base64, as GCS gives them)."""
  out = {"size": os.path.getsize(file)}
  if "md5" in want:
    h = hashlib.md5()
    with open(file, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    out["md5"] = base64.b64encode(h.digest()).decode()
  elif "crc32c" in want:
    import google_crc32c  # noqa: PLC0415 (gcsfs's dependency; composite objects only)

    c = google_crc32c.Checksum()
    with open(file, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        c.update(block)
    out["crc32c"] = base64.b64encode(c.digest()).decode()
  return out


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """Processes on one machine copy a URL one at a time (the others then reuse it)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def local_copy(src: str, sub: str = "") -> str:
  """A local path holding the file or directory `src` (`src/sub` only, when
  `sub` is given: the rest of `src` is not copied). A local `src` is returned
  as is; a remote one is copied into the cache once per machine, every file
  checked against the store's hash, and the copy reused while the remote
  files are unchanged. Returns the copy of `src` (not of `src/sub`)."""
  src = os.fspath(src)
  if not is_remote(src):
    return src
  url = f"{src.rstrip('/')}/{sub.strip('/')}" if sub else src.rstrip("/")
  if url in _COPIES:
    return _COPIES[url]
  fs = _remote_fs(url)
  if not exists(url):
    raise FileNotFoundError(f"no {url}")
  key = hashlib.sha256(url.encode()).hexdigest()[:16]
  base = os.path.join(cache_root(), "remote", key)
  name = os.path.basename(src.rstrip("/")) or "root"
  root = os.path.join(base, name)  # the copy of `src`
  dst = os.path.join(root, sub.strip("/")) if sub else root
  wanted = _retried("list", url, lambda: _remote_hashes(fs, url))
  manifest = os.path.join(base, COPY_MANIFEST)
  with _locked(os.path.join(base + ".lock")):
    have = json.loads(open(manifest).read()) if os.path.exists(manifest) else None
    if have != {"url": url, "files": wanted}:
      shutil.rmtree(base, ignore_errors=True)
      is_dir = isdir(url)

      def fetch(rel: str, want: dict) -> None:
        target = os.path.join(dst, rel) if is_dir else dst
        os.makedirs(os.path.dirname(target), exist_ok=True)
        remote = f"{url}/{rel}" if is_dir else url
        _retried("download", remote, functools.partial(fs.get_file, remote, target + ".partial"))
        got = file_hash(target + ".partial", want)
        if got != want:
          os.remove(target + ".partial")
          raise OSError(f"{url}/{rel}: the copy does not match the store ({got} vs {want})")
        os.replace(target + ".partial", target)

      # Several streams at once (a checkpoint's shards): fsspec's blocking
      # calls may come from many threads; the first error is raised.
      with concurrent.futures.ThreadPoolExecutor(min(COPY_THREADS, len(wanted)) or 1) as pool:
        for done in [pool.submit(fetch, r, w) for r, w in sorted(wanted.items())]:
          done.result()
      with open(manifest, "w") as f:  # last: a killed copy is redone
        json.dump({"url": url, "files": wanted}, f)
  _COPIES[url] = root
  return root
