"""``zmq-cluster local -n N``: a LocalCluster in the foreground."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import List

from ..config import Config
from .common import (
    EXIT_OK, CommandError, add_malloc_tuning_option, positive_float, positive_int,
    publish_scheduler_file, remove_scheduler_file, say, settings,
)

NAME = "local"


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]",
               common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, parents=[common], help="run a scheduler and workers on this host, for trying out",
        description=(
            "Start a LocalCluster (a scheduler and N worker processes on this host) and print"
            " its address, which ClusterPool(ADDRESS) in another process of yours connects to;"
            " it runs until Ctrl-C, SIGTERM or `zmq-cluster stop`, which stop everything"
            " cleanly."))
    parser.add_argument(
        "-n", "--workers", metavar="N", type=positive_int, default=None,
        help="how many worker processes (default: the number of cores)")
    parser.add_argument(
        "--transport", choices=["ipc", "tcp"], default="ipc",
        help="ipc: a socket in a private directory (this user only; the default); tcp: a free"
             " port on 127.0.0.1 (this host only)")
    parser.add_argument(
        "--heartbeat-timeout", metavar="SECONDS", type=positive_float, default=None,
        help="a worker silent this long is declared dead and replaced (default 10)")
    parser.add_argument(
        "--scheduler-file", metavar="PATH", default=None,
        help="also write the address to this JSON file, and remove it on exit (as `zmq-cluster"
             " scheduler` does)")
    add_malloc_tuning_option(parser, "scheduler and worker processes")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace, config: Config) -> int:
    from ..local import LocalCluster

    values = settings(args, config, {"workers": None, "heartbeat_timeout": 10.0,
                                     "malloc_tuning": False})
    stop = threading.Event()
    # During start-up, Ctrl-C or SIGTERM interrupts it (LocalCluster stops
    # what it has started; exit 130) rather than wait for it to finish.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Its pools are in other processes: a scheduler thread here would gain
    # nothing (no inproc pool), and --malloc-tuning tunes a scheduler process.
    with LocalCluster(values["workers"], transport=values["transport"],
                      heartbeat_timeout=values["heartbeat_timeout"],
                      malloc_tuning=values["malloc_tuning"], scheduler="process") as cluster:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        path = values.get("scheduler_file")
        if path is not None:
            publish_scheduler_file(path, cluster.address)
        scheduler = cluster.scheduler
        assert scheduler is not None  # scheduler="process"
        ended: List[int] = []

        def watch_scheduler() -> None:  # `zmq-cluster stop` ends it, or a crash
            ended.append(scheduler.wait())
            stop.set()

        threading.Thread(target=watch_scheduler, name="zmq-cluster-local-watch",
                         daemon=True).start()
        try:
            say(cluster.address)
            say("a LocalCluster of %d workers (pids %s) is listening at the address above;"
                " Ctrl-C stops it" % (cluster.n_workers,
                                      " ".join(map(str, cluster.worker_pids()))))
            while not stop.wait(3600):
                pass
            if ended and ended[0] != 0:
                raise CommandError("the scheduler exited with status %d" % ended[0])
            say("the scheduler stopped (zmq-cluster stop); stopping" if ended else "stopping")
        finally:
            if path is not None:
                remove_scheduler_file(path, cluster.address)
    say("stopped")
    return EXIT_OK
