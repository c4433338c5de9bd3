"""The built-in verifiable reasoning task: short multi-step arithmetic word problems.

Example (3 steps, difficulty level 3):
    prompt: "Mia has 7 pens. She finds 5 more. She gives 3 to Tom.
             She buys two bags of 2. How many pens now?"
    target: "<think>\n7+5=12\n12-3=9\n2*2=4\n9+4=13\n</think>\n\\boxed{13}"
    answer: "13"
The teacher's demonstration of the same problem (`style="teacher"`):
    "<think>\n5+7=12 pens\n12-3=9 pens\n2*2=4 pens\n4+9=13 pens\n</think>\n\\boxed{13}"

Why it is shaped this way (a tiny model, a 2-core CPU, and an RL signal):
- Every value stays in 1..MAX_VALUE (20) and operands are one digit, so a ~1M
  parameter model learns the arithmetic in a few minutes of SFT; digits are
  split into single tokens by the task tokenizer.
- Difficulty levels (1, 2 or 3 steps, drawn equally) spread the base model's
  success: sampled at temperature 1 after the default warm-up, its rollouts
  are right about 70% of the time on 1-step problems, 40% on 2-step and 20% on
  3-step ones (45% on the mix), and about 70% of groups of 8 have mixed
  rewards: an RL signal (docs/method.md §1.3, §7.1; benchmarks/task_signal.py).
- The answer needs every step: it is never one of the numbers in the prompt
  (rejected at generation), so copying cannot score; one slip anywhere changes it.
- A handful of sentence templates, names and objects gives a little language to
  map onto operations without much vocabulary (the tokenizer stays < 512).
- Splits: `train`, `val` and `test_id` have levels 1-3 and are disjoint by the
  problem's arithmetic (a hash of start value + operations assigns each
  problem to one of them, so no seed or size can leak a test or validation
  problem into training, not even renamed); `val` is for choosing
  hyperparameters; `test_ood` has 4 steps, one more than ever seen in training.
- Two demonstration styles (DEMO_STYLES): the terse canonical solution the base
  model is warmed up on, and a teacher's that is as correct but reads
  differently (each quantity restated with its unit, operands of + and *
  swapped), so SFT on it is off-policy, as the paper's demonstrations from a
  stronger model are for its base.

`solve` reads the problem *text* (not the generator's internal record), so the
demonstrations and answers are checked by an independent parse of what the
model actually sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Sequence

import sentencepiece as spm

from srft_jax import paths
from srft_jax import tokenizer as tokenizer_lib

# Bump when anything changes the generated text: it keys the tokenizer cache
# and the warm-up cache (job.warmup_meta).
GENERATOR_VERSION = "arith-v4"

SPLITS = ("train", "val", "test_id", "test_ood")
# Difficulty levels = steps a problem; train, val and test_id draw them with these weights.
ID_STEPS = (1, 2, 3)
ID_STEP_WEIGHTS = (1, 1, 1)
OOD_STEPS = (4,)
MAX_VALUE = 20
START_RANGE = (2, 15)
OPERAND_RANGE = (2, 9)  # add / sub amounts
BAG_RANGE = (2, 5)  # items in a bag
# Shares of the arithmetic-problem space reserved for `test_id` and `val` (by hash).
HELDOUT_PERCENT = 20
VAL_PERCENT = 10
# Demonstration styles (`data.demo_style`): the terse canonical solution the
# base is warmed up on, or a teacher's that is as correct but reads differently.
DEMO_STYLES = ("terse", "teacher")

PROMPT_TEMPLATE = "plain"  # tokenizer.render_prompt template the task is trained with

NAMES = (
  ("Mia", "She"),
  ("Tom", "He"),
  ("Ann", "She"),
  ("Ben", "He"),
  ("Eva", "She"),
  ("Sam", "He"),
  ("Lily", "She"),
  ("Max", "He"),
  ("Zoe", "She"),
  ("Leo", "He"),
)
OBJECTS = (
  "apples",
  "pens",
  "cards",
  "coins",
  "books",
  "shells",
  "stamps",
  "cups",
  "eggs",
  "marbles",
)

# One sentence per operation; {p} = pronoun, {k}/{a}/{b} = operands, {n} = a name.
# Every template must be matched by exactly one of _OP_PATTERNS below.
_TEMPLATES = {
  "add": ("{p} finds {k} more.", "{p} gets {k} more."),
  "sub": ("{p} gives {k} to {n}.", "{p} loses {k}."),
  "mul": ("{p} doubles them.", "{p} triples them."),  # k = 2 / 3
  "bags": ("{p} buys {a} bags of {b}.",),  # a as a word: "two"
  "div": ("{p} gives away half.", "{p} keeps a third."),  # k = 2 / 3
}
# The bag count is written as a word, so reading the problem takes a little
# language (and the prompt one token fewer per bag step).
_NUMBER_WORDS = ("two", "three", "four")
_OP_WEIGHTS = {"add": 3, "sub": 3, "mul": 1.5, "bags": 1.5, "div": 1}
_PROMPT_INTRO = "{name} has {x} {obj}."
_PROMPT_QUESTION = "How many {obj} now?"

THINK_OPEN, THINK_CLOSE, BOXED = "<think>", "</think>", "\\boxed{"


@dataclasses.dataclass(frozen=True)
class Problem:
  """One generated problem: its arithmetic (start, ops) and its text."""

  start: int
  ops: tuple[tuple, ...]  # ("add", k) | ("sub", k) | ("mul", k) | ("bags", a, b) | ("div", k)
  text: str

  @property
  def key(self) -> str:
    """The arithmetic alone (names and wording excluded): identity for splits."""
    return json.dumps([self.start, [list(op) for op in self.ops]])


@dataclasses.dataclass(frozen=True)
class Solution:
  answer: int
  lines: tuple[str, ...]  # terse: one equation per line, e.g. "7+5=12"
  teacher_lines: tuple[str, ...] = ()  # the teacher's: e.g. "5+7=12 pens"

  @property
  def target(self) -> str:
    """The terse demonstration in the paper's format (docs/method.md §1.2, reward rule)."""
    return self.target_in("terse")

  def target_in(self, style: str) -> str:
    """The demonstration in `style` (DEMO_STYLES); both end in the same boxed answer."""
    if style not in DEMO_STYLES:
      raise ValueError(f"unknown demo style {style!r}; choose from {DEMO_STYLES}")
    body = "\n".join(self.lines if style == "terse" else self.teacher_lines)
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}\n{BOXED}{self.answer}}}"


