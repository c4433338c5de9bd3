"""Entry point: `python -m srft_jax.main --config=configs/default.py --workdir=DIR`.

Flags follow ml_collections' config_flags: `--config=configs/default.py:grpo`
picks a preset, `--config.steps=50` overrides a field.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from srft_jax import checkpoint as ckpt_lib
from srft_jax import console
from srft_jax import factory
from srft_jax import io_retry
from srft_jax import job

_CONFIG = config_flags.DEFINE_config_file(
  "config", console.resolve_config("configs/default.py"), "Training config.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Checkpoints, logs, plots, results.")


def main(argv) -> int:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    results = job.run(factory.run_spec(_CONFIG.value), _WORKDIR.value)
  except factory.ConfigError as e:  # named by its field, before anything compiled
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:
    unavailable = storage_unavailable(e)
    if unavailable is None:
      raise
    # One line, and no thread left behind: Orbax's and gcsfs's background
    # threads would each raise into the interpreter's shutdown.
    print(f"error: {unavailable}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(io_retry.EXIT_STORAGE)
  if results.get("status") == "preempted":
    print(
      f"preempted at step {results['step']}: checkpoint saved; rerun the same command to resume"
    )
  else:
    print(format_results(results, _WORKDIR.value))
  if ckpt_lib.failed_saves:  # their threads would hold the exit for minutes (checkpoint.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
  return 0


def storage_unavailable(e: BaseException) -> io_retry.StorageUnavailable | None:
  """The `StorageUnavailable` that `e` is or was raised from, if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, io_retry.StorageUnavailable):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def format_results(r: dict, workdir: str) -> str:
  out = workdir.rstrip("/")  # local or a bucket (gs://): every output is under it

  def pct(x):
    return "  n/a" if x is None else f"{100 * x:5.1f}%"

  lines = [
    "",
    f"method: {r['method']}   steps: {r['steps']}   wall: {r['wall_s']:.0f}s (training {r['train_s']:.0f}s)",
    "",
    "| split | before | after |",
    "|---|---|---|",
    f"| ID  | {pct(r['before']['id_acc'])} | {pct(r['after']['id_acc'])} |",
    f"| OOD | {pct(r['before']['ood_acc'])} | {pct(r['after']['ood_acc'])} |",
  ]
  for split, label in (("task_id", "ID"), ("task_ood", "OOD")):  # by difficulty level
    levels = sorted(
      set(r["before"].get("levels", {}).get(split, {}))
      | set(r["after"].get("levels", {}).get(split, {})),
      key=int,
    )
    for lv in levels if len(levels) > 1 else ():
      b, a = (r[k].get("levels", {}).get(split, {}).get(lv) for k in ("before", "after"))
      lines.append(f"| {label} level {lv} | {pct(b)} | {pct(a)} |")
  lines += [
    "",
    f"results:     {out}/results.json",
    f"checkpoints: {out}/checkpoints",
    f"tensorboard: {out}/logs/tb   ({tensorboard_command()} --logdir {out}/logs/tb)",
    f"plots:       {out}/plots",
    f"HF export:   {out}/export/hf",
  ]
  if r.get("lora"):
    lines.append(
      f"PEFT adapter: {out}/export/peft   (LoRA rank {r['lora']['rank']}; export/hf: merged)"
    )
  return "\n".join(lines)


def tensorboard_command() -> str:
  """The `tensorboard` installed beside this Python (`.venv/bin/tensorboard` after
  `make run`), else the one on PATH: the viewer of the event files tensorboardX writes."""
  exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
  if not os.path.isfile(exe):
    return "tensorboard"
  rel = os.path.relpath(exe)
  return rel if not rel.startswith("..") else exe


def cli() -> None:
  """Runs `main` on the command line (`python -m srft_jax.main`, `srft-train`)."""
  app.run(main, argv=console.resolve_config_argv(sys.argv))


if __name__ == "__main__":
  cli()
