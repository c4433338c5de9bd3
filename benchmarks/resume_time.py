"""Start to first step after a resume, with and without the persistent compilation cache.

A run of the default config (`checkpoint.every=1`) is stopped by SIGTERM after
`--stop_after` steps, as a preempted job is; then copies of its workdir are
resumed, alternately with the cache off (`checkpoint.compile_cache=""`) and on
(the cache the first run filled), each a fresh `python -m srft_jax.main`
process. The time is from the process's start to the first new row of
logs/metrics.jsonl (the first step after the resume has finished): imports,
restoring the checkpoint, the compiles (or cache loads) and one step.

Prints one JSON line:
  {"off_s", "on_s", "speedup", "runs": [...], "cache_entries", "cache_mb", ...}
(medians over `--repeats` resumes each).

  python benchmarks/resume_time.py [--out DIR] [--repeats 2] [--config FILE] [--set key=value ...]

On a GPU (benchmarks/gpu_check.sh's `resume_1p5b` part): the 1.5B GPU config,
a random-init model on the built-in task (nothing to download), shorter rows:
  python benchmarks/resume_time.py --device --in_place --config configs/qwen2p5_1p5b_gpu.py \\
      --set model.hf_path= --set data.source=task --set data.tokenizer= \\
      --set data.template=plain --set data.prompt_buckets=[64] --set data.max_response_len=256 \\
      --set checkpoint.keep=1
(`--in_place`: each resume continues the same workdir, so the disk holds one run's
checkpoints, about 18.5 GB each for 1.5B float32 weights and Adam moments.)

The warm-up's base model is cached in DIR/base (reused by reruns).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "default.py")


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="", help="work folder (default: a temporary one)")
  p.add_argument("--repeats", type=int, default=2, help="resumes of each kind, alternating")
  p.add_argument("--stop_after", type=int, default=2, help="steps before the SIGTERM")
  p.add_argument("--timeout", type=float, default=1800.0)
  p.add_argument("--config", default=CONFIG, help="the run's config file")
  p.add_argument("--device", action="store_true", help="the runs use the accelerator (else CPU)")
  p.add_argument(
    "--in_place", action="store_true", help="resume the stopped run itself, not copies of it"
  )
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  return p.parse_args(argv)


def _rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "logs", "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().endswith("}")]


def _last_step(workdir: str) -> int:
  return max((int(r["step"]) for r in _rows(workdir)), default=-1)


def _start(config: str, workdir: str, overrides: dict, env: dict, log: str) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "srft_jax.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  with open(log, "a") as f:
    return subprocess.Popen(
      cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen, timeout: float) -> None:
  """SIGTERM (a preemption notice: checkpoint at the step boundary, exit), then wait."""
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    raise


def _wait_for_step(proc, workdir: str, after: int, timeout: float) -> float:
  """Seconds until a step beyond `after` is logged."""
  t0 = time.perf_counter()
  while _last_step(workdir) <= after:
    if proc.poll() is not None:
      raise RuntimeError(f"{workdir}: the run exited ({proc.returncode}) before a new step")
    if time.perf_counter() - t0 > timeout:
      raise TimeoutError(f"{workdir}: no new step in {timeout} s")
    time.sleep(0.05)
  return time.perf_counter() - t0


def main(argv=None) -> int:
  a = _args(argv)
  out = a.out or tempfile.mkdtemp(prefix="resume_time_")
  os.makedirs(out, exist_ok=True)
  cache = os.path.join(out, "compile_cache")
  overrides = {
    "checkpoint.every": 1,
    "checkpoint.async_save": False,
    "warmup.dir": os.path.join(out, "base"),
    "log.progress": False,
    "log.plots": False,
  }
  overrides.update(kv.split("=", 1) for kv in a.set)
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(PYTHONUNBUFFERED="1")
  if "JAX_PLATFORMS" not in env and not a.device:
    env["JAX_PLATFORMS"] = "cpu"

  # The preempted run: it fills the cache with every program up to its stop.
  first = os.path.join(out, "preempted")
  shutil.rmtree(first, ignore_errors=True)
  shutil.rmtree(cache, ignore_errors=True)
  proc = _start(
    a.config, first, {**overrides, "checkpoint.compile_cache": cache}, env, first + ".log"
  )
  _wait_for_step(proc, first, a.stop_after - 2, a.timeout)
  _stop(proc, a.timeout)
  stopped_at = first_stop = _last_step(first)

  runs = []
  for i in range(a.repeats):
    for kind, setting in (("off", ""), ("on", cache)):
      if a.in_place:  # resume the run itself again (no copy: a large model's checkpoint)
        wd = first
      else:
        wd = os.path.join(out, f"resume_{kind}_{i}")
        shutil.rmtree(wd, ignore_errors=True)
        shutil.copytree(first, wd)
      proc = _start(
        a.config, wd, {**overrides, "checkpoint.compile_cache": setting}, env, wd + ".log"
      )
      seconds = _wait_for_step(proc, wd, stopped_at, a.timeout)
      _stop(proc, a.timeout)
      if a.in_place:
        stopped_at = _last_step(wd)
      runs.append({"kind": kind, "first_step_s": round(seconds, 2)})
      print(f"resume {kind} #{i}: {seconds:.1f} s to the first step", file=sys.stderr)

  def median(kind):
    return statistics.median(r["first_step_s"] for r in runs if r["kind"] == kind)

  entries = [f for f in os.listdir(os.path.join(cache, os.listdir(cache)[0]))]
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(cache) for f in fs)
  print(
    json.dumps(
      {
        "benchmark": "resume_time",
        "config": os.path.relpath(a.config, ROOT),
        "platform": env.get("JAX_PLATFORMS") or "the accelerator",
        "overrides": {k: v for k, v in overrides.items() if k != "warmup.dir"},
        "stopped_at_step": first_stop,
        "off_s": median("off"),
        "on_s": median("on"),
        "speedup": round(median("off") / median("on"), 2),
        "runs": runs,
        "cache_entries": sum(1 for e in entries if e.endswith("-cache")),
        "cache_mb": round(size / 1e6, 1),
        "jax": __import__("jax").__version__,
      }
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
