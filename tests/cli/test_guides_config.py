"""Every serving and bench command of the five deployment guides, read from the guides
themselves, parsed by deepserve's CLI into engine configs: sizes as the guides write them
(TP=32, 61 layers, 32768 tokens) on DeepSeek-R1's own config.json, so each flag's value must
land in the field of vLLM's meaning. Only the model path (and the guides' `$local_ip`) changes;
the speculative config is checked apart (the MTP layer and k it lands as)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from deepserve.cli.main import build_parser, main, normalize_argv
from deepserve.config import EngineArgs, SHORT_FLAGS, apply_compilation_config
from deepserve.config import pp_layer_range
from tests.cli.conftest import write_r1_config
from tests.cli.guides import commands, exports, set_flags, set_model, to_deepserve, yaml_blocks

NODE_IPS = {"--data-parallel-address": "127.0.0.1"}   # the guides' $local_ip / $node0_ip


@pytest.fixture(scope="module")
def r1_config(tmp_path_factory):
    return str(write_r1_config(tmp_path_factory.mktemp("guides") / "DeepSeek-R1"))


def guide(reference, name):
    return [to_deepserve(c) for c in commands(reference / name)]


def parse(argv):
    return build_parser().parse_args(normalize_argv(argv))


def serve_config(argv):
    from deepserve.cli.serve import resolve_all

    engine, server, envs, runner = resolve_all(parse(argv))
    return EngineArgs(**engine), server, envs, runner


def flag_values(argv: list[str]) -> dict[str, object]:
    """{EngineArgs field: the value the command line gives it}, read off the argv by the flag
    names alone: `--max-num-seqs=256` -> max_num_seqs 256, `--no-enable-prefix-caching` ->
    enable_prefix_caching False, `-tp 8` -> tensor_parallel_size 8."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(EngineArgs)
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    short = {v: k for k, v in SHORT_FLAGS.items()}
    out, i = {}, 0
    argv = normalize_argv(argv)
    while i < len(argv):
        key, sep, value = argv[i].partition("=")
        name = short.get(key) or key.lstrip("-").replace("-", "_")
        negated = name.startswith("no_") and name[3:] in fields
        name = name[3:] if negated else name
        i += 1
        if name not in fields or not key.startswith("-"):
            continue
        base = [a for a in typing.get_args(hints[name]) if a is not type(None)] or [hints[name]]
        if base[0] is bool:
            out[name] = not negated
            continue
        if not sep:
            value, i = argv[i], i + 1
        out[name] = json.loads(value) if base[0] is dict else base[0](value) if base[0] in (int, float) else value
    return out


def assert_flags_land(argv, engine_args: EngineArgs):
    for name, value in flag_values(argv).items():
        if name in ("model", "compilation_config", "quantization", "speculative_config"):
            continue  # checked apart: the path is replaced; these three are mapped
        assert getattr(engine_args, name) == value, f"{name}: {getattr(engine_args, name)!r} != {value!r}"


# --------------------------------------------------------------------------- the commands
def test_the_guides_have_the_commands_this_file_checks(reference):
    found = {name: [c[:2] for c in guide(reference, name)]
             for name in ("vastai-vacc.md", "ascend-300i-duo-mindspore.md", "vllm-ascend-w8a8.md",
                          "flagos-metax.md", "flagos-nvidia-h100.md")}
    assert found == {
        "vastai-vacc.md": [["serve", "/test/weights/DeepSeek-R1"], ["bench", "serve"], ["bench", "throughput"],
                           ["bench", "latency"]],
        "ascend-300i-duo-mindspore.md": [["serve", "/home/ckpt/deepseek_r1_671b"]],
        "vllm-ascend-w8a8.md": [["serve", "vllm-ascend/DeepSeek-R1-W8A8"]] * 3 + [["bench", "serve"]],
        "flagos-metax.md": [["serve", "deepseek_r1"], ["serve", "<MODEL_NAME>"], ["serve", "/nfs/deepseek_r1_BF16"]],
        "flagos-nvidia-h100.md": [["serve", "deepseek_r1"]]}


