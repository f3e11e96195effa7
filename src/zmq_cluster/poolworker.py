"""The pool worker: asks a scheduler for tasks, runs them, sends results.

``run_worker(address)`` (or ``python -m zmq_cluster._start worker
--connect ADDRESS``) connects a DEALER to the scheduler, says HELLO with its credit
(how many tasks and bytes of arguments it is ready to hold), and then runs
the tasks it is given in order. Results go back in batches: a batch is sent
when the worker has nothing else in hand, when it holds 256 results, after
2 ms, or at once when tasks take long (so no result waits behind another
task). The credit it asks for follows its measured task time: tiny tasks,
many in hand; long tasks, two (one running, one ready).

Liveness is libzmq's: ZMTP heartbeats run in libzmq's I/O thread, so a task
that holds the GIL does not make the worker look dead. When the connection
drops (the scheduler declared this worker dead, e.g. after SIGSTOP), the
worker forgets the tasks it held (they run elsewhere) and, once reconnected,
says HELLO again. A task given a timeout runs under an interval timer whose
SIGALRM (default action: end the process) stops a hung task even while it
holds the GIL; the scheduler has already failed it with TimeoutError and a
supervisor (LocalCluster, ``zmq-cluster worker``) starts a new worker.

Trust: the worker unpickles a task's arguments, or loads a function pickled
by value, only when the scheduler says the task's submitter is trusted
(``FLAG_TRUSTED``) *and* its own connection to the scheduler is: CURVE
(``security``), loopback, or ipc in a private directory. Otherwise a
pickled argument or function is refused unexecuted: the task fails with the
reason, which is also logged and counted (``counters["pickle_refused"]``).

Direct tasks (``direct``, on by default): a worker whose scheduler is on
this host also binds a *direct socket* (:mod:`zmq_cluster.workerdirect`),
on which pools of this host that lease it send single tasks straight to it,
and get their results straight back: two process hops instead of four.

Shared memory (``shared_memory``, ``--shared-memory``; same host only):
the worker maps the slots a client sends large arguments in, and returns
large results in slots of its own when the task asks for that
(``taskcodec.MODE_SHM_RESULTS``). A task whose slots it cannot map (no
shared memory here, another host or uid) fails saying why, counted in
``counters["shm_refused"]``.
"""

import argparse
import collections
import gc
import importlib
import logging
import math
import os
import signal
import socket as _socket
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import framing
from . import schedproto as sp
from .exceptions import MessageFormatError
from .functions import FunctionCache, FunctionUnavailable, function_key
from .liveness import heartbeat_options
from .protocol import COPY_THRESHOLD, INLINE_HEADER_MAX, KIND_REQUEST, KIND_RESULT
from .security import ClientSecurity
from .sharedmem import SharedMemory, node_shared_memory
from .taskcodec import MODE_SHM_RESULTS, CopyCount, encode_result, run_items, task_failure
from .trust import is_private_ipc, sender_may_pickle
from .wire import recv_any, send_frames
from .workerdirect import DirectSocket, Task, bind_direct, direct_endpoint

#: When this process started (HELLO says how long ago, for `zmq-cluster status`).
_STARTED = time.monotonic()

_decode = framing.decode
_encode = framing.encode
_RESULT_ENTRY_PACK = sp.RESULT_ENTRY.pack

__all__ = ["PoolWorker", "run_worker"]

log = logging.getLogger("zmq_cluster.worker")

