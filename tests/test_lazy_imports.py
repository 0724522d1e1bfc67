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


SERVE_CHECK = """
import sys
from deepserve.cli.main import build_parser
try:
    build_parser("serve").parse_args(["serve", "--help"])
except SystemExit:
    pass
import deepserve.quant, deepserve.distributed
print("torch" in sys.modules)
from deepserve.engine import fork_server
def start_early():   # where the fork server's imports would begin: is torch imported here yet?
    print("torch" in sys.modules)
    raise SystemExit(0)
fork_server.start_early = start_early
from deepserve.cli.main import main
main(["serve", sys.argv[1], "--device", "cpu", "--port", "0"])
"""


def test_serve_parser_and_start_import_no_torch_before_the_fork_server():
    """`deepserve serve` parses its flags (quant/ignore.py, distributed/plan.py, the server's
    args) and, with its device given, reaches the fork server's start without importing torch:
    the fork server's import of torch and the engine runs beside this process's own."""
    model = REPO.parent / "shared" / "models" / "stories260k"
    out = subprocess.run([sys.executable, "-c", SERVE_CHECK, str(model)], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "False"]


def test_quant_names_resolve_on_use():
    from deepserve import quant
    from deepserve.quant import folders, fp8, quantize_int4
    assert quant.quantize_checkpoint is folders.quantize_checkpoint and quant.quant_fp8_block is fp8.quant_fp8_block
    assert quant.METHODS == folders.METHODS and set(quantize_int4.INT4_METHODS) <= set(quant.METHODS)
    assert all(callable(getattr(quant, name)) or getattr(quant, name) for name in quant.__all__)
    try:
        quant.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name resolved")
