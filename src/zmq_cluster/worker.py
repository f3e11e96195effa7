"""Workers: receive task requests, run them, send results."""

from __future__ import annotations

import logging
import os
import socket as _socket
import traceback
from typing import Any, ClassVar, TypeVar

import zmq

from . import framing
from ._wire_common import counter, is_command, timeout_ms
from .commands import send_command
from .exceptions import EncodeError, MessageFormatError, RemoteError
from .messages import ClusterResult
from .protocol import KIND_RESULT
from .sharedmem import SharedMemory, node_shared_memory
from .sockets import InitSocket, SocketLike, close_owned
from .wire import Counters, run_worker

__all__ = ["BasicWorker"]

log = logging.getLogger("zmq_cluster")

#: How long a stopping worker waits for its queued results to leave (ms).
RESULT_LINGER_MS = 5000

_W = TypeVar("_W", bound="BasicWorker")


class BasicWorker:
    """A cluster worker.

    ``request_receiver`` is made a PULL socket, ``result_sender`` a PUSH
    socket and ``command_receiver`` (if any) a SUB socket subscribed to
    everything. :meth:`Run` serves requests until :meth:`HandleCommand`
    returns True; with ``receiver_timeout`` (ms) set, it raises
    ReceiverTimeoutException when neither a request nor a command arrives in
    that time. A worker is a context manager (Setup on entry, Shutdown on
    exit), as the ventilator and the sink are.

    Every well-formed message on the request channel is a request, whatever
    its kind: a ClusterRequest's payload, or any other object as it is, goes
    to :meth:`HandleRequest`, and the worker sends one ClusterResult back:
    status OK and the handler's return value, or status FAIL and the
    exception it raised. The result carries the request's metadata
    (``request_metadata``), the request's task id, and ``metadata =
    {"host", "pid", "seconds"}``: the node that ran it and the seconds the
    handler took. An output the wire format cannot carry (see
    docs/protocol.md, "Limits") is found before anything is sent and
    becomes a FAIL result whose exception is the EncodeError naming the
    reason; that fallback keeps only what encodes, so it always goes out.

    A message that breaks the wire format is logged (logger
    ``zmq_cluster``) and counted in ``malformed_messages``; if its header
    was readable, a FAIL result with the MessageFormatError is sent for its
    task id, so that nothing waits for it for ever. The worker keeps
    serving. Commands are native values, never pickled; only a str equal to
    :attr:`CMD_KILL` (or its UTF-8 bytes) stops the default worker.

    ``allow_pickle`` (default True) can be set False to refuse pickled
    values from peers that are not trusted; ``array_alignment`` is as for
    BasicSink.

    ``shared_memory`` (opt-in, same host only): True, or a
    :class:`~zmq_cluster.sharedmem.SharedMemory`, receives requests' and sends results'
    arrays by shared memory (docs/protocol.md, "Arrays"): an array of at
    least ``min_bytes`` (1 MiB) is copied once into a memfd slot and the
    message names it; a received one is a writeable, 64-byte-aligned view
    of the sender's slot (no copy), released when dropped. Without it, a
    message holding such a reference is refused (logged, counted in
    ``malformed_messages``, and answered with a FAIL result). True makes one that the node closes
    in Shutdown.

    Counters: ``messages_received`` and ``messages_sent`` (every message,
    commands and malformed ones included), ``copied_bytes`` (payload bytes
    copied on the way in and out: arrays below ``COPY_THRESHOLD``; larger
    arrays travel zero-copy both ways), ``malformed_messages``,
    ``requests_handled``.
    """

    #: Send this to the command socket to shut down the worker.
    CMD_KILL: ClassVar[str] = "CLUSTER_WORKER_KILL"

    allow_pickle: bool = True
    array_alignment: int | None = None

    messages_received = counter("messages_received", "Messages received (all channels).")
    messages_sent = counter("messages_sent", "Messages sent.")
    copied_bytes = counter("copied_bytes", "Payload bytes copied on the way in and out.")
    requests_handled = counter("requests_handled", "Requests given to HandleRequest.")

    def __init__(self, context: zmq.Context, request_receiver: SocketLike,
                 result_sender: SocketLike, command_receiver: SocketLike | None = None,
                 receiver_timeout: float | None = None, *,
                 shared_memory: SharedMemory | bool | None = None) -> None:
        self.context = context
        self.request_receiver = request_receiver
        self.result_sender = result_sender
        self.command_receiver = command_receiver
        self.receiver_timeout = receiver_timeout
        self.malformed_messages = 0
        self._counters = Counters()
        self.shared_memory, self._own_shm = node_shared_memory(shared_memory)
        self._requests: zmq.Socket | None = None
        self._results: zmq.Socket | None = None
        self._commands: zmq.Socket | None = None
        self._identity = {"host": _socket.gethostname(), "pid": os.getpid()}

    def Setup(self) -> None:
        """Initialize the worker: create (or adopt) and connect its sockets."""
        if self._own_shm and self.shared_memory is not None and self.shared_memory.closed:
            self.shared_memory = SharedMemory()
        self._requests = InitSocket(self.context, self.request_receiver, zmq.PULL)
        self._results = InitSocket(self.context, self.result_sender, zmq.PUSH)
        if self.command_receiver is not None:
            self._commands = InitSocket(self.context, self.command_receiver, zmq.SUB,
                                        options={zmq.SUBSCRIBE: b""})

    def Shutdown(self) -> None:
        """Close the sockets the worker created (Run does this when it ends)."""
        close_owned(self._requests, self.request_receiver)
        # Results already queued still go out: linger a little.
        close_owned(self._results, self.result_sender, linger=RESULT_LINGER_MS)
        close_owned(self._commands, self.command_receiver)
        self._requests = self._results = self._commands = None
        if self._own_shm and self.shared_memory is not None:
            self.shared_memory.close()  # (kept, for its counters; Setup makes a new one)

    def __enter__(self: _W) -> _W:
        self.Setup()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.Shutdown()

    def Run(self) -> None:
        """Handle incoming requests, and watch for quit commands.

        Calls :meth:`Setup` first if it was not called, and closes the
        worker's sockets when it returns or raises.
        """
        if self._requests is None:
            self.Setup()
        assert self._requests is not None and self._results is not None
        try:
            run_worker(self._requests, self._results, self._commands,
                       handle_task=self.HandleRequest, result_metadata=self._identity,
                       on_command=self._on_command, on_malformed=self._on_malformed,
                       on_unsendable=self._on_unsendable,
                       timeout_ms=timeout_ms(self.receiver_timeout),
                       allow_pickle=self.allow_pickle, alignment=self.array_alignment,
                       stats=self._counters, shm=self.shared_memory)
        finally:
            self.Shutdown()

    # The callables run_worker is given (zmq_cluster._wire_common states
    # their contract): in its task mode, the loop itself unwraps each
    # request, times HandleRequest and sends the ClusterResult that
    # BasicWorker's docstring describes.

    def _on_command(self, kind: int, command: Any) -> bool:
        return bool(self.HandleCommand(command))

    def _on_malformed(self, channel: str, exc: MessageFormatError) -> ClusterResult | None:
        self.malformed_messages += 1
        log.warning("worker %s rejected a malformed %s: %s", self._identity, channel, exc)
        if channel == "request" and getattr(exc, "header", None) is not None:
            return ClusterResult(ClusterResult.STATUS_FAIL, None, None,
                                 dict(self._identity, seconds=0.0), exc)
        return None

    def _on_unsendable(self, result: Any, exc: Exception) -> ClusterResult:
        """The FAIL result to send instead of ``result``, which could not be
        encoded (``exc``, an EncodeError). Its exception is that EncodeError,
        and it always encodes: the request metadata is kept only when it
        encodes on its own, and the exception is replaced by one of plain
        strs when it does not encode either."""
        request_metadata = getattr(result, "request_metadata", None)
        notes = []
        if request_metadata is not None and not _encodes(request_metadata):
            notes.append("the request metadata (%s) could not be sent either, and was dropped"
                         % type(request_metadata).__name__)
            request_metadata = None
        failed = getattr(result, "exception", None)
        if isinstance(failed, BaseException):
            notes.insert(0, "it was raised by the handler: %s: %s"
                         % (_type_name(failed), _safe_str(failed)))
        error: BaseException = exc
        if notes:
            error = EncodeError("%s; %s" % (_safe_str(exc), "; ".join(notes)))
            error.__cause__ = exc
        if not _encodes(error):
            error = RemoteError(_type_name(exc), _safe_str(error), _format(exc))
        log.warning("worker %s: a result could not be sent back: %s", self._identity, error)
        metadata = getattr(result, "metadata", None)
        seconds = metadata.get("seconds") if type(metadata) is dict else None
        return ClusterResult(
            ClusterResult.STATUS_FAIL, None, request_metadata,
            dict(self._identity, seconds=seconds if type(seconds) is float else 0.0), error)

    def HandleRequest(self, request: Any) -> Any:
        """Event handler for an incoming task request.

        Receives the request's payload (the ClusterRequest's ``payload``, or
        the object itself when a BasicVentilator sent a bare object) and
        returns the output to send back. Override it; this default returns
        the payload unchanged. An exception it raises is sent back as a FAIL
        result.
        """
        return request

    def HandleCommand(self, command: Any) -> bool:
        """Event handler for an incoming command.

        Returns True to stop the worker. The default stops on
        :attr:`CMD_KILL` (a str, or its UTF-8 bytes) and ignores every other
        command, of whatever type.
        """
        return is_command(command, self.CMD_KILL)

    @staticmethod
    def SendKillCommand(context: zmq.Context, command_sender: SocketLike,
                        command: Any = None, num_subscribers: int = 1,
                        timeout: float | None = None) -> int | None:
        """Send a kill command to all workers on a given channel.

        The command is sent once a subscriber is known to be connected (see
        :func:`zmq_cluster.commands.send_command` for ``num_subscribers`` and
        ``timeout``), not after a fixed sleep.

        :param command_sender: (socket-like) The channel on which to send the
           command.
        :param command: Message to send to workers. Defaults to CMD_KILL.
        """
        if command is None:
            command = BasicWorker.CMD_KILL
        return send_command(context, command_sender, command, num_subscribers, timeout)


def _encodes(obj: object) -> bool:
    """Whether ``obj`` can travel in a result (the failure path's check)."""
    try:
        framing.encode(obj, KIND_RESULT)
    except Exception:  # whatever stops encoding
        return False
    return True


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def _format(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return ""


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        return "<%s whose str() failed>" % type(obj).__name__
