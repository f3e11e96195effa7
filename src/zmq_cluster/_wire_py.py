"""Pure-Python twin of the wire layer, on the pure-Python framing twin.

The contract (primitives, loops, ``stats``) is stated once, in
``zmq_cluster._wire_common``; the compiled twin, ``zmq_cluster._fastpath.wire``,
has the same functions with the same behaviour and bytes.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import zmq

from ._framing_py import decode as _decode
from ._framing_py import encode as _encode
from ._framing_tasks import NOT_FAST, decode_ok, decode_task, encode_ok, encode_request
from ._framing_tasks import metadata_prefix as _metadata_prefix
from ._wire_common import (
    COMMAND, COMMAND_CHECK_EVERY, COMMAND_CHECK_MS, REQUEST, RESULT, STOP, RecvStats, SendStats,
    Stats, peek_header,
)
from .exceptions import MessageFormatError, ReceiverTimeoutException
from .messages import ClusterRequest, ClusterResult
from .protocol import COPY_THRESHOLD, KIND_REQUEST, KIND_RESULT

__all__ = ["send_message", "recv_message", "recv_any", "decode_message", "send_frames",
           "run_worker", "sink_next", "receive_results", "send_requests", "Counters"]

#: A received message's frames (zmq.Frame, or bytes where recv_any says so).
Frames = list[Any]

_Frame = zmq.Frame
_MessageTracker = zmq.MessageTracker
_SNDMORE = zmq.SNDMORE
_FD = zmq.FD
_NOBLOCK = zmq.NOBLOCK
_perf_counter = time.perf_counter
_OK = ClusterResult.STATUS_SUCCESS
_FAIL = ClusterResult.STATUS_FAIL


class Counters:
    """A node's message counters, as the loops' ``stats`` (see
    ``_wire_common``)."""

    __slots__ = ("messages_sent", "messages_received", "copied_bytes", "requests_handled")

    def __init__(self) -> None:
        self.messages_sent = 0
        self.messages_received = 0
        self.copied_bytes = 0
        self.requests_handled = 0

    def __repr__(self) -> str:
        return ("Counters(messages_sent=%d, messages_received=%d, copied_bytes=%d, "
                "requests_handled=%d)" % (self.messages_sent, self.messages_received,
                                          self.copied_bytes, self.requests_handled))


# ---------------------------------------------------------------- send/recv

def send_message(socket: zmq.Socket, obj: object, kind: int, task_id: int = 0,
                 flags: int = 0, stats: SendStats | None = None, *,
                 envelope: Sequence[Any] = (), shm: Any = None) -> zmq.MessageTracker | None:
    """Encode ``obj`` and send it as one message (see ``_wire_common``)."""
    frames = _encode(obj, kind, task_id, stats, shm)
    for part in envelope:
        socket.send(part, flags | _SNDMORE)
    return _send_encoded(socket, frames, flags, stats)


def _send_encoded(socket: zmq.Socket, frames: list[Any], flags: int,
                  stats: SendStats | None) -> zmq.MessageTracker | None:
    last = len(frames) - 1
    if last == 0:
        socket.send(frames[0], flags)
        if stats is not None:
            stats.messages_sent += 1
        return None
    socket.send(frames[0], flags | _SNDMORE)
    events: list[Any] | None = None
    copied = 0
    for i in range(1, last + 1):
        buf = frames[i]
        nbytes = memoryview(buf).nbytes  # a flat uint8 array or a pickle buffer
        more = flags | _SNDMORE if i < last else flags
        if nbytes < COPY_THRESHOLD:
            socket.send(buf, more)  # copied
            copied += nbytes
        else:
            frame = _Frame(buf, track=True, copy=False)
            socket.send(frame, more, copy=False)
            if events is None:
                events = [frame.tracker_event]
            else:
                events.append(frame.tracker_event)
            # The frame object holds a reference to the message until it
            # goes; only then can the tracker finish.
            del frame
    if stats is not None:
        stats.messages_sent += 1
        if copied:
            stats.copied_bytes += copied
    return None if events is None else _MessageTracker(*events)


def send_frames(socket: zmq.Socket, frames: Sequence[Any], flags: int = 0,
                stats: SendStats | None = None) -> None:
    """Send raw frames as one message (see ``_wire_common``)."""
    if not frames:
        raise ValueError("a message has at least one frame")
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        more = flags | _SNDMORE if i < last else flags
        if type(frame) is _Frame or memoryview(frame).nbytes >= COPY_THRESHOLD:
            socket.send(frame, more, copy=False)
        else:
            socket.send(frame, more)
    if stats is not None:
        stats.messages_sent += 1


def _receive(socket: zmq.Socket, flags: int) -> Frames:
    # Every frame a zmq.Frame: decode reads the header in place.
    return socket.recv_multipart(flags, copy=False)


def recv_message(socket: zmq.Socket, flags: int = 0, allow_pickle: bool = True,
                 alignment: int | None = None,
                 stats: RecvStats | None = None, *, shm: Any = None) -> tuple[int, int, Any]:
    """Receive and decode one message (see ``_wire_common``)."""
    frames = _receive(socket, flags)
    if stats is not None:
        stats.messages_received += 1
    return decode_message(frames, allow_pickle, alignment, stats, shm=shm)


def decode_message(frames: Frames, allow_pickle: bool = True, alignment: int | None = None,
                   stats: RecvStats | None = None, *, shm: Any = None) -> tuple[int, int, Any]:
    """Decode received frames (see ``_wire_common``)."""
    try:
        return _decode(frames, allow_pickle, COPY_THRESHOLD, alignment, stats, shm)
    except MessageFormatError as exc:
        exc.header = peek_header(frames)  # type: ignore[attr-defined]
        raise


def _take(socket: zmq.Socket) -> Frames | None:
    """The whole message waiting on ``socket``, or None when none is: its
    first frame as bytes, the others as zmq.Frame (the received memory).
    Trying to receive is cheaper than asking libzmq whether a message waits
    (ZMQ_EVENTS costs it system calls)."""
    try:
        frame = socket.recv(_NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames: Frames = [frame.bytes]
    while frame.more:
        frame = socket.recv(0, copy=False)
        frames.append(frame)
    return frames


class _FdPoller:
    """Waits on the ``ZMQ_FD`` descriptors of ``sockets`` (see
    ``_next_any``): ``poll(timeout_ms)`` returns the indices of the sockets
    whose descriptor is readable, in order."""

    __slots__ = ("_poll", "_index")

    def __init__(self, sockets: Sequence[zmq.Socket]) -> None:
        self._poll = select.poll()
        self._index: dict[int, int] = {}
        for i, socket in enumerate(sockets):
            fd = cast(int, socket.getsockopt(_FD))
            self._poll.register(fd, select.POLLIN)
            self._index[fd] = i

    def poll(self, timeout_ms: int) -> list[int]:
        index = self._index
        return sorted([index[fd] for fd, _ in self._poll.poll(timeout_ms)])


def _try(sockets: Sequence[zmq.Socket], i: int, drained: Any) -> Frames | None:
    """A message from ``sockets[i]`` without waiting, keeping ``drained``
    (see recv_any): None when it has none."""
    frames = _take(sockets[i])
    if drained is not None:
        drained[i] = frames is None
    return frames


def _next_any(sockets: Sequence[zmq.Socket], poller: _FdPoller | None, timeout_ms: int,
              first: int, drained: Any = None) -> tuple[int, Frames | None]:
    """``(index, frames)`` of a message received from any of ``sockets``,
    or ``(-1, None)`` after ``timeout_ms``: ``sockets[first:]`` are tried
    first; unless ``timeout_ms`` is 0, ``sockets[:first]`` next, then the
    wait on their ``ZMQ_FD``s (``poller``, made when None), after which only
    the sockets whose descriptor woke it are tried. A failed try runs the
    socket's pending libzmq commands, as the ``ZMQ_EVENTS`` query that
    ``zmq_poll`` makes of every socket before and after its poll does:
    after it, a new message signals the descriptor. Sockets ``drained``
    says are (see recv_any) are not tried before the wait."""
    n = len(sockets)
    for i in range(first, n):
        if drained is None or not drained[i]:
            frames = _try(sockets, i, drained)
            if frames is not None:
                return i, frames
    if timeout_ms == 0:
        return -1, None
    for i in range(first):
        if drained is None or not drained[i]:
            frames = _try(sockets, i, drained)
            if frames is not None:
                return i, frames
    if poller is None:
        poller = _FdPoller(sockets)
    deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
    left = timeout_ms
    while True:
        for i in poller.poll(left):
            frames = _try(sockets, i, drained)
            if frames is not None:
                return i, frames
        if deadline is not None:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                return -1, None


def recv_any(sockets: Sequence[zmq.Socket], timeout_ms: int = -1, first: int = 0,
             stats: RecvStats | None = None, drained: bytearray | None = None
             ) -> tuple[int, Frames] | None:
    """Receive a whole message from whichever socket is ready (see
    ``_wire_common``)."""
    if not 0 <= first < len(sockets):
        raise ValueError("first=%d is not an index of the %d sockets" % (first, len(sockets)))
    if drained is not None and len(drained) < len(sockets):
        raise ValueError("drained has %d entries for %d sockets" % (len(drained), len(sockets)))
    which, frames = _next_any(sockets, None, timeout_ms, first, drained)
    if frames is None:
        return None
    if stats is not None:
        stats.messages_received += 1
    return which, frames


# ------------------------------------------------------------------- loops

def _command(frames: Frames, on_command: Callable[[int, Any], bool],
             on_malformed: Callable[[str, MessageFormatError], object],
             stats: RecvStats | None) -> bool:
    """A message from the command channel (never unpickled): whether
    ``on_command`` asks to stop."""
    try:
        kind, _, command = decode_message(frames, False, None, stats)
    except MessageFormatError as exc:
        on_malformed(COMMAND, exc)
        return False
    return bool(on_command(kind, command))


def run_worker(requests: zmq.Socket, results: zmq.Socket, commands: zmq.Socket | None, *,
               handle: Callable[[int, int, Any], object] | None = None,
               on_command: Callable[[int, Any], bool],
               on_malformed: Callable[[str, MessageFormatError], object],
               on_unsendable: Callable[[Any, Exception], object],
               timeout_ms: int = -1, allow_pickle: bool = True, alignment: int | None = None,
               stats: Stats | None = None,
               handle_task: Callable[[Any], Any] | None = None,
               result_metadata: dict[str, Any] | None = None, shm: Any = None) -> None:
    """The worker's loop (see ``_wire_common``)."""
    sockets = [requests] if commands is None else [commands, requests]
    request_index = len(sockets) - 1
    poller = _FdPoller(sockets)
    since_check = 0
    checked_at = time.monotonic()
    if handle_task is not None:
        identity = {} if result_metadata is None else dict(result_metadata)
        prefix = _metadata_prefix(identity)
    elif handle is None:
        raise TypeError("run_worker needs handle or handle_task")
    while True:
        first = request_index
        if since_check >= COMMAND_CHECK_EVERY or (
                time.monotonic() - checked_at >= COMMAND_CHECK_MS / 1000):
            first = 0
            since_check = 0
            checked_at = time.monotonic()
        since_check += 1
        which, frames = _next_any(sockets, poller, timeout_ms, first)
        if frames is None:
            raise ReceiverTimeoutException("no request or command within %d ms" % timeout_ms)
        if stats is not None:
            stats.messages_received += 1
        if which != request_index:
            if _command(frames, on_command, on_malformed, stats):
                return
            continue
        if handle_task is not None:
            _serve_task(results, frames, handle_task, identity, prefix, on_malformed,
                        on_unsendable, allow_pickle, alignment, stats, shm)
            frames = []
            continue
        try:
            kind, task_id, request = decode_message(frames, allow_pickle, alignment, stats,
                                                    shm=shm)
        except MessageFormatError as exc:
            result = on_malformed(REQUEST, exc)
            header = exc.header  # type: ignore[attr-defined]
            task_id = header[1] if header is not None else 0
        else:
            result = handle(kind, task_id, request)  # type: ignore[misc]
        frames = []  # the request's frames can go before the send
        request = None
        if result is not None:
            _send_result(results, result, task_id, on_unsendable, stats, shm)
            result = None


