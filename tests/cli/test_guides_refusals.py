"""What a user copying the guides' commands meets when the machine or the model cannot run them
as written: one line naming what is needed, before any rank starts (no rank tracebacks, no
silent wait), and the FlagScale experiment's `deploy:` block honoured or refused."""
from __future__ import annotations

import json
import os

import pytest

from deepserve.cli.main import main
from deepserve.config import DEMO_MODEL, TRUST_REMOTE_CODE_NOTE, EngineArgs
from tests.cli.test_guides_config import HEAD_IP, flagscale_checkout, serve_config

TINY = {"num_attention_heads": 4, "n_routed_experts": 8, "num_hidden_layers": 3}


@pytest.fixture
def no_server(monkeypatch):
    """`deepserve serve` stops where it would start the engine: a check that has not failed by
    then failed to run."""
    def started(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr("deepserve.engine.fork_server.starts_early", lambda args: False)
    monkeypatch.setattr("deepserve.server.api_server.run_server", started)
    monkeypatch.setattr("deepserve.engine.engine_core.run_headless", started)
    for name in ("USE_FLAGGEMS", "DEEPSERVE_OPS", "TRITON_INTERPRET", "VLLM_PP_LAYER_PARTITION"):
        monkeypatch.delenv(name, raising=False)


def one_line_error(capsys, argv) -> str:
    """The error line of a command that fails (the notes on --trust-remote-code and --swap-space aside)."""
    from deepserve.cli.serve import SWAP_SPACE_NOTE

    assert main(argv) == 2
    err = capsys.readouterr().err
    for note in (TRUST_REMOTE_CODE_NOTE, SWAP_SPACE_NOTE):
        err = err.replace(note + "\n", "")
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["-tp", "32"], "num_attention_heads = 4 is not divisible by tensor_parallel_size = 32"),  # the vastai TP=32 line
    (["-pp", "4", "-tp", "1"], "pipeline_parallel_size 4 exceeds the model's 3 layers"),
    (["-dp", "3", "--enable-expert-parallel"], "n_routed_experts = 8 is not divisible by the expert-parallel size"),
    (["-tp", "4", "--hf-overrides", json.dumps({"moe_intermediate_size": 6})],
     "moe_intermediate_size = 6 is not divisible by tensor_parallel_size = 4"),
])
def test_layouts_the_model_cannot_split_fail_in_one_line(capsys, no_server, flags, message):
    """As vLLM's config check: before the fix every rank built the model and failed alike (31
    tracebacks for TP=32), or a stage without layers died in a collective."""
    overrides = dict(TINY)
    if "--hf-overrides" in flags:
        i = flags.index("--hf-overrides")
        overrides.update(json.loads(flags[i + 1]))
        flags = flags[:i] + flags[i + 2:]
    argv = ["serve", "deepseek-r1", "--hf-overrides", json.dumps(overrides)] + flags
    assert message in one_line_error(capsys, argv)
    # the same check in the engine config every entry point builds (LLM, bench, serve --dry-run)
    engine_args = serve_config(argv)[0]
    with pytest.raises(ValueError, match=message):
        engine_args.create_engine_config()


def test_gqa_kv_heads_must_split_or_replicate_evenly():
    base = dict(model="r1-distill-llama-8b", hf_overrides={"num_hidden_layers": 1})   # 32 heads, 8 KV heads
    for tp in (1, 2, 8, 16, 32):   # 8 KV heads split over <= 8 ranks, replicated over 16 or 32
        EngineArgs(**base, tensor_parallel_size=tp).create_engine_config()
    with pytest.raises(ValueError, match="num_key_value_heads = 6 is not divisible by tensor_parallel_size = 4"):
        EngineArgs(model="r1-distill-llama-8b", tensor_parallel_size=4,
                   hf_overrides={"num_key_value_heads": 6, "num_attention_heads": 24}).create_engine_config()


