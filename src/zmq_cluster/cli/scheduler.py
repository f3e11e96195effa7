"""``zmq-cluster scheduler``: run a scheduler in the foreground."""

from __future__ import annotations

import argparse
import signal
import socket
from pathlib import Path
from typing import Optional

import zmq

from ..config import Config
from .common import (
    EXIT_OK, CommandError, add_log_option, add_server_key_options, listen_address,
    positive_float, publish_scheduler_file, remove_scheduler_file, say, server_security_from,
    settings, setup_logging, zmq_reason,
)

NAME = "scheduler"

DEFAULT_LISTEN = "tcp://0.0.0.0:5555"

_WILDCARDS = ("0.0.0.0", "*", "::", "[::]")


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]",
               common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, parents=[common], help="run a scheduler in the foreground",
        description=(
            "Run a scheduler in the foreground until `zmq-cluster stop`, SIGTERM or Ctrl-C."
            " Workers (`zmq-cluster worker`) and pools (ClusterPool) connect to its one port."
            " On a network address it needs CURVE keys (`zmq-cluster keygen DIR`, then"
            " --keys DIR) or --insecure; ipc:// and 127.0.0.1 need none."))
    parser.add_argument(
        "--listen", metavar="ADDRESS", type=listen_address, default=None,
        help="where to listen: tcp://HOST:PORT (HOST 0.0.0.0 or * for every interface; PORT 0"
             " for a free one), or ipc://PATH (default %s)" % DEFAULT_LISTEN)
    parser.add_argument(
        "--scheduler-file", metavar="PATH", default=None,
        help="write the scheduler's address and public key here as JSON ({\"address\": ...,"
             " \"public_key\": ...}) once it listens, and remove it on exit, so that workers and"
             " clients on a shared filesystem find it (--scheduler-file PATH there too)")
    parser.add_argument(
        "--heartbeat-timeout", metavar="SECONDS", type=positive_float, default=None,
        help="a worker silent this long (stopped, cut off) is declared dead and its tasks run"
             " elsewhere (default 10)")
    parser.add_argument(
        "--insecure", action="store_true", default=None,
        help="listen on a network address without CURVE keys anyway. Anyone who can reach the"
             " port can then run any importable function on the workers and read every"
             " argument and result; pickled data is refused from such peers")
    add_server_key_options(parser)
    add_log_option(parser, "INFO")
    parser.set_defaults(run=run)
    return parser


def contact_address(bound: str) -> str:
    """The address others connect to: ``bound`` (the scheduler's actual
    endpoint, port resolved), with a wildcard host (0.0.0.0, ``*``, ::)
    replaced by this host's name."""
    if not bound.startswith("tcp://"):
        return bound
    host, _, port = bound[len("tcp://"):].rpartition(":")
    if host in _WILDCARDS:
        return "tcp://%s:%s" % (socket.gethostname(), port)
    return bound


def run(args: argparse.Namespace, config: Config) -> int:
    from ..scheduler import Scheduler

    values = settings(args, config, {"listen": DEFAULT_LISTEN, "heartbeat_timeout": 10.0,
                                     "insecure": False, "log_level": "INFO"})
    setup_logging(values["log_level"], "scheduler")
    security = server_security_from(values)
    try:
        scheduler = Scheduler(values["listen"], heartbeat_timeout=values["heartbeat_timeout"],
                              security=security, insecure=bool(values["insecure"]))
    except zmq.ZMQError as exc:  # the address is taken, not this host's, no such directory
        raise CommandError("cannot listen on %s: %s%s" % (
            values["listen"], zmq_reason(exc),
            " (another scheduler may be running there)" if exc.errno == zmq.EADDRINUSE
            else "")) from None
    path: Optional[Path] = None
    try:
        address = contact_address(scheduler.address)
        public_key = security.public_key_text if security is not None else None
        if values.get("scheduler_file") is not None:
            publish_scheduler_file(values["scheduler_file"], address, public_key)
            path = Path(values["scheduler_file"])
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: scheduler.stop())
        say("scheduler listening on %s (%s)%s" % (
            address, "CURVE: admits the keys in %s" % security.authorized_keys
            if security is not None else "no keys", "; scheduler file %s" % path if path else ""))
        scheduler.run()
    finally:
        scheduler.close()
        if path is not None:
            remove_scheduler_file(path, address)
    say("scheduler stopped")
    return EXIT_OK

