"""`deepserve serve` against `vllm serve` 0.26's flags: the ones it lacked that it can honour,
with vLLM's meaning (compared with what vLLM's code does for the same input), and the ones for
features it does not have, refused in one line naming the flag."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import openai
import pytest
from test_qa14_chat_agents import load_tokenizer, serve

from deepserve.cli.serve import resolve
from deepserve.config import DEMO_MODEL
from deepserve.engine.tokenizer import Tokenizer
from deepserve.server.errors import APIError
from deepserve.server.protocol import ChatCompletionRequest
from deepserve.server.serving_chat import UNTRUSTED_TEMPLATE, detected_content_format, render_text


# each content loop vLLM's detection (renderers/hf.py _detect_content_format) finds, and templates without one
@pytest.mark.parametrize("template, expected", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
    ("{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% for p in m.content | selectattr('type', 'equalto', 'text') %}{{ p.text }}"
     "{% endfor %}{% endfor %}", "openai"),
    ("{% set loop_messages = messages[1:] %}{% for m in loop_messages %}{% for p in m['content'] %}x{% endfor %}"
     "{% endfor %}", "openai"),
    ("{% for m in messages %}{% set content = m['content'] %}{% for item in content %}x{% endfor %}{% endfor %}",
     "openai"),
    ("{% for m in messages %}{% for t in m['tool_calls'] %}x{% endfor %}{% endfor %}", "string"),
    ("{% for m in messages %", "string"),   # does not parse
])
def test_content_format_detected_as_vllm_detects_it(template, expected):
    assert detected_content_format(template) == expected


@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b"])
def test_the_models_templates_take_strings(name):
    assert detected_content_format(load_tokenizer(name).chat_template) == "string"


SHOW = "{% for m in messages %}{{ m['role'] }}={{ m['content'] | tojson }};{% endfor %}"
LOOPS = "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}" \
        "{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endif %};{% endfor %}"
PARTS = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": PARTS},
            {"role": "tool", "tool_call_id": "c", "content": PARTS}]


@pytest.mark.parametrize("template, content_format, expected", [
    # vLLM's string format: text parts joined by newlines
    (SHOW, "string", 'system="s";user="a\\nb";tool="a\\nb";'),
    # openai: lists of text parts, a string as one part; a tool result's parts joined (vLLM's too)
    (SHOW, "openai", 'system=[{"type": "text", "text": "s"}];user=[{"type": "text", "text": "a"}, '
                     '{"type": "text", "text": "b"}];tool="a\\nb";'),
    (SHOW, "auto", 'system="s";user="a\\nb";tool="a\\nb";'),
    (LOOPS, "auto", "[s];[a][b];a\nb;"),
    (LOOPS, "string", "s;a\nb;a\nb;"),
])
def test_chat_template_content_format(template, content_format, expected):
    """--chat-template-content-format: "openai" hands the template a message's content as parts
    (a template that loops over parts, as vLLM's auto detects, would see characters of a string)."""
    state = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL, chat_template=template))
    req = ChatCompletionRequest.model_validate({"messages": MESSAGES})
    assert render_text(state, req.messages, add_generation_prompt=False, content_format=content_format) == expected


def test_content_format_flag(parser):
    _, server, _ = resolve(parser.parse_args(["serve", "m", "--chat-template-content-format", "openai",
                                              "--trust-request-chat-template"]))
    assert (server.chat_template_content_format, server.trust_request_chat_template) == ("openai", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "m", "--chat-template-content-format", "json"])


OWN = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body", [{"chat_template": OWN}, {"chat_template": ""},
                                  {"chat_template_kwargs": {"chat_template": OWN}}])
def test_request_chat_template_refused_unless_trusted(body):
    """A request's own chat template (or chat_template_kwargs' one) is refused with vLLM's
    message without --trust-request-chat-template (with it: the test below)."""
    client = serve("deepseek-r1", "Fine.")

    async def ask():
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="m", messages=HI, extra_body=body)
        return err.value
    err = asyncio.run(ask())
    assert err.status_code == 400 and err.body["message"] == UNTRUSTED_TEMPLATE
    with pytest.raises(openai.BadRequestError) as tok_err:
        asyncio.run(client.post("http://app/tokenize", cast_to=object, body={"model": "m", "messages": HI, **body}))
    assert tok_err.value.body["message"] == UNTRUSTED_TEMPLATE


def test_trusted_request_chat_template_renders_the_prompt():
    client = serve("deepseek-r1", "Fine.", trust_request_chat_template=True)
    tok = load_tokenizer("deepseek-r1")

    async def ask(body):
        await client.chat.completions.create(model="m", messages=HI, extra_body=body)
        tokenized = await client.post("http://app/tokenize", cast_to=object, body={"model": "m", "messages": HI, **body})
        return client.engine.prompts[-1], tokenized["tokens"]
    for body in ({"chat_template": OWN}, {"chat_template_kwargs": {"chat_template": OWN}}):
        assert asyncio.run(ask(body)) == ("<<Hi>>", tok.encode("<<Hi>>", add_special_tokens=False))
    prompt, _ = asyncio.run(ask({"chat_template": ""}))   # "" falls back to the model's (vLLM's `or`)
    assert prompt == tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    for bad in ("{% for m in messages %}", "{{ ''.__class__.__mro__[1].__subclasses__() }}"):
        with pytest.raises(openai.BadRequestError) as err:
            asyncio.run(ask({"chat_template": bad}))
        assert err.value.body["param"] == "chat_template", bad


