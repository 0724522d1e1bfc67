"""The default result file is a plain, visible name even for a model served from a relative
path ("../models/x" would give ".._models_x__host.json", hidden from `ls`)."""
from deepserve.cli.eval import default_output


def test_default_output_is_not_hidden():
    path = default_output("http://localhost:8000", "../shared/models/stories260k")
    assert not path.name.startswith(".") and path.suffix == ".json", path
    assert "stories260k" in path.name and "localhost_8000" in path.name
