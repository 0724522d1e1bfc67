"""bench sweep: one run per setting, Markdown + PNG + JSON beside the runs' JSON."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import TOKENIZER
from deepserve.bench.sweep import markdown_table, run_sweep, sweep_settings


def sweep_args(bench_args, url, tmp_path, prompts: int, concurrencies: list[int]):
    """A sweep of `prompts` random 16-token prompts (4 tokens out) per concurrency, written as s.*"""
    return bench_args(["sweep", "--base-url", url, "--model", "fake-model", "--tokenizer", str(TOKENIZER),
                       "--random-input-len", "16", "--random-output-len", "4", "--num-prompts", str(prompts),
                       "--max-concurrency-list", *map(str, concurrencies),
                       "--result-dir", str(tmp_path), "--result-filename", "s.json", "--disable-tqdm"])


def test_sweep_writes_md_png_json(fake_server, bench_args, tmp_path):
    pytest.importorskip("matplotlib")
    # requests long enough (~0.35 s) that four start together on a loaded 2-core machine
    with fake_server(ttft=0.2, itl=0.05) as srv:
        out = run_sweep(sweep_args(bench_args, srv.url, tmp_path, prompts=4, concurrencies=[1, 4]))
        assert srv.stats()["max_in_flight"] == 4
    runs = out["runs"]
    assert [r["max_concurrency"] for r in runs] == [1, 4]
    assert all(r["completed"] == 4 and r["failed"] == 0 for r in runs)
    # concurrency 4 serves the same 4 requests in about a quarter of the time
    assert runs[1]["duration"] < runs[0]["duration"] * 0.6
    assert runs[1]["request_throughput"] > runs[0]["request_throughput"]
    md = (tmp_path / "s.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "max concurrency" not in line]
    assert len(rows) == 2 and rows[0].startswith("| 1 | inf | 4 | 0 |") and rows[1].startswith("| 4 | inf |")
    assert "![chart](s.png)" in md
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [r["max_concurrency"] for r in summary["runs"]] == [1, 4]
    per_run = sorted(tmp_path.glob("openai-infqps-concurrency*-fake-model-*.json"))
    assert len(per_run) == 2
    assert {json.loads(p.read_text())["max_concurrency"] for p in per_run} == {1, 4}


def test_sweep_without_matplotlib_writes_md_and_json(fake_server, bench_args, tmp_path, monkeypatch, capsys):
    # the base install has no matplotlib: the runs, table and JSON are written, the chart is skipped
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with fake_server(ttft=0.01, itl=0.01) as srv:
        out = run_sweep(sweep_args(bench_args, srv.url, tmp_path, prompts=2, concurrencies=[1, 2]))
    assert [(r["max_concurrency"], r["completed"], r["failed"]) for r in out["runs"]] == [(1, 2, 0), (2, 2, 0)]
    assert out["chart"] is None and not (tmp_path / "s.png").exists()
    md = (tmp_path / "s.md").read_text()
    assert "![chart]" not in md and md.count("| inf | 2 | 0 |") == 2
    assert [r["max_concurrency"] for r in json.loads((tmp_path / "s.json").read_text())["runs"]] == [1, 2]
    assert "pip install 'deepserve[plot]'" in capsys.readouterr().err


def test_sweep_settings_product_and_errors(bench_args):
    args = bench_args(["sweep", "--max-concurrency-list", "1", "8", "--request-rate-list", "2", "inf"])
    assert sweep_settings(args) == [(1, 2.0), (1, float("inf")), (8, 2.0), (8, float("inf"))]
    with pytest.raises(ValueError, match="needs --max-concurrency-list"):
        sweep_settings(bench_args(["sweep"]))
    with pytest.raises(ValueError, match=r"must be >= 0 \(0: no limit\), got -1"):
        sweep_settings(bench_args(["sweep", "--max-concurrency-list", "4", "-1"]))


def test_sweep_concurrency_zero_is_no_limit(fake_server, bench_args, tmp_path):
    """vLLM's sweep hands max_concurrency 0 to `bench serve --max-concurrency 0`, which sets no
    limit: all 4 requests in flight at once, as at concurrency 4."""
    with fake_server(ttft=0.2, itl=0.05) as srv:
        out = run_sweep(sweep_args(bench_args, srv.url, tmp_path, prompts=4, concurrencies=[0]))
        assert srv.stats()["max_in_flight"] == 4
    assert [(r["max_concurrency"], r["completed"], r["failed"]) for r in out["runs"]] == [(0, 4, 0)]


def test_sweep_concurrency_inf_is_not_an_int(bench_args, capsys):
    """vLLM's --max-concurrency is an int: "inf" is argparse's error there and here."""
    with pytest.raises(SystemExit):
        bench_args(["sweep", "--max-concurrency-list", "inf"])
    assert "argument --max-concurrency-list: invalid int value: 'inf'" in capsys.readouterr().err


def test_markdown_table_formats_missing_values():
    table = markdown_table([{"max_concurrency": None, "request_rate": 4.0, "completed": 2, "failed": 1,
                             "request_throughput": 1.234, "output_throughput": 10.0}])
    assert "| - | 4.0 | 2 | 1 | 1.23 | 10.0 |" in table
