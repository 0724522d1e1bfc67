"""vLLM's profiler interface (--profiler-config, POST /start_profile and /stop_profile,
`LLM.start_profile()` / `stop_profile()`), in every rank that runs the model.

The driver of each DP rank (the engine core, or the offline engine's own process) decides:
`DriverProfiler` counts engine steps from start_profile (delay_iterations, max_iterations, as
vLLM's WorkerProfiler counts worker steps), starts and stops its own `RankProfiler` and tells
the DP rank's other ranks (TP and PP peers) to do the same through the step channel
(`ProfileControl`); before each profiled step it sends the step's annotation (`ProfileStep`),
which those ranks put around the step they run next (`run_worker_steps`), stepping their
torch.profiler schedule (wait / warmup / active iterations) with the driver's. A stop returns once
every rank has written its trace (each peer acknowledges on the channel's group).

Each profiled step runs inside a torch.profiler record_function (an NVTX range with the cuda
profiler) named as vLLM's GPU worker names it, `execute_context_{C}({CT})_generation_{G}({GT})`:
C sequences that have no output token yet (their prompt, or a chunk of it) with CT scheduled
tokens, G generating sequences with GT tokens (with detailed_trace_annotation, vLLM's longer form
with the roofline terms). A torch trace is Chrome JSON, `{dir}/{prefix_}dp{D}_pp{P}_tp{T}_rank{R}
.{time_ns}.pt.trace.json[.gz]`, written under a hidden name and renamed when complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from deepserve.config import ProfilerConfig
from deepserve.engine.step_inputs import Stop

logger = logging.getLogger("deepserve")

ACK_TAG = (1 << 20) + 2   # a peer's "trace written" on the step channel's group (step_channel's tags + 2)


@dataclass
class ProfileControl:
    """Driver -> its peers: start the profiler (`start`) or stop it and write the trace."""
    start: bool
    prefix: Optional[str] = None


@dataclass
class ProfileStep:
    """Driver -> its peers: the annotation of the step they run next (a step of the schedule)."""
    name: str


def step_annotation(seqs, num_new_tokens, detailed: bool = False) -> str:
    """vLLM's name of a step's profiler range. A sequence is in its context phase until it has
    an output token (one sampled and still on the device counts, as under vLLM's async
    scheduling): its prompt's chunks, a preempted prompt's recomputation included."""
    ctx = [0, 0, 0, 0, 0]   # sequences, tokens, sum of seq_len, sum of q*q, sum of q*seq_len
    gen = [0, 0, 0, 0, 0]
    for seq, q in zip(seqs, num_new_tokens):
        phase = ctx if seq.num_output_tokens + seq.num_pending == 0 else gen
        seq_len = seq.num_computed_tokens + q
        phase[0] += 1
        phase[1] += q
        phase[2] += seq_len
        phase[3] += q * q
        phase[4] += q * seq_len
    if not detailed:
        return f"execute_context_{ctx[0]}({ctx[1]})_generation_{gen[0]}({gen[1]})"
    return (f"execute_{ctx[1] + gen[1]}_context_{ctx[0]}(sq{ctx[1]}sk{ctx[2]}sqsq{ctx[3]}sqsk{ctx[4]})"
            f"_generation_{gen[0]}(sq{gen[1]}sk{gen[2]}sqsq{gen[3]}sqsk{gen[4]})")


def rank_suffix(pctx) -> str:
    """dp{D}_pp{P}_tp{T}_rank{R} of a rank's parallel context: distinct for every rank."""
    rank = (pctx.dp_rank * pctx.pp_size + pctx.pp_rank) * pctx.tp_size + pctx.tp_rank
    return f"dp{pctx.dp_rank}_pp{pctx.pp_rank}_tp{pctx.tp_rank}_rank{rank}"


