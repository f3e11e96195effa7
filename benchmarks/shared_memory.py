"""Go/no-go for same-host shared memory (issue 9, stretch): does an array
written once into a memfd slot, and named by a small zmq message, move
faster than today's split-frame socket path?

Three ways to move float64 arrays between processes over ipc://, side by
side in one run, medians of rounds:

* ``raw``    -- plain pyzmq, one frame ``copy=False``, ``np.frombuffer`` on
  receipt (the issue's baseline);
* ``socket`` -- zmq_cluster's codec as the nodes use it today
  (``framing.encode`` -> ``send_multipart(copy=False)`` ->
  ``recv_multipart(copy=False)`` -> ``framing.decode``: split 4 MiB frames,
  assembled into one aligned array);
* ``shm``    -- the prototype: the producer copies the array once into a
  slot of a memfd (at a 64-byte-aligned offset) and sends a 40-byte message
  naming (slot, offset, nbytes); the consumer fetched the memfd once
  (``socket.recv_fds`` over a Unix socket the producer serves), mapped it
  once, wraps the region as a writeable array, and sends the slot back over
  the Unix connection when that array is dropped (a ``weakref.finalize``
  on its base). No zmq_cluster code: this is only the mechanism.

Two shapes: ``hop``, producer -> consumer (bytes moved / time), and
``pipe``, the throughput suite's ventilator -> worker -> sink (ventilator
and sink in one process, an identity worker in another, 256 MiB in flight;
bytes moved both ways / time). The worker of ``shm`` copies its result into
a slot of its own (it does not forward the ventilator's reference).

    flock /work/wt/bench.lock python benchmarks/shared_memory.py [--mib 1 16 64] [--rounds 5]
"""

import argparse
import mmap
import multiprocessing
import os
import queue
import socket
import statistics
import struct
import tempfile
import threading
import time
import weakref

import numpy as np
import zmq

MiB = 1 << 20
WINDOW_BYTES = 256 << 20
RECV_MS = 60_000
REF = struct.Struct("<QQQQQ")  # magic, slot, offset, nbytes, round


# ---------------------------------------------------------------- shm prototype

class Slots:
    """Producer side: ``count`` slots of ``size`` bytes in one memfd, served
    to consumers over a Unix socket; a slot is free again when a consumer
    sends its number back."""

    def __init__(self, count, size, directory):
        self.size = -(-size // 4096) * 4096
        self.count = count
        self.fd = os.memfd_create("zc-slots", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.count * self.size)
        self.map = mmap.mmap(self.fd, self.count * self.size)
        self.array = np.frombuffer(self.map, np.uint8)
        self.free = queue.SimpleQueue()
        for i in range(count):
            self.free.put(i)
        self.path = os.path.join(directory, "slots-%d" % os.getpid())
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      12))[1]
            if uid != os.getuid():
                conn.close()
                continue
            socket.send_fds(conn, [struct.pack("<QQ", self.count, self.size)], [self.fd])
            threading.Thread(target=self._releases, args=(conn,), daemon=True).start()

    def _releases(self, conn):
        buf = b""
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while len(buf) >= 8:
                self.free.put(struct.unpack_from("<Q", buf)[0])
                buf = buf[8:]

    def put(self, arr):
        """Copy ``arr`` into a free slot: the message naming it."""
        slot = self.free.get(timeout=RECV_MS / 1000)
        start = slot * self.size
        flat = arr.reshape(-1).view(np.uint8)
        self.array[start:start + flat.nbytes] = flat
        return REF.pack(0x5A43, slot, start, flat.nbytes, 0) + self.path.encode()


class Attached:
    """Consumer side: the producers' memfds, fetched and mapped once each."""

    def __init__(self):
        self.maps = {}
        self.lock = threading.Lock()

    def array(self, msg, dtype=np.float64):
        _, slot, offset, nbytes, _ = REF.unpack_from(msg)
        path = bytes(msg[REF.size:]).decode()
        entry = self.maps.get(path)
        if entry is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            data, fds, _, _ = socket.recv_fds(conn, 16, 1)
            count, size = struct.unpack("<QQ", data)
            mm = mmap.mmap(fds[0], count * size)
            os.close(fds[0])
            entry = self.maps[path] = (conn, memoryview(mm))
        conn, view = entry
        arr = np.frombuffer(view[offset:offset + nbytes], dtype)
        weakref.finalize(arr.base, self._release, conn, slot)  # numpy's own memoryview
        return arr

    def _release(self, conn, slot):
        with self.lock:
            conn.sendall(struct.pack("<Q", slot))


# ---------------------------------------------------------------- the three ways

class Raw:
    def __init__(self, directory, slots, nbytes):
        pass

    def send(self, sock, arr):
        sock.send(arr, copy=False)

    def recv(self, sock):
        return np.frombuffer(sock.recv(copy=False).buffer, np.float64)


class Socket:
    def __init__(self, directory, slots, nbytes):
        from zmq_cluster import framing
        from zmq_cluster.protocol import KIND_REQUEST
        self.encode, self.decode, self.kind = framing.encode, framing.decode, KIND_REQUEST

    def send(self, sock, arr):
        sock.send_multipart(self.encode(arr, self.kind), copy=False)

    def recv(self, sock):
        return self.decode(sock.recv_multipart(copy=False))[2]


class Shm:
    def __init__(self, directory, slots, nbytes):
        self.slots = Slots(slots, nbytes, directory)
        self.attached = Attached()

    def send(self, sock, arr):
        sock.send(self.slots.put(arr))

    def recv(self, sock):
        return self.attached.array(sock.recv(copy=False).buffer)


WAYS = {"raw": Raw, "socket": Socket, "shm": Shm}


