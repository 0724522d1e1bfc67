"""Incremental detokenization, correct across multi-byte characters split over tokens.

Decoding token by token breaks byte-level BPE: one CJK character or emoji can span several
tokens, and each alone decodes to U+FFFD. Like vLLM, we decode a short window
(`prefix_offset:`) and emit only what extends the window's previous text, holding back while
the text ends in U+FFFD (an incomplete character). The window starts inside the prompt so
the first output token keeps its leading space.
"""
from __future__ import annotations

from deepserve.engine.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # a little prompt context, not part of the output
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""
