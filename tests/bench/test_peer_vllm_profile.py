"""benchmarks/peer_vllm.py --profile: a start_profile that comes after its case's run has ended
(DELAY_S longer than the run) is named, since the trace then holds none of the run's steps;
several cases profiled in one start of each server, each case's traces in its own folder."""
from __future__ import annotations

import sys

import pytest

from tests.bench.conftest import BENCHMARKS, benchmark_module

sys.path.insert(0, str(BENCHMARKS))      # peer_vllm imports its neighbour random_checkpoint
pv = benchmark_module("peer_vllm")


def test_start_after_the_run_is_named():
    msg = pv.profile_too_late(t_started=130.0, t_end=124.0, t_run=100.0)
    assert "30 s into a run that ended after 24 s" in msg and "DELAY_S" in msg


def test_start_inside_the_run_is_fine():
    assert pv.profile_too_late(t_started=105.0, t_end=124.0, t_run=100.0) == ""


def test_parse_profile_takes_several_cases():
    assert pv.parse_profile("c256:3:60,sharegpt:5:150", ["c1", "c256", "sharegpt"]) == {
        "c256": (3.0, 60), "sharegpt": (5.0, 150)}
    with pytest.raises(ValueError, match="'c64' is not among --cases"):
        pv.parse_profile("c64:3:60", ["c256"])
    with pytest.raises(ValueError, match="CASE:DELAY_S:STEPS"):
        pv.parse_profile("c256:3", ["c256"])


def test_move_traces_files_each_case_apart(tmp_path):
    (tmp_path / "a.pt.trace.json.gz").write_bytes(b"x")
    (tmp_path / "b.pt.trace.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("kept")
    assert pv.move_traces(tmp_path, "c256", settle_s=0) == 2
    (tmp_path / "c.pt.trace.json.gz").write_bytes(b"y")
    assert pv.move_traces(tmp_path, "sharegpt", settle_s=0) == 1
    assert sorted(p.name for p in (tmp_path / "c256").iterdir()) == ["a.pt.trace.json.gz", "b.pt.trace.json"]
    assert [p.name for p in (tmp_path / "sharegpt").iterdir()] == ["c.pt.trace.json.gz"]
    assert (tmp_path / "notes.txt").exists()
