"""Step messages from a DP rank's driver to its other ranks (TP and PP peers), as
point-to-point gloo sends the driver does not wait for.

A gloo broadcast holds its root until every peer has entered it, so a driver publishing the
next pipeline micro-batch would wait for the last stage to finish the one before, and the
stages would take turns instead of working at once. Here the driver pickles a message once
and starts an isend of its length and one of its bytes to each peer; gloo's transport thread
delivers them while the driver runs its own stage. Each peer receives in order (gloo matches
sends and receives of one pair and tag first in, first out). Sends still pending are kept
with their buffers and reaped at the next send; `flush` waits for all (before a stop, so
every peer gets it before the process group goes).
"""
from __future__ import annotations

import pickle
from collections import deque

import torch
import torch.distributed as dist

# tags of this channel's sends, apart from the pipeline's hidden-state and logits sends
# (tag 0), which may share the process group
HEADER_TAG, PAYLOAD_TAG = 1 << 20, (1 << 20) + 1
MAX_PENDING = 64   # messages whose sends may still be in progress before `send` waits for the oldest


class PeerLost(RuntimeError):
    """A rank's receive from, or collective with, other ranks failed: one of them died (or went
    silent past the timeout). The rank that died is what the ranks' owner reports, so the ranks
    that lost it say only this, in one line (executor.report_errors)."""


# what gloo says when the other end's process has gone (a collective of a model's step)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def lost_a_peer(exc: BaseException) -> bool:
    """Whether `exc`, or an error that caused it, is a rank's loss of another: PeerLost, or a
    collective that found the other end's process gone."""
    while exc is not None:
        if isinstance(exc, PeerLost) or (isinstance(exc, RuntimeError) and any(s in str(exc) for s in PEER_GONE)):
            return True
        exc = exc.__cause__
    return False


class StepChannel:
    def __init__(self, group, src: int):
        """`group`: a gloo group holding `src` (the driver's global rank) and its peers."""
        self.group, self.src = group, src
        self.peers = [r for r in dist.get_process_group_ranks(group) if r != src]
        self._pending: deque[tuple[list, torch.Tensor, torch.Tensor]] = deque()

    def send(self, msg) -> int:
        """Start sending `msg` to every peer; returns its size in bytes. Raises the error of
        an earlier send that failed (a peer gone)."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        header = torch.tensor([len(data)], dtype=torch.int64)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        works = []
        for r in self.peers:
            works.append(dist.isend(header, r, group=self.group, tag=HEADER_TAG))
            works.append(dist.isend(payload, r, group=self.group, tag=PAYLOAD_TAG))
        self._pending.append((works, header, payload))
        self._reap()
        return len(data)

    def _reap(self) -> None:
        while self._pending and (len(self._pending) > MAX_PENDING
                                 or all(w.is_completed() for w in self._pending[0][0])):
            for w in self._pending.popleft()[0]:
                w.wait()   # at once when completed; raises if the send failed

    def flush(self) -> None:
        """Wait until every message sent so far has been delivered."""
        while self._pending:
            for w in self._pending.popleft()[0]:
                w.wait()

    def recv(self):
        """A peer's next message from the driver (blocks until it comes); PeerLost when the
        driver's end fails."""
        header = torch.empty(1, dtype=torch.int64)
        try:
            dist.recv(header, src=self.src, group=self.group, tag=HEADER_TAG)
            payload = torch.empty(int(header.item()), dtype=torch.uint8)
            dist.recv(payload, src=self.src, group=self.group, tag=PAYLOAD_TAG)
        except RuntimeError as exc:
            raise PeerLost(f"no step from rank {self.src}, which drives this rank: {exc}") from None
        return pickle.loads(payload.numpy().tobytes())
