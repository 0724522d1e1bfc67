"""`deepserve plan`: choose the TP / PP / DP / EP layout for a model on a set of GPUs.

    deepserve plan deepseek-r1 --gpus 16 --nodes 2 --gpu-memory 80GiB --quantization fp8
    deepserve plan deepseek-r1 --hostfile hostfile.txt --gpu-memory 80GiB

With a hostfile (`--hostfile`, or a serve YAML's `hostfile:`) the GPUs and nodes are its slots
and GPU hosts, as `serve --hostfile` plans them; a YAML's runner.gpu_memory gives --gpu-memory.

Prints the chosen layout with its weight and KV memory per GPU and the concurrent tokens its
KV cache holds, the `serve` flags that give it (the layout, and the settings counted that serve
would not take by default), then every other layout with the reason it lost. MODEL is a model
folder (its config.json), a preset name or a serve YAML. Exit code 0 when a layout fits, 1 when
none does (the report then names what would fit).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from typing import Optional

from deepserve.config import (KV_CACHE_DTYPES, QUANTIZATION_ALIASES, human_readable_int, is_preset, load_hf_config,
                              parse_hf_overrides, resolve_max_model_len)
from deepserve.distributed.plan import GiB, Candidate, Plan, evaluate_plans, loads_mtp, parse_size, resolve_dtype
from deepserve.distributed.plan_bytes import GROUPS, Layout, int4_layout, stage_tensors
from deepserve.quant.ignore import Ignore, checkpoint_ignore

_BLOCK = 16    # a --max-model-len the plan suggests is whole KV blocks of the default size
_GROUP_NAMES = {"attention": "attention", "mlp": "dense MLP", "experts": "routed experts",
                "shared_experts": "shared experts", "router": "router", "embedding": "embedding",
                "lm_head": "lm_head", "norms": "norms", "mtp": "MTP"}


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="choose TP/PP/DP/EP for a model on N GPUs and explain why",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder, preset name (e.g. deepseek-r1), serve YAML or FlagScale experiment "
                   "name (examples/NAME/conf/config_NAME.yaml under this folder), as serve takes them (the YAML's engine_args' "
                   "model, quantization, dtype, max_model_len, kv_cache_dtype, gpu_memory_utilization, "
                   "hf_overrides and speculative_config)")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs in all (default: the hostfile's)")
    p.add_argument("--gpu-memory", default=None, help="memory of one GPU, e.g. 80GiB or 141GiB (default: a "
                   "serve YAML's runner.gpu_memory)")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes the GPUs are spread over "
                   "(equally); TP stays inside a node (default: the hostfile's GPU hosts, else 1)")
    p.add_argument("--hostfile", default=None, help="the hosts `serve --hostfile` would deploy on (`ip slots=8 "
                   "type=gpu` lines): their slots are the GPUs, their GPU hosts the nodes")
    p.add_argument("--quantization", choices=["fp8", "w8a8-int8", "w4a16", "w4a8", "awq", "gptq", "compressed-tensors",
                                              "awq_marlin", "gptq_marlin", "moe_wna16", "none"], default=None,
                   help="fp8: DeepSeek's block fp8 (128x128 scales) for the Linear weights, as the "
                   "DeepSeek-V3/R1 checkpoints ship; w8a8-int8: int8 Linear weights and routed experts "
                   "with per-row scales (compressed-tensors W8A8, msModelSlim W8A8_DYNAMIC); w4a16 / w4a8 / awq / gptq: 4-bit Linear weights in "
                   "groups of 128 (compressed-tensors, AutoAWQ, GPTQ); compressed-tensors: as `serve` takes it, a "
                   "folder's own W4A16 or W4A8, else w4a16; awq_marlin / gptq_marlin / moe_wna16 (vLLM's names, as "
                   "`serve` takes them): awq / gptq; none: every weight in --dtype. Default: "
                   "a model folder's stored format (what `serve` loads from it), a preset's none (random weights). "
                   "A quantized folder takes only what `serve --quantization` runs it with")
    p.add_argument("--dtype", default=None, help="model dtype (default auto: config.json's torch_dtype)")
    p.add_argument("--hf-overrides", default=None,
                   help="JSON object merged over config.json, as serve takes it (e.g. '{\"max_position_embeddings\": "
                   "200000}')")
    p.add_argument("--max-model-len", type=human_readable_int, default=None,
                   help="longest sequence each replica must hold, as serve takes it (32768, 32k, 32K; "
                   "default: max_position_embeddings)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of each GPU's memory deepserve may use (default 0.9)")
    p.add_argument("--activation-reserve", default=None,
                   help="memory per GPU kept for activations, CUDA graphs and NCCL buffers "
                   "(default 4GiB for models of 20B parameters or more, else 2GiB)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="KV cache storage as `serve --kv-cache-dtype` (fp8: one byte a value; default auto)")
    p.add_argument("--include-mtp", action="store_true",
                   help="also load the MTP module (DeepSeek-V3/R1 speculative drafting: serve's "
                   "--speculative-config '{\"method\": \"mtp\"}', which runs without pipeline stages)")
    p.set_defaults(func=run)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _breakdown(c: Candidate) -> str:
    return ", ".join(f"{_GROUP_NAMES[g]} {c.breakdown[g] / GiB:.2f}" for g in GROUPS if c.breakdown.get(g))


def _flags(c: Candidate) -> str:
    lay = c.layout
    flags = f"--tensor-parallel-size {lay.tp} --pipeline-parallel-size {lay.pp} --data-parallel-size {lay.dp}"
    return flags + (" --enable-expert-parallel" if lay.ep else "")


def serve_settings(plan: Plan, model: str, cfg, hf_overrides: Optional[dict] = None,
                   speculative_config=None) -> str:
    """The `serve` flags besides the layout that give what the plan counted: each one whose value
    differs from what serve takes without it (the weights' format, the model dtype, the context,
    the memory fraction, the KV cache dtype, the config overrides, the MTP layer: a serve YAML's
    own speculative_config where it drafts with MTP)."""
    from deepserve.config import EngineArgs

    flags = [f"--kv-cache-dtype {plan.kv_cache_dtype}"] if plan.kv_cache_dtype != "auto" else []
    stored, _ = weights_format({"model": model, "hf_overrides": hf_overrides})
    if plan.quantization != stored:
        flags.append(f"--quantization {_SERVE_FLAG.get(plan.quantization, plan.quantization)}")
    if plan.dtype != resolve_dtype(cfg, "auto"):
        flags.append(f"--dtype {plan.dtype}")
    if plan.max_model_len != resolve_max_model_len(cfg, None):
        flags.append(f"--max-model-len {plan.max_model_len}")
    if plan.gpu_memory_utilization != EngineArgs.gpu_memory_utilization:
        flags.append(f"--gpu-memory-utilization {plan.gpu_memory_utilization}")
    if hf_overrides:
        flags.append(f"--hf-overrides {shlex.quote(json.dumps(hf_overrides))}")
    if plan.include_mtp:
        spec = speculative_config if loads_mtp(speculative_config, cfg) else {"method": "mtp"}
        flags.append(f"--speculative-config {shlex.quote(spec if isinstance(spec, str) else json.dumps(spec))}")
    return " ".join(flags)


def _candidate_row(c: Candidate, verdict: str) -> str:
    lay = "TP={} PP={} DP={} EP={}".format(c.layout.tp, "*" if c.any_pp_dp else c.layout.pp,
                                            "*" if c.any_pp_dp else c.layout.dp,
                                            "*" if c.any_pp_dp else c.layout.ep_size if c.layout.ep else "off")
    if c.weight_bytes and c.kv_bytes > 0:
        nums = f"{c.weight_bytes / GiB:>8.1f} {c.kv_bytes / GiB:>8.1f} {c.tokens:>13,}"
    elif c.weight_bytes:
        nums = f"{c.weight_bytes / GiB:>8.1f} {'-':>8} {'-':>13}"
    else:
        nums = f"{'-':>8} {'-':>8} {'-':>13}"
    return f"  {lay:<24} {nums}  {verdict}"


def _no_fit(plan: Plan) -> str:
    """Why nothing fits: the refusals themselves when no layout could even be counted (a group
    size, a head count), else the memory story, plus the longest --max-model-len these GPUs hold."""
    counted = [c for c in plan.candidates if c.weight_bytes]
    if not counted:
        reasons = list(dict.fromkeys(c.reason for c in plan.candidates if c.reason))
        return f"no layout of {plan.gpus} GPU{'s' if plan.gpus > 1 else ''} can hold this model: " + "; ".join(reasons)
    msg = plan.no_fit_message()
    short = max(counted, key=lambda c: c.tokens_per_replica)
    longest = short.tokens_per_replica // _BLOCK * _BLOCK
    if longest > 0:
        msg += (f"; or these GPUs with --max-model-len {longest} or less ({short.layout}: its KV cache "
                f"holds {short.tokens_per_replica:,} tokens per replica)")
    return msg


def render_plan(plan: Plan, model: str, cfg, settings: str = "") -> str:
    """The report `deepserve plan` prints; `settings`: the serve flags besides the layout
    (serve_settings)."""
    q = plan.dtype
    if plan.quantization == "fp8":
        q = f"fp8 (128x128 blocks) Linear weights, the rest {plan.dtype}"
    elif plan.quantization == "w8a8-int8":
        q = f"int8 (per-row scales) Linear weights and routed experts, the rest {plan.dtype}"
    elif plan.quantization:
        group, _ = int4_layout(cfg, plan.quantization)
        groups = "one scale per row" if group == -1 else f"groups of {group}"
        name = _INT4_NAMES.get(plan.quantization, plan.quantization)
        q = f"{name} 4-bit ({groups}) Linear weights, the rest {plan.dtype}"
    ignore = plan.ignored if plan.quantization else None
    if ignore and any(t.module and ignore(t.module) for t in stage_tensors(cfg, Layout(1, 1, 1), 0, True)):
        q += " (with the modules its quantization_config leaves unquantized)"
    mtp = (f" + {plan.mtp_params / 1e9:.1f}B MTP {'loaded' if plan.include_mtp else 'not loaded'}"
           if plan.mtp_params else "")
    lines = [f"model      {model} ({cfg.architecture}, {plan.params / 1e9:.2f}B parameters{mtp})",
             f"GPUs       {plan.gpus} x {_gib(plan.gpu_memory_bytes)} in {plan.nodes} node(s) "
             f"of {plan.gpus // plan.nodes}",
             f"weights    {q}; KV cache {plan.dtype if plan.kv_dtype_bytes > 1 else 'fp8 (e4m3)'}",
             f"usable     {_gib(plan.gpu_memory_bytes)} x {plan.gpu_memory_utilization:.2f} - "
             f"{_gib(plan.activation_reserve_bytes)} activation reserve = {_gib(plan.usable_bytes)} per GPU",
             f"max-model-len {plan.max_model_len:,}", ""]
    best = plan.chosen
    if best is None:
        lines += ["NO LAYOUT FITS: " + _no_fit(plan), ""]
    else:
        lay = best.layout
        kind = ("data-parallel attention, experts over TP x DP" if lay.ep and lay.dp > 1 else
                "expert parallel" if lay.ep else "")
        lines += [f"chosen     {lay}" + (f" ({kind})" if kind else ""),
                  f"  weights per GPU     {_gib(best.weight_bytes)} ({_breakdown(best)} GiB)",
                  f"  KV cache per GPU    {_gib(best.kv_bytes)} at {best.kv_bytes_per_token / 1024:.1f} KiB "
                  f"per token",
                  f"  concurrent tokens   {best.tokens:,} ({best.tokens_per_replica:,} per replica x {lay.dp})"]
        if lay.pp > 1:
            ranges = ", ".join(f"{r.start}-{r.stop - 1}" for r in plan.stage_layers(cfg.num_hidden_layers))
            lines.append(f"  layers per stage    {ranges} (weights and KV above: the heaviest stage)")
        lines += [f"  serve flags         {_flags(best)}{' ' + settings if settings else ''}", ""]
    lines.append(f"  {'layout':<24} {'GiB/GPU':>8} {'KV GiB':>8} {'KV tokens':>13}  verdict")
    for c in sorted(plan.candidates, key=lambda c: (c is not best, not c.weight_bytes, -c.tokens,
                                                    c.layout.tp, c.layout.pp, c.layout.ep)):
        lines.append(_candidate_row(c, "CHOSEN" if c is best else c.reason))
    return "\n".join(lines)


# the `serve --quantization` that runs each plan name's weights (none: no flag, as stored)
_SERVE_FLAG = {"w4a16": "compressed-tensors", "w4a8-int8": "compressed-tensors", "none": None}
# the plan of a --quantization for weights no folder stores (a preset's, a conversion's)
_UNSTORED = {"none": None, "compressed-tensors": "w4a16"}
# the scheme names the report gives 4-bit plans
_INT4_NAMES = {"w4a8-int8": "w4a8"}


def plan_quantization(model: str, cfg, requested: Optional[str] = None) -> Optional[str]:
    """The plan quantization of MODEL under `--quantization requested` (None: not given): for a
    model folder with a quantization_config, what `serve` runs it with, refused with serve's own
    error where serve refuses the flag; a high-precision folder or a preset takes any (the
    weights a conversion would write, random weights), none or nothing meaning the model dtype."""
    requested = "w4a8-int8" if requested == "w4a8" else requested   # the engine's name
    if is_preset(model):   # moe_wna16 serves AutoAWQ / GPTQ folders: random weights plan as awq's
        return _UNSTORED.get(requested, "awq" if requested == "moe_wna16" else requested)
    from deepserve.quant import modelslim
    if modelslim.stored_format(model):
        if requested != "w8a8-int8":
            raise ValueError(f"{model} is an msModelSlim W8A8 folder, which deepserve plan does not count as "
                             f"stored; pass --quantization w8a8-int8 (int8 weights with per-row scales)")
        return requested
    if not cfg.get("quantization_config"):
        return _UNSTORED.get(requested, requested)
    from deepserve.models.loader import linear_method
    stored, method = linear_method(model, cfg, _SERVE_FLAG.get(requested, requested))
    if requested == "none":
        raise ValueError(f"--quantization none plans every weight in the model dtype, and serve runs this folder's "
                         f"weights as stored ({stored}); leave --quantization out")
    return method   # the engine's names are the plan's (evaluate_plans refuses one without arithmetic)


def weights_format(kwargs: dict) -> tuple[Optional[str], Ignore]:
    """The plan's name of the format the engine holds these engine kwargs' weights in: a folder's
    stored one unless --quantization asks for another (refused as serve refuses it), msModelSlim's
    int8 weights with per-row scales counted as W8A8 int8's; and the modules its quantization_config
    leaves unquantized (`serve`'s automatic plan)."""
    from deepserve.config import EngineArgs
    from deepserve.models.loader import linear_method
    from deepserve.quant import modelslim

    model = str(kwargs.get("model", EngineArgs.model))
    hf = load_hf_config(model, kwargs.get("hf_overrides"))
    requested = kwargs.get("quantization")
    load_format = "dummy" if is_preset(model) else kwargs.get("load_format", "auto")
    _, method = linear_method(model, hf, None if requested == "ascend" else requested, load_format)
    return ("w8a8-int8" if method == modelslim.METHOD else method), checkpoint_ignore(hf)


def _size(flag: str, text: str, allow_zero: bool = False) -> int:
    """parse_size of a memory flag, refusing a bare number other than 0: parse_size counts it in
    bytes, and `--gpu-memory 80` means 80 GiB to whoever types it."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*", text)
    if m and float(m[1]) > 0:
        raise ValueError(f"{flag} {m[1]} has no unit; write e.g. {m[1]}GiB or {m[1]}GB")
    return parse_size(text, allow_zero)


# the serve engine_args a plan takes from a serve YAML where its own flag is not given (None)
_FROM_SERVE_CONFIG = ("quantization", "dtype", "max_model_len", "kv_cache_dtype", "gpu_memory_utilization",
                      "hf_overrides")
# serve --quantization names the plan calls otherwise (vllm-ascend's msModelSlim W8A8)
_PLAN_NAMES = {"ascend": "w8a8-int8", **QUANTIZATION_ALIASES}


def take_serve_config(args) -> None:
    """MODEL given as a serve YAML (`deepserve serve config.yaml`, or FlagScale's experiment name
    `deepserve serve deepseek_r1` run in its checkout): its engine_args' model, its
    speculative_config, and those of _FROM_SERVE_CONFIG the command line does not give; then
    serve's defaults for the rest."""
    from deepserve.config import EngineArgs
    from deepserve.server.config_file import flagscale_experiment, is_config_file, load_serve_config

    engine = {}
    if not is_config_file(args.model) and flagscale_experiment(args.model):
        args.model = str(flagscale_experiment(args.model))   # `flagscale serve deepseek_r1`'s name, as serve takes it
    if is_config_file(args.model):
        config = load_serve_config(args.model)
        engine = config.engine_args
        if "VLLM_PP_LAYER_PARTITION" in config.envs:   # the file's envs, which serve exports: the one the count reads
            os.environ["VLLM_PP_LAYER_PARTITION"] = config.envs["VLLM_PP_LAYER_PARTITION"]
        if config.runner is not None:
            args.hostfile = args.hostfile or config.runner.hostfile
            args.gpu_memory = args.gpu_memory or config.runner.gpu_memory
        if not engine.get("model"):
            raise ValueError(f"{args.model} names no engine_args.model to plan for")
        args.model = str(engine["model"])
    for name in _FROM_SERVE_CONFIG:
        if getattr(args, name) is None:
            setattr(args, name, engine.get(name, getattr(EngineArgs, name, None)))
    args.quantization = _PLAN_NAMES.get(args.quantization, args.quantization)
    args.hf_overrides = parse_hf_overrides(args.hf_overrides)
    args.speculative_config = engine.get("speculative_config")


def take_hostfile(args) -> None:
    """--gpus and --nodes from the hostfile (`serve --hostfile`'s automatic plan: its slots, its GPU
    hosts); a --gpus or --nodes given must agree with it. Without a hostfile: --gpus is needed,
    --nodes defaults to 1."""
    if args.hostfile == "":
        raise ValueError("--hostfile is empty (an unset shell variable?): give the hostfile's path")
    if args.gpu_memory is None:
        raise ValueError("--gpu-memory is required (the memory of one GPU, e.g. 80GiB)")
    if not args.hostfile:
        if args.gpus is None:
            raise ValueError("--gpus is required (the number of GPUs in all), or --hostfile")
        args.nodes = 1 if args.nodes is None else args.nodes
        return
    from deepserve.distributed.cluster import parse_hostfile
    from deepserve.distributed.cluster_serve import hostfile_gpus

    gpus, nodes = hostfile_gpus(parse_hostfile(os.path.expanduser(args.hostfile)))
    for flag, given, listed in (("--gpus", args.gpus, gpus), ("--nodes", args.nodes, nodes)):
        if given is not None and given != listed:
            raise ValueError(f"{flag} {given} disagrees with the hostfile {args.hostfile}, which lists {gpus} GPUs "
                             f"on {nodes} node(s): leave {flag} out")
    args.gpus, args.nodes = gpus, nodes


def run(args) -> int:
    from deepserve.models.registry import check_config, config_source

    take_serve_config(args)
    take_hostfile(args)
    cfg = load_hf_config(args.model, args.hf_overrides)
    check_config(cfg, config_source(args.model))
    quantization = plan_quantization(args.model, cfg, args.quantization)
    if args.include_mtp and not cfg.get("num_nextn_predict_layers"):
        raise ValueError(f"--include-mtp needs a model with an MTP layer, but {cfg.get('architectures')} has "
                         f"num_nextn_predict_layers={cfg.get('num_nextn_predict_layers')!r}")
    include_mtp = args.include_mtp or loads_mtp(args.speculative_config, cfg)
    reserve = (None if args.activation_reserve is None else
               _size("--activation-reserve", args.activation_reserve, allow_zero=True))
    plan = evaluate_plans(
        cfg, args.gpus, _size("--gpu-memory", args.gpu_memory), args.nodes, quantization, dtype=args.dtype,
        max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
        activation_reserve_bytes=reserve, include_mtp=include_mtp, kv_cache_dtype=args.kv_cache_dtype, ignored=checkpoint_ignore(cfg))
    if plan.usable_bytes <= 0:
        raise ValueError(f"--gpu-memory {args.gpu_memory} x --gpu-memory-utilization {plan.gpu_memory_utilization} "
                         f"leaves nothing past the {_gib(plan.activation_reserve_bytes)} activation reserve; "
                         f"pass a smaller --activation-reserve")
    print(render_plan(plan, args.model, cfg, serve_settings(plan, args.model, cfg, args.hf_overrides,
                                                                  args.speculative_config)))
    return 0 if plan.chosen else 1
