"""Entry point of the processes LocalCluster starts:
``python -m zmq_cluster._start scheduler|worker ARGS``.

A module of its own, not imported by the package, so that running it with
``-m`` does not re-execute a module the package has already imported.
"""

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("scheduler", "worker"):
        sys.exit("usage: python -m zmq_cluster._start scheduler|worker ARGS")
    if argv[0] == "scheduler":
        from .scheduler import main as run
    else:
        from .poolworker import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
