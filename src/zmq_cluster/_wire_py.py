"""Pure-Python twin of the wire layer, on the pure-Python framing twin.

The contract (primitives, loops, ``stats``) is stated once, in
``zmq_cluster._wire_common``; the compiled twin, ``zmq_cluster._fastpath.wire``,
has the same functions with the same behaviour and bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import zmq

from ._framing_py import decode as _decode
from ._framing_py import encode as _encode
from ._wire_common import (
    COMMAND, COMMAND_CHECK_EVERY, COMMAND_CHECK_MS, REQUEST, RESULT, STOP, RecvStats, SendStats,
    Stats, peek_header,
)
from .exceptions import MessageFormatError, ReceiverTimeoutException
from .messages import ClusterRequest
from .protocol import COPY_THRESHOLD, KIND_REQUEST, KIND_RESULT

__all__ = ["send_message", "recv_message", "recv_any", "decode_message", "send_frames",
           "run_worker", "sink_next", "send_requests"]

#: A received message's frames (zmq.Frame, or bytes where recv_any says so).
Frames = list[Any]

_Frame = zmq.Frame
_MessageTracker = zmq.MessageTracker
_SNDMORE = zmq.SNDMORE
_POLLIN = zmq.POLLIN
_EVENTS = zmq.EVENTS


# ---------------------------------------------------------------- send/recv

def send_message(socket: zmq.Socket, obj: object, kind: int, task_id: int = 0,
                 flags: int = 0, stats: SendStats | None = None, *,
                 envelope: Sequence[Any] = ()) -> zmq.MessageTracker | None:
    """Encode ``obj`` and send it as one message (see ``_wire_common``)."""
    frames = _encode(obj, kind, task_id, stats)
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
                 stats: RecvStats | None = None) -> tuple[int, int, Any]:
    """Receive and decode one message (see ``_wire_common``)."""
    frames = _receive(socket, flags)
    if stats is not None:
        stats.messages_received += 1
    return decode_message(frames, allow_pickle, alignment, stats)


def decode_message(frames: Frames, allow_pickle: bool = True, alignment: int | None = None,
                   stats: RecvStats | None = None) -> tuple[int, int, Any]:
    """Decode received frames (see ``_wire_common``)."""
    try:
        return _decode(frames, allow_pickle, COPY_THRESHOLD, alignment, stats)
    except MessageFormatError as exc:
        exc.header = peek_header(frames)  # type: ignore[attr-defined]
        raise


def _waiting(socket: zmq.Socket) -> bool:
    """Whether a message can be read from ``socket`` without blocking."""
    return bool(cast(int, socket.getsockopt(_EVENTS)) & _POLLIN)


def _poller(sockets: Sequence[zmq.Socket]) -> zmq.Poller:
    poller = zmq.Poller()
    for socket in sockets:
        poller.register(socket, _POLLIN)
    return poller


def _wait_any(sockets: Sequence[zmq.Socket], poller: zmq.Poller | None, timeout_ms: int,
              first: int) -> int:
    """The index of a socket with a message waiting, or -1 after
    ``timeout_ms``: ``sockets[first:]`` are looked at before any poll, all
    of them after. ``poller`` (made when None) polls all ``sockets``."""
    for i in range(first, len(sockets)):
        if _waiting(sockets[i]):
            return i
    if timeout_ms == 0:
        return -1
    if poller is None:
        poller = _poller(sockets)
    deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
    left = timeout_ms
    while True:
        ready = dict(poller.poll(left))
        for i, socket in enumerate(sockets):
            if socket in ready and _waiting(socket):
                return i
        if deadline is not None:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                return -1


def recv_any(sockets: Sequence[zmq.Socket], timeout_ms: int = -1, first: int = 0,
             stats: RecvStats | None = None) -> tuple[int, Frames] | None:
    """Receive a whole message from whichever socket is ready (see
    ``_wire_common``)."""
    if not 0 <= first < len(sockets):
        raise ValueError("first=%d is not an index of the %d sockets" % (first, len(sockets)))
    which = _wait_any(sockets, None, timeout_ms, first)
    if which < 0:
        return None
    frames = _receive(sockets[which], 0)
    frames[0] = frames[0].bytes
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
               handle: Callable[[int, int, Any], object],
               on_command: Callable[[int, Any], bool],
               on_malformed: Callable[[str, MessageFormatError], object],
               on_unsendable: Callable[[Any, Exception], object],
               timeout_ms: int = -1, allow_pickle: bool = True, alignment: int | None = None,
               stats: Stats | None = None) -> None:
    """The worker's loop (see ``_wire_common``)."""
    sockets = [requests] if commands is None else [commands, requests]
    request_index = len(sockets) - 1
    poller = _poller(sockets)
    since_check = 0
    checked_at = time.monotonic()
    while True:
        first = request_index
        if since_check >= COMMAND_CHECK_EVERY or (
                time.monotonic() - checked_at >= COMMAND_CHECK_MS / 1000):
            first = 0
            since_check = 0
            checked_at = time.monotonic()
        since_check += 1
        which = _wait_any(sockets, poller, timeout_ms, first)
        if which < 0:
            raise ReceiverTimeoutException("no request or command within %d ms" % timeout_ms)
        frames = _receive(sockets[which], 0)
        if stats is not None:
            stats.messages_received += 1
        if which != request_index:
            if _command(frames, on_command, on_malformed, stats):
                return
            continue
        try:
            kind, task_id, request = decode_message(frames, allow_pickle, alignment, stats)
        except MessageFormatError as exc:
            result = on_malformed(REQUEST, exc)
            header = exc.header  # type: ignore[attr-defined]
            task_id = header[1] if header is not None else 0
        else:
            result = handle(kind, task_id, request)
        frames = []  # the request's frames can go before the send
        request = None
        if result is not None:
            _send_result(results, result, task_id, on_unsendable, stats)
            result = None


