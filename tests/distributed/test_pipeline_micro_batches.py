"""Pipeline parallel with micro-batches in flight (PP=2 over gloo, spawned processes): the
engine keeps two micro-batches of disjoint sequences on their way through the stages at
once, and gives one process's outputs: greedy on stories260k and a tiny DeepSeek-V3 (MLA +
MoE), and on stories260k sampling parameters that read the token history (penalties,
logprobs), seeded sampling with n=2, stop strings and preemption by recompute in a small
pool; an abort while its sequences are in flight frees their blocks, and every block comes
back. n-gram speculative decoding over the stages equals plain decoding."""
import pytest
import torch

from deepserve import LLM, SamplingParams
from tests.conftest import DEMO_MODEL
from tests.distributed.test_parallel_engine import tiny_deepseek

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [1] + list(range(3, 3 + 5 * i))} for i in range(6)]


@pytest.fixture
def model(request, tmp_path_factory):
    if request.param == "deepseek":
        return str(tiny_deepseek(tmp_path_factory.mktemp("dsv3")))
    return str(DEMO_MODEL)


def _run(model, prompts, params, **kw):
    """(token ids, text, finish reason, logprob ids) of every completion, and the engine's
    most micro-batches in flight at once (None with one stage)."""
    llm = LLM(model, block_size=4, max_model_len=128, **kw)
    try:
        outs = llm.generate(prompts, params)
        engine = llm.engine
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        assert not any(s.in_flight for s in engine.scheduler.running)
        pipe = engine.micro_batches
        return ([[(c.token_ids, c.text, c.finish_reason, [sorted(d) for d in c.logprobs or []])
                  for c in o.outputs] for o in outs],
                pipe.most_in_flight if pipe is not None else None, engine.scheduler.num_preemptions)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("model", ["llama", "deepseek"], indirect=True)
def test_micro_batches_in_flight_give_one_process_greedy(model):
    want, _, _ = _run(model, PROMPTS, GREEDY)
    got, most, _ = _run(model, PROMPTS, GREEDY, pipeline_parallel_size=2)
    assert most == 2            # both stages had a micro-batch at once
    assert got == want


def _params(i: int) -> SamplingParams:
    kinds = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=14, repetition_penalty=1.3, logprobs=2),
             SamplingParams(temperature=0.8, seed=i, max_tokens=16, n=2),
             SamplingParams(temperature=0, max_tokens=30, stop=[" ball", "."])]
    return kinds[i % len(kinds)]


def test_sampling_preemption_and_abort_with_micro_batches_in_flight():
    words = "the little dog saw a big red ball and ran to the park with his friend Tom".split()
    greedy20 = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = LLM(str(DEMO_MODEL), block_size=4, max_model_len=128)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(" ".join(words[: 1 + (i * 5) % len(words)]))} for i in range(12)]
    alone = {f"r{i}": llm.generate(prompts[i + 4], greedy20)[0].outputs[0].token_ids for i in (0, 2, 3)}
    llm.shutdown()
    params = [_params(i) for i in range(len(prompts))]
    # 40 blocks of 4 tokens cannot hold 12 requests (15 sequences) of up to ~45 tokens
    small = {"num_gpu_blocks_override": 40, "enable_prefix_caching": False}
    want, _, _ = _run(str(DEMO_MODEL), prompts, params, **small)
    got, most, preemptions = _run(str(DEMO_MODEL), prompts, params, pipeline_parallel_size=2, **small)
    assert most == 2 and preemptions > 0
    assert got == want
    assert any(c[2] == "stop" for o in want for c in o)

    llm = LLM(str(DEMO_MODEL), block_size=4, max_model_len=128, pipeline_parallel_size=2)
    try:
        engine = llm.engine
        for i in range(4):
            engine.add_request(f"r{i}", prompts[i + 4], greedy20)
        aborted = engine.requests["r1"].seqs[0]
        for _ in range(8):                             # until r1 is in flight beside another micro-batch
            engine.step()
            if aborted.in_flight and engine.micro_batches.most_in_flight == 2:
                break
        assert aborted.in_flight and not aborted.is_finished
        engine.abort_request("r1")                     # its blocks go now; its micro-batch still runs
        assert aborted.block_table == [] and aborted.is_finished
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.request_id != "r1"
                done[out.request_id] = out.outputs[0].token_ids
        assert not engine.micro_batches.in_flight and not aborted.in_flight
        assert done == alone
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    finally:
        llm.shutdown()


