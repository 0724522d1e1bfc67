"""Imported by the engine's fork server alone, last in fork_server.FORK_SERVER_PRELOAD: freezes
the heap that the modules before it made (fork_server.freeze_heap), so that the engine-core and
worker processes forked from it start with it frozen, and the fork server's own exit skips
walking it."""
from deepserve.engine.fork_server import freeze_heap

freeze_heap()
