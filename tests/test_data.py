"""Dataset builders (local files in the public schemas), the prepare CLI, and batching."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from srft_jax.data import builders
from srft_jax.data import pipeline
from srft_jax.data.__main__ import main as cli_main

import helpers

tfds.display_progress_bar(False)


# ---------------------------------------------------------------------------
# Fixture writers.


def write_jsonl(path, rows=(), raw_lines=()):
  """Rows as JSON lines, then raw byte lines (for malformed input)."""
  with open(path, "wb") as f:
    for row in rows:
      f.write(json.dumps(row).encode("utf-8") + b"\n")
    for line in raw_lines:
      f.write(line + b"\n")
  return str(path)


def write_parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def records(data_dir, name, split=None):
  """A prepared dataset's records as str dicts, keyed by id."""
  source = builders.load_source(data_dir, name, split)
  out = {}
  for i in range(len(source)):
    r = source[i]
    rec = {
      k: (v.decode() if isinstance(v, bytes) else [c.decode() for c in v]) for k, v in r.items()
    }
    out[rec["id"]] = rec
  return out


# ---------------------------------------------------------------------------
# Training-set builder.


def test_openr1_parquet_and_jsonl(tmp_path):
  pq_file = write_parquet(
    tmp_path / "openr1.parquet",
    [
      {
        "data_source": "numina",
        "prompt": [
          {"role": "system", "content": "Be brief."},
          {"role": "user", "content": "What is 1+1?"},
        ],
        "target": [{"role": "assistant", "content": "<think>\n1+1=2\n</think>\n\\boxed{2}"}],
        "reward_model": {"style": "rule", "ground_truth": "2"},
        "extra_info": {"index": 7},
      },
      {
        "data_source": "numina",
        "prompt": [{"role": "user", "content": "Half of 1?"}],
        "target": [{"role": "assistant", "content": "<think>\nhalf\n</think>\n\\boxed{\\frac12}"}],
        "reward_model": {"style": "rule", "ground_truth": "$\\frac{1}{2}$"},
        "extra_info": {"index": 8},
      },
    ],
  )
  jl_file = write_jsonl(
    tmp_path / "openr1.jsonl",
    [
      {"problem": "Compute 2+3.", "solution": "We add: 2+3=5, so \\boxed{5}."},
      {"prompt": "Q?", "target": "T", "answer": 3},
      {"prompt": "Q2", "generations": ["<think>g</think>\\boxed{4}", "other"], "answer": "$4$"},
    ],
  )
  report = builders.prepare("openr1", tmp_path / "data", [pq_file, jl_file])
  assert report["splits"]["train"]["kept"] == 5
  assert report["splits"]["train"]["skipped_total"] == 0
  recs = records(tmp_path / "data", "openr1")
  assert recs["7"] == {
    "id": "7",
    "prompt": "What is 1+1?",
    "answer": "2",
    "choices": [],
    "target": "<think>\n1+1=2\n</think>\n\\boxed{2}",
  }
  assert recs["8"]["answer"] == "\\frac{1}{2}"
  # A solution without a demonstration column becomes a <think> demonstration.
  assert recs["openr1-1-1"]["target"] == (
    "<think>\nWe add: 2+3=5, so \\boxed{5}.\n</think>\n\\boxed{5}"
  )
  assert recs["openr1-1-1"]["answer"] == "5"
  assert recs["openr1-1-2"]["answer"] == "3"
  assert recs["openr1-1-3"]["target"] == "<think>g</think>\\boxed{4}"
  assert recs["openr1-1-3"]["answer"] == "4"
  # The report is stored with the dataset for the training metrics.
  assert builders.load_report(tmp_path / "data", "openr1")["splits"]["train"]["kept"] == 5
  meta = json.load(
    open(os.path.join(builders.dataset_dir(tmp_path / "data", "openr1"), "metadata.json"))
  )
  assert meta["prepare_report"]["splits"]["train"]["kept"] == 5


@pytest.mark.slow
def test_champ_demonstrations(tmp_path):
  import champ_dataset

  report = builders.prepare("champ", tmp_path)
  problems = champ_dataset.load("v0").problems
  assert report["splits"]["train"]["kept"] == len(problems) == 270
  recs = records(tmp_path, "champ")
  p = problems["P_Combinatorics_1"]
  rec = recs["champ-P_Combinatorics_1"]
  assert rec["prompt"] == p.text and rec["answer"] == "239"
  steps = "\n".join(s.text for s in p.solution.steps)
  assert rec["target"] == f"<think>\n{steps}\n</think>\n\\boxed{{239}}"
  # Prose alternatives in champ answers are reduced to one gradable answer.
  assert recs["champ-P_Combinatorics_2"]["answer"] == "252"
  for rec in recs.values():
    assert rec["target"].startswith("<think>\n")
    assert rec["target"].endswith(f"</think>\n\\boxed{{{rec['answer']}}}")
    assert builders.extract_boxed(rec["target"]) == rec["answer"]


