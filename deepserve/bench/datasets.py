"""Request sets for `deepserve bench serve`: random, sonnet, sharegpt, prefix-repetition.

Each sampler returns `SampleRequest`s (prompt text, its length in the model's tokens, the
output length to ask for), following the definitions of vLLM's `benchmarks/datasets.py`
so that numbers compare with `vllm bench serve` runs on the same flags:

- random: prompts of `--random-input-len` tokens (± `--random-range-ratio`, one ratio or vLLM's
  JSON '{"input": r, "output": r}'), a BOS the
  tokenizer adds included (vLLM's count), built from token ids, decoded, then re-encoded so
  the reported length is the text's count in the server's tokenizer.
- sonnet: lines of a poem after a fixed instruction; the first lines are a shared prefix
  (`--sonnet-prefix-len` tokens) for prefix-cache tests; chat-formatted for /v1/completions.
  As vLLM's, the lines are chosen and counted on the chat-formatted prompt for either
  endpoint, so both send the same lines.
- sharegpt: first human turn of each conversation, output length of the first reply
  (or `--sharegpt-output-len`), pruned like vLLM (prompt < 1024, prompt + output < 2048).

sonnet, sharegpt and custom count a text as vLLM's sets do, `tokenizer(text).input_ids`: with
the special tokens the tokenizer adds (a BOS where tokenizer.json's post-processor writes one).
- custom: a JSONL file of {"prompt": ..., "output_tokens": n (optional)} lines, shuffled
  unless `--disable-shuffle`, chat-templated for /v1/completions unless `--skip-chat-template`,
  each asking for `--custom-output-len` tokens (-1: the line's output_tokens).
- prefix_repetition (or prefix-repetition): `--prefix-repetition-num-prefixes` random prefixes, each shared by an
  equal share of the requests, plus a random suffix per request.
"""
from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from deepserve.engine.tokenizer import Tokenizer

DATASET_NAMES = ("random", "sonnet", "sharegpt", "custom", "prefix_repetition", "prefix-repetition")
SONNET_INSTRUCTION = "Pick as many lines as you can from these poem lines:\n"


def _input_ids_len(tok: Tokenizer, text: str) -> int:
    """len(tokenizer(text).input_ids), vLLM's count in its sonnet and sharegpt sets."""
    return len(tok.encode(text))


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int
    expected_output_len: int


def _exact_length_text(tok: Tokenizer, rng: np.random.Generator, length: int,
                       seed_ids: Optional[list[int]] = None) -> tuple[str, int]:
    """Text that encodes to `length` tokens (or as near as the tokenizer allows).

    Decoding random ids and encoding the text again merges or splits tokens, so the ids are
    topped up or cut and the round trip repeated; the length returned is the re-encoded one.
    """
    vocab = np.asarray(tok.text_token_ids)
    ids = list(seed_ids) if seed_ids is not None else vocab[rng.integers(0, len(vocab), length)].tolist()
    text = tok.decode(ids, skip_special_tokens=True)
    for _ in range(8):
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) == length:
            break
        if len(ids) > length:
            ids = ids[:length]
        else:
            ids = ids + vocab[rng.integers(0, len(vocab), length - len(ids))].tolist()
        text = tok.decode(ids, skip_special_tokens=True)
    return text, tok.count(text)


RangeRatio = Union[float, dict]


def parse_range_ratio(text: str) -> RangeRatio:
    """vLLM 0.26's --random-range-ratio: one number for input and output lengths, or a JSON
    object '{"input": 0.3, "output": 0.5}' giving each its own; checked as range_ratios does."""
    try:
        value: RangeRatio = float(text)
    except ValueError:
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"takes a number or a JSON object like '{{\"input\": 0.3, \"output\": 0.5}}', "
                             f"got {text!r}") from None
    range_ratios(value)
    return value


def range_ratios(range_ratio: RangeRatio) -> tuple[float, float]:
    """(input, output) range ratios of a --random-range-ratio value, each in [0, 1)."""
    if isinstance(range_ratio, dict):
        if set(range_ratio) != {"input", "output"}:
            raise ValueError(f"--random-range-ratio needs the keys \"input\" and \"output\" in a JSON object, "
                             f"got {sorted(range_ratio)}")
        pair = range_ratio["input"], range_ratio["output"]
    elif isinstance(range_ratio, (int, float)) and not isinstance(range_ratio, bool):
        pair = range_ratio, range_ratio
    else:
        raise ValueError(f"--random-range-ratio takes a number or a JSON object, got {range_ratio!r}")
    for value in pair:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    return float(pair[0]), float(pair[1])


