"""ClusterPool on a LocalCluster, side by side with multiprocessing.Pool and a
free-running raw pyzmq pipeline, in one run (medians of --rounds).

    python benchmarks/pool_speed.py                 # full sizes (a few minutes)
    python benchmarks/pool_speed.py --quick         # tiny sizes: checks nothing rotted
    python benchmarks/pool_speed.py --only imap     # one case
    python benchmarks/pool_speed.py --scheduler thread   # one scheduler mode

Each case runs on a LocalCluster with the scheduler in a thread of this
process (``scheduler="thread"``: the pool reaches it over inproc) and with
the scheduler in its own process (``"process"``), both clusters up at once
and timed in turns with the baselines, round after round.

Cases, each with 1 and 2 workers (the raw pipeline and multiprocessing get
the same number of worker processes):

* map:  ``pool.map(inc, range(1_000_000), chunksize=256)`` against
  ``multiprocessing.Pool(n).map`` with the same chunksize (tasks/s).
* imap: ``pool.imap_unordered(inc, range(200_000), chunksize=1)`` against the
  raw pipeline (a PUSH ventilator process sending 8-byte messages as fast as
  its high-water mark lets it, n worker processes computing ``x + 1``, the
  PULL sink in this process) and ``multiprocessing.Pool(n).imap(inc, ...,
  chunksize=1)`` (tasks/s).
* arrays: 64 MiB float64 arrays through ``pool.map(identity, arrays)``
  against the raw pipeline with ``copy=False`` and ``np.frombuffer`` on every
  hop (GB/s there and back).
* arrays, shared memory (with --only arrays too, 1 and 2 workers): the
  same map on a LocalCluster of its own, by a pool with
  ``shared_memory=True`` and one with ``shared_memory=False``, timed in
  turns with the raw pipeline, round after round.
* latency: p50 of ``pool.submit(inc, 1).result()`` against two raw pyzmq
  round trips (µs; lower is better): REQ/REP straight to a worker process
  ("raw", two process hops: the issue's target is against this one), and
  REQ through the ZeroMQ Guide's load-balancing broker (ROUTER/ROUTER, in
  Python, in its own process) to a REQ worker process ("brokered", the four
  hops a task makes through the scheduler: client, broker, worker, broker,
  client). The three are measured in turns, in blocks, so that a change
  in the machine's load hits them alike.

Nothing here asserts a timing; every batch's results are checked.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

import zmq_cluster as zc

U64 = struct.Struct("<Q")
IDLE_MS = 600_000


def inc(x):
    return x + 1


def identity(x):
    return x


# ------------------------------------------------------------ raw processes

def raw_vent(push_url, workers):
    """Ventilator: waits for its workers, then on "go N [mib]" sends N tasks
    free-running (8-byte ints, or [header, array] zero-copy); "stop" stops
    the workers."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    mon = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    push.bind(push_url)
    seen = 0
    while seen < workers:
        if not mon.poll(60_000):
            sys.exit("raw ventilator: workers did not connect")
        mon.recv_multipart()
        seen += 1
    print("ready", flush=True)
    arrays = {}
    for line in sys.stdin:
        words = line.split()
        if words[0] == "stop":
            for _ in range(workers):
                push.send(b"")
            break
        n = int(words[1])
        if len(words) > 2:
            mib = int(words[2])
            arr = arrays.get(mib)
            if arr is None:
                arr = arrays[mib] = np.arange(mib << 17, dtype=np.float64)
            head = U64.pack(arr.size)
            for _ in range(n):
                push.send(head, zmq.SNDMORE)
                push.send(arr, copy=False)
        else:
            send = push.send
            pack = U64.pack
            for i in range(n):
                send(pack(i))
    push.close(linger=5000)
    mon.close()
    ctx.term()


