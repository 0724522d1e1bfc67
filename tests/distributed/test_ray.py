"""A local Ray cluster (loopback only) started for this module runs TP=2 (async scheduling) to
the outputs of TP=1 (synchronous), and data parallel (each DP rank an engine core in a Ray
actor) to the outputs of spawned DP ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import local_ray_lock
from tests.distributed.local_ray import local_ray_head

ray = pytest.importorskip("ray")

# The head is started on 127.0.0.1 and the driver joins it there (DEEPSERVE_HOST_IP); Ray still
# names the node by the machine's interface address in its node table.


@pytest.fixture(scope="module")
def ray_env():
    repo = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, DEEPSERVE_HOST_IP="127.0.0.1",
                PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))


@pytest.fixture(scope="module")
def head(ray_env, tmp_path_factory):
    """One head for the module's drivers (each test's script is a driver of its own)."""
    with local_ray_lock(tmp_path_factory), local_ray_head(ray_env, extra=["--node-ip-address=127.0.0.1"]) as head:
        yield head

SCRIPT = r"""
import json, sys
import ray
from deepserve import LLM, SamplingParams

def main():
    ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1")
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1]}, {"prompt_token_ids": [1, 40, 41, 26, 7]}]
    single = [o.outputs[0].token_ids for o in LLM(block_size=4).generate(prompts, sp)]
    llm = LLM(block_size=4, tensor_parallel_size=2, distributed_executor_backend="ray", async_scheduling=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    nodes, ahead = llm.engine.executor.nodes, llm.engine.async_scheduling
    llm.engine.shutdown()
    print(json.dumps({"single": single, "ray": got, "nodes": nodes, "async": ahead}))

if __name__ == "__main__":
    main()
"""


def test_ray_tp2_matches_tp1(head, ray_env, tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(tmp_path / "run.py"), head.address], capture_output=True,
                         text=True, env=ray_env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ray"] == result["single"] and result["async"]   # async over Ray, as one synchronous process
    assert len(result["nodes"]) == 1  # the one local node (Ray names it by its interface address)


DP_SCRIPT = r"""
import json, os, sys, time
import ray
from deepserve import LLM, SamplingParams

# one-token lookups: the first prompt holds 37 distinct ids, so its outputs find matches and draft
NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 2}

def run(model, kill=False, **kw):
    llm = LLM(model, block_size=4, max_model_len=128, max_num_batched_tokens=16, data_parallel_size=2, **kw)
    try:
        prompts = [{"prompt_token_ids": list(range(3, 40))}, {"prompt_token_ids": [1]},
                   {"prompt_token_ids": [1, 40, 41, 26, 7, 9, 11]}, {"prompt_token_ids": [5, 6]}]
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        engine = llm.engine
        out = {"tokens": tokens, "executor": type(engine.executor).__name__,
               "nodes": getattr(engine.executor, "nodes", None),
               "pools": [(g["num_free_blocks"], g["num_blocks"], g["prefix_cache_queries"]) for g in engine._gauges],
               "drafts": engine.gauges().get("spec_decode_num_drafts")}
        if kill:  # DP rank 1's core dies: the front end fails naming it
            ray.kill(engine.executor.actors[1])
            deadline = time.monotonic() + 30
            while engine.executor.failure is None and time.monotonic() < deadline:
                time.sleep(0.1)
            try:
                llm.generate(prompts[:1], sp)
                out["after_kill"] = "served"
            except RuntimeError as exc:
                out["after_kill"] = str(exc)
        return out
    finally:
        llm.shutdown()

def main():
    ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1")
    model = sys.argv[2]
    out = {"mp_ep": run(model, enable_expert_parallel=True),
           "ray_ep": run(model, enable_expert_parallel=True, distributed_executor_backend="ray",
                         speculative_config=NGRAM),
           "ray": run(model, kill=True, distributed_executor_backend="ray", async_scheduling=True)}
    print(json.dumps(out), flush=True)
    os._exit(0)  # every engine is shut down; the head goes with the test (skips seconds of teardown)

if __name__ == "__main__":
    main()
"""


def test_ray_dp2_engine_cores_match_spawned_dp2(head, ray_env, tmp_path):
    """DP2 x EP2 (with n-gram speculative decoding) and plain DP2 (with async scheduling) on a
    tiny DeepSeek-V3, every rank a Ray actor running its DP rank's engine core: the greedy
    tokens of spawned-process DP2 x EP2 (chunked prefill, both ranks busy), both ranks served,
    every block back in its pool after; a core's actor killed fails the front end naming its
    rank."""
    from tests.distributed.test_parallel_engine import tiny_deepseek
    model = tiny_deepseek(tmp_path / "dsv3")
    (tmp_path / "run.py").write_text(DP_SCRIPT)
    out = subprocess.run([sys.executable, str(tmp_path / "run.py"), head.address, str(model)],
                         capture_output=True, text=True, env=ray_env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not head.actors("_RankActor")   # shut down: no actor left
    ref = result["mp_ep"]
    assert ref["executor"] == "WorkerProcs"
    for name in ("ray_ep", "ray"):
        got = result[name]
        assert got["executor"] == "RayRanks" and len(got["nodes"]) == 2, got
        assert got["tokens"] == ref["tokens"], name
        for free, total, queries in got["pools"]:
            assert free == total and queries > 0, (name, got["pools"])
    assert result["ray_ep"]["drafts"] > 0 and result["ray"]["drafts"] is None
    killed = result["ray"]["after_kill"]
    assert killed.startswith("rank 1 (DP rank 1, a Ray actor on node ") and " died: " in killed, killed
