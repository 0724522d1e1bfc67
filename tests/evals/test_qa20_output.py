"""--output as a folder (lm-eval's `--output_path ./`) holds the default-named result; an
--output that cannot be written fails in one line before any request, not after the run."""
import json
import re

import pytest
from fake_openai import FakeOpenAI

from deepserve.cli.main import main
from deepserve.evals.cache import ReplyCache
from deepserve.evals.datasets import load_gsm8k


def _argv(url, datasets_dir, output):
    return ["eval", "--base-url", url, "--model", "fake-r1", "--tasks", "gsm8k", "--data-path", str(datasets_dir),
            "--limit", "2", "--no-progress", "--output", str(output)]


def test_output_folder_and_unwritable_output(datasets_dir, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (tmp_path / "afile").write_text("")
    with FakeOpenAI({"gsm8k": load_gsm8k(datasets_dir)[:2]}) as srv:
        assert main(_argv(srv.url, datasets_dir, folder)) == 0
        host = srv.url.split("//")[1].replace(":", "_")
        assert sorted(p.name for p in folder.iterdir()) == [
            f"fake-r1__{host}.cache.jsonl", f"fake-r1__{host}.json", f"fake-r1__{host}.md"]
        assert json.loads((folder / f"fake-r1__{host}.json").read_text())["tasks"]["gsm8k"]["score"] == 100.0
        calls = srv.calls
        capsys.readouterr()
        assert main(_argv(srv.url, datasets_dir, tmp_path / "afile" / "r.json")) == 2
        assert srv.calls == calls
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deepserve eval: error: cannot write {tmp_path / 'afile' / 'r.json'}: cannot make the "
                   f"folder {tmp_path / 'afile'} (File exists)"], err
    result = str(folder / f"fake-r1__{host}.json")
    assert main(["eval", "compare", result, result, "--output", str(folder)]) == 0
    assert json.loads((folder / "compare.json").read_text())["rows"][0]["task"] == "gsm8k"


def test_unwritable_cache_fails_before_any_request(datasets_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    cache = tmp_path / "afile" / "c.jsonl"
    with FakeOpenAI({"gsm8k": load_gsm8k(datasets_dir)[:2]}) as srv:
        assert main(_argv(srv.url, datasets_dir, tmp_path / "r.json") + ["--cache", str(cache)]) == 2
        assert srv.calls == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deepserve eval: error: cannot write {cache}: cannot make the folder {tmp_path / 'afile'} "
                   "(File exists)"], err


def test_reply_cache_that_cannot_be_opened_is_one_error(tmp_path):
    folder = tmp_path / "c.jsonl"
    folder.mkdir()   # a folder where the cache file should be
    with pytest.raises(ValueError, match=rf"^cannot use {re.escape(str(folder))} as the reply cache: Is a directory$"):
        ReplyCache(folder)


def test_result_that_cannot_be_written_is_one_line(datasets_dir, tmp_path, capsys):
    (tmp_path / "r.md").mkdir()   # the table's place is taken by a folder
    with FakeOpenAI({"gsm8k": load_gsm8k(datasets_dir)[:2]}) as srv:
        assert main(_argv(srv.url, datasets_dir, tmp_path / "r.json")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"deepserve eval: error: cannot write {tmp_path / 'r.md'}: Is a directory; the replies "
                           f"are kept: rerun with another --output and --cache {tmp_path / 'r.cache.jsonl'}"), err
        calls = srv.calls
        assert main(_argv(srv.url, datasets_dir, tmp_path / "s.json") + ["--cache", str(tmp_path / "r.cache.jsonl")]) == 0
        assert srv.calls == calls
    assert json.loads((tmp_path / "s.json").read_text())["requests"]["from_cache"] == 2
