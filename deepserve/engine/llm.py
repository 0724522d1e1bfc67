"""The offline API, as in vLLM: `LLM(model, **engine_args).generate(prompts, params)`."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from deepserve.config import EngineArgs
from deepserve.engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from deepserve.engine.llm_engine import LLMEngine, PromptType
from deepserve.engine.outputs import RequestOutput
from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.thinking_budget import delimiter_token_ids, reasoning_delimiters


class LLM:
    def __init__(self, model: Optional[str] = None, reasoning_parser: Optional[str] = None,
                 reasoning_config: Optional[dict] = None, **kwargs):
        """`reasoning_parser` / `reasoning_config` (vLLM's): where reasoning starts and ends, for
        requests with a thinking_token_budget."""
        if model is not None:
            kwargs["model"] = model
        known = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; see EngineArgs")
        if kwargs.get("api_server_count", 1) != 1:
            raise ValueError("api_server_count is an option of `deepserve serve`; the offline LLM has no API server")
        delimiters = reasoning_delimiters(reasoning_parser, reasoning_config)
        self.engine = LLMEngine(EngineArgs(**kwargs))
        self.tokenizer = self.engine.tokenizer
        self.reasoning_token_ids = delimiter_token_ids(delimiters, self.tokenizer)

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

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        sampling_params = [self._with_reasoning_ids(sp) for sp in sampling_params]
        ids = [self.engine.add_request(None, p, sp) for p, sp in zip(prompts, sampling_params)]
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: each prompt's best params.beam_width hypotheses, best first
        (engine/beam_search.py); a sequence's tokens and text hold the prompt's too, and its
        tokens the EOS that ended it, as vLLM's. Searches stop at max_model_len. All prompts' beams run together, one token a step."""
        if isinstance(prompts, (str, dict)):
            raise TypeError("beam_search takes a list of prompts")
        searches = []
        for p in prompts:
            ids = self.engine.tokenize_prompt(p)[1]
            room = self.engine.max_model_len - len(ids)
            if room < 1:
                raise ValueError(f"the prompt has {len(ids)} tokens: no room for a token within max_model_len "
                                 f"{self.engine.max_model_len}")
            searches.append(BeamSearch(ids, dataclasses.replace(params, max_tokens=min(params.max_tokens, room),
                                                           include_stop_str_in_output=True),
                                       self.engine.eos_token_ids))
        while True:
            live = [s for s in searches if not s.done]
            if not live:
                break
            step = live[0].step_params()
            rids = [[self.engine.add_request(None, {"prompt_token_ids": ids}, step) for ids in s.step_prompts()]
                    for s in live]
            outs = iter(self._run([r for ids in rids for r in ids], use_tqdm))
            for s, ids in zip(live, rids):
                s.advance([o.outputs[0].logprobs[0] if o.outputs[0].logprobs else None
                           for o in (next(outs) for _ in ids)])
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda ids: "")
        results = []
        for s in searches:
            best = s.best()
            for b in best:
                b.text = decode(b.tokens)
            results.append(BeamSearchOutput(best))
        return results

    def _with_reasoning_ids(self, params: SamplingParams) -> SamplingParams:
        if params.thinking_token_budget is None or params.reasoning_token_ids is not None \
                or self.reasoning_token_ids is None:
            return params
        return dataclasses.replace(params, reasoning_token_ids=self.reasoning_token_ids)

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Optional[SamplingParams] = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"}) or several,
        rendered with the model's own chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.tokenizer.apply_chat_template(c, add_generation_prompt, tokenize=True)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(request_ids), desc="requests", unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar:
                            bar.update(1)
        except BaseException:
            for rid in request_ids:  # leave no blocks behind on error or Ctrl-C
                self.engine.abort_request(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [done[rid] for rid in request_ids]

    def prompt_logits(self, prompts: Sequence[PromptType]) -> list:
        """Full-vocabulary logits at every prompt position (fp32 CPU tensors [len, V]), for
        logit-level comparisons between setups (`deepserve validate`)."""
        return [self.engine.prompt_logits(p) for p in prompts]
