"""`deepserve --version` / `-v` prints the package version and exits 0, as `vllm --version` does."""
import pytest

from deepserve import __version__
from deepserve.cli.main import main


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version_flag_prints_the_version(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main([flag])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == __version__ == "0.1.0"
