"""`bench throughput --dataset-name sharegpt|sonnet --dataset-path FILE` (vLLM's
benchmark_throughput.py datasets) on the demo model: the engine is sent the dataset's prompts,
token for token as the model's tokenizer reads them, for the dataset's output lengths."""
from __future__ import annotations

import json

import pytest
from conftest import parse_bench

from deepserve.bench.datasets import sample_sharegpt, sample_sonnet
from deepserve.bench.offline import dataset_prompts
from deepserve.engine.tokenizer import load_tokenizer
from deepserve.config import DEMO_MODEL

SERVING = "datasets/serving"


@pytest.fixture(scope="module")
def files(shared_dir):
    return {"sharegpt": shared_dir / SERVING / "ShareGPT_V3_unfiltered_cleaned_split.first500.json",
            "sonnet": shared_dir / SERVING / "sonnet.txt"}


def test_sharegpt_prompts_are_the_first_turns(files):
    args = parse_bench(["throughput", "--dataset-name", "sharegpt", "--dataset-path", str(files["sharegpt"]),
                        "--num-prompts", "5"])
    prompts, out_lens = dataset_prompts(args, seed=0)
    tok = load_tokenizer(DEMO_MODEL)
    expected = sample_sharegpt(tok, str(files["sharegpt"]), 5, None, 0)
    assert [p["prompt_token_ids"] for p in prompts] == [tok.encode(r.prompt, add_special_tokens=False) for r in expected]
    assert out_lens == [r.expected_output_len for r in expected] and len(set(out_lens)) > 1
    args.output_len = 7   # --output-len replaces the replies' lengths
    assert dataset_prompts(args, seed=0)[1] == [7] * 5


def test_sonnet_and_missing_path(files):
    args = parse_bench(["throughput", "--dataset-name", "sonnet", "--dataset-path", str(files["sonnet"]),
                        "--num-prompts", "3", "--input-len", "200", "--prefix-len", "40", "--output-len", "9"])
    prompts, out_lens = dataset_prompts(args, seed=0)
    tok = load_tokenizer(DEMO_MODEL)
    expected = sample_sonnet(tok, str(files["sonnet"]), 3, 200, 40, 9, chat_format=True, seed=0)
    assert [p["prompt_token_ids"] for p in prompts] == [tok.encode(r.prompt, add_special_tokens=False) for r in expected]
    assert out_lens == [9, 9, 9] and all(len(p["prompt_token_ids"]) <= 200 for p in prompts)
    args.dataset_path = None
    with pytest.raises(ValueError, match="--dataset-name sonnet needs --dataset-path"):
        dataset_prompts(args, seed=0)


def test_throughput_runs_sharegpt(files, tmp_path):
    pytest.importorskip("deepserve.engine.llm", reason="the engine (deepserve.LLM) is not in this build")
    from deepserve.cli.bench import _throughput

    out = tmp_path / "thr.json"
    argv = ["throughput", "--dataset-name", "sharegpt", "--dataset-path", str(files["sharegpt"]),
            "--num-prompts", "3", "--output-len", "4", "--output-json", str(out), "--disable-tqdm"]
    assert _throughput(parse_bench(argv)) == 0
    res = json.loads(out.read_text())
    prompts, _ = dataset_prompts(parse_bench(argv), seed=0)
    assert res["total_prompt_tokens"] == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert (res["num_requests"], res["total_output_tokens"]) == (3, 12)
