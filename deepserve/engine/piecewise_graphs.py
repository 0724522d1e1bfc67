"""Piecewise CUDA graphs: steps of any kind (prompt chunks, decodes, both mixed) of up to
`max_tokens` tokens replay graphs of everything but attention, which runs eagerly between
them with the step's own metadata (vLLM's cudagraph_mode PIECEWISE; FULL_AND_PIECEWISE when
decode-only steps replay whole graphs, engine/cuda_graphs.py).

A decoder model is cut at each layer's attention (`before_attention` / `self_attn.attend` /
`after_attention`, models/llama.py and models/deepseek_v3.py):

    piece 0      embedding, layer 0's input norm and attention inputs (QKV + rope; MLA's q / kv_a)
    piece i      layer i-1's o_proj, norm and MLP / MoE, then layer i's norm and attention inputs
    piece L      layer L-1's o_proj, norm and MLP / MoE, then the final norm

Pieces are captured per padded token count (`capture_sizes`: vLLM's default list, at most 16
rows of padding above 256); a step of n tokens runs the pieces of the smallest size N >= n.
Token ids, positions and the attention's output live in static buffers of `max_tokens` rows.
Rows n..N-1 carry whatever the buffers held (valid ids and positions, finite values): every
op of a piece works row by row, so they never reach rows < n, and attention sees rows < n only.

What a piece hands on (the residual stream, the attention's inputs `parts`, the final hidden
states) is held one of two ways, both with all graphs in one memory pool:

- `copy_outputs=True` (the engine's): copied into static buffers too, so no graph keeps a
  tensor of its own; four copies a layer inside the graphs.
- `copy_outputs=False` (vLLM's way): each piece's own output tensors, kept after capture as
  `alias`es that do not hold their memory. The pool then gives that memory to the pieces
  captured later, which is safe because pieces replay in the order they were captured, each
  step from its first piece: an output is captured while the pieces that read it are captured
  (it is alive then), and once the next piece has replayed nothing reads it again.

Uncaptured (the CPU), the same pieces run as plain calls over the same buffers: the CPU tests
check that path against the model's forward, and the GPU tests check the graphs against it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from deepserve.ops import OpTable
from deepserve.ops.registry import replays_graphs
from deepserve.layers.attention import AttentionMetadata

logger = logging.getLogger("deepserve")


def capture_sizes(max_tokens: int) -> list[int]:
    """Token counts captured up to `max_tokens`: vLLM's default list to 512 (1, 2, 4, multiples
    of 8 below 256, multiples of 16 from 256), multiples of 64 above 512 (a step pads by at most
    63 tokens, under 6% beyond 1,024, with a sixth of the sizes to capture), `max_tokens`
    itself last."""
    sizes = ([1, 2, 4] + list(range(8, 256, 8)) + list(range(256, min(max_tokens, 512) + 1, 16))
             + list(range(576, max_tokens + 1, 64)))
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


def layout_reason(pp_size: int, moe_dp_exchange: bool) -> Optional[str]:
    """Why a parallel layout runs no piecewise graphs (None where it can): the model runner
    builds them for one pipeline stage without the DP ranks' MoE token exchange."""
    if pp_size > 1:
        return f"{pp_size} pipeline stages (pieces need the whole model in one stage)"
    if moe_dp_exchange:
        return "DP attention + EP (every DP rank would have to replay the same padded size)"
    return None


def splittable(model: torch.nn.Module) -> bool:
    """Whether `model` can run as pieces: a decoder whose layers split at their attention."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return (layers is not None and len(layers) > 0 and hasattr(inner, "embed_tokens") and hasattr(inner, "norm")
            and all(hasattr(m, "before_attention") and hasattr(m, "after_attention") for m in layers))


class _DeviceMemory:
    """`nbytes` of device memory at `ptr`, described by the CUDA array interface and not owned."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3}


def span_elements(t: torch.Tensor) -> int:
    """Elements from t's first to its last, strides included."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0


def restride(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bytes `raw` (uint8, from `like`'s first element) seen with `like`'s dtype, shape and strides."""
    return raw.view(like.dtype).as_strided(like.shape, like.stride())


def alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over t's memory that does not keep it allocated (vLLM's weak_ref_tensor)."""
    with torch.cuda.device(t.device):  # (the interface's memory is taken to be the current device's)
        raw = torch.as_tensor(_DeviceMemory(t.data_ptr(), span_elements(t) * t.element_size()), device=t.device)
    assert raw.data_ptr() == t.data_ptr(), "alias copied the memory instead of viewing it"
    return restride(raw, t)


class PiecewiseGraphs:
    """The model's forward as pieces around eager attention, replayed from CUDA graphs when
    captured. `run(ids, positions, meta)` -> hidden states [n, D], as `model(...)` returns."""

    def __init__(self, model: torch.nn.Module, max_tokens: int, device: torch.device,
                 sizes: Optional[list[int]] = None, copy_outputs: bool = True):
        if max_tokens < 1:
            raise ValueError(f"piecewise CUDA graphs need max_tokens >= 1, got {max_tokens}")
        self.embed = model.model.embed_tokens
        self.layers = list(model.model.layers)
        self.norm = model.model.norm
        self.device = device
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.num_pieces = len(self.layers) + 1
        self.input_ids = torch.zeros(self.max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_tokens, dtype=torch.int64, device=device)
        # attn_out (and with copy_outputs residual, part0.., hidden): [max_tokens, ...], made at
        # their first write
        self.buffers: dict[str, torch.Tensor] = {}
        self.copy_outputs = copy_outputs
        # without copy_outputs: size -> each piece's outputs by name (captured: aliases)
        self.held: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.part_names: tuple[str, ...] = ()   # what piece i hands layer i's attention
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.replays = 0     # piece graphs replayed
        self.steps = 0       # steps run through the pieces (captured or not)

    # ------------------------------------------------------------------ pieces
    def _put(self, name: str, value: torch.Tensor) -> None:
        buf = self.buffers.get(name)
        if buf is None:
            buf = torch.zeros(self.max_tokens, *value.shape[1:], dtype=value.dtype, device=self.device)
            self.buffers[name] = buf
        buf[:value.shape[0]].copy_(value)

    def _keep(self, size: int, i: int, outputs: dict[str, torch.Tensor]) -> None:
        if self.copy_outputs:
            for name, value in outputs.items():
                self._put(name, value)
        else:
            self.held.setdefault(size, [{} for _ in range(self.num_pieces)])[i] = outputs

    def output(self, size: int, i: int, name: str) -> torch.Tensor:
        """Output `name` of piece i at `size` rows."""
        return self.buffers[name][:size] if self.copy_outputs else self.held[size][i][name]

    def piece(self, i: int, size: int) -> None:
        """Piece i over the first `size` rows."""
        if i == 0:
            x, residual = self.embed(self.input_ids[:size]), None
        else:
            x, residual = self.layers[i - 1].after_attention(self.buffers["attn_out"][:size],
                                                             self.output(size, i - 1, "residual"))
        if i == len(self.layers):
            self._keep(size, i, {"hidden": self.norm(x, residual)[0]})
            return
        parts, residual = self.layers[i].before_attention(self.positions[:size], x, residual)
        self.part_names = tuple(f"part{j}" for j in range(len(parts)))
        self._keep(size, i, {"residual": residual, **{f"part{j}": part for j, part in enumerate(parts)}})

    def attend(self, i: int, size: int, n: int, positions: torch.Tensor, meta: AttentionMetadata,
               step: Optional[dict] = None) -> None:
        """Layer i's attention over the first n rows (the step's real tokens, at `positions`),
        eagerly, written into the static attn_out buffer (made by the first call). `step`: a
        dict the caller keeps for the step's layers, where the first keeps the views of the
        buffers it reads and writes: with copy_outputs every layer's are the same (its
        attention can then derive its own once a step too: layers/mla.py MixedRows)."""
        views = None if step is None or not self.copy_outputs else step.get(self.part_names)
        if views is None:
            parts = tuple(self.output(size, i, name)[:n] for name in self.part_names)
            buf = self.buffers.get("attn_out")
            views = parts, None if buf is None else buf[:n]
            if step is not None and self.copy_outputs and buf is not None:
                step[self.part_names] = views
        parts, out = views
        attn = self.layers[i].self_attn
        if out is None:
            self._put("attn_out", attn.attend(positions, parts, meta))
        else:
            attn.attend(positions, parts, meta, out=out)

    def _forward(self, size: int, n: int, meta: AttentionMetadata, run_piece: Callable[[int, int], None]) -> None:
        positions = self.positions[:n]
        step: dict = {}
        for i in range(self.num_pieces):
            run_piece(i, size)
            if i < len(self.layers):
                self.attend(i, size, n, positions, meta, step)

    # ------------------------------------------------------------------ steps
    def size_for(self, num_tokens: int) -> int:
        """The captured size a step of `num_tokens` tokens runs at."""
        return next(s for s in self.sizes if s >= num_tokens)

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [n, D] of every row: a view of a static buffer, valid until the next run."""
        n = input_ids.shape[0]
        size = self.size_for(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        graphs = self.graphs.get(size)
        self._forward(size, n, meta, self.piece if graphs is None else self._replay(graphs))
        self.steps += 1
        return self.output(size, len(self.layers), "hidden")[:n]

    def _replay(self, graphs: list[torch.cuda.CUDAGraph]) -> Callable[[int, int], None]:
        def replay(i: int, size: int) -> None:
            graphs[i].replay()
            self.replays += 1
        return replay

    # ------------------------------------------------------------------ capture
    def dummy_meta(self, n: int) -> AttentionMetadata:
        """n one-token rows that write nothing (slot -1) and read one slot of block 0."""
        dev = self.device
        return AttentionMetadata(
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(n, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(n, 1, dtype=torch.int32, device=dev),
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=dev),
            logits_indices=torch.arange(n, dtype=torch.int64, device=dev), max_query_len=1, max_seq_len=1,
            num_decodes=n)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size's pieces (largest first) into one pool, each size after one eager
        run of it (kernels compiled, buffers made). Without copy_outputs, piece i's outputs stay
        alive while piece i + 1 (which reads its residual) is captured, then become aliases."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.sizes):
            meta = self.dummy_meta(size)
            self._forward(size, size, meta, self.piece)
            torch.cuda.synchronize(self.device)
            graphs = []
            for i in range(self.num_pieces):
                graph = torch.cuda.CUDAGraph()
                # torch.cuda.graph() would also run gc.collect() for each of the many pieces
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    graph.capture_begin(pool=pool)
                    try:
                        self.piece(i, size)
                    finally:
                        graph.capture_end()
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graphs.append(graph)
                if not self.copy_outputs and i > 0:
                    self._release(size, i - 1)
            if not self.copy_outputs:
                self._release(size, self.num_pieces - 1)
            self.graphs[size] = graphs
        torch.cuda.synchronize(self.device)

    def _release(self, size: int, i: int) -> None:
        """Piece i's outputs as aliases: their memory goes back to the pool for later pieces."""
        held = self.held[size]
        held[i] = {name: alias(t) for name, t in held[i].items()}


def capture_for(model: torch.nn.Module, ops: OpTable, max_tokens: int, device: torch.device,
                copy_outputs: bool = True) -> Optional[PiecewiseGraphs]:
    """The model's piecewise graphs, captured (None, with the reason logged, where they cannot
    be: its op table's backend syncs with the host, the model does not split, or capture fails)."""
    if not replays_graphs(ops.backend):
        logger.info("piecewise CUDA graphs off: ops backend %s syncs with the host", ops.name)
        return None
    if not splittable(model):
        logger.info("piecewise CUDA graphs off: %s does not split at its attention", type(model).__name__)
        return None
    pieces = PiecewiseGraphs(model, max_tokens, device, copy_outputs=copy_outputs)
    t0 = time.perf_counter()
    try:
        pieces.capture()
    except RuntimeError as exc:  # e.g. an op falls back to a path that syncs with the host
        logger.warning("piecewise CUDA graph capture failed, running those steps eagerly: %s", exc)
        return None
    logger.info("piecewise CUDA graphs: %d sizes up to %d tokens, %d pieces each, captured in %.1f s",
                len(pieces.sizes), pieces.max_tokens, pieces.num_pieces, time.perf_counter() - t0)
    return pieces