def sample_random(tok: Tokenizer, num_requests: int, input_len: int, output_len: int,
                  range_ratio: RangeRatio, prefix_len: int, seed: int) -> list[SampleRequest]:
    """`range_ratio`: one ratio for input and output lengths, or vLLM's {"input": r, "output": r}."""
    ratio_in, ratio_out = range_ratios(range_ratio)
    if input_len < 1 or output_len < 1:
        raise ValueError(f"--random-input-len and --random-output-len must be >= 1, "
                         f"got {input_len} and {output_len}")
    # As vLLM's: the tokens the tokenizer adds to a prompt (a BOS) count in --random-input-len.
    text_len = max(0, input_len - len(tok.encode("")))
    low = math.floor(text_len * (1 - ratio_in))
    if prefix_len + low < 1:
        raise ValueError(f"--random-input-len {input_len} is too small: the tokenizer adds "
                         f"{input_len - text_len} token(s) to each prompt, leaving none of random text")
    rng = np.random.default_rng(seed)
    lens_in = rng.integers(low, math.ceil(text_len * (1 + ratio_in)) + 1, num_requests)
    lens_out = rng.integers(max(1, math.floor(output_len * (1 - ratio_out))),
                            math.ceil(output_len * (1 + ratio_out)) + 1, num_requests)
    vocab = np.asarray(tok.text_token_ids)
    prefix = vocab[rng.integers(0, len(vocab), prefix_len)].tolist() if prefix_len else []
    offsets = rng.integers(0, len(vocab), num_requests)
    requests = []
    for i in range(num_requests):
        # Consecutive ids from a random start (vLLM's scheme): distinct prompts, no repeats.
        inner = vocab[(offsets[i] + i + np.arange(int(lens_in[i]))) % len(vocab)].tolist()
        text, n = _exact_length_text(tok, rng, prefix_len + int(lens_in[i]), prefix + inner)
        requests.append(SampleRequest(text, n, int(lens_out[i])))
    extra = sum(r.prompt_len for r in requests) - num_requests * prefix_len - int(lens_in.sum())
    if extra:   # vLLM warns the same way
        print(f"bench: the random prompts hold {abs(extra)} {'more' if extra > 0 else 'fewer'} tokens in all "
              "than asked for: encoding their decoded ids again merged or split some", file=sys.stderr)
    return requests


def sample_sonnet(tok: Tokenizer, path: str, num_requests: int, input_len: int,
                  prefix_len: int, output_len: int, chat_format: bool, seed: int) -> list[SampleRequest]:
    """vLLM's sonnet set; `chat_format` sends the chat-templated text (for /v1/completions).
    Lengths are the chat-templated text's either way (the chat endpoint templates it itself)."""
    lines = Path(path).read_text().splitlines(keepends=True)
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError(f"sonnet dataset {path!r} has no lines")

    def formatted(prompt: str) -> str:
        if tok.chat_template is None:
            return prompt
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)

    base_len = _input_ids_len(tok, formatted(SONNET_INSTRUCTION))
    if input_len <= base_len:
        raise ValueError(f"--sonnet-input-len {input_len} must be larger than the instruction's "
                         f"{base_len} tokens")
    avg_line = sum(_input_ids_len(tok, line) for line in lines) / len(lines)
    num_input_lines = round((input_len - base_len) / avg_line)
    num_prefix_lines = max(round((prefix_len - base_len) / avg_line), 0)
    if num_prefix_lines > num_input_lines:
        raise ValueError(f"--sonnet-prefix-len {prefix_len} must not exceed --sonnet-input-len {input_len}")
    prefix_lines = lines[:num_prefix_lines]
    rnd = random.Random(seed)
    requests: list[SampleRequest] = []
    attempts = 0
    while len(requests) < num_requests:
        attempts += 1
        if attempts > 100 * num_requests + 100:
            raise ValueError(f"could not build sonnet prompts of at most {input_len} tokens "
                             f"(lines average {avg_line:.1f} tokens)")
        extra = rnd.choices(lines, k=num_input_lines - num_prefix_lines)
        prompt = SONNET_INSTRUCTION + "".join(prefix_lines + extra)
        n = _input_ids_len(tok, formatted(prompt))
        if n <= input_len:
            requests.append(SampleRequest(formatted(prompt) if chat_format else prompt, n, output_len))
    return requests


