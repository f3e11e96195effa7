"""What glibc malloc tuning does for large arrays, side by side in one run.

    python benchmarks/malloc_tuning.py            # full (~8 min)
    python benchmarks/malloc_tuning.py --quick                              # checks nothing rotted
    python benchmarks/malloc_tuning.py --cases raw,raw-split --sizes 64 --rounds 7

libzmq mallocs a fresh receive buffer for every message (in its I/O thread),
and glibc serves an allocation above its mmap threshold (dynamic, at most
32 MiB on 64-bit) with a fresh mmap: the receiver takes a page fault per
4 KiB page and the kernel zeroes every page. This measures whether glibc
tunables in the environment (``GLIBC_TUNABLES``, read by glibc at process
start) pay for it, and what they cost in memory kept from the OS.

Cases, each for 1, 16 and 64 MiB float64 arrays, ipc://, one worker:

* ``raw``: plain pyzmq, a driver process (PUSH ventilator and PULL sink) ->
  a worker process -> the driver, ``[header, array]`` with ``copy=False``
  and ``np.frombuffer`` on every hop (one frame per array).
* ``raw-split``: the same, each array sent as 8 MiB frames (views of the
  array) and assembled on receive into a fresh 64-byte-aligned array, one
  copy per frame, in the worker and in the sink: the shape of the
  split-frame codec (issue 9), written in plain pyzmq.
* ``ours``: zmq_cluster's Ventilator -> BasicWorker (returns the array) ->
  Sink, the library as it is on this branch.
* ``pool``: ``ClusterPool(LocalCluster(1)).map(identity, arrays, chunksize=1)``.

Variants (the environment of each process, set at its start):

* ``default``: no GLIBC_TUNABLES.
* ``thr/worker``: the worker processes only (the pool: the LocalCluster's
  scheduler and workers, which is what a setting of the library could
  reach) get ``mmap_threshold`` and ``trim_threshold`` (:data:`THRESHOLDS`).
* ``thr+a1/worker``: the same plus ``glibc.malloc.arena_max=1``.
* ``thr/all``, ``thr+a1/all``: every process, the driver (ventilator, sink,
  the pool's client) too: what a user who exports GLIBC_TUNABLES gets.

All the variants of a case run at once, their rounds interleaved (A B C ...
A B C ...), so that the load of a shared machine weighs on each alike.
A round moves ``--round-mib`` MiB each way with at most 256 MiB in flight;
GB/s = bytes there and back / median round time (1 GB = 10^9 bytes).
Page faults (minor, ``/proc/PID/stat``) are counted over the timed rounds
and given per array and per process; RSS is each process's ``VmRSS`` after
the last round (the cost: memory the process keeps rather than returning
to the OS). Nothing here asserts a timing; every result is checked (dtype,
shape, every 4099th element; one whole array before timing).
"""

import argparse
import json
import os
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

#: mmap_threshold and trim_threshold for the tuned variants: above the
#: largest message, so that glibc serves every buffer from its heap and
#: keeps freed memory for the next one.
THRESHOLDS = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"
RECIPES = {
    "thr": THRESHOLDS,
    "thr+a1": THRESHOLDS + ":glibc.malloc.arena_max=1",
    # Lower thresholds bound what a process keeps (at most trim_threshold of
    # free memory at the top of its heap): --variants t256+a1/worker,...
    "t256+a1": "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=268435456"
               ":glibc.malloc.arena_max=1",
    "t128+a1": "glibc.malloc.mmap_threshold=134217728:glibc.malloc.trim_threshold=134217728"
               ":glibc.malloc.arena_max=1",
}
VARIANTS = ("default", "thr/worker", "thr+a1/worker", "thr/all", "thr+a1/all")
CASES = ("raw", "raw-split", "ours", "pool")

SPLIT = 8 << 20              # raw-split: bytes per frame
WINDOW_BYTES = 256 << 20     # bytes in flight at once (at least one array)
STRIDE = 4099                # every STRIDE-th element of each result is checked
HEAD = struct.Struct("<Q")   # raw: the element count
RECV_MS = 60_000
REPLY_S = 600.0
ME = os.path.abspath(__file__)


def identity(x):
    return x


