"""Mathematical equivalence of LaTeX answers (MATH-500, AIME)."""
from __future__ import annotations

import json

import pytest

from deepserve.evals.extract import extract_boxed
from deepserve.evals.latex_sympy import latex_to_sympy
from deepserve.evals.math_equiv import SympyWorker, Verdict, judge, math_equal, normalize


@pytest.mark.parametrize("pred,gold", [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac12", "\\frac{1}{2}"),
    ("\\tfrac{3}{4}", ".75"),
    ("10\\text{ cm}", "10"),
    ("5 \\text{ cm}^2", "5"),
    ("18 dollars", "18"),
    ("\\$18.00", "18"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("50\\%", "50"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("\\sqrt[3]{8}", "2"),
    ("\\frac{9}{4}\\pi", "\\frac{9\\pi}{4}"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("x = 5", "5"),
    ("k = \\frac{1}{2}", "0.5"),
    ("1,000", "1000"),
    ("10^{5}", "100000"),
    ("2x+4", "2(x+2)"),
    ("-2, 1", "1, -2"),
    ("\\text{Evelyn}", "\\text{Evelyn}"),
    ("[-2, 7)", "[-2,7)"),
    ("y = 2x + 3", "y=2x+3"),
])
def test_equivalent(pred, gold):
    assert math_equal(pred, gold), (normalize(pred), normalize(gold))


@pytest.mark.parametrize("pred,gold", [
    ("3", "4"),
    ("0.333", "\\frac{1}{3}"),          # a rounded decimal is not the exact value
    ("(1,2]", "(1,2)"),                 # interval ends matter
    ("(1,2)", "(2,1)"),                 # so does tuple order
    ("\\frac{1}{2}", "2"),
    ("x^2", "x^3"),
    ("", "0"),
    (None, "0"),
    ("\\text{Alice}", "\\text{Bob}"),
])
def test_not_equivalent(pred, gold):
    assert not math_equal(pred, gold)


def test_latex_to_sympy_values():
    import sympy
    assert latex_to_sympy("\\frac{1+\\sqrt{5}}{2}") == (1 + sympy.sqrt(5)) / 2
    assert latex_to_sympy("3\\cdot 4") == 12
    assert latex_to_sympy("\\frac{1}{") is None       # malformed: None, not an exception
    assert latex_to_sympy("x" * 400) is None          # too long to hand to sympy


def test_math500_reference_solutions_match_their_answers(datasets_dir):
    """Every MATH-500 solution's own boxed answer is judged equal to the listed answer,
    and shifting the answers by one item finds (almost) no false matches."""
    rows = [json.loads(line) for line in open(datasets_dir / "math500" / "test.jsonl")]
    assert len(rows) == 500
    mismatches = [r["unique_id"] for r in rows
                  if not math_equal(extract_boxed(r["solution"]), r["answer"])]
    assert mismatches == []
    false_hits = [(a["answer"], b["answer"]) for a, b in zip(rows[:100], rows[1:101])
                  if math_equal(a["answer"], b["answer"])]
    # Two neighbours really are equal answers ("7" and "7" style); nothing else may match.
    assert all(normalize(a) == normalize(b) for a, b in false_hits), false_hits


SLOW = "(10^{7})!"   # sympy computes the 65-million-digit integer exactly: minutes of CPU


def test_a_slow_answer_times_out_and_is_reported():
    verdict = judge(SLOW, "1", timeout=0.5)
    assert verdict == Verdict(equal=False, timed_out=True)
    # the worker was replaced: the next answer is checked as usual, in time
    assert judge("2\\sqrt{2}", "\\sqrt{8}", timeout=0.5) == Verdict(equal=True, timed_out=False)
    assert judge("3", "4", timeout=0.5) == Verdict(equal=False, timed_out=False)
    # a tuple with one slow element: wrong and timed out
    assert judge(f"({SLOW}, 2)", "(1, 2)", timeout=0.5).timed_out
    with pytest.raises(ValueError, match="math timeout must be > 0"):
        SympyWorker(0)


def test_score_task_counts_timeouts(datasets_dir):
    from deepserve.evals.datasets import Item
    from deepserve.evals.runner import Job, score_task
    from deepserve.evals.tasks import TASKS

    task = TASKS["math500"]
    items = [Item(id="a", question="q", gold="1"), Item(id="b", question="q", gold="\\frac{1}{2}")]
    replies = {"a0": f"\\boxed{{{SLOW}}}", "a1": "\\boxed{1}", "b0": "\\boxed{0.5}", "b1": "\\boxed{2}"}
    jobs = [Job(task, item, s, "p", key=f"{item.id}{s}") for item in items for s in (0, 1)]
    cache = {k: {"content": v, "finish_reason": "stop"} for k, v in replies.items()}
    result = score_task(task, items, jobs, cache, math_timeout=0.5)
    assert result["n_timeouts"] == 1 and result["items"]["a"]["timeouts"] == [0]
    assert result["items"]["a"]["scores"] == [0.0, 1.0] and result["items"]["b"]["scores"] == [1.0, 0.0]
    assert "timeouts" not in result["items"]["b"] and result["score"] == 50.0
