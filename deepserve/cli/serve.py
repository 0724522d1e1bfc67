"""`deepserve serve [MODEL | CONFIG.yaml] [flags]`: the OpenAI-compatible server.

With no model it serves the built-in stories260k demo. A YAML file (FlagScale style, see
deepserve/server/config_file.py) sets engine args, server options and environment
variables in one place; flags given on the command line override it. Engine flags carry
vLLM's names (`--max-model-len`, `--max-num-seqs`, `--max-waiting-requests`, ...).

With a hostfile (`--hostfile` or `hostfile:` in the YAML; `ip slots=8 type=gpu` lines) it
starts Ray on the listed hosts over ssh, waits for their GPUs, serves with the Ray backend
(choosing the parallel sizes when none are given) and stops Ray on exit. `--dry-run` prints
the commands host by host instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Optional

from deepserve.cli import plan as plan_cli
from deepserve.config import SPEC_ALIASES, TRUST_REMOTE_CODE_NOTE, EngineArgs
from deepserve.server.args import LOG_LEVELS, ServerArgs
from deepserve.server.vllm_flags import add_refused_flags, check_refused


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="Serve a model over an OpenAI-compatible HTTP API.",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_or_config", nargs="?", default=None, metavar="MODEL | CONFIG.yaml",
                   help="Model folder or preset, or a YAML deployment file, or (as `flagscale serve NAME` "
                        "in a FlagScale checkout) NAME for examples/NAME/conf/config_NAME.yaml "
                        "(default: the demo model).")
    p.add_argument("serve_config", nargs="?", default=None, metavar="SERVE.yaml",
                   help="`flagscale serve NAME SERVE.yaml`'s form: NAME is a label, the YAML deploys.")
    ServerArgs.add_cli_args(p.add_argument_group("server"))
    sup = argparse.SUPPRESS  # only flags actually given override the YAML file
    c = p.add_argument_group("cluster")
    c.add_argument("--hostfile", default=sup,
                   help="Hosts to deploy over (`ip slots=N type=gpu` lines): starts Ray on them over ssh.")
    c.add_argument("--config", dest="vllm_config", default=None, metavar="FILE.yaml",
                   help="vLLM's flags file: flat keys naming flags (`port: 8001`, `tensor-parallel-size: 2`, "
                        "a mapping for a JSON flag); flags on the command line override it.")
    c.add_argument("--dry-run", action="store_true",
                   help="Print what would run (the cluster commands host by host, the engine args) and exit.")
    e = p.add_argument_group("engine (vLLM flag names)")
    EngineArgs.add_cli_args(e)
    for name, (key, kind) in SPEC_ALIASES.items():
        e.add_argument("--" + name.replace("_", "-"), type=kind, default=sup,
                       help=f"vLLM's alias of --speculative-config's {key}.")
    add_refused_flags(p)   # vLLM's flags for what deepserve does not have: one line naming each
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> tuple[dict, ServerArgs, dict]:
    """(engine kwargs, server options, envs) from the YAML file (if any) and the flags."""
    return resolve_all(args)[:3]


def resolve_all(args: argparse.Namespace) -> tuple[dict, ServerArgs, dict, object]:
    """resolve(), plus the cluster runner options (None without a hostfile)."""
    if getattr(args, "vllm_config", None):
        merge_config_flags(args)
    check_refused(args)
    from deepserve.distributed.cluster import RunnerOptions
    from deepserve.server.config_file import ServeConfig, flagscale_experiment, is_config_file, load_serve_config

    config = ServeConfig()
    positional = args.model_or_config
    if getattr(args, "serve_config", None):
        if not is_config_file(args.serve_config):
            raise ValueError(f"expected `deepserve serve NAME SERVE.yaml`, got {args.serve_config!r} as the second "
                             "argument")
        positional = args.serve_config
    if positional and not is_config_file(positional) and flagscale_experiment(positional):
        positional = str(flagscale_experiment(positional))  # `flagscale serve deepseek_r1`, run in FlagScale/
    if positional and is_config_file(positional):
        config = load_serve_config(positional)
    elif positional:
        if getattr(args, "model", None) not in (None, positional):
            raise ValueError(f"two models given: {positional!r} and --model {args.model!r}")
        config.engine_args["model"] = positional
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    engine = dict(config.engine_args)
    engine.update({name: getattr(args, name) for name in fields if hasattr(args, name)})
    if positional == "" or engine.get("model") == "":
        # `deepserve serve "$MODEL_PATH"` with the variable unset: refused, not taken for the demo model
        raise ValueError("the model given is empty (an unset shell variable?): give the model's folder")
    spec = {name: getattr(args, name) for name in SPEC_ALIASES if hasattr(args, name)}
    if spec:
        from deepserve.engine.llm_inputs import fold_speculative_aliases

        engine.update(spec)
        fold_speculative_aliases(engine)
    # defaults < VLLM_LOGGING_LEVEL (the metax guide sets DEBUG) < the YAML file < flags given
    server: dict = {}
    level = vllm_logging_level()
    if level:
        server["log_level"] = level
    server.update(config.server)
    server.update(ServerArgs.from_cli_args(args))
    keys = getattr(args, "api_key", None) or []
    if not positional and "model" not in engine and len(keys) > 1 and ("/" in keys[-1] or os.path.exists(keys[-1])):
        # --api-key takes several keys (vLLM's), so a model named after it is read as one more
        raise ValueError(f"--api-key took {keys[-1]!r} as a key and no model was given: name the model before "
                         "the flags (deepserve serve MODEL --api-key KEY)")
    server_args = ServerArgs(**server)
    runner = config.runner
    if getattr(args, "hostfile", None) == "":
        raise ValueError("--hostfile is empty (an unset shell variable?): give the hostfile's path, or leave the "
                         "flag out to serve on this machine")
    if getattr(args, "hostfile", None):
        runner = runner or RunnerOptions()
        runner.hostfile = os.path.expanduser(args.hostfile)   # `--hostfile=~/h.txt`: no shell expands that ~
    if runner is not None and not runner.hostfile:
        runner = None  # a FlagScale runner block without a hostfile: one machine, no Ray to start
    return engine, server_args, config.envs, runner


# Python's other level names, which vLLM's logging config takes, as the nearest --log-level
LOG_LEVEL_NAMES = {"warn": "warning", "critical": "error", "fatal": "error", "notset": "debug"}


def vllm_logging_level() -> Optional[str]:
    """VLLM_LOGGING_LEVEL as a --log-level (None when unset or empty). vLLM hands it to Python's
    logging, which refuses a name it does not know (TRACE, VERBOSE); so does this, in one line."""
    value = os.environ.get("VLLM_LOGGING_LEVEL", "").strip()
    if not value:
        return None
    level = LOG_LEVEL_NAMES.get(value.lower(), value.lower())
    if level not in LOG_LEVELS:
        raise ValueError(f"VLLM_LOGGING_LEVEL={value} is not a log level: DEBUG, INFO, WARNING or ERROR (WARN, "
                         "CRITICAL as in Python's logging)")
    return level


def config_flags(path: str) -> list[str]:
    """vLLM's `--config FILE.yaml` as the flags it names: `KEY: VALUE` is `--KEY VALUE`, a list
    the flag's values, a mapping its JSON, true the switch; false is the switch's --no- form where
    it has one (vLLM drops a false key, which leaves a default of true on)."""
    import json

    from deepserve.server.config_file import _read_yaml

    if not path.endswith((".yaml", ".yml")):
        raise ValueError(f"--config {path}: vLLM's flags file is a .yaml or .yml file")
    data = _read_yaml(Path(path))
    if not isinstance(data, dict) or "engine_args" in data:
        raise ValueError(f"--config {path}: expected flat keys naming flags (`port: 8001`); a deployment file "
                         f"with engine_args is given as `deepserve serve {path}`")
    switches = {f"--no-{f.name.replace('_', '-')}" for cls in (EngineArgs, ServerArgs)
                for f in dataclasses.fields(cls) if f.type in ("bool", "Optional[bool]")}
    argv: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key)
        if value is False:
            argv += [f"--no-{key}"] if f"--no-{str(key).replace('_', '-')}" in switches else []
        elif value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)] if value else []
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def merge_config_flags(args: argparse.Namespace) -> None:
    """--config's flags into `args` under those given on the command line (vLLM's order: command
    line, then the file, then the defaults); a model argument given wins over the file's model."""
    from deepserve.cli.main import build_parser, normalize_argv

    parsed = build_parser("serve").parse_args(normalize_argv(["serve", *config_flags(args.vllm_config)]))
    for name, value in vars(parsed).items():
        if name == "model" and args.model_or_config:
            continue
        if value is not None and getattr(args, name, None) is None:
            setattr(args, name, value)


