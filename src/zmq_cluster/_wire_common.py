"""What both wire twins share: the contract, constants, sentinels and helpers.

The wire layer is the only place that turns frames into zmq calls. It has
two twins with the same functions, the same behaviour and the same bytes on
the wire: ``zmq_cluster._wire_py`` (pure Python, on the pure framing twin)
and ``zmq_cluster._fastpath.wire`` (Cython, on the compiled framing twin,
waiting and receiving without the GIL); ``zmq_cluster.wire`` selects one.
Both import this module; neither imports the other.

Primitives
----------

``send_message(socket, obj, kind, task_id=0, flags=0, stats=None, *, envelope=())
-> zmq.MessageTracker | None``
    Encode ``obj`` as one message of ``kind`` and send it, after the
    ``envelope`` frames (e.g. a ROUTER peer's identity), which are sent as
    they are. The header and buffer frames below ``COPY_THRESHOLD`` bytes are
    copied into libzmq; larger buffer frames go zero-copy, each tracked.
    Returns one tracker over every zero-copy frame (done once libzmq has
    released them all), or None when nothing went zero-copy. Encoding
    happens before anything is sent: an object the format cannot carry
    raises ``TypeError`` (the codec's ``EncodeError``) and sends nothing.

``recv_message(socket, flags=0, allow_pickle=True, alignment=None, stats=None)
-> (kind, task_id, obj)``
    Receive one whole message and decode it. A message that breaks the
    format raises ``MessageFormatError`` with ``exc.header`` set to
    ``(kind, task_id)`` when the fixed header was readable (else None); the
    message is consumed either way.

``recv_any(sockets, timeout_ms=-1, first=0, stats=None, drained=None)
-> (index, frames) | None``
    Wait until any of ``sockets`` has a message and receive it whole,
    without decoding: ``index`` is the socket's position in ``sockets``,
    ``frames`` a list whose first item is ``bytes`` and whose other items
    are ``zmq.Frame`` (the received memory, not a copy). Sockets from
    ``first`` on are tried in order before any waiting, the others next when
    it must wait; it then waits on the sockets' ``ZMQ_FD`` descriptors
    (poll(2)) and tries those that woke it, lowest index first. None when
    nothing arrives within ``timeout_ms`` (-1: wait for ever; 0: do not
    wait). The compiled twin waits and receives without the GIL.

    ``drained``: None, or a ``bytearray`` of at least ``len(sockets)``
    entries that the caller keeps from call to call. A try that finds no
    message costs two system calls (libzmq runs the socket's commands:
    poll(2) and getpid(2)); it is needed only for a socket that may hold a
    message its descriptor has not announced. Entry ``i`` non-zero says
    socket ``i`` does not: it was last tried and found empty, and nothing
    else has used it since; such a socket is not tried before the wait
    (it is still waited on). ``recv_any`` sets the entry of each socket it
    tries and finds empty, and clears the one of the socket it returns a
    message from. The caller clears an entry whenever anything else uses
    that socket (a send may run its commands, and so swallow the
    announcement of a message; so may another receive), and all of them
    when the list changes.

``decode_message(frames, allow_pickle=True, alignment=None, stats=None)
-> (kind, task_id, obj)``
    Decode frames received by ``recv_any`` (after any envelope frames have
    been sliced off), raising ``MessageFormatError`` with ``exc.header`` as
    ``recv_message`` does.

``send_frames(socket, frames, flags=0, stats=None) -> None``
    Send raw frames (bytes-like or ``zmq.Frame``) as one message, without
    encoding: a router passes a message on with its envelope this way.
    Frames below ``COPY_THRESHOLD`` bytes are copied, larger ones are
    referenced (a received ``zmq.Frame`` is passed on without a copy).

``stats`` is None or an object with int attributes: sends add one to
``messages_sent`` per message (``send_message`` also adds the bytes of the
buffer frames it copies to ``copied_bytes``; ``send_frames`` counts no
bytes); receives (``recv_message``, ``recv_any``) add one to
``messages_received`` per message, malformed ones included; encode and
decode add the payload bytes they copy to ``copied_bytes`` (an attribute is
not touched to add 0). A call only touches the attributes of its direction
(a ventilator needs no ``messages_received``). ``Counters()`` (each twin
has one) is such an object with all four counters (``messages_sent``,
``messages_received``, ``copied_bytes``, ``requests_handled``), which the
compiled loops bump in C: the nodes keep theirs in one.

Loops
-----

Every loop is given the sockets and the callables it needs; it never looks
at a node. Timeouts are ints in milliseconds, -1 waiting for ever (see
:func:`timeout_ms`). Messages are decoded with ``allow_pickle``,
``alignment`` and ``stats`` as given, except that the command channel never
decodes pickle.

``run_worker(requests, results, commands, *, handle=None, on_command, on_malformed,
on_unsendable, timeout_ms=-1, allow_pickle=True, alignment=None, stats=None,
handle_task=None, result_metadata=None) -> None``
    Serve ``requests`` until ``on_command`` returns True; ``commands`` may
    be None. For every well-formed message on ``requests``, whatever its
    kind, ``handle(kind, task_id, obj)`` returns the object to send back on
    ``results`` as a RESULT with the same task id, or None to send nothing.
    A message on ``commands`` goes to ``on_command(kind, obj) -> bool``.
    A message that breaks the format goes to ``on_malformed(channel, exc)``
    (``channel`` is ``"request"`` or ``"command"``, ``exc`` the
    MessageFormatError), which returns the object to send back (with task
    id ``exc.header[1]``, or 0 when the header was unreadable) or None.
    When a result cannot be encoded (``TypeError``, nothing sent),
    ``on_unsendable(result, exc)`` returns the object to send instead; it
    must be one that encodes. Raises ReceiverTimeoutException when neither
    a request nor a command arrives within ``timeout_ms``. A message already
    waiting is read without polling; while requests keep arriving, the
    command socket is looked at once per COMMAND_CHECK_EVERY requests or
    COMMAND_CHECK_MS milliseconds (an empty look costs libzmq two system
    calls), and always while waiting.

    Task mode (``handle_task`` given instead of ``handle``): the loop serves
    each request as a BasicWorker does, without making a ClusterRequest or
    a ClusterResult for it. A ClusterRequest body's payload (any other body:
    the body itself) goes to ``handle_task(payload) -> output``, timed; the
    answer is what ``ClusterResult("OK", output, request.metadata,
    dict(result_metadata, seconds=s))`` encodes to (the request's metadata
    None for a bare body), or, when ``handle_task`` raises an Exception,
    ``ClusterResult("FAIL", None, request.metadata, dict(result_metadata,
    seconds=s), exc)``; ``on_unsendable`` gets that ClusterResult when it
    cannot be encoded. Each request whose handler returned or raised an
    Exception adds one to ``stats.requests_handled`` (a BaseException ends
    the loop, uncounted). TypeError when neither handler is given.

``sink_next(results, commands, timeout_ms, on_command, on_malformed,
allow_pickle=True, alignment=None, stats=None) -> object``
    The next result: the decoded body of the next well-formed message on
    ``results``, whatever its kind; or :data:`STOP` once
    ``on_command(kind, obj)`` returned True for a message on ``commands``
    (looked at first; may be None). A malformed message goes to
    ``on_malformed(channel, exc)`` (``"result"`` or ``"command"``), whose
    return value, unless None, is returned as the result; after None the
    wait goes on. Raises ReceiverTimeoutException when no result comes
    within ``timeout_ms`` (commands and malformed messages do not extend
    the wait). Positional arguments are accepted, as a sink calls it once
    per result.

``receive_results(results, commands, num_results, timeout_ms, on_command,
on_malformed, allow_pickle=True, alignment=None, stats=None, *, unwrap=None,
metadata=False) -> iterator``
    An iterator over the results ``sink_next`` would return one by one, with
    the same rules (commands looked at first, STOP ending the iteration,
    malformed messages to ``on_malformed``, the timeout per result), ending
    after ``num_results`` results (None: no limit). Without ``unwrap`` it
    yields each result's decoded body. With ``unwrap``, it yields the
    payload of every ClusterResult whose status is the str ``"OK"`` (with
    ``metadata``, the tuple ``(payload, request_metadata, metadata)``),
    reading such a message without making the ClusterResult (and, without
    ``metadata``, checking its metadata's bytes without making them); every
    other result (a replacement from ``on_malformed`` included) goes to
    ``unwrap(result)``, whose return value is yielded, or which raises. An
    exception ends the iteration, as it ends a generator; ``close()`` ends
    it too. TypeError at once for a socket that is not a ``zmq.Socket``.

``send_requests(socket, requests, task_ids, track, stats=None, *, pairs=False)
-> int``
    Send every item of ``requests`` as a REQUEST with the task id
    ``next(task_ids)``, set ``item.task_id`` on ClusterRequest items, and
    call ``track(tracker)`` for every message sent with zero-copy frames.
    With ``pairs``, each item is a ``(payload, metadata)`` pair sent as the
    ClusterRequest it stands for, without making the object. Returns the
    number sent.

The scheduler of a pool builds its own loop from ``recv_any`` (a ROUTER, a
heartbeat socket, the command socket in one wait), ``decode_message``,
``send_message(..., envelope=[identity])`` and ``send_frames``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

from .protocol import HEADER, HEADER_SIZE, MAGIC, VERSION

__all__ = ["STOP", "COMMAND_CHECK_EVERY", "COMMAND_CHECK_MS", "REQUEST", "RESULT", "COMMAND",
           "peek_header", "timeout_ms", "is_command", "counter", "Stats", "SendStats",
           "RecvStats"]

#: While requests keep arriving, a worker looks at its command socket at
#: least once per this many requests...
COMMAND_CHECK_EVERY: Final = 64
#: ...and at least once per this many milliseconds. (It always sees commands
#: when it waits for a request.)
COMMAND_CHECK_MS: Final = 10

#: Channel names given to the loops' ``on_malformed``.
REQUEST: Final = "request"
RESULT: Final = "result"
COMMAND: Final = "command"


class _Stop:
    __slots__ = ()

    def __repr__(self) -> str:
        return "STOP"


#: Returned by ``sink_next`` when a command ended the sink's wait.
STOP: Final = _Stop()


class SendStats(Protocol):
    """What a send updates."""
    messages_sent: int
    copied_bytes: int


class RecvStats(Protocol):
    """What a receive updates."""
    messages_received: int
    copied_bytes: int


class Stats(SendStats, RecvStats, Protocol):
    """What a node that sends and receives (a worker) has."""
    requests_handled: int


def peek_header(frames: Sequence[Any]) -> tuple[int, int] | None:
    """``(kind, task_id)`` from a message's fixed header, or None when even
    that is unreadable (no frames, fewer than 16 bytes, another magic or
    version). The kind is not checked: a peer's unknown kind is still
    reported, so that its task can be answered."""
    if not frames:
        return None
    first = frames[0]
    header = first if type(first) is bytes else memoryview(first).cast("B")
    if len(header) < HEADER_SIZE:
        return None
    magic, version, kind, _, task_id = HEADER.unpack_from(header)
    if magic != MAGIC or version != VERSION:
        return None
    return kind, task_id


def timeout_ms(timeout: float | None) -> int:
    """A node's timeout (ms, None or negative: for ever) as the loops take
    it: an int, -1 for ever."""
    if timeout is None or timeout < 0:
        return -1
    return int(timeout)


def is_command(obj: object, name: str) -> bool:
    """Whether a received command ``obj`` is the command ``name``.

    Only a str (or its UTF-8 bytes) can be a command: anything else a peer
    sends (an array, a numpy scalar...) is not, and is never compared, as
    ``array == name`` would not give a bool.
    """
    t = type(obj)
    if t is str:
        return obj == name
    if t is bytes:
        return obj == name.encode()
    return False


def counter(name: str, doc: str) -> Any:
    """A node's public counter ``name``, kept in the node's ``_counters``
    (a ``Counters``, which the loops bump) and settable."""

    def get(node: Any) -> int:
        return int(getattr(node._counters, name))

    def set_(node: Any, value: int) -> None:
        setattr(node._counters, name, value)

    return property(get, set_, doc=doc)
