"""Grading cases of MATH-500's own golds: letters glued to a number are a product, not a unit."""
import pytest

from deepserve.evals.math_equiv import judge


@pytest.mark.parametrize("pred, gold, equal", [
    ("5r^4", "5r^5", False),      # MATH-500 golds "5r^5", "3R^2", "2k"
    ("5", "5r^5", False),
    ("3", "3R^2", False),
    ("2", "2k", False),
    ("2m", "2k", False),
    ("6", "6i", False),
    ("5", "5m", False),
    ("5r^5", "5r^5", True),
    ("3R^2", "3R^2", True),
    ("10 cm", "10", True),        # units still go
    ("10cm", "10", True),
    ("6cm^2", "6", True),
    ("5 inches", "5", True),
    ("18 dollars", "18", True),
    ("6 sq ft", "6", True),
    ("2.5 hours", "2.5", True),
])
def test_letters_glued_to_a_number_are_not_units(pred, gold, equal):
    assert judge(pred, gold).equal == equal
