"""`deepserve convert`: checkpoint conversions (FP8 -> BF16; FP8 block, INT8 W8A8 and 4-bit
W4A16 / W4A8 quantization).

Both sub-commands build DST as `DST.partial` and rename it when complete; re-running the same
command after an interruption resumes, skipping shards already written and verified.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepserve.quant.pipeline import ConversionBusy, partial_dir
from deepserve.quant.policy import HIGH_PRECISION_HELP
from deepserve.quant.quantize_int4 import Int4Options

_ATOMIC_HELP = ("The output is built in DST.partial and renamed to DST when complete; re-run "
                "the same command to resume an interrupted conversion.")


_D = Int4Options()
INT4_DEFAULTS = {"fmt": _D.fmt, "algorithm": _D.algorithm, "group_size": _D.group_size, "asymmetric": not _D.symmetric,
                 "act_order": _D.act_order, "ignore": list(_D.ignore), "calib_dataset": _D.calib_dataset,
                 "calib_samples": _D.calib_samples, "calib_seq_len": _D.calib_seq_len, "damp": _D.damp}
_INT4_FLAGS = {"--format": "fmt", "--algorithm": "algorithm", "--group-size": "group_size",
               "--asymmetric": "asymmetric", "--act-order": "act_order",
               "--calib-dataset": "calib_dataset", "--calib-samples": "calib_samples",
               "--calib-seq-len": "calib_seq_len", "--damp": "damp"}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC",
                   help="source checkpoint folder (config.json + safetensors)")
    p.add_argument("dst", metavar="DST", help="destination folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto",
                   help="where the math runs: auto (cuda if available), cpu, cuda, cuda:N; rounding "
                        "alone (fp8-to-bf16, fp8-block, w8a8-int8, --algorithm rtn) writes the same bytes "
                        "on every device, GPTQ follows the device's arithmetic in its calibration "
                        "forwards and Hessians")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert checkpoints (fp8-to-bf16, quantize)",
        description="Convert Hugging Face checkpoint folders. " + _ATOMIC_HELP)
    sub = parser.add_subparsers(dest="convert_command", metavar="CONVERSION")

    fp8 = sub.add_parser(
        "fp8-to-bf16", help="FP8 (DeepSeek's e4m3 + 128x128 weight_scale_inv, or per-tensor / per-row / "
                            "block weight_scale) to BF16",
        description="Dequantize an FP8 checkpoint to BF16: y = bf16(fp32(w) * s), s the weight's scale of its "
                    "128x128 block (DeepSeek's weight_scale_inv, fp32 or E8M0), or its tensor, row or block "
                    "(compressed-tensors float-quantized, AutoFP8 weight_scale); drops the scale tensors "
                    "(static input_scale too) and quantization_config. " + _ATOMIC_HELP)
    _add_common(fp8)
    fp8.set_defaults(func=_fp8_to_bf16)

    quant = sub.add_parser(
        "quantize", help="BF16/FP16/FP32 to fp8-block, w8a8-int8, w4a16 or w4a8",
        description="Quantize Linear weights. fp8-block: DeepSeek's FP8 format (e4m3 weight, fp32 "
                    "weight_scale_inv per 128x128 block, dynamic activations). w8a8-int8: "
                    "symmetric per-output-channel int8 weight + fp32 weight_scale [N,1], dynamic "
                    "per-token int8 activations, compressed-tensors format (loads in vLLM). "
                    "w4a16 / w4a8: 4-bit weights in groups (routed experts included), written as "
                    "compressed-tensors pack-quantized or AutoAWQ GEMM (--format awq, w4a16 only); "
                    "w4a8 adds dynamic per-token int8 activations; quantized by GPTQ, layer by "
                    "layer on calibration text (--calib-dataset), or round-to-nearest. "
                    + HIGH_PRECISION_HELP + " " + _ATOMIC_HELP)
    _add_common(quant)
    quant.add_argument("--method", required=True, metavar="METHOD",
                       help="fp8-block, w8a8-int8, w4a16 or w4a8")
    quant.add_argument("--ignore", nargs="+", default=INT4_DEFAULTS["ignore"], metavar="MODULE",
                       help="modules kept in high precision, listed in the output's quantization_config "
                            "(fp8 ignored_layers, compressed-tensors ignore, AWQ modules_to_not_convert): "
                            "names (a parent module keeps all of its), or re:REGEX")
    int4 = quant.add_argument_group("4-bit options (w4a16, w4a8)")
    int4.add_argument("--format", default=INT4_DEFAULTS["fmt"], dest="fmt",
                      help="compressed-tensors (pack-quantized; default) or awq (AutoAWQ GEMM)")
    int4.add_argument("--algorithm", default=INT4_DEFAULTS["algorithm"],
                      help="gptq (default: Hessian-corrected rounding on calibration activations) or rtn "
                           "(round to nearest, no calibration)")
    int4.add_argument("--group-size", type=int, default=INT4_DEFAULTS["group_size"],
                      help="input features per scale (a multiple of 8 dividing every quantized layer's "
                           "input features; -1: one scale per output channel); default %(default)s")
    int4.add_argument("--asymmetric", action="store_true",
                      help="zero points per group (default: symmetric, signed values -8..7)")
    int4.add_argument("--act-order", action="store_true",
                      help="GPTQ over input features by decreasing activation energy (desc_act; writes g_idx)")
    int4.add_argument("--calib-dataset", metavar="FILE",
                      help="calibration text for GPTQ: a .jsonl / .json (ShareGPT) / .txt file, e.g. from "
                           "../shared/datasets")
    int4.add_argument("--calib-samples", type=int, default=INT4_DEFAULTS["calib_samples"], help="calibration sequences (default %(default)s)")
    int4.add_argument("--calib-seq-len", type=int, default=INT4_DEFAULTS["calib_seq_len"], help="tokens per calibration sequence (default %(default)s)")
    int4.add_argument("--damp", type=float, default=INT4_DEFAULTS["damp"],
                      help="GPTQ dampening, a fraction of the Hessian's mean diagonal (default %(default)s)")
    quant.set_defaults(func=_quantize)

    parser.set_defaults(func=lambda args: _no_conversion(parser))


def _no_conversion(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _run(convert, dst: str):
    """`convert()`, with its file-system failures (permission, disk full) as one line and an
    interrupt announced, each saying whether DST.partial holds work to resume, as a tensor refused
    after some shards were written does."""
    partial = partial_dir(Path(dst))

    def resume() -> str:
        return (f"what was written stays in {partial}: re-run the same command to resume"
                if partial.is_dir() else "nothing was written")
    try:
        return convert()
    except (FileNotFoundError, ConversionBusy):
        raise
    except ValueError as exc:   # a tensor refused midway: the shards before it are kept
        if any(partial.glob("*.safetensors")):
            raise ValueError(f"{exc}; {resume()}") from None
        raise
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise ValueError(f"{exc.strerror or exc}{where}; {resume()}") from None
    except KeyboardInterrupt:
        print(f"deepserve convert: interrupted; {resume()}", file=sys.stderr)
        raise


def _report(rep) -> int:
    print(f"wrote {rep.dst}: {rep.shards_converted} shard(s) converted, "
          f"{rep.shards_skipped} already done and verified, "
          f"{rep.bytes_written / 1e9:.3f} GB in {rep.seconds:.1f} s")
    return 0


def _fp8_to_bf16(args: argparse.Namespace) -> int:
    from deepserve.quant import convert_fp8_to_bf16
    return _report(_run(lambda: convert_fp8_to_bf16(args.src, args.dst, overwrite=args.overwrite,
                                                    progress=not args.no_progress, device=args.device), args.dst))


def _quantize(args: argparse.Namespace) -> int:
    from deepserve.quant import INT4_METHODS, METHODS, quantize_checkpoint
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    int4, runner, ignore = None, None, tuple(args.ignore)
    if args.method in INT4_METHODS:
        from deepserve.models.calibration import LayerRunner
        int4 = Int4Options(method=args.method, fmt=args.fmt, algorithm=args.algorithm,
                           group_size=args.group_size, symmetric=not args.asymmetric, act_order=args.act_order,
                           ignore=ignore, calib_dataset=args.calib_dataset,
                           calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, damp=args.damp)
        runner, ignore = LayerRunner, ()
    else:
        given = [flag for flag, attr in _INT4_FLAGS.items()
                 if getattr(args, attr) != INT4_DEFAULTS[attr]]
        if given:
            raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to the 4-bit methods "
                             f"(w4a16, w4a8), not --method {args.method}")
    return _report(_run(lambda: quantize_checkpoint(
        args.src, args.dst, args.method, overwrite=args.overwrite, progress=not args.no_progress,
        device=args.device, int4=int4, runner=runner, ignore=ignore), args.dst))
