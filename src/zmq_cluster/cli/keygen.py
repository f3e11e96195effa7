"""``zmq-cluster keygen DIR``: write a set of CURVE keys."""

from __future__ import annotations

import argparse

from ..config import Config
from ..security import KeyExistsError, KeyPaths, keygen
from .common import EXIT_OK, CommandError, UsageError, one_line, say, settings

NAME = "keygen"


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]",
               common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, parents=[common], help="write CURVE keys for a scheduler and its clients",
        description=(
            "Write CURVE keys (zmq.auth certificate format) into DIR: scheduler.key and"
            " scheduler.key_secret (the scheduler's pair), client.key and client.key_secret"
            " (the pair workers, pools and the CLI share), and authorized/client.key (the"
            " directory of public keys the scheduler admits; copy more .key files there to"
            " admit more). Secret files are mode 0600. Then start the scheduler and everything"
            " that connects to it with --keys DIR."))
    parser.add_argument(
        "directory", metavar="DIR", nargs="?", default=None,
        help="where to write the keys (created if missing, mode 0700); default: the config"
             " file's `keys`")
    parser.add_argument(
        "--force", action="store_true", default=None,
        help="replace keys that exist in DIR (without it, existing keys are an error and"
             " nothing is written)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace, config: Config) -> int:
    values = settings(args, config, {"force": False})
    directory = values["directory"] if values["directory"] is not None else values.get("keys")
    if directory is None:
        raise UsageError("say where to write the keys: zmq-cluster keygen DIR")
    try:
        paths = keygen(directory, overwrite=values["force"])
    except KeyExistsError:
        raise   # its message says which and how to replace them
    except FileExistsError as exc:  # a file where a directory must be
        raise CommandError("cannot write keys in %s: %s is not a directory"
                           % (directory, exc.filename)) from None
    except OSError as exc:
        raise CommandError("cannot write keys in %s: %s"
                           % (directory, exc.strerror or one_line(exc))) from None
    _report(paths)
    return EXIT_OK


def _report(paths: KeyPaths) -> None:
    say("wrote CURVE keys in %s:" % paths.directory)
    for path, what in [
            (paths.scheduler_secret, "the scheduler's secret key: keep it on the scheduler's host"),
            (paths.scheduler_public, "the scheduler's public key: every client needs it"),
            (paths.client_secret, "the clients' secret key: workers, pools and the CLI"),
            (paths.client_public, "the clients' public key"),
            (paths.authorized_client, "the keys the scheduler admits: add more .key files here")]:
        say("  %-40s %s" % (path, what))
    say("start the scheduler and its workers and clients with --keys %s" % paths.directory)
