"""One pipeline-parallel stage's part of a forward: receive (hidden, residual) from the
previous stage, run this stage's layers, send them on; the last stage's first TP rank sends
the logits of the sampled rows back to the first stage's, the driver, which samples. With DP
each DP rank is its own pipeline (ranks offset by dp_rank * tp * pp), and the MoE layers of
a stage exchange tokens with the same stage of the other DP ranks.

Sends are asynchronous and the driver's receive of the logits is posted, not waited for
(`start` returns `PendingLogits`), so the driver can start the next micro-batch while later
stages still run this one (engine/micro_batches.py). Every stage runs the steps in the order
the driver published them, and each pair of ranks matches sends to receives in order, so
micro-batches never cross: a step's KV writes at a stage land before any later step's reads
there.
"""
from __future__ import annotations

import weakref
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

MAX_PENDING_SENDS = 16   # sends that may be in progress before a stage waits for the oldest


class PendingLogits:
    """Logits [rows, V] fp32 on their way from the last stage; `wait()` returns them."""

    def __init__(self, buf: torch.Tensor, work):
        self.buf, self.work = buf, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.buf


class PipelineStage:
    def __init__(self, runner):
        # the runner owns its stage: a weak reference back, so that the two are no reference
        # cycle, which would keep the weights and KV pool after the runner is dropped until a
        # garbage-collector pass
        self.runner = weakref.proxy(runner)
        p = runner.pctx
        self.first, self.last = p.pp_rank == 0, p.pp_rank == p.pp_size - 1
        base = p.dp_rank * p.tp_size * p.pp_size
        self.prev = base + (p.pp_rank - 1) * p.tp_size + p.tp_rank
        self.next = base + (p.pp_rank + 1) * p.tp_size + p.tp_rank
        self.head = base                                         # the first stage's first TP rank
        self.tail = base + (p.pp_size - 1) * p.tp_size           # the last stage's first TP rank
        self.sends_logits = self.last and p.tp_rank == 0
        self.gets_logits = self.first and p.tp_rank == 0
        self._sends: deque = deque()                             # (work, tensor) still in progress
        self._recvs: deque[PendingLogits] = deque()              # logits not waited for yet (driver)

    def start(self, input_ids, positions, meta, dp_num_tokens: Optional[list[int]] = None
              ) -> Optional[PendingLogits]:
        """Run this stage's part of one step; the logits to come on the first stage's first TP
        rank, None elsewhere."""
        r = self.runner
        hidden = None
        if not self.first:
            hidden_size = r.config.model.hf_config.hidden_size
            hidden = torch.empty(2, input_ids.shape[0], hidden_size, dtype=r.dtype, device=r.device)
            dist.recv(hidden, src=self.prev)
        out = self.compute(input_ids, positions, meta, hidden, dp_num_tokens)
        if self.last:
            if self.sends_logits:
                self._send(out, self.head)
            return None
        self._send(out, self.next)
        if not self.gets_logits:
            return None
        logits = torch.empty(meta.logits_indices.shape[0], r.vocab_size, dtype=torch.float32, device=r.device)
        pending = PendingLogits(logits, dist.irecv(logits, src=self.tail))
        self._recvs.append(pending)
        while self._recvs and self._recvs[0].work is None:   # drop those already waited for
            self._recvs.popleft()
        return pending

    def compute(self, input_ids, positions, meta, hidden: Optional[torch.Tensor] = None,
                dp_num_tokens: Optional[list[int]] = None) -> torch.Tensor:
        """This stage's layers over one step, from the input ids (first stage) or the previous
        stage's (hidden, residual) [2, T, D] -> the same for the next stage, or on the last
        stage the logits [rows, V] fp32 of meta.logits_indices. A decode step replays this
        stage's CUDA graph when one holds it (engine/pipeline_graphs.py)."""
        r, p = self.runner, self.runner.pctx
        if r.graphs is not None and r.graphs.can_run(meta):
            return r.graphs.run_stage(input_ids, positions, meta, hidden)
        m = r.model.model
        if p.moe_dp_exchange and dp_num_tokens is None:
            dp_num_tokens = p.dp_token_counts(input_ids.shape[0], r.device)
        extra = {"dp_num_tokens": dp_num_tokens} if p.moe_dp_exchange else {}
        x, residual = (m.embed_tokens(input_ids), None) if hidden is None else (hidden[0], hidden[1])
        for i in r.model.pp_layers:
            x, residual = m.layers[i](positions, x, residual, meta, **extra)
        if not self.last:
            return torch.stack((x, residual))
        x, _ = m.norm(x, residual)
        # all-gathered over TP: every TP rank of the last stage computes them
        return r.model.compute_logits(x[meta.logits_indices])[:, :r.vocab_size].float()

    def forward(self, input_ids, positions, meta, dp_num_tokens: Optional[list[int]] = None):
        """One step, waited for: logits [rows, V] fp32 on the first stage's first TP rank."""
        pending = self.start(input_ids, positions, meta, dp_num_tokens)
        return pending.wait() if pending is not None else None

    def _send(self, t: torch.Tensor, dst: int) -> None:
        t = t.contiguous()
        self._sends.append((dist.isend(t, dst=dst), t))
        while self._sends and (len(self._sends) > MAX_PENDING_SENDS or self._sends[0][0].is_completed()):
            self._sends.popleft()[0].wait()

    def finish(self) -> None:
        """Wait for every send and receive this stage started (before the process group goes)."""
        while self._recvs:
            self._recvs.popleft().wait()
        while self._sends:
            self._sends.popleft()[0].wait()