SWAP_SPACE_NOTE = ("deepserve: --swap-space accepted; nothing is reserved: preempted sequences are recomputed, "
                   "not swapped to host memory (as in vLLM V1)")
# the vLLM variables deepserve reads (docs/GUIDES.md); vLLM too warns about the VLLM_* it does not know
READ_VLLM_ENV = ("VLLM_LOGGING_LEVEL", "VLLM_PP_LAYER_PARTITION", "VLLM_ENABLE_RESPONSES_API_STORE",
                 "VLLM_LOG_STATS_INTERVAL", "VLLM_SERVER_DEV_MODE")
# vLLM-MindSpore's (the 300I Duo guide): its model YAML, whose settings deepserve takes from config.json
MINDSPORE_ENV = ("vLLM_MODEL_BACKEND", "MINDFORMERS_MODEL_CONFIG")


def unread_env() -> list[str]:
    """The guides' vLLM / vLLM-MindSpore variables set here that deepserve does not read."""
    return sorted(k for k in os.environ if (k.startswith("VLLM_") and k not in READ_VLLM_ENV) or k in MINDSPORE_ENV)


# a spelling in the guides of a variable that nothing reads, and the name its reader reads (the
# metax guide's env.sh exports GLOO_SOCKET_IF_NAME for torch's gloo)
MISSPELLED_ENV = {"GLOO_SOCKET_IF_NAME": "GLOO_SOCKET_IFNAME"}


