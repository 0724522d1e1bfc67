"""Host cost of the serving path (issue 17): CPU-seconds per output token in each process.

Starts `deepserve serve` (the engine core in its own process unless --inproc), runs `deepserve
bench serve` against it (random dataset, short prompts, --ignore-eos), and reads every
process's CPU time from /proc before and after: the API server, the engine core and the bench
client. Then runs `deepserve bench throughput` on the same workload (the engine in one process,
--max-num-seqs = the concurrency) and prints served / offline output tok/s next to the CPU
figures. On a small model the serving path's host costs dominate, which makes this a CPU proxy
for what the API server and the core's output loop cost on a GPU machine.

    python benchmarks/host_path.py --concurrency 256 --num-prompts 256 --repeat 3
    python benchmarks/host_path.py --concurrency 1 --num-prompts 16 --output-len 32   # TTFT

--py-spy DIR records a py-spy profile (speedscope JSON) of the API server and the core during
the first served run. Torch runs one thread per process (OMP_NUM_THREADS=1) so that its
thread pools do not fight over a few cores.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
SPY = ["--rate", "250", "--nonblocking", "--format", "speedscope"]
DEMO = Path(__file__).resolve().parents[1] / "deepserve/assets/stories260k"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def engine_cores(server: int) -> list[int]:
    """The rank processes under the server (children of its fork server)."""
    cores = []
    for child in children(server):
        if "forkserver" in cmdline(child):
            cores += children(child)
    return cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_args(args) -> list[str]:
    out = [args.model]
    if args.layers:
        out += ["--hf-overrides", json.dumps({"num_hidden_layers": args.layers}), "--load-format", "dummy"]
    return out + args.engine_args.split()


def served(args, env: dict, out: Path, tokenizer: str, spy_dir=None) -> list[dict]:
    port = free_port()
    log = out / "serve.log"
    env = dict(env, DEEPSERVE_ENGINE_CORE_PROCESS="0" if args.inproc else "1")
    server = subprocess.Popen([sys.executable, "-m", "deepserve", "serve", *model_args(args), "--port", str(port),
                               "--log-level", "warning"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "deepserve: serving" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        cores = [] if args.inproc else engine_cores(server.pid)
        results = []
        for i in range(args.repeat):
            spies = []
            if spy_dir is not None and i == 0:
                for name, pid in [("api", server.pid)] + [(f"core{j}", p) for j, p in enumerate(cores)]:
                    spies.append(subprocess.Popen(["py-spy", "record", "--pid", str(pid), *SPY,
                                                   "-o", str(spy_dir / f"{name}.json")],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(1.0)
            api0, core0 = cpu_s(server.pid), sum(cpu_s(p) for p in cores)
            name = f"serve_{i}.json"
            client_cpu = bench(
                ["serve", "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", tokenizer, "--dataset-name", "random",
                 "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len), "--ignore-eos",
                 "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency), "--num-warmups",
                 "2", "--seed", str(i), "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(out),
                 "--result-filename", name], env, out, f"bench_{i}", spy_dir / "client.json" if spies else None)
            api, core = cpu_s(server.pid) - api0, sum(cpu_s(p) for p in cores) - core0
            for spy in spies:
                spy.send_signal(2)
                spy.wait(30)
            r = json.loads((out / name).read_text())
            results.append({"tok_s": r["output_throughput"], "tokens": r["total_output_tokens"],
                            "ttft_p50_ms": r["median_ttft_ms"], "ttft_max_ms": max(r["ttfts"]) * 1000,
                            "api_cpu": api, "core_cpu": core, "client_cpu": client_cpu})
        return results
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


# `deepserve bench ...` with the CPU seconds of its measured part (not the process's start-up:
# imports, model load, dataset) written to the file $HOST_PATH_CPU
TIMED = """
import asyncio, os, sys, time
from deepserve.bench import offline, serve
def timed(fn):
    def write(c):
        open(os.environ["HOST_PATH_CPU"], "w").write(str(time.process_time() - c))
    if asyncio.iscoroutinefunction(fn):
        async def wrapper(*a, **k):
            c = time.process_time()
            r = await fn(*a, **k)
            write(c)
            return r
    else:
        def wrapper(*a, **k):
            c = time.process_time()
            r = fn(*a, **k)
            write(c)
            return r
    return wrapper
