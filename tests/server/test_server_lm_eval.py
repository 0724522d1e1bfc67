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


DEMO_TOKENIZER = REPO / "deepserve" / "assets" / "stories260k"


def local_tasks(folder):
    """The task YAMLs of `folder` only: indexing lm-eval's own thousands of tasks costs ~25 s of CPU."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(folder), include_defaults=False)


def finished_requests(url: str) -> float:
    values = parse_metrics(httpx.get(url + "/metrics").text)
    return sum(v for k, v in values.items() if k.startswith("deepserve:request_success_total"))


@pytest.mark.parametrize("model,endpoint", [("local-completions", "completions"),
                                            ("local-chat-completions", "chat/completions")])
def test_lm_eval_gsm8k_runs_to_the_end(demo_server, tmp_path, monkeypatch, model, endpoint):
    pytest.importorskip("tenacity")   # lm-eval's [api] extra
    lm_eval = pytest.importorskip("lm_eval")

    data = SHARED / "datasets" / "gsm8k" / "test.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} not found")
    (tmp_path / "gsm8k_local.yaml").write_text(TASK.format(data=data))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = f"model=stories260k,base_url={demo_server.v1}/{endpoint},num_concurrent=4,max_retries=1"
    if endpoint == "completions":
        args += f",tokenizer_backend=huggingface,tokenizer={DEMO_TOKENIZER}"
    before = finished_requests(demo_server.url)
    result = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["gsm8k_local"], limit=5,
                                     task_manager=local_tasks(tmp_path), log_samples=True,
                                     apply_chat_template=endpoint != "completions")
    assert result["results"]["gsm8k_local"]["sample_len"] == 5
    samples = result["samples"]["gsm8k_local"]
    assert len(samples) == 5 and all(s["resps"][0][0].strip() for s in samples)
    assert 0.0 <= result["results"]["gsm8k_local"]["exact_match,none"] <= 1.0
    assert finished_requests(demo_server.url) - before == 5


MC_TASK = """\
task: stories_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
MC_DOCS = [{"context": "Once upon a time, there was a little", "choices": [" girl", " table", " seven"], "label": 0},
           {"context": "The sun was", "choices": [" shining", " sleeping"], "label": 0},
           {"context": "Lily wanted to play with her", "choices": [" friend", " spoon", " cloud"], "label": 0}]


def run_mc(server, folder, model_args: str) -> list:
    """lm-eval's multiple-choice run of MC_DOCS through local-completions: each sample's scores."""
    import json
    lm_eval = pytest.importorskip("lm_eval")
    folder.mkdir(exist_ok=True)
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "stories_mc.yaml").write_text(MC_TASK.format(data=data))
    args = f"model=stories260k,base_url={server.v1}/completions,num_concurrent=2,max_retries=1,{model_args}"
    result = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["stories_mc"],
                                     task_manager=local_tasks(folder), log_samples=True)
    assert result["results"]["stories_mc"]["acc,none"] == 1.0
    return result["samples"]["stories_mc"]


def test_lm_eval_multiple_choice_runs_on_echoed_logprobs(demo_server, tmp_path, monkeypatch):
    """A loglikelihood task (multiple choice from a local file): every choice is scored from the
    echoed prompt logprobs; the demo model knows its stories well enough to get all three."""
    pytest.importorskip("tenacity")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    samples = run_mc(demo_server, tmp_path, f"tokenizer_backend=huggingface,tokenizer={DEMO_TOKENIZER}")
    assert len(samples) == 3
    for s in samples:
        scores = [r[0][0] for r in s["resps"]]
        assert len(scores) == len(s["doc"]["choices"]) and all(v < 0 for v in scores)


def test_lm_eval_remote_tokenizer_is_the_servers(demo_server, tmp_path, monkeypatch):
    """With --enable-tokenizer-info-endpoint lm-eval needs no tokenizer of its own: its auto
    backend finds /tokenizer_info and /tokenize (vLLM's) and takes the remote tokenizer, whose
    token ids give the scores the model's tokenizer folder gives."""
    pytest.importorskip("tenacity")
    from lm_eval.utils import check_remote_tokenizer_support

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert check_remote_tokenizer_support(f"{demo_server.v1}/completions")
    remote = run_mc(demo_server, tmp_path / "remote", "tokenizer_backend=remote")
    local = run_mc(demo_server, tmp_path / "local", f"tokenizer_backend=huggingface,tokenizer={DEMO_TOKENIZER}")
    for r, h in zip(remote, local):
        assert r["arguments"] == h["arguments"]
        assert [x[0][0] for x in r["resps"]] == pytest.approx([x[0][0] for x in h["resps"]], abs=1e-4)


def test_lm_eval_loglikelihoods_equal_transformers_in_both_prompt_modes(demo_server, tmp_path, monkeypatch):
    """Each choice's loglikelihood through the server equals transformers' (fp32) on the same
    tokens. Token-id prompts (lm-eval's default) are scored as sent: the continuation's logprobs.
    Text prompts (tokenized_requests=False) are tokenized as vLLM does, with the tokenizer's BOS
    first; lm-eval counts its context without that BOS, so its slice of token_logprobs starts one
    token early and adds the context's last token to every choice (lm-eval's reading, against
    vLLM the same)."""
    pytest.importorskip("tenacity")
    import torch
    import transformers

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf = f"tokenizer_backend=huggingface,tokenizer={DEMO_TOKENIZER}"
    as_ids = run_mc(demo_server, tmp_path / "ids", hf)
    as_text = run_mc(demo_server, tmp_path / "text", hf + ",tokenized_requests=False")
    tok = transformers.AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_TOKENIZER, dtype=torch.float32).eval()

    def summed(ids: list[int], first: int) -> float:
        """Sum of log p(ids[p] | ids[:p]) for p >= first."""
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return sum(lp[p - 1, ids[p]].item() for p in range(first, len(ids)))

    checked = 0
    for ids_sample, text_sample in zip(as_ids, as_text):
        for (context, continuation), by_ids, by_text in zip(
                ids_sample["arguments"], ids_sample["resps"], text_sample["resps"]):
            ctx = tok(context, add_special_tokens=False).input_ids
            whole = tok(context + continuation, add_special_tokens=False).input_ids
            assert float(by_ids[0][0]) == pytest.approx(summed(whole, len(ctx)), abs=1e-4)
            assert float(by_text[0][0]) == pytest.approx(summed([tok.bos_token_id] + whole, len(ctx)), abs=1e-4)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)