def _serve_task(results: zmq.Socket, frames: Frames, handle_task: Callable[[Any], Any],
                identity: dict[str, Any], prefix: bytes | None,
                on_malformed: Callable[[str, MessageFormatError], object],
                on_unsendable: Callable[[Any, Exception], object], allow_pickle: bool,
                alignment: int | None, stats: Stats | None, shm: Any) -> None:
    """One request of run_worker's task mode: decode, run, answer."""
    try:
        _, task_id, payload, request_metadata = decode_task(frames, allow_pickle, alignment,
                                                            stats, shm)
    except MessageFormatError as exc:
        exc.header = peek_header(frames)  # type: ignore[attr-defined]
        result = on_malformed(REQUEST, exc)
        if result is not None:
            header = exc.header  # type: ignore[attr-defined]
            _send_result(results, result, header[1] if header is not None else 0,
                         on_unsendable, stats, shm)
        return
    del frames[:]  # the request's frames can go before the send
    start = _perf_counter()
    try:
        output = handle_task(payload)
    except Exception as exc:
        result = ClusterResult(_FAIL, None, request_metadata, None, exc)
    else:
        seconds = _perf_counter() - start
        if stats is not None:
            stats.requests_handled += 1
        if prefix is not None:
            try:
                out = encode_ok(output, request_metadata, prefix, seconds, task_id, stats, shm)
            except Exception:
                pass  # the general way below finds the same error, and answers it
            else:
                _send_encoded(results, out, 0, stats)
                return
        result = ClusterResult(_OK, output, request_metadata)
        result.metadata = dict(identity, seconds=seconds)
        _send_result(results, result, task_id, on_unsendable, stats, shm)
        return
    result.metadata = dict(identity, seconds=_perf_counter() - start)
    if stats is not None:
        stats.requests_handled += 1
    _send_result(results, result, task_id, on_unsendable, stats, shm)


