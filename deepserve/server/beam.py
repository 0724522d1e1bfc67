"""vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions: `n` beams, each
prompt's best n hypotheses as its n choices, best first (engine/beam_search.py runs the
search). vLLM's beam search honours n, max_tokens, ignore_eos, length_penalty and
include_stop_str_in_output (temperature and seed are taken and change nothing: the scores are
raw logprobs); the sampling fields it would drop silently (stop strings, penalties, top_p, ...)
are a 400 naming them here, as are streamed completions and logprob_token_ids (vLLM refuses
both). logprobs / top_logprobs come from the steps' logprobs, as vLLM's."""
from __future__ import annotations

from typing import AsyncIterator, Optional

from deepserve.engine.beam_search import BeamSearchParams, beam_search
from deepserve.engine.outputs import RequestOutput
from deepserve.engine.sampling_params import SamplingParams
from deepserve.server.errors import APIError

# request fields beam search does not apply, with the values that ask for nothing
_NOT_WITH_BEAMS = {
    "stop": (None, "", []), "stop_token_ids": (None, []), "top_p": (None, 1.0), "top_k": (None, 0, -1),
    "min_p": (None, 0.0), "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "repetition_penalty": (None, 1.0),
    "min_tokens": (0,), "logit_bias": (None, {}), "allowed_token_ids": (None,), "bad_words": (None, []),
    "logprob_token_ids": (None, []), "prompt_logprobs": (None,), "thinking_token_budget": (None,),
}


def beam_params(req, params: SamplingParams, guided_field: Optional[str], prompt_tokens: int,
                max_model_len: int, stream_refused: bool) -> BeamSearchParams:
    """The BeamSearchParams of a request with use_beam_search (its SamplingParams already
    checked); 400 naming a field beam search cannot honour."""
    for name, nothing in _NOT_WITH_BEAMS.items():
        if getattr(req, name, None) not in nothing:
            raise APIError(400, f"{name} is not supported with use_beam_search", param=name)
    if params.guided is not None:
        field = guided_field or "structured_outputs"
        raise APIError(400, f"{field} (structured output) is not supported with use_beam_search", param=field)
    if stream_refused and req.stream:   # vLLM's rule for completions
        raise APIError(400, "streaming is not supported with use_beam_search", param="stream")
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - prompt_tokens
    if max_tokens < 1:
        raise APIError(400, f"{req.max_tokens_field()} must be >= 1 with use_beam_search, got {max_tokens}",
                       param=req.max_tokens_field())
    return BeamSearchParams(beam_width=params.n, max_tokens=max_tokens, ignore_eos=params.ignore_eos,
                            temperature=params.temperature, length_penalty=req.length_penalty,
                            include_stop_str_in_output=params.include_stop_str_in_output)


def check_length_penalty(req) -> None:
    """length_penalty asks for beam search's scoring: refused without it (vLLM's default 1 passes)."""
    if not req.use_beam_search and req.length_penalty != 1.0:
        raise APIError(400, "length_penalty is only used by beam search (use_beam_search true)",
                       param="length_penalty")


def beam_stream(state, prompt: dict, bparams: BeamSearchParams, params: SamplingParams,
                request_id: str) -> AsyncIterator[RequestOutput]:
    """The search's one finished RequestOutput, where a request's engine stream would be."""
    tokenizer = state.tokenizer
    skip = params.skip_special_tokens

    def decode(ids: list[int]) -> str:
        # after the prompt's last tokens, as a request's streamed text: decoded alone, a
        # SentencePiece hypothesis would lose its first token's leading space
        if tokenizer is None:
            return ""
        stream = tokenizer.decode_stream(prompt["prompt_token_ids"], skip_special_tokens=skip)
        for token_id in ids:
            stream.add(token_id)
        return stream.text
    return beam_search(state.llm, prompt, bparams, request_id, state.llm.engine.eos_token_ids, decode,
                       logprobs=params.logprobs or 0, priority=params.priority,
                       prompt_logprobs=params.prompt_logprobs)
