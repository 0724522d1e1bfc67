"""thinking_token_budget (vLLM 0.26's meaning): with budget N, once the open reasoning section
holds N tokens (counted from `<think>`, prompt included) the next token is `</think>`, then
decoding goes on freely. A one-layer Llama with the real DeepSeek-R1 tokenizer whose greedy
next token is a function of the current one (tests/chain_model.py) makes every output exact:
after `<think>` or the template's `\\n` it repeats " a" forever, after `</think>` it answers."""
from __future__ import annotations

import json

import pytest

from deepserve import LLM, SamplingParams
from deepserve.engine.llm_engine import RequestError
from deepserve.engine.sequence import Sequence
from deepserve.engine.thinking_budget import ThinkingBudget
from tests.chain_model import write_chain_model
from tests.conftest import TOKENIZERS

R1 = TOKENIZERS / "deepseek-r1"
THINK, END, NL, A, NN, ANSWER, HI, C, D, EOS = 128798, 128799, 201, 260, 271, 7805, 23166, 274, 283, 1
DELIMS = ((THINK,), (END,))
# the answer after </think>
TAIL = [END, NN, ANSWER, EOS]
CHAIN = {NL: A, A: A, THINK: A, END: NN, NN: ANSWER, ANSWER: EOS, HI: THINK, C: D, D: END}
CHAT = [0, HI, THINK, NL]        # as R1's template renders a turn: the prompt opens "<think>\n"
OPENS = [0, NN, HI]              # no reasoning in the prompt: the model opens it ("Hi" -> <think>)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    if not R1.is_dir():
        pytest.skip(f"{R1} not found (CI clones the repo beside shared/)")
    folder = write_chain_model(tmp_path_factory.mktemp("think") / "chain", CHAIN, R1, EOS)
    return LLM(str(folder), num_gpu_blocks_override=256, block_size=4)


def budget(n, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 24, "thinking_token_budget": n,
                             "reasoning_token_ids": DELIMS, **kw})