def _send_result(results: zmq.Socket, result: object, task_id: int,
                 on_unsendable: Callable[[Any, Exception], object],
                 stats: Stats | None) -> None:
    try:
        frames = _encode(result, KIND_RESULT, task_id, stats)
    except Exception as exc:  # whatever stops encoding: nothing was sent
        frames = _encode(on_unsendable(result, exc), KIND_RESULT, task_id, stats)
    _send_encoded(results, frames, 0, stats)


def sink_next(results: zmq.Socket, commands: zmq.Socket | None, timeout_ms: int,
              on_command: Callable[[int, Any], bool],
              on_malformed: Callable[[str, MessageFormatError], object],
              allow_pickle: bool = True, alignment: int | None = None,
              stats: RecvStats | None = None) -> Any:
    """One step of a sink: the next result, or STOP (see ``_wire_common``)."""
    sockets = [results] if commands is None else [commands, results]
    result_index = len(sockets) - 1
    deadline = None if timeout_ms <= 0 else time.monotonic() + timeout_ms / 1000
    left = timeout_ms
    while True:
        which = _wait_any(sockets, None, left, 0)
        if which < 0:
            raise ReceiverTimeoutException("no result within %d ms" % timeout_ms)
        frames = _receive(sockets[which], 0)
        if stats is not None:
            stats.messages_received += 1
        if which != result_index:
            if _command(frames, on_command, on_malformed, stats):
                return STOP
            continue
        try:
            return decode_message(frames, allow_pickle, alignment, stats)[2]
        except MessageFormatError as exc:
            replacement = on_malformed(RESULT, exc)
            if replacement is not None:
                return replacement
        if deadline is not None:
            left = max(0, int((deadline - time.monotonic()) * 1000))


def send_requests(socket: zmq.Socket, requests: Iterable[Any], task_ids: Iterator[int],
                  track: Callable[[zmq.MessageTracker], object],
                  stats: SendStats | None = None) -> int:
    """Send every request with the next task id (see ``_wire_common``)."""
    sent = 0
    for request in requests:
        task_id = next(task_ids)
        tracker = send_message(socket, request, KIND_REQUEST, task_id, 0, stats)
        if tracker is not None:
            track(tracker)
        if type(request) is ClusterRequest:
            request.task_id = task_id
        sent += 1
    return sent