class RankProfiler:
    """One rank's profiler: torch.profiler (CPU, and CUDA activity on a GPU) or the CUDA
    profiler's start / stop."""

    def __init__(self, config: ProfilerConfig, suffix: str, cuda: bool):
        self.config, self.suffix, self.cuda = config, suffix, cuda
        self.prof: Optional[torch.profiler.profile] = None
        self.prefix: Optional[str] = None
        # vLLM's torch.profiler schedule (wait / warmup / active steps, once): the profiler writes
        # the trace itself when the active steps end (or at the stop, of what it recorded)
        self.scheduled = config.profiler == "torch" and bool(config.wait_iterations or config.warmup_iterations)
        self.uncounted = 0   # schedule: steps left that record nothing (vLLM's count)

    def begin(self, prefix: Optional[str] = None) -> None:
        if self.prof is not None:   # started already (a second start_profile)
            return
        self.prefix = prefix
        c = self.config
        if c.profiler == "cuda":
            torch.cuda.profiler.start()
            return
        os.makedirs(c.torch_profiler_dir, exist_ok=True)   # a folder it cannot make fails the start
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = None
        if self.scheduled:
            schedule = torch.profiler.schedule(wait=c.wait_iterations, warmup=c.warmup_iterations,
                                               active=c.active_iterations, repeat=1)
            # the start takes the schedule's first step
            self.uncounted = max(c.wait_iterations + c.warmup_iterations - 1, 0)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=c.torch_profiler_record_shapes,
                                           profile_memory=c.torch_profiler_with_memory,
                                           with_stack=c.torch_profiler_with_stack,
                                           with_flops=c.torch_profiler_with_flops, schedule=schedule,
                                           on_trace_ready=self.write if self.scheduled else None)
        self.prof.start()

    def step(self) -> bool:
        """An engine step begins: advance the schedule; whether the step counts as recorded
        (vLLM's: not in the schedule's wait and warm-up steps)."""
        if self.prof is None or not self.scheduled:
            return True
        self.prof.step()
        if self.uncounted:
            self.uncounted -= 1
            return False
        return True

    def end(self) -> Optional[str]:
        """Stop; a torch trace (and its op table) is written before this returns: its path."""
        prof = self.stop()
        return self.write(prof) if prof is not None else None

    def stop(self):
        """Stop recording (in the thread that began it: torch.profiler's callbacks are that
        thread's); the recorded profile, to `write`, where there is one (with a schedule the
        profiler writes its own)."""
        if self.config.profiler == "cuda":
            torch.cuda.profiler.stop()
            return None
        prof, self.prof = self.prof, None
        if prof is not None:
            prof.stop()
        return None if self.scheduled else prof

    def write(self, prof) -> str:
        c = self.config
        os.makedirs(c.torch_profiler_dir, exist_ok=True)
        name = f"{self.prefix}_{self.suffix}" if self.prefix else self.suffix
        final = f"{name}.{time.time_ns()}.pt.trace.json" + (".gz" if c.torch_profiler_use_gzip else "")
        tmp = os.path.join(c.torch_profiler_dir, "." + final)   # torch gzips a path ending in .gz
        prof.export_chrome_trace(tmp)
        path = os.path.join(c.torch_profiler_dir, final)
        os.replace(tmp, path)
        logger.info("profiler: %s written", path)
        if c.torch_profiler_dump_cuda_time_total:
            self._write_table(prof)
        return path

    def _write_table(self, prof) -> None:
        """The ops' time table beside the trace (vLLM's profiler_out_{rank}.txt)."""
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=100)
        except (ValueError, RuntimeError) as exc:   # torch once failed to decode an event's name here
            logger.warning("profiler: %s: no op table (%s: %s); the trace is written", self.suffix,
                           type(exc).__name__, exc)
            return
        with open(os.path.join(self.config.torch_profiler_dir, f"profiler_out_{self.suffix}.txt"), "w") as f:
            f.write(table + "\n")

    def annotate(self, name: str):
        if self.config.profiler == "cuda":
            return torch.cuda.nvtx.range(name)
        return torch.profiler.record_function(name)