def test_flaggems_without_flag_gems_is_one_line(capsys, no_server, monkeypatch):
    """The FlagOS YAML exports USE_FLAGGEMS=1: without FlagGems installed every rank failed at
    load with a traceback."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flag_gems" else real(name, *a))
    monkeypatch.setenv("USE_FLAGGEMS", "1")
    err = one_line_error(capsys, ["serve", DEMO_MODEL, "--port", "0"])
    assert "needs FlagGems: pip install 'deepserve[flaggems]'" in err


def test_triton_ops_on_a_cpu_is_one_line(capsys, no_server):
    """Triton without a GPU driver failed in the rank with Triton's "0 active drivers"."""
    err = one_line_error(capsys, ["serve", DEMO_MODEL, "--device", "cpu", "--ops", "triton", "--port", "0"])
    assert "--ops triton runs Triton kernels, which need a GPU" in err and "TRITON_INTERPRET=1" in err


def test_ascend_quantization_of_a_hub_id_says_to_download_it(capsys, no_server, tmp_path, monkeypatch):
    """The vllm-ascend line serves `vllm-ascend/DeepSeek-R1-W8A8` (VLLM_USE_MODELSCOPE=True): the
    error says to fetch it, not to drop --quantization ascend."""
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["serve", "vllm-ascend/DeepSeek-R1-W8A8", "--quantization", "ascend",
                                  "--served-model-name", "deepseek_r1"])
    assert "neither a folder nor a preset" in err and "modelscope download --model ID" in err
    assert "drop the flag" not in err
    # a path left as a guide writes it is a missing folder, not a hub id to download
    for model in ("/nfs/deepseek_r1", "./DeepSeek-R1-W8A8"):
        err = one_line_error(capsys, ["serve", model, "--dry-run"])
        assert err.endswith(f"error: model '{model}': no such folder on this machine"), err


def test_flagscale_deploy_port_is_the_server_port(reference, tmp_path, monkeypatch):
    """FlagScale's experiment.deploy.port (the metax guide's "set ... server port") overrides the
    serve entry's engine_args.port; a flag given on the command line overrides both."""
    model = tmp_path / "DeepSeek-R1"
    model.mkdir()
    conf = flagscale_checkout(tmp_path, reference, str(model))
    experiment = conf / "config_deepseek_r1.yaml"
    text = experiment.read_text()
    assert "  deploy:\n    use_fs_serve: false\n" in text
    experiment.write_text(text.replace("    use_fs_serve: false\n", "    use_fs_serve: false\n    port: 9010\n"))
    serve = conf / "serve" / "deepseek_r1.yaml"
    serve.write_text(serve.read_text() + "    port: 8001\n")
    monkeypatch.chdir(tmp_path)
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "GLOO_SOCKET_IFNAME", "USE_FLAGGEMS"):
        monkeypatch.setenv(name, "")
    assert serve_config(["serve", "deepseek_r1"])[1].port == 9010
    assert serve_config(["serve", "deepseek_r1", "--port", "9020"])[1].port == 9020

    experiment.write_text(experiment.read_text().replace("    port: 9010\n", "    prefill_decode_disaggregation: true\n"))
    with pytest.raises(ValueError, match="prefill_decode_disaggregation is not supported"):
        serve_config(["serve", "deepseek_r1"])


class _SmallCluster:
    """What the Ray executors ask a cluster before placing anything: a 2-CPU machine's local Ray."""

    def cluster_resources(self):
        return {"CPU": 2.0, "memory": 1e10, "node:__internal_head__": 1.0}


@pytest.mark.parametrize("layout, actors", [(dict(tensor_parallel_size=2, pipeline_parallel_size=2), 3),
                                            (dict(tensor_parallel_size=2, data_parallel_size=2), 4)])
def test_ray_cluster_without_room_fails_at_once(monkeypatch, layout, actors):
    """The metax / MindSpore lines (`--distributed-executor-backend ray`) on a cluster with fewer
    CPUs (GPUs) than ranks: one line at once naming what is needed, not a silent wait of
    DEEPSERVE_WORKER_START_TIMEOUT (300 s) for room no node offers."""
    pytest.importorskip("ray")
    from deepserve.engine import ray_executor
    from deepserve.platforms import get_platform

    monkeypatch.setattr(ray_executor, "_join_ray", lambda: _SmallCluster())
    args = EngineArgs(model=DEMO_MODEL, device="cpu", distributed_executor_backend="ray", **layout)
    message = f"{actors} Ray actors take 1 CPU each, and the Ray cluster has 2 CPU in all"
    with pytest.raises(RuntimeError, match=message) as err:
        if args.data_parallel_size > 1:
            ray_executor.RayRanks(args)
        else:
            ray_executor.RayExecutor(args.create_engine_config(), get_platform("cpu"), set())
    assert "ray start --head --num-cpus N" in str(err.value)


