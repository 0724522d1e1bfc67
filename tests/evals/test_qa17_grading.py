"""Math answers the PRM800K grader counts as equal: AIME's zero-padded integers and matrices
written with other spacing (MATH-500 has column vectors and matrices as answers)."""
import pytest

from deepserve.evals.math_equiv import judge


@pytest.mark.parametrize("pred, gold", [
    ("025", "25"),
    ("007", "7"),
    ("\\begin{pmatrix}-2\\\\-14\\\\-7\\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}"),
    ("\\begin{pmatrix} \\frac{1}{5} \\\\ -\\frac{18}{5} \\end{pmatrix}", "\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}"),
    ("\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"),
])
def test_equal(pred, gold):
    assert judge(pred, gold).equal


@pytest.mark.parametrize("pred, gold", [
    ("024", "25"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\end{pmatrix}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "12"),
])
def test_not_equal(pred, gold):
    assert not judge(pred, gold).equal
