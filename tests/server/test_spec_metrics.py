"""/metrics carries the engine's speculative-decoding counters under vLLM's names."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from deepserve.engine.spec_decode import SpecStats
from deepserve.server.metrics import ServerMetrics


def test_spec_decode_counters_in_the_exposition():
    stats = SpecStats()
    for drafted, accepted in ((3, 3), (3, 1), (2, 0), (0, 0)):
        stats.record(drafted, accepted)
    text = ServerMetrics("m", lambda: dict(stats.counters())).render()
    samples = {(s.name, s.labels.get("position")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    for prefix in ("vllm:", "deepserve:"):
        assert samples[(prefix + "spec_decode_num_drafts_total", None)] == 3
        assert samples[(prefix + "spec_decode_num_draft_tokens_total", None)] == 8
        assert samples[(prefix + "spec_decode_num_accepted_tokens_total", None)] == 4
        assert [samples[(prefix + "spec_decode_num_accepted_tokens_per_pos_total", str(j))] for j in range(3)] \
            == [2, 1, 1]
    assert stats.mean_acceptance_length == 1 + 4 / 3