def test_untrusted_template_is_an_api_error_with_vllms_words():
    state = SimpleNamespace(settings=SimpleNamespace(trust_request_chat_template=False))
    from deepserve.server.serving_chat import request_template
    assert request_template(state, None, {"enable_thinking": False}) is None
    with pytest.raises(APIError) as err:
        request_template(state, None, {"chat_template": OWN})
    assert err.value.message == ("Chat template is passed with request, but --trust-request-chat-template is not "
                                 "set. Refused request with untrusted chat template.")


def test_structured_outputs_config(parser):
    """vLLM's --structured-outputs-config (JSON or the dotted keys):
    what xgrammar serves passes, its reasoning_parser is --reasoning-parser's, the rest is refused
    in one line naming the key."""
    from deepserve.cli.main import normalize_argv

    def server_of(*flags):
        return resolve(parser.parse_args(normalize_argv(["serve", "m", *flags])))[1]
    server = server_of("--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}')
    assert server.structured_outputs_config == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert server.reasoning_parser is None and not server.grammar_in_reasoning()
    server = server_of("--structured-outputs-config.reasoning_parser", "deepseek_r1",
                       "--structured-outputs-config.enable_in_reasoning", "true")
    assert server.reasoning_parser == "deepseek_r1" and server.grammar_in_reasoning()
    assert server_of("--reasoning-parser", "deepseek_r1", "--structured-outputs-config.reasoning_parser",
                     "deepseek_r1").reasoning_parser == "deepseek_r1"
    for flags, message in (
            (("--structured-outputs-config.backend", "guidance"),
             "--structured-outputs-config backend 'guidance' is not supported (deepserve's grammars are xgrammar's; "
             "it takes 'auto' or 'xgrammar')"),
            (("--structured-outputs-config.reasoning_parser", "qwen3"), "reasoning_parser 'qwen3' is not supported"),
            (("--structured-outputs-config.reasoning_parser_plugin", "/p.py"), "reasoning_parser_plugin '/p.py'"),
            (("--structured-outputs-config.whitespace", "x"), "--structured-outputs-config whitespace is not supported"),
            (("--structured-outputs-config.enable_in_reasoning", "yes"), "enable_in_reasoning must be true or false"),
            (("--structured-outputs-config", "[1]"), "must be a JSON object"),
            (("--reasoning-parser", "deepseek_r1", "--structured-outputs-config", '{"reasoning_parser": "x"}'),
             "reasoning_parser 'x' is not supported")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            server_of(*flags)


@pytest.mark.parametrize("in_reasoning", [False, True])
def test_enable_in_reasoning_starts_the_grammar_at_the_first_token(in_reasoning):
    """With a reasoning parser a grammar holds from </think> on; vLLM's enable_in_reasoning holds
    it from the first token, the reasoning included."""
    client = serve("deepseek-r1", '{"a": 1}', grammar_in_reasoning=in_reasoning)
    seen = []
    generate = client.engine.generate

    def recording(prompt, params, request_id):
        seen.append(params.guided.start_after_token)
        return generate(prompt, params, request_id)
    client.engine.generate = recording
    asyncio.run(client.chat.completions.create(model="m", messages=HI, response_format={"type": "json_object"}))
    think_end = load_tokenizer("deepseek-r1").tok.token_to_id("</think>")
    assert seen == [None if in_reasoning else think_end]


def test_override_generation_config(parser, tmp_path):
    """vLLM's --override-generation-config: set over
    generation_config.json's defaults, the only ones with --generation-config vllm (vLLM's
    get_diff_sampling_param)."""
    from deepserve.server.api_server import generation_defaults

    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.95}')
    _, server, _ = resolve(parser.parse_args(["serve", "m", "--override-generation-config",
                                              '{"temperature": 0.5, "max_new_tokens": 64}']))
    overrides = server.override_generation_config
    assert generation_defaults("auto", str(tmp_path), overrides) == {"temperature": 0.5, "top_p": 0.95,
                                                                     "max_tokens": 64}
    assert generation_defaults("vllm", str(tmp_path), overrides) == {"temperature": 0.5, "max_tokens": 64}
    with pytest.raises(ValueError, match="--override-generation-config must be a JSON object, got 0.5"):
        resolve(parser.parse_args(["serve", "m", "--override-generation-config", "0.5"]))


def test_min_tokens_past_the_generation_default_max_tokens():
    """A chat request without max_tokens takes the model's max_new_tokens (generation_config or
    --override-generation-config); a min_tokens past it is refused in SamplingParams' words, as
    vLLM's server (which builds its SamplingParams with that default)."""
    client = serve("deepseek-r1", "Fine.", generation_defaults={"max_tokens": 4})
    messages = [{"role": "user", "content": "Hi"}]

    async def main():
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="m", messages=messages, extra_body={"min_tokens": 5})
        assert refused.value.body["message"] == "min_tokens must be less than or equal to max_tokens=4, got 5."
        assert refused.value.body["param"] == "min_tokens"
        r = await client.chat.completions.create(model="m", messages=messages, extra_body={"min_tokens": 4})
        assert r.choices[0].finish_reason == "stop"   # served: the script's reply

    asyncio.run(main())


