"""One-command multi-node deployment: start Ray on the hosts of a hostfile over ssh, wait for
their GPUs, serve, and stop Ray again on exit.

The hostfile follows FlagScale's runner (`ip slots=8 type=gpu` per line, `#` comments,
blank lines allowed; `type=` gpu, cpu or the device's name, `type=A100`, an accelerator host
as gpu). A loopback address (127.0.0.1, localhost) is refused beside other hosts, which could
not reach it. The head is the local machine when it is listed (the server's rank 0
runs in this process and Ray needs a raylet beside its driver), else the first host. On
every host the YAML's `envs` are exported (and the runner's `before_start`, e.g. a conda
activation, runs first) before `ray start`, so Ray's workers inherit USE_FLAGGEMS and the
like. Other hosts are reached with `ssh -o BatchMode=yes -o ConnectTimeout=10 -p PORT
[user@]host` (a wrong key fails at once instead of prompting, an address nothing answers on
within seconds instead of at the command's timeout); `docker: NAME` runs their commands in that container,
as FlagScale does.

The head keeps its first GPU out of Ray (`--num-gpus N-1`, CUDA_VISIBLE_DEVICES without
it): the RayExecutor's rank 0 is this process on device 0, and Ray must not place a worker
actor on that same GPU. The plan (`choose_plan`) still counts every GPU.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger("deepserve")

# `type=` values: cpu hosts offer CPUs only; gpu and any other name (FlagScale's hostfiles write
# the device model, `type=A100`, and hand it to Ray as a custom resource while Ray counts the
# devices itself) offer `slots` accelerators
CPU_TYPE = "cpu"
_TYPE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
# FlagScale runner keys that mean nothing here (Ray places the workers): warned about, not errors
IGNORED_RUNNER_KEYS = ("backend", "nnodes", "nproc_per_node", "master_addr", "master_port", "rdzv_backend",
                       "no_shared_fs")
PARALLEL_KEYS = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                 "enable_expert_parallel")
# no password prompt; a host that does not answer fails in seconds, naming the connection
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


# --------------------------------------------------------------------------- hostfile
@dataclass(frozen=True)
class HostSpec:
    """One hostfile line: where, how many devices (slots) and of which type."""

    address: str
    slots: int
    type: str = "gpu"
    line: int = 0

    @property
    def gpus(self) -> int:
        return 0 if self.type == CPU_TYPE else self.slots


def resolves(name: str) -> bool:
    """Whether this machine can look up host `name` (ssh and Ray would reach it by that name)."""
    try:
        socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return False
    return True


def _check_address(token: str, where: str) -> str:
    try:   # an IPv6 address may come in the brackets of a URL ([fd00::2])
        address = ipaddress.ip_address(token[1:-1] if token[:1] + token[-1:] == "[]" else token)
        if token[:1] != "[" or address.version == 6:
            return str(address)
    except ValueError:
        pass
    # a name opening with a number and a dot (300.1.2.3, 10.0.0, 10.0.0.x) is a mistyped IP
    if re.match(r"[0-9]+\.", token) or not _HOSTNAME.fullmatch(token):
        raise ValueError(f"{where}: bad IP address or host name {token!r}")
    if not resolves(token):   # a guide's placeholder (x.x.x.x, xxxx) left in, or a typo
        raise ValueError(f"{where}: {token!r} is neither an IP address nor a host name this machine resolves "
                         "(a placeholder left in the hostfile?)")
    return token.lower()   # host names know no case: GPU-NODE01 is gpu-node01, and this machine's own name


def parse_hostfile_text(text: str, source: str = "hostfile") -> list[HostSpec]:
    """Hosts of a FlagScale hostfile; errors name the file, line number and bad value."""
    hosts: list[HostSpec] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        tokens = line.split()
        address = _check_address(tokens[0], where)
        slots, kind = None, "gpu"
        for token in tokens[1:]:
            key, sep, value = token.partition("=")
            if not sep or not value:
                raise ValueError(f"{where}: expected key=value after the address, got {token!r} in {raw.strip()!r}")
            if key == "slots":
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"{where}: slots must be a positive integer, got {value!r}")
                slots = int(value)
            elif key == "type":
                if not _TYPE_NAME.fullmatch(value):
                    raise ValueError(f"{where}: bad type {value!r} (gpu, cpu, or the device's name such as A100)")
                kind = value.lower() if value.lower() in ("gpu", CPU_TYPE) else value
            else:
                raise ValueError(f"{where}: unknown key {key!r} (known: slots, type)")
        if slots is None:
            raise ValueError(f"{where}: missing slots=N for host {address!r}")
        if address in seen:
            raise ValueError(f"{where}: host {address!r} already listed on line {seen[address]}")
        seen[address] = number
        hosts.append(HostSpec(address, slots, kind, number))
    if not hosts:
        raise ValueError(f"{source}: no hosts listed")
    loopback = next((h for h in hosts if is_loopback(h.address)), None)
    if loopback is not None and len(hosts) > 1:
        raise ValueError(f"{source}:{loopback.line}: {loopback.address} is a loopback address, which the other "
                         "hosts cannot reach (their `ray start --address` would dial themselves): list this "
                         "machine by its address on the network the hosts share")
    return hosts


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`: this machine as only it can reach itself."""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address.lower() == "localhost"


