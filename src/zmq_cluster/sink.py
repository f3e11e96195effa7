"""Sinks: collect results from worker nodes."""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

import zmq

from ._wire_common import RESULT, counter, is_command, timeout_ms
from .commands import send_command
from .exceptions import MessageFormatError, WorkerException
from .messages import ClusterResult
from .sharedmem import SharedMemory, node_shared_memory
from .sockets import InitSocket, SocketLike, close_owned
from .wire import Counters, receive_results

__all__ = ["BasicSink", "Sink"]

log = logging.getLogger("zmq_cluster")

_S = TypeVar("_S", bound="BasicSink")


class BasicSink:
    """Collect results from worker nodes on the cluster.

    ``result_receiver`` is made a PULL socket, ``command_receiver`` (if any) a
    SUB socket subscribed to everything. ``receiver_timeout`` (ms) is the
    default wait per result for :meth:`Receive`; None waits for ever.

    A BasicSink is a pipe for any object: :meth:`Receive` yields the body of
    every well-formed message on its channel as it was sent, whatever its
    kind (the kind says how to decode a message, not whether the receiver
    may see it): a worker's ClusterResult records, a Ventilator's
    ClusterRequests, or whatever a BasicVentilator sent.

    A message that breaks the wire format is logged (logger
    ``zmq_cluster``) and counted in ``malformed_messages``. If its fixed
    header was readable it is still one result for the caller: Receive
    yields ``ClusterResult("FAIL", exception=<the MessageFormatError>)``
    with the message's ``task_id``, so that nothing waits for it for ever;
    otherwise (not a zmq_cluster message at all) it is dropped. The sink
    keeps serving. A kill command (a str equal to :attr:`CMD_KILL`) on the
    command channel ends Receive; other commands are ignored.

    ``allow_pickle`` (default True) can be set False to refuse pickled values
    from peers that are not trusted; ``array_alignment`` (default None: each
    dtype's own alignment) can be set to e.g. 64 to get every array at that
    alignment, copying those that the transport did not place there.

    ``shared_memory`` (opt-in, same host only): True, or a
    :class:`~zmq_cluster.sharedmem.SharedMemory`, receives
    arrays by shared memory (docs/protocol.md, "Arrays"): an array of at
    least ``min_bytes`` (1 MiB) is copied once into a memfd slot and the
    message names it; a received one is a writeable, 64-byte-aligned view
    of the sender's slot (no copy), released when dropped. Without it, a
    message holding such a reference is refused (logged, counted in
    ``malformed_messages``, and yielded as a FAIL result). True makes one that the node closes
    in Shutdown.

    Counters: ``messages_received`` (every message, commands and malformed
    ones included), ``copied_bytes`` (payload bytes copied on the way in:
    arrays below ``COPY_THRESHOLD``; larger arrays are views on the
    received frames) and ``malformed_messages``.
    """

    #: Send this to the command socket to shut down the sink.
    CMD_KILL: ClassVar[str] = "CLUSTER_SINK_KILL"

    #: (socket-like, required) Constructor for the reader socket.
    result_receiver: SocketLike | None = None
    #: (socket-like, optional) Constructor for the command socket.
    command_receiver: SocketLike | None = None

    allow_pickle: bool = True
    array_alignment: int | None = None

    messages_received = counter("messages_received", "Messages received (all channels).")
    copied_bytes = counter("copied_bytes", "Payload bytes copied on the way in.")

    def __init__(self, context: zmq.Context, result_receiver: SocketLike,
                 command_receiver: SocketLike | None = None,
                 receiver_timeout: float | None = None, *,
                 shared_memory: SharedMemory | bool | None = None) -> None:
        self.context = context
        self.result_receiver = result_receiver
        self.command_receiver = command_receiver
        self.receiver_timeout = receiver_timeout
        self.malformed_messages = 0
        self._counters = Counters()
        self.shared_memory, self._own_shm = node_shared_memory(shared_memory)
        self._results: zmq.Socket | None = None
        self._commands: zmq.Socket | None = None

    def Setup(self) -> None:
        """Initialize the sink: create (or adopt) and connect its sockets."""
        assert self.result_receiver is not None, "a sink needs a result_receiver"
        if self._own_shm and self.shared_memory is not None and self.shared_memory.closed:
            self.shared_memory = SharedMemory()
        self._results = InitSocket(self.context, self.result_receiver, zmq.PULL)
        if self.command_receiver is not None:
            self._commands = InitSocket(self.context, self.command_receiver, zmq.SUB,
                                        options={zmq.SUBSCRIBE: b""})

    def Shutdown(self) -> None:
        """Shutdown the sink: close the sockets it created."""
        close_owned(self._results, self.result_receiver)
        close_owned(self._commands, self.command_receiver)
        self._results = self._commands = None
        if self._own_shm and self.shared_memory is not None:
            self.shared_memory.close()  # (kept, for its counters; Setup makes a new one)

    def __enter__(self: _S) -> _S:
        self.Setup()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.Shutdown()

    def Receive(self, num_results: int | None = None,
                timeout: float | None = None) -> Iterator[Any]:
        """Get an iterator over the set of result objects.

        Results will be available on the iterator as they arrive at the
        sink. The iterator ends after ``num_results`` results (if given) or
        when a kill command arrives on the command socket. It raises a
        ReceiverTimeoutException if no result arrives within ``timeout`` ms
        (default: ``receiver_timeout``; None waits for ever). Calls
        :meth:`Setup` first if it was not called.

        :param int num_results: Return after a fixed number of results have
           arrived.
        :param int timeout: Time to wait for each result (in milliseconds).
        :rtype: iterator
        """
        return self._receive(num_results, timeout)

    def _receive(self, num_results: int | None, timeout: float | None,
                 unwrap: Any = None, metadata: bool = False) -> Iterator[Any]:
        if self._results is None:
            self.Setup()
        assert self._results is not None
        return receive_results(
            self._results, self._commands, num_results,
            timeout_ms(self.receiver_timeout if timeout is None else timeout),
            self._on_command, self._on_malformed, self.allow_pickle, self.array_alignment,
            self._counters, unwrap=unwrap, metadata=metadata, shm=self.shared_memory)

    # The callables receive_results is given (zmq_cluster._wire_common
    # states their contract).

    def _on_command(self, kind: int, command: Any) -> bool:
        return is_command(command, self.CMD_KILL)

    def _on_malformed(self, channel: str, exc: MessageFormatError) -> ClusterResult | None:
        self.malformed_messages += 1
        log.warning("sink rejected a malformed %s: %s", channel, exc)
        header = getattr(exc, "header", None)
        if channel != RESULT or header is None:
            return None
        result = ClusterResult(ClusterResult.STATUS_FAIL, exception=exc)
        result.task_id = header[1] or None
        return result

    @staticmethod
    def SendKillCommand(context: zmq.Context, command_sender: SocketLike,
                        num_subscribers: int = 1, timeout: float | None = None) -> int | None:
        """Send the quit command to the sink.

        A running :meth:`Receive` on a sink subscribed to this channel ends.
        The command is sent once a subscriber is known to be connected (see
        :func:`zmq_cluster.commands.send_command` for ``num_subscribers`` and
        ``timeout``), not after a fixed sleep.

        :param command_sender: (socket-like) Channel on which to send the
           command.
        """
        return send_command(context, command_sender, BasicSink.CMD_KILL, num_subscribers,
                            timeout)