@pytest.mark.parametrize("request_says, expected", [(None, True), (False, False), (True, True)])
def test_return_tokens_as_token_ids_flag(request_says, expected):
    """vLLM's --return-tokens-as-token-ids: the default of
    requests that leave return_tokens_as_token_ids out, on chat and completions."""
    client = serve("deepseek-r1", "Fine.", return_tokens_as_token_ids=True)
    extra = {} if request_says is None else {"return_tokens_as_token_ids": request_says}

    async def ask():
        chat = await client.chat.completions.create(model="m", messages=HI, logprobs=True, extra_body=extra)
        text = await client.completions.create(model="m", prompt="Hi", logprobs=0, extra_body=extra)
        return [e.token for e in chat.choices[0].logprobs.content], text.choices[0].logprobs.tokens
    for tokens in asyncio.run(ask()):
        assert tokens and all(t.startswith("token_id:") == expected for t in tokens), tokens


# every flag of `vllm serve` 0.26 (entrypoints/openai/cli_args.py make_arg_parser and FrontendArgs,
# engine/arg_utils.py EngineArgs / AsyncEngineArgs.add_cli_args)
VLLM_SERVE_FLAGS = """
    --lora-modules --chat-template --chat-template-content-format --trust-request-chat-template
    --default-chat-template-kwargs --response-role --return-tokens-as-token-ids --enable-auto-tool-choice
    --exclude-tools-when-tool-choice-none --tool-call-parser --tool-parser-plugin --tool-server
    --log-config-file --max-log-len --enable-prompt-tokens-details --enable-per-request-metrics
    --enable-server-load-tracking --enable-force-include-usage --enable-tokenizer-info-endpoint
    --enable-log-outputs --enable-log-deltas --log-error-stack --tokens-only --fingerprint-mode
    --fingerprint-value --host --port --data-parallel-supervisor-port --dp-supervisor-probe-interval-s
    --dp-supervisor-probe-timeout-s --dp-supervisor-probe-failure-threshold --uds --uvicorn-log-level
    --disable-uvicorn-access-log --disable-access-log-for-endpoints --allow-credentials --allowed-origins
    --allowed-methods --allowed-headers --api-key --ssl-keyfile --ssl-certfile --ssl-ca-certs
    --enable-ssl-refresh --ssl-cert-reqs --ssl-ciphers --root-path --middleware --enable-request-id-headers
    --disable-fastapi-docs --h11-max-incomplete-event-size --h11-max-header-count --enable-offline-docs
    --enable-flash-late-interaction --headless --api-server-count --grpc --model --runner --convert --tokenizer
    --tokenizer-mode --trust-remote-code --dtype --seed --hf-config-path --allowed-local-media-path
    --allowed-media-domains --revision --code-revision --tokenizer-revision --max-model-len --quantization
    --quantization-config --allow-deprecated-quantization --enforce-eager --enable-return-routed-experts
    --max-logprobs --logprobs-mode --use-fp64-gumbel --disable-sliding-window --disable-cascade-attn
    --skip-tokenizer-init --enable-prompt-embeds --served-model-name --config-format --hf-token --hf-overrides
    --model-class-overrides --pooler-config --generation-config --override-generation-config
    --enable-sleep-mode --enable-cumem-allocator --model-impl --override-attention-dtype --logits-processors
    --io-processor-plugin --renderer-num-workers --load-format --download-dir --safetensors-load-strategy
    --safetensors-prefetch-num-threads --safetensors-prefetch-block-size --model-loader-extra-config
    --ignore-patterns --use-tqdm-on-load --pt-load-map-location --attention-backend --mamba-backend
    --enable-mamba-cache-stochastic-rounding --mamba-cache-philox-rounds --reasoning-parser
    --reasoning-parser-plugin --distributed-executor-backend --pipeline-parallel-size --master-addr
    --master-port --nnodes --node-rank --distributed-timeout-seconds --cpu-distributed-timeout-seconds
    --numa-bind --numa-bind-nodes --numa-bind-cpus --device-ids --tensor-parallel-size
    --decode-context-parallel-size --dcp-comm-backend --dcp-kv-cache-interleave-size
    --cp-kv-cache-interleave-size --prefill-context-parallel-size --data-parallel-size --data-parallel-rank
    --data-parallel-start-rank --data-parallel-size-local --data-parallel-address --data-parallel-rpc-port
    --data-parallel-backend --data-parallel-hybrid-lb --data-parallel-external-lb
    --data-parallel-multi-port-external-lb --enable-expert-parallel --enable-ep-weight-filter --all2all-backend
    --enable-dbo --ubatch-size --enable-elastic-ep --dbo-decode-token-threshold --dbo-prefill-token-threshold
    --disable-nccl-for-dp-synchronization --enable-eplb --eplb-config --expert-placement-strategy
    --max-parallel-loading-workers --ray-workers-use-nsight --disable-custom-all-reduce --worker-cls
    --worker-extension-cls --block-size --gpu-memory-utilization --kv-cache-memory-bytes --kv-cache-dtype
    --num-gpu-blocks-override --enable-prefix-caching --prefix-caching-hash-algo --calculate-kv-scales
    --kv-cache-dtype-skip-layers --kv-sharing-fast-prefill --mamba-cache-dtype --mamba-ssm-cache-dtype
    --mamba-block-size --prefix-match-unit --mamba-cache-mode --kv-offloading-size --kv-offloading-backend
    --offload-backend --cpu-offload-gb --cpu-offload-params --offload-group-size --offload-num-in-group
    --offload-prefetch-step --offload-params --language-model-only --limit-mm-per-prompt --enable-mm-embeds
    --media-io-kwargs --mm-processor-kwargs --mm-processor-cache-gb --mm-processor-cache-type
    --mm-shm-cache-max-object-size-mb --mm-encoder-only --mm-encoder-tp-mode --mm-encoder-attn-backend
    --mm-encoder-attn-dtype --mm-encoder-fp8-scale-path --mm-encoder-fp8-scale-save-path
    --mm-encoder-fp8-scale-save-margin --interleave-mm-strings --skip-mm-profiling --video-pruning-rate
    --mm-tensor-ipc --mm-ipc-gpu-memory-gb --enable-lora --max-loras --max-lora-rank --lora-dtype
    --enable-tower-connector-lora --max-cpu-loras --fully-sharded-loras --lora-target-modules
    --default-mm-loras --specialize-active-lora --enable-mixed-moe-lora-format --enable-moe-shared-loras
    --show-hidden-metrics-for-version --otlp-traces-endpoint --collect-detailed-traces --kv-cache-metrics
    --kv-cache-metrics-sample --cudagraph-metrics --enable-layerwise-nvtx-tracing --enable-mfu-metrics
    --enable-logging-iteration-details --jit-monitor-mode --jit-monitor-verbose --max-num-batched-tokens
    --max-num-scheduled-tokens --max-num-seqs --max-num-partial-prefills --max-long-partial-prefills
    --long-prefill-token-threshold --scheduling-policy --enable-chunked-prefill --disable-chunked-mm-input
    --scheduler-cls --scheduler-reserve-full-isl --watermark --prefill-schedule-interval
    --disable-hybrid-kv-cache-manager --async-scheduling --stream-interval --ir-op-priority
    --enable-flashinfer-autotune --enable-bf16x3-router-gemm --moe-backend --linear-backend
    --speculative-config --diffusion-config --kv-transfer-config --kv-events-config --ec-transfer-config
    --compilation-config --attention-config --reasoning-config --kernel-config --additional-config
    --structured-outputs-config --profiler-config --optimization-level --performance-mode
    --weight-transfer-config --disable-log-stats --aggregate-engine-logging --fail-on-environ-validation
    --shutdown-timeout --gdn-prefill-backend --enable-log-requests
    --cudagraph-capture-sizes --max-cudagraph-capture-size --spec-method --spec-model --spec-tokens --config
""".split()


