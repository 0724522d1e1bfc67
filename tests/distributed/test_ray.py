"""A local Ray cluster (loopback only) started by the test runs TP=2 to the outputs of TP=1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

# The head is started on 127.0.0.1 and the driver joins it there (DEEPSERVE_HOST_IP); Ray still
# names the node by the machine's interface address in its node table.

SCRIPT = r"""
import json, sys
import ray
from deepserve import LLM, SamplingParams

def main():
    ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1")
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1]}, {"prompt_token_ids": [1, 40, 41, 26, 7]}]
    single = [o.outputs[0].token_ids for o in LLM(block_size=4).generate(prompts, sp)]
    llm = LLM(block_size=4, tensor_parallel_size=2, distributed_executor_backend="ray")
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    nodes = llm.engine.executor.nodes
    llm.engine.shutdown()
    print(json.dumps({"single": single, "ray": got, "nodes": nodes}))

if __name__ == "__main__":
    main()
"""


def test_ray_tp2_matches_tp1(tmp_path):
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", DEEPSERVE_HOST_IP="127.0.0.1",
               PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    head = subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", "--port=0",
                           "--num-cpus=4", "--include-dashboard=false", "--disable-usage-stats"],
                          capture_output=True, text=True, env=env, timeout=120)
    if head.returncode != 0:  # the machine cannot run Ray at all (not a deepserve failure)
        pytest.skip(f"ray start failed here: {head.stderr.strip()[-300:]}")
    address = next(line.split("'")[1] for line in head.stdout.splitlines() if "ray start --address=" in line)
    try:
        (tmp_path / "run.py").write_text(SCRIPT)
        out = subprocess.run([sys.executable, str(tmp_path / "run.py"), address], capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        import json
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["ray"] == result["single"]
        assert len(result["nodes"]) == 1  # the one local node (Ray names it by its interface address)
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env, timeout=120)
