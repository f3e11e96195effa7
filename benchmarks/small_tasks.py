"""Free-running small tasks, outside pytest: for a quick comparison, or to
profile one pipeline's processes while it runs.

    python benchmarks/small_tasks.py                      # all, ipc, 1 worker
    python benchmarks/small_tasks.py --impl ours-fast raw --transport tcp --workers 2
    python benchmarks/small_tasks.py --impl ours-fast --rounds 100 --pids
        # prints the pids (ventilator, sink, workers) and keeps going: attach
        # py-spy or perf to them

Each implementation's pipeline is started, runs ``--rounds`` rounds of
``--n`` tasks (after a warm-up), and is stopped before the next starts;
the medians of this run are printed with their ratios to raw and pickle.
The pytest suite (``python -m pytest benchmarks/``) runs the same pipelines.
"""

import argparse
import statistics
import sys

from _harness import FreePipeline, probe

IMPLS = ("ours-fast", "ours-py", "raw", "raw-echo", "pickle", "mp")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--transport", choices=["ipc", "tcp"], default="ipc")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunksize", type=int, default=1, help="mp only")
    parser.add_argument("--pids", action="store_true", help="print each pipeline's pids")
    args = parser.parse_args(argv)
    medians = {}
    for impl in args.impl:
        if impl.startswith("ours"):
            why = probe(impl)
            if why:
                print("%s: not run: %s" % (impl, why))
                continue
        pipeline = FreePipeline(impl, None if impl == "mp" else args.transport, args.workers)
        try:
            pipeline.start()
            if args.pids:
                print("%s pids (sink, ventilator/mp, workers...): %s"
                      % (impl, " ".join(map(str, pipeline.pids))), flush=True)
            times = [pipeline.round(args.n, args.chunksize) for _ in range(args.rounds)]
        finally:
            pipeline.close()
        medians[impl] = args.n / statistics.median(times)
        print("%-10s %10.0f tasks/s  (rounds: %s)" % (
            impl, medians[impl], " ".join("%.0f" % (args.n / t) for t in times)), flush=True)
    for base in ("raw", "pickle"):
        if base in medians:
            print("vs %s: %s" % (base, "  ".join("%s %.2fx" % (impl, rate / medians[base])
                                                 for impl, rate in medians.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
