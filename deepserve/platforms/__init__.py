"""Accelerator platforms: what the engine needs to know about a device kind.

Built in: `cuda` and `cpu`, chosen automatically (CUDA when a device is visible). Out-of-tree
chips (npu, maca, ...) register through the `deepserve.platforms` entry-point group: the
entry point names a zero-argument callable returning a `Platform` subclass instance; the
platform brings its device name, its ops backend (`default_ops`, kernels registered with
`deepserve.ops.registry.add_backend` / `register`) and its torch.distributed backend
(`dist_backend`). tests/platform_pkg is such a package, installed in CI.
"""
from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points

from deepserve.platforms.interface import CpuPlatform, CudaPlatform, Platform

_BUILTIN = {"cpu": CpuPlatform, "cuda": CudaPlatform}
logger = logging.getLogger("deepserve")


@functools.lru_cache(maxsize=None)
def _plugins() -> dict[str, Platform]:
    found = {}
    for ep in entry_points(group="deepserve.platforms"):
        try:
            platform = ep.load()()
        except Exception as exc:  # a broken or stale install must not take the built-in platforms down
            logger.warning("platform plugin %s not loaded (%s: %s); its device is unavailable",
                           ep.name, type(exc).__name__, exc)
            continue
        if not isinstance(platform, Platform):
            raise TypeError(f"platform plugin {ep.name} returned {type(platform).__name__}, not a Platform")
        found[platform.name] = platform
    return found


def available_platforms() -> list[str]:
    return sorted(set(_BUILTIN) | set(_plugins()))


def get_platform(name: str = "auto") -> Platform:
    """The platform called `name`; 'auto' picks a plugin that is available, then CUDA, then CPU."""
    plugins = _plugins()
    if name == "auto":
        for platform in plugins.values():
            if platform.is_available():
                return platform
        return CudaPlatform() if CudaPlatform().is_available() else CpuPlatform()
    if name not in _BUILTIN and name not in plugins:
        raise ValueError(f"unknown device {name!r}; available: {', '.join(available_platforms())}")
    platform = plugins[name] if name in plugins else _BUILTIN[name]()
    if not platform.is_available():
        raise RuntimeError(f"device {name!r} requested but not available on this machine")
    return platform


__all__ = ["Platform", "CpuPlatform", "CudaPlatform", "get_platform", "available_platforms"]
