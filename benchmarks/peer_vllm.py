"""deepserve beside vLLM on the same GPU: the same preset, dummy weights, the same bench runs.

Each server serves a folder holding the preset's config.json and a tokenizer; every server is
measured by the same `deepserve bench serve` runs, then stopped before the next one starts. Each
case has its own seed (the same for every server), so no case repeats another's prompts, which
both servers' prefix caches would otherwise serve without a prefill. Cases:

    c1        random 1024 in / 256 out at concurrency 1
    c64       random 1024 in / 256 out at concurrency 64
    c256      random 1024 in / 256 out at concurrency 256
    sharegpt  ShareGPT V3 (first 500 conversations, vLLM's pruning) at concurrency 256

Servers:

    deepserve   `deepserve serve` with its defaults
    vllm        vLLM's OpenAI server with its defaults (what users run)
    vllm-tuned  vLLM with the flags its "Optimization and Tuning" guide gives for throughput:
                --async-scheduling --max-num-batched-tokens 16384

    python benchmarks/peer_vllm.py r1-distill-llama-8b --tokenizer TOK --sharegpt FILE \
        --vllm-path /tmp/vsite --out-dir OUT
    python benchmarks/peer_vllm.py --table OUT/peer_*.json        # the table of several runs

--profile CASE:DELAY_S:STEPS[,CASE:DELAY_S:STEPS...] starts every server with the same
`--profiler-config` (vLLM's flag, which deepserve takes too: the torch profiler), calls
`POST /start_profile` DELAY_S seconds into each named CASE's run, which then records STEPS engine
steps (the largest STEPS given: one config a server), and `POST /stop_profile` after it; each
case's traces go to OUT/trace_<server>/<case>, and `python benchmarks/trace_steps.py
OUT/trace_deepserve/CASE OUT/trace_vllm/CASE` compares the steps. Several cases share one start of
each server. The profiled cases' figures carry "profiled": true (the profiler slows the steps it
records: not table figures).

When the tokenizer holds more ids than the preset's vocabulary (deepseek-v2-lite with the R1
tokenizer), the folder's vocab_size is raised to the tokenizer's, for both servers alike.
Results: one JSON per preset (every case of every server, start-up time, commands) and a markdown
table with deepserve / vLLM ratios, printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import random_checkpoint
from deepserve.engine.executor import free_port

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "deepserve" / "assets" / "presets"
SERVED_NAME = "peer"
CASES = {  # name: (dataset args, concurrency, prompts, seed)
    "c1": (["--dataset-name", "random", "--random-input-len", "1024", "--random-output-len", "256"], 1, 6, 1),
    "c64": (["--dataset-name", "random", "--random-input-len", "1024", "--random-output-len", "256"], 64, 128, 64),
    "c256": (["--dataset-name", "random", "--random-input-len", "1024", "--random-output-len", "256"], 256, 256, 256),
    "sharegpt": (["--dataset-name", "sharegpt"], 256, 500, 0),
}
TINY = {"c1": 2, "c64": 4, "c256": 8, "sharegpt": 8}  # prompts per case with --tiny
VLLM_TUNED = ["--async-scheduling", "--max-num-batched-tokens", "16384"]
KEEP = ("completed", "failed", "duration", "output_throughput", "total_token_throughput", "total_output_tokens",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms")


def model_folder(preset: str, tokenizer: Path, dest: Path, overrides: dict) -> Path:
    """preset config.json + tokenizer files in one folder; vocab_size raised to the tokenizer's ids."""
    src = Path(preset) if Path(preset).is_dir() else None
    cfg = json.loads(((src / "config.json") if src else PRESETS / f"{preset}.json").read_text())
    cfg.update(overrides)
    tok = json.loads((tokenizer / "tokenizer.json").read_text())
    ids = [i for i in tok["model"]["vocab"].values()] if isinstance(tok["model"].get("vocab"), dict) else []
    ids += [t["id"] for t in tok.get("added_tokens", [])]
    if ids and max(ids) + 1 > cfg["vocab_size"]:
        cfg["vocab_size"] = max(ids) + 1
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in tokenizer.iterdir():
        if f.is_file():
            shutil.copy(f, dest / f.name)
    if src:  # a real folder: its weights and generation config too
        for f in src.iterdir():
            if f.is_file() and not (dest / f.name).exists():
                os.symlink(f.resolve(), dest / f.name)
    return dest


