"""One hop of a 64 MiB array over ipc://: one frame vs split into N-MiB frames.

The sender (a child process) sends the array as views of its memory
(copy=False). The receiver either takes one frame (copy=False, today's
zero-copy view) or receives each part of a split array into its place in a
preallocated 64-byte-aligned array, with one memcpy per frame (recv with
copy=False, then a numpy copy, frame by frame or after receiving the whole
message with recv_multipart) or with pyzmq's ``Socket.recv_into``
(zmq_recv into the destination). Prints GB/s medians of several rounds.
This is the measurement behind ``protocol.SPLIT_BYTES``.

    python benchmarks/split_size.py [--mib 64] [--rounds 5] [--messages 20]
"""

import argparse
import multiprocessing
import statistics
import tempfile
import time

import numpy as np
import zmq

MiB = 1 << 20


def aligned_empty(nbytes, alignment=64):
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes]


def sender(url, nbytes, chunk, count):
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 4)
    push.connect(url)
    arr = np.ones(nbytes, np.uint8)
    parts = [arr] if chunk == 0 else [arr[i:i + chunk] for i in range(0, nbytes, chunk)]
    for _ in range(count):
        push.send_multipart(parts, copy=False)
    push.close(linger=-1)
    ctx.term()


def receive(pull, mode, nbytes, chunk):
    if mode == "one frame":
        frame = pull.recv(copy=False)
        return np.frombuffer(frame.buffer, np.uint8)
    out = aligned_empty(nbytes)
    at = 0
    if mode == "recv_into":
        while True:
            n = pull.recv_into(out[at:at + chunk])
            at += n
            if not pull.rcvmore:
                break
    elif mode == "multipart":
        for frame in pull.recv_multipart(copy=False):
            view = np.frombuffer(frame.buffer, np.uint8)
            out[at:at + len(view)] = view
            at += len(view)
    else:
        while True:
            frame = pull.recv(copy=False)
            view = np.frombuffer(frame.buffer, np.uint8)
            out[at:at + len(view)] = view
            at += len(view)
            if not pull.rcvmore:
                break
    assert at == nbytes
    return out


def run(mode, nbytes, chunk, count):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 4)
    url = "ipc://%s/split" % tempfile.mkdtemp(prefix="zc-")
    pull.bind(url)
    proc = multiprocessing.Process(target=sender, args=(url, nbytes, chunk, count + 1))
    proc.start()
    receive(pull, mode, nbytes, chunk)  # first message: connection made
    t0 = time.perf_counter()
    for _ in range(count):
        arr = receive(pull, mode, nbytes, chunk)
    dt = time.perf_counter() - t0
    proc.join()
    pull.close(0)
    ctx.term()
    assert arr[-1] == 1
    return nbytes * count / dt / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--messages", type=int, default=20)
    a = p.parse_args()
    nbytes = a.mib * MiB
    cases = [("one frame", 0)] + [(m, c * MiB) for c in (2, 4, 8, 16)
                                  for m in ("memcpy", "multipart", "recv_into")]
    results = {case: [] for case in cases}
    for _ in range(a.rounds):
        for mode, chunk in cases:
            results[(mode, chunk)].append(run(mode, nbytes, chunk, a.messages))
    print("%d MiB, one hop over ipc, median of %d rounds x %d messages"
          % (a.mib, a.rounds, a.messages))
    for (mode, chunk), r in results.items():
        print("%-10s %-6s %6.2f GB/s" % (mode, "%dM" % (chunk // MiB) if chunk else "-",
                                         statistics.median(r)))


if __name__ == "__main__":
    main()
