"""Real `deepserve serve` processes on 127.0.0.1 for the server tests.

`launch(*flags)` starts one with `--port 0` and reads the bound URL from its ready line;
servers are stopped (SIGTERM, then SIGKILL) when their fixture ends. `echo_model` builds a
one-layer Llama with the real DeepSeek-R1 tokenizer whose greedy output is fixed by its
weights (each token's embedding is a one-hot slot that the LM head maps to the next token
of a chosen script), so reasoning-split tests are deterministic.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.chain_model import write_chain_model

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
R1_TOKENIZER = SHARED / "tokenizers" / "deepseek-r1"
API_KEY = "sk-deepserve-test"
# a chat template for the demo model (it ships none): BOS, then the turns' text
DEMO_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
READY = re.compile(r"at (https?://[\d.]+:\d+|https?\+unix:\S+)/v1")


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]):
        self.proc, self.url, self.lines = proc, url, lines

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")   # tiny models: threads only add contention
    return env


def launch(*flags: str, timeout: float = 120.0, cwd: Path = REPO) -> ServerProcess:
    cmd = [sys.executable, "-m", "deepserve", "serve", *flags, "--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=server_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    found: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = READY.search(line)
            if m:
                found.put(m.group(1))
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = found.get(timeout=timeout)
    except queue.Empty:
        url = None
    if url is None:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start: {' '.join(cmd)}\n{''.join(lines)[-3000:]}")
    return ServerProcess(proc, url, lines)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """The demo model with an API key, a simple chat template and GET /tokenizer_info."""
    template = tmp_path_factory.mktemp("tmpl") / "demo.jinja"
    template.write_text(DEMO_TEMPLATE)
    server = launch("--api-key", API_KEY, "--chat-template", str(template), "--enable-tokenizer-info-endpoint",
                    "--num-gpu-blocks-override", "2048", "--max-body-bytes", str(1 << 20))
    yield server
    server.stop()


# --------------------------------------------------------------------------- echo model
# Unique tokens only: token -> next token must be a function.
ECHO_SCRIPT = "Okay, the user asks for a sum; adding them gives four.</think>\n\nThe answer is 4"


def build_echo_model(folder: Path, script: str = ECHO_SCRIPT) -> list[int]:
    """Write the model; returns the script's token ids (EOS follows the last)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(R1_TOKENIZER / "tokenizer.json"))
    ids = tok.encode(script, add_special_tokens=False).ids
    assert len(set(ids)) == len(ids), f"script tokens repeat: {ids}"
    eos = tok.token_to_id("<｜end▁of▁sentence｜>")
    newline = tok.encode("\n", add_special_tokens=False).ids[-1]   # last prompt token after <think>\n
    chain = [newline] + ids + [eos]
    assert len(set(chain)) == len(chain)
    write_chain_model(folder, dict(zip(chain, chain[1:])), R1_TOKENIZER, eos)
    return ids


@pytest.fixture(scope="session")
def echo_model(tmp_path_factory):
    if not R1_TOKENIZER.is_dir():
        pytest.skip(f"{R1_TOKENIZER} not found (CI clones the repo beside shared/)")
    folder = tmp_path_factory.mktemp("echo-r1")
    build_echo_model(folder)
    return folder


@pytest.fixture(scope="session")
def r1_server(echo_model):
    """The echo model served as "tiny-r1" with the R1 reasoning parser."""
    server = launch(str(echo_model), "--served-model-name", "tiny-r1", "--reasoning-parser", "deepseek_r1",
                    "--num-gpu-blocks-override", "128")
    yield server
    server.stop()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def parser():
    """`deepserve serve`'s argument parser."""
    import argparse

    from deepserve.cli.serve import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p
