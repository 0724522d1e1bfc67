"""Multi-node deployment from a hostfile: parsing, the exact ssh / ray command plan, the wait
for GPUs, the YAML wiring, and stopping Ray on exit. No real ssh and no address but loopback
is contacted: hosts are in TEST-NET-1 (192.0.2.0/24, never routed) and ssh is faked."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import textwrap

import pytest

from deepserve.cli.serve import register, resolve_all
from deepserve.config import load_hf_config
from deepserve.distributed.cluster import (ClusterLauncher, HostSpec, RunnerOptions, parse_hostfile,
                                           parse_hostfile_text, run_command)
from deepserve.distributed.cluster_serve import serve_on_cluster
from deepserve.distributed.plan import choose_plan
from deepserve.server.config_file import load_serve_config

HOSTFILE = """\
# ip slots type=xxx[optional]
# master node
192.0.2.1 slots=8 type=gpu

192.0.2.2 slots=8   # worker node, type defaults to gpu
"""
HEAD_CMD = ("export CUDA_DEVICE_MAX_CONNECTIONS=1 USE_FLAGGEMS=1 CUDA_VISIBLE_DEVICES=1,2,3,4,5,6,7 && "
            "ray start --head --port 6379 --num-gpus 7 --node-ip-address 192.0.2.1")
WORKER_CMD = ("export CUDA_DEVICE_MAX_CONNECTIONS=1 USE_FLAGGEMS=1 && "
              "ray start --address 192.0.2.1:6379 --num-gpus 8 --node-ip-address 192.0.2.2")
ENVS = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "USE_FLAGGEMS": "1"}
FULL = {"GPU": 15.0, "node:192.0.2.1": 1.0, "node:192.0.2.2": 1.0}


class FakeRunner:
    """Records every argv instead of running it; fails on hosts named in `fail`."""

    def __init__(self, fail=()):
        self.calls: list[list[str]] = []
        self.fail = set(fail)

    def __call__(self, argv, timeout_s):
        self.calls.append(list(argv))
        if any(h in " ".join(argv) and "ray start" in argv[-1] for h in self.fail):
            return 255, "ssh: connect to host 192.0.2.2 port 22: Connection refused\n"
        return 0, "ok"


def launcher(hostfile=HOSTFILE, local=frozenset(), runner=None, resources=None, **options):
    return ClusterLauncher(parse_hostfile_text(hostfile), RunnerOptions(**options), dict(ENVS), set(local),
                           runner=runner or FakeRunner(), resources_fn=resources or (lambda: dict(FULL)),
                           sleep=lambda s: None)


# --------------------------------------------------------------------------- hostfile
def test_hostfile_good_lines(monkeypatch):
    monkeypatch.setattr("deepserve.distributed.cluster.resolves", lambda name: name == "node-03.cluster")
    text = HOSTFILE + "node-03.cluster slots=4 type=CPU\n2001:db8::5 slots=2\n[2001:db8::6] slots=2\n"
    assert parse_hostfile_text(text) == [
        HostSpec("192.0.2.1", 8, "gpu", 3), HostSpec("192.0.2.2", 8, "gpu", 5),
        HostSpec("node-03.cluster", 4, "cpu", 6), HostSpec("2001:db8::5", 2, "gpu", 7),
        HostSpec("2001:db8::6", 2, "gpu", 8)]   # an IPv6 address in brackets is read as the address
    assert [h.gpus for h in parse_hostfile_text(text)] == [8, 8, 0, 2, 2]


@pytest.mark.parametrize("line, message", [
    ("300.1.2.3 slots=8 type=gpu", "hosts:2: bad IP address or host name '300.1.2.3'"),
    ("10.0.0 slots=8", "hosts:2: bad IP address or host name '10.0.0'"),
    ("10.0.0.x slots=8", "hosts:2: bad IP address or host name '10.0.0.x'"),
    ("[192.0.2.9] slots=8", "hosts:2: bad IP address or host name '[192.0.2.9]'"),
    ("bad_host! slots=8", "hosts:2: bad IP address or host name 'bad_host!'"),
    ("192.0.2.9 type=gpu", "hosts:2: missing slots=N for host '192.0.2.9'"),
    ("192.0.2.9 slots=0", "hosts:2: slots must be a positive integer, got '0'"),
    ("192.0.2.9 slots=eight", "hosts:2: slots must be a positive integer, got 'eight'"),
    ("192.0.2.9 slots=8 type=xxx[optional]", "hosts:2: bad type 'xxx[optional]' (gpu, cpu, or the device's name"),
    ("192.0.2.9 slots=8 gpus=2", "hosts:2: unknown key 'gpus' (known: slots, type)"),
    ("192.0.2.9 8", "hosts:2: expected key=value after the address, got '8'"),
    ("192.0.2.1 slots=4", "hosts:2: host '192.0.2.1' already listed on line 1"),
])
def test_hostfile_bad_lines_name_the_line(line, message):
    with pytest.raises(ValueError) as err:
        parse_hostfile_text(f"192.0.2.1 slots=8\n{line}\n", "hosts")
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("placeholder", ["x.x.x.x", "xxxx", "<ip>"])
def test_hostfile_placeholder_hosts_are_refused(placeholder, tmp_path, monkeypatch):
    """A guide's placeholder left in the hostfile (FlagOS guides write `x.x.x.x slots=8`) names
    the file, line and value instead of planning ssh to it."""
    looked_up = []

    def unknown(name, *args, **kwargs):   # no network: every name is unknown
        looked_up.append(name)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr("deepserve.distributed.cluster.socket.getaddrinfo", unknown)
    path = tmp_path / "hostfile.txt"
    path.write_text(f"192.0.2.1 slots=8 type=gpu\n{placeholder} slots=8 type=gpu\n")
    with pytest.raises(ValueError) as err:
        parse_hostfile(path)
    assert str(err.value).startswith(f"{path}:2: ") and repr(placeholder) in str(err.value)
    assert "\n" not in str(err.value) and "192.0.2.1" not in looked_up


def test_hostfile_empty_or_missing(tmp_path):
    with pytest.raises(ValueError, match="hosts: no hosts listed"):
        parse_hostfile_text("# only a comment\n\n", "hosts")
    with pytest.raises(FileNotFoundError, match="nowhere.txt not found"):
        parse_hostfile(tmp_path / "nowhere.txt")


def test_hostfile_device_type_names_are_accelerator_hosts():
    """FlagScale's hostfiles name the device (`type=A100`; the guide's comment says `type=xxx`) and
    FlagScale hands it to Ray as a resource while Ray counts the devices: any type is a GPU host."""
    hosts = parse_hostfile_text("192.0.2.1 slots=8 type=H100\n192.0.2.7 slots=4 type=C550\n", "hosts")
    assert [(h.type, h.gpus) for h in hosts] == [("H100", 8), ("C550", 4)]
    cl = ClusterLauncher(hosts, RunnerOptions(), {}, {"192.0.2.1"})
    assert (cl.total_gpus, cl.ray_gpus) == (12, 11)
    assert [s.argv[-1].split(" && ")[-1] for s in cl.start_steps()] == [
        "ray start --head --port 6379 --num-gpus 7 --node-ip-address 192.0.2.1",
        "ray start --address 192.0.2.1:6379 --num-gpus 4 --node-ip-address 192.0.2.7"]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.1.1", "::1", "localhost", "LOCALHOST"])
def test_hostfile_loopback_beside_other_hosts_is_refused(address):
    """The master line filled in as 127.0.0.1 (or localhost): every other host's `ray start
    --address 127.0.0.1:6379` dialled itself and failed after Ray's retries, naming no cause.
    Alone it is this machine, as before."""
    with pytest.raises(ValueError) as err:
        parse_hostfile_text(f"# master node\n{address} slots=8 type=gpu\n192.0.2.2 slots=8 type=gpu\n", "hosts")
    assert str(err.value).startswith(f"hosts:2: {address.lower()} is a loopback address, which the other hosts "
                                     "cannot reach")
    assert [h.address for h in parse_hostfile_text(f"{address} slots=8\n")] == [address.lower()]


def test_hostfile_host_names_know_no_case(monkeypatch):
    """This machine listed by its name in capitals (GPU-NODE01 where `hostname` says gpu-node01):
    host names match whatever their case, as DNS names do."""
    monkeypatch.setattr("deepserve.distributed.cluster.resolves", lambda name: True)
    monkeypatch.setattr("deepserve.distributed.cluster.socket.gethostname", lambda: "Gpu-Node01")
    hosts = parse_hostfile_text("GPU-NODE02 slots=8\nGPU-NODE01 slots=8\n")
    assert [h.address for h in hosts] == ["gpu-node02", "gpu-node01"]
    cl = ClusterLauncher(hosts, RunnerOptions(), {})
    assert cl.head_is_local and cl.head.address == "gpu-node01"


def test_hostfile_two_lines_naming_this_machine_are_refused():
    """Its name and its address on two lines: the second line's `ray start` ran on this machine
    beside the head's, a second Ray node offering the same GPUs."""
    hosts = parse_hostfile_text("192.0.2.1 slots=8\n192.0.2.7 slots=8\n192.0.2.8 slots=8\n")
    with pytest.raises(ValueError, match=r"^hostfile lines 1 \(192.0.2.1\) and 3 \(192.0.2.8\) both name this "
                                         r"machine: list it once$"):
        ClusterLauncher(hosts, RunnerOptions(), {}, {"192.0.2.1", "192.0.2.8"})


def test_hostfile_with_a_byte_order_mark_or_not_text(tmp_path):
    """A hostfile saved by a Windows editor (UTF-8 with a BOM, CRLF line ends) reads as the same
    file without them; one that is not UTF-8 is one line naming the file."""
    path = tmp_path / "hostfile.txt"
    path.write_bytes("# master node\r\n192.0.2.1 slots=8 type=gpu\r\n192.0.2.2 slots=8\r\n".encode("utf-8-sig"))
    assert parse_hostfile(path) == [HostSpec("192.0.2.1", 8, "gpu", 2), HostSpec("192.0.2.2", 8, "gpu", 3)]
    path.write_bytes("192.0.2.1 slots=8\n".encode("utf-16"))
    with pytest.raises(ValueError, match=f"^hostfile {path} is not a text file \\(not UTF-8\\)$"):
        parse_hostfile(path)


# --------------------------------------------------------------------------- command plan
def test_command_plan_two_hosts_via_runner():
    """ssh gives up on a host that does not answer after 10 s (a hostfile address filled in
    wrong), well inside the command's timeout."""
    runner = FakeRunner()
    cl = launcher(runner=runner, ssh_user="root", ssh_port=2222)
    assert cl.head.address == "192.0.2.1" and cl.address == "192.0.2.1:6379"
    assert (cl.total_gpus, cl.ray_gpus) == (16, 15)
    with cl:
        started = list(runner.calls)
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", "2222"]
    assert started == [ssh + ["root@192.0.2.1", HEAD_CMD], ssh + ["root@192.0.2.2", WORKER_CMD]]
    # on exit: ray stop, workers first, the head last
    assert runner.calls[2:] == [ssh + ["root@192.0.2.2", "ray stop"], ssh + ["root@192.0.2.1", "ray stop"]]


def test_local_host_is_head_and_runs_without_ssh():
    text = "192.0.2.7 slots=4\n192.0.2.10 slots=2\n"
    cl = launcher(text, local={"192.0.2.10"}, ssh_command="ssh -i /keys/id", docker="box",
                  before_start="source /opt/env/bin/activate")
    steps = cl.start_steps()
    assert [(s.host.address, s.role) for s in steps] == [("192.0.2.10", "head"), ("192.0.2.7", "worker")]
    assert steps[0].argv == ["bash", "-c", "source /opt/env/bin/activate && export CUDA_DEVICE_MAX_CONNECTIONS=1 "
                             "USE_FLAGGEMS=1 CUDA_VISIBLE_DEVICES=1 && ray start --head --port 6379 --num-gpus 1 "
                             "--node-ip-address 192.0.2.10"]
    inner = ("source /opt/env/bin/activate && export CUDA_DEVICE_MAX_CONNECTIONS=1 USE_FLAGGEMS=1 && "
             "ray start --address 192.0.2.10:6379 --num-gpus 4 --node-ip-address 192.0.2.7")
    assert steps[1].argv == ["ssh", "-i", "/keys/id", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", "22",
                             "192.0.2.7", f"docker exec box bash -c '{inner}'"]


def test_head_keeps_first_of_user_visible_devices():
    cl = ClusterLauncher(parse_hostfile_text("192.0.2.1 slots=3\n"), RunnerOptions(),
                         {"CUDA_VISIBLE_DEVICES": "4,5,6"}, set())
    assert cl.start_steps()[0].argv[-1] == ("export CUDA_VISIBLE_DEVICES=5,6 && ray start --head --port 6379 "
                                            "--num-gpus 2 --node-ip-address 192.0.2.1")


def test_start_failure_names_host_and_stops_started_hosts():
    runner = FakeRunner(fail={"192.0.2.2"})
    cl = launcher(runner=runner)
    with pytest.raises(RuntimeError) as err:
        with cl:
            pytest.fail("must not serve when a host failed")
    assert str(err.value) == ("ray start failed on 192.0.2.2 (hostfile line 5, exit 255): "
                              "ssh: connect to host 192.0.2.2 port 22: Connection refused")
    assert [c[-2:] for c in runner.calls[2:]] == [["192.0.2.1", "ray stop"]]


def test_fake_ssh_binary_records_argv(tmp_path):
    """The real subprocess runner with a fake ssh program in place of ssh."""
    log = tmp_path / "ssh.log"
    fake = tmp_path / "fake_ssh.py"
    fake.write_text(f"import json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    cl = ClusterLauncher(parse_hostfile_text(HOSTFILE), RunnerOptions(ssh_command=f"{sys.executable} {fake}"),
                         dict(ENVS), set(), resources_fn=lambda: dict(FULL))
    with cl:
        pass
    got = [json.loads(line) for line in log.read_text().splitlines()]
    opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", "22"]
    assert got == [opts + ["192.0.2.1", HEAD_CMD], opts + ["192.0.2.2", WORKER_CMD],
                   opts + ["192.0.2.2", "ray stop"], opts + ["192.0.2.1", "ray stop"]]
    assert run_command([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], 30) == (3, "x\n")


# --------------------------------------------------------------------------- wait
def test_wait_times_out_naming_missing_hosts():
    now = [0.0]
    polls = []

    def resources():
        polls.append(now[0])
        return {"GPU": 7.0, "CPU": 64.0, "node:192.0.2.1": 1.0}

    cl = launcher(resources=resources, wait_timeout_s=10)
    cl.clock = lambda: now[0]
    cl.sleep = lambda s: now.__setitem__(0, now[0] + s)
    with pytest.raises(TimeoutError) as err:
        cl.wait()
    assert str(err.value) == ("Ray cluster at 192.0.2.1:6379 has 7 of 15 GPUs after 10 s; "
                              "hosts not joined: 192.0.2.2 (line 5, slots=8)")
    assert polls == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_wait_returns_once_all_gpus_joined():
    answers = iter([{"GPU": 7.0, "node:192.0.2.1": 1.0}, {"GPU": 7.0, "node:192.0.2.1": 1.0}, dict(FULL)])
    cl = launcher(resources=lambda: next(answers))
    assert cl.wait() == FULL


# --------------------------------------------------------------------------- YAML wiring
def _write_yaml(tmp_path, body: str):
    (tmp_path / "hostfile.txt").write_text(HOSTFILE)
    path = tmp_path / "r1.yaml"
    path.write_text(textwrap.dedent(body))
    return path


FLAGSCALE_YAML = """\
experiment:
  runner:
    hostfile: hostfile.txt
    ssh_port: 2222
    nnodes: 2
  envs:
    CUDA_DEVICE_MAX_CONNECTIONS: 1
  cmds:
    before_start: source /opt/env/bin/activate
serve:
  - serve_id: vllm_model
    engine: vllm
    engine_args:
      model: deepseek-r1
      max_model_len: 4096
      quantization: fp8
    envs:
      USE_FLAGGEMS: 1
    runner:
      gpu_memory: 80GiB
"""


def test_yaml_runner_from_flagscale_places(tmp_path):
    config = load_serve_config(_write_yaml(tmp_path, FLAGSCALE_YAML))
    assert config.runner == RunnerOptions(hostfile=str(tmp_path / "hostfile.txt"), ssh_port=2222,
                                          before_start="source /opt/env/bin/activate", gpu_memory="80GiB")
    assert config.envs == ENVS
    assert config.engine_args == {"model": "deepseek-r1", "max_model_len": 4096, "quantization": "fp8"}


def test_yaml_hostfile_key_and_errors(tmp_path):
    path = _write_yaml(tmp_path, "hostfile: hostfile.txt\nengine_args:\n  model: deepseek-r1\n")
    assert load_serve_config(path).runner == RunnerOptions(hostfile=str(tmp_path / "hostfile.txt"))
    path.write_text("engine_args: {model: m}\nrunner: {hostfile: hostfile.txt, ssh_prot: 22}\n")
    with pytest.raises(ValueError, match="unknown runner key 'ssh_prot'"):
        load_serve_config(path)
    path.write_text("engine_args: {model: m}\nhostfile: missing.txt\n")
    with pytest.raises(FileNotFoundError, match="hostfile missing.txt not found"):
        load_serve_config(path)
    path.write_text("engine_args: {model: m}\nrunner: {hostfile: hostfile.txt, ssh_port: 70000}\n")
    with pytest.raises(ValueError, match=r"runner.ssh_port must be in \[1, 65535\], got 70000"):
        load_serve_config(path)
    path.write_text("engine_args: {model: m}\n")
    assert load_serve_config(path).runner is None


def test_yaml_runner_values_as_flagscale_reads_them(tmp_path):
    """runner values read as FlagScale reads them: `docker: false` (the metax guide's, where the
    containers reach each other) runs no docker exec, numbers given as text are numbers, and an
    ssh_port that is not an integer (a list, true, 22.5) or a list before_start is one line."""
    path = _write_yaml(tmp_path, "engine_args: {model: m}\nrunner: {hostfile: hostfile.txt, docker: false, "
                                 "ssh_port: '2222', wait_timeout_s: '1e3'}\n")
    assert load_serve_config(path).runner == RunnerOptions(hostfile=str(tmp_path / "hostfile.txt"), ssh_port=2222,
                                                           wait_timeout_s=1000.0)
    for value, message in [("[22]", "runner.ssh_port must be an integer, got [22]"),
                           ("true", "runner.ssh_port must be an integer, got True"),
                           ("22.5", "runner.ssh_port must be an integer, got 22.5"),
                           (".nan", "runner.ssh_port must be an integer, got nan"),
                           # a size needs its unit
                           ("22, gpu_memory: 80", "runner.gpu_memory 80 has no unit: write e.g. 80GiB"),
                           ("22, gpu_memory: 80 gigs", "runner.gpu_memory: memory size '80 gigs' not understood")]:
        path.write_text(f"engine_args: {{model: m}}\nrunner: {{hostfile: hostfile.txt, ssh_port: {value}}}\n")
        with pytest.raises(ValueError, match=f"^{path}: {re.escape(message)}"):
            load_serve_config(path)
    path.write_text("engine_args: {model: m}\nrunner: {hostfile: hostfile.txt, before_start: [a, b], docker: box}\n")
    with pytest.raises(ValueError, match=r"runner.before_start must be a string, got \['a', 'b'\]$"):
        load_serve_config(path)


def _parse(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_cli_hostfile_flag_overrides_yaml(tmp_path, monkeypatch):
    path = _write_yaml(tmp_path, FLAGSCALE_YAML)
    other = tmp_path / "other.txt"
    other.write_text("127.0.0.1 slots=2\n")
    engine, _, envs, runner = resolve_all(_parse([str(path), "--hostfile", str(other), "--max-model-len", "2048"]))
    assert (runner.hostfile, runner.ssh_port, engine["max_model_len"]) == (str(other), 2222, 2048)
    # `--hostfile=~/other.txt`: the shell leaves that ~, which is read as the home folder
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_all(_parse(["deepseek-r1", "--hostfile=~/other.txt"]))[3].hostfile == str(other)
    with pytest.raises(ValueError, match=f"^hostfile {tmp_path} is a folder: give the file listing the hosts"):
        parse_hostfile(tmp_path)
    _, _, _, runner = resolve_all(_parse(["deepseek-r1", "--hostfile", str(other)]))
    assert runner == RunnerOptions(hostfile=str(other))
    assert resolve_all(_parse(["deepseek-r1"]))[3] is None


def test_dry_run_prints_commands_host_by_host(tmp_path, capsys, monkeypatch):
    # this machine is none of the listed hosts, whatever its interfaces are
    monkeypatch.setattr("deepserve.distributed.cluster.local_addresses", lambda: {"127.0.0.1"})
    for name in ENVS:  # serve exports the YAML's envs into this process: undo them afterwards
        monkeypatch.setenv(name, "0")
    args = _parse([str(_write_yaml(tmp_path, FLAGSCALE_YAML)), "--dry-run"])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    pre = "source /opt/env/bin/activate && "
    ssh = "ssh -o BatchMode=yes -o ConnectTimeout=10 -p 2222"
    assert f"  [192.0.2.1 head] {ssh} 192.0.2.1 '{pre}{HEAD_CMD}'" in out
    assert f"  [192.0.2.2 worker] {ssh} 192.0.2.2 '{pre}{WORKER_CMD}'" in out
    assert out.index(f"  [192.0.2.2 worker] {ssh} 192.0.2.2 '{pre}ray stop'") < \
        out.index(f"  [192.0.2.1 head] {ssh} 192.0.2.1 '{pre}ray stop'")
    plan = choose_plan(load_hf_config("deepseek-r1"), 16, 80 << 30, nodes=2, quantization="fp8",
                       max_model_len=4096)
    sizes = " ".join(f"{k}={v}" for k, v in sorted(plan.parallel_args().items()))
    serve_line = next(line for line in out if line.startswith("serve: "))
    assert serve_line.startswith("serve: RAY_ADDRESS=192.0.2.1:6379 with ")
    assert "tensor_parallel_size=" in sizes
    for part in ["distributed_executor_backend=ray", "max_model_len=4096", "model=deepseek-r1", *sizes.split()]:
        assert part in serve_line.split()


# --------------------------------------------------------------------------- serve_on_cluster
def _local_launcher(runner, resources=None, **options):
    text = "192.0.2.10 slots=8\n192.0.2.2 slots=8\n"
    full = {"GPU": 15.0, "node:192.0.2.10": 1.0, "node:192.0.2.2": 1.0}
    return launcher(text, local={"192.0.2.10"}, runner=runner, resources=resources or (lambda: dict(full)),
                    **options)


def test_serve_on_cluster_plans_serves_and_stops(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "unset")  # restored (removed) after the test
    runner, seen = FakeRunner(), {}

    def serve(kwargs):
        seen.update(kwargs=kwargs, ray=os.environ["RAY_ADDRESS"], calls=len(runner.calls))
        return 0

    cl = _local_launcher(runner, gpu_memory="80GiB")
    asked = {"model": "deepseek-r1", "max_model_len": 4096, "quantization": "fp8"}
    assert serve_on_cluster(cl.options, ENVS, asked, serve, launcher=cl, out=lambda s: None) == 0
    plan = choose_plan(load_hf_config("deepseek-r1"), 16, 80 << 30, nodes=2, quantization="fp8", max_model_len=4096)
    assert seen["kwargs"] == {**asked, "distributed_executor_backend": "ray", **plan.parallel_args()}
    assert plan.parallel_args()["tensor_parallel_size"] * plan.parallel_args()["pipeline_parallel_size"] * \
        plan.parallel_args()["data_parallel_size"] == 16
    assert seen["ray"] == "192.0.2.10:6379" and seen["calls"] == 2   # both started before serving
    assert [c[-1] for c in runner.calls[2:]] == ["ray stop", "ray stop"]


def test_head_slots_past_its_gpus_are_refused_before_any_host(monkeypatch):
    """`192.0.2.10 slots=8` on a machine with 4 GPUs: refused in one line before any host starts
    (ranks placed on the missing GPUs would fail in CUDA)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runner = FakeRunner()
    cl = _local_launcher(runner, gpu_memory="80GiB")
    with pytest.raises(ValueError) as err:
        serve_on_cluster(cl.options, ENVS, {"model": "deepseek-r1"}, lambda kw: pytest.fail("served"), launcher=cl)
    assert str(err.value) == ("hostfile line 1 gives this machine (192.0.2.10) slots=8, but it has 4 GPU(s) "
                              "(CUDA_VISIBLE_DEVICES=unset): give slots=4")
    assert runner.calls == []
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    assert serve_on_cluster(cl.options, ENVS, {"model": "deepseek-r1", "tensor_parallel_size": 16}, lambda kw: 0,
                            launcher=cl, out=lambda s: None) == 0


def test_serve_error_and_sigterm_stop_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "unset")
    for trigger in ("error", "sigterm"):
        runner = FakeRunner()

        def serve(kwargs):
            if trigger == "sigterm":
                signal.raise_signal(signal.SIGTERM)
            raise RuntimeError("engine failed")

        cl = _local_launcher(runner)
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises((RuntimeError, SystemExit)) as err:
            serve_on_cluster(cl.options, ENVS, {"tensor_parallel_size": 8}, serve, launcher=cl, out=lambda s: None)
        assert (err.type, getattr(err.value, "code", None)) == \
            ((SystemExit, 128 + signal.SIGTERM) if trigger == "sigterm" else (RuntimeError, None))
        assert [(c[0], c[-1]) for c in runner.calls[2:]] == [("ssh", "ray stop"), ("bash", "ray stop")]
        assert signal.getsignal(signal.SIGTERM) is before


def test_serve_on_cluster_refusals_touch_no_host():
    runner = FakeRunner()
    with pytest.raises(ValueError, match="TP x PP x DP = 32 ranks need 32 GPUs, the hostfile lists 16"):
        serve_on_cluster(RunnerOptions(), ENVS, {"tensor_parallel_size": 32}, lambda kw: 0,
                         launcher=_local_launcher(runner))
    with pytest.raises(ValueError, match="distributed_executor_backend is 'mp'"):
        serve_on_cluster(RunnerOptions(), ENVS, {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
                         lambda kw: 0, launcher=_local_launcher(runner))
    with pytest.raises(ValueError, match="this machine is not in the hostfile .*run `deepserve serve` on 192.0.2.1"):
        serve_on_cluster(RunnerOptions(hostfile="h.txt"), ENVS, {}, lambda kw: 0, launcher=launcher(runner=runner))
    assert runner.calls == []


# the ports `ray start --head` gives its own components by default (GCS, client server, dashboard,
# dashboard agent): an ephemeral port the OS hands out can be one of them
RAY_FIXED_PORTS = (6379, 10001, 8265, 52365)


def test_real_local_ray_start_wait_stop(monkeypatch):
    pytest.importorskip("ray")
    import ray
    import socket
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    port = 52365
    while port in RAY_FIXED_PORTS:   # a free port Ray's head does not also take for a component of its own
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cl = ClusterLauncher(parse_hostfile_text("127.0.0.1 slots=2 type=cpu\n"),
                         RunnerOptions(ray_port=port, wait_timeout_s=60), {"DEEPSERVE_PROBE": "7"})
    assert cl.head_is_local and cl.start_steps()[0].argv[-1] == (
        f"export DEEPSERVE_PROBE=7 && ray start --head --port {port} --num-gpus 0 --num-cpus 2 "
        "--node-ip-address 127.0.0.1")
    with cl:
        assert ray.cluster_resources()["CPU"] == 2.0
        # the exported envs reach Ray's workers
        assert ray.get(ray.remote(lambda: os.environ.get("DEEPSERVE_PROBE")).remote(), timeout=60) == "7"
    assert not ray.is_initialized() and cl.started == []


def test_single_node_serve_uses_the_plan(monkeypatch):
    """No parallel sizes on a machine with several GPUs: serve takes `deepserve plan`'s choice."""
    import torch

    from deepserve.distributed import cluster_serve
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(cluster_serve, "_local_gpu_memory", lambda: 141 * 2 ** 30)
    said = []
    kwargs = cluster_serve.local_engine_args({"model": "deepseek-r1", "quantization": "fp8"}, out=said.append)
    expected = choose_plan(load_hf_config("deepseek-r1"), 8, 141 * 2 ** 30, nodes=1, quantization="fp8")
    assert {k: kwargs[k] for k in expected.parallel_args()} == expected.parallel_args()
    assert said and said[0].startswith("deepserve: plan for 8 GPUs:")
    given = {"model": "deepseek-r1", "tensor_parallel_size": 8}
    assert cluster_serve.local_engine_args(given, out=said.append) == given
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cluster_serve.local_engine_args({"model": "deepseek-r1"}) == {"model": "deepseek-r1"}
