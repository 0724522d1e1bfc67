"""Pipeline stages in one process, no process group: stories260k's two stages
(PipelineStage.compute, engine/pipeline.py), one after the other, give the whole model's logits
over a prefill and the decode step after it (each stage writes and reads its own layers' KV).
On CUDA each stage's decode step replays its own graph (engine/pipeline_graphs.py) and still
gives the whole model's eager logits."""
from __future__ import annotations

import pytest
import torch

from deepserve.config import EngineArgs
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.engine.model_runner import ModelRunner
from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.scheduler import ScheduledBatch
from deepserve.engine.sequence import Sequence
from deepserve.engine.step_inputs import StepInputs
from deepserve.platforms import get_platform
from tests.conftest import DEMO_MODEL

BS = 4


def _runner(device: str, pctx=None, **kw) -> ModelRunner:
    args = EngineArgs(model=str(DEMO_MODEL), device=device, dtype="float32", block_size=BS, max_model_len=64,
                      max_num_seqs=4, num_gpu_blocks_override=32, cuda_graph_sizes=[1, 2, 4], **kw)
    return ModelRunner(args.create_engine_config(), get_platform(device), pctx)


def _steps():
    """A prefill of two prompts, then one decode token each: their StepInputs."""
    seqs = [Sequence("a", 0, [1, 40, 41, 26, 7, 9, 11], SamplingParams()),
            Sequence("b", 0, list(range(3, 13)), SamplingParams())]
    seqs[0].block_table, seqs[1].block_table = [0, 1, 2], [3, 4, 5]
    prefill = StepInputs.from_batch(ScheduledBatch(seqs, [s.num_tokens for s in seqs], 0), BS)
    for s, t in zip(seqs, (50, 60)):
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(t)
    decode = StepInputs.from_batch(ScheduledBatch(seqs, [1, 1], 2), BS)
    return prefill, decode


def _stages_against_whole(monkeypatch, device: str, **stage_kw):
    # (the engine's config says one stage; the start-up log's plan would look up stage 2 of 1,
    # and the start-up op count runs a step through the stages, which here have no peers)
    monkeypatch.setattr("deepserve.engine.model_runner.planned_weight_text", lambda *a: "")
    monkeypatch.setattr(ModelRunner, "_count_op_calls", lambda self: None)
    whole = _runner(device, enforce_eager=True)
    stages = [_runner(device, ParallelContext(pp_rank=r, pp_size=2), **stage_kw) for r in range(2)]
    held = [len(s.kv_layers) for s in stages]
    assert min(held) > 0 and sum(held) == len(whole.kv_layers)
    out = []
    for inputs in _steps():
        ids, positions, meta = whole.to_device(inputs)
        want = whole.forward_logits(ids, positions, meta)
        with torch.inference_mode():
            hidden = stages[0].pipeline.compute(ids, positions, meta)
            assert hidden.shape == (2, inputs.num_tokens, whole.config.model.hf_config.hidden_size)
            got = stages[1].pipeline.compute(ids, positions, meta, hidden)
        out.append((meta, want.float(), got))
    return stages, out


def test_two_stages_give_the_whole_models_logits(monkeypatch):
    _, steps = _stages_against_whole(monkeypatch, "cpu")
    for _, want, got in steps:
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_stage_graphs_replay_decode_and_give_the_whole_models_logits(monkeypatch):
    replays = []
    real = __import__("deepserve.engine.pipeline_graphs", fromlist=["StageGraphRunner"]).StageGraphRunner.run_stage

    def counting(self, *a, **k):
        replays.append(self.first)
        return real(self, *a, **k)
    monkeypatch.setattr("deepserve.engine.pipeline_graphs.StageGraphRunner.run_stage", counting)
    stages, steps = _stages_against_whole(monkeypatch, "cuda", ops="triton")
    assert all(s.graphs is not None and s.graphs.enabled for s in stages)
    assert replays == [True, False]                # the decode step only, on both stages
    for _, want, got in steps:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
