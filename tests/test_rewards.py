"""Rewards: extraction, the equivalence table, the </think> switch, timeouts that never stall."""

import concurrent.futures
import fractions
import logging
import time

import numpy as np
import pytest

from srft_jax import rewards

logging.getLogger("math_verify").setLevel(logging.ERROR)

TIMEOUT_S = 1.0
# A killed worker is replaced in ~0.2 s; the slack covers a loaded 2-core machine.
SLACK_S = 1.5


@pytest.fixture(scope="module")
def scorer():
  with rewards.RewardScorer(num_workers=2, timeout_s=5.0) as s:
    s.wait_ready()
    yield s


# (response, ground truth, require_think, expected outcome)
EQUIVALENCE_TABLE = [
  # integers and exact numbers (fast path)
  ("so \\boxed{42}.", "42", False, "correct"),
  ("\\boxed{41}", "42", False, "wrong"),
  ("\\boxed{5.0}", "5", False, "correct"),
  ("\\boxed{0.5}", "\\frac{1}{2}", False, "correct"),
  ("\\boxed{-\\frac{1}{2}}", "-0.5", False, "correct"),
  ("\\boxed{\\dfrac{3}{4}}", "\\frac34", False, "correct"),
  ("\\boxed{\\frac{10}{4}}", "\\frac{5}{2}", False, "correct"),
  ("\\boxed{\\frac{4}{10}}", "\\frac{5}{2}", False, "wrong"),
  ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", False, "correct"),
  # decimals vs fractions go through math-verify's rounding
  ("\\boxed{0.333333}", "\\frac{1}{3}", False, "correct"),
  ("\\boxed{0.3333}", "\\frac{1}{3}", False, "wrong"),
  ("\\boxed{1,000}", "1000", False, "correct"),
  # radicals and expressions (math-verify)
  ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", False, "correct"),
  ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", False, "correct"),
  ("\\boxed{3\\sqrt{2}}", "2\\sqrt{3}", False, "wrong"),
  ("\\boxed{x^2+1}", "1+x^2", False, "correct"),
  ("\\boxed{x^2-1}", "1+x^2", False, "wrong"),
  # intervals and sets
  ("\\boxed{[1, 2)}", "[1,2)", False, "correct"),
  ("\\boxed{(1, 2)}", "[1,2)", False, "wrong"),
  ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", False, "correct"),
  ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", False, "correct"),
  ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", False, "wrong"),
  # multiple-choice letters
  ("\\boxed{B}", "B", False, "correct"),
  ("\\boxed{\\text{(C)}}", "C", False, "correct"),
  ("\\boxed{(c)}", "B", False, "wrong"),
  ("\\boxed{\\text{(A) } 12}", "A", False, "correct"),
  ("Therefore the answer is (D).", "D", False, "correct"),
  ("Answer: A", "D", False, "wrong"),
  # the keyword's letter is a capital standing alone, not a word's last letter
  ("Comparing the options, the answer is (B). The other choices fail.", "B", False, "correct"),
  ("The answer is (B), since option a is too small.", "B", False, "correct"),
  ("Answer: B. Both answers C and D fail.", "B", False, "correct"),
  ("\\boxed{42}", "A", False, "unparseable"),
  # box structure
  ("\\boxed{\\boxed{7}}", "7", False, "correct"),
  ("\\fbox{7}", "7", False, "correct"),
  ("first \\boxed{3}, then \\boxed{4}", "3", False, "wrong"),
  ("\\boxed{\\frac{1}{2", "\\frac{1}{2}", False, "unparseable"),
  ("The answer is \\boxed 5", "5", False, "correct"),
  ("So $\\boxed 5$.", "5", False, "correct"),
  ("\\boxed{}", "1", False, "no_answer"),
  ("\\boxed{@#!}", "1", False, "unparseable"),
  ("The answer is 5.", "5", False, "no_answer"),
  # the </think> switch: only the text after </think> is graded when on
  ("<think>maybe \\boxed{5}</think> final: \\boxed{6}", "5", True, "wrong"),
  ("<think>maybe \\boxed{5}</think> final: \\boxed{6}", "6", True, "correct"),
  ("<think>maybe \\boxed{5}</think> I give up.", "5", True, "no_answer"),
  ("<think>maybe \\boxed{5}</think> I give up.", "5", False, "correct"),
  ("<think>no closing tag \\boxed{5}", "5", True, "no_answer"),
  ("<think>no closing tag \\boxed{5}", "5", False, "correct"),
  ("<think>a</think>b</think> \\boxed{5}", "5", True, "correct"),
]


