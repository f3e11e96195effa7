"""One submitted task: its Future and the sink that settles it.

``ClusterPool.submit`` returns a :class:`PoolFuture`; the scheduler
connection hands the task's result to its :class:`FutureSink`
(a :class:`zmq_cluster.client.ResultSink`), which decodes it and settles
the Future. Both reach the pool only through a
:class:`~zmq_cluster.poollink.PoolLink`.
"""

import concurrent.futures
import time
from typing import Any, List, Optional

from .poollink import PoolLink
from .taskcodec import decode_result, rebuild_error

__all__ = ["PoolFuture", "FutureSink"]


class PoolFuture(concurrent.futures.Future):
    """A Future whose cancel() also drops the task at the scheduler, and
    whose result() and exception() read the result connection themselves
    while they wait (see SchedulerClient.read_until): the result wakes the
    waiting thread directly, not through the pool's I/O thread."""

    def __init__(self, link: PoolLink, tid: int) -> None:
        super().__init__()
        self._link = link
        self._tid = tid

    def _read_until_done(self, timeout: Optional[float]) -> Optional[float]:
        """Wait in the result connection (when this thread may) until done;
        the time left of ``timeout``."""
        if self.done():
            return timeout
        client = self._link.client
        if timeout is None:
            client.read_until(self.done)
            return None
        deadline = time.monotonic() + timeout
        client.read_until(self.done, timeout)
        return max(0.0, deadline - time.monotonic())

    def result(self, timeout: Optional[float] = None) -> Any:
        return super().result(self._read_until_done(timeout))

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        return super().exception(self._read_until_done(timeout))

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        link = self._link
        if link.client.forget(self._tid) is not None:
            link.unpin(self._tid)
            link.tasks_done(1)
            try:
                link.client.cancel([self._tid])
            except Exception:
                pass  # the pool is closing: nothing will run it
        return True


class FutureSink:
    """Receives the result of one submitted task and settles its Future."""

    __slots__ = ("future", "link", "tid")

    def __init__(self, future: "concurrent.futures.Future[Any]", link: PoolLink,
                 tid: int = 0) -> None:
        self.future = future
        self.link = link
        self.tid = tid

    def deliver(self, tid: int, frames: List[Any], trusted: bool = False) -> None:
        link = self.link
        link.unpin(tid)
        allow = link.allow(trusted)
        outcome: Any
        try:
            values, errors = decode_result(frames, allow, link.copies_received, link.shm)
        except Exception as exc:
            link.refused(tid, exc)
            ok, outcome = False, exc
        else:
            if errors:
                ok, outcome = False, rebuild_error(errors[0], allow)
            else:
                ok, outcome = True, values[0]
        if self.future.set_running_or_notify_cancel():
            if ok:
                self.future.set_result(outcome)
            else:
                self.future.set_exception(outcome)
        link.tasks_done(1)

    def fail(self, exc: BaseException) -> None:
        self.link.unpin(self.tid)
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(exc)
        self.link.tasks_done(1)

    def wake(self) -> None:
        pass
