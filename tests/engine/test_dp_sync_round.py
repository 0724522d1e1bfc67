"""The DP engine core's sync rounds (expert parallel: the cores agree on each step's shape before
it runs, engine/engine_core.EngineCore._run_in_sync), run in one process over one core (the
all-reduce of the agreement taken as the identity): each step's inputs are flattened once
(DriverRunner.host_inputs), and what the core reports before the step (whether it runs as
decode-graph rows, its rows, its longest sequence) is what the step then runs, for plain mixed
steps and for speculative decoding's verify steps beside prompt chunks (DriverRunner.runs_as_rows);
greedy tokens equal plain decoding's."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch.distributed as dist

from deepserve import LLM, SamplingParams
from deepserve.engine import spec_decode
from deepserve.engine.core_messages import DeltaWriter
from deepserve.engine.engine_core import EngineCore, _state_itself
from deepserve.engine.step_inputs import DPSync
from tests.engine.eager_graphs import install

PROMPTS = ["The ball was very happy. The ball was very happy. The ball was",
           "Tom and Lily went to the park. Tom and Lily went to the", "Once upon a time", "Lily had a cat"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}


def _core(llm) -> EngineCore:
    """An EngineCore over `llm`'s engine without sockets: it stops once no request is left."""
    engine = llm.engine
    core = object.__new__(EngineCore)
    core.__dict__.update(engine=engine, executor=SimpleNamespace(sent_bytes=0, count=False), runner=engine.runner,
                         dp_rank=0, sync_group="the cores' group", client_of={}, work=[], queued_adds={},
                         deltas=DeltaWriter(), stopping=False, outboxes=[None], gauges_sent=[0.0])
    engine.output_of = _state_itself
    core._send = lambda msg, client=0: None

    def receive(timeout_s):
        core.stopping = not engine.has_unfinished_requests()
    core._receive = receive
    return core


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("speculative", [None, NGRAM], ids=["plain", "ngram"])
def test_sync_rounds_flatten_once_and_report_what_runs(speculative, async_scheduling, monkeypatch):
    kw = dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=16, enable_prefix_caching=False,
              async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0, max_tokens=20)
    want = [o.outputs[0].token_ids for o in LLM(**kw).generate(PROMPTS, params)]
    llm = LLM(**kw, mixed_graph_tokens=6, speculative_config=speculative)
    install(llm, max_bs=4 * 4 + 6)
    engine, runner = llm.engine, llm.engine.runner
    seqs = [engine.requests[engine.add_request(None, p, params)].seqs[0] for p in PROMPTS]
    reported, ran, flattened, decided, verified = [], [], [], [], []
    real_verify = spec_decode.verify_inputs
    monkeypatch.setattr(spec_decode, "verify_inputs", lambda *a: (verified.append(1), real_verify(*a))[1])
    monkeypatch.setattr(dist, "all_reduce", lambda v, op, group: reported.append(DPSync.from_list(v.tolist())))
    real_run, real_flatten, real_rule = runner.run_step, runner.host_inputs, runner.runs_as_rows
    monkeypatch.setattr(runner, "run_step", lambda msg, *a, **k: (ran.append(msg.inputs), real_run(msg, *a, **k))[1])
    monkeypatch.setattr(runner, "host_inputs", lambda batch: (flattened.append(batch), real_flatten(batch))[1])
    monkeypatch.setattr(runner, "runs_as_rows", lambda batch: (decided.append(
        (batch.num_decodes < len(batch.seqs), real_rule(batch))), decided[-1][1])[1])
    _core(llm)._run_in_sync()
    assert [s.output_token_ids for s in seqs] == want
    rounds = [r for r in reported if r.has_work]
    assert len(rounds) == len(ran) == engine.stats["steps"]
    # each step flattened once, when it runs (verify steps build their own inputs, with the drafts)
    assert len(flattened) + len(verified) == len(ran)
    assert bool(verified) == (speculative is not None) and (len(flattened) > 0) == (async_scheduling or not verified)
    for r, inputs in zip(rounds, ran):
        assert r.mixed == (not inputs.decode_only)                    # runs as rows as reported
        # (drafts reach at most k past the longest sequence, never past max_model_len, which the graphs cover)
        assert inputs.num_tokens <= r.num_tokens and max(inputs.seq_lens) <= r.longest + runner.num_drafts
    assert any(r.mixed for r in rounds)                              # prompts of more than 6 tokens
    assert (True, True) in decided                                    # small mixed steps as rows
    if speculative is not None:
        assert engine.gauges()["spec_decode_num_drafts"] > 0
