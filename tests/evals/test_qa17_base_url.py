"""--base-url given as the chat endpoint itself (pasted from a client's config) reaches the
server's /v1 like the root does, for the model lookup and every request."""
import json

from fake_openai import FakeOpenAI

from deepserve.cli.main import main
from deepserve.evals.client import SamplingSettings, api_root
from deepserve.evals.runner import EvalOptions, load_items
from deepserve.evals.tasks import TASKS


def test_api_root_of_an_endpoint():
    assert api_root("http://h:8000/v1/chat/completions/") == "http://h:8000/v1"
    assert api_root("http://h:8000/v1/completions") == "http://h:8000/v1"


def test_eval_with_the_chat_endpoint_as_base_url(datasets_dir, tmp_path):
    opts = EvalOptions(base_url="http://127.0.0.1:1", settings=SamplingSettings("m"),
                       tasks=[TASKS["gsm8k"]], data_path=datasets_dir, cache_path=tmp_path / "u", limit=1)
    out = tmp_path / "r.json"
    with FakeOpenAI(load_items(opts)) as srv:
        assert main(["eval", "--base-url", srv.url + "/v1/chat/completions", "--tasks", "gsm8k",
                     "--data-path", str(datasets_dir), "--limit", "1", "--output", str(out),
                     "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "fake-r1" and result["tasks"]["gsm8k"]["score"] == 100.0
