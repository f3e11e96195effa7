"""Helpers of the scheduler tests that speak its protocol by hand: bounded
reads that pass over the scheduler's liveness PROBEs. (Not a conftest.py:
tests import the top-level conftest by that name.)"""

from zmq_cluster import schedproto as sp

#: Milliseconds a test waits for a message, at most.
WAIT_MS = 10000


def recv(sock, timeout=WAIT_MS):
    """The next message other than the scheduler's liveness PROBEs:
    ``(parsed control frame, the other frames)``; fails the test when
    nothing arrives within ``timeout`` ms."""
    while True:
        assert sock.poll(timeout), "nothing arrived within %d ms" % timeout
        frames = sock.recv_multipart()
        ctl = sp.parse_ctl(frames[0])
        if ctl[0] != sp.PROBE:
            return ctl, frames[1:]


def nothing(sock, ms=300):
    """Nothing but PROBEs arrives (a bounded look)."""
    while sock.poll(ms):
        if sp.parse_ctl(sock.recv_multipart()[0])[0] != sp.PROBE:
            return False
    return True
