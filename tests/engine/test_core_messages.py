"""An engine core's per-step output messages (engine/core_messages.py): the front end rebuilds
from them, step by step, exactly the RequestOutput the in-process engine gives (text held back
for stop strings, n > 1, logprobs, prompt logprobs, finish and stop reasons, metrics), through
a pickle round trip as over ZeroMQ. A front end's wait for outputs ends at once on wake()
(a request or abort to send), and a core's message waiting is never lost to a wake."""
import pickle
import threading
import time

from deepserve.config import EngineArgs
from deepserve.engine.core_messages import CoreOutputs, DeltaWriter, read_outputs
from deepserve.engine.dp_engine import CoreLink, DataParallelEngine
from deepserve.engine.engine_core import DPLayout
from deepserve.engine.llm_engine import LLMEngine, RequestState
from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.engine.sampling_params import SamplingParams
from tests.conftest import DEMO_MODEL

PARAMS = [SamplingParams(temperature=0, max_tokens=24, stop=[" Lily", "a big"]),
          SamplingParams(temperature=0.8, seed=5, max_tokens=10, n=3),
          SamplingParams(temperature=0, max_tokens=7, logprobs=2, prompt_logprobs=1),
          SamplingParams(temperature=0.5, seed=2, max_tokens=3, n=2, logprobs=0)]


def test_rebuilt_outputs_equal_the_engine_s_every_step():
    engine = LLMEngine(EngineArgs(model=str(DEMO_MODEL), block_size=4))
    engine.output_of = lambda state: state
    prompts = ["Once upon a time", "The little dog", "Tom saw a big", "Lily"]
    start = {}
    for i, (prompt, params) in enumerate(zip(prompts, PARAMS)):
        rid = engine.add_request(f"r{i}", prompt, params)
        state = engine.requests[rid]
        start[rid] = RequestOutput(rid, state.prompt, state.prompt_ids,
                                   [CompletionOutput(j, "", []) for j in range(params.n)], False)
    writer, latest, steps, seen_stop = DeltaWriter(), {}, 0, False
    while engine.has_unfinished_requests():
        states = engine.step()
        steps += 1
        want = {s.request_id: s.output() for s in states}
        msg = CoreOutputs(0, {})
        writer.write(msg, states)
        got = read_outputs(pickle.loads(pickle.dumps(msg)), latest, start.get)
        assert [o.request_id for o in got] == list(want)
        for out in got:
            assert out == want[out.request_id]
            seen_stop |= out.outputs[0].stop_reason is not None
    assert steps > 5 and seen_stop and not writer.sent
    assert all(latest[r].finished for r in start) and latest["r2"].prompt_logprobs
    assert len(latest["r1"].outputs) == 3 and all(c.logprobs for c in latest["r3"].outputs)


def test_a_request_aborted_at_the_front_end_is_skipped():
    msg = CoreOutputs(0, {})
    state = _Finished()
    DeltaWriter().write(msg, [state])
    assert msg.request_ids == ["x"] and msg.texts == ["hi"] and msg.finished == [True]
    assert read_outputs(msg, {}, lambda rid: None) == []


class _Seq:
    index, num_prompt_tokens, token_ids, num_cached_tokens = 0, 1, [1, 7], 0
    finish_reason, stop_reason, is_finished, logprobs = "length", None, True, []
    first_scheduled_time = 1.5


class _Finished(RequestState):
    def __init__(self):
        self.request_id, self.seqs, self.texts, self.hold = "x", [_Seq()], ["hi"], 0
        self.params, self.prompt_logprobs = SamplingParams(), None
        self.arrival, self.first_token_time, self.last_token_time = 1.0, 2.0, 2.0


def _front_end(tmp_path):
    """A front end (engine/dp_engine.py) bound to its sockets, with no core behind them."""
    args = EngineArgs(model=str(DEMO_MODEL))
    engine = DataParallelEngine.__new__(DataParallelEngine, args)
    engine._init_front_end(args, client=0)
    engine._bind(DPLayout([[f"ipc://{tmp_path}/in"]], [f"ipc://{tmp_path}/out"], "", []))
    engine.executor = CoreLink()
    return engine


def test_wake_ends_a_step_s_wait_for_outputs_and_loses_no_message(tmp_path):
    import zmq

    engine = _front_end(tmp_path)
    core = engine._ctx.socket(zmq.PUSH)
    core.connect(f"ipc://{tmp_path}/out")
    try:
        threading.Timer(0.2, engine.wake).start()
        t = time.monotonic()
        assert engine._next(timeout_s=30, wakeable=True) is None and time.monotonic() - t < 10
        engine.wake()  # only a wakeable wait takes it: the others wait out their time
        t = time.monotonic()
        assert engine._next(timeout_s=0.3) is None and time.monotonic() - t >= 0.3
        core.send(pickle.dumps(CoreOutputs(0, {"num_blocks": 7})))
        assert engine._pull.poll(30_000)
        msg = engine._next(timeout_s=30, wakeable=True)   # a message waiting comes before the wake
        assert msg is not None and engine._gauges[0] == {"num_blocks": 7}
        t = time.monotonic()
        assert engine._next(timeout_s=30, wakeable=True) is None and time.monotonic() - t < 10
        t = time.monotonic()
        assert engine.step() == [] and time.monotonic() - t >= 0.05   # no wake left: step waits its 50 ms
    finally:
        core.close(0)
        engine._ctx.destroy(0)