def test_every_vllm_serve_flag_is_taken(parser):
    """Each of vLLM serve's flags is honoured, or taken to be refused by name: none is argparse's
    "unrecognized arguments"."""
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]
    assert [flag for flag in VLLM_SERVE_FLAGS if flag not in serve_parser._option_string_actions] == []


@pytest.mark.parametrize("argv, line", [
    (["--enable-lora"], "--enable-lora is not supported: deepserve serves no LoRA adapters"),
    (["--lora-modules", "sql=/loras/sql"], "--lora-modules sql=/loras/sql is not supported: deepserve serves no LoRA"),
    (["--limit-mm-per-prompt", '{"image": 2}'], "--limit-mm-per-prompt {\"image\": 2} is not supported: deepserve "
                                               "serves text models, no multi-modal inputs"),
    (["--kv-transfer-config", '{"kv_connector": "NixlConnector"}'], "--kv-transfer-config {\"kv_connector\": \"NixlConnector\"} is not supported: deepserve has no KV "
     "cache transfer"),
    (["--tokenizer-mode", "mistral"], "--tokenizer-mode mistral is not supported (it takes auto or hf): the "
                                      "tokenizer is the folder's tokenizer.json"),
    (["--runner", "pooling"], "--runner pooling is not supported (it takes auto or generate): deepserve serves "
                              "no pooling models"),
    (["--enable-ssl-refresh"], "--enable-ssl-refresh is not supported: certificates are loaded once, at start"),
    (["--revision", "main"], "--revision main is not supported: deepserve serves local model folders"),
    (["--logits-processors", "my.Proc"], "--logits-processors my.Proc is not supported: it loads user code"),
    (["-n", "2", "-r", "1"], "--nnodes 2 is not supported: tensor / pipeline parallel over several nodes runs on Ray"),
])
def test_unsupported_vllm_flags_are_one_line(argv, line, capsys):
    """A vLLM flag for a feature deepserve does not have, or a value of --tokenizer-mode and the
    like that deepserve does not serve: one line naming it and why."""
    from deepserve.cli.main import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deepserve serve: error: {line}") and err.count("\n") == 1, err


