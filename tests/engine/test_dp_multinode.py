"""vLLM's multi-node data parallel without Ray: a headless second "node" (a second process
tree on 127.0.0.1, started as the guide starts it: `deepserve serve --headless
--data-parallel-start-rank 1 ...`) runs DP rank 1, joins the front end's DP2 engine and
serves its share of the requests, with one process's greedy outputs."""
import os
import socket
import subprocess
import sys

from deepserve import LLM, SamplingParams
from tests.conftest import DEMO_MODEL, REPO

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [1, 40, 41, 26, 7]}, {"prompt_token_ids": [1]},
           {"prompt_token_ids": [1, 9, 11]}, {"prompt_token_ids": [5, 6, 7, 8]}]
ENGINE = dict(block_size=4, max_model_len=64)


def free_ports(n: int) -> int:
    """A base port with the n ports from it free (the front end's rpc port and those after)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def test_headless_node_joins_a_dp2_engine():
    with LLM(str(DEMO_MODEL), **ENGINE) as one:
        reference = [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY)]
    port = free_ports(4)
    nodes = dict(data_parallel_size=2, data_parallel_size_local=1, data_parallel_address="127.0.0.1",
                 data_parallel_rpc_port=port)
    headless = subprocess.Popen(
        [sys.executable, "-m", "deepserve", "serve", str(DEMO_MODEL), "--headless", "--data-parallel-size", "2",
         "--data-parallel-size-local", "1", "--data-parallel-start-rank", "1", "--data-parallel-address",
         "127.0.0.1", "--data-parallel-rpc-port", str(port), "--block-size", "4", "--max-model-len", "64"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with LLM(str(DEMO_MODEL), **nodes, **ENGINE) as llm:
            got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
            served = [g["prompt_tokens"] for g in llm.engine._gauges]
        assert got == reference
        assert all(n > 0 for n in served), served       # the headless node's DP rank served requests
        assert headless.wait(timeout=60) == 0           # the front end's shutdown stops it
    finally:
        if headless.poll() is None:
            headless.kill()
        print(headless.stdout.read()[-3000:])