offline.measure_throughput = timed(offline.measure_throughput)
serve.run_requests = timed(serve.run_requests)
from deepserve.cli.main import main
sys.exit(main())
"""


def bench(cmd: list[str], env: dict, out: Path, name: str, spy=None) -> float:
    """Run `deepserve bench ...` (`cmd`), raising on failure; the CPU seconds of its measured part."""
    cpu_file = out / f"{name}.cpu"
    with open(out / f"{name}.log", "w") as f:
        pre = [] if spy is None else ["py-spy", "record", *SPY, "-o", str(spy), "--"]
        rc = subprocess.call([*pre, sys.executable, "-c", TIMED, "bench", *cmd], env=dict(env, HOST_PATH_CPU=str(cpu_file)),
                             stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"bench {cmd[0]} failed:\n{(out / f'{name}.log').read_text()[-2000:]}")
    return float(cpu_file.read_text())


def offline(args, env: dict, out: Path) -> list[dict]:
    results = []
    for i in range(args.repeat):
        path = out / f"offline_{i}.json"
        cpu = bench(["throughput", *model_args(args)[1:], "--model", args.model, "--input-len", str(args.input_len),
                     "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts), "--max-num-seqs",
                     str(args.concurrency), "--seed", str(i), "--disable-tqdm", "--output-json", str(path)],
                    env, out, f"offline_{i}")
        r = json.loads(path.read_text())
        results.append({"tok_s": r["output_tokens_per_second"], "tokens": r["total_output_tokens"],
                        "elapsed": r["elapsed_time"], "cpu": cpu})
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO), help="default: the demo model (stories260k)")
    p.add_argument("--tokenizer", default=None, help="default: the model's folder")
    p.add_argument("--layers", type=int, default=0,
                   help="num_hidden_layers override, with dummy weights (0: the model as it is)")
    p.add_argument("--engine-args", default="", help="more flags for serve and bench throughput")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--inproc", action="store_true", help="the engine in the API server's process")
    p.add_argument("--no-offline", action="store_true")
    p.add_argument("--py-spy", default=None, metavar="DIR")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tokenizer = args.tokenizer or args.model
    out = Path(args.out or tempfile.mkdtemp(prefix="host_path-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    spy = Path(args.py_spy) if args.py_spy else None
    if spy:
        spy.mkdir(parents=True, exist_ok=True)
    srv = served(args, env, out, tokenizer, spy)
    off = [] if args.no_offline else offline(args, env, out)
    mode = "in the API process" if args.inproc else "apart"
    print(f"c{args.concurrency}, {args.num_prompts} prompts {args.input_len} in / {args.output_len} out, "
          f"engine core {mode}; results in {out}")
    print("| run | served tok/s | offline tok/s | served/offline | TTFT p50 ms | TTFT max ms | "
          "API ms/tok | core ms/tok | client ms/tok | offline ms/tok |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, s in enumerate(srv):
        o = off[i] if i < len(off) else None
        ratio = f"{s['tok_s'] / o['tok_s']:.3f}" if o else "-"
        print(f"| {i} | {s['tok_s']:.1f} | {o['tok_s'] if o else 0:.1f} | {ratio} | {s['ttft_p50_ms']:.2f} | "
              f"{s['ttft_max_ms']:.1f} | {1000 * s['api_cpu'] / s['tokens']:.3f} | "
              f"{1000 * s['core_cpu'] / s['tokens']:.3f} | {1000 * s['client_cpu'] / s['tokens']:.3f} | "
              f"{1000 * o['cpu'] / o['tokens'] if o else 0:.3f} |")
    (out / "summary.json").write_text(json.dumps({"served": srv, "offline": off, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
