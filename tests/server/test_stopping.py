"""stop_interruptibly: a signal during an engine stop is logged and the stop goes on; a second
one exits at once (128 + its number), even while the stop hangs."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepserve.server.stopping import stop_interruptibly

REPO = Path(__file__).resolve().parents[2]
# a stop that hangs in a lock acquire (as on a stuck worker), after saying it started; the
# module is loaded from its file (it needs only the standard library), not through deepserve,
# whose import brings torch
HANGING_STOP = """
import importlib.util, logging, sys, threading
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
spec = importlib.util.spec_from_file_location("stopping", sys.argv[1])
stopping = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stopping)
def stop():
    print("stopping", flush=True)
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()
stopping.stop_interruptibly(stop)
print("returned", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_during_a_hanging_stop_exits(sig):
    proc = subprocess.Popen([sys.executable, "-c", HANGING_STOP, str(REPO / "deepserve/server/stopping.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stopping"
        proc.send_signal(sig)
        time.sleep(0.5)
        assert proc.poll() is None                      # the first one lets the stop go on
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 128 + sig
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert f"{sig.name}: still stopping the engine; send it again to exit at once" in err, err
    assert "exiting without waiting for the engine to stop" in err and "Traceback" not in err, err
    assert "returned" not in proc.stdout.read()


def test_one_signal_lets_the_stop_finish_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    ran = []

    def stop():
        os.kill(os.getpid(), signal.SIGINT)     # handled by the main thread while this one runs
        time.sleep(0.3)
        ran.append(True)
    stop_interruptibly(stop)
    assert ran == [True] and signal.getsignal(signal.SIGINT) is before

    def failing():
        raise ValueError("executor could not stop")
    with pytest.raises(ValueError, match="executor could not stop"):
        stop_interruptibly(failing)
    assert signal.getsignal(signal.SIGINT) is before
