"""Sending and receiving whole messages on a zmq socket.

The only place that turns frames into zmq calls, so the ventilator, sink and
worker share one send path and one receive path.
"""

import zmq

from . import framing
from .exceptions import MessageFormatError
from .protocol import COPY_THRESHOLD, HEADER, HEADER_SIZE, MAGIC, VERSION

__all__ = ["send_message", "recv_message", "peek_header"]


def send_message(socket, obj, kind, task_id=0, flags=0):
    """Encode ``obj`` and send it as one multipart message.

    Array frames of ``COPY_THRESHOLD`` bytes or more are handed to libzmq
    without a copy: the caller must not change such an array until libzmq
    has sent it (see README, "Array lifetime").
    """
    frames = framing.encode(obj, kind, task_id)
    socket.send_multipart(frames, flags, copy=False)


def recv_message(socket, flags=0, allow_pickle=True, alignment=None):
    """Receive one multipart message: returns ``(kind, task_id, obj)``.

    Raises :class:`~zmq_cluster.exceptions.MessageFormatError` for a message
    that breaks the format, with ``exc.header`` set to ``(kind, task_id)``
    when the fixed header was readable (else None). The message is consumed
    either way, so the next call reads the next message.
    """
    frames = socket.recv_multipart(flags, copy=False)
    try:
        return framing.decode(frames, allow_pickle, COPY_THRESHOLD, alignment)
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
