"""Grading as the reference graders do: math answers PRM800K counts as equal or not (AIME's
zero-padded integers, matrices, sets, \\pm, "x \\in [a,b]", signed infinities, tiny values,
"10{,}000"), GSM8K numbers in LaTeX digit grouping, C-Eval's Chinese and full-width answers."""
import pytest

from deepserve.evals.extract import extract_choice, extract_math_answer, extract_number
from deepserve.evals.math_equiv import judge

EQUAL = [
    ("025", "25"),
    ("007", "7"),
    ("\\begin{pmatrix}-2\\\\-14\\\\-7\\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}"),
    ("\\begin{pmatrix} \\frac{1}{5} \\\\ -\\frac{18}{5} \\end{pmatrix}", "\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}"),
    ("\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"),
    ("10{,}000", "10000"),
    ("-\\infty", "-\\infty"),
    ("(-\\infty,2]", "(-\\infty, 2]"),
    ("[-2,7]", "x \\in [-2,7]"),
    ("\\{2,1\\}", "1, 2"),
    ("-2, 1-\\sqrt5, 1+\\sqrt{5}", "\\{1\\pm\\sqrt{5},-2\\}"),
    ("3, \\frac12", "0.5, 3"),
    ("\\frac{1}{3}", "0.333333333"),
    ("0.1+0.2", "0.3"),
]
DIFFERENT = [
    ("024", "25"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\end{pmatrix}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "12"),
    ("-\\infty", "\\infty"),
    ("(\\infty,2]", "(-\\infty, 2]"),
    ("x \\in (-2,7)", "x \\in [-2,7]"),
    ("1, 1, 2", "1, 2, 2"),
    ("\\{1,3\\}", "\\{1,2\\}"),
    ("10^{-7}", "0"),
    ("\\frac{1}{1000000}", "\\frac{1}{2000000}"),
]


@pytest.mark.parametrize("pred, gold, equal", [(p, g, True) for p, g in EQUAL] +
                         [(p, g, False) for p, g in DIFFERENT])
def test_judge(pred, gold, equal):
    assert judge(pred, gold).equal == equal


@pytest.mark.parametrize("reply, number", [
    ("Thus she earns $\\$1,\\!200$.", "1200"),
    ("so \\$1{,}200 in total", "1200"),
    ("It is 1\\,200 dollars", "1200"),
    ("The answer is $\\boxed{1{,}200}$", "1200"),
])
def test_gsm8k_latex_thousands(reply, number):
    """LaTeX digit grouping ("1,\\!200", "1{,}200", "1\\,200") is one number, not its last group."""
    assert extract_number(reply) == number


@pytest.mark.parametrize("reply, letter", [
    ("综上，答案：Ｂ", "B"),                      # full-width letters, as simple-evals normalises them
    ("故选Ｃ。", "C"),
    ("选项A错误，选项B错误，正确选项为（C）。", "C"),
    ("正确的选项是 D", "D"),
    ("正确选项是C", "C"),
])
def test_ceval_chinese_answers(reply, letter):
    assert extract_choice(reply, "ABCD") == letter


@pytest.mark.parametrize("reply, answer", [
    ("**Final Answer**\n$$\\frac{1}{2}$$", "\\frac{1}{2}"),   # a bold heading, the answer below it
    ("**Final Answer:** $x=3$", "x=3"),
    ("Final answer:\n\\[ \\frac{3}{4} \\]", "\\frac{3}{4}"),
    ("The final answer is \\(7\\).", "7"),
])
def test_math_final_answer_without_box(reply, answer):
    assert extract_math_answer(reply) == answer
