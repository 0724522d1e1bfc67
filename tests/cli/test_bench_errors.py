"""`deepserve bench serve / sweep`: a request of the bench's own that cannot reach the server
(vLLM's --profile POSTs, sent before the measured requests) is one line, not httpx's traceback;
the measured requests' errors are counted in the result instead."""
from __future__ import annotations

import socket

import pytest

from deepserve.cli.main import main
from tests.cli.conftest import REPO


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["serve"], ["sweep", "--max-concurrency-list", "1"]])
def test_profile_post_to_an_unreachable_server_is_one_line(capsys, monkeypatch, command):
    # the server going away after the check that it is there (tests/cli/test_bad_input_endpoints.py)
    monkeypatch.setattr("deepserve.cli.bench.check_reachable", lambda url: None)
    port = closed_port()
    argv = ["bench", *command, "--model", str(REPO / "deepserve/assets/stories260k"), "--num-prompts", "1",
            "--port", str(port), "--ready-check-timeout-sec", "0", "--profile", "--disable-tqdm"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"deepserve bench: error: POST http://127.0.0.1:{port}/start_profile: All connection attempts "
                   "failed (is the server up there?)")


@pytest.mark.parametrize("argv, line", [
    (["serve", "--request-rate", "0"], "deepserve bench serve: error: argument --request-rate: request rate must "
                                       "be > 0 (or inf), got 0"),
    (["serve", "--request-rate", "nan"], "deepserve bench serve: error: argument --request-rate: request rate must "
                                         "be > 0 (or inf), got nan"),
    (["serve", "--burstiness", "0"], "deepserve bench serve: error: argument --burstiness: must be > 0 (or inf), got 0"),
    (["serve", "--burstiness", "nan"], "deepserve bench serve: error: argument --burstiness: must be > 0 (or inf), "
                                       "got nan"),
    (["serve", "--request-timeout", "0"], "deepserve bench serve: error: argument --request-timeout: must be > 0 "
                                          "seconds, got 0"),
    (["serve", "--random-prefix-len", "-3"], "deepserve bench serve: error: argument --random-prefix-len: must be "
                                             ">= 0, got -3"),
    (["sweep", "--num-warmups", "-1"], "deepserve bench sweep: error: argument --num-warmups: must be >= 0, got -1"),
    (["serve", "--extra-body", "[1]"], "deepserve bench serve: error: argument --extra-body: must be a JSON object, "
                                       "got '[1]'"),
    (["serve", "--num-prompts", "many"], "deepserve bench serve: error: argument --num-prompts: invalid int value: "
                                         "'many'"),
    (["serve", "--no-such-flag", "1"], "deepserve bench serve: error: unrecognized arguments: --no-such-flag 1"),
    (["sweep", "--max-concurrency-list", "x"], "deepserve bench sweep: error: argument --max-concurrency-list: "
                                               "invalid int value: 'x'"),
    (["throughput", "--n", "two"], "deepserve bench throughput: error: argument --n: invalid int value: 'two'"),
])
def test_bad_flag_values_are_one_line(capsys, argv, line):
    # argparse printed the sub-command's whole usage (some 60 lines) above the error
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2 and capsys.readouterr().err == line + "\n"


def test_vllms_sweep_runner_is_named(capsys):
    # vLLM's `bench sweep serve --serve-cmd ... --bench-cmd ...`: one line saying deepserve has no sweep runner
    assert main(["bench", "sweep", "serve", "--serve-cmd", "vllm serve m", "--bench-cmd", "vllm bench serve"]) == 2
    assert capsys.readouterr().err == (
        "deepserve bench: error: `bench sweep serve` is vLLM's sweep runner, which deepserve does not have; "
        "deepserve bench sweep runs bench serve's flags against one server at each of --max-concurrency-list / "
        "--request-rate-list\n")


@pytest.mark.parametrize("command, flags", [
    (["serve", "--num-prompts", "1", "--port", "8000"], ["--save-result", "--result-dir", "{file}/results"]),
    (["serve", "--num-prompts", "1", "--port", "8000"],
     ["--append-result", "--result-dir", "{tmp}", "--result-filename", "{file}/r.json"]),
    (["latency", "--input-len", "4", "--output-len", "2", "--num-iters", "1"], ["--output-json", "{file}/r.json"]),
    (["throughput", "--num-prompts", "1", "--input-len", "4", "--output-len", "2"], ["--output-json", "{file}/r.json"]),
    (["sweep", "--num-prompts", "1", "--port", "8000", "--max-concurrency-list", "1"], ["--result-dir", "{file}/s"]),
])
def test_result_that_cannot_be_saved_is_one_line_before_the_run(capsys, monkeypatch, tmp_path, command, flags):
    """A result path under a file fails at once in one line naming the flag (it was a traceback
    after the whole run); nothing is sent and no engine starts."""
    monkeypatch.setattr("deepserve.cli.bench.check_reachable", lambda url: None)
    monkeypatch.setattr("deepserve.bench.offline._load_engine",
                        lambda args: (_ for _ in ()).throw(AssertionError("the engine was started")))
    for module in ("serve", "sweep"):
        monkeypatch.setattr(f"deepserve.bench.{module}.resolve_model",
                            lambda args: (_ for _ in ()).throw(AssertionError("the run began")))
    a_file = tmp_path / "afile"
    a_file.write_text("")
    flags = [f.format(file=a_file, tmp=tmp_path) for f in flags]
    argv = ["bench", *command, "--model", str(REPO / "deepserve/assets/stories260k"), "--disable-tqdm", *flags]
    assert main(argv) == 2
    flag = next(f for f in ("--result-filename", "--result-dir", "--output-json") if f in flags)
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"deepserve bench: error: {flag}: {a_file} is a file, not a folder"
