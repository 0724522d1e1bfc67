"""DeepSeek-R1 reasoning parser: the text up to `</think>` is the reasoning, the rest the answer.

R1's chat template ends the prompt with `<think>\\n`, so the output usually starts inside the
reasoning with no opening tag. As vLLM's deepseek_r1 parser, the output is taken to start in
its reasoning unless the prompt closed it (its last think tag is `</think>`: a prefill past
its reasoning, continued); a prompt with no think tag at all, as R1's templates end one after
tool results, leaves it open too. The parser is an incremental state machine fed with text
deltas, so streamed and non-streamed responses split the same way, and a tag cut across two
chunks (`</th` + `ink>`) is held back until it can be recognised, never leaked into either field:

    start      -> output opens with "<think>"          -> reasoning
               -> anything else                        -> content (no reasoning at all)
    reasoning  -> "</think>"                           -> content (leading whitespace dropped)

`start` is the state after a prompt that closed the reasoning; the others start in
`reasoning` (a `<think>` the output opens with all the same is dropped, as vLLM drops it),
and an output that never closes it (cut by max_tokens) is then all reasoning.

The parser's tags (or vLLM's --reasoning-config strings) also bound what a request's
thinking_token_budget counts (engine/thinking_budget.py, which settles them).
"""
from __future__ import annotations

from typing import Optional

from deepserve.engine.thinking_budget import PARSER_TAGS, THINK_END, THINK_START

PARSERS = tuple(PARSER_TAGS)


def check_parser_tokens(name: Optional[str], tokenizer, model: str) -> None:
    """The parser's tags must be tokens of the model's vocabulary, as vLLM's deepseek_r1 parser
    requires (it fails every request without them): a model whose tokenizer has no such token
    (one not trained to reason) would have each reply taken whole for reasoning, content null."""
    if name is None or tokenizer is None:
        return
    missing = [tag for tag in PARSER_TAGS[name] if tokenizer.convert_tokens_to_ids(tag) is None]
    if missing:
        raise ValueError(f"--reasoning-parser {name}: the tokenizer of {model} has no {' / '.join(missing)} token "
                         "to split the reasoning at (vLLM's parser refuses such a tokenizer too)")


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True unless the rendered prompt closed the reasoning (its last think tag is `</think>`,
    vLLM's is_reasoning_end): the template opened <think> (R1's generation prompt ends with
    it) or wrote no tag at all (R1's templates after tool results), or an assistant prefill
    continued with continue_final_message is part-way through its reasoning."""
    return prompt_text.rfind(THINK_START) >= prompt_text.rfind(THINK_END)


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class DeepSeekR1ReasoningParser:
    def __init__(self, prompt_opened: bool = True):
        self.state = "reasoning" if prompt_opened else "start"
        self.buf = ""
        self.reasoning_started = False   # drop the newline R1 puts right after <think>
        self.saw_reasoning = prompt_opened

    def feed(self, delta: str) -> tuple[str, str]:
        """Take the next text delta; return (reasoning delta, content delta)."""
        self.buf += delta
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(THINK_START):
                    self.state, self.buf, self.saw_reasoning = "reasoning", head[len(THINK_START):], True
                    continue
                if THINK_START.startswith(head):
                    return reasoning, content     # maybe the tag, still arriving
                self.state = "content"
                continue
            if self.state == "reasoning":
                if not self.reasoning_started:
                    self.buf = self.buf.lstrip("\n")
                    if self.buf.startswith(THINK_START):   # opened again after the prompt did
                        self.buf = self.buf[len(THINK_START):]
                        continue
                    if THINK_START.startswith(self.buf):    # nothing yet, or maybe that tag arriving
                        return reasoning, content
                    self.reasoning_started = True
                end = self.buf.find(THINK_END)
                if end >= 0:
                    reasoning += self.buf[:end]
                    self.state, self.buf = "after_think", self.buf[end + len(THINK_END):]
                    continue
                keep = _held_suffix(self.buf, THINK_END)
                reasoning += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return reasoning, content
            if self.state == "after_think":
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return reasoning, content
                self.state = "content"
                continue
            content += self.buf
            self.buf = ""
            return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Flush what was held back at the end of the output."""
        held, self.buf = self.buf, ""
        if self.state == "reasoning":
            return held, ""
        if self.state == "start":
            return "", held
        return "", ""

    def parse(self, text: str) -> tuple[Optional[str], Optional[str]]:
        """Split a whole output: (reasoning or None, content or None)."""
        r1, c1 = self.feed(text)
        r2, c2 = self.finish()
        reasoning, content = r1 + r2, c1 + c2
        return (reasoning if self.saw_reasoning else None), (content or None)


def make_parser(name: Optional[str], prompt_text: str) -> Optional[DeepSeekR1ReasoningParser]:
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from {', '.join(PARSERS)}")
    return DeepSeekR1ReasoningParser(prompt_opens_reasoning(prompt_text))
