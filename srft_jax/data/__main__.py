"""Datasets for training: `python -m srft_jax.data prepare|distill ...` (also `srft-data`).

`prepare NAME --src FILE --data_dir DIR`: NAME is one of
srft_jax.data.builders.NAMES. `task` and `champ` take no --src; the others take
one or more local JSONL / JSON / Parquet files (--src may be repeated, e.g. for
Parquet shards). Prints kept and skipped counts by reason; they are also stored
in DIR/srft_data/NAME/1.0.0/prepare_report.json. Nothing is downloaded.

`distill --teacher CKPT --prompts SRC --data_dir DIR`: samples --k responses a
prompt from a teacher (an HF checkpoint directory or a training workdir), keeps
one the reward verifies, and writes DIR/srft_data/distilled/1.0.0 (train on it
with --config.data.source=tfds --config.data.name=distilled) and a summary.
Resumable: rerun the same command after a kill. See srft_jax/data/distill.py.
"""

from __future__ import annotations

import argparse
import sys

import jax
import tensorflow_datasets as tfds

from srft_jax import multihost
from srft_jax import sharding as shd
from srft_jax import tokenizer as tok_lib
from srft_jax.data import builders
from srft_jax.data import distill
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
  _distill_parser(sub)
  return p


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None


def _mesh(text: str) -> dict[str, int]:
  out = {}
  for part in (x.strip() for x in text.split(",")):
    axis, eq, size = part.partition("=")
    if not eq or axis.strip() not in shd.MESH_AXES:
      raise argparse.ArgumentTypeError(
        f"--mesh: want AXIS=SIZE[,...] over {shd.MESH_AXES}, e.g. data=-1, got {part!r}"
      )
    try:
      out[axis.strip()] = int(size)
    except ValueError:
      raise argparse.ArgumentTypeError(f"--mesh: size of {axis!r} is not an integer") from None
  return out


def _distill_parser(sub) -> None:
  d = distill.DistillConfig
  dis = sub.add_parser(
    "distill",
    help="distil verified demonstrations from a teacher into a training dataset",
    description=distill.__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  g = dis.add_argument_group("teacher")
  g.add_argument(
    "--teacher", required=True, help="HF checkpoint directory, or a training workdir (export/hf)"
  )
  g.add_argument("--tokenizer", default="", help="tokenizer file/dir (default: the teacher's)")
  g.add_argument("--dtype", default=d.dtype, help="teacher compute/param dtype")
  g.add_argument("--mesh", type=_mesh, default={"data": -1}, help="e.g. data=-1 or fsdp=4,tensor=2")
  g.add_argument("--sharding_rules", default="", help="logical-axis rule overrides, e.g. vocab=")
  g.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize()")
  g = dis.add_argument_group("prompts")
  g.add_argument(
    "--prompts",
    required=True,
    help="task:SPLIT | tfds:DATA_DIR/NAME[:SPLIT] | a local .jsonl/.json/.parquet file",
  )
  g.add_argument("--n", type=int, default=None, help="at most N prompts (task: N to generate)")
  g.add_argument("--task_levels", type=_ints, default=(), help="built-in task levels, e.g. 3")
  g.add_argument("--task_seed", type=int, default=d.task_seed)
  g.add_argument("--max_answer_chars", type=int, default=d.max_answer_chars)
  g = dis.add_argument_group("sampling and scoring")
  g.add_argument("--k", type=int, default=d.k, help="samples a prompt")
  g.add_argument("--temperature", type=float, default=d.temperature)
  g.add_argument("--top_p", type=float, default=d.top_p)
  g.add_argument("--top_k", type=int, default=d.top_k)
  g.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
  g.add_argument(
    "--prompt_buckets", type=_ints, default=d.prompt_buckets, help="padded prompt lengths"
  )
  g.add_argument("--batch_size", type=int, default=d.batch_size, help="prompts a sampler call")
  g.add_argument("--seed", type=int, default=d.seed, help="sampling keys, keep=random")
  g.add_argument("--require_think", action="store_true", help="grade only after </think>")
  g.add_argument("--timeout_s", type=float, default=d.timeout_s, help="verifier time limit")
  g = dis.add_argument_group("demonstrations")
  g.add_argument("--keep", choices=distill.KEEP_RULES, default=d.keep)
  g.add_argument("--think", choices=distill.THINK_MODES, default=d.think)
  g.add_argument("--teacher_template", choices=tok_lib.TEMPLATES, default=d.teacher_template)
  g.add_argument(
    "--student_template",
    choices=("", *tok_lib.TEMPLATES),
    default="",
    help="the template the student trains with (default: the teacher's)",
  )
  g.add_argument("--system", default=None, help="system prompt for the teacher's template")
  g.add_argument("--add_bos", action="store_true", help="prepend BOS to the teacher's prompts")
  g = dis.add_argument_group("output")
  g.add_argument("--data_dir", required=True, help="writes DATA_DIR/distill, DATA_DIR/srft_data")
  g.add_argument("--shard_size", type=int, default=d.shard_size, help="prompts a shard file")
  g.add_argument("--save_responses", action="store_true", help="every sample's text in the shards")
  g.add_argument("--stop_after", type=int, default=None, help="at most N new shards this run")
  g.add_argument("--overwrite", action="store_true", help="discard earlier shards and dataset")
  g.add_argument("--no_progress", action="store_true", help="no progress bar")


def _distill(args) -> int:
  if args.multihost:
    jax.distributed.initialize()
  try:
    cfg = distill.DistillConfig(
      teacher=args.teacher,
      prompts=args.prompts,
      data_dir=args.data_dir,
      tokenizer=args.tokenizer,
      dtype=args.dtype,
      n=args.n,
      task_levels=args.task_levels,
      task_seed=args.task_seed,
      k=args.k,
      temperature=args.temperature,
      top_p=args.top_p,
      top_k=args.top_k,
      max_new_tokens=args.max_new_tokens,
      prompt_buckets=args.prompt_buckets,
      batch_size=args.batch_size,
      shard_size=args.shard_size,
      keep=args.keep,
      seed=args.seed,
      teacher_template=args.teacher_template,
      student_template=args.student_template,
      system=args.system,
      add_bos=args.add_bos,
      think=args.think,
      require_think=args.require_think,
      timeout_s=args.timeout_s,
      max_answer_chars=args.max_answer_chars,
      mesh=args.mesh,
      sharding_rules=args.sharding_rules,
      save_responses=args.save_responses,
      stop_after=args.stop_after,
      overwrite=args.overwrite,
      progress=not args.no_progress,
    )
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tfds.display_progress_bar(False)
  try:
    summary = distill.run(cfg)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if summary["status"] == "partial":
    print(f"stopped after --stop_after: {summary['shards_done']}/{summary['shards']} shards done")
  elif multihost.is_main():
    print(distill.format_summary(summary))
  return 0


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
  if args.command == "distill":
    return _distill(args)

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
