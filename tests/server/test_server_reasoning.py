"""The DeepSeek-R1 reasoning parser on text streams: every way of cutting the output into
chunks must give the same split as parsing it whole."""
from __future__ import annotations

import itertools
import random

import pytest

from deepserve.server.reasoning import DeepSeekR1ReasoningParser, make_parser, prompt_opens_reasoning


def stream(text: str, cuts: list[int], prompt_opened: bool) -> tuple[str, str, bool]:
    parser = DeepSeekR1ReasoningParser(prompt_opened)
    reasoning, content = "", ""
    bounds = [0, *cuts, len(text)]
    for a, b in zip(bounds, bounds[1:]):
        r, c = parser.feed(text[a:b])
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c, parser.saw_reasoning


CASES = [
    # (output, prompt opened <think>, reasoning, content)
    ("Let me add.\n</think>\n\nThe answer is 4.", True, "Let me add.\n", "The answer is 4."),
    ("<think>\nLet me add.</think>4", False, "Let me add.", "4"),
    ("  <think>hmm</think>  ok", False, "hmm", "ok"),
    ("Just an answer.", False, None, "Just an answer."),
    ("Still thinking when cut off", True, "Still thinking when cut off", None),
    ("</think>direct", True, "", "direct"),
    ("a < b and c </thin k> d</think>x", True, "a < b and c </thin k> d", "x"),
    ("<thin", False, None, "<thin"),
    ("", True, "", None),
]


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_whole_output_split(text, opened, reasoning, content):
    assert DeepSeekR1ReasoningParser(opened).parse(text) == (reasoning, content)


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_every_two_cut_stream_matches(text, opened, reasoning, content):
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        r, c, saw = stream(text, [i, j], opened)
        assert r == (reasoning or ""), (i, j)
        assert c == (content or ""), (i, j)
        assert saw == (reasoning is not None)


def test_char_by_char_and_random_chunks_with_tags_split():
    text = "<think>\nstep 1</thi\nstep 2\n</think>\n\nfinal </think> stays"
    expected = ("step 1</thi\nstep 2\n", "final </think> stays")
    assert stream(text, list(range(1, len(text))), False)[:2] == expected
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        assert stream(text, cuts, False)[:2] == expected


def test_held_tag_prefix_is_not_leaked_early():
    parser = DeepSeekR1ReasoningParser(True)
    assert parser.feed("abc</th") == ("abc", "")   # "</th" may be the closing tag: held
    assert parser.feed("ink>the") == ("", "the")
    parser = DeepSeekR1ReasoningParser(True)
    assert parser.feed("x</th") == ("x", "")
    assert parser.feed("e end") == ("</the end", "")   # it was not the tag after all


def test_prompt_detection_and_factory():
    assert prompt_opens_reasoning("<｜Assistant｜><think>\n")
    assert prompt_opens_reasoning("<｜tool▁outputs▁end｜>")                      # no tag: vLLM's open reasoning
    assert prompt_opens_reasoning("<｜Assistant｜><think>\nLet me see")          # a prefill part-way through
    assert not prompt_opens_reasoning("<think>\nx</think>\n\nThe answer")
    assert make_parser(None, "x") is None
    assert make_parser("deepseek_r1", "...<think>\n").state == "reasoning"
    assert make_parser("deepseek_r1", "...").state == "reasoning"
    assert make_parser("deepseek_r1", "<think>x</think>The answer").state == "start"
    with pytest.raises(ValueError, match="'qwen3'"):
        make_parser("qwen3", "")


def test_parser_needs_the_think_tokens():
    """As vLLM's deepseek_r1 parser: a tokenizer without <think> / </think> tokens is refused (at
    start, naming the model), where every reply would have been taken whole for reasoning."""
    from conftest import R1_TOKENIZER

    from deepserve.config import DEMO_MODEL
    from deepserve.engine.tokenizer import load_tokenizer
    from deepserve.server.reasoning import check_parser_tokens

    with pytest.raises(ValueError, match=r"^--reasoning-parser deepseek_r1: the tokenizer of demo has no "
                                         r"<think> / </think> token to split the reasoning at"):
        check_parser_tokens("deepseek_r1", load_tokenizer(str(DEMO_MODEL)), "demo")
    if R1_TOKENIZER.is_dir():
        check_parser_tokens("deepseek_r1", load_tokenizer(str(R1_TOKENIZER)), "r1")
    check_parser_tokens(None, load_tokenizer(str(DEMO_MODEL)), "demo")   # no parser: nothing to check

