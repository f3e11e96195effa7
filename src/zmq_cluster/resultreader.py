"""Who reads a pool client's result sockets, and the reading itself.

One I/O thread reads them by default and hands each result to whoever
waits for it. A thread waiting for one result (``Future.result()``) or for
the next results of a map or imap may take the sockets over from the I/O
thread for its wait
(:meth:`ResultReader.read_until`): its result then wakes it directly, with
no hand-off between threads on the way (two thread wake-ups and a GIL
hand-off less per round trip). Whichever thread reads delivers every
message that arrives, to whatever waits for it. One reader at a time: the
I/O thread, asked through its wake pipe, lets go and parks; it takes the
sockets back IDLE_TAKEBACK_SECONDS after nobody reads, so a loop of
``submit().result()``, or over ``imap``, keeps them in the caller's thread.

Contract with the client (:class:`~zmq_cluster.client.SchedulerClient`):
``sockets()`` gives ``(version, sockets)``: the sockets to read now, and
a number that changes whenever they do; ``dispatch(index, frames)``
handles a message from ``sockets[index]``; ``closed()`` says the client has
closed (readers stop). Which sockets are known drained (``wire.recv_any``'s
``drained``) is kept here for every reader: nobody else uses them.
"""

import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import zmq

from .wire import recv_any

__all__ = ["ResultReader"]

#: A thread reading results for itself looks at its future (done,
#: cancelled, the client closed) at least this often (ms).
READ_SLICE_MS = 50
#: Seconds a thread waits for the I/O thread to let go of the sockets
#: before it waits the ordinary way.
HANDOFF_SECONDS = 1.0
#: Seconds the sockets may go unread after a thread read them for itself,
#: before the I/O thread reads them again.
IDLE_TAKEBACK_SECONDS = 0.002

# Who reads (``ResultReader.state``): the I/O thread; nobody yet, a caller
# asked; a caller; nobody, the I/O thread takes them back soon.
_IO, _WANTED, _CALLER, _FREE = 0, 1, 2, 3


