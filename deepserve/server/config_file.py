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
(ServerArgs fields: host, port, api_key, reasoning_parser, chat_template, ...); `envs` are exported before the
engine starts (a FlagScale experiment file's `experiment.envs` is read too). A `hostfile:`
path (beside engine_args, at the top, or in a FlagScale `runner:` / `experiment.runner:` block
with ssh_port, ssh_user, docker, ...) deploys over the listed hosts with Ray, see
deepserve/distributed/cluster.py; a relative path is read from the YAML's folder, else from
the working directory, else from a folder above the YAML (FlagScale's are relative to its checkout). Flags given on
the command line override the file. Values take their field's type as FlagScale's flags would
(`tensor_parallel_size: "8"` is 8; a switch must be true or false), `no_KEY: true` turns a switch
off as `--no-KEY` does (FlagOS docs write `no_enable_prefix_caching: true`), and an entry's
`engine_args_specific.vllm` block (FlagScale's args for that engine alone) applies over
engine_args. Unknown keys are errors that name the key, except a few vLLM options that mean
nothing here and FlagScale's `resources:`, which are ignored with a warning.

FlagScale's older serve files (`model_args: {NAME: {model-tag: ..., action-args: [...]}}` with a
`deploy:` block, as its deepseek_r1 example stood until mid 2025) are read as one serve entry, and
OmegaConf's `${oc.env:NAME[,default]}` and `${key.path}` are resolved as Hydra would
(server/flagscale_files.py).

A FlagScale experiment file (`flagscale serve deepseek_r1` reads
examples/deepseek_r1/conf/config_deepseek_r1.yaml) is read as FlagScale's Hydra would compose it:
its `defaults:` list names the serve file (`- serve: deepseek_r1` -> serve/deepseek_r1.yaml beside
it); `experiment.task.type` must be serve; `experiment.envs` are exported, and so are the
`export K=V` parts of `experiment.cmds.before_start`, which FlagScale runs in the shell that starts
the server (the whole line runs on every host before `ray start` when there is a hostfile).
`experiment.deploy.port` is the server's port (FlagScale sets engine_args.port from it);
`deploy.prefill_decode_disaggregation` is refused (deepserve serves prefill and decode in one
engine); `exp_dir`, deploy's other keys (`use_fs_serve`: FlagScale's own launcher or `vllm
serve`, both one server here), `action` and `hydra` only steer FlagScale's own launcher.
"""
from __future__ import annotations

import argparse
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from deepserve.config import HUMAN_READABLE_FLAGS, EngineArgs, human_readable_int
from deepserve.distributed.cluster import RunnerOptions
from deepserve.server.args import ServerArgs
from deepserve.server.flagscale_files import interpolate, model_args_entry, unresolved

logger = logging.getLogger("deepserve")

SERVER_KEYS = ServerArgs.keys()
# vLLM options with no meaning in deepserve
IGNORED_KEYS = ("disable_custom_all_reduce",)
# a serve entry's keys besides its server options; FlagScale's `resources` (Ray Serve's GPUs and
# replicas of a deployment) sizes nothing here: the parallel sizes do
ENTRY_KEYS = ("serve_id", "engine", "engine_args", "engine_args_specific", "envs", "runner", "hostfile")
IGNORED_ENTRY_KEYS = ("resources",)


@dataclass
class ServeConfig:
    engine_args: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    runner: Optional[RunnerOptions] = None    # set when the file names a hostfile or runner

    def apply_envs(self) -> None:
        os.environ.update(self.envs)


def is_config_file(arg: str) -> bool:
    return arg.lower().endswith((".yaml", ".yml"))


def flagscale_experiment(name: str) -> Optional[Path]:
    """`flagscale serve NAME`'s file, examples/NAME/conf/config_NAME.yaml under the working
    directory (FlagScale's checkout), when NAME is a plain name and that file exists."""
    if not name or "/" in name or Path(name).exists():
        return None
    path = Path("examples") / name / "conf" / f"config_{name}.yaml"
    return path if path.is_file() else None


def _compose_defaults(data: Any, path: Path) -> tuple[Any, Path]:
    """Hydra's `defaults:` list as FlagScale uses it: `- serve: NAME` loads serve/NAME.yaml
    from the experiment file's folder into the `serve` key. Returns the composed data and the
    file holding the serve entry (what errors about its engine_args name)."""
    serve_path = path
    if not isinstance(data, dict) or not isinstance(data.get("defaults"), list):
        return data, serve_path
    data = dict(data)
    for item in data["defaults"]:
        if not isinstance(item, dict):
            continue  # `_self_`
        for group, name in item.items():
            if str(group).replace("override ", "", 1).startswith("hydra/"):
                continue   # Hydra's own settings (`- override hydra/job_logging: disabled`), as `hydra:` is
            if group != "serve":
                raise ValueError(f"{path}: defaults entry {group}: {name} is not a serve config; deepserve "
                                 "reads serve experiments (`- serve: NAME`)")
            part = path.parent / group / f"{name}.yaml"
            if not part.is_file():
                raise FileNotFoundError(f"{path}: defaults names {group}: {name}, but {part} is not there")
            if "serve" not in data:
                data["serve"], serve_path = _read_yaml(part), part
    return data, serve_path


def exports_of(command: str) -> dict[str, str]:
    """The `export K=V` assignments of a shell line (`source x && export A=1 && export B=2`)."""
    import shlex

    out: dict[str, str] = {}
    for part in command.replace(";", "&&").split("&&"):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            continue
        if words[:1] == ["export"]:
            for word in words[1:]:
                key, sep, value = word.partition("=")
                if sep and key.isidentifier():
                    out[key] = value
    return out


def _is_mindformers_config(data: Any) -> bool:
    """MindFormers' model YAML (the 300I Duo guide's predict_*.yaml): `model: {model_config: ...}`
    beside its run_mode / parallel_config."""
    return (isinstance(data, dict) and isinstance(data.get("model"), dict) and "model_config" in data["model"]
            and ("run_mode" in data or "parallel_config" in data))


def _pick_entry(data: Any, path: Path, serve_path: Path) -> tuple[dict, dict]:
    """The serve entry holding engine_args, and the envs found around it (`serve_path`: the file
    the experiment's serve part came from)."""
    envs: dict = {}
    if isinstance(data, dict) and "serve" in data:
        experiment = data.get("experiment") or {}
        task = (experiment.get("task") or {}).get("type", "serve")
        if task != "serve":
            raise ValueError(f"{path}: experiment.task.type is {task!r}; deepserve runs serve experiments only")
        before = (experiment.get("cmds") or {}).get("before_start")
        envs.update(exports_of(before) if isinstance(before, str) else {})
        envs.update(_envs(experiment.get("envs"), f"{path}: experiment.envs"))
        data = data["serve"]
    path = serve_path
    if isinstance(data, dict) and "model_args" in data:
        data = model_args_entry(data, path)
    if isinstance(data, list):
        entries = [e for e in data if isinstance(e, dict) and "engine_args" in e]
        if len(entries) != 1:
            raise ValueError(f"{path}: expected one serve entry with engine_args, found {len(entries)}")
        data = entries[0]
    if not isinstance(data, dict) or not isinstance(data.get("engine_args"), dict):
        if _is_mindformers_config(data):
            raise ValueError(f"{path} is a MindFormers model config (vLLM-MindSpore's MINDFORMERS_MODEL_CONFIG), "
                             "not a serve file: deepserve reads the model's settings from its config.json; serve "
                             "the model folder with the layout as flags (`deepserve serve MODEL -tp 8 -pp 2 ...`)")
        raise ValueError(f"{path}: no 'engine_args:' mapping found (see `deepserve serve --help`)")
    engine = data.get("engine")
    if engine not in (None, "vllm", "deepserve"):
        raise ValueError(f"{path}: engine {engine!r} is not served by deepserve (use vllm or deepserve)")
    envs.update(_envs(data.get("envs"), f"{path}: envs"))
    return data, envs


def _deploy(data: Any, path: Path) -> dict[str, Any]:
    """Server options from a FlagScale experiment's `deploy:` block (FlagScale's port overrides
    the serve entry's engine_args.port)."""
    experiment = (data.get("experiment") or {}) if isinstance(data, dict) else {}
    deploy = experiment.get("deploy") or {}
    if not isinstance(deploy, dict):
        raise ValueError(f"{path}: experiment.deploy must be a mapping, got {deploy!r}")
    if deploy.get("prefill_decode_disaggregation"):
        raise ValueError(f"{path}: experiment.deploy.prefill_decode_disaggregation is not supported: deepserve "
                         "serves prefill and decode in one engine (remove the key, or set it to false)")
    return {"port": deploy["port"]} if deploy.get("port") is not None else {}


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
        # relative: beside the YAML, in the working directory, else under a folder above the YAML
        # (FlagScale's `hostfile: examples/deepseek_r1/conf/hostfile.txt` is relative to its
        # checkout, which holds the experiment file: found from any working directory)
        above = [folder / hostfile for folder in path.resolve().parent.parents]
        found = [hostfile] if hostfile.is_absolute() else [path.parent / hostfile, hostfile, *above]
        options.hostfile = str(next((f for f in found if f.is_file()), hostfile))
        if not Path(options.hostfile).is_file():
            raise FileNotFoundError(f"{path}: hostfile {hostfile} not found (looked beside the YAML, in "
                                    f"{Path.cwd()} and in the folders above the YAML)")
    return options


def _read_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        return yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (not UTF-8), so not YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML: {problem}{where}") from None


def _envs(value: Any, where: str) -> dict:
    """An `envs:` mapping (variable -> value), or a ValueError naming where it sits."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of variable names to values, got {type(value).__name__} "
                         f"{value!r}")
    for name, item in value.items():
        # exported here and in each host's shell (`export NAME=...` before ray start)
        if not (isinstance(name, str) and name.isidentifier() and name.isascii()):
            raise ValueError(f"{where}: {name!r} is not an environment variable name (letters, digits and _, "
                             "not starting with a digit)")
        if isinstance(item, (dict, list)):
            raise ValueError(f"{where}.{name} must be a single value, got {item!r}")
    return value


def _typed(value: Any, hint: Any, where: str) -> Any:
    """A YAML value as its field's type. FlagScale hands engine_args to `vllm serve` as flags, so a
    number written as a string ("8") is that number there too; any other mismatch is an error
    naming the key (a switch given as the string "false" would otherwise be true)."""
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where} needs a value")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if base in (int, float):
        try:
            number = base(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if not isinstance(number, bool) and (isinstance(number, int) or (base is float and isinstance(number, float))):
            return number
        raise ValueError(f"{where} must be {'an integer' if base is int else 'a number'}, got {value!r}")
    if base is str and (isinstance(value, bool) or (isinstance(value, (dict, list)) and list not in args)):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return str(value) if base is str and isinstance(value, (int, float)) else value


def _engine_args(entry: dict, path: Path) -> dict:
    """The entry's engine_args, and over them FlagScale's `engine_args_specific.vllm` (the args
    that FlagScale gives only that engine; deepserve's own block, `deepserve`, too)."""
    merged = dict(entry["engine_args"])
    specific = entry.get("engine_args_specific") or {}
    if not isinstance(specific, dict):
        raise ValueError(f"{path}: engine_args_specific must be a mapping, got {specific!r}")
    for engine, block in specific.items():
        if engine not in ("vllm", "deepserve"):
            raise ValueError(f"{path}: engine_args_specific.{engine} is for an engine deepserve does not "
                             "stand in for (vllm, deepserve)")
        if not isinstance(block, dict):
            raise ValueError(f"{path}: engine_args_specific.{engine} must be a mapping, got {block!r}")
        merged.update(block)
    return merged


def load_serve_config(path: str | Path) -> ServeConfig:
    path = Path(path)
    data, serve_path = _compose_defaults(_read_yaml(path), path)
    data = interpolate(data, data)
    entry, envs = _pick_entry(data, path, serve_path)
    runner = _runner(data, entry, path)
    experiment_path, path = path, serve_path   # the entry's errors name the file that holds it
    engine_hints, server_hints = typing.get_type_hints(EngineArgs), typing.get_type_hints(ServerArgs)
    config = ServeConfig(envs={str(k): str(v) for k, v in envs.items()}, runner=runner)
    for key, value in _engine_args(entry, path).items():
        key = str(key).replace("-", "_")
        where = f"{path}: engine_args.{key}"
        if key == "served_model_name" and isinstance(value, list):   # a list of names, as vLLM's flag takes
            value = ",".join(str(n) for n in value)
        if key.startswith("no_") and key[3:] in engine_hints and engine_hints[key[3:]] is bool:
            # FlagScale's `no_enable_prefix_caching: true` -> vLLM's --no-enable-prefix-caching
            key, value = key[3:], not _typed(value, bool, where)
        if key in engine_hints:
            if key in HUMAN_READABLE_FLAGS and isinstance(value, str):   # `max_model_len: 32k`, as vLLM reads it
                try:
                    config.engine_args[key] = human_readable_int(value, key)
                except argparse.ArgumentTypeError as exc:
                    raise ValueError(f"{where}: {exc}") from None
            else:
                config.engine_args[key] = _typed(value, engine_hints[key], where)
        elif key in SERVER_KEYS:
            config.server[key] = _typed(value, server_hints[key], where)
        elif key in IGNORED_KEYS:
            logger.warning("%s: ignoring engine_args.%s (no meaning in deepserve)", path, key)
        else:
            raise ValueError(f"{path}: unknown engine_args key {key!r}; known: EngineArgs fields "
                             f"(vLLM names) and {', '.join(SERVER_KEYS)}")
    for key, value in entry.items():
        if key in SERVER_KEYS:  # server options may also sit at the entry's top level
            config.server.setdefault(key, _typed(value, server_hints[key], f"{path}: {key}"))
        elif key in IGNORED_ENTRY_KEYS:
            logger.warning("%s: ignoring %s (no meaning in deepserve: the parallel sizes place the ranks)", path, key)
        elif key not in ENTRY_KEYS:
            raise ValueError(f"{path}: unknown serve entry key {key!r}; known: {', '.join(ENTRY_KEYS)}, "
                             f"{', '.join(SERVER_KEYS)}")
    config.server.update({k: _typed(v, server_hints[k], f"{experiment_path}: experiment.deploy.{k}")
                          for k, v in _deploy(data, experiment_path).items()})
    for values, where in ((config.engine_args, path), (config.server, path), (config.envs, experiment_path)):
        for key, value in values.items():
            if unresolved(value):
                raise ValueError(f"{where}: {key}: {value} does not resolve (an environment variable unset and no "
                                 "default, or a key the file lacks; deepserve resolves ${oc.env:NAME[,default]} "
                                 "and ${key.path})")
    return config
