"""A pool's lease on one worker's direct socket: single tasks straight to a
worker on this host, results straight back.

The scheduler grants a lease (``LEASE``) to a pool on its host: a worker's
direct address, and a token only that worker can check (an HMAC, under a key
the worker gave the scheduler, of the client's number and trust). The pool
opens two DEALERs to the worker, as it does to the scheduler: *results*
(read by whichever thread reads the pool's results) and *submit* (written
under the client's lock by any thread), and presents the token on both
(``DHELLO``). Once the worker welcomes the results connection, single tasks
may go on the submit connection: two process hops instead of four.

Nothing is lost: the pool keeps each direct task (its table entry and
frames) until its result arrives. When the lease ends — the scheduler
revokes it because the worker is gone, the worker refuses the token, either
connection drops (they never reconnect: a new connection would carry no
token) — the pool sends the tasks still out through the scheduler, and the
first result to arrive is the one delivered (see docs/scheduler.md,
"Direct tasks").

This module holds the sockets and the bookkeeping; the state changes are
the :class:`~zmq_cluster.client.SchedulerClient`'s, under its lock.
"""

import time
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import zmq

from . import schedproto as sp
from .liveness import heartbeat_options
from .trust import is_private_ipc, sender_may_pickle
from .wire import send_frames

__all__ = ["DirectLease", "CONNECTING", "READY", "ENDED", "parse_grant"]

#: Lease states.
CONNECTING, READY, ENDED = 0, 1, 2

#: Seconds a lease may wait for the worker's welcome before it is given up.
WELCOME_SECONDS = 2.0
#: Direct tasks out on a lease at once, at most (the rest go through the
#: scheduler, which batches them).
MAX_INFLIGHT = 1
#: A task whose frames hold more bytes than this goes through the scheduler
#: (the worker's byte credit counts only the scheduler's tasks).
MAX_TASK_BYTES = 1 << 20


def parse_grant(grant: Any) -> Optional[Dict[str, Any]]:
    """The fields of a LEASE reply that grants a lease, or None when it
    grants none; ProtocolError when it is malformed."""
    if type(grant) is not dict or "worker_no" not in grant:
        raise sp.ProtocolError("a LEASE reply that is not a dict with a worker_no")
    if grant["worker_no"] is None:
        return None
    for key, kind in (("worker_no", int), ("pid", int), ("address", str), ("token", str),
                      ("trusted", bool), ("client_trusted", bool)):
        if type(grant.get(key)) is not kind:
            raise sp.ProtocolError("a LEASE grant whose %r is not a %s" % (key, kind.__name__))
    return grant


class DirectLease:
    """The two connections of one lease and the tasks out on it.

    ``grant``: the scheduler's LEASE reply (:func:`parse_grant`);
    ``client_no``: the pool client's number; ``context``: the client's.
    ``inflight`` maps a task id to its ``(table entry, data frames)``, kept
    for re-sending; ``functions``: the keys already sent on this lease."""

    def __init__(self, context: zmq.Context, grant: Mapping[str, Any], client_no: int,
                 heartbeat_timeout: float) -> None:
        self.worker_no: int = grant["worker_no"]
        self.pid: int = grant["pid"]
        self.address: str = grant["address"]
        self.worker_trusted: bool = grant["trusted"]
        self.state = CONNECTING
        self.deadline = time.monotonic() + WELCOME_SECONDS
        self.results_trusted = False
        self.inflight: Dict[int, Tuple[bytes, List[Any]]] = {}
        self.functions: Set[int] = set()
        opts: Dict[Any, Any] = {zmq.LINGER: 0, zmq.SNDHWM: 0, zmq.RCVHWM: 0,
                                zmq.RECONNECT_IVL: -1}
        opts.update(heartbeat_options(heartbeat_timeout))
        self.rx = context.socket(zmq.DEALER)
        self.tx = context.socket(zmq.DEALER)
        self._closed_tx = self._closed_rx = False
        for sock in (self.rx, self.tx):
            for opt, value in opts.items():
                sock.setsockopt(opt, value)
        self.rx_monitor = self.rx.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.tx_monitor = self.tx.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        hello = {"client_no": client_no, "token": grant["token"],
                 "trusted": grant["client_trusted"]}
        try:
            self.rx.connect(self.address)
            self.tx.connect(self.address)
            self.rx.send_multipart(sp.message(sp.DHELLO, dict(hello, role=sp.DIRECT_RESULTS)),
                                   zmq.DONTWAIT)
            self.tx.send_multipart(sp.message(sp.DHELLO, dict(hello, role=sp.DIRECT_SUBMIT)),
                                   zmq.DONTWAIT)
        except zmq.ZMQError:
            self.state = ENDED  # (an address that will not connect: the owner gives it up)

    def sockets(self) -> List[zmq.Socket]:
        """What the result reader polls: results, then both monitors."""
        return [self.rx, self.rx_monitor, self.tx_monitor]

    def welcome(self, frames: List[Any], client_trusted: bool) -> None:
        """The worker's DHELLO on the results connection: the lease is
        ready. Results are unpickled only when the client's scheduler
        connection is trusted, the scheduler trusts the worker, and this
        connection is local by the usual rule."""
        self.results_trusted = client_trusted and self.worker_trusted and sender_may_pickle(
            frames[1], private_ipc=is_private_ipc(self.address))
        if self.state == CONNECTING:
            self.state = READY

    def send(self, entry: bytes, frames: List[Any], key: int,
             function: Optional[Tuple[Any, ...]]) -> bool:
        """Send one task (its FUNC first when this lease has not sent it):
        False, sending nothing more, when the connection is gone."""
        try:
            if key not in self.functions:
                if function is None:
                    return False
                send_frames(self.tx, [sp.ctl(sp.FUNC), sp.body((key,) + function)], zmq.DONTWAIT)
                self.functions.add(key)
            send_frames(self.tx, [sp.ctl(sp.TASKS, 1), entry] + frames, zmq.DONTWAIT)
            return True
        except zmq.ZMQError:
            return False

    def close_tx(self) -> None:
        """Close the submit connection (under the client's lock)."""
        if not self._closed_tx:
            self._closed_tx = True
            # Monitoring stops first: libzmq's I/O thread sends a socket's
            # events with a blocking send, and one sent to a monitor whose
            # reading end has gone (close_rx) would block it for good, and
            # with it every connection of the context.
            self.tx.disable_monitor()
            self.tx.close(linger=0)

    def close_rx(self) -> None:
        """Close the results connection and the monitors (by the reader;
        after close_tx)."""
        if not self._closed_rx:
            self._closed_rx = True
            self.close_tx()
            self.rx.disable_monitor()
            for sock in (self.rx, self.rx_monitor, self.tx_monitor):
                sock.close(linger=0)