def test_task_rows_through_the_builder(tmp_path):
  from srft_jax.data import task

  sizes = {"train": 12, "test_id": 5, "test_ood": 4}
  report = builders.prepare("task", tmp_path, task_sizes=sizes, task_seed=3)
  assert {s: v["kept"] for s, v in report["splits"].items()} == sizes
  for split, n in sizes.items():
    expected = {r["id"]: r for r in task.generate(split, n, 3)}
    got = records(tmp_path, "task", split)
    assert {
      k: {f: v[f] for f in ("id", "prompt", "target", "answer")} for k, v in got.items()
    } == expected


# ---------------------------------------------------------------------------
# Benchmarks.


def test_math_benchmarks(tmp_path):
  d = tmp_path / "data"
  builders.prepare(
    "math500",
    d,
    write_jsonl(
      tmp_path / "m.jsonl",
      [
        {
          "problem": "Half?",
          "solution": "So \\boxed{\\frac{1}{2}}.",
          "answer": "\\frac{1}{2}",
          "subject": "Algebra",
          "level": 2,
          "unique_id": "test/algebra/1.json",
        }
      ],
    ),
  )
  builders.prepare(
    "aime24",
    d,
    write_parquet(
      tmp_path / "a.parquet",
      [{"ID": "2024-I-1", "Problem": "Find x.", "Solution": "x is 204.", "Answer": 204}],
    ),
  )
  amc_file = tmp_path / "amc.json"  # one JSON array, not JSON Lines
  amc_file.write_text(
    json.dumps(
      [
        {"id": 0, "problem": "P0", "answer": 142.0, "url": "u"},
        {"id": 1, "question": "P1", "answer": 2.5},
      ],
      indent=1,
    )
  )
  builders.prepare("amc", d, str(amc_file))
  builders.prepare(
    "minerva",
    d,
    write_jsonl(
      tmp_path / "min.jsonl",
      [
        {"problem": "Speed of light?", "solution": "It is $\\boxed{3 \\times 10^{8}}$ m/s."},
        {"question": "Seven?", "answer": "7"},
      ],
    ),
  )
  builders.prepare(
    "olympiadbench",
    d,
    write_jsonl(
      tmp_path / "ob.jsonl",
      [
        {
          "id": 1606,
          "question": "Find a and b.",
          "final_answer": ["$\\frac{1}{2}$", "$3$"],
          "solution": ["Step one."],
          "context": None,
        },
        {"id": 1607, "question": "Find v.", "context": "A ball falls.", "final_answer": ["$5$"]},
      ],
    ),
  )
  assert records(d, "math500")["test/algebra/1.json"] == {
    "id": "test/algebra/1.json",
    "prompt": "Half?",
    "answer": "\\frac{1}{2}",
    "target": "So \\boxed{\\frac{1}{2}}.",
    "choices": [],
  }
  assert records(d, "aime24")["2024-I-1"]["answer"] == "204"
  assert records(d, "aime24")["2024-I-1"]["target"] == "x is 204."
  amc = records(d, "amc")
  assert (amc["0"]["answer"], amc["1"]["answer"], amc["1"]["prompt"]) == ("142", "2.5", "P1")
  minerva = records(d, "minerva")
  assert minerva["minerva-0-1"]["answer"] == "3 \\times 10^{8}"
  assert minerva["minerva-0-2"]["answer"] == "7"
  ob = records(d, "olympiadbench")
  assert ob["1606"]["answer"] == "\\frac{1}{2}, 3"
  assert ob["1607"]["prompt"] == "A ball falls.\n\nFind v."
  assert builders.load_source(d, "amc").__len__() == 2


def _check_mc(rec, question, options, correct_text):
  letter = rec["answer"]
  assert rec["choices"][ord(letter) - ord("A")] == correct_text
  assert sorted(rec["choices"]) == sorted(options)
  lines = [f"{chr(ord('A') + i)}. {t}" for i, t in enumerate(rec["choices"])]
  assert rec["prompt"] == question + "\n\n" + "\n".join(lines)