class ResultReader:
    """See the module docstring. ``context``: the client's (for the I/O
    thread's wake pipe); the I/O thread starts with :meth:`start`."""

    def __init__(self, context: zmq.Context,
                 sockets: Callable[[], Tuple[int, List[zmq.Socket]]],
                 dispatch: Callable[[int, List[Any]], None], closed: Callable[[], bool]) -> None:
        self._sockets = sockets
        self._dispatch = dispatch
        self._closed = closed
        self._wake_addr = "inproc://zc-client-%x" % id(self)
        self._wake_rx = context.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = context.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        #: Who reads (``_IO``, ``_WANTED``, ``_CALLER``, ``_FREE``); the
        #: condition's lock also guards the wake pipe's sender.
        self.state = _IO
        #: The thread reading for itself now, or None.
        self.reader_ident: Optional[int] = None
        self._io_parked = False
        self._handoff = threading.Condition(threading.Lock())
        self._drained = bytearray(8)  # (more than the client's most sockets, plus the pipe)
        self._version = -1
        self.thread = threading.Thread(target=self._io_loop, name="zmq-cluster-pool-io",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _current(self) -> List[zmq.Socket]:
        version, sockets = self._sockets()
        if version != self._version:
            self._version = version
            self._drained[:] = bytes(len(self._drained))
        return sockets

    # ------------------------------------------------------- the I/O thread

    def _io_loop(self) -> None:
        # The client's sockets first, then the wake pipe (stop, or let a
        # waiting thread read); waiting and receiving happen in
        # zmq_cluster.wire (without the GIL in the compiled twin).
        wake = [self._wake_rx]
        dispatch = self._dispatch
        try:
            while True:
                sockets = self._current() + wake
                got = recv_any(sockets, -1, 0, None, self._drained)
                if got is None:
                    continue
                which, frames = got
                if which == len(sockets) - 1:
                    if frames[0] != b"p" or not self._let_caller_read():
                        return
                    continue
                dispatch(which, frames)
        except zmq.ContextTerminated:
            return

    def _let_caller_read(self) -> bool:
        """The I/O thread, asked to: hand the sockets to the thread that
        wants them; while a caller reads, or nobody has read for less than
        IDLE_TAKEBACK_SECONDS after one (the next caller takes them without
        waking this thread), stay parked here; then read again. False when
        the client closed meanwhile (the I/O thread must stop)."""
        cond = self._handoff
        with cond:
            self._io_parked = True
            try:
                free_seen = False
                while True:
                    state = self.state
                    if state == _WANTED:
                        self.state = _CALLER
                        cond.notify_all()
                    elif state == _IO:
                        return not self._closed()
                    elif state == _FREE and (free_seen or self._closed()):
                        self.state = _IO
                        return not self._closed()
                    free_seen = state == _FREE
                    cond.wait(IDLE_TAKEBACK_SECONDS)
            finally:
                self._io_parked = False

    # ------------------------------------------------------------ a caller

    def read_until(self, done: Callable[[], bool], timeout: Optional[float] = None) -> None:
        """Read in this thread, dispatching whatever arrives, until
        ``done()`` is true, ``timeout`` seconds have passed or the client
        closes. Returns at once, reading nothing, when another thread reads
        already for itself, when this thread is the I/O thread or
        dispatches (a future's callback), or when the I/O thread does not
        let go within HANDOFF_SECONDS: the caller then waits the ordinary
        way (its result comes from whoever reads).

        After it, nobody reads for up to IDLE_TAKEBACK_SECONDS (the I/O
        thread's next look): a thread that calls again by then reads at
        once, without a hand-off."""
        closed = self._closed
        if closed():
            return
        me = threading.get_ident()
        if me == self.reader_ident or me == self.thread.ident:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._handoff
        with cond:
            if closed():
                return
            state = self.state
            if state == _FREE:
                self.state = _CALLER
            elif state != _IO:
                return  # another thread reads, or is about to
            else:
                self.state = _WANTED
                if self._io_parked:
                    cond.notify_all()
                else:
                    try:
                        self._wake_tx.send(b"p")
                    except zmq.ZMQError:
                        self.state = _IO
                        return
                wait = HANDOFF_SECONDS if timeout is None else min(timeout, HANDOFF_SECONDS)
                try:
                    handed = cond.wait_for(lambda: self.state == _CALLER, wait)
                except BaseException:  # KeyboardInterrupt: nobody may be left owed
                    self.state = _IO if self.state == _WANTED else _FREE
                    cond.notify_all()
                    raise
                if not handed:
                    # The I/O thread ignores the request when it comes.
                    self.state = _IO
                    cond.notify_all()
                    return
        self.reader_ident = me
        try:
            dispatch = self._dispatch
            drained = self._drained
            while not done() and not closed():
                if deadline is None:
                    wait_ms = READ_SLICE_MS
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait_ms = min(READ_SLICE_MS, int(left * 1000) + 1)
                got = recv_any(self._current(), wait_ms, 0, None, drained)
                while got is not None:
                    dispatch(*got)
                    if done() or closed():
                        break
                    got = recv_any(self._current(), 0, 0, None, drained)
        finally:
            self.reader_ident = None
            with cond:
                self.state = _FREE
                if closed():
                    cond.notify_all()

    # ------------------------------------------------------------- closing

    def stop(self, timeout: float = 10.0) -> None:
        """The client has closed: make the I/O thread stop, and wait for it
        (unless called from a reading thread: a future's callback). A
        thread reading for itself sees the close within READ_SLICE_MS and
        gives the sockets back; closed from a callback in the reading
        thread, the sockets close under it: it reads no more once it sees
        the close."""
        try:
            with self._handoff:
                self._wake_tx.send(b"")
                self._handoff.notify_all()
        except zmq.ZMQError:
            pass
        if (threading.current_thread() is not self.thread
                and threading.get_ident() != self.reader_ident and self.thread.ident is not None):
            self.thread.join(timeout)

    def close(self) -> None:
        """Close the wake pipe (after :meth:`stop`)."""
        self._wake_rx.close(linger=0)
        self._wake_tx.close(linger=0)