@pytest.mark.parametrize("response,truth,require_think,expected", EQUIVALENCE_TABLE)
def test_equivalence_table_single(scorer, response, truth, require_think, expected):
  r, o = scorer.score([response], [truth], require_think=require_think)
  assert o == [expected]
  assert r.dtype == np.float32 and r.shape == (1,)
  assert r[0] == (1.0 if expected == "correct" else 0.0)


def test_equivalence_table_as_one_batch(scorer):
  # Same table as one batch: batching, dedup and the pool must not change answers.
  for think in (False, True):
    rows = [row for row in EQUIVALENCE_TABLE if row[2] == think]
    r, o = scorer.score([x[0] for x in rows], [x[1] for x in rows], require_think=think)
    assert o == [x[3] for x in rows]
    np.testing.assert_array_equal(r, [x[3] == "correct" for x in rows])


@pytest.mark.parametrize(
  "text,expected",
  [
    ("a \\boxed{1} b \\boxed{2}", ("2", True)),
    ("\\boxed{\\{1,2\\}}", ("\\{1,2\\}", True)),
    ("\\boxed{\\frac{1}{2}}", ("\\frac{1}{2}", True)),
    ("\\boxed{1} then \\boxed{2", ("1", True)),
    ("\\boxed{", (None, True)),
    ("nothing here {}", (None, False)),
    ("\\boxed{\\boxed{3}}", ("\\boxed{3}", True)),
    ("} stray \\boxed{4} }", ("4", True)),
    ("\\boxed {5}", ("5", True)),
    ("{ \\boxed{6}", ("6", True)),
    ("so \\boxed 7.", ("7", True)),
    ("$\\boxed 8$", ("8", True)),
    ("\\boxed{3} then \\boxed 4", ("4", True)),
    ("\\boxed 4 then \\boxed{3}", ("3", True)),
    ("\\boxed x^{2}", (None, True)),
    ("\\boxed \\frac12", (None, True)),
  ],
)
def test_find_last_boxed(text, expected):
  assert rewards.find_last_boxed(text) == expected


@pytest.mark.parametrize(
  "s,expected",
  [
    ("42", (fractions.Fraction(42), True)),
    ("-007", (fractions.Fraction(-7), True)),
    ("0.25", (fractions.Fraction(1, 4), False)),
    ("3.", (fractions.Fraction(3), False)),
    ("-3/6", (fractions.Fraction(-1, 2), True)),
    ("\\frac{6}{4}", (fractions.Fraction(3, 2), True)),
    ("-\\frac12", (fractions.Fraction(-1, 2), True)),
    ("\\frac{1}{0}", None),
    ("1/0", None),
    ("x", None),
    ("1e5", None),
    ("9" * 41, None),
  ],
)
def test_as_rational(s, expected):
  assert rewards.as_rational(s) == expected


def test_normalize_answer():
  assert rewards.normalize_answer(" $\\left( \\dfrac{1}{2},\\, 3 \\right)$. ") == "(\\frac{1}{2},3)"
  # \leftarrow is a different command, not \left
  assert rewards.normalize_answer("\\leftarrow") == "\\leftarrow"


