"""Launch-setting sweep of the split-KV decode attention kernel for MLA (issue 4), GQA as a guard,
and with --fp8 of the e4m3-MMA MLA decode kernel over an fp8 latent pool (issue 16).

    python benchmarks/sweep_mla_decode.py [--quick] [--write]   # GPU; full grid < 120 s on an H100
    python benchmarks/sweep_mla_decode.py --fp8 [--quick] [--write] [--budget S]
    python benchmarks/sweep_mla_decode.py --device cpu --tiny [--fp8]   # the script's logic, interpreted

Cases (bf16, every row a decode row at the same context): MLA with V2-Lite's 16 heads at
batch 64 (memory-bound) in 64-token pages and in 16-token pages (default settings only), R1's
128 heads at batch 4 and 64 (mostly compute-bound: 128 heads x 1088 MACs per cached token),
and GQA 32/8 x 128 at batch 64, whose setting is already at ~98% of copy bandwidth and must
not regress. Each candidate (BLOCK_H, BLOCK_N, warps, stages, programs per SM, and
page_tile=False for the page-id-per-key form) is appended to the `attention_decode` launch
table for the run (`launch_config.trying`), checked against the torch reference (a wrong one
prints WRONG, not a speed), then timed as CUDA-graph replays like the engine runs decode.
`--write` adds the fastest correct setting of each case marked `writes` (one per table key:
MLA 16 heads in 64-token pages, R1's 128 heads at batch 64, GQA) to the running device's
table (deepserve/ops/triton/configs/attention_decode/<device>.json, or under --config-dir),
as a rule on the shape variables the kernel looks the table up by. Bandwidth counts the cache bytes read once
(MLA: the 576-wide latent; GQA: K and V) against a 2 GiB device-to-device copy measured
first (benchmarks/sweep_setup.py; with --device cpu a wall-clock logic check). A candidate
that does not compile (shared memory, registers) prints one line and is skipped.

--fp8: R1's latent pool in e4m3 (576-wide keys, the first 512 the values, 64-token pages) at
16 heads (R1 under TP8) and 128 (one rank), batch 1, 64 and 256 at 4k context and batch 64 at
32k, every row at the full context. Candidates (BLOCK_H, BLOCK_N, warps, stages, maxnreg,
dv_run, and the split count's programs_per_sm and min_split) are appended to the `mla_decode_fp8` table;
one whose split count and tile repeat a timed one is not timed again. Each is checked against
the torch op on q rounded to e4m3 the kernel's way (rows 0, 1 and the last two; every row
holds the same context), then timed as CUDA-graph replays; bandwidth counts the pool's bytes
read once (one a value). Every 4k case writes its fastest correct setting with --write, as a
rule over a batch range of its own (FP8_SHAPES; the ranges are disjoint, so the rules' order
does not matter), right after the case: a run cut short (--budget, or a SIGTERM from
`timeout`) keeps what it measured, the case it was in included. The 32k cases are timed only.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import bandwidth_and_timer, prepare, try_setting  # noqa: E402

# (BLOCK_H, BLOCK_N, num_warps, num_stages) tiles per case kind, most promising first; the
# sm_90 builds of the MLA ones were checked offline for spills and shared memory (64 heads x
# 64 keys needs 221 KB of shared memory: in the full grid only; 4 warps x 64 keys spilled with
# a page id per key and is the fastest with one page per tile)
MLA16_TILES = [(16, 64, 4, 2), (16, 32, 4, 3), (16, 64, 8, 2), (16, 64, 4, 3), (16, 32, 4, 2),
               (16, 64, 8, 3), (16, 16, 4, 2), (16, 32, 8, 2), (64, 32, 8, 2)]
MLA128_TILES = [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2), (64, 32, 8, 3),
                (64, 16, 8, 3), (32, 32, 8, 3), (64, 64, 8, 2)]
GQA_TILES = [(16, 64, 4, 2), (16, 32, 4, 2), (16, 64, 4, 3), (16, 64, 8, 2)]


@dataclass
class Case:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    v_dim: int
    batch: int
    ctx: int
    block_size: int
    scale: float
    mla: bool
    grid: list[dict]
    writes: bool = False       # its best setting goes into the table with --write

    def rule_if(self) -> dict:
        """The table conditions this case's shapes meet (decode_config's shape variables)."""
        group = self.heads // self.kv_heads
        return {"mla": self.head_dim + self.v_dim > 512, "heads": max(16, 1 << (group - 1).bit_length()),
                "block_size": self.block_size}

    def cache_bytes(self) -> int:
        """Cache bytes a decode step must read: the shared latent once, or K and V."""
        per_token = self.head_dim if self.mla else self.head_dim + self.v_dim
        return self.batch * self.ctx * self.kv_heads * per_token * 2


def settings(tiles, pps, **flags) -> list[dict]:
    return [dict(BLOCK_H=h, BLOCK_N=n, num_warps=w, num_stages=s, programs_per_sm=p, **flags)
            for h, n, w, s in tiles for p in pps]


# the kernel with a page id per key beside the default
OLD_FORM = dict(page_tile=False)


def make_cases(quick: bool, tiny: bool) -> list[Case]:
    batch64, batch4, ctx = (2, 2, 64) if tiny else (64, 4, 4096)
    q = quick or tiny
    # programs per SM: 3 and 6 too, in case 4 left a partial wave
    mla16 = settings(MLA16_TILES[:4], (3, 4)) if q else settings(MLA16_TILES[:-1], (2, 3, 4, 5, 6, 8)) \
        + settings(MLA16_TILES[-1:], (4,))
    # the old form (a page id per key) at its best setting; 16-token pages: the default alone
    mla16 += settings([(16, 32, 4, 2)], (4,), **OLD_FORM)
    mla16_bs16 = []
    # at batch 4 the split count is capped by MIN_TOKENS_PER_SPLIT, not programs per SM
    mla128_b4 = settings(MLA128_TILES[:4] if q else MLA128_TILES, (4,))
    mla128_b64 = settings(MLA128_TILES[:2], (1, 4)) if q else settings(MLA128_TILES[:5], (1, 2, 4))
    mla128_b64 += settings(MLA128_TILES[4:5], (1,), **OLD_FORM)
    gqa = [] if q else settings(GQA_TILES, (2,))
    return [Case("mla_h16_b64", 16, 1, 576, 512, batch64, ctx, 64, 0.072, True, mla16, writes=True),
            Case("mla_h16_b64_bs16", 16, 1, 576, 512, batch64, ctx, 16, 0.072, True, mla16_bs16),
            Case("mla_h128_b4", 128, 1, 576, 512, batch4, ctx, 64, 0.072, True, mla128_b4),
            Case("mla_h128_b64", 128, 1, 576, 512, batch64, ctx, 64, 0.072, True, mla128_b64, writes=True),
            Case("gqa_h32kv8_b64", 32, 8, 128, 128, batch64, ctx, 16, 0.088, False, gqa, writes=True)]


# --fp8 tiles (BLOCK_H, BLOCK_N, warps, stages, maxnreg: 0 for none, dv_run) per head count,
# the default first, then by promise. From the sm_90 builds (Triton 3.6, compiled offline;
# registers a thread, bytes spilled, shared memory): 16 x 64 at 4 warps and 3 stages 255, none,
# 89 KB (2 programs an SM), V^T read by 256 LDS.U8 a thread a tile; dv_run 2 and 4 read it by
# 128 LDS.U16 / 64 LDS.32 (more PRMT), no spills; dv_run 16 spills 772 B. At 2 stages 255, 36
# B, 52 KB (one buffer; a 128-register cap spills 836 B, 168 648 B); at 4 stages 126 KB (1
# program); 8 warps split the [512, 16] output over two warp groups, each computing the whole S
# tile (1 program an SM). 128 heads: 64 a program spills 636 B at 8 warps, 32 a program none (4
# head groups read each latent tile, the later ones mostly from L2; V^T by 128 LDS.U8 a thread,
# 32 LDS.32 with dv_run 4); 16 warps spill 216-1,640 B and compute S four times.
# benchmarks/sass_mla_decode_fp8.py prints these for any setting.
FP8_TILES = {16: [(16, 64, 4, 3, 0, 1), (16, 64, 4, 3, 0, 4), (16, 64, 4, 3, 0, 2), (16, 64, 8, 3, 0, 1),
                  (16, 64, 4, 2, 0, 4), (16, 64, 8, 3, 0, 4), (16, 64, 4, 4, 0, 1)],
             128: [(32, 64, 8, 3, 0, 1), (32, 64, 8, 3, 0, 4), (16, 64, 4, 3, 0, 4), (16, 64, 4, 3, 0, 1),
                   (64, 64, 8, 3, 0, 1), (32, 64, 8, 2, 0, 4)]}
# (heads, batch, context, the table conditions its best setting is written under, or None: timed
# only), the target first: a run cut short has swept the shapes that matter most. No rule
# names the context: under CUDA graphs the kernel sees the captured maximum (max_model_len) as
# max_seq_len whatever the rows hold, so the 32k cases show whether the 4k settings hold there.
FP8_SHAPES = [(16, 64, 4096, {"heads": 16, "batch_ge": 8, "batch_lt": 128}),
              (128, 64, 4096, {"heads": 128, "batch_ge": 8, "batch_lt": 128}),
              (16, 256, 4096, {"heads": 16, "batch_ge": 128}),
              (16, 1, 4096, {"heads": 16, "batch_lt": 8}),
              (128, 256, 4096, {"heads": 128, "batch_ge": 128}),
              (128, 1, 4096, {"heads": 128, "batch_lt": 8}),
              (16, 64, 32768, None),
              (128, 64, 32768, None)]
FP8_WIDTH, FP8_V_WIDTH, FP8_PAGE, FP8_SCALE = 576, 512, 64, 0.072


@dataclass
class Fp8Case:
    name: str
    heads: int
    batch: int
    ctx: int
    when: Optional[dict]
    grid: list[dict]

    def cache_bytes(self) -> int:
        return self.batch * self.ctx * FP8_WIDTH


def fp8_settings(tiles, pps, min_split=(256,), fused=(0,)) -> list[dict]:
    return [dict(BLOCK_H=h, BLOCK_N=n, num_warps=w, num_stages=s, maxnreg=r, dv_run=d, programs_per_sm=p,
                 min_split=m, fused_merge=f) for h, n, w, s, r, d in tiles for p in pps for m in min_split
            for f in fused]


def make_fp8_cases(quick: bool, tiny: bool) -> list[Fp8Case]:
    cases = []
    for heads, batch, ctx, when in FP8_SHAPES:
        tiles = FP8_TILES[heads][:3] if quick else FP8_TILES[heads]
        if batch == 1:          # 1-2 programs per split at most: the split floor decides
            grid = fp8_settings(tiles[:2], (4,), (64, 128, 256))
        elif batch == 256 or ctx > 4096:
            grid = fp8_settings(tiles, (1, 2, 4) if not quick else (2, 4))
        else:                   # several splits a row: the merge by the last split (fused_merge) too
            grid = fp8_settings(tiles, (1, 2, 3, 4) if quick else (1, 2, 3, 4, 6, 8), fused=(0, 1))
        if tiny:                # interpreted: the logic only, at toy sizes
            batch, ctx, grid = {1: 1, 64: 2, 256: 3}[batch], 128 if ctx > 4096 else 64, grid[:2]
        cases.append(Fp8Case(f"fp8_h{heads}_b{batch}_ctx{ctx}", heads, batch, ctx, when, grid))
    return cases


def fp8_batch(case: Fp8Case, device: str):
    """Every row at the full context over a shuffled e4m3 pool, built on `device` (the CPU
    builder of tests/ops/paged_batch is minutes at 32k context)."""
    from tests.ops.paged_batch import PagedBatch
    g = torch.Generator(device=device).manual_seed(0)
    pages = -(-case.ctx // FP8_PAGE)
    n_blocks = case.batch * pages + 3
    tables = torch.randperm(n_blocks, generator=g, device=device)[:case.batch * pages]
    pool = torch.randn(n_blocks, FP8_PAGE, 1, FP8_WIDTH, generator=g, device=device, dtype=torch.bfloat16)
    pool = pool.to(torch.float8_e4m3fn)
    q = torch.randn(case.batch, case.heads, FP8_WIDTH, generator=g, device=device, dtype=torch.bfloat16)
    return PagedBatch(q, pool, pool[..., :FP8_V_WIDTH], torch.arange(case.batch + 1, dtype=torch.int32, device=device),
                      torch.full((case.batch,), case.ctx, dtype=torch.int32, device=device),
                      tables.view(case.batch, pages).to(torch.int32), 1, case.ctx)


def fp8_label(cfg: dict) -> str:
    return (f"h{cfg['BLOCK_H']} n{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']} "
            f"r{cfg['maxnreg']} dv{cfg['dv_run']} pps{cfg['programs_per_sm']} min{cfg['min_split']}"
            f"{' fused' if cfg.get('fused_merge') else ''}")


def run_fp8_case(case: Fp8Case, device: str, timer, bw: float, rows: list, out_of_time, best: dict) -> None:
    """Time the table's setting and every candidate of `case`, keeping the fastest correct one
    (its full settings, the table's own included) in best["set"] as it goes, so that a cut run
    still has it."""
    from deepserve.ops.registry import resolve
    from deepserve.ops.triton import attention, launch_config
    from tests.ops.test_kv_fp8_ops import q_rounded_to_e4m3

    pb = fp8_batch(case, device)
    args = pb.args(FP8_SCALE)
    check = sorted({0, 1, case.batch - 2, case.batch - 1} & set(range(case.batch)))
    idx = torch.tensor(check, device=device)
    sub = (q_rounded_to_e4m3(pb.q[idx]), pb.k_cache, pb.v_cache,
           torch.arange(len(check) + 1, dtype=torch.int32, device=device), pb.seq_lens[idx], pb.block_tables[idx],
           FP8_SCALE, 1, case.ctx)
    want = resolve("paged_attention", "torch")[1](*sub).float()
    tri = resolve("paged_attention", "triton")[1]
    dev = torch.device(device)
    default = attention.mla_fp8_decode_config(case.heads, case.batch, case.ctx, FP8_PAGE, attention.table_key(dev))
    seen = set()
    for cfg in [None] + case.grid:
        if out_of_time():
            print(f"{case.name}: out of time, {len(seen)} settings timed", flush=True)
            break
        full = dict(default, **(cfg or {}))
        name = ("default " if cfg is None else "") + fp8_label(full)
        tile = tuple(full.get(k, 0) for k in ("BLOCK_H", "BLOCK_N", "num_warps", "num_stages", "maxnreg", "dv_run",
                                              "fused_merge", "qk_promote"))
        splits = attention.fp8_decode_splits(case.batch, -(-case.heads // full["BLOCK_H"]), case.ctx,
                                             full["BLOCK_N"], attention.sm_count(dev), full["programs_per_sm"],
                                             full["min_split"])
        if (tile, splits) in seen:
            continue
        seen.add((tile, splits))
        with launch_config.trying("mla_decode_fp8", [{"set": cfg}] if cfg else []):
            try:
                got = tri(*args)[check].float()
            except Exception as exc:  # noqa: BLE001  (report, let the sweep go on)
                print(f"{case.name:22s} {name:40s} failed to build or launch: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120] if str(exc) else ''}", flush=True)
                continue
            err = float((got - want).norm() / want.norm())
            if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                print(f"{case.name:22s} {name:40s} WRONG: relative error {err:.3g}", flush=True)
                rows.append((case.name, name, None, None, None))
                continue
            ms = timer(lambda: tri(*args))
        rate = case.cache_bytes() / (ms * 1e-3)
        rows.append((case.name, name + f" x{splits}", ms * 1e3, rate / 1e9, rate / bw))
        print(f"{case.name:22s} {name:40s} x{splits:<3d} {ms * 1e3:9.1f} us {rate / 1e9:8.1f} GB/s {rate / bw:6.1%} "
              f"(rel err {err:.2g})", flush=True)
        if ms < best.get("ms", float("inf")):
            best.update(ms=ms, set=full)


class Cut(BaseException):
    """SIGTERM (`timeout`) during a sweep: stop, keep and write what was measured. Not an
    Exception, so that the handlers of a failed build or launch (ours, the interpreter's) do
    not take it for one."""


def _cut(signum, frame):
    raise Cut()


def label(cfg: dict) -> str:
    flags = "".join(f" no-{k}" for k in ("page_tile",) if cfg.get(k) is False)
    return (f"h{cfg['BLOCK_H']} n{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']} "
            f"pps{cfg['programs_per_sm']}{flags}")


def run_case(case: Case, device: str, timer, bw: float, rows: list) -> Optional[dict]:
    """Time the default and every candidate of `case`; returns the fastest correct candidate
    (None when the default is fastest or nothing else was correct)."""
    from deepserve.ops.registry import resolve
    from deepserve.ops.triton import attention
    from tests.ops.paged_batch import make_paged_batch

    pb = make_paged_batch([1] * case.batch, [case.ctx] * case.batch, case.heads, case.kv_heads,
                          case.head_dim, case.v_dim, block_size=case.block_size, dtype=torch.bfloat16,
                          device=device, mla=case.mla)
    args = pb.args(case.scale)
    want = resolve("paged_attention", "torch")[1](*args).float()
    tri = resolve("paged_attention", "triton")[1]
    rule = case.rule_if()
    default = attention.decode_config(rule["mla"], case.heads // case.kv_heads, case.block_size,
                                      attention.table_key(torch.device(device)))
    default.pop("page_tile")                 # the label shows only settings a candidate changes
    best = (float("inf"), None)
    for cfg in [None] + case.grid:
        name = "default " + label(default) if cfg is None else label(cfg)
        ms, err, why = try_setting("attention_decode", [{"set": cfg}] if cfg else [], lambda: tri(*args), want, timer)
        if ms is None:
            print(f"{case.name:15s} {name:30s} {why}", flush=True)
            if why.startswith("WRONG"):
                rows.append((case.name, name, None, None, None))
            continue
        rate = case.cache_bytes() / (ms * 1e-3)
        rows.append((case.name, name, ms * 1e3, rate / 1e9, rate / bw))
        print(f"{case.name:15s} {name:30s} {ms * 1e3:9.1f} us {rate / 1e9:8.1f} GB/s {rate / bw:6.1%} "
              f"(max err {err:.2g})", flush=True)
        if ms < best[0]:
            best = (ms, cfg)
    return best[1]


def print_table(rows: list) -> None:
    w = max([15, 30] + [len(r[0]) for r in rows]), max([30] + [len(r[1]) for r in rows])
    print(f"\n{'case':{w[0]}s} {'settings':{w[1]}s} {'us':>9s} {'GB/s':>8s} {'% copy':>7s}")
    for case, name, us, gbs, frac in rows:
        if us is None:
            print(f"{case:{w[0]}s} {name:{w[1]}s} {'WRONG':>9s}")
        else:
            print(f"{case:{w[0]}s} {name:{w[1]}s} {us:9.1f} {gbs:8.1f} {frac:7.1%}")
    print("\nbest per case:")
    for case in dict.fromkeys(r[0] for r in rows):
        timed = [r for r in rows if r[0] == case and r[2] is not None]
        if not timed:
            print(f"{case:{w[0]}s} no candidate was correct")
            continue
        best = min(timed, key=lambda r: r[2])
        default = next((r for r in timed if r[1].startswith("default")), None)
        vs = f", default {default[2]:.1f} us ({default[4]:.1%})" if default else ""
        print(f"{case:{w[0]}s} {best[1]:{w[1]}s} {best[2]:9.1f} us {best[4]:7.1%}{vs}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller grid (the likeliest settings)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu runs the kernels under TRITON_INTERPRET=1 (a logic check, not a timing)")
    ap.add_argument("--tiny", action="store_true", help="batch 2, context 64: for --device cpu")
    ap.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--write", action="store_true",
                    help="add each table case's fastest setting to the device's attention_decode launch table")
    ap.add_argument("--config-dir", default=None, help="write the table under this folder instead of the package's")
    ap.add_argument("--fp8", action="store_true",
                    help="sweep the e4m3-MMA kernel over an fp8 latent pool (table mla_decode_fp8) instead")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds: start no candidate after this (0: no limit); what was measured is kept")
    args = ap.parse_args()
    prepare(args.device)                     # before any kernel module is imported
    began = time.perf_counter()
    bw, timer = bandwidth_and_timer(args.device)
    only = [s for s in args.only.split(",") if s]
    rows: list = []
    if args.fp8:
        return sweep_fp8(args, only, began, bw, timer, rows)
    rules = []
    for case in make_cases(args.quick, args.tiny):
        if not only or any(s in case.name for s in only):
            best = run_case(case, args.device, timer, bw, rows)
            if case.writes and best is not None:
                rules.append({"if": case.rule_if(), "set": best})
    print_table(rows)
    if args.write:
        from deepserve.ops.triton import launch_config
        path = launch_config.save_rules("attention_decode", launch_config.device_key(torch.device(args.device)),
                                        rules, Path(args.config_dir) if args.config_dir else None)
        print(f"wrote {len(rules)} rules to {path}")
    print(f"\nsweep took {time.perf_counter() - began:.0f} s")
    return 0


def sweep_fp8(args, only: list, began: float, bw: float, timer, rows: list) -> int:
    from deepserve.ops.triton import launch_config
    key = launch_config.device_key(torch.device(args.device))
    folder = Path(args.config_dir) if args.config_dir else None
    signal.signal(signal.SIGTERM, _cut)
    out_of_time = lambda: bool(args.budget) and time.perf_counter() - began > args.budget  # noqa: E731
    written = 0
    try:
        for case in make_fp8_cases(args.quick, args.tiny):
            if only and not any(s in case.name for s in only):
                continue
            best: dict = {}
            try:
                run_fp8_case(case, args.device, timer, bw, rows, out_of_time, best)
            except Cut:
                print(f"{case.name}: cut by SIGTERM", flush=True)
                raise
            finally:
                # the case's best so far, also when cut inside it
                if args.write and "set" in best and case.when is not None:
                    path = launch_config.save_rules("mla_decode_fp8", key, [{"if": case.when, "set": best["set"]}],
                                                    folder)
                    written += 1
                    print(f"wrote {case.name}'s best to {path}", flush=True)
            if out_of_time():
                break
    except Cut:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print_table(rows)
    print(f"\n{written} rules written; sweep took {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