def test_served_values_of_vllm_flags_pass(parser):
    """Values that ask for what deepserve does anyway, and switches that turn off what it does
    not have, are accepted; a switch does not take the model that follows it."""
    engine, _, _ = resolve(parser.parse_args(["serve", "--disable-custom-all-reduce", "m", "--tokenizer-mode", "hf",
                                              "--runner", "generate", "--config-format", "auto",
                                              "--disable-sliding-window", "--cpu-offload-gb", "0"]))
    assert engine["model"] == "m"


@pytest.mark.parametrize("flags, value", [(["--calculate-kv-scales"], True), (["--no-calculate-kv-scales"], False)])
def test_calculate_kv_scales_is_deprecated_as_in_vllm(parser, caplog, flags, value):
    """vLLM 0.26 takes --calculate-kv-scales with a deprecation warning (the option is gone after
    it; the scales come from the checkpoint, else 1.0): taken and warned about, as LLM's keyword,
    not refused."""
    from deepserve.config import CALCULATE_KV_SCALES_WARNING, EngineArgs

    engine, _, _ = resolve(parser.parse_args(["serve", "m", *flags, "--kv-cache-dtype", "fp8"]))
    assert engine["calculate_kv_scales"] is value
    with caplog.at_level("WARNING", logger="deepserve.config"):
        EngineArgs(**{**engine, "model": DEMO_MODEL})
    assert [r.getMessage() for r in caplog.records] == ([CALCULATE_KV_SCALES_WARNING] if value else [])
    assert "no effect" in CALCULATE_KV_SCALES_WARNING


def test_cudagraph_capture_size_flags(parser):
    """vLLM's --cudagraph-capture-sizes and --max-cudagraph-capture-size:
    compilation_config's keys given alone, folded into it as vLLM does, so they set
    and cap the captured sizes; with the same key in --compilation-config, vLLM's error."""
    import dataclasses

    from deepserve.config import EngineArgs

    def engine_of(*flags):
        engine, _, _ = resolve(parser.parse_args(["serve", DEMO_MODEL, *flags]))
        return EngineArgs(**engine)
    args = engine_of("--cudagraph-capture-sizes", "4", "1", "2")
    assert (args.cuda_graph_sizes, args.compilation_config) == ([1, 2, 4], {"cudagraph_capture_sizes": [4, 1, 2]})
    args = engine_of("--max-cudagraph-capture-size", "8")
    assert (args.cuda_graph_sizes, args.piecewise_max_tokens) == ([1, 2, 4, 8], 8)
    assert EngineArgs(**dataclasses.asdict(args)).cuda_graph_sizes == [1, 2, 4, 8]   # made again from its fields
    with pytest.raises(ValueError, match="cudagraph_capture_sizes and compilation_config.cudagraph_capture_sizes "
                                         "are mutually exclusive"):
        engine_of("--cudagraph-capture-sizes", "4", "--compilation-config", '{"cudagraph_capture_sizes": [2]}')


def test_spec_aliases(parser):
    """vLLM's --spec-method / --spec-model / --spec-tokens: its
    speculative_config's method, model and num_speculative_tokens."""
    engine, _, _ = resolve(parser.parse_args(["serve", "m", "--spec-method", "ngram", "--spec-tokens", "3"]))
    assert engine["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    engine, _, _ = resolve(parser.parse_args(["serve", "m", "--speculative-config", '{"prompt_lookup_max": 4}',
                                              "--spec-method", "ngram"]))
    assert engine["speculative_config"] == {"prompt_lookup_max": 4, "method": "ngram"}
    with pytest.raises(ValueError, match=r"speculative_config \['method'\] and their spec_\* aliases disagree"):
        resolve(parser.parse_args(["serve", "m", "--speculative-config", '{"method": "mtp"}', "--spec-method",
                                   "ngram"]))