def misspelled_env() -> list[str]:
    """A note for each such spelling set here while the name read is not."""
    return [f"deepserve: {wrong} is read by nothing; torch's gloo reads {right}, unset here, and picks an "
            f"interface itself (export {right}={os.environ[wrong]})"
            for wrong, right in MISSPELLED_ENV.items() if wrong in os.environ and right not in os.environ]


def check_model_name(name: str) -> None:
    """A plain name that is no folder, preset or FlagScale experiment (`flagscale serve deepseek_r1`
    run outside the checkout): the error names the three places looked at and a near preset."""
    import difflib

    from deepserve.config import is_preset, list_presets

    if "/" in name or os.path.exists(name) or is_preset(name):
        return   # a folder, a hub id (its own error), or a preset
    near = difflib.get_close_matches(name.replace("_", "-"), list_presets(), n=1)
    raise ValueError(f"{name!r} is no model folder, no preset{f' (did you mean {near[0]!r}?)' if near else ''} and no "
                     f"FlagScale experiment (examples/{name}/conf/config_{name}.yaml under {os.getcwd()}, where "
                     f"`flagscale serve {name}` looks in a FlagScale checkout)")


def run(args: argparse.Namespace) -> int:
    from deepserve.server.config_file import flagscale_experiment, is_config_file

    name = args.model_or_config
    if name and not getattr(args, "serve_config", None) and not is_config_file(name) and not flagscale_experiment(name):
        check_model_name(name)
    engine_kwargs, server, envs, runner = resolve_all(args)
    os.environ.update(envs)  # before the engine reads DEEPSERVE_OPS / USE_FLAGGEMS
    unread = unread_env()
    if unread:
        print(f"deepserve: not read, no effect: {', '.join(unread)} (model settings come from config.json, "
              "the layout from the flags)", file=sys.stderr)
    for note in misspelled_env():
        print(note, file=sys.stderr)
    dry_run = getattr(args, "dry_run", False)
    if runner is not None:
        from deepserve.config import is_preset, pp_partition_env
        from deepserve.distributed.cluster import PARALLEL_KEYS
        from deepserve.distributed.cluster_serve import serve_on_cluster

        model = str(engine_kwargs.get("model", ""))
        if os.path.isdir(model) or is_preset(model) or not dry_run:
            # the flags against the model's config.json before Ray starts on every host (the
            # parallel sizes the cluster picks when none are given are checked by the engine);
            # rank 0 runs here, so a model missing here is refused before any host starts (a dry
            # run may plan for a cluster from a machine without it)
            engine_args = EngineArgs(**engine_kwargs)
            partition = pp_partition_env()
            if partition and not any(k in engine_kwargs for k in PARALLEL_KEYS):
                # the automatic plan takes as many stages as VLLM_PP_LAYER_PARTITION gives
                engine_args = EngineArgs(**dict(engine_kwargs, pipeline_parallel_size=len(partition)))
            check_model(engine_args)
            if not dry_run:   # what rank 0 needs here (USE_FLAGGEMS's FlagGems, GLOO_SOCKET_IFNAME's interface)
                check_ops_backend(engine_args)
                check_gloo_interface(engine_args)
        rc = serve_on_cluster(runner, envs, engine_kwargs, lambda kw: _serve(kw, server),
                              dry_run=dry_run, weights_format=plan_cli.weights_format)
        if dry_run and rc == 0:
            _print_server(server)
        return rc
    if dry_run:   # what `serve` checks before any rank starts
        from deepserve.server.api_server import check_server_args

        engine_args = EngineArgs(**engine_kwargs)
        check_model(engine_args)
        check_ops_backend(engine_args)
        check_local_gpus(engine_args)
        check_gloo_interface(engine_args)
        check_server_args(engine_args, server)
        if is_multi_node_dp(engine_args):
            rpc_ports(engine_args)
        print("serve: " + " ".join(f"{k}={v}" for k, v in sorted(engine_kwargs.items())))
        _print_server(server)
        return 0
    from deepserve.distributed.cluster_serve import local_engine_args
    return _serve(local_engine_args(engine_kwargs, weights_format=plan_cli.weights_format), server)


