"""The processes of the throughput suite: one driver and its workers per pipeline.

Run by ``benchmarks/conftest.py`` as scripts, never imported by pytest:

    python _pipelines.py driver --impl IMPL --transport T --dir D --ctl URL
    python _pipelines.py worker --impl IMPL --requests URL --results URL [--commands URL]

IMPL is one of

* ``ours``   -- zmq_cluster: Ventilator -> BasicWorker (default identity
  HandleRequest) -> Sink. The framing twin is whatever the process's
  environment selects (``ZMQ_CLUSTER_NO_EXTENSIONS``), set by the harness;
  ``--expect-fastpath`` makes a process refuse to run in the wrong mode.
* ``raw``    -- plain pyzmq, the ceiling for Python: PUSH -> PULL/PUSH -> PULL
  of bytes frames; large arrays as multipart ``[header, array]`` with
  ``copy=False`` and ``np.frombuffer`` on both hops.
* ``pickle`` -- the original glimpse design: ``send_pyobj``/``recv_pyobj`` of
  a request object and a result object (pickled each way).
* ``mp``     -- ``multiprocessing.Pool.imap(identity, ..., chunksize=1)``
  (the driver makes the pool; no worker processes of ours).

The driver binds the data sockets and obeys JSON commands on a PAIR control
socket (``--ctl``, bound by the harness): ``connect``, ``prepare``,
``small``, ``large``, ``latency`` and ``stop``; every reply is a JSON object
with ``ok`` (and ``error``, a traceback, when not ok). Every receive here is
bounded: data receives by RECV_MS, control receives by IDLE_MS, after which
an orphaned process exits on its own.
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

#: Bound on any one data receive (ms): a lost message fails the batch.
RECV_MS = 60_000
#: A process that hears nothing for this long (ms) assumes it was orphaned.
IDLE_MS = 600_000
#: How long the driver waits for workers to connect (ms).
CONNECT_MS = 60_000
#: Small tasks in flight at once, and how many are sent per refill. Below the
#: sum of the default high-water marks (4 x 1000 messages between ventilator
#: and sink), so a blocking send can never deadlock against an unread sink.
SMALL_WINDOW = 1000
SMALL_REFILL = 100
#: Bytes of large arrays in flight at once (at least one array).
LARGE_WINDOW_BYTES = 256 << 20
#: Every LARGE_STRIDE-th element of each large result is compared.
LARGE_STRIDE = 4099

_RAW_HEADER = struct.Struct("<Q")  # element count of a raw array message


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


def identity(x):
    """The task of every pipeline."""
    return x


def _pool_pid(_):
    return os.getpid()


# ------------------------------------------------------------------- workers

def _check_mode(expect):
    """Import zmq_cluster and refuse to run in the wrong framing mode."""
    import zmq_cluster as zc
    if expect is not None and bool(zc.FASTPATH) != bool(expect):
        sys.exit("zmq_cluster.FASTPATH is %s in pid %d, expected %s"
                 % (zc.FASTPATH, os.getpid(), bool(expect)))
    return zc


def worker_ours(args):
    zc = _check_mode(args.expect_fastpath)
    ctx = zmq.Context()
    try:
        # The default HandleRequest returns the payload: the identity task.
        zc.BasicWorker(ctx, zc.Connect(args.requests), zc.Connect(args.results),
                       zc.Connect(args.commands), receiver_timeout=IDLE_MS).Run()
    finally:
        ctx.destroy(linger=0)


def worker_raw(args):
    """Echo bytes frames; a two-frame message is an array, viewed with
    np.frombuffer on the received frame and sent back zero-copy. An empty
    frame stops the worker."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        pull.rcvtimeo = IDLE_MS
        pull.connect(args.requests)
        push.connect(args.results)
        recv, send = pull.recv, push.send
        while True:
            msg = recv()
            if pull.rcvmore:
                frame = recv(copy=False)
                array = np.frombuffer(frame.buffer, dtype=np.float64)
                send(msg, zmq.SNDMORE)
                send(array, copy=False)
            elif msg:
                send(msg)
            else:
                break
    finally:
        pull.close(linger=0)
        push.close(linger=5000)
        ctx.term()


