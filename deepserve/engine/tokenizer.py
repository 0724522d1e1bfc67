"""Tokenizer from a Hugging Face folder (tokenizer.json + tokenizer_config.json), with the
model's own chat template rendered by a sandboxed Jinja2. No remote code runs."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as HFTokenizer


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, folder: str | Path, chat_template: Optional[str] = None):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: deepserve reads fast tokenizers (tokenizer.json)")
        self.folder = folder
        self.tok = HFTokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos_token = bool(cfg.get("add_bos_token", False)) and self.bos_token_id is not None
        self.eos_token_ids: set[int] = set()
        if self.eos_token and self.tok.token_to_id(self.eos_token) is not None:
            self.eos_token_ids.add(self.tok.token_to_id(self.eos_token))
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
            self.eos_token_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if chat_template is not None:
            template = Path(chat_template).read_text() if Path(chat_template).is_file() else chat_template
        self.chat_template: Optional[str] = template

    @property
    def eos_token_id(self) -> Optional[int]:
        return min(self.eos_token_ids) if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id) or ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **extra):
        """Render `messages` with the model's chat template (like transformers')."""
        if not self.chat_template:
            raise ValueError(f"the tokenizer in {self.folder} has no chat_template; pass --chat-template")
        text = _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        # the template writes the BOS itself
        return self.encode(text, add_special_tokens=False) if tokenize else text


_compiled: dict[str, object] = {}


def _compile(template: str):
    if template not in _compiled:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"],
                                            undefined=jinja2.Undefined)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _compiled[template] = env.from_string(template)
    return _compiled[template]