def test_reset_prefix_cache_preempting_micro_batches_in_flight():
    """reset_prefix_cache(reset_running_requests=True) while a micro-batch is in flight:
    True, as vLLM's (which preempts every running request), every block free and no prefix
    cached; the sequences that were in flight recompute and end with one process's tokens,
    and those their last micro-batch finished are still told."""
    prompts = PROMPTS[1:5]
    want = [o.outputs[0].token_ids for o in LLM(str(DEMO_MODEL), block_size=4, max_model_len=128)
            .generate(prompts, GREEDY)]
    llm = LLM(str(DEMO_MODEL), block_size=4, max_model_len=128, pipeline_parallel_size=2)
    try:
        engine, bm = llm.engine, llm.engine.block_manager
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, GREEDY if i else SamplingParams(temperature=0, max_tokens=1))
        done = {}
        for _ in range(3):
            for out in engine.step():
                done[out.request_id] = out.outputs[0].token_ids
        assert engine.micro_batches.in_flight and done
        assert engine.reset_prefix_cache(reset_running_requests=True)
        assert bm.num_free_blocks == bm.num_blocks and not bm.cached
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[out.request_id] = out.outputs[0].token_ids
        assert [done[f"r{i}"] for i in range(len(prompts))] == [want[0][:1]] + want[1:]
        assert bm.num_free_blocks == bm.num_blocks
    finally:
        llm.shutdown()


def test_dp2_ep_pp2_micro_batches_in_rounds_give_one_process_greedy(tmp_path):
    """DP2 x EP x PP2 (four ranks, two engine cores): the cores launch a micro-batch each per
    round (a dummy when one has none) and keep two in flight each; greedy equals one process."""
    model = str(tiny_deepseek(tmp_path / "dsv3"))
    want, _, _ = _run(model, PROMPTS, GREEDY)
    llm = LLM(model, block_size=4, max_model_len=128, data_parallel_size=2, enable_expert_parallel=True,
              pipeline_parallel_size=2)
    try:
        got = [[(c.token_ids, c.text, c.finish_reason, []) for c in o.outputs] for o in llm.generate(PROMPTS, GREEDY)]
        gauges = llm.engine.gauges()
        assert gauges["pp_most_micro_batches_in_flight"] == 2 * 2     # summed over the two cores
        assert gauges["num_free_blocks"] == gauges["num_blocks"]
        assert got == want
    finally:
        llm.shutdown()


def test_pp2_ngram_speculation_equals_plain():
    """n-gram drafts over two stages: the verify step (each sequence's last token and its
    drafts) goes through the stages like any step, drafts are accepted, and greedy tokens
    equal plain decoding in one process."""
    stories = ["Once upon a time", "Tom and Lily went to the park. Tom and Lily", "The dog saw a big red ball. The dog"]
    params = SamplingParams(temperature=0, max_tokens=24)
    with LLM(str(DEMO_MODEL), block_size=4, max_model_len=128) as plain:
        prompts = [{"prompt_token_ids": plain.get_tokenizer().encode(t)} for t in stories]
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    with LLM(str(DEMO_MODEL), block_size=4, max_model_len=128, pipeline_parallel_size=2,
             speculative_config=ngram) as llm:
        assert llm.engine.micro_batches is None and llm.engine.spec is not None
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
        assert llm.engine.gauges()["spec_decode_num_accepted_tokens"] > 0
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_pp2_stage_graphs_give_one_gpu_greedy():
    """Two GPUs over NCCL (fp32): each stage replays its decode graphs, two micro-batches are in
    flight, and greedy tokens equal one GPU running eagerly."""
    want, _, _ = _run(str(DEMO_MODEL), PROMPTS, GREEDY, dtype="float32", enforce_eager=True)
    llm = LLM(str(DEMO_MODEL), block_size=4, max_model_len=128, dtype="float32", pipeline_parallel_size=2)
    try:
        graphs = llm.engine.runner.graphs
        assert graphs is not None and graphs.enabled and graphs.first and not graphs.last
        replays, real = [], graphs.run_stage
        graphs.run_stage = lambda *a, **k: (replays.append(1), real(*a, **k))[1]
        got = [[(c.token_ids, c.text, c.finish_reason, []) for c in o.outputs] for o in llm.generate(PROMPTS, GREEDY)]
        assert replays and llm.engine.micro_batches.most_in_flight == 2
        assert got == want
    finally:
        llm.shutdown()
