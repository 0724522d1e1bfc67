"""How `deepserve` ends: Ctrl-C is exit code 130 without a traceback at any point of a command,
the seconds it spends importing its modules (torch) included; an error is its message on one line."""
import pytest

import deepserve.cli.main as cli_main


def _main(argv) -> int:
    try:
        return cli_main.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main(): Python prints its traceback")


@pytest.mark.parametrize("argv", [["convert", "quantize", "SRC", "DST", "--method", "fp8-block"], ["plan"]])
def test_ctrl_c_while_the_command_imports(monkeypatch, capsys, argv):
    def interrupted(name):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_main.importlib, "import_module", interrupted)
    assert _main(argv) == 130
    assert capsys.readouterr().err == ""


def test_ctrl_c_while_the_command_runs(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    parser = cli_main.build_parser("plan")
    monkeypatch.setattr(cli_main, "build_parser", lambda command=None: parser)
    parser._subparsers._group_actions[0].choices["plan"].set_defaults(func=interrupted)
    assert _main(["plan", "m", "--gpus", "1", "--gpu-memory", "80GiB"]) == 130


def test_a_key_error_prints_its_message_without_quotes(monkeypatch, capsys):
    def missing(args):
        raise KeyError("tensor model.norm.weight is not in /m")
    parser = cli_main.build_parser("plan")
    monkeypatch.setattr(cli_main, "build_parser", lambda command=None: parser)
    parser._subparsers._group_actions[0].choices["plan"].set_defaults(func=missing)
    assert _main(["plan", "m", "--gpus", "1", "--gpu-memory", "80GiB"]) == 2
    assert capsys.readouterr().err == "deepserve plan: error: tensor model.norm.weight is not in /m\n"
