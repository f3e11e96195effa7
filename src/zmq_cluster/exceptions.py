"""Exceptions raised by zmq_cluster (shared by the pure and compiled twins)."""


class ReceiverTimeoutException(Exception):
    """Indicates that a ZMQ recv() command timed out."""


class WorkerException(Exception):
    """Indicates that a worker node reported an exception while processing a
    request.

    ``worker_exception`` is the exception object thrown in the worker process
    (rebuilt on this side from the result message).
    """

    #: The exception object thrown in the worker process.
    worker_exception = None

    def __init__(self, message=None, worker_exception=None):
        if message is None and worker_exception is not None:
            message = "worker raised %r" % (worker_exception,)
        super().__init__(message)
        self.worker_exception = worker_exception


class MessageFormatError(ValueError):
    """A message does not follow the wire format (docs/protocol.md).

    Raised for an unknown magic or version, a truncated or inconsistent
    header, a frame whose size does not match its header, or pickled content
    where pickle is not allowed. The text says what was wrong and where.
    """


class RemoteError(Exception):
    """Stands in for a worker's exception that could not be pickled.

    Its text is the original exception's ``repr`` and the worker-side
    traceback.
    """