# ---------------------------------------------------------------------------
# Solver: parses the text, so it does not trust the generator's record.

_NUM = r"(\d+)"
_OP_PATTERNS = (
  (re.compile(rf"^(?:She|He) (?:finds|gets) {_NUM} more\.$"), lambda m: ("add", int(m[1]))),
  (re.compile(rf"^(?:She|He) gives {_NUM} to [A-Z][a-z]+\.$"), lambda m: ("sub", int(m[1]))),
  (re.compile(rf"^(?:She|He) loses {_NUM}\.$"), lambda m: ("sub", int(m[1]))),
  (re.compile(r"^(?:She|He) doubles them\.$"), lambda m: ("mul", 2)),
  (re.compile(r"^(?:She|He) triples them\.$"), lambda m: ("mul", 3)),
  (
    re.compile(rf"^(?:She|He) buys (two|three|four) bags of {_NUM}\.$"),
    lambda m: ("bags", _NUMBER_WORDS.index(m[1]) + 2, int(m[2])),
  ),
  (re.compile(r"^(?:She|He) gives away half\.$"), lambda m: ("div", 2)),
  (re.compile(r"^(?:She|He) keeps a third\.$"), lambda m: ("div", 3)),
)
_INTRO_PATTERN = re.compile(rf"^([A-Z][a-z]+) has {_NUM} ([a-z]+)\.$")
_QUESTION_PATTERN = re.compile(r"^How many ([a-z]+) now\?$")


def parse(text: str) -> tuple[int, tuple[tuple, ...]]:
  """Problem text -> (start, ops). Raises ValueError on text it cannot read."""
  _, _, start, ops = _parse_all(text)
  return start, ops


