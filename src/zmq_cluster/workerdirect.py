"""A pool worker's direct socket: single tasks from the pools that lease
the worker, straight from them and straight back.

A worker whose scheduler is on this host (ipc in a private directory, or
loopback tcp; no CURVE: :func:`direct_endpoint`) binds a ROUTER beside it
and tells the scheduler its address and a secret key in its HELLO. The
scheduler grants a pool of its host a lease: the address and a token, an
HMAC of the pool's client number and trust under the key
(:func:`zmq_cluster.schedproto.lease_token`). A pool opens two connections
and presents the token on both (DHELLO): *results*, answered with a DHELLO
(the lease is ready), and *submit*, on which it sends FUNC and TASKS.
Anything from a connection without a valid token is refused with RESET,
logged and counted (``direct_refused``).

The key changes whenever the worker says HELLO again (it was declared dead
or reset), which voids every lease on it: the scheduler has revoked them,
and their pools re-send what they gave it through the scheduler.

Contract with the worker (:class:`~zmq_cluster.poolworker.PoolWorker`):
``queue`` (the worker's task deque) receives ``(task id, function key,
timeout ms, message, trusted, client number)``; ``add_function(frame)``
keeps a FUNC body; ``counters`` is where refusals are counted. The worker
runs the tasks, gives each result to :meth:`DirectSocket.send_result` at
once, and sends the scheduler the :meth:`DirectSocket.note` (tasks run,
seconds) when it is due, for its statistics.
"""

import collections
import hmac
import logging
import os
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import zmq

from . import schedproto as sp
from .taskcodec import task_failure
from .trust import EndpointKind, classify_endpoint, describe_peer, is_private_ipc, sender_may_pickle
from .wire import send_frames

__all__ = ["DirectSocket", "bind_direct", "direct_endpoint", "MAX_QUEUED", "NOTE_SECONDS"]

log = logging.getLogger("zmq_cluster.worker")

#: Direct tasks a worker holds at most; more fail at once, saying so.
MAX_QUEUED = 64
#: Seconds between the DIRECT notes that count direct tasks for the
#: scheduler (the first task after a note starts the clock): a note per
#: task would wake the scheduler on every direct round trip.
NOTE_SECONDS = 0.05

#: A queued task (see the module docstring).
Task = Tuple[int, int, int, List[Any], bool, Optional[int]]


def direct_endpoint(address: str, secure: bool) -> Optional[str]:
    """Where a worker of the scheduler at ``address`` binds its direct
    socket: beside an ipc scheduler in a private directory, or on loopback
    tcp for a loopback scheduler; None elsewhere (a network or CURVE
    scheduler: its clients may be on other hosts)."""
    if secure:
        return None
    try:
        kind = classify_endpoint(address)
    except ValueError:
        return None
    if kind is EndpointKind.IPC and is_private_ipc(address):
        directory = os.path.dirname(os.path.abspath(address.split("://", 1)[1]))
        return "ipc://%s/w%d-%s" % (directory, os.getpid(), os.urandom(4).hex())
    if kind is EndpointKind.LOOPBACK:
        return "tcp://127.0.0.1:*"
    return None


def bind_direct(context: zmq.Context, endpoint: str, options: Dict[Any, Any],
                queue: "Deque[Task]", add_function: Callable[[Any], None],
                counters: "collections.Counter[str]") -> Optional["DirectSocket"]:
    """A DirectSocket bound on ``endpoint`` (``options``: the worker's
    socket options, heartbeats included), or None, with a warning, when it
    cannot bind: the worker then takes tasks from the scheduler only."""
    sock = context.socket(zmq.ROUTER)
    for opt, value in options.items():
        sock.setsockopt(opt, value)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone client fails the send: counted
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        log.warning("worker %d: no direct socket (%s: %s); tasks come through the scheduler"
                    " only", os.getpid(), endpoint, exc)
        return None
    return DirectSocket(sock, queue, add_function, counters)


