"""What the processes of the throughput suite share (imported by
``_pipelines.py`` and ``_freerun.py``, which run as scripts): bounds, the
task, the records of the pickle design, binding and handshake counting.

The task of every small-task pipeline is ``x + 1`` on an int (8 raw bytes,
little-endian, for raw pyzmq); large arrays come back unchanged.
"""

import os
import struct
import sys
import time

import zmq

#: Bound on any one data receive (ms): a lost message fails the batch.
RECV_MS = 60_000
#: A process that hears nothing for this long (ms) assumes it was orphaned.
IDLE_MS = 600_000
#: How long a process waits for its peers to connect (ms).
CONNECT_MS = 60_000

#: A raw small task: one int64, little-endian.
RAW_INT = struct.Struct("<q")

#: ZMQ_CLUSTER_BENCH_RAW_ECHO=1: the raw worker sends each small task back
#: as it came (no + 1), the most plain pyzmq can save; the raw sink then
#: checks for x instead of x + 1. For the measurement of that difference
#: (benchmarks/README.md); the suite's raw does the + 1.
RAW_ECHO = os.environ.get("ZMQ_CLUSTER_BENCH_RAW_ECHO", "") not in ("", "0")


def plus_one(x):
    """The small task: ``x + 1`` for an int; anything else (a large array)
    comes back as it is."""
    return x + 1 if type(x) is int else x


def check_plus_one(values, n):
    """Raise unless ``values`` are exactly 1..n in some order."""
    if len(values) != n or sorted(values) != list(range(1, n + 1)):
        raise AssertionError("small tasks: %d results, not x + 1 for x in range(%d)"
                             % (len(values), n))


def now_ns():
    """CLOCK_MONOTONIC in ns: one clock for every process of the machine, so
    a round can start in one process and end in another."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# ---------------------------------------------------------- the pickle design

class Request:
    """A task request of the original design (pickled whole)."""

    def __init__(self, payload=None, metadata=None):
        self.payload = payload
        self.metadata = metadata


class Result:
    """A task result of the original design (pickled whole)."""

    STATUS_SUCCESS = "OK"
    STATUS_FAIL = "FAIL"

    def __init__(self, status=None, payload=None, request_metadata=None, metadata=None,
                 exception=None):
        self.status = status
        self.payload = payload
        self.request_metadata = request_metadata
        self.metadata = metadata
        self.exception = exception


# ------------------------------------------------------------------- helpers

def check_mode(expect):
    """Import zmq_cluster and refuse to run in the wrong framing mode."""
    import zmq_cluster as zc
    if expect is not None and bool(zc.FASTPATH) != bool(expect):
        sys.exit("zmq_cluster.FASTPATH is %s in pid %d, expected %s"
                 % (zc.FASTPATH, os.getpid(), bool(expect)))
    return zc


def bind(sock, transport, path):
    """Bind ``sock`` (ipc: at ``path``; tcp: a random loopback port); its URL."""
    if transport == "ipc":
        url = "ipc://" + path
        sock.bind(url)
        return url
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return "tcp://127.0.0.1:%d" % port


def handshake_monitor(sock):
    """A monitor of ``sock``'s handshakes, made before any peer starts."""
    return sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)


def wait_handshakes(sock, monitor, count, timeout_ms=CONNECT_MS):
    """Wait for ``count`` ZMTP handshakes on ``sock``, counted on ``monitor``
    (made before the workers started, so that no event is missed); the
    monitor is closed afterwards."""
    from zmq.utils.monitor import recv_monitor_message
    try:
        deadline = time.monotonic() + timeout_ms / 1000
        seen = 0
        while seen < count:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0 or not monitor.poll(left):
                raise TimeoutError("%d of %d workers connected" % (seen, count))
            if recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                seen += 1
        return seen
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def serve(ctl, handlers, name):
    """Obey JSON commands ``{"op": ..., ...}`` on the PAIR socket ``ctl``
    until "stop": ``handlers[op](**fields)`` returns a dict (or None) sent
    back with ``ok``; an exception is sent back as ``error`` (a traceback).
    Returns the exit status (1 after IDLE_MS without a command)."""
    import traceback
    while True:
        if not ctl.poll(IDLE_MS):
            print("%s %d: no command for %d s, exiting" % (name, os.getpid(), IDLE_MS // 1000),
                  file=sys.stderr)
            return 1
        command = ctl.recv_json()
        op = command.pop("op")
        try:
            if op not in handlers:
                raise ValueError("unknown op %r" % op)
            reply = dict(handlers[op](**command) or {}, ok=True)
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        ctl.send_json(reply)
        if op == "stop":
            return 0
