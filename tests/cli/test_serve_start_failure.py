"""A failure of `deepserve serve`'s engine processes while they start reaches the user once: as
the command's one-line error (exit code 2), not also as a log line of the monitor that saw the
rank die (the start raises that failure itself)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import DEMO_MODEL, REPO


def test_a_rank_failing_at_start_is_printed_once(tmp_path):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(DEMO_MODEL, broken)
    weights = load_file(DEMO_MODEL / "model.safetensors")
    del weights["model.layers.3.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("USE_FLAGGEMS", "DEEPSERVE_OPS", "TRITON_INTERPRET"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-m", "deepserve.cli.main", "serve", str(broken), "--port", "0"],
                         env=env, capture_output=True, text=True, timeout=120)
    why = "lacks tensor(s) for: model.layers.3.mlp.down_proj.weight"
    assert run.returncode == 2, run.stderr
    assert run.stderr.count(why) == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("deepserve serve: error: rank 0 (pid ") and last.endswith(why), run.stderr