def test_mindspore_tp_pp_uneven(reference, r1_config, monkeypatch):
    partition = exports(reference / "ascend-300i-duo-mindspore.md")["VLLM_PP_LAYER_PARTITION"]
    assert partition == "31,30"
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition)
    (cmd,) = guide(reference, "ascend-300i-duo-mindspore.md")
    argv = set_model(cmd, r1_config)
    args, server, _, _ = serve_config(argv)
    assert_flags_land(argv, args)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.distributed_executor_backend) == (8, 2, "ray")
    assert (args.dtype, args.block_size, args.enable_prefix_caching, args.trust_remote_code) == \
        ("float16", 128, False, True)
    cfg = args.create_engine_config()
    assert (cfg.scheduler.max_model_len, cfg.scheduler.max_num_batched_tokens, cfg.cache.gpu_memory_utilization) == \
        (32768, 16384, 0.8)
    assert [pp_layer_range(61, 2, r) for r in (0, 1)] == [range(0, 31), range(31, 61)]
    assert server.host == "127.0.0.1"   # vllm-mindspore's default: no --host given


def test_bad_layer_partition_is_one_line(reference, r1_config, monkeypatch, capsys):
    (cmd,) = guide(reference, "ascend-300i-duo-mindspore.md")
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "31,31")
    assert main(set_model(cmd, r1_config) + ["--dry-run"]) == 2    # checked before any rank starts
    assert capsys.readouterr().err == "deepserve serve: error: VLLM_PP_LAYER_PARTITION=31,31 must give 2 stages " \
                                      "of >= 1 layer adding up to the model's 61 layers\n"
    # the guide's partition kept while serving on one stage: vLLM checks it there too
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "31,30")
    assert main(set_model(cmd, r1_config) + ["-pp", "1", "--dry-run"]) == 2
    assert capsys.readouterr().err == "deepserve serve: error: VLLM_PP_LAYER_PARTITION=31,30 must give 1 stage " \
                                      "of >= 1 layer adding up to the model's 61 layers\n"


def test_vastai_serve_and_bench_lines(reference, r1_config):
    serve, bench_serve, throughput, latency = guide(reference, "vastai-vacc.md")
    argv = set_model(serve, r1_config)
    args, server, _, _ = serve_config(argv)
    assert_flags_land(argv, args)
    assert (args.tensor_parallel_size, args.enforce_eager, args.trust_remote_code, args.max_model_len) == \
        (32, True, True, 32768)
    assert (server.reasoning_parser, server.enable_reasoning, server.host, server.port) == \
        ("deepseek_r1", True, "10.24.73.25", 8000)

    b = parse(set_model(bench_serve, r1_config))
    assert (b.endpoint, b.dataset_name, b.sonnet_input_len, b.sonnet_prefix_len, b.sonnet_output_len) == \
        ("/v1/chat/completions", "sonnet", 1024, 32, 1024)
    assert (b.num_prompts, b.max_concurrency, b.result_dir, b.result_filename, b.save_result, b.model) == \
        (100, 4, "/workspace/models/benchmark_result", "result.json", True, r1_config)

    for cmd, extra in ((throughput, {"dataset_name": "random", "num_prompts": 10, "input_len": 1000,
                                     "output_len": 1000}),
                       (latency, {"input_len": 1024, "output_len": 1024, "batch_size": 1, "num_iters": 10})):
        argv = set_model(cmd, r1_config)
        ns = parse(argv)
        engine_args = EngineArgs.from_cli_args(ns)
        assert_flags_land(argv[2:], engine_args)
        assert (engine_args.tensor_parallel_size, engine_args.enforce_eager, engine_args.trust_remote_code,
                engine_args.max_model_len) == (32, True, True, 16384)
        assert {k: getattr(ns, k) for k in extra} == extra


def test_metax_short_flags(reference, r1_config, monkeypatch):
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", exports(reference / "flagos-metax.md")["VLLM_PP_LAYER_PARTITION"])
    cmd = guide(reference, "flagos-metax.md")[2]
    argv = set_model(cmd, r1_config)
    args, _, _, _ = serve_config(argv)
    assert_flags_land(argv, args)
    assert (args.pipeline_parallel_size, args.tensor_parallel_size, args.dtype, args.swap_space) == (4, 8, "bfloat16", 16)
    args.create_engine_config()
    assert [len(pp_layer_range(61, 4, r)) for r in range(4)] == [16, 15, 15, 15]


