"""YAML deployment files for `deepserve serve CONFIG.yaml`, in FlagScale's serve style:

    - serve_id: r1                    # a list of serve entries (FlagScale's serve/*.yaml), or
      engine_args:                    # one mapping with the same keys
        model: /nfs/DeepSeek-R1
        tensor_parallel_size: 8
        max_model_len: 32768
        served_model_name: deepseek-r1
        port: 9010                    # server options may sit beside the engine args
      envs:
        USE_FLAGGEMS: 1

`engine_args` holds vLLM-named keys (EngineArgs fields) plus the server's own options
(host, port, api_key, reasoning_parser, chat_template, ...); `envs` are exported before the
engine starts (a FlagScale experiment file's `experiment.envs` is read too). A `hostfile:`
path (beside engine_args, at the top, or in a FlagScale `runner:` / `experiment.runner:` block
with ssh_port, ssh_user, docker, ...) deploys over the listed hosts with Ray, see
deepserve/distributed/cluster.py; a relative path is read from the YAML's folder, else from
the working directory. Flags given on
the command line override the file. Unknown keys are errors that name the key, except a few
vLLM options that mean nothing here, which are ignored with a warning.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from deepserve.config import EngineArgs
from deepserve.distributed.cluster import RunnerOptions

logger = logging.getLogger("deepserve")

SERVER_KEYS = ("host", "port", "api_key", "reasoning_parser", "chat_template", "max_body_bytes",
               "log_level")
# vLLM options with no meaning in deepserve (no remote code is ever run; logs are always on)
IGNORED_KEYS = ("trust_remote_code", "disable_log_stats", "disable_log_requests", "enable_reasoning",
                "uvicorn_log_level", "disable_custom_all_reduce")


@dataclass
class ServeConfig:
    engine_args: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    runner: Optional[RunnerOptions] = None    # set when the file names a hostfile or runner

    def apply_envs(self) -> None:
        os.environ.update(self.envs)


def is_config_file(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml"))


def _pick_entry(data: Any, path: Path) -> tuple[dict, dict]:
    """The serve entry holding engine_args, and the envs found around it."""
    envs: dict = {}
    if isinstance(data, dict) and "serve" in data:
        envs.update((data.get("experiment") or {}).get("envs") or {})
        data = data["serve"]
    if isinstance(data, list):
        entries = [e for e in data if isinstance(e, dict) and "engine_args" in e]
        if len(entries) != 1:
            raise ValueError(f"{path}: expected one serve entry with engine_args, found {len(entries)}")
        data = entries[0]
    if not isinstance(data, dict) or not isinstance(data.get("engine_args"), dict):
        raise ValueError(f"{path}: no 'engine_args:' mapping found (see `deepserve serve --help`)")
    engine = data.get("engine")
    if engine not in (None, "vllm", "deepserve"):
        raise ValueError(f"{path}: engine {engine!r} is not served by deepserve (use vllm or deepserve)")
    envs.update(data.get("envs") or {})
    return data, envs


def _runner(data: Any, entry: dict, path: Path) -> Optional[RunnerOptions]:
    """Runner options from FlagScale's places: experiment.runner (+ experiment.cmds.before_start),
    a top-level runner: or hostfile:, and the serve entry's own runner: or hostfile:."""
    merged: dict = {}
    top = data if isinstance(data, dict) else {}
    experiment = top.get("experiment") or {}
    for block in (experiment.get("runner"), top.get("runner"), entry.get("runner")):
        if block is not None and not isinstance(block, dict):
            raise ValueError(f"{path}: runner must be a mapping, got {block!r}")
        merged.update(block or {})
    before = (experiment.get("cmds") or {}).get("before_start")
    if before:
        merged.setdefault("before_start", before)
    for source in (top, entry):
        if source.get("hostfile") is not None:
            merged["hostfile"] = source["hostfile"]
    if not merged:
        return None
    options = RunnerOptions.from_mapping(merged, str(path))
    if options.hostfile:
        hostfile = Path(options.hostfile).expanduser()
        beside = path.parent / hostfile
        options.hostfile = str(beside if not hostfile.is_absolute() and beside.is_file() else hostfile)
        if not Path(options.hostfile).is_file():
            raise FileNotFoundError(f"{path}: hostfile {hostfile} not found (looked beside the YAML and "
                                    f"in {Path.cwd()})")
    return options


def load_serve_config(path: str | Path) -> ServeConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    entry, envs = _pick_entry(data, path)
    runner = _runner(data, entry, path)
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    config = ServeConfig(envs={str(k): str(v) for k, v in envs.items()}, runner=runner)
    for key, value in entry["engine_args"].items():
        key = str(key).replace("-", "_")
        if key in fields:
            config.engine_args[key] = value
        elif key in SERVER_KEYS:
            config.server[key] = value
        elif key in IGNORED_KEYS:
            logger.warning("%s: ignoring engine_args.%s (no meaning in deepserve)", path, key)
        else:
            raise ValueError(f"{path}: unknown engine_args key {key!r}; known: EngineArgs fields "
                             f"(vLLM names) and {', '.join(SERVER_KEYS)}")
    for key in SERVER_KEYS:  # server options may also sit at the entry's top level
        if key in entry:
            config.server.setdefault(key, entry[key])
    name = config.engine_args.get("served_model_name")
    if isinstance(name, list):
        config.engine_args["served_model_name"] = ",".join(str(n) for n in name)
    return config