@pytest.mark.parametrize("address, follows", [("127.0.0.1:6333", True), ("10.255.0.9:6379", False), (None, False)])
def test_ray_client_follows_the_local_heads_token(monkeypatch, address, follows):
    """`ray start --head` (the MindSpore guide) turns token authentication on where
    ~/.ray/auth_token exists, which Ray writes the first time any process starts a local
    instance; Ray then sends the token to a cluster it finds by itself, never to one named by
    RAY_ADDRESS (the FlagScale hostfile flow sets it), which refused the server over and over.
    For a head on this machine the client now runs Ray's own local-cluster check; a remote
    address, or none (Ray decides), is left to Ray."""
    pytest.importorskip("ray")
    import ray
    from ray._private.authentication import authentication_token_setup as auth

    from deepserve.engine import ray_executor

    calls = []
    monkeypatch.setattr(auth, "maybe_enable_token_auth_if_token_available", lambda **kw: calls.append("check"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw["address"])))
    monkeypatch.setattr(ray_executor, "check_cluster_answers", lambda: None)   # no cluster runs here
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_executor._join_ray()
    assert calls == (["check"] if follows else []) + [("init", address)]


def test_an_address_it_cannot_listen_on_fails_before_the_model_loads(capsys, no_server):
    """The vastai line's `--host 10.24.73.25 --port 8000` on another machine, or a port a server
    already holds: uvicorn failed after the whole model had loaded (minutes for R1), with exit
    code 3 and its own log line."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = one_line_error(capsys, ["serve", DEMO_MODEL, "--host", "127.0.0.1", "--port", str(port)])
    assert err.startswith(f"deepserve serve: error: cannot listen on 127.0.0.1:{port} (--host / --port): ")


def test_the_port_is_held_while_the_model_loads(monkeypatch):
    """A port free when serve started but taken during the load (another server started
    meanwhile: http.server and uvicorn bind with SO_REUSEADDR) failed after the load, with
    uvicorn's line and exit code 3: the address is bound before the load, no other server can
    bind it until the server listens on that same socket, and it is free again after."""
    import socket

    from deepserve.cli import serve
    from deepserve.server import api_server

    seen = {}
    bind_listen = serve.bind_listen

    def bound(*args):
        sock = bind_listen(*args)
        seen["port"] = sock.getsockname()[1]
        return sock

    def build_state(engine_args, server):   # where the model loads
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="in use"):
                other.bind(("127.0.0.1", seen["port"]))
        return "state"

    def serve_app(state, server, sock=None):
        seen["served"] = sock.getsockname()[1], bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
        return 0

    monkeypatch.setattr("deepserve.engine.fork_server.starts_early", lambda args: False)
    monkeypatch.setattr(api_server, "build_state", build_state)
    monkeypatch.setattr(api_server, "serve_app", serve_app)
    monkeypatch.setattr(serve, "bind_listen", bound)
    assert main(["serve", DEMO_MODEL, "--host", "127.0.0.1", "--port", "0"]) == 0
    # served on the socket bound before the load, which takes its port past old connections' TIME_WAIT
    assert seen["served"] == (seen["port"], True)
    with socket.socket() as again:
        again.bind(("127.0.0.1", seen["port"]))


def test_guide_variables_with_no_effect_are_named(capsys, no_server, monkeypatch):
    """The vllm-ascend scripts export VLLM_ASCEND_BALANCE_SCHEDULING and VLLM_USE_MODELSCOPE, the
    MindSpore one MINDFORMERS_MODEL_CONFIG (its model YAML): none changes what deepserve does, and
    serve says so (vLLM, too, warns about VLLM_* variables it does not know); the ones it reads
    are not named."""
    for name in [k for k in os.environ if k.startswith("VLLM_")]:
        monkeypatch.delenv(name)
    for name, value in {"VLLM_ASCEND_BALANCE_SCHEDULING": "1", "VLLM_USE_MODELSCOPE": "True",
                        "MINDFORMERS_MODEL_CONFIG": "/workspace/predict_deepseek_r1_671b_300iduo.yaml",
                        "VLLM_LOGGING_LEVEL": "DEBUG", "VLLM_PP_LAYER_PARTITION": "5"}.items():   # the demo's 5 layers
        monkeypatch.setenv(name, value)
    with pytest.raises(AssertionError, match="the server was started"):
        main(["serve", DEMO_MODEL, "--port", "0"])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "no effect" in x]
    assert line.startswith("deepserve: not read, no effect: MINDFORMERS_MODEL_CONFIG, VLLM_ASCEND_BALANCE_SCHEDULING, "
                           "VLLM_USE_MODELSCOPE (")



@pytest.mark.parametrize("also_right", [False, True])
def test_the_metax_gloo_variable_spelling_is_named(capsys, no_server, monkeypatch, also_right):
    """The metax guide's env.sh exports GLOO_SOCKET_IF_NAME, which nothing reads (torch's gloo reads
    GLOO_SOCKET_IFNAME): gloo then picked an interface itself, without a word, on a multi-node
    deployment where the guide says the interface matters."""
    monkeypatch.setenv("GLOO_SOCKET_IF_NAME", "ens20np0")
    if also_right:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ens20np0")
    else:
        monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    with pytest.raises(AssertionError, match="the server was started"):
        main(["serve", DEMO_MODEL, "--port", "0"])
    notes = [x for x in capsys.readouterr().err.splitlines() if "GLOO_SOCKET_IF_NAME" in x]
    assert notes == ([] if also_right else [
        "deepserve: GLOO_SOCKET_IF_NAME is read by nothing; torch's gloo reads GLOO_SOCKET_IFNAME, unset here, "
        "and picks an interface itself (export GLOO_SOCKET_IFNAME=ens20np0)"])

def test_flagscale_name_outside_the_checkout_says_where_it_looked(capsys, no_server, tmp_path, monkeypatch):
    """`flagscale serve deepseek_r1` (the FlagOS guides) typed where there is no FlagScale
    checkout: the error names the experiment file looked for and the preset meant, not only
    "neither a folder nor a preset"."""
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["serve", "deepseek_r1"])
    assert "(did you mean 'deepseek-r1'?)" in err
    assert f"examples/deepseek_r1/conf/config_deepseek_r1.yaml under {tmp_path}" in err


def test_hostfile_dry_run_checks_the_engine_args_against_the_model(reference, tmp_path, monkeypatch, capsys):
    """The FlagOS YAML with its hostfile: a max_model_len past the model's was planned as fine
    (and failed only once Ray ran on all four hosts); now the dry run, and the run before it starts
    Ray anywhere, check it as the one-machine path does."""
    from tests.cli.conftest import write_r1_config

    model = str(write_r1_config(tmp_path / "DeepSeek-R1"))
    conf = flagscale_checkout(tmp_path, reference, model)
    serve = conf / "serve" / "deepseek_r1.yaml"
    monkeypatch.chdir(tmp_path)
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "GLOO_SOCKET_IFNAME", "USE_FLAGGEMS"):
        monkeypatch.setenv(name, "")
    monkeypatch.setattr("deepserve.distributed.cluster.local_addresses", lambda: {HEAD_IP})
    assert main(["serve", "deepseek_r1", "--dry-run"]) == 0          # the guide's sizes fit R1
    capsys.readouterr()
    serve.write_text(serve.read_text().replace("max_model_len: 32768", "max_model_len: 200000"))
    err = one_line_error(capsys, ["serve", "deepseek_r1", "--dry-run"])
    assert "max_model_len 200000 exceeds the model's max_position_embeddings 163840" in err


@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["--headless", "--data-parallel-start-rank", "1"]])
def test_data_parallel_rpc_ports_past_65535_are_one_line(capsys, no_server, extra):
    """The vllm-ascend two-node lines with --data-parallel-rpc-port 70000 (a digit too many): the
    OS took it as port 4464, so the check passed, and rank 0's ZeroMQ refused it after the load
    ("Port out of range"); `--dry-run` said nothing."""
    argv = ["serve", DEMO_MODEL, "--data-parallel-size", "2", "--data-parallel-size-local", "1",
            "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", "70000", "--port", "0", *extra]
    err = one_line_error(capsys, argv)
    assert err == ("deepserve serve: error: --data-parallel-rpc-port 70000: multi-node data parallel uses ports "
                   "70000-70003, which must lie in [1, 65535]"), err


def test_hostfile_serve_refuses_a_model_missing_here_before_any_host(reference, tmp_path, monkeypatch, capsys):
    """The FlagOS YAML with its hostfile and `model: /nfs/deepseek_r1` not on this machine: Ray
    started on every host (minutes on four) before rank 0, here, found no folder."""
    conf = flagscale_checkout(tmp_path, reference, "/nfs/no-such-deepseek_r1")
    monkeypatch.chdir(tmp_path)
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "GLOO_SOCKET_IFNAME", "USE_FLAGGEMS"):
        monkeypatch.setenv(name, "")
    monkeypatch.setattr("deepserve.distributed.cluster.local_addresses", lambda: {HEAD_IP})
    monkeypatch.setattr("deepserve.distributed.cluster.ClusterLauncher.start",
                        lambda self: pytest.fail("Ray was started on the hosts"))
    assert (conf / "hostfile.txt").is_file()
    err = one_line_error(capsys, ["serve", "deepseek_r1", "--port", "0"])
    assert err == "deepserve serve: error: model '/nfs/no-such-deepseek_r1': no such folder on this machine", err
    # so are the guide's GLOO_SOCKET_IFNAME=bond0 where this machine has no bond0, and USE_FLAGGEMS=1
    # without FlagGems (here: a CPU): each rank found them after Ray had started on every host
    import importlib.util

    from tests.cli.conftest import write_r1_config

    serve = conf / "serve" / "deepseek_r1.yaml"
    model = str(write_r1_config(tmp_path / "DeepSeek-R1"))
    serve.write_text(serve.read_text().replace("/nfs/no-such-deepseek_r1", model))
    monkeypatch.setattr("socket.if_nameindex", lambda: [(1, "lo"), (2, "eth0")])
    assert "this machine has no network interface bond0" in one_line_error(
        capsys, ["serve", "deepseek_r1", "--ops", "torch"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flag_gems" else real(name, *a))
    assert "--ops flaggems (or USE_FLAGGEMS=1) needs FlagGems" in one_line_error(capsys, ["serve", "deepseek_r1"])


def test_node0_data_parallel_address_must_be_its_own(capsys, no_server):
    """The vllm-ascend node 0 script with its `local_ip` unfilled or another node's address: the
    engine cores' ZeroMQ bind failed with a traceback (exit code 1) after the model loaded."""
    flags = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-rpc-port", "13389",
             "--enable-expert-parallel", "--port", "0"]
    err = one_line_error(capsys, ["serve", DEMO_MODEL, "--data-parallel-address", "203.0.113.254"] + flags)
    assert err.startswith("deepserve serve: error: cannot listen on 203.0.113.254 (--data-parallel-address: this node's")


