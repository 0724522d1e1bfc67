"""FlagScale's file forms that server/config_file.py reads besides its serve entries: the
OmegaConf interpolations of its Hydra configs (`${oc.env:MODEL_PATH}`, `${experiment.exp_name}`)
and its older serve files (`model_args:` with `model-tag` and `action-args`)."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger("deepserve")

_INTERPOLATION = re.compile(r"(?<!\\)\$\{([^${}]+)\}")
_UNRESOLVED = object()


def interpolate(node: Any, root: Any, depth: int = 0) -> Any:
    """`node` with OmegaConf's interpolations resolved as FlagScale's Hydra would: `${oc.env:NAME}`
    and `${oc.env:NAME,default}` from the environment, `${a.b}` from the key a.b of `root` (a whole
    value `${a.b}` keeps that key's type). Others (`${now:...}` in an exp_dir deepserve does not
    read, a shell's `${HOME}` in before_start) stay as written; `unresolved` finds them where
    deepserve reads a value."""
    if isinstance(node, dict):
        return {k: interpolate(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, root, depth) for v in node]
    if not isinstance(node, str) or "${" not in node or depth > 16:
        return node
    whole = _INTERPOLATION.fullmatch(node)
    if whole:
        value = _resolve(whole.group(1).strip(), root, depth)
        return node if value is _UNRESOLVED else value

    def part(match: re.Match) -> str:
        value = _resolve(match.group(1).strip(), root, depth)
        return match.group(0) if value is _UNRESOLVED else str(value)
    return _INTERPOLATION.sub(part, node)


def _resolve(expr: str, root: Any, depth: int) -> Any:
    if expr.startswith("oc.env:"):
        name, comma, default = expr[len("oc.env:"):].partition(",")
        name = name.strip()
        if name in os.environ:
            return os.environ[name]
        if not comma:
            return _UNRESOLVED
        default = default.strip()
        return None if default == "null" else default.strip("'\"")
    node = root
    for key in expr.split("."):
        if not isinstance(node, dict) or key not in node:
            return _UNRESOLVED
        node = node[key]
    return interpolate(node, root, depth + 1)


def unresolved(value: Any) -> bool:
    """Whether `value` still holds an interpolation (one `interpolate` could not resolve)."""
    return isinstance(value, str) and _INTERPOLATION.search(value) is not None


# an older serve file's `deploy:` keys that only choose FlagScale's launcher
LAUNCHER_KEYS = ("command_line_mode", "use_native_serve", "use_fs_serve")


def model_args_entry(serve: dict, path: Path) -> dict:
    """An older FlagScale serve file (its deepseek_r1.yaml until mid 2025, which the metax guide's
    pinned checkout has) as a serve entry:

        model_args:
          vllm_model:
            model-tag: /models/deepseek_r1     # -> model
            tensor-parallel-size: 8
            port: 9010
            action-args: [trust-remote-code, enable-chunked-prefill]   # switches set
        deploy: {command_line_mode: true}      # FlagScale's launcher; service.port: the port
    """
    models = serve["model_args"]
    if not isinstance(models, dict) or len(models) != 1:
        raise ValueError(f"{path}: model_args must hold one model (deepserve serves one), got "
                         f"{list(models) if isinstance(models, dict) else models!r}")
    (name, args), = models.items()
    if not isinstance(args, dict):
        raise ValueError(f"{path}: model_args.{name} must be a mapping, got {args!r}")
    engine_args = {}
    for key, value in args.items():
        key = str(key).replace("-", "_")
        if key == "model_tag":
            engine_args["model"] = value
        elif key == "action_args":
            if not isinstance(value, list):
                raise ValueError(f"{path}: model_args.{name}.action_args must be a list of switches, got {value!r}")
            engine_args.update({str(flag).lstrip("-").replace("-", "_"): True for flag in value})
        else:
            engine_args[key] = value
    entry: dict = {"serve_id": name, "engine_args": engine_args}
    deploy = serve.get("deploy") or {}
    if not isinstance(deploy, dict):
        raise ValueError(f"{path}: deploy must be a mapping, got {deploy!r}")
    for key, value in deploy.items():
        if key == "service" and isinstance(value, dict) and value.get("port") is not None:
            entry["port"] = value["port"]
        elif key == "models":
            logger.warning("%s: ignoring deploy.models (Ray Serve's GPUs and replicas per model: the parallel "
                           "sizes place the ranks here)", path)
        elif key not in LAUNCHER_KEYS:
            raise ValueError(f"{path}: unknown deploy key {key!r}; known: service.port, models, "
                             f"{', '.join(LAUNCHER_KEYS)}")
    for key in serve:
        if key not in ("model_args", "deploy"):
            raise ValueError(f"{path}: unknown key {key!r} beside model_args; known: model_args, deploy")
    return entry
