"""One pipeline-parallel stage's part of a forward: receive (hidden, residual) from the
previous stage, run this stage's layers, send them on; the last stage sends the logits of
the sampled rows back to the first, which samples. With DP each DP rank is its own
pipeline (ranks offset by dp_rank * tp * pp), and the MoE layers of a stage exchange
tokens with the same stage of the other DP ranks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class PipelineStage:
    def __init__(self, runner):
        self.runner = runner
        p = runner.pctx
        self.first, self.last = p.pp_rank == 0, p.pp_rank == p.pp_size - 1
        base = p.dp_rank * p.tp_size * p.pp_size
        self.prev = base + (p.pp_rank - 1) * p.tp_size + p.tp_rank
        self.next = base + (p.pp_rank + 1) * p.tp_size + p.tp_rank
        self.head = base + p.tp_rank                             # the first stage's rank
        self.tail = base + (p.pp_size - 1) * p.tp_size + p.tp_rank

    def forward(self, input_ids, positions, meta, dp_num_tokens: Optional[list[int]] = None):
        """Logits [rows, V] fp32 on the first stage; None on the others."""
        r, p = self.runner, self.runner.pctx
        m = r.model.model
        if p.moe_dp_exchange and dp_num_tokens is None:
            dp_num_tokens = p.dp_token_counts(input_ids.shape[0], r.device)
        extra = {"dp_num_tokens": dp_num_tokens} if p.moe_dp_exchange else {}
        if self.first:
            x, residual = m.embed_tokens(input_ids), None
        else:
            hidden_size = r.config.model.hf_config.hidden_size
            buf = torch.empty(2, input_ids.shape[0], hidden_size, dtype=r.dtype, device=r.device)
            dist.recv(buf, src=self.prev)
            x, residual = buf[0], buf[1]
        for i in r.model.pp_layers:
            x, residual = m.layers[i](positions, x, residual, meta, **extra)
        if not self.last:
            dist.send(torch.stack((x, residual)).contiguous(), dst=self.next)
            if not self.first:
                return None
            logits = torch.empty(meta.logits_indices.shape[0], r.vocab_size, dtype=torch.float32, device=r.device)
            dist.recv(logits, src=self.tail)
            return logits
        x, _ = m.norm(x, residual)
        logits = r.model.compute_logits(x[meta.logits_indices])[:, :r.vocab_size].float().contiguous()
        dist.send(logits, dst=self.head)
        return None
