"""One generated sequence: its tokens, how many have KV in the cache, its blocks."""
from __future__ import annotations

import enum
import itertools
from typing import Optional

import torch

from deepserve.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 cache_salt: Optional[str] = None):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index                         # which of the request's n samples
        self.token_ids = list(prompt_token_ids)    # prompt, then generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0               # tokens whose KV is in the cache
        self.num_pending = 0                       # sampled on the device, not yet in token_ids (async)
        self.in_flight = False                     # in a pipeline micro-batch not finished yet
        self.num_cached_tokens = 0                 # of those, prompt tokens found by prefix caching
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []        # prefix-cache keys of the full blocks registered so far
        self.prefix_keys: list[bytes] = []         # keys of its full blocks, computed once (ids only grow)
        self.cache_salt = cache_salt               # its request's: shares cached blocks only under the same salt
        self.params = params
        self.status = SeqStatus.WAITING
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.num_preemptions = 0
        self.first_scheduled_time: Optional[float] = None   # time.monotonic() when first admitted to run
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] = []
        self.generator: Optional[torch.Generator] = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)

    @property
    def num_tokens(self) -> int:
        """Tokens including one still on its way from the device (async scheduling)."""
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.value})")
