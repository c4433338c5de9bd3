"""The built-in reasoning task: determinism, splits, solver-checked demos, tokenizer."""

import re

import pytest

from srft_jax import tokenizer as tokenizer_lib
from srft_jax.data import task

DEMO_RE = re.compile(r"^<think>\n((?:[^\n]+\n)+)</think>\n\\boxed\{(\d+)\}$")
LINE_RE = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")
# Token budgets the default tiny model is sized for (plain-rendered prompt;
# demonstration including the EOS the batcher appends).
ID_PROMPT_MAX, ID_DEMO_MAX = 44, 64
OOD_PROMPT_MAX, OOD_DEMO_MAX = 52, 80
TEACHER_DEMO_MAX = 72  # data.max_response_len: every ID teacher demonstration is trained on


@pytest.fixture(scope="module")
def rows():
  return {split: task.generate(split, 400, seed=3) for split in task.SPLITS}


@pytest.fixture(scope="module")
def task_tok(tokenizer_path):
  """The task tokenizer (conftest.py's, trained once a session)."""
  return tokenizer_lib.load_tokenizer(tokenizer_path)


def test_generation_is_deterministic_in_seed(rows):
  for split in task.SPLITS:
    again = task.generate(split, 400, seed=3)
    assert again == rows[split]
    other = task.generate(split, 50, seed=4)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in rows[split][:50]]
    # Asking for fewer rows gives a prefix of the longer list.
    assert task.generate(split, 20, seed=3) == rows[split][:20]
  assert set(rows["train"][0]) == {"id", "prompt", "target", "answer"}
  assert len({r["id"] for s in task.SPLITS for r in rows[s]}) == len(task.SPLITS) * 400


def test_splits_are_disjoint_by_arithmetic(rows):
  def keys(problems):
    return {p.key for p in problems}

  # Different seeds and sizes still never share a problem's arithmetic across
  # train / val / test_id, not even renamed.
  train_problems = task.generate_problems("train", 3000, seed=0)
  train = keys(train_problems)
  val = keys(task.generate_problems("val", 400, seed=0))
  test_id = keys(task.generate_problems("test_id", 400, seed=0))
  test_id_other_seed = keys(task.generate_problems("test_id", 400, seed=1))
  assert len({p.text for p in train_problems}) == 3000  # distinct texts within a split
  assert not train & test_id and not train & test_id_other_seed
  assert not val & train and not val & test_id
  assert test_id & test_id_other_seed  # same held-out pool, drawn twice
  assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["test_id"]}
  # Every ID split draws every difficulty level; OOD has one more step than any.
  for split in ("train", "val", "test_id"):
    levels = [task.difficulty(r["prompt"]) for r in rows[split]]
    assert set(levels) == set(task.ID_STEPS)
    assert min(levels.count(lv) for lv in task.ID_STEPS) > 400 / len(task.ID_STEPS) / 2
  ood_steps = {task.difficulty(r["prompt"]) for r in rows["test_ood"]}
  assert ood_steps == set(task.OOD_STEPS) and min(ood_steps) > max(task.ID_STEPS)


def test_demonstrations_are_correct_and_need_the_steps(rows):
  for split in task.SPLITS:
    for r in rows[split]:
      m = DEMO_RE.match(r["target"])
      assert m, r["target"]
      assert m[2] == r["answer"] == str(task.solve(r["prompt"]).answer)
      # Check every equation by plain arithmetic, independent of the solver.
      values = []
      for line in m[1].splitlines():
        a, op, b, c = LINE_RE.match(line).groups()
        a, b, c = int(a), int(b), int(c)
        expected = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert c == expected and (op != "/" or a % b == 0), line
        values.append(c)
      assert values[-1] == int(r["answer"])
      assert all(1 <= v <= task.MAX_VALUE for v in values)
      # The answer never appears as a number in the question: copying fails.
      assert int(r["answer"]) not in {int(x) for x in re.findall(r"\d+", r["prompt"])}


def test_answers_vary(rows):
  answers = [int(r["answer"]) for r in rows["train"]]
  # No single value is a good guess (keeps the RL signal informative).
  most_common = max(answers.count(a) for a in set(answers))
  assert len(set(answers)) >= task.MAX_VALUE - 2 and most_common / len(answers) < 0.1


TEACHER_RE = re.compile(r"^<think>\n((?:[^\n]+\n)+)</think>\n\\boxed\{(\d+)\}$")


