"""Entry point of the processes LocalCluster starts:
``python -m zmq_cluster._start scheduler|worker ARGS``.

A module of its own, not imported by the package, so that running it with
``-m`` does not re-execute a module the package has already imported.
"""

import argparse
import gc
import logging
import os
import signal
import sys
from typing import Optional, Sequence


def scheduler_main(argv: Sequence[str]) -> int:
    """A scheduler process: serves until SIGTERM or a client's SHUTDOWN."""
    from .process import die_with_parent
    from .scheduler import Scheduler
    parser = argparse.ArgumentParser(prog="python -m zmq_cluster._start scheduler")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="write the bound address and a newline to this descriptor")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=args.log_level, format="%(asctime)s scheduler %(message)s")
    scheduler = Scheduler(args.listen, heartbeat_timeout=args.heartbeat_timeout)
    # Per-task records are short-lived containers: collect young objects
    # rarely (there are no cycles to find on the hot path).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    if args.ready_fd is not None:
        os.write(args.ready_fd, (scheduler.address + "\n").encode())
        os.close(args.ready_fd)
    scheduler.run()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("scheduler", "worker"):
        sys.exit("usage: python -m zmq_cluster._start scheduler|worker ARGS")
    if argv[0] == "scheduler":
        return scheduler_main(argv[1:])
    from .poolworker import main as run_worker
    return run_worker(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
