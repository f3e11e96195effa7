"""``zmq-cluster status``: the scheduler's workers and task counts."""

from __future__ import annotations

import argparse
import json

from ..config import Config
from .common import (
    EXIT_OK, add_client_key_options, add_locate_options, add_timeout_option, connect_client,
    say, settings,
)

NAME = "status"

#: The fields of each worker object ``--json`` prints.
WORKER_FIELDS = ("host", "pid", "uptime", "tasks", "mean_task_seconds", "state", "task_age",
                 "in_hand", "last_seen")


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]",
               common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, parents=[common], help="show the live workers and the task counts",
        description=(
            "Ask the scheduler for its live workers (host, pid, uptime, tasks done, mean task"
            " seconds, busy or idle, age of the task it runs) and its queued and running task"
            " counts."))
    add_locate_options(parser)
    parser.add_argument(
        "--json", action="store_true", default=None,
        help="print one JSON object instead of a table: {\"address\", \"workers\": [{%s}, ...],"
             " \"queued\", \"running\", \"clients\", \"counters\"}" % ", ".join(
                 '"%s"' % f for f in WORKER_FIELDS))
    add_timeout_option(parser)
    add_client_key_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace, config: Config) -> int:
    values = settings(args, config, {"json": False})
    with connect_client(values) as (client, left):
        reply = client.stats(timeout=left())
        address = client.address
    workers = [{k: w.get(k) for k in WORKER_FIELDS} for w in reply["workers"]]
    if values["json"]:
        say(json.dumps({"address": address, "workers": workers, "queued": reply["queued"],
                        "running": reply["running"], "clients": reply.get("clients"),
                        "counters": reply.get("counters", {})}, sort_keys=True))
        return EXIT_OK
    say("scheduler %s: %d workers, %d tasks queued, %d running" % (
        address, len(workers), reply["queued"], reply["running"]))
    if workers:
        rows = [("HOST", "PID", "UPTIME", "TASKS", "MEAN TASK", "STATE", "TASK AGE")]
        for w in sorted(workers, key=lambda w: (w["host"], w["pid"])):
            rows.append((w["host"], str(w["pid"]), _duration(w["uptime"]), str(w["tasks"]),
                         _task_time(w["mean_task_seconds"]) if w["tasks"] else "-", w["state"],
                         _duration(w["task_age"]) if w["task_age"] is not None else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            say("  ".join(c.ljust(n) for c, n in zip(r, widths)).rstrip())
    return EXIT_OK


def _task_time(seconds: float) -> str:
    """A mean task time, in the unit that suits it: 3.2 s, 12.5 ms, 92 us."""
    if seconds >= 1:
        return "%.3g s" % seconds
    if seconds >= 1e-3:
        return "%.3g ms" % (seconds * 1e3)
    return "%.3g us" % (seconds * 1e6)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return "%.1fs" % seconds
    minutes, s = divmod(int(seconds), 60)
    if minutes < 60:
        return "%dm%02ds" % (minutes, s)
    hours, m = divmod(minutes, 60)
    return "%dh%02dm" % (hours, m)