#: Credit asked for before any task has been timed.
INITIAL_CREDIT = 4
#: Most tasks a worker asks to hold.
MAX_CREDIT = 1024
#: A worker asks for enough tasks to keep this many seconds of work in hand.
CREDIT_SECONDS = 0.05
#: Results held back for batching: at most this many, this long, this
#: many bytes (a large result goes at once).
FLUSH_COUNT = 256
FLUSH_SECONDS = 0.002
FLUSH_BYTES = 1 << 20
#: Extra seconds the alarm gives a task beyond its timeout.
ALARM_GRACE = 0.2
class PoolWorker:
    """A worker of the scheduler at ``address``.

    ``security``: a :class:`~zmq_cluster.security.ClientSecurity` (this
    worker's key pair and the scheduler's public key) for a CURVE scheduler.
    ``credit_bytes``: bytes of task arguments the worker is ready to hold
    (at least one task is always accepted). ``socket_options``: extra
    options for the DEALER socket. ``shared_memory``: True, or a
    SharedMemory, to take and give large arrays by slot (see above).

    ``direct``: offer a direct socket to the pools of this host (see above).

    ``exit_code`` after :meth:`run`: ``schedproto.EXIT_STOPPED`` (0) when the
    scheduler said STOP, ``EXIT_RESTART`` when it asked for a restart
    (``zmq-cluster restart-workers``); a nanny replaces the latter only;
    :data:`EXIT_REFUSED` when the scheduler refused it at the security
    handshake (its key, or CURVE on one side only): libzmq does not
    reconnect after that, so the worker stops at once, logging why.
    ``counters``: messages rejected (``malformed``), tasks refused
    unexecuted (``tasks_refused``: undecodable, an unknown function, a
    pickle from the untrusted) and among them ``pickle_refused``.
    ``copies.copied_bytes``: payload bytes the codec copied decoding tasks
    and encoding results (see ``taskcodec.CopyCount``).
    """

    def __init__(self, address: str, *, heartbeat_timeout: float = 10.0,
                 credit_bytes: int = 256 << 20,
                 security: Optional[ClientSecurity] = None,
                 socket_options: Optional[Dict[int, Any]] = None,
                 context: Optional[zmq.Context] = None,
                 shared_memory: "SharedMemory | bool | None" = None,
                 direct: bool = True) -> None:
        self.address = address
        self.direct = direct
        self.shared_memory, self._own_shm = node_shared_memory(shared_memory)
        self.heartbeat_timeout = heartbeat_timeout
        self.credit_bytes = int(credit_bytes)
        self.security = security
        self.socket_options = dict(socket_options or {})
        self.exit_code = sp.EXIT_STOPPED
        self.counters: "collections.Counter[str]" = collections.Counter()
        self.copies = CopyCount()  # bytes the codec copied: tasks decoded, results encoded
        self._trust_args: Dict[str, Any]  # keywords for sender_may_pickle
        self._trust_args = dict(curve="client" if security is not None else None,
                                private_ipc=is_private_ipc(address),
                                inproc=address.startswith("inproc://"))
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._functions = FunctionCache()
        self._queue: Deque[Task] = collections.deque()
        self._direct: Optional[DirectSocket] = None
        self._drained = bytearray(3)  # see run()
        self._welcomed = False  # since the last HELLO
        self._out_entries: List[bytes] = []
        self._out_frames: List[Any] = []
        self._mean: Optional[float] = None
        self._out_seconds = 0.0
        self._out_bytes = 0
        self._credit = INITIAL_CREDIT
        self._running = True   # until stop() or STOP, even one before run()
        self.tasks_done = 0

    @property
    def direct_address(self) -> Optional[str]:
        """The direct socket's address once :meth:`run` has bound it (None:
        it offers none)."""
        return None if self._direct is None else self._direct.address

    def run(self) -> None:
        """Serve tasks until the scheduler says STOP or :meth:`stop` is called."""
        sock = self._sock = self._ctx.socket(zmq.DEALER)
        opts: Dict[Any, Any] = {zmq.LINGER: 2000, zmq.SNDHWM: 0, zmq.RCVHWM: 0}
        opts.update(heartbeat_options(self.heartbeat_timeout))
        opts.update(self.socket_options)
        for opt, value in opts.items():
            sock.setsockopt(opt, value)
        if self.security is not None:
            self.security.apply(sock)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED)
        self._failed_handshakes = 0
        self._refused = False
        sockets = [monitor, sock]
        endpoint = direct_endpoint(self.address, self.security is not None) if self.direct else None
        if endpoint is not None:
            self._direct = bind_direct(self._ctx, endpoint, opts, self._queue,
                                       self._add_function, self.counters)
            if self._direct is not None:
                sockets.append(self._direct.socket)
        sock.connect(self.address)
        self._handshakes = 0
        try:
            # Not blocking: a handshake refused before this line has taken
            # the connection's queue away (a send would wait for ever); the
            # monitor holds the refusal, read first thing in the loop.
            self._hello(zmq.DONTWAIT)
        except zmq.Again:
            pass
        # Connection events first, then messages (the scheduler's, then
        # direct clients'); waiting and receiving happen in zmq_cluster.wire
        # (without the GIL in the compiled twin).
        # Which sockets are known drained (see wire.recv_any): a send may
        # run a socket's commands, so every send clears its socket's entry
        # (_send for the scheduler's; after each use for the direct one).
        drained = self._drained = bytearray(len(sockets))
        queue = self._queue
        try:
            while self._running:
                if queue:
                    got = recv_any(sockets, 0, 0, None, drained)
                else:
                    self._flush()
                    got = recv_any(sockets, 1000 if self._direct is None
                                   else self._direct.wait_ms(1000), 0, None, drained)
                while got is not None:
                    which, frames = got
                    if which == 0:
                        self._monitor_event(frames)
                    elif which == 1:
                        self._handle(frames)
                    else:
                        self._direct.handle(frames)  # type: ignore[union-attr]
                        drained[2] = 0
                    # The monitor waits for the next look (it is looked at
                    # before every wait).
                    got = recv_any(sockets, 0, 1, None, drained)
                if queue and self._running:
                    self._run_some()
                    if self._direct is not None:
                        drained[2] = 0
                    self._flush()
            if self._refused:
                # No connection is left to send on (a send would wait for one).
                self._drop_held()
            else:
                self._flush(final=True)
                self._send(sp.message(sp.BYE))
        finally:
            if self._own_shm and self.shared_memory is not None:
                self.shared_memory.close()
            if self._direct is not None:
                self._direct.close()
            # Monitoring stops before its reading end goes: libzmq's I/O
            # thread would block for good sending a late event to it.
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=500)
            if self._own_ctx:
                self._ctx.term()

    def stop(self) -> None:
        """Make run() return after the task at hand."""
        self._running = False

    def _send(self, frames: Sequence[Any], flags: int = 0) -> None:
        send_frames(self._sock, frames, flags)
        self._drained[1] = 0

    def _hello(self, flags: int = 0) -> None:
        hello = {"role": sp.ROLE_WORKER, "host": _socket.gethostname(), "pid": os.getpid(),
                 "credit": self._credit, "credit_bytes": self.credit_bytes,
                 "uptime": time.monotonic() - _STARTED}
        if self._direct is not None:
            hello.update(direct=self._direct.address, direct_key=self._direct.key.hex())
        self._welcomed = False
        self._send(sp.message(sp.HELLO, hello), flags)

    def _drop_held(self) -> None:
        # Declared dead (or reset): the scheduler revokes our leases, whose
        # clients re-send what they gave us; a new key voids the old tokens.
        if self._direct is not None:
            self._direct.reset()
        self._queue.clear()
        self._out_entries, self._out_frames, self._out_seconds = [], [], 0.0
        self._out_bytes = 0

    def _monitor_event(self, frames: List[Any]) -> None:
        event = parse_monitor_message([frames[0]] + [bytes(f) for f in frames[1:]])["event"]
        if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            # Definitive: libzmq ends the connection and never reconnects
            # (see client.SchedulerClient._await_welcome); waiting would
            # serve nothing, so the worker stops and says why.
            log.error("worker %d: the scheduler at %s refused this worker at the handshake (%s);"
                      " libzmq does not try again, so the worker exits (status %d): %s",
                      os.getpid(), self.address, zmq.Event(event).name, EXIT_REFUSED,
                      _HANDSHAKE_HINT)
            self._refused = True
            self.exit_code = EXIT_REFUSED
            self._running = False
        elif event & _HANDSHAKE_FAILED:
            # Without detail (the connection dropped during the handshake):
            # libzmq retries by itself; say why once, then now and then.
            self._failed_handshakes += 1
            if self._failed_handshakes in (1, 10, 100) or self._failed_handshakes % 1000 == 0:
                log.error("worker %d: the handshake with the scheduler at %s failed (%s, %d"
                          " times): %s", os.getpid(), self.address, zmq.Event(event).name,
                          self._failed_handshakes, _HANDSHAKE_HINT)
        elif event == zmq.EVENT_DISCONNECTED:
            # Declared dead (or the scheduler went): what we hold runs elsewhere.
            self._drop_held()
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._handshakes += 1
            if self._handshakes > 1:
                self._hello()

    def _handle(self, frames: List[Any]) -> None:
        try:
            mtype, count, flags = sp.parse_ctl(frames[0])  # bytes (recv_any)
            if mtype == sp.TASKS:
                table = frames[1].bytes
                data = frames[2:]
                # The submitter (the scheduler says) and this connection.
                trusted = bool(flags & sp.FLAG_TRUSTED) and sender_may_pickle(
                    frames[1], **self._trust_args)
                self._queue.extend([(f[0], f[1], f[2], msg, trusted, None)
                                    for f, msg in sp.walk(table, count, sp.TASK_ENTRY, data)])
            elif mtype == sp.FUNC:
                self._add_function(frames[1])
            elif mtype == sp.RESET:
                # One HELLO answers every RESET up to its WELCOME: those are
                # for messages sent before it (late results after a
                # reconnection), and each HELLO more would drop, at the
                # scheduler, the tasks given since.
                if self._welcomed:
                    self._drop_held()
                    self._hello()
            elif mtype == sp.STOP:
                body = sp.parse_body(frames[1].bytes)
                if type(body) is dict and body.get("restart") is True:
                    self.exit_code = sp.EXIT_RESTART
                self._running = False
            elif mtype == sp.WELCOME:
                self._welcomed = True
            elif mtype == sp.PROBE:
                pass
            else:
                raise sp.ProtocolError("unexpected %s" % sp.TYPE_NAMES[mtype])
        except Exception as exc:  # whatever arrives, the worker goes on
            self.counters["malformed"] += 1
            log.warning("worker %d rejected a malformed message: %s", os.getpid(),
                        exc if isinstance(exc, sp.ProtocolError)
                        else "%s: %s" % (type(exc).__name__, exc))

    def _add_function(self, frame: Any) -> None:
        """A FUNC body (from the scheduler or a direct client): kept."""
        body = sp.parse_body(frame.bytes)
        if type(body) is not tuple or len(body) != 4:
            raise sp.ProtocolError("FUNC body of the wrong form")
        key, module, qualname, pickled = body
        if (type(key) is not int or not (module is None or type(module) is str)
                or not (qualname is None or type(qualname) is str)
                or not (pickled is None or type(pickled) is bytes)):
            raise sp.ProtocolError("FUNC body of the wrong types")
        if key != function_key((module, qualname, pickled)):
            raise sp.ProtocolError("FUNC key does not match its function")
        if key not in self._functions and len(self._functions) >= sp.MAX_FUNCTIONS:
            raise sp.ProtocolError("more than %d functions" % sp.MAX_FUNCTIONS)
        self._functions.add(key, (module, qualname, pickled))

    def _run_some(self) -> None:
        """Run tasks from the queue until it is empty or the results held
        back should go (FLUSH_COUNT results, FLUSH_SECONDS of work,
        FLUSH_BYTES of data frames)."""
        queue = self._queue
        out = self._out_entries
        out_frames = self._out_frames
        functions = self._functions
        perf_counter = time.perf_counter
        pack = _RESULT_ENTRY_PACK
        last_key: Optional[int] = None
        last_trusted: Optional[bool] = None
        last_fn: Callable[..., Any]  # bound on the first task (its key is never None)
        copies = self.copies
        shm = self.shared_memory
        seconds_held = self._out_seconds
        done = 0
        # One clock reading per task: a task's seconds run from the end of
        # the one before (its result's bookkeeping, under a microsecond).
        start = perf_counter()
        while queue:
            tid, key, timeout_ms, msg, trusted, dest = queue.popleft()
            n = 0
            slots = None  # the result's slots, when it goes by slot
            try:
                if key != last_key or trusted != last_trusted:
                    last_fn = functions.get(key, trusted)
                    last_key, last_trusted = key, trusted
                kind, _, payload = _decode(msg, trusted, COPY_THRESHOLD, None, copies, shm)
                if kind != KIND_REQUEST or type(payload) is not tuple or len(payload) != 2:
                    raise ValueError("not a pool task")
                mode, items = payload
                out_shm = None
                if type(mode) is int and mode & MODE_SHM_RESULTS:
                    mode ^= MODE_SHM_RESULTS
                    out_shm = shm
                n = len(items)
                if timeout_ms:
                    signal.setitimer(signal.ITIMER_REAL, timeout_ms / 1000 + ALARM_GRACE)
                    try:
                        values, errors = run_items(last_fn, mode, items)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                else:
                    values, errors = run_items(last_fn, mode, items)
                before = 0 if out_shm is None else out_shm.arrays_sent
                try:
                    result = _encode((values, errors), KIND_RESULT, tid, copies, out_shm)
                except Exception:  # a value that does not encode: its item fails
                    result = encode_result(values, errors, tid, copies, out_shm)
                if out_shm is not None and out_shm.arrays_sent != before:
                    slots = out_shm.last_message()  # (small results: none by slot)
                del items, payload, values  # (argument slots are released)
            except (MessageFormatError, FunctionUnavailable) as exc:
                # Refused unexecuted (a pickle from the untrusted, a message
                # that does not decode, a function it cannot have): the task
                # fails saying why.
                self.counters["tasks_refused"] += 1
                if "pickle" in str(exc):
                    self.counters["pickle_refused"] += 1
                elif "shared-memory" in str(exc):
                    self.counters["shm_refused"] += 1
                log.warning("worker %d refused task %x: %s", os.getpid(), tid, exc)
                result = task_failure(exc, tid)
            except Exception as exc:
                result = task_failure(exc, tid)
            now = perf_counter()
            seconds = now - start
            start = now
            if dest is not None:
                # A direct task's result goes at once: its caller waits.
                direct = self._direct
                assert direct is not None
                if not direct.send_result(dest, tid, result, n, seconds) and slots:
                    assert shm is not None
                    shm.withdraw(slots)  # nobody will claim them
                direct.ran(n, seconds)
                self.tasks_done += n
                continue
            done += n
            seconds_held += seconds
            header = result[0]
            if len(result) == 1 and len(header) < INLINE_HEADER_MAX:
                out.append(pack(tid, len(header), 0, n, seconds) + header)
            else:
                entry, data = sp.pack_entry(sp.RESULT_ENTRY, (tid,), result, (n, seconds))
                out.append(entry)
                out_frames.extend(data)
                for f in data:
                    self._out_bytes += len(f) if isinstance(f, bytes) else memoryview(f).nbytes
                if self._out_bytes >= FLUSH_BYTES:
                    break
            if len(out) >= FLUSH_COUNT or seconds_held >= FLUSH_SECONDS:
                break
        self._out_seconds = seconds_held
        self.tasks_done += done

    def _flush(self, final: bool = False) -> None:
        """Send the results held back, and the DIRECT note when it is due
        (``final``: whatever is held)."""
        if self._direct is not None:
            note = self._direct.note(force=final)
            if note is not None:
                self._send(sp.message(sp.DIRECT, note))
        entries = self._out_entries
        if not entries:
            return
        mean = self._out_seconds / len(entries)
        self._mean = mean if self._mean is None else 0.5 * self._mean + 0.5 * mean
        credit = MAX_CREDIT if self._mean <= 0 else 1 + math.ceil(CREDIT_SECONDS / self._mean)
        self._credit = max(2, min(MAX_CREDIT, credit))
        frames = self._out_frames
        self._out_entries, self._out_frames, self._out_seconds = [], [], 0.0
        self._out_bytes = 0
        self._send([sp.ctl(sp.RESULTS, len(entries), self._credit), b"".join(entries)] + frames)


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_HANDSHAKE_HINT = ("check the CURVE keys: this side's public key must be in the scheduler's"
                   " authorized keys, and --scheduler-key must be the scheduler's public key"
                   " (a scheduler without keys refuses clients that have them, and the reverse)")

