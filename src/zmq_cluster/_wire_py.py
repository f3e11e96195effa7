"""Pure-Python twin of the send/receive layer and of the nodes' hot loops.

The only place that turns frames into zmq calls, so the ventilator, sink and
worker share one send path and one receive path. The compiled twin,
``zmq_cluster._fastpath.wire``, has the same functions with the same
behaviour and puts the same bytes on the wire; ``zmq_cluster.wire`` picks one.

Functions:

* ``send_message(socket, obj, kind, task_id=0, flags=0, stats=None)``: encode
  ``obj`` and send it as one message. The header frame and buffer frames
  below ``COPY_THRESHOLD`` bytes are copied into libzmq; larger buffer frames
  are sent zero-copy, each with its own tracker. Returns one
  ``zmq.MessageTracker`` over every zero-copy frame of the message (done once
  libzmq has released them all), or None when nothing was sent zero-copy.
* ``recv_message(socket, flags=0, allow_pickle=True, alignment=None,
  stats=None)``: receive and decode one message: ``(kind, task_id, obj)``.
* ``run_worker(worker)``: BasicWorker.Run's loop.
* ``sink_next(sink, timeout)``: one step of BasicSink.Receive: the next
  result, or :data:`STOP` when a kill command arrived.
* ``send_requests(ventilator, requests)``: BasicVentilator.Send's loop.

``stats``, when given, is an object with int attributes ``copied_bytes``,
``messages_sent`` and ``messages_received`` (a node): ``send_message`` adds
one to ``messages_sent`` per message and the bytes of every buffer frame it
copies to ``copied_bytes``; ``recv_message`` adds one to
``messages_received`` per message, malformed ones included; the framing adds
the payload bytes that encode/decode copy. The
header frame's copy into libzmq is not counted.

The loops call back into small methods of the node for the semantic steps
(checking a message's kind, running the handler and building the result,
the unsendable-result fallback, malformed messages), so both twins share
them.
"""

import time

import zmq

from . import framing
from .exceptions import MessageFormatError, ReceiverTimeoutException
from .messages import ClusterRequest
from .protocol import (
    COPY_THRESHOLD, HEADER, HEADER_SIZE, KIND_COMMAND, KIND_REQUEST, KIND_RESULT, MAGIC,
    VERSION,
)

__all__ = ["send_message", "recv_message", "peek_header", "run_worker", "sink_next",
           "send_requests", "STOP", "SKIP"]

#: While requests keep arriving, a worker looks at its command socket at
#: least once per this many requests...
COMMAND_CHECK_EVERY = 64
#: ...and at least once per this many milliseconds. (It always sees commands
#: when it waits for a request.)
COMMAND_CHECK_MS = 10

#: Returned by :func:`sink_next` when a kill command ends the sink's Receive.
STOP = type("_Stop", (), {"__repr__": lambda self: "STOP", "__slots__": ()})()
#: Returned by the nodes' checks for a message they dropped.
SKIP = type("_Skip", (), {"__repr__": lambda self: "SKIP", "__slots__": ()})()


_encode = framing.encode
_decode = framing.decode
_Frame = zmq.Frame
_MessageTracker = zmq.MessageTracker
_SNDMORE = zmq.SNDMORE
_NOBLOCK = zmq.NOBLOCK
_POLLIN = zmq.POLLIN
_EVENTS = zmq.EVENTS


def send_message(socket, obj, kind, task_id=0, flags=0, stats=None):
    """Encode ``obj`` and send it as one multipart message.

    Buffer frames of ``COPY_THRESHOLD`` bytes or more are handed to libzmq
    without a copy: the caller must not change such an array until libzmq
    has released it, which the returned tracker reports (``tracker.done``,
    ``tracker.wait()``). Returns None when every frame was copied.
    """
    frames = _encode(obj, kind, task_id, stats)
    last = len(frames) - 1
    if last == 0:
        socket.send(frames[0], flags)
        if stats is not None:
            stats.messages_sent += 1
        return None
    socket.send(frames[0], flags | _SNDMORE)
    events = None
    copied = 0
    for i in range(1, last + 1):
        buf = frames[i]
        nbytes = buf.nbytes  # a flat uint8 array, or a pickle buffer's memoryview
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


def recv_message(socket, flags=0, allow_pickle=True, alignment=None, stats=None):
    """Receive one multipart message: returns ``(kind, task_id, obj)``.

    Raises :class:`~zmq_cluster.exceptions.MessageFormatError` for a message
    that breaks the format, with ``exc.header`` set to ``(kind, task_id)``
    when the fixed header was readable (else None). The message is consumed
    either way, so the next call reads the next message.
    """
    frames = socket.recv_multipart(flags, copy=False)
    if stats is not None:
        stats.messages_received += 1
    return _decode_frames(frames, allow_pickle, alignment, stats)


def _decode_frames(frames, allow_pickle, alignment, stats):
    try:
        return _decode(frames, allow_pickle, COPY_THRESHOLD, alignment, stats)
    except MessageFormatError as exc:
        exc.header = peek_header(frames)
        raise