def raw_worker(pull_url, push_url):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    pull.rcvtimeo = IDLE_MS
    pull.connect(pull_url)
    push.connect(push_url)
    recv, send, unpack, pack = pull.recv, push.send, U64.unpack, U64.pack
    while True:
        msg = recv()
        if pull.rcvmore:
            frame = recv(copy=False)
            arr = np.frombuffer(frame.buffer, dtype=np.float64)
            send(msg, zmq.SNDMORE)
            send(arr, copy=False)
        elif msg:
            send(pack(unpack(msg)[0] + 1))
        else:
            break
    pull.close(0)
    push.close(linger=5000)
    ctx.term()


def raw_rep(url):
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.rcvtimeo = IDLE_MS
    rep.connect(url)
    while True:
        msg = rep.recv()
        if not msg:
            rep.send(b"")
            break
        rep.send(U64.pack(U64.unpack(msg)[0] + 1))
    rep.close(0)
    ctx.term()


def raw_lb_worker(url):
    """A worker of the load-balancing broker: REQ, says READY, then answers
    [client, b"", request] envelopes; an empty request stops it."""
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.rcvtimeo = IDLE_MS
    req.connect(url)
    req.send(b"READY")
    recv, send, unpack, pack = req.recv_multipart, req.send_multipart, U64.unpack, U64.pack
    while True:
        client, empty, msg = recv()
        if not msg:
            send([client, empty, b""])
            break
        send([client, empty, pack(unpack(msg)[0] + 1)])
    req.close(linger=5000)
    ctx.term()


def raw_broker(front_url, back_url):
    """The ZeroMQ Guide's load-balancing broker (lbbroker): clients' REQ on
    a ROUTER frontend, workers' REQ on a ROUTER backend; the frontend is
    read only while some worker is free. Ends when its worker has answered
    an empty request."""
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.ROUTER)
    front.bind(front_url)
    back.bind(back_url)
    backend_only = zmq.Poller()
    backend_only.register(back, zmq.POLLIN)
    both = zmq.Poller()
    both.register(back, zmq.POLLIN)
    both.register(front, zmq.POLLIN)
    free = []
    while True:
        ready = dict((both if free else backend_only).poll(IDLE_MS))
        if not ready:
            break
        if back in ready:
            worker, _, *reply = back.recv_multipart()
            free.append(worker)
            if reply[0] != b"READY":
                front.send_multipart(reply)  # [client, b"", answer]
                if not reply[-1]:
                    break
        if front in ready:
            request = front.recv_multipart()  # [client, b"", request]
            back.send_multipart([free.pop(0), b""] + request)
    front.close(linger=5000)
    back.close(0)
    ctx.term()