def test_vllm_config_file(parser, tmp_path):
    """vLLM's `--config FILE.yaml`: flat keys naming flags, under
    the command line's flags; the model argument wins over the file's model; false turns a switch
    off (vLLM drops it)."""
    path = tmp_path / "vllm.yaml"
    path.write_text("model: /models/r1\nport: 8123\ntensor-parallel-size: 2\nmax_num_seqs: 8\n"
                    "enable-prefix-caching: false\nenforce-eager: true\nserved-model-name: [a, b]\n"
                    "speculative-config:\n  method: ngram\n  num_speculative_tokens: 3\n")
    engine, server, _ = resolve(parser.parse_args(["serve", "--config", str(path), "--port", "9000", "-tp", "4"]))
    assert engine == {"model": "/models/r1", "tensor_parallel_size": 4, "max_num_seqs": 8,
                      "enable_prefix_caching": False, "enforce_eager": True, "served_model_name": "a,b",
                      "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}
    assert server.port == 9000
    engine, _, _ = resolve(parser.parse_args(["serve", "/models/other", "--config", str(path)]))
    assert engine["model"] == "/models/other"
    path.write_text("enable-lora: true\n")
    with pytest.raises(ValueError, match="--enable-lora is not supported: deepserve serves no LoRA adapters"):
        resolve(parser.parse_args(["serve", "m", "--config", str(path)]))
    for name, text, message in (("c.json", "{}", "vLLM's flags file is a .yaml or .yml file"),
                                ("d.yaml", "engine_args:\n  model: m\n", "is given as `deepserve serve")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            resolve(parser.parse_args(["serve", "m", "--config", str(tmp_path / name)]))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key: (certfile, keyfile)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    return str(cert), str(key)


def test_ssl_flags_serve_https(certificate):
    """vLLM's --ssl-keyfile / --ssl-certfile: the server answers
    over HTTPS, and its ready line says so."""
    import httpx
    from conftest import launch

    cert, key = certificate
    server = launch("--ssl-keyfile", key, "--ssl-certfile", cert)
    try:
        assert server.url.startswith("https://127.0.0.1:")
        assert httpx.get(server.url + "/health", verify=False).status_code == 200
        # a head of 30 kB still coming: vLLM's default limit, 4 MiB, waits (uvicorn's, 16 KiB, answered 400)
        assert partial_head(server.url, 30_000) == b""
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https://", "http://") + "/health")
    finally:
        server.stop()


def test_ssl_flags_checked_before_start(certificate, tmp_path):
    from deepserve.server.args import ServerArgs

    cert, key = certificate
    ServerArgs(ssl_keyfile=key, ssl_certfile=cert, ssl_ca_certs=cert, ssl_cert_reqs=2)
    for kwargs, message in (
            (dict(ssl_keyfile=key), "--ssl-keyfile and --ssl-certfile go together"),
            (dict(ssl_cert_reqs=2), "need --ssl-keyfile and --ssl-certfile"),
            (dict(ssl_keyfile=key, ssl_certfile=cert, ssl_cert_reqs=3), "--ssl-cert-reqs must be 0"),
            (dict(ssl_keyfile=cert, ssl_certfile=cert), f"--ssl-keyfile {cert} / --ssl-certfile {cert}: "),
            (dict(ssl_keyfile=key, ssl_certfile=str(tmp_path / "none.pem")), "No such file or directory")):
        with pytest.raises(ValueError, match=message):
            ServerArgs(**kwargs)


def test_vllms_short_flags(parser):
    """vLLM's short spellings of the flags deepserve honours (-q, -asc, -dpl, ...) set those flags."""
    engine, _, _ = resolve(parser.parse_args([
        "serve", "m", "-q", "fp8", "-asc", "2", "-dp", "4", "-dpl", "2", "-dpr", "2", "-dpa", "10.0.0.1",
        "-dpp", "13389", "-ep", "-sc", '{"method": "ngram", "num_speculative_tokens": 2}']))
    assert engine == {"model": "m", "quantization": "fp8", "api_server_count": 2, "data_parallel_size": 4,
                      "data_parallel_size_local": 2, "data_parallel_start_rank": 2,
                      "data_parallel_address": "10.0.0.1", "data_parallel_rpc_port": 13389,
                      "enable_expert_parallel": True,
                      "speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}


@pytest.mark.parametrize("flags, mode", [
    (["--optimization-level", "0"], "NONE"), (["--optimization-level", "1"], "PIECEWISE"),
    (["--optimization-level", "3"], "FULL_AND_PIECEWISE"),
    (["--optimization-level", "0", "--cudagraph-mode", "FULL_DECODE_ONLY"], "FULL_DECODE_ONLY"),
    (["--optimization-level", "0", "--compilation-config", '{"cudagraph_mode": "PIECEWISE"}'], "PIECEWISE")])
def test_optimization_level_sets_the_cuda_graphs(parser, flags, mode):
    """vLLM's --optimization-level: its CUDA graph mode (vLLM's
    OPTIMIZATION_LEVEL_0x cudagraph_mode), under a mode given."""
    from deepserve.config import EngineArgs

    engine, _, _ = resolve(parser.parse_args(["serve", DEMO_MODEL, *flags]))
    args = EngineArgs(**engine)
    assert args.cudagraph_mode == mode and args.enforce_eager == (mode == "NONE")


@pytest.mark.parametrize("flags, mode", [(["-O0"], "NONE"), (["-O=1"], "PIECEWISE"), (["-O", "0"], "NONE"),
                                         (["-O", '{"cudagraph_mode": "PIECEWISE"}'], "PIECEWISE")])
def test_short_o_is_the_optimization_level_as_vllms(parser, flags, mode):
    """vLLM 0.26's -O3 / -O=3 / -O 3 is --optimization-level (-O0 runs without CUDA graphs, not
    a torch.compile level that keeps them); -O with JSON stays the compilation config."""
    from deepserve.cli.main import normalize_argv
    from deepserve.config import EngineArgs

    engine, _, _ = resolve(parser.parse_args(normalize_argv(["serve", DEMO_MODEL, *flags])))
    args = EngineArgs(**engine)
    assert args.cudagraph_mode == mode and args.enforce_eager == (mode == "NONE")


@pytest.mark.parametrize("stream", [False, True])
def test_response_role(stream):
    """vLLM's --response-role: the reply's role for a new turn; without a generation prompt the
    last message's role (vLLM's), whatever the flag."""
    import httpx

    client = serve("deepseek-r1", "Fine.", response_role="bot")
    transport = client._client._transport

    async def role(**body):
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            body = {"model": "m", "messages": HI, "stream": stream, **body}
            r = await http.post("/v1/chat/completions", json=body)
            if stream:
                import json
                first = next(line for line in r.text.splitlines() if line.startswith("data: {"))
                return json.loads(first[6:])["choices"][0]["delta"]["role"]
            return r.json()["choices"][0]["message"]["role"]
    assert asyncio.run(role()) == "bot"
    assert asyncio.run(role(add_generation_prompt=False)) == "user"


def test_reasoning_effort_reaches_a_trusted_request_template():
    """reasoning_effort is checked against the template that renders the prompt: a trusted
    request's own, which reads it, where the model's (R1's) does not."""
    client = serve("deepseek-r1", "Fine.", trust_request_chat_template=True)
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %} effort={{ reasoning_effort }}"
    asyncio.run(client.chat.completions.create(model="m", messages=HI, reasoning_effort="low",
                                               extra_body={"chat_template": own}))
    assert client.engine.prompts[-1] == "Hi effort=low"


@pytest.mark.parametrize("interval", [1, 4])
def test_stream_interval(interval):
    """vLLM's --stream-interval: the first token streams at once,
    then one chunk per `interval` tokens, then the rest as the request ends (vLLM's output
    processor rule); the text is the same."""
    script = "one two three four five six seven eight nine ten"
    client = serve("deepseek-r1-distill-llama-8b", script, stream_interval=interval)
    tokens = len(load_tokenizer("deepseek-r1-distill-llama-8b").encode(script, add_special_tokens=False)) + 1  # EOS

    async def chunks():
        got = []
        stream = await client.completions.create(model="m", prompt="Count:", stream=True)
        async for chunk in stream:
            got += [c.text for c in chunk.choices]
        return got
    got = asyncio.run(chunks())
    sent_at = [1] + list(range(1 + interval, tokens, interval)) + [tokens] if interval > 1 else list(range(1, tokens + 1))
    assert "".join(got) == script and len(got) == len(sorted(set(sent_at))), got


def test_skip_tokenizer_init():
    """vLLM's --skip-tokenizer-init (and LLM(skip_tokenizer_init=True)): no tokenizer, token-id
    prompts give the same tokens as with one, text prompts are refused naming the fix."""
    from deepserve import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=4)
    prompt = {"prompt_token_ids": [1, 403, 407, 261]}
    with LLM(DEMO_MODEL) as llm:
        expected = llm.generate(prompt, params)[0].outputs[0].token_ids
    with LLM(DEMO_MODEL, skip_tokenizer_init=True) as llm:
        assert llm.llm_engine.tokenizer is None
        assert llm.generate(prompt, params)[0].outputs[0].token_ids == expected
        with pytest.raises(ValueError, match="no tokenizer"):
            llm.generate("Once upon a time", params)


def partial_head(url: str, size: int, wait_s: float = 2.0) -> bytes:
    """What the server at `url` answers, within `wait_s`, to a request head of `size` bytes that
    never ends (b"": nothing, it waits for the rest)."""
    import socket
    import ssl
    import urllib.parse

    address = urllib.parse.urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=wait_s) as sock:
        if address.scheme == "https":
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size)
        try:
            return sock.recv(100)
        except TimeoutError:
            return b""