def peek_header(frames):
    """``(kind, task_id)`` from a message's fixed header, or None when even
    that is unreadable."""
    if not frames:
        return None
    header = frames[0].bytes if isinstance(frames[0], zmq.Frame) else bytes(frames[0])
    if len(header) < HEADER_SIZE:
        return None
    magic, version, kind, _, task_id = HEADER.unpack_from(header)
    if magic != MAGIC or version != VERSION:
        return None
    return kind, task_id


def _timeout_ms(timeout):
    """A poll timeout as zmq.Poller.poll reads it."""
    if timeout is None or timeout < 0:
        return -1
    return int(timeout)


# ------------------------------------------------------------------- loops

def _waiting(socket):
    """Whether a message can be read from ``socket`` without blocking."""
    return socket.getsockopt(_EVENTS) & _POLLIN


def run_worker(worker):
    """BasicWorker.Run's loop, on the sockets its Setup made: serve requests
    until HandleCommand returns True; ReceiverTimeoutException when neither a
    request nor a command arrives within ``worker.receiver_timeout`` ms.

    A message already waiting is read without polling; the loop polls (on
    both sockets) only when no request is waiting. While requests keep
    arriving, the command socket is looked at before the next request once
    COMMAND_CHECK_EVERY requests or COMMAND_CHECK_MS ms have passed since it
    was last looked at: an empty look costs libzmq two system calls.
    """
    requests, results, commands = worker._requests, worker._results, worker._commands
    poller = zmq.Poller()
    if commands is not None:
        poller.register(commands, _POLLIN)
    poller.register(requests, _POLLIN)
    timeout = _timeout_ms(worker.receiver_timeout)
    since_check = 0
    checked_at = time.monotonic()
    while True:
        command_ready = False
        if commands is not None and (since_check >= COMMAND_CHECK_EVERY or
                                     time.monotonic() - checked_at >= COMMAND_CHECK_MS / 1000):
            since_check = 0
            checked_at = time.monotonic()
            command_ready = _waiting(commands)
        since_check += 1
        request_ready = _waiting(requests)
        if not (command_ready or request_ready):
            ready = dict(poller.poll(timeout))
            if not ready:
                raise ReceiverTimeoutException(
                    "no request or command within %s ms" % worker.receiver_timeout)
            command_ready = commands in ready
            request_ready = requests in ready
        if command_ready:
            try:
                kind, _, command = recv_message(commands, 0, worker.allow_pickle, None, worker)
            except MessageFormatError as exc:
                worker._malformed("command", exc)
            else:
                if worker._command(kind, command):
                    return
        if request_ready:
            try:
                kind, task_id, request = recv_message(requests, 0, worker.allow_pickle,
                                                      worker.array_alignment, worker)
            except MessageFormatError as exc:
                result = worker._malformed_request(exc)
                task_id = exc.header[1] if exc.header is not None else 0
            else:
                result = worker._request(kind, request)
            if result is not None:
                _send_result(results, worker, result, task_id)


def _send_result(socket, worker, result, task_id):
    try:
        send_message(socket, result, KIND_RESULT, task_id, 0, worker)
    except TypeError as exc:  # the output or exception cannot be encoded
        send_message(socket, worker._unsendable(result, exc), KIND_RESULT, task_id, 0, worker)


def sink_next(sink, timeout):
    """One step of BasicSink.Receive: the next result on the sink's result
    socket, or :data:`STOP` when a kill command arrives first (commands are
    looked at first). Malformed messages are dropped (``sink._check``,
    ``sink._malformed_message``) and the wait goes on. Raises
    ReceiverTimeoutException when nothing arrives within ``timeout`` ms
    (None waits for ever); a message already waiting is read without
    polling.
    """
    results, commands = sink._results, sink._commands
    wait = _timeout_ms(timeout)
    poller = None
    while True:
        command_ready = commands is not None and _waiting(commands)
        result_ready = _waiting(results)
        if not (command_ready or result_ready):
            if poller is None:
                poller = sink._poller
            ready = dict(poller.poll(wait))
            if not ready:
                raise ReceiverTimeoutException("no result within %s ms" % timeout)
            command_ready = commands in ready
            result_ready = results in ready
        if command_ready:
            command = _read(sink, commands, KIND_COMMAND)
            if command is not SKIP and sink._is_kill(command):
                return STOP
        if result_ready:
            result = _read(sink, results, KIND_RESULT)
            if result is not SKIP:
                return result


def _read(sink, socket, expected_kind):
    try:
        kind, _, obj = recv_message(socket, 0, sink.allow_pickle, sink.array_alignment, sink)
    except MessageFormatError as exc:
        return sink._malformed_message(exc)
    return sink._check(kind, obj, expected_kind)


def send_requests(ventilator, requests):
    """BasicVentilator.Send's loop: send each request with the next task id
    (set on a ClusterRequest), keeping the trackers of zero-copy frames
    (``ventilator._track``). Returns the number sent."""
    socket = ventilator._socket
    task_ids = ventilator._task_ids
    track = ventilator._track
    sent = 0
    for request in requests:
        task_id = next(task_ids)
        tracker = send_message(socket, request, KIND_REQUEST, task_id, 0, ventilator)
        if tracker is not None:
            track(tracker)
        if type(request) is ClusterRequest:
            request.task_id = task_id
        sent += 1
    return sent