MMLU_ROWS = [
  {
    "question_id": 70 + k,
    "question": f"Q{k}?",
    "options": [f"opt{k}-{i}" for i in range(10)],
    "answer": "ABCDEFGHIJ"[k],
    "answer_index": k,
    "cot_content": "",
    "category": "math",
    "src": "s",
  }
  for k in range(6)
]


def test_multiple_choice_benchmarks(tmp_path):
  d = tmp_path / "data"
  builders.prepare(
    "arc_c",
    d,
    [
      write_parquet(
        tmp_path / "arc.parquet",
        [
          {
            "id": "Mercury_1",
            "question": "Which?",
            "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
            "answerKey": "C",
          }
        ],
      ),
      # AI2's original JSONL layout with numeric labels.
      write_jsonl(
        tmp_path / "arc.jsonl",
        [
          {
            "id": "NYSED_2",
            "question": {
              "stem": "Pick two.",
              "choices": [
                {"text": "one", "label": "1"},
                {"text": "two", "label": "2"},
                {"text": "three", "label": "3"},
              ],
            },
            "answerKey": "2",
          }
        ],
      ),
    ],
  )
  builders.prepare(
    "gpqa_diamond",
    d,
    write_jsonl(
      tmp_path / "gpqa.jsonl",
      [
        {
          "Record ID": "rec1",
          "Question": "Which particle?",
          "Correct Answer": "right",
          "Incorrect Answer 1": "w1",
          "Incorrect Answer 2": "w2",
          "Incorrect Answer 3": "w3",
        }
      ],
    ),
  )
  builders.prepare("mmlu_pro", d, write_parquet(tmp_path / "mmlu.parquet", MMLU_ROWS))

  arc = records(d, "arc_c")
  _check_mc(arc["Mercury_1"], "Which?", ["a", "b", "c", "d"], "c")
  _check_mc(arc["NYSED_2"], "Pick two.", ["one", "two", "three"], "two")
  _check_mc(
    records(d, "gpqa_diamond")["rec1"], "Which particle?", ["right", "w1", "w2", "w3"], "right"
  )
  mmlu = records(d, "mmlu_pro")
  for row in MMLU_ROWS:
    _check_mc(
      mmlu[str(row["question_id"])],
      row["question"],
      row["options"],
      row["options"][row["answer_index"]],
    )
  # The options really are shuffled, and the shuffle is fixed by the seed.
  assert any(mmlu[str(r["question_id"])]["choices"] != r["options"] for r in MMLU_ROWS)
  d2 = tmp_path / "again"
  builders.prepare("mmlu_pro", d2, str(tmp_path / "mmlu.parquet"))
  assert records(d2, "mmlu_pro") == mmlu
  # mc_shuffle_seed=None keeps the source order and the source letter.
  d3 = tmp_path / "unshuffled"
  builders.prepare("mmlu_pro", d3, str(tmp_path / "mmlu.parquet"), mc_shuffle_seed=None)
  for row in MMLU_ROWS:
    rec = records(d3, "mmlu_pro")[str(row["question_id"])]
    assert rec["choices"] == row["options"] and rec["answer"] == row["answer"]


# ---------------------------------------------------------------------------
# Bad rows.

GOOD = {"prompt": "What is 2+2?", "target": "<think>\n2+2=4\n</think>\n\\boxed{4}", "answer": "4"}


def fuzzed_openr1(path):
  """A JSONL file whose bad rows are known exactly, reason by reason."""
  rows = [
    GOOD,
    dict(GOOD, prompt="Other?"),
    dict(GOOD, prompt=[{"role": "user", "content": "Q3"}]),
    [1, 2],
    "a string",  # not_a_record x2
    {"prompt": "q", "target": "t"},  # missing_field (answer)
    {"target": "t", "answer": "1"},  # missing_field (prompt)
    {"prompt": "q", "answer": "1"},  # missing_field (demonstration)
    dict(GOOD, prompt="   "),  # empty_prompt
    dict(GOOD, prompt=[{"role": "user", "content": ""}]),  # empty_prompt
    dict(GOOD, target=""),  # empty_target
    dict(GOOD, target="x" * 101),  # target_too_long
    dict(GOOD, answer=""),  # unparseable_answer
    dict(GOOD, answer="\\frac{1}{2"),  # unparseable_answer
    dict(GOOD, answer={"a": 1}),  # unparseable_answer
    dict(GOOD, answer=True),  # unparseable_answer
  ]
  raw = [
    b'{"prompt": "no closing brace"',  # bad_json
    b"not json at all",  # bad_json
    b'{"prompt": ' + b"9" * 5000 + b"}",  # bad_json (int > 4300 digits)
    b"[" * 100_000 + b"]" * 100_000,  # bad_json (nesting: RecursionError)
    b'{"prompt": "\xff\xfe", "target": "t", "answer": "1"}',  # invalid_utf8 (bytes)
    b'{"prompt": "\\ud800", "target": "t", "answer": "1"}',  # invalid_utf8 (lone surrogate)
    b"",  # blank line: not a row
  ]
  return write_jsonl(path, rows, raw)


