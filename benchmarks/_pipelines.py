"""The processes of the throughput suite: drivers and workers, and the entry
point of every role (the free-running roles are in ``_freerun.py``).

Run by the harness (``_harness.py``) as scripts, never imported by pytest:

    python _pipelines.py driver --impl IMPL --transport T --dir D --ctl URL
    python _pipelines.py worker --impl IMPL --requests URL --results URL [--commands URL]
    python _pipelines.py ventilator|sink|mp ...        (see _freerun.py)

IMPL is one of

* ``ours``   -- zmq_cluster: Ventilator -> a BasicWorker whose HandleRequest
  returns ``request + 1`` (an array as it is) -> Sink. The framing twin is
  whatever the process's environment selects (``ZMQ_CLUSTER_NO_EXTENSIONS``),
  set by the harness; ``--expect-fastpath`` makes a process refuse to run in
  the wrong mode.
* ``raw``    -- plain pyzmq, the ceiling for Python: PUSH -> PULL/PUSH -> PULL
  of 8-byte frames (an int64, sent back one higher); large arrays as
  multipart ``[header, array]`` with ``copy=False`` and ``np.frombuffer`` on
  both hops.
* ``pickle`` -- the documented module's design: ``send_pyobj``/``recv_pyobj``
  of a request object and a result object (pickled each way).
* ``mp``     -- ``multiprocessing.Pool.imap(plus_one, ..., chunksize=1)``
  (the driver makes the pool; no worker processes of ours).

A driver binds the data sockets and obeys JSON commands on a PAIR control
socket (``--ctl``, bound by the harness): ``connect``, ``prepare``,
``small`` (the windowed case), ``large``, ``latency`` and ``stop``; every
reply is a JSON object with ``ok`` (and ``error``, a traceback, when not
ok). Every receive here is bounded: data receives by RECV_MS, control
receives by IDLE_MS, after which an orphaned process exits on its own.
"""

import argparse
import multiprocessing
import os
import socket as _socket
import struct
import sys
import time
import traceback

import numpy as np
import zmq

from _common import (
    CONNECT_MS, IDLE_MS, RAW_ECHO, RAW_INT, RECV_MS, Request, Result, bind, check_mode,
    check_plus_one, handshake_monitor, plus_one, serve, wait_handshakes,
)

#: Small tasks in flight at once in the windowed case, and how many are sent
#: per refill. Below the sum of the default high-water marks (4 x 1000
#: messages between ventilator and sink), so a blocking send can never
#: deadlock against an unread sink.
SMALL_WINDOW = 1000
SMALL_REFILL = 100
#: Bytes of large arrays in flight at once (at least one array).
LARGE_WINDOW_BYTES = 256 << 20
#: Every LARGE_STRIDE-th element of each large result is compared.
LARGE_STRIDE = 4099

#: ZMQ_CLUSTER_BENCH_SHM=1 (the harness's ``ours-shm``): every node of ours
#: with ``shared_memory=True``.
SHM = os.environ.get("ZMQ_CLUSTER_BENCH_SHM", "") == "1"

#: A raw array message's header: element count and item size (16 bytes, so
#: that the worker tells it from an 8-byte small task by its length alone:
#: pyzmq's ``rcvmore`` property costs over a microsecond a call).
_RAW_HEADER = struct.Struct("<QQ")


# ------------------------------------------------------------------- workers

def worker_ours(args):
    zc = check_mode(args.expect_fastpath)

    class Worker(zc.BasicWorker):
        def HandleRequest(self, request):
            return request + 1 if type(request) is int else request  # plus_one, inline

    ctx = zmq.Context()
    try:
        Worker(ctx, zc.Connect(args.requests), zc.Connect(args.results),
               zc.Connect(args.commands), receiver_timeout=IDLE_MS, shared_memory=SHM).Run()
    finally:
        ctx.destroy(linger=0)


