"""Liveness logic without sockets: descriptor reuse, pending closes."""

import zmq

from zmq_cluster.liveness import FdMap, heartbeat_options


def test_disconnect_names_the_peer_once():
    m = FdMap()
    assert m.hello(7, b"a") is None
    assert m.disconnected(7) == b"a"
    assert m.disconnected(7) is None
    assert len(m) == 0


def test_reused_descriptor_before_the_old_event():
    m = FdMap()
    m.hello(7, b"old")
    # The kernel gave fd 7 to a new connection; its HELLO is read before the
    # monitor's event for the old one.
    assert m.hello(7, b"new") == b"old"
    assert m.disconnected(7) is None       # the old connection's event
    assert m.disconnected(7) == b"new"     # the new one's


def test_forgotten_peer_event_names_nobody():
    m = FdMap()
    m.hello(5, b"a")
    m.forget(b"a")                          # said BYE / declared dead
    m.hello(5, b"b")                        # fd reused before a's event was read
    assert m.disconnected(5) is None
    assert m.disconnected(5) == b"b"


def test_same_peer_hello_again_cancels_its_pending_close():
    m = FdMap()
    m.hello(3, b"a")
    m.forget(b"a")                          # declared dead, still connected
    m.hello(3, b"a")                        # says HELLO again on the same connection
    assert m.disconnected(3) == b"a"


def test_heartbeat_options():
    opts = heartbeat_options(1.0)
    assert opts[zmq.HEARTBEAT_TIMEOUT] == 1000
    assert opts[zmq.HEARTBEAT_IVL] == 250
    assert opts[zmq.HEARTBEAT_TTL] == 1000
    assert heartbeat_options(0.01)[zmq.HEARTBEAT_IVL] == 20
