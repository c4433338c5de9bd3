"""Answer extraction and math verification that never hangs (docs/method.md §1 step 2).

r = 1 when the final answer (the last balanced `\\boxed{...}`, taken from the text
after `</think>` when `require_think` is on) is judged equal to the ground truth,
else 0. Every response gets one outcome:

  correct      judged equal to the ground truth
  wrong        parsed, judged different
  unparseable  an answer was found but could not be read (unbalanced `\\boxed{`,
               a box the verifier cannot parse, a multiple-choice box with no letter)
  no_answer    nothing to grade (no box, empty box, or no `</think>` when required)
  timeout      the verifier did not finish within the limit (or its worker died)

Judging happens in two tiers so common answers never pay for IPC or sympy:
1. in-process fast path: identical normalised strings, exact integer / fraction /
   decimal comparison, and multiple-choice letters;
2. everything else goes to math-verify in a pool of worker processes, one item
   per worker at a time with a per-item deadline; an overrunning worker is killed
   and replaced. math-verify's own timeout uses `signal.alarm`, which neither
   works off the main thread nor interrupts a long C call (a huge integer power),
   so workers call it with its timeouts off and the parent enforces the limit.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import fractions
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import threading
import time
from collections.abc import Sequence

import numpy as np

OUTCOMES = ("correct", "wrong", "unparseable", "no_answer", "timeout")
DEFAULT_TIMEOUT_S = 3.0
THINK_END = "</think>"

# ---------------------------------------------------------------------------
# Extraction (pure, in-process, linear time even on megabytes of text)
# ---------------------------------------------------------------------------

# One pass over the tokens that matter for brace matching; everything else is
# skipped by the regex engine in C. `\\.` consumes escaped characters so `\{`
# and `\}` (literal braces in sets) never count as grouping braces.
_BRACE_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\.|[{}]", re.DOTALL)
_BOX_OPENER = re.compile(r"\\(?:boxed|fbox)")
# The brace-less form `\boxed 5` (verl accepts it too): one run of characters
# ending at whitespace, `$`, a closing brace or the end, without trailing
# sentence punctuation; a run holding a command or a brace (`\boxed x^{2}`)
# is not taken for an answer.
_BARE_BOX = re.compile(r"\\(?:boxed|fbox)\s+([^\s${}\\]+)(?=[\s$}]|\Z)")


def graded_text(response: str, require_think: bool) -> str | None:
  """The part of a response that is graded; None when `</think>` is required but missing.

  With the switch on only the text after the last `</think>` counts (the
  reference code's rule); with it off the whole response is graded.
  """
  if not require_think:
    return response
  cut = response.rfind(THINK_END)
  if cut < 0:
    return None
  return response[cut + len(THINK_END) :]


def find_last_boxed(text: str) -> tuple[str | None, bool]:
  """(content of the last closed `\\boxed{...}` / `\\fbox{...}`, whether any opener exists).

  "Last" is the box that closes last, so for `\\boxed{\\boxed{5}}` the outer one
  wins. A truncated final box falls back to the last complete one before it.
  A brace-less `\\boxed 5` counts when it comes after every closed braced box.
  """
  first = _BOX_OPENER.search(text)
  if first is None:
    return None, False
  stack: list[int] = []  # content start for box braces, -1 for plain braces
  best: tuple[int, int] | None = None
  for m in _BRACE_TOKENS.finditer(text, first.start()):
    token = m.group()
    if token == "{":
      stack.append(-1)
    elif token == "}":
      if not stack:
        continue  # a stray closing brace: ignore it
      start = stack.pop()
      if start >= 0:
        best = (start, m.start())  # closes later than any earlier box
    elif token.startswith(("\\boxed", "\\fbox")):
      stack.append(m.end())
    # any other `\x` escape is skipped
  bare = None
  for m in _BARE_BOX.finditer(text, first.start()):
    bare = m
  if bare is not None and (best is None or bare.start() > best[1]):
    content = bare.group(1).rstrip(".,;:!?")
    if content:
      return content, True
  if best is None:
    return None, True
  return text[best[0] : best[1]], True


# Formatting wrappers that carry no meaning for a multiple-choice letter.
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LETTER_ONLY = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_LETTER_LEADING = re.compile(r"\(?([A-Z])[).:]\s")
# Only the keyword ignores case: the letter must be a capital standing alone
# ("answers", "option a" and "choices" name no option).
_LETTER_AFTER_KEYWORD = re.compile(
  r"\b(?i:answer|option|choice)\b(?:\s+is)?\s*[:：]?\s*\**\s*\(?([A-Z])\)?(?![A-Za-z])"
)
# A keyword is never far from the end of a real answer; bounding the search keeps
# adversarial megabyte responses cheap.
_MC_SEARCH_TAIL = 2000


def _unwrap_text(s: str) -> str:
  s = _TEXT_WRAPPER.sub(r"\1", s)
  return s.replace("$", "").strip()


def mc_letter(ground_truth: str) -> str | None:
  """The letter when the ground truth is a multiple-choice letter ("B", "(B)", "\\text{B}")."""
  s = _unwrap_text(ground_truth)
  m = _LETTER_ONLY.fullmatch(s)
  if m is None or not m.group(1).isupper():
    return None
  return m.group(1)


def letter_in_box(content: str) -> str | None:
  """A multiple-choice letter read from box content ("B", "(b)", "\\text{(B) 42}")."""
  s = _unwrap_text(content)
  m = _LETTER_ONLY.fullmatch(s)
  if m is not None:
    return m.group(1).upper()
  m = _LETTER_LEADING.match(s + " ")
  return m.group(1) if m is not None else None


def letter_without_box(text: str) -> str | None:
  """Fallback for multiple choice without a box: "the answer is (C)" or a bare letter."""
  tail = text[-_MC_SEARCH_TAIL:]
  found = _LETTER_AFTER_KEYWORD.findall(tail)
  if found:
    return found[-1].upper()
  m = _LETTER_ONLY.fullmatch(_unwrap_text(tail).replace("*", ""))
  return m.group(1).upper() if m is not None else None


@dataclasses.dataclass(frozen=True)
class Extraction:
  """What a response offers for grading.

  `outcome` is set when extraction alone decides (no_answer / unparseable);
  otherwise `answer` holds the text to judge.
  """

  answer: str | None
  outcome: str | None


def extract_answer(response: str, ground_truth: str, require_think: bool = False) -> Extraction:
  text = graded_text(response, require_think)
  if text is None:
    return Extraction(None, "no_answer")
  content, has_opener = find_last_boxed(text)
  if content is None:
    if has_opener:
      return Extraction(None, "unparseable")  # e.g. cut off inside the box
    if mc_letter(ground_truth) is not None:
      letter = letter_without_box(text)
      if letter is not None:
        return Extraction(letter, None)
    return Extraction(None, "no_answer")
  if not content.strip():
    return Extraction(None, "no_answer")
  return Extraction(content, None)


# ---------------------------------------------------------------------------
# Fast path: decisions that are exact without sympy
# ---------------------------------------------------------------------------

_SPACING = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\displaystyle|\\[!,;: ]|~|\$|\s+")
_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?\d*\.\d+|[+-]?\d+\.")
_SLASH_FRACTION = re.compile(r"([+-]?)(\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)\\frac(?:\{([+-]?\d+)\}\{([+-]?\d+)\}|(\d)(\d))")
# Longer numerals go to the verifier: Python refuses int() on >4300 digits, and
# the fast path is meant for ordinary answers.
_MAX_NUMERAL_CHARS = 40


def normalize_answer(s: str) -> str:
  """Spacing-free canonical string: `\\dfrac`/`\\tfrac` -> `\\frac`, no `\\left`, `$`, `\\,`, trailing dot."""
  s = _SPACING.sub("", s)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  return s.rstrip(".")


def as_rational(s: str) -> tuple[fractions.Fraction, bool] | None:
  """(value, exact) for integers, decimals and simple fractions; exact is False for decimals.

  Decimals are marked inexact because math-verify compares them after rounding
  (1/3 equals 0.333333), so only equality is decided from them here.
  """
  if len(s) > _MAX_NUMERAL_CHARS:
    return None
  if _INTEGER.fullmatch(s):
    return fractions.Fraction(int(s)), True
  if _DECIMAL.fullmatch(s):
    return fractions.Fraction(s.rstrip(".")), False
  m = _SLASH_FRACTION.fullmatch(s)
  if m is not None:
    sign, num, den = m.group(1), int(m.group(2)), int(m.group(3))
  else:
    m = _LATEX_FRACTION.fullmatch(s)
    if m is None:
      return None
    sign = m.group(1)
    num = int(m.group(2) if m.group(2) is not None else m.group(4))
    den = int(m.group(3) if m.group(3) is not None else m.group(5))
  if den == 0:
    return None
  value = fractions.Fraction(num, den)
  return (-value if sign == "-" else value), True


_SET_BRACES = ("\\{", "\\}")
_INFINITY = {"\\infty": float("inf"), "+\\infty": float("inf"), "-\\infty": float("-inf")}


def _number(s: str) -> tuple[fractions.Fraction | float, bool] | None:
  if s in _INFINITY:
    return _INFINITY[s], True
  return as_rational(s)


def as_bracketed_numbers(s: str) -> tuple[str, list[tuple]] | None:
  """('set', elems) for `\\{..\\}`, ('(]' etc., elems) for bracketed tuples/intervals of numbers.

  Bare comma lists are left to the verifier: "1,000" may be a thousands separator.
  """
  if s.startswith(_SET_BRACES[0]) and s.endswith(_SET_BRACES[1]):
    kind, body = "set", s[2:-2]
  elif len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
    kind, body = s[0] + s[-1], s[1:-1]
  else:
    return None
  # Every element must be a plain number, so nested structures fall through.
  elems = [_number(part) for part in body.split(",")]
  if any(e is None for e in elems):
    return None
  return kind, elems


def _judge_bracketed(a, g) -> str | None:
  (kind_a, elems_a), (kind_g, elems_g) = a, g
  if (kind_a == "set") != (kind_g == "set"):
    return None  # set vs tuple: math-verify's strict mode decides
  exact = all(e[1] for e in elems_a + elems_g)
  values_a, values_g = [e[0] for e in elems_a], [e[0] for e in elems_g]
  if kind_a == "set":
    equal = set(values_a) == set(values_g)
  else:
    equal = kind_a == kind_g and values_a == values_g
  if equal:
    return "correct"
  return "wrong" if exact else None


def fast_judge(answer: str, ground_truth: str) -> str | None:
  """'correct' / 'wrong' / 'unparseable' when decidable in-process, else None (ask the verifier)."""
  gold_letter = mc_letter(ground_truth)
  if gold_letter is not None:
    letter = letter_in_box(answer)
    if letter is None:
      return "unparseable"
    return "correct" if letter == gold_letter else "wrong"
  a, g = normalize_answer(answer), normalize_answer(ground_truth)
  if a and a == g:
    return "correct"
  ra, rg = as_rational(a), as_rational(g)
  if ra is not None and rg is not None:
    if ra[0] == rg[0]:
      return "correct"
    if ra[1] and rg[1]:
      return "wrong"
    return None
  ba, bg = as_bracketed_numbers(a), as_bracketed_numbers(g)
  if ba is not None and bg is not None:
    return _judge_bracketed(ba, bg)
  return None


# ---------------------------------------------------------------------------
# Slow path: math-verify (runs inside worker processes)
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def _parse_boxed(expr: str):
  """math-verify parse of one answer; cached because a group repeats its ground truth."""
  from math_verify import ExprExtractionConfig  # noqa: PLC0415 (in the worker processes only)
  from math_verify import LatexExtractionConfig  # noqa: PLC0415 (in the worker processes only)
  from math_verify import parse  # noqa: PLC0415 (in the worker processes only)

  config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
  # Wrapping in \boxed makes the LaTeX extractor take the whole answer as one unit.
  return parse("\\boxed{" + expr + "}", extraction_config=config, parsing_timeout=None)


def verify_answer(answer: str, ground_truth: str) -> str:
  """math-verify judgement with its alarms off: 'correct' / 'wrong' / 'unparseable'.

  Unbounded in time: call it in a worker (RewardScorer) unless inputs are trusted.
  """
  from math_verify import verify  # noqa: PLC0415 (in the worker processes only)

  gold = _parse_boxed(ground_truth)
  pred = _parse_boxed(answer)
  if gold and pred and verify(gold, pred, timeout_seconds=None):
    return "correct"
  # math-verify falls back to the raw string when sympy cannot read an answer;
  # a prediction with no parsed expression that did not match is unreadable, not wrong.
  if not any(not isinstance(p, str) for p in pred):
    return "unparseable"
  return "wrong"


def judge(answer: str, ground_truth: str) -> str:
  """Fast path, then math-verify, in this process, with no time limit (reference / tests)."""
  return fast_judge(answer, ground_truth) or verify_answer(answer, ground_truth)


_READY = "ready"
_WARMUP_PAIRS = (
  ("\\frac{1}{2}", "0.5"),
  ("\\sqrt{8}", "2\\sqrt{2}"),
  ("3\\sqrt{2}", "2\\sqrt{2}"),
  ("x^2+1", "1+x^{2}"),
  ("2x+1", "x^2+1"),
  ("(0, 4)", "[0, 4)"),
  ("\\{1, 2\\}", "\\{2, 1\\}"),
  ("x=3", "3"),
  ("50\\%", "\\pi"),
  ("0.61", "0.11"),
  ("(1, 2)", "(2, 1)"),
)


def _worker_main(conn) -> None:
  """Worker loop: receive (index, answer, ground_truth), send (index, outcome)."""
  # Workers run math-verify without its alarms on purpose; its per-call warning
  # about that would only repeat in every worker.
  logging.getLogger("math_verify").setLevel(logging.ERROR)
  # sympy and math-verify import and initialise lazily per kind of expression
  # (the first interval or sqrt costs 0.1-0.5 s); pay that before the first deadline.
  for answer, truth in _WARMUP_PAIRS:
    verify_answer(answer, truth)
  _parse_boxed.cache_clear()
  conn.send(_READY)
  while True:
    try:
      job = conn.recv()
    except (EOFError, OSError):
      return
    if job is None:
      return
    index, answer, ground_truth = job
    try:
      outcome = verify_answer(answer, ground_truth)
    except RecursionError:
      outcome = "unparseable"  # deeply nested input beyond Python's stack
    except Exception:  # noqa: BLE001 - any verifier failure means "could not judge"
      outcome = "unparseable"
    conn.send((index, outcome))


# ---------------------------------------------------------------------------
# Worker pool
# ---------------------------------------------------------------------------


class _Worker:
  """One verifier process with its pipe, the job in flight and its deadline."""

  def __init__(self, ctx, startup_deadline: float):
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    self.process = ctx.Process(target=_worker_main, args=(child_conn,), daemon=True)
    self.process.start()
    child_conn.close()
    self.conn = parent_conn
    self.ready = False
    self.startup_deadline = startup_deadline
    self.job: tuple[int, str, str] | None = None
    self.deadline = float("inf")

  def kill(self) -> None:
    if self.process.is_alive():
      self.process.kill()
    self.process.join(timeout=5.0)
    self.conn.close()

  def stop(self) -> None:
    try:
      self.conn.send(None)
    except (OSError, ValueError):
      pass
    self.process.join(timeout=1.0)
    self.kill()


def _default_num_workers() -> int:
  return max(2, min(8, os.cpu_count() or 2))


_LAZY_SYMPY_MODULES = (
  "sympy.physics.units",
  "sympy.combinatorics",
  "sympy.tensor.tensor",
  "sympy.sets.setexpr",
  "sympy.assumptions.wrapper",
)


def _pool_context(start_method: str):
  if start_method not in ("forkserver", "spawn"):
    # The parent holds JAX/XLA threads: a plain fork can deadlock the child.
    raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
  ctx = multiprocessing.get_context(start_method)
  if start_method == "forkserver":
    # The fork server imports sympy/math-verify once; every worker (including a
    # replacement for a killed one) is then a cheap fork of that warm process.
    # The sympy submodules are the ones math-verify imports lazily on first use.
    ctx.set_forkserver_preload(["__main__", "math_verify", __name__, *_LAZY_SYMPY_MODULES])
  return ctx


class RewardScorer:
  """Scores responses against ground truths with a reusable pool of verifier workers.

  Start once, reuse for every batch, close at the end (or use as a context
  manager). `score_async` runs in a background thread so scoring can overlap
  device work; all pool access happens on that one thread.
  """

  def __init__(
    self,
    num_workers: int | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    require_think: bool = False,
    start_method: str = "forkserver",
    startup_timeout_s: float = 120.0,
    num_spares: int = 1,
  ):
    self.num_workers = num_workers or _default_num_workers()
    if self.num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
    self.timeout_s = timeout_s
    self.require_think = require_think
    self.start_method = start_method
    # Warm standby workers: a worker killed for overrunning is replaced at once
    # instead of after the ~0.5-2 s a fresh one needs to import and warm sympy.
    self.num_spares = num_spares
    self.startup_timeout_s = startup_timeout_s
    self._ctx = None
    self._workers: list[_Worker] = []
    self._spares: list[_Worker] = []
    self._executor: concurrent.futures.ThreadPoolExecutor | None = None
    self._lock = threading.Lock()
    self.replaced_workers = 0  # workers killed for overrunning or lost to a crash
    self.verifier_items = 0  # distinct (answer, truth) pairs sent to math-verify

  # -- lifecycle -----------------------------------------------------------
  def start(self) -> RewardScorer:
    with self._lock:
      if self._executor is None:
        self._ctx = _pool_context(self.start_method)
        self._executor = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix="reward-scorer"
        )
        self._executor.submit(self._spawn_all).result()
    return self

  def close(self) -> None:
    with self._lock:
      if self._executor is None:
        return
      try:
        self._executor.submit(self._stop_all).result()
      except RuntimeError:
        # At interpreter exit the executor refuses new work; nothing else
        # touches the pool by then, so stop the workers from here.
        self._stop_all()
      self._executor.shutdown(wait=True)
      self._executor = None

  def __enter__(self) -> RewardScorer:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  def wait_ready(self) -> None:
    """Block until every worker has imported math-verify (keeps startup out of timings)."""
    self.start()
    self._executor.submit(self._await_ready).result()

  # -- scoring -------------------------------------------------------------
  def score_async(
    self,
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    require_think: bool | None = None,
    timeout_s: float | None = None,
  ) -> concurrent.futures.Future:
    """Future of `(rewards float32 [N], outcomes list[str])`; see `score`."""
    if len(responses) != len(ground_truths):
      raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    self.start()
    require_think = self.require_think if require_think is None else require_think
    timeout_s = self.timeout_s if timeout_s is None else timeout_s
    return self._executor.submit(
      self._score, list(responses), list(ground_truths), require_think, timeout_s
    )

  def score(self, responses, ground_truths, *, require_think=None, timeout_s=None):
    """(rewards float32 [N], outcomes list[str]); each slow item is bounded by timeout_s."""
    return self.score_async(
      responses, ground_truths, require_think=require_think, timeout_s=timeout_s
    ).result()

  def _score(self, responses, ground_truths, require_think, timeout_s):
    outcomes: list[str | None] = [None] * len(responses)
    # Rollouts of one prompt often reach the same answer: verify each distinct
    # (answer, truth) pair once.
    pending: dict[tuple[str, str], list[int]] = {}
    for i, (response, truth) in enumerate(zip(responses, ground_truths)):
      extraction = extract_answer(response, truth, require_think)
      if extraction.outcome is not None:
        outcomes[i] = extraction.outcome
        continue
      decided = fast_judge(extraction.answer, truth)
      if decided is not None:
        outcomes[i] = decided
      else:
        pending.setdefault((extraction.answer, truth), []).append(i)
    keys = list(pending)
    self.verifier_items += len(keys)
    jobs = [(j, answer, truth) for j, (answer, truth) in enumerate(keys)]
    for j, outcome in self._run_jobs(jobs, timeout_s).items():
      for i in pending[keys[j]]:
        outcomes[i] = outcome
    return rewards_from_outcomes(outcomes), outcomes

  # -- pool internals (executor thread only) -------------------------------
  def _new_worker(self) -> _Worker:
    return _Worker(self._ctx, time.monotonic() + self.startup_timeout_s)

  def _spawn_all(self) -> None:
    self._workers = [self._new_worker() for _ in range(self.num_workers)]
    self._spares = [self._new_worker() for _ in range(self.num_spares)]

  def _stop_all(self) -> None:
    for w in self._workers + self._spares:
      w.stop()
    self._workers, self._spares = [], []

  def _replace(self, index: int) -> None:
    """Kill slot `index`; a warm spare takes over at once if there is one."""
    self._workers[index].kill()
    self.replaced_workers += 1
    fresh = self._new_worker()
    for s, spare in enumerate(self._spares):
      if spare.ready:
        self._workers[index], self._spares[s] = spare, fresh
        return
    self._workers[index] = fresh

  def _promote_spares(self) -> None:
    """Swap a ready spare into any slot whose worker is still warming up."""
    for k, w in enumerate(self._workers):
      if w.ready:
        continue
      for s, spare in enumerate(self._spares):
        if spare.ready:
          self._workers[k], self._spares[s] = spare, w
          break

  def _await_ready(self) -> None:
    self._run_jobs([], 0.0, until_ready=True)

  def _run_jobs(self, jobs, timeout_s: float, until_ready: bool = False) -> dict[int, str]:
    """Run (index, answer, truth) jobs on the pool; every job ends within its deadline."""
    results: dict[int, str] = {}
    queue = collections.deque(jobs)
    resent: set[int] = set()
    while (
      queue
      or any(w.job is not None for w in self._workers)
      or (until_ready and not all(w.ready for w in self._workers + self._spares))
    ):
      self._promote_spares()
      now = time.monotonic()
      for k, w in enumerate(self._workers):
        if queue and w.ready and w.job is None:
          job = queue.popleft()
          try:
            w.conn.send(job)
          except (OSError, ValueError):
            # The worker died while idle: the job never ran, retry it once.
            if job[0] in resent:
              results[job[0]] = "timeout"
            else:
              resent.add(job[0])
              queue.appendleft(job)
            self._replace(k)
            continue
          w.job, w.deadline = job, now + timeout_s
      waiting = [w for w in self._workers + self._spares if w.job is not None or not w.ready]
      if not waiting:
        continue
      nearest = min(w.deadline if w.ready else w.startup_deadline for w in waiting)
      if not (queue or until_ready) and all(w.job is None for w in self._workers):
        break  # only spares are warming: no reason to wait for them
      ready_conns = multiprocessing.connection.wait(
        [w.conn for w in waiting], timeout=max(0.0, nearest - time.monotonic())
      )
      for w in [w for w in waiting if w.conn in ready_conns]:
        try:
          message = w.conn.recv()
        except (EOFError, OSError):
          if not w.ready:
            # Startup failure (e.g. math-verify missing) is a setup error, not data.
            w.process.join(timeout=1.0)
            raise RuntimeError(
              f"a reward worker exited during startup (exit code "
              f"{w.process.exitcode}); scripts need an `if __name__ == '__main__':` guard"
            ) from None
          # Crashed on its job (e.g. out of memory): the verifier could not finish.
          results[w.job[0]] = "timeout"
          self._replace(self._workers.index(w))
          continue
        if message == _READY:
          w.ready = True
        else:
          index, outcome = message
          results[index] = outcome
          w.job, w.deadline = None, float("inf")
      now = time.monotonic()
      for k, w in enumerate(self._workers):
        if w.job is not None and now >= w.deadline:
          results[w.job[0]] = "timeout"
          self._replace(k)
      for w in self._workers + self._spares:
        if not w.ready and now >= w.startup_deadline:
          raise RuntimeError(f"a reward worker did not start within {self.startup_timeout_s} s")
    return results


def rewards_from_outcomes(outcomes: Sequence[str]) -> np.ndarray:
  """float32 [N]: 1 for 'correct', 0 otherwise."""
  return np.asarray([o == "correct" for o in outcomes], dtype=np.float32)


def outcome_counts(outcomes: Sequence[str]) -> dict[str, int]:
  """Count of each outcome, every outcome present (zeros included) for stable metric keys."""
  counts = {name: 0 for name in OUTCOMES}
  for o in outcomes:
    if o not in counts:
      raise ValueError(f"unknown outcome {o!r}")
    counts[o] += 1
  return counts


# ---------------------------------------------------------------------------
# Module-level convenience: one shared scorer, closed at exit
# ---------------------------------------------------------------------------

_default_scorer: RewardScorer | None = None
_default_lock = threading.Lock()


def default_scorer() -> RewardScorer:
  global _default_scorer
  with _default_lock:
    if _default_scorer is None:
      _default_scorer = RewardScorer().start()
      atexit.register(_default_scorer.close)
    return _default_scorer


def score_batch(
  responses: Sequence[str],
  ground_truths: Sequence[str],
  *,
  require_think: bool = False,
  timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[np.ndarray, list[str]]:
  """(rewards float32 [N], outcomes list[str]) using the shared worker pool."""
  return default_scorer().score(
    responses, ground_truths, require_think=require_think, timeout_s=timeout_s
  )
