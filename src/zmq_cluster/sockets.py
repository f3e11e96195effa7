"""Socket descriptions and construction: FutureSocket, InitSocket, MakeSocket.

In this package a *socket-like* is either a ``zmq.Socket`` or a
:class:`FutureSocket`; every API that takes a channel accepts both.
"""

from __future__ import annotations

import builtins
import time
from typing import Any, Union, cast

import zmq

__all__ = ["FutureSocket", "Connect", "InitSocket", "MakeSocket", "SocketTypeToString",
           "SocketLike"]


class FutureSocket:
    """Describes the options needed to connect/bind a ZMQ socket to an
    end-point in the future.

    A FutureSocket holds no socket and no context, so it can be built in one
    process and passed (or pickled) to another, which then calls
    :meth:`MakeSocket` with its own context.
    """

    #: (str, required) The URL passed to the connect() and bind() methods of
    #: the created socket.
    url: str | None = None
    #: (optional) The type of socket to create (a ``zmq`` socket type).
    type: int | None = None
    #: (bool, optional) Whether this socket connects or binds.
    bind: bool = False
    #: (dict, optional) A dictionary of socket options (see
    #: ``zmq.Socket.setsockopt()``), applied before connecting/binding.
    options: dict[int, Any] | None = None
    #: (float, optional) Seconds to wait before connecting/binding the socket.
    pre_delay: float | None = None
    #: (float, optional) Seconds to wait after connecting/binding the socket.
    post_delay: float | None = None

    def __init__(self, url: str | None = None, type: int | None = None, bind: bool = False,
                 options: dict[int, Any] | None = None) -> None:
        self.url = url
        self.type = type
        self.bind = bind
        self.options = options

    def __repr__(self) -> str:
        parts = ["url=%r" % self.url]
        if self.type is not None:
            parts.append("type=%s" % SocketTypeToString(self.type))
        parts.append("bind=%r" % self.bind)
        if self.options:
            parts.append("options=%r" % self.options)
        return "FutureSocket(%s)" % ", ".join(parts)

    def MakeSocket(self, context: zmq.Context, url: str | None = None, type: int | None = None,
                   bind: bool | None = None, options: dict[int, Any] | None = None,
                   pre_delay: float | None = None,
                   post_delay: float | None = None) -> zmq.Socket:
        """Create the socket.

        Arguments take precedence over their corresponding object attributes;
        ``options`` given here are merged over this object's options. The
        socket is closed again if setting an option or connecting/binding
        fails. Raises ValueError when no URL or no type is known.
        """
        url = self.url if url is None else url
        type = self.type if type is None else type
        bind = self.bind if bind is None else bind
        merged = dict(self.options or {})
        merged.update(options or {})
        pre_delay = self.pre_delay if pre_delay is None else pre_delay
        post_delay = self.post_delay if post_delay is None else post_delay
        if url is None:
            raise ValueError("cannot make a socket: %r has no URL" % self)
        if type is None:
            raise ValueError("cannot make a socket: no socket type given for %r" % self)
        socket: zmq.Socket = context.socket(type)
        try:
            for option, value in merged.items():
                if isinstance(value, str):
                    socket.setsockopt_string(option, value)
                else:
                    socket.setsockopt(option, value)
            if pre_delay:
                time.sleep(pre_delay)
            if bind:
                socket.bind(url)
            else:
                socket.connect(url)
            if post_delay:
                time.sleep(post_delay)
        except BaseException:
            socket.close(linger=0)
            raise
        return socket


#: Alias of :class:`FutureSocket`.
Connect = FutureSocket

#: What every API that takes a channel accepts.
SocketLike = Union[zmq.Socket, FutureSocket]


def InitSocket(context: zmq.Context, connect_or_socket: SocketLike, type: int | None = None,
               **kwargs: Any) -> zmq.Socket:
    """Initialize a socket.

    :param zmq.Context context: The ZeroMQ context object with which to
       associate this socket.
    :param connect_or_socket: The socket to initialize (a FutureSocket or a
       zmq.Socket). If this is a FutureSocket, the corresponding ZeroMQ
       socket is constructed. If this is an existing ZeroMQ socket, its type
       is checked against the type argument (if present), and a mismatch
       raises ValueError.
    :param type: Type of the new socket; it takes precedence over the
       FutureSocket's own type.
    :param kwargs: Arguments passed to :meth:`FutureSocket.MakeSocket`
       (``url``, ``bind``, ``options``, ``pre_delay``, ``post_delay``).
    :returns: The ZeroMQ socket.
    """
    if isinstance(connect_or_socket, FutureSocket):
        return connect_or_socket.MakeSocket(context, type=type, **kwargs)
    if isinstance(connect_or_socket, zmq.Socket):
        if type is not None and connect_or_socket.type != type:
            raise ValueError("expected a %s socket, got a %s socket"
                             % (SocketTypeToString(type),
                                SocketTypeToString(cast(int, connect_or_socket.type))))
        return connect_or_socket
    raise TypeError("expected a FutureSocket or a zmq.Socket, got %s"
                    % builtins.type(connect_or_socket).__name__)


def MakeSocket(context: zmq.Context, url: str, type: int, bind: bool = False,
               options: dict[int, Any] | None = None) -> zmq.Socket:
    """This is a shortcut for constructing a FutureSocket and calling its
    MakeSocket method."""
    return FutureSocket(url, type, bind=bind, options=options).MakeSocket(context)


def SocketTypeToString(type: int) -> str:
    """Get a textual representation of a socket type ID, e.g. ``'PUSH'``.

    Raises ValueError for a number that is no ZeroMQ socket type.
    """
    try:
        return zmq.SocketType(type).name
    except ValueError:
        raise ValueError("unknown socket type %r" % (type,)) from None


def close_owned(socket: zmq.Socket | None, spec: object, linger: int | None = 0) -> None:
    """Close ``socket`` if it was made from ``spec`` (a FutureSocket); a
    socket the caller passed in (``socket is spec``) stays open."""
    if socket is not None and socket is not spec:
        socket.close(linger=linger)