def _print_server(server) -> None:
    """A dry run's line of the API server's settings (host, port, ...; not the API key)."""
    print("server: " + " ".join(f"{k}={v}" for k, v in sorted(dataclasses.asdict(server).items()) if k != "api_key"))


def _serve(engine_kwargs: dict, server: ServerArgs) -> int:
    try:
        engine_args = EngineArgs(**engine_kwargs)
    except TypeError as exc:
        raise ValueError(f"bad engine argument: {exc}") from None
    if engine_args.trust_remote_code:
        print(TRUST_REMOTE_CODE_NOTE, file=sys.stderr)
    if "swap_space" in engine_kwargs:   # given (the metax line's --swap-space 16), not the default
        print(SWAP_SPACE_NOTE, file=sys.stderr)
    config = engine_args.create_engine_config()   # the layout against config.json, before any process starts
    from deepserve.engine.fork_server import start_early, starts_early
    if starts_early(engine_args):
        # its imports of torch and the engine run beside this process's own from here (the checks
        # below import torch); a check that fails ends this process, and the fork server with it
        start_early()
    check_ops_backend(engine_args)
    check_local_gpus(engine_args)
    check_gloo_interface(engine_args)
    check_host_memory(engine_args, config, check_before_start(config))
    if engine_args.headless:  # this node runs engine cores only (multi-node data parallel)
        rpc_ports(engine_args)
        check_resolves(engine_args.data_parallel_address, "--data-parallel-address: node 0's address, where this "
                       "node's DP ranks connect")
        from deepserve.engine.engine_core import run_headless
        from deepserve.log import for_spawned_processes
        from deepserve.server.api_server import set_up_logging

        set_up_logging(server.log_level)   # this node's lines (its ranks, their load) as node 0 shows its own
        with for_spawned_processes(server.log_level):
            return run_headless(engine_args)
    # the API's address, held from here (as vLLM binds it before the engine starts): a port in
    # use is this line before the model loads, and nothing can take it during the load; several
    # API servers' launcher binds its own before the engine cores start
    sock = bind_unix(server.uds) if server.uds else bind_listen(server.host, server.port)
    if engine_args.api_server_count > 1:
        sock.close()
        sock = None
    try:
        if is_multi_node_dp(engine_args):
            # node 0 of multi-node data parallel: the other nodes' engine cores reach it there
            bind_listen(engine_args.data_parallel_address, 0, "--data-parallel-address: this node's address, "
                        "where the other nodes' DP ranks connect").close()
            check_rpc_ports(engine_args)
        if not config.model.tokenizer and not engine_args.skip_tokenizer_init:
            print(f"deepserve: no tokenizer.json in {config.model.model}: the server takes token-id prompts only "
                  f"(text gets a 400 naming it); pass --tokenizer FOLDER to serve text", file=sys.stderr)
        from deepserve.server.api_server import run_server

        return run_server(engine_args, server, sock=sock)
    finally:
        if sock is not None:
            sock.close()