def worker_raw(args):
    """Plain pyzmq, as fast as it goes: an 8-byte frame is a small task and
    goes back as the int64 one higher; a 16-byte frame is an array's header,
    followed by the array's frame, viewed with np.frombuffer and sent back
    zero-copy. An empty frame stops the worker. (Told apart by length, not
    by pyzmq's ``rcvmore``, which costs over a microsecond a call.)"""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        pull.rcvtimeo = IDLE_MS
        pull.connect(args.requests)
        push.connect(args.results)
        recv, send = pull.recv, push.send
        from_bytes, to_bytes = int.from_bytes, int.to_bytes
        echo = RAW_ECHO
        while True:
            msg = recv()
            if len(msg) == 8:
                if echo:
                    send(msg)
                else:
                    send(to_bytes(from_bytes(msg, "little", signed=True) + 1, 8, "little",
                                  signed=True))
            elif msg:  # an array's header: its frame follows
                frame = recv(copy=False)
                array = np.frombuffer(frame.buffer, dtype=np.float64)
                send(msg, zmq.SNDMORE)
                send(array, copy=False)
            else:
                break
    finally:
        pull.close(linger=0)
        push.close(linger=5000)
        ctx.term()


def worker_pickle(args):
    """The documented module's worker loop: unpickle a Request, run the
    task, pickle a Result carrying the same metadata as ours. None stops it.
    (The documented worker also polls its command socket before every
    request; this one does not, which only makes it faster.)"""
    identity_info = {"host": _socket.gethostname(), "pid": os.getpid()}
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        pull.rcvtimeo = IDLE_MS
        pull.connect(args.requests)
        push.connect(args.results)
        while True:
            request = pull.recv_pyobj()
            if request is None:
                break
            start = time.perf_counter()
            try:
                result = Result(Result.STATUS_SUCCESS, plus_one(request.payload),
                                request.metadata)
            except Exception as exc:
                result = Result(Result.STATUS_FAIL, None, request.metadata, exception=exc)
            result.metadata = dict(identity_info, seconds=time.perf_counter() - start)
            push.send_pyobj(result)
    finally:
        pull.close(linger=0)
        push.close(linger=5000)
        ctx.term()


def _pool_pid(_):
    return os.getpid()


# ------------------------------------------------------------------- drivers

