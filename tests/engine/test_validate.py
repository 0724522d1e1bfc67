"""`deepserve validate`: the comparison metrics on hand-made logits, prompt files and flag
handling; then whole runs on the stories260k demo model, in this process (torch vs triton-all
side by side) or a process per setup (--concurrent): identical setups pass with zero
difference, a perturbed one is caught (exit 1), a setup that cannot start is one line naming
it (exit 2)."""
import json
import math
import shutil

import pytest
import torch

from deepserve.cli.main import main
from deepserve.cli.validate import setup_kwargs
from deepserve.config import DEMO_MODEL
from deepserve.engine.validate import (DEFAULT_PROMPTS, SetupProcess, Thresholds, check, compare_prompt,
                                       compare_runs, display_width, failure_reason, load_prompts,
                                       process_reason, prompt_label, summarize)

LN3 = math.log(3.0)


# --------------------------------------------------------------------------- metrics
def test_compare_prompt_known_values():
    # row 0: p = (3/4, 1/4) vs q = (1/4, 3/4): argmax differs, KL = 3/4 ln3 - 1/4 ln3 = ln3 / 2
    # row 1: identical: argmax agrees, KL 0
    a = torch.tensor([[LN3, 0.0], [2.0, -1.0]])
    b = torch.tensor([[0.0, LN3], [2.0, -1.0]])
    row = compare_prompt(a, b)
    assert row["tokens"] == 2 and row["top1_agree"] == 1
    assert row["top1_agreement"] == 0.5
    assert row["max_abs_diff"] == pytest.approx(LN3, rel=1e-6)
    assert row["mean_kl"] == pytest.approx(LN3 / 4, rel=1e-6)
    assert row["first_mismatch"] == 0
    assert row["top1_in_top5"] == 2  # with 2 tokens in the vocabulary every flip is "near"


def test_top1_in_top5_separates_near_ties_from_real_errors():
    a = torch.tensor([[10.0, 9.9, 5, 4, 3, 2, 1, 0],     # near tie, flipped in b: near
                      [10.0, 9.0, 8, 7, 6, 5, 4, -9]])   # b picks A's last token: not near
    b = torch.tensor([[9.9, 10.0, 5, 4, 3, 2, 1, 0],
                      [10.0, 9.0, 8, 7, 6, 5, 4, 11]])
    row = compare_prompt(a, b)
    assert row["top1_agree"] == 0 and row["top1_in_top5"] == 1