def test_metax_partition_plans_four_stages(reference, r1_config, tmp_path, monkeypatch, capsys):
    """With the metax guide's env.sh sourced (VLLM_PP_LAYER_PARTITION=16,15,15,15), `deepserve
    plan` of its BF16 R1 (config.json without quantization_config) on 4 nodes of 8 x 64 GiB
    chooses among 4-stage layouts split 16,15,15,15 and names the others as what the variable
    refuses (serve would fail on them, as vLLM)."""
    cfg = json.loads((Path(r1_config) / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    partition = exports(reference / "flagos-metax.md")["VLLM_PP_LAYER_PARTITION"]
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition)
    assert main(["plan", str(tmp_path), "--gpus", "32", "--nodes", "4", "--gpu-memory", "64GiB",
                 "--max-model-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "  layers per stage    0-15, 16-30, 31-45, 46-60 " in out
    assert re.search(r"chosen     TP=\d+ PP=4 ", out)
    rows = [line.split() for line in out.splitlines() if line.startswith("  TP=") and "PP=*" not in line]
    assert {r[1] for r in rows} == {"PP=1", "PP=2", "PP=4", "PP=8", "PP=16", "PP=32"}
    for row in rows:
        refusal = f"VLLM_PP_LAYER_PARTITION={partition} gives 4 stages, not {row[1].replace('=', ' ')}"
        refused = " ".join(row[4:]).endswith(refusal)
        assert refused == (row[1] != "PP=4"), row

def test_vllm_ascend_dp_ep_async_compilation(reference, r1_config):
    (r1_dir := __import__("pathlib").Path(r1_config)).joinpath("quant_model_description.json").write_text("{}")
    try:
        for node, cmd in enumerate(guide(reference, "vllm-ascend-w8a8.md")[:3]):
            argv = set_flags(set_model(cmd, r1_config), NODE_IPS)
            args, server, _, _ = serve_config(argv)
            assert_flags_land(argv, args)
            assert (args.data_parallel_size, args.tensor_parallel_size, args.enable_expert_parallel,
                    args.async_scheduling, args.seed, args.served_model_name) == (4, 4, True, True, 1024, "deepseek_r1")
            assert args.quantization is None          # msModelSlim's format, loaded as stored
            assert args.cuda_graph_sizes == [4, 16, 32, 48, 64] and not args.enforce_eager
            assert (server.host, server.port) == ("0.0.0.0", 8000)
            if node:   # the two-node commands: node 0 serves DP ranks 0-1, node 1 (headless) 2-3
                assert (args.data_parallel_size_local, args.data_parallel_address, args.data_parallel_rpc_port,
                        args.data_parallel_start_rank, args.headless) == \
                    (2, "127.0.0.1", 13389, 2 if node == 2 else 0, node == 2)
            cfg = args.create_engine_config()
            assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens, cfg.cache.gpu_memory_utilization,
                    cfg.cuda_graph_sizes) == (16, 4096, 0.92, [4, 16, 32, 48, 64])
            assert (cfg.speculative.method, cfg.speculative.num_speculative_tokens) == ("mtp", 3)
    finally:
        r1_dir.joinpath("quant_model_description.json").unlink()
    with pytest.raises(ValueError, match=r"--quantization ascend loads msModelSlim checkpoints .* has none"):
        serve_config(set_model(guide(reference, "vllm-ascend-w8a8.md")[0], r1_config))

    b = parse(set_model(guide(reference, "vllm-ascend-w8a8.md")[3], r1_config))
    assert (b.dataset_name, b.random_input_len, b.num_prompts, b.request_rate, b.save_result, b.result_dir) == \
        ("random", 200, 200, 1.0, True, "./")


def test_speculative_config_lands(reference, r1_config, capsys):
    """The guide's MTP drafts (3 tokens) with its layout (DP4 x TP4 x EP, async scheduling)
    land as vLLM's: R1's MTP layer loaded, k = 3."""
    argv = set_flags(set_model(guide(reference, "vllm-ascend-w8a8.md")[0], r1_config), {"--quantization": None})
    assert main(argv + ["--dry-run"]) == 0, capsys.readouterr().err
    cfg = serve_config(argv)[0].create_engine_config()
    assert (cfg.speculative.method, cfg.speculative.num_speculative_tokens, cfg.model.load_mtp) == ("mtp", 3, True)
    assert (cfg.parallel.data_parallel_size, cfg.parallel.tensor_parallel_size, cfg.async_scheduling) == (4, 4, True)


# --------------------------------------------------------------------------- FlagScale YAML
# this machine is the first (tests set local_addresses to it): a loopback address is refused beside others
HEAD_IP = "10.0.0.1"
FOUR_HOSTS = "".join(f"{ip} slots=8 type=gpu\n" for ip in (HEAD_IP, "10.0.0.2", "10.0.0.3", "10.0.0.4"))


def flagscale_checkout(root, reference, r1_config, hosts=FOUR_HOSTS):
    """The h100 guide's three files where `flagscale serve deepseek_r1` looks for them (its
    hostfile's x.x.x.x lines filled in for the four machines it asks for)."""
    blocks = {b.split(":", 1)[0].split()[0]: b for b in yaml_blocks(reference / "flagos-nvidia-h100.md")}
    conf = root / "examples" / "deepseek_r1" / "conf"
    (conf / "serve").mkdir(parents=True)
    experiment = blocks["defaults"]
    assert "hostfile: examples/deepseek_r1/conf/hostfile.txt" in experiment
    (conf / "config_deepseek_r1.yaml").write_text(experiment)
    (conf / "serve" / "deepseek_r1.yaml").write_text(blocks["-"].replace("/nfs/deepseek_r1", r1_config))
    assert blocks["x.x.x.x"].count("x.x.x.x slots=8 type=gpu") == 2
    (conf / "hostfile.txt").write_text(hosts)
    return conf


def test_flagos_experiment_yaml(reference, r1_config, tmp_path, monkeypatch, capsys):
    flagscale_checkout(tmp_path, reference, r1_config)
    monkeypatch.chdir(tmp_path)
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "GLOO_SOCKET_IFNAME", "USE_FLAGGEMS"):
        monkeypatch.setenv(name, "")   # `serve` exports the file's envs: restored after the test
    (cmd,) = guide(reference, "flagos-nvidia-h100.md")
    assert cmd == ["serve", "deepseek_r1"]
    args, _, envs, runner = serve_config(cmd)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.gpu_memory_utilization, args.max_model_len,
            args.max_num_seqs, args.enforce_eager, args.trust_remote_code, args.enable_chunked_prefill) == \
        (8, 4, 0.9, 32768, 256, True, True, True)
    assert envs == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "GLOO_SOCKET_IFNAME": "bond0", "USE_FLAGGEMS": "1"}
    assert (runner.docker, runner.ssh_port, runner.hostfile) == \
        ("flagrelease_nv", 22, "examples/deepseek_r1/conf/hostfile.txt")
    assert runner.before_start.startswith("source /root/miniconda3/bin/activate flagscale-inference && export")
    monkeypatch.setattr("deepserve.distributed.cluster.local_addresses", lambda: {HEAD_IP})
    assert main(cmd + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    worker = next(line for line in out.splitlines() if "[10.0.0.2 worker]" in line and "ray start" in line)
    assert "docker exec flagrelease_nv bash -c" in worker and "export GLOO_SOCKET_IFNAME=bond0" in worker
    assert "USE_FLAGGEMS=1" in worker and "-p 22" in worker
    assert "pipeline_parallel_size=4" in out and "tensor_parallel_size=8" in out
    server_line = next(line for line in out.splitlines() if line.startswith("server: "))   # as without a hostfile
    assert "port=8000" in server_line and "api_key" not in server_line

    # Hydra's own groups in defaults steer Hydra, not the serve config: passed over
    experiment = tmp_path / "examples" / "deepseek_r1" / "conf" / "config_deepseek_r1.yaml"
    text = experiment.read_text()
    experiment.write_text(text.replace("  - serve: deepseek_r1\n", "  - serve: deepseek_r1\n  - override hydra/"
                                       "job_logging: disabled\n  - hydra/hydra_logging: disabled\n"))
    assert serve_config(cmd)[0].tensor_parallel_size == 8
    experiment.write_text(text)

    # a FlagScale experiment of another kind is refused, naming what it is
    experiment = tmp_path / "examples" / "deepseek_r1" / "conf" / "config_deepseek_r1.yaml"
    experiment.write_text(experiment.read_text().replace("- serve: deepseek_r1", "- train: deepseek_r1"))
    with pytest.raises(ValueError, match="defaults entry train: deepseek_r1 is not a serve config"):
        serve_config(cmd)
    experiment.write_text(experiment.read_text().replace("- train: deepseek_r1", "- serve: deepseek_r1")
                          .replace("type: serve", "type: train"))
    with pytest.raises(ValueError, match="experiment.task.type is 'train'; deepserve runs serve experiments only"):
        serve_config(cmd)

    # the metax guide's `flagscale serve <MODEL_NAME> <MODEL_CONFIG_YAML>`: the serve file alone
    usage = guide(reference, "flagos-metax.md")[1]
    assert usage == ["serve", "<MODEL_NAME>", "<MODEL_CONFIG_YAML>"]
    args, _, envs, runner = serve_config(["serve", "deepseek_r1", "examples/deepseek_r1/conf/serve/deepseek_r1.yaml"])
    assert (args.model, args.tensor_parallel_size, args.pipeline_parallel_size, envs, runner) == \
        (r1_config, 8, 4, {}, None)



def test_flagos_experiment_given_by_path_from_another_folder(reference, r1_config, tmp_path, monkeypatch):
    """The experiment file given by its path (from the home folder, or from conf/ itself) instead
    of `flagscale serve deepseek_r1` in the checkout: its `hostfile: examples/deepseek_r1/conf/
    hostfile.txt` (relative to the checkout) is found above the file; a `.YAML` name is a config file."""
    conf = flagscale_checkout(tmp_path / "FlagScale", reference, r1_config)
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "GLOO_SOCKET_IFNAME", "USE_FLAGGEMS"):
        monkeypatch.setenv(name, "")
    hostfile = conf / "hostfile.txt"
    (conf / "config_deepseek_r1.YAML").write_text((conf / "config_deepseek_r1.yaml").read_text())
    for cwd, argv in [(tmp_path, ["serve", str(conf / "config_deepseek_r1.yaml")]),
                      (conf, ["serve", "config_deepseek_r1.yaml"]),
                      (tmp_path, ["serve", "deepseek_r1", str(conf / "config_deepseek_r1.YAML")])]:
        monkeypatch.chdir(cwd)
        args, _, _, runner = serve_config(argv)
        assert (Path(runner.hostfile).resolve(), args.tensor_parallel_size) == (hostfile, 8), argv


