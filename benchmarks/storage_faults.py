"""Storage outages in a bucket workdir: ridden out within the retry budget, a clean exit past it.

Against the local GCS emulator (fake-gcs-server, objects on disk, so the bucket
comes back with its data; tests/helpers.py `GcsEmulator`), a small run of the
default config with `checkpoint.every=1` trains in `gs://srft-test/...`:

  straight   no outage
  outage_S   the bucket goes away for S seconds as soon as the first checkpoint
             begins to upload, then comes back (one start each)
  past       the bucket goes away for good at the same moment, with a short
             retry budget: the job's exit code, its last line and how long it
             took to give up; then `--supervise` (`python -m srft_jax.supervise`)
             finishes the run once the bucket is back

Each run's export is compared with the straight run's, byte for byte. Prints
one JSON line: {"runs": [{"name", "outage_s", "rc", "wall_s", "starts",
"export_equal", ...}], "retry_budget_s", ...}.

  python benchmarks/storage_faults.py [--outages 30,60] [--budget 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import helpers  # noqa: E402  (tests/helpers.py: the emulator and the job's command line)

BUCKET = f"gs://{helpers.GCS_BUCKET}"
OVERRIDES = helpers.TINY_BUCKET_RUN


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--outages", default="30,60", help="outage lengths (s) to ride out")
  p.add_argument("--budget", type=float, default=10.0, help="checkpoint.io_retry_s of the past run")
  p.add_argument("--timeout", type=float, default=900.0)
  return p.parse_args(argv)


def main(argv=None) -> int:
  a = _args(argv)
  tmp = tempfile.mkdtemp(prefix="storage_faults_")
  gcs = helpers.GcsEmulator(os.path.join(tmp, "gcs"))
  os.environ.update(gcs.env)
  from srft_jax import paths  # noqa: PLC0415 (after the emulator's settings)

  env = dict(
    os.environ,
    **helpers.compilation_cache_env(os.path.join(tmp, "jax_cache")),
    JAX_PLATFORMS="cpu",
    MPLCONFIGDIR=os.path.join(tmp, "mpl"),
    SRFT_JAX_CACHE=os.path.join(tmp, "cache"),
  )
  export = "export/hf/model.safetensors"

  def start(name, overrides=(), prefix=()):
    wd = f"{BUCKET}/{name}"
    cmd = [*prefix, *helpers.main_command(wd, {**OVERRIDES, **dict(overrides)})]
    log = open(os.path.join(tmp, f"{name}.log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return wd, proc, log.name

  def finish(name, wd, proc, log, t0, outage_s, **extra):
    rc = proc.wait(timeout=a.timeout)
    text = open(log).read()
    same = rc == 0 and paths.read_bytes(f"{wd}/{export}") == paths.read_bytes(
      f"{BUCKET}/straight/{export}"
    )
    row = {
      "name": name,
      "outage_s": outage_s,
      "rc": rc,
      "wall_s": round(time.time() - t0, 1),
      "starts": 1 + text.count("resumed from step"),
      "retried_ops": text.count("; retry "),
      "export_equal": same,
      **extra,
    }
    print(json.dumps(row), file=sys.stderr)
    return row, text

  runs = []
  try:
    t0 = time.time()
    runs.append(finish("straight", *start("straight"), t0, 0)[0])
    for s in [float(x) for x in a.outages.split(",") if x]:
      name = f"outage_{s:g}"
      t0 = time.time()
      wd, proc, log = start(name)
      helpers.wait_for_checkpoint_upload(proc, wd, a.timeout)
      gcs.stop()
      time.sleep(s)
      gcs.start()
      runs.append(finish(name, wd, proc, log, t0, s)[0])
    # Past the budget: the clean exit, then --supervise once the bucket is back.
    budget = {"checkpoint.io_retry_s": a.budget}
    t0 = time.time()
    wd, proc, log = start("past", budget)
    helpers.wait_for_checkpoint_upload(proc, wd, a.timeout)
    gcs.stop()
    t_out = time.time()
    rc = proc.wait(timeout=a.timeout)
    gave_up_s = time.time() - t_out
    gcs.start()
    text = open(log).read().rstrip().splitlines()
    runs.append(
      {
        "name": "past_budget",
        "rc": rc,
        "gave_up_after_s": round(gave_up_s, 1),
        "last_line": text[-1][:200] if text else "",
        "retry_budget_s": a.budget,
      }
    )
    t0 = time.time()
    sup = (sys.executable, "-m", "srft_jax.supervise", f"--workdir={wd}", "--backoff_s=1", "--")
    wd2, proc, log = start("past", budget, prefix=sup)
    row, text = finish("past_supervised", wd2, proc, log, t0, 0)
    row["restarts"] = text.count('"event": "start"')
    runs.append(row)
  finally:
    gcs.close()
  print(json.dumps({"runs": runs, "retry_budget_s": a.budget, "default_budget_s": 600.0}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
