"""The sampler's settings (penalties, min_tokens, logit_bias, allowed_token_ids, seeded
top-k / top-p sampling) reach the device without a host sync (tests/models/sync_guard.py,
with synchronous host-to-device copies counted); the one read back is the chosen ids. The
penalties are checked against the OpenAI / vLLM formulas written out per token."""
import torch

from deepserve.engine.sampler import Sampler, apply_penalties
from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.sequence import Sequence
from tests.models.sync_guard import SyncRecorder

VOCAB = 64
PROMPT = [1, 5, 9]


def _seq(params: SamplingParams, outputs=()) -> Sequence:
    seq = Sequence("r", 0, PROMPT, params)
    seq.token_ids += list(outputs)
    return seq


def test_every_setting_without_a_sync():
    seqs = [_seq(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.2,
                                repetition_penalty=1.3), [3, 3, 7]),
            _seq(SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=7, min_tokens=4,
                                stop_token_ids=[11]), [2]),
            _seq(SamplingParams(temperature=0, logit_bias={4: 50.0})),
            _seq(SamplingParams(temperature=1.0, allowed_token_ids=[8, 9, 10]))]
    sampler = Sampler({0}, VOCAB)
    logits = torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(0))
    recorder = SyncRecorder(host_copies=True)
    with recorder.watch():
        ids = sampler.sample_ids(logits, seqs)
    assert recorder.syncs == []
    assert ids[2] == 4 and 8 <= ids[3] <= 10 and ids[1] not in (0, 11)
    recorder = SyncRecorder(host_copies=True)
    with recorder.watch():
        sampler(logits, seqs)
    assert [what for what, _ in recorder.syncs] == ["Tensor.tolist"]     # the sampled ids, once


def test_penalties_match_the_formula():
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.2, repetition_penalty=1.3)
    outputs = [3, 3, 7, 5]
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    got = apply_penalties(logits.clone(), [_seq(params, outputs)])[0]
    want = logits[0].clone()
    for t in range(VOCAB):
        count = outputs.count(t)
        if t in PROMPT or count:
            want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
        want[t] -= 0.2 * count + 0.5 * (count > 0)
    torch.testing.assert_close(got, want)


def test_recorder_counts_synchronous_host_copies():
    x = torch.zeros(4, 4)
    for call in (lambda: torch.tensor([1.0], device="cpu"), lambda: x[[0, 1], [2, 3]],
                 lambda: x.__setitem__(([0], [1]), 1.0)):
        recorder = SyncRecorder(host_copies=True)
        with recorder.watch():
            call()
        assert recorder.syncs, call
