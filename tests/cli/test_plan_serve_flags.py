"""`deepserve plan`'s printed serve flags run the plan it printed: `serve MODEL <flags>` without
parallel sizes plans the same layout and tokens (the weights' format, dtype, context, memory
fraction, KV cache dtype, config overrides and MTP layer included); a serve YAML given as MODEL
is planned with every engine arg that changes the count; MTP drafting takes no pipeline stages,
as serve refuses them; what a refusal says would fit is counted with the same KV cache dtype."""
from __future__ import annotations

import json
import re
import shlex

import pytest

from deepserve.cli.main import build_parser, main
from deepserve.cli.plan import weights_format
from deepserve.cli.serve import resolve
from deepserve.config import EngineArgs, SpeculativeConfig, load_hf_config, speculative_not_yet
from deepserve.distributed.cluster import PARALLEL_KEYS, ClusterLauncher, RunnerOptions, parse_hostfile
from deepserve.distributed.cluster_serve import auto_plan, cluster_engine_args
from deepserve.distributed.plan import GiB, evaluate_plans, parse_size


def _plan(capsys, argv) -> str:
    assert main(["plan", *argv]) == 0
    return capsys.readouterr().out


def _line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(name)).split(name, 1)[1].strip()


@pytest.mark.parametrize("argv", [
    # R1 on 2 nodes of 8 x H100 as the guides run it: fp8 weights and KV, MTP drafting, 32k context
    ["deepseek-r1", "--gpus", "16", "--nodes", "2", "--gpu-memory", "80GiB", "--quantization", "fp8",
     "--max-model-len", "32k", "--kv-cache-dtype", "fp8", "--include-mtp", "--gpu-memory-utilization", "0.92"],
    # a distill in random 4-bit weights (serve's compressed-tensors), fp16
    ["r1-distill-qwen-7b", "--gpus", "2", "--gpu-memory", "24GiB", "--quantization", "w4a16", "--dtype", "float16",
     "--max-model-len", "16384"],
    # int8 weights on 4 x 64 GiB cards, a context past the config's through --hf-overrides
    ["r1-distill-llama-8b", "--gpus", "4", "--gpu-memory", "64GiB", "--quantization", "w8a8-int8",
     "--hf-overrides", '{"max_position_embeddings": 200000}'],
])
def test_serve_with_the_printed_flags_plans_what_the_plan_printed(capsys, argv):
    out = _plan(capsys, argv)
    flags = shlex.split(_line(out, "serve flags"))
    engine, _, _ = resolve(build_parser().parse_args(["serve", argv[0], *flags]))
    gpus, nodes = int(argv[argv.index("--gpus") + 1]), int(argv[argv.index("--nodes") + 1]) if "--nodes" in argv else 1
    # serve's automatic plan (no parallel sizes given) over the same GPUs, with every other flag printed
    unsized = {k: v for k, v in engine.items() if k not in PARALLEL_KEYS}
    plan = auto_plan(unsized, gpus, parse_size(argv[argv.index("--gpu-memory") + 1]), nodes, weights_format)
    assert _line(out, "chosen").startswith(str(plan.chosen.layout))
    assert _line(out, "concurrent tokens").startswith(f"{plan.chosen.tokens:,} ")
    assert _line(out, "weights per GPU").startswith(f"{plan.chosen.weight_bytes / GiB:.1f} GiB")
    assert {k: engine.get(k, False) for k in plan.parallel_args()} == plan.parallel_args()


def test_mtp_drafting_takes_no_pipeline_stages():
    """serve refuses speculative_config method mtp with PP > 1: R1 on 2 nodes of 8 x 80 GiB plans
    TP=1 PP=2 DP=8 without the MTP layer, and a layout of one stage with it."""
    cfg = load_hf_config("deepseek-r1")
    kw = dict(quantization="fp8", max_model_len=32768)
    assert evaluate_plans(cfg, 16, 80 * GiB, 2, **kw).chosen.layout.pp == 2
    plan = evaluate_plans(cfg, 16, 80 * GiB, 2, include_mtp=True, **kw)
    assert plan.chosen is not None and plan.chosen.layout.pp == 1
    staged = [c for c in plan.candidates if c.layout.pp > 1]
    assert staged and all("MTP drafting" in c.reason and not c.weight_bytes for c in staged)
    args = EngineArgs(model="deepseek-r1", load_format="dummy", pipeline_parallel_size=2)
    assert speculative_not_yet(args, SpeculativeConfig(method="mtp").for_model(cfg)) is not None


def test_serves_automatic_plan_counts_the_kv_cache_dtype():
    """8 x 96 GiB hold R1's fp8 weights with a 64k context only with an fp8 KV cache: serve's
    automatic plan counts the cache in the kv_cache_dtype asked for, as `deepserve plan
    --kv-cache-dtype fp8` does."""
    kwargs = {"model": "deepseek-r1", "quantization": "fp8", "max_model_len": 64000}
    with pytest.raises(ValueError, match="no layout of 8 x 96 GiB GPUs fits"):
        auto_plan(kwargs, 8, 96 * GiB, 1, weights_format)
    plan = auto_plan(dict(kwargs, kv_cache_dtype="fp8"), 8, 96 * GiB, 1, weights_format)
    assert plan.kv_dtype_bytes == 1 and plan.chosen.tokens_per_replica >= 64000