def check_dataset_file(path: str) -> None:
    """--dataset-path names a file: a missing one, or a folder, is refused saying which."""
    if Path(path).is_dir():
        raise ValueError(f"--dataset-path {path!r} is a folder; name the dataset file in it")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--dataset-path {path!r} does not exist")


def sample_sharegpt(tok: Tokenizer, path: str, num_requests: int,
                    output_len: Optional[int], seed: int) -> list[SampleRequest]:
    """First human turn of each conversation; pruned as vLLM does (see the module docstring)."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"sharegpt dataset {path!r} is not JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"sharegpt dataset {path!r} must be a JSON list of conversations")
    convs = [d.get("conversations") or d.get("conversation") or [] for d in data if isinstance(d, dict)]
    # vLLM's set: the conversations with a reply (whose length --sharegpt-output-len may
    # replace). A file of first turns alone has no reply to take a length from: its entries
    # are used with --sharegpt-output-len.
    replied = [c for c in convs if len(c) >= 2]
    convs = replied or [c for c in convs if c and output_len is not None]
    random.Random(seed).shuffle(convs)
    requests: list[SampleRequest] = []
    for conv in convs:
        if len(requests) == num_requests:
            break
        prompt = conv[0].get("value", "")
        prompt_len = _input_ids_len(tok, prompt)
        out_len = output_len if output_len is not None else _input_ids_len(tok, conv[1].get("value", ""))
        if prompt_len < 4 or (output_len is None and out_len < 4):
            continue
        if prompt_len > 1024 or prompt_len + out_len > 2048:
            continue
        requests.append(SampleRequest(prompt, prompt_len, out_len))
    if not requests:
        hint = "" if output_len is not None else " (single-turn entries need --sharegpt-output-len)"
        raise ValueError(f"sharegpt dataset {path!r} has no usable conversation{hint}")
    return requests


def sample_custom(tok: Tokenizer, path: str, num_requests: int, output_len: int, chat_format: bool,
                  shuffle: bool, seed: int, template_kwargs: Optional[dict] = None,
                  skip_template: bool = False) -> list[SampleRequest]:
    """vLLM's custom set (see the module docstring); `template_kwargs` go to the chat template.
    `chat_format` sends the chat-templated text (for /v1/completions); lengths are the
    templated text's either way, as vLLM's, unless `skip_template` (--skip-chat-template)."""
    if not path.endswith(".jsonl"):
        raise ValueError(f"--dataset-name custom reads a .jsonl file, got {path!r}")
    items = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{i} is not JSON ({exc})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}:{i} has no \"prompt\" string")
        items.append(item)
    if not items:
        raise ValueError(f"custom dataset {path!r} has no line")
    rnd = random.Random(seed)
    if shuffle:
        rnd.shuffle(items)
    use_template = not skip_template and tok.chat_template is not None
    requests = []
    for i, item in enumerate(items[:num_requests]):
        out_len = output_len
        if output_len is None or output_len == -1:
            try:
                out_len = int(item["output_tokens"])
            except (KeyError, ValueError, TypeError):
                raise ValueError(f"custom dataset {path!r}: an entry has no integer \"output_tokens\" "
                                 "(needed when --custom-output-len is -1)") from None
        prompt = templated = item["prompt"]
        if use_template:
            templated = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=False, **(template_kwargs or {}))
        requests.append(SampleRequest(templated if chat_format else prompt, _input_ids_len(tok, templated), out_len))
    return requests


def sample_prefix_repetition(tok: Tokenizer, num_requests: int, prefix_len: int,
                             suffix_len: int, num_prefixes: int, output_len: int,
                             seed: int) -> list[SampleRequest]:
    if num_prefixes < 1 or num_prefixes > num_requests:
        raise ValueError(f"--prefix-repetition-num-prefixes must be in [1, --num-prompts={num_requests}], "
                         f"got {num_prefixes}")
    if prefix_len < 0 or suffix_len < 1:
        raise ValueError(f"--prefix-repetition-prefix-len must be >= 0 and -suffix-len >= 1, "
                         f"got {prefix_len} and {suffix_len}")
    rng = np.random.default_rng(seed)
    requests = []
    for p in range(num_prefixes):
        prefix, _ = _exact_length_text(tok, rng, prefix_len) if prefix_len else ("", 0)
        # Spread the remainder over the first prefixes so that exactly num_requests come out.
        share = num_requests // num_prefixes + (1 if p < num_requests % num_prefixes else 0)
        for _ in range(share):
            suffix, _ = _exact_length_text(tok, rng, suffix_len)
            prompt = prefix + suffix
            requests.append(SampleRequest(prompt, tok.count(prompt), output_len))
    random.Random(seed).shuffle(requests)
    return requests


def apply_length_flags(args) -> None:
    """vLLM's general `--input-len` / `--output-len` set every dataset's own length flags."""
    if getattr(args, "input_len", None) is not None:
        args.random_input_len = args.sonnet_input_len = args.input_len
    if getattr(args, "output_len", None) is not None:
        args.random_output_len = args.sonnet_output_len = args.sharegpt_output_len = args.output_len
        args.prefix_repetition_output_len = args.custom_output_len = args.output_len


def sample_requests(args, tok: Tokenizer) -> list[SampleRequest]:
    """The request set named by `args.dataset_name`, built from the bench serve flags. A file
    with fewer usable entries than --num-prompts is oversampled (entries repeated at random) up
    to it, as vLLM does, unless --no-oversample."""
    return oversample(_sample(args, tok), args, args.seed)


def oversample(requests: list[SampleRequest], args, seed: int) -> list[SampleRequest]:
    """`requests` topped up to --num-prompts with random repeats of its entries (vLLM's
    oversampling), unless --no-oversample."""
    if len(requests) < args.num_prompts and not getattr(args, "no_oversample", False):
        requests = requests + random.Random(seed).choices(requests, k=args.num_prompts - len(requests))
    return requests


def _sample(args, tok: Tokenizer) -> list[SampleRequest]:
    apply_length_flags(args)
    name, n, seed = args.dataset_name.replace("_", "-"), args.num_prompts, args.seed
    if n < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {n}")
    if name in ("random", "prefix-repetition") and args.dataset_path:
        raise ValueError(f"--dataset-name {args.dataset_name} takes no --dataset-path; name the file's set with "
                         "--dataset-name sharegpt, sonnet or custom (random is the default, as in vLLM)")
    if name == "random":
        if getattr(args, "random_batch_size", 1) != 1:
            raise ValueError(f"--random-batch-size {args.random_batch_size}: several prompts a request are vLLM's "
                             "embeddings benchmark; deepserve bench serve sends one prompt a request (1)")
        return sample_random(tok, n, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, args.random_prefix_len, seed)
    if name in ("sonnet", "sharegpt", "custom") and not args.dataset_path:
        raise ValueError(f"--dataset-name {name} needs --dataset-path")
    if args.dataset_path:
        check_dataset_file(args.dataset_path)
    if name == "sonnet":
        return sample_sonnet(tok, args.dataset_path, n, args.sonnet_input_len, args.sonnet_prefix_len,
                             args.sonnet_output_len, chat_format="chat" not in args.endpoint, seed=seed)
    if name == "sharegpt":
        return sample_sharegpt(tok, args.dataset_path, n, args.sharegpt_output_len, seed)
    if name == "custom":
        return sample_custom(tok, args.dataset_path, n, args.custom_output_len,
                             chat_format="chat" not in args.endpoint and not args.skip_chat_template,
                             shuffle=not args.disable_shuffle, seed=seed,
                             template_kwargs=getattr(args, "chat_template_kwargs", None),
                             skip_template=args.skip_chat_template)
    if name == "prefix-repetition":
        return sample_prefix_repetition(tok, n, args.prefix_repetition_prefix_len,
                                        args.prefix_repetition_suffix_len,
                                        args.prefix_repetition_num_prefixes,
                                        args.prefix_repetition_output_len, seed)
    raise ValueError(f"--dataset-name {args.dataset_name} is not supported: deepserve bench serve has "
                     f"{', '.join(DATASET_NAMES[:-1])}")
