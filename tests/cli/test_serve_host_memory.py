"""On a CPU, a layout whose weights outgrow the machine's memory is refused in one line before any
rank starts (the metax guide's `-pp 4 -tp 8` line for R1 run on a CPU machine started 32 ranks
that filled the memory), by `serve` and by the offline commands alike."""
from __future__ import annotations

import re

import pytest

from deepserve.cli.main import main
from tests.cli.conftest import write_r1_config

GiB = 2**30
METAX_FLAGS = ["-pp", "4", "-tp", "8", "--trust-remote-code", "--dtype", "bfloat16", "--max-model-len", "4096",
               "--swap-space", "16", "--gpu-memory-utilization", "0.90"]


def test_metax_line_on_a_cpu_is_refused_before_any_rank_starts(capsys, no_engine, tmp_path, monkeypatch):
    monkeypatch.setattr("deepserve.cli.serve.available_host_memory", lambda: 64 * GiB)
    folder = write_r1_config(tmp_path / "deepseek_r1_BF16")
    assert main(["serve", str(folder), *METAX_FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deepserve serve: error: the weights of the 32 rank(s) this machine starts "
                              "(tensor_parallel_size 8 x pipeline_parallel_size 4 x 1 local data-parallel rank(s)) "
                              "take about "), err
    # R1 as stored: fp8 linears and experts (~1 byte a parameter), the rest in bf16
    need = float(err[-1].split("take about ")[1].split(" GiB")[0])
    assert 600 < need < 700, err[-1]
    assert "and it has 64.0 GiB available" in err[-1]
    # the metax guide's checkpoint: config.json without its quantization_config (BF16), twice that
    config = folder / "config.json"
    config.write_text(re.sub(r',\s*"quantization_config": \{[^{}]*\}', "", config.read_text()))
    assert "quantization_config" not in config.read_text()
    assert main(["serve", str(folder), *METAX_FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    need = float(err[-1].split("take about ")[1].split(" GiB")[0])
    assert 1200 < need < 1300 and "GiB on the CPU (16-bit ones in bfloat16)" in err[-1], err[-1]


def test_offline_commands_check_the_memory_too(capsys, no_engine, monkeypatch):
    monkeypatch.setattr("deepserve.cli.serve.available_host_memory", lambda: 1 * GiB)
    assert main(["bench", "latency", "--model", "r1-distill-llama-8b", "--load-format", "dummy",
                 "--num-iters", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # 8B parameters in fp32 on the CPU
    assert "the weights of the 1 rank(s) this machine starts" in err[-1] and "GiB on the CPU (16-bit ones in float32)" \
        in err[-1], err


def test_a_layout_that_fits_starts(no_engine, monkeypatch):
    monkeypatch.setattr("deepserve.cli.serve.available_host_memory", lambda: 4096 * GiB)
    with pytest.raises(AssertionError, match="the engine was started"):
        main(["serve", "deepseek-r1", "--load-format", "dummy", "-tp", "8", "-pp", "4", "--port", "0"])