class Driver:
    """Ventilator and sink of one pipeline; subclasses say how to send and
    receive. ``send(items)`` sends a sequence of payloads, ``receive(n)``
    yields n results' payloads."""

    def __init__(self, args, ctx):
        self.args = args
        self.ctx = ctx
        self.workers = 0
        self.small = {}
        self.large = None

    # connect/stop ----------------------------------------------------------
    def urls(self):
        return {}

    def connect(self, workers):
        raise NotImplementedError

    def stop(self):
        pass

    def close(self):
        pass

    # payloads ---------------------------------------------------------------
    def small_payload(self, i):
        return i

    def small_payloads(self, n):
        if n not in self.small:
            self.small[n] = [self.small_payload(i) for i in range(n)]
        return self.small[n]

    def small_values(self, results):
        return results

    def prepare(self, mib):
        """Make the large array (outside the timed part) and send it through
        once, checking every element of the result."""
        n = int(mib * (1 << 20)) // 8
        base = np.arange(n, dtype=np.float64)
        self.large = (base, base[::LARGE_STRIDE].copy())
        for result in self.pipeline([self.large_payload(base)], 1):
            if not np.array_equal(result, base):
                raise AssertionError("large array came back changed")
        return {"bytes": base.nbytes}

    def large_payload(self, base):
        return base

    # batches ----------------------------------------------------------------
    def pipeline(self, payloads, window, refill=1):
        """Send ``payloads`` keeping at most ``window`` in flight, topping up
        ``refill`` at a time; yields the results as they arrive."""
        n = len(payloads)
        window = max(1, min(window, n))
        refill = max(1, min(refill, window))
        sent = window
        self.send(payloads[:window])
        received = 0
        for result in self.receive(n):
            received += 1
            yield result
            if sent < n and sent - received <= window - refill:
                top = min(n, sent + refill)
                self.send(payloads[sent:top])
                sent = top

    def run_small(self, n):
        payloads = self.small_payloads(n)
        results = list(self.pipeline(payloads, SMALL_WINDOW, SMALL_REFILL))
        check_plus_one(self.small_values(results), n)

    def run_large(self, n):
        base, sample = self.large
        window = max(1, LARGE_WINDOW_BYTES // base.nbytes)
        payloads = [self.large_payload(base)] * n
        count = 0
        for result in self.pipeline(payloads, window, max(1, window // 4)):
            if (result.dtype != base.dtype or result.shape != base.shape
                    or not np.array_equal(result[::LARGE_STRIDE], sample)):
                raise AssertionError("large array came back changed")
            count += 1
        if count != n:
            raise AssertionError("large arrays: %d of %d came back" % (count, n))

    def run_latency(self, n):
        payload = self.small_payload(7)
        rtt = []
        clock = time.perf_counter_ns
        for _ in range(n):
            start = clock()
            self.send([payload])
            for result in self.receive(1):
                pass
            rtt.append(clock() - start)
            if self.small_values([result])[0] != 8:
                raise AssertionError("latency: wrong result")
        return {"rtt_ns": rtt}


class SocketDriver(Driver):
    """Binds a PUSH socket for requests and a PULL socket for results."""

    #: Whether to count worker handshakes with a monitor of our own.
    own_monitor = True

    def __init__(self, args, ctx):
        super().__init__(args, ctx)
        self.push = ctx.socket(zmq.PUSH)
        self.pull = ctx.socket(zmq.PULL)
        self.pull.rcvtimeo = RECV_MS
        self.request_url = bind(self.push, args.transport, os.path.join(args.dir, "req"))
        self.result_url = bind(self.pull, args.transport, os.path.join(args.dir, "res"))
        self.monitor = None
        if self.own_monitor:
            self.monitor = handshake_monitor(self.push)

    def urls(self):
        return {"requests": self.request_url, "results": self.result_url}

    def connect(self, workers):
        self.workers = workers
        seen = wait_handshakes(self.push, self.monitor, workers)
        self.monitor = None
        # A warm-up round trip per worker: result connections are up too.
        self.run_small(8 * workers)
        return {"peers": seen}

    def close(self):
        if self.monitor is not None:
            self.monitor.close(linger=0)
        self.push.close(linger=0)
        self.pull.close(linger=0)


class RawDriver(SocketDriver):
    def small_payload(self, i):
        return RAW_INT.pack(i)

    def small_values(self, results):
        return (np.frombuffer(b"".join(results), "<i8") + RAW_ECHO).tolist()

    def large_payload(self, base):
        return (_RAW_HEADER.pack(base.size, base.itemsize), base)

    def send(self, items):
        send = self.push.send
        for item in items:
            if type(item) is bytes:
                send(item)
            else:
                self.push.send_multipart(item, copy=False)

    def receive(self, n):
        recv = self.pull.recv
        for _ in range(n):
            msg = recv()
            if len(msg) == 8:
                yield msg
            else:  # an array's header: its frame follows
                frame = recv(copy=False)
                yield np.frombuffer(frame.buffer, dtype=np.float64)

    def stop(self):
        for _ in range(self.workers):
            self.push.send(b"")


class PickleDriver(SocketDriver):
    def send(self, items):
        send = self.push.send_pyobj
        for payload in items:
            send(Request(payload))

    def receive(self, n):
        recv = self.pull.recv_pyobj
        for _ in range(n):
            result = recv()
            if result.status == Result.STATUS_FAIL:
                raise RuntimeError("worker failed: %r" % (result.exception,))
            yield result.payload

    def stop(self):
        for _ in range(self.workers):
            self.push.send_pyobj(None)


class OursDriver(SocketDriver):
    """zmq_cluster's Ventilator and Sink on the driver's bound sockets (an
    adopted socket works like one made from Connect(url, bind=True); this
    way tcp can use a random port). The Ventilator counts the workers."""

    own_monitor = False

    def __init__(self, args, ctx):
        self.zc = zc = check_mode(args.expect_fastpath)
        super().__init__(args, ctx)
        self.command_url = "ipc://" + os.path.join(args.dir, "cmd")
        self.ventilator = zc.Ventilator(ctx, self.push, shared_memory=SHM)
        self.sink = zc.Sink(ctx, self.pull, receiver_timeout=RECV_MS, shared_memory=SHM)
        self.ventilator.Setup()
        self.sink.Setup()
        self.send = self.ventilator.Send
        self.receive = self.sink.Receive

    def urls(self):
        return dict(super().urls(), commands=self.command_url, fastpath=bool(self.zc.FASTPATH))

    def connect(self, workers):
        self.workers = workers
        seen = self.ventilator.WaitForWorkers(workers, timeout=CONNECT_MS)
        self.run_small(8 * workers)
        return {"peers": seen}

    def stop(self):
        self.zc.BasicWorker.SendKillCommand(self.ctx, self.zc.Connect(self.command_url, bind=True),
                                            num_subscribers=self.workers, timeout=10_000)

    def close(self):
        self.ventilator.Shutdown()
        self.sink.Shutdown()
        super().close()


class PoolDriver(Driver):
    """multiprocessing.Pool.imap with chunksize 1 (spawned workers)."""

    pool = None

    def connect(self, workers):
        self.workers = workers
        self.pool = multiprocessing.get_context("spawn").Pool(workers)
        # Until every pool process has answered (bounded), then a warm-up.
        deadline = time.monotonic() + CONNECT_MS / 1000
        pids = set()
        while len(pids) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError("%d of %d pool processes answered" % (len(pids), workers))
            pids.update(self.pool.map_async(_pool_pid, range(4 * workers), chunksize=1)
                        .get(CONNECT_MS / 1000))
        self.run_small(8 * workers)
        return {"peers": len(pids)}

    def pipeline(self, payloads, window, refill=1):
        it = self.pool.imap(plus_one, payloads, chunksize=1)
        for _ in payloads:
            yield it.next(RECV_MS / 1000)

    def run_latency(self, n):
        raise NotImplementedError("no latency case for multiprocessing")

    def stop(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


DRIVERS = {"ours": OursDriver, "raw": RawDriver, "pickle": PickleDriver, "mp": PoolDriver}
WORKERS = {"ours": worker_ours, "raw": worker_raw, "pickle": worker_pickle}


def driver_main(args):
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PAIR)
    driver = None
    try:
        ctl.connect(args.ctl)
        try:
            driver = DRIVERS[args.impl](args, ctx)
            hello = {"ok": True, "pid": os.getpid(), "urls": driver.urls()}
        except Exception:
            hello = {"ok": False, "error": traceback.format_exc()}
        ctl.send_json(hello)
        if driver is None:
            return 1
        return serve(ctl, {"connect": driver.connect, "prepare": driver.prepare,
                           "small": driver.run_small, "large": driver.run_large,
                           "latency": driver.run_latency, "stop": driver.stop}, "driver")
    finally:
        if driver is not None:
            driver.close()
        ctl.close(linger=1000)
        ctx.destroy(linger=0)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["driver", "worker", "ventilator", "sink", "mp"])
    parser.add_argument("--impl", choices=sorted(DRIVERS), default="mp")
    parser.add_argument("--transport", choices=["ipc", "tcp"], default="ipc")
    parser.add_argument("--dir", help="directory for ipc:// endpoints")
    parser.add_argument("--ctl", help="control endpoint (bound by the harness)")
    parser.add_argument("--requests")
    parser.add_argument("--results")
    parser.add_argument("--commands")
    parser.add_argument("--expect-fastpath", type=int, default=None)
    args = parser.parse_args(argv)
    if args.role == "driver":
        return driver_main(args)
    if args.role == "worker":
        WORKERS[args.impl](args)
        return 0
    from _freerun import role_main
    return role_main(args.role, args)


if __name__ == "__main__":
    sys.exit(main())
