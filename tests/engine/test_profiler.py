"""vLLM's profiler interface offline (`LLM(profiler_config=...)`, `start_profile` / `stop_profile`):
the per-step annotations in the torch trace, delay/max iterations, the config's checks."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from deepserve.config import EngineArgs, ProfilerConfig
from deepserve.engine.profiler import step_annotation
from deepserve.engine.sampling_params import SamplingParams


def annotations(folder: Path) -> dict[str, list[str]]:
    """Each trace file's step annotations (vLLM's execute_... ranges), in order."""
    out = {}
    for path in sorted(folder.glob("*.pt.trace.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events = json.load(f)["traceEvents"]
        steps = sorted((e for e in events if e.get("name", "").startswith("execute_") and e.get("ph") == "X"),
                       key=lambda e: e["ts"])
        out[path.name] = [e["name"] for e in steps]
    return out


def seq(prompt: int, computed: int, output: int = 0, pending: int = 0):
    return SimpleNamespace(num_output_tokens=output, num_pending=pending, num_computed_tokens=computed)


def test_step_annotation_names_as_vllm():
    """Context: no output token yet (a later chunk of a prompt too); one sampled and still on the
    device counts as output (async scheduling)."""
    seqs = [seq(7, 0), seq(9, 4), seq(5, 5, output=1), seq(5, 5, pending=1)]
    q = [7, 5, 1, 1]
    assert step_annotation(seqs, q) == "execute_context_2(12)_generation_2(2)"
    # detailed: seq_len = computed + scheduled; sk, sqsq, sqsk summed per phase
    assert step_annotation(seqs, q, detailed=True) == (
        "execute_14_context_2(sq12sk16sqsq74sqsk94)_generation_2(sq2sk12sqsq2sqsk12)")
    assert step_annotation([], []) == "execute_context_0(0)_generation_0(0)"


@pytest.mark.parametrize("config, message", [
    ({"profiler": "torch"}, "needs torch_profiler_dir"),
    ({"torch_profiler_dir": "/tmp/x"}, "torch_profiler_dir goes with profiler torch"),
    ({"profiler": "nsys"}, "profiler must be torch or cuda, got 'nsys'"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "torch_profiler_dirr": 1}, "unknown key(s) 'torch_profiler_dirr'"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "max_iterations": "3"}, "max_iterations must be an integer"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "delay_iterations": -1}, "delay_iterations must be an integer >= 0"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "torch_profiler_use_gzip": "no"}, "torch_profiler_use_gzip must be true or false"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "active_iterations": 0}, "active_iterations must be >= 1"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "warmup_iterations": 1.5}, "warmup_iterations must be an integer"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "capture_torch_profiler": True}, "capture_torch_profiler"),
    ({"profiler": "torch", "torch_profiler_dir": "gs://bucket/x"}, "must be a local folder"),
    ([1], "must be a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_profiler_config_named(config, message):
    with pytest.raises(ValueError) as exc:
        EngineArgs(profiler_config=config)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_relative_dir_made_absolute(tmp_path, monkeypatch):
    """As vLLM (os.path.abspath of ~-expanded text), at parse time: every rank writes to one folder."""
    monkeypatch.chdir(tmp_path)
    args = EngineArgs(profiler_config='{"profiler": "torch", "torch_profiler_dir": "traces"}')
    assert args.profiler_config.torch_profiler_dir == str(tmp_path / "traces")
    assert EngineArgs(profiler_config={"profiler": None}).create_engine_config().profiler is None
    assert isinstance(args.create_engine_config().profiler, ProfilerConfig)


def test_cli_refuses_bad_config_in_one_line(capsys):
    from deepserve.cli.main import main
    assert main(["serve", "--profiler-config", '{"profiler": "torch", "torch_profiler_with_stak": false}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepserve serve: error: profiler_config has unknown key(s) 'torch_profiler_with_stak'")
    assert "\n" not in err


def test_dotted_cli_form():
    """vLLM's `--profiler-config.KEY VALUE` (or KEY=VALUE; underscores in the flag's name too):
    merged into the flag's JSON, values read as JSON where they parse."""
    from deepserve.cli.main import build_parser, normalize_argv
    argv = normalize_argv(["serve", "--profiler_config.profiler", "torch", "--profiler-config.torch_profiler_dir=/tmp/t",
                           "--profiler-config.max_iterations", "3", "--profiler-config.torch_profiler_with_stack=false",
                           "--max-model-len", "64"])
    args = build_parser("serve").parse_args(argv)
    assert args.max_model_len == 64
    config = EngineArgs(profiler_config=args.profiler_config).profiler_config
    assert (config.profiler, config.torch_profiler_dir, config.max_iterations, config.torch_profiler_with_stack) == (
        "torch", "/tmp/t", 3, False)


def test_steps_annotated_with_their_requests(tmp_path):
    """Two prompts of 7 and 4 tokens, the first chunked by a 6-token step budget: each step's
    annotation counts what it ran; stop_profile writes the trace (.json without gzip)."""
    from deepserve import LLM
    llm = LLM(max_num_batched_tokens=6, enable_chunked_prefill=True, max_num_seqs=4,
              profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path),
                               "torch_profiler_use_gzip": False, "torch_profiler_with_stack": False})
    try:
        llm.stop_profile()   # before any start: harmless
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        llm.generate([{"prompt_token_ids": list(range(5, 12))}], SamplingParams(max_tokens=1))  # not profiled
        llm.start_profile()
        llm.generate([{"prompt_token_ids": list(range(5, 12))}, {"prompt_token_ids": list(range(20, 24))}], params)
        llm.stop_profile()
        llm.stop_profile()   # stopped twice: nothing more written
    finally:
        llm.shutdown()
    traces = annotations(tmp_path)
    assert len(traces) == 1
    name, steps = next(iter(traces.items()))
    assert name.startswith("dp0_pp0_tp0_rank0.") and name.endswith(".pt.trace.json")
    assert steps == [
        "execute_context_1(6)_generation_0(0)",          # 6 of the first prompt's 7 tokens
        "execute_context_2(5)_generation_0(0)",          # its last token, the second prompt's 4
        "execute_context_0(0)_generation_2(2)",
        "execute_context_0(0)_generation_2(2)",
    ]
    assert (tmp_path / "profiler_out_dp0_pp0_tp0_rank0.txt").exists()


