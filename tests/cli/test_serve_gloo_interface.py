"""GLOO_SOCKET_IFNAME naming an interface the machine lacks (the FlagOS YAML's `export
GLOO_SOCKET_IFNAME=bond0` run where the interface has another name) is one line before any rank
starts, not every rank's gloo failure after they started."""
from __future__ import annotations

import socket

import pytest

from deepserve.cli.main import main

MISSING = "qa-no-such-if0"


@pytest.mark.parametrize("argv", [
    ["serve", "--port", "0", "-pp", "2"],
    ["serve", "--port", "0", "-pp", "2", "--dry-run"],
    ["bench", "latency", "-pp", "2", "--num-iters", "1"],
])
def test_a_missing_gloo_interface_is_refused_before_the_ranks_start(capsys, no_engine, monkeypatch, argv):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", MISSING)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"GLOO_SOCKET_IFNAME={MISSING}: this machine has no network interface {MISSING} (it has " in err[-1], err


def test_an_interface_the_machine_has_passes(no_engine, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", socket.if_nameindex()[0][1])
    with pytest.raises(AssertionError, match="the engine was started"):
        main(["serve", "--port", "0", "-pp", "2"])


def test_a_space_after_the_comma_is_shown(capsys, no_engine, monkeypatch):
    """`GLOO_SOCKET_IFNAME="lo, eth0"`: torch reads " eth0"; the line said "no network interface
    eth0 (it has lo, ..., eth0)", the space invisible."""
    have = socket.if_nameindex()[0][1]
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", f"{have}, {have}")
    assert main(["serve", "--port", "0", "-pp", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"has no network interface ' {have}' (it has " in err and err.endswith("without spaces around the commas")
