"""POST /v1/completions: one engine request per prompt (string, list of strings, token ids or
lists of token ids), each with n samples; choices are numbered prompt * n + sample as
OpenAI does (at most 16 x the n limit in all: SAMPLES_PER_N). Streams as SSE, one choice a
chunk (OpenAI's and vLLM's) with its text delta and optional logprobs, a final usage chunk when
`stream_options.include_usage` is set (on every chunk with `continuous_usage_stats`: the chunk's
prompt and choice so far, as vLLM's), then `data: [DONE]`.

`echo` with `logprobs` returns the prompt tokens' logprobs first (the first token's is None),
then the generated ones: what lm-evaluation-harness reads for loglikelihood tasks. `echo` with
`max_tokens` 0 returns the prompt alone (its logprobs with `logprobs`), finish_reason "length"
and no completion tokens, as OpenAI's legacy API and vLLM do (the engine samples one token,
which is dropped). vLLM's `prompt_logprobs` puts vLLM's per-position dicts in each choice
(each position's top k and its prompt token); a response (not a stream) with `echo` and
`logprobs` carries them too, k = `logprobs`, as vLLM's, which scores the prompt for them;
its `return_token_ids` puts the prompt's and the sample's token ids there (`prompt_token_ids`
with a choice's first chunk, `token_ids` of each chunk's new tokens).
"""
from __future__ import annotations

from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse

from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.engine.sampling_params import SamplingParams, whole_vocabulary
from deepserve.server.beam import beam_params, beam_stream, check_length_penalty
from deepserve.server.errors import APIError
from deepserve.server.protocol import (COMPLETION_CHOICE_FIELDS, COMPLETION_RESPONSE_FIELDS,
                                      COMPLETION_STREAM_CHOICE_FIELDS, CompletionRequest,
                                      final_usage, now, response_ids, with_fields)
from deepserve.server.serving_common import (ChunkFrames, SSEResponse, ServerState, api_error_from,
                                             compile_grammar, fingerprint_fields, header_request_id, merge_streams,
                                             parse_request,
                                             prompt_tokens_details, sampling_params, sse, stream_usage,
                                             tokens_as_ids, truncated_prompt, until_disconnect,
                                             usage_in_stream)


# samples (prompts x n) one completions request may ask for, in units of the n limit (4096 by default)
SAMPLES_PER_N = 16


def token_name(tid: int, text: str, as_ids: bool) -> str:
    """A logprobs entry's token: its text, or `token_id:N` (vLLM's return_tokens_as_token_ids)."""
    return f"token_id:{tid}" if as_ids else text


def _legacy_entry(entry: dict, tid: int, top_k: int, as_ids: bool, listed: bool = False) -> dict:
    """`listed`: every entry, the sampled token's and then logprob_token_ids' (vLLM's); so with
    `top_k` -1 (the whole vocabulary)."""
    return {token_name(t, lp.decoded_token, as_ids): lp.logprob for t, lp in entry.items()
            if listed or top_k == -1 or lp.rank <= top_k or t == tid}


def text_offsets(text: str, tokens: list[str], cursor: int = 0, slack: int = 4) -> tuple[list[int], int]:
    """Where each token starts in `text` (searched from `cursor`), and the cursor after them. A
    token the text does not hold there (a BOS the tokenizer added, a lone byte of a multi-byte
    character, tokens past a stop string) takes no room; up to `slack` characters may come
    before a token (a SentencePiece word whose leading space its own decoding drops)."""
    offsets = []
    for token in tokens:
        pos = text.find(token, cursor, cursor + len(token) + slack) if token else -1
        if pos >= 0:
            cursor = pos + len(token)
        offsets.append(pos if pos >= 0 else cursor)
    return offsets, cursor


def echo_logprobs(res: RequestOutput, top_k: int, decode, prompt_text: str, as_ids: bool = False) -> dict:
    """The legacy logprobs object of the prompt (echo): the first token has no logprob; text
    offsets point into `prompt_text`, where the generated tokens' offsets go on from."""
    tokens, token_logprobs, top_logprobs = [], [], []
    for tid, entry in zip(res.prompt_token_ids, res.prompt_logprobs or []):
        if entry is None:
            text, lp, top = decode(tid), None, None
        else:
            text, lp, top = entry[tid].decoded_token, entry[tid].logprob, _legacy_entry(entry, tid, top_k, as_ids)
        tokens.append(token_name(tid, text, as_ids))
        token_logprobs.append(lp)
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offsets(prompt_text, tokens)[0]}


