"""The local forms of `deepserve generate` and `deepserve chat` with odd input (on the demo
model, in this process): a prompt piped on stdin, bytes that are not UTF-8 on stdin or in argv,
chat's -q; each answer compared with the one of the plain form, each refusal one line."""
from __future__ import annotations

import io
import sys

import pytest

from deepserve.cli.main import main


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _not_utf8(data: bytes) -> io.TextIOWrapper:
    """stdin as Python opens it under a C locale: bytes that are not UTF-8 become surrogates."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")


def _run(capsys, monkeypatch, argv: list[str], stdin) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_reads_a_piped_prompt(capsys, monkeypatch):
    """`echo PROMPT | deepserve generate` and `--prompt -` answer as `--prompt PROMPT` (echo's
    newline dropped)."""
    flags = ["--max-tokens", "12"]
    code, expected, err = _run(capsys, monkeypatch, ["generate", "--prompt", "Once upon a time", *flags], "")
    assert code == 0, err
    for argv in (["generate", *flags], ["generate", "--prompt", "-", *flags]):
        code, out, err = _run(capsys, monkeypatch, argv, "Once upon a time\n")
        assert (code, out, err) == (0, expected, "")


def test_generate_without_a_prompt_at_a_terminal(capsys, monkeypatch):
    code, out, err = _run(capsys, monkeypatch, ["generate"], _Tty())
    assert (code, err) == (2, "deepserve generate: error: no prompt: pass --prompt TEXT, or pipe it on stdin\n")


@pytest.mark.parametrize("argv, stdin, message", [
    (["generate", "--prompt", "-"], b"Once \xff upon", "stdin is not UTF-8 text: byte 0xff at character 5"),
    (["generate", "--prompt", "Once \udcfe"], b"", "--prompt is not UTF-8 text: byte 0xfe at character 5"),
    (["chat", "--max-tokens", "4"], b"hi\nOnce \xc3 upon\n", "stdin is not UTF-8 text: byte 0xc3 at character 5"),
    (["chat", "--url", "http://127.0.0.1:1/v1", "-q", "\udcff"], b"", "-q is not UTF-8 text: byte 0xff at character 0"),
])
def test_text_that_is_not_utf8_is_one_line(capsys, monkeypatch, argv, stdin, message):
    """Python decodes argv (and stdin under a C locale) with surrogateescape; the tokenizer failed
    on the surrogates with a TypeError traceback."""
    code, out, err = _run(capsys, monkeypatch, argv, _not_utf8(stdin))
    assert (code, err) == (2, f"deepserve {argv[0]}: error: {message}\n")


def test_chat_quick_answers_one_message(capsys, monkeypatch):
    """-q MESSAGE (vLLM chat's --quick) answers as the same line on stdin, and reads no stdin."""
    code, expected, err = _run(capsys, monkeypatch, ["chat", "--max-tokens", "12"], "Once upon a time\n")
    assert code == 0, err
    code, out, err = _run(capsys, monkeypatch, ["chat", "--max-tokens", "12", "-q", "Once upon a time"],
                          "never read\n")
    assert (code, out, err) == (0, expected, "")
    assert sys.stdin.read() == "never read\n"


def test_chat_quantization_keeps_its_long_flag():
    """-q is vLLM chat's --quick; --quantization still parses (as in `vllm chat`, which has no -q
    for it)."""
    from deepserve.cli.main import build_parser

    args = build_parser("chat").parse_args(["chat", "--quantization", "fp8", "-q", "hi"])
    assert (args.quantization, args.quick) == ("fp8", "hi")


class _CtrlCAfterOneLine(_Tty):
    """A terminal where the user types one line, then Ctrl-C at the prompt."""

    def readline(self, *args):
        if self.tell() == 0:
            return super().readline(*args)
        raise KeyboardInterrupt


def test_chat_ctrl_c_at_the_prompt_ends_the_chat(capsys, monkeypatch):
    """Exit code 0 and the terminal's line ended, as at EOF (vLLM's chat exits 0 on Ctrl-C)."""
    code, expected, err = _run(capsys, monkeypatch, ["chat", "--max-tokens", "6"], _Tty("Once upon a time\n"))
    assert code == 0, err
    code, out, err = _run(capsys, monkeypatch, ["chat", "--max-tokens", "6"], _CtrlCAfterOneLine("Once upon a time\n"))
    assert (code, out, err) == (0, expected, "")
    assert out.endswith("> \n")


def test_generate_past_the_context_stops_there(capsys, monkeypatch):
    """--max-tokens past max_model_len stops the output at the context's end, as LLM.generate
    (vLLM's offline API) does, with the same text. A prompt that fills the context is one line."""
    from deepserve import LLM, SamplingParams

    prompt = "Once upon a time"
    llm = LLM(max_model_len=48)
    want = llm.generate(prompt, SamplingParams(max_tokens=600, temperature=0, ignore_eos=True), use_tqdm=False)
    llm.shutdown()
    out = want[0].outputs[0]
    assert out.finish_reason == "length" and len(want[0].prompt_token_ids) + len(out.token_ids) == 48
    code, text, err = _run(capsys, monkeypatch, ["generate", "--prompt", prompt, "--max-tokens", "600",
                                                 "--ignore-eos", "--max-model-len", "48"], "")
    assert (code, text, err) == (0, out.text + "\n", "")
    code, _, err = _run(capsys, monkeypatch, ["generate", "--prompt", prompt * 20, "--max-model-len", "48"], "")
    assert code == 2 and err.startswith("deepserve generate: error: ") and err.count("\n") == 1
