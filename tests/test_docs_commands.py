"""The README's and docs/GUIDES.md's commands as a newcomer runs them: what they name exists and
what they pass is accepted (the end-to-end runs are tests/cli/test_guides_e2e*.py)."""
import re
from pathlib import Path

import pytest

from deepserve.config import DEMO_MODEL
from deepserve.engine.tokenizer import resolve_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tokenizer_of_the_demo_server():
    # `deepserve serve` (no model) serves "stories260k"; `deepserve bench serve --base-url ...`
    # against it takes that name from /v1/models and needs the demo's tokenizer for it
    tok = resolve_tokenizer(None, Path(DEMO_MODEL).name)
    assert tok.decode(tok.encode("Once upon a time", add_special_tokens=False)).strip() == "Once upon a time"


def test_bench_tokenizer_unknown_name_still_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="pass --tokenizer"):
        resolve_tokenizer(None, "some-served-name")


def test_serve_help_quantization_matches_readme(capsys):
    # README: DeepSeek's FP8 is "kept in e4m3 ... on every device", and GUIDES.md's
    # `--quantization ascend` is accepted: `deepserve serve --help` says the same
    text = " ".join(_serve_help(capsys).split())
    start = text.index("--quantization QUANTIZATION, -q QUANTIZATION Weight quantization")
    entry = text[start:text.index("--seed SEED", start)]
    assert "dequantized" not in entry
    assert "stay in that form" in entry and "ascend" in entry


def _serve_help(capsys) -> str:
    from deepserve.cli.main import main
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    return capsys.readouterr().out


def test_guides_flag_table_flags_are_serve_flags(capsys):
    # docs/GUIDES.md's "## Flags" table: each flag its first column names is one `serve` takes
    text = (ROOT / "docs" / "GUIDES.md").read_text()
    table = text[text.index("## Flags"):text.index("### bench")]
    flags = set()
    for row in table.splitlines():
        if row.startswith("| `-"):
            flags.update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z]{1,2})\b", row.split(" | ")[0]))
    assert len(flags) > 30
    help_text = _serve_help(capsys)
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}\b", help_text))
    assert not missing


def test_docs_name_the_kv_scales_the_loader_reads():
    from deepserve.models.weights import KV_SCALE_NAMES
    for doc in ("README.md", "docs/GUIDES.md"):
        text = (ROOT / doc).read_text()
        assert all(f"`{name}`" in text for name in KV_SCALE_NAMES), doc


def test_guides_bench_table_flags_are_bench_flags(capsys):
    # docs/GUIDES.md's "### bench" table: each flag it names is one of bench serve / throughput /
    # latency's (`--random-input` is argparse's unique prefix of --random-input-len), or one that
    # bench throughput refuses by name
    from deepserve.cli.bench import THROUGHPUT_REFUSED
    from deepserve.cli.main import main
    text = (ROOT / "docs" / "GUIDES.md").read_text()
    table = text[text.index("### bench"):text.index("### API")]
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)\b", table))
    help_text = ""
    for sub in ("serve", "throughput", "latency"):
        with pytest.raises(SystemExit):
            main(["bench", sub, "--help"])
        help_text += capsys.readouterr().out
    assert len(flags) > 20
    missing = sorted(f for f in flags if f not in help_text and f not in THROUGHPUT_REFUSED)
    assert not missing


def test_wheel_package_data_holds_every_data_file():
    # the README's presets (`LLM("r1-distill-llama-8b", load_format="dummy")`) and the demo model
    # must be in a wheel too (`pip install .`, not only the editable install): every file under
    # deepserve/ other than Python source matches a package-data pattern of pyproject.toml
    import fnmatch
    tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["deepserve"]
    pkg = ROOT / "deepserve"
    data = [p.relative_to(pkg).as_posix() for p in pkg.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data
    missing = [f for f in data if not any(fnmatch.fnmatchcase(f, pat) and f.count("/") == pat.count("/")
                                          for pat in patterns)]
    assert not missing


def test_triton_extra_takes_the_versions_the_readme_supports():
    # README: "The Triton kernels run on triton A to B (the test extra pins X)"; `pip install
    # deepserve[triton]` takes exactly those minor versions, and the pin CI installs is one of them
    from packaging.requirements import Requirement
    tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
    text = " ".join((ROOT / "README.md").read_text().split())
    first, last, pin = re.search(r"The Triton kernels run on triton (\d+\.\d+) to (\d+\.\d+) "
                                 r"\(the test extra pins ([0-9.]+);", text).groups()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (triton,) = [Requirement(r) for r in extras["triton"]]
    (tested,) = [Requirement(r) for r in extras["test"] if Requirement(r).name == "triton"]
    major, lo, hi = int(first.split(".")[0]), int(first.split(".")[1]), int(last.split(".")[1])
    assert first.split(".")[0] == last.split(".")[0]
    inside = [f"{major}.{m}.{p}" for m in range(lo, hi + 1) for p in (0, 1)]
    outside = [f"{major}.{lo - 1}.0", f"{major}.{hi + 1}.0", f"{major + 1}.0.0"]
    assert [v for v in inside if v not in triton.specifier] == []
    assert [v for v in outside if v in triton.specifier] == []
    assert str(tested.specifier) == f"=={pin}" and pin in triton.specifier

def test_serve_help_served_model_name_says_which_name_a_response_carries(capsys):
    # a request for the second of `--served-model-name a b` is answered as "b" (vLLM's rule;
    # serving_common.check_model): the help does not say the first is always reported
    text = " ".join(_serve_help(capsys).split())
    start = text.index("--served-model-name SERVED_MODEL_NAME [SERVED_MODEL_NAME ...] Model name")
    entry = text[start:text.index("--dtype DTYPE", start)]
    assert "the first is reported" not in entry and "its request asked for" in entry