def rpc_ports(engine_args: EngineArgs) -> range:
    """The ports from --data-parallel-rpc-port that node 0 listens on for the other nodes (each
    front end's outputs and its requests to each DP rank, the process group's store). Past 65535
    is one line: the OS would take 70000 as 4464 and ZeroMQ refuse it in rank 0 after the load."""
    from deepserve.engine.engine_core import front_ends
    first = engine_args.data_parallel_rpc_port
    last = first + front_ends(engine_args) * (engine_args.data_parallel_size + 2) - 1
    if first < 1 or last > 65535:
        raise ValueError(f"--data-parallel-rpc-port {first}: multi-node data parallel uses ports {first}-{last}, "
                         "which must lie in [1, 65535]")
    return range(first, last + 1)


def is_multi_node_dp(engine_args: EngineArgs) -> bool:
    local = engine_args.data_parallel_size_local
    return bool(engine_args.data_parallel_address and local and local < engine_args.data_parallel_size)


def check_rpc_ports(engine_args: EngineArgs) -> None:
    """rpc_ports() on node 0: one in use (another server, or this one's --port) is one line, not a
    traceback after the load."""
    ports = rpc_ports(engine_args)
    first, last = ports[0], ports[-1]
    for port in ports:
        bind_listen(engine_args.data_parallel_address, port,
                    f"--data-parallel-rpc-port {first}: this node listens on ports {first}-{last} "
                    f"for the DP ranks").close()


def check_model(engine_args: EngineArgs):
    """The flags against the model, as the engine would check them at load: its layout against
    config.json, its --quantization against the quantization_config. Returns the config and the
    last rank's model on the meta device."""
    config = engine_args.create_engine_config()
    return config, check_before_start(config)


def check_in_process(engine_args: EngineArgs) -> None:
    """The offline commands' check (generate, chat, bench latency / throughput): what `serve` checks
    before any rank starts."""
    config, model = check_model(engine_args)
    check_local_gpus(engine_args)
    check_gloo_interface(engine_args)
    check_host_memory(engine_args, config, model)


def check_before_start(config):
    """What every rank would find wrong as it loads, found once here before any process starts
    (one line instead of each rank's failure after the start-up): --quantization against the
    checkpoint, its weight files, and the model as the last rank builds it (its slices of every
    layer, e.g. fp8 row-parallel layers whose input per rank is not whole 128-wide scale blocks:
    R1 FP8 at --tensor-parallel-size 32). Built on the meta device: no memory, about a second
    for R1. Returns that model (on the meta device)."""
    import torch

    from deepserve.distributed.parallel_state import ParallelContext
    from deepserve.models.loader import build_model, linear_method
    from deepserve.models.weights import checkpoint_files

    model = config.model
    stored, method = linear_method(model.model, model.hf_config, model.quantization, model.load_format)
    if model.load_format != "dummy" and os.path.isdir(model.model):
        files = checkpoint_files(model.model)   # none, or a shard the index lists missing: that error
        if stored == "fp8" and model.quantization is None and not stores_weight_scales(model.model, files):
            print(f"deepserve: {model.model}/config.json declares fp8 weights (quantization_config), but the "
                  "checkpoint holds no weight scales: its 16-bit weights are quantized to fp8 at load; remove "
                  "quantization_config from config.json to serve them as stored (the FlagOS guides' BF16 step)",
                  file=sys.stderr)
    par = config.parallel
    tp, pp, dp = par.tensor_parallel_size, par.pipeline_parallel_size, par.data_parallel_size
    ep = (tp * dp if dp > 1 else tp) if par.enable_expert_parallel else 1
    last = ParallelContext(tp_rank=tp - 1, tp_size=tp, pp_rank=pp - 1, pp_size=pp, dp_rank=dp - 1, dp_size=dp,
                           ep_rank=ep - 1, ep_size=ep)
    return build_model(model, torch.device("meta"), last, method, **({"load_mtp": True} if model.load_mtp else {}))


