"""A pool client's leases: when to ask for one, which tasks go on it, and
what happens to them when it ends.

One :class:`LeaseKeeper` per :class:`~zmq_cluster.client.SchedulerClient`.
Its contract with the client is explicit: the client's ``lock`` (which
also guards the scheduler's submit connection), ``send_tx(frames)`` to send
there (called under the lock), ``waiting(tid)`` telling whether a task is
still waited for, and the ``counters`` to count in. The submitting side
(:meth:`try_send`, :meth:`end`) runs under the lock; the reading side
(:meth:`granted`, :meth:`revoked`, :meth:`reader_sockets`,
:meth:`on_message`) in whichever thread reads the client's results.

At most one lease is held, with at most
:data:`~zmq_cluster.lease.MAX_INFLIGHT` task on it; everything else goes
through the scheduler, which batches. A lease that ends re-sends its tasks
through the scheduler; the first result to arrive is delivered and any
other dropped by the client (see docs/scheduler.md, "Direct tasks").
"""

import collections
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import schedproto as sp
from .lease import CONNECTING, ENDED, MAX_INFLIGHT, MAX_TASK_BYTES, READY, DirectLease

__all__ = ["LeaseKeeper", "RETRY_SECONDS"]

log = logging.getLogger("zmq_cluster.pool")

#: Seconds before a client asks for a lease again after one ended, or
#: after the scheduler had none to give.
RETRY_SECONDS = 0.5
#: Functions remembered for sending on a lease (the client sends each to
#: the scheduler once; a lease needs it again, per worker).
MAX_FUNCTIONS = 256

#: ``deliver(entries, trusted)``: the client's handling of a RESULTS batch
#: that came on the lease (its entries as ``schedproto.walk`` gives them).
Deliver = Callable[[List[Tuple[Tuple[Any, ...], List[Any]]], bool], None]


