"""TFDS datasets built from local files: the training set and the paper's benchmarks.

One `GeneratorBasedBuilder`, `SrftData`, with one builder config per dataset
name (`NAMES`). Everything is written as `array_record` and read back without
TensorFlow through `as_data_source` / `tfds.builder_from_directory`, which give
random access for `grain.MapDataset.source`. Nothing here ever
downloads: the source files are ones the user already has.

Where the builder gets its source: the constructor argument `src` (a path or a
list of paths: JSONL, JSON array, or Parquet; several files are concatenated in
the order given). `task` and `champ` need no `src` (the built-in task is
generated, champ ships in the `champ-dataset` package). Options that change the
content (`max_target_chars`, `mc_shuffle_seed`, `task_sizes`, ...) are also
constructor arguments; TFDS reuses a prepared version directory as is, so
re-prepare with `prepare(..., overwrite=True)` after changing them.

Every record has the same features (the row schema of `srft_jax.data`, plus `choices`):
    id       str
    prompt   str   the question (multiple choice: question + lettered options)
    target   str   demonstration "<think>\\n...\\n</think>\\n...\\boxed{a}"
                   (training sets; benchmarks: the reference solution or "")
    answer   str   ground truth (multiple choice: the option letter)
    choices  [str] multiple-choice options in the (shuffled) order shown in the
                   prompt; empty for answer-graded datasets
Splits: training sets `train` (the task also `test_id`, `test_ood`);
benchmarks `test`.

Bad rows are skipped, never fixed up silently: each skip has a reason from
`SKIP_REASONS`; the counts (and the first few row locations per reason) are
stored in the dataset's `metadata.json` under "prepare_report" and in
`prepare_report.json` beside it, and `load_report` reads them back for the
training metrics. A source file that yields no usable row is an error naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from srft_jax.data import task

__all__ = [
  "NAMES",
  "TRAIN_NAMES",
  "BENCHMARK_NAMES",
  "MC_NAMES",
  "SKIP_REASONS",
  "SkipRow",
  "SrftData",
  "SrftDataConfig",
  "prepare",
  "dataset_dir",
  "load_source",
  "load_report",
  "extract_boxed",
  "read_rows",
  "prompt_and_answer",
]

# Paper benchmarks (docs/method.md §6): answer-graded, then multiple choice.
MATH_NAMES = ("math500", "aime24", "amc", "minerva", "olympiadbench")
MC_NAMES = ("arc_c", "gpqa_diamond", "mmlu_pro")
BENCHMARK_NAMES = MATH_NAMES + MC_NAMES
TRAIN_NAMES = ("openr1", "task", "champ", "distilled")
NAMES = TRAIN_NAMES + BENCHMARK_NAMES
NO_SRC_NAMES = ("task", "champ")

SKIP_REASONS = (
  "bad_json",  # a line / file that is not JSON
  "invalid_utf8",  # undecodable bytes, or strings that cannot be UTF-8 (lone surrogates)
  "not_a_record",  # JSON that is not an object
  "missing_field",  # no column for the prompt, demonstration, answer or options
  "empty_prompt",
  "empty_target",
  "target_too_long",  # demonstration over `max_target_chars`
  "unparseable_answer",  # empty, unbalanced braces, not a scalar, over `max_answer_chars`
  "bad_choices",  # multiple choice: <2 options, empty option, answer not among them
)
_EXAMPLES_PER_REASON = 5  # row locations kept per reason in the report
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
REPORT_FILE = "prepare_report.json"


class SkipRow(Exception):
  """A row that cannot become a record; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    assert reason in SKIP_REASONS, reason
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


# ---------------------------------------------------------------------------
# Reading raw rows from local files.