@pytest.fixture(scope="module")
def logged_server(tmp_path_factory):
    """One server for the uvicorn flags: --log-config-file sending uvicorn's access log to a
    file, and --h11-max-incomplete-event-size 16384; (server, the log file)."""
    import json

    from conftest import launch

    folder = tmp_path_factory.mktemp("logging")
    log = folder / "access.log"
    config = {"version": 1, "disable_existing_loggers": False,
              "formatters": {"plain": {"format": "%(message)s"}},
              "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log), "formatter": "plain"}},
              "loggers": {"uvicorn.access": {"handlers": ["file"], "level": "INFO", "propagate": False}}}
    path = folder / "logging.json"
    path.write_text(json.dumps(config))
    server = launch("--log-config-file", str(path), "--uvicorn-log-level", "info",
                    "--h11-max-incomplete-event-size", "16384")
    try:
        yield server, log
    finally:
        server.stop()


def test_h11_max_incomplete_event_size(logged_server):
    """vLLM's --h11-max-incomplete-event-size: a request head still incomplete past that many
    bytes is answered 400 and the connection closed; under it the server waits for the rest. Its
    default is vLLM's 4 MiB (test_ssl_flags_serve_https)."""
    server, _ = logged_server
    assert partial_head(server.url, 30_000, wait_s=60).startswith(b"HTTP/1.1 400")
    assert partial_head(server.url, 8_000) == b""