class RawPipeline:
    """Ventilator process -> n worker processes -> PULL sink here."""

    def __init__(self, workers, tmp):
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.rcvtimeo = 60_000
        sink_url = "ipc://%s/raw-sink" % tmp
        vent_url = "ipc://%s/raw-vent" % tmp
        mon = self.pull.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.pull.bind(sink_url)
        me = os.path.abspath(__file__)
        self.vent = subprocess.Popen([sys.executable, me, "raw-vent", vent_url, str(workers)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.workers = [subprocess.Popen([sys.executable, me, "raw-worker", vent_url, sink_url])
                        for _ in range(workers)]
        for _ in range(workers):
            if not mon.poll(60_000):
                raise TimeoutError("raw workers did not connect")
            mon.recv_multipart()
        mon.close()
        if self.vent.stdout.readline().strip() != "ready":
            raise RuntimeError("raw ventilator failed")
        self.small(1000)

    def small(self, n):
        self.vent.stdin.write("go %d\n" % n)
        self.vent.stdin.flush()
        recv, unpack = self.pull.recv, U64.unpack
        total = 0
        for _ in range(n):
            total += unpack(recv())[0]
        assert total == n * (n + 1) // 2, "raw: wrong results"

    def arrays(self, n, mib):
        self.vent.stdin.write("go %d %d\n" % (n, mib))
        self.vent.stdin.flush()
        for _ in range(n):
            head = self.pull.recv()
            frame = self.pull.recv(copy=False)
            arr = np.frombuffer(frame.buffer, dtype=np.float64)
            assert arr.size == U64.unpack(head)[0] and arr[-1] == arr.size - 1

    def close(self):
        try:
            self.vent.stdin.write("stop\n")
            self.vent.stdin.close()
            self.vent.wait(30)
            for w in self.workers:
                w.wait(30)
        finally:
            for p in [self.vent] + self.workers:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self.pull.close(0)
            self.ctx.term()


class RawLatency:
    """A REQ socket here, a REP worker process ("direct"), or a Guide
    load-balancing broker process with one REQ worker process behind it
    ("brokered"); ``rtt(n)`` is n round trips' times in ns."""

    def __init__(self, tmp, brokered):
        me = os.path.abspath(__file__)
        self.ctx = zmq.Context()
        self.req = self.ctx.socket(zmq.REQ)
        self.req.rcvtimeo = 60_000
        if brokered:
            front, back = "ipc://%s/raw-front" % tmp, "ipc://%s/raw-back" % tmp
            self.procs = [subprocess.Popen([sys.executable, me, "raw-broker", front, back]),
                          subprocess.Popen([sys.executable, me, "raw-lb-worker", back])]
            self.req.connect(front)  # libzmq reconnects until the broker binds
        else:
            url = "ipc://%s/raw-rep" % tmp
            self.req.bind(url)
            self.procs = [subprocess.Popen([sys.executable, me, "raw-rep", url])]
        self.rtt(200)  # connected, warm

    def rtt(self, n):
        req, pack, unpack, clock = self.req, U64.pack, U64.unpack, time.perf_counter_ns
        out = []
        for i in range(n):
            start = clock()
            req.send(pack(i))
            assert unpack(req.recv())[0] == i + 1, "raw latency: wrong result"
            out.append(clock() - start)
        return out

    def close(self):
        try:
            self.req.send(b"")
            self.req.recv()
            for p in self.procs:
                p.wait(30)
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self.req.close(0)
            self.ctx.term()


def latency(pools, n, tmp, blocks=10):
    """p50 and p99 (µs) of ours (each pool of ``pools``, by scheduler mode),
    raw REQ/REP and brokered raw, measured in turns: ``blocks`` blocks of
    n/blocks round trips each."""
    def ours(pool, k):
        out = []
        submit, clock = pool.submit, time.perf_counter_ns
        for i in range(k):
            start = clock()
            assert submit(inc, i).result(60) == i + 1
            out.append(clock() - start)
        return out

    for pool in pools.values():
        ours(pool, 200)
    direct = RawLatency(tmp, brokered=False)
    try:
        brokered = RawLatency(tmp, brokered=True)
        try:
            times = {"raw": [], "brokered": []}
            times.update((mode, []) for mode in pools)
            per = max(1, n // blocks)
            for _ in range(blocks):
                for mode, pool in pools.items():
                    times[mode] += ours(pool, per)
                times["raw"] += direct.rtt(per)
                times["brokered"] += brokered.rtt(per)
        finally:
            brokered.close()
    finally:
        direct.close()
    out = {}
    for name, t in times.items():
        t.sort()
        out[name] = statistics.median(t) / 1000
        out["p99_" + name] = t[int(len(t) * .99)] / 1000
    return out


# ------------------------------------------------------------------ timing

def timed(fn, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_turns(fns, rounds):
    """Median seconds of each of ``fns`` (a dict), run in turns, round after
    round, so that a change in the machine's load hits them alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def shm_arrays(workers, sizes, rounds, tmp):
    """Rows for ``pool.map(identity, arrays)`` with shared memory on and
    off, and the raw pipeline, timed in turns (medians)."""
    n, mib = sizes["arr_n"], sizes["arr_mib"]
    arr = np.arange(mib << 17, dtype=np.float64)
    arrays = [arr] * n
    with zc.LocalCluster(workers, shared_memory=True) as cluster, \
            zc.ClusterPool(cluster, shared_memory=True) as on, \
            zc.ClusterPool(cluster, shared_memory=False) as off:
        raw = RawPipeline(workers, tmp)
        try:
            def ours(pool):
                for out in pool.map(identity, arrays, chunksize=1):
                    assert out.size == arr.size and out[-1] == arr.size - 1

            fns = {"on": lambda: ours(on), "off": lambda: ours(off),
                   "raw": lambda: raw.arrays(n, mib)}
            for fn in fns.values():
                fn()  # warm-up: slots mapped, buffers touched
            t = timed_turns(fns, rounds)
            assert on.shared_memory.arrays_received >= n  # results came by slot
        finally:
            raw.close()
    gb = 2 * n * arr.nbytes / 1e9
    return [dict(case="%d MiB arrays, map(identity), shared memory %s" % (mib, name),
                 workers=workers, ours=gb / t[name], raw=gb / t["raw"], unit="GB/s",
                 ratio_raw=t["raw"] / t[name]) for name in ("on", "off")]


def run(args):
    rows = []
    sizes = dict(map_n=1_000_000, imap_n=200_000, arr_n=16, arr_mib=64, lat_n=5000)
    if args.quick:
        sizes = dict(map_n=20_000, imap_n=2_000, arr_n=2, arr_mib=4, lat_n=100)
    rounds = 2 if args.quick else args.rounds
    cases = args.only or ["map", "imap", "arrays", "latency"]
    modes = args.scheduler
    tmp = tempfile.mkdtemp(prefix="zc-bench-")
    mp = multiprocessing.get_context("spawn")

    def label(case, mode):
        return "%s [%s]" % (case, mode) if len(modes) > 1 else case

    for workers in args.workers:
        # One cluster per scheduler mode, all up at once, timed in turns.
        clusters = {m: zc.LocalCluster(workers, scheduler=m) for m in modes}
        pools = {m: zc.ClusterPool(c) for m, c in clusters.items()}
        try:
            for pool in pools.values():
                pool.map(inc, range(1000))  # warm-up: functions and connections
            if "map" in cases:
                n = sizes["map_n"]
                data = range(n)

                def map_ours(pool):
                    out = pool.map(inc, data, chunksize=256)
                    assert out[-1] == n and len(out) == n

                with mp.Pool(workers) as mpool:
                    mpool.map(inc, range(10_000), chunksize=256)

                    def theirs():
                        out = mpool.map(inc, data, chunksize=256)
                        assert out[-1] == n and len(out) == n

                    fns = {m: (lambda p=p: map_ours(p)) for m, p in pools.items()}
                    fns["mp"] = theirs
                    t = timed_turns(fns, rounds)
                for m in modes:
                    rows.append(dict(case=label("map(inc, range(%d), chunksize=256)" % n, m),
                                     workers=workers, ours=n / t[m], mp=n / t["mp"],
                                     unit="tasks/s", ratio_mp=t["mp"] / t[m], scheduler=m))
            if "imap" in cases:
                n = sizes["imap_n"]

                def imap_ours(pool):
                    total = 0
                    for v in pool.imap_unordered(inc, range(n), chunksize=1):
                        total += v
                    assert total == n * (n + 1) // 2

                raw = RawPipeline(workers, tmp)
                try:
                    fns = {m: (lambda p=p: imap_ours(p)) for m, p in pools.items()}
                    fns["raw"] = lambda: raw.small(n)
                    t = timed_turns(fns, rounds)
                finally:
                    raw.close()
                with mp.Pool(workers) as mpool:
                    mpool.map(inc, range(1000))

                    def theirs():
                        total = sum(mpool.imap(inc, range(n), chunksize=1))
                        assert total == n * (n + 1) // 2

                    t["mp"] = timed(theirs, rounds)
                for m in modes:
                    rows.append(dict(
                        case=label("imap_unordered(inc, range(%d), chunksize=1)" % n, m),
                        workers=workers, ours=n / t[m], raw=n / t["raw"], mp=n / t["mp"],
                        unit="tasks/s", ratio_raw=t["raw"] / t[m], ratio_mp=t["mp"] / t[m],
                        scheduler=m))
            if "arrays" in cases and workers == 1:
                n, mib = sizes["arr_n"], sizes["arr_mib"]
                arr = np.arange(mib << 17, dtype=np.float64)
                arrays = [arr] * n

                def arrays_ours(pool):
                    for out in pool.map(identity, arrays, chunksize=1):
                        assert out.size == arr.size and out[-1] == arr.size - 1

                for pool in pools.values():
                    pool.map(identity, arrays[:1])
                raw = RawPipeline(workers, tmp)
                try:
                    raw.arrays(1, mib)
                    fns = {m: (lambda p=p: arrays_ours(p)) for m, p in pools.items()}
                    fns["raw"] = lambda: raw.arrays(n, mib)
                    t = timed_turns(fns, rounds)
                finally:
                    raw.close()
                gb = 2 * n * arr.nbytes / 1e9
                for m in modes:
                    rows.append(dict(case=label("%d MiB arrays, map(identity)" % mib, m),
                                     workers=workers, ours=gb / t[m], raw=gb / t["raw"],
                                     unit="GB/s", ratio_raw=t["raw"] / t[m], scheduler=m))
            if "latency" in cases and workers == 1:
                lat = latency(pools, sizes["lat_n"], tmp)
                for m in modes:
                    rows.append(dict(
                        case=label("p50 submit(inc, 1).result() (raw: REQ/REP)", m),
                        workers=workers, ours=lat[m], raw=lat["raw"],
                        unit="µs (lower is better)", ratio_raw=lat[m] / lat["raw"],
                        p99_ours=lat["p99_" + m], p99_raw=lat["p99_raw"], scheduler=m))
                    rows.append(dict(
                        case=label("p50 submit(inc, 1).result() (raw: REQ via the Guide's"
                                   " load-balancing broker)", m),
                        workers=workers, ours=lat[m], raw=lat["brokered"],
                        unit="µs (lower is better)", ratio_raw=lat[m] / lat["brokered"],
                        p99_ours=lat["p99_" + m], p99_raw=lat["p99_brokered"], scheduler=m))
        finally:
            for pool in pools.values():
                pool.terminate()
            for cluster in clusters.values():
                cluster.close()
        if "arrays" in cases:
            rows.extend(shm_arrays(workers, sizes, rounds, tmp))
    os.rmdir(tmp) if not os.listdir(tmp) else None
    return rows


def table(rows):
    lines = ["| case | workers | ours | raw | mp | unit | ours/raw | ours/mp |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v):
        if v is None:
            return "–"
        return "%.3g" % v if v < 100 else "{:,.0f}".format(v).replace(",", " ")

    for r in rows:
        lines.append("| %s | %d | %s | %s | %s | %s | %s | %s |" % (
            r["case"], r["workers"], f(r["ours"]), f(r.get("raw")), f(r.get("mp")), r["unit"],
            ("%.2fx" % r["ratio_raw"]) if "ratio_raw" in r else "–",
            ("%.2fx" % r["ratio_mp"]) if "ratio_mp" in r else "–"))
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "raw-vent":
        return raw_vent(argv[1], int(argv[2]))
    if argv and argv[0] == "raw-worker":
        return raw_worker(argv[1], argv[2])
    if argv and argv[0] == "raw-rep":
        return raw_rep(argv[1])
    if argv and argv[0] == "raw-broker":
        return raw_broker(argv[1], argv[2])
    if argv and argv[0] == "raw-lb-worker":
        return raw_lb_worker(argv[1])
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--only", nargs="+", choices=["map", "imap", "arrays", "latency"])
    parser.add_argument("--scheduler", nargs="+", choices=["thread", "process"],
                        default=["thread", "process"],
                        help="LocalCluster(scheduler=...) modes to measure, side by side")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args)
    print("ZMQ_CLUSTER FASTPATH=%s, %d rounds (medians), python %s, pyzmq %s / libzmq %s"
          % (zc.FASTPATH, 2 if args.quick else args.rounds, sys.version.split()[0],
             zmq.__version__, zmq.zmq_version()))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
