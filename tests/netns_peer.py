"""A plain-pyzmq peer run inside a test host by tests/netns.py's Lab.

    python netns_peer.py server --bind tcp://0.0.0.0:5601 [--keys DIR]
                                [--heartbeat IVL_MS TIMEOUT_MS]
    python netns_peer.py client --connect tcp://10.77.0.1:5601 [--keys DIR |
                                --secret-key FILE --server-key FILE] [--send TEXT]

Prints one JSON object a line on stdout: {"event": "ready"} once set up;
{"event": "monitor", "name": "HANDSHAKE_SUCCEEDED", "value": ...} for each
socket monitor event; {"event": "recv", ...} for each message (the server
with the frame's Peer-Address, User-Id and the pickle verdict, then it
replies); {"event": "stats", ...} last. It stops when stdin closes (the
test's signal, also sent when the test process dies) or after --lifetime
seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from zmq_cluster.security import ClientSecurity, ServerSecurity
from zmq_cluster.trust import describe_peer, sender_may_pickle


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def prop(frame: zmq.Frame, name: str) -> object:
    try:
        return frame.get(name)
    except zmq.ZMQError:
        return None


def monitor_event(monitor: zmq.Socket) -> None:
    event = parse_monitor_message(monitor.recv_multipart())
    emit(event="monitor", name=zmq.Event(event["event"]).name, value=int(event["value"]),
         endpoint=event["endpoint"].decode("utf-8", "replace"))


def pump(sock: zmq.Socket, monitor: zmq.Socket, lifetime: float, on_message) -> None:
    """Print monitor events and hand each message to ``on_message`` until
    stdin closes or ``lifetime`` seconds have passed."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    poller.register(sys.stdin, zmq.POLLIN)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        ready = dict(poller.poll(100))
        if sys.stdin.fileno() in ready and not sys.stdin.readline():
            break
        if monitor in ready:
            monitor_event(monitor)
        if sock in ready:
            on_message(sock.recv_multipart(copy=False))
    sock.disable_monitor()
    monitor.close()
    sock.close()


def serve(args: argparse.Namespace, ctx: zmq.Context) -> None:
    auth = None
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    if args.keys:
        security = ServerSecurity.from_directory(args.keys)
        auth = security.start_authenticator(ctx)
        security.apply(sock)
    if args.heartbeat:
        sock.heartbeat_ivl, sock.heartbeat_timeout = args.heartbeat
    monitor = sock.get_monitor_socket()
    sock.bind(args.bind)
    curve = "server" if args.keys else None
    received = []

    def reply(frames: list) -> None:
        routing_id, body = frames
        received.append(body)
        emit(event="recv", body=body.bytes.decode("utf-8", "replace"),
             peer_address=prop(body, "Peer-Address"), user_id=prop(body, "User-Id"),
             may_pickle=sender_may_pickle(body, curve=curve), peer=describe_peer(body))
        sock.send_multipart([routing_id, b"reply:" + body.bytes])

    emit(event="ready", endpoint=sock.getsockopt_string(zmq.LAST_ENDPOINT))
    pump(sock, monitor, args.lifetime, reply)
    stats = {"received": len(received)}
    if auth is not None:
        stats.update(accepted=auth.accepted, refused=auth.refused)
        auth.stop()  # after the server socket is closed
    emit(event="stats", **stats)


def connect(args: argparse.Namespace, ctx: zmq.Context) -> None:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if args.keys:
        ClientSecurity.from_directory(args.keys).apply(sock)
    elif args.secret_key:
        ClientSecurity.from_files(args.secret_key, args.server_key).apply(sock)
    monitor = sock.get_monitor_socket()
    sock.connect(args.connect)
    if args.send is not None:
        try:  # not blocking: a refused handshake leaves no pipe to queue on
            sock.send(args.send.encode(), zmq.DONTWAIT)
        except zmq.Again:
            emit(event="unsent")
    curve = "client" if (args.keys or args.secret_key) else None
    received = []

    def show(frames: list) -> None:
        frame = frames[-1]
        received.append(frame)
        emit(event="recv", body=frame.bytes.decode("utf-8", "replace"),
             peer_address=prop(frame, "Peer-Address"),
             may_pickle=sender_may_pickle(frame, curve=curve))

    emit(event="ready")
    pump(sock, monitor, args.lifetime, show)
    emit(event="stats", received=len(received))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--bind", required=True)
    server.add_argument("--keys")
    server.add_argument("--heartbeat", type=int, nargs=2, metavar=("IVL_MS", "TIMEOUT_MS"))
    client = sub.add_parser("client")
    client.add_argument("--connect", required=True)
    client.add_argument("--keys")
    client.add_argument("--secret-key")
    client.add_argument("--server-key")
    client.add_argument("--send")
    for p in (server, client):
        p.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args()
    ctx = zmq.Context()
    try:
        (serve if args.role == "server" else connect)(args, ctx)
    finally:
        ctx.term()


if __name__ == "__main__":
    main()