class LeaseKeeper:
    """See the module docstring. ``context``: the client's; ``client_no``
    is set once the scheduler has welcomed the client."""

    def __init__(self, context: zmq.Context, lock: threading.Lock,
                 send_tx: Callable[[List[Any]], None], waiting: Callable[[int], bool],
                 counters: "collections.Counter[str]", heartbeat_timeout: float) -> None:
        self._ctx = context
        self._lock = lock
        self._send_tx = send_tx
        self._waiting = waiting
        self._counters = counters
        self._heartbeat_timeout = heartbeat_timeout
        self.client_no = 0
        self.enabled = True
        self._lease: Optional[DirectLease] = None   # the usable one (under the lock)
        self._read: Optional[DirectLease] = None    # the one whose sockets the reader polls
        self._asked = False
        self._retry = 0.0
        #: Changes whenever the reader's sockets do.
        self.version = 0
        self._functions: "OrderedDict[int, Tuple[Any, ...]]" = OrderedDict()

    @property
    def info(self) -> Optional[Dict[str, Any]]:
        """The leased worker: a dict (worker_no, pid, address, ready), or None."""
        lease = self._lease
        if lease is None:
            return None
        return {"worker_no": lease.worker_no, "pid": lease.pid, "address": lease.address,
                "ready": lease.state == READY}

    def remember_function(self, key: int, blob: Tuple[Any, ...]) -> None:
        """Under the lock: a function a lease may have to send its worker."""
        self._functions[key] = blob
        if len(self._functions) > MAX_FUNCTIONS:
            self._functions.popitem(last=False)

    # ------------------------------------------------------------ submitting

    def try_send(self, entry: bytes, frames: List[Any]) -> bool:
        """Under the lock: send one task (its table entry and data frames)
        on the lease when it is ready and has room, asking for a lease when
        there is none. False: the caller sends it through the scheduler."""
        lease = self._lease
        if lease is None:
            if self.enabled and not self._asked and time.monotonic() >= self._retry:
                self._asked = True
                self._send_tx(sp.message(sp.LEASE, {"id": None}))
            return False
        if lease.state != READY:
            if lease.state == CONNECTING and time.monotonic() > lease.deadline:
                self.end(lease, "the worker did not answer")
            return False
        tid, key, timeout_ms, _, _ = sp.TASK_ENTRY.unpack_from(entry)
        if timeout_ms or len(lease.inflight) >= MAX_INFLIGHT:
            return False  # (the scheduler times tasks out; it batches the many)
        size = 0
        for f in frames:
            size += len(f) if isinstance(f, bytes) else memoryview(f).nbytes
        if size > MAX_TASK_BYTES:
            return False
        function = self._functions.get(key)
        if function is None and key not in lease.functions:
            return False
        lease.inflight[tid] = (entry, frames)
        if not lease.send(entry, frames, key, function):
            del lease.inflight[tid]
            self.end(lease, "its connection is gone")
            return False
        self._counters["direct_tasks"] += 1
        return True

    def end(self, lease: DirectLease, why: str) -> None:
        """Under the lock: the lease is over; the tasks still out on it go
        through the scheduler (whichever result comes first is delivered,
        the other dropped)."""
        if lease.state == ENDED and not lease.inflight:
            return
        lease.state = ENDED
        if self._lease is lease:
            self._lease = None
            self._retry = time.monotonic() + RETRY_SECONDS
        out = [(tid, task) for tid, task in lease.inflight.items() if self._waiting(tid)]
        lease.inflight.clear()
        lease.close_tx()
        log.info("pool: the lease on worker %d (pid %d) ended (%s); %d tasks re-sent through"
                 " the scheduler", lease.worker_no, lease.pid, why, len(out))
        if not out:
            return
        self._counters["direct_resent"] += len(out)
        frames: List[Any] = []
        for _, (_, data) in out:
            frames.extend(data)
        try:
            self._send_tx([sp.ctl(sp.TASKS, len(out)), b"".join(e for _, (e, _) in out)]
                          + frames)
        except ConnectionError:
            pass  # the scheduler is lost: they fail with the rest

    def forget(self, tid: int) -> None:
        """The task is no longer waited for (cancelled): never re-sent."""
        lease = self._lease
        if lease is not None and tid in lease.inflight:
            with self._lock:
                lease.inflight.pop(tid, None)

    def forget_all(self) -> None:
        with self._lock:
            if self._lease is not None:
                self._lease.inflight.clear()

    # --------------------------------------------------------------- reading

    def granted(self, grant: Optional[Dict[str, Any]], closed: bool) -> None:
        """The reader: the scheduler's answer to LEASE (None: no lease)."""
        old = self._read
        if old is not None:
            with self._lock:
                self.end(old, "replaced")
            old.close_rx()
            self._read = None
            self.version += 1
        with self._lock:
            self._asked = False
            if grant is None or closed or not self.enabled:
                self._retry = time.monotonic() + RETRY_SECONDS
                return
            lease = DirectLease(self._ctx, grant, self.client_no, self._heartbeat_timeout)
            if lease.state == ENDED:
                lease.close_rx()
                self._retry = time.monotonic() + RETRY_SECONDS
                return
            self._lease = lease
        self._read = lease
        self.version += 1

    def revoked(self, worker_no: int) -> None:
        """The reader: the scheduler revoked the lease on ``worker_no``."""
        with self._lock:
            lease = self._lease
            if lease is not None and lease.worker_no == worker_no:
                self.end(lease, "the scheduler revoked it: the worker is gone")

    def reader_sockets(self, base: List[zmq.Socket]) -> List[zmq.Socket]:
        """The reader: ``base`` and the lease's sockets (closing those of a
        lease that ended)."""
        lease = self._read
        if lease is not None and lease.state == ENDED:
            lease.close_rx()
            self._read = lease = None
            self.version += 1
        return base if lease is None else base + lease.sockets()

    def on_message(self, which: int, frames: List[Any], deliver: Deliver,
                   client_trusted: bool) -> None:
        """The reader: a message from the lease's results connection
        (``which`` 0) or one of its monitors (1, 2)."""
        lease = self._read
        if lease is None:
            return
        try:
            if which:
                event = parse_monitor_message([frames[0]] + [bytes(f) for f in frames[1:]])
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    with self._lock:
                        self.end(lease, "a connection to the worker closed")
                return
            mtype, count, _ = sp.parse_ctl(frames[0])
            if mtype == sp.RESULTS:
                entries = sp.walk(frames[1].bytes, count, sp.RESULT_ENTRY, frames[2:])
                with self._lock:
                    for fields, _ in entries:
                        lease.inflight.pop(fields[0], None)
                deliver(entries, lease.results_trusted)
            elif mtype == sp.DHELLO:
                with self._lock:
                    lease.welcome(frames, client_trusted)
            elif mtype == sp.RESET:
                with self._lock:
                    self.end(lease, "the worker refused it")
            else:
                raise sp.ProtocolError("unexpected %s from a leased worker"
                                       % sp.TYPE_NAMES[mtype])
        except Exception as exc:  # whatever arrives, the reader goes on
            self._counters["malformed"] += 1
            log.warning("pool rejected a malformed message from leased worker %d: %s",
                        lease.worker_no, exc if isinstance(exc, sp.ProtocolError)
                        else "%s: %s" % (type(exc).__name__, exc))

    def close(self) -> None:
        """Close the lease's sockets (the client is closing; nobody reads)."""
        for lease in (self._lease, self._read):
            if lease is not None:
                lease.close_rx()
