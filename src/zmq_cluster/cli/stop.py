"""``zmq-cluster stop [--workers-only]``: stop a cluster (or its workers)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from .. import schedproto as sp
from ..config import Config
from .common import (
    EXIT_OK, CommandError, add_client_key_options, add_locate_options, add_timeout_option,
    connect_client, say, settings,
)

NAME = "stop"


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]",
               common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, parents=[common], help="stop the workers and the scheduler",
        description=(
            "Tell the scheduler to stop every worker (each finishes its task; `zmq-cluster"
            " worker` nannies exit with their workers), then itself. Only an authenticated"
            " (CURVE) or local client may do this."))
    add_locate_options(parser)
    parser.add_argument(
        "--workers-only", action="store_true", default=None,
        help="stop the workers and their nannies only; the scheduler keeps running (queued"
             " tasks wait for new workers)")
    add_timeout_option(parser)
    add_client_key_options(parser)
    parser.set_defaults(run=run)
    return parser


def control(values: Mapping[str, Any], op: str, done: str) -> int:
    """Ask for ``op`` and report the answer."""
    with connect_client(values) as (client, left):
        reply = client.control(op, timeout=left())
        address = client.address
    if not reply.get("ok"):
        raise CommandError("the scheduler at %s refused: %s" % (address, reply.get("error")))
    say(done % {"workers": reply.get("workers", 0), "address": address})
    return EXIT_OK


def run(args: argparse.Namespace, config: Config) -> int:
    values = settings(args, config, {"workers_only": False})
    if values["workers_only"]:
        return control(values, sp.OP_STOP_WORKERS,
                       "told %(workers)d workers to stop; the scheduler at %(address)s runs on")
    return control(values, sp.OP_STOP,
                   "told the scheduler at %(address)s and its %(workers)d workers to stop")
