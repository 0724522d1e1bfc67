"""Calibration token samples for GPTQ from a text dataset file (e.g. those in ../shared/datasets).

Read formats: `.jsonl` (per record the first string field among text / question / problem /
prompt / content / instruction), `.json` (ShareGPT conversations, or a list of strings or of
such records), `.txt` (the whole text). The texts are tokenized with the checkpoint's
tokenizer.json, joined with the EOS token between them and cut into `samples` windows of
`seq_len` tokens, in file order (deterministic: the same command quantizes the same way).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_FIELDS = ("text", "question", "problem", "prompt", "content", "instruction")


def _record_text(rec) -> str | None:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return None
    turns = rec.get("conversations")
    if isinstance(turns, list):
        return "\n".join(t["value"] for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)) or None
    for f in _FIELDS:
        if isinstance(rec.get(f), str):
            return rec[f]
    return None


def read_texts(path: Path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--calib-dataset {path} is a folder; name one of its .jsonl / .json / .txt files")
    if not path.is_file():
        raise FileNotFoundError(f"--calib-dataset {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            texts = [path.read_text()]
        elif suffix == ".jsonl":
            texts = []
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    texts.append(_record_text(json.loads(line)) if line.strip() else None)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"--calib-dataset {path} line {number} is not valid JSON: {exc}") from None
        elif suffix == ".json":
            data = json.loads(path.read_text())
            texts = [_record_text(r) for r in (data if isinstance(data, list) else [data])]
        else:
            raise ValueError(f"--calib-dataset {path}: unsupported file type {suffix!r} "
                             f"(read: .jsonl, .json, .txt)")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--calib-dataset {path} is not valid {suffix[1:]}: {exc}") from None
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"--calib-dataset {path} holds no text (looked for {', '.join(_FIELDS)}, "
                         f"conversations)")
    return texts


def calibration_samples(dataset: Path, tokenizer_dir: Path, samples: int, seq_len: int,
                        eos_token_id: int | None) -> list[torch.Tensor]:
    """`samples` int64 token windows of `seq_len` tokens from `dataset`."""
    from tokenizers import Tokenizer

    if samples < 1 or seq_len < 1:
        raise ValueError(f"--calib-samples and --calib-seq-len must be >= 1, got {samples} and {seq_len}")
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"GPTQ calibration needs the checkpoint's tokenizer: no {tok_file}")
    tok = Tokenizer.from_file(str(tok_file))
    need = samples * seq_len
    ids: list[int] = []
    for text in read_texts(dataset):
        ids += tok.encode(text, add_special_tokens=False).ids
        if eos_token_id is not None:
            ids.append(eos_token_id)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"--calib-dataset {dataset} gives {len(ids)} tokens, fewer than --calib-samples "
                         f"{samples} x --calib-seq-len {seq_len} = {need}")
    return list(torch.tensor(ids[:need], dtype=torch.int64).view(samples, seq_len))