def _parse_all(text: str) -> tuple[str, str, int, tuple[tuple, ...]]:
  """Problem text -> (name, object, start, ops)."""
  sentences = re.findall(r"[^.?]+[.?]", text.strip())
  if len(sentences) < 2 or "".join(sentences).replace(" ", "") != text.strip().replace(" ", ""):
    raise ValueError(f"not a task problem: {text!r}")
  sentences = [s.strip() for s in sentences]
  intro = _INTRO_PATTERN.match(sentences[0])
  question = _QUESTION_PATTERN.match(sentences[-1])
  if not intro or not question or intro[3] != question[1]:
    raise ValueError(f"not a task problem: {text!r}")
  ops = []
  for s in sentences[1:-1]:
    for pattern, build in _OP_PATTERNS:
      m = pattern.match(s)
      if m:
        ops.append(build(m))
        break
    else:
      raise ValueError(f"unknown step {s!r} in {text!r}")
  return intro[1], intro[3], int(intro[2]), tuple(ops)


def difficulty(text: str) -> int:
  """A problem's difficulty level: its number of steps."""
  return len(parse(text)[1])


def _apply(x: int, op: tuple) -> tuple[int, list[str]]:
  """One step: the new value and the demonstration lines that compute it."""
  kind = op[0]
  if kind == "add":
    y = x + op[1]
    return y, [f"{x}+{op[1]}={y}"]
  if kind == "sub":
    y = x - op[1]
    return y, [f"{x}-{op[1]}={y}"]
  if kind == "mul":
    y = x * op[1]
    return y, [f"{x}*{op[1]}={y}"]
  if kind == "bags":
    c = op[1] * op[2]
    y = x + c
    return y, [f"{op[1]}*{op[2]}={c}", f"{x}+{c}={y}"]
  if kind == "div":
    if x % op[1]:
      raise ValueError(f"{x} is not divisible by {op[1]}")
    y = x // op[1]
    return y, [f"{x}/{op[1]}={y}"]
  raise ValueError(f"unknown operation {op!r}")


def _teacher_step(x: int, op: tuple, obj: str) -> tuple[int, list[str]]:
  """One step as the teacher writes it: operands swapped where the operation
  commutes, and every intermediate quantity restated with its unit."""
  kind = op[0]
  if kind == "add":
    y = x + op[1]
    return y, [f"{op[1]}+{x}={y} {obj}"]
  if kind == "mul":
    y = x * op[1]
    return y, [f"{op[1]}*{x}={y} {obj}"]
  if kind == "bags":
    c = op[1] * op[2]
    return x + c, [f"{op[2]}*{op[1]}={c} {obj}", f"{c}+{x}={x + c} {obj}"]
  y, lines = _apply(x, op)  # sub, div: no other order
  return y, [f"{lines[0]} {obj}"]


def solve(problem: Problem | str) -> Solution:
  """Solve a problem (or its text) step by step, in both demonstration styles."""
  text = problem.text if isinstance(problem, Problem) else problem
  _, obj, start, ops = _parse_all(text)
  x, lines = start, []
  teacher = []
  for op in ops:
    y, new = _apply(x, op)
    _, new_teacher = _teacher_step(x, op, obj)
    lines.extend(new)
    teacher.extend(new_teacher)
    x = y
  return Solution(answer=x, lines=tuple(lines), teacher_lines=tuple(teacher))


# ---------------------------------------------------------------------------
# Generator.


def _draw_op(rng: random.Random, x: int) -> tuple | None:
  """A random operation valid from value x (stays in 1..MAX_VALUE), or None."""
  kinds = list(_OP_WEIGHTS)
  kind = rng.choices(kinds, weights=[_OP_WEIGHTS[k] for k in kinds])[0]
  if kind == "add":
    op = ("add", rng.randint(*OPERAND_RANGE))
  elif kind == "sub":
    op = ("sub", rng.randint(*OPERAND_RANGE))
  elif kind == "mul":
    op = ("mul", rng.choice((2, 3)))
  elif kind == "bags":
    op = ("bags", rng.randint(2, 4), rng.randint(*BAG_RANGE))
  else:
    op = ("div", rng.choice((2, 3)))
  if kind == "div" and x % op[1]:
    return None
  y, _ = _apply(x, op)
  return op if 1 <= y <= MAX_VALUE else None