def server_command(kind: str, folder: Path, port: int, args) -> tuple[list[str], dict]:
    env = dict(os.environ)
    common = ["--port", str(port), "--served-model-name", SERVED_NAME, "--load-format", args.load_format]
    if kind == "deepserve":
        cmd = [sys.executable, "-m", "deepserve", "serve", str(folder), *common, *args.deepserve_args]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), args.deps_path, env.get("PYTHONPATH")) if p)
        return cmd, env
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), *common]
    if kind == "vllm-tuned":
        cmd += VLLM_TUNED
    cmd += args.vllm_args
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.vllm_path, env.get("PYTHONPATH")) if p)
    # FlashInfer is not staged (vLLM's top-k/top-p sampler is its only user here; the bench is greedy)
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    return cmd, env


def wait_ready(url: str, proc: subprocess.Popen, limit_s: float) -> float:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {limit_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def profiler_config(trace_dir: Path, steps: int) -> str:
    """The --profiler-config both servers get: torch traces of `steps` engine steps, no Python
    stacks or host-side (front-end) trace."""
    return json.dumps({"profiler": "torch", "torch_profiler_dir": str(trace_dir.resolve()),
                       "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True,
                       "torch_profiler_dump_cuda_time_total": False, "ignore_frontend": True,
                       "max_iterations": steps})


def profile_too_late(t_started: float, t_end: float, t_run: float) -> str:
    """Why a profile holds no steps of its case (the start came once the run had ended), or ''."""
    if t_started < t_end:
        return ""
    return (f"start_profile came {t_started - t_run:.0f} s into a run that ended after {t_end - t_run:.0f} s: "
            f"the trace holds no steps of it; give a DELAY_S under the run's length")


def move_traces(trace_dir: Path, case: str, settle_s: float = 30.0) -> int:
    """Move the finished traces at the top of `trace_dir` into `trace_dir/case` (each profiled
    case its own folder); waits up to `settle_s` for a trace still being written (a hidden or
    temporary name). The number moved."""
    deadline = time.time() + settle_s
    while time.time() < deadline and any(p.name.startswith(".") or p.name.endswith(".tmp")
                                         for p in trace_dir.iterdir() if p.is_file()):
        time.sleep(1.0)
    dest = trace_dir / case
    dest.mkdir(exist_ok=True)
    moved = 0
    for p in sorted(trace_dir.iterdir()):
        if p.is_file() and p.name.endswith((".json", ".json.gz")):
            p.rename(dest / p.name)
            moved += 1
    return moved


def parse_profile(spec: str, cases: list[str]) -> dict:
    """CASE:DELAY_S:STEPS[,...] -> {case: (delay_s, steps)}; ValueError names what is wrong."""
    out = {}
    for part in spec.split(","):
        bits = part.split(":")
        if len(bits) != 3:
            raise ValueError(f"--profile takes CASE:DELAY_S:STEPS[,...], got {part!r}")
        case, delay, steps = bits
        if case not in cases:
            raise ValueError(f"--profile case {case!r} is not among --cases {','.join(cases)}")
        out[case] = (float(delay), int(steps))
    return out


def post(url: str, timeout_s: float) -> str:
    """POST with an empty body; the status, or why it failed."""
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return str(r.status)
    except OSError as e:
        return f"failed: {e}"


def run_server(kind: str, folder: Path, tokenizer: Path, out: Path, args) -> dict:
    port = free_port()
    cmd, env = server_command(kind, folder, port, args)
    if args.profile:
        trace_dir = out / f"trace_{kind}"
        shutil.rmtree(trace_dir, ignore_errors=True)
        trace_dir.mkdir(parents=True)
        cmd += ["--profiler-config", profiler_config(trace_dir, max(st for _, st in args.profile.values()))]
    log_path = out / f"{args.preset_name}_{kind}_server.log"
    entry: dict = {"server_command": " ".join(cmd), "cases": {}}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            entry["startup_s"] = wait_ready(f"http://127.0.0.1:{port}", proc, args.start_limit_s)
            print(f"== {kind}: ready in {entry['startup_s']:.1f} s", flush=True)
            for case in args.cases:
                ds, conc, n, seed = CASES[case]
                n = TINY[case] if args.tiny else n
                if args.tiny and case != "sharegpt":
                    ds = ds[:2] + ["--random-input-len", "32", "--random-output-len", "8"]
                if case == "sharegpt":
                    ds = ds + ["--dataset-path", args.sharegpt]
                name = f"{args.preset_name}_{kind}_{case}.json"
                bench = [sys.executable, "-m", "deepserve", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
                         "--model", SERVED_NAME, "--tokenizer", str(tokenizer), *ds, "--num-prompts", str(n),
                         "--max-concurrency", str(conc), "--ignore-eos", "--seed", str(seed), "--disable-tqdm",
                         "--save-result", "--result-dir", str(out / "raw"), "--result-filename", name]
                t1 = time.time()
                profiled = bool(args.profile) and case in args.profile
                if profiled:
                    started: list = []
                    starter = threading.Timer(args.profile[case][0], lambda: started.append(
                        (time.time(), post(f"http://127.0.0.1:{port}/start_profile", 60))))
                    starter.start()
                r = subprocess.run(bench, capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                       p for p in (str(REPO), args.deps_path, os.environ.get("PYTHONPATH")) if p)})
                if profiled:
                    t_end = time.time()
                    starter.join()
                    print(f"   start_profile: {started[0][1]}", flush=True)
                    late = profile_too_late(started[0][0], t_end, t1)
                    if late:
                        print(f"   {late}", flush=True)
                    t2 = time.time()
                    status = post(f"http://127.0.0.1:{port}/stop_profile", 600)
                    print(f"   stop_profile: {status} ({time.time() - t2:.0f} s)", flush=True)
                    print(f"   traces: {move_traces(trace_dir, case)} into {trace_dir.name}/{case}", flush=True)
                if r.returncode != 0:
                    print(r.stdout[-2000:], r.stderr[-2000:], flush=True)
                    entry["cases"][case] = {"error": (r.stderr or r.stdout)[-500:]}
                    continue
                res = json.loads((out / "raw" / name).read_text())
                entry["cases"][case] = {k: res[k] for k in KEEP if k in res} | {"concurrency": conc, "prompts": n}
                if profiled:
                    entry["cases"][case]["profiled"] = True
                print(f"   {case}: {res['output_throughput']:.1f} out tok/s, TPOT p50 {res['median_tpot_ms']:.2f} ms "
                      f"({time.time() - t1:.0f} s)", flush=True)
        except RuntimeError as e:
            entry["error"] = str(e)
            print(f"== {kind}: {e} (log {log_path.name}):\n" + log_path.read_text()[-3000:], flush=True)
        finally:
            stop(proc)
    return entry


