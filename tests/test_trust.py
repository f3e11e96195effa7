"""The listening policy, and the pickle rule on frames from real sockets
(ipc, tcp loopback over IPv4, IPv6 and IPv4-mapped, inproc, CURVE). The
remote-address cases are in test_netns.py."""

import os
import shutil
import tempfile

import pytest
import zmq

from zmq_cluster.security import ClientSecurity, ServerSecurity, keygen
from zmq_cluster.trust import (
    EndpointKind, InsecureListenError, check_listen, classify_endpoint, describe_peer,
    is_loopback_address, is_private_ipc, sender_may_pickle,
)

WAIT_MS = 5000


@pytest.mark.parametrize("endpoint, kind", [
    ("inproc://x", EndpointKind.INPROC),
    ("ipc:///tmp/zc/sock", EndpointKind.IPC),
    ("ipc://@abstract", EndpointKind.IPC),
    ("tcp://127.0.0.1:5555", EndpointKind.LOOPBACK),
    ("tcp://127.3.2.1:*", EndpointKind.LOOPBACK),
    ("tcp://[::1]:5555", EndpointKind.LOOPBACK),
    ("tcp://::1:5555", EndpointKind.LOOPBACK),
    ("tcp://[::ffff:127.0.0.1]:5555", EndpointKind.LOOPBACK),
    ("tcp://localhost:5555", EndpointKind.LOOPBACK),
    ("TCP://127.0.0.1:1", EndpointKind.LOOPBACK),
    ("tcp://10.0.0.1;127.0.0.1:5555", EndpointKind.LOOPBACK),  # source;destination
    ("tcp://0.0.0.0:5555", EndpointKind.NETWORK),
    ("tcp://*:5555", EndpointKind.NETWORK),
    ("tcp://*:*", EndpointKind.NETWORK),
    ("tcp://[::]:5555", EndpointKind.NETWORK),
    ("tcp://10.77.0.1:5555", EndpointKind.NETWORK),
    ("tcp://128.0.0.1:5555", EndpointKind.NETWORK),
    ("tcp://[fe80::1%eth0]:5555", EndpointKind.NETWORK),
    ("tcp://head.example.org:5555", EndpointKind.NETWORK),
    ("tcp://eth0:5555", EndpointKind.NETWORK),
    ("tcp://lo:5555", EndpointKind.NETWORK),
    ("tcp://127.0.0.1;10.0.0.1:5555", EndpointKind.NETWORK),
    ("pgm://eth0;239.192.1.1:5555", EndpointKind.NETWORK),
    ("ws://127.0.0.1:80", EndpointKind.NETWORK),
])
def test_classify_endpoint(endpoint, kind):
    assert classify_endpoint(endpoint) is kind


@pytest.mark.parametrize("endpoint", ["127.0.0.1:5555", "foo://x", "tcp://5555",
                                      "tcp://host:", ""])
def test_classify_endpoint_rejects_non_endpoints(endpoint):
    with pytest.raises(ValueError):
        classify_endpoint(endpoint)


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.255.255.254", True), ("::1", True),
    ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", False), ("10.77.0.1", False),
    ("0.0.0.0", False), ("::", False), ("localhost", False), ("localhost:0:0:12", False),
    ("", False), ("fe80::1%eth0", False),
])
def test_is_loopback_address(address, loopback):
    assert is_loopback_address(address) is loopback


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555",
                                      "tcp://head:5555", "tcp://[::]:1"])
def test_network_listen_without_keys_is_refused_with_the_remedy(endpoint):
    with pytest.raises(InsecureListenError) as info:
        check_listen(endpoint, secure=False)
    message = str(info.value)
    assert endpoint in message
    for remedy in ("zmq-cluster keygen DIR", "--keys DIR", "--insecure", "127.0.0.1"):
        assert remedy in message


def test_insecure_network_listen_returns_the_warning():
    warning = check_listen("tcp://0.0.0.0:5555", secure=False, insecure=True)
    assert "tcp://0.0.0.0:5555" in warning
    assert "anyone who can reach this port can run any importable function" in warning


@pytest.mark.parametrize("endpoint", ["ipc:///tmp/x", "inproc://x", "tcp://127.0.0.1:1",
                                      "tcp://[::1]:1", "tcp://localhost:1"])
def test_local_listen_needs_no_keys(endpoint):
    assert check_listen(endpoint, secure=False) is None
    assert check_listen(endpoint, secure=False, insecure=True) is None


