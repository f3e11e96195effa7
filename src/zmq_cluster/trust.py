"""Who is trusted: the listening policy and the pickle rule.

* :func:`classify_endpoint` and :func:`check_listen` decide whether an
  address may be listened on without CURVE keys (a network address may
  not, unless the user says ``--insecure``).
* :func:`sender_may_pickle` tells, from a received ``zmq.Frame``, whether
  its sender is authenticated (CURVE) or local: the only senders whose
  pickles may be loaded. :func:`describe_peer` names a sender in a log line.

What libzmq 4.3.5 (pyzmq 27.3) reports in a received frame's properties,
measured with real sockets (``tests/test_trust.py`` and
``tests/test_netns.py`` keep checking it):

=========================  ===========================  ==========================
connection                 ``Peer-Address``             ``User-Id``
=========================  ===========================  ==========================
ipc                        ``localhost:UID:GID:PID``    absent
tcp, IPv4 loopback         ``127.0.0.1``                absent
tcp, IPv6 loopback         ``::1``                      absent
IPv4 loopback peer of an   ``::ffff:127.0.0.1``         absent
IPv6 (``ipv6=True``) socket
tcp from another host      its address (``10.77.0.2``)  absent
tcp from one of this       that address: not loopback   absent
host's own non-loopback
addresses
CURVE, server side, with   as above                     the client's public key,
a ZAP handler                                           Z85 (pyzmq's authenticator)
CURVE, server side, no     as above                     absent, and libzmq admits
ZAP handler                                             every client
CURVE, client side         as above                     absent (no ZAP on a client)
inproc                     absent: no properties at     absent
                           all (EINVAL)
=========================  ===========================  ==========================

Nothing here reads a socket option: the caller says how its socket is set
up (``curve``, ``private_ipc``, ``inproc``), once, and the frame says who
sent it.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import stat
from typing import Literal, Optional

import zmq

__all__ = [
    "EndpointKind",
    "InsecureListenError",
    "check_listen",
    "classify_endpoint",
    "describe_peer",
    "is_loopback_address",
    "is_private_ipc",
    "sender_is_local",
    "sender_may_pickle",
]


class InsecureListenError(Exception):
    """Listening on a network address without CURVE keys was refused; the
    message says how to make keys."""


class EndpointKind(str, enum.Enum):
    """Where a ZeroMQ endpoint can be reached from."""

    INPROC = "inproc"      #: this process only
    IPC = "ipc"            #: this host (a Unix socket)
    LOOPBACK = "loopback"  #: tcp on 127.0.0.0/8, ::1 or localhost: this host
    NETWORK = "network"    #: tcp on any other address, `*`, a host or interface name;
    #: and every other network transport (pgm, epgm, udp, ws, wss, tipc, vmci)


def _tcp_host(endpoint: str) -> str:
    rest = endpoint.split("://", 1)[1]
    rest = rest.rsplit(";", 1)[-1]  # "source;destination" in a connect endpoint
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port:
        raise ValueError("not a tcp endpoint (tcp://HOST:PORT): %r" % endpoint)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def is_loopback_address(address: str) -> bool:
    """True for an IP address literal in 127.0.0.0/8 or ``::1``, written as
    IPv4, IPv6, or IPv4-mapped IPv6 (``::ffff:127.0.0.1``, what an IPv6
    socket reports for an IPv4 loopback peer); False for anything else,
    host names included."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def classify_endpoint(endpoint: str) -> EndpointKind:
    """Classify a ZeroMQ endpoint by who can reach it.

    ``tcp://`` is LOOPBACK for an address in 127.0.0.0/8, ``::1`` (bracketed
    or not, IPv4-mapped too) and the name ``localhost`` (which RFC 6761
    reserves for loopback); NETWORK for ``*``, ``0.0.0.0``, ``::``, any
    other address, and any other host or interface name (``lo`` included:
    it is not resolved here; write 127.0.0.1). Raises ValueError for a
    string that is not an endpoint.
    """
    transport, sep, _ = endpoint.partition("://")
    if not sep:
        raise ValueError("not a ZeroMQ endpoint (TRANSPORT://ADDRESS): %r" % endpoint)
    transport = transport.lower()
    if transport == "inproc":
        return EndpointKind.INPROC
    if transport == "ipc":
        return EndpointKind.IPC
    if transport == "tcp":
        host = _tcp_host(endpoint)
        if host.lower() == "localhost" or is_loopback_address(host):
            return EndpointKind.LOOPBACK
        return EndpointKind.NETWORK
    if transport in ("pgm", "epgm", "udp", "ws", "wss", "tipc", "vmci"):
        return EndpointKind.NETWORK
    raise ValueError("unknown ZeroMQ transport %r in %r" % (transport, endpoint))


