"""Two gloo processes: column-parallel then row-parallel MLP (and the vocab-parallel
embedding / LM head) equal the unsharded layers."""
import os
import socket

import torch
import torch.distributed as dist

from deepserve.distributed.parallel_state import ParallelContext
from deepserve.engine.fork_server import process_context
from deepserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from deepserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(pctx):
    torch.manual_seed(0)
    full_gu = torch.randn(2 * 24, 16)
    full_down = torch.randn(16, 24)
    full_emb = torch.randn(37, 16)
    up = MergedColumnParallelLinear(16, [24, 24], pctx=pctx)
    up.weight_loader(up.weight, full_gu[:24], 0)
    up.weight_loader(up.weight, full_gu[24:], 1)
    down = RowParallelLinear(24, 16, bias=True, pctx=pctx)
    down.weight_loader(down.weight, full_down)
    down.weight_loader(down.bias, torch.arange(16.0))
    emb = VocabParallelEmbedding(37, 16, pctx=pctx)
    emb.weight_loader(emb.weight, full_emb)
    head = ParallelLMHead(37, 16, pctx=pctx)
    head.weight_loader(head.weight, full_emb)
    ids = torch.tensor([0, 5, 18, 19, 36, 7])
    x = emb(ids)
    gu = up(x)
    h = torch.nn.functional.silu(gu[:, :gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2:]
    return head(down(h))


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    pctx = ParallelContext(tp_rank=rank, tp_size=2, tp_group=dist.group.WORLD)
    out = _build(pctx)
    queue.put((rank, out.tolist()))  # plain data: tensors would go through shared memory
    dist.barrier()
    dist.destroy_process_group()


def test_tp2_mlp_equals_unsharded():
    expected = _build(ParallelContext())
    ctx = process_context()   # the engines' fork server: torch is imported there already
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        torch.testing.assert_close(torch.tensor(results[rank]), expected, rtol=1e-4, atol=1e-4)  # fp32 sum order differs
