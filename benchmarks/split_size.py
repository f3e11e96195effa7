"""One hop of a large array over ipc://: one frame (today's zero-copy view)
against the array split into N-MiB frames and assembled on receipt into
one 64-byte-aligned array (one memcpy per frame, after ``recv_multipart``
with copy=False, as the decoder does). Prints GB/s (median of rounds) and
the receiver's minor page faults per message. This is the measurement
behind ``protocol.SPLIT_BYTES``.

    python benchmarks/split_size.py [--mib 16 64] [--chunks 2 4 8 16] [--rounds 3]
"""

import argparse
import multiprocessing
import resource
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


def run(nbytes, chunk, count):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 4)
    url = "ipc://%s/split" % tempfile.mkdtemp(prefix="zc-")
    pull.bind(url)
    proc = multiprocessing.Process(target=sender, args=(url, nbytes, chunk, count + 2))
    proc.start()

    def receive():
        frames = pull.recv_multipart(copy=False)
        if not chunk:
            return np.frombuffer(frames[0].buffer, np.uint8)
        out = aligned_empty(nbytes)
        at = 0
        for frame in frames:
            view = np.frombuffer(frame.buffer, np.uint8)
            out[at:at + len(view)] = view
            at += len(view)
        return out

    receive()
    receive()  # connected, allocator warmed up
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(count):
        arr = receive()
        arr[::4096].sum()  # touched, as a user would
        del arr
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    proc.join()
    pull.close(0)
    ctx.term()
    return nbytes * count / seconds / 1e9, faults / count


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, nargs="+", default=[16, 64])
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--messages", type=int, default=20)
    a = p.parse_args()
    print("one hop over ipc, median of %d rounds x %d messages" % (a.rounds, a.messages))
    for mib in a.mib:
        for chunk in [0] + [c for c in a.chunks if c < mib]:
            runs = [run(mib * MiB, chunk * MiB, a.messages) for _ in range(a.rounds)]
            print("%3d MiB  %-22s %5.2f GB/s  %6.0f page faults/message" % (
                mib, "one frame (view)" if not chunk else "%d MiB frames, assembled" % chunk,
                statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)),
                flush=True)


if __name__ == "__main__":
    main()