def test_log_config_file(logged_server, tmp_path):
    """vLLM's --log-config-file: its dictConfig is applied as the server starts (here uvicorn's
    access log goes to a file); a file that is no JSON object is one line."""
    import httpx
    from conftest import wait_for

    from deepserve.server.args import ServerArgs

    server, log = logged_server
    assert httpx.get(server.url + "/health").status_code == 200
    # the access line is written as the response ends, maybe after the client has read it
    wait_for(lambda: '"GET /health HTTP/1.1" 200' in log.read_text(), timeout=60)
    path = tmp_path / "logging.json"
    path.write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        ServerArgs(log_config_file=str(path))
    with pytest.raises(ValueError, match="No such file or directory"):
        ServerArgs(log_config_file=str(tmp_path / "none.json"))


def test_uds(tmp_path):
    """vLLM's --uds: the API answers on a unix socket, and the
    ready line names it; a socket file left by a server that has gone is replaced, a regular file
    at the path is refused."""
    import socket

    import httpx
    from conftest import launch

    from deepserve.cli.serve import bind_unix

    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()   # a socket file nothing listens on
    server = launch("--uds", str(path))
    try:
        assert server.url == f"http+unix:{path}"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://api") as http:
            assert http.get("/v1/models").json()["data"][0]["id"] == "stories260k"
        with pytest.raises(ValueError, match="a server answers there"):
            bind_unix(str(path))
    finally:
        server.stop()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file that is no socket is there"):
        bind_unix(str(tmp_path / "file"))


def test_fingerprint_flags(parser):
    """vLLM's --fingerprint-mode and --fingerprint-value set the server's options (the fingerprint
    itself: test_fingerprint.py)."""
    _, server, _ = resolve(parser.parse_args(["serve", DEMO_MODEL, "--fingerprint-mode", "custom",
                                              "--fingerprint-value", "fp_1"]))
    assert (server.fingerprint_mode, server.fingerprint_value) == ("custom", "fp_1")
    _, server, _ = resolve(parser.parse_args(["serve", DEMO_MODEL, "--fingerprint-mode", "hash"]))
    assert (server.fingerprint_mode, server.fingerprint_value) == ("hash", None)
    _, server, _ = resolve(parser.parse_args(["serve", DEMO_MODEL]))
    assert server.fingerprint_mode == "full"   # vLLM's default


@pytest.mark.parametrize("switch", ["--no-enable-lora", "--no-enable-sleep-mode", "--no-enable-eplb", "--no-tokens-only",
                                    "--no-enable-prompt-embeds", "--no-log-error-stack", "--no-enable-ssl-refresh",
                                    "--no-disable-nccl-for-dp-synchronization", "--no-disable-custom-all-reduce",
                                    "--no-disable-sliding-window", "--no-disable-cascade-attn",
                                    "--no-disable-hybrid-kv-cache-manager"])
def test_no_forms_of_refused_switches_pass(parser, switch):
    """vLLM's --no- form of a switch for a feature deepserve does not have asks for the feature
    off, as it is, or (--no-disable-...) for vLLM's default: accepted, with no effect."""
    plain = resolve(parser.parse_args(["serve", DEMO_MODEL]))
    assert resolve(parser.parse_args(["serve", switch, DEMO_MODEL])) == plain


@pytest.mark.parametrize("flag", ["--no-grpc", "--no-aggregate-engine-logging", "--no-lora-modules",
                                  "--no-data-parallel-multi-port-external-lb", "--no-hf-token", "--no-max-loras"])
def test_no_forms_vllm_does_not_have_stay_unknown(parser, flag, capsys):
    """vLLM declares these store_true or with a value (--hf-token's is optional): no --no- form
    there either."""
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", DEMO_MODEL, flag])
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, mode", [(["-cc", '{"cudagraph_mode": "PIECEWISE"}'], "PIECEWISE"),
                                         (['-cc={"cudagraph_mode": "NONE"}'], "NONE"),
                                         (["-cc.cudagraph_mode", "FULL_DECODE_ONLY"], "FULL_DECODE_ONLY"),
                                         (["-cc.cudagraph_mode=NONE", "-tp", "1"], "NONE")])
def test_short_cc_is_the_compilation_config(parser, flags, mode):
    """vLLM 0.26's -cc, its other short --compilation-config (arg_utils.py), dotted keys too."""
    from deepserve.cli.main import normalize_argv
    from deepserve.config import EngineArgs

    engine, _, _ = resolve(parser.parse_args(normalize_argv(["serve", DEMO_MODEL, *flags])))
    assert EngineArgs(**engine).cudagraph_mode == mode
