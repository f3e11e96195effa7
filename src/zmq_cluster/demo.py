"""Demo: numpy arrays through a ventilator, worker processes and a sink.

    python -m zmq_cluster.demo [--workers 2] [--tasks 200] [--mib 1]

Starts the workers as local processes over ipc://, sends ``--tasks`` float64
arrays of ``--mib`` MiB each, has every worker return ``sqrt(x)`` of its
array, checks every result, stops the workers with a kill command, and
prints what it did and how fast.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Any, TextIO

import numpy as np
import zmq

import zmq_cluster as zc


class SqrtWorker(zc.BasicWorker):
    """Returns the element-wise square root of the array it receives."""

    def HandleRequest(self, request: Any) -> Any:
        return np.sqrt(request)


def _worker_main(request_url: str, result_url: str, command_url: str) -> None:
    ctx = zmq.Context()
    try:
        SqrtWorker(ctx, zc.Connect(request_url), zc.Connect(result_url),
                   zc.Connect(command_url)).Run()
    finally:
        ctx.destroy(linger=0)


def run(workers: int = 2, tasks: int = 200, mib: float = 1.0,
        out: TextIO = sys.stdout) -> dict[str, Any]:
    """Run the demo; returns a dict of what was measured."""
    tmp = tempfile.mkdtemp(prefix="zc-demo-")
    request_url, result_url, command_url = ("ipc://%s/%s" % (tmp, name)
                                            for name in ("requests", "results", "commands"))
    ctx = zmq.Context()
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_worker_main, args=(request_url, result_url, command_url))
             for _ in range(workers)]
    try:
        with zc.Ventilator(ctx, zc.Connect(request_url, bind=True)) as ventilator, \
                zc.Sink(ctx, zc.Connect(result_url, bind=True), receiver_timeout=60000) as sink:
            for proc in procs:
                proc.start()
            ventilator.WaitForWorkers(workers, timeout=60000)
            n = max(1, int(mib * (1 << 20) / 8))
            arrays = [np.full(n, float(i * i)) for i in range(tasks)]
            start = time.perf_counter()
            ventilator.Send(arrays, metadata=range(tasks))
            pids = set()
            for payload, index, result_meta in sink.Receive(tasks, metadata=True):
                if not np.array_equal(payload, np.sqrt(arrays[index])):
                    raise AssertionError("wrong result for task %d" % index)
                pids.add(result_meta["pid"])
            seconds = time.perf_counter() - start
            zc.BasicWorker.SendKillCommand(ctx, zc.Connect(command_url, bind=True),
                                           num_subscribers=workers)
        for proc in procs:
            proc.join(30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
        ctx.destroy(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)
    moved = 2 * tasks * n * 8  # there and back
    report = {"workers": workers, "workers_used": len(pids), "tasks": tasks,
              "array_bytes": n * 8, "seconds": seconds, "tasks_per_s": tasks / seconds,
              "gb_per_s": moved / seconds / 1e9, "fastpath": zc.FASTPATH}
    print("zmq_cluster demo (%s framing, pid %d)" % (
        "compiled" if zc.FASTPATH else "pure-Python", os.getpid()), file=out)
    print("  %d tasks of one %.2f MiB float64 array each -> %d worker processes (%d did work)"
          " -> sink, over ipc://" % (tasks, n * 8 / (1 << 20), workers, len(pids)), file=out)
    print("  all %d results checked: sqrt(x) correct" % tasks, file=out)
    print("  %.3f s: %.0f tasks/s, %.2f GB/s of arrays moved (there and back)"
          % (seconds, report["tasks_per_s"], report["gb_per_s"]), file=out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zmq_cluster.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--tasks", type=int, default=200, help="arrays to send (200)")
    parser.add_argument("--mib", type=float, default=1.0, help="MiB per array (1)")
    args = parser.parse_args(argv)
    run(args.workers, args.tasks, args.mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
