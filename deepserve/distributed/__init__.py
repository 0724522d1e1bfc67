"""Process groups and collectives (TP / EP / DP / PP); launchers live beside them."""
from deepserve.distributed.parallel_state import ParallelContext, single_process

__all__ = ["ParallelContext", "single_process"]
