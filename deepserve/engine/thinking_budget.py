"""thinking_token_budget (vLLM's): after N reasoning tokens the end of reasoning is forced.

Reasoning tokens are those after the last reasoning-start sequence (`<think>`) with no end
sequence (`</think>`) after it, the prompt's included: R1's chat template ends the prompt with
`<think>\\n`, so its newline is the first of them, and with budget N the model writes N - 1
before the end. Once a section holds N tokens, the end sequence's tokens are forced one step
each; then sampling is free again, and a later start opens a new section with a new budget.
Same counting as vLLM 0.26's ThinkingBudgetStateHolder (v1/sample/thinking_budget_state.py).

Where reasoning starts and ends comes from a reasoning parser's tags or vLLM's reasoning_config
strings (`reasoning_delimiters`), as token ids in SamplingParams.reasoning_token_ids. Each
budgeted sequence keeps a small host-side state that reads its new tokens once; rows
without a budget cost nothing. The sampler's force_reasoning_ends puts the forced tokens in the
logits; this module stays torch-free, as the API server's parser reads its tags.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from deepserve.engine.sequence import Sequence

THINK_START, THINK_END = "<think>", "</think>"
# each reasoning parser's tags (server/reasoning.py splits the text at the same ones)
PARSER_TAGS = {"deepseek_r1": (THINK_START, THINK_END)}
# vLLM's --reasoning-config keys (its ReasoningConfig)
REASONING_CONFIG_KEYS = ("reasoning_parser", "reasoning_start_str", "reasoning_end_str")


def reasoning_delimiters(parser: Optional[str], config: Optional[dict]) -> Optional[tuple[str, str]]:
    """(start, end) strings of the reasoning a request's thinking_token_budget counts, as vLLM's
    ReasoningConfig settles them: --reasoning-config's strings, else the reasoning parser's
    (--reasoning-parser, which wins over the config's reasoning_parser); None without either.
    ValueError naming the flag for a config vLLM would not take."""
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"--reasoning-config must be a JSON object, got {config!r}")
    config = config or {}
    unknown = sorted(set(config) - set(REASONING_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"--reasoning-config: unknown key(s) {unknown}; its keys are {', '.join(REASONING_CONFIG_KEYS)}")
    bad = next((k for k, v in config.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"--reasoning-config {bad} must be a string, got {config[bad]!r}")
    empty = next((k for k in ("reasoning_start_str", "reasoning_end_str") if config.get(k) == ""), None)
    if empty is not None:
        raise ValueError(f"--reasoning-config {empty} must not be empty (leave the key out to use the "
                         "reasoning parser's tag)")
    parser = parser or config.get("reasoning_parser") or None
    if parser is not None and parser not in PARSER_TAGS:
        raise ValueError(f"--reasoning-config reasoning_parser must be one of {', '.join(PARSER_TAGS)}, got {parser!r}")
    default = PARSER_TAGS[parser] if parser is not None else ("", "")
    start = config.get("reasoning_start_str") or default[0]
    end = config.get("reasoning_end_str") or default[1]
    if not start and not end:
        return None
    if not start or not end:
        raise ValueError("--reasoning-config needs both reasoning_start_str and reasoning_end_str (or a "
                         f"reasoning_parser: {', '.join(PARSER_TAGS)})")
    return start, end


def delimiter_token_ids(delimiters: Optional[tuple[str, str]], tokenizer
                        ) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The token ids of (start, end), for SamplingParams.reasoning_token_ids; None without
    delimiters or a tokenizer."""
    if delimiters is None or tokenizer is None:
        return None
    ids = tuple(tuple(tokenizer.encode(text, add_special_tokens=False)) for text in delimiters)
    if not ids[0] or not ids[1]:
        raise ValueError(f"--reasoning-config: {delimiters!r} do not tokenize to any token")
    return ids


def _last_index(ids: list[int], pattern: tuple[int, ...]) -> int:
    """Start of the last occurrence of `pattern` in `ids`, -1 if none."""
    n = len(pattern)
    for i in range(len(ids) - n, -1, -1):
        if tuple(ids[i:i + n]) == pattern:
            return i
    return -1


def reasoning_ended(ids: list[int], start: tuple[int, ...], end: tuple[int, ...]) -> bool:
    """vLLM's is_reasoning_end: whether the last delimiter in `ids` is an end; a prompt with
    neither leaves the reasoning to its output (R1's templates after tool results)."""
    return _last_index(ids, end) > _last_index(ids, start)


def _ends_with(ids: list[int], upto: int, pattern: tuple[int, ...]) -> bool:
    """Whether ids[:upto] ends with `pattern`."""
    return upto >= len(pattern) and tuple(ids[upto - len(pattern):upto]) == pattern


class ThinkingBudget:
    """One sequence's reasoning count: open or not, its tokens so far, and where forcing began."""

    def __init__(self, seq: Sequence):
        self.start, self.end = seq.params.reasoning_token_ids
        self.budget = seq.params.thinking_token_budget
        prompt = seq.token_ids[:seq.num_prompt_tokens]
        opened = _last_index(prompt, self.start)
        self.open = opened > _last_index(prompt, self.end)
        self.count = len(prompt) - opened - len(self.start) if self.open else 0
        self.forced_from: Optional[int] = None   # index in token_ids of the first forced end token
        self.seen = len(prompt)

    def forced_token(self, ids: list[int]) -> Optional[int]:
        """The token this sequence must take next (a token of the end sequence), or None."""
        for i in range(self.seen, len(ids)):
            if self.open:
                if _ends_with(ids, i + 1, self.end):
                    self.open, self.count, self.forced_from = False, 0, None
                else:
                    self.count += 1
            elif _ends_with(ids, i + 1, self.start):
                self.open, self.count = True, 0
        self.seen = len(ids)
        if not self.open or self.count < self.budget:
            return None
        if self.forced_from is None:
            self.forced_from = len(ids)
        k = len(ids) - self.forced_from
        return self.end[k] if k < len(self.end) else None
