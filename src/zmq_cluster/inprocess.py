"""Schedulers running as a thread of this process, and the context their
inproc clients share.

A LocalCluster whose scheduler runs as a thread (``scheduler="thread"``)
registers it here (:func:`register_in_process`) under its public address;
a :class:`~zmq_cluster.client.SchedulerClient` given that address in this
process connects to its ``inproc://`` endpoint on the scheduler's own
context instead (:func:`lookup`), so the frames between client and
scheduler are handed over by pointer (no copy, no libzmq I/O thread on the
way). inproc needs one context: :class:`SharedContext` counts its users,
and the last to let go terminates it. An entry is for the process that made
it: a forked child (which has the registry, not the thread) ignores it.
"""

import os
import threading
from typing import Dict, Optional, Tuple

import zmq

__all__ = ["SharedContext", "register_in_process", "unregister_in_process", "lookup"]


class SharedContext:
    """A ``zmq.Context`` shared by a scheduler thread and the clients that
    reach it over inproc (which needs one context). Its creator is its
    first user; every other calls :meth:`acquire`, and each calls
    :meth:`release` once its sockets are closed; the last release
    terminates it (``Context.term`` waits for every socket, so nobody may
    terminate it under another)."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self._users = 1  # its creator
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """One more user; False once the last user has released it."""
        with self._lock:
            if self._users <= 0:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        """One user fewer (its sockets closed); the last one terminates it."""
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.context.term()


# public address -> (pid, shared context, inproc endpoint) of a scheduler
# running as a thread of this process.
_IN_PROCESS: Dict[str, Tuple[int, SharedContext, str]] = {}
_IN_PROCESS_LOCK = threading.Lock()


def register_in_process(address: str, shared: SharedContext, endpoint: str) -> None:
    """Say that the scheduler listening on ``address`` runs in this process,
    also bound on ``endpoint`` (``inproc://...``) in ``shared``'s context:
    clients of ``address`` made in this process connect there instead."""
    with _IN_PROCESS_LOCK:
        _IN_PROCESS[address] = (os.getpid(), shared, endpoint)


def unregister_in_process(address: str) -> None:
    """Clients made from now on connect to ``address`` the ordinary way."""
    with _IN_PROCESS_LOCK:
        _IN_PROCESS.pop(address, None)


def lookup(address: str) -> Optional[Tuple[SharedContext, str]]:
    """(shared context acquired, inproc endpoint) for a scheduler of this
    process (not of the parent a fork copied the registry from), or None."""
    with _IN_PROCESS_LOCK:
        found = _IN_PROCESS.get(address)
        if found is None or found[0] != os.getpid() or not found[1].acquire():
            return None
        return found[1], found[2]
