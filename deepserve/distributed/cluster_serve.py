"""Serving on a hostfile's cluster: Ray backend, the automatic plan when no parallel sizes are
given, and the start -> wait -> serve -> stop flow around `ClusterLauncher` (cluster.py)."""
from __future__ import annotations

import os
from typing import Callable, Optional

from deepserve.distributed.cluster import PARALLEL_KEYS, ClusterLauncher, HostSpec, RunnerOptions, parse_hostfile
from deepserve.distributed.plan import parse_size
from deepserve.distributed.plan_bytes import Ignored


def _local_gpu_memory() -> int:
    import torch
    if not torch.cuda.is_available():
        raise ValueError("no parallel sizes given and this machine has no CUDA GPU to size the plan "
                         "with: set runner.gpu_memory (e.g. 80GiB) or --tensor-parallel-size")
    return torch.cuda.get_device_properties(0).total_memory


# engine kwargs -> the plan's name of the format the engine holds the weights in and the modules
# the checkpoint leaves unquantized (cli/plan.py's weights_format, which reads a folder's
# quantization_config; this layer reads no checkpoint)
WeightsFormat = Callable[[dict], tuple[Optional[str], Ignored]]


def auto_plan(kwargs: dict, gpus: int, gpu_memory: int, nodes: int, weights_format: Optional[WeightsFormat] = None):
    """`deepserve plan`'s choice for these engine kwargs on `gpus` GPUs of `gpu_memory` bytes: the
    weights counted in the format `weights_format` gives (the engine's, for a folder its stored
    one unless --quantization asks for another, its unquantized modules in the model dtype;
    without it, --quantization as given, every module quantized), the KV cache in its
    kv_cache_dtype, and the MTP layer with its KV when speculative_config loads it."""
    from deepserve.config import EngineArgs, load_hf_config
    from deepserve.distributed.plan import choose_plan, loads_mtp

    model = str(kwargs.get("model", EngineArgs.model))
    hf = load_hf_config(model, kwargs.get("hf_overrides"))
    quantization, ignored = weights_format(kwargs) if weights_format else (kwargs.get("quantization"), None)
    return choose_plan(hf, gpus, gpu_memory, nodes=nodes, quantization=quantization, ignored=ignored,
                       dtype=kwargs.get("dtype", "auto"), max_model_len=kwargs.get("max_model_len"),
                       gpu_memory_utilization=kwargs.get("gpu_memory_utilization", 0.9),
                       kv_cache_dtype=kwargs.get("kv_cache_dtype", "auto"),
                       include_mtp=loads_mtp(kwargs.get("speculative_config"), hf))


def local_engine_args(engine_kwargs: dict, out=print, weights_format: Optional[WeightsFormat] = None) -> dict:
    """One machine with several GPUs and no parallel sizes given: use the automatic plan
    (the guides' "automated deployment optimization"). One GPU or none: unchanged."""
    if any(k in engine_kwargs for k in PARALLEL_KEYS) or engine_kwargs.get("device") == "cpu":
        return engine_kwargs
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        return engine_kwargs
    plan = auto_plan(engine_kwargs, gpus, _local_gpu_memory(), nodes=1, weights_format=weights_format)
    out(f"deepserve: plan for {gpus} GPUs: " + " ".join(f"{k}={v}" for k, v in plan.parallel_args().items()))
    return dict(engine_kwargs, **plan.parallel_args())


def hostfile_gpus(hosts: list[HostSpec]) -> tuple[int, int]:
    """The GPUs the automatic plan lays out over these hosts: (in all, hosts holding them). The
    plan puts the same number of GPUs on every node, so the GPU hosts must list the same slots."""
    counts = [h.gpus for h in hosts if h.gpus]
    if not counts:
        raise ValueError("the automatic plan lays out GPUs and the hostfile lists none (every host type=cpu): give "
                         "the parallel sizes")
    if len(set(counts)) != 1:
        raise ValueError(f"the automatic plan needs the same GPU count on every host; the hostfile lists "
                         f"{[h.gpus for h in hosts]}: give the parallel sizes")
    return sum(counts), len(counts)