def test_teacher_demonstrations_are_correct_and_read_differently(rows):
  """The teacher style (data.demo_style) solves the same problem with the same
  answer, every equation right, but restates quantities and swaps operands."""
  differs = 0
  for split in ("train", "test_ood"):
    teacher = task.generate(split, 400, seed=3, style="teacher")
    for r, t in zip(rows[split], teacher):
      assert (t["id"], t["prompt"], t["answer"]) == (r["id"], r["prompt"], r["answer"])
      m = TEACHER_RE.match(t["target"])
      assert m, t["target"]
      body, boxed = m.groups()
      obj = re.search(r"How many ([a-z]+) now\?$", r["prompt"])[1]
      assert boxed == r["answer"]
      terse = DEMO_RE.match(r["target"])[1].splitlines()
      lines = body.splitlines()
      assert len(lines) == len(terse)
      for line, plain in zip(lines, terse):
        eq, unit = line.split(" ")
        assert unit == obj
        a, op, b, c = LINE_RE.match(eq).groups()
        pa, pop, pb, pc = LINE_RE.match(plain).groups()
        # Same operation and result; operands swapped exactly where it commutes.
        assert (op, c) == (pop, pc)
        assert (a, b) == ((pb, pa) if op in "+*" else (pa, pb))
      differs += t["target"] != r["target"]
  assert differs == 800
  with pytest.raises(ValueError):
    task.generate("train", 1, seed=0, style="fancy")


def test_boxed_answer_parses_with_math_verify(rows):
  from math_verify import parse
  from math_verify import verify

  for r in rows["train"][:20] + rows["test_ood"][:10]:
    pred = parse(r["target"].split("</think>")[-1], parsing_timeout=None)
    assert verify(parse(r["answer"], parsing_timeout=None), pred, timeout_seconds=None)
    wrong = parse(str(int(r["answer"]) + 1), parsing_timeout=None)
    assert not verify(wrong, pred, timeout_seconds=None)


def test_demonstrations_score_one_under_rewards(rows):
  from srft_jax import rewards

  sample = rows["train"][:16] + rows["test_ood"][:16]
  scores, outcomes = rewards.score_batch(
    [r["target"] for r in sample], [r["answer"] for r in sample], require_think=True
  )
  assert list(scores) == [1.0] * len(sample) and set(outcomes) == {"correct"}


def test_solver_rejects_unknown_text():
  for text in [
    "Mia has 3 pens. She eats 2. How many pens now?",
    "Mia has 3 pens. How many cups now?",
    "What is 2+2?",
    "",
  ]:
    with pytest.raises(ValueError):
      task.solve(text)
  s = task.solve("Ann has 6 cups. She buys three bags of 4. She keeps a third. How many cups now?")
  assert s.lines == ("3*4=12", "6+12=18", "18/3=6") and s.answer == 6


def test_token_lengths_and_format_with_task_tokenizer(rows, task_tok):
  tok = task_tok
  assert tok.vocab_size <= 512 and tok.bos_id is not None
  for split in task.SPLITS:
    p_max, d_max = (
      (OOD_PROMPT_MAX, OOD_DEMO_MAX) if split == "test_ood" else (ID_PROMPT_MAX, ID_DEMO_MAX)
    )
    for r in rows[split]:
      prompt = tokenizer_lib.render_prompt(r["prompt"], template=task.PROMPT_TEMPLATE)
      p_ids, d_ids = tok.encode(prompt), tok.encode(r["target"], add_eos=True)
      assert len(p_ids) <= p_max and len(d_ids) <= d_max, (split, len(p_ids), len(d_ids))
      assert tok.unk_id not in p_ids + d_ids
      assert tok.decode(p_ids) == prompt and tok.decode(d_ids) == r["target"]
      # Prompt and demo encoded apart equal the encoding of the joined text.
      assert p_ids + d_ids[:-1] == tok.encode(prompt + r["target"])
  for r in task.generate("train", 400, seed=3, style="teacher"):
    d_ids = tok.encode(r["target"], add_eos=True)
    assert len(d_ids) <= TEACHER_DEMO_MAX and tok.unk_id not in d_ids
    assert tok.decode(d_ids) == r["target"]
  # The format markers are single tokens, so the response format cannot fragment.
  for symbol in ("<think>", "</think>", "\\boxed{", "}", "\n"):
    assert tok.encode(symbol) == [tok.token_to_id(symbol)]
  assert [tok.id_to_token(i) for i in tok.encode("1234")] == list("1234")


def test_tokenizer_training_is_deterministic_and_cached(tmp_path, task_tok):
  a = task.train_task_tokenizer(tmp_path / "a.model", seed=0)
  b = task.train_task_tokenizer(tmp_path / "b.model", seed=0)
  assert open(a, "rb").read() == open(b, "rb").read()
  # get_task_tokenizer trains once, then reuses the file whose name holds the settings hash.
  tok = task.get_task_tokenizer(tmp_path / "cache")
  name = task.task_tokenizer_filename()
  path = tmp_path / "cache" / name
  assert path.exists() and path.read_bytes() == open(a, "rb").read()
  mtime = path.stat().st_mtime_ns
  tok2 = task.get_task_tokenizer(tmp_path / "cache")
  assert path.stat().st_mtime_ns == mtime
  assert tok.vocab_size == tok2.vocab_size == task_tok.vocab_size
  assert task.task_tokenizer_filename(vocab_size=300) != name
  assert task.task_tokenizer_filename(seed=1) != name
