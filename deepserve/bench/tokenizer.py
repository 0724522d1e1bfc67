"""The tokenizer the benchmarks count tokens with.

Benchmarks must count prompt and output tokens the way the model does, never by splitting
on spaces, so every count goes through the model's own `tokenizer.json` (read with the
`tokenizers` library, no `transformers` needed). The chat template of `tokenizer_config.json`
is rendered with jinja2 for the datasets that send a chat-formatted prompt to
`/v1/completions` (sonnet, as vLLM does).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class BenchTokenizer:
    """A Hugging Face tokenizer folder: encode/decode without special tokens, chat template."""

    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer {str(path)!r} has no tokenizer.json "
                                    "(pass --tokenizer FOLDER with a Hugging Face tokenizer.json)")
        self.path = file.parent
        self.name = str(path)
        self._tok = Tokenizer.from_file(str(file))
        config_file = self.path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.chat_template: Optional[str] = config.get("chat_template")
        if isinstance(self.chat_template, list):  # a list of named templates: take "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default")
        self.bos_token = _token_text(config.get("bos_token")) or ""
        self.eos_token = _token_text(config.get("eos_token")) or ""
        self._template = None
        special = set(self._tok.get_added_tokens_decoder())
        base = self._tok.get_vocab_size(with_added_tokens=False)
        # Ids that decode to ordinary text: random prompts must not contain special tokens,
        # which detokenization would drop (the prompt would come out shorter than asked).
        self.text_token_ids = [i for i in range(base) if i not in special]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text the server would build from `messages` (with the generation prompt)."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.name!r} has no chat_template in tokenizer_config.json")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template error: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self.bos_token, eos_token=self.eos_token)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> BenchTokenizer:
    """A shared BenchTokenizer per folder: a large vocabulary takes a second or more to load."""
    return BenchTokenizer(path)


def resolve_tokenizer(tokenizer: Optional[str], model: Optional[str]) -> BenchTokenizer:
    """`--tokenizer` if given, else `--model` when it is a local folder with a tokenizer.json."""
    if tokenizer:
        return load_tokenizer(str(tokenizer))
    if model and (Path(model) / "tokenizer.json").is_file():
        return load_tokenizer(str(model))
    raise ValueError(f"no tokenizer to count tokens with: --model {model!r} is not a folder with a "
                     "tokenizer.json; pass --tokenizer FOLDER")