def variant_env(variant, role):
    """The environment of a process of ``role`` ("driver" or "worker") in
    ``variant``: this one's, GLIBC_TUNABLES set or removed."""
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if variant != "default":
        recipe, scope = variant.split("/")
        if scope == "all" or role == "worker":
            env["GLIBC_TUNABLES"] = RECIPES[recipe]
    return env


def proc_stats(pid):
    """(minor faults, VmRSS bytes) of process ``pid``."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    minflt = int(fields[7])
    rss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return minflt, rss


# ------------------------------------------------------------ raw pyzmq

def aligned_empty(nbytes, align=64):
    buf = np.empty(nbytes + align, dtype=np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off:off + nbytes]


def raw_frames(arr, split):
    """[header, the array] or [header, split-byte views of it...]."""
    head = HEAD.pack(arr.size)
    if not split:
        return [head, arr]
    flat = arr.view(np.uint8)
    return [head] + [flat[i:i + split] for i in range(0, flat.size, split)]


def raw_array(frames):
    """The float64 array of a received raw message: a view of its one frame,
    or the frames assembled into a fresh 64-byte-aligned array."""
    n = HEAD.unpack(frames[0].bytes)[0]
    if len(frames) == 2:
        return np.frombuffer(frames[1].buffer, dtype=np.float64)
    out = aligned_empty(n * 8)
    pos = 0
    for f in frames[1:]:
        part = np.frombuffer(f.buffer, dtype=np.uint8)
        out[pos:pos + part.size] = part
        pos += part.size
    if pos != n * 8:
        raise AssertionError("raw-split: %d of %d bytes" % (pos, n * 8))
    return out.view(np.float64)


def raw_worker(requests, results, split):
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.rcvtimeo = RECV_MS * 10
    pull.connect(requests)
    push.connect(results)
    try:
        while True:
            frames = pull.recv_multipart(copy=False)
            if len(frames) == 1:
                break
            push.send_multipart(raw_frames(raw_array(frames), split), copy=False)
    finally:
        pull.close(0)
        push.close(linger=5000)
        ctx.term()


class RawDriver:
    def __init__(self, args, ctx, tmp, worker_env):
        self.split = SPLIT if args.case == "raw-split" else 0
        self.push, self.pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        self.pull.rcvtimeo = RECV_MS
        req, res = "ipc://%s/req" % tmp, "ipc://%s/res" % tmp
        mon = self.push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.push.bind(req)
        self.pull.bind(res)
        self.worker = subprocess.Popen(
            [sys.executable, ME, "raw-worker", req, res, str(self.split)],
            env=worker_env, stdin=subprocess.DEVNULL)
        try:
            if not mon.poll(RECV_MS):
                raise TimeoutError("the raw worker did not connect")
            mon.recv_multipart()
        finally:
            mon.close(0)

    def pids(self):
        return {"worker": [self.worker.pid]}

    def send(self, arrays):
        for arr in arrays:
            self.push.send_multipart(raw_frames(arr, self.split), copy=False)

    def receive(self, n):
        for _ in range(n):
            yield raw_array(self.pull.recv_multipart(copy=False))

    def close(self):
        try:
            self.push.send(b"")
            self.worker.wait(30)
        finally:
            if self.worker.poll() is None:
                self.worker.kill()
                self.worker.wait()
            self.push.close(0)
            self.pull.close(0)


# ------------------------------------------------------------ zmq_cluster

def ours_worker(requests, results, commands):
    import zmq_cluster as zc

    class Worker(zc.BasicWorker):
        def HandleRequest(self, request):
            return request

    ctx = zmq.Context()
    try:
        Worker(ctx, zc.Connect(requests), zc.Connect(results), zc.Connect(commands),
               receiver_timeout=RECV_MS * 10).Run()
    finally:
        ctx.destroy(linger=0)


class OursDriver:
    def __init__(self, args, ctx, tmp, worker_env):
        import zmq_cluster as zc
        self.zc, self.ctx = zc, ctx
        req, res, self.cmd = ("ipc://%s/%s" % (tmp, name) for name in ("req", "res", "cmd"))
        self.ventilator = zc.Ventilator(ctx, zc.Connect(req, bind=True))
        self.sink = zc.Sink(ctx, zc.Connect(res, bind=True), receiver_timeout=RECV_MS)
        self.ventilator.Setup()
        self.sink.Setup()
        self.worker = subprocess.Popen([sys.executable, ME, "ours-worker", req, res, self.cmd],
                                       env=worker_env, stdin=subprocess.DEVNULL)
        self.ventilator.WaitForWorkers(1, timeout=RECV_MS)

    def pids(self):
        return {"worker": [self.worker.pid]}

    def send(self, arrays):
        self.ventilator.Send(arrays)

    def receive(self, n):
        return self.sink.Receive(n)

    def close(self):
        try:
            self.zc.BasicWorker.SendKillCommand(self.ctx, self.zc.Connect(self.cmd, bind=True),
                                                num_subscribers=1, timeout=10_000)
            self.worker.wait(30)
        finally:
            if self.worker.poll() is None:
                self.worker.kill()
                self.worker.wait()
            self.ventilator.Shutdown()
            self.sink.Shutdown()


class PoolDriver:
    def __init__(self, args, ctx, tmp, worker_env):
        import zmq_cluster as zc
        # LocalCluster starts its scheduler and workers with this process's
        # environment; glibc read this process's own tunables at its start.
        saved = os.environ.get("GLIBC_TUNABLES")
        os.environ.pop("GLIBC_TUNABLES", None)
        if "GLIBC_TUNABLES" in worker_env:
            os.environ["GLIBC_TUNABLES"] = worker_env["GLIBC_TUNABLES"]
        try:
            # The scheduler in its own process: its malloc is what is tuned.
            self.cluster = zc.LocalCluster(1, scheduler="process")
        finally:
            os.environ.pop("GLIBC_TUNABLES", None)
            if saved is not None:
                os.environ["GLIBC_TUNABLES"] = saved
        self.pool = zc.ClusterPool(self.cluster)

    def pids(self):
        return {"worker": self.cluster.worker_pids(), "scheduler": [self.cluster.scheduler.pid]}

    def run(self, arrays):
        return self.pool.map(identity, arrays, chunksize=1)

    def close(self):
        self.pool.close()
        self.pool.join(60)
        self.cluster.close()


DRIVERS = {"raw": RawDriver, "raw-split": RawDriver, "ours": OursDriver, "pool": PoolDriver}


def pipeline(driver, arrays, window):
    if hasattr(driver, "run"):
        yield from driver.run(arrays)
        return
    n = len(arrays)
    sent = min(window, n)
    driver.send(arrays[:sent])
    for received, result in enumerate(driver.receive(n), 1):
        yield result
        if sent < n:
            driver.send(arrays[sent:sent + 1])
            sent += 1


def driver_main(args):
    """One pipeline; obeys "round" and "stop" on stdin, a JSON line each."""
    worker_env = json.loads(os.environ.pop("MALLOC_BENCH_WORKER_ENV"))
    ctx = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="zc-malloc-")
    driver = DRIVERS[args.case](args, ctx, tmp, worker_env)
    try:
        base = np.arange(args.mib << 17, dtype=np.float64)
        sample = base[::STRIDE].copy()
        for result in pipeline(driver, [base], 1):
            if not np.array_equal(result, base):
                raise AssertionError("the array came back changed")
        n = max(1, args.round_mib // args.mib)
        window = max(1, WINDOW_BYTES // base.nbytes)
        print(json.dumps({"pids": dict(driver.pids(), driver=[os.getpid()])}), flush=True)
        for line in sys.stdin:
            if line.strip() != "round":
                break
            arrays = [base] * n
            count = 0
            t0 = time.perf_counter()
            for result in pipeline(driver, arrays, window):
                if result.dtype != base.dtype or result.shape != base.shape \
                        or not np.array_equal(result[::STRIDE], sample):
                    raise AssertionError("an array came back changed")
                count += 1
                del result
            seconds = time.perf_counter() - t0
            if count != n:
                raise AssertionError("%d of %d arrays came back" % (count, n))
            print(json.dumps({"seconds": seconds, "arrays": n}), flush=True)
    finally:
        driver.close()
        ctx.term()
        os.rmdir(tmp) if not os.listdir(tmp) else None


# ------------------------------------------------------------ orchestrator

class Pipeline:
    def __init__(self, case, mib, variant, round_mib):
        env = variant_env(variant, "driver")
        env["MALLOC_BENCH_WORKER_ENV"] = json.dumps(variant_env(variant, "worker"))
        self.variant = variant
        self.proc = subprocess.Popen(
            [sys.executable, ME, "driver", "--case", case, "--mib", str(mib),
             "--round-mib", str(round_mib)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pids = self.reply()["pids"]
        self.times, self.arrays = [], 0
        self.faults0 = self.stats()

    def reply(self):
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise RuntimeError("%s: the driver failed (status %s)" % (self.variant,
                                                                      self.proc.wait()))
        return json.loads(line)

    def stats(self):
        return {role: [proc_stats(pid) for pid in pids] for role, pids in self.pids.items()}

    def round(self):
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        r = self.reply()
        self.times.append(r["seconds"])
        self.arrays += r["arrays"]

    def result(self, nbytes):
        end = self.stats()
        faults = {role: sum(e[0] - s[0] for s, e in zip(self.faults0[role], end[role]))
                  / self.arrays for role in end}
        rss = {role: sum(e[1] for e in end[role]) for role in end}
        med = statistics.median(self.times)
        return {"variant": self.variant, "gbps": 2 * nbytes * self.arrays / len(self.times)
                / med / 1e9, "faults": faults, "rss": rss}

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def run_case(case, mib, variants, rounds, round_mib):
    pipes = []
    try:
        for v in variants:
            pipes.append(Pipeline(case, mib, v, round_mib))
        for _ in range(rounds):
            for p in pipes:
                p.round()
        return [p.result(mib << 20) for p in pipes]
    finally:
        for p in pipes:
            p.close()


def glibc_version():
    import ctypes
    try:
        f = ctypes.CDLL(None).gnu_get_libc_version
        f.restype = ctypes.c_char_p
        return f().decode()
    except (OSError, AttributeError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    d = sub.add_parser("driver")
    d.add_argument("--case", choices=CASES, required=True)
    d.add_argument("--mib", type=int, required=True)
    d.add_argument("--round-mib", type=int, required=True)
    w = sub.add_parser("raw-worker")
    w.add_argument("requests")
    w.add_argument("results")
    w.add_argument("split", type=int)
    o = sub.add_parser("ours-worker")
    o.add_argument("requests")
    o.add_argument("results")
    o.add_argument("commands")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sizes", default="1,16,64", help="MiB per array, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-mib", type=int, default=512,
                        help="MiB each way per round (default 512)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks nothing rotted")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    if args.role == "driver":
        return driver_main(args)
    if args.role == "raw-worker":
        return raw_worker(args.requests, args.results, args.split)
    if args.role == "ours-worker":
        return ours_worker(args.requests, args.results, args.commands)

    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.rounds, args.round_mib = [1, 16], 1, 32
    version = glibc_version()
    if version is None:
        sys.exit("not glibc: GLIBC_TUNABLES means nothing here")
    print("glibc %s, %d cores, load %s; tuned: %s" % (
        version, os.cpu_count(), " ".join("%.2f" % x for x in os.getloadavg()), RECIPES["thr+a1"]))
    print("GB/s there and back (median of %d rounds of %d MiB each way); minor faults per array"
          " (driver / worker); RSS after the run (driver / worker, MiB)" % (args.rounds,
                                                                          args.round_mib))
    out = []
    for case in args.cases.split(","):
        for mib in sizes:
            results = run_case(case, mib, args.variants.split(","), args.rounds, args.round_mib)
            base = results[0]["gbps"]
            for r in results:
                line = ("%-9s %3d MiB  %-14s %6.2f GB/s (x%.2f)  faults %7.0f / %7.0f"
                        "  RSS %5.0f / %5.0f") % (
                    case, mib, r["variant"], r["gbps"], r["gbps"] / base,
                    r["faults"]["driver"], r["faults"]["worker"],
                    r["rss"]["driver"] / 2**20, r["rss"]["worker"] / 2**20)
                if "scheduler" in r["rss"]:
                    line += "  (scheduler: %.0f faults, RSS %.0f)" % (
                        r["faults"]["scheduler"], r["rss"]["scheduler"] / 2**20)
                print(line, flush=True)
                out.append(dict(r, case=case, mib=mib))
    print("load at the end: %s" % " ".join("%.2f" % x for x in os.getloadavg()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
