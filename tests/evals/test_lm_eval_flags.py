"""lm-evaluation-harness flags a user brings to `deepserve eval`: lm-eval's --output_path is
--output, its --apply_chat_template is what eval always does, the rest are refused in one
line saying what to use (argparse took their values for the `compare` sub-command: "argument
compare: invalid choice: '5'"), and lm-eval's --model kinds are named when the server does not
serve a model of that name."""
from __future__ import annotations

import pytest
from fake_openai import FakeOpenAI

from deepserve.cli.main import main
from deepserve.evals.client import SamplingSettings
from deepserve.evals.runner import EvalOptions, load_items
from deepserve.evals.tasks import TASKS


@pytest.fixture(scope="module")
def items(datasets_dir):
    opts = EvalOptions(base_url="http://127.0.0.1:1", settings=SamplingSettings("m"), tasks=[TASKS["gsm8k"]],
                       data_path=datasets_dir, cache_path=datasets_dir / "unused", limit=1)
    return load_items(opts)


def _eval(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        code = main(["eval", "--base-url", "http://127.0.0.1:1", "--data-path", "/nonexistent", *argv])
        raise SystemExit(code)
    return exc.value.code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, line", [
    (["--num_fewshot", "5"], "--num-fewshot is not supported: the tasks run zero-shot, as DeepSeek-R1's evaluation"),
    (["--batch_size", "8"], "--batch-size is not supported: requests are sent concurrently (--max-concurrency, "
                            "default 32)"),
    (["--model_args", "base_url=http://h:8000/v1/completions,num_concurrent=8"],
     "--model-args is lm-eval's; deepserve eval takes --base-url, --model (the served name) and --api-key"),
    (["--gen_kwargs", "temperature=0"], "--gen-kwargs is lm-eval's; deepserve eval takes --temperature, --top-p, "
                                        "--max-tokens and --seed"),
    (["--log_samples", "--apply_chat_template"], "--log-samples is not supported: every reply is kept in the reply "
                                                 "cache (--cache)"),
    (["--wandb_args", "project=x"], "--wandb-args is lm-eval's, which deepserve eval does not have"),
])
def test_lm_eval_flags_are_named(capsys, argv, line):
    assert _eval(capsys, *argv) == (2, "deepserve eval: error: " + line)


@pytest.mark.parametrize("flag", ["--limit", "--num-samples", "--max-concurrency", "--max-tokens"])
def test_counts_below_one_are_refused_before_any_request(capsys, flag):
    # they were refused after the server had been asked for its models and context
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--base-url", "http://127.0.0.1:1", flag, "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"deepserve eval: error: argument {flag}: must be >= 1, got 0"


def test_output_path_and_chat_template_switch_are_taken(items, datasets_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    with FakeOpenAI(items, mode="gold") as srv:
        code = main(["eval", "--base-url", srv.url, "--tasks", "gsm8k", "--data-path", str(datasets_dir),
                     "--limit", "1", "--output_path", str(out), "--apply_chat_template", "--no-progress",
                     "--retry-backoff", "0.001"])
    assert code == 0 and out.is_file() and out.with_suffix(".md").is_file()


def test_lm_eval_model_kind_is_named(datasets_dir, capsys):
    with FakeOpenAI({}, mode="gold") as srv:
        code = main(["eval", "--base-url", srv.url, "--model", "local-chat-completions", "--tasks", "gsm8k",
                     "--data-path", str(datasets_dir), "--limit", "1", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "deepserve eval: error: --model local-chat-completions is lm-eval's kind of model; deepserve eval's --model "
        "is the served model's name (fake-r1; left out: the server's), with --base-url for lm-eval's base_url")


@pytest.mark.parametrize("argv, line", [
    (["eval", "--no-such-flag", "5"], "deepserve eval: error: unrecognized arguments: --no-such-flag 5"),
    (["eval", "--limit", "2", "--no-such-flag=5", "x"], "deepserve eval: error: unrecognized arguments: "
                                                        "--no-such-flag=5 x"),
    (["eval", "bogus"], "deepserve eval: error: argument compare: invalid choice: 'bogus' (choose from 'compare')"),
])
def test_an_unknown_flags_value_is_not_taken_for_a_sub_command(capsys, argv, line):
    # argparse took the value for `eval compare`: "argument compare: invalid choice: '5'"
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == line