@pytest.mark.parametrize("argv", [
    ["generate", "--model", DEMO_MODEL, "--prompt", "Once", "--max-tokens", "2", "--ops", "triton-all"],
    ["bench", "latency", "--model", DEMO_MODEL, "--ops", "flaggems", "--input-len", "4", "--output-len", "2"],
])
def test_triton_ops_on_a_cpu_is_one_line_offline(capsys, monkeypatch, argv):
    """The offline commands build the engine in this process: the same one line from the model
    runner, not Triton's "0 active drivers" at the first launch."""
    import importlib.util

    real = importlib.util.find_spec       # (flaggems: as if installed, so the CPU check is the one seen)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flag_gems" else real(name, *a))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = one_line_error(capsys, argv)
    assert f"--ops {argv[argv.index('--ops') + 1]} runs Triton kernels, which need a GPU" in err


def test_a_kv_budget_under_one_block_is_one_line(capsys):
    """--kv-cache-memory-bytes under one block's bytes: one line naming the flag to raise (was a
    RuntimeError advising --gpu-memory-utilization, a traceback from each rank)."""
    err = one_line_error(capsys, ["generate", "--model", DEMO_MODEL, "--prompt", "Once", "--max-tokens", "2",
                                  "--kv-cache-memory-bytes", "1000"])
    assert "no room for one KV block" in err and "raise --kv-cache-memory-bytes" in err