def parse_hostfile(path: str | Path) -> list[HostSpec]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"hostfile {path} is a folder: give the file listing the hosts (`ip slots=8 type=gpu` lines)")
    if not path.is_file():
        raise FileNotFoundError(f"hostfile {path} not found")
    try:   # utf-8-sig: a byte-order mark (a hostfile saved by a Windows editor) is not part of line 1
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"hostfile {path} is not a text file (not UTF-8)") from None
    return parse_hostfile_text(text, str(path))


# --------------------------------------------------------------------------- options
@dataclass
class RunnerOptions:
    """How to reach the hosts (FlagScale's `experiment.runner` keys, plus a few of ours)."""

    hostfile: Optional[str] = None
    ssh_command: str = "ssh"          # e.g. "ssh -i ~/.ssh/cluster_key"
    ssh_port: int = 22
    ssh_user: Optional[str] = None
    docker: Optional[str] = None      # run remote commands inside this container
    before_start: Optional[str] = None  # shell run before ray start/stop on every host
    ray_port: int = 6379
    wait_timeout_s: float = 300.0     # how long the GPUs may take to join
    gpu_memory: Optional[str] = None  # e.g. "80GiB"; default: read from this machine's GPU 0
    command_timeout_s: float = 120.0  # per ssh / ray start command

    @classmethod
    def from_mapping(cls, data: dict, source: str = "runner") -> "RunnerOptions":
        known = {f.name: f for f in fields(cls)}
        out = cls()
        for key, value in data.items():
            key = str(key).replace("-", "_")
            if key in IGNORED_RUNNER_KEYS:
                logger.warning("%s: ignoring runner.%s (Ray places the workers)", source, key)
                continue
            if key not in known:
                raise ValueError(f"{source}: unknown runner key {key!r}; known: {', '.join(known)}")
            if value is None or value is False:
                continue   # FlagScale tests these keys for truth: `docker: false` is no container
            setattr(out, key, _runner_value(value, getattr(out, key), f"{source}: runner.{key}"))
        for key in ("ssh_port", "ray_port"):
            if not 0 < getattr(out, key) < 65536:
                raise ValueError(f"{source}: runner.{key} must be in [1, 65535], got {getattr(out, key)}")
        if out.wait_timeout_s <= 0 or out.command_timeout_s <= 0:
            raise ValueError(f"{source}: timeouts must be positive, got wait_timeout_s={out.wait_timeout_s}, "
                             f"command_timeout_s={out.command_timeout_s}")
        if out.gpu_memory is not None:
            from deepserve.distributed.plan import parse_size

            if re.fullmatch(r"\s*[0-9.]+\s*", out.gpu_memory):   # `gpu_memory: 80` would be 80 bytes
                raise ValueError(f"{source}: runner.gpu_memory {out.gpu_memory} has no unit: write e.g. 80GiB")
            try:
                parse_size(out.gpu_memory)   # here, naming the file, rather than at the plan
            except ValueError as exc:
                raise ValueError(f"{source}: runner.gpu_memory: {exc}") from None
        return out


def _runner_value(value, default, where: str):
    """A runner key's YAML value as the type of its default: a number (a string of one too, as
    FlagScale's shell lines take it), else a string; a list, mapping or `true` is a one-line error."""
    if isinstance(default, (int, float)):
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or \
                (isinstance(default, int) and number != int(number)):
            raise ValueError(f"{where} must be {'an integer' if isinstance(default, int) else 'a number'}, "
                             f"got {value!r}")
        return type(default)(number)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return str(value)


# --------------------------------------------------------------------------- Ray client
def ray_token_auth_as_started(address: Optional[str]) -> None:
    """Before joining the Ray cluster at `address` (host:port): a cluster that `ray start` began
    where a token exists (~/.ray/auth_token, which Ray writes the first time a process starts a
    local instance, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) has token authentication on, and Ray
    sends the token to a cluster it finds by itself on this machine but never to one named by
    address, which then refuses the client over and over ("Authentication token is missing").
    When the address is this machine's, the token `ray start` read here is the cluster's: Ray's
    own check for a local cluster runs. A RAY_AUTH_MODE set by the user is left as it is."""
    host = (address or "").split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if not host or host not in local_addresses():
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:   # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


