"""A pool's connection to its scheduler: task batches out, results in.

Two DEALER connections to the scheduler's one address: the *result*
connection (HELLO role "client"), read by one I/O thread that hands each
result to whoever waits for it, and the *submit* connection (role "submit"),
on which any thread sends task batches under a lock, without waking the I/O
thread. Functions are sent once (FUNC) before the first batch that names
them.

A thread that waits for one result (``Future.result()``) may take the
result connection over from the I/O thread for the wait
(:meth:`SchedulerClient.read_until`, :mod:`zmq_cluster.resultreader`): the
result then wakes the thread that wants it, with no hand-off from the I/O
thread on the way. Whichever thread reads delivers every result that
arrives, to whatever waits for it. Single tasks may go straight to a
worker the scheduler leased this client (:mod:`zmq_cluster.leasekeeper`).

In-process schedulers (:mod:`zmq_cluster.inprocess`): a client given the
address of a scheduler that runs as a thread of this process connects over
``inproc://`` on the scheduler's own context instead, so the frames between
client and scheduler are handed over by pointer (no copy, no libzmq I/O
thread on the way).

Trust: results may be unpickled (``deliver(tid, frames, trusted)``) only
when the connection to the scheduler is trusted (CURVE, loopback, or ipc
in a private directory: decided from the WELCOME's frame) and the scheduler
says the worker that made them is (``FLAG_TRUSTED``).
"""

import collections
import itertools
import logging
import os
import socket as _socket
import threading
import time
from collections import OrderedDict
from typing import (
    TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence,
    Set, Tuple,
)

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import schedproto as sp
from .config import check_endpoint
from .exceptions import HandshakeRefused
from .functions import describe, function_key
from .inprocess import SharedContext, lookup
from .lease import parse_grant
from .leasekeeper import LeaseKeeper
from .liveness import heartbeat_options
from .resultreader import ResultReader
from .trust import is_private_ipc, sender_may_pickle
from .wire import send_frames

if TYPE_CHECKING:
    from .security import ClientSecurity

__all__ = ["SchedulerClient", "SchedulerLost", "ResultSink"]

log = logging.getLogger("zmq_cluster.pool")

#: Functions remembered per client (function object -> key).
FUNCTION_CACHE = 256


class SchedulerLost(ConnectionError):
    """The scheduler went away (or dropped this client): pending tasks fail."""


class ResultSink(Protocol):
    """What receives the results of the tasks sent with it
    (:meth:`SchedulerClient.send_table`), called by whichever thread reads
    the result connection: ``deliver`` for each result (its wire-format
    frames; ``trusted``: whether they may be unpickled), ``fail`` for each
    task still waited for when the scheduler is lost, then ``wake`` once
    per sink after a batch of those calls."""

    def deliver(self, tid: int, frames: List[Any], trusted: bool) -> None: ...

    def fail(self, exc: BaseException) -> None: ...

    def wake(self) -> None: ...


