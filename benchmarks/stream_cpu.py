"""Where a stream of tiny tasks spends its CPU: per task, per thread.

    python benchmarks/stream_cpu.py [--workers 2] [--seconds 5] [--scheduler process]

Runs ``pool.imap_unordered(inc, range(100_000), chunksize=1)`` over and
over for ``--seconds`` on a LocalCluster, then prints the tasks/s and, for
every thread of the caller's process, the scheduler's (when it is a
process) and each worker's, its share of a CPU and its CPU time per task
(``/proc/PID/task/TID/schedstat``: nanoseconds on a CPU, kernel included;
threads under 1% left out), and the sum: what one task costs the machine.
Linux only. Measures; asserts nothing about timing.
"""

import argparse
import glob
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from latency_cpu import cpu_ns  # noqa: E402


def inc(x):
    return x + 1


def children(pid):
    out = set()
    for path in glob.glob("/proc/%d/task/*/children" % pid):
        try:
            out.update(int(p) for p in open(path).read().split())
        except OSError:
            pass
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--n", type=int, default=100_000, help="tasks per stream")
    parser.add_argument("--scheduler", choices=["process", "thread"], default="process")
    args = parser.parse_args(argv)
    from zmq_cluster import ClusterPool, LocalCluster
    with LocalCluster(n_workers=args.workers, scheduler=args.scheduler) as cluster:
        with ClusterPool(cluster) as pool:
            sum(1 for _ in pool.imap_unordered(inc, range(20_000)))  # warm-up
            workers = cluster.worker_pids()
            pids = {"caller": os.getpid()}
            for pid in sorted(children(os.getpid()) - set(workers)):
                pids["scheduler"] = pid
            for i, pid in enumerate(workers):
                pids["worker%d" % i] = pid
            before = {who: cpu_ns(pid) for who, pid in pids.items()}
            start = time.perf_counter()
            done = 0
            while time.perf_counter() - start < args.seconds:
                done += sum(1 for _ in pool.imap_unordered(inc, range(args.n)))
            elapsed = time.perf_counter() - start
            after = {who: cpu_ns(pid) for who, pid in pids.items()}
    print("imap_unordered(inc, chunksize=1) [%s], %d worker(s): %.0f tasks/s"
          % (args.scheduler, args.workers, done / elapsed))
    total = 0.0
    for who in pids:
        for thread, ns in sorted(after[who].items()):
            spent = (ns - before[who].get(thread, 0)) / 1e9
            if spent / elapsed < 0.01:
                continue
            total += spent
            print("  %-10s %-28s %5.1f%% of a CPU  %.2f us/task"
                  % (who, thread, 100 * spent / elapsed, spent / done * 1e6))
    print("  total %.2f us of CPU per task" % (total / done * 1e6))


if __name__ == "__main__":
    main()