def _render(rng: random.Random, start: int, ops: Sequence[tuple]) -> str:
  name, pronoun = rng.choice(NAMES)
  obj = rng.choice(OBJECTS)
  other = rng.choice([n for n, _ in NAMES if n != name])
  parts = [_PROMPT_INTRO.format(name=name, x=start, obj=obj)]
  for op in ops:
    kind = op[0]
    if kind in ("mul", "div"):
      template = _TEMPLATES[kind][0 if op[1] == 2 else 1]
    else:
      template = rng.choice(_TEMPLATES[kind])
    a, b = (_NUMBER_WORDS[op[1] - 2], op[2]) if kind == "bags" else (None, None)
    parts.append(template.format(p=pronoun, k=op[1], a=a, b=b, n=other))
  parts.append(_PROMPT_QUESTION.format(obj=obj))
  return " ".join(parts)


def _prompt_numbers(start: int, ops: Sequence[tuple]) -> set[int]:
  nums = {start}
  for op in ops:
    if op[0] in ("add", "sub"):
      nums.add(op[1])
    elif op[0] == "bags":  # the bag count is a word, but copying it would still be a guess
      nums.update(op[1:])
  return nums


def id_split_of(key: str) -> str:
  """The in-distribution split that owns a problem's arithmetic (by hash)."""
  digest = hashlib.sha256(f"{GENERATOR_VERSION}|{key}".encode()).hexdigest()
  bucket = int(digest[:8], 16) % 100
  if bucket < HELDOUT_PERCENT:
    return "test_id"
  return "val" if bucket < HELDOUT_PERCENT + VAL_PERCENT else "train"


