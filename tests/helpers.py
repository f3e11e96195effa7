"""Test helpers: workers in threads and processes that always get stopped."""

import contextlib
import importlib
import multiprocessing
import threading
import time

import zmq

import zmq_cluster as zc
from zmq_cluster import _wire_py
from zmq_cluster._compat import NO_EXTENSIONS

WAIT_MS = 10000  # upper bound for any receive in a test

#: The wire twins to call directly: the pure one always, the compiled one
#: when the extension is in use (a missing extension fails the import).
WIRE_TWINS = [_wire_py]
if not NO_EXTENSIONS:
    WIRE_TWINS.append(importlib.import_module("zmq_cluster._fastpath.wire"))


class Stats:
    """A ``stats`` object for the wire functions."""

    def __init__(self):
        self.copied_bytes = self.messages_sent = self.messages_received = 0


@contextlib.contextmanager
def push_pull(ctx, address):
    """A (push, pull) pair: pull bound at ``address``, push connected to
    it; both closed (linger 0) on exit. Over inproc a message stays in
    libzmq's pipe, holding the sender's memory, until the receiver reads
    it."""
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        pull.bind(address)
        push.connect(address)
        yield push, pull
    finally:
        push.close(0)
        pull.close(0)


class DoublingWorker(zc.BasicWorker):
    """Returns payload * 2; raises for the payload "boom"."""

    def HandleRequest(self, request):
        if isinstance(request, str) and request == "boom":
            raise KeyError("boom")
        return request * 2


@contextlib.contextmanager
def worker_thread(ctx, request_url, result_url, command_url, worker_class=DoublingWorker,
                  **kwargs):
    """Run a worker in a thread; on exit, kill it through the command
    channel if it still runs, and join it."""
    worker = worker_class(ctx, zc.Connect(request_url), zc.Connect(result_url),
                          zc.Connect(command_url), **kwargs)
    errors = []

    def run():
        try:
            worker.Run()
        except Exception as exc:  # surfaced by the caller
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield worker, errors
    finally:
        # Other workers may share the command channel and take the kill
        # meant for this one: repeat until this one has stopped.
        deadline = time.monotonic() + WAIT_MS / 1000
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(zc.ReceiverTimeoutException):
                zc.BasicWorker.SendKillCommand(ctx, zc.Connect(command_url, bind=True),
                                               timeout=1000)
            thread.join(1)
        assert not thread.is_alive(), "worker thread did not stop"


def _process_main(request_url, result_url, command_url):
    ctx = zmq.Context()
    try:
        DoublingWorker(ctx, zc.Connect(request_url), zc.Connect(result_url),
                       zc.Connect(command_url), receiver_timeout=60000).Run()
    finally:
        ctx.destroy(linger=0)


@contextlib.contextmanager
def worker_processes(ctx, n, request_url, result_url, command_url):
    """Start ``n`` worker processes (spawned, so no inherited zmq state);
    on exit, kill them all through the command channel and join them."""
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_process_main, args=(request_url, result_url, command_url),
                        daemon=True) for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        yield procs
    finally:
        alive = sum(proc.is_alive() for proc in procs)
        if alive:
            with contextlib.suppress(zc.ReceiverTimeoutException):
                zc.BasicWorker.SendKillCommand(ctx, zc.Connect(command_url, bind=True),
                                               num_subscribers=alive, timeout=WAIT_MS)
        for proc in procs:
            proc.join(WAIT_MS / 1000)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