def table(results: list[dict]) -> str:
    rows = ["| preset | case | server | out tok/s | TTFT p50 ms | TPOT p50 ms | TPOT p99 ms | start s "
            "| ds/vLLM tok/s | vLLM/ds TPOT p50 |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for res in results:
        servers = res["servers"]
        ds = servers.get("deepserve", {}).get("cases", {})
        for case in CASES:
            for kind, entry in servers.items():
                c = entry.get("cases", {}).get(case)
                if not c or "error" in c or c.get("profiled"):
                    continue
                ratio = tpot = ""
                d = ds.get(case)
                if kind != "deepserve" and d and "error" not in d:
                    ratio = f"{d['output_throughput'] / c['output_throughput']:.2f}"
                    tpot = f"{c['median_tpot_ms'] / d['median_tpot_ms']:.2f}"
                rows.append(f"| {res['preset']} | {case} | {kind} | {c['output_throughput']:.0f} | "
                            f"{c['median_ttft_ms']:.0f} | {c['median_tpot_ms']:.2f} | {c['p99_tpot_ms']:.2f} | "
                            f"{entry.get('startup_s', 0):.0f} | {ratio} | {tpot} |")
    return "\n".join(rows)


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", help="preset name (deepserve/assets/presets) or a model folder")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (+ tokenizer_config.json)")
    p.add_argument("--sharegpt", help="ShareGPT JSON for the sharegpt case")
    p.add_argument("--servers", default="deepserve,vllm,vllm-tuned")
    p.add_argument("--cases", default="c1,c64,c256,sharegpt")
    p.add_argument("--out-dir", default="peer_out")
    p.add_argument("--vllm-path", default="", help="PYTHONPATH entry holding vllm (e.g. /tmp/vsite)")
    p.add_argument("--deps-path", default="", help="PYTHONPATH entry with deepserve's server wheels")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--random-weights", action="store_true",
                   help="write one random bf16 checkpoint into the folder (random_checkpoint.py) and serve it "
                        "with --load-format auto from both servers: the same weights, so the same MoE routing")
    p.add_argument("--hf-overrides", default="{}", help="JSON merged into the folder's config.json")
    p.add_argument("--deepserve-args", default="", help="extra deepserve serve flags (one string)")
    p.add_argument("--vllm-args", default="", help="extra flags for both vLLM servers (one string)")
    p.add_argument("--start-limit-s", type=float, default=420)
    p.add_argument("--tiny", action="store_true", help="2-8 prompts of 32 in / 8 out (a CPU check of the script)")
    p.add_argument("--profile", default=None, metavar="CASE:DELAY_S:STEPS[,...]",
                   help="torch-profile STEPS engine steps of each CASE, from DELAY_S seconds into its run (see above)")
    p.add_argument("--table", nargs="*", help="print the table of these result JSONs and exit")
    args = p.parse_args()
    if args.table is not None:
        print(table([json.loads(Path(f).read_text()) for f in args.table]))
        return
    if not (args.preset and args.tokenizer):
        p.error("a preset and --tokenizer are needed")
    args.cases = args.cases.split(",")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choices: {', '.join(CASES)}")
    if "sharegpt" in args.cases and not args.sharegpt:
        p.error("the sharegpt case needs --sharegpt FILE")
    if args.profile:
        try:
            args.profile = parse_profile(args.profile, args.cases)
        except ValueError as e:
            p.error(str(e))
    args.deepserve_args = args.deepserve_args.split()
    args.vllm_args = args.vllm_args.split()
    args.preset_name = Path(args.preset).name
    out = Path(args.out_dir)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    tokenizer = Path(args.tokenizer)
    folder = model_folder(args.preset, tokenizer, out / f"model-{args.preset_name}", json.loads(args.hf_overrides))
    if args.random_weights:
        if not random_checkpoint.matches(folder):    # none yet, real weights, or written for another config
            t0 = time.time()
            nbytes = random_checkpoint.write(folder, "cuda" if device_name() != "cpu" else "cpu")
            print(f"== random checkpoint: {nbytes / 1e9:.1f} GB in {time.time() - t0:.0f} s", flush=True)
        args.load_format = "auto"
    result = {"preset": args.preset_name, "device": device_name(), "date": time.strftime("%Y-%m-%d"),
              "folder_config_vocab_size": json.loads((folder / "config.json").read_text())["vocab_size"],
              "vllm_tuned_flags": " ".join(VLLM_TUNED), "weights": "random checkpoint (random_checkpoint.py)"
              if args.random_weights else f"--load-format {args.load_format}", "servers": {}}
    saved = out / f"peer_{args.preset_name}.json"
    if saved.exists():  # an earlier call measured other servers on this device: keep them
        before = json.loads(saved.read_text())
        if before.get("device") == result["device"]:
            result["servers"] = before["servers"]
    for kind in args.servers.split(","):
        if kind not in ("deepserve", "vllm", "vllm-tuned"):
            p.error(f"unknown server {kind!r}; choices: deepserve, vllm, vllm-tuned")
        result["servers"][kind] = run_server(kind, folder, tokenizer, out, args)
        saved.write_text(json.dumps(result, indent=1))
    print(table([result]))


if __name__ == "__main__":
    main()