@pytest.fixture
def r1_fp8(tmp_path):
    """DeepSeek-R1's config.json (the FP8 release: 128x128 weight blocks) and a weights file."""
    from tests.cli.conftest import write_r1_config

    return str(write_r1_config(tmp_path / "DeepSeek-R1"))


def test_vastai_tp32_on_the_fp8_release_is_one_line_before_any_rank(reference, r1_fp8, capsys, no_server,
                                                                     monkeypatch):
    """The vastai lines (TP=32) on R1 as released: 18432 / 32 = 576 input features per rank of a
    dense down projection is not whole 128-wide scale blocks. Every one of the 32 ranks started,
    built its part of the model and failed alike (on a CPU, 32 processes of 21 GB each); `serve
    --dry-run` passed it."""
    from tests.cli.guide_runs import guide
    from tests.cli.guides import set_flags, set_model

    serve, _, throughput, latency = guide(reference, "vastai-vacc.md")
    message = "fp8: row-parallel layer with 576 local input features per rank is not a multiple of the " \
              "128-wide scale block; use a tensor-parallel size that divides 144"
    serve = set_flags(set_model(serve, r1_fp8), {"--host": "127.0.0.1", "--port": 0})
    for argv in (serve, serve + ["--dry-run"]):
        assert message in one_line_error(capsys, argv)

    def started(*args, **kwargs):
        raise AssertionError("the engine was started")
    for cmd in (latency, throughput):
        monkeypatch.setattr(f"deepserve.bench.offline.run_{cmd[1]}", started)
        assert message in one_line_error(capsys, set_model(cmd, r1_fp8))
    # a size that keeps whole blocks (18432 / 16 = 9 x 128; 2048 / 16 = 128 per expert) plans
    assert main(set_flags(serve, {"--tensor-parallel-size": 16}) + ["--dry-run"]) == 0


