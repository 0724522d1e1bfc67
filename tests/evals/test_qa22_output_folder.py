"""--output written with a trailing separator (lm-eval's `--output_path ./results/`) is a folder
even before it exists: the default-named result goes inside it, as for a folder that exists; an
`eval compare --output` that cannot be written is one line."""
import json

from fake_openai import FakeOpenAI

from deepserve.cli.main import main
from deepserve.evals.datasets import load_gsm8k


def test_output_with_trailing_slash_is_a_new_folder(datasets_dir, tmp_path, capsys):
    folder = tmp_path / "results"
    with FakeOpenAI({"gsm8k": load_gsm8k(datasets_dir)[:2]}) as srv:
        argv = ["eval", "--base-url", srv.url, "--model", "fake-r1", "--tasks", "gsm8k", "--data-path",
                str(datasets_dir), "--limit", "2", "--no-progress", "--output", f"{folder}/"]
        assert main(argv) == 0
        host = srv.url.split("//")[1].replace(":", "_")
    assert folder.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == [
        f"fake-r1__{host}.cache.jsonl", f"fake-r1__{host}.json", f"fake-r1__{host}.md"]
    result = folder / f"fake-r1__{host}.json"
    assert json.loads(result.read_text())["tasks"]["gsm8k"]["score"] == 100.0

    compared = tmp_path / "compared"
    assert main(["eval", "compare", str(result), str(result), "--output", f"{compared}/"]) == 0
    assert sorted(p.name for p in compared.iterdir()) == ["compare.json", "compare.md"]
    assert json.loads((compared / "compare.json").read_text())["rows"][0]["task"] == "gsm8k"

    # an --output under a file: one line, not a traceback
    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    assert main(["eval", "compare", str(result), str(result), "--output", str(tmp_path / "afile" / "c.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"deepserve eval: error: --output: {tmp_path / 'afile'} is a file, not a folder"
