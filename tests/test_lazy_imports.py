"""Processes that never run a model import no torch (3-4 CPU-seconds each): `import deepserve`
resolves LLM and the other exports on first use, and `deepserve eval` / `deepserve bench`
(HTTP clients) parse their flags and load their runners without it."""
import subprocess
import sys

from tests.conftest import REPO

CHECK = """
import sys
import deepserve
from deepserve.cli.main import build_parser
for argv in (["eval", "--help"], ["bench", "serve", "--help"]):   # prints the help, then exits
    try:
        build_parser(argv[0]).parse_args(argv)
    except SystemExit:
        pass
import deepserve.bench.serve, deepserve.bench.sweep, deepserve.evals.runner, deepserve.evals.report
print("torch" in sys.modules)
print(deepserve.LLM.__module__, deepserve.SamplingParams.__module__, "torch" in sys.modules)
"""


def test_package_and_http_commands_import_no_torch():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["False", "deepserve.engine.llm deepserve.engine.sampling_params True"]


def test_vllm_sampling_names_import_no_torch():
    """`deepserve.sampling_params` (vLLM's SamplingParams, BeamSearchParams, ...) holds dataclasses
    only: importing it loads no torch (a structured beam search imports it when it runs)."""
    check = "import sys\nimport deepserve.sampling_params\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]
