"""Where a round trip's CPU goes: p50 and CPU per round trip of each thread.

    python benchmarks/latency_cpu.py [--n 20000] [--modes raw process thread]

For ``submit(inc, i).result()`` on a 1-worker LocalCluster (``process`` or
``thread`` scheduler) and for the raw pyzmq REQ/REP round trip of
benchmarks/pool_speed.py (``raw``): the p50 round trip, and, per thread of
the caller's process and of the worker process, the CPU time spent per
round trip (``/proc/PID/task/TID/schedstat``: nanoseconds on a CPU, kernel
included; threads under 0.5 us per round trip are left out). Linux only.
Measures; asserts nothing about timing.
"""

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def inc(x):
    return x + 1


def cpu_ns(pid):
    """Thread id and name -> nanoseconds on a CPU, for each thread of ``pid``."""
    out = {}
    for task in glob.glob("/proc/%d/task/*" % pid):
        try:
            ns = int(open(task + "/schedstat").read().split()[0])
            name = open(task + "/comm").read().strip()
        except OSError:
            continue
        out["%s:%s" % (task.rsplit("/", 1)[1], name)] = ns
    return out


def report(label, p50_ns, pids, before, after, n):
    print("%s: p50 %.1f us" % (label, p50_ns / 1000))
    for who, pid in pids.items():
        per = {k: (after[who][k] - before[who].get(k, 0)) / n / 1000 for k in after[who]}
        print("  %-7s %s" % (who, ", ".join("%s %.1f us" % (k, v) for k, v in sorted(
            per.items(), key=lambda kv: -kv[1]) if v >= 0.5)))


def measure_raw(n):
    from pool_speed import RawLatency
    raw = RawLatency(tempfile.mkdtemp(), brokered=False)
    try:
        pids = {"caller": os.getpid(), "worker": raw.procs[0].pid}
        before = {k: cpu_ns(p) for k, p in pids.items()}
        times = raw.rtt(n)
        after = {k: cpu_ns(p) for k, p in pids.items()}
    finally:
        raw.close()
    report("raw REQ/REP", statistics.median(times), pids, before, after, n)


def measure_pool(mode, n):
    from zmq_cluster import ClusterPool, LocalCluster
    with LocalCluster(n_workers=1, scheduler=mode) as cluster:
        with ClusterPool(cluster) as pool:
            for i in range(300):
                pool.submit(inc, i).result(30)
            lease = pool._client.lease
            worker = lease["pid"] if lease else cluster.worker_pids()[0]
            pids = {"caller": os.getpid(), "worker": worker}
            before = {k: cpu_ns(p) for k, p in pids.items()}
            times = []
            clock = time.perf_counter_ns
            submit = pool.submit
            for i in range(n):
                start = clock()
                submit(inc, i).result(30)
                times.append(clock() - start)
            after = {k: cpu_ns(p) for k, p in pids.items()}
    report("submit(inc, i).result() [%s]%s" % (mode, "" if lease else " (no lease)"),
           statistics.median(times), pids, before, after, n)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--modes", nargs="+", default=["raw", "process", "thread"],
                        choices=["raw", "process", "thread"])
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode == "raw":
            measure_raw(args.n)
        else:
            measure_pool(mode, args.n)


if __name__ == "__main__":
    main()
