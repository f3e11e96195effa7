"""Across real TCP between network-namespace hosts (tests/netns.py): CURVE
admits the keyed and refuses intruders at the handshake, a remote peer's
address is not local, and ZMTP heartbeats notice a cut cable.

Plain pyzmq peers (tests/netns_peer.py) with zmq_cluster.security and
zmq_cluster.trust only. Hosts: head 10.77.0.1, worker1 .2, worker2 .3,
intruder .4.
"""

import os
import subprocess
import time

import pytest

from netns import Lab, require_namespaces
from zmq_cluster.security import keygen, load_public_key

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netns_peer.py")
HEAD = "10.77.0.1"


def monitor(name, value=None):
    """An event matcher: a socket monitor event by name (a trailing ``*``
    matches any suffix) and value."""
    def match(e):
        if e.get("event") != "monitor" or (value is not None and e.get("value") != value):
            return False
        return (e["name"].startswith(name[:-1]) if name.endswith("*") else e["name"] == name)
    return match


def received(**fields):
    """An event matcher: a received message with these fields."""
    return lambda e: e.get("event") == "recv" and all(e.get(k) == v for k, v in fields.items())


@pytest.fixture(scope="module")
def lab():
    require_namespaces()
    with Lab(("head", "worker1", "worker2", "intruder")) as lab:
        yield lab


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A keygen directory, and one of an outsider (valid keys, not authorized)."""
    base = tmp_path_factory.mktemp("netns-keys")
    return keygen(base / "cluster"), keygen(base / "outsider")


def test_lab_hosts_have_their_address_and_no_way_out(lab):
    addresses = lab.run("worker1", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "10.77.0.2/24" in addresses
    routes = lab.run("worker1", "ip", "-4", "route").stdout
    assert "10.77.0.0/24" in routes and "default" not in routes


def test_curve_admits_keyed_client_and_refuses_intruders_at_handshake(lab, keys):
    cluster, outsider = keys
    server = lab.python("head", PEER, "server", "--bind", "tcp://0.0.0.0:5601",
                        "--keys", str(cluster.directory))
    server.expect("ready")
    address = "tcp://%s:5601" % HEAD

    # An intruder with no keys at all: the mechanisms differ (NULL vs
    # CURVE). The server reports HANDSHAKE_FAILED_PROTOCOL (mechanism
    # mismatch) or, when the intruder hung up first, _NO_DETAIL.
    bare = lab.python("intruder", PEER, "client", "--connect", address, "--send", "attack")
    bare.expect(monitor("HANDSHAKE_FAILED_PROTOCOL"))
    server.expect(monitor("HANDSHAKE_FAILED_*"))

    # An intruder with a key pair of its own and the scheduler's (public)
    # key: the handshake completes its crypto, then ZAP refuses the key.
    forged = lab.python("intruder", PEER, "client", "--connect", address, "--send", "attack",
                        "--secret-key", str(outsider.client_secret),
                        "--server-key", str(cluster.scheduler_public))
    forged.expect(monitor("HANDSHAKE_FAILED_AUTH", 400))
    server.expect(monitor("HANDSHAKE_FAILED_AUTH", 400))

    # The keyed client gets through, authenticated by its key.
    client = lab.python("worker1", PEER, "client", "--connect", address, "--send", "hello",
                        "--keys", str(cluster.directory))
    reply = client.expect(received(body="reply:hello"))
    assert reply["may_pickle"] is True  # a CURVE client: its one peer proved its key
    got = server.expect(received(body="hello"))
    client_key = load_public_key(cluster.client_public).decode()
    assert got["peer_address"] == "10.77.0.2"
    assert got["user_id"] == client_key
    assert got["may_pickle"] is True

    for intruder in (bare, forged):
        events = intruder.finish()
        assert not [e for e in events if e["event"] == "recv"], events
        assert events[-1] == {"event": "stats", "received": 0, "_time": events[-1]["_time"]}
    events = server.finish()
    messages = [e for e in events if e["event"] == "recv"]
    assert [(m["body"], m["peer_address"]) for m in messages] == [("hello", "10.77.0.2")]
    stats = events[-1]
    assert stats["event"] == "stats" and stats["received"] == 1
    assert stats["accepted"] >= 1 and stats["refused"] >= 1


def test_remote_and_own_address_peers_are_not_local_loopback_is(lab):
    server = lab.python("head", PEER, "server", "--bind", "tcp://0.0.0.0:5602")
    server.expect("ready")
    remote = lab.python("worker1", PEER, "client", "--connect", "tcp://%s:5602" % HEAD,
                        "--send", "remote")
    got = server.expect(received(body="remote"))
    assert (got["peer_address"], got["may_pickle"]) == ("10.77.0.2", False)
    assert got["user_id"] is None
    reply = remote.expect(received(body="reply:remote"))
    assert (reply["peer_address"], reply["may_pickle"]) == (HEAD, False)

    # The head itself, through its own network address: not loopback.
    own = lab.python("head", PEER, "client", "--connect", "tcp://%s:5602" % HEAD,
                     "--send", "own-address")
    got = server.expect(received(body="own-address"))
    assert (got["peer_address"], got["may_pickle"]) == (HEAD, False)
    # ... and through loopback: local.
    loop = lab.python("head", PEER, "client", "--connect", "tcp://127.0.0.1:5602",
                      "--send", "loopback")
    got = server.expect(received(body="loopback"))
    assert (got["peer_address"], got["may_pickle"]) == ("127.0.0.1", True)
    own.expect(received(body="reply:own-address"))
    loop.expect(received(body="reply:loopback"))
    for peer in (remote, own, loop, server):
        peer.finish()


def test_heartbeats_drop_a_connection_whose_cable_is_cut(lab, record_property):
    ivl_ms, timeout_ms = 200, 1000
    beating = lab.python("head", PEER, "server", "--bind", "tcp://0.0.0.0:5603",
                         "--heartbeat", str(ivl_ms), str(timeout_ms))
    silent = lab.python("head", PEER, "server", "--bind", "tcp://0.0.0.0:5604")
    beating.expect("ready")
    silent.expect("ready")
    clients = [lab.python("worker2", PEER, "client", "--connect", "tcp://%s:%d" % (HEAD, port),
                          "--send", "up") for port in (5603, 5604)]
    for server, client in zip((beating, silent), clients):
        server.expect(received(body="up"))
        client.expect(received(body="reply:up"))
    try:
        cut = time.monotonic()
        lab.link_down("worker2")
        dropped = beating.expect(monitor("DISCONNECTED"),
                                 timeout=(ivl_ms + timeout_ms) / 1000 + 3)
        seconds = dropped["_time"] - cut
        record_property("heartbeat_drop_seconds", round(seconds, 3))
        assert seconds < (ivl_ms + timeout_ms) / 1000 + 1.0, seconds
        # Without heartbeats nothing noticed: an idle TCP connection whose
        # cable is cut stays up for as long as nothing is sent.
        assert not [e for e in silent.drain() if monitor("DISCONNECTED")(e)]
    finally:
        lab.link_up("worker2")
    for peer in (*clients, beating, silent):
        peer.finish()


def test_lab_close_removes_every_namespace_and_process():
    require_namespaces()
    lab = Lab(("a", "b"))
    prefix = lab.prefix
    peer = lab.python("a", "-c", "import sys; print('{\"event\": \"ready\"}', flush=True);"
                      " sys.stdin.read()")
    peer.expect("ready")
    lab.close()
    assert peer.process.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in listed
