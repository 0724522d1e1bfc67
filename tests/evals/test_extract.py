"""Answer extraction and scoring on replies shaped like real DeepSeek-R1 output."""
from __future__ import annotations

import pytest

from deepserve.evals.datasets import Item
from deepserve.evals.extract import (all_boxed, answer_text, clean_number, extract_boxed,
                                     extract_choice, extract_math_answer, extract_number)
from deepserve.evals.tasks import TASKS

LONG_THINK = (
    "<think>\nOkay, so I need to find the area. Let me recall the formula... "
    + "Hmm, let me double-check that computation. " * 200
    + "Wait, earlier I wrote \\boxed{12} but I forgot the factor of 1/2. "
    "So (A) is out. The answer should be 6.\n</think>\n\n")


def test_answer_text_after_think_and_split_reasoning():
    reply = LONG_THINK + "The area is $\\boxed{6}$."
    assert answer_text(reply) == "The area is $\\boxed{6}$."
    # Distill chat templates open <think> in the prompt, so the reply starts mid-thought.
    assert answer_text("so it is 6.\n</think>\n\n**Final** \\boxed{6}") == "**Final** \\boxed{6}"
    # Server split reasoning: content is the answer as is.
    assert answer_text("\n\nAnswer: C", reasoning_content="... (B)? no ...") == "Answer: C"
    # Cut at max tokens inside the thinking: no answer at all.
    assert answer_text("<think>\nlet me think about \\boxed{3} ...") == ""
    # No thinking markup at all (a non-reasoning model): the whole text.
    assert answer_text("  Answer: B ") == "Answer: B"
    assert answer_text(None) == ""


def test_boxed_nested_braces_and_last_wins():
    text = ("First \\boxed{\\frac{1}{2}}, then corrected: \\boxed{\\dfrac{\\sqrt{3}}{2}} and "
            "finally $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.")
    assert all_boxed(text) == ["\\frac{1}{2}", "\\dfrac{\\sqrt{3}}{2}",
                               "\\left( 3, \\frac{\\pi}{2} \\right)"]
    assert extract_boxed(text) == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_boxed("so \\boxed 5.") == "5"
    assert extract_boxed("\\fbox{x^{2}}") == "x^{2}"
    assert extract_boxed("the set \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_boxed("no box here") is None
    assert extract_math_answer("Thus the final answer is $\\frac{3}{4}$.") == "\\frac{3}{4}"


@pytest.mark.parametrize("text,expected", [
    ("She makes $18 every day.\n\n\\boxed{18}", "18"),
    ("The total is \\boxed{\\$1,234.50}.", "1234.50"),
    ("So the answer is 1,000,000.", "1000000"),
    ("#### 72", "72"),
    ("He has 5 apples, then 3 more, so 8 apples.", "8"),
    ("The answer is: -4.", "-4"),
    ("The final answer is \\boxed{42\\text{ dollars}}", "42"),
    ("nothing numeric", None),
])
def test_gsm8k_number(text, expected):
    assert extract_number(text) == expected


def test_clean_number_separators():
    assert clean_number("$1,234.") == "1234"
    assert clean_number("3, 4") == "3"           # a list, not a thousands separator
    assert clean_number("\\text{about }12") == "12"


@pytest.mark.parametrize("text,expected", [
    ("The answer is (B).", "B"),
    ("**Answer: C**", "C"),
    ("Answer: **D**", "D"),
    ("\\boxed{D}", "D"),
    ("$\\boxed{\\text{(A)}}$", "A"),
    ("Final answer: option B) 4", "B"),
    ("Therefore the correct choice is C, since A and B fail.\n\nAnswer: C", "C"),
    ("A quick check shows that the best fit is B.", "B"),      # article "A" is not an answer
    ("I think the answer must be D", "D"),                    # pronoun "I" neither
    ("A careful reading rules out everything but (C).", "C"),
    ("Among the options, D.", "D"),
    ("B", "B"),
    ("答案：C", "C"),
    ("因此正确答案是B。", "B"),
    ("综上，选D。", "D"),
    ("A is a plausible distractor but not right.", None),      # prose only, no answer
    ("Answer: B. Option A fails the second condition.", "B"),  # "Answer:" beats "Option A"
    ("The answer is a bit subtle; the correct option is (D).", "D"),
    ("The answer is not A; it must be C.", "C"),
])
def test_choice_letters(text, expected):
    assert extract_choice(text, "ABCD") == expected


def test_choice_ten_options_and_out_of_range():
    assert extract_choice("The answer is (J).", "ABCDEFGHIJ") == "J"
    assert extract_choice("Answer: I", "ABCDEFGHIJ") == "I"
    # E is not an option of a 4-choice question: falls through to nothing valid.
    assert extract_choice("Answer: E", "ABCD") is None


def _item(gold: str, choices=()) -> Item:
    return Item(id="x", question="q", gold=gold, choices=tuple(choices))


def test_task_scoring_on_full_r1_replies():
    math500, gsm8k, gpqa = TASKS["math500"], TASKS["gsm8k"], TASKS["gpqa_diamond"]
    reply = answer_text(LONG_THINK + "So the area is $\\boxed{\\dfrac{12}{2}\\text{ cm}^2}$.")
    assert math500.score(_item("6"), reply)[:2] == (1.0, "\\dfrac{12}{2}\\text{ cm}^2")
    assert math500.score(_item("7"), reply)[0] == 0.0
    # \frac vs decimal, and several boxed answers (the last is the answer).
    reply = answer_text("x = 1/2 ...</think>\nWe found \\boxed{2} earlier; correcting, "
                        "\\boxed{0.5}.")
    assert math500.score(_item("\\frac{1}{2}"), reply)[:2] == (1.0, "0.5")
    assert gsm8k.score(_item("1234"), "So she pays \\$1,234.\n\n\\boxed{1,234}")[:2] == (1.0, "1234")
    assert gsm8k.score(_item("18"), "The answer is 18.")[:2] == (1.0, "18")
    assert gsm8k.score(_item("18"), "I could not decide.")[:2] == (0.0, None)
    choices = ["x", "y", "z", "w"]
    reply = answer_text(LONG_THINK + "A careful look at (B) shows it fails.\n\nAnswer: C")
    assert gpqa.score(_item("C", choices), reply)[:2] == (1.0, "C")
    assert gpqa.score(_item("B", choices), reply)[:2] == (0.0, "C")