def test_secure_listen_is_fine_anywhere():
    assert check_listen("tcp://0.0.0.0:5555", secure=True) is None


def test_is_private_ipc(tmp_path):
    private = tempfile.mkdtemp(prefix="zc-")
    try:
        assert is_private_ipc("ipc://%s/sock" % private)
        os.chmod(private, 0o750)
        assert not is_private_ipc("ipc://%s/sock" % private)
    finally:
        shutil.rmtree(private)
    assert not is_private_ipc("ipc://%s/sock" % private)  # gone
    assert not is_private_ipc("ipc://@abstract")
    assert not is_private_ipc("tcp://127.0.0.1:1")
    assert not is_private_ipc("ipc://")


# ----------------------------------------------------- frames from real sockets


def exchange(ctx, url, server_setup=None, client_setup=None, ipv6=False):
    """Send one message client -> server -> client; the two received frames."""
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (server, client):
        sock.linger = 0
        sock.rcvtimeo = WAIT_MS
        sock.ipv6 = ipv6
    try:
        if server_setup:
            server_setup(server)
        if client_setup:
            client_setup(client)
        server.bind(url)
        # A wildcard bind ("tcp://[::]:PORT") is reached through 127.0.0.1.
        client.connect(server.getsockopt_string(zmq.LAST_ENDPOINT).replace("[::]", "127.0.0.1"))
        client.send(b"x")
        routing_id, at_server = server.recv_multipart(copy=False)
        server.send_multipart([routing_id.bytes, b"y"])
        at_client = client.recv(copy=False)
        return at_server, at_client
    finally:
        server.close(0)
        client.close(0)


def test_ipc_peer_is_local_only_in_a_private_directory(ctx, ipc_url):
    at_server, at_client = exchange(ctx, ipc_url("trust"))
    assert at_server.get("Peer-Address") == "localhost:%d:%d:%d" % (
        os.geteuid(), os.getegid(), os.getpid())
    url = ipc_url("trust")
    assert is_private_ipc(url)  # conftest's directory is a mkdtemp
    for frame in (at_server, at_client):
        assert sender_may_pickle(frame, private_ipc=True)
        assert not sender_may_pickle(frame)
    assert describe_peer(at_server) == "ipc pid %d uid %d" % (os.getpid(), os.geteuid())


def test_tcp_loopback_peers_are_local(ctx):
    at_server, at_client = exchange(ctx, "tcp://127.0.0.1:*")
    assert at_server.get("Peer-Address") == at_client.get("Peer-Address") == "127.0.0.1"
    assert sender_may_pickle(at_server) and sender_may_pickle(at_client)
    assert describe_peer(at_server) == "127.0.0.1"


def test_ipv6_loopback_peers_are_local(ctx):
    at_server, _ = exchange(ctx, "tcp://[::1]:*", ipv6=True)
    assert at_server.get("Peer-Address") == "::1"
    assert sender_may_pickle(at_server)


def test_ipv4_peer_of_an_ipv6_socket_is_seen_mapped_and_local(ctx):
    at_server, _ = exchange(ctx, "tcp://*:*", server_setup=lambda s: setattr(s, "ipv6", True))
    assert at_server.get("Peer-Address") == "::ffff:127.0.0.1"
    assert sender_may_pickle(at_server)


def test_inproc_frames_have_no_properties_and_are_local_when_said(ctx):
    at_server, at_client = exchange(ctx, "inproc://trust-test")
    for frame in (at_server, at_client):
        with pytest.raises(zmq.ZMQError):
            frame.get("Peer-Address")
        assert sender_may_pickle(frame, inproc=True)
        assert not sender_may_pickle(frame)
        assert not sender_may_pickle(frame, private_ipc=True)
        assert describe_peer(frame) == "inproc"


def test_curve_frames(ctx, tmp_path):
    keys = keygen(tmp_path / "keys")
    server_security = ServerSecurity.from_directory(keys.directory)
    client_security = ClientSecurity.from_directory(keys.directory)
    with server_security.start_authenticator(ctx):
        at_server, at_client = exchange(ctx, "tcp://127.0.0.1:*", server_security.apply,
                                        client_security.apply)
    user = client_security.public_key.decode()
    assert at_server.get("User-Id") == user
    assert sender_may_pickle(at_server, curve="server")
    with pytest.raises(zmq.ZMQError):  # no ZAP on the client side
        at_client.get("User-Id")
    assert sender_may_pickle(at_client, curve="client")
    assert describe_peer(at_server) == "127.0.0.1 (CURVE key %s)" % user
