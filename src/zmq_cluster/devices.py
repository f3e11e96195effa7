"""Devices: blocking relays between two channels, built on zmq.proxy."""

from __future__ import annotations

from typing import Any

import zmq

from .sockets import InitSocket, SocketLike, close_owned

__all__ = ["LaunchStreamerDevice", "LaunchForwarderDevice"]


def LaunchStreamerDevice(context: zmq.Context, frontend_connect: SocketLike,
                         backend_connect: SocketLike) -> None:
    """Launch a ZeroMQ streamer device.

    Relays messages from a PULL frontend to a PUSH backend, so that many
    ventilators and many workers can meet at two well-known addresses. Blocks
    until ``context`` is terminated, then closes its sockets and returns.

    :param zmq.Context context: The ZeroMQ context for the channels.
    :param FutureSocket frontend_connect: The frontend channel.
    :param FutureSocket backend_connect: The backend channel.
    """
    _run_proxy(context, frontend_connect, zmq.PULL, {}, backend_connect, zmq.PUSH, {})


def LaunchForwarderDevice(context: zmq.Context, frontend_connect: SocketLike,
                          backend_connect: SocketLike) -> None:
    """Launch a ZeroMQ forwarder device.

    Relays messages from a subscriber frontend to a publisher backend, e.g.
    to fan commands out to workers. The sockets are XSUB and XPUB (the
    subscription-forwarding forms of SUB and PUB, compatible with PUB and
    SUB peers), so the subscriptions of the backend's subscribers travel
    upstream: a command sender's handshake (see BasicWorker.SendKillCommand)
    then sees that subscribers exist. Blocks until ``context`` is
    terminated, then closes its sockets and returns.

    :param zmq.Context context: The ZeroMQ context for the channels.
    :param FutureSocket frontend_connect: The frontend channel.
    :param FutureSocket backend_connect: The backend channel.
    """
    _run_proxy(context, frontend_connect, zmq.XSUB, {}, backend_connect, zmq.XPUB,
               {zmq.XPUB_VERBOSE: 1})


def _run_proxy(context: zmq.Context, frontend_connect: SocketLike, frontend_type: int,
               frontend_options: dict[int, Any], backend_connect: SocketLike,
               backend_type: int, backend_options: dict[int, Any]) -> None:
    frontend = InitSocket(context, frontend_connect, frontend_type, options=frontend_options)
    try:
        backend = InitSocket(context, backend_connect, backend_type, options=backend_options)
        try:
            zmq.proxy(frontend, backend)
        except zmq.ContextTerminated:
            pass
        finally:
            close_owned(backend, backend_connect)
    finally:
        close_owned(frontend, frontend_connect)

