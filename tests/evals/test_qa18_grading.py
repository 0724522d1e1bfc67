"""Grading as simple-evals and PRM800K do it: the first "Answer: X" of a multiple-choice reply,
and an integer answer that only an exactly equal value matches."""
import pytest

from deepserve.evals.extract import extract_choice
from deepserve.evals.math_equiv import judge


@pytest.mark.parametrize("reply, letter", [
    ("Answer: B\n\nDouble-checking the alternatives: Answer: C would need x < 0.", "B"),
    ("The answer is (A). Some would say the answer is D, but that misreads the question.", "A"),
    ("答案：B。若答案：C，则矛盾。", "B"),
    ("The correct option is B... no, the correct option is C.", "C"),   # other cues: the last
])
def test_choice_takes_the_first_answer_statement(reply, letter):
    assert extract_choice(reply, "ABCD") == letter


@pytest.mark.parametrize("pred, gold, equal", [
    ("1000000", "1000000.5", False),
    ("1000000.5", "1000000", False),
    ("1000000.0000001", "1000000", False),
    ("1000000.0", "1000000", True),
    ("10^6", "1000000", True),
    ("\\frac{8}{2}", "4", True),
    ("\\sqrt{16}", "4", True),
    ("0.3333333", "\\frac{1}{3}", True),   # non-integers keep the relative tolerance
])
def test_an_integer_matches_only_its_exact_value(pred, gold, equal):
    assert judge(pred, gold).equal == equal
