"""A pool's connection to its scheduler: task batches out, results in.

Two DEALER connections to the scheduler's one address: the *result*
connection (HELLO role "client"), read by one I/O thread that hands each
result to whoever waits for it, and the *submit* connection (role "submit"),
on which any thread sends task batches under a lock, without waking the I/O
thread. Functions are sent once (FUNC) before the first batch that names
them.
"""

import itertools
import logging
import os
import socket as _socket
import threading
import time
from collections import OrderedDict
from typing import Any, Dict

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import schedproto as sp
from .functions import describe, function_key
from .liveness import heartbeat_options
from .wire import recv_any

__all__ = ["SchedulerClient", "SchedulerLost"]

log = logging.getLogger("zmq_cluster.pool")

#: Functions remembered per client (function object -> key).
FUNCTION_CACHE = 256


class SchedulerLost(ConnectionError):
    """The scheduler went away (or dropped this client): pending tasks fail."""


class SchedulerClient:
    """Connects to the scheduler at ``address`` and waits for its WELCOME
    (at most ``connect_timeout`` seconds: TimeoutError)."""

    def __init__(self, address, *, heartbeat_timeout=10.0, socket_options=None,
                 connect_timeout=30.0):
        self.address = address
        self._ctx = zmq.Context()
        opts: Dict[Any, Any] = {zmq.LINGER: 0, zmq.SNDHWM: 0, zmq.RCVHWM: 0}
        opts.update(heartbeat_options(heartbeat_timeout))
        opts.update(socket_options or {})
        self._rx = self._ctx.socket(zmq.DEALER)
        self._tx = self._ctx.socket(zmq.DEALER)
        for sock in (self._rx, self._tx):
            for opt, value in opts.items():
                sock.setsockopt(opt, value)
        self._monitor = self._rx.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._wake_addr = "inproc://zc-client-%x" % id(self)
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        self._sinks = {}              # task id -> sink (deliver(tid, frames), fail(exc))
        self._stats_waiters = {}      # request id -> [event, reply]
        self._lock = threading.Lock()  # the submit socket, function keys
        self._fn_keys = OrderedDict()
        self._fn_sent = set()
        self._closed = False
        self._shutting_down = False
        self.lost = None
        #: Results that arrived for no waiting task (cancelled ones).
        self.unmatched_results = 0
        try:
            self._rx.connect(address)
            self._rx.send_multipart(sp.message(sp.HELLO, {
                "role": sp.ROLE_CLIENT, "host": _socket.gethostname(), "pid": os.getpid()}))
            welcome = self._await_welcome(connect_timeout)
            self.client_no = welcome["client_no"]
            self.workers_at_start = welcome.get("workers", 0)
            self._tx.connect(address)
            self._tx.send_multipart(sp.message(sp.HELLO, {
                "role": sp.ROLE_SUBMIT, "client_no": self.client_no}))
        except BaseException:
            self._close_sockets()
            raise
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._io_loop, name="zmq-cluster-pool-io",
                                        daemon=True)
        self._thread.start()

    def _await_welcome(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._rx.poll(int(left * 1000) + 1):
                raise TimeoutError("no scheduler answered at %s within %g s"
                                   % (self.address, timeout))
            frames = self._rx.recv_multipart()
            mtype, _, _ = sp.parse_ctl(frames[0])
            if mtype == sp.WELCOME:
                return sp.parse_body(frames[1])

    # ------------------------------------------------------------- sending

    def new_task_id(self):
        return (self.client_no << 40) | next(self._ids)

    def function_key(self, fn):
        """The key of ``fn``, sending its blob to the scheduler the first time."""
        with self._lock:
            try:
                key = self._fn_keys.get(fn)
            except TypeError:  # unhashable callable
                key = None
            if key is not None:
                self._fn_keys.move_to_end(fn)
                return key
        blob = describe(fn)
        key = function_key(blob)
        with self._lock:
            if key not in self._fn_sent:
                self._tx.send_multipart([sp.ctl(sp.FUNC), sp.body((key,) + blob)])
                self._fn_sent.add(key)
            try:
                self._fn_keys[fn] = key
                if len(self._fn_keys) > FUNCTION_CACHE:
                    self._fn_keys.popitem(last=False)
            except TypeError:
                pass
        return key

    def send_tasks(self, entries, frames, tids, sink):
        """Send one batch: ``entries`` (bytes each), their data ``frames``;
        ``sink`` (registered first) receives the results of ``tids``."""
        if self.lost is not None:
            raise self.lost
        sinks = self._sinks
        for tid in tids:
            sinks[tid] = sink
        msg = [sp.ctl(sp.TASKS, len(entries)), b"".join(entries)] + frames
        with self._lock:
            self._tx.send_multipart(msg, copy=False)

    def cancel(self, ids=None):
        """Ask the scheduler to drop queued tasks (all of this client's with
        None); their results, if any come, are dropped here."""
        if ids is not None:
            for tid in ids:
                self._sinks.pop(tid, None)
            ids = list(ids)
        if self._closed:
            return
        with self._lock:
            self._tx.send_multipart(sp.message(sp.CANCEL, ids))

    def forget(self, tid):
        """Stop waiting for ``tid``: its sink, or None if it was not waited for."""
        return self._sinks.pop(tid, None)

    def pending(self):
        return len(self._sinks)

    def stats(self, timeout=10.0, wait_workers=0):
        """The scheduler's STATS reply (a dict); with ``wait_workers`` the
        scheduler answers once that many workers are registered."""
        if self.lost is not None:
            raise self.lost
        rid = next(self._ids)
        waiter = [threading.Event(), None]
        self._stats_waiters[rid] = waiter
        try:
            with self._lock:
                self._tx.send_multipart(sp.message(sp.STATS, {"id": rid,
                                                               "wait_workers": wait_workers}))
            if not waiter[0].wait(timeout):
                raise TimeoutError("the scheduler did not answer STATS within %g s" % timeout)
        finally:
            self._stats_waiters.pop(rid, None)
        if isinstance(waiter[1], BaseException):
            raise waiter[1]
        return waiter[1]

    # ------------------------------------------------------------- receiving

    def _io_loop(self):
        # Results first, then connection events, then the stop signal;
        # waiting and receiving happen in zmq_cluster.wire (without the GIL
        # in the compiled twin).
        sockets = [self._rx, self._monitor, self._wake_rx]
        try:
            while True:
                got = recv_any(sockets, -1)
                if got is None:
                    continue
                which, frames = got
                if which == 2:
                    return
                if which == 1:
                    event = parse_monitor_message([frames[0]] + [bytes(f) for f in frames[1:]])
                    if event["event"] == zmq.EVENT_DISCONNECTED:
                        self._lose(SchedulerLost("lost the connection to the scheduler "
                                                 "at %s" % self.address))
                    continue
                try:
                    mtype, count, _ = sp.parse_ctl(frames[0])  # bytes (recv_any)
                    if mtype == sp.RESULTS:
                        self._results(frames, count)
                    elif mtype == sp.STATS:
                        reply = sp.parse_body(frames[1].bytes)
                        waiter = self._stats_waiters.get(reply.get("id"))
                        if waiter is not None:
                            waiter[1] = reply
                            waiter[0].set()
                    elif mtype == sp.RESET:
                        self._lose(SchedulerLost("the scheduler at %s dropped this client"
                                                 % self.address))
                except (sp.ProtocolError, ValueError, TypeError) as exc:
                    log.warning("pool dropped a message from the scheduler: %s", exc)
        except zmq.ContextTerminated:
            return

    def _results(self, frames, count):
        table = frames[1].bytes
        data = frames[2:]
        sinks = self._sinks
        touched = None
        last = None
        for fields, msg in sp.walk(table, count, sp.RESULT_ENTRY, data):
            tid = fields[0]
            sink = sinks.pop(tid, None)
            if sink is None:
                self.unmatched_results += 1  # cancelled, or its caller gave up
                continue
            sink.deliver(tid, msg)
            if sink is not last:
                if touched is None:
                    touched = set()
                touched.add(sink)
                last = sink
        if touched:
            for sink in touched:
                sink.wake()

    def _lose(self, exc):
        if self.lost is None:
            self.lost = exc
            if not self._shutting_down:
                log.error("%s", exc)
        sinks = list(self._sinks.items())
        self._sinks.clear()
        for _, sink in sinks:
            sink.fail(exc)
        for sink in {s for _, s in sinks}:
            sink.wake()
        for waiter in list(self._stats_waiters.values()):
            waiter[1] = exc
            waiter[0].set()

    # ------------------------------------------------------------- closing

    def send_shutdown(self):
        """Ask the scheduler to stop its workers and itself."""
        self._shutting_down = True
        with self._lock:
            self._tx.send_multipart(sp.message(sp.SHUTDOWN))

    def close(self):
        """Say BYE, stop the I/O thread, close the sockets."""
        if self._closed:
            return
        self._closed = True
        try:
            # BYE goes on the submit connection only, after whatever was sent
            # there: the two connections are not ordered with each other.
            with self._lock:
                self._tx.send_multipart(sp.message(sp.BYE))
            self._wake_tx.send(b"")
        except zmq.ZMQError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(10)
        self._close_sockets()

    def _close_sockets(self):
        for sock in ("_monitor", "_rx", "_wake_rx", "_wake_tx"):
            s = getattr(self, sock, None)
            if s is not None:
                s.close(linger=0)
        # What is still queued (BYE, CANCEL, SHUTDOWN) gets a moment to
        # leave; a scheduler known to be gone must not hold up the close.
        self._tx.close(linger=0 if self.lost else 500)
        self._ctx.term()
