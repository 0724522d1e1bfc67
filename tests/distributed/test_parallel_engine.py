"""Multi-process layouts on CPU (gloo): TP=2, PP=2, EP=2, DP=2 (plain) and DP=2 x EP=2
(data-parallel attention) give the greedy outputs of TP=1 (synchronous scheduling, the CPU's
default; tests/engine/test_async_scheduling.py runs them async), the driver sends its workers
typed step messages, and a worker that dies is reported by rank, host and exit code instead
of hanging."""
import dataclasses
import os
import signal
import time

import numpy as np
import pytest
import transformers

from deepserve import LLM, SamplingParams
from deepserve.engine.step_channel import StepChannel
from deepserve.engine.step_inputs import StepInputs, StepMessage, Stop
from tests.models.hf_reference import save_tiny

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [1]}, {"prompt_token_ids": [1, 40, 41, 26, 7, 9, 11]},
           {"prompt_token_ids": list(range(3, 30))}]


def tiny_deepseek(path):
    cfg = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=256, tie_word_embeddings=False)
    save_tiny(transformers.DeepseekV3ForCausalLM, cfg, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.conftest import DEMO_MODEL
    return {"llama": str(DEMO_MODEL), "deepseek": str(tiny_deepseek(tmp_path_factory.mktemp("dsv3")))}


def _outputs(model, **kw):
    llm = LLM(model, block_size=4, max_model_len=128, **kw)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def single_process():
    """A model's (folder, engine kwargs) -> its one-process outputs, each run once per module."""
    seen = {}

    def outputs(model, **kw):
        key = (model, tuple(sorted(kw.items())))
        if key not in seen:
            seen[key] = _outputs(model, **kw)
        return seen[key]
    return outputs


@pytest.mark.parametrize("name", ["llama", "deepseek"])
@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2},
                                    {"tensor_parallel_size": 2, "enable_expert_parallel": True},
                                    {"data_parallel_size": 2},
                                    {"data_parallel_size": 2, "enable_expert_parallel": True},
                                    {"data_parallel_size": 2, "pipeline_parallel_size": 2}],
                         ids=["tp2", "pp2", "ep2", "dp2", "dp2-ep2", "dp2-pp2"])
def test_layout_matches_single_process(models, single_process, name, layout):
    if name == "llama" and layout.get("enable_expert_parallel"):
        pytest.skip("a dense model has no experts")
    assert _outputs(models[name], **layout) == single_process(models[name])


def _plain_values(value) -> bool:
    """Whether `value` holds only dataclasses, numbers, arrays and lists of those (no dict)."""
    if dataclasses.is_dataclass(value):
        return all(_plain_values(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return all(_plain_values(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, np.ndarray))


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_driver_sends_typed_step_messages(models, single_process, monkeypatch, layout):
    """What the driver sends its workers each step is a StepMessage dataclass around a
    StepInputs (then a Stop), never a dict of strings."""
    sent, send = [], StepChannel.send
    monkeypatch.setattr(StepChannel, "send", lambda self, msg: (sent.append(msg), send(self, msg))[1])
    assert _outputs(models["llama"], **layout) == single_process(models["llama"])
    steps = [m for m in sent if isinstance(m, StepMessage)]
    assert len(steps) >= GREEDY.max_tokens and isinstance(sent[-1], Stop)   # a step per token at least
    assert len(steps) == len(sent) - 1 and all(isinstance(m.inputs, StepInputs) for m in steps)
    assert all(_plain_values(m) for m in steps)


def test_dead_worker_is_reported(models, monkeypatch):
    monkeypatch.setenv("DEEPSERVE_DIST_TIMEOUT", "20")
    llm = LLM(models["llama"], block_size=4, tensor_parallel_size=2)
    executor = llm.engine.executor
    try:
        os.kill(executor.procs[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) on host .* exited with code -9"):
            for _ in range(50):
                llm.generate(PROMPTS[0], GREEDY)
                time.sleep(0.2)
        assert time.monotonic() - start < 30
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def dummy_deepseek_config(tmp_path_factory):
    """A config.json alone: the model gets `--load-format dummy` weights."""
    import json
    cfg = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("dummy_cfg")
    (folder / "config.json").write_text(json.dumps(dict(cfg.to_dict(), architectures=["DeepseekV3ForCausalLM"])))
    return str(folder)


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2},
                                    {"tensor_parallel_size": 2, "enable_expert_parallel": True}],
                         ids=["tp2", "ep2"])
def test_dummy_weights_are_layout_independent(dummy_deepseek_config, single_process, layout):
    """Random weights are drawn per checkpoint tensor, so any layout serves the same model."""
    assert (_outputs(dummy_deepseek_config, load_format="dummy", **layout)
            == single_process(dummy_deepseek_config, load_format="dummy"))