def test_a_serve_yaml_plans_with_its_weights_dtype_and_mtp(tmp_path, capsys):
    """The YAML's quantization, dtype, hf_overrides and speculative_config are what serve runs,
    so the plan counts them (this file's R1 in fp8, float16 elsewhere, with its MTP layer) beside
    its max_model_len, kv_cache_dtype and gpu_memory_utilization."""
    path = tmp_path / "serve.yaml"
    path.write_text("engine_args:\n  model: deepseek-r1\n  quantization: fp8\n  dtype: float16\n"
                    "  max_model_len: 32768\n  hf_overrides: {rope_theta: 10000}\n"
                    "  speculative_config: {method: mtp, num_speculative_tokens: 2}\n")
    out = _plan(capsys, [str(path), "--gpus", "16", "--nodes", "2", "--gpu-memory", "80GiB"])
    assert "13.5B MTP loaded" in out and "weights    fp8 (128x128 blocks) Linear weights, the rest float16" in out
    assert re.search(r"chosen     TP=\d+ PP=1 ", out)
    flags = _line(out, "serve flags")
    assert "--quantization fp8 --dtype float16 --max-model-len 32768" in flags
    # the file's own drafting settings (a bare {"method": "mtp"} flag would replace them: k = 1)
    assert flags.endswith("--hf-overrides '{\"rope_theta\": 10000}' "
                          "--speculative-config '{\"method\": \"mtp\", \"num_speculative_tokens\": 2}'")
    # flags given on the command line win over the file
    out = _plan(capsys, [str(path), "--gpus", "16", "--nodes", "2", "--gpu-memory", "141GiB", "--quantization",
                         "none", "--dtype", "bfloat16"])
    assert "weights    bfloat16; KV cache bfloat16" in out