def test_async_scheduling_steps_annotated(tmp_path):
    """Under async scheduling a decode is launched while its sequence's token is still on the
    device: it counts as generating, as in vLLM."""
    from deepserve import LLM
    llm = LLM(async_scheduling=True, profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path),
                                                      "torch_profiler_dump_cuda_time_total": False})
    try:
        assert llm.engine.async_scheduling
        llm.start_profile()
        llm.generate([{"prompt_token_ids": list(range(5, 12))}, {"prompt_token_ids": list(range(20, 24))}],
                     SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        llm.stop_profile()
    finally:
        llm.shutdown()
    (steps,) = annotations(tmp_path).values()
    assert steps[:3] == ["execute_context_2(11)_generation_0(0)", "execute_context_0(0)_generation_2(2)",
                         "execute_context_0(0)_generation_2(2)"]


def test_delay_and_max_iterations_bound_the_steps(tmp_path):
    """vLLM's counting: the profiler starts at the delay_iterations-th step after start_profile and
    stops by itself after max_iterations recorded steps (the trace is written then)."""
    from deepserve import LLM
    llm = LLM(profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path), "delay_iterations": 2,
                               "max_iterations": 2, "torch_profiler_dump_cuda_time_total": False,
                               "detailed_trace_annotation": True})
    try:
        llm.start_profile(profile_prefix="run1")
        # 5 steps: the prompt's, then 4 decodes
        llm.generate([{"prompt_token_ids": list(range(5, 12))}], SamplingParams(temperature=0, max_tokens=5,
                                                                                   ignore_eos=True))
        assert len(annotations(tmp_path)) == 1   # written at the 4th step, before stop_profile
        llm.stop_profile()
    finally:
        llm.shutdown()
    (name, steps), = annotations(tmp_path).items()
    assert name.startswith("run1_dp0_pp0_tp0_rank0.") and name.endswith(".json.gz")
    # steps 2 and 3: one decode each over 8 and 9 tokens of context
    assert steps == ["execute_1_context_0(sq0sk0sqsq0sqsk0)_generation_1(sq1sk8sqsq1sqsk8)",
                     "execute_1_context_0(sq0sk0sqsq0sqsk0)_generation_1(sq1sk9sqsq1sqsk9)"]
    assert not list(tmp_path.glob("profiler_out_*"))


@pytest.mark.parametrize("wait, warmup, recorded", [
    (0, 1, [1, 2]),   # the start takes the warm-up step: engine steps 1 and 2 are recorded
    (1, 1, [2, 3]),   # step 1 warms up (not counted), steps 2 and 3 recorded
])
def test_schedule_records_its_active_steps(tmp_path, wait, warmup, recorded):
    """vLLM's torch.profiler schedule: the trace holds the active_iterations steps after the wait
    and warm-up ones and is written when they end, before stop_profile."""
    from deepserve import LLM
    llm = LLM(profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path), "wait_iterations": wait,
                               "warmup_iterations": warmup, "active_iterations": 2, "detailed_trace_annotation": True,
                               "torch_profiler_dump_cuda_time_total": False})
    try:
        llm.start_profile()
        # 5 steps: the 7-token prompt's (1), then decodes over 8, 9, 10, 11 tokens (2-5)
        llm.generate([{"prompt_token_ids": list(range(5, 12))}], SamplingParams(temperature=0, max_tokens=5,
                                                                                   ignore_eos=True))
        traces = annotations(tmp_path)
        llm.stop_profile()
    finally:
        llm.shutdown()
    assert annotations(tmp_path) == traces   # the stop writes nothing more
    prefill = "execute_7_context_1(sq7sk7sqsq49sqsk49)_generation_0(sq0sk0sqsq0sqsk0)"
    decodes = [f"execute_1_context_0(sq0sk0sqsq0sqsk0)_generation_1(sq1sk{n}sqsq1sqsk{n})" for n in (8, 9, 10, 11)]
    assert list(traces.values()) == [[([prefill] + decodes)[i - 1] for i in recorded]]


def test_start_profile_without_config_is_refused():
    from deepserve import LLM
    llm = LLM()
    try:
        with pytest.raises(RuntimeError, match="profiling is not enabled"):
            llm.start_profile()
    finally:
        llm.shutdown()


def test_unwritable_dir_fails_the_start_only(tmp_path):
    """A trace folder that cannot be made fails start_profile (the server's answer names it); the
    engine serves on, and a stop after it is harmless."""
    from deepserve import LLM
    (tmp_path / "file").write_text("")
    llm = LLM(profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path / "file" / "traces")})
    try:
        with pytest.raises(OSError):
            llm.start_profile()
        assert not llm.engine.profiler.active
        llm.stop_profile()
        assert llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    finally:
        llm.shutdown()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA present: the cuda profiler applies")
def test_cuda_profiler_needs_cuda():
    from deepserve import LLM
    with pytest.raises(ValueError, match="profiler cuda needs a CUDA device"):
        LLM(profiler_config={"profiler": "cuda"})
