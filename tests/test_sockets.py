"""FutureSocket / Connect, InitSocket, MakeSocket, SocketTypeToString."""

import pickle

import pytest
import zmq

from zmq_cluster import Connect, FutureSocket, InitSocket, MakeSocket, SocketTypeToString


def test_connect_is_an_alias_of_future_socket():
    assert Connect is FutureSocket


def test_future_socket_defaults_and_attributes():
    fs = FutureSocket()
    assert (fs.url, fs.type, fs.bind, fs.options, fs.pre_delay, fs.post_delay) == (
        None, None, False, None, None, None)
    fs = FutureSocket("inproc://x", zmq.PUSH, bind=True, options={zmq.LINGER: 0})
    assert (fs.url, fs.type, fs.bind, fs.options) == (
        "inproc://x", zmq.PUSH, True, {zmq.LINGER: 0})
    assert "PUSH" in repr(fs)


def test_future_socket_pickles_for_other_processes():
    fs = FutureSocket("tcp://127.0.0.1:5555", zmq.PULL, options={zmq.RCVHWM: 10})
    copy = pickle.loads(pickle.dumps(fs))
    assert (copy.url, copy.type, copy.bind, copy.options) == (fs.url, fs.type, fs.bind,
                                                                 fs.options)


def test_make_socket_binds_connects_and_applies_options(ctx):
    server = FutureSocket("inproc://make", zmq.PULL, bind=True,
                          options={zmq.RCVHWM: 7}).MakeSocket(ctx)
    client = FutureSocket("inproc://make", zmq.PUSH).MakeSocket(ctx)
    try:
        assert server.type == zmq.PULL and client.type == zmq.PUSH
        assert server.getsockopt(zmq.RCVHWM) == 7
        client.send(b"hello")
        assert server.poll(5000) and server.recv() == b"hello"
    finally:
        server.close(0)
        client.close(0)


def test_make_socket_arguments_take_precedence(ctx):
    fs = FutureSocket("inproc://nowhere", zmq.PUSH, bind=False, options={zmq.SNDHWM: 3})
    sock = fs.MakeSocket(ctx, url="inproc://prec", type=zmq.PULL, bind=True,
                         options={zmq.RCVHWM: 9})
    try:
        assert sock.type == zmq.PULL
        assert sock.getsockopt(zmq.RCVHWM) == 9
        assert sock.getsockopt(zmq.SNDHWM) == 3  # the object's options still apply
        assert sock.getsockopt_string(zmq.LAST_ENDPOINT) == "inproc://prec"
    finally:
        sock.close(0)
    # the FutureSocket itself is unchanged
    assert (fs.url, fs.type, fs.bind) == ("inproc://nowhere", zmq.PUSH, False)


def test_make_socket_accepts_str_options(ctx):
    sock = FutureSocket("inproc://sub", zmq.SUB, options={zmq.SUBSCRIBE: "topic"}).MakeSocket(ctx)
    sock.close(0)


def test_make_socket_needs_url_and_type(ctx):
    with pytest.raises(ValueError, match="no URL"):
        FutureSocket(type=zmq.PUSH).MakeSocket(ctx)
    with pytest.raises(ValueError, match="no socket type"):
        FutureSocket("inproc://t").MakeSocket(ctx)


def test_make_socket_closes_the_socket_when_bind_fails(ctx):
    first = MakeSocket(ctx, "inproc://taken", zmq.PULL, bind=True)
    try:
        with pytest.raises(zmq.ZMQError):
            MakeSocket(ctx, "inproc://taken", zmq.PULL, bind=True)
    finally:
        first.close(0)
    # ctx.destroy in the fixture would hang on a leaked open socket with linger


def test_make_socket_delays(ctx, monkeypatch):
    slept = []
    monkeypatch.setattr("zmq_cluster.sockets.time.sleep", slept.append)
    fs = FutureSocket("inproc://delay", zmq.PULL, bind=True)
    fs.pre_delay, fs.post_delay = 0.25, 0.5
    fs.MakeSocket(ctx).close(0)
    assert slept == [0.25, 0.5]
    FutureSocket("inproc://delay2", zmq.PULL, bind=True).MakeSocket(
        ctx, pre_delay=1, post_delay=2).close(0)
    assert slept == [0.25, 0.5, 1, 2]


def test_module_make_socket_shortcut(ctx):
    sock = MakeSocket(ctx, "inproc://short", zmq.PUB, bind=True, options={zmq.SNDHWM: 5})
    try:
        assert sock.type == zmq.PUB and sock.getsockopt(zmq.SNDHWM) == 5
    finally:
        sock.close(0)


def test_init_socket_from_future_socket(ctx):
    sock = InitSocket(ctx, FutureSocket("inproc://init", bind=True), zmq.PULL)
    try:
        assert sock.type == zmq.PULL
    finally:
        sock.close(0)


def test_init_socket_type_argument_overrides_future_type(ctx):
    sock = InitSocket(ctx, FutureSocket("inproc://init2", zmq.PUSH, bind=True), zmq.PULL)
    try:
        assert sock.type == zmq.PULL
    finally:
        sock.close(0)


def test_init_socket_passes_kwargs(ctx):
    sock = InitSocket(ctx, FutureSocket("inproc://unused"), zmq.PULL, url="inproc://init3",
                      bind=True, options={zmq.RCVHWM: 4})
    try:
        assert sock.getsockopt(zmq.RCVHWM) == 4
        assert sock.getsockopt_string(zmq.LAST_ENDPOINT) == "inproc://init3"
    finally:
        sock.close(0)


def test_init_socket_checks_existing_socket_type(ctx):
    sock = ctx.socket(zmq.PUSH)
    try:
        assert InitSocket(ctx, sock) is sock
        assert InitSocket(ctx, sock, zmq.PUSH) is sock
        with pytest.raises(ValueError, match="expected a PULL socket, got a PUSH socket"):
            InitSocket(ctx, sock, zmq.PULL)
    finally:
        sock.close(0)


def test_init_socket_rejects_other_things(ctx):
    with pytest.raises(TypeError, match="FutureSocket or a zmq.Socket"):
        InitSocket(ctx, "inproc://x", zmq.PULL)


@pytest.mark.parametrize("name", ["PAIR", "PUB", "SUB", "REQ", "REP", "DEALER", "ROUTER",
                                  "PULL", "PUSH", "XPUB", "XSUB", "STREAM"])
def test_socket_type_to_string(name):
    assert SocketTypeToString(getattr(zmq, name)) == name


def test_socket_type_to_string_rejects_unknown():
    with pytest.raises(ValueError, match="unknown socket type"):
        SocketTypeToString(12345)
