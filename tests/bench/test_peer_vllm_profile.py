"""benchmarks/peer_vllm.py --profile: a start_profile that comes after its case's run has ended
(DELAY_S longer than the run) is named, since the trace then holds none of the run's steps."""
from __future__ import annotations

import sys

from tests.bench.conftest import BENCHMARKS, benchmark_module

sys.path.insert(0, str(BENCHMARKS))      # peer_vllm imports its neighbour random_checkpoint
pv = benchmark_module("peer_vllm")


def test_start_after_the_run_is_named():
    msg = pv.profile_too_late(t_started=130.0, t_end=124.0, t_run=100.0)
    assert "30 s into a run that ended after 24 s" in msg and "DELAY_S" in msg


def test_start_inside_the_run_is_fine():
    assert pv.profile_too_late(t_started=105.0, t_end=124.0, t_run=100.0) == ""
