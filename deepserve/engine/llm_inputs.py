"""What the offline LLM takes as vLLM's LLM does: constructor arguments without an engine field,
prompt dicts and tokenization_kwargs, chat messages as templates read them, and the default
SamplingParams from generation_config.json (vLLM's get_diff_sampling_param)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from deepserve.config import SPEC_ALIASES
from deepserve.engine.outputs import RequestOutput
from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.thinking_budget import PARSER_TAGS
from deepserve.engine.tokenizer import template_file, tool_call_arguments

logger = logging.getLogger("deepserve")

# vLLM LLM(...) arguments without an engine field here: the values deepserve serves (any value
# where the set is empty); other values are refused by name
_VLLM_ONLY_ARGS: dict[str, tuple] = {
    "disable_log_stats": (), "disable_custom_all_reduce": (), "tokenizer_mode": ("auto", "hf"),
    "revision": (None,), "tokenizer_revision": (None,), "code_revision": (None,), "cpu_offload_gb": (0,),
    "enable_lora": (False,), "hf_token": (None, False),
    "allowed_local_media_path": ("",), "mm_processor_kwargs": (None, {}), "logits_processors": (None, []),
    "runner": ("auto", "generate"), "convert": ("auto", "none"), "enable_prompt_embeds": (False,),
    "attention_config": (None, {}), "kv_transfer_config": (None,), "worker_cls": ("auto",),
    "limit_mm_per_prompt": (None, {}), "pooler_config": (None,), "quantization_config": (None, {}),
    "enable_return_routed_experts": (False,), "enable_sleep_mode": (False,), "logprobs_mode": ("raw_logprobs",),
}
# vLLM's structured_outputs_config keys (its StructuredOutputsConfig) and the values served (bool:
# true or false); the grammars are xgrammar's, whose JSON is compact and holds only a schema's keys
STRUCTURED_OUTPUTS_CONFIG = {"backend": ("auto", "xgrammar"), "disable_any_whitespace": bool,
                             "disable_additional_properties": bool, "reasoning_parser": ("", *PARSER_TAGS),
                             "reasoning_parser_plugin": ("",), "enable_in_reasoning": bool}
# generation_config.json keys that become the default SamplingParams (max_new_tokens: max_tokens)
_GENERATION_DEFAULTS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
# TextPrompt / TokensPrompt keys served (others, vLLM's multi_modal_data among them, are refused)
PROMPT_KEYS = {"prompt", "prompt_token_ids", "cache_salt"}
TOKENIZATION_KWARGS = {"truncate_prompt_tokens", "add_special_tokens", "truncation_side"}


def check_vllm_only_args(kwargs: dict) -> None:
    """Take out vLLM's LLM arguments that have no engine field here: their neutral values pass,
    other values are refused by name."""
    for name in [k for k in kwargs if k in _VLLM_ONLY_ARGS]:
        _check_served(name, kwargs.pop(name), _VLLM_ONLY_ARGS[name])
    fold_speculative_aliases(kwargs)


def structured_outputs_parser(config: Optional[dict], parser: Optional[str], name: str,
                              parser_name: str) -> Optional[str]:
    """The reasoning parser of a structured_outputs_config (vLLM's, named `name`) and of the
    reasoning_parser option (named `parser_name`): the one given, the same where both are.
    ValueError naming the first key or value STRUCTURED_OUTPUTS_CONFIG does not serve."""
    if config is None:
        return parser
    if not isinstance(config, dict):
        raise ValueError(f"{name} must be a JSON object, got {config!r}")
    for key, value in config.items():
        served = STRUCTURED_OUTPUTS_CONFIG.get(key)
        if served is None:
            raise ValueError(f"{name} {key} is not supported (it takes {', '.join(STRUCTURED_OUTPUTS_CONFIG)})")
        if served is bool and not isinstance(value, bool):
            raise ValueError(f"{name} {key} must be true or false, got {value!r}")
        if served is not bool and value not in served:
            raise ValueError(f"{name} {key} {value!r} is not supported (deepserve's grammars are xgrammar's; "
                             f"it takes {' or '.join(repr(v) for v in served)})")
    given = config.get("reasoning_parser") or None
    if given is not None and parser not in (None, given):
        raise ValueError(f"{parser_name} {parser} and {name} reasoning_parser {given} differ: give one")
    return parser or given


def fold_speculative_aliases(kwargs: dict) -> None:
    """vLLM's spec_method / spec_model / spec_tokens taken out of `kwargs` and set in its
    speculative_config; a key given both ways with two values is refused."""
    aliases = {SPEC_ALIASES[k][0]: kwargs.pop(k) for k in list(kwargs) if k in SPEC_ALIASES}
    aliases = {k: v for k, v in aliases.items() if v is not None}
    if aliases:
        spec = kwargs.get("speculative_config") or {}
        spec = dict(json.loads(spec) if isinstance(spec, str) else spec)
        clash = sorted(k for k, v in aliases.items() if k in spec and spec[k] != v)
        if clash:
            raise ValueError(f"speculative_config {clash} and their spec_* aliases disagree")
        kwargs["speculative_config"] = {**spec, **aliases}


def _check_served(name: str, value, served: tuple) -> None:
    if served and value not in served:
        raise ValueError(f"{name}={value!r} is not supported (deepserve serves "
                         f"{' or '.join(repr(v) for v in served)})")


def refuse_unsupported(**given) -> None:
    for name, value in given.items():
        if value is not None:
            raise ValueError(f"{name} is not supported (no LoRA adapters or multi-modal inputs)")


def generation_defaults(setting: str, model: str, overrides: Optional[dict] = None,
                        flag: str = "generation_config") -> dict:
    """SamplingParams keyword arguments from generation_config.json, as vLLM's
    get_diff_sampling_param reads them (`setting`: "auto", "vllm" or a folder; `flag`: how the
    caller's user set it, for the messages). The offline LLM's defaults and the server's
    request defaults."""
    config: dict = {}
    path = None
    if setting != "vllm":
        path = Path(model if setting == "auto" else setting) / "generation_config.json"
        if path.is_file():
            config = json.loads(path.read_text())
        elif setting != "auto":
            raise FileNotFoundError(f"{flag} {setting}: {path} not found")
    config.update(overrides or {})
    found = {k: config[k] for k in _GENERATION_DEFAULTS if config.get(k) is not None}
    check_generation_defaults(found, path, overrides or {}, flag)
    if "max_new_tokens" in found:
        found["max_tokens"] = found.pop("max_new_tokens")
    if found and setting != "vllm":
        logger.info("default sampling params from %s: %s (%s vllm ignores them)", path, found, flag)
    return found


def check_generation_defaults(found: dict, path: Optional[Path], overrides: dict, flag: str) -> None:
    """The defaults must make valid SamplingParams, else every request that leaves a field out
    would fail with them: one error at start, naming where the value came from."""
    override_flag = "--override-generation-config" if flag.startswith("--") else "override_generation_config"

    def source(key: str) -> str:
        return override_flag if key in overrides else str(path)

    for key, value in found.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source(key)}: {key} must be a number, got {value!r}")
        try:
            SamplingParams(**{("max_tokens" if key == "max_new_tokens" else key): value})
        except ValueError as exc:
            named = " (max_new_tokens is the default max_tokens)" if key == "max_new_tokens" else ""
            raise ValueError(f"{source(key)}: {exc}{named}") from None


def truncate_prompt(ids: list[int], keep: Optional[int], side: str, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last (side "left") or first `keep` tokens;
    -1 keeps max_model_len."""
    if keep is None:
        return ids
    if side not in ("left", "right"):
        raise ValueError(f"truncation_side must be left or right, got {side!r}")
    if keep == -1:
        keep = max_model_len
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"truncate_prompt_tokens must be -1 or >= 1, got {keep!r}")
    if keep > max_model_len:
        raise ValueError(f"truncate_prompt_tokens={keep} cannot be greater than max_model_len = {max_model_len}. "
                         "Please request a smaller truncation size.")
    return ids[-keep:] if side == "left" else ids[:keep]


def template_text(template: str) -> str:
    """A chat template given as its file or its text (vLLM's rule: text without "{", "}" or a
    newline names a file, which must exist)."""
    path = template_file(str(template))
    if path is not None:
        return path.read_text()
    if not any(c in str(template) for c in "{}\n"):
        raise ValueError(f"chat_template {template!r} looks like a file path, but there is no such file")
    return template


def template_turn(message: dict, content_format: str) -> dict:
    """A message as chat templates read it (vLLM's rendering): text parts joined into one string
    (format "auto" / "string"); a tool call's JSON arguments are their text to templates that
    join them into the prompt (R1's) and their value to `tojson` (JSONArguments)."""
    turn = dict(message)
    if "tool_calls" in turn and not turn["tool_calls"]:
        # None or [] (a client's turn without calls): gone, as vLLM drops them, so a template that
        # tests for the key (R1's) renders the turn's text rather than an empty calls block
        del turn["tool_calls"]
    content = turn.get("content")
    if isinstance(content, list) and content_format != "openai":
        other = [part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content
                 if not (isinstance(part, dict) and part.get("type") == "text")]
        if other:
            raise ValueError(f"message content parts {other} are not supported (text parts only)")
        turn["content"] = "\n".join(part["text"] for part in content)
    if turn.get("tool_calls"):
        calls = []
        for j, call in enumerate(turn["tool_calls"]):
            function = dict(call.get("function") or {})
            try:
                function["arguments"] = tool_call_arguments(function.get("arguments"))
            except ValueError as exc:
                raise ValueError(f"tool_calls[{j}].function.arguments {exc}") from None
            calls.append({**call, "function": function})
        turn["tool_calls"] = calls
    return turn


def drop_text(output: RequestOutput) -> None:
    """detokenize=False: vLLM's outputs then carry token ids only."""
    entries = [e for c in output.outputs for e in c.logprobs or ()] + [e for e in output.prompt_logprobs or () if e]
    for completion in output.outputs:
        completion.text = ""
    for entry in entries:
        for lp in entry.values():
            lp.decoded_token = None
