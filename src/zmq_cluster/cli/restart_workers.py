"""``zmq-cluster restart-workers``: replace every worker after its task."""

from __future__ import annotations

import argparse

from .. import schedproto as sp
from ..config import Config
from .common import (
    add_client_key_options, add_locate_options, add_timeout_option, settings,
)
from .stop import control

NAME = "restart-workers"


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]",
               common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, parents=[common], help="replace every worker once its task is done",
        description=(
            "Tell every worker to finish the task it runs and exit; its nanny (`zmq-cluster"
            " worker`, LocalCluster) starts a fresh one, which imports the code anew. Tasks"
            " a worker held but had not started run elsewhere. Only an authenticated (CURVE)"
            " or local client may do this."))
    add_locate_options(parser)
    add_timeout_option(parser)
    add_client_key_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace, config: Config) -> int:
    return control(settings(args, config), sp.OP_RESTART_WORKERS,
                   "told %(workers)d workers of the scheduler at %(address)s to restart")
