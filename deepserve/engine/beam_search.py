"""Beam search as vLLM 0.26 runs it (vllm/entrypoints/generate/beam_search): outside the engine,
as one-token requests.

Each step sends every live beam (prompt + its tokens so far) to the engine as its own request
with max_tokens 1 and 2 * beam_width logprobs; the prefix cache makes the shared prefixes
cheap, so a step computes about one new token per beam. A candidate is a beam plus one of its
listed tokens, scored by the cumulative logprob (raw logprobs, before temperature). An EOS
candidate (unless ignore_eos) ends that beam's hypothesis with finish_reason "stop"; the best
beam_width other candidates live on. After max_tokens steps, or when no beam is left, the
finished hypotheses and the live beams are ranked by vLLM's `get_beam_search_score`
(cumulative logprob / length ** length_penalty, the length counting the prompt and not a final
EOS) and the best beam_width are the outputs, best first. Requests that do not use beam search
never pass through here; each step's requests are ordinary ones, freed when they finish or
when the search is cancelled (a client leaving).
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Optional

from deepserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from deepserve.engine.sampling_params import GuidedDecoding, SamplingParams

# most allowed_token_ids a structured step constrains the engine with (vLLM's
# _MAX_NUM_ALLOWED_TOKEN_IDS); past it the candidates are only filtered
MAX_ALLOWED_TOKEN_IDS = 1024


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams. `temperature` is taken as vLLM takes it: the candidates' logprobs
    are the raw ones, so it does not change the search."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    structured_outputs: Optional[GuidedDecoding] = None
    """vLLM's: each beam's tokens follow this grammar (offline LLM.beam_search)."""

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class BeamSearchSequence:
    """One hypothesis (vLLM's): `tokens` holds the prompt's and the generated ids; `logprobs` one
    entry per step (the 2 * beam_width listed tokens' logprobs)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int] = None


@dataclass
class BeamSearchOutput:
    """The best beam_width hypotheses of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def get_beam_search_score(tokens: list[int], cumulative_logprob: float, eos_token_ids: Iterable[int],
                          length_penalty: float = 1.0) -> float:
    """vLLM's score (after Hugging Face's): the cumulative logprob over the length (prompt
    included, a final EOS not) to the power length_penalty."""
    length = len(tokens) - (1 if tokens[-1] in eos_token_ids else 0)
    return cumulative_logprob / (length ** length_penalty)


class BeamSearch:
    """The search state of one prompt; a driver runs `step_prompts()` through the engine and
    hands each beam's logprob entry to `advance()` until `done`."""

    def __init__(self, prompt_ids: list[int], params: BeamSearchParams, eos_token_ids: Iterable[int]):
        self.prompt_ids, self.params = list(prompt_ids), params
        self.eos = frozenset(() if params.ignore_eos else eos_token_ids)
        self.eos_all = frozenset(eos_token_ids)   # scores never count a final EOS (vLLM's)
        self.beams = [BeamSearchSequence(tokens=list(prompt_ids))]
        self.completed: list[BeamSearchSequence] = []
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.beams or self.steps >= self.params.max_tokens

    def step_params(self, logprobs: int = 0, priority: int = 0) -> SamplingParams:
        """A step request's: greedy (its sampled token is the most likely, listed anyway), with
        the 2 * beam_width candidates' logprobs, or `logprobs` (those the client asked for) if
        more; `priority`: the client's request's."""
        return SamplingParams(max_tokens=1, temperature=0, logprobs=max(2 * self.params.beam_width, logprobs),
                              ignore_eos=True, skip_special_tokens=False, priority=priority)

    def step_prompts(self) -> list[list[int]]:
        return [b.tokens for b in self.beams]

    def retire(self, keep: list[bool]) -> None:
        """Take out the beams not kept (vLLM's rule for a beam whose grammar ended or allows no
        token): each becomes a finished hypothesis if it generated any token."""
        n = len(self.prompt_ids)
        self.completed += [b for b, k in zip(self.beams, keep) if not k and len(b.tokens) > n]
        self.beams = [b for b, k in zip(self.beams, keep) if k]

    def advance(self, entries: list[Optional[dict[int, Logprob]]],
                allowed: Optional[list[Optional[set[int]]]] = None) -> None:
        """One step: `entries[i]` is beam i's next-token logprobs (None: the engine ended it
        without a token; that beam is dropped, as vLLM drops it); `allowed[i]`, with a grammar,
        the tokens beam i may take: its candidates are the listed ones among them, the sampled
        token included whatever its rank (vLLM's)."""
        width, candidates = self.params.beam_width, []
        for i, (beam, entry) in enumerate(zip(self.beams, entries)):
            ok = allowed[i] if allowed is not None else None
            for token, lp in (entry or {}).items():
                if (lp.rank > 2 * width) if ok is None else token not in ok:   # listed for the client's logprobs
                    continue
                total = beam.cum_logprob + lp.logprob
                if token in self.eos:
                    kept = beam.tokens + [token] if self.params.include_stop_str_in_output else beam.tokens
                    self.completed.append(BeamSearchSequence(kept, beam.logprobs + [entry], total,
                                                             finish_reason="stop", stop_reason=token))
                else:
                    candidates.append((total, token, beam, entry))
        candidates.sort(key=lambda c: -c[0])   # stable: ties keep the engine's order, as vLLM's argsort
        self.beams = [BeamSearchSequence(beam.tokens + [token], beam.logprobs + [entry], total)
                      for total, token, beam, entry in candidates[:width]]
        self.steps += 1

    def best(self) -> list[BeamSearchSequence]:
        finished = self.completed + self.beams
        key = lambda b: get_beam_search_score(b.tokens, b.cum_logprob, self.eos_all,  # noqa: E731
                                              self.params.length_penalty)
        return sorted(finished, key=key, reverse=True)[:self.params.beam_width]

    def request_output(self, request_id: str, prompt: Optional[str], decode: Callable[[list[int]], str],
                       num_cached_tokens: int = 0, prompt_logprobs: Optional[list] = None) -> RequestOutput:
        """The result as one finished RequestOutput with a choice per hypothesis, best first."""
        n = len(self.prompt_ids)
        outs = []
        for i, b in enumerate(self.best()):
            ids = b.tokens[n:]
            shown = ids[:-1] if ids and b.finish_reason == "stop" and ids[-1] == b.stop_reason else ids
            outs.append(CompletionOutput(index=i, text=decode(shown), token_ids=ids, cumulative_logprob=b.cum_logprob,
                                         logprobs=b.logprobs, finish_reason=b.finish_reason or "length",
                                         stop_reason=b.stop_reason))
        return RequestOutput(request_id, prompt, self.prompt_ids, outs, finished=True,
                             num_cached_tokens=num_cached_tokens, prompt_logprobs=prompt_logprobs)


async def _one_step(llm, prompt: dict, params: SamplingParams, request_id: str) -> RequestOutput:
    last = None
    async for out in llm.generate(prompt, params, request_id):
        last = out
    return last


async def beam_search(llm, prompt: dict, params: BeamSearchParams, request_id: str, eos_token_ids: Iterable[int],
                      decode: Callable[[list[int]], str], logprobs: int = 0,
                      priority: int = 0, prompt_logprobs: Optional[int] = None) -> AsyncIterator[RequestOutput]:
    """Beam search through an AsyncLLM (`prompt`: prompt_token_ids, optional text and
    cache_salt); yields one finished RequestOutput, with the prompt's logprobs when
    `prompt_logprobs` asks (the first step, the prompt alone, computes them). Cancelling it
    cancels the step in flight, whose requests are aborted and their blocks freed."""
    search = BeamSearch(prompt["prompt_token_ids"], params, eos_token_ids)
    step_params = search.step_params(logprobs, priority)
    first_params = dataclasses.replace(step_params, prompt_logprobs=prompt_logprobs)
    salt = prompt.get("cache_salt")
    cached, prompt_entries = 0, None
    while not search.done:
        sp = first_params if search.steps == 0 else step_params
        tasks = [asyncio.ensure_future(_one_step(llm, {"prompt_token_ids": ids, "cache_salt": salt}, sp,
                                                 f"{request_id}-s{search.steps}-b{i}"))
                 for i, ids in enumerate(search.step_prompts())]
        try:
            outs = await asyncio.gather(*tasks)
        finally:   # one failed or the search was cancelled: end the step's other requests too
            for t in tasks:
                t.cancel()
        if search.steps == 0:
            cached, prompt_entries = outs[0].num_cached_tokens, outs[0].prompt_logprobs
        search.advance([o.outputs[0].logprobs[0] if o.outputs[0].logprobs else None for o in outs])
    yield search.request_output(request_id, prompt.get("prompt"), decode, cached, prompt_entries)


class BeamGrammar:
    """vLLM's structured beam search: each step, a beam's grammar state is rebuilt from its
    generated tokens (xgrammar matchers cannot be copied), which gives the tokens it may take next."""

    def __init__(self, spec: GuidedDecoding, prompt_len: int, vocab_size: int):
        import torch   # here: the module's other users (vLLM's BeamSearchParams import) need no torch

        from deepserve.engine.grammar import _xgr
        self.xgr, self.spec, self.prompt_len = _xgr(), spec, prompt_len
        self.bitmask = self.xgr.allocate_token_bitmask(1, vocab_size)
        self.ids = torch.arange(vocab_size)

    def allowed(self, tokens: list[int]) -> Optional[list[int]]:
        """The token ids the beam `tokens` (prompt included) may take next; None once its
        grammar has ended or allows nothing."""
        matcher = self.xgr.GrammarMatcher(self.spec.compiled)
        for token in tokens[self.prompt_len:]:
            matcher.accept_token(token)
        if matcher.is_terminated():
            return None
        matcher.fill_next_token_bitmask(self.bitmask, 0)
        bits = (self.bitmask[0][self.ids >> 5] >> (self.ids & 31)) & 1   # [V]: 1 where allowed
        return self.ids[bits.bool()].tolist() or None