def _send_result(results: zmq.Socket, result: object, task_id: int,
                 on_unsendable: Callable[[Any, Exception], object],
                 stats: Stats | None, shm: Any = None) -> None:
    try:
        frames = _encode(result, KIND_RESULT, task_id, stats, shm)
    except Exception as exc:  # whatever stops encoding: nothing was sent
        frames = _encode(on_unsendable(result, exc), KIND_RESULT, task_id, stats, shm)
    _send_encoded(results, frames, 0, stats)


def sink_next(results: zmq.Socket, commands: zmq.Socket | None, timeout_ms: int,
              on_command: Callable[[int, Any], bool],
              on_malformed: Callable[[str, MessageFormatError], object],
              allow_pickle: bool = True, alignment: int | None = None,
              stats: RecvStats | None = None, *, shm: Any = None) -> Any:
    """One step of a sink: the next result, or STOP (see ``_wire_common``)."""
    sockets = [results] if commands is None else [commands, results]
    result_index = len(sockets) - 1
    deadline = None if timeout_ms <= 0 else time.monotonic() + timeout_ms / 1000
    left = timeout_ms
    while True:
        which, frames = _next_any(sockets, None, left, 0)
        if frames is None:
            raise ReceiverTimeoutException("no result within %d ms" % timeout_ms)
        if stats is not None:
            stats.messages_received += 1
        if which != result_index:
            if _command(frames, on_command, on_malformed, stats):
                return STOP
            continue
        try:
            return decode_message(frames, allow_pickle, alignment, stats, shm=shm)[2]
        except MessageFormatError as exc:
            replacement = on_malformed(RESULT, exc)
            if replacement is not None:
                return replacement
        if deadline is not None:
            left = max(0, int((deadline - time.monotonic()) * 1000))