def test_flagos_experiment_plans_on_its_hostfile(reference, r1_config, tmp_path, monkeypatch, capsys):
    """`deepserve plan deepseek_r1` in the checkout reads the experiment as `serve deepseek_r1`
    does: its model and max_model_len, and its hostfile's four hosts of 8 GPUs (TP8 x PP4's 32)."""
    flagscale_checkout(tmp_path, reference, r1_config)
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "deepseek_r1", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model      {r1_config} (DeepseekV3ForCausalLM")
    assert "GPUs       32 x 80.0 GiB in 4 node(s) of 8\n" in out and "max-model-len 32,768\n" in out
    assert main(["plan", "examples/deepseek_r1/conf/config_deepseek_r1.yaml", "--gpu-memory", "80GiB"]) == 0
    assert capsys.readouterr().out == out

def _serve_yaml(tmp_path, reference, r1_config, edit):
    """The h100 guide's serve/deepseek_r1.yaml, edited by `edit` (a function of its text)."""
    conf = flagscale_checkout(tmp_path, reference, r1_config)
    path = conf / "serve" / "deepseek_r1.yaml"
    path.write_text(edit(path.read_text()))
    return str(path)


@pytest.mark.parametrize("edit, values", [
    # FlagScale turns engine_args into `vllm serve` flags: a number written as a string is that number
    (lambda t: t.replace("tensor_parallel_size: 8", 'tensor_parallel_size: "8"')
     .replace("gpu_memory_utilization: 0.9", 'gpu_memory_utilization: "0.9"'), {"tensor_parallel_size": 8}),
    # FlagOS docs' `no_enable_prefix_caching: true` (-> --no-enable-prefix-caching)
    (lambda t: t + "    no_enable_prefix_caching: true\n    no_enable_chunked_prefill: true\n",
     {"enable_prefix_caching": False, "enable_chunked_prefill": False}),
    # vLLM's human-readable token counts (`--max-model-len 32k` on the flags FlagScale writes)
    (lambda t: t.replace("max_model_len: 32768", "max_model_len: 32k"), {"max_model_len": 32000}),
    (lambda t: t.replace("max_model_len: 32768", "max_model_len: auto"), {"max_model_len": -1}),   # vLLM's fit
    # FlagScale's per-engine block: vllm's args over the common ones
    (lambda t: t + "  engine_args_specific:\n    vllm:\n      tensor_parallel_size: 16\n      max_model_len: 4096\n",
     {"tensor_parallel_size": 16, "max_model_len": 4096}),
])
def test_flagscale_serve_yaml_values(reference, r1_config, tmp_path, edit, values):
    """Were: a traceback ("8": '<' between str and int), an unknown-key error, and (the
    engine_args_specific block) ignored without a word, serving TP=8."""
    args = serve_config(["serve", _serve_yaml(tmp_path, reference, r1_config, edit)])[0]
    assert {k: getattr(args, k) for k in values} == values
    assert args.gpu_memory_utilization == 0.9 and args.max_num_seqs == 256


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("enforce_eager: true", 'enforce_eager: "false"'),
     "engine_args.enforce_eager must be true or false, got 'false'"),     # was: eager, "false" being truthy
    (lambda t: t.replace("max_model_len: 32768", "max_model_len: 32q"), "expected an integer or one like 32k / 32K, got '32q'"),
    (lambda t: t.replace("max_num_seqs: 256", "max_num_seqs: 2.5e2"), "engine_args.max_num_seqs must be an integer, got '2.5e2'"),
    (lambda t: t.replace("tensor_parallel_size: 8", "tensor_parallel_size: true"),
     "engine_args.tensor_parallel_size must be an integer, got True"),
    (lambda t: t + "  model: /nfs/other\n", "unknown serve entry key 'model'"),            # was: ignored
    (lambda t: t + "  engine_args_specific:\n    sglang:\n      tp_size: 8\n", "engine_args_specific.sglang is for an engine"),
])
def test_flagscale_serve_yaml_bad_values_are_one_line(reference, r1_config, tmp_path, capsys, edit, message):
    path = _serve_yaml(tmp_path, reference, r1_config, edit)
    assert main(["serve", path, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_flagscale_resources_are_named_as_ignored(reference, r1_config, tmp_path, caplog):
    """FlagScale's `resources:` (Ray Serve's GPUs per replica) places nothing here: said, not dropped."""
    path = _serve_yaml(tmp_path, reference, r1_config, lambda t: t + "  resources:\n    num_gpus: 8\n")
    with caplog.at_level("WARNING", logger="deepserve"):
        assert serve_config(["serve", path])[0].tensor_parallel_size == 8
    assert "ignoring resources" in caplog.text


OLD_SERVE_FILE = """model_args:
  vllm_model:
    model-tag: MODEL # path of weight of deepseek r1
    tensor-parallel-size: 8
    pipeline-parallel-size: 4
    gpu-memory-utilization: 0.9
    max-num-seqs: 256
    port: 9010 # port to serve
    action-args:
      - trust-remote-code
      - enable-chunked-prefill
deploy:
  command_line_mode: True
  use_native_serve: False
"""


def test_flagscale_older_serve_file(reference, r1_config, tmp_path, monkeypatch, capsys):
    """FlagScale's serve/deepseek_r1.yaml as it stood until mid 2025 (the metax guide builds a
    pinned FlagScale commit), with its flags under model_args.vllm_model, not engine_args: read as well."""
    conf = flagscale_checkout(tmp_path, reference, r1_config)
    (conf / "serve" / "deepseek_r1.yaml").write_text(OLD_SERVE_FILE.replace("MODEL", r1_config))
    monkeypatch.chdir(tmp_path)
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "GLOO_SOCKET_IFNAME", "USE_FLAGGEMS"):
        monkeypatch.setenv(name, "")
    for argv in (["serve", "deepseek_r1"], ["serve", "deepseek_r1", "examples/deepseek_r1/conf/serve/deepseek_r1.yaml"]):
        args, server, _, _ = serve_config(argv)
        assert (args.model, args.tensor_parallel_size, args.pipeline_parallel_size, args.gpu_memory_utilization,
                args.max_num_seqs, args.trust_remote_code, args.enable_chunked_prefill, server.port) == \
            (r1_config, 8, 4, 0.9, 256, True, True, 9010)

    serve = conf / "serve" / "deepseek_r1.yaml"
    for text, message in [(OLD_SERVE_FILE.replace("  vllm_model:", "  second:\n    model-tag: x\n  vllm_model:"),
                           "model_args must hold one model (deepserve serves one), got ['second', 'vllm_model']"),
                          (OLD_SERVE_FILE + "  replicas: 2\n", "unknown deploy key 'replicas'")]:
        serve.write_text(text.replace("MODEL", r1_config))
        assert main(["serve", "deepseek_r1", "examples/deepseek_r1/conf/serve/deepseek_r1.yaml", "--dry-run"]) == 2
        assert message in capsys.readouterr().err


def test_flagscale_interpolations(reference, r1_config, tmp_path, monkeypatch, capsys):
    """FlagScale's YAML is OmegaConf's: FlagOS docs write `model: ${oc.env:MODEL_PATH}`; a key may
    name another (`${experiment.exp_name}`, as the guide's exp_dir does). Were: the text itself
    as the model path ("neither a folder nor a preset") and the port (a traceback)."""
    conf = flagscale_checkout(tmp_path, reference, r1_config)
    serve = conf / "serve" / "deepseek_r1.yaml"
    serve.write_text(serve.read_text().replace(r1_config, "${oc.env:R1_PATH}")
                     + "    port: ${oc.env:R1_PORT,9011}\n    served_model_name: ${experiment.exp_name}\n")
    monkeypatch.chdir(tmp_path)
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "GLOO_SOCKET_IFNAME", "USE_FLAGGEMS"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("R1_PATH", r1_config)
    monkeypatch.delenv("R1_PORT", raising=False)
    args, server, _, _ = serve_config(["serve", "deepseek_r1"])
    assert (args.model, server.port, args.served_model_name) == (r1_config, 9011, "deepseek_r1")
    monkeypatch.setenv("R1_PORT", "9012")
    assert serve_config(["serve", "deepseek_r1"])[1].port == 9012

    monkeypatch.delenv("R1_PATH")
    assert main(["serve", "deepseek_r1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model: ${oc.env:R1_PATH} does not resolve" in err, err


@pytest.mark.parametrize("text, value", [
    ("${a.n}", 8),                                   # a whole value keeps the key's type
    ("tp${a.n}-${oc.env:QA_X}", "tp8-x"),            # inside text: joined as text
    ("${oc.env:QA_UNSET,fallback}", "fallback"),
    ("${oc.env:QA_UNSET,null}", None),
    ("${b}", 8),                                     # a key that is itself an interpolation
    ("${now:%Y}/${HOME}", "${now:%Y}/${HOME}"),      # other resolvers, a shell's variable: as written
    ("\\${a.n}", "\\${a.n}"),                       # escaped
])
def test_interpolate(monkeypatch, text, value):
    from deepserve.server.flagscale_files import interpolate

    monkeypatch.setenv("QA_X", "x")
    monkeypatch.delenv("QA_UNSET", raising=False)
    root = {"a": {"n": 8}, "b": "${a.n}", "v": text}
    assert interpolate(root, root)["v"] == value

# --------------------------------------------------------------------------- the mappings
@pytest.mark.parametrize("config, sizes, eager", [
    ({"cudagraph_capture_sizes": [64, 4, 16], "cudagraph_mode": "FULL_DECODE_ONLY"}, [4, 16, 64], False),
    ({"cudagraph_mode": "NONE"}, [1, 2, 4, 8, 16, 32, 64, 128, 256, 320, 384, 448, 512], True),
    ({"cudagraph_mode": "full_and_piecewise", "max_cudagraph_capture_size": 16}, [1, 2, 4, 8, 16], False),
    ({"level": 3, "use_cudagraph": False}, [1, 2, 4, 8, 16, 32, 64, 128, 256, 320, 384, 448, 512], True),
    (3, [1, 2, 4, 8, 16, 32, 64, 128, 256, 320, 384, 448, 512], False)])
def test_compilation_config_maps_to_cuda_graphs(config, sizes, eager):
    args = EngineArgs(compilation_config=config)
    assert (args.cuda_graph_sizes, args.enforce_eager) == (sizes, eager)
    assert args.create_engine_config().cuda_graph_sizes == sizes


@pytest.mark.parametrize("config, message", [({"cudagraph_mode": "SOMETIMES"}, "cudagraph_mode must be one of"),
                                             ({"cudagraph_capture_sizes": [0]}, "positive integers"),
                                             ({"splitting_opz": []}, "key 'splitting_opz' is not one")])
def test_compilation_config_errors_name_the_value(config, message):
    with pytest.raises(ValueError, match=message):
        apply_compilation_config(EngineArgs(), config)


@pytest.mark.parametrize("config, agree", [({"cudagraph_mode": "full_decode_only"}, True),
                                           ({"cudagraph_mode": "PIECEWISE"}, False), ({"use_cudagraph": False}, False)])
def test_compilation_config_and_cudagraph_mode_flag_must_agree(config, agree):
    """Both given: the same mode is taken, different ones are refused (not one silently kept)."""
    if agree:
        assert EngineArgs(cudagraph_mode="FULL_DECODE_ONLY", compilation_config=config).cudagraph_mode == \
            "FULL_DECODE_ONLY"
        return
    with pytest.raises(ValueError, match="--cudagraph-mode FULL_DECODE_ONLY and compilation_config's "
                                         "cudagraph_mode .* disagree"):
        EngineArgs(cudagraph_mode="FULL_DECODE_ONLY", compilation_config=config)


def test_spellings():
    assert normalize_argv(["--pipeline_parallel_size=2", "--served-model-name", "deepseek_r1", "-tp", "2"]) == \
        ["--pipeline-parallel-size=2", "--served-model-name", "deepseek_r1", "-tp", "2"]
    ns = parse(shlex.split("bench serve --random-input 200 --random_output_len=7 --backend vllm --trust-remote-code"))
    assert (ns.random_input_len, ns.random_output_len, ns.backend, ns.trust_remote_code) == (200, 7, "vllm", True)
    ns = parse(shlex.split("serve M --served-model-name deepseek_r1 path/DeepSeek-R1-W8A8 -O 3"))
    assert (ns.served_model_name, ns.optimization_level) == ("deepseek_r1,path/DeepSeek-R1-W8A8", 3)
    ns = parse(shlex.split("serve -O '{\"cudagraph_mode\": \"NONE\"}' -dp 2"))
    assert (ns.compilation_config, ns.data_parallel_size) == ({"cudagraph_mode": "NONE"}, 2)


def test_enable_reasoning_needs_a_parser(capsys):
    assert main(["serve", "--enable-reasoning"]) == 2
    assert capsys.readouterr().err.strip() == \
        "deepserve serve: error: --enable-reasoning needs --reasoning-parser deepseek_r1 (as in vLLM)"


def test_trust_remote_code_says_so_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--trust-remote-code, --no-trust-remote-code Accepted for vLLM compatibility and changes nothing: " \
           "deepserve never executes code from a checkpoint" in help_text
