"""A test out-of-tree platform for deepserve, installed the way a chip vendor's plugin is.

It registers through the `deepserve.platforms` entry-point group (pyproject.toml) and brings
what an out-of-tree chip brings (vllm-ascend's NPUPlatform, vllm-metax's MacaPlatform): its own
device name (`testchip`), its own operator backend (`testchip`: RMSNorm (plain and after the residual add) and SiLU-and-mul
written here, every other op on deepserve's torch reference) and its own torch.distributed
backend (`testccl`, registered with `torch.distributed.Backend.register_backend`). Underneath
it all runs on the CPU, so CI can serve the demo model on it.

It is available (chosen by `--device auto`) only with DEEPSERVE_TESTCHIP=1, as a real plugin is
only where its chip is visible; `--device testchip` names it explicitly.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from deepserve.ops.registry import add_backend, register
from deepserve.platforms import Platform

DEVICE = "testchip"
OPS = "testchip"
DIST = "testccl"


class TestChipPlatform(Platform):
    name = DEVICE
    device_type = "cpu"          # the tensors live on the host
    dist_backend = DIST
    default_ops = OPS

    def is_available(self) -> bool:
        return os.environ.get("DEEPSERVE_TESTCHIP", "0") == "1"

    def memory_info(self, device):
        return 3 << 30, 4 << 30


def _testccl(store, rank, size, timeout):
    """The chip's collective library: gloo under another name."""
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _register_ops() -> None:
    add_backend(OPS)

    @register("rms_norm", OPS)
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)

    @register("fused_add_rms_norm", OPS)
    def fused_add_rms_norm(x, residual, weight, eps):
        residual = residual + x
        return rms_norm(residual, weight, eps), residual

    @register("silu_and_mul", OPS)
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return (gate.float() * torch.sigmoid(gate.float()) * up.float()).to(x.dtype)


def make_platform() -> TestChipPlatform:
    """The entry point: registers the chip's ops and dist backend once, returns the platform."""
    if DIST not in dist.Backend.backend_list:
        dist.Backend.register_backend(DIST, _testccl, devices=["cpu"])
    _register_ops()
    return TestChipPlatform()