#: A STATS or CONTROL request's waiter: [answered, the reply or the exception].
_Waiter = List[Any]


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class SchedulerClient:
    """Connects to the scheduler at ``address`` and waits for its WELCOME
    (at most ``connect_timeout`` seconds: TimeoutError). ``security``: a
    :class:`~zmq_cluster.security.ClientSecurity` for a CURVE scheduler.
    A scheduler that refuses this side at the security handshake (its
    authenticator does not admit this key, or one side has CURVE and the
    other not) raises :class:`~zmq_cluster.exceptions.HandshakeRefused` as
    soon as libzmq says so, not after ``connect_timeout``.

    When ``address`` is that of a scheduler running as a thread of this
    process (:func:`zmq_cluster.inprocess.register_in_process`; not with
    ``security``), the
    client connects to its inproc endpoint (``self.endpoint``) on its
    context; ``self.address`` stays the address given."""

    def __init__(self, address: str, *, heartbeat_timeout: float = 10.0,
                 socket_options: Optional[Mapping[int, Any]] = None,
                 connect_timeout: float = 30.0,
                 security: Optional["ClientSecurity"] = None, direct: bool = True) -> None:
        if not (isinstance(address, str) and address.startswith("inproc://")):
            try:
                check_endpoint(address)
            except (TypeError, ValueError) as exc:
                raise ValueError("the scheduler's address must be %s (or inproc://NAME), not %r"
                                 % (exc, address)) from None
        self.address = address
        self.security = security
        local = lookup(address) if security is None else None
        self._shared: Optional[SharedContext] = None
        if local is not None:
            self._shared, self.endpoint = local
            self._ctx = self._shared.context
        else:
            self.endpoint = address
            self._ctx = zmq.Context()
        opts: Dict[Any, Any] = {zmq.LINGER: 0, zmq.SNDHWM: 0, zmq.RCVHWM: 0}
        opts.update(heartbeat_options(heartbeat_timeout))
        opts.update(socket_options or {})
        self._rx = self._ctx.socket(zmq.DEALER)
        self._tx = self._ctx.socket(zmq.DEALER)
        for sock in (self._rx, self._tx):
            for opt, value in opts.items():
                sock.setsockopt(opt, value)
            if security is not None:
                security.apply(sock)
        # Over inproc, a DEALER whose scheduler has stopped has no peer left,
        # and a send would wait for one forever: see _send_tx.
        self._tx_flags = zmq.DONTWAIT if self.endpoint.startswith("inproc://") else 0
        # Nothing is read from the submit connection (only a RESET may come):
        # bound what a scheduler can queue there.
        self._tx.setsockopt(zmq.RCVHWM, 64)
        self._monitor = self._rx.get_monitor_socket(zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED)
        # Who reads the result connection and the lease's: the I/O thread,
        # or a thread waiting for its result (zmq_cluster.resultreader).
        self._reading = ResultReader(self._ctx, self._reader_sockets, self._dispatch,
                                     lambda: self._closed)
        self._thread = self._reading.thread
        self._sinks: Dict[int, ResultSink] = {}  # task id -> sink
        self._stats_waiters: Dict[int, _Waiter] = {}  # request id -> [event, reply]
        self._lock = threading.Lock()  # the submit socket, function keys
        self._fn_keys: "OrderedDict[Callable[..., Any], int]" = OrderedDict()
        self._fn_sent: Set[int] = set()
        self._control_waiters: Dict[int, _Waiter] = {}  # request id -> [event, reply]
        self._closed = False
        self._shutting_down = False
        self.lost: Optional[SchedulerLost] = None
        self.trusted = False
        #: Results that arrived for no waiting task (cancelled ones).
        self.unmatched_results = 0
        #: Called with each such result's frames (None: they are dropped).
        self.on_unmatched: Optional[Callable[[List[Any]], None]] = None
        #: Messages from the scheduler rejected as malformed, by reason.
        self.counters: "collections.Counter[str]" = collections.Counter()
        # Single tasks straight to a leased worker (zmq_cluster.lease).
        self._leases = LeaseKeeper(self._ctx, self._lock, self._send_tx, self._sinks.__contains__,
                                   self.counters, heartbeat_timeout)
        self._leases.enabled = direct
        self._reader_base = [self._rx, self._monitor]
        try:
            self._rx.connect(self.endpoint)
            try:
                # Not blocking: a handshake refused this soon (libzmq's I/O
                # thread is quick on loopback) has taken the connection's
                # queue away, and a blocking send would wait for ever. The
                # monitor then holds the refusal, which the wait reports.
                self._rx.send_multipart(sp.message(sp.HELLO, {
                    "role": sp.ROLE_CLIENT, "host": _socket.gethostname(),
                    "pid": os.getpid()}), zmq.DONTWAIT)
            except zmq.Again:
                pass
            welcome = self._await_welcome(connect_timeout)
            self.client_no = self._leases.client_no = welcome["client_no"]
            self.workers_at_start = welcome.get("workers", 0)
            self._tx.connect(self.endpoint)
            self._tx.send_multipart(sp.message(sp.HELLO, {
                "role": sp.ROLE_SUBMIT, "client_no": self.client_no}))
        except BaseException:
            self._close_sockets()
            raise
        self._ids = itertools.count(1)
        # The next task id: this client's number in the top bits.
        self._next_tid = (self.client_no << 40) | 1
        self._tid_lock = threading.Lock()
        self._reading.start()

    def _await_welcome(self, timeout: float) -> Dict[Any, Any]:
        """The scheduler's WELCOME, within ``timeout`` seconds.

        A handshake failure libzmq does not retry (AUTH: the scheduler's
        authenticator refused this key; PROTOCOL: the two sides' security
        differs) raises :class:`HandshakeRefused` at once: libzmq ends the
        connection's session on those and never reconnects. A failure with
        no detail (``EVENT_HANDSHAKE_FAILED_NO_DETAIL``) is not definitive:
        libzmq reports it when the connection drops during the handshake
        (a scheduler restarting, a network hiccup; a scheduler without
        CURVE that resets the connection before this side has read its
        greeting, which a later attempt reports as PROTOCOL; a CURVE server
        key that is not the scheduler's, whose HELLO the scheduler cannot
        open and drops without a word) and reconnects; the client keeps
        waiting, and the TimeoutError at the end says how often it happened.
        """
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self._rx, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        no_detail = 0
        while True:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(int(left * 1000) + 1)) if left > 0 else {}
            if not ready:
                why = ""
                if no_detail:
                    why = (": the handshake failed %d times with no detail (the scheduler dropped"
                           " the connection during it)%s" % (no_detail, (
                               "; check that the scheduler key is the scheduler's public key"
                               if self.security is not None else
                               "; a scheduler that uses CURVE does that to a side without"
                               " keys, as this one is")))
                raise TimeoutError("no scheduler answered at %s within %g s%s"
                                   % (self.address, timeout, why))
            if self._monitor in ready:
                event = parse_monitor_message(self._monitor.recv_multipart())["event"]
                if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                    raise self._refusal(event)
                if event & _HANDSHAKE_FAILED:
                    no_detail += 1
                continue
            frames = self._rx.recv_multipart(copy=False)
            try:
                mtype, _, _ = sp.parse_ctl(frames[0].bytes)
                if mtype != sp.WELCOME:
                    continue
                welcome = sp.parse_body(frames[1].bytes)
                if type(welcome) is not dict or type(welcome.get("client_no")) is not int:
                    raise sp.ProtocolError("a WELCOME of the wrong form")
            except (sp.ProtocolError, IndexError) as exc:
                self.counters["malformed"] += 1
                log.warning("pool rejected a malformed message from the scheduler: %s", exc)
                continue
            self.trusted = sender_may_pickle(
                frames[1], curve="client" if self.security is not None else None,
                private_ipc=is_private_ipc(self.address),
                inproc=self.endpoint.startswith("inproc://"))
            return welcome

    def _refusal(self, event: int) -> HandshakeRefused:
        """The :class:`HandshakeRefused` for a definitive handshake failure."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            key = self.security.public_key.decode("ascii") if self.security is not None else "?"
            return HandshakeRefused(
                "the scheduler at %s refused this key: its authorized keys do not include this"
                " side's public key %s (CURVE); add that key's .key file to the scheduler's"
                " authorized keys directory and restart the scheduler, or use a key it admits"
                % (self.address, key), "auth", self.address)
        if self.security is None:
            how = ("the scheduler uses CURVE and this side has no keys: give this side's secret"
                   " key and the scheduler's public key")
        else:
            how = ("this side uses CURVE keys and the scheduler at that address does not (or"
                   " it is not a zmq-cluster scheduler): connect without keys, or to a"
                   " scheduler started with keys")
        return HandshakeRefused(
            "the security handshake with the scheduler at %s failed: %s"
            % (self.address, how), "protocol", self.address)

    # ------------------------------------------------------------- sending

    def new_task_id(self) -> int:
        """A fresh task id, unique in the scheduler's ledger."""
        return self.reserve_task_ids(1)

    def reserve_task_ids(self, n: int) -> int:
        """The first of ``n`` fresh consecutive task ids (thread-safe; ids
        reserved and not used are simply never seen)."""
        with self._tid_lock:
            first = self._next_tid
            self._next_tid = first + n
        return first

    def function_key(self, fn: Callable[..., Any]) -> int:
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
                self._send_tx([sp.ctl(sp.FUNC), sp.body((key,) + blob)])
                self._fn_sent.add(key)
            self._leases.remember_function(key, blob)
            try:
                self._fn_keys[fn] = key
                if len(self._fn_keys) > FUNCTION_CACHE:
                    self._fn_keys.popitem(last=False)
            except TypeError:
                pass
        return key

    def send_table(self, table: bytes, count: int, frames: List[Any], tids: Sequence[int],
                   sink: ResultSink, direct: bool = False) -> None:
        """Send one batch of ``count`` tasks, ``tids``, made into its table
        and data ``frames`` (framing.encode_task_table); ``sink``
        (registered first) receives their results. ``direct``: a single
        task may go straight to a leased worker (zmq_cluster.lease) when
        one is ready and free."""
        if self.lost is not None:
            raise self.lost
        self._sinks.update(dict.fromkeys(tids, sink))
        with self._lock:
            if direct and count == 1 and self._leases.try_send(table, frames):
                return
            self._send_tx([sp.ctl(sp.TASKS, count), table] + frames)

    @property
    def lease(self) -> Optional[Dict[str, Any]]:
        """The worker this client sends single tasks to directly: a dict
        (worker_no, pid, address, ready), or None."""
        return self._leases.info

    def _send_tx(self, frames: List[Any]) -> None:
        """Send on the submit connection (under ``self._lock``). An inproc
        DEALER whose scheduler stopped has no peer, where a send would
        block forever: it raises SchedulerLost instead (tcp and ipc
        connections queue while they reconnect)."""
        try:
            send_frames(self._tx, frames, self._tx_flags)
        except zmq.Again:
            raise SchedulerLost("the scheduler at %s stopped" % self.address) from None

    def cancel(self, ids: Optional[Iterable[int]] = None) -> None:
        """Ask the scheduler to drop queued tasks (all of this client's with
        None); their results, if any come, are dropped here."""
        if ids is not None:
            ids = list(ids)  # (read twice: an iterator would send an empty CANCEL)
            for tid in ids:
                self._sinks.pop(tid, None)
        if self._closed:
            return
        try:
            with self._lock:
                self._send_tx(sp.message(sp.CANCEL, ids))
        except SchedulerLost:
            pass  # nothing runs there any more

    def forget(self, tid: int) -> Optional[ResultSink]:
        """Stop waiting for ``tid``: its sink, or None if it was not waited for."""
        self._leases.forget(tid)
        return self._sinks.pop(tid, None)

    def forget_all(self) -> List[ResultSink]:
        """Stop waiting for every task waited for now: their sinks (the
        caller cancels or fails them)."""
        self._leases.forget_all()
        sinks = []
        for tid in list(self._sinks):
            sink = self._sinks.pop(tid, None)
            if sink is not None:
                sinks.append(sink)
        return sinks

    def pending(self) -> int:
        return len(self._sinks)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def stats(self, timeout: float = 10.0, wait_workers: int = 0) -> Dict[Any, Any]:
        """The scheduler's STATS reply (a dict); with ``wait_workers`` the
        scheduler answers once that many workers are registered."""
        return self._request(self._stats_waiters, sp.STATS, {"wait_workers": wait_workers},
                             timeout)

    def control(self, op: str, timeout: float = 10.0) -> Dict[Any, Any]:
        """Ask the scheduler for a CONTROL operation (``schedproto.OP_*``):
        its reply, a dict with ``ok``, ``workers`` (how many were told) and,
        when refused, ``error``."""
        return self._request(self._control_waiters, sp.CONTROL, {"op": op}, timeout)

    def _request(self, waiters: Dict[int, _Waiter], mtype: int, body: Dict[str, Any],
                 timeout: float) -> Any:
        if self.lost is not None:
            raise self.lost
        rid = next(self._ids)
        waiter: _Waiter = [threading.Event(), None]
        waiters[rid] = waiter
        try:
            with self._lock:
                self._send_tx(sp.message(mtype, dict(body, id=rid)))
            if not waiter[0].wait(timeout):
                raise TimeoutError("the scheduler did not answer %s within %g s"
                                   % (sp.TYPE_NAMES[mtype], timeout))
        finally:
            waiters.pop(rid, None)
        if isinstance(waiter[1], BaseException):
            raise waiter[1]
        return waiter[1]

    # ------------------------------------------------------------- receiving

    def read_until(self, done: Callable[[], bool], timeout: Optional[float] = None) -> None:
        """Read results in this thread until ``done()`` (see
        :meth:`zmq_cluster.resultreader.ResultReader.read_until`)."""
        if self.lost is None:
            self._reading.read_until(done, timeout)

    def _reader_sockets(self) -> Tuple[int, List[zmq.Socket]]:
        """For the reader: the result connection, its monitor, then the
        lease's sockets; and their version."""
        leases = self._leases
        return leases.version, leases.reader_sockets(self._reader_base)

    def _dispatch(self, which: int, frames: List[Any]) -> None:
        """For the reader: a message from ``_reader_sockets()[which]``."""
        if which > 1:
            self._leases.on_message(which - 2, frames, self._deliver, self.trusted)
        else:
            self._on_message(which, frames)

    def _on_message(self, which: int, frames: List[Any]) -> None:
        """One message from the result connection (``which`` 0) or its
        monitor (1), read by the I/O thread or a waiting caller."""
        if which == 1:
            event = parse_monitor_message([frames[0]] + [bytes(f) for f in frames[1:]])
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._lose(SchedulerLost("lost the connection to the scheduler "
                                         "at %s" % self.address))
            return
        try:
            mtype, count, flags = sp.parse_ctl(frames[0])  # bytes (recv_any)
            if mtype == sp.RESULTS:
                self._results(frames, count, self.trusted and bool(flags & sp.FLAG_TRUSTED))
            elif mtype in (sp.STATS, sp.CONTROL):
                reply = sp.parse_body(frames[1].bytes)
                if type(reply) is not dict:
                    raise sp.ProtocolError("a %s reply that is not a dict"
                                           % sp.TYPE_NAMES[mtype])
                waiters = (self._stats_waiters if mtype == sp.STATS
                           else self._control_waiters)
                rid = reply.get("id")
                # Popped: a disconnect right after cannot overwrite it.
                waiter = waiters.pop(rid, None) if type(rid) is int else None
                if waiter is not None:
                    waiter[1] = reply
                    waiter[0].set()
            elif mtype == sp.RESET:
                why = sp.parse_body(frames[1].bytes) if len(frames) > 1 else None
                self._lose(SchedulerLost("the scheduler at %s %s" % (
                    self.address, "stopped" if why == sp.RESET_STOPPED
                    else "dropped this client")))
            elif mtype == sp.LEASE:
                self._leases.granted(parse_grant(sp.parse_body(frames[1].bytes)), self._closed)
            elif mtype == sp.REVOKE:
                note = sp.parse_body(frames[1].bytes)
                if type(note) is not dict or type(note.get("worker_no")) is not int:
                    raise sp.ProtocolError("a REVOKE of the wrong form")
                self._leases.revoked(note["worker_no"])
            elif mtype not in (sp.PROBE, sp.WELCOME):
                raise sp.ProtocolError("unexpected %s" % sp.TYPE_NAMES[mtype])
        except Exception as exc:  # whatever arrives, the reader goes on
            self.counters["malformed"] += 1
            log.warning("pool rejected a malformed message from the scheduler: %s",
                        exc if isinstance(exc, sp.ProtocolError)
                        else "%s: %s" % (type(exc).__name__, exc))

    def _results(self, frames: List[Any], count: int, trusted: bool) -> None:
        """Deliver a RESULTS batch from the scheduler (``trusted``: whether
        the results may be unpickled)."""
        self._deliver(sp.walk(frames[1].bytes, count, sp.RESULT_ENTRY, frames[2:]), trusted)

    def _deliver(self, entries: List[Tuple[Tuple[Any, ...], List[Any]]], trusted: bool) -> None:
        """Hand each result (``schedproto.walk``'s entries) to its sink."""
        sinks = self._sinks
        touched: Optional[Set[ResultSink]] = None
        last: Optional[ResultSink] = None
        for fields, msg in entries:
            tid = fields[0]
            sink = sinks.pop(tid, None)
            if sink is None:
                self.unmatched_results += 1  # cancelled, or its caller gave up
                if self.on_unmatched is not None:
                    self.on_unmatched(msg)
                continue
            sink.deliver(tid, msg, trusted)
            if sink is not last:
                if touched is None:
                    touched = set()
                touched.add(sink)
                last = sink
        if touched:
            for sink in touched:
                sink.wake()

    def _lose(self, exc: SchedulerLost) -> None:
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
        for waiter in list(self._stats_waiters.values()) + list(self._control_waiters.values()):
            if not waiter[0].is_set():
                waiter[1] = exc
                waiter[0].set()

    # ------------------------------------------------------------- closing

    def send_shutdown(self) -> None:
        """Ask the scheduler to stop its workers and itself."""
        self._shutting_down = True
        with self._lock:
            self._send_tx(sp.message(sp.SHUTDOWN))

    def close(self) -> None:
        """Say BYE, stop the I/O thread, close the sockets."""
        if self._closed:
            return
        self._closed = True
        try:
            # BYE goes on the submit connection only, after whatever was sent
            # there: the two connections are not ordered with each other.
            try:
                with self._lock:
                    self._send_tx(sp.message(sp.BYE))
            except SchedulerLost:
                pass
        except zmq.ZMQError:
            pass
        self._reading.stop()
        self._close_sockets()

    def _close_sockets(self) -> None:
        if getattr(self, "_leases", None) is not None:
            self._leases.close()
        if getattr(self, "_monitor", None) is not None:
            self._rx.disable_monitor()  # (see lease.DirectLease.close_tx)
        if getattr(self, "_reading", None) is not None:
            self._reading.close()
        for sock in ("_rx", "_monitor"):
            s = getattr(self, sock, None)
            if s is not None:
                s.close(linger=0)
        # What is still queued (BYE, CANCEL, SHUTDOWN) gets a moment to
        # leave; a scheduler known to be gone must not hold up the close.
        self._tx.close(linger=0 if self.lost else 500)
        if self._shared is not None:
            self._shared.release()
        else:
            self._ctx.term()