@pytest.mark.parametrize("weights", ["none", "shard missing"])
def test_a_folder_without_its_weights_is_one_line_before_any_rank(r1_fp8, capsys, no_server, monkeypatch, weights):
    """A config.json without weights (the wrong folder, a download cut short): each rank failed at
    load with a FileNotFoundError traceback; `serve --dry-run` passed it."""
    from pathlib import Path

    folder = Path(r1_fp8)
    (folder / "model.safetensors").unlink()
    if weights == "shard missing":
        (folder / "model-00001-of-00002.safetensors").touch()
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    message = ("no *.safetensors files in" if weights == "none" else
               "model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing")
    for extra in ([], ["--dry-run"]):
        assert message in one_line_error(capsys, ["serve", r1_fp8, "-tp", "8", "--port", "0"] + extra)
    # the offline commands, the same check before their engine starts
    monkeypatch.setattr("deepserve.engine.llm_engine.LLMEngine", no_server_started)
    monkeypatch.setattr("deepserve.bench.offline.run_throughput", no_server_started)
    for argv in (["generate", "--prompt", "Once"], ["chat"], ["bench", "throughput"]):
        assert message in one_line_error(capsys, argv + ["--model", r1_fp8, "-tp", "8"])



def test_more_ranks_than_this_machines_gpus_is_one_line(reference, r1_fp8, capsys, no_server, monkeypatch):
    """The metax line (-pp 4 -tp 8: 32 ranks) on one 8-GPU machine without its
    `--distributed-executor-backend ray`: ranks 8-31 failed in CUDA's "invalid device ordinal"
    after the first eight had started. Over Ray the cluster places the ranks: not checked here."""
    import torch

    from deepserve.platforms.interface import CudaPlatform
    from tests.cli.guide_runs import guide
    from tests.cli.guides import set_flags, set_model

    monkeypatch.setattr("deepserve.platforms.get_platform", lambda name="auto": CudaPlatform())
    monkeypatch.setattr("deepserve.ops.registry.check_backend_runs_on", lambda platform, ops: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    (_, _, metax) = guide(reference, "flagos-metax.md")
    metax = set_model(metax, r1_fp8) + ["--port", "0"]
    assert metax[metax.index("--distributed-executor-backend") + 1] == "ray"
    local = set_flags(metax, {"--distributed-executor-backend": None})
    message = ("tensor_parallel_size 8 x pipeline_parallel_size 4 x 1 local data-parallel rank(s) = 32 GPUs on this "
               "machine, which has 8 (CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7): use --distributed-executor-backend ray")
    for argv in (local, local + ["--dry-run"]):
        assert message in one_line_error(capsys, argv)
    monkeypatch.setattr("deepserve.bench.offline.run_latency", no_server_started)
    assert message in one_line_error(capsys, ["bench", "latency", "--model", r1_fp8, "-tp", "8", "-pp", "4"])
    assert main(set_flags(local, {"-tp": 4, "-pp": 2}) + ["--dry-run"]) == 0
    with pytest.raises(AssertionError, match="the server was started"):
        main(metax)   # over Ray: past the check


def no_server_started(*args, **kwargs):
    raise AssertionError("the engine was started")



@pytest.mark.parametrize("given", [True, False])
def test_metax_swap_space_is_named_as_unused(capsys, no_server, given):
    """The metax line's --swap-space 16 reserves nothing (preemption recomputes, as vLLM V1): said in
    one line where it is given, as --trust-remote-code is, not dropped without a word."""
    from deepserve.cli.serve import SWAP_SPACE_NOTE

    argv = ["serve", DEMO_MODEL, "--port", "0"] + (["--swap-space", "16"] if given else [])
    with pytest.raises(AssertionError, match="the server was started"):
        main(argv)
    assert (SWAP_SPACE_NOTE in capsys.readouterr().err) == given

def test_bf16_weights_under_an_fp8_config_are_named(tiny_r1, tmp_path, capsys, no_server):
    """The metax guide removes quantization_config from a BF16 release's config.json; left in (as
    DeepSeek's fp8-to-bf16 script leaves it), the 16-bit weights were quantized to fp8 at load
    without a word, and the answers changed. A checkpoint with its fp8 scales is not named."""
    import shutil

    bf16 = tmp_path / "DeepSeek-R1-BF16"
    shutil.copytree(tiny_r1, bf16)
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (bf16 / "config.json").write_text(json.dumps(config))
    fp8 = tmp_path / "DeepSeek-R1-FP8"   # the FP8 release as its index lists it (shards not read)
    fp8.mkdir()
    shutil.copy(bf16 / "config.json", fp8 / "config.json")
    (fp8 / "model-00001-of-00001.safetensors").touch()
    weight_map = {name: "model-00001-of-00001.safetensors" for name in
                  ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight_scale_inv")}
    (fp8 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder, flags, named in [(bf16, [], True), (bf16, ["--quantization", "fp8"], False), (fp8, [], False)]:
        assert main(["serve", str(folder), "--dry-run"] + flags) == 0
        err = capsys.readouterr().err
        assert ("declares fp8 weights (quantization_config), but the checkpoint holds no weight scales" in err) == named


def test_flagos_experiment_on_one_machine_dry_run_checks_the_ops_backend(reference, r1_fp8, tmp_path, capsys,
                                                                         no_server, monkeypatch):
    """The h100 experiment exports USE_FLAGGEMS=1 in its before_start; served on one machine (no
    hostfile) where FlagGems cannot run, `serve` refuses it in one line, and `serve --dry-run`
    said nothing and exited 0."""
    import importlib.util

    from tests.cli.test_guides_config import flagscale_checkout

    conf = flagscale_checkout(tmp_path, reference, r1_fp8)
    experiment = conf / "config_deepseek_r1.yaml"
    text = experiment.read_text()
    assert "export USE_FLAGGEMS=1" in text
    experiment.write_text(text.replace("hostfile: examples/deepseek_r1/conf/hostfile.txt", "hostfile: null"))
    monkeypatch.chdir(tmp_path)
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "GLOO_SOCKET_IFNAME", "USE_FLAGGEMS"):
        monkeypatch.setenv(name, "")   # `serve` exports the file's envs: restored after the test
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flag_gems" else real(name, *a))
    for argv in (["serve", "deepseek_r1", "--port", "0"], ["serve", "deepseek_r1", "--dry-run"]):
        assert "--ops flaggems (or USE_FLAGGEMS=1) needs FlagGems" in one_line_error(capsys, argv)


def test_the_mindformers_model_yaml_given_to_serve_names_what_it_is(reference, tmp_path, capsys, no_server):
    """The 300I Duo guide's MindFormers YAML (MINDFORMERS_MODEL_CONFIG) passed to `serve`, alone
    or after the model: it said only "no 'engine_args:' mapping found"."""
    text = (reference / "ascend-300i-duo-mindspore.md").read_text()
    # the block runs to the guide's last fence (its chat template holds a ```json of its own)
    block = text[text.index("```yaml\n") + len("```yaml\n"):text.rindex("```")]
    assert "model_config:" in block and "run_mode: 'predict'" in block
    path = tmp_path / "predict_deepseek_r1_671b_300iduo.yaml"
    path.write_text(block)
    for argv in (["serve", str(path)], ["serve", DEMO_MODEL, str(path)]):
        err = one_line_error(capsys, argv + ["--dry-run"])
        assert "is a MindFormers model config (vLLM-MindSpore's MINDFORMERS_MODEL_CONFIG)" in err


def test_headless_node_with_an_unfilled_node0_address_is_one_line(reference, capsys, no_server, monkeypatch):
    """The vllm-ascend node-1 script run as pasted (node0_ip="xxxx"): the headless node's DP
    ranks retried c10d's connection to 'xxxx' every few seconds for ever, saying only torch's
    warning. Node 0's own line already refused its unfilled $local_ip in one line."""
    from tests.cli.guide_runs import guide
    from tests.cli.guides import set_flags, set_model

    _, _, node1, _ = guide(reference, "vllm-ascend-w8a8.md")
    assert node1[node1.index("--data-parallel-address") + 1] == "$node0_ip"
    node1 = set_flags(set_model(node1, "deepseek-r1"), {
        "--data-parallel-address": "xxxx", "--data-parallel-size": 2, "--data-parallel-size-local": 1,
        "--data-parallel-start-rank": 1, "--tensor-parallel-size": 1, "--quantization": None,
        "--speculative-config": None})
    node1 += ["--load-format", "dummy", "--hf-overrides", json.dumps(TINY), "--port", "0"]
    err = one_line_error(capsys, node1)
    assert "cannot reach 'xxxx' (--data-parallel-address: node 0's address" in err and "does not resolve" in err


def test_headless_node_logs_at_the_servers_level(capsys, no_server, monkeypatch):
    """The vllm-ascend node-1 line (`--headless`): its process set up no logging, so it showed
    no line of its own (its ranks, or waiting for node 0) and its engine cores none of theirs,
    while node 0 showed both."""
    seen = {}
    monkeypatch.setattr("deepserve.server.api_server.set_up_logging", lambda level: seen.setdefault("level", level))
    monkeypatch.delenv("DEEPSERVE_LOG_LEVEL", raising=False)

    def run_headless(args):
        seen["cores"] = os.environ.get("DEEPSERVE_LOG_LEVEL")   # what the engine cores it starts read
        return 0
    monkeypatch.setattr("deepserve.engine.engine_core.run_headless", run_headless)
    argv = ["serve", "deepseek-r1", "--load-format", "dummy", "--hf-overrides", json.dumps(TINY), "--headless",
            "--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-start-rank", "1",
            "--data-parallel-address", "127.0.0.1", "--port", "0"]
    assert main(argv + ["--log-level", "debug"]) == 0
    assert seen == {"level": "debug", "cores": "debug"}


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_swap_space_is_refused(capsys, no_server, value):
    """The metax line's --swap-space (GiB, unused here) with a value vLLM refuses: it passed."""
    err = one_line_error(capsys, ["serve", DEMO_MODEL, "--swap-space", value, "--dry-run"])
    assert err == f"deepserve serve: error: swap_space must be >= 0 (GiB), got {float(value)}"
