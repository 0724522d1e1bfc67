"""The driver's runner: scheduled batches in, sampled tokens out.

It flattens a `ScheduledBatch` into `StepInputs`, publishes them to the other ranks of its
DP rank (a no-op in one process), runs its own forward and samples. `launch` starts a step
without waiting for its tokens (async scheduling); `all_logits` scores one prompt. With data
parallel each DP rank's engine core has a driver of its own (engine/engine_core.py).

With pipeline parallel, `launch_micro_batch` starts a step through the stages without
waiting for its logits and `finish_micro_batch` samples them, so several micro-batches are
in flight at once (engine/micro_batches.py).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from deepserve.config import EngineConfig
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.engine.cuda_graphs import step_rows
from deepserve.engine.input_staging import to_device_async
from deepserve.engine.model_runner import ModelRunner
from deepserve.engine.pipeline import PendingLogits
from deepserve.engine.sampler import Sampler, SamplerOutput
from deepserve.engine.scheduler import ScheduledBatch
from deepserve.engine.step_inputs import MTPStepMessage, StepInputs, StepMessage
from deepserve.engine.spec_decode import as_decode_rows
from deepserve.engine.warm_up import WATCH, mtp_inputs, profile_sampling, step_inputs, warm_up_steps, warm_up_wanted
from deepserve.platforms import Platform

logger = logging.getLogger("deepserve")


class InFlight:
    """A launched step's sampled tokens: on the device at once (the next step's inputs may
    come from them), on the host once the copy started at launch has landed."""

    def __init__(self, seqs: list, next_ids: Optional[torch.Tensor]):
        self.seqs = seqs
        self.next_ids = next_ids
        self.row_of = {s.seq_id: i for i, s in enumerate(seqs)}
        self._host, self._done = next_ids, None
        if next_ids is not None and next_ids.device.type == "cuda":
            self._host = torch.empty(next_ids.shape, dtype=next_ids.dtype, pin_memory=True)
            self._host.copy_(next_ids, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()

    def token_ids(self) -> list[int]:
        if self.next_ids is None:
            return []
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


class MicroBatch:
    """A pipeline micro-batch on its way through the stages: the scheduled batch (None: a
    dummy), the sequences that sample a token from it, and their logits to come."""

    def __init__(self, batch: Optional[ScheduledBatch], seqs: list, logits: PendingLogits):
        self.batch, self.seqs, self.logits = batch, seqs, logits


class DriverRunner(ModelRunner):
    def __init__(self, config: EngineConfig, platform: Platform, pctx: Optional[ParallelContext] = None,
                 local_rank: int = 0, eos_token_ids: set[int] = frozenset(),
                 publish: Optional[Callable[[object], None]] = None):
        super().__init__(config, platform, pctx, local_rank)
        self.sampler = Sampler(set(eos_token_ids), self.vocab_size, self.ops)
        # sends each step to the other ranks of this DP rank (multi-process executors)
        self.publish = publish or (lambda msg: None)
        # the CUDA graph size every DP rank replays in the next step (DP + EP), set by the
        # engine core once the DP ranks have agreed on it
        self.graph_size = 0
        if warm_up_wanted(self.device.type):
            self.warm_up()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run `warm_up_steps` (engine/warm_up.py) through every rank, writing no cache slot,
        and sample from the first one's logits, so that the Triton kernels of the steps a
        server meets compile before it serves. With speculative decoding its verify steps run
        as served ones do (decode-only ones as one-token rows where CUDA graphs replay them,
        engine/spec_decode.py), and with mtp the MTP module's forwards follow every step. With
        DP attention + EP every DP rank's driver runs the same steps in the same order (their
        engine configs are the same), so the MoE exchanges inside them meet; each step runs
        eagerly (graph_size 0)."""
        sc, spec = self.config.scheduler, self.config.speculative
        steps = warm_up_steps(sc.max_num_batched_tokens, sc.max_num_seqs, sc.max_model_len,
                              self.config.piecewise_max_tokens if self.piecewise is not None else 0,
                              spec.num_speculative_tokens if spec is not None else 0)
        decode_rows = spec is not None and self.graphs is not None and self.graphs.enabled
        t0, before, compiling = time.perf_counter(), WATCH.compiles, WATCH.seconds
        sampled = False
        for step in steps:
            inputs = step_inputs(step, self.block_size, self.num_blocks)
            as_rows = as_decode_rows if decode_rows and not step.prompts else (lambda x: x)
            logits = self._forward(StepMessage(as_rows(inputs), self.graph_size, keep_hidden=self.mtp is not None,
                                               warm_up=True))
            if self.mtp is not None:
                after = mtp_inputs(inputs, self.mtp.k, self.block_size, self.num_blocks, sc.max_model_len)
                msg = MTPStepMessage(as_rows(after), list(range(inputs.num_tokens)), warm_up=True)
                self.publish(msg)
                self.run_mtp(msg)
            if logits is not None and not sampled:
                self._warm_sampler(logits)
                sampled = True
        self.hidden, self.mtp_forwards = None, 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings["warm_up_s"] = time.perf_counter() - t0
        WATCH.serving = True
        logger.info("warm-up: %d steps (up to %d tokens) in %.1f s; %d Triton kernel compiles, %d during it "
                    "(%.1f s)", len(steps), max(s.num_tokens for s in steps),
                    self.timings["warm_up_s"], WATCH.compiles, WATCH.compiles - before, WATCH.seconds - compiling)

    def _profile_sampling(self, logits: Optional[torch.Tensor], drafts: int) -> None:
        """The profile run's sampling (engine/warm_up.profile_sampling) on the rank that samples."""
        if logits is not None:
            profile_sampling(Sampler(set(), self.vocab_size, self.ops), logits[:, :self.vocab_size],
                             self.config.scheduler.max_num_seqs, drafts)

    def _warm_sampler(self, logits: torch.Tensor) -> None:
        """The sampling kernel over these rows, as a request's sampled step runs it."""
        self.sampler.warm_up(logits)

    def host_inputs(self, batch: ScheduledBatch) -> StepInputs:
        """The batch's flat step inputs; as one-token rows where the step runs as decode rows
        (`runs_as_rows`), which the decode CUDA graphs replay."""
        inputs = StepInputs.from_batch(batch, self.block_size)
        return as_decode_rows(inputs) if not inputs.decode_only and self.runs_as_rows(batch) else inputs

    def runs_as_rows(self, batch: ScheduledBatch) -> bool:
        """Whether a scheduled step runs as one-token rows over the decode CUDA graphs
        (engine/spec_decode.as_decode_rows): a step of decodes (with speculative decoding each
        verified with its drafts, as rows of their own), or a small mixed step, prompt chunks
        beside the decodes and their verify rows (CudaGraphRunner.fits_as_rows, counting k
        drafts beside each one-token row). One rule for the plain step (`host_inputs`), the
        verify step and its MTP forward (engine/spec_decode.run_speculative_step) and the DP
        ranks' agreement before the step (engine/engine_core.py), read from the batch as
        scheduled, before any drafting. Never with pipeline parallel's mixed steps, where the
        config keeps mixed_graph_tokens 0."""
        g = self.graphs
        if g is None or not g.enabled:
            return False
        if batch.num_decodes == len(batch.seqs):     # one-token rows alone
            return True
        return g.fits_as_rows(batch, self.config.mixed_graph_tokens, self.num_drafts)

    @property
    def num_drafts(self) -> int:
        """Draft tokens a decode may verify beside its own (speculative decoding's k; 0 without)."""
        spec = self.config.speculative
        return spec.num_speculative_tokens if spec is not None else 0

    def graph_rows(self, batch: ScheduledBatch) -> int:
        """The most rows `batch` replays as decode rows (cuda_graphs.step_rows)."""
        return step_rows(batch.num_new_tokens, self.num_drafts)

    def _forward(self, msg: StepMessage) -> Optional[torch.Tensor]:
        self.publish(msg)
        return self.run_step(msg)

    @torch.inference_mode()
    def run_dummy(self) -> None:
        """An idle DP rank's step: the MoE collectives need every rank (DP + EP)."""
        self._forward(StepMessage(StepInputs.dummy_step(), self.graph_size))

    @torch.inference_mode()
    def finish_mtp_round(self) -> None:
        """DP attention + EP with mtp drafts: after this DP rank's step (or its dummy), dummy MTP
        forwards until it ran k of them, as every DP rank does, since their MoE layers exchange
        tokens in each (a step drafts with k forwards, one without drafts writes the module's
        KV with one, an idle rank ran none)."""
        if self.mtp is not None and self.pctx.moe_dp_exchange:
            for _ in range(self.mtp.k - self.mtp_forwards):
                msg = MTPStepMessage(StepInputs.dummy_step(), [])
                self.publish(msg)
                self.run_mtp(msg)
        self.mtp_forwards = 0

    @torch.inference_mode()
    def all_logits(self, seq, num_tokens: int) -> torch.Tensor:
        """Logits [num_tokens, V] at the next `num_tokens` positions of `seq` after its computed
        ones (a prefill chunk, reading the KV earlier chunks wrote), fp32 on the CPU."""
        host = self.host_inputs(ScheduledBatch([seq], [num_tokens], 0))
        host.logits_rows = list(range(num_tokens))
        return self._forward(StepMessage(host))[:, :self.vocab_size].float().cpu()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list, SamplerOutput]:
        """Run one step; returns (sequences that got a token, their sampled tokens)."""
        logits = self._forward(StepMessage(self.host_inputs(batch), self.graph_size))
        sampling_seqs = batch.sampling_seqs()
        if not sampling_seqs:
            return [], SamplerOutput([], [])
        return sampling_seqs, self.sampler(logits, sampling_seqs)

    # ------------------------------------------------------------------ async scheduling
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: Optional[InFlight]) -> InFlight:
        """Start one step and return without waiting for it.

        A sequence whose last token is still pending (sampled by `prev`, not yet on the host)
        gets that token straight from prev's device tensor (and the TP peers get the ids from
        this rank's device). The step's own samples stay on the device (the next step may
        read them) and start an asynchronous copy to the host; `InFlight.token_ids()` waits
        for it."""
        inputs = self.host_inputs(batch)
        ids, positions, meta = self.to_device(inputs)
        rows, where, offset = [], [], 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            offset += n
            if seq.num_pending and seq.num_computed_tokens + n == seq.num_tokens:
                rows.append(prev.row_of[seq.seq_id])
                where.append(offset - 1)
        if rows:
            where_rows = to_device_async([where, rows], torch.long, self.device)   # one small copy, no sync
            ids[where_rows[0]] = prev.next_ids[where_rows[1]]
        msg = StepMessage(inputs, self.graph_size, device_ids=bool(rows))
        self.publish(msg)
        logits = self.run_step(msg, (ids, positions, meta))
        seqs = batch.sampling_seqs()
        if not seqs:
            return InFlight([], None)
        return InFlight(seqs, self.sampler.sample_ids(logits, seqs))

    # ------------------------------------------------------------------ pipeline micro-batches
    @torch.inference_mode()
    def launch_micro_batch(self, batch: Optional[ScheduledBatch]) -> MicroBatch:
        """Publish one step (a one-token dummy without `batch`), run the first stage's layers,
        send the hidden states on and post the receive of its logits; returns without waiting
        for the other stages."""
        msg = StepMessage(self.host_inputs(batch) if batch else StepInputs.dummy_step(), self.graph_size)
        self.publish(msg)
        ids, positions, meta = self.to_device(msg.inputs)
        return MicroBatch(batch, batch.sampling_seqs() if batch else [], self.pipeline.start(ids, positions, meta))

    @torch.inference_mode()
    def finish_micro_batch(self, mb: MicroBatch) -> tuple[list, SamplerOutput]:
        """Wait for a launched micro-batch's logits and sample: (sequences, their tokens)."""
        logits = mb.logits.wait()
        if not mb.seqs:
            return [], SamplerOutput([], [])
        return mb.seqs, self.sampler(logits, mb.seqs)