def generate_problems(
  split: str, n: int, seed: int, levels: Sequence[int] | None = None
) -> list[Problem]:
  """`n` problems of `split` with distinct texts, deterministic in (split, n, seed, levels).

  A larger `n` with the same seed extends the smaller list (same prefix). The
  arithmetic decides the split, so a renamed problem never crosses splits; the
  few 1-step problems recur within a split under other names and objects.
  `levels` keeps only those difficulty levels of an ID split (None: all).
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
  if levels is not None and (not levels or not set(levels) <= set(ID_STEPS)):
    raise ValueError(f"levels must be a non-empty subset of {ID_STEPS}, got {levels!r}")
  # String seeds hash with SHA-512 in `random`: stable across runs/processes.
  rng = random.Random(f"{GENERATOR_VERSION}|{split}|{seed}")
  if split == "test_ood":
    steps_choices, weights = OOD_STEPS, None
  else:
    keep = [i for i, lv in enumerate(ID_STEPS) if levels is None or lv in levels]
    steps_choices = tuple(ID_STEPS[i] for i in keep)
    weights = tuple(ID_STEP_WEIGHTS[i] for i in keep)
  seen: set[str] = set()
  out: list[Problem] = []
  attempts, max_attempts = 0, 200 * n + 1000
  while len(out) < n:
    attempts += 1
    if attempts > max_attempts:
      raise ValueError(
        f"could not find {n} distinct {split} problems "
        f"(got {len(out)}); the problem space is too small"
      )
    steps = rng.choices(steps_choices, weights=weights)[0]
    x = start = rng.randint(*START_RANGE)
    ops: list[tuple] = []
    for _ in range(steps):
      op = None
      for _ in range(10):
        op = _draw_op(rng, x)
        if op is not None:
          break
      if op is None:
        break
      ops.append(op)
      x, _ = _apply(x, op)
    if len(ops) != steps or x in _prompt_numbers(start, ops):
      continue  # the answer must be computed, not copied from the prompt
    text = _render(rng, start, ops)
    problem = Problem(start=start, ops=tuple(ops), text=text)
    if text in seen:
      continue
    if split != "test_ood" and id_split_of(problem.key) != split:
      continue
    seen.add(text)
    out.append(problem)
  return out


def generate(
  split: str, n: int, seed: int, style: str = "terse", levels: Sequence[int] | None = None
) -> list[dict]:
  """`n` rows {id, prompt, target, answer} (the schema of `srft_jax.data`) of
  `split`, with demonstrations in `style` (DEMO_STYLES), of difficulty `levels`
  (None: all ID levels)."""
  if style not in DEMO_STYLES:
    raise ValueError(f"unknown demo style {style!r}; choose from {DEMO_STYLES}")
  rows = []
  for i, problem in enumerate(generate_problems(split, n, seed, levels)):
    solution = solve(problem)
    rows.append(
      {
        "id": f"task-{split}-{seed}-{i:06d}",
        "prompt": problem.text,
        "target": solution.target_in(style),
        "answer": str(solution.answer),
      }
    )
  return rows


# ---------------------------------------------------------------------------
# Task tokenizer: sentencepiece trained on the task's own text.

DEFAULT_VOCAB_SIZE = 256
_TOKENIZER_CORPUS_ROWS = 3000
# Pieces that must never be split or merged with neighbours, so the response
# format survives tokenization intact.
_USER_SYMBOLS = ("\n", THINK_OPEN, THINK_CLOSE, BOXED, "}")
_SP_SETTINGS = dict(
  model_type="bpe",
  # identity + no whitespace cleanup: "\n" and spacing round-trip exactly.
  normalization_rule_name="identity",
  remove_extra_whitespaces=False,
  # No dummy "▁" prefix, so encode(prompt) + encode(target) equals the
  # encoding of the concatenated text the model is trained on.
  add_dummy_prefix=False,
  split_digits=True,
  character_coverage=1.0,
  byte_fallback=False,
  pad_id=0,
  eos_id=1,
  bos_id=2,
  unk_id=3,
  # Determinism: one thread, no sampling/shuffling of the input.
  num_threads=1,
  shuffle_input_sentence=False,
  input_sentence_size=0,
  hard_vocab_limit=False,
)


def _tokenizer_corpus(seed: int) -> list[str]:
  corpus = []
  for style in DEMO_STYLES:  # both styles' responses tokenize well
    for r in generate("train", _TOKENIZER_CORPUS_ROWS, seed, style):
      if style == DEMO_STYLES[0]:
        corpus.append(tokenizer_lib.render_prompt(r["prompt"], template=PROMPT_TEMPLATE))
      corpus.append(r["target"])
  # Every word the generator can emit, so OOD prompts never hit <unk>.
  for name, pronoun in NAMES:
    corpus.append(f"{name} {pronoun}")
  corpus.append(" ".join(OBJECTS))
  for templates in _TEMPLATES.values():
    corpus.extend(t.format(p="She", k=5, a="two", b=3, n="Tom") for t in templates)
  corpus.append(" ".join(_NUMBER_WORDS) + " 0123456789+-*/=")
  return corpus


def _settings_digest(seed: int, vocab_size: int) -> str:
  blob = json.dumps(
    {
      "version": GENERATOR_VERSION,
      "seed": seed,
      "vocab_size": vocab_size,
      "rows": _TOKENIZER_CORPUS_ROWS,
      "symbols": _USER_SYMBOLS,
      "template": PROMPT_TEMPLATE,
      "sp": _SP_SETTINGS,
    },
    sort_keys=True,
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def task_tokenizer_filename(seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
  return f"task_sp_{vocab_size}_{_settings_digest(seed, vocab_size)}.model"


def train_task_tokenizer(
  path: str | os.PathLike, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> str:
  """Train the task's sentencepiece model and write it to `path` (atomically)."""

  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_tokenizer_corpus(seed)),
    model_writer=buf,
    vocab_size=vocab_size,
    user_defined_symbols=list(_USER_SYMBOLS),
    minloglevel=2,
    **_SP_SETTINGS,
  )
  path = os.fspath(path)
  # Atomic (paths.write_bytes): concurrent processes never see a half-written file.
  paths.write_bytes(path, buf.getvalue())
  return path


def get_task_tokenizer(
  cache_dir: str | os.PathLike, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> tokenizer_lib.Tokenizer:
  """The task tokenizer, trained once and cached in `cache_dir` (local or remote)."""
  path = os.path.join(os.fspath(cache_dir), task_tokenizer_filename(seed, vocab_size))
  if not paths.exists(path):
    train_task_tokenizer(path, seed=seed, vocab_size=vocab_size)
  if paths.is_remote(path):
    return tokenizer_lib.SentencePieceTokenizer(paths.read_bytes(path))
  return tokenizer_lib.load_tokenizer(path)