def _socket(ctx, kind, url, bind):
    sock = ctx.socket(kind)
    sock.rcvtimeo = RECV_MS
    (sock.bind if bind else sock.connect)(url)
    return sock


def _ready(ctx, url):
    """Tell the parent's PAIR this process is up (and wait for go)."""
    ctl = _socket(ctx, zmq.PAIR, url, False)
    ctl.send(b"up")
    return ctl


# --------------------------------------------------------------- one hop

def hop_producer(way, directory, nbytes, count, ctl_url):
    ctx = zmq.Context()
    impl = WAYS[way](directory, max(2, WINDOW_BYTES // nbytes), nbytes)
    push = _socket(ctx, zmq.PUSH, "ipc://%s/hop" % directory, False)
    push.sndhwm = max(2, WINDOW_BYTES // nbytes)
    ctl = _ready(ctx, ctl_url)
    arr = np.arange(nbytes // 8, dtype=np.float64)
    while ctl.recv() == b"go":
        for _ in range(count):
            impl.send(push, arr)
    push.close(linger=-1)
    ctl.close()
    ctx.term()


def hop(way, nbytes, count, rounds):
    directory = tempfile.mkdtemp(prefix="zc-shm-")
    ctx = zmq.Context()
    impl = WAYS[way](directory, 1, 8)
    pull = _socket(ctx, zmq.PULL, "ipc://%s/hop" % directory, True)
    pull.rcvhwm = max(2, WINDOW_BYTES // nbytes)
    ctl = _socket(ctx, zmq.PAIR, "ipc://%s/ctl" % directory, True)
    proc = multiprocessing.get_context("spawn").Process(
        target=hop_producer, args=(way, directory, nbytes, count, "ipc://%s/ctl" % directory))
    proc.start()
    try:
        if not ctl.poll(RECV_MS):
            raise TimeoutError("producer did not start")
        ctl.recv()
        times = []
        for r in range(rounds + 1):  # the first round warms up
            ctl.send(b"go")
            t0 = time.perf_counter()
            for _ in range(count):
                arr = impl.recv(pull)
                arr[::512].sum()  # touched, as a user would
                del arr
            if r:
                times.append(time.perf_counter() - t0)
        ctl.send(b"stop")
        proc.join(RECV_MS / 1000)
    finally:
        if proc.is_alive():
            proc.kill()
        pull.close(0)
        ctl.close(0)
        ctx.term()
    return nbytes * count / statistics.median(times) / 1e9


# --------------------------------------------------------------- ventilator -> worker -> sink

def pipe_worker(way, directory, nbytes, ctl_url):
    ctx = zmq.Context()
    impl = WAYS[way](directory, max(2, WINDOW_BYTES // nbytes) + 2, nbytes)
    pull = _socket(ctx, zmq.PULL, "ipc://%s/req" % directory, False)
    push = _socket(ctx, zmq.PUSH, "ipc://%s/res" % directory, False)
    ctl = _ready(ctx, ctl_url)
    while True:
        arr = impl.recv(pull)
        if arr.size == 1:
            break
        impl.send(push, arr)  # the identity task
        del arr
    pull.close(0)
    push.close(linger=-1)
    ctl.close()
    ctx.term()


def pipe(way, nbytes, count, rounds):
    directory = tempfile.mkdtemp(prefix="zc-shm-")
    window = max(1, WINDOW_BYTES // nbytes)
    ctx = zmq.Context()
    impl = WAYS[way](directory, window + 2, nbytes)
    push = _socket(ctx, zmq.PUSH, "ipc://%s/req" % directory, True)
    pull = _socket(ctx, zmq.PULL, "ipc://%s/res" % directory, True)
    ctl = _socket(ctx, zmq.PAIR, "ipc://%s/ctl" % directory, True)
    proc = multiprocessing.get_context("spawn").Process(
        target=pipe_worker, args=(way, directory, nbytes, "ipc://%s/ctl" % directory))
    proc.start()
    arr = np.arange(nbytes // 8, dtype=np.float64)
    sample = arr[::4099].copy()
    try:
        if not ctl.poll(RECV_MS):
            raise TimeoutError("worker did not start")
        ctl.recv()
        times = []
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            sent = 0
            for _ in range(min(window, count)):
                impl.send(push, arr)
                sent += 1
            for _ in range(count):
                result = impl.recv(pull)
                if not np.array_equal(result[::4099], sample):
                    raise AssertionError("array came back changed")
                del result
                if sent < count:
                    impl.send(push, arr)
                    sent += 1
            if r:
                times.append(time.perf_counter() - t0)
        impl.send(push, np.zeros(1))
        proc.join(RECV_MS / 1000)
    finally:
        if proc.is_alive():
            proc.kill()
        for sock in (push, pull, ctl):
            sock.close(0)
        ctx.term()
    return 2 * nbytes * count / statistics.median(times) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--ways", nargs="+", default=list(WAYS))
    p.add_argument("--shapes", nargs="+", default=["hop", "pipe"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bytes-per-round", type=int, default=1 << 30)
    a = p.parse_args()
    print("GB/s (1e9 bytes), median of %d rounds of about %d MiB each; ratios to raw"
          % (a.rounds, a.bytes_per_round >> 20))
    for shape in a.shapes:
        for mib in a.mib:
            nbytes = mib * MiB
            count = max(4, a.bytes_per_round // nbytes)
            results = {}
            for way in a.ways:
                results[way] = (hop if shape == "hop" else pipe)(way, nbytes, count, a.rounds)
            print("%-4s %3d MiB  " % (shape, mib) + "  ".join(
                "%s %6.2f (%4.2fx)" % (way, gbs, gbs / results.get("raw", gbs))
                for way, gbs in results.items()), flush=True)


if __name__ == "__main__":
    main()
