"""POST /v1/chat/completions: messages rendered with the model's chat template (or
--chat-template), n samples, logprobs/top_logprobs, streaming deltas, usage, and with
--reasoning-parser the R1 split into `reasoning_content` (and `reasoning`, the newer name)
and `content`, the same way streamed and not.
"""
from __future__ import annotations

from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse

from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.server.errors import APIError
from deepserve.server.protocol import ChatCompletionRequest, now, random_id, usage
from deepserve.server.reasoning import make_parser
from deepserve.server.serving_common import (SSEResponse, ServerState, api_error_from, merge_streams,
                                             parse_request, sse, until_disconnect)


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(out: CompletionOutput, start: int, end: int, top_k: int) -> dict:
    """OpenAI's chat logprobs object for tokens [start, end) of one sample."""
    content = []
    for tid, entry in zip(out.token_ids[start:end], (out.logprobs or [])[start:end]):
        chosen = entry[tid]
        top = sorted((lp for lp in entry.values() if lp.rank <= top_k), key=lambda lp: lp.rank)
        item = _entry(chosen.decoded_token, chosen.logprob)
        item["top_logprobs"] = [_entry(lp.decoded_token, lp.logprob) for lp in top]
        content.append(item)
    return {"content": content}


def render_messages(state: ServerState, req: ChatCompletionRequest) -> tuple[str, list[int]]:
    tok = state.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat", param="messages")
    try:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        text = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                       **(req.chat_template_kwargs or {}))
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return text, tok.encode(text, add_special_tokens=False)


class _Prepared:
    def __init__(self, state: ServerState, req: ChatCompletionRequest):
        self.model = state.check_model(req.model)
        max_tokens = req.max_new_tokens()
        try:
            self.top_k = req.num_logprobs()
            self.params = req.sampling_params(max_tokens, self.top_k)
        except ValueError as exc:
            raise api_error_from(exc) from None
        self.prompt_text, self.prompt_ids = render_messages(state, req)
        state.check_length(len(self.prompt_ids), max_tokens, what="messages")
        try:
            state.llm.check_can_accept()
        except Exception as exc:
            raise api_error_from(exc, state.settings.retry_after_s) from None
        self.id = random_id("chatcmpl")
        self.created = now()
        self.parser_name = state.settings.reasoning_parser

    def parser(self):
        return make_parser(self.parser_name, self.prompt_text)

    def stream(self, state: ServerState) -> AsyncIterator[RequestOutput]:
        prompt = {"prompt": self.prompt_text, "prompt_token_ids": self.prompt_ids}
        return state.llm.generate(prompt, self.params, self.id)


async def create_chat_completion(request: Request, state: ServerState):
    req = await parse_request(request, ChatCompletionRequest, state.settings.max_body_bytes)
    prep = _Prepared(state, req)
    if req.stream:
        return SSEResponse(sse(_stream(state, req, prep), state))
    final: RequestOutput = await until_disconnect(request, _collect(prep, state))
    choices = []
    for out in final.outputs:
        message: dict = {"role": "assistant", "content": out.text}
        parser = prep.parser()
        if parser is not None:
            reasoning, content = parser.parse(out.text)
            message.update(content=content, reasoning_content=reasoning, reasoning=reasoning)
        logprobs = chat_logprobs(out, 0, len(out.token_ids), prep.top_k) if prep.top_k is not None else None
        choices.append({"index": out.index, "message": message, "logprobs": logprobs,
                        "finish_reason": out.finish_reason, "stop_reason": out.stop_reason})
    completion_tokens = sum(len(o.token_ids) for o in final.outputs)
    return JSONResponse({"id": prep.id, "object": "chat.completion", "created": prep.created,
                         "model": prep.model, "choices": choices,
                         "usage": usage(len(prep.prompt_ids), completion_tokens)})


async def _collect(prep: _Prepared, state: ServerState) -> RequestOutput:
    final = None
    try:
        async for _, out in merge_streams([prep.stream(state)]):
            final = out
    except Exception as exc:
        raise api_error_from(exc, state.settings.retry_after_s) from None
    return final


async def _stream(state: ServerState, req: ChatCompletionRequest, prep: _Prepared) -> AsyncIterator[dict]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[dict], usage_info: Optional[dict] = None) -> dict:
        body = {"id": prep.id, "object": "chat.completion.chunk", "created": prep.created,
                "model": prep.model, "choices": choices}
        if include_usage:
            body["usage"] = usage_info
        return body

    n = prep.params.n
    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(n)])
    parsers = [prep.parser() for _ in range(n)]
    sent_text, sent_tokens = [0] * n, [0] * n
    done = [False] * n
    completion_tokens = 0
    async for _, res in merge_streams([prep.stream(state)]):
        choices = []
        for out in res.outputs:
            i = out.index
            if done[i]:
                continue
            delta_text = out.text[sent_text[i]:]
            delta: dict = {}
            parser = parsers[i]
            if parser is not None:
                reasoning, content = parser.feed(delta_text)
                if out.finish_reason is not None:
                    r2, c2 = parser.finish()
                    reasoning, content = reasoning + r2, content + c2
                if reasoning:
                    delta.update(reasoning_content=reasoning, reasoning=reasoning)
                if content:
                    delta["content"] = content
            elif delta_text:
                delta["content"] = delta_text
            logprobs = None
            if prep.top_k is not None and len(out.token_ids) > sent_tokens[i]:
                logprobs = chat_logprobs(out, sent_tokens[i], len(out.token_ids), prep.top_k)
            sent_text[i], sent_tokens[i] = len(out.text), len(out.token_ids)
            if out.finish_reason is not None:
                done[i] = True
                completion_tokens += len(out.token_ids)
            if delta or logprobs or out.finish_reason is not None:
                choices.append({"index": i, "delta": delta, "logprobs": logprobs,
                                "finish_reason": out.finish_reason, "stop_reason": out.stop_reason})
        if choices:
            yield chunk(choices)
    if include_usage:
        yield chunk([], usage(len(prep.prompt_ids), completion_tokens))
