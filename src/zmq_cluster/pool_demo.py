"""A real job on a LocalCluster: singular values of 200 random matrices.

    python -m zmq_cluster.pool_demo [--workers N] [--arrays K] [--size S]

Starts a scheduler and N worker processes on this host, maps
``numpy.linalg.svd`` over the matrices with a progress bar, checks every
result against the same computation here, and prints what ran where and
how fast.
"""

import argparse
import sys
import time
from typing import Optional, Sequence

import numpy as np

from .local import LocalCluster
from .pool import ClusterPool


def singular_values(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(a, compute_uv=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zmq_cluster.pool_demo")
    parser.add_argument("--workers", type=int, default=None, help="default: one per core")
    parser.add_argument("--arrays", type=int, default=200)
    parser.add_argument("--size", type=int, default=300)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((args.size, args.size)) for _ in range(args.arrays)]
    start = time.perf_counter()
    with LocalCluster(args.workers) as cluster:
        print("LocalCluster at %s with %d workers (started in %.2f s)"
              % (cluster.address, cluster.n_workers, time.perf_counter() - start))
        with ClusterPool(cluster) as pool:
            start = time.perf_counter()
            results = pool.map(singular_values, arrays, chunksize=1, progress=True)
            seconds = time.perf_counter() - start
            for a, s in zip(arrays[:5], results[:5]):
                np.testing.assert_allclose(s, singular_values(a), rtol=1e-10)
            print("%d SVDs of %dx%d matrices in %.2f s (%.1f per second); "
                  "largest singular value %.2f" % (len(results), args.size, args.size,
                                                   seconds, len(results) / seconds,
                                                   max(s[0] for s in results)))
            for w in sorted(pool.stats(), key=lambda w: w["pid"]):
                print("  worker %s pid %d: %d tasks, %.1f ms each, %s"
                      % (w["host"], w["pid"], w["tasks"], 1000 * w["mean_task_seconds"],
                         w["state"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
