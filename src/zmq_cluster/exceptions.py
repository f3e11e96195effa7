"""Exceptions raised by zmq_cluster (shared by the pure and compiled twins).

A worker's exception travels natively (docs/protocol.md, "Exceptions"): its
type's module and qualified name, its args, its message and its traceback
text. A receiver that trusts the sender rebuilds the original type, with
the remote traceback as ``__cause__`` (a :class:`RemoteTraceback`) and as
the attribute ``remote_traceback``; otherwise, or when the type cannot be
rebuilt, it gets a :class:`RemoteError` holding the three fields.
"""

from typing import Optional, Tuple, Type


class ReceiverTimeoutException(Exception):
    """Indicates that a ZMQ recv() command timed out."""


class MessageFormatError(ValueError):
    """A message does not follow the wire format (docs/protocol.md).

    Raised for an unknown magic or version, a truncated or inconsistent
    header, a frame whose size does not match its header, a value beyond
    the format's limits, or pickled content where pickle is not allowed.
    The text says what was wrong and where.
    """


class EncodeError(TypeError):
    """``encode`` cannot turn a value into a message every receiver accepts.

    Raised for an object that has no native encoding and that pickle cannot
    handle, values nested deeper than ``MAX_DEPTH`` levels, a length or
    count beyond the format's u32 fields, or a COMMAND body that would need
    pickle (docs/protocol.md, "Limits"). Nothing is sent; the text names the
    reason. It is a TypeError, which is what encoding raised before it
    existed.
    """


class HandshakeRefused(ConnectionError):
    """The scheduler refused this connection at the security handshake, for
    good: waiting longer would not help.

    Raised by :class:`~zmq_cluster.client.SchedulerClient` (so by
    ``ClusterPool(...)`` and ``LocalCluster`` clients, and turned into a
    one-line error by the command line) as soon as libzmq reports that
    the ZMTP handshake failed in a way it does not retry
    (``reason``):

    * ``"auth"``: the scheduler's authenticator (ZAP) did not admit this
      side's CURVE public key (``ZMQ_EVENT_HANDSHAKE_FAILED_AUTH``: the
      scheduler said so in a ZMTP ERROR command);
    * ``"protocol"``: the two sides' security differs, such as a client
      with CURVE keys and a scheduler without them, or the reverse
      (``ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL``).

    libzmq does not reconnect after either (the connection's session ends),
    so nothing could arrive later. ``address`` is the scheduler's address;
    the message says what to check. A :class:`ConnectionError`: code that
    catches ``OSError``/``ConnectionError`` for a failed connection catches
    it; code that retries on ``TimeoutError`` does not.
    """

    def __init__(self, message: str, reason: str = "auth", address: str = "") -> None:
        super().__init__(message)
        #: ``"auth"`` or ``"protocol"`` (see above).
        self.reason = reason
        #: The scheduler's address.
        self.address = address

    def __reduce__(self) -> Tuple[Type["HandshakeRefused"], Tuple[str, str, str]]:
        return type(self), (str(self), self.reason, self.address)


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in another process.

    Set as the ``__cause__`` of a rebuilt remote exception (and of a
    :class:`RemoteError`), so that printing the exception shows where it
    was raised, as ``multiprocessing.pool.RemoteTraceback`` does. Its str is
    the traceback text.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        #: The remote traceback text.
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _type_name(module: str, qualname: str) -> str:
    return "%s.%s" % (module, qualname) if module else qualname


class RemoteError(Exception):
    """An exception raised by a peer, as its three wire fields.

    A receiver gets one instead of the original exception when it does not
    trust the sender (``allow_pickle = False``) or cannot rebuild the type
    (its module does not import here, its constructor refuses the args...).

    ``type_name`` is ``"module.qualname"`` of the original type (e.g.
    ``"builtins.ValueError"``), ``message`` its ``str()`` and
    ``remote_traceback`` the traceback text formatted where it was raised
    (``""`` when unknown). When that text is not empty it is also the
    ``__cause__`` (a :class:`RemoteTraceback`). Encoding a RemoteError
    again (relaying it) sends these three fields, not a RemoteError.
    """

    def __init__(self, type_name: str, message: str = "", remote_traceback: str = "") -> None:
        super().__init__(type_name, message, remote_traceback)
        #: ``"module.qualname"`` of the original exception's type.
        self.type_name = type_name
        #: ``str()`` of the original exception.
        self.message = message
        #: The traceback text formatted where the exception was raised.
        self.remote_traceback = remote_traceback
        if remote_traceback:
            self.__cause__ = RemoteTraceback(remote_traceback)

    def __str__(self) -> str:
        if self.message:
            return "%s: %s" % (self.type_name, self.message)
        return str(self.type_name)


class WorkerException(Exception):
    """Indicates that a worker node reported an exception while processing a
    request.

    ``worker_exception`` is the exception object thrown in the worker process
    (rebuilt on this side from the result message; a :class:`RemoteError`
    when it could not be). ``type_name``, ``message`` and
    ``remote_traceback`` describe it whatever its form: for a RemoteError
    its fields; otherwise ``"module.qualname"`` of its type, its ``str()``
    and its ``remote_traceback`` attribute (``""`` when it has none). With
    no ``worker_exception`` they are None, but ``message``, which is then
    the ``message`` given. The worker exception is also this exception's
    ``__cause__``, so a printed traceback shows the remote one.
    """

    #: The exception object thrown in the worker process.
    worker_exception: Optional[BaseException] = None
    #: ``"module.qualname"`` of the worker exception's type.
    type_name: Optional[str] = None
    #: ``str()`` of the worker exception.
    message: Optional[str] = None
    #: The traceback text formatted in the worker.
    remote_traceback: Optional[str] = None

    def __init__(self, message: Optional[str] = None,
                 worker_exception: Optional[BaseException] = None) -> None:
        self.worker_exception = worker_exception
        self.message = message
        if worker_exception is not None:
            if isinstance(worker_exception, RemoteError):
                self.type_name = worker_exception.type_name
                self.message = worker_exception.message
                self.remote_traceback = worker_exception.remote_traceback
            else:
                cls = type(worker_exception)
                self.type_name = _type_name(getattr(cls, "__module__", ""), cls.__qualname__)
                self.message = _safe_str(worker_exception)
                tb = getattr(worker_exception, "remote_traceback", "")
                self.remote_traceback = tb if type(tb) is str else ""
            self.__cause__ = worker_exception
            if message is None:
                message = "worker raised %s" % self.type_name
                if self.message:
                    message += ": " + self.message
        super().__init__(message)

    def __reduce__(self) -> Tuple[Type["WorkerException"],
                                  Tuple[Optional[str], Optional[BaseException]]]:
        return type(self), (self.args[0] if self.args else None, self.worker_exception)


def _safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when its ``__str__`` fails."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"
