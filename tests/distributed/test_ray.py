"""A local Ray cluster (loopback only) started by the test runs TP=2 to the outputs of TP=1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.local_ray import local_ray_head

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
    env = dict(os.environ, DEEPSERVE_HOST_IP="127.0.0.1",
               PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    with local_ray_head(env, extra=["--node-ip-address=127.0.0.1"]) as head:
        (tmp_path / "run.py").write_text(SCRIPT)
        out = subprocess.run([sys.executable, str(tmp_path / "run.py"), head.address], capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["ray"] == result["single"]
        assert len(result["nodes"]) == 1  # the one local node (Ray names it by its interface address)
