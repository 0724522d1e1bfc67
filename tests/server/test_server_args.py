"""ServerArgs: the server flags of `deepserve serve`, the YAML keys beside the engine args and
their defaults come from its fields; every spelling the CLI took before still works."""
from __future__ import annotations

import dataclasses

import pytest

from deepserve.cli.serve import resolve
from deepserve.server.args import ServerArgs
from deepserve.server.config_file import SERVER_KEYS

# the server flags `deepserve serve` has always taken, with a value each accepts (None: a switch)
FLAGS = {"--host": "0.0.0.0", "--port": "9010", "--api-key": "k", "--root-path": "/llm",
         "--disable-fastapi-docs": None, "--reasoning-parser": "deepseek_r1",
         "--enable-reasoning": None, "--generation-config": "vllm", "--enable-auto-tool-choice": None,
         "--exclude-tools-when-tool-choice-none": None,
         "--tool-call-parser": "deepseek_v3", "--max-logprobs": "5", "--chat-template": "{{ x }}",
         "--default-chat-template-kwargs": '{"enable_thinking": false}',
         "--chat-template-content-format": "openai", "--trust-request-chat-template": None,
         "--structured-outputs-config": '{"backend": "xgrammar"}',
         "--override-generation-config": '{"temperature": 0.5}', "--return-tokens-as-token-ids": None,
         "--response-role": "bot", "--stream-interval": "4", "--h11-max-incomplete-event-size": "65536",
         "--max-body-bytes": "1024", "--log-level": "debug", "--allowed-origins": '["https://ui.example"]',
         "--allow-credentials": None, "--allowed-methods": '["GET", "POST"]', "--allowed-headers": '["Authorization"]',
         "--reasoning-config": '{"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"}',
         "--enable-prompt-tokens-details": None, "--enable-force-include-usage": None,
         "--enable-server-load-tracking": None, "--shutdown-timeout": "30", "--enable-tokenizer-info-endpoint": None,
         "--enable-request-id-headers": None, "--fingerprint-mode": "custom", "--fingerprint-value": "fp_1",
         "--enable-responses-api-store": None,
         "--responses-store-max-size": "5", "--uvicorn-log-level": "warning", "--disable-uvicorn-access-log": None,
         "--disable-access-log-for-endpoints": "/health,/metrics",
         "--enable-log-requests": None, "--no-disable-log-requests": None, "--max-log-len": "100",
         "--enable-log-outputs": None, "--disable-log-stats": None}
GIVEN = dict(host="0.0.0.0", port=9010, uds=None, api_key=["k"], ssl_keyfile=None, ssl_certfile=None, ssl_ca_certs=None,
             ssl_cert_reqs=0, ssl_ciphers=None, log_config_file=None, root_path="/llm", disable_fastapi_docs=True,
             reasoning_parser="deepseek_r1", enable_reasoning=True,
             generation_config="vllm", enable_auto_tool_choice=True, exclude_tools_when_tool_choice_none=True,
             tool_call_parser="deepseek_v3",
             max_logprobs=5, chat_template="{{ x }}", default_chat_template_kwargs={"enable_thinking": False},
             chat_template_content_format="openai", trust_request_chat_template=True,
             structured_outputs_config={"backend": "xgrammar"},
             override_generation_config={"temperature": 0.5}, return_tokens_as_token_ids=True,
             response_role="bot", stream_interval=4, h11_max_incomplete_event_size=65536,
             max_body_bytes=1024, log_level="debug",
             allowed_origins='["https://ui.example"]', allow_credentials=True, allowed_methods='["GET", "POST"]',
             allowed_headers='["Authorization"]',
             reasoning_config={"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"},
             enable_prompt_tokens_details=True, enable_force_include_usage=True, shutdown_timeout=30,
             enable_server_load_tracking=True,
             enable_tokenizer_info_endpoint=True, enable_request_id_headers=True, enable_responses_api_store=True,
             responses_store_max_size=5, fingerprint_mode="custom", fingerprint_value="fp_1",
             uvicorn_log_level="warning", disable_uvicorn_access_log=True,
             disable_access_log_for_endpoints="/health,/metrics", enable_log_requests=True,
             disable_log_requests=False, max_log_len=100, enable_log_outputs=True, disable_log_stats=True)


