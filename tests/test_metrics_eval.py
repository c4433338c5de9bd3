"""Evaluation metrics on hand-made sampled outputs."""

import itertools
import math

import pytest

from srft_jax import metrics_eval as M


def test_avg_at_k_is_mean_of_per_problem_means():
  # problem 0: 3/4, problem 1: 0/4, problem 2: 4/4 -> (0.75 + 0 + 1) / 3
  correct = [[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
  assert M.avg_at_k(correct) == pytest.approx(1.75 / 3)


def test_pass_at_1_single_and_multiple_samples():
  assert M.pass_at_1([[1], [0], [1], [1]]) == pytest.approx(0.75)
  # With several samples pass@1 is the expected single-sample accuracy.
  assert M.pass_at_1([[1, 0], [0, 0], [1, 1]]) == pytest.approx((0.5 + 0 + 1) / 3)


@pytest.mark.parametrize(
  "n,c,k,expected",
  [
    (4, 0, 1, 0.0),
    (4, 4, 2, 1.0),
    (4, 1, 1, 0.25),
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 8, 1.0),  # n - c < k: every draw of 8 contains a correct one
    (6, 1, 3, 0.5),  # 1 - C(5,3)/C(6,3) = 1 - 10/20
  ],
)
def test_pass_at_k_estimate_table(n, c, k, expected):
  assert M.pass_at_k_estimate(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_enumeration():
  # The estimator equals the fraction of k-subsets of the samples with a correct one.
  samples = [1, 0, 0, 1, 0]
  for k in range(1, 6):
    subsets = list(itertools.combinations(samples, k))
    brute = sum(any(s) for s in subsets) / len(subsets)
    assert M.pass_at_k([samples], k) == pytest.approx(brute)


def test_pass_at_k_rejects_bad_arguments():
  with pytest.raises(ValueError):
    M.pass_at_k_estimate(3, 4, 1)
  with pytest.raises(ValueError):
    M.pass_at_k([[1, 0]], 3)
  with pytest.raises(ValueError):
    M.avg_at_k([])


def test_registry_defaults():
  assert M.BENCHMARKS["aime24"].metric == "avg@32"
  assert M.BENCHMARKS["amc"].metric == "avg@32"
  for name in ("math500", "minerva", "olympiadbench", "arc_c", "gpqa_diamond", "mmlu_pro"):
    assert M.BENCHMARKS[name].metric == "pass@1"
  assert {n for n, s in M.BENCHMARKS.items() if s.kind == "mc"} == {
    "arc_c",
    "gpqa_diamond",
    "mmlu_pro",
  }
  assert {n for n, s in M.BENCHMARKS.items() if s.group == "ood"} == {
    "arc_c",
    "gpqa_diamond",
    "mmlu_pro",
    "task_ood",
  }
  assert M.BENCHMARKS["task_id"].group == "id"


def test_benchmark_score_uses_first_k_samples_for_avg_at_k():
  # 2 problems x 33 samples: the 33rd sample must be ignored by avg@32.
  row_a = [1] * 16 + [0] * 16 + [1]
  row_b = [0] * 32 + [1]
  assert M.benchmark_score("aime24", [row_a, row_b]) == pytest.approx((0.5 + 0.0) / 2)
  with pytest.raises(ValueError):
    M.benchmark_score("amc", [[1] * 8])
  assert M.benchmark_score("math500", [[1], [0], [0], [0]]) == pytest.approx(0.25)


def test_shuffle_choices_keeps_the_right_answer_across_seeds():
  choices = ["Paris", "London", "Rome", "Berlin"]
  letters_seen = set()
  for seed in range(40):
    prompt, letter = M.shuffle_choices("Capital of France?", choices, 0, seed)
    lines = prompt.splitlines()
    assert lines[0] == "Capital of France?" and lines[1] == ""
    option_text = {l[1]: l[4:] for l in lines[2:]}
    assert list(option_text) == ["A", "B", "C", "D"]
    assert sorted(option_text.values()) == sorted(choices)
    assert option_text[letter] == "Paris"
    letters_seen.add(letter)
  # Shuffling really moves the answer around.
  assert len(letters_seen) == 4


def test_shuffle_choices_is_deterministic_in_the_seed():
  choices = [f"option {i}" for i in range(10)]
  a = M.shuffle_choices("Q", choices, 7, seed=123)
  assert a == M.shuffle_choices("Q", choices, 7, seed=123)
  assert any(M.shuffle_choices("Q", choices, 7, seed=s)[0] != a[0] for s in range(5))
  with pytest.raises(ValueError):
    M.shuffle_choices("Q", choices, 10, seed=0)


def test_group_averages():
  avg = M.group_averages({"math500": 0.5, "aime24": 0.1, "arc_c": 0.8})
  assert avg["id"] == pytest.approx(0.3)
  assert avg["ood"] == pytest.approx(0.8)
  assert M.group_averages({"task_id": 1.0}) == {"id": 1.0, "ood": None}


PAPER_SRFT = {
  "aime24": 0.353,
  "amc": 0.743,
  "math500": 0.898,
  "minerva": 0.397,
  "olympiadbench": 0.583,
  "arc_c": 0.853,
  "gpqa_diamond": 0.464,
  "mmlu_pro": 0.559,
}


def test_results_table_reproduces_paper_layout_and_averages():
  markdown, data = M.results_table({"SRFT": PAPER_SRFT})
  lines = markdown.strip().splitlines()
  assert lines[0] == (
    "| method | AIME24 | AMC | MATH500 | Minerva | Olympiad | ID | "
    "ARC-C | GPQA-D | MMLU-Pro | OOD |"
  )
  # docs/method.md §6 row for SRFT: ID 59.5, OOD 62.5
  assert (
    lines[2] == "| SRFT | 35.3 | 74.3 | 89.8 | 39.7 | 58.3 | 59.5 | 85.3 | 46.4 | 55.9 | 62.5 |"
  )
  assert data["columns"] == [
    "aime24",
    "amc",
    "math500",
    "minerva",
    "olympiadbench",
    "id_avg",
    "arc_c",
    "gpqa_diamond",
    "mmlu_pro",
    "ood_avg",
  ]
  assert data["rows"]["SRFT"]["id_avg"] == pytest.approx((35.3 + 74.3 + 89.8 + 39.7 + 58.3) / 5)
  assert data["metrics"]["aime24"] == "avg@32" and data["metrics"]["arc_c"] == "pass@1"


def test_results_table_missing_cell_blanks_the_group_average():
  markdown, data = M.results_table(
    {
      "a": {"task_id": 0.9, "task_ood": 0.4},
      "b": {"task_id": 0.5},
    }
  )
  assert data["columns"] == ["task_id", "id_avg", "task_ood", "ood_avg"]
  assert data["rows"]["b"]["task_ood"] is None and data["rows"]["b"]["ood_avg"] is None
  assert data["rows"]["a"]["ood_avg"] == pytest.approx(40.0)
  assert markdown.splitlines()[3] == "| b | 50.0 | 50.0 | – | – |"
  assert math.isclose(data["rows"]["a"]["id_avg"], 90.0)


def test_results_table_rejects_unknown_benchmark():
  with pytest.raises(KeyError):
    M.results_table({"a": {"gsm8k": 0.5}})


# ---------------------------------------------------------------------------
# evaluate.generate / score_completions: a prompt longer than the largest
# bucket is not asked and scores 0; it never stops the benchmark.
# ---------------------------------------------------------------------------


class _CharTokenizer:
  """One token a character (ids 2..63), EOS 1, pad 0: a real encode/decode pair."""

  vocab_size, bos_id, eos_id, pad_id, stop_ids = 64, None, 1, 0, (1,)

  def encode(self, text, add_bos=False, add_eos=False):
    return [2 + ord(c) % 62 for c in text]

  def batch_encode(self, texts, max_len, left_pad=True):
    import numpy as np

    tok = np.zeros((len(texts), max_len), np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, t in enumerate(texts):
      ids = self.encode(t)
      tok[i, max_len - len(ids) :], mask[i, max_len - len(ids) :] = ids, 1
    return tok, mask

  def batch_decode(self, tokens, mask):
    return [
      "".join(chr(48 + t % 62) for t, m in zip(row, ms) if m) for row, ms in zip(tokens, mask)
    ]


@pytest.mark.slow
def test_long_prompt_is_skipped_and_scored_zero():
  import jax
  import numpy as np
  from flax import nnx

  from srft_jax import evaluate
  from srft_jax import model as model_lib
  from srft_jax import rewards
  from srft_jax import sampler as smp

  model = model_lib.Transformer(
    model_lib.ModelConfig(
      vocab_size=64,
      embed_dim=32,
      mlp_dim=64,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=16,
      max_seq_len=128,
    ),
    rngs=nnx.Rngs(0),
  )
  cfg = smp.SamplingConfig(
    max_new_tokens=4, temperature=1.0, eos_ids=(), prompt_buckets=(16, 32), n=2
  )
  tok, rng = _CharTokenizer(), jax.random.key(0)
  questions = ["1+1=", "x" * 40, "2+2="]
  out = evaluate.generate(model, tok, questions, cfg, rng=rng, batch_size=4)
  assert out[1] is None and [len(c) for c in (out[0], out[2])] == [2, 2]
  # The asked prompts get exactly what they get without the long one beside them.
  alone = evaluate.generate(model, tok, [questions[0], questions[2]], cfg, rng=rng, batch_size=4)
  assert [out[0], out[2]] == alone

  with rewards.RewardScorer(num_workers=1) as scorer:
    correct, counts = evaluate.score_completions(
      [["\\boxed{2}", "\\boxed{3}"], None, ["\\boxed{4}", "\\boxed{4}"]],
      ["2", "7", "4"],
      2,
      scorer,
      require_think=False,
    )
  np.testing.assert_array_equal(correct, [[1, 0], [0, 0], [1, 1]])
  assert counts == {"correct": 3, "wrong": 1, "prompt_too_long": 2}
