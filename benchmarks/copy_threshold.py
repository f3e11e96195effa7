"""Measure where zero-copy sends start to beat copying sends.

Sends frames of each size over ipc:// between two processes (PUSH ->
PULL, receiver with copy=False, as the library does) with ``copy=True`` and
with ``copy=False`` (pyzmq's own copy_threshold set to 0, so that every
frame really is zero-copy), timing each run until the receiver acknowledges
the last message, and prints the median messages/s of 5 runs of each. COPY_THRESHOLD must lie above the sizes where zero-copy clearly loses.

    python benchmarks/copy_threshold.py
"""

import multiprocessing
import statistics
import sys
import tempfile
import time

import numpy as np
import zmq

SIZES = [1 << k for k in range(10, 21)]  # 1 KiB .. 1 MiB
RUNS = 5
BYTES_PER_RUN = 64 << 20


def _receiver(url, ack_url, counts):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(url)
    ack = ctx.socket(zmq.PUSH)
    ack.connect(ack_url)
    for count in counts:
        for _ in range(count):
            sock.recv(copy=False)
        ack.send(b"")
    sock.close()
    ack.close()
    ctx.term()


def main():
    tmp = tempfile.mkdtemp(prefix="zc-")
    url, ack_url = "ipc://%s/data" % tmp, "ipc://%s/ack" % tmp
    plan = []
    for size in SIZES:
        count = max(200, BYTES_PER_RUN // size)
        plan += [(size, copy, count) for _ in range(RUNS) for copy in (True, False)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.copy_threshold = 0
    sock.bind(url)
    ack = ctx.socket(zmq.PULL)
    ack.bind(ack_url)
    proc = multiprocessing.get_context("spawn").Process(
        target=_receiver, args=(url, ack_url, [c for _, _, count in plan for c in (1, count)]))
    proc.start()
    rates = {}
    for size, copy, count in plan:
        data = np.ones(size, np.uint8)
        sock.send(data, copy=copy)  # warm-up message, also waits for the peer
        ack.recv()
        start = time.perf_counter()
        for _ in range(count):
            sock.send(data, copy=copy)
        ack.recv()  # the receiver has them all
        rates.setdefault((size, copy), []).append(count / (time.perf_counter() - start))
    proc.join()
    sock.close()
    ack.close()
    ctx.term()
    print("%10s %14s %14s %8s" % ("bytes", "copy msg/s", "zero-copy msg/s", "ratio"))
    loses_up_to = None
    for size in SIZES:
        copied = statistics.median(rates[size, True])
        zero = statistics.median(rates[size, False])
        print("%10d %14.0f %14.0f %8.2f" % (size, copied, zero, zero / copied))
        if zero < 0.9 * copied:
            loses_up_to = size
    print("zero-copy is more than 10%% slower up to %s bytes; from there on the two are "
          "within noise or zero-copy wins" % loses_up_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