def worker_pickle(args):
    """The original design's worker loop: unpickle a Request, run the task,
    pickle a Result carrying the same metadata as ours. None stops it."""
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
                result = Result(Result.STATUS_SUCCESS, identity(request.payload),
                                request.metadata)
            except Exception as exc:
                result = Result(Result.STATUS_FAIL, None, request.metadata, exception=exc)
            result.metadata = dict(identity_info, seconds=time.perf_counter() - start)
            push.send_pyobj(result)
    finally:
        pull.close(linger=0)
        push.close(linger=5000)
        ctx.term()


# ------------------------------------------------------------------- drivers

def _bind(sock, transport, path):
    if transport == "ipc":
        url = "ipc://" + path
        sock.bind(url)
        return url
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return "tcp://127.0.0.1:%d" % port


def _wait_handshakes(sock, monitor, count, timeout_ms):
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
        return np.array([float(i)])

    def small_payloads(self, n):
        if n not in self.small:
            self.small[n] = [self.small_payload(i) for i in range(n)]
        return self.small[n]

    def small_values(self, results):
        return np.concatenate(results)

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
        values = np.sort(self.small_values(results))
        if len(results) != n or not np.array_equal(values, np.arange(n, dtype=np.float64)):
            raise AssertionError("small tasks: results differ from requests")

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
            if self.small_values([result])[0] != 7.0:
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
        self.request_url = _bind(self.push, args.transport, os.path.join(args.dir, "req"))
        self.result_url = _bind(self.pull, args.transport, os.path.join(args.dir, "res"))
        self.monitor = None
        if self.own_monitor:
            self.monitor = self.push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)

    def urls(self):
        return {"requests": self.request_url, "results": self.result_url}

    def connect(self, workers):
        self.workers = workers
        seen = _wait_handshakes(self.push, self.monitor, workers, CONNECT_MS)
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
        return np.array([float(i)]).tobytes()

    def small_values(self, results):
        return np.frombuffer(b"".join(results), dtype=np.float64)

    def large_payload(self, base):
        return (_RAW_HEADER.pack(base.size), base)

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
            if self.pull.rcvmore:
                frame = recv(copy=False)
                yield np.frombuffer(frame.buffer, dtype=np.float64)
            else:
                yield msg

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
        self.zc = zc = _check_mode(args.expect_fastpath)
        super().__init__(args, ctx)
        self.command_url = "ipc://" + os.path.join(args.dir, "cmd")
        self.ventilator = zc.Ventilator(ctx, self.push)
        self.sink = zc.Sink(ctx, self.pull, receiver_timeout=RECV_MS)
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
        it = self.pool.imap(identity, payloads, chunksize=1)
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
        while True:
            if not ctl.poll(IDLE_MS):
                print("driver %d: no command for %d s, exiting" % (os.getpid(), IDLE_MS // 1000),
                      file=sys.stderr)
                return 1
            command = ctl.recv_json()
            op = command["op"]
            try:
                if op == "connect":
                    reply = driver.connect(command["workers"])
                elif op == "prepare":
                    reply = driver.prepare(command["mib"])
                elif op == "small":
                    reply = driver.run_small(command["n"])
                elif op == "large":
                    reply = driver.run_large(command["n"])
                elif op == "latency":
                    reply = driver.run_latency(command["n"])
                elif op == "stop":
                    reply = driver.stop()
                else:
                    raise ValueError("unknown op %r" % op)
                reply = dict(reply or {}, ok=True)
            except Exception:
                reply = {"ok": False, "error": traceback.format_exc()}
            ctl.send_json(reply)
            if op == "stop":
                return 0
    finally:
        if driver is not None:
            driver.close()
        ctl.close(linger=1000)
        ctx.destroy(linger=0)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["driver", "worker"])
    parser.add_argument("--impl", required=True, choices=sorted(DRIVERS))
    parser.add_argument("--transport", choices=["ipc", "tcp"], default="ipc")
    parser.add_argument("--dir", help="driver: directory for ipc:// endpoints")
    parser.add_argument("--ctl", help="driver: control endpoint (bound by the harness)")
    parser.add_argument("--requests")
    parser.add_argument("--results")
    parser.add_argument("--commands")
    parser.add_argument("--expect-fastpath", type=int, default=None)
    args = parser.parse_args(argv)
    if args.role == "driver":
        return driver_main(args)
    WORKERS[args.impl](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
