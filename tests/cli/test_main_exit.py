"""A `deepserve` command's process freezes its heap before the interpreter's exit, whose last
garbage collections would otherwise walk every object of torch and the package (a CPU-second
of each command process the test suite starts)."""
import subprocess
import sys

from tests.conftest import REPO

# registered before main's own exit hook, so it runs after it (atexit runs the last registered first);
# torch imported here, as the commands that load a model do (`plan --help` itself no longer does)
CHECK = """
import atexit, gc, sys
import torch
atexit.register(lambda: print("torch" in sys.modules, gc.get_freeze_count() > 100_000, len(gc.get_objects()) < 1_000))
from deepserve.cli.main import main
sys.exit(main(["plan", "--help"]))
"""


def test_a_command_exits_with_its_heap_frozen():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "True True True"