def cluster_engine_args(engine_kwargs: dict, launcher: ClusterLauncher,
                        gpu_memory_fn: Optional[Callable[[], int]] = None,
                        weights_format: Optional[WeightsFormat] = None) -> tuple[dict, Optional[object]]:
    """Engine kwargs for serving on the cluster: Ray backend, and the automatic plan's sizes
    when none were given. Returns (kwargs, the Plan or None)."""

    kwargs = dict(engine_kwargs)
    backend = kwargs.get("distributed_executor_backend")
    if backend not in (None, "ray"):
        raise ValueError(f"a hostfile deploys over Ray, but distributed_executor_backend is {backend!r}")
    kwargs["distributed_executor_backend"] = "ray"
    total = launcher.total_gpus
    plan = None
    if not any(k in kwargs for k in PARALLEL_KEYS):
        if launcher.options.gpu_memory:
            memory = parse_size(launcher.options.gpu_memory)
        else:
            memory = (gpu_memory_fn or _local_gpu_memory)()
        total, gpu_hosts = hostfile_gpus(launcher.hosts)
        plan = auto_plan(kwargs, total, memory, gpu_hosts, weights_format)
        kwargs.update(plan.parallel_args())
    world = (int(kwargs.get("tensor_parallel_size", 1)) * int(kwargs.get("pipeline_parallel_size", 1))
             * int(kwargs.get("data_parallel_size", 1)))
    if total and world > total:
        raise ValueError(f"TP x PP x DP = {world} ranks need {world} GPUs, the hostfile lists {total}")
    return kwargs, plan


def check_head_gpus(launcher: ClusterLauncher) -> None:
    """This machine's hostfile line against its GPUs: `ray start --head --num-gpus` tells Ray the
    slots the line gives, so a line with more slots than the machine has GPUs (the guide's
    `slots=8` on a 4-GPU host) would have Ray place ranks on GPUs that do not exist, failing in
    CUDA after every host started. Checked where CUDA is (a CPU machine's `type=gpu` slots place
    CPU ranks)."""
    import torch

    head = launcher.head
    if not head.gpus or not torch.cuda.is_available():
        return
    have = torch.cuda.device_count()
    if head.gpus > have:
        raise ValueError(f"hostfile line {head.line} gives this machine ({head.address}) slots={head.slots}, but it "
                         f"has {have} GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
                         f": give slots={have}")


def serve_on_cluster(options: RunnerOptions, envs: dict, engine_kwargs: dict, serve: Callable[[dict], int],
                     dry_run: bool = False, out: Callable[[str], None] = print,
                     launcher: Optional[ClusterLauncher] = None,
                     gpu_memory_fn: Optional[Callable[[], int]] = None,
                     weights_format: Optional[WeightsFormat] = None) -> int:
    """Start Ray on the hostfile's hosts, wait for the GPUs, serve, stop Ray on exit.
    With dry_run, print the commands host by host (and the plan when it can be chosen) instead."""
    if launcher is None:
        launcher = ClusterLauncher(parse_hostfile(options.hostfile), options, envs)
    if dry_run:
        out(launcher.describe())
        if options.gpu_memory or any(k in engine_kwargs for k in PARALLEL_KEYS):
            kwargs, _ = cluster_engine_args(engine_kwargs, launcher, gpu_memory_fn, weights_format)
        else:
            kwargs = dict(engine_kwargs, distributed_executor_backend="ray")
            out("\nparallel sizes: chosen by `deepserve plan` once the GPUs' memory is known "
                "(set runner.gpu_memory to see them here)")
        out(f"\nserve: RAY_ADDRESS={launcher.address} with "
            + " ".join(f"{k}={v}" for k, v in sorted(kwargs.items())))
        return 0
    if not launcher.head_is_local:
        raise ValueError(f"this machine is not in the hostfile {options.hostfile}: run `deepserve serve` on "
                         f"{launcher.head.address} (the server's rank 0 runs beside the Ray head); this "
                         f"machine's addresses: {', '.join(sorted(launcher.local))}")
    check_head_gpus(launcher)
    if any(k in engine_kwargs for k in PARALLEL_KEYS):  # fail on bad sizes before touching any host
        cluster_engine_args(engine_kwargs, launcher, gpu_memory_fn, weights_format)
    with launcher:
        kwargs, plan = cluster_engine_args(engine_kwargs, launcher, gpu_memory_fn, weights_format)
        if plan is not None:
            out(f"deepserve: plan for {launcher.total_gpus} GPUs: " +
                " ".join(f"{k}={v}" for k, v in plan.parallel_args().items()))
        os.environ["RAY_ADDRESS"] = launcher.address
        return serve(kwargs)
