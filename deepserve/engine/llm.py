"""The offline API, as in vLLM: `LLM(model, **engine_args).generate(prompts, params)`.

As vLLM 0.26's LLM: a prompt is a string, token ids, or a TextPrompt / TokensPrompt dict; a
prompt of max_model_len tokens or more is refused, and a request whose prompt + max_tokens
passes max_model_len stops there with finish_reason "length" (the API server refuses it).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from typing import Callable, Optional, Sequence, Union

from deepserve.config import EngineArgs
from deepserve.engine.beam_search import (MAX_ALLOWED_TOKEN_IDS, BeamGrammar, BeamSearch, BeamSearchOutput,
                                          BeamSearchParams)
from deepserve.engine.llm_engine import LLMEngine, PromptType, RequestError, prompt_length_error
from deepserve.engine.llm_inputs import (PROMPT_KEYS, TOKENIZATION_KWARGS, check_vllm_only_args, drop_text,
                                         generation_defaults, refuse_unsupported, structured_outputs_parser,
                                         template_text, template_turn, truncate_prompt)
from deepserve.engine.outputs import RequestOutput, RequestStateStats
from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.thinking_budget import PARSER_TAGS, delimiter_token_ids, reasoning_delimiters, reasoning_ended


class LLM:
    def __init__(self, model: Optional[str] = None, reasoning_parser: Optional[str] = None,
                 reasoning_config: Optional[dict] = None, chat_template: Optional[str] = None,
                 generation_config: str = "auto", override_generation_config: Optional[dict] = None,
                 max_logprobs: int = 20, **kwargs):
        """`reasoning_parser` / `reasoning_config` (vLLM's): where reasoning starts and ends, for
        requests with a thinking_token_budget; with `reasoning_parser` a structured-output grammar
        also holds only from the end of the reasoning, unless the prompt closed it (vLLM's, so R1
        thinks before its JSON answer). `chat_template`: a template (or its file) for
        chat() in place of the tokenizer's. `generation_config` (vLLM's): the default
        SamplingParams come from the model folder's generation_config.json ("auto"), from none
        ("vllm"), or from that file in the folder given; `override_generation_config` overrides
        its keys. `max_logprobs` (vLLM's, -1 for no limit): most logprobs / prompt_logprobs a
        request may ask for."""
        if model is not None:
            kwargs["model"] = model
        self.log_stats = not kwargs.get("disable_log_stats", True)   # vLLM's offline default: off
        structured = kwargs.pop("structured_outputs_config", None)
        reasoning_parser = structured_outputs_parser(structured, reasoning_parser, "structured_outputs_config",
                                                     "reasoning_parser")
        check_vllm_only_args(kwargs)
        known = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; see EngineArgs")
        if kwargs.get("api_server_count", 1) != 1:
            raise ValueError("api_server_count is an option of `deepserve serve`; the offline LLM has no API server")
        if not isinstance(max_logprobs, int) or max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no limit) or >= 0, got {max_logprobs!r}")
        self.max_logprobs = max_logprobs
        delimiters = reasoning_delimiters(reasoning_parser, reasoning_config)
        args = EngineArgs(**kwargs)
        self.default_sampling_params = generation_defaults(generation_config, str(args.model),
                                                            override_generation_config)
        self.engine = LLMEngine(args)
        self._beam_compiler = None                      # beam_search's grammars, without an engine's compiler
        self._request_ids = itertools.count()           # vLLM's request ids: "0", "1", ... per LLM
        self._queued: list[str] = []                    # enqueue()'s requests, not yet waited for
        self._finished: dict[str, RequestOutput] = {}   # the outputs of those that finished
        self._no_text: set[str] = set()                 # requests with detokenize=False
        self.tokenizer = self.engine.tokenizer
        self.chat_template = chat_template
        if chat_template is not None and self.tokenizer is not None:
            self._chat_tokenizer(chat_template)   # a template path that is no file fails now
        self.reasoning_token_ids = delimiter_token_ids(delimiters, self.tokenizer)
        # the parser's tags, where its end tag is one token (a grammar starts after one token)
        tags = delimiter_token_ids(PARSER_TAGS.get(reasoning_parser), self.tokenizer)
        in_reasoning = bool((structured or {}).get("enable_in_reasoning"))
        self._grammar_after = tags if tags is not None and len(tags[1]) == 1 and not in_reasoning else None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLM":
        """vLLM's: an LLM of these engine arguments."""
        return cls(**vars(engine_args))

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for the engine."""
        return self.engine

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: what generate() and chat() use without sampling_params (the model's
        generation_config.json sampling settings, or SamplingParams())."""
        return SamplingParams(**self.default_sampling_params)

    def shutdown(self) -> None:
        """Stop this engine's worker processes and free its process groups and ports (also
        done when the LLM is deleted); a new LLM with any layout can start afterwards. The
        last live engine of the process also stops the fork server its workers started from
        (DEEPSERVE_KEEP_FORK_SERVER=1 keeps it for the next engine, which then skips its torch
        import); multiprocessing's own resource tracker process stays, as after any spawn."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start_profile(self, profile_prefix: Optional[str] = None) -> None:
        """vLLM's: profile the steps from now on in every rank (needs profiler_config)."""
        self.engine.start_profile(profile_prefix)

    def stop_profile(self) -> None:
        """vLLM's: stop profiling; returns once every rank has written its trace."""
        self.engine.stop_profile()

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """vLLM's: forget every cached prefix block (e.g. between benchmark runs), so the next
        prompts are computed anew; False, with nothing changed, while a request holds KV blocks
        (one the engine is part way through: requests enqueue() added wait without blocks)."""
        return self.engine.reset_prefix_cache(reset_running_requests, reset_connector)

    def get_metrics(self) -> list:
        """vLLM's: the engine's gauges and counters as vLLM's metric records (LLMEngine.get_metrics)."""
        return self.engine.get_metrics()

    def get_world_size(self, include_dp: bool = True) -> int:
        """vLLM's: the engine's ranks, tensor x pipeline parallel (x data parallel by default)."""
        par = self.engine.config.parallel
        return par.tensor_parallel_size * par.pipeline_parallel_size * (par.data_parallel_size if include_dp else 1)

    def reset_mm_cache(self) -> None:
        """vLLM's: clear the multimodal input cache; deepserve takes text only, so it has none."""

    def sleep(self, level: int = 1, mode: str = "abort"):
        self.engine.sleep(level, mode)

    def wake_up(self, tags: Optional[list[str]] = None):
        self.engine.wake_up(tags)

    def collective_rpc(self, method, timeout: Optional[float] = None, args: tuple = (), kwargs: Optional[dict] = None):
        return self.engine.collective_rpc(method, timeout, args, kwargs)

    def apply_model(self, func):
        return self.engine.apply_model(func)

    def _weight_transfer(self, *args, **kwargs):
        raise NotImplementedError("weight transfer (init_weight_transfer_engine, update_weights) is not supported: "
                                  "deepserve loads the weights once, from the model folder")

    init_weight_transfer_engine = start_weight_update = start_draft_weight_update = _weight_transfer
    update_weights = finish_weight_update = _weight_transfer

    def _pooling(self, method: str):
        raise NotImplementedError(f"{method}() is not supported: deepserve serves generative models only (no "
                                  f"pooling, embedding, classification or scoring)")

    def encode(self, *args, **kwargs):
        self._pooling("encode")

    def embed(self, *args, **kwargs):
        self._pooling("embed")

    def classify(self, *args, **kwargs):
        self._pooling("classify")

    def score(self, *args, **kwargs):
        self._pooling("score")

    def reward(self, *args, **kwargs):
        self._pooling("reward")

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: Union[bool, Callable] = True, lora_request=None, priority: Optional[list[int]] = None,
                 tokenization_kwargs: Optional[dict] = None, mm_processor_kwargs: Optional[dict] = None
                 ) -> list[RequestOutput]:
        """vLLM's LLM.generate: one RequestOutput per prompt, in order. `use_tqdm` (default
        True, as vLLM's): progress bars on stderr while prompts are tokenized and while they run
        (or a tqdm-like callable that makes them); `priority`: one per prompt (with
        scheduling_policy "priority"); `tokenization_kwargs`: truncate_prompt_tokens (the
        prompt's last N tokens; -1: max_model_len), add_special_tokens, truncation_side."""
        ids = self.enqueue(prompts, sampling_params, lora_request, priority, use_tqdm,
                           tokenization_kwargs=tokenization_kwargs, mm_processor_kwargs=mm_processor_kwargs,
                           _queue=False)
        return self._run(ids, use_tqdm)

    def enqueue(self, prompts: Union[PromptType, Sequence[PromptType]],
                sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None, lora_request=None,
                priority: Optional[list[int]] = None, use_tqdm: Union[bool, Callable] = True,
                tokenization_kwargs: Optional[dict] = None, mm_processor_kwargs: Optional[dict] = None,
                _queue: bool = True) -> list[str]:
        """vLLM's: add the requests (as generate() takes them) without running them; their
        request ids. wait_for_completion() runs them."""
        refuse_unsupported(lora_request=lora_request, mm_processor_kwargs=mm_processor_kwargs)
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"The lengths of prompts ({len(prompts)}) and params ({len(sampling_params)}) "
                             f"must be the same.")
        if priority is not None:
            if len(priority) != len(prompts):
                raise ValueError(f"The lengths of prompts ({len(prompts)}) and priority ({len(priority)}) "
                                 f"must be the same.")
            if any(priority) and self.engine.config.scheduler.policy != "priority":
                raise ValueError(f"Got priority {next(p for p in priority if p)} but priority scheduling is not "
                                 f"enabled (LLM(..., scheduling_policy=\"priority\"))")
            sampling_params = [dataclasses.replace(sp, priority=p) if p != sp.priority else sp
                               for sp, p in zip(sampling_params, priority)]
        requests = [self._request(p, self._with_reasoning_ids(sp), tokenization_kwargs)
                    for p, sp in _progress(zip(prompts, sampling_params), use_tqdm, total=len(prompts),
                                           desc="Rendering prompts")]
        ids = []
        try:
            for prompt, sp in requests:
                ids.append(self.engine.add_request(self._next_id(), prompt, sp))
                if not sp.detokenize:
                    self._no_text.add(ids[-1])
        except BaseException:
            for rid in ids:   # a bad prompt among good ones: none of them stays queued
                self.engine.abort_request(rid)
                self._no_text.discard(rid)
            raise
        if _queue:
            self._queued += ids
        return ids

    def wait_for_completion(self, output_type=None, *, use_tqdm: Union[bool, Callable] = True
                            ) -> list[RequestOutput]:
        """vLLM's: run the requests enqueue() added; their outputs, in the order they were added."""
        ids, self._queued = self._queued, []
        return self._run(ids, use_tqdm)

    def _request(self, prompt: PromptType, params: SamplingParams,
                 tokenization_kwargs: Optional[dict]) -> tuple[dict, SamplingParams]:
        """The prompt as token ids (tokenized and truncated as asked) and its params; a prompt
        that leaves no room for an output is refused here, before any of the batch is added
        (the engine's add_request stops an output at max_model_len)."""
        if isinstance(prompt, dict):
            extra = sorted(k for k in set(prompt) - PROMPT_KEYS if prompt[k] is not None)   # None asks nothing
            if extra:
                raise RequestError(f"prompt field(s) {extra} are not supported (a prompt dict takes "
                                   f"{', '.join(sorted(PROMPT_KEYS))})")
        kw = dict(tokenization_kwargs or {})
        extra = sorted(set(kw) - TOKENIZATION_KWARGS)
        if extra:
            raise RequestError(f"tokenization_kwargs {extra} are not supported; it takes "
                               f"{', '.join(sorted(TOKENIZATION_KWARGS))}")
        text, ids = self.engine.tokenize_prompt(prompt)
        given_ids = isinstance(prompt, dict) and "prompt_token_ids" in prompt or not isinstance(prompt, (str, dict))
        if not kw.get("add_special_tokens", True) and not given_ids:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        ids = truncate_prompt(ids, kw.get("truncate_prompt_tokens"), kw.get("truncation_side", "left"),
                        self.engine.max_model_len)
        params = self._check_logprobs(params)
        too_long = prompt_length_error(len(ids), self.engine.max_model_len) if ids else None
        if too_long:
            raise RequestError(too_long)
        if params.guided is not None and params.guided.start_after_token is None and self._grammar_after \
                and not reasoning_ended(ids, *self._grammar_after):
            # the prompt left the reasoning open (R1's template opens it): the grammar holds from its end on
            params = params.with_grammar_after(self._grammar_after[1][0])
        request = {"prompt_token_ids": ids, "prompt": text}
        if isinstance(prompt, dict) and "cache_salt" in prompt:
            request["cache_salt"] = prompt["cache_salt"]
        return request, params

    def _check_logprobs(self, params: SamplingParams) -> SamplingParams:
        """vLLM's max_logprobs rule (logprob_token_ids have their own limit), -1 (the whole
        vocabulary) counting as the vocabulary's size; the params with that size in place of -1."""
        params = params.with_vocab_logprobs(self.engine.runner.vocab_size)
        if self.max_logprobs == -1:
            return params
        asked = [("sample logprobs", None if params.logprob_token_ids else params.logprobs),
                 ("prompt logprobs", params.prompt_logprobs)]
        for what, k in asked:
            if k is not None and k > self.max_logprobs:
                raise RequestError(f"Requested {what} of {k}, which is greater than max allowed: {self.max_logprobs} "
                                   f"(LLM(..., max_logprobs=N))")
        return params

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams, lora_request=None,
                    use_tqdm: bool = False, concurrency_limit: Optional[int] = None) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: each prompt's best params.beam_width hypotheses, best first
        (engine/beam_search.py); a sequence's tokens and text hold the prompt's too, and its
        tokens the EOS that ended it, as vLLM's; its finish_reason and stop_reason are None, as
        vLLM's. Searches stop at max_model_len. The beams of `concurrency_limit` prompts
        (default: all) run together, one token a step."""
        refuse_unsupported(lora_request=lora_request)
        if isinstance(prompts, (str, dict)):
            raise TypeError("beam_search takes a list of prompts")
        if concurrency_limit is not None and (isinstance(concurrency_limit, bool) or not isinstance(
                concurrency_limit, int) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be None or >= 1, got {concurrency_limit!r}")
        searches = []
        for p in prompts:
            ids = self.engine.tokenize_prompt(p)[1]
            room = self.engine.max_model_len - len(ids)
            if room < 1:
                raise RequestError(f"the prompt has {len(ids)} tokens: no room for a token within max_model_len "
                                   f"{self.engine.max_model_len}")
            searches.append(BeamSearch(ids, dataclasses.replace(params, max_tokens=min(params.max_tokens, room),
                                                           include_stop_str_in_output=True),
                                       self.engine.eos_token_ids))
        grammars = {}
        if params.structured_outputs is not None:
            spec = params.structured_outputs
            if spec.compiled is None:
                self._grammar_compiler().compile(spec)
            grammars = {s: BeamGrammar(spec, len(s.prompt_ids), self.engine.runner.vocab_size) for s in searches}
        limit = concurrency_limit or max(1, len(searches))
        for start in range(0, len(searches), limit):
            self._beam_steps(searches[start:start + limit], use_tqdm, grammars)
        results = []
        for s in searches:
            best = s.best()
            for b in best:   # vLLM's tokenizer.decode: special tokens (a BOS, an EOS) written out
                b.text = self.tokenizer.decode(b.tokens, skip_special_tokens=False) if self.tokenizer else ""
                b.finish_reason = b.stop_reason = None   # vLLM's offline sequences leave both unset
            results.append(BeamSearchOutput(best))
        return results

    def _beam_steps(self, searches: list[BeamSearch], use_tqdm, grammars: dict[BeamSearch, BeamGrammar]) -> None:
        """Run these searches to their end, one token a step for all their beams; with
        `grammars`, each beam's step request takes only the tokens its grammar allows (vLLM's
        allowed_token_ids, up to MAX_ALLOWED_TOKEN_IDS of them) and its candidates are filtered."""
        while True:
            allowed: dict[BeamSearch, list[list[int]]] = {}   # each live beam's allowed tokens
            for s in searches if grammars else ():
                if not s.done:
                    ids = [grammars[s].allowed(tokens) for tokens in s.step_prompts()]
                    s.retire([a is not None for a in ids])
                    allowed[s] = [a for a in ids if a is not None]
            live = [s for s in searches if not s.done]
            if not live:
                break
            step = live[0].step_params()

            def params(s: BeamSearch, beam: int) -> SamplingParams:
                if s not in allowed or len(allowed[s][beam]) > MAX_ALLOWED_TOKEN_IDS:
                    return step
                return dataclasses.replace(step, allowed_token_ids=allowed[s][beam])
            rids = [[self.engine.add_request(self._next_id(), {"prompt_token_ids": ids}, params(s, i))
                     for i, ids in enumerate(s.step_prompts())]
                    for s in live]
            outs = iter(self._run([r for ids in rids for r in ids], use_tqdm))
            for s, ids in zip(live, rids):
                s.advance([o.outputs[0].logprobs[0] if o.outputs[0].logprobs else None
                           for o in (next(outs) for _ in ids)],
                          [set(ok) for ok in allowed[s]] if s in allowed else None)

    def _grammar_compiler(self):
        """The engine's structured-output compiler (a data-parallel front end builds its own)."""
        if hasattr(self.engine, "grammar_compiler"):
            return self.engine.grammar_compiler()
        if self._beam_compiler is None:
            from deepserve.engine.grammar import GrammarCompiler
            self._beam_compiler = GrammarCompiler(self.tokenizer, self.engine.runner.vocab_size,
                                                  self.engine.eos_token_ids)
        return self._beam_compiler

    def _next_id(self) -> str:
        return str(next(self._request_ids))

    def _with_reasoning_ids(self, params: SamplingParams) -> SamplingParams:
        if params.thinking_token_budget is None or params.reasoning_token_ids is not None \
                or self.reasoning_token_ids is None:
            return params
        return dataclasses.replace(params, reasoning_token_ids=self.reasoning_token_ids)

    def chat(self, messages: Union[list[dict], Sequence[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: Union[bool, Callable] = True, lora_request=None, chat_template: Optional[str] = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: Optional[list[dict]] = None,
             chat_template_kwargs: Optional[dict] = None, tokenization_kwargs: Optional[dict] = None,
             mm_processor_kwargs: Optional[dict] = None) -> list[RequestOutput]:
        """vLLM's LLM.chat: replies to one conversation (a list of {"role", "content"}) or
        several, rendered with `chat_template` (a template or its file), else LLM(chat_template=),
        else the tokenizer's. `continue_final_message`: the last message is a prefill that the
        reply continues; `tools` and `chat_template_kwargs` go to the template."""
        refuse_unsupported(lora_request=lora_request, mm_processor_kwargs=mm_processor_kwargs)
        prompts, kw = self._chat_prompts(messages, chat_template, chat_template_content_format, add_generation_prompt,
                                         continue_final_message, tools, chat_template_kwargs, tokenization_kwargs)
        return self.generate(prompts, sampling_params, use_tqdm, tokenization_kwargs=kw)

    def enqueue_chat(self, messages: Union[list[dict], Sequence[list[dict]]],
                     sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                     use_tqdm: Union[bool, Callable] = True, lora_request=None, priority: Optional[list[int]] = None,
                     chat_template: Optional[str] = None, chat_template_content_format: str = "auto",
                     add_generation_prompt: bool = True, continue_final_message: bool = False,
                     tools: Optional[list[dict]] = None, chat_template_kwargs: Optional[dict] = None,
                     tokenization_kwargs: Optional[dict] = None, mm_processor_kwargs: Optional[dict] = None
                     ) -> list[str]:
        """vLLM's: add chat()'s requests without running them; their request ids.
        wait_for_completion() runs them."""
        refuse_unsupported(lora_request=lora_request, mm_processor_kwargs=mm_processor_kwargs)
        prompts, kw = self._chat_prompts(messages, chat_template, chat_template_content_format, add_generation_prompt,
                                         continue_final_message, tools, chat_template_kwargs, tokenization_kwargs)
        return self.enqueue(prompts, sampling_params, priority=priority, use_tqdm=use_tqdm, tokenization_kwargs=kw)

    def _chat_prompts(self, messages, chat_template: Optional[str], chat_template_content_format: str,
                      add_generation_prompt: bool, continue_final_message: bool, tools: Optional[list[dict]],
                      chat_template_kwargs: Optional[dict], tokenization_kwargs: Optional[dict]
                      ) -> tuple[list[str], dict]:
        """chat()'s conversations rendered as prompts, and the tokenization_kwargs they take."""
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(f"chat_template_content_format must be auto, string or openai, got "
                             f"{chat_template_content_format!r}")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot chat")
        if isinstance(messages, dict) or not messages:
            raise ValueError("messages must be a conversation (a list of message dicts) or a list of them")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        template = chat_template if chat_template is not None else self.chat_template
        tokenizer = self._chat_tokenizer(template) if template is not None else self.tokenizer
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer in {tokenizer.folder} has no chat template: pass chat_template= to "
                             f"LLM(...) or to chat() (a template or its file)")
        # as vLLM's offline chat: the arguments win over chat_template_kwargs' same keys (tools where given)
        extra = {k: v for k, v in (chat_template_kwargs or {}).items()
                 if k not in ("add_generation_prompt", "continue_final_message", "tokenize")}
        taken = sorted(set(extra) & {"messages", "bos_token", "eos_token"})
        if taken:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(taken)} (chat() renders them)")
        if tools is not None:
            extra["tools"] = tools
        prompts = []
        render = functools.partial(tokenizer.apply_chat_template, add_generation_prompt=add_generation_prompt,
                                   tokenize=False, continue_final_message=continue_final_message, **extra)
        for conversation in conversations:
            turns = [template_turn(m, chat_template_content_format) for m in conversation]
            try:
                prompts.append(render(turns))
            except TypeError:
                # a tool-call turn's content None (transformers' shape, which R1-Distill's templates
                # test for) in a template that joins it as a string: "" then, as vLLM renders it
                if not any(t.get("content", "") is None for t in turns):
                    raise
                prompts.append(render([{**t, "content": ""} if t.get("content", "") is None else t for t in turns]))
        kw = {"add_special_tokens": False, **(tokenization_kwargs or {})}   # the template writes the BOS
        return prompts, kw

    def _chat_tokenizer(self, template: str):
        """The tokenizer rendering `template` (a template's text or its file) instead of its own."""
        tokenizer = copy.copy(self.tokenizer)
        tokenizer.chat_template = template_text(template)
        return tokenizer

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step the engine until these requests are done; their outputs, in order. Requests that
        enqueue() added finish too; their outputs wait for wait_for_completion()."""
        done, self._finished = self._finished, {}
        bar = None
        if use_tqdm:   # vLLM's bar: one count per sample, the token rates since it started
            from tqdm import tqdm
            live = self.engine.requests
            samples = sum(live[r].params.n if r in live else len(done[r].outputs) if r in done else 1
                          for r in request_ids)
            bar = (use_tqdm if callable(use_tqdm) else tqdm)(
                total=samples, initial=sum(len(done[r].outputs) for r in request_ids if r in done),
                desc="Processed prompts", dynamic_ncols=True,
                postfix=f"est. speed input: {0:.2f} toks/s, output: {0:.2f} toks/s")
            tokens_in = tokens_out = 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar:
                            tokens_in += len(out.prompt_token_ids or ()) * len(out.outputs)
                            tokens_out += sum(len(o.token_ids) for o in out.outputs)
                            elapsed = bar.format_dict["elapsed"] or 1e-9
                            bar.postfix = (f"est. speed input: {tokens_in / elapsed:.2f} toks/s, "
                                           f"output: {tokens_out / elapsed:.2f} toks/s")
                            bar.update(len(out.outputs))
        except BaseException:
            for rid in request_ids:  # leave no blocks behind on error or Ctrl-C
                self.engine.abort_request(rid)
            raise
        finally:
            if bar:
                bar.close()
        for rid in set(done) & self._no_text:
            drop_text(done[rid])
            self._no_text.discard(rid)
        outputs = [done.pop(rid) for rid in request_ids]
        for out in outputs:   # vLLM's: per-request stats only when they are logged
            tokens = sum(len(o.token_ids) for o in out.outputs)
            out.metrics = RequestStateStats.from_timings(out.metrics, tokens) if self.log_stats else None
        self._finished = done
        return outputs

    def prompt_logits(self, prompts: Sequence[PromptType]) -> list:
        """Full-vocabulary logits at every prompt position (fp32 CPU tensors [len, V]), for
        logit-level comparisons between setups (`deepserve validate`)."""
        return [self.engine.prompt_logits(p) for p in prompts]


def _progress(items, use_tqdm: Union[bool, Callable], **bar):
    """`items`, through a tqdm bar (or the callable `use_tqdm` gives) when asked for."""
    if not use_tqdm:
        return items
    if callable(use_tqdm):
        return use_tqdm(items, **bar)
    from tqdm import tqdm
    return tqdm(items, **bar)