def stores_weight_scales(folder: str, files: list) -> bool:
    """Whether a checkpoint holds fp8 weight scales (DeepSeek's `weight_scale_inv`, compressed-
    tensors' `weight_scale`): read from its index, else from each shard's header (unreadable:
    assumed so, the load reports it)."""
    import json

    from safetensors import SafetensorError, safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = list(json.load(f).get("weight_map", {}))
    else:
        names = []
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    names += list(f.keys())
            except (OSError, SafetensorError):
                return True
    return any(n.endswith((".weight_scale_inv", ".weight_scale")) for n in names)


def check_local_gpus(engine_args: EngineArgs) -> None:
    """The ranks this machine starts (TP x PP x its DP ranks; over Ray the cluster places them)
    against its GPUs, as vLLM checks the world size: otherwise the ranks past the last GPU fail
    in CUDA's "invalid device ordinal" after the others have started (the metax line's -pp 4
    -tp 8 without `--distributed-executor-backend ray`, a FlagScale serve file without its
    hostfile)."""
    from deepserve.platforms import get_platform

    if engine_args.distributed_executor_backend == "ray" or get_platform(engine_args.device).name != "cuda":
        return
    import torch

    tp, pp = engine_args.tensor_parallel_size, engine_args.pipeline_parallel_size
    dp = engine_args.data_parallel_size_local or engine_args.data_parallel_size
    gpus = torch.cuda.device_count()
    if tp * pp * dp > gpus:
        raise ValueError(f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} x {dp} local data-parallel "
                         f"rank(s) = {tp * pp * dp} GPUs on this machine, which has {gpus} (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): use --distributed-executor-backend ray "
                         f"over several machines (`ray start` on each), or fewer ranks")


def check_gloo_interface(engine_args: EngineArgs) -> None:
    """GLOO_SOCKET_IFNAME (read by torch's gloo: a CPU's collectives and every multi-rank run's
    control groups) naming an interface this machine lacks fails each rank's group start after
    the ranks have started (the FlagOS YAML's `export GLOO_SOCKET_IFNAME=bond0` on a machine whose
    interface has another name): one line before any rank starts instead."""
    names = os.environ.get("GLOO_SOCKET_IFNAME", "")
    ranks = engine_args.tensor_parallel_size * engine_args.pipeline_parallel_size * engine_args.data_parallel_size
    if not names or ranks == 1:
        return
    have = [name for _, name in socket.if_nameindex()]
    missing = [name for name in names.split(",") if name and name not in have]
    if missing:
        # torch splits the value at commas and strips nothing: "eth0, eth1" names " eth1"
        shown = ", ".join(repr(name) if name != name.strip() else name for name in missing)
        raise ValueError(f"GLOO_SOCKET_IFNAME={names}: this machine has no network interface {shown} (it has "
                         f"{', '.join(have)}), so torch's gloo cannot start the ranks' groups: export the name of "
                         "the interface on the network the ranks share" +
                         (", without spaces around the commas" if shown != ", ".join(missing) else ""))