EXPECTED_SKIPS = {
  "bad_json": 4,
  "invalid_utf8": 2,
  "not_a_record": 2,
  "missing_field": 3,
  "empty_prompt": 2,
  "empty_target": 1,
  "target_too_long": 1,
  "unparseable_answer": 4,
}


def test_utf8_bom_does_not_cost_the_first_row(tmp_path):
  src = tmp_path / "bom.jsonl"
  src.write_bytes(
    b"\xef\xbb\xbf" + b"\n".join(json.dumps(dict(GOOD, prompt=f"q{i}")).encode() for i in range(2))
  )
  report = builders.prepare("openr1", tmp_path / "data", src, max_target_chars=100)
  assert report["splits"]["train"]["kept"] == 2


def test_bad_rows_counted_by_reason(tmp_path):
  src = fuzzed_openr1(tmp_path / "fuzz.jsonl")
  report = builders.prepare("openr1", tmp_path / "data", src, max_target_chars=100)
  split = report["splits"]["train"]
  assert split["kept"] == 3
  assert split["skipped"] == EXPECTED_SKIPS
  assert split["skipped_total"] == sum(EXPECTED_SKIPS.values())
  assert split["examples"]["bad_json"][0].startswith("fuzz.jsonl:")
  assert len(builders.load_source(tmp_path / "data", "openr1")) == 3


def test_bad_rows_parquet_and_multiple_choice(tmp_path):
  src = write_parquet(
    tmp_path / "bytes.parquet",
    [
      {"prompt": b"q", "target": b"<think>t</think>\\boxed{1}", "answer": b"1"},
      {"prompt": b"\xff\xfe", "target": b"t", "answer": b"1"},
    ],
  )
  report = builders.prepare("openr1", tmp_path / "d1", src)
  assert report["splits"]["train"]["kept"] == 1
  assert report["splits"]["train"]["skipped"] == {"invalid_utf8": 1}

  rows = [
    MMLU_ROWS[0],
    dict(MMLU_ROWS[1], answer_index=12, answer=None),  # bad_choices: out of range
    dict(MMLU_ROWS[2], options=["only one"]),  # bad_choices: < 2 options
    dict(MMLU_ROWS[3], answer="B", answer_index=5),  # unparseable_answer: disagree
    dict(MMLU_ROWS[4], question="  "),
  ]  # empty_prompt
  report = builders.prepare("mmlu_pro", tmp_path / "d2", write_jsonl(tmp_path / "mmlu.jsonl", rows))
  assert report["splits"]["test"]["kept"] == 1
  assert report["splits"]["test"]["skipped"] == {
    "bad_choices": 2,
    "unparseable_answer": 1,
    "empty_prompt": 1,
  }


def test_file_without_usable_rows_is_an_error(tmp_path):
  good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
  bad = write_jsonl(tmp_path / "all_bad.jsonl", [{"prompt": "q"}], [b"{oops"])
  with pytest.raises(ValueError, match="all_bad.jsonl: no usable row"):
    builders.prepare("openr1", tmp_path / "d1", [good, bad])
  empty = write_jsonl(tmp_path / "empty.jsonl")
  with pytest.raises(ValueError, match="empty.jsonl.*empty"):
    builders.prepare("math500", tmp_path / "d2", empty)
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    builders.prepare("openr1", tmp_path / "d3", str(tmp_path / "missing.jsonl"))
  with pytest.raises(ValueError, match="needs src"):
    builders.prepare("gpqa_diamond", tmp_path / "d4")


# ---------------------------------------------------------------------------
# The prepare command.


