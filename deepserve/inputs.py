"""Prompt types as vLLM's `vllm.inputs` names them: a prompt is a string, a TextPrompt or a
TokensPrompt (plain dicts; `cache_salt` keeps the prompt's prefix-cache entries apart)."""
from __future__ import annotations

from typing import TypedDict, Union


class _Text(TypedDict):
    prompt: str


class TextPrompt(_Text, total=False):
    cache_salt: str


class _Tokens(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_Tokens, total=False):
    prompt: str
    """The prompt's text, handed back as RequestOutput.prompt (not tokenized)."""
    cache_salt: str


PromptType = Union[str, TextPrompt, TokensPrompt]

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]
