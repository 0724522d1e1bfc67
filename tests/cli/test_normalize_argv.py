"""vLLM's underscore flag spellings become dashes; values, and values that start with "--"
(validate's quoted setups), keep their underscores."""
import pytest

from deepserve.cli.main import main, normalize_argv


def test_only_flag_names_change():
    argv = ["--pipeline_parallel_size=2", "--served-model-name", "deepseek_r1", "--max_model_len", "10",
            "--b", "--hf-overrides '{\"rms_norm_eps\": 0.5}'", "--x=a_b"]
    assert normalize_argv(argv) == ["--pipeline-parallel-size=2", "--served-model-name", "deepseek_r1",
                                    "--max-model-len", "10", "--b", "--hf-overrides '{\"rms_norm_eps\": 0.5}'",
                                    "--x=a_b"]


def test_dotted_short_compilation_flag():
    """vLLM's `-O.key value` / `-O.key=value` are `--compilation-config.key`, as vLLM reads them."""
    argv = ["-O.cudagraph_mode", "FULL_DECODE_ONLY", "-O.cudagraph_capture_sizes=[4,16]", "-tp", "2"]
    assert normalize_argv(argv) == ["-tp", "2", "--compilation-config",
                                    '{"cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [4, 16]}']


@pytest.mark.parametrize("argv, message", [
    # the metax line with its `--` turned into dashes by a formatted page: one line naming the
    # dash and the flag to type
    (["serve", "m", "–max-model-len", "4096"], "deepserve serve: error: '–max-model-len' begins with '–' "
     "(U+2013), not ASCII hyphens (pasted from a formatted page?): type --max-model-len"),
    (["serve", "m", "−−trust-remote-code"], "deepserve serve: error: '−−trust-remote-code' begins with '−−' "
     "(U+2212, U+2212), not ASCII hyphens (pasted from a formatted page?): type --trust-remote-code"),
    (["serve", "m", "—tp", "8"], "deepserve serve: error: '—tp' begins with '—' (U+2014), not ASCII hyphens "
     "(pasted from a formatted page?): type -tp"),
    (["bench", "serve", "—random-input=200"], "deepserve bench: error: '—random-input=200' begins with '—' "
     "(U+2014), not ASCII hyphens (pasted from a formatted page?): type --random-input"),
])
def test_flags_pasted_with_dashes_are_named(capsys, argv, message):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_text_that_opens_with_a_dash_is_left_alone():
    """A value such as a prompt may open with a dash: refused only where it spells a flag."""
    from deepserve.cli.main import build_parser, check_pasted_dashes

    check_pasted_dashes(["generate", "--prompt", "—Once", "--stop", "–t"], build_parser("generate"))