class DriverProfiler:
    """The driver's side (module docstring): start / stop as asked, count the steps, annotate
    each profiled one. `publish` sends to the DP rank's peers; `peers_done` waits until each
    has written its trace."""

    def __init__(self, config: ProfilerConfig, suffix: str, cuda: bool, publish: Callable[[object], None],
                 peers_done: Callable[[], None]):
        self.config = config
        self.rank = RankProfiler(config, suffix, cuda)
        self.publish, self.peers_done = publish, peers_done
        self.active = False     # between start_profile and stop_profile
        self.running = False    # the profiler records (after the delay, before max_iterations)
        self.steps = 0          # steps since start_profile
        self.recorded = 0       # steps recorded
        self.prefix: Optional[str] = None
        self.traces: list[str] = []   # this rank's traces written so far

    def start(self, prefix: Optional[str] = None) -> None:
        if self.active:   # as vLLM: a second start is ignored
            logger.info("profiler: start_profile while profiling; ignored")
            return
        self.active, self.steps, self.recorded, self.prefix = True, 0, 0, prefix
        if self.config.delay_iterations == 0:
            try:
                self._begin()
            except BaseException:   # (a folder it cannot make) not started: a later start may be
                self.active = False
                raise

    def stop(self) -> None:
        if not self.active:   # harmless, as in vLLM
            logger.info("profiler: stop_profile without start_profile; nothing to stop")
            return
        self.active = False
        if self.running:
            self._end()

    def step(self, seqs, num_new_tokens):
        """The context manager around one engine step's forward."""
        if not self.active:
            return contextlib.nullcontext()
        c = self.config
        self.steps += 1
        if not self.running and c.delay_iterations and self.steps == c.delay_iterations:
            self._begin()
        if not self.running:
            return contextlib.nullcontext()
        name = step_annotation(seqs, num_new_tokens, c.detailed_trace_annotation)
        self.publish(ProfileStep(name))   # the peers advance their schedules with this one's
        if self.rank.step():
            self.recorded += 1
        if c.max_iterations and self.recorded > c.max_iterations:
            logger.info("profiler: %d steps recorded (max_iterations); stopping", c.max_iterations)
            self._end()
            return contextlib.nullcontext()
        return self.rank.annotate(name)

    def _begin(self) -> None:
        self.rank.begin(self.prefix)   # first: a folder it cannot make starts no rank
        self.publish(ProfileControl(True, self.prefix))
        self.running = True

    def _end(self) -> None:
        """Stop every rank; returns once each has written its trace (this rank's error, such
        as a folder it cannot write, is raised after the peers are done)."""
        self.running = False
        self.publish(ProfileControl(False))
        try:
            path = self.rank.end()
            if path:
                self.traces.append(path)
        finally:
            self.peers_done()


def driver_profiler(config, runner, executor) -> Optional[DriverProfiler]:
    """The profiler of a DP rank's driver (`runner`, publishing to the peers of `executor`),
    None without --profiler-config."""
    if config.profiler is None:
        return None
    if config.profiler.profiler == "cuda" and runner.device.type != "cuda":
        raise ValueError(f"profiler_config profiler cuda needs a CUDA device (this engine runs on "
                         f"{runner.device.type}); use profiler torch")
    return DriverProfiler(config.profiler, rank_suffix(runner.pctx), runner.device.type == "cuda",
                          runner.publish, wait_for_peers(getattr(executor, "channel", None)))


def frontend_profiler(engine) -> Optional[RankProfiler]:
    """vLLM's trace of the API server process (AsyncLLM's CPU activity, torch profiler only, unless
    ignore_frontend), for a front end of engine-core processes: an engine in this process traces
    the process itself."""
    config = engine.config.profiler
    if config is None or config.profiler != "torch" or config.ignore_frontend or engine.profiler is not None:
        return None
    # as vLLM's: CPU activity with stacks over the whole range (no engine steps here to schedule by)
    cpu_only = dataclasses.replace(config, torch_profiler_record_shapes=False, torch_profiler_with_memory=False,
                                   torch_profiler_with_flops=False, torch_profiler_dump_cuda_time_total=False,
                                   wait_iterations=0, warmup_iterations=0)
    return RankProfiler(cpu_only, f"{socket.gethostname()}_{os.getpid()}.async_llm", cuda=False)


def wait_for_peers(channel) -> Callable[[], None]:
    """`peers_done` for a driver publishing on `channel` (a StepChannel; None without peers)."""
    def wait() -> None:
        if channel is None:
            return
        ack = torch.zeros(1, dtype=torch.int64)
        for peer in channel.peers:
            dist.recv(ack, src=peer, group=channel.group, tag=ACK_TAG)
    return wait


def run_worker_steps(runner, channel, config: Optional[ProfilerConfig]) -> None:
    """A TP / PP peer's step loop: run every step its driver publishes until the stop, with
    the driver's profiler controls applied to this rank's own profiler."""
    rank = RankProfiler(config, rank_suffix(runner.pctx), runner.device.type == "cuda") if config else None
    name = None
    while not isinstance(msg := channel.recv(), Stop):
        if isinstance(msg, ProfileStep):
            rank.step()
            name = msg.name
        elif isinstance(msg, ProfileControl):
            name = None
            if msg.start:
                rank.begin(msg.prefix)
            else:
                try:
                    rank.end()
                except OSError as exc:   # the driver's own write names the folder's problem
                    logger.warning("profiler: %s: trace not written: %s", rank.suffix, exc)
                dist.send(torch.ones(1, dtype=torch.int64), dst=channel.src, group=channel.group, tag=ACK_TAG)
        elif name is not None:
            with rank.annotate(name):
                runner.run_published(msg)
            name = None
        else:
            runner.run_published(msg)
