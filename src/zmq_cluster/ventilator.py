"""Ventilators: push task requests to worker nodes."""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from .exceptions import ReceiverTimeoutException
from .sharedmem import SharedMemory, node_shared_memory
from .sockets import InitSocket, SocketLike, close_owned
from ._wire_common import counter
from .wire import Counters, send_requests

__all__ = ["BasicVentilator", "Ventilator"]

_PEER_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
#: Pending trackers kept before the first pruning of finished ones.
_PRUNE_MIN = 64

_V = TypeVar("_V", bound="BasicVentilator")


class BasicVentilator:
    """Push tasks to worker nodes on the cluster.

    ``request_sender`` is made a PUSH socket, which deals requests round-robin
    to the connected workers. ``worker_connect_delay`` (seconds, optional) is
    waited once, after the socket is made in :meth:`Setup`, so that workers
    started at the same time have connected before the first request goes
    out: otherwise the first worker to connect receives a queue's worth.

    A BasicVentilator is a pipe for any object: each item given to
    :meth:`Send` travels as it is, and a BasicSink reading the channel
    yields exactly those objects (a worker's handler receives them as its
    request; a Sink unwraps ClusterResults sent this way).

    Every request sent gets a task id, unique to this ventilator (a random
    32-bit prefix and a counter), which travels in the message header and
    comes back on the worker's result.

    Array lifetime: arrays of ``COPY_THRESHOLD`` bytes or more (64 KiB) are
    handed to libzmq without a copy, and libzmq reads them while it sends,
    after :meth:`Send` has returned. Do not change such an array (nor the
    memory it views) until :meth:`WaitSent` has returned: a change before
    that may travel in the message. Smaller arrays are copied during Send
    and may be changed at once. Freeing is safe: the ventilator's messages
    keep their arrays alive.

    Counters: ``messages_sent`` and ``copied_bytes`` (payload bytes copied
    on the way out: arrays below ``COPY_THRESHOLD``, and arrays sent by
    shared memory).

    ``shared_memory`` (opt-in, same host only): True, or a
    :class:`~zmq_cluster.sharedmem.SharedMemory`, sends arrays of at least
    ``min_bytes`` (1 MiB) in requests by shared memory: each is copied once into a
    memfd slot and the message names it (docs/protocol.md, "Arrays"); the
    receiving node must have ``shared_memory`` too and run on this host,
    else it refuses such a message (logged, counted, answered). Without a
    free slot an array goes over the socket as usual. True makes one that
    the node closes in Shutdown (its slots stay served until released).
    """

    #: (socket-like, required) Constructor for the writer socket.
    request_sender: SocketLike | None = None

    messages_sent = counter("messages_sent", "Messages sent.")
    copied_bytes = counter("copied_bytes", "Payload bytes copied on the way out.")

    def __init__(self, context: zmq.Context, request_sender: SocketLike,
                 worker_connect_delay: float | None = None, *,
                 shared_memory: SharedMemory | bool | None = None) -> None:
        self.context = context
        self.request_sender = request_sender
        self.worker_connect_delay = worker_connect_delay
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._peers = 0
        self._task_ids = itertools.count((random.getrandbits(32) << 32) + 1)
        self._pending: list[zmq.MessageTracker] = []  # zero-copy sends not known to be done
        self._prune_at = _PRUNE_MIN
        self._counters = Counters()
        self.shared_memory, self._own_shm = node_shared_memory(shared_memory)

    def Setup(self) -> None:
        """Initialize the ventilator: create (or adopt) its socket, then wait
        ``worker_connect_delay`` seconds if that is set."""
        assert self.request_sender is not None, "a ventilator needs a request_sender"
        if self._own_shm and self.shared_memory is not None and self.shared_memory.closed:
            self.shared_memory = SharedMemory()
        socket = InitSocket(self.context, self.request_sender, zmq.PUSH)
        # A monitor address of our own: pyzmq's default one is named after
        # the socket's fd and stays bound for a moment after a previous
        # monitor of the same socket was disabled ("Address already in use").
        address = "inproc://zmq_cluster.ventilator-monitor.%s" % uuid.uuid4().hex
        socket.monitor(address, _PEER_EVENTS)
        monitor = socket.context.socket(zmq.PAIR)
        try:
            monitor.connect(address)
        except BaseException:
            monitor.close(linger=0)
            socket.disable_monitor()
            close_owned(socket, self.request_sender)
            raise
        self._socket, self._monitor = socket, monitor
        self._peers = 0
        if self.worker_connect_delay:
            time.sleep(self.worker_connect_delay)

    def Shutdown(self) -> None:
        """Shutdown the ventilator: close its socket (if it created it),
        letting queued requests go out first."""
        if self._monitor is not None and self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        close_owned(self._socket, self.request_sender, linger=None)
        self._socket = self._monitor = None
        if self._own_shm and self.shared_memory is not None:
            self.shared_memory.close()  # (kept, for its counters; Setup makes a new one)

    def __enter__(self: _V) -> _V:
        self.Setup()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.Shutdown()

    def WaitForWorkers(self, count: int, timeout: float | None = None) -> int:
        """Wait until at least ``count`` peers (workers, or a streamer device)
        have completed the ZeroMQ handshake with this ventilator's socket.

        A handshake-based alternative to ``worker_connect_delay``: requests
        sent afterwards are dealt round-robin over all of them. Calls
        :meth:`Setup` first if needed. Returns the number of connected peers;
        raises ReceiverTimeoutException if fewer than ``count`` connect within
        ``timeout`` ms (None waits for ever).
        """
        if self._monitor is None:
            self.Setup()
        monitor = self._monitor
        assert monitor is not None
        deadline = None if timeout is None else time.monotonic() + timeout / 1000.0
        while True:
            # Drain every queued event before judging the count, so that a
            # disconnect already reported is never missed.
            while monitor.poll(0):
                self._count_event(recv_monitor_message(monitor)["event"])
            if self._peers >= count:
                return self._peers
            wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not monitor.poll(wait):
                raise ReceiverTimeoutException("%d of %d workers connected within %s ms"
                                               % (self._peers, count, timeout))

    def _count_event(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._peers += 1
        elif event == zmq.EVENT_DISCONNECTED:
            self._peers = max(0, self._peers - 1)

    def Send(self, requests: Iterable[Any]) -> int:
        """Send a set of task requests to the worker nodes.

        Each item is sent as it is (a ClusterRequest, or any payload, which a
        worker then receives bare). Calls :meth:`Setup` first if needed. An
        item the wire format cannot carry raises TypeError, with the items
        before it sent.

        :param iterable requests: Task requests to send.
        :returns: The number of sent tasks.
        :rtype: int
        """
        if self._socket is None:
            self.Setup()
        assert self._socket is not None
        return send_requests(self._socket, requests, self._task_ids, self._track,
                             self._counters, shm=self.shared_memory)

    def _track(self, tracker: zmq.MessageTracker) -> None:
        """Keep the tracker of a message sent with zero-copy frames."""
        pending = self._pending
        pending.append(tracker)
        if len(pending) >= self._prune_at:
            # Amortized: prune when the list has doubled since the last time.
            pending[:] = [t for t in pending if not t.done]
            self._prune_at = max(_PRUNE_MIN, 2 * len(pending))

    def WaitSent(self, timeout: float | None = None) -> int:
        """Wait until libzmq has released every array sent zero-copy so far.

        After it returns, the arrays passed to :meth:`Send` may be changed
        (see the class's "Array lifetime"). Raises ReceiverTimeoutException
        if that takes longer than ``timeout`` ms (None waits for ever); a
        message that no peer takes is never released.

        :returns: The number of messages that were still pending when called.
        """
        pending = self._pending
        count = len(pending)
        deadline = None if timeout is None else time.monotonic() + timeout / 1000.0
        while pending:
            tracker = pending[-1]
            if not tracker.done:
                wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    tracker.wait(wait)
                except zmq.NotDone:
                    raise ReceiverTimeoutException(
                        "%d zero-copy messages not sent within %s ms"
                        % (sum(not t.done for t in pending), timeout)) from None
            pending.pop()
        self._prune_at = _PRUNE_MIN
        return count


class Ventilator(BasicVentilator):
    """A ventilator for task requests on the cluster: wraps each callback
    argument in a ClusterRequest."""

    def Send(self, requests: Iterable[Any], metadata: Iterable[Any] | None = None) -> int:
        """Send requests to worker nodes.

        :param iterable requests: Callback arguments.
        :param iterable metadata: Metadata objects corresponding to the
           requests, one per request; ValueError if the two differ in length
           (raised when the shorter one runs out, after the requests before
           it were sent).
        :returns: The number of sent tasks.
        """
        if self._socket is None:
            self.Setup()
        assert self._socket is not None
        if metadata is None:
            pairs: Iterable[tuple[Any, Any]] = zip(requests, itertools.repeat(None))
        else:
            pairs = zip(requests, metadata, strict=True)
        # Each pair is sent as the ClusterRequest(payload, metadata) it
        # stands for, without making the object.
        return send_requests(self._socket, pairs, self._task_ids, self._track, self._counters,
                             pairs=True, shm=self.shared_memory)
