"""PoolLink: what a pool's futures and result streams share with the pool.

The one interface between :mod:`zmq_cluster.pool` (ClusterPool, the public
API) and the engines under it (:mod:`zmq_cluster.poolfuture`, one task
and its Future; :mod:`zmq_cluster.poolstream`, map/imap): the scheduler
connection, the task settings, the payload copy counters, whether the pool
still takes work, the count of tasks in flight that ``join`` waits
for, and the pool's shared memory (if any) with the pins of its tasks'
arguments. The engines hold a PoolLink, never the pool.

Shared memory: a task's arguments placed in slots are pinned from its
encoding (:meth:`PoolLink.pin_encoded`) until its result arrives, it fails
or it is cancelled (:meth:`PoolLink.unpin`): the scheduler re-sends a task
whose worker died, and the dead worker's claims are reclaimed meanwhile; the
pin keeps the slots for the worker that runs it next.
"""

import logging
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import framing
from .client import ResultSink, SchedulerClient
from .sharedmem import SharedMemory
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
    answered, failed or cancelled. ``shm``: the pool's SharedMemory, or None
    (arrays go over the socket).
    """

    __slots__ = ("client", "timeout_ms", "allow_pickle", "copies_sent", "copies_received",
                 "state", "pending", "_cond", "shm", "pins")

    def __init__(self, client: SchedulerClient, *, timeout_ms: int,
                 allow_pickle: Optional[bool], copies_sent: CopyCount,
                 copies_received: CopyCount, shm: Optional[SharedMemory] = None) -> None:
        self.shm = shm
        #: Task id -> its pinned slots (read only outside: empty, no task
        #: needs :meth:`unpin`).
        self.pins: Dict[int, List[Tuple[int, int, int]]] = {}
        if shm is not None:
            client.on_unmatched = self._discard
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

    def send_table(self, table: bytes, count: int, frames: List[Any], tids: Sequence[int],
                   sink: ResultSink, direct: bool = False) -> None:
        """Send one batch made into its table (see SchedulerClient.send_table),
        counting its tasks as pending."""
        with self._cond:
            self.pending += count
        try:
            self.client.send_table(table, count, frames, tids, sink, direct)
        except BaseException:
            for tid in tids:
                self.unpin(tid)
            raise

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

    def pin_encoded(self, tid: int) -> int:
        """Pin, for task ``tid``, the slots of the message this thread
        encoded last with ``shm`` (until :meth:`unpin` of ``tid``): the
        bytes they hold (0: none). For an engine that encodes a task itself
        and saw ``shm.arrays_sent`` change."""
        shm = self.shm
        pins = None if shm is None else shm.last_message()
        if not pins:  # (another thread's arrays)
            return 0
        assert shm is not None
        shm.pin(pins)  # (not sent yet: nobody can have freed them)
        self.pins[tid] = pins
        return sum(p[2] for p in pins)

    def unpin(self, tid: int) -> None:
        """Task ``tid`` is answered, failed or cancelled: its argument slots
        are free once no worker holds them."""
        pins = self.pins.pop(tid, None)
        if pins is not None and self.shm is not None:
            self.shm.unpin(pins)

    def unpin_all(self) -> None:
        """Drop every pin (the pool was terminated)."""
        shm = self.shm
        while self.pins:
            _, pins = self.pins.popitem()
            if shm is not None:
                shm.unpin(pins)

    def _discard(self, frames: List[Any]) -> None:
        """A result nobody waits for any more (a cancelled task): decoded
        and dropped, so that the worker's slots it names are released."""
        try:
            framing.decode(frames, allow_pickle=False, shm=self.shm)
        except Exception:
            pass

    def refused(self, tid: int, exc: BaseException) -> None:
        """A result that does not decode (a pickle from an untrusted
        worker, a malformed message): logged and counted; it fails its
        items."""
        reason = "pickle_refused" if "pickle" in str(exc) else "malformed_results"
        self.client.counters[reason] += 1
        log.warning("pool refused the result of task %x: %s", tid, exc)
