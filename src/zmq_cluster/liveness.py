"""Liveness as plain logic (no sockets): which peer a dropped connection was,
and the heartbeat settings.

libzmq's ZMTP heartbeats (``ZMQ_HEARTBEAT_IVL/_TIMEOUT/_TTL``) run in its
I/O thread, so a peer whose Python thread holds the GIL still answers them,
while a stopped (SIGSTOP) or cut-off peer does not and its connection is
closed after ``heartbeat_timeout``. The scheduler's ROUTER learns which
routing id the closed connection carried by recording, at HELLO, the file
descriptor the message came from (``zmq.SRCFD``), and reading a socket
monitor's ``EVENT_DISCONNECTED`` events, whose value is that descriptor.

:class:`FdMap` keeps that mapping, including descriptor reuse: the kernel may
give a closed descriptor to a new connection before the monitor's event for
the old one has been read. libzmq emits the event before it closes the
descriptor, so a HELLO on a descriptor still mapped to another peer proves
that peer gone, and its DISCONNECTED event is still to come: that event is
then skipped instead of taken for the new peer's.
"""

from typing import Dict, List, Optional

__all__ = ["FdMap", "heartbeat_options"]


def heartbeat_options(timeout: float) -> Dict[int, int]:
    """Socket options (a dict) for ZMTP heartbeats that close a silent
    connection after ``timeout`` seconds: a PING every ``timeout / 4``
    (at least 20 ms), and the same timeout asked of the peer (TTL)."""
    import zmq
    ms = max(1, int(round(timeout * 1000)))
    return {zmq.HEARTBEAT_IVL: max(20, ms // 4), zmq.HEARTBEAT_TIMEOUT: ms,
            zmq.HEARTBEAT_TTL: max(100, ms)}


class FdMap:
    """File descriptor -> peer, fed by HELLOs and DISCONNECTED events.

    A peer dropped by other means while its connection may still be open
    (it said BYE, it was declared dead) leaves a pending close on its
    descriptor: the next DISCONNECTED event there is that connection's and
    names nobody, unless the same peer says HELLO again on it first.
    Pending closes on one descriptor are in connection order.
    """

    def __init__(self) -> None:
        self._peer: Dict[int, bytes] = {}  # fd -> peer id
        self._fd: Dict[bytes, int] = {}    # peer id -> fd
        # fd -> [peer id, ...] whose close is still to be seen
        self._pending: Dict[int, List[bytes]] = {}

    def __len__(self) -> int:
        return len(self._peer)

    def hello(self, fd: int, peer: bytes) -> Optional[bytes]:
        """``peer`` said HELLO on ``fd``: returns the peer it replaces on
        that descriptor (now known to be gone), or None."""
        pending = self._pending.get(fd)
        if pending and peer in pending:
            pending.remove(peer)
            if not pending:
                del self._pending[fd]
        old = self._peer.get(fd)
        if old == peer:
            return None
        self.forget(peer)
        if old is not None:
            self.forget(old)
        self._peer[fd] = peer
        self._fd[peer] = fd
        return old

    def disconnected(self, fd: int) -> Optional[bytes]:
        """The connection on ``fd`` closed: the peer it carried, or None."""
        pending = self._pending.get(fd)
        if pending:
            pending.pop(0)
            if not pending:
                del self._pending[fd]
            return None
        peer = self._peer.pop(fd, None)
        if peer is not None:
            del self._fd[peer]
        return peer

    def forget(self, peer: bytes) -> None:
        """``peer`` is gone by other means than its DISCONNECTED event
        (which, if it comes, names nobody)."""
        fd = self._fd.pop(peer, None)
        if fd is not None:
            del self._peer[fd]
            self._pending.setdefault(fd, []).append(peer)
