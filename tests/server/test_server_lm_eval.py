"""lm-eval's `local-completions` and `local-chat-completions` run a 5-question gsm8k task
(defined over ../shared/datasets/gsm8k/test.jsonl) against the server to the end. Skipped
where lm-eval[api] is not installed."""
from __future__ import annotations


import httpx
import pytest
from conftest import API_KEY, REPO, SHARED

from deepserve.server.metrics import parse_metrics

TASK = """\
task: gsm8k_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Question:"]
  max_gen_toks: 24
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def finished_requests(url: str) -> float:
    values = parse_metrics(httpx.get(url + "/metrics").text)
    return sum(v for k, v in values.items() if k.startswith("deepserve:request_success_total"))


@pytest.mark.parametrize("model,endpoint", [("local-completions", "completions"),
                                            ("local-chat-completions", "chat/completions")])
def test_lm_eval_gsm8k_runs_to_the_end(demo_server, tmp_path, monkeypatch, model, endpoint):
    pytest.importorskip("tenacity")   # lm-eval's [api] extra
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = SHARED / "datasets" / "gsm8k" / "test.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} not found")
    (tmp_path / "gsm8k_local.yaml").write_text(TASK.format(data=data))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = f"model=stories260k,base_url={demo_server.v1}/{endpoint},num_concurrent=4,max_retries=1"
    if endpoint == "completions":
        args += f",tokenizer_backend=huggingface,tokenizer={REPO / 'deepserve' / 'assets' / 'stories260k'}"
    before = finished_requests(demo_server.url)
    result = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["gsm8k_local"], limit=5,
                                     task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                                     apply_chat_template=endpoint != "completions")
    assert result["results"]["gsm8k_local"]["sample_len"] == 5
    samples = result["samples"]["gsm8k_local"]
    assert len(samples) == 5 and all(s["resps"][0][0].strip() for s in samples)
    assert 0.0 <= result["results"]["gsm8k_local"]["exact_match,none"] <= 1.0
    assert finished_requests(demo_server.url) - before == 5
