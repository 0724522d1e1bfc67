"""Mathematical equivalence of LaTeX answers (MATH-500, AIME)."""
from __future__ import annotations

import json

import pytest

from deepserve.evals.extract import extract_boxed
from deepserve.evals.math_equiv import latex_to_sympy, math_equal, normalize


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
