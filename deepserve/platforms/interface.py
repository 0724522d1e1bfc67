"""The Platform interface and the two built-in platforms."""
from __future__ import annotations

import os

import torch


class Platform:
    name = "base"
    device_type = "cpu"
    dist_backend = "gloo"
    default_ops = "torch"

    def is_available(self) -> bool:
        raise NotImplementedError

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        """(free bytes, total bytes) of device memory."""
        raise NotImplementedError

    def supports_fp8(self, device: torch.device | None = None) -> bool:
        """Whether fp8 (e4m3) GEMMs run natively on `device`."""
        return False

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CpuPlatform(Platform):
    name = "cpu"

    def is_available(self) -> bool:
        return True

    def memory_info(self, device):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return free, total


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    default_ops = "triton"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def memory_info(self, device):
        return torch.cuda.mem_get_info(device)

    def supports_fp8(self, device: torch.device | None = None) -> bool:
        # e4m3 tensor-core GEMMs from Ada (sm_89) and Hopper (sm_90) on
        return torch.cuda.get_device_capability(device) >= (8, 9)

    def synchronize(self) -> None:
        torch.cuda.synchronize()