def test_compare_prompt_kl_is_asymmetric_and_zero_for_shifted_logits():
    a = torch.tensor([[0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, math.log(2.0), 0.0]])  # q = (1/4, 1/2, 1/4)
    expected_ab = math.log((1 / 3) / 0.25) * 2 / 3 + math.log((1 / 3) / 0.5) / 3
    expected_ba = 0.5 * math.log(0.25 / (1 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert compare_prompt(a, b)["mean_kl"] == pytest.approx(expected_ab, rel=1e-6)  # ln2 as fp32
    assert compare_prompt(b, a)["mean_kl"] == pytest.approx(expected_ba, rel=1e-6)
    # a constant shift changes no probability: KL 0 though every logit differs by 5
    shifted = compare_prompt(a, a + 5.0)
    assert shifted["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert shifted["max_abs_diff"] == 5.0 and shifted["first_mismatch"] is None


def test_compare_prompt_kl_resolves_tiny_fp32_differences():
    torch.manual_seed(0)
    a = torch.randn(4, 1000) * 5
    b = a.clone()
    b[:, 7] += 1e-3
    kl = compare_prompt(a, b)["mean_kl"]
    # second order in the perturbation: ~ p7 (1 - p7) eps^2 / 2, positive but far below 1e-6
    p7 = torch.softmax(a.double(), -1)[:, 7]
    expected = float((p7 * (1 - p7)).mean()) * 1e-6 / 2
    assert 0 < kl < 1e-6
    assert kl == pytest.approx(expected, rel=0.05)


def test_compare_prompt_shape_mismatch_names_both():
    with pytest.raises(ValueError, match=r"A \(2, 3\) vs B \(2, 4\)"):
        compare_prompt(torch.zeros(2, 3), torch.zeros(2, 4))


def test_summary_pools_positions_and_check_names_the_limits():
    rows = [{"tokens": 1, "top1_agree": 0, "top1_in_top5": 1, "max_abs_diff": 2.0, "kl_sum": 0.4},
            {"tokens": 3, "top1_agree": 3, "top1_in_top5": 3, "max_abs_diff": 0.5, "kl_sum": 0.0}]
    s = summarize(rows)
    assert s["tokens"] == 4 and s["top1_agreement"] == 0.75 and s["top1_mismatch"] == 0.25
    assert s["top1_in_top5"] == 1.0
    assert s["max_abs_diff"] == 2.0 and s["mean_kl"] == pytest.approx(0.1)
    failures = check(s, Thresholds(max_top1_mismatch=0.1, max_abs_diff=1.0, max_kl=0.5))
    assert failures == ["top-1 mismatch 0.2500 > 0.1", "max |d logit| 2 > 1.0"]
    assert check(s, Thresholds(max_top1_mismatch=0.25, max_abs_diff=None, max_kl=0.1)) == []
    with pytest.raises(ValueError, match="max-kl must be >= 0, got -1"):
        Thresholds(max_kl=-1)


def test_compare_runs_refuses_different_tokenizations():
    a = {"token_ids": [[1, 2, 3]], "logits": [torch.zeros(3, 5)]}
    b = {"token_ids": [[1, 2]], "logits": [torch.zeros(2, 5)]}
    with pytest.raises(ValueError, match=r"prompt 0 was tokenized differently .*3 vs 2 tokens"):
        compare_runs(a, b, ["x"])
    rows = compare_runs(a, a, ["hello"])
    assert rows[0]["index"] == 0 and rows[0]["prompt"] == "hello" and rows[0]["top1_agreement"] == 1.0


# --------------------------------------------------------------------------- prompts, flags
def test_load_prompts_files(tmp_path):
    assert load_prompts(None) == DEFAULT_PROMPTS and len(DEFAULT_PROMPTS) >= 6
    assert load_prompts(None, 2) == DEFAULT_PROMPTS[:2]
    txt = tmp_path / "p.txt"
    txt.write_text("first line\n\n  \nsecond line\n")
    assert load_prompts(str(txt)) == ["first line", "second line"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('"plain"\n{"prompt": "a"}\n{"text": "b"}\n{"prompt_token_ids": [1, 5]}\n')
    assert load_prompts(str(jl)) == ["plain", "a", "b", {"prompt_token_ids": [1, 5]}]
    jl.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected .*question"):
        load_prompts(str(jl))
    csv = tmp_path / "p.csv"
    csv.write_text("x\n")
    with pytest.raises(ValueError, match="must end in .txt or .jsonl, got .*p.csv"):
        load_prompts(str(csv))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="--num-prompts must be >= 1, got 0"):
        load_prompts(None, 0)


def test_a_prompts_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(ValueError, match=f"^prompts file {tmp_path} is a folder; name a .txt or .jsonl file$"):
        load_prompts(str(tmp_path))


def test_a_lone_flag_as_a_setup_without_equals_says_how_to_write_it(capsys):
    for name in ("--a", "--b"):
        with pytest.raises(SystemExit) as exc:
            main(["validate", name, "--enforce-eager"])
        assert exc.value.code == 2
        assert capsys.readouterr().err == (f"deepserve validate: error: argument {name}: expected one argument "
                                           f"(a single flag as its value takes '=': {name}=--enforce-eager)\n")


def test_prompt_label_fits_wide_characters():
    label = prompt_label("深度求索发布了推理模型，它在数学和代码任务上表现出色。", width=20)
    assert display_width(label) <= 20 and label.endswith("...")
    assert prompt_label("a\nb   c") == "a b c"
    assert prompt_label({"prompt_token_ids": [1, 2]}) == "ids [1, 2]"


def test_setup_flags_override_common_and_errors_name_the_setup():
    common = {"model": DEMO_MODEL, "ops": "torch", "seed": 3}
    kwargs, argv = setup_kwargs("B", common, "--seed 7 --hf-overrides '{\"rms_norm_eps\": 0.5}'")
    assert kwargs == {"model": DEMO_MODEL, "ops": "torch", "seed": 7, "hf_overrides": {"rms_norm_eps": 0.5}}
    assert argv == ["--seed", "7", "--hf-overrides", '{"rms_norm_eps": 0.5}']
    with pytest.raises(ValueError, match="setup A: bad flags '--bogus 1'.*--bogus"):
        setup_kwargs("A", common, "--bogus 1")
    with pytest.raises(ValueError, match="setup B: dtype must be one of .* got 'fp7'"):
        setup_kwargs("B", common, "--dtype fp7")
    with pytest.raises(ValueError, match="setup B: max_model_len 99999 exceeds"):
        setup_kwargs("B", common, "--max-model-len 99999")


def test_failure_reason_prefers_the_root_cause():
    log = ("Traceback (most recent call last):\n  File \"x\", line 1\n"
           "ValueError: num_attention_heads = 8 is not divisible by the parallel size 3\n"
           "RuntimeError: worker rank 2 exited with code -15\n")
    assert failure_reason(log) == ("RuntimeError: worker rank 2 exited with code -15 (first error: "
                                   "ValueError: num_attention_heads = 8 is not divisible by the parallel size 3)")
    assert failure_reason("noise\nFileNotFoundError: no *.safetensors files in /m\n") == \
        "FileNotFoundError: no *.safetensors files in /m"
    assert failure_reason("") == ""


# --------------------------------------------------------------------------- whole runs
def _validate(tmp_path, *flags):
    out = tmp_path / "report.json"
    code = main(["validate", "--device", "cpu", "--num-prompts", "3", "--output", str(out), *flags])
    return code, (json.loads(out.read_text()) if out.is_file() else None)


def test_identical_setups_pass_with_zero_difference(tmp_path, capsys):
    code, report = _validate(tmp_path, "--a", "--ops torch", "--b", "--ops torch", "--concurrent",
                             "--max-abs-diff", "1e-6", "--max-kl", "1e-9")
    assert code == 0, capsys.readouterr()
    s = report["summary"]
    assert s["prompts"] == 3 and s["tokens"] > 100
    assert s["top1_agreement"] == 1.0 and s["max_abs_diff"] < 1e-6 and s["mean_kl"] < 1e-9
    assert report["passed"] and report["failures"] == []
    assert report["setups"]["A"]["engine_args"]["ops"] == "torch"
    assert report["setup_processes"] == "--concurrent runs the setups at once"
    assert all(r["first_mismatch"] is None for r in report["prompts"])
    assert capsys.readouterr().out.strip().endswith("PASS")


def test_perturbed_setup_is_caught(tmp_path, capsys):
    # both setups in this process (test_identical_setups_pass_with_zero_difference runs them apart)
    code, report = _validate(tmp_path, "--ops", "torch", "--a", "",
                             "--b", "--hf-overrides '{\"rms_norm_eps\": 0.5}'", "--max-kl", "0.01")
    out = capsys.readouterr().out
    assert code == 1
    s = report["summary"]
    assert s["top1_agreement"] < 0.5 and s["max_abs_diff"] > 1.0 and s["mean_kl"] > 0.1
    assert not report["passed"]
    assert report["failures"][0].startswith("top-1 mismatch") and report["failures"][1].startswith("mean KL")
    assert report["setups"]["B"]["engine_args"]["hf_overrides"] == {"rms_norm_eps": 0.5}
    assert report["setup_processes"] is None
    assert "FAIL: top-1 mismatch" in out


def test_setup_that_cannot_start_is_one_line(tmp_path, capsys):
    # caught before any process starts
    assert main(["validate", "--a", "--model /no/such", "--b", "--ops torch"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "setup A: model '/no/such'" in err
    # caught in the worker: a model folder without weights (setup A runs first and alone)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{DEMO_MODEL}/{name}", broken / name)
    code, report = _validate(tmp_path, "--a", f"--model {broken}", "--b", "--ops torch")
    err = capsys.readouterr().err.strip()
    assert code == 2 and report is None
    assert len(err.splitlines()) == 1
    assert "setup A" in err and str(broken) in err and "safetensors" in err   # named before any worker starts


def test_a_prompt_token_id_outside_the_vocabulary_is_one_line(tmp_path, capsys):
    """A .jsonl prompt of token ids beyond the model's 512: one line naming the id and the
    vocabulary, as a generate request with that prompt gets."""
    prompts = tmp_path / "ids.jsonl"
    prompts.write_text('{"prompt_token_ids": [1, 600, 5]}\n')
    code, report = _validate(tmp_path, "--prompts", str(prompts), "--a", "--ops torch", "--b", "--ops torch")
    err = capsys.readouterr().err.strip()
    assert code == 2 and report is None
    assert err == ("deepserve validate: error: setup A failed: RequestError: prompt token id 600 is outside the "
                   "vocabulary [0, 512)"), err


def test_an_output_path_that_cannot_be_a_file_is_refused_before_the_setups_run(tmp_path, capsys, monkeypatch):
    """--output naming a folder, or a path under a file: one line, and no setup is built."""
    def no_setup(*args, **kwargs):
        raise AssertionError("a setup ran")

    monkeypatch.setattr("deepserve.engine.validate.run_in_process", no_setup)
    monkeypatch.setattr("deepserve.engine.validate.run_setups", no_setup)
    (tmp_path / "afile").write_text("")
    for output, why in ((tmp_path, f"--output {tmp_path} is a folder; name a file, e.g. {tmp_path / 'report.json'}"),
                        (tmp_path / "afile" / "r.json",
                         f"--output {tmp_path / 'afile' / 'r.json'}: {tmp_path / 'afile'} is a file, not a folder")):
        assert main(["validate", "--device", "cpu", "--num-prompts", "1", "--output", str(output)]) == 2
        assert capsys.readouterr().err == f"deepserve validate: error: {why}\n"


def test_setups_run_in_this_process_each_on_its_own_ops(tmp_path, capsys, monkeypatch):
    """Nothing asks for processes: both engines are built here, one after the other, torch and
    triton-all (kernels interpreted on CPU hosts), and give the same logits to fp32 rounding."""
    pytest.importorskip("triton")

    def no_process(*args, **kwargs):
        raise AssertionError("a setup process was started")
    monkeypatch.setattr("deepserve.engine.validate.SetupProcess", no_process)
    prompts = tmp_path / "prompts.txt"   # 16 tokens: the interpreted kernels cost grows with the length
    prompts.write_text("Once upon a time, there was a little girl named Lily.\n")
    code, report = _validate(tmp_path, "--prompts", str(prompts), "--a", "--ops torch", "--b", "--ops triton-all",
                             "--max-abs-diff", "1e-3", "--max-kl", "1e-6")
    assert code == 0, capsys.readouterr()
    assert report["setup_processes"] is None
    assert report["setups"]["B"]["engine_args"]["ops"] == "triton-all"
    assert report["summary"]["prompts"] == 1 and report["summary"]["tokens"] > 10
    assert report["summary"]["top1_agreement"] == 1.0


def test_what_needs_a_process_per_setup(monkeypatch):
    monkeypatch.delenv("USE_FLAGGEMS", raising=False)
    monkeypatch.delenv("DEEPSERVE_OPS", raising=False)
    plain = {"model": str(DEMO_MODEL), "device": "cpu"}
    setups = {"A": dict(plain, ops="torch"), "B": dict(plain, ops="triton")}
    assert process_reason(setups, concurrent=False, timeout=None) is None
    assert process_reason(setups, concurrent=True, timeout=None) == "--concurrent runs the setups at once"
    assert process_reason(setups, False, 10.0).startswith("--setup-timeout stops a setup")
    assert process_reason(setups, False, None, isolate=True) == "--isolate asks for it"
    flaggems = {"A": dict(plain, ops="torch"), "B": dict(plain, ops="flaggems")}
    assert process_reason(flaggems, False, None) == "setup B runs FlagGems, which patches aten for the whole process"
    monkeypatch.setenv("USE_FLAGGEMS", "1")                  # what --ops auto becomes
    assert process_reason({"A": plain}, False, None).startswith("setup A runs FlagGems")


def test_setup_past_its_timeout_is_stopped(tmp_path, capsys):
    proc = SetupProcess("B", {"model": DEMO_MODEL, "device": "cpu"}, ["hi"], tmp_path)
    with pytest.raises(ValueError, match=r"setup B: no result within 0.2 s; stopped it"):
        proc.result(timeout=0.2)
    assert proc.proc.poll() is not None and not (tmp_path / "setup_B.pt").exists()
    assert main(["validate", "--setup-timeout", "0", "--a", "--ops torch"]) == 2
    assert "--setup-timeout must be > 0, got 0" in capsys.readouterr().err
