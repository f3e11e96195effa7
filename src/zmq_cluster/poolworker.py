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
supervisor (LocalCluster) starts a new worker.
"""

import argparse
import collections
import gc
import logging
import math
import os
import signal
import socket as _socket
import time
from typing import Any, Deque, Dict, List, Optional

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import framing
from . import schedproto as sp
from .functions import FunctionCache
from .liveness import heartbeat_options
from .protocol import KIND_REQUEST
from .taskcodec import encode_result, run_items, task_failure
from .wire import recv_any

_decode = framing.decode
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

    ``credit_bytes``: bytes of task arguments the worker is ready to hold
    (at least one task is always accepted). ``socket_options``: extra
    options for the DEALER socket (e.g. CURVE keys).
    """

    def __init__(self, address: str, *, heartbeat_timeout: float = 10.0,
                 credit_bytes: int = 256 << 20,
                 socket_options: Optional[Dict[int, Any]] = None,
                 context: Optional[zmq.Context] = None) -> None:
        self.address = address
        self.heartbeat_timeout = heartbeat_timeout
        self.credit_bytes = int(credit_bytes)
        self.socket_options = dict(socket_options or {})
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._functions = FunctionCache()
        self._queue: Deque[tuple] = collections.deque()
        self._out_entries: List[bytes] = []
        self._out_frames: List[Any] = []
        self._mean = None
        self._out_seconds = 0.0
        self._out_bytes = 0
        self._credit = INITIAL_CREDIT
        self._running = False
        self.tasks_done = 0

    def run(self) -> None:
        """Serve tasks until the scheduler says STOP or :meth:`stop` is called."""
        sock = self._sock = self._ctx.socket(zmq.DEALER)
        opts: Dict[Any, Any] = {zmq.LINGER: 2000, zmq.SNDHWM: 0, zmq.RCVHWM: 0}
        opts.update(heartbeat_options(self.heartbeat_timeout))
        opts.update(self.socket_options)
        for opt, value in opts.items():
            sock.setsockopt(opt, value)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        self._handshakes = 0
        self._hello()
        # Connection events first, then messages; waiting and receiving
        # happen in zmq_cluster.wire (without the GIL in the compiled twin).
        sockets = [monitor, sock]
        self._running = True
        queue = self._queue
        try:
            while self._running:
                if queue:
                    got = recv_any(sockets, 0)
                else:
                    self._flush()
                    got = recv_any(sockets, 1000)
                while got is not None:
                    which, frames = got
                    if which == 0:
                        self._monitor_event(frames)
                    else:
                        self._handle(frames)
                    got = recv_any(sockets, 0)
                if queue and self._running:
                    self._run_some()
                    self._flush()
            self._flush()
            self._send(sp.message(sp.BYE))
        finally:
            monitor.close(linger=0)
            sock.close(linger=500)
            if self._own_ctx:
                self._ctx.term()

    def stop(self) -> None:
        """Make run() return after the task at hand."""
        self._running = False

    def _send(self, frames):
        self._sock.send_multipart(frames, copy=False)

    def _hello(self):
        self._send(sp.message(sp.HELLO, {
            "role": sp.ROLE_WORKER, "host": _socket.gethostname(), "pid": os.getpid(),
            "credit": self._credit, "credit_bytes": self.credit_bytes}))

    def _drop_held(self):
        self._queue.clear()
        self._out_entries, self._out_frames, self._out_seconds = [], [], 0.0
        self._out_bytes = 0

    def _monitor_event(self, frames):
        event = parse_monitor_message([frames[0]] + [bytes(f) for f in frames[1:]])["event"]
        if event == zmq.EVENT_DISCONNECTED:
            # Declared dead (or the scheduler went): what we hold runs elsewhere.
            self._drop_held()
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._handshakes += 1
            if self._handshakes > 1:
                self._hello()

    def _handle(self, frames):
        try:
            mtype, count, flags = sp.parse_ctl(frames[0])  # bytes (recv_any)
            if mtype == sp.TASKS:
                table = frames[1].bytes
                data = frames[2:]
                trusted = bool(flags & sp.FLAG_TRUSTED)
                self._queue.extend([(f[0], f[1], f[2], msg, trusted)
                                    for f, msg in sp.walk(table, count, sp.TASK_ENTRY, data)])
            elif mtype == sp.FUNC:
                key, module, qualname, pickled = sp.parse_body(frames[1].bytes)
                self._functions.add(key, (module, qualname, pickled))
            elif mtype == sp.RESET:
                self._drop_held()
                self._hello()
            elif mtype == sp.STOP:
                self._running = False
            elif mtype in (sp.WELCOME, sp.PROBE):
                pass
            else:
                raise sp.ProtocolError("unexpected %s" % sp.TYPE_NAMES[mtype])
        except (sp.ProtocolError, ValueError, TypeError) as exc:
            log.warning("worker %d dropped a message: %s", os.getpid(), exc)

    def _run_some(self):
        """Run tasks from the queue until it is empty or the results held
        back should go (FLUSH_COUNT results, FLUSH_SECONDS of work,
        FLUSH_BYTES of data frames)."""
        queue = self._queue
        out = self._out_entries
        out_frames = self._out_frames
        functions = self._functions
        perf_counter = time.perf_counter
        pack = _RESULT_ENTRY_PACK
        last_key = last_trusted = last_fn = None
        seconds_held = self._out_seconds
        done = 0
        while queue:
            tid, key, timeout_ms, msg, trusted = queue.popleft()
            start = perf_counter()
            n = 0
            try:
                if key != last_key or trusted != last_trusted:
                    last_fn = functions.get(key, trusted)
                    last_key, last_trusted = key, trusted
                kind, _, payload = _decode(msg, trusted)
                if kind != KIND_REQUEST or type(payload) is not tuple or len(payload) != 2:
                    raise ValueError("not a pool task")
                mode, items = payload
                n = len(items)
                if timeout_ms:
                    signal.setitimer(signal.ITIMER_REAL, timeout_ms / 1000 + ALARM_GRACE)
                    try:
                        values, errors = run_items(last_fn, mode, items)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                else:
                    values, errors = run_items(last_fn, mode, items)
                result = encode_result(values, errors, tid)
            except Exception as exc:
                result = task_failure(exc, tid)
            seconds = perf_counter() - start
            done += n
            seconds_held += seconds
            header = result[0]
            if len(result) == 1 and len(header) < sp.INLINE_HEADER_MAX:
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

    def _flush(self):
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


def run_worker(address: str, **options: Any) -> None:
    """Run a pool worker for the scheduler at ``address`` in this process
    until the scheduler stops it. Options as for :class:`PoolWorker`."""
    PoolWorker(address, **options).run()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m zmq_cluster._start worker")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    from .process import die_with_parent
    die_with_parent()
    logging.basicConfig(level=args.log_level, format="%(asctime)s worker %(message)s")
    worker = PoolWorker(args.connect, heartbeat_timeout=args.heartbeat_timeout)
    gc.freeze()  # the loop's per-task objects are short-lived: collect rarely
    gc.set_threshold(50_000, 50, 100)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.run()
    return 0