class Sink(BasicSink):
    """A sink for task results on the cluster: unwraps ClusterResult records.

    The result rule (docs/protocol.md, "Results a sink cannot use"): a
    ClusterResult whose status is the str ``"OK"`` yields its payload; one
    whose status is ``"FAIL"`` raises WorkerException with the worker's
    exception. Anything else (a body that is not a ClusterResult, a status
    that is another value or not a str at all) is counted in
    ``malformed_messages``, logged, and raised as a WorkerException whose
    ``worker_exception`` is a MessageFormatError naming the problem. Each of
    these counts as one of ``num_results``; after a WorkerException, the
    results that follow can be read with another call to Receive.
    """

    def Receive(self, num_results: int | None = None, timeout: float | None = None,
                metadata: bool = False) -> Iterator[Any]:
        """Get an iterator over the set of results sent to this sink.

        Yields each result's payload, or with ``metadata=True`` a tuple
        ``(payload, request_metadata, result_metadata)``. A result whose
        status is FAIL raises WorkerException, whose ``worker_exception`` is
        the exception raised in the worker; so does a result the sink cannot
        use (see the class). Results after it can still be read with another
        call to Receive.

        :param int num_results: Return after a fixed number of results have
           arrived.
        :param int timeout: Time to wait for each result (in milliseconds).
        :param bool metadata: Whether to return (request and result) metadata
           with each result.
        """
        # The loop yields the payload of an OK result itself, and gives every
        # other result to _unwrap.
        return self._receive(num_results, timeout,
                             self._unwrap_with_metadata if metadata else self._unwrap,
                             metadata)

    def _unwrap(self, result: Any) -> Any:
        return self._unwrap_with_metadata(result)[0]

    def _unwrap_with_metadata(self, result: Any) -> tuple[Any, Any, Any]:
        """The result rule (see the class) for one result."""
        if type(result) is ClusterResult:
            status = result.status
            if type(status) is str:
                if status == "OK":
                    return result.payload, result.request_metadata, result.metadata
                if status == "FAIL":
                    raise WorkerException(worker_exception=result.exception)
            problem = "its status %s is neither 'OK' nor 'FAIL'" % _describe(status)
        else:
            problem = "it is %s, not a ClusterResult" % _describe(result)
        raise self._unusable(result, problem)

    def _unusable(self, result: Any, problem: str) -> WorkerException:
        task_id = getattr(result, "task_id", None)
        if type(task_id) is not int:
            task_id = None
        error = MessageFormatError("result%s cannot be used: %s" % (
            "" if task_id is None else " of task %d" % task_id, problem))
        self.malformed_messages += 1
        log.warning("sink: %s", error)
        return WorkerException(worker_exception=error)


def _describe(obj: object) -> str:
    """A short, safe description of a value a peer sent: its type and a
    bounded repr."""
    try:
        text = reprlib.repr(obj)
    except Exception:
        text = "?"
    return "%s %s" % (type(obj).__name__, text)
