"""The free-running small-task pipeline: ventilator, workers and sink each in
a process of its own (the workers are ``_pipelines.py``'s).

Run by the harness (``_harness.FreePipeline``) through ``_pipelines.py``:

    python _pipelines.py ventilator --impl IMPL --transport T --dir D --ctl URL
    python _pipelines.py sink       --impl IMPL --transport T --dir D --ctl URL
    python _pipelines.py mp         --ctl URL

The ventilator sends N tasks (ints 0..N-1) as fast as its socket's
high-water mark (1000, libzmq's default) lets it, with no window: nothing
waits for a result before sending. The sink takes N results and checks them
(x + 1 for every x, after the clock has stopped). A round's time runs from
the ventilator's first send to the sink's last receive, both read from
CLOCK_MONOTONIC (one clock for the whole machine), so neither the control
messages nor the check count.

IMPL is ``ours`` (zc.Ventilator.Send -> a BasicWorker whose HandleRequest
returns ``request + 1`` -> zc.Sink.Receive), ``raw`` (pyzmq PUSH/PULL of
8-byte frames), ``pickle`` (the documented module's send_pyobj design). The
``mp`` role is multiprocessing.Pool.imap in one process (it is its own
ventilator and sink).
"""

import multiprocessing
import os
import time

import numpy as np
import zmq

from _common import (
    CONNECT_MS, RAW_ECHO, RAW_INT, RECV_MS, Request, Result, bind, check_mode,
    check_plus_one, handshake_monitor, now_ns, plus_one, serve, wait_handshakes,
)


# ---------------------------------------------------------------- ventilators

class Ventilator:
    """Binds the request socket; ``send(n)`` sends n tasks free-running."""

    def __init__(self, args, ctx):
        self.args, self.ctx = args, ctx
        self.workers = 0
        self.push = ctx.socket(zmq.PUSH)
        self.url = bind(self.push, args.transport, os.path.join(args.dir, "req"))
        self.monitor = handshake_monitor(self.push)
        self.cache = {}

    def hello(self):
        return {"requests": self.url}

    def connect(self, workers):
        self.workers = workers
        return {"peers": wait_handshakes(self.push, self.monitor, workers)}

    def payloads(self, n):
        """The n tasks, made once (outside the clock)."""
        if n not in self.cache:
            self.cache = {n: self.make(n)}
        return self.cache[n]

    def make(self, n):
        return list(range(n))

    def send(self, n):
        payloads = self.payloads(n)
        t0 = now_ns()
        self.send_all(payloads)
        return {"t0": t0, "t_sent": now_ns()}

    def close(self):
        self.push.close(linger=0)


class RawVentilator(Ventilator):
    def make(self, n):
        return [RAW_INT.pack(i) for i in range(n)]

    def send_all(self, payloads):
        send = self.push.send
        for payload in payloads:
            send(payload)

    def stop(self):
        for _ in range(self.workers):
            self.push.send(b"")


class PickleVentilator(Ventilator):
    """The documented module's Ventilator: a ClusterRequest per task, pickled
    whole with send_pyobj."""

    def send_all(self, payloads):
        send = self.push.send_pyobj
        for payload in payloads:
            send(Request(payload))

    def stop(self):
        for _ in range(self.workers):
            self.push.send_pyobj(None)


class OursVentilator(Ventilator):
    """zc.Ventilator on the bound socket (adopted, so tcp can use a random
    port); it counts the workers itself, and sends the kill command."""

    def __init__(self, args, ctx):
        self.zc = check_mode(args.expect_fastpath)
        self.args, self.ctx = args, ctx
        self.workers = 0
        self.cache = {}
        self.push = ctx.socket(zmq.PUSH)
        self.url = bind(self.push, args.transport, os.path.join(args.dir, "req"))
        self.command_url = "ipc://" + os.path.join(args.dir, "cmd")
        self.ventilator = self.zc.Ventilator(ctx, self.push)
        self.ventilator.Setup()
        self.send_all = self.ventilator.Send

    def hello(self):
        return {"requests": self.url, "commands": self.command_url,
                "fastpath": bool(self.zc.FASTPATH)}

    def connect(self, workers):
        self.workers = workers
        return {"peers": self.ventilator.WaitForWorkers(workers, timeout=CONNECT_MS)}

    def stop(self):
        self.zc.BasicWorker.SendKillCommand(self.ctx, self.zc.Connect(self.command_url, bind=True),
                                            num_subscribers=self.workers, timeout=10_000)

    def close(self):
        self.ventilator.Shutdown()
        self.push.close(linger=0)


# ---------------------------------------------------------------------- sinks

