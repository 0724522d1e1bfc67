"""Platforms: CPU chosen here, an out-of-tree platform registered through the entry point."""
import pytest
import torch

import deepserve.platforms as platforms
from deepserve.platforms import CpuPlatform, Platform, get_platform


class FakeNpu(Platform):
    name = "npu"
    device_type = "cpu"  # runs on the CPU so the test can use it

    def is_available(self) -> bool:
        return True

    def memory_info(self, device):
        return 1 << 30, 2 << 30


class _EntryPoint:
    name = "npu"

    @staticmethod
    def load():
        return FakeNpu


def test_cpu_is_auto_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA host picks cuda")
    assert isinstance(get_platform("auto"), CpuPlatform)
    free, total = get_platform("cpu").memory_info(torch.device("cpu"))
    assert 0 < free <= total


def test_out_of_tree_platform_registers(monkeypatch):
    platforms._plugins.cache_clear()
    monkeypatch.setattr(platforms, "entry_points", lambda group: [_EntryPoint] if group == "deepserve.platforms" else [])
    try:
        assert "npu" in platforms.available_platforms()
        assert isinstance(get_platform("npu"), FakeNpu)
        assert isinstance(get_platform("auto"), FakeNpu)  # an available plugin wins over the built-ins
    finally:
        platforms._plugins.cache_clear()


def test_unknown_device_is_clear():
    with pytest.raises(ValueError, match="unknown device 'tpu'; available: cpu, cuda"):
        get_platform("tpu")


class _BrokenEntryPoint:
    name = "gone"

    @staticmethod
    def load():
        raise ModuleNotFoundError("No module named 'gone_chip'")


def test_a_broken_plugin_is_skipped_with_a_warning(monkeypatch, caplog):
    platforms._plugins.cache_clear()
    monkeypatch.setattr(platforms, "entry_points",
                        lambda group: [_BrokenEntryPoint, _EntryPoint] if group == "deepserve.platforms" else [])
    try:
        with caplog.at_level("WARNING", logger="deepserve"):
            assert platforms.available_platforms() == ["cpu", "cuda", "npu"]
        assert "platform plugin gone not loaded (ModuleNotFoundError" in caplog.text
        with pytest.raises(ValueError, match="unknown device 'gone'"):
            get_platform("gone")
    finally:
        platforms._plugins.cache_clear()