# --------------------------------------------------------------------------- local host
def local_addresses() -> set[str]:
    """This machine's names and interface addresses, read locally (no packet is sent)."""
    names = {"127.0.0.1", "::1", "localhost", socket.gethostname().lower()}
    try:
        import psutil
        names.update(a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs)
        return names
    except ImportError:
        pass
    try:
        import fcntl
        import struct
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _, name in socket.if_nameindex():
                try:  # SIOCGIFADDR: the interface's IPv4 address
                    packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
                except OSError:
                    continue
                names.add(socket.inet_ntoa(packed[20:24]))
    except (ImportError, OSError) as exc:
        logger.debug("could not list interface addresses: %s", exc)
    return names


# --------------------------------------------------------------------------- commands
@dataclass
class Step:
    """One command run on one host."""

    host: HostSpec
    role: str                  # "head" or "worker"
    argv: list[str]

    def render(self) -> str:
        return shlex.join(self.argv)


Runner = Callable[[list[str], float], "tuple[int, str]"]


def run_command(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run argv here (ssh for the other hosts), returning (exit code, stdout+stderr)."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout_s:.0f} s"
    except FileNotFoundError as exc:
        return 127, str(exc)
    return proc.returncode, proc.stdout + proc.stderr


@dataclass
class ClusterLauncher:
    """The command plan for a hostfile, and the start / wait / stop around serving."""

    hosts: list[HostSpec]
    options: RunnerOptions = field(default_factory=RunnerOptions)
    envs: dict[str, str] = field(default_factory=dict)
    local: Optional[set[str]] = None                    # default: local_addresses()
    runner: Runner = run_command
    resources_fn: Optional[Callable[[], dict]] = None   # default: ray.cluster_resources
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    poll_s: float = 2.0
    started: list[Step] = field(default_factory=list)
    _old_term: object = None

    def __post_init__(self):
        if self.local is None:
            self.local = local_addresses()
        here = [h for h in self.hosts if h.address in self.local]
        if len(here) > 1:   # a second `ray start` on the head's machine: two Ray nodes sharing its GPUs
            raise ValueError(f"hostfile lines {here[0].line} ({here[0].address}) and {here[1].line} "
                             f"({here[1].address}) both name this machine: list it once")
        self.head = here[0] if here else self.hosts[0]

    # ----------------------------------------------------------------- the plan
    @property
    def head_is_local(self) -> bool:
        return self.head.address in self.local

    @property
    def address(self) -> str:
        host = self.head.address
        return f"[{host}]:{self.options.ray_port}" if ":" in host else f"{host}:{self.options.ray_port}"

    @property
    def total_gpus(self) -> int:
        return sum(h.gpus for h in self.hosts)

    @property
    def ray_gpus(self) -> int:
        """GPUs Ray offers to worker actors: all but the driver's on the head."""
        return self.total_gpus - (1 if self.head.gpus else 0)

    def _shell(self, host: HostSpec, command: str, envs: dict[str, str]) -> list[str]:
        parts = [self.options.before_start] if self.options.before_start else []
        if envs:
            parts.append("export " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in envs.items()))
        line = " && ".join(parts + [command])
        if host.address in self.local:
            return ["bash", "-c", line]
        if self.options.docker:
            line = f"docker exec {shlex.quote(self.options.docker)} bash -c {shlex.quote(line)}"
        target = f"{self.options.ssh_user}@{host.address}" if self.options.ssh_user else host.address
        return [*shlex.split(self.options.ssh_command), *SSH_OPTIONS, "-p", str(self.options.ssh_port),
                target, line]

    def _ray_start(self, host: HostSpec) -> tuple[str, dict[str, str]]:
        envs = {str(k): str(v) for k, v in self.envs.items()}
        gpus = host.gpus
        if host is self.head:
            cmd = f"ray start --head --port {self.options.ray_port}"
            if gpus:  # device 0 stays with the driver (rank 0); Ray hands out the others
                visible = envs.get("CUDA_VISIBLE_DEVICES")
                ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
                envs["CUDA_VISIBLE_DEVICES"] = ",".join(ids[1:gpus])
                gpus -= 1
        else:
            cmd = f"ray start --address {self.address}"
        cmd += f" --num-gpus {gpus}"
        if host.type == CPU_TYPE:
            cmd += f" --num-cpus {host.slots}"
        try:  # Ray registers nodes by IP: pin it, so multi-NIC hosts join with the listed one
            ipaddress.ip_address(host.address)
            cmd += f" --node-ip-address {host.address}"
        except ValueError:
            pass
        return cmd, envs

    def start_steps(self) -> list[Step]:
        workers = [h for h in self.hosts if h is not self.head]
        steps = [Step(self.head, "head", self._shell(self.head, *self._ray_start(self.head)))]
        return steps + [Step(h, "worker", self._shell(h, *self._ray_start(h))) for h in workers]

    def stop_steps(self, steps: Optional[list[Step]] = None) -> list[Step]:
        """`ray stop` on the hosts of `steps` (default: all), workers first, the head last."""
        steps = self.start_steps() if steps is None else steps
        return [Step(s.host, s.role, self._shell(s.host, "ray stop", {})) for s in reversed(steps)]

    def describe(self) -> str:
        lines = [f"Ray head: {self.head.address}" + (" (this machine)" if self.head_is_local else
                 " (not this machine: run `deepserve serve` on it, the server's rank 0 runs beside the head)"),
                 f"GPUs: {self.total_gpus} on {len(self.hosts)} hosts ({self.ray_gpus} for Ray workers, "
                 f"1 for the server's rank 0)" if self.head.gpus else f"GPUs: {self.total_gpus}", "", "start:"]
        lines += [f"  [{s.host.address} {s.role}] {s.render()}" for s in self.start_steps()]
        lines += ["", f"wait: until ray.cluster_resources() at {self.address} shows GPU >= {self.ray_gpus} and "
                  f"every host (up to {self.options.wait_timeout_s:.0f} s)", "", "stop (on exit):"]
        lines += [f"  [{s.host.address} {s.role}] {s.render()}" for s in self.stop_steps()]
        return "\n".join(lines)

    # ----------------------------------------------------------------- actions
    def start(self) -> None:
        """Run `ray start` host by host; on a failure stop the ones started and raise."""
        for step in self.start_steps():
            logger.info("starting Ray %s on %s", step.role, step.host.address)
            code, output = self.runner(step.argv, self.options.command_timeout_s)
            if code != 0:
                tail = " | ".join(output.strip().splitlines()[-3:])
                self.stop()
                raise RuntimeError(f"ray start failed on {step.host.address} (hostfile line {step.host.line}, "
                                   f"exit {code}): {tail or 'no output'}")
            self.started.append(step)

    def stop(self) -> None:
        ray = sys.modules.get("ray")
        if self.started and ray is not None and ray.is_initialized():
            ray.shutdown()  # leave the cluster before its nodes go away
        for step in self.stop_steps(self.started):
            logger.info("stopping Ray %s on %s", step.role, step.host.address)
            code, output = self.runner(step.argv, self.options.command_timeout_s)
            if code != 0:
                logger.warning("ray stop on %s failed (exit %d): %s", step.host.address, code, output.strip())
        self.started = []

    def _node_keys(self, host: HostSpec) -> set[str]:
        """cluster_resources() keys that show `host` joined: Ray names nodes `node:IP`, and a
        local host may register under any of this machine's addresses (Ray picks the interface)."""
        if host.address in self.local:
            return {f"node:{a}" for a in self.local}
        try:
            ipaddress.ip_address(host.address)
            return {f"node:{host.address}"}
        except ValueError:
            pass
        try:  # a host name is resolved once, here
            return {f"node:{socket.gethostbyname(host.address)}", f"node:{host.address}"}
        except OSError:
            return {f"node:{host.address}"}

    def _default_resources(self) -> dict:
        import ray
        if not ray.is_initialized():
            ray_token_auth_as_started(self.address)
            ray.init(address=self.address, log_to_driver=False, ignore_reinit_error=True)
            self._trap_sigterm()  # Ray's core worker just put its own (fatal) SIGTERM handler in
        return ray.cluster_resources()

    def wait(self) -> dict:
        """Poll the cluster until it has `ray_gpus` GPUs and every host; TimeoutError names the missing."""
        resources_fn = self.resources_fn or self._default_resources
        deadline = self.clock() + self.options.wait_timeout_s
        keys = {h.address: self._node_keys(h) for h in self.hosts}
        while True:
            resources = resources_fn()
            missing = [h for h in self.hosts if not keys[h.address] & resources.keys()]
            gpus = int(resources.get("GPU", 0))
            if gpus >= self.ray_gpus and not missing:
                return resources
            if self.clock() >= deadline:
                names = ", ".join(f"{h.address} (line {h.line}, slots={h.slots})" for h in missing)
                raise TimeoutError(
                    f"Ray cluster at {self.address} has {gpus} of {self.ray_gpus} GPUs after "
                    f"{self.options.wait_timeout_s:.0f} s; " + (f"hosts not joined: {names}" if missing else
                                                                 "every host joined but some GPUs are missing"))
            self.sleep(self.poll_s)

    def _trap_sigterm(self) -> None:
        """SIGTERM's default kills without unwinding: make it an exit that runs __exit__."""
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _exit_on_signal)
            if self._old_term is None:
                self._old_term = previous

    def __enter__(self) -> "ClusterLauncher":
        self._old_term = None
        self._trap_sigterm()
        try:
            self.start()
            self.wait()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)