class Sink:
    """Binds the result socket; ``recv(n)`` takes n results and checks them."""

    def __init__(self, args, ctx):
        self.args, self.ctx = args, ctx
        self.pull = ctx.socket(zmq.PULL)
        self.pull.rcvtimeo = RECV_MS
        self.url = bind(self.pull, args.transport, os.path.join(args.dir, "res"))
        self.monitor = handshake_monitor(self.pull)

    def hello(self):
        return {"results": self.url}

    def connect(self, workers):
        return {"peers": wait_handshakes(self.pull, self.monitor, workers)}

    def recv(self, n):
        values = self.take(n)
        t1 = now_ns()
        check_plus_one(self.values(values), n)
        return {"t1": t1}

    def values(self, values):
        return values

    def stop(self):
        pass

    def close(self):
        self.pull.close(linger=0)


class RawSink(Sink):
    def take(self, n):
        recv = self.pull.recv
        return [recv() for _ in range(n)]

    def values(self, values):
        return (np.frombuffer(b"".join(values), "<i8") + RAW_ECHO).tolist()


class PickleSink(Sink):
    """The documented module's Sink: recv_pyobj, the payload of every
    successful ClusterResult."""

    def take(self, n):
        recv = self.pull.recv_pyobj
        values = []
        append = values.append
        for _ in range(n):
            result = recv()
            if result.status != Result.STATUS_SUCCESS:
                raise RuntimeError("worker failed: %r" % (result.exception,))
            append(result.payload)
        return values


class OursSink(Sink):
    """zc.Sink on the bound socket: ``list(sink.Receive(n))``."""

    def __init__(self, args, ctx):
        self.zc = check_mode(args.expect_fastpath)
        super().__init__(args, ctx)
        self.sink = self.zc.Sink(ctx, self.pull, receiver_timeout=RECV_MS)
        self.sink.Setup()

    def take(self, n):
        return list(self.sink.Receive(n))

    def close(self):
        self.sink.Shutdown()
        super().close()


# ------------------------------------------------------------------------- mp

class Pool:
    """multiprocessing.Pool(workers).imap(plus_one, range(n), chunksize) in
    this process (spawned pool processes): its own ventilator and sink."""

    pool = None

    def __init__(self, args, ctx):
        self.workers = 0

    def hello(self):
        return {}

    def connect(self, workers):
        self.workers = workers
        self.pool = multiprocessing.get_context("spawn").Pool(workers)
        # Until every pool process has answered (bounded).
        deadline = time.monotonic() + CONNECT_MS / 1000
        pids = set()
        while len(pids) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError("%d of %d pool processes answered" % (len(pids), workers))
            pids.update(self.pool.map_async(_pid, range(4 * workers), chunksize=1)
                        .get(CONNECT_MS / 1000))
        return {"peers": len(pids)}

    def run(self, n, chunksize=1):
        """imap with ``chunksize`` 1 (one task per message, as ours); any
        other chunksize is Pool.map's default, through map_async (imap's
        chunked iterator has no timeout)."""
        payloads = list(range(n))
        t0 = now_ns()
        if chunksize == 1:
            it = self.pool.imap(plus_one, payloads, chunksize=1)
            values = [it.next(RECV_MS / 1000) for _ in payloads]
        else:
            values = self.pool.map_async(plus_one, payloads).get(RECV_MS / 1000)
        t1 = now_ns()
        check_plus_one(values, n)
        return {"t0": t0, "t1": t1}

    def stop(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _pid(_):
    return os.getpid()


VENTILATORS = {"ours": OursVentilator, "raw": RawVentilator, "pickle": PickleVentilator}
SINKS = {"ours": OursSink, "raw": RawSink, "pickle": PickleSink}


def role_main(role, args):
    """Run the ``ventilator``, ``sink`` or ``mp`` role until "stop"."""
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PAIR)
    node = None
    try:
        ctl.connect(args.ctl)
        try:
            if role == "mp":
                node = Pool(args, ctx)
            else:
                node = (VENTILATORS if role == "ventilator" else SINKS)[args.impl](args, ctx)
            hello = dict(node.hello(), ok=True, pid=os.getpid())
        except Exception:
            import traceback
            hello = {"ok": False, "error": traceback.format_exc()}
        ctl.send_json(hello)
        if node is None:
            return 1
        handlers = {"connect": node.connect, "stop": node.stop}
        if role == "ventilator":
            handlers["send"] = node.send
        elif role == "sink":
            handlers["recv"] = node.recv
        else:
            handlers["run"] = node.run
        return serve(ctl, handlers, role)
    finally:
        if node is not None:
            node.close()
        ctl.close(linger=1000)
        ctx.destroy(linger=0)