def test_prepare_cli(tmp_path, capsys):
  src = fuzzed_openr1(tmp_path / "fuzz.jsonl")
  rc = cli_main(
    [
      "prepare",
      "openr1",
      "--src",
      src,
      "--data_dir",
      str(tmp_path / "d"),
      "--max_target_chars",
      "100",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0
  assert f"openr1/train: kept 3, skipped {sum(EXPECTED_SKIPS.values())}" in out
  for reason, n in EXPECTED_SKIPS.items():
    assert f"{reason}={n}" in out
  assert os.path.exists(
    os.path.join(builders.dataset_dir(tmp_path / "d", "openr1"), "prepare_report.json")
  )
  assert cli_main(["prepare", "amc", "--data_dir", str(tmp_path / "d")]) == 2
  bad = write_jsonl(tmp_path / "bad.jsonl", raw_lines=[b"nope"])
  assert cli_main(["prepare", "amc", "--src", bad, "--data_dir", str(tmp_path / "d")]) == 1
  assert "bad.jsonl: no usable row" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_cli_as_module(tmp_path):
  proc = helpers.run_cli(
    "srft_jax.data",
    "prepare",
    "task",
    "--data_dir",
    str(tmp_path),
    "--task_sizes",
    "train=6,test_id=3,test_ood=2",
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert "task/train: kept 6, skipped 0 (none)" in proc.stdout
  assert "task/test_ood: kept 2" in proc.stdout
  assert len(builders.load_source(tmp_path, "task", "test_id")) == 3


# ---------------------------------------------------------------------------
# Batching.


class CharTokenizer:
  """One token per character (id = code point), so expected arrays are written by hand."""

  pad_id, eos_id, bos_id = 0, 1, 2

  def encode(self, text, add_bos=False):
    return ([self.bos_id] if add_bos else []) + [ord(c) for c in text]


def ids_of(text):
  return [ord(c) for c in text]


def make(rows, **kw):
  process_index = kw.pop("process_index", 0)
  process_count = kw.pop("process_count", 1)
  cfg = pipeline.PipelineConfig(
    **{"global_batch": 2, "prompt_buckets": (4, 8), "max_response_len": 6, "shuffle": False, **kw}
  )
  return pipeline.make_iterator(
    rows,
    CharTokenizer(),
    cfg,
    process_index=process_index,
    process_count=process_count,
    render=lambda q: q,
  )


def row(i, prompt, target):
  return {"id": f"r{i}", "prompt": prompt, "target": target, "answer": str(i)}


def test_bucketing_and_padding_layout():
  rows = [
    row(0, "ab", "xyz"),
    row(1, "abcde", "uvwxy"),
    row(2, "abcdefghi", "x"),  # 9 > largest bucket: dropped
    row(3, "abc", "uvwxyz"),  # 6 + eos > 6: dropped
    row(4, "abc", "q"),
    row(5, "a", ""),
  ]
  it = make(rows, num_epochs=1)
  b = next(it)
  np.testing.assert_array_equal(
    b["prompt_tokens"], [[0, 0, 0, 0, 0, 0] + ids_of("ab"), [0, 0, 0] + ids_of("abcde")]
  )
  np.testing.assert_array_equal(b["prompt_mask"], [[0] * 6 + [1] * 2, [0] * 3 + [1] * 5])
  np.testing.assert_array_equal(
    b["demo_tokens"], [ids_of("xyz") + [1, 0, 0], ids_of("uvwxy") + [1]]
  )
  np.testing.assert_array_equal(b["demo_mask"], [[1, 1, 1, 1, 0, 0], [1] * 6])
  assert b["answers"] == ["0", "1"] and b["ids"] == ["r0", "r1"]
  for key in ("prompt_tokens", "prompt_mask", "demo_tokens", "demo_mask"):
    assert b[key].dtype == np.int32
  b = next(it)  # both prompts fit the 4-bucket: the smallest that fits is used
  np.testing.assert_array_equal(b["prompt_tokens"], [[0] + ids_of("abc"), [0, 0, 0, 97]])
  np.testing.assert_array_equal(
    b["demo_tokens"], [ids_of("q") + [1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(b["demo_mask"], [[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
  assert b["ids"] == ["r4", "r5"]
  with pytest.raises(StopIteration):
    next(it)
  stats = it.stats()
  assert stats["data/dropped_prompt_too_long"] == 1
  assert stats["data/dropped_demo_too_long"] == 1
  assert stats["data/batches"] == 2 and stats["data/epoch"] == 1.0

  # Truncation switch: the over-long demonstration is kept, cut to R (no eos).
  it = make(rows[2:4], num_epochs=1, global_batch=1, truncate_demos=True)
  b = next(it)
  assert b["ids"] == ["r3"]
  np.testing.assert_array_equal(b["demo_tokens"], [ids_of("uvwxyz")])
  # add_bos prepends BOS to prompts only.
  b = next(make(rows[:1], global_batch=1, add_bos=True))
  np.testing.assert_array_equal(b["prompt_tokens"], [[0, 2] + ids_of("ab")])


def random_rows(n, seed=0):
  rng = np.random.default_rng(seed)
  return [row(i, "p" * int(rng.integers(1, 9)), "t" * int(rng.integers(0, 6))) for i in range(n)]


def test_host_slices_are_disjoint_and_cover_the_global_batch():
  rows = random_rows(40)
  single = make(rows, global_batch=8, shuffle=True, seed=5)
  hosts = [
    make(rows, global_batch=8, shuffle=True, seed=5, process_index=h, process_count=4)
    for h in range(4)
  ]
  for _ in range(7):  # crosses an epoch boundary (40 rows / 8)
    g = next(single)
    parts = [next(h) for h in hosts]
    assert all(p["prompt_tokens"].shape[0] == 2 for p in parts)
    ids = [i for p in parts for i in p["ids"]]
    assert len(set(ids)) == 8 and ids == g["ids"]
    for key in ("prompt_tokens", "prompt_mask", "demo_tokens", "demo_mask"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), g[key])
  with pytest.raises(ValueError, match="not divisible"):
    make(rows, global_batch=6, process_count=4)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_state_restores_exactly(num_threads):
  rows = random_rows(10, seed=1) + [row(99, "p" * 12, "t")]  # one dropped row
  kw = dict(global_batch=4, shuffle=True, seed=3, num_threads=num_threads)
  it = make(rows, **kw)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
  expected = [next(it) for _ in range(4)]
  resumed = make(rows, **kw)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(4)]
  for e, g in zip(expected, got):
    assert e["ids"] == g["ids"]
    for key in ("prompt_tokens", "prompt_mask", "demo_tokens", "demo_mask"):
      np.testing.assert_array_equal(e[key], g[key])
  assert resumed.stats() == it.stats()
  assert it.stats()["data/dropped_prompt_too_long"] >= 1


def test_shuffle_is_deterministic_and_reshuffles_each_epoch():
  rows = random_rows(12, seed=2)
  ids = lambda it: [i for b in it for i in b["ids"]]  # noqa: E731
  a = ids(make(rows, global_batch=4, shuffle=True, seed=7, num_epochs=2))
  b = ids(make(rows, global_batch=4, shuffle=True, seed=7, num_epochs=2))
  c = ids(make(rows, global_batch=4, shuffle=True, seed=8, num_epochs=2))
  assert a == b and a != c
  assert len(a) == 24
  first, second = a[:12], a[12:]
  assert sorted(first) == sorted(second) == sorted(r["id"] for r in rows)
  assert first != second and first != [r["id"] for r in rows]


def test_pipeline_on_prepared_task_with_project_tokenizer(tmp_path):
  from srft_jax import tokenizer as tokenizer_lib
  from srft_jax.data import task

  builders.prepare("task", tmp_path, task_sizes={"train": 16, "test_id": 2, "test_ood": 2})
  source = builders.load_source(tmp_path, "task", "train")
  tok = task.get_task_tokenizer(tmp_path / "tok")
  cfg = pipeline.PipelineConfig(
    global_batch=8,
    prompt_buckets=(64, 128),
    max_response_len=96,
    template=task.PROMPT_TEMPLATE,
    seed=0,
  )
  it = pipeline.make_iterator(source, tok, cfg, process_index=1, process_count=2)
  by_id = {r["id"]: r for r in task.generate("train", 16, 0)}
  for _ in range(3):
    b = next(it)
    assert b["prompt_tokens"].shape[0] == 4 and b["prompt_tokens"].shape[1] in (64, 128)
    for i, rid in enumerate(b["ids"]):
      rec = by_id[rid]
      assert b["answers"][i] == rec["answer"]
      prompt = tok.decode(b["prompt_tokens"][i][b["prompt_mask"][i] == 1])
      assert prompt == tokenizer_lib.render_prompt(rec["prompt"], task.PROMPT_TEMPLATE)
      demo = b["demo_tokens"][i][b["demo_mask"][i] == 1]
      assert demo[-1] == tok.eos_id
      assert tok.decode(demo) == rec["target"]
      assert b["prompt_mask"][i][-1] == 1  # left padded: the prompt ends the row
