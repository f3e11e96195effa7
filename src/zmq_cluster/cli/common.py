"""What the subcommands share: errors with exit statuses, the parser class,
the options several subcommands take, and turning them into settings.

Option groups (each adds its flags with help text; every default is None so
that :func:`settings` can tell "not given" from a value, as
:func:`zmq_cluster.config.merge` needs):

* :func:`common_options`: ``--config FILE``, on every subcommand;
* :func:`add_server_key_options`: ``--secret-key``, ``--authorized-keys``,
  ``--keys`` (the scheduler), resolved by :func:`server_security_from`;
* :func:`add_client_key_options`: ``--secret-key``, ``--scheduler-key``,
  ``--keys`` (workers and the commands that talk to a scheduler), resolved
  by :func:`client_security_from`;
* :func:`add_locate_options`: ``--connect``, ``--scheduler-file``,
  resolved by :func:`locate_scheduler`;
* :func:`add_timeout_option`: ``--timeout SECONDS``, and
  :func:`connect_client`, which finds the scheduler, connects with the keys
  and waits for its answer within that time (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NoReturn, Optional

import zmq

from ..config import (
    Config, SchedulerFileError, check_endpoint, merge, read_scheduler_file, write_scheduler_file,
)
from ..exceptions import HandshakeRefused
from ..security import ClientSecurity, ServerSecurity, client_security, server_security

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "ArgumentParser",
    "CommandError",
    "SchedulerLocation",
    "UsageError",
    "add_client_key_options",
    "add_locate_options",
    "add_server_key_options",
    "client_security_from",
    "common_options",
    "error_line",
    "handshake_error",
    "locate_scheduler",
    "one_line",
    "publish_scheduler_file",
    "remove_scheduler_file",
    "say",
    "zmq_reason",
    "server_security_from",
    "settings",
]

#: Exit statuses.
EXIT_OK = 0
EXIT_FAILURE = 1   #: a runtime failure (unreachable scheduler, refusal to listen...)
EXIT_USAGE = 2     #: a usage error or an invalid config


class CommandError(Exception):
    """A failure to report in one line and exit with ``status``."""

    status = EXIT_FAILURE

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class UsageError(CommandError):
    """Options that cannot work together or are missing (exit status 2)."""

    status = EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting a usage error in one line (with a
    pointer to ``--help``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, "%s: error: %s (see %s --help)\n"
                  % (self.prog, message, self.prog))


def common_options() -> ArgumentParser:
    """The parent parser of every subcommand: ``--config FILE``."""
    parent = ArgumentParser(add_help=False)
    parent.add_argument(
        "--config", metavar="FILE", default=None,
        help="TOML config file (default: $ZMQ_CLUSTER_CONFIG if set). Its keys are the long"
             " options with _ for - (listen, connect, scheduler_file, workers, imports,"
             " heartbeat_timeout, insecure, malloc_tuning, shared_memory, secret_key, scheduler_key,"
             " authorized_keys, keys); options given on the command line override it, and"
             " relative paths in it are relative to its own directory")
    return parent


def add_malloc_tuning_option(parser: argparse.ArgumentParser,
                             processes: str = "worker processes") -> None:
    """``--malloc-tuning`` / ``--no-malloc-tuning`` (default None: the
    config file's ``malloc_tuning``, else off)."""
    parser.add_argument(
        "--malloc-tuning", action=argparse.BooleanOptionalAction, default=None,
        help="start the %s with glibc malloc tuned for large arrays (GLIBC_TUNABLES:"
             " mmap_threshold and trim_threshold 1 GiB, arena_max 1): 64 MiB arrays moved"
             " 1.5-1.9x faster through a pool, but each process keeps the memory it freed, up"
             " to 1 GiB, instead of returning it to the OS. A tunable already set in"
             " GLIBC_TUNABLES wins. Off by default; does nothing without glibc" % processes)


def add_server_key_options(parser: argparse.ArgumentParser) -> None:
    """The scheduler's CURVE options."""
    group = parser.add_argument_group("CURVE security (see `zmq-cluster keygen`)")
    group.add_argument(
        "--secret-key", metavar="FILE", default=None,
        help="the scheduler's secret key file (DIR/scheduler.key_secret from keygen): encrypt"
             " every connection and admit only the keys in --authorized-keys")
    group.add_argument(
        "--authorized-keys", metavar="DIR", default=None,
        help="directory of the public key files (*.key) of the clients and workers to admit"
             " (DIR/authorized from keygen); every other peer is refused at the handshake")
    group.add_argument(
        "--keys", metavar="DIR", default=None,
        help="a keygen directory: shorthand for --secret-key DIR/scheduler.key_secret"
             " --authorized-keys DIR/authorized")


def add_client_key_options(parser: argparse.ArgumentParser) -> None:
    """The CURVE options of everything that connects to a scheduler."""
    group = parser.add_argument_group("CURVE security (see `zmq-cluster keygen`)")
    group.add_argument(
        "--secret-key", metavar="FILE", default=None,
        help="this side's secret key file (DIR/client.key_secret from keygen), whose public"
             " key the scheduler must have in its authorized keys")
    group.add_argument(
        "--scheduler-key", metavar="FILE", default=None,
        help="the scheduler's public key file (DIR/scheduler.key from keygen); may be left out"
             " when the scheduler file records the key")
    group.add_argument(
        "--keys", metavar="DIR", default=None,
        help="a keygen directory: shorthand for --secret-key DIR/client.key_secret"
             " --scheduler-key DIR/scheduler.key")


def add_locate_options(parser: argparse.ArgumentParser) -> None:
    """Where the scheduler is: ``--connect`` or ``--scheduler-file``."""
    group = parser.add_argument_group("finding the scheduler (one of these, or the config)")
    group.add_argument(
        "--connect", metavar="ADDRESS", type=connect_address, default=None,
        help="the scheduler's address, such as tcp://head:5555")
    group.add_argument(
        "--scheduler-file", metavar="PATH", default=None,
        help="the JSON file the scheduler wrote (--scheduler-file of `zmq-cluster scheduler`),"
             " on a filesystem both hosts see")


def settings(args: argparse.Namespace, config: Config,
             defaults: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The subcommand's settings: its parsed options over the config file
    over ``defaults`` (:func:`zmq_cluster.config.merge`); ``args.config``
    and ``args.run`` are left out."""
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "run", "command")}
    return merge(defaults or {}, config, flags)


def server_security_from(values: Mapping[str, Any]) -> Optional[ServerSecurity]:
    """The scheduler's :class:`ServerSecurity` from merged settings
    (``secret_key``, ``authorized_keys``, ``keys``), or None for none."""
    return server_security(secret_key=values.get("secret_key"),
                           authorized_keys=values.get("authorized_keys"),
                           keys=values.get("keys"))


@dataclass(frozen=True)
class SchedulerLocation:
    """Where a scheduler listens, and its public key if a scheduler file
    recorded one (Z85 text)."""

    address: str
    public_key: Optional[str] = None


def locate_scheduler(values: Mapping[str, Any], *,
                     wait: float = 0.0) -> SchedulerLocation:
    """The scheduler's address from merged settings: ``connect``, else the
    ``scheduler_file`` (waiting up to ``wait`` seconds for it to appear).

    Raises :class:`UsageError` when neither or both are set,
    :class:`zmq_cluster.config.SchedulerFileError` for a missing or bad
    scheduler file.
    """
    connect, path = values.get("connect"), values.get("scheduler_file")
    if connect is not None and path is not None:
        raise UsageError("give --connect or --scheduler-file, not both")
    if connect is not None:
        return SchedulerLocation(str(connect))
    if path is None:
        raise UsageError("say where the scheduler is: --connect ADDRESS or --scheduler-file"
                         " PATH (or connect / scheduler_file in the config)")
    found = read_scheduler_file(path, timeout=wait)
    return SchedulerLocation(found.address, found.public_key)


def client_security_from(values: Mapping[str, Any],
                         location: Optional[SchedulerLocation] = None,
                         ) -> Optional[ClientSecurity]:
    """A client's :class:`ClientSecurity` from merged settings
    (``secret_key``, ``scheduler_key``, ``keys``) and the scheduler's public
    key from its scheduler file, if ``location`` has one; None for none.

    Raises :class:`UsageError` when the scheduler file records a public key
    (the scheduler uses CURVE) but no key of this side's is given: the
    connection could only fail at the handshake.
    """
    security = client_security(secret_key=values.get("secret_key"),
                               scheduler_key=values.get("scheduler_key"),
                               keys=values.get("keys"),
                               scheduler_public_key=location.public_key if location else None)
    if security is None and location is not None and location.public_key is not None:
        raise UsageError("the scheduler uses CURVE (its scheduler file records its public key):"
                         " give --keys DIR or --secret-key FILE")
    return security


def connect_address(text: str) -> str:
    """argparse type: an address to connect to (tcp://HOST:PORT, ipc://PATH)."""
    try:
        return check_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("must be %s, not %r" % (exc, text)) from None


def listen_address(text: str) -> str:
    """argparse type: an address to listen on (a PORT of 0 or * too)."""
    try:
        return check_endpoint(text, listen=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("must be %s, not %r" % (exc, text)) from None


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text) from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be a number > 0, not %r" % text)
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer: %r" % text) from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1, not %r" % text)
    return value


#: How long status, stop and restart-workers wait for the scheduler by default.
DEFAULT_TIMEOUT = 5.0


def add_timeout_option(parser: argparse.ArgumentParser) -> None:
    """``--timeout SECONDS``: how long to wait for the scheduler's answer."""
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=positive_float, default=None,
        help="wait at most this long for the scheduler's answer, then fail with exit status 1"
             " (default %g)" % DEFAULT_TIMEOUT)


def add_log_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--log-level``."""
    parser.add_argument(
        "--log-level", metavar="LEVEL", default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="what to log on stderr: DEBUG, INFO, WARNING or ERROR (default %s)" % default)


def setup_logging(level: str, who: str) -> None:
    """Log lines on stderr, each saying who wrote it."""
    logging.basicConfig(level=level, format="%%(asctime)s %s %%(message)s" % who,
                        stream=sys.stderr)


@contextlib.contextmanager
def connect_client(values: Mapping[str, Any]) -> Iterator[tuple]:
    """A connected :class:`~zmq_cluster.client.SchedulerClient` and the
    seconds left of ``values["timeout"]``: ``with connect_client(values) as
    (client, left): reply = client.stats(timeout=left())``. Raises
    :class:`CommandError` (exit 1, one line) when the scheduler does not
    answer in time, and at once when it refuses this side at the security
    handshake (:func:`handshake_error`)."""
    from ..client import SchedulerClient
    timeout = values.get("timeout") or DEFAULT_TIMEOUT
    deadline = time.monotonic() + timeout
    location = locate_scheduler(values)
    security = client_security_from(values, location)
    # The client's own log lines would repeat the one-line error.
    logging.getLogger("zmq_cluster.pool").setLevel(logging.CRITICAL)
    try:
        client = SchedulerClient(location.address, security=security, connect_timeout=timeout)
    except HandshakeRefused as exc:
        raise handshake_error(exc, security) from None
    except TimeoutError as exc:
        raise CommandError(one_line(exc)) from None
    except zmq.ZMQError as exc:
        raise CommandError("cannot connect to %s: %s"
                           % (location.address, zmq_reason(exc))) from None

    def left() -> float:
        return max(0.001, deadline - time.monotonic())

    try:
        yield client, left
    except TimeoutError:
        raise CommandError("the scheduler at %s did not answer within %g s"
                           % (location.address, timeout)) from None
    except ConnectionError as exc:
        raise CommandError(one_line(exc)) from None
    finally:
        client.close()


def handshake_error(exc: HandshakeRefused,
                    security: Optional[ClientSecurity]) -> CommandError:
    """The one-line error (exit 1) for a scheduler that refused this side at
    the security handshake, naming the options to give when it wants keys
    this side has not got."""
    message = one_line(exc)
    if exc.reason == "protocol" and security is None:
        message += " (--keys DIR, or --secret-key FILE --scheduler-key FILE)"
    return CommandError(message)


def publish_scheduler_file(path: "os.PathLike[str] | str", address: str,
                           public_key: Optional[str] = None) -> None:
    """Write the scheduler file (:func:`zmq_cluster.config.write_scheduler_file`);
    :class:`CommandError` naming ``path`` when it cannot be written."""
    try:
        write_scheduler_file(path, address, public_key)
    except OSError as exc:
        raise CommandError("cannot write the scheduler file %s: %s"
                           % (path, exc.strerror or exc)) from None


def remove_scheduler_file(path: "os.PathLike[str] | str", address: str) -> None:
    """Remove the scheduler file at ``path`` unless another scheduler has
    replaced it (it names another address) or it is gone."""
    try:
        if read_scheduler_file(path).address == address:
            os.unlink(path)
    except (SchedulerFileError, OSError):
        pass


def say(text: str) -> None:
    """Print a line for the user (stdout)."""
    print(text, flush=True)


def zmq_reason(exc: Exception) -> str:
    """libzmq's reason for a failed bind or connect, without pyzmq's
    ``(addr=...)`` suffix (the caller names the address)."""
    errno = getattr(exc, "errno", None)
    return zmq.strerror(errno) if errno else one_line(exc)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def error_line(prog: str, message: str) -> None:
    """Report an error on stderr in one line."""
    sys.stderr.write("%s: error: %s\n" % (prog, message))