def test_hf_overrides_as_serve_takes_them(capsys):
    """The context past max_position_embeddings is refused naming --hf-overrides, which the plan
    takes as serve does (JSON text; bad JSON in one line)."""
    argv = ["r1-distill-llama-8b", "--gpus", "1", "--gpu-memory", "80GiB", "--kv-cache-dtype", "fp8"]
    assert main(["plan", *argv, "--max-model-len", "200k"]) == 2
    assert "--hf-overrides" in capsys.readouterr().err
    out = _plan(capsys, [*argv, "--max-model-len", "200k", "--hf-overrides", json.dumps({"max_position_embeddings": 200000})])
    assert "max-model-len 200,000\n" in out
    assert main(["plan", *argv, "--hf-overrides", "{max"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf_overrides is not valid JSON: '{max'" in err


def test_what_would_fit_is_counted_with_the_kv_cache_dtype_asked_for():
    """R1 in bf16 on 8 x 96 GiB with a 64k context and an fp8 KV cache: the refusal suggests fp8
    weights on the same GPUs and 2 nodes, each with the layout and tokens its own plan gives with
    that fp8 cache."""
    cfg = load_hf_config("deepseek-r1")
    kw = dict(max_model_len=64000, kv_cache_dtype="fp8")
    plan = evaluate_plans(cfg, 8, 96 * GiB, **kw)
    assert plan.chosen is None
    fp8 = evaluate_plans(cfg, 8, 96 * GiB, quantization="fp8", **kw).chosen
    nodes = evaluate_plans(cfg, 16, 96 * GiB, 2, **kw).chosen
    assert plan.suggestions == [
        f"--quantization fp8 on the same 8 GPUs ({fp8.layout}, {fp8.tokens:,} KV tokens)",
        f"16 x 96 GiB GPUs in 2 nodes of 8 in bfloat16 ({nodes.layout}, {nodes.tokens:,} KV tokens)"]


def _sizes(line: str) -> dict:
    return {k: v for k, _, v in (part.partition("=") for part in line.split()) if k in PARALLEL_KEYS}


def test_a_hostfile_plans_its_slots_as_serve_does(tmp_path, capsys, monkeypatch):
    """`plan --hostfile` (or a serve YAML's hostfile with runner.gpu_memory) counts the GPU hosts'
    slots on as many nodes, a CPU host adding none, and chooses the sizes `serve --hostfile
    --dry-run` deploys; --gpus or --nodes against the file are refused in one line."""
    monkeypatch.setattr("deepserve.distributed.cluster.local_addresses", lambda: {"127.0.0.1"})
    hosts = tmp_path / "hostfile.txt"
    hosts.write_text("192.0.2.1 slots=8 type=gpu\n192.0.2.2 slots=8 type=gpu\n192.0.2.3 slots=4 type=cpu\n")
    flags = ["--quantization", "fp8", "--max-model-len", "32768"]
    by_hand = _plan(capsys, ["deepseek-r1", "--gpus", "16", "--nodes", "2", "--gpu-memory", "80GiB", *flags])
    assert "GPUs       16 x 80.0 GiB in 2 node(s) of 8\n" in by_hand
    assert _plan(capsys, ["deepseek-r1", "--hostfile", str(hosts), "--gpu-memory", "80GiB", *flags]) == by_hand
    config = tmp_path / "serve.yaml"
    config.write_text("engine_args:\n  model: deepseek-r1\n  quantization: fp8\n  max_model_len: 32768\n"
                      "runner:\n  hostfile: hostfile.txt\n  gpu_memory: 80GiB\n")
    assert _plan(capsys, [str(config)]) == by_hand
    args = build_parser().parse_args(["serve", str(config), "--dry-run"])
    assert args.func(args) == 0
    served = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("serve: "))
    printed = shlex.split(_line(by_hand, "serve flags"))
    assert _sizes(served) == {"tensor_parallel_size": printed[1], "pipeline_parallel_size": printed[3],
                              "data_parallel_size": printed[5], "enable_expert_parallel": "True"}
    for flag, value, listed in (("--gpus", "8", "--gpus 8"), ("--nodes", "1", "--nodes 1")):
        assert main(["plan", str(config), flag, value]) == 2
        assert capsys.readouterr().err == (f"deepserve plan: error: {listed} disagrees with the hostfile "
                                           f"{hosts}, which lists 16 GPUs on 2 node(s): leave {flag} out\n")
    assert main(["plan", "deepseek-r1", "--gpu-memory", "80GiB"]) == 2
    assert capsys.readouterr().err == "deepserve plan: error: --gpus is required (the number of GPUs in all), " \
                                      "or --hostfile\n"


def test_hosts_of_unequal_gpu_counts_take_the_sizes_given(tmp_path, capsys):
    """The automatic plan puts as many GPUs on every node: hosts of 8, 4, 4 and 8 GPUs (24, a
    multiple of the 4 hosts) are refused by serve's plan and by `plan --hostfile` alike, and so
    are hosts of CPUs only, named as such."""
    hosts = tmp_path / "hostfile.txt"
    hosts.write_text("192.0.2.1 slots=8\n192.0.2.2 slots=4\n192.0.2.3 slots=4\n192.0.2.4 slots=8\n")
    line = "the automatic plan needs the same GPU count on every host; the hostfile lists [8, 4, 4, 8]: give " \
           "the parallel sizes"
    assert main(["plan", "deepseek-r1", "--hostfile", str(hosts), "--gpu-memory", "80GiB"]) == 2
    assert capsys.readouterr().err == f"deepserve plan: error: {line}\n"
    launcher = ClusterLauncher(parse_hostfile(hosts), RunnerOptions(gpu_memory="80GiB"), {}, set())
    with pytest.raises(ValueError, match=re.escape(line)):
        cluster_engine_args({"model": "deepseek-r1"}, launcher)
    hosts.write_text("192.0.2.1 slots=8 type=cpu\n192.0.2.2 slots=8 type=cpu\n")
    assert main(["plan", "deepseek-r1", "--hostfile", str(hosts), "--gpu-memory", "80GiB"]) == 2
    assert capsys.readouterr().err == "deepserve plan: error: the automatic plan lays out GPUs and the hostfile " \
                                      "lists none (every host type=cpu): give the parallel sizes\n"


def test_a_yaml_partition_plans_its_stages_as_serve_does(tmp_path, capsys, monkeypatch):
    """A serve YAML whose envs give VLLM_PP_LAYER_PARTITION (serve exports them), with a hostfile
    and no parallel sizes: `plan` and `serve --dry-run`'s automatic plan both take 4 stages split
    16,15,15,15 (serve refused it before planning, checking the partition against PP 1)."""
    monkeypatch.setattr("deepserve.distributed.cluster.local_addresses", lambda: {"127.0.0.1"})
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "")   # the commands export the file's: restored after
    (tmp_path / "hostfile.txt").write_text("".join(f"192.0.2.{i} slots=8 type=gpu\n" for i in range(1, 5)))
    config = tmp_path / "serve.yaml"
    config.write_text("engine_args:\n  model: deepseek-r1\n  max_model_len: 4096\nenvs:\n"
                      "  VLLM_PP_LAYER_PARTITION: \"16,15,15,15\"\nrunner:\n  hostfile: hostfile.txt\n"
                      "  gpu_memory: 64GiB\n")
    out = _plan(capsys, [str(config)])
    assert "GPUs       32 x 64.0 GiB in 4 node(s) of 8\n" in out
    assert "  layers per stage    0-15, 16-30, 31-45, 46-60 " in out
    assert "TP=1 PP=1 DP=32 EP=32           -        -             -  VLLM_PP_LAYER_PARTITION=16,15,15,15 gives " \
           "4 stages, not PP 1\n" in out
    printed = shlex.split(_line(out, "serve flags"))
    args = build_parser().parse_args(["serve", str(config), "--dry-run"])
    assert args.func(args) == 0
    served = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("serve: "))
    assert _sizes(served) == {"tensor_parallel_size": printed[1], "pipeline_parallel_size": "4",
                              "data_parallel_size": printed[5], "enable_expert_parallel": "True"}
