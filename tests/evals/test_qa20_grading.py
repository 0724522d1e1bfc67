"""Grading cases: letters glued to a number (MATH-500's golds "2k", "5r^5") are a product, not
a unit; "answer choice A" in a multiple-choice reply names an option, it does not choose it;
Minerva's "The final answer is $X$. I hope it is correct." gives X; a GSM8K box holding a
worked equation gives its result; MATH-500's mixed numbers ("1\\frac{4}{5}") are sums and its
text answers ("\\text{east}") match in any case, and roots written "x = 1 \\text{ or } x = -2"
are the list "1, -2", as PRM800K's grader has them; C-Eval replies that call an option right
("选项B正确", "答案应该是B", "因此B是对的") choose it; an empty \\boxed{} quoted from the
prompt is no answer."""
import pytest

from deepserve.evals.extract import extract_choice, extract_math_answer, extract_number
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


@pytest.mark.parametrize("reply, letter", [
    ("The answer choice A is tempting, but the answer is C.", "C"),
    ("Answer choice A is incorrect; so is B.\n\nAnswer: C", "C"),
    ("Answer option B fails the units check. Answer: D", "D"),
    ("The correct answer choice is C.", "C"),
    ("Answer: Option C", "C"),
    ("The answer is option (C).", "C"),
    ("Answer\nC", "C"),
])
def test_answer_choice_names_an_option(reply, letter):
    assert extract_choice(reply, "ABCD") == letter


@pytest.mark.parametrize("reply, answer", [
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("The final answer is $5$, as the table shows.", "5"),
    ("The answer is $3$... no. The final answer is $4$.", "4"),
    ("The final answer is \\(7\\).", "7"),
])
def test_math_answer_set_in_dollars_mid_line(reply, answer):
    assert extract_math_answer(reply) == answer


@pytest.mark.parametrize("reply, number", [
    ("So she earns \\boxed{3 \\times 6 = 18} dollars.", "18"),
    ("\\boxed{20 - 2 = \\$18}", "18"),
    ("\\boxed{x = 18}", "18"),
    ("The answer is 18 (check: 2 + 2 = 4).", "18"),
])
def test_gsm8k_boxed_equation_gives_its_result(reply, number):
    assert extract_number(reply) == number


@pytest.mark.parametrize("pred, gold, equal", [
    ("\\frac{9}{5}", "1\\frac{4}{5}", True),     # MATH-500 golds, "Express your answer as a mixed number"
    ("1.8", "1\\frac{4}{5}", True),
    ("\\frac{4}{5}", "1\\frac{4}{5}", False),    # sympy's product 1 * 4/5
    ("\\frac{275}{2}", "137 \\frac{1}{2}", True),
    ("137\\frac12", "137 \\frac{1}{2}", True),
    ("-\\frac{3}{2}", "-1\\frac{1}{2}", True),
    ("2\\frac{\\sqrt{3}}{3}", "\\frac{2\\sqrt{3}}{3}", True),   # not a mixed number: a product
    ("\\text{East}", "\\text{east}", True),
    ("Ellipse", "\\text{ellipse}", True),
    ("\\text{odd}", "\\text{even}", False),
    ("3r^2", "3R^2", False),                      # case still matters in an expression
])
def test_mixed_numbers_and_text_answers(pred, gold, equal):
    assert judge(pred, gold).equal == equal


@pytest.mark.parametrize("pred, gold, equal", [
    ("1 \\text{ or } -2", "1,-2", True),
    ("x = 1 \\text{ or } x = -2", "1,-2", True),
    ("x=1, x=-2", "1,-2", True),
    ("x_1 = -2, x_2 = 1", "1,-2", True),
    ("1 \\text{ and } -2", "1,-2", True),
    ("x=1, y=-2", "-2,1", False),                 # two variables: a point, not a list of roots
    ("1 \\text{ or } 3", "1,-2", False),
])
def test_roots_joined_by_or(pred, gold, equal):
    assert judge(pred, gold).equal == equal


@pytest.mark.parametrize("reply, letter", [
    ("选项B正确。", "B"),
    ("B选项正确", "B"),
    ("分析：A错误，C错误，D错误，故B正确。", "B"),
    ("选项A不正确，选项B正确", "B"),
    ("答案应该是B", "B"),
    ("因此，B是正确的。", "B"),
    ("A项是错误的，因此B对", "B"),         # a bare letter beside Chinese characters
])
def test_ceval_option_called_right(reply, letter):
    assert extract_choice(reply, "ABCD") == letter


@pytest.mark.parametrize("reply, answer", [
    ("So the answer is \\boxed{42}. (I put the final answer within \\boxed{} as asked.)", "42"),
    ("\\boxed{ }", None),
])
def test_an_empty_box_is_not_the_answer(reply, answer):
    assert extract_math_answer(reply) == answer
    assert extract_number(reply) == answer
