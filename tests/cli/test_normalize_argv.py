"""vLLM's underscore flag spellings become dashes; values, and values that start with "--"
(validate's quoted setups), keep their underscores."""
from deepserve.cli.main import normalize_argv


def test_only_flag_names_change():
    argv = ["--pipeline_parallel_size=2", "--served-model-name", "deepseek_r1", "--max_model_len", "10",
            "--b", "--hf-overrides '{\"rms_norm_eps\": 0.5}'", "--x=a_b"]
    assert normalize_argv(argv) == ["--pipeline-parallel-size=2", "--served-model-name", "deepseek_r1",
                                    "--max-model-len", "10", "--b", "--hf-overrides '{\"rms_norm_eps\": 0.5}'",
                                    "--x=a_b"]


def test_dotted_short_compilation_flag():
    """vLLM's `-O.key value` / `-O.key=value`, as `--compilation-config.key`: it was read as
    -O's JSON ('.cudagraph_mode', not valid JSON)."""
    argv = ["-O.cudagraph_mode", "FULL_DECODE_ONLY", "-O.cudagraph_capture_sizes=[4,16]", "-tp", "2"]
    assert normalize_argv(argv) == ["-tp", "2", "--compilation-config",
                                    '{"cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [4, 16]}']