class DirectSocket:
    """See the module docstring. ``socket``: the bound ROUTER (owned)."""

    def __init__(self, socket: zmq.Socket, queue: "Deque[Task]",
                 add_function: Callable[[Any], None],
                 counters: "collections.Counter[str]") -> None:
        self.socket = socket
        self.address: str = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        #: The secret the lease tokens are made with (told to the scheduler).
        self.key = os.urandom(32)
        self._queue = queue
        self._add_function = add_function
        self._counters = counters
        # Peers of a private ipc directory or of loopback are local, as the
        # scheduler connection itself (direct_endpoint offers nothing else).
        self._private = is_private_ipc(self.address)
        self._submit: Dict[bytes, Tuple[int, bool]] = {}  # connection -> (client, trusted)
        self._results: Dict[int, bytes] = {}              # client -> results connection
        #: Direct tasks queued and not yet run.
        self.queued = 0
        self._tasks = 0       # run since the last note
        self._seconds = 0.0
        self._note_due: Optional[float] = None

    def reset(self) -> None:
        """The worker was declared dead or reset: a new key (old leases
        are void), no peers, nothing queued (the worker drops its queue)."""
        self.key = os.urandom(32)
        self._submit.clear()
        self._results.clear()
        self.queued = 0

    def close(self) -> None:
        self.socket.close(linger=0)

    # ---------------------------------------------------------------- input

    def handle(self, frames: List[Any]) -> None:
        """A message on the direct socket (``frames[0]``: the routing id)."""
        rid = frames[0]  # bytes (recv_any)
        try:
            if len(frames) < 3:
                raise sp.ProtocolError("%d frames" % len(frames))
            mtype, count, _ = sp.parse_ctl(frames[1].bytes)
            peer = self._submit.get(rid)
            if mtype == sp.DHELLO:
                self._hello(rid, frames)
            elif peer is None:
                self._counters["direct_refused"] += 1
                log.warning("worker %d refused %s on its direct socket from %s: no lease",
                            os.getpid(), sp.TYPE_NAMES[mtype], describe_peer(frames[1]))
                self._send([rid] + sp.message(sp.RESET))
            elif mtype == sp.TASKS:
                self._tasks_from(peer, frames, count)
            elif mtype == sp.FUNC:
                self._add_function(frames[2])
            else:
                raise sp.ProtocolError("unexpected %s on the direct socket"
                                       % sp.TYPE_NAMES[mtype])
        except Exception as exc:  # whatever arrives, the worker goes on
            self._counters["malformed"] += 1
            log.warning("worker %d rejected a malformed direct message: %s", os.getpid(),
                        exc if isinstance(exc, sp.ProtocolError)
                        else "%s: %s" % (type(exc).__name__, exc))

    def _tasks_from(self, peer: Tuple[int, bool], frames: List[Any], count: int) -> None:
        client_no, trusted = peer
        for f, msg in sp.walk(frames[2].bytes, count, sp.TASK_ENTRY, frames[3:]):
            tid = f[0]
            if tid >> 40 != client_no:
                self._counters["bad_task_id"] += 1
                log.warning("worker %d refused direct task id %x from client %d",
                            os.getpid(), tid, client_no)
            elif self.queued >= MAX_QUEUED:
                self.send_result(client_no, tid, task_failure(RuntimeError(
                    "the worker holds %d direct tasks already" % MAX_QUEUED), tid), 0, 0.0)
            else:
                self.queued += 1
                self._queue.append((tid, f[1], f[2], msg, trusted, client_no))

    def _hello(self, rid: bytes, frames: List[Any]) -> None:
        hello = sp.parse_body(frames[2].bytes)
        if (type(hello) is not dict or type(hello.get("client_no")) is not int
                or hello.get("role") not in (sp.DIRECT_RESULTS, sp.DIRECT_SUBMIT)
                or type(hello.get("token")) is not str or type(hello.get("trusted")) is not bool):
            raise sp.ProtocolError("DHELLO of the wrong form")
        client_no, trusted = hello["client_no"], hello["trusted"]
        if not hmac.compare_digest(hello["token"], sp.lease_token(self.key, client_no, trusted)):
            self._counters["direct_refused"] += 1
            log.warning("worker %d refused a direct connection from %s: not a valid lease"
                        " (stale, or never granted)", os.getpid(), describe_peer(frames[2]))
            self._send([rid] + sp.message(sp.RESET))
            return
        if hello["role"] == sp.DIRECT_RESULTS:
            self._results[client_no] = rid
            self._send([rid] + sp.message(sp.DHELLO, {"pid": os.getpid()}))
        else:
            # Pickles only when the scheduler trusts the client (the token
            # says) and this connection is local by the usual rule.
            self._submit[rid] = (client_no, trusted and sender_may_pickle(
                frames[2], private_ipc=self._private))

    # --------------------------------------------------------------- output

    def _send(self, frames: List[Any]) -> bool:
        try:
            send_frames(self.socket, frames)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: the peer's connection is gone
            return False

    def send_result(self, client_no: int, tid: int, result: List[Any], items: int,
                    seconds: float) -> None:
        """Send one direct task's result (wire-format frames) to its client."""
        entry, data = sp.pack_entry(sp.RESULT_ENTRY, (tid,), result, (items, seconds))
        rid = self._results.get(client_no)
        if rid is None or not self._send([rid, sp.ctl(sp.RESULTS, 1), entry] + list(data)):
            # Its client is gone (nobody waits), or was revoked and re-sent it.
            self._counters["direct_unroutable"] += 1
            log.info("worker %d: the result of direct task %x has no client to go to",
                     os.getpid(), tid)

    def ran(self, items: int, seconds: float) -> None:
        """A queued direct task ran (its result is sent)."""
        self.queued -= 1
        self._tasks += items
        self._seconds += seconds
        if self._note_due is None:
            self._note_due = time.monotonic() + NOTE_SECONDS

    def wait_ms(self, longest: int) -> int:
        """How long the worker may wait idle: until the note is due."""
        if self._note_due is None:
            return longest
        return min(longest, max(0, int((self._note_due - time.monotonic()) * 1000) + 1))

    def note(self, force: bool = False) -> Optional[Dict[str, Any]]:
        """The DIRECT note's body when one is due (or ``force``d and
        something ran), else None; the counts start again."""
        if not self._tasks or not (force or (self._note_due is not None
                                             and time.monotonic() >= self._note_due)):
            return None
        body = {"tasks": self._tasks, "seconds": float(self._seconds)}
        self._tasks, self._seconds, self._note_due = 0, 0.0, None
        return body