def available_host_memory() -> Optional[int]:
    """Bytes of memory the machine can give new processes (Linux MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(engine_args: EngineArgs, config, meta_model) -> None:
    """On a CPU the weights of every rank this machine starts live in its memory. More than it has
    available is refused before any rank starts: each rank would otherwise allocate its share and
    the machine run out of memory part way (the guides' R1 lines, -pp 4 -tp 8, on a CPU).
    `meta_model` is the last rank's model on the meta device (every layer, that rank's TP / EP
    slices): the local ranks hold about tp x local DP ranks of it, pipeline stages splitting its
    layers. 16-bit weights count as the CPU allocates them (fp32 unless --dtype says otherwise)."""
    import torch

    from deepserve.models.loader import resolve_dtype
    from deepserve.platforms import get_platform

    if engine_args.distributed_executor_backend == "ray" or get_platform(config.device).name != "cpu":
        return
    available = available_host_memory()
    if available is None:
        return
    built, used = resolve_dtype(config.model, torch.device("meta")), resolve_dtype(config.model, torch.device("cpu"))
    rank_bytes = sum(p.numel() * (used.itemsize if p.dtype == built else p.element_size())
                     for p in meta_model.parameters())
    tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    dp = engine_args.data_parallel_size_local or config.parallel.data_parallel_size
    need = rank_bytes * tp * dp
    if need > available:
        raise ValueError(f"the weights of the {tp * pp * dp} rank(s) this machine starts (tensor_parallel_size {tp} x "
                         f"pipeline_parallel_size {pp} x {dp} local data-parallel rank(s)) take about "
                         f"{need / 2**30:.1f} GiB on the CPU (16-bit ones in {str(used).replace('torch.', '')}), and it has "
                         f"{available / 2**30:.1f} GiB available: serve a smaller model, or on a machine with "
                         f"accelerators (--distributed-executor-backend ray over several machines)")


def check_ops_backend(engine_args: EngineArgs) -> None:
    """What a Triton backend (`--ops triton | triton-all | flaggems`, `USE_FLAGGEMS=1`) needs,
    checked before any rank starts: one line here instead of every rank's traceback at load."""
    import importlib.util

    if engine_args.ops == "flaggems" and importlib.util.find_spec("flag_gems") is None:
        raise ValueError("--ops flaggems (or USE_FLAGGEMS=1) needs FlagGems: pip install 'deepserve[flaggems]', "
                         "or unset USE_FLAGGEMS for the platform's own kernels")
    from deepserve.ops.registry import check_backend_runs_on
    from deepserve.platforms import get_platform

    check_backend_runs_on(get_platform(engine_args.device).name, engine_args.ops)


def check_resolves(host: str, what: str) -> None:
    """An address this node connects to: a name that does not resolve (the guide's node0_ip="xxxx"
    left unfilled) is one line, not torch's c10d retrying it every few seconds for ever. One that
    resolves is waited for (node 0 may start later)."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot reach {host!r} ({what}): it does not resolve ({exc.strerror})") from None


def bind_unix(path: str) -> socket.socket:
    """A unix socket bound at `path` (--uds), before the model loads; a socket file left by a
    server that has gone is replaced, one a server still answers on is one line."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ValueError(f"cannot listen on --uds {path}: a file that is no socket is there")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)   # nothing listens there any more
        except OSError as exc:
            raise ValueError(f"cannot listen on --uds {path}: {exc.strerror}") from None
        else:
            raise ValueError(f"cannot listen on --uds {path}: a server answers there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on --uds {path}: {exc.strerror}") from None
    return sock


def bind_listen(host: str, port: int, what: str = "--host / --port") -> socket.socket:
    """A socket bound to an address `serve` listens on, before the model loads (as vLLM binds
    first): a port in use or an address of another machine (`--host 10.24.73.25` copied from a
    guide, an unfilled `--data-parallel-address $local_ip`) is one line, not an error after
    minutes of loading. Not listening yet: until the server accepts, a client is refused, not
    left waiting. Held without SO_REUSEADDR, so that no other server (which would set it) binds
    the port meanwhile; the server sets it again before it listens. Port 0: a free port of the
    address."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on {host!r} ({what}): it does not resolve ({exc.strerror})") from None
    family, _, proto, _, address = infos[0]
    # the protocol named (IPPROTO_TCP, not 0): asyncio sets TCP_NODELAY only on connections of
    # such a socket, and without it Nagle holds a streamed token behind the previous one's ACK
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if ":" in (host or "") else host
        raise ValueError(f"cannot listen on {f'{shown}:{port}' if port else host} ({what}): {exc.strerror}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    return sock
