"""vLLM's development endpoints that deepserve has, routed only with VLLM_SERVER_DEV_MODE=1 as
in vLLM 0.26 (vllm/entrypoints/serve/dev/): without it they are absent (404).

    POST /reset_prefix_cache   {"success": bool}: every cached prefix block forgotten (false,
                               nothing changed, while requests hold blocks, unless
                               ?reset_running_requests=true preempts them first)
    GET  /is_sleeping          {"is_sleeping": false} (deepserve has no sleep mode)
    GET  /server_info          the engine's configuration (?config_format=text|json), the VLLM_*
                               environment variables and a few facts about the system

vLLM's other development routes (/sleep, /wake_up, /collective_rpc, /pause, weight updates,
...) do what deepserve does not: they stay absent.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys

from fastapi import FastAPI, Request

from deepserve import __version__
from deepserve.server.errors import APIError
from deepserve.server.serving_common import ServerState, query_flag

logger = logging.getLogger("deepserve")


def _plain(value):
    """JSON for what dataclasses.asdict leaves as objects: config.json (HFConfig) as its dict,
    the rest (dtypes, paths) as text."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)


def add_dev_routes(app: FastAPI, state: ServerState) -> None:
    logger.warning("SECURITY WARNING: Development endpoints are enabled (VLLM_SERVER_DEV_MODE=1: "
                   "/reset_prefix_cache, /is_sleeping, /server_info)! This should NOT be used in production!")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request):
        if query_flag(request, "reset_external"):
            raise APIError(400, "reset_external=true is not supported: deepserve has no external (KV connector) "
                                "prefix cache", param="reset_external")
        logger.info("Resetting prefix cache...")
        done = await state.llm.reset_prefix_cache(query_flag(request, "reset_running_requests"))
        return {"success": bool(done)}

    @app.get("/is_sleeping")
    async def is_sleeping():
        return {"is_sleeping": False}

    @app.get("/server_info")
    async def server_info(request: Request):
        fmt = request.query_params.get("config_format", "text")
        if fmt not in ("text", "json"):
            raise APIError(400, f"config_format must be text or json, got {fmt!r}", param="config_format")
        import torch

        config = state.llm.engine.config   # with the pool's size as the engine (its cores) settled it
        config = dataclasses.replace(config, cache=dataclasses.replace(
            config.cache, num_blocks=int(state.llm.snapshot.get("num_blocks", config.cache.num_blocks))))
        shown = json.loads(json.dumps(dataclasses.asdict(config), default=_plain)) if fmt == "json" else str(config)
        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") and "KEY" not in k}
        system = {"deepserve_version": __version__, "python_version": sys.version.split()[0],
                  "torch_version": torch.__version__, "platform": platform.platform(), "device": state.llm.engine.platform.device_type}
        return {"vllm_config": shown, "vllm_env": env, "system_env": system}
