"""The request and result records that travel between cluster nodes."""

from __future__ import annotations

from typing import Any, ClassVar


class ClusterRequest:
    """A cluster request, corresponding to the input value of a callback.

    ``task_id`` is not part of the constructor: the ventilator assigns it when
    it sends the request (it travels in the message header), and the worker
    copies it to the result, so a sink can tell which request a result
    answers.
    """

    __slots__ = ("payload", "metadata", "task_id")

    payload: Any
    metadata: Any
    task_id: int | None

    def __init__(self, payload: Any = None, metadata: Any = None) -> None:
        #: Input values for the task.
        self.payload = payload
        #: Optional information associated with the request. This information
        #: is copied to the result object.
        self.metadata = metadata
        #: Identity given by the sender (an int), or None before sending.
        self.task_id = None

    def __repr__(self) -> str:
        return "ClusterRequest(payload=%r, metadata=%r)" % (self.payload, self.metadata)


class ClusterResult:
    """A cluster result, corresponding to the output value of a callback when
    applied to one input element.

    A worker fills ``metadata`` with ``{"host": ..., "pid": ...,
    "seconds": ...}``: the node that ran the request and how long the handler
    took. ``task_id`` is the id of the request this result answers.
    """

    #: Indicates that the request was processed successfully.
    STATUS_SUCCESS: ClassVar[str] = "OK"
    #: Indicates that error occurred while processing request.
    STATUS_FAIL: ClassVar[str] = "FAIL"

    __slots__ = ("status", "payload", "request_metadata", "metadata", "exception", "task_id")

    status: Any
    payload: Any
    request_metadata: Any
    metadata: Any
    exception: Any
    task_id: int | None

    def __init__(self, status: Any = None, payload: Any = None, request_metadata: Any = None,
                 metadata: Any = None, exception: Any = None) -> None:
        #: Whether the input elements were processed successfully.
        self.status = status
        #: Output corresponding to task's input elements.
        self.payload = payload
        #: Optional information that was associated with request.
        self.request_metadata = request_metadata
        #: Optional information associated with result.
        self.metadata = metadata
        #: The exception that occurred during processing, if any.
        self.exception = exception
        #: Id of the request this result answers, or None.
        self.task_id = None

    def __repr__(self) -> str:
        return ("ClusterResult(status=%r, payload=%r, request_metadata=%r, metadata=%r, "
                "exception=%r)" % (self.status, self.payload, self.request_metadata,
                                   self.metadata, self.exception))

