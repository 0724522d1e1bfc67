"""Stopping the engine under signals: a shutdown that neither a stray Ctrl-C cuts short nor a
hang makes unstoppable (`stop_interruptibly`), used by the API server's lifespan, its exit and
the launcher of several API servers."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger("deepserve")


def stop_interruptibly(stop: Callable[[], None]) -> None:
    """Run `stop` (an engine's shutdown) so that signals neither cut it short nor are lost.
    The first SIGINT / SIGTERM that arrives meanwhile is logged and the stop goes on (a Ctrl-C
    pressed once too often must not end it with a KeyboardInterrupt traceback); the next one
    exits the process at once with 128 + its number, leaving the engine's processes to die
    with it (executor.die_with_parent). `stop` runs in a thread of its own while the main
    thread waits, so the signal is taken even when the stop hangs inside a C call (a
    collective's teardown, a join on a stuck worker). Off the main thread, which cannot set
    handlers, `stop` simply runs."""
    if threading.current_thread() is not threading.main_thread():
        stop()
        return
    seen: list[int] = []

    def on_signal(signum, frame) -> None:
        name = signal.Signals(signum).name
        seen.append(signum)
        if len(seen) == 1:
            logger.warning("%s: still stopping the engine; send it again to exit at once", name)
            return
        logger.warning("%s again: exiting without waiting for the engine to stop", name)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(128 + signum)

    errors: list[BaseException] = []

    def run() -> None:
        try:
            stop()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker = threading.Thread(target=run, name="deepserve-engine-stop", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)  # wakes for signal handlers in any case; the timeout bounds the gap
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if errors:
        raise errors[0]


@contextmanager
def workers_end_with_a_signal() -> Iterator[None]:
    """While the engine starts: SIGINT / SIGTERM first kill the worker processes started so far
    (executor.kill_workers; they ignore SIGTERM and would live on until the fork server's slow
    exit), then take their usual course (a KeyboardInterrupt; death by SIGTERM). Off the main
    thread, which cannot set handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from deepserve.engine.executor import kill_workers
    before: dict = {}

    def on_signal(signum, frame) -> None:
        kill_workers()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        before[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