def test_defaults_are_vllms(parser, monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    _, server, _ = resolve(parser.parse_args(["serve", "some/model"]))
    assert dataclasses.asdict(server) == dict(
        host="127.0.0.1", port=8000, uds=None, api_key=None, ssl_keyfile=None, ssl_certfile=None, ssl_ca_certs=None,
        ssl_cert_reqs=0, ssl_ciphers=None, root_path=None, disable_fastapi_docs=False,
        reasoning_parser=None, enable_reasoning=False,
        generation_config="auto", enable_auto_tool_choice=False, exclude_tools_when_tool_choice_none=False,
        tool_call_parser=None, max_logprobs=20,
        chat_template=None, default_chat_template_kwargs=None, chat_template_content_format="auto",
        h11_max_incomplete_event_size=4 * 1024 * 1024,
        trust_request_chat_template=False, structured_outputs_config=None,
        override_generation_config=None, response_role="assistant", stream_interval=1,
        return_tokens_as_token_ids=False,
        max_body_bytes=8 * 1024 * 1024, log_level="info", allowed_origins='["*"]',
        allow_credentials=False, allowed_methods='["*"]', allowed_headers='["*"]', reasoning_config=None,
        enable_prompt_tokens_details=False, enable_force_include_usage=False, shutdown_timeout=0,
        enable_server_load_tracking=False,
        enable_tokenizer_info_endpoint=False, enable_request_id_headers=False, enable_responses_api_store=False,
        responses_store_max_size=1000, fingerprint_mode="full", fingerprint_value=None,
        uvicorn_log_level=None, log_config_file=None, disable_uvicorn_access_log=False, disable_access_log_for_endpoints=None,
        enable_log_requests=False, disable_log_requests=False,
        max_log_len=None, enable_log_outputs=False, disable_log_stats=False)


def test_every_flag_and_yaml_key_is_a_field(parser, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    assert set(SERVER_KEYS) == {f.name for f in dataclasses.fields(ServerArgs)} == set(GIVEN)
    argv = ["serve", "some/model"] + [w for flag, value in FLAGS.items() for w in (flag, value) if w is not None]
    _, server, _ = resolve(parser.parse_args(argv))
    assert dataclasses.asdict(server) == GIVEN
    # the same options from a YAML file, beside the engine args
    lines = "".join(f"  {k}: {str(v).lower() if isinstance(v, bool) else repr(v)}\n" for k, v in GIVEN.items()
                    if v is not None)   # the TLS files (test_vllm_flags serves a certificate)
    path = tmp_path / "serve.yaml"
    path.write_text("engine_args:\n  model: some/model\n" + lines)
    engine, server, _ = resolve(parser.parse_args(["serve", str(path)]))
    assert engine == {"model": "some/model"} and dataclasses.asdict(server) == GIVEN
    # a flag given overrides the file; the file overrides VLLM_LOGGING_LEVEL, which overrides the default
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    _, server, _ = resolve(parser.parse_args(["serve", str(path), "--port", "7"]))
    assert (server.port, server.host, server.log_level) == (7, "0.0.0.0", "debug")
    _, server, _ = resolve(parser.parse_args(["serve", "some/model"]))
    assert server.log_level == "warning"


@pytest.mark.parametrize("value, level", [("DEBUG", "debug"), (" warn ", "warning"), ("Critical", "error"),
                                          ("", "info"), ("TRACE", None), ("verbose", None)])
def test_vllm_logging_level_values(parser, monkeypatch, value, level):
    """VLLM_LOGGING_LEVEL as vLLM reads it (Python's level names, any case): WARN and CRITICAL
    were ignored (the server logged at INFO), a name logging does not know too, where vLLM refuses
    it at start; empty is unset."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", value)
    if level is None:
        with pytest.raises(ValueError, match=f"^VLLM_LOGGING_LEVEL={value} is not a log level: DEBUG, INFO, "):
            resolve(parser.parse_args(["serve", "some/model"]))
    else:
        assert resolve(parser.parse_args(["serve", "some/model"]))[1].log_level == level


def test_bad_values_are_refused_by_name(parser, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "m", "--log-level", "loud"])
    assert "--log-level" in capsys.readouterr().err
    path = tmp_path / "bad.yaml"
    path.write_text("engine_args:\n  model: m\n  tool_call_parser: pythonic\n")
    with pytest.raises(ValueError, match="--tool-call-parser must be one of deepseek_v3, deepseek_v31, hermes, "
                                         "llama3_json, got 'pythonic'"):
        resolve(parser.parse_args(["serve", str(path)]))
    with pytest.raises(ValueError, match="--enable-reasoning needs --reasoning-parser"):
        resolve(parser.parse_args(["serve", "m", "--enable-reasoning"]))
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        resolve(parser.parse_args(["serve", "m", "--enable-auto-tool-choice"]))
    with pytest.raises(ValueError, match=r"port must be in \[0, 65535\], got 70000"):
        resolve(parser.parse_args(["serve", "m", "--port", "70000"]))
    with pytest.raises(ValueError, match="max_logprobs must be >= 0, or -1 for no cap, got -2"):
        ServerArgs(max_logprobs=-2)
    assert ServerArgs(max_logprobs=-1).max_logprobs == -1   # vLLM's: no cap
    with pytest.raises(ValueError, match="--allowed-origins must be a JSON list of strings, got 'https://a'"):
        resolve(parser.parse_args(["serve", "m", "--allowed-origins", "https://a"]))
    assert ServerArgs(allowed_origins=["https://a"]).cors()["allow_origins"] == ["https://a"]   # a YAML list


def test_api_keys_several_or_vllms_environment_variable(parser, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    _, server, _ = resolve(parser.parse_args(["serve", "m", "--api-key", "a", "b"]))
    assert server.api_key == ["a", "b"] and server.api_keys() == ["a", "b"]   # the flag wins over the variable
    assert ServerArgs(api_key="a").api_keys() == ["a"]                       # a YAML file's one key
    assert ServerArgs().api_keys() == ["from-env"]
    monkeypatch.setenv("VLLM_API_KEY", "")
    assert ServerArgs().api_keys() == []
    # a model after --api-key would be taken as a key and the demo served: refused, naming the fix
    with pytest.raises(ValueError, match="name the model before the flags"):
        resolve(parser.parse_args(["serve", "--api-key", "k", "/models/r1"]))
    _, server, _ = resolve(parser.parse_args(["serve", "--api-key", "k1", "k2"]))   # the demo, two keys
    assert server.api_key == ["k1", "k2"]
