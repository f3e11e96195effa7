"""PoolLink: what a pool's futures and result streams share with the pool.

The one interface between :mod:`zmq_cluster.pool` (ClusterPool, the public
API) and the engines under it (:mod:`zmq_cluster.poolfuture`, one task
and its Future; :mod:`zmq_cluster.poolstream`, map/imap): the scheduler
connection, the task settings, the payload copy counters, whether the pool
still takes work, and the count of tasks in flight that ``join`` waits
for. The engines hold a PoolLink, never the pool.
"""

import logging
import threading
from typing import Any, List, Optional

from .client import ResultSink, SchedulerClient
from .taskcodec import CopyCount

__all__ = ["PoolLink", "RUN", "CLOSE", "TERMINATE"]

# Rejections are logged (and counted) under the pool's name.
log = logging.getLogger("zmq_cluster.pool")

#: A pool's states, as in multiprocessing.Pool.
RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"


class PoolLink:
    """A pool's connection and task accounting, as its engines see them.

    ``client``: the scheduler connection. ``timeout_ms``: the task timeout
    sent with every task (0: none). ``allow_pickle``: the pool's pickle
    setting for results (None: the trust of each result's path decides).
    ``copies_sent``/``copies_received``: the pool's payload copy counters.
    ``state``: RUN, CLOSE or TERMINATE (a stream stops reading its input
    when the pool no longer runs). ``pending``: tasks sent and not yet
    answered, failed or cancelled.
    """

    __slots__ = ("client", "timeout_ms", "allow_pickle", "copies_sent", "copies_received",
                 "state", "pending", "_cond")

    def __init__(self, client: SchedulerClient, *, timeout_ms: int,
                 allow_pickle: Optional[bool], copies_sent: CopyCount,
                 copies_received: CopyCount) -> None:
        self.client = client
        self.timeout_ms = timeout_ms
        self.allow_pickle = allow_pickle
        self.copies_sent = copies_sent
        self.copies_received = copies_received
        self.state = RUN
        self.pending = 0
        self._cond = threading.Condition()

    def allow(self, trusted: bool) -> bool:
        """Whether a result may be unpickled: the pool's ``allow_pickle``
        when set, else the trust of the result's path (connection and
        worker)."""
        setting = self.allow_pickle
        return trusted if setting is None else setting

    def send(self, entries: List[bytes], frames: List[Any], tids: List[int],
             sink: ResultSink) -> None:
        """Send one batch of tasks (see SchedulerClient.send_tasks),
        counting them as pending."""
        with self._cond:
            self.pending += len(tids)
        self.client.send_tasks(entries, frames, tids, sink)

    def tasks_done(self, n: int) -> None:
        """``n`` tasks were answered, failed or cancelled."""
        with self._cond:
            self.pending -= n
            if self.pending <= 0:
                self._cond.notify_all()

    def drop_pending(self) -> None:
        """Nothing is pending any more (the pool was terminated)."""
        with self._cond:
            self.pending = 0
            self._cond.notify_all()

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no task is pending or the scheduler is lost (at most
        ``timeout`` seconds): whether that happened."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.pending <= 0 or self.client.lost is not None, timeout)

    def refused(self, tid: int, exc: BaseException) -> None:
        """A result that does not decode (a pickle from an untrusted
        worker, a malformed message): logged and counted; it fails its
        items."""
        reason = "pickle_refused" if "pickle" in str(exc) else "malformed_results"
        self.client.counters[reason] += 1
        log.warning("pool refused the result of task %x: %s", tid, exc)
