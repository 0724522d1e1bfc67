"""Ctrl-C mid-run: exit 130, no traceback, one line saying where the replies are kept; the same
command again sends only what is missing."""
import json
import os
import signal
import subprocess
import sys
import time

from fake_openai import FakeOpenAI

from deepserve.evals.datasets import load_gsm8k
from conftest import REPO


def test_ctrl_c_says_how_to_resume(datasets_dir, tmp_path):
    items = {"gsm8k": load_gsm8k(datasets_dir)[:4]}
    out, cache = tmp_path / "r.json", tmp_path / "r.cache.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with FakeOpenAI(items, mode="gold", delay=0.3) as srv:
        argv = [sys.executable, "-m", "deepserve", "eval", "--base-url", srv.url, "--model", "fake-r1",
                "--tasks", "gsm8k", "--data-path", str(datasets_dir), "--limit", "4", "--num-samples", "2",
                "--max-concurrency", "1", "--output", str(out), "--no-progress"]
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and \
                (not cache.exists() or cache.read_text().count("\n") < 2):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == (f"eval: interrupted; the replies so far are kept in {cache}: "
                                                "rerun the same command to resume")
        kept = cache.read_text().count("\n")
        assert 2 <= kept < 8 and not out.exists()
        time.sleep(0.3)   # a request sent just before the interrupt reaches the server
        srv.delay, calls = 0.0, srv.calls
        subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["requests"]["from_cache"] == kept and srv.calls - calls == 8 - kept
    assert result["tasks"]["gsm8k"]["score"] == 100.0
