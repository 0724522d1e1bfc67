"""`deepserve convert`: checkpoint conversions (FP8 -> BF16, FP8 block / INT8 W8A8 quantization).

Both sub-commands build DST as `DST.partial` and rename it when complete; re-running the same
command after an interruption resumes, skipping shards already written and verified.
"""
from __future__ import annotations

import argparse
import sys

from deepserve.quant.policy import HIGH_PRECISION_HELP

_ATOMIC_HELP = ("The output is built in DST.partial and renamed to DST when complete; re-run "
                "the same command to resume an interrupted conversion.")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC",
                   help="source checkpoint folder (config.json + safetensors)")
    p.add_argument("dst", metavar="DST", help="destination folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto",
                   help="where the math runs: auto (cuda if available), cpu, cuda, cuda:N; "
                        "the output is bit-identical on every device")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert checkpoints (fp8-to-bf16, quantize)",
        description="Convert Hugging Face checkpoint folders. " + _ATOMIC_HELP)
    sub = parser.add_subparsers(dest="convert_command", metavar="CONVERSION")

    fp8 = sub.add_parser(
        "fp8-to-bf16", help="DeepSeek FP8 (e4m3 + 128x128 weight_scale_inv) to BF16",
        description="Dequantize DeepSeek's FP8 release to BF16: y = bf16(fp32(w) * scale_inv) "
                    "per 128x128 block; drops the scale tensors and quantization_config. "
                    + _ATOMIC_HELP)
    _add_common(fp8)
    fp8.set_defaults(func=_fp8_to_bf16)

    quant = sub.add_parser(
        "quantize", help="BF16/FP16/FP32 to fp8-block or w8a8-int8",
        description="Quantize Linear weights. fp8-block: DeepSeek's FP8 format (e4m3 weight, fp32 "
                    "weight_scale_inv per 128x128 block, dynamic activations). w8a8-int8: "
                    "symmetric per-output-channel int8 weight + fp32 weight_scale [N,1], dynamic "
                    "per-token int8 activations, compressed-tensors format (loads in vLLM). "
                    + HIGH_PRECISION_HELP + " " + _ATOMIC_HELP)
    _add_common(quant)
    quant.add_argument("--method", required=True, choices=["fp8-block", "w8a8-int8"],
                       help="output format")
    quant.set_defaults(func=_quantize)

    parser.set_defaults(func=lambda args: _no_conversion(parser))


def _no_conversion(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _report(rep) -> int:
    print(f"wrote {rep.dst}: {rep.shards_converted} shard(s) converted, "
          f"{rep.shards_skipped} already done and verified, "
          f"{rep.bytes_written / 1e9:.3f} GB in {rep.seconds:.1f} s")
    return 0


def _fp8_to_bf16(args: argparse.Namespace) -> int:
    from deepserve.quant import convert_fp8_to_bf16
    return _report(convert_fp8_to_bf16(args.src, args.dst, overwrite=args.overwrite,
                                       progress=not args.no_progress, device=args.device))


def _quantize(args: argparse.Namespace) -> int:
    from deepserve.quant import quantize_checkpoint
    return _report(quantize_checkpoint(args.src, args.dst, args.method, overwrite=args.overwrite,
                                       progress=not args.no_progress, device=args.device))
