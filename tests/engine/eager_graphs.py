"""A stand-in for the decode CUDA graphs on the CPU (capture needs CUDA): the graph runner's own
limits (CudaGraphRunner.fits, fits_as_rows, can_run) over graphs of up to `max_bs` rows, and a
"replay" that runs the forward a captured graph holds, eagerly: every row's hidden state, and
the logits of the sampled rows. Engine tests install it where they check what runs as decode
rows (small mixed steps, verify steps)."""
from __future__ import annotations

from deepserve.engine.cuda_graphs import CudaGraphRunner


class EagerGraphs(CudaGraphRunner):
    enabled = True

    def __init__(self, runner, max_bs: int):   # (nothing captured)
        self.model, self.sizes, self.max_bs = runner.model, [max_bs], max_bs
        self.max_len = runner.config.scheduler.max_model_len
        self.replayed: list[int] = []           # rows of each replay

    def run(self, input_ids, positions, meta, bs: int = 0):
        self.replayed.append(input_ids.shape[0])
        hidden = self.model(input_ids, positions, meta)
        return hidden, self.model.compute_logits(hidden)[meta.logits_indices]


def install(llm, max_bs: int) -> EagerGraphs:
    """The engine's runner replays decode rows through EagerGraphs of up to `max_bs` rows."""
    llm.engine.runner.graphs = graphs = EagerGraphs(llm.engine.runner, max_bs)
    return graphs