def check_listen(endpoint: str, *, secure: bool, insecure: bool = False) -> Optional[str]:
    """Decide whether a scheduler may listen on ``endpoint``.

    ``secure``: the socket will be a CURVE server (:class:`~zmq_cluster.security.ServerSecurity`).
    ``insecure``: the user accepted an unauthenticated network listener
    (``--insecure``).

    Returns None when listening is fine: CURVE on, or an inproc, ipc or
    loopback endpoint. For a NETWORK endpoint without CURVE, raises
    :class:`InsecureListenError` (saying how to make keys) unless
    ``insecure`` is true; then returns the warning text to show at start.
    """
    kind = classify_endpoint(endpoint)
    if secure or kind is not EndpointKind.NETWORK:
        return None
    if not insecure:
        raise InsecureListenError(
            "refusing to listen on %s without CURVE keys: anyone who can reach that port could"
            " run any importable function. Make keys with `zmq-cluster keygen DIR` and start"
            " with `--keys DIR` (or --secret-key and --authorized-keys); or listen on"
            " 127.0.0.1 or ipc://; or pass --insecure to accept the risk" % endpoint)
    return ("WARNING: listening on %s without CURVE keys (--insecure): anyone who can reach"
            " this port can run any importable function on the workers (that is what a task"
            " is), and read every argument and result. Pickled functions and objects are"
            " refused from peers that are not local." % endpoint)


def is_private_ipc(endpoint: str) -> bool:
    """True when ``endpoint`` is an ``ipc://`` path whose directory belongs
    to this process's user and is closed to everyone else (no group or
    other permission bits, as a ``mkdtemp`` directory): only this user (and
    root) can connect to it. False for anything else, abstract-namespace
    (``ipc://@name``) sockets and missing directories included."""
    transport, sep, path = endpoint.partition("://")
    if not sep or transport.lower() != "ipc" or not path or path.startswith("@"):
        return False
    try:
        st = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & 0o077)


def _property(frame: zmq.Frame, name: str) -> Optional[str]:
    try:
        value = frame.get(name)  # str for named (metadata) properties
    except zmq.ZMQError:  # EINVAL: the message has no such property
        return None
    return value if isinstance(value, str) else str(value)


def sender_may_pickle(frame: zmq.Frame, *,
                      curve: Literal["server", "client", None] = None,
                      private_ipc: bool = False, inproc: bool = False) -> bool:
    """Whether the sender of ``frame`` (any frame of a message received
    with ``copy=False``) may send pickled functions or objects.

    Trusted are the authenticated and the local:

    * ``curve="server"`` (a :class:`~zmq_cluster.security.ServerSecurity`
      server):
      frames whose ``User-Id`` is set, which ZAP does for each admitted
      client (a CURVE server with no ZAP handler sets none, and is trusted
      for nothing);
    * ``curve="client"`` (a :class:`~zmq_cluster.security.ClientSecurity`
      client): every frame,
      since the only peer is the server that proved its key;
    * a ``Peer-Address`` that is a loopback IP (127.0.0.0/8, ``::1``,
      IPv4-mapped loopback); a peer that used one of this host's own
      non-loopback addresses reports that address and is *not* local;
    * an ipc peer (``Peer-Address`` ``localhost:UID:GID:PID``) when
      ``private_ipc`` says the socket's ipc endpoints are in private
      directories (:func:`is_private_ipc`);
    * a frame with no ``Peer-Address`` (libzmq gives inproc messages no
      properties) only when ``inproc`` says the socket has inproc
      endpoints, whose peers are in this process.

    Everyone else may send native values, arrays and functions by
    reference only. Use :func:`describe_peer` to say who was refused.
    """
    peer = _property(frame, "Peer-Address")
    if curve == "client":
        return True
    if curve == "server" and _property(frame, "User-Id"):
        return True
    if peer is None:
        return inproc
    if peer.startswith("localhost:"):  # ipc: "localhost:" + SO_PEERCRED uid:gid:pid
        return private_ipc
    return is_loopback_address(peer)


def sender_is_local(frame: zmq.Frame) -> bool:
    """Whether the sender of ``frame`` is on this host: an ipc peer, a
    loopback tcp peer, or an inproc one (no ``Peer-Address``). (Locality,
    not trust: see :func:`sender_may_pickle`.)"""
    peer = _property(frame, "Peer-Address")
    return peer is None or peer.startswith("localhost:") or is_loopback_address(peer)


def describe_peer(frame: zmq.Frame) -> str:
    """A short description of a frame's sender for log lines:
    ``"10.77.0.9"``, ``"10.77.0.2 (CURVE key ...)"``, ``"ipc pid 1234 uid 0"``
    or ``"inproc"``."""
    peer = _property(frame, "Peer-Address")
    user = _property(frame, "User-Id")
    if peer is None:
        text = "inproc"
    elif peer.startswith("localhost:"):
        parts = peer.split(":")
        text = ("ipc pid %s uid %s" % (parts[3], parts[1]) if len(parts) == 4
                else "ipc %s" % peer)
    else:
        text = peer
    return "%s (CURVE key %s)" % (text, user) if user else text
