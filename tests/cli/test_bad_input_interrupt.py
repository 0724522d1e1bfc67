"""How `deepserve` ends: Ctrl-C is exit code 130 without a traceback at any point of a command,
the seconds it spends importing its modules (torch) included; an error is its message on one line,
its traceback only with DEEPSERVE_DEBUG=1."""
import pytest

import deepserve.cli.main as cli_main

PLAN = ["plan", "m", "--gpus", "1", "--gpu-memory", "80GiB"]


def _main(argv) -> int:
    try:
        return cli_main.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main(): Python prints its traceback")


def _plan_raises(monkeypatch, exc: BaseException) -> None:
    """`deepserve plan` made to raise `exc` once its arguments are parsed."""
    def func(args):
        raise exc
    parser = cli_main.build_parser("plan")
    monkeypatch.setattr(cli_main, "build_parser", lambda command=None: parser)
    parser._subparsers._group_actions[0].choices["plan"].set_defaults(func=func)


@pytest.mark.parametrize("argv", [["convert", "quantize", "SRC", "DST", "--method", "fp8-block"], ["plan"]])
def test_ctrl_c_while_the_command_imports(monkeypatch, capsys, argv):
    def interrupted(name):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_main.importlib, "import_module", interrupted)
    assert _main(argv) == 130
    assert capsys.readouterr().err == ""


def test_ctrl_c_while_the_command_runs(monkeypatch):
    _plan_raises(monkeypatch, KeyboardInterrupt())
    assert _main(PLAN) == 130


def test_a_key_error_prints_its_message_without_quotes(monkeypatch, capsys):
    _plan_raises(monkeypatch, KeyError("tensor model.norm.weight is not in /m"))
    assert _main(PLAN) == 2
    assert capsys.readouterr().err == "deepserve plan: error: tensor model.norm.weight is not in /m\n"


def test_deepserve_debug_shows_the_traceback(monkeypatch, capsys):
    _plan_raises(monkeypatch, ValueError("a refusal"))
    monkeypatch.setenv("DEEPSERVE_DEBUG", "1")
    with pytest.raises(ValueError, match="^a refusal$"):
        cli_main.main(PLAN)
    monkeypatch.delenv("DEEPSERVE_DEBUG")
    assert _main(PLAN) == 2 and capsys.readouterr().err == "deepserve plan: error: a refusal\n"