#: A worker stopped by SIGTERM exits with this status (128 + SIGTERM): a
#: nanny that did not send it replaces the worker.
EXIT_TERMINATED = 128 + signal.SIGTERM
#: A worker the scheduler refused at the security handshake exits with this
#: status (see schedproto.EXIT_REFUSED).
EXIT_REFUSED = sp.EXIT_REFUSED


def run_worker(address: str, **options: Any) -> int:
    """Run a pool worker for the scheduler at ``address`` in this process
    until the scheduler stops it; returns its exit code (see
    :class:`PoolWorker`). Options as for :class:`PoolWorker`."""
    worker = PoolWorker(address, **options)
    worker.run()
    return worker.exit_code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zmq_cluster._start worker")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--secret-key", default=None, help="this worker's secret key file")
    parser.add_argument("--server-key", default=None, help="the scheduler's public key, Z85")
    parser.add_argument("--import", dest="imports", action="append", default=[])
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--shared-memory", action="store_true",
                        help="take and give large arrays by same-host shared memory")
    parser.add_argument("--no-direct", dest="direct", action="store_false",
                        help="offer no direct socket: every task comes through the scheduler")
    args = parser.parse_args(argv)
    from .process import die_with_parent
    die_with_parent()
    logging.basicConfig(level=args.log_level, format="%(asctime)s worker %(message)s")
    security = None
    if args.secret_key:
        from .security import load_secret_key
        pair = load_secret_key(args.secret_key)
        security = ClientSecurity(pair.public, pair.secret, args.server_key.encode("ascii"))
    for name in args.imports:
        importlib.import_module(name)
    worker = PoolWorker(args.connect, heartbeat_timeout=args.heartbeat_timeout,
                        security=security, shared_memory=args.shared_memory,
                        direct=args.direct)
    gc.freeze()  # the loop's per-task objects are short-lived: collect rarely
    gc.set_threshold(50_000, 50, 100)
    terminated: List[bool] = []

    def on_sigterm(*_: Any) -> None:
        terminated.append(True)
        worker.stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    worker.run()
    sys.stdout.flush()
    return EXIT_TERMINATED if terminated else worker.exit_code

