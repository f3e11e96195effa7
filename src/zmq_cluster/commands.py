"""The command channel: a PUB/SUB fan-out of small control messages.

Sinks and workers subscribe to a command channel; ``send_command`` delivers
one command (e.g. a kill) to the subscribers that exist, using XPUB
subscription notices as the handshake instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from .exceptions import ReceiverTimeoutException
from .protocol import KIND_COMMAND
from .sockets import InitSocket, SocketLike
from .wire import send_message

__all__ = ["send_command", "SUBSCRIBER_WAIT_MS"]

#: How long ``send_command`` waits for subscribers by default (ms).
SUBSCRIBER_WAIT_MS = 5000


def send_command(context: zmq.Context, command_sender: SocketLike, command: Any,
                 num_subscribers: int = 1, timeout: float | None = None) -> int | None:
    """Send ``command`` on the channel ``command_sender`` (socket-like).

    A command is a native value (docs/protocol.md: a str, or lists, dicts,
    numbers... of them), never pickled: one that would need pickle raises
    TypeError before anything is sent, as receivers never load pickle from
    the command channel.

    For a FutureSocket, an XPUB socket is made (with XPUB_VERBOSE, so every
    subscriber's subscription is seen), and the command is sent once
    ``num_subscribers`` subscription notices have arrived, or ``timeout`` ms
    (default SUBSCRIBER_WAIT_MS) have passed with at least one; the socket
    is then closed, waiting up to ``timeout`` ms for the command to leave.
    Returns the number of subscribers seen; raises ReceiverTimeoutException
    when none appeared in time, and the command is then not sent.

    An existing socket (PUB or XPUB) is the caller's: the command is sent on
    it at once, with no handshake, and None is returned. Its subscribers
    must already be connected.
    """
    timeout = SUBSCRIBER_WAIT_MS if timeout is None else timeout
    if isinstance(command_sender, zmq.Socket):
        send_message(command_sender, command, KIND_COMMAND)
        return None
    socket = InitSocket(context, command_sender, zmq.XPUB, options={zmq.XPUB_VERBOSE: 1})
    try:
        seen = _await_subscribers(socket, num_subscribers, timeout)
        send_message(socket, command, KIND_COMMAND)
        return seen
    finally:
        socket.close(linger=int(timeout))


def _await_subscribers(socket: zmq.Socket, wanted: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout / 1000.0
    seen = 0
    while seen < wanted:
        left_ms = max(0, int((deadline - time.monotonic()) * 1000))
        if not socket.poll(left_ms, zmq.POLLIN):
            break
        notice = socket.recv()
        if notice[:1] == b"\x01":  # subscribe; b"\x00" is an unsubscribe
            seen += 1
    if seen == 0:
        raise ReceiverTimeoutException("no subscriber on the command channel within %d ms; "
                                       "command not sent" % timeout)
    return seen
