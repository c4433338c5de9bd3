"""Prepare a dataset from local files: `python -m srft_jax.data prepare NAME --src FILE --data_dir DIR`.

NAME is one of srft_jax.data.builders.NAMES. `task` and `champ` take no --src;
the others take one or more local JSONL / JSON / Parquet files (--src may be
repeated, e.g. for Parquet shards). Prints kept and skipped counts by reason;
they are also stored in DIR/srft_data/NAME/1.0.0/prepare_report.json.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

import tensorflow_datasets as tfds

from srft_jax.data import builders
from srft_jax.data.builders import NAMES


def _parser() -> argparse.ArgumentParser:

  p = argparse.ArgumentParser(
    prog="python -m srft_jax.data",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = p.add_subparsers(dest="command", required=True)
  prep = sub.add_parser("prepare", help="build a TFDS array_record dataset from local files")
  prep.add_argument("name", choices=NAMES)
  prep.add_argument(
    "--src",
    action="append",
    default=None,
    help="local source file (JSONL, JSON array or Parquet); repeatable",
  )
  prep.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  prep.add_argument(
    "--overwrite", action="store_true", help="rebuild even if the dataset is already prepared"
  )
  prep.add_argument(
    "--max_target_chars",
    type=int,
    default=100_000,
    help="skip demonstrations longer than this (characters)",
  )
  prep.add_argument(
    "--max_answer_chars",
    type=int,
    default=512,
    help="skip ground-truth answers longer than this (characters)",
  )
  prep.add_argument(
    "--mc_shuffle_seed",
    type=int,
    default=0,
    help="seed of the multiple-choice option shuffle; -1 keeps the source order",
  )
  prep.add_argument("--task_seed", type=int, default=0, help="built-in task: generator seed")
  prep.add_argument(
    "--task_sizes",
    default=None,
    help="built-in task: rows per split, e.g. train=4096,test_id=256,test_ood=256",
  )
  return p


def _parse_sizes(text: str | None) -> dict[str, int] | None:
  if not text:
    return None
  sizes = {}
  for part in text.split(","):
    split, eq, n = part.partition("=")
    if not eq or not n.strip().isdigit():
      raise argparse.ArgumentTypeError(
        f"--task_sizes: want SPLIT=N[,SPLIT=N...], e.g. train=4096, got {part!r}"
      )
    sizes[split.strip()] = int(n)
  return sizes


def format_report(report: dict) -> str:
  """One line per split: kept, then skipped counts by reason."""
  lines = []
  for split, s in report.get("splits", {}).items():
    skipped = ", ".join(f"{r}={n}" for r, n in s["skipped"].items()) or "none"
    lines.append(
      f"{report.get('name', '?')}/{split}: kept {s['kept']}, "
      f"skipped {s['skipped_total']} ({skipped})"
    )
    for reason, where in s.get("examples", {}).items():
      for w in where:
        lines.append(f"  {reason}: {w}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)

  tfds.display_progress_bar(False)
  if args.name in builders.NO_SRC_NAMES and args.src:
    print(f"error: {args.name} takes no --src", file=sys.stderr)
    return 2
  if args.name not in builders.NO_SRC_NAMES and not args.src:
    print(f"error: {args.name} needs --src FILE (a local JSONL or Parquet file)", file=sys.stderr)
    return 2
  try:
    sizes = _parse_sizes(args.task_sizes)
  except argparse.ArgumentTypeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  options = dict(
    max_target_chars=args.max_target_chars,
    max_answer_chars=args.max_answer_chars,
    mc_shuffle_seed=None if args.mc_shuffle_seed < 0 else args.mc_shuffle_seed,
    task_seed=args.task_seed,
    task_sizes=sizes,
  )
  try:
    report = builders.prepare(
      args.name, args.data_dir, args.src, overwrite=args.overwrite, **options
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_report(report))
  print(f"written to {builders.dataset_dir(args.data_dir, args.name)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