@pytest.mark.parametrize(
  "answer,truth",
  [
    ("7", "7"),
    ("7", "8"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{3}", "\\frac{2}{3}"),
    ("(0,4)", "[0,4)"),
    ("[0, 4)", "[0,4)"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("\\{2,1,3\\}", "\\{1,2\\}"),
    ("(1,2)", "(2,1)"),
    ("[1,2]", "[1,2)"),
  ],
)
def test_fast_path_agrees_with_math_verify(answer, truth):
  decided = rewards.fast_judge(answer, truth)
  assert decided is not None
  assert decided == rewards.verify_answer(answer, truth)


@pytest.mark.parametrize(
  "answer,truth",
  [("\\sqrt{8}", "2\\sqrt{2}"), ("0.3333", "\\frac{1}{3}"), ("x+1", "1+x"), ("(1,2)", "\\{1,2\\}")],
)
def test_fast_path_defers_when_unsure(answer, truth):
  assert rewards.fast_judge(answer, truth) is None


ADVERSARIAL = {
  # sympy evaluates the power tower inside one C call: alarms cannot interrupt it
  "power_tower": "\\boxed{9^{9^{9^{9}}}}",
  "deep_nesting": "\\boxed{" + "\\sqrt{" * 2000 + "2" + "}" * 2000 + "}",
  "megabyte_box": "\\boxed{" + "1+" * 500_000 + "1}",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_answer_times_out_and_pool_survives(scorer, name):
  # Steady state: every worker and the spare are warm (a replacement warms in the
  # background while the spare takes over).
  scorer.wait_ready()
  normal = ["\\boxed{\\sqrt{18}}", "\\boxed{7}"]
  truths = ["3\\sqrt{2}", "7"]
  replaced = scorer.replaced_workers
  t0 = time.monotonic()
  r, o = scorer.score([ADVERSARIAL[name]] + normal, ["1"] + truths, timeout_s=TIMEOUT_S)
  elapsed = time.monotonic() - t0
  assert o == ["timeout", "correct", "correct"]
  np.testing.assert_array_equal(r, [0.0, 1.0, 1.0])
  assert elapsed < TIMEOUT_S + SLACK_S
  assert scorer.replaced_workers == replaced + 1
  # The replacement works: the pool still verifies through math-verify.
  r, o = scorer.score(["\\boxed{2\\sqrt{2}}", "\\boxed{\\sqrt{7}}"], ["\\sqrt{8}", "\\sqrt{8}"])
  assert o == ["correct", "wrong"]


def test_two_adversarial_answers_run_in_parallel(scorer):
  scorer.wait_ready()
  t0 = time.monotonic()
  _, o = scorer.score([ADVERSARIAL["power_tower"]] * 2, ["1", "2"], timeout_s=TIMEOUT_S)
  assert o == ["timeout", "timeout"]
  assert time.monotonic() - t0 < TIMEOUT_S + SLACK_S


def test_megabytes_of_text_outside_the_box_are_cheap(scorer):
  response = "<think>" + "blah " * 600_000 + "</think> so \\boxed{12}"
  t0 = time.monotonic()
  _, o = scorer.score([response, "{" * 200_000 + "\\boxed{3}"], ["12", "3"], require_think=True)
  assert o == ["correct", "no_answer"]  # the second has no </think>
  assert time.monotonic() - t0 < 2.0


def test_duplicates_are_verified_once(scorer):
  before = scorer.verifier_items
  r, o = scorer.score(["\\boxed{\\sqrt{18}}"] * 6 + ["\\boxed{\\sqrt{2}}"] * 2, ["3\\sqrt{2}"] * 8)
  assert o == ["correct"] * 6 + ["wrong"] * 2
  assert scorer.verifier_items - before == 2


def test_score_async_returns_future(scorer):
  future = scorer.score_async(["\\boxed{\\sqrt{4}}", "\\boxed{3}"], ["2", "4"])
  assert isinstance(future, concurrent.futures.Future)
  rewards_n, outcomes = future.result(timeout=30)
  assert outcomes == ["correct", "wrong"]
  np.testing.assert_array_equal(rewards_n, [1.0, 0.0])


def test_length_mismatch_raises(scorer):
  with pytest.raises(ValueError):
    scorer.score(["\\boxed{1}"], ["1", "2"])


def test_fork_start_method_is_refused():
  with pytest.raises(ValueError, match="forkserver"):
    rewards.RewardScorer(1, start_method="fork").start()


@pytest.mark.slow
def test_close_stops_every_worker():
  # (start_method="spawn" works the same way but costs ~10 s of sympy imports here.)
  s = rewards.RewardScorer(num_workers=1, num_spares=1)
  with s:
    _, o = s.score(["\\boxed{2\\sqrt{2}}"], ["\\sqrt{8}"])
    processes = [w.process for w in s._workers + s._spares]
  assert o == ["correct"]
  assert len(processes) == 2
  assert all(not p.is_alive() for p in processes)


def test_module_score_batch():
  r, o = rewards.score_batch(
    ["<think>x</think>\\boxed{1/2}", "\\boxed{1/2}", "</think>\\boxed{3}"],
    ["0.5", "0.5", "4"],
    require_think=True,
    timeout_s=5.0,
  )
  assert o == ["correct", "no_answer", "wrong"]
  assert r.tolist() == [1.0, 0.0, 0.0]


def test_outcome_counts():
  counts = rewards.outcome_counts(["correct", "wrong", "correct", "timeout", "no_answer"])
  assert counts == {"correct": 2, "wrong": 1, "unparseable": 0, "no_answer": 1, "timeout": 1}
  assert rewards.outcome_counts([]) == dict.fromkeys(rewards.OUTCOMES, 0)
  with pytest.raises(ValueError):
    rewards.outcome_counts(["right"])


def test_rewards_from_outcomes():
  r = rewards.rewards_from_outcomes(["correct", "timeout", "correct", "unparseable"])
  assert r.dtype == np.float32
  assert r.tolist() == [1.0, 0.0, 1.0, 0.0]