def vllm_prompt_logprobs(res: RequestOutput, k: Optional[int] = None) -> Optional[list]:
    """vLLM's `prompt_logprobs` field: per prompt position None or {token id: {logprob, rank,
    decoded_token}}: with `k`, of its top k and its prompt token alone (the engine may have
    scored more, for echo's logprobs)."""
    if res.prompt_logprobs is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items() if k is None or lp.rank <= k or t == tid}
            for tid, e in zip(res.prompt_token_ids, res.prompt_logprobs)]


def completion_logprobs(out: CompletionOutput, start: int, end: int, top_k: int, base: int,
                        cursor: int, as_ids: bool = False, listed: bool = False) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object for tokens [start, end) of one sample, with their
    offsets in the choice's text (`base` characters of echoed prompt, then the sample's text,
    searched from `cursor` in the sample's text); and the cursor after them. `listed`: the
    request named logprob_token_ids."""
    tokens, token_logprobs, top_logprobs = [], [], []
    for tid, entry in zip(out.token_ids[start:end], (out.logprobs or [])[start:end]):
        chosen = entry[tid]
        tokens.append(token_name(tid, chosen.decoded_token, as_ids))
        token_logprobs.append(chosen.logprob)
        top_logprobs.append(_legacy_entry(entry, tid, top_k, as_ids, listed))
    offsets, cursor = text_offsets(out.text, tokens, cursor)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": [base + o for o in offsets]}, cursor


class _Prepared:
    def __init__(self, state: ServerState, req: CompletionRequest):
        self.model = state.check_model(req.model)
        self.as_ids = tokens_as_ids(state, req)
        self.listed = bool(req.logprob_token_ids)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.logprobs is not None and req.logprobs < 0:   # vLLM's rule: -1 is prompt_logprobs' and chat's alone
            raise APIError(400, f"logprobs must be >= 0 on completions, got {req.logprobs} (prompt_logprobs -1 asks "
                                "for the whole vocabulary)", param="logprobs")
        if req.prompt is None or req.prompt == "":   # vLLM's check and text (an empty id list: the engine's refusal)
            raise APIError(400, "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        try:
            prompts = req.prompts()
        except ValueError as exc:
            raise api_error_from(exc) from None
        samples, limit = len(prompts) * req.n, SAMPLES_PER_N * state.settings.max_n
        if samples > limit:  # each costs the server kilobytes before any step: 8 MB of [1] prompts were 16 GB
            raise APIError(400, f"this request asks for {samples} samples ({len(prompts)} prompts x n={req.n}); at "
                                f"most {limit} go in one request: send the prompts in several", param="prompt")
        # echo with max_tokens 0: the prompt alone (the one token the engine samples is dropped)
        self.echo_only = req.echo and req.max_new_tokens() == 0
        if self.echo_only and req.logprob_token_ids:   # vLLM's rule
            raise APIError(400, "logprob_token_ids is not supported with echo and max_tokens 0: no token is generated",
                           param="logprob_token_ids")
        self.params = sampling_params(state, req, 1 if self.echo_only else req.max_new_tokens(), req.logprobs)
        check_length_penalty(req)
        self.beams: list = []   # each prompt's BeamSearchParams with use_beam_search
        self.echo_logprobs = req.echo and req.logprobs is not None
        if self.echo_logprobs:
            self.params.prompt_logprobs = max(whole_vocabulary(self.params.prompt_logprobs or 0, state.llm.vocab_size),
                                              whole_vocabulary(req.logprobs, state.llm.vocab_size))
        # the choices' prompt_logprobs field: asked for, or (vLLM's) echo's logprobs outside a stream
        shown = req.prompt_logprobs
        if shown is None and self.echo_logprobs and not req.stream:
            shown = req.logprobs
        self.shown_prompt_logprobs = whole_vocabulary(shown, state.llm.vocab_size)
        self.prompts: list[dict] = []
        for p in prompts:
            if isinstance(p, str):
                if state.tokenizer is None:
                    raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
                self.prompts.append({"prompt": p, "prompt_token_ids": None})   # encoded by tokenize()
            else:
                bad = next((t for t in p if not 0 <= t < state.llm.vocab_size), None)
                if bad is not None:
                    raise APIError(400, f"prompt token id {bad} is outside the vocabulary "
                                        f"[0, {state.llm.vocab_size})", param="prompt")
                self.prompts.append({"prompt": None, "prompt_token_ids": list(p)})
        self.id, self.engine_id = response_ids("cmpl", req.request_id)
        self.created = now()
        self.n = req.n
        self.cache_salt = req.cache_salt

    async def tokenize(self, state: ServerState, req: CompletionRequest) -> "_Prepared":
        """Encodes the text prompts (off the event loop), then checks each prompt's length and
        whether the engine takes the request."""
        texts = [p for p in self.prompts if p["prompt_token_ids"] is None]
        if texts:
            for p, ids in zip(texts, await state.encode([p["prompt"] for p in texts], req.add_special_tokens)):
                p["prompt_token_ids"] = ids
        for p in self.prompts:
            kept = truncated_prompt(state, req, p["prompt_token_ids"], req.max_new_tokens())
            if len(kept) < len(p["prompt_token_ids"]):   # echo shows what the model saw (vLLM's)
                p["prompt"], p["prompt_token_ids"] = None, kept
            state.check_length(len(p["prompt_token_ids"]), req.max_new_tokens(), field=req.max_tokens_field(),
                               min_tokens=self.params.min_tokens)
            if req.use_beam_search:
                self.beams.append(beam_params(req, self.params, req.guided_field(), len(p["prompt_token_ids"]),
                                              state.llm.max_model_len, stream_refused=True))
        try:
            state.llm.check_can_accept()
        except Exception as exc:
            raise api_error_from(exc, state.settings.retry_after_s) from None
        return self

    def echo_logprobs_of(self, state: ServerState, res: RequestOutput, top_k: int, i: int) -> dict:
        decode = (lambda t: state.tokenizer.token_text(t, at_start=True)) if state.tokenizer else str  # the first
        return echo_logprobs(res, top_k, decode, self.prompt_text(state, i), self.as_ids)

    def prompt_text(self, state: ServerState, i: int) -> str:
        p = self.prompts[i]
        if p["prompt"] is not None:
            return p["prompt"]
        return state.tokenizer.decode(p["prompt_token_ids"]) if state.tokenizer else ""

    def echo_only_choice(self, state: ServerState, req: CompletionRequest, res: RequestOutput, i: int,
                         out: CompletionOutput) -> dict:
        """The choice of an echo request with max_tokens 0: the prompt, its logprobs, no generated token."""
        logprobs = self.echo_logprobs_of(state, res, req.logprobs, i) if self.echo_logprobs else None
        choice = {"index": i * self.n + out.index, "text": self.prompt_text(state, i), "logprobs": logprobs,
                  "finish_reason": "length", "stop_reason": None}
        if self.shown_prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(res, self.shown_prompt_logprobs)
        if req.return_token_ids:
            choice.update(prompt_token_ids=self.prompts[i]["prompt_token_ids"], token_ids=[])
        return choice

    def prompt_params(self, state: ServerState, ids: list[int]) -> SamplingParams:
        """The params for one prompt: a grammar held from </think> on where the prompt leaves
        the reasoning open (ServerState.grammar_start_after)."""
        end = state.grammar_start_after(self.params, ids)
        return self.params if end is None else self.params.with_grammar_after(end)

    def streams(self, state: ServerState) -> list[AsyncIterator[RequestOutput]]:
        params = [self.prompt_params(state, p["prompt_token_ids"]) for p in self.prompts]
        if self.beams:
            return [beam_stream(state, {**p, "cache_salt": self.cache_salt}, b, params[i], f"{self.engine_id}-{i}")
                    for i, (p, b) in enumerate(zip(self.prompts, self.beams))]
        return [state.generate({**p, "cache_salt": self.cache_salt}, params[i], f"{self.engine_id}-{i}")
                for i, p in enumerate(self.prompts)]


async def create_completion(request: Request, state: ServerState):
    req = await parse_request(request, CompletionRequest, state.settings.max_body_bytes)
    req.request_id = header_request_id(request, req.request_id)
    prep = await _Prepared(state, req).tokenize(state, req)
    await compile_grammar(state, prep.params, req.guided_field())
    if req.stream:
        return SSEResponse(sse(_stream(state, req, prep), state))
    finals: dict[int, RequestOutput] = await until_disconnect(request, _collect(prep, state))
    choices, completion_tokens = [], 0
    for i in range(len(prep.prompts)):
        res = finals[i]
        prefix = prep.prompt_text(state, i) if req.echo else ""
        for out in res.outputs:
            if prep.echo_only:
                choices.append(with_fields(prep.echo_only_choice(state, req, res, i, out), COMPLETION_CHOICE_FIELDS))
                continue
            completion_tokens += len(out.token_ids)
            logprobs = None
            if req.logprobs is not None:
                logprobs, _ = completion_logprobs(out, 0, len(out.token_ids), req.logprobs, len(prefix), 0,
                                                  prep.as_ids, prep.listed)
                if prep.echo_logprobs:
                    logprobs = _joined(prep.echo_logprobs_of(state, res, req.logprobs, i), logprobs)
            choice = {"index": i * prep.n + out.index, "text": prefix + out.text,
                      "logprobs": logprobs, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
            if prep.shown_prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(res, prep.shown_prompt_logprobs)
            if req.return_token_ids:
                choice.update(prompt_token_ids=prep.prompts[i]["prompt_token_ids"], token_ids=list(out.token_ids))
            choices.append(with_fields(choice, COMPLETION_CHOICE_FIELDS))
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prep.prompts)
    details = prompt_tokens_details(state, sum(f.num_cached_tokens for f in finals.values()))
    return JSONResponse(with_fields({"id": prep.id, "object": "text_completion", "created": prep.created,
                                     "model": prep.model, "choices": choices,
                                     "system_fingerprint": state.settings.system_fingerprint,
                                     "usage": final_usage(prompt_tokens, completion_tokens, details, stream=False)},
                                    COMPLETION_RESPONSE_FIELDS))


def _joined(first: dict, second: dict) -> dict:
    return {k: first[k] + second[k] for k in first}


async def _collect(prep: _Prepared, state: ServerState) -> dict[int, RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    try:
        async for i, out in merge_streams(prep.streams(state)):
            finals[i] = out
    except Exception as exc:
        raise api_error_from(exc, state.settings.retry_after_s) from None
    return finals


async def _stream(state: ServerState, req: CompletionRequest, prep: _Prepared) -> AsyncIterator[str]:
    include_usage, continuous = usage_in_stream(state, req)
    cached: dict[int, int] = {}        # prompt -> its prefix-cache hits
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    cursors: dict[int, int] = {}        # where the next token's text is searched from in out.text
    echoed: dict[int, int] = {}         # characters of echoed prompt
    finished: set[int] = set()
    prompt_logprobs_sent: set[int] = set()
    prompt_ids_sent: set[int] = set()
    generated: dict[int, int] = {}
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prep.prompts)

    frame = ChunkFrames(id=prep.id, object="text_completion", created=prep.created, model=prep.model)

    def chunk(choice: dict, i: int) -> str:
        """One choice's chunk (OpenAI's and vLLM's streams carry one each); its continuous usage
        counts the choice's prompt and its tokens so far, as vLLM's."""
        choice = with_fields(choice, COMPLETION_STREAM_CHOICE_FIELDS)
        if include_usage:
            n_prompt = len(prep.prompts[i]["prompt_token_ids"])
            return frame(choices=[choice], **stream_usage(continuous, n_prompt, generated.get(choice["index"], 0)))
        return frame(choices=[choice], **(fingerprint_fields(state) if choice["finish_reason"] is not None else {}))

    async for i, res in merge_streams(prep.streams(state)):
        cached[i] = res.num_cached_tokens
        for out in res.outputs:
            idx = i * prep.n + out.index
            if idx in finished or (prep.echo_only and out.finish_reason is None):
                continue
            if prep.echo_only:  # one chunk per choice, once its prompt logprobs are all in
                finished.add(idx)
                yield chunk(prep.echo_only_choice(state, req, res, i, out), i)
                continue
            text = ""
            first = idx not in sent_text
            if first:  # first chunk of this choice: the echoed prompt
                sent_text[idx], sent_tokens[idx] = 0, 0
                text = prep.prompt_text(state, i) if req.echo else ""
                echoed[idx], cursors[idx] = len(text), 0
            text += out.text[sent_text[idx]:]
            n_tok = len(out.token_ids)
            logprobs = None
            if req.logprobs is not None:
                logprobs, cursors[idx] = completion_logprobs(out, sent_tokens[idx], n_tok, req.logprobs,
                                                             echoed[idx], cursors[idx], prep.as_ids, prep.listed)
                if first and prep.echo_logprobs:
                    logprobs = _joined(prep.echo_logprobs_of(state, res, req.logprobs, i), logprobs)
            if not text and out.finish_reason is None and n_tok == sent_tokens[idx]:
                continue   # vLLM's stream has a chunk for each output that brings tokens, "" text included
            tokens_before = sent_tokens[idx]
            sent_text[idx], sent_tokens[idx] = len(out.text), n_tok
            generated[idx] = n_tok
            if out.finish_reason is not None:
                finished.add(idx)
            choice = {"index": idx, "text": text, "logprobs": logprobs,
                      "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
            if req.return_token_ids:
                if idx not in prompt_ids_sent:
                    choice["prompt_token_ids"] = prep.prompts[i]["prompt_token_ids"]
                    prompt_ids_sent.add(idx)
                choice["token_ids"] = list(out.token_ids[tokens_before:n_tok])
            if prep.shown_prompt_logprobs is not None and idx not in prompt_logprobs_sent:  # with its first chunk
                choice["prompt_logprobs"] = vllm_prompt_logprobs(res, prep.shown_prompt_logprobs)
                prompt_logprobs_sent.add(idx)
            yield chunk(choice, i)
    if include_usage:
        details = prompt_tokens_details(state, sum(cached.values()))
        yield frame(choices=[], usage=final_usage(prompt_tokens, sum(generated.values()), details, stream=True),
                    **fingerprint_fields(state))
