"""``zmq-cluster worker``: N worker processes under a nanny, in the foreground."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import zmq

from ..config import Config
from ..exceptions import HandshakeRefused
from ..process import THREAD_VARIABLES, python_command, worker_environment
from ..security import ClientSecurity
from ..supervisor import Supervisor
from .common import (
    EXIT_OK, CommandError, SchedulerLocation, add_client_key_options, add_locate_options,
    add_log_option, add_malloc_tuning_option, client_security_from, handshake_error,
    locate_scheduler, one_line, positive_float, positive_int, say, settings, setup_logging,
    zmq_reason,
)

NAME = "worker"

#: How long a worker host waits at start for its scheduler to answer (a
#: worker started by srun beside its scheduler may look before the scheduler
#: file is written, or find the file a killed scheduler left behind).
SCHEDULER_WAIT = 60.0
#: How long one attempt to reach the scheduler named by a scheduler file
#: lasts before the file is read again (a new scheduler may replace a stale one).
SCHEDULER_FILE_RETRY = 5.0


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]",
               common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, parents=[common], help="run worker processes for a scheduler",
        description=(
            "Start N worker processes for the scheduler, once it answers (see --timeout), and"
            " supervise them in the foreground (a nanny): a worker that dies is replaced; on"
            " SIGTERM or Ctrl-C every worker finishes its task and exits, then the nanny exits."
            " `zmq-cluster stop` and `stop --workers-only` end the workers and this command;"
            " `zmq-cluster restart-workers` replaces each worker after its task."
            " A scheduler that refuses this side's key at the handshake (at start or later)"
            " ends this command at once, with exit status 1."
            " Each worker's OpenMP/MKL/OpenBLAS uses one thread (%s=1) unless those"
            " variables are set in this command's environment." % "/".join(THREAD_VARIABLES)))
    add_locate_options(parser)
    parser.add_argument(
        "-n", "--workers", metavar="N", type=positive_int, default=None,
        help="how many worker processes to run (default: the number of cores)")
    parser.add_argument(
        "--import", dest="imports", metavar="MODULE", action="append", default=None,
        help="import MODULE in every worker at start (repeatable): functions of it then run by"
             " reference, and its import cost is paid once")
    parser.add_argument(
        "--heartbeat-timeout", metavar="SECONDS", type=positive_float, default=None,
        help="declare the scheduler gone after this long without a heartbeat, and reconnect"
             " (default 10; use the scheduler's)")
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=positive_float, default=None,
        help="wait at most this long at start for the scheduler to answer (for the scheduler"
             " file to appear, naming a scheduler that answers), then fail with exit status 1"
             " (default %g)" % SCHEDULER_WAIT)
    add_malloc_tuning_option(parser)
    parser.add_argument(
        "--shared-memory", action=argparse.BooleanOptionalAction, default=None,
        help="let the workers take and give large arrays by same-host shared memory (memfd"
             " slots) with pools that ask for it (ClusterPool(..., shared_memory=True) on this"
             " host, same uid): no socket copies for arrays of 1 MiB and more. Off by default"
             " (config key shared_memory)")
    add_client_key_options(parser)
    add_log_option(parser, "WARNING")
    parser.set_defaults(run=run)
    return parser


def find_scheduler(values: Mapping[str, Any], timeout: float,
                   ) -> Tuple[SchedulerLocation, Optional[ClientSecurity]]:
    """Where the scheduler is and the keys to reach it, once it has answered
    a client's HELLO (so that workers are not started for a scheduler that
    is not there, or that refuses their key, to retry for ever).

    Waits up to ``timeout`` seconds in all; with a scheduler file, for it to
    appear, and reads it again after each :data:`SCHEDULER_FILE_RETRY`
    seconds without an answer (one left by a killed scheduler may be
    replaced by a new one). Raises :class:`CommandError` (exit 1) when no
    scheduler answered in time, saying why the last attempt failed, and at
    once when the scheduler refused this side at the security handshake
    (its key, or CURVE on one side only: waiting would not change that,
    so the scheduler file is not read again).
    """
    from ..client import SchedulerClient
    logging.getLogger("zmq_cluster.pool").setLevel(logging.CRITICAL)  # the error says it
    deadline = time.monotonic() + timeout
    from_file = values.get("connect") is None
    while True:
        location = locate_scheduler(values, wait=max(0.0, deadline - time.monotonic()))
        security = client_security_from(values, location)
        # Whole tenths of a second: the client's error says how long it waited.
        attempt = (max(0.1, round(min(deadline - time.monotonic(), SCHEDULER_FILE_RETRY), 1))
                   if from_file else timeout)
        try:
            probe = SchedulerClient(location.address, security=security,
                                    connect_timeout=attempt)
        except zmq.ZMQError as exc:
            raise CommandError("cannot connect to %s: %s"
                               % (location.address, zmq_reason(exc))) from None
        except HandshakeRefused as exc:
            raise handshake_error(exc, security) from None
        except TimeoutError as exc:
            if not from_file:
                raise CommandError(one_line(exc)) from None
            if time.monotonic() < deadline:
                continue
            raise CommandError(
                "%s (tried for %g s, reading the scheduler file %s again each time: is that"
                " scheduler running, or did a killed one leave its file behind?)"
                % (one_line(exc), timeout, values["scheduler_file"])) from None
        probe.close()
        return location, security


def run(args: argparse.Namespace, config: Config) -> int:
    values = settings(args, config, {"workers": os.cpu_count() or 1, "imports": (),
                                     "heartbeat_timeout": 10.0, "log_level": "WARNING",
                                     "malloc_tuning": False, "shared_memory": False})
    setup_logging("INFO" if values["log_level"] in ("DEBUG", "INFO") else "WARNING", "nanny")
    imports = list(values["imports"] or ())
    for name in imports:  # fail here, once, rather than in a restart loop
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise CommandError("cannot import %s: %s" % (name, one_line(exc))) from None
    location, security = find_scheduler(values, values.get("timeout") or SCHEDULER_WAIT)
    secret_key = None
    if security is not None:
        # The workers read the secret from its file; the scheduler's public
        # key (perhaps from the scheduler file) travels on their command line.
        from ..security import KeyPaths
        secret_key = os.path.abspath(values.get("secret_key")
                                     or KeyPaths(Path(values["keys"])).client_secret)

    def command() -> List[str]:
        argv = ["--connect", location.address, "--heartbeat-timeout",
                values["heartbeat_timeout"], "--log-level", values["log_level"]]
        if security is not None:
            argv += ["--secret-key", secret_key, "--server-key",
                     security.server_key.decode("ascii")]
        for name in imports:
            argv += ["--import", name]
        if values["shared_memory"]:
            argv.append("--shared-memory")
        return python_command("zmq_cluster._start", "worker", *argv)

    nanny = Supervisor(command, values["workers"], stop_with_workers=True,
                       env=worker_environment(1, malloc_tuning=values["malloc_tuning"]))
    stopping = threading.Event()   # a signal asked us to stop
    finished = threading.Event()   # ... or the scheduler stopped the workers

    def on_signal(*_: object) -> None:
        stopping.set()
        finished.set()

    def wait_for_nanny() -> None:
        nanny.wait()
        finished.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    nanny.start()
    threading.Thread(target=wait_for_nanny, daemon=True).start()
    try:
        say("%d workers for the scheduler at %s (pids %s)%s" % (
            values["workers"], location.address, " ".join(map(str, nanny.pids())),
            ", CURVE" if security is not None else ""))
        while not finished.wait(3600):
            pass
    finally:
        nanny.terminate()
        nanny.close()
    if nanny.refused and not stopping.is_set():
        raise CommandError(
            "the scheduler at %s refused the workers at the security handshake (it no longer"
            " admits this key, or its security changed); the workers stopped" % location.address)
    say("workers stopped" + (" (the scheduler stopped them)" if not stopping.is_set() else ""))
    return EXIT_OK