def receive_results(results: zmq.Socket, commands: zmq.Socket | None,
                    num_results: int | None, timeout_ms: int,
                    on_command: Callable[[int, Any], bool],
                    on_malformed: Callable[[str, MessageFormatError], object],
                    allow_pickle: bool = True, alignment: int | None = None,
                    stats: RecvStats | None = None, *,
                    unwrap: Callable[[Any], Any] | None = None,
                    metadata: bool = False, shm: Any = None) -> Iterator[Any]:
    """An iterator over a sink's results (see ``_wire_common``)."""
    sockets = [results] if commands is None else [commands, results]
    for socket in sockets:
        if not isinstance(socket, zmq.Socket):
            raise TypeError("expected a zmq.Socket, got %s" % type(socket).__name__)
    return _results(sockets, num_results, timeout_ms, on_command, on_malformed, allow_pickle,
                    alignment, stats, unwrap, 0 if unwrap is None else (2 if metadata else 1),
                    shm)


def _results(sockets: list[zmq.Socket], num_results: int | None, timeout_ms: int,
             on_command: Callable[[int, Any], bool],
             on_malformed: Callable[[str, MessageFormatError], object],
             allow_pickle: bool, alignment: int | None, stats: RecvStats | None,
             unwrap: Callable[[Any], Any] | None, mode: int, shm: Any) -> Iterator[Any]:
    result_index = len(sockets) - 1
    poller = _FdPoller(sockets)
    left = -1 if num_results is None else max(0, num_results)
    while left:
        deadline = None if timeout_ms <= 0 else time.monotonic() + timeout_ms / 1000
        wait = timeout_ms
        while True:
            which, frames = _next_any(sockets, poller, wait, 0)
            if frames is None:
                raise ReceiverTimeoutException("no result within %d ms" % timeout_ms)
            if stats is not None:
                stats.messages_received += 1
            if which != result_index:
                if _command(frames, on_command, on_malformed, stats):
                    return
            else:
                if mode:
                    item = decode_ok(frames, allow_pickle, alignment, mode, stats)
                    if item is not NOT_FAST:
                        break
                try:
                    item = decode_message(frames, allow_pickle, alignment, stats, shm=shm)[2]
                except MessageFormatError as exc:
                    item = on_malformed(RESULT, exc)
                    if item is not None:
                        item = item if mode == 0 else unwrap(item)  # type: ignore[misc]
                        break
                else:
                    item = item if mode == 0 else unwrap(item)  # type: ignore[misc]
                    break
            if deadline is not None:
                wait = max(0, int((deadline - time.monotonic()) * 1000))
        if left > 0:
            left -= 1
        yield item


def send_requests(socket: zmq.Socket, requests: Iterable[Any], task_ids: Iterator[int],
                  track: Callable[[zmq.MessageTracker], object],
                  stats: SendStats | None = None, *, pairs: bool = False,
                  shm: Any = None) -> int:
    """Send every request with the next task id (see ``_wire_common``)."""
    sent = 0
    if pairs:
        for payload, metadata in requests:
            task_id = next(task_ids)
            tracker = _send_encoded(socket, encode_request(payload, metadata, task_id, stats,
                                                           shm), 0, stats)
            if tracker is not None:
                track(tracker)
            sent += 1
        return sent
    for request in requests:
        task_id = next(task_ids)
        tracker = send_message(socket, request, KIND_REQUEST, task_id, 0, stats, shm=shm)
        if tracker is not None:
            track(tracker)
        if type(request) is ClusterRequest:
            request.task_id = task_id
        sent += 1
    return sent
