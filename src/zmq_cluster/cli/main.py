"""``zmq-cluster SUBCOMMAND [options]``: parse, read the config, run.

Each subcommand is a module of this package listed in :data:`SUBCOMMANDS`,
with

* ``NAME``: the subcommand's name;
* ``add_parser(subparsers, common)``: adds its parser with
  ``parents=[common]`` (which brings ``--config FILE``), a description,
  help on every option (defaults None, so that the config can fill them:
  :func:`.common.settings`), and ``set_defaults(run=run)``;
* ``run(args, config) -> int``: does the work and returns the exit status,
  raising :class:`.common.CommandError` (or one of the errors below) to fail.

Exit statuses: 0 on success; 2 for a usage error, an invalid config file
or invalid key options (:class:`~zmq_cluster.config.ConfigError`,
:class:`~zmq_cluster.security.KeyFileError`,
:class:`~zmq_cluster.security.KeyOptionsError`,
:class:`.common.UsageError`); 1 for a runtime failure (a
:class:`.common.CommandError`, an insecure listen refused, a missing
scheduler file, an OSError such as keys that exist already); 130 after
Ctrl-C. Each error is one line on stderr, ``zmq-cluster SUB: error: ...``,
with no traceback (a bug, any other exception, still shows one).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Optional, Sequence

from .. import __version__
from ..config import ConfigError, SchedulerFileError, read_config
from ..security import KeyFileError, KeyOptionsError, SecurityError
from ..trust import InsecureListenError
from . import keygen, local, restart_workers, scheduler, status, stop, worker
from .common import (
    EXIT_FAILURE, EXIT_USAGE, ArgumentParser, CommandError, common_options, error_line,
    one_line,
)

PROG = "zmq-cluster"

#: The subcommands, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[ModuleType, ...] = (scheduler, worker, status, stop, restart_workers,
                                        local, keygen)

_USAGE_ERRORS = (ConfigError, KeyFileError, KeyOptionsError)
_RUNTIME_ERRORS = (SecurityError, InsecureListenError, SchedulerFileError, OSError)


def build_parser() -> ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = ArgumentParser(
        prog=PROG,
        description="Run a zmq-cluster: a scheduler, workers on many hosts, and the tools to"
                    " watch and stop them. `%s SUBCOMMAND --help` explains each." % PROG)
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND",
                                       parser_class=ArgumentParser)
    common = common_options()
    for module in SUBCOMMANDS:
        module.add_parser(subparsers, common)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``);
    returns the exit status (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already reported
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    if args.command is None:
        error_line(PROG, "a subcommand is needed (see %s --help)" % PROG)
        return EXIT_USAGE
    prog = "%s %s" % (PROG, args.command)
    try:
        config = read_config(args.config)
        return int(args.run(args, config))
    except CommandError as exc:
        error_line(prog, one_line(exc))
        return exc.status
    except _USAGE_ERRORS as exc:
        error_line(prog, one_line(exc))
        return EXIT_USAGE
    except _RUNTIME_ERRORS as exc:
        error_line(prog, one_line(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        error_line(prog, "interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
