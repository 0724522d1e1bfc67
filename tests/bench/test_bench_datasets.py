"""Request sets: lengths in real tokenizer tokens, shared prefixes, and each kind end to end."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import SERVING, TOKENIZER
from deepserve.bench.datasets import (SONNET_INSTRUCTION, sample_prefix_repetition, sample_random,
                                      sample_sharegpt, sample_sonnet)
from deepserve.bench.serve import run_serve
from deepserve.engine.tokenizer import load_tokenizer

SONNET = str(SERVING / "sonnet.txt")
DEMO_MODEL = Path(__file__).resolve().parents[2] / "deepserve" / "assets" / "stories260k"
SHAREGPT_2TURN = str(SERVING / "ShareGPT_V3_unfiltered_cleaned_split.first500.json")
SHAREGPT_1TURN = str(SERVING / "ShareGPT_V3_filtered_500.json")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TOKENIZER))


def test_random_lengths_are_tokenizer_counts(tok):
    reqs = sample_random(tok, 6, input_len=64, output_len=8, range_ratio=0.0, prefix_len=0, seed=1)
    assert [r.prompt_len for r in reqs] == [tok.count(r.prompt) for r in reqs]
    assert all(abs(r.prompt_len - 64) <= 2 for r in reqs)  # re-encoding may merge a token or two
    assert [r.expected_output_len for r in reqs] == [8] * 6
    assert len({r.prompt for r in reqs}) == 6
    # the word count is not the token count: random ids decode to sub-word pieces
    assert any(len(r.prompt.split()) != r.prompt_len for r in reqs)


def test_random_range_ratio_and_prefix(tok):
    reqs = sample_random(tok, 40, input_len=50, output_len=20, range_ratio=0.5, prefix_len=10, seed=0)
    lens_out = [r.expected_output_len for r in reqs]
    assert min(lens_out) >= 10 and max(lens_out) <= 30 and len(set(lens_out)) > 5
    assert all(10 + 25 - 2 <= r.prompt_len <= 10 + 75 + 2 for r in reqs)
    prefix = tok.decode(tok.encode(reqs[0].prompt, add_special_tokens=False)[:8])
    assert all(r.prompt.startswith(prefix) for r in reqs)
    with pytest.raises(ValueError, match="range-ratio must be in"):
        sample_random(tok, 1, 10, 10, 1.5, 0, 0)


def test_random_is_seeded(tok):
    a = sample_random(tok, 3, 32, 4, 0.2, 0, seed=7)
    b = sample_random(tok, 3, 32, 4, 0.2, 0, seed=7)
    c = sample_random(tok, 3, 32, 4, 0.2, 0, seed=8)
    assert [r.prompt for r in a] == [r.prompt for r in b] != [r.prompt for r in c]


def test_sonnet_shared_prefix_and_limit(tok):
    reqs = sample_sonnet(tok, SONNET, 5, input_len=200, prefix_len=80, output_len=20,
                         chat_format=False, seed=0)
    lines = [line for line in open(SONNET).read().splitlines(keepends=True) if line.strip()]
    assert all(r.prompt.startswith(SONNET_INSTRUCTION + lines[0] + lines[1]) for r in reqs)
    assert all(r.prompt_len <= 200 and r.prompt_len == len(tok.encode(_user_turn(tok, r.prompt))) for r in reqs)
    assert all(r.prompt_len > 150 for r in reqs)
    chat = sample_sonnet(tok, SONNET, 2, 200, 80, 20, chat_format=True, seed=0)
    assert chat[0].prompt.startswith("<｜begin▁of▁sentence｜><｜User｜>" + SONNET_INSTRUCTION)
    assert chat[0].prompt.endswith("<｜Assistant｜><think>\n")
    with pytest.raises(ValueError, match="sonnet-input-len 5 must be larger"):
        sample_sonnet(tok, SONNET, 1, 5, 0, 10, False, 0)


def _user_turn(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def test_sonnet_sends_the_same_lines_to_either_endpoint(tok):
    """As vLLM's sonnet set: the lines are chosen and counted on the chat-formatted prompt for
    either endpoint; the chat endpoint gets them unformatted. The lengths are those vLLM 0.26's
    SonnetDataset gives for this tokenizer, seed and flags."""
    fmt = sample_sonnet(tok, SONNET, 6, 200, 50, 8, chat_format=True, seed=0)
    raw = sample_sonnet(tok, SONNET, 6, 200, 50, 8, chat_format=False, seed=0)
    assert [_user_turn(tok, r.prompt) for r in raw] == [r.prompt for r in fmt]
    assert [r.prompt_len for r in raw] == [r.prompt_len for r in fmt] == [197, 192, 180, 193, 197, 195]


def test_sharegpt_counts_the_bos_as_vllm():
    """vLLM's sharegpt set counts prompt and reply as tokenizer(text).input_ids: with the demo
    model's BOS. Lengths (and so the conversations its pruning keeps) are vLLM 0.26's for seed 0."""
    demo = load_tokenizer(str(DEMO_MODEL))
    reqs = sample_sharegpt(demo, SHAREGPT_2TURN, 8, output_len=None, seed=0)
    assert [r.prompt_len for r in reqs] == [33, 196, 21, 247, 47, 4, 24, 385]
    assert [r.expected_output_len for r in reqs] == [696, 1233, 206, 1605, 343, 18, 997, 850]


def test_custom_counts_the_templated_prompt_for_either_endpoint(bench_args, tmp_path):
    """As vLLM's custom set: a prompt's length is tokenizer(templated prompt).input_ids, the demo
    model's BOS included, also where the chat endpoint is sent the prompt untemplated (the server
    templates it); --skip-chat-template counts the prompt as written."""
    from deepserve.bench.datasets import sample_requests
    demo = load_tokenizer(str(DEMO_MODEL))
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "Once upon a time", "output_tokens": 4}\n')
    base = ["serve", "--base-url", "http://x", "--dataset-name", "custom", "--dataset-path", str(path),
            "--num-prompts", "1", "--custom-output-len", "-1"]
    templated = _user_turn(demo, "Once upon a time")
    assert templated == "<s>Once upon a time"
    for endpoint, sent in (("/v1/completions", templated), ("/v1/chat/completions", "Once upon a time")):
        req, = sample_requests(bench_args(base + ["--endpoint", endpoint]), demo)
        assert (req.prompt, req.prompt_len) == (sent, 8)   # [1, 1, 441, 416, 331, 407, 261, 378] in vLLM
    req, = sample_requests(bench_args(base + ["--skip-chat-template"]), demo)
    assert (req.prompt, req.prompt_len) == ("Once upon a time", 5)


def test_sharegpt_output_len_keeps_vllms_conversations(shared_dir):
    """With --sharegpt-output-len, vLLM's sharegpt set still draws from the conversations with a
    reply only (the file's single-turn entries out): the lengths are vLLM 0.26's for seed 0."""
    r1 = load_tokenizer(str(shared_dir / "tokenizers" / "deepseek-r1"))
    reqs = sample_sharegpt(r1, SHAREGPT_2TURN, 8, output_len=8, seed=0)
    assert [r.prompt_len for r in reqs] == [513, 10, 68, 85, 4, 85, 315, 342]


def test_sharegpt_lengths_and_pruning(tok):
    reqs = sample_sharegpt(tok, SHAREGPT_2TURN, 20, output_len=None, seed=0)
    data = {c["conversations"][0]["value"]: c["conversations"][1]["value"]
            for c in json.load(open(SHAREGPT_2TURN)) if len(c["conversations"]) >= 2}
    assert len(reqs) == 20
    for r in reqs:
        assert r.expected_output_len == tok.count(data[r.prompt])
        assert 4 <= r.prompt_len <= 1024 and r.prompt_len + r.expected_output_len <= 2048
    fixed = sample_sharegpt(tok, SHAREGPT_1TURN, 5, output_len=16, seed=0)
    assert [r.expected_output_len for r in fixed] == [16] * 5
    with pytest.raises(ValueError, match="need --sharegpt-output-len"):
        sample_sharegpt(tok, SHAREGPT_1TURN, 5, output_len=None, seed=0)


def test_prefix_repetition_groups(tok):
    reqs = sample_prefix_repetition(tok, 7, prefix_len=24, suffix_len=12, num_prefixes=3,
                                    output_len=5, seed=0)
    assert len(reqs) == 7 and all(r.expected_output_len == 5 for r in reqs)
    heads = [tok.decode(tok.encode(r.prompt, add_special_tokens=False)[:20]) for r in reqs]
    assert sorted(heads.count(h) for h in set(heads)) == [2, 2, 3]
    assert all(abs(r.prompt_len - 36) <= 2 for r in reqs)
    with pytest.raises(ValueError, match="num-prefixes must be in"):
        sample_prefix_repetition(tok, 2, 8, 8, 3, 4, 0)


@pytest.mark.parametrize("dataset,extra", [
    ("random", ["--random-input-len", "40", "--random-output-len", "3"]),
    ("sonnet", ["--dataset-path", SONNET, "--sonnet-input-len", "150", "--sonnet-prefix-len", "60",
                "--sonnet-output-len", "3"]),
    ("sharegpt", ["--dataset-path", SHAREGPT_2TURN, "--sharegpt-output-len", "3"]),
    ("prefix-repetition", ["--prefix-repetition-prefix-len", "16", "--prefix-repetition-suffix-len", "8",
                           "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "3"]),
])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_each_dataset_against_endpoint(fake_server, bench_args, tok, dataset, extra, endpoint):
    argv = ["serve", "--model", "fake-model", "--tokenizer", str(TOKENIZER), "--dataset-name", dataset,
            "--endpoint", endpoint, "--num-prompts", "4", "--max-concurrency", "2", "--disable-tqdm", *extra]
    with fake_server(ttft=0.002, itl=0.001, usage=False) as srv:   # lengths counted by the bench
        res = run_serve(bench_args(argv + ["--base-url", srv.url]))
        received = srv.stats()["requests"]
    assert res["completed"] == 4 and res["failed"] == 0
    assert res["output_lens"] == [3] * 4
    key = "max_completion_tokens" if "chat" in endpoint else "max_tokens"
    assert [r[key] for r in received] == [3] * 4
    sent = [r["messages"][0]["content"] if "chat" in endpoint else r["prompt"] for r in received]
    counted = [_user_turn(tok, p) if dataset == "sonnet" and "chat" in endpoint else p for p in sent]
    assert sorted(res["input_lens"]) == sorted(tok.count(p) for p in counted)
    # sonnet is chat-formatted for /v1/completions only (the chat endpoint formats it itself)
    if dataset == "sonnet":
        assert all(p.startswith("<｜begin▁of▁sentence｜>") == ("chat" not in endpoint) for p in sent)


def test_random_input_len_counts_the_bos_the_server_adds(capsys):
    """As vLLM's random set: --random-input-len counts the BOS the tokenizer adds, so the demo
    model's server sees 128-token prompts for 128 (not 129); prompts whose re-encoding does not
    settle (the demo's byte tokens) are named in one line, as vLLM warns."""
    demo = load_tokenizer(str(DEMO_MODEL))
    reqs = sample_random(demo, 20, input_len=128, output_len=8, range_ratio=0.0, prefix_len=0, seed=0)
    served = [len(demo.encode(r.prompt)) for r in reqs]
    assert served.count(128) >= 15 and min(served) == 128
    assert [r.prompt_len for r in reqs] == [n - 1 for n in served]
    extra = sum(served) - 20 * 128
    assert extra > 0 and f"hold {extra} more tokens in all" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--random-input-len 1 is too small"):
        sample_random(demo, 1, 1, 8, 0.0, 0, 0)


def test_random_input_len_without_added_tokens_is_the_text(tok, capsys):
    reqs = sample_random(tok, 8, input_len=128, output_len=8, range_ratio=0.0, prefix_len=0, seed=0)
    assert [len(tok.encode(r.prompt)) for r in reqs] == [128] * 8   # R1-Distill: no BOS on a completion prompt
    assert capsys.readouterr().err == ""


def test_range_ratio_per_input_and_output(tok, bench_args):
    # vLLM 0.26's --random-range-ratio takes '{"input": r, "output": r}' besides one number
    flag = ["--random-range-ratio", '{"input": 0, "output": 0.5}']
    args = bench_args(["serve", *flag])
    assert args.random_range_ratio == {"input": 0, "output": 0.5}
    reqs = sample_random(tok, 40, input_len=33, output_len=20, range_ratio=args.random_range_ratio,
                         prefix_len=0, seed=0)
    lens_out = [r.expected_output_len for r in reqs]
    assert min(lens_out) >= 10 and max(lens_out) <= 30 and len(set(lens_out)) > 5
    assert max(abs(r.prompt_len - 32) for r in reqs) <= 2   # 33 with the BOS, no spread
    assert len({r.prompt_len for r in reqs}) <= 3
    assert bench_args(["serve", "--random-range-ratio", "0.25"]).random_range_ratio == 0.25

    from deepserve.bench.offline import random_requests
    tp = bench_args(["throughput", "--model", "m", "--random-range-ratio", '{"input": 0.5, "output": 0}'])
    prompts, out_lens = random_requests(40, 20, 8, 100, 0, tp.random_range_ratio)
    assert out_lens == [8] * 40
    lens_in = [len(p["prompt_token_ids"]) for p in prompts]
    assert min(lens_in) >= 10 and max(lens_in) <= 30 and len(set(lens_in)) > 5


@pytest.mark.parametrize("value, message", [
    ('{"input": 0.3}', "needs the keys \"input\" and \"output\" in a JSON object, got \\['input'\\]"),
    ('{"input": 0.3, "output": 1.0}', "must be in \\[0, 1\\)"),
    ("1.5", "must be in \\[0, 1\\), got 1.5"),
    ("wide", "takes a number or a JSON object"),
    ("[0.1, 0.2]", "takes a number or a JSON object"),
])
def test_range_ratio_refused_in_one_line(bench_args, capsys, value, message):
    for command in (["serve"], ["throughput", "--model", "m"]):
        with pytest.raises(SystemExit):
            bench_args([*command, "--random-range-ratio", value])
        err = capsys.readouterr().err.splitlines()[-1]
        assert re.search("argument --random-range-ratio: " + message, err), err