def _check_utf8(value: Any) -> Any:
  """Decode bytes and reject strings that cannot be written as UTF-8, recursively."""
  if isinstance(value, (bytes, bytearray)):
    try:
      return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise SkipRow("invalid_utf8", str(e)) from None
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from JSON "\ud800" escapes
      raise SkipRow("invalid_utf8", str(e)) from None
    return value
  if isinstance(value, dict):
    return {str(k): _check_utf8(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_check_utf8(v) for v in value]
  if hasattr(value, "tolist"):  # numpy arrays/scalars from Parquet nested columns
    return _check_utf8(value.tolist())
  return value


def read_rows(path: str) -> Iterator[tuple[str, dict | SkipRow]]:
  """Yield (location, row dict or SkipRow) for every row of a local file.

  `.parquet` files are read in record batches; `.json` files holding one JSON
  array are read whole; anything else is JSON Lines, read as bytes so that one
  undecodable line is one skipped row rather than a failed file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"source file not found: {path}")
  name = os.path.basename(path)
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # noqa: PLC0415 (parquet sources only)

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
      for row in batch.to_pylist():
        n += 1
        try:
          yield f"{name}:{n}", _check_utf8(row)
        except SkipRow as e:
          yield f"{name}:{n}", e
    return
  with open(path, "rb") as f:
    head = f.read(1 << 16).lstrip()
  if path.endswith(".json") and head.startswith(b"["):
    with open(path, "rb") as f:
      try:
        rows = json.loads(f.read().decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON array ({e})") from None
    for n, row in enumerate(rows, 1):
      yield f"{name}:{n}", _row_or_skip(row)
    return
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      if not raw.strip():
        continue  # blank lines are layout, not rows
      try:
        text = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a leading BOM is not data
      except UnicodeDecodeError as e:
        yield f"{name}:{n}", SkipRow("invalid_utf8", str(e))
        continue
      try:
        row = json.loads(text)
      except (ValueError, RecursionError) as e:  # JSONDecodeError, huge ints, deep nesting
        yield f"{name}:{n}", SkipRow("bad_json", str(e)[:200])
        continue
      yield f"{name}:{n}", _row_or_skip(row)


def _row_or_skip(row: Any) -> dict | SkipRow:
  if not isinstance(row, dict):
    return SkipRow("not_a_record", type(row).__name__)
  try:
    return _check_utf8(row)
  except SkipRow as e:
    return e


# ---------------------------------------------------------------------------
# Field access and normalisation, generous about the public schemas' spellings.

_MISSING = object()


def _get(row: dict, *names: str) -> Any:
  """First present, non-None field among `names` (case-insensitive; "a.b" looks inside dicts)."""
  for name in names:
    value: Any = row
    for part in name.split("."):
      if not isinstance(value, dict):
        value = _MISSING
        break
      lowered = {str(k).lower(): k for k in value}
      key = lowered.get(part.lower())
      value = value[key] if key is not None else _MISSING
    if value is not _MISSING and value is not None:
      return value
  return _MISSING


def _message_text(value: Any, role: str) -> Any:
  """Text of a chat-messages list: the last message of `role`, else the last message."""
  if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
    picked = [m for m in value if str(m.get("role", "")).lower() == role]
    msg = (picked or value)[-1]
    return msg.get("content", msg.get("text", _MISSING))
  return value


def _as_text(value: Any, role: str) -> str | None:
  """A prompt/demonstration as text: strings, chat messages or a list of strings (first)."""
  value = _message_text(value, role)
  if isinstance(value, list):
    value = value[0] if value else ""
  if isinstance(value, str):
    return value
  return None


def _balanced(text: str) -> bool:
  depth, i = 0, 0
  while i < len(text):
    c = text[i]
    if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
      i += 2  # escaped brace: literal, not grouping
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth < 0:
        return False
    i += 1
  return depth == 0


def extract_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}) in `text`; None if absent or unclosed."""
  start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
  if start < 0:
    return None
  i = text.index("{", start) + 1
  depth = 1
  for j in range(i, len(text)):
    if text[j] == "{" and text[j - 1] != "\\":
      depth += 1
    elif text[j] == "}" and text[j - 1] != "\\":
      depth -= 1
      if depth == 0:
        return text[i:j]
  return None


def _answer_text(value: Any, max_chars: int) -> str:
  """Normalise a ground-truth answer to a string the reward function can grade."""
  if isinstance(value, bool):
    raise SkipRow("unparseable_answer", "boolean answer")
  if isinstance(value, (list, tuple)):
    # OlympiadBench `final_answer` and verl `ground_truth` lists; several
    # answers are graded as one comma-separated tuple.
    parts = [_answer_text(v, max_chars) for v in value]
    value = ", ".join(parts)
  if isinstance(value, int):
    value = str(value)
  elif isinstance(value, float):
    if not math.isfinite(value):
      raise SkipRow("unparseable_answer", repr(value))
    # AMC sheets store integers as floats (142.0).
    value = str(int(value)) if value.is_integer() else repr(value)
  if not isinstance(value, str):
    raise SkipRow("unparseable_answer", f"answer of type {type(value).__name__}")
  text = value.strip()
  if text.startswith("$") and text.endswith("$") and len(text) > 1:
    text = text.strip("$").strip()  # "$\\frac{1}{2}$" -> "\\frac{1}{2}"
  boxed = extract_boxed(text) if "\\boxed{" in text else None
  if boxed is not None:
    text = boxed.strip()
  if not text:
    raise SkipRow("unparseable_answer", "empty answer")
  if len(text) > max_chars:
    raise SkipRow("unparseable_answer", f"answer of {len(text)} chars > {max_chars}")
  if not _balanced(text):
    raise SkipRow("unparseable_answer", f"unbalanced braces in {text[:40]!r}")
  return text


def _row_id(row: dict, fallback: str) -> str:
  value = _get(
    row,
    "id",
    "unique_id",
    "uid",
    "problem_id",
    "question_id",
    "record id",
    "extra_info.index",
    "idx",
  )
  if value is _MISSING or isinstance(value, (dict, list)) or str(value).strip() == "":
    return fallback
  return str(value).strip()


def _demonstration(thoughts: str, answer: str) -> str:
  """The paper's response format (docs/method.md §1): reasoning in <think>, then \\boxed{}."""
  return f"<think>\n{thoughts.strip()}\n</think>\n\\boxed{{{answer}}}"


@dataclasses.dataclass(frozen=True)
class RowOptions:
  max_target_chars: int
  max_answer_chars: int
  mc_shuffle_seed: int | None


def _record(rid: str, prompt: str, target: str, answer: str, choices=()) -> dict:
  return {"id": rid, "prompt": prompt, "target": target, "answer": answer, "choices": list(choices)}


def _prompt(row: dict, *names: str) -> str:
  value = _get(row, *names)
  if value is _MISSING:
    raise SkipRow("missing_field", f"no prompt column among {names}")
  text = _as_text(value, "user")
  if text is None:
    raise SkipRow("missing_field", f"prompt of type {type(value).__name__}")
  if not text.strip():
    raise SkipRow("empty_prompt")
  return text.strip()


def _train_prompt_answer(row: dict, max_answer_chars: int) -> tuple[str, str | None, Any, str]:
  """(prompt, solution text or None, raw answer value, normalised answer) of a
  training-style row; the field mapping of `_convert_train`."""
  prompt = _prompt(row, "prompt", "problem", "question", "query", "input")
  solution = _as_text(_get(row, "solution"), "assistant")
  answer_value = _get(
    row, "reward_model.ground_truth", "answer", "final_answer", "ground_truth", "gt_answer"
  )
  if answer_value is _MISSING and solution is not None:
    boxed = extract_boxed(solution)
    if boxed is not None:
      answer_value = boxed
    elif "\n" not in solution.strip() and len(solution.strip()) <= 64:
      answer_value = solution  # datasets that keep the bare answer in `solution`
  if answer_value is _MISSING:
    raise SkipRow("missing_field", "no answer column")
  return prompt, solution, answer_value, _answer_text(answer_value, max_answer_chars)


def prompt_and_answer(row: dict, fallback_id: str, max_answer_chars: int = 512) -> dict:
  """{id, prompt, answer} of a row with no demonstration needed (prompts to
  distill from), read with the training sets' field mapping; raises SkipRow."""
  prompt, _, _, answer = _train_prompt_answer(row, max_answer_chars)
  return {"id": _row_id(row, fallback_id), "prompt": prompt, "answer": answer}


def _convert_train(row: dict, fallback_id: str, opts: RowOptions) -> dict:
  """OpenR1-Math-46k-style row (also the task's and champ's rows) -> record.

  prompt: `prompt` (chat messages: last user turn, or text) / problem / question.
  demonstration: `target` (text or assistant messages) / generations / response /
    completion; else a `solution`, wrapped into the <think>...\\boxed{} format.
  answer: reward_model.ground_truth / answer / final_answer / ground_truth;
    else the last \\boxed{} of `solution` (or a short one-line `solution`).
  """
  prompt, solution, answer_value, answer = _train_prompt_answer(row, opts.max_answer_chars)
  target_value = _get(
    row, "target", "demonstration", "generations", "generation", "response", "completion", "output"
  )
  if target_value is not _MISSING:
    target = _as_text(target_value, "assistant")
    if target is None:
      raise SkipRow("missing_field", f"target of type {type(target_value).__name__}")
  elif solution is not None and solution.strip() != answer_value:
    target = _demonstration(solution, answer) if solution.strip() else ""
  else:
    raise SkipRow("missing_field", "no demonstration column")
  if not target.strip():
    raise SkipRow("empty_target")
  if len(target) > opts.max_target_chars:
    raise SkipRow("target_too_long", f"{len(target)} chars > {opts.max_target_chars}")
  return _record(_row_id(row, fallback_id), prompt, target, answer)


def _convert_math_bench(row: dict, fallback_id: str, opts: RowOptions) -> dict:
  """MATH-500, AIME24, AMC, Minerva, OlympiadBench -> record (target = reference solution)."""
  prompt = _prompt(row, "problem", "question", "prompt", "query")
  context = _get(row, "context")  # OlympiadBench physics items carry a shared context
  if isinstance(context, str) and context.strip():
    prompt = f"{context.strip()}\n\n{prompt}"
  solution = _get(row, "solution", "solutions")
  if isinstance(solution, list):
    solution = "\n\n".join(s for s in solution if isinstance(s, str))
  solution = solution if isinstance(solution, str) else ""
  answer_value = _get(row, "answer", "final_answer", "ground_truth", "reward_model.ground_truth")
  if answer_value is _MISSING:
    boxed = extract_boxed(solution) if solution else None
    if boxed is None:
      raise SkipRow("missing_field", "no answer column and no \\boxed{} in the solution")
    answer_value = boxed
  answer = _answer_text(answer_value, opts.max_answer_chars)
  return _record(_row_id(row, fallback_id), prompt, solution.strip(), answer)


def _options_arc(row: dict) -> tuple[str, list[str], int]:
  question = _get(row, "question")
  choices = _get(row, "choices")
  if isinstance(question, dict):  # AI2's own JSONL: {"question": {"stem", "choices": [...]}}
    choices = question.get("choices", _MISSING)
    question = question.get("stem", _MISSING)
    if isinstance(choices, list):
      choices = {
        "text": [c.get("text") for c in choices if isinstance(c, dict)],
        "label": [c.get("label") for c in choices if isinstance(c, dict)],
      }
  key = _get(row, "answerkey", "answer")
  if question is _MISSING or choices is _MISSING or key is _MISSING:
    raise SkipRow("missing_field", "ARC rows need question, choices, answerKey")
  if not isinstance(choices, dict) or not isinstance(choices.get("text"), list):
    raise SkipRow("bad_choices", "choices is not {text: [...], label: [...]}")
  texts, labels = choices["text"], choices.get("label") or list(_LETTERS[: len(choices["text"])])
  labels = [str(label).strip() for label in labels]
  if len(labels) != len(texts) or str(key).strip() not in labels:
    raise SkipRow("bad_choices", f"answerKey {key!r} not among labels {labels}")
  return question, texts, labels.index(str(key).strip())


def _options_gpqa(row: dict) -> tuple[str, list[str], int]:
  question = _get(row, "question")
  correct = _get(row, "correct answer", "correct_answer")
  wrong = [_get(row, f"incorrect answer {i}", f"incorrect_answer_{i}") for i in (1, 2, 3)]
  if question is _MISSING or correct is _MISSING or any(w is _MISSING for w in wrong):
    raise SkipRow("missing_field", "GPQA rows need Question, Correct Answer, Incorrect Answer 1-3")
  return question, [correct, *wrong], 0


def _options_mmlu_pro(row: dict) -> tuple[str, list[str], int]:
  question = _get(row, "question")
  options = _get(row, "options", "choices")
  if question is _MISSING or options is _MISSING:
    raise SkipRow("missing_field", "MMLU-Pro rows need question, options, answer")
  if not isinstance(options, list):
    raise SkipRow("bad_choices", "options is not a list")
  index = _get(row, "answer_index")
  letter = _get(row, "answer")
  if isinstance(index, int) and not isinstance(index, bool):
    correct = index
  elif isinstance(letter, str) and len(letter.strip()) == 1 and letter.strip().upper() in _LETTERS:
    correct = _LETTERS.index(letter.strip().upper())
  elif index is _MISSING and letter is _MISSING:
    raise SkipRow("missing_field", "no answer / answer_index")
  else:
    raise SkipRow("unparseable_answer", f"answer {letter!r} / answer_index {index!r}")
  if (
    isinstance(letter, str)
    and isinstance(index, int)
    and letter.strip().upper() in _LETTERS
    and _LETTERS.index(letter.strip().upper()) != index
  ):
    raise SkipRow("unparseable_answer", f"answer {letter!r} disagrees with answer_index {index}")
  return question, options, correct


_MC_OPTIONS: dict[str, Callable[[dict], tuple[Any, list, int]]] = {
  "arc_c": _options_arc,
  "gpqa_diamond": _options_gpqa,
  "mmlu_pro": _options_mmlu_pro,
}


def _convert_mc(name: str, row: dict, fallback_id: str, opts: RowOptions) -> dict:
  """Multiple choice -> record: options shuffled with a per-row seed, answer = letter."""
  question, options, correct = _MC_OPTIONS[name](row)
  if not isinstance(question, str):
    raise SkipRow("missing_field", f"question of type {type(question).__name__}")
  if not question.strip():
    raise SkipRow("empty_prompt")
  options = [o.strip() if isinstance(o, str) else o for o in options]
  if not 2 <= len(options) <= len(_LETTERS) or not all(isinstance(o, str) and o for o in options):
    raise SkipRow("bad_choices", f"{len(options)} options, or an empty / non-text one")
  if not 0 <= correct < len(options):
    raise SkipRow("bad_choices", f"answer index {correct} outside {len(options)} options")
  rid = _row_id(row, fallback_id)
  order = list(range(len(options)))
  if opts.mc_shuffle_seed is not None:
    # Seeded by (seed, row id), not by position: a row's option order does
    # not depend on which other rows the file holds. String seeds hash with
    # SHA-512 in `random`, so this is stable across processes.
    random.Random(f"{opts.mc_shuffle_seed}:{name}:{rid}").shuffle(order)
  shown = [options[i] for i in order]
  letter = _LETTERS[order.index(correct)]
  lines = "\n".join(f"{_LETTERS[i]}. {text}" for i, text in enumerate(shown))
  prompt = f"{question.strip()}\n\n{lines}"
  return _record(rid, prompt, "", letter, shown)


def _champ_rows() -> Iterator[tuple[str, dict | SkipRow]]:
  """The champ-dataset problems as rows of the training schema (dev dependency)."""
  import champ_dataset  # noqa: PLC0415 (an optional package)

  problems = champ_dataset.load("v0").problems
  for key in sorted(problems):
    p = problems[key]
    steps = [s.text.strip() for s in p.solution.steps if s.text and s.text.strip()]
    answer = _champ_answer(p.answer or "")
    row = {"id": f"champ-{p.identifier}", "prompt": p.text, "answer": answer}
    if steps:
      row["target"] = _demonstration("\n".join(steps), answer)
    yield f"champ:{p.identifier}", row


def _champ_answer(answer: str) -> str:
  """champ answers carry prose alternatives: "C(10, 5), or equivalently 252" -> "252"."""
  answer = answer.strip()
  if ", or equivalently " in answer:
    return answer.split(", or equivalently ", 1)[1].strip().rstrip(".")
  if ", or " in answer:
    return answer.split(", or ", 1)[0].strip()
  return answer


# ---------------------------------------------------------------------------
# The builder.


@dataclasses.dataclass(eq=False)
class SrftDataConfig(tfds.core.BuilderConfig):
  """One dataset name. `kind`: train | math | mc; `splits`: the split names it writes."""

  kind: str = "train"
  splits: tuple[str, ...] = ("train",)


def _config(name: str, kind: str, splits: tuple[str, ...], description: str) -> SrftDataConfig:
  return SrftDataConfig(name=name, kind=kind, splits=splits, description=description)


_CONFIGS = [
  _config("openr1", "train", ("train",), "OpenR1-Math-46k(-8192) schema from local JSONL/Parquet"),
  _config("task", "train", ("train", "test_id", "test_ood"), "the built-in arithmetic task"),
  _config("champ", "train", ("train",), "champ-dataset problems with step-by-step demonstrations"),
  _config(
    "distilled",
    "train",
    ("train",),
    "a teacher's verified responses (python -m srft_jax.data distill)",
  ),
  _config("math500", "math", ("test",), "MATH-500: problem, solution, answer"),
  _config("aime24", "math", ("test",), "AIME 2024: problem/question, answer"),
  _config("amc", "math", ("test",), "AMC: problem/question, answer"),
  _config("minerva", "math", ("test",), "Minerva math: problem/question, solution/answer"),
  _config("olympiadbench", "math", ("test",), "OlympiadBench: question, final_answer list"),
  _config("arc_c", "mc", ("test",), "ARC-Challenge: question, choices{text,label}, answerKey"),
  _config(
    "gpqa_diamond", "mc", ("test",), "GPQA-Diamond: Question, Correct Answer, Incorrect Answer 1-3"
  ),
  _config("mmlu_pro", "mc", ("test",), "MMLU-Pro: question, options, answer / answer_index"),
]

DEFAULT_TASK_SIZES = {"train": 4096, "test_id": 256, "test_ood": 256}


class SrftData(tfds.core.GeneratorBasedBuilder):
  """All srft-jax datasets; pick one with `config=NAME` (see module docstring).

  Constructor arguments beyond TFDS's own (`data_dir`, `config`, `file_format`):
    src: path or list of paths of the local source files (not for task/champ).
    max_target_chars: demonstrations longer than this are skipped (target_too_long).
    max_answer_chars: longer ground-truth answers are skipped (unparseable_answer).
    mc_shuffle_seed: seed of the multiple-choice option shuffle; None keeps the order.
    task_sizes / task_seed: rows per split and seed of the built-in task.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = _CONFIGS

  # TFDS looks for a checksums file next to the builder's code through
  # `importlib_resources`, which is not installed (and not needed: nothing is
  # downloaded). No code path -> no checksums lookup.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(
    self,
    *,
    src: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    max_target_chars: int = 100_000,
    max_answer_chars: int = 512,
    mc_shuffle_seed: int | None = 0,
    task_sizes: dict[str, int] | None = None,
    task_seed: int = 0,
    **kwargs,
  ):
    if src is None:
      self._src: list[str] = []
    elif isinstance(src, (str, os.PathLike)):
      self._src = [os.fspath(src)]
    else:
      self._src = [os.fspath(s) for s in src]
    self._opts = RowOptions(max_target_chars, max_answer_chars, mc_shuffle_seed)
    unknown = set(task_sizes or {}) - set(DEFAULT_TASK_SIZES)
    if unknown:
      raise ValueError(
        f"task_sizes: unknown splits {sorted(unknown)}; known: {sorted(DEFAULT_TASK_SIZES)}"
      )
    self._task_sizes = {**DEFAULT_TASK_SIZES, **(task_sizes or {})}  # unnamed splits: defaults
    self._task_seed = task_seed
    self.report: dict[str, Any] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="srft-jax dataset from local files (see srft_jax/data/builders.py)",
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "prompt": tfds.features.Text(),
          "target": tfds.features.Text(),
          "answer": tfds.features.Text(),
          "choices": tfds.features.Sequence(tfds.features.Text()),
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is ever downloaded
    cfg = self.builder_config
    if cfg.name in NO_SRC_NAMES:
      if self._src:
        raise ValueError(f"dataset {cfg.name!r} takes no src (got {self._src})")
    elif not self._src:
      raise ValueError(f"dataset {cfg.name!r} needs src=<local file> (JSONL or Parquet)")
    self.report = {"name": cfg.name, "src": list(self._src), "splits": {}}
    return {split: self._generate_examples(split) for split in cfg.splits}

  def _sources(self, split: str) -> list[tuple[str, Callable[[], Iterator]]]:
    """(label, row iterator factory) per source feeding `split`."""
    name = self.builder_config.name
    if name == "task":
      n = self._task_sizes[split]
      label = f"task:{split}"
      return [
        (
          label,
          lambda: (
            (f"{label}:{i}", r) for i, r in enumerate(task.generate(split, n, self._task_seed), 1)
          ),
        )
      ]
    if name == "champ":
      return [("champ-dataset", _champ_rows)]
    return [(path, lambda path=path: read_rows(path)) for path in self._src]

  def _convert(self, row: dict, fallback_id: str) -> dict:
    cfg = self.builder_config
    if cfg.kind == "train":
      return _convert_train(row, fallback_id, self._opts)
    if cfg.kind == "math":
      return _convert_math_bench(row, fallback_id, self._opts)
    return _convert_mc(cfg.name, row, fallback_id, self._opts)

  def _generate_examples(self, split: str):
    name = self.builder_config.name
    kept, skipped = 0, collections.Counter()
    where: dict[str, list[str]] = collections.defaultdict(list)
    for f_index, (label, rows) in enumerate(self._sources(split)):
      kept_here = 0
      for loc, row in rows():
        if not isinstance(row, SkipRow):
          try:
            row = self._convert(row, f"{name}-{f_index}-{loc.rsplit(':', 1)[-1]}")
          except SkipRow as e:
            row = e
        if isinstance(row, SkipRow):
          skipped[row.reason] += 1
          if len(where[row.reason]) < _EXAMPLES_PER_REASON:
            where[row.reason].append(f"{loc} ({row})"[:200])
          continue
        kept_here += 1
        # Keys only need to be unique; (file, location) always is.
        yield f"{f_index}:{loc}", row
      if kept_here == 0:
        raise ValueError(
          f"{label}: no usable row for dataset {name!r} "
          f"(skipped: {dict(skipped) or 'the file is empty'})"
        )
      kept += kept_here
    self.report["splits"][split] = {
      "kept": kept,
      "skipped": {r: skipped[r] for r in SKIP_REASONS if skipped[r]},
      "skipped_total": sum(skipped.values()),
      "examples": dict(where),
    }
    # Written with the dataset's metadata.json once every split is generated.
    self.info.metadata["prepare_report"] = self.report


# ---------------------------------------------------------------------------
# Preparing and loading.


def dataset_dir(data_dir: str | os.PathLike, name: str) -> str:
  """The version directory of a prepared dataset: DATA_DIR/srft_data/NAME/VERSION."""
  if name not in NAMES:
    raise ValueError(f"unknown dataset {name!r}; choose from {NAMES}")
  return os.path.join(os.fspath(data_dir), "srft_data", name, str(SrftData.VERSION))


def prepare(
  name: str, data_dir: str | os.PathLike, src=None, *, overwrite: bool = False, **options
) -> dict:
  """Build dataset `name` from `src` into `data_dir`; returns the prepare report.

  The report ({"splits": {split: {"kept", "skipped": {reason: n}, ...}}}) is
  also written to `prepare_report.json` in the dataset directory. An existing
  prepared dataset is reused (and its stored report returned) unless
  `overwrite`.
  """
  if name not in NAMES:
    raise ValueError(f"unknown dataset {name!r}; choose from {NAMES}")
  out = dataset_dir(data_dir, name)
  if overwrite and os.path.isdir(out):
    shutil.rmtree(out)
  builder = SrftData(
    config=name, data_dir=os.fspath(data_dir), src=src, file_format="array_record", **options
  )
  builder.download_and_prepare()
  report = builder.report or load_report(data_dir, name)
  with open(os.path.join(out, REPORT_FILE), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  return report


def load_source(data_dir: str | os.PathLike, name: str, split: str | None = None):
  """Random-access data source of a prepared dataset (for `grain.MapDataset.source`).

  Reads the directory directly (`tfds.builder_from_directory`): no registry
  lookup, no download path. Records come back with `bytes` text fields;
  `srft_jax.data.pipeline` decodes them.
  """
  builder = tfds.builder_from_directory(dataset_dir(data_dir, name))
  if split is None:
    split = "train" if "train" in builder.info.splits else "test"
  return builder.as_data_source(split=split)


def load_report(data_dir: str | os.PathLike, name: str) -> dict:
  """The prepare-time kept/skipped counts of a prepared dataset."""
  out = dataset_dir(data_dir, name)
  path = os.path.join(out, REPORT_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  with open(os.path.join(out, "metadata.json"), encoding="utf-8") as f:
    return json.load(f).get("prepare_report", {})