def tokens(llm, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def test_without_a_budget_the_model_reasons_until_max_tokens(llm):
    assert tokens(llm, [CHAT], budget(None)) == [[A] * 24]
    assert tokens(llm, [CHAT], budget(-1)) == [[A] * 24]       # vLLM's "unlimited"


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_the_end_comes_after_n_reasoning_tokens_prompt_newline_included(llm, n):
    # the template's "\n" after <think> is the first reasoning token (vLLM counts it too)
    assert tokens(llm, [CHAT], budget(n)) == [[A] * max(n - 1, 0) + TAIL]


@pytest.mark.parametrize("n", [0, 3])
def test_reasoning_the_model_opens_counts_from_its_think(llm, n):
    assert tokens(llm, [OPENS], budget(n)) == [[THINK] + [A] * n + TAIL]


def test_a_natural_end_within_the_budget_is_left_alone(llm):
    prompt = [0, HI, THINK, NL, C]                     # two reasoning tokens, then D, then </think>
    assert tokens(llm, [prompt], budget(5)) == [[D] + TAIL]
    assert tokens(llm, [prompt], budget(2)) == [TAIL]  # spent in the prompt: </think> at once
    closed = [0, HI, THINK, NL, END, NN]               # reasoning closed in the prompt: nothing to force
    assert tokens(llm, [closed], budget(0)) == [[ANSWER, EOS]]


def test_rows_with_and_without_budgets_in_one_batch(llm):
    prompts = [CHAT, OPENS, CHAT, CHAT]
    params = [budget(3), budget(2), budget(None), budget(4, top_k=1, temperature=1.0, seed=7)]
    want = [[A, A] + TAIL, [THINK, A, A] + TAIL, [A] * 24, [A] * 3 + TAIL]   # the last one sampled (top_k 1)
    assert tokens(llm, prompts, params) == want


def test_speculative_and_async_engines_honour_it(llm, tmp_path):
    folder = llm.engine.config.model.model
    want = [[A] * 2 + TAIL, [A] * 24]
    for extra in ({"speculative_config": json.dumps({"method": "ngram", "num_speculative_tokens": 3,
                                                     "prompt_lookup_min": 1, "prompt_lookup_max": 2})},
                  {"async_scheduling": True}):
        other = LLM(str(folder), num_gpu_blocks_override=256, block_size=4, **extra)
        assert tokens(other, [CHAT, CHAT], [budget(3), budget(None)]) == want, extra
        other.shutdown()


@pytest.mark.parametrize("bad", [-2, 1.5, True, "8"])
def test_budget_values_vllm_refuses(bad):
    with pytest.raises(ValueError, match="thinking_token_budget must be a non-negative integer or -1"):
        SamplingParams(thinking_token_budget=bad)


def test_offline_llm_takes_vllms_reasoning_parser(llm):
    folder = llm.engine.config.model.model
    offline = LLM(str(folder), num_gpu_blocks_override=64, block_size=4, reasoning_parser="deepseek_r1")
    assert offline.reasoning_token_ids == DELIMS
    params = SamplingParams(temperature=0, max_tokens=24, thinking_token_budget=3)
    assert tokens(offline, [CHAT], params) == [[A, A] + TAIL]
    assert params.reasoning_token_ids is None          # the caller's params are left as given
    offline.shutdown()


def test_a_budget_without_reasoning_delimiters_is_refused(llm):
    with pytest.raises(RequestError, match="--reasoning-parser deepseek_r1"):
        llm.generate({"prompt_token_ids": CHAT}, SamplingParams(thinking_token_budget=4))
    with pytest.raises(ValueError, match="reasoning_token_ids must be two non-empty"):
        SamplingParams(thinking_token_budget=4, reasoning_token_ids=((), (END,)))


def test_delimiters_of_several_tokens():
    """Tags that tokenize to several tokens (a tokenizer without <think> as one token): the start
    opens a section once whole, and the end's tokens are forced one step each."""
    start, end = (7, 8), (5, 6)
    seq = Sequence("r", 0, [1, 7, 8, 2], budget(3, reasoning_token_ids=(start, end)))
    state = ThinkingBudget(seq)
    for _ in range(10):
        forced = state.forced_token(seq.token_ids)
        seq.token_ids.append(forced if forced is not None else 9)
    # 2 (prompt), 9, 9: three reasoning tokens, then 5, 6; free again
    assert seq.output_token_ids == [9, 9, 5, 6] + [9] * 6
    seq = Sequence("r", 0, [1, 2], budget(1, reasoning_token_ids=(start, end)))
    state = ThinkingBudget(seq)
    for tok in [7, 8, 9]:        # the model opens reasoning itself
        assert state.forced_token(seq.token_ids) is None
        seq.token_ids.append(tok)
    assert [state.forced_token(seq.token_ids + [5][:k]) for k in (0, 1)] == [5, 6]


@pytest.mark.parametrize("reasoning_parser", [None, "deepseek_r1"])
def test_offline_grammar_starts_after_the_reasoning_the_prompt_opened(llm, reasoning_parser):
    """LLM(reasoning_parser="deepseek_r1") with structured outputs: the prompt opened <think>, so
    the grammar holds from </think> on and the model reasons first (vLLM's offline engine); it
    held from the first token, inside the reasoning. Without a reasoning parser it still does."""
    from deepserve.engine.sampling_params import GuidedDecoding

    folder = llm.engine.config.model.model
    offline = LLM(str(folder), num_gpu_blocks_override=64, block_size=4, reasoning_parser=reasoning_parser)
    answer = offline.tokenizer.decode([NN, ANSWER], skip_special_tokens=True)
    params = SamplingParams(temperature=0, max_tokens=12, structured_outputs=GuidedDecoding(choice=[answer]))
    [out] = offline.generate([{"prompt_token_ids": [0, HI, THINK, C]}], params, use_tqdm=False)
    if reasoning_parser is None:
        assert out.outputs[0].text == answer
    else:
        assert list(out.outputs[0].token_ids) == [D] + TAIL
    assert params.guided.start_after_token is None   # the caller's params are left as given
    offline.shutdown()


@pytest.mark.parametrize("kwargs,in_reasoning", [
    (dict(structured_outputs_config={"reasoning_parser": "deepseek_r1"}), False),
    (dict(reasoning_parser="deepseek_r1", structured_outputs_config={"enable_in_reasoning": True}), True)])
def test_offline_structured_outputs_config_reasoning_keys(llm, kwargs, in_reasoning):
    """vLLM's structured_outputs_config offline: its reasoning_parser is LLM's reasoning_parser (the
    grammar holds from </think>), enable_in_reasoning makes the grammar hold from the first token."""
    from deepserve.engine.sampling_params import GuidedDecoding

    offline = LLM(str(llm.engine.config.model.model), num_gpu_blocks_override=64, block_size=4, **kwargs)
    answer = offline.tokenizer.decode([NN, ANSWER], skip_special_tokens=True)
    params = SamplingParams(temperature=0, max_tokens=12, structured_outputs=GuidedDecoding(choice=[answer]))
    [out] = offline.generate([{"prompt_token_ids": [0, HI, THINK, C]}], params, use_tqdm=False)
    if in_reasoning:
        assert out.outputs[0].text == answer
    else:
        assert list(out.outputs[0].token_ids) == [D] + TAIL
    offline.shutdown()


@pytest.mark.parametrize("prompt, waits", [([0, C], True), ([0, THINK, END, C], False)], ids=["no tag", "closed"])
def test_offline_grammar_waits_unless_the_prompt_closed_the_reasoning(llm, prompt, waits):
    """vLLM's is_reasoning_end on the prompt: one with no think tag (R1's templates after tool
    results) leaves the reasoning open, so the grammar holds from </think> on; one whose last tag
    is </think> has the grammar from the first token."""
    from deepserve.engine.sampling_params import GuidedDecoding

    offline = LLM(str(llm.engine.config.model.model), num_gpu_blocks_override=64, block_size=4,
                  reasoning_parser="deepseek_r1")
    answer = offline.tokenizer.decode([NN, ANSWER], skip_special_tokens=True)
    params = SamplingParams(temperature=0, max_tokens=12, structured_outputs=GuidedDecoding(choice=[answer]))
    [out] = offline.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    if waits:
        assert list(out.outputs[0].token_ids) == [D] + TAIL
    else:
        assert out.outputs[0].text == answer
    offline.shutdown()
