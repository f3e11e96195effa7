"""The wire layer's primitives and loops, each twin called directly
(zmq_cluster._wire_py always, the compiled zmq_cluster._fastpath.wire when
built): same bytes, same behaviour, zero-copy lifetime (trackers), copy
counters, and each loop's contract (the sockets and callables it is given).
No node is involved and nothing is patched."""

import gc
import itertools
import threading
import time

import numpy as np
import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import _framing_py
from zmq_cluster._wire_common import COMMAND_CHECK_EVERY, STOP, peek_header
from zmq_cluster.exceptions import MessageFormatError
from zmq_cluster.protocol import (
    COPY_THRESHOLD, KIND_COMMAND, KIND_REQUEST, KIND_RESULT, SPLIT_BYTES,
)

from helpers import WAIT_MS, WIRE_TWINS, Stats, push_pull

MIB = 1 << 20


@pytest.fixture(params=WIRE_TWINS, ids=["py", "cy"][:len(WIRE_TWINS)])
def wire(request):
    """A wire twin module, called directly."""
    return request.param


@pytest.fixture
def inproc_pair(ctx):
    """(push, pull) over inproc: a message stays in libzmq's pipe, holding
    the sender's memory, until the receiver reads it."""
    with push_pull(ctx, "inproc://wire-pair") as pair:
        yield pair


def _recv(wire, socket, **kwargs):
    assert socket.poll(WAIT_MS), "nothing received within %d ms" % WAIT_MS
    return wire.recv_message(socket, **kwargs)


def _encode(obj, kind, task_id=0):
    return [bytes(memoryview(f).cast("B")) for f in _framing_py.encode(obj, kind, task_id)]


# ------------------------------------------------------------ send/receive

PAYLOADS = [
    None, 7, "text", {"a": [1, 2.5, (3, b"x")]},
    np.arange(10.0),                                  # small array
    np.arange(COPY_THRESHOLD // 8 + 1, dtype=np.float64),   # just over the threshold
    zc.ClusterRequest({"x": np.ones((300, 300)), "y": np.zeros(3)}, "meta"),
    {1, 2},                                           # pickled
]


@pytest.mark.parametrize("obj", PAYLOADS, ids=range(len(PAYLOADS)))
def test_same_bytes_on_the_wire_as_framing_encode(wire, pair, obj):
    push, pull = pair
    wire.send_message(push, obj, KIND_REQUEST, 42)
    assert pull.poll(WAIT_MS)
    assert [bytes(f) for f in pull.recv_multipart()] == _encode(obj, KIND_REQUEST, 42)


@pytest.mark.parametrize("obj", PAYLOADS, ids=range(len(PAYLOADS)))
def test_round_trip(wire, pair, obj):
    push, pull = pair
    wire.send_message(push, obj, KIND_RESULT, 9)
    kind, task_id, got = _recv(wire, pull)
    assert (kind, task_id) == (KIND_RESULT, 9)
    assert repr(got) == repr(obj) if not isinstance(obj, np.ndarray) else np.array_equal(got, obj)


def test_twins_read_each_other(pair):
    push, pull = pair
    for sender in WIRE_TWINS:
        for receiver in WIRE_TWINS:
            sender.send_message(push, {"k": np.arange(3)}, KIND_COMMAND, 3)
            kind, task_id, got = _recv(receiver, pull)
            assert (kind, task_id) == (KIND_COMMAND, 3)
            np.testing.assert_array_equal(got["k"], np.arange(3))


def test_malformed_message_has_its_header(wire, pair):
    push, pull = pair
    frames = _encode(np.arange(4.0), KIND_REQUEST, 77)
    push.send_multipart([frames[0]] + [b"x"] * (len(frames) - 1) + [b"extra"])
    with pytest.raises(MessageFormatError) as info:
        _recv(wire, pull)
    assert info.value.header == (KIND_REQUEST, 77)
    push.send(b"garbage")
    with pytest.raises(MessageFormatError) as info:
        _recv(wire, pull)
    assert info.value.header is None
    wire.send_message(push, 5, KIND_REQUEST, 1)  # the next message reads fine
    assert _recv(wire, pull) == (KIND_REQUEST, 1, 5)


def test_peek_header_reads_any_kind_and_nothing_else():
    header = _encode(None, KIND_RESULT, 5)[0]
    assert peek_header([header]) == (KIND_RESULT, 5)
    assert peek_header([header[:3] + b"\x09" + header[4:]]) == (9, 5)  # unknown kind: still read
    assert peek_header([zmq.Frame(header)]) == (KIND_RESULT, 5)
    for unreadable in ([], [b""], [header[:15]], [b"ZX" + header[2:]], [header[:2] + b"\x01"
                                                                         + header[3:]]):
        assert peek_header(unreadable) is None


def test_nonblocking_receive_raises_again(wire, pair):
    with pytest.raises(zmq.Again):
        wire.recv_message(pair[1], zmq.NOBLOCK)


def test_closed_and_foreign_sockets_are_refused(wire, ctx):
    sock = ctx.socket(zmq.PUSH)
    sock.close()
    with pytest.raises(zmq.ZMQError):
        wire.send_message(sock, 1, KIND_REQUEST)
    with pytest.raises(zmq.ZMQError):
        wire.recv_any([sock], 0)
    with pytest.raises((TypeError, AttributeError)):
        wire.send_message(object(), 1, KIND_REQUEST)


def test_nothing_is_sent_when_the_object_cannot_be_encoded(wire, inproc_pair):
    push, pull = inproc_pair
    with pytest.raises(TypeError):
        wire.send_message(push, lambda: None, KIND_REQUEST, 1, envelope=[b"id"])
    wire.send_message(push, 2, KIND_REQUEST, 2)
    assert [bytes(f) for f in pull.recv_multipart()] == _encode(2, KIND_REQUEST, 2)


def test_stats_count_messages_and_copies_the_same_in_both_twins(pair):
    push, pull = pair
    small = np.arange(1000, dtype=np.uint8)           # below COPY_THRESHOLD
    large = np.ones(MIB // 2, dtype=np.uint8)         # zero-copy
    huge = np.ones(SPLIT_BYTES + 8, dtype=np.uint8)    # split: 8 MiB + an 8-byte frame
    counts = []
    for twin in WIRE_TWINS:
        sent, received = Stats(), Stats()
        for obj in ({"s": small, "l": large}, zc.ClusterRequest(small, None), large, huge):
            twin.send_message(push, obj, KIND_REQUEST, 1, 0, sent)
            _recv(twin, pull, stats=received)
        assert sent.messages_sent == received.messages_received == 4
        assert sent.messages_received == received.messages_sent == 0
        counts.append((sent.copied_bytes, received.copied_bytes))
    assert len(set(counts)) == 1
    # The two small arrays are copied on the way out (in the header) and on
    # the way in; the large one never; the split one's 8-byte last frame is
    # copied into libzmq on the way out, and the whole array assembled
    # (copied) on the way in, unless its frames were a view already at 64
    # (never over ipc and tcp; over inproc the sender's memory is the frame,
    # and one frame at 64 is still several frames to assemble).
    assert counts[0] == (2 * small.nbytes + 8, 2 * small.nbytes + huge.nbytes)


# --------------------------------------------------------- zero-copy lifetime

def test_small_messages_are_untracked(wire, inproc_pair):
    push, pull = inproc_pair
    assert wire.send_message(push, np.arange(100.0), KIND_REQUEST) is None
    assert wire.send_message(push, "x", KIND_REQUEST) is None
    _recv(wire, pull)
    _recv(wire, pull)


def test_large_array_is_not_released_until_the_receiver_reads(wire, inproc_pair):
    push, pull = inproc_pair
    arr = np.ones(MIB // 16)  # 512 KiB: a view on the frame (1 MiB and more may be copied)
    tracker = wire.send_message(push, arr, KIND_REQUEST, 1)
    assert tracker is not None
    assert not tracker.done
    with pytest.raises(zmq.NotDone):
        tracker.wait(0.05)  # nobody read it: libzmq still holds the array
    _, _, got = _recv(wire, pull)
    np.testing.assert_array_equal(got, arr)
    assert not tracker.done or np.shares_memory(got, arr)  # inproc: a view of ours
    del got
    gc.collect()
    tracker.wait(WAIT_MS / 1000)
    assert tracker.done


def test_every_zero_copy_frame_of_a_message_is_tracked(wire, inproc_pair):
    push, pull = inproc_pair
    first, second = np.ones(MIB // 16), np.zeros(MIB // 16)
    tracker = wire.send_message(push, [first, 5, second], KIND_REQUEST, 1)
    assert len(tracker.events) == 2
    _, _, (a, five, b) = _recv(wire, pull)
    assert five == 5
    del b  # the second frame goes; the first is still held by ``a``
    gc.collect()
    with pytest.raises(zmq.NotDone):
        tracker.wait(0.05)
    del a
    gc.collect()
    tracker.wait(WAIT_MS / 1000)


def test_every_part_of_a_split_array_is_tracked(wire, inproc_pair):
    push, pull = inproc_pair
    arr = np.ones(3 * SPLIT_BYTES // 8)
    tracker = wire.send_message(push, arr, KIND_REQUEST, 1)
    assert len(tracker.events) == 3
    with pytest.raises(zmq.NotDone):
        tracker.wait(0.05)  # nobody read it: libzmq still holds every part
    frames = pull.recv_multipart(copy=False)
    assert len(frames) == 4
    assert all(np.shares_memory(np.frombuffer(f.buffer, np.uint8), arr) for f in frames[1:])
    _, _, got = wire.decode_message(frames)
    assert not np.shares_memory(got, arr) and got.ctypes.data % 64 == 0
    with pytest.raises(zmq.NotDone):
        tracker.wait(0.05)  # the received frames still hold the parts
    del frames
    gc.collect()
    tracker.wait(WAIT_MS / 1000)  # the assembled array holds none of them
    np.testing.assert_array_equal(got, arr)


# ------------------------------------------- raw frames, envelopes, recv_any

@pytest.fixture
def router_dealer(ctx):
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://wire-router")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"peer-1")
    dealer.connect("inproc://wire-router")
    yield router, dealer
    router.close(0)
    dealer.close(0)


def test_router_receives_whole_messages_and_replies_through_the_envelope(wire, router_dealer):
    router, dealer = router_dealer
    big = np.arange(MIB // 8, dtype=np.float64)
    wire.send_message(dealer, zc.ClusterRequest(big, "m"), KIND_REQUEST, 11)
    index, frames = wire.recv_any([router], WAIT_MS)
    assert index == 0 and frames[0] == b"peer-1" and type(frames[0]) is bytes
    assert all(type(f) is zmq.Frame for f in frames[1:])
    kind, task_id, request = wire.decode_message(frames[1:])
    assert (kind, task_id, request.metadata) == (KIND_REQUEST, 11, "m")
    np.testing.assert_array_equal(request.payload, big)
    tracker = wire.send_message(router, zc.ClusterResult("OK", request.payload), KIND_RESULT,
                                task_id, envelope=[frames[0]])
    assert tracker is not None  # the large array went zero-copy
    kind, task_id, result = _recv(wire, dealer)
    assert (kind, task_id, result.status) == (KIND_RESULT, 11, "OK")
    np.testing.assert_array_equal(result.payload, big)


def test_send_frames_passes_a_message_on_unchanged(wire, ctx, router_dealer):
    router, dealer = router_dealer
    out = ctx.socket(zmq.PULL)
    out.bind("inproc://wire-relay")
    relay = ctx.socket(zmq.PUSH)
    relay.connect("inproc://wire-relay")
    try:
        obj = {"big": np.ones(MIB // 8), "small": np.arange(3)}
        wire.send_message(dealer, obj, KIND_REQUEST, 5)
        _, frames = wire.recv_any([router], WAIT_MS)
        stats = Stats()
        wire.send_frames(relay, frames, 0, stats)           # envelope and all
        assert stats.messages_sent == 1
        assert out.poll(WAIT_MS)
        got = [bytes(f) for f in out.recv_multipart()]
        assert got == [b"peer-1"] + _encode(obj, KIND_REQUEST, 5)
        wire.send_frames(relay, [b"a", memoryview(b"b"), np.zeros(COPY_THRESHOLD, np.uint8)])
        assert out.poll(WAIT_MS)
        assert [len(f) for f in out.recv_multipart()] == [1, 1, COPY_THRESHOLD]
        with pytest.raises(ValueError):
            wire.send_frames(relay, [])
    finally:
        relay.close(0)
        out.close(0)


def test_recv_any_waits_on_n_sockets(wire, ctx):
    pulls, pushes = [], []
    try:
        for i in range(6):  # more than the compiled twin keeps on its stack
            pull = ctx.socket(zmq.PULL)
            pull.bind("inproc://any-%d" % i)
            push = ctx.socket(zmq.PUSH)
            push.connect("inproc://any-%d" % i)
            pulls.append(pull)
            pushes.append(push)
        assert wire.recv_any(pulls, 0) is None
        start = time.monotonic()
        assert wire.recv_any(pulls, 50) is None
        assert time.monotonic() - start >= 0.04
        stats = Stats()
        pushes[5].send(b"five")
        assert wire.recv_any(pulls, WAIT_MS, 0, stats) == (5, [b"five"])
        assert stats.messages_received == 1
        # Several ready: from ``first`` on, in order; then the others.
        for i in (1, 3, 4):
            pushes[i].send_multipart([b"m%d" % i, b"x"])
        for i in (1, 3, 4):
            assert pulls[i].poll(WAIT_MS)
        index, frames = wire.recv_any(pulls, WAIT_MS, first=3)
        assert index == 3 and frames[0] == b"m3" and bytes(frames[1]) == b"x"
        assert wire.recv_any(pulls, WAIT_MS, first=0)[0] == 1
        assert wire.recv_any(pulls, WAIT_MS, first=5)[0] == 4
        # A message that arrives while waiting wakes the wait.
        timer = threading.Timer(0.05, pushes[2].send, (b"late",))
        timer.start()
        assert wire.recv_any(pulls, WAIT_MS) == (2, [b"late"])
        timer.join()
        with pytest.raises(ValueError):
            wire.recv_any(pulls, 0, first=6)
        with pytest.raises(ValueError):
            wire.recv_any([], 0)
    finally:
        for sock in pulls + pushes:
            sock.close(0)


def test_recv_any_waits_out_wake_ups_without_a_message(wire, ctx):
    """A wait woken by libzmq commands that bring no message (a peer
    connecting) goes on waiting for the time left, then still hears a
    message."""
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://any-wake")
    other = ctx.socket(zmq.PULL)
    pushes = []
    try:
        def connect():
            push = ctx.socket(zmq.PUSH)
            push.connect("inproc://any-wake")
            pushes.append(push)
        timer = threading.Timer(0.02, connect)
        timer.start()
        start = time.monotonic()
        assert wire.recv_any([other, pull], 150) is None
        assert time.monotonic() - start >= 0.14
        timer.join()
        timer = threading.Timer(0.02, pushes[0].send, (b"after",))
        timer.start()
        assert wire.recv_any([other, pull], WAIT_MS) == (1, [b"after"])
        timer.join()
    finally:
        for sock in [pull, other] + pushes:
            sock.close(0)


def test_recv_any_after_sends_on_the_same_socket(wire, ctx):
    """Sending on a socket between waits (which may run its pending
    commands) never hides a reply from the next wait: request and reply
    on one DEALER, over tcp, many times."""
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect("tcp://127.0.0.1:%d" % port)
    idle = ctx.socket(zmq.PULL)
    stop = threading.Event()

    def echo():
        while not stop.is_set():
            if router.poll(20):
                router.send_multipart(router.recv_multipart())

    thread = threading.Thread(target=echo)
    thread.start()
    try:
        for i in range(300):
            dealer.send(b"%d" % i)
            got = wire.recv_any([idle, dealer], WAIT_MS, 1)
            assert got == (1, [b"%d" % i])
    finally:
        stop.set()
        thread.join()
        for sock in (router, dealer, idle):
            sock.close(0)


def test_recv_any_keeps_which_sockets_are_drained(wire, ctx):
    """``drained``: a socket found empty is marked and not tried before
    the next wait (still waited on); the socket a message came from is
    unmarked; a message that arrives while waiting on a marked socket
    wakes the wait."""
    pulls, pushes = [], []
    try:
        for i in range(3):
            pull = ctx.socket(zmq.PULL)
            pull.bind("inproc://drained-%d" % i)
            push = ctx.socket(zmq.PUSH)
            push.connect("inproc://drained-%d" % i)
            pulls.append(pull)
            pushes.append(push)
        drained = bytearray(4)
        assert wire.recv_any(pulls, 0, 0, None, drained) is None
        assert drained == bytearray([1, 1, 1, 0])  # tried, empty; the spare untouched
        pushes[1].send(b"one")
        assert wire.recv_any(pulls, WAIT_MS, 0, None, drained) == (1, [b"one"])
        assert drained[:3] == bytearray([1, 0, 1])
        # Marked sockets are not tried: a message already announced (its
        # descriptor read by the wait above) is found only once unmarked.
        pushes[0].send(b"zero")
        assert pulls[0].poll(WAIT_MS)  # (reads the announcement: nothing will signal it)
        drained[0] = 1                  # what a caller must not do after using a socket
        assert wire.recv_any(pulls, 0, 0, None, drained) is None
        drained[0] = 0
        assert wire.recv_any(pulls, 0, 0, None, drained) == (0, [b"zero"])
        # A message to a marked socket wakes the wait.
        wire.recv_any(pulls, 0, 0, None, drained)
        assert drained[:3] == bytearray([1, 1, 1])
        timer = threading.Timer(0.05, pushes[2].send, (b"late",))
        timer.start()
        assert wire.recv_any(pulls, WAIT_MS, 0, None, drained) == (2, [b"late"])
        timer.join()
        assert drained[:3] == bytearray([1, 1, 0])
        with pytest.raises(ValueError):
            wire.recv_any(pulls, 0, 0, None, bytearray(2))
    finally:
        for sock in pulls + pushes:
            sock.close(0)


def test_recv_any_with_drained_after_sends_on_the_same_socket(wire, ctx):
    """The caller's rule (clear the entry of a socket it sends on) keeps
    every reply: request and reply on one DEALER, over tcp, many times."""
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect("tcp://127.0.0.1:%d" % port)
    idle = ctx.socket(zmq.PULL)
    stop = threading.Event()

    def echo():
        while not stop.is_set():
            if router.poll(20):
                router.send_multipart(router.recv_multipart())

    thread = threading.Thread(target=echo)
    thread.start()
    drained = bytearray(2)
    try:
        for i in range(300):
            dealer.send(b"%d" % i)
            drained[1] = 0
            got = wire.recv_any([idle, dealer], WAIT_MS, 0, None, drained)
            assert got == (1, [b"%d" % i])
            assert drained[0] == 1  # the idle one: tried once, then left alone
    finally:
        stop.set()
        thread.join()
        for sock in (router, dealer, idle):
            sock.close(0)


# ------------------------------------------------------------------- loops

class Calls:
    """Records what a loop gave its callables."""

    def __init__(self, stop_on=None, result=None, replacement="replaced"):
        self.handled, self.commands, self.malformed, self.unsendable = [], [], [], []
        self.stop_on = stop_on
        self.result = result
        self.replacement = replacement

    def handle(self, kind, task_id, obj):
        self.handled.append((kind, task_id, obj))
        return self.result(obj) if self.result else ("echo", obj)

    def on_command(self, kind, obj):
        self.commands.append((kind, obj))
        return isinstance(obj, str) and obj == self.stop_on

    def on_malformed(self, channel, exc):
        self.malformed.append((channel, exc))
        return ("malformed", str(exc)) if channel != "command" else None

    def on_unsendable(self, result, exc):
        self.unsendable.append((result, exc))
        return self.replacement


@pytest.fixture
def worker_sockets(ctx):
    """(request PUSH, requests PULL, results PUSH, results PULL, command
    XPUB, commands SUB), connected over inproc, the subscription seen."""
    socks = {}
    for name, kind in (("req_out", zmq.PUSH), ("req_in", zmq.PULL), ("res_out", zmq.PUSH),
                       ("res_in", zmq.PULL), ("cmd_out", zmq.XPUB), ("cmd_in", zmq.SUB)):
        socks[name] = ctx.socket(kind)
    socks["req_in"].bind("inproc://loop-req")
    socks["req_out"].connect("inproc://loop-req")
    socks["res_in"].bind("inproc://loop-res")
    socks["res_out"].connect("inproc://loop-res")
    socks["cmd_out"].bind("inproc://loop-cmd")
    socks["cmd_in"].setsockopt(zmq.SUBSCRIBE, b"")
    socks["cmd_in"].connect("inproc://loop-cmd")
    assert socks["cmd_out"].poll(WAIT_MS) and socks["cmd_out"].recv() == b"\x01"
    yield socks
    for sock in socks.values():
        sock.close(0)


def _run_worker(wire, s, calls, **kwargs):
    kwargs.setdefault("timeout_ms", WAIT_MS)
    wire.run_worker(s["req_in"], s["res_out"], s["cmd_in"], handle=calls.handle,
                    on_command=calls.on_command, on_malformed=calls.on_malformed,
                    on_unsendable=calls.on_unsendable, **kwargs)


def _pickled_command(obj):
    """A COMMAND message whose body is a pickle (encoded as a request, then
    relabelled: an encoder refuses to write it)."""
    frames = _encode(obj, KIND_REQUEST)
    return [frames[0][:3] + bytes([KIND_COMMAND]) + frames[0][4:]] + frames[1:]


def test_run_worker_contract(wire, worker_sockets):
    s = worker_sockets
    calls = Calls(stop_on="stop")
    stats = Stats()
    for kind, task_id, obj in ((KIND_REQUEST, 1, zc.ClusterRequest(3, "m")),
                               (KIND_RESULT, 2, zc.ClusterResult("OK", 4)),  # any kind
                               (KIND_COMMAND, 3, "just a str")):
        wire.send_message(s["req_out"], obj, kind, task_id)
    s["req_out"].send_multipart(_encode(1, KIND_REQUEST, 4)[:1] + [b"extra frame"])
    s["req_out"].send(b"garbage")
    s["cmd_out"].send_multipart(_pickled_command({1, 2}))   # never unpickled on commands
    s["cmd_out"].send(b"not a command")
    errors = []

    def run():
        try:
            _run_worker(wire, s, calls, stats=stats, allow_pickle=True)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    s["res_in"].setsockopt(zmq.RCVTIMEO, WAIT_MS)
    thread.start()
    try:
        results = [wire.recv_message(s["res_in"]) for _ in range(5)]
    finally:
        wire.send_message(s["cmd_out"], "not yet", KIND_COMMAND)
        wire.send_message(s["cmd_out"], "stop", KIND_COMMAND)
        thread.join(WAIT_MS / 1000)
    assert not thread.is_alive() and errors == []
    assert [(k, t) for k, t, _ in calls.handled] == [(KIND_REQUEST, 1), (KIND_RESULT, 2),
                                                     (KIND_COMMAND, 3)]
    assert type(calls.handled[0][2]) is zc.ClusterRequest and calls.handled[0][2].task_id == 1
    assert [(k, t) for k, t, _ in results] == [(KIND_RESULT, 1), (KIND_RESULT, 2),
                                               (KIND_RESULT, 3), (KIND_RESULT, 4),
                                               (KIND_RESULT, 0)]
    assert results[2][2] == ("echo", "just a str")
    assert results[3][2][0] == results[4][2][0] == "malformed"
    channels = [channel for channel, _ in calls.malformed]
    assert sorted(channels) == ["command", "command", "request", "request"]
    assert [exc.header for channel, exc in calls.malformed if channel == "request"] == [
        (KIND_REQUEST, 4), None]
    assert any("pickle" in str(exc) for _, exc in calls.malformed)
    assert [obj for _, obj in calls.commands] == ["not yet", "stop"]
    assert calls.unsendable == []
    assert stats.messages_received == 5 + 2 + 2 and stats.messages_sent == 5


def test_run_worker_without_commands_times_out(wire, worker_sockets):
    s = worker_sockets
    calls = Calls()
    with pytest.raises(zc.ReceiverTimeoutException, match="no request or command within 30 ms"):
        wire.run_worker(s["req_in"], s["res_out"], None, handle=calls.handle,
                        on_command=calls.on_command, on_malformed=calls.on_malformed,
                        on_unsendable=calls.on_unsendable, timeout_ms=30)


def _nested(depth):
    obj = 0
    for _ in range(depth):
        obj = [obj]
    return obj


@pytest.mark.parametrize("output", ["lambda", "too deep"])
def test_run_worker_sends_the_replacement_of_an_unencodable_result(wire, worker_sockets, output):
    s = worker_sockets
    value = (lambda: None) if output == "lambda" else _nested(100_000)
    calls = Calls(result=lambda obj: value, replacement=zc.ClusterResult("FAIL"))
    s["req_out"].send_multipart(_encode(1, KIND_REQUEST, 8))
    s["req_out"].send_multipart(_encode(2, KIND_REQUEST, 9))
    with pytest.raises(zc.ReceiverTimeoutException):
        _run_worker(wire, s, calls, timeout_ms=100)
    assert len(calls.unsendable) == 2
    assert all(isinstance(exc, Exception) for _, exc in calls.unsendable)
    for task_id in (8, 9):
        assert s["res_in"].poll(WAIT_MS)
        kind, got_id, result = wire.recv_message(s["res_in"])
        assert (got_id, result.status) == (task_id, "FAIL")


def test_run_worker_looks_at_commands_among_a_stream_of_requests(wire, worker_sockets):
    """While requests keep arriving, the command socket is looked at at least
    once per COMMAND_CHECK_EVERY requests (not before every request: an empty
    look costs libzmq two system calls)."""
    s = worker_sockets
    calls = Calls(stop_on="stop", result=lambda obj: None)  # nothing sent back
    queued = 10 * COMMAND_CHECK_EVERY
    for i in range(queued):  # inproc: queued at the worker before the loop starts
        wire.send_message(s["req_out"], i, KIND_REQUEST, i + 1)
    wire.send_message(s["cmd_out"], "stop", KIND_COMMAND)
    assert s["req_in"].poll(WAIT_MS) and s["cmd_in"].poll(WAIT_MS)
    _run_worker(wire, s, calls)
    assert 0 < len(calls.handled) <= COMMAND_CHECK_EVERY + 1
    assert not s["res_in"].poll(0)


@pytest.fixture
def sink_sockets(ctx):
    socks = {}
    for name, kind in (("res_out", zmq.PUSH), ("res_in", zmq.PULL), ("cmd_out", zmq.XPUB),
                       ("cmd_in", zmq.SUB)):
        socks[name] = ctx.socket(kind)
    socks["res_in"].bind("inproc://sink-res")
    socks["res_out"].connect("inproc://sink-res")
    socks["cmd_out"].bind("inproc://sink-cmd")
    socks["cmd_in"].setsockopt(zmq.SUBSCRIBE, b"")
    socks["cmd_in"].connect("inproc://sink-cmd")
    assert socks["cmd_out"].poll(WAIT_MS) and socks["cmd_out"].recv() == b"\x01"
    yield socks
    for sock in socks.values():
        sock.close(0)


def test_sink_next_contract(wire, sink_sockets):
    s = sink_sockets
    calls = Calls(stop_on="stop")
    stats = Stats()

    def next_result(timeout=WAIT_MS, on_malformed=calls.on_malformed):
        return wire.sink_next(s["res_in"], s["cmd_in"], timeout, calls.on_command, on_malformed,
                              True, None, stats)

    for kind, obj in ((KIND_RESULT, zc.ClusterResult("OK", 1)), (KIND_REQUEST, [1, "two"]),
                      (KIND_COMMAND, "three")):
        wire.send_message(s["res_out"], obj, kind, 7)
    got = [next_result() for _ in range(3)]
    assert type(got[0]) is zc.ClusterResult and got[0].task_id == 7
    assert got[1:] == [[1, "two"], "three"]  # every kind is a result on this channel
    s["res_out"].send(b"garbage")
    s["res_out"].send_multipart(_encode(5, KIND_RESULT, 3)[:1] + [b"extra"])
    wire.send_message(s["res_out"], 6, KIND_RESULT, 4)
    assert next_result() == ("malformed", calls.malformed[0][1].args[0])
    assert calls.malformed[0][1].header is None
    ignore = [None]
    assert next_result(on_malformed=lambda channel, exc: ignore.append(exc.header)) == 6
    assert ignore == [None, (KIND_RESULT, 3)]
    # Commands first; a malformed command and one that does not stop go on.
    wire.send_message(s["res_out"], 7, KIND_RESULT, 5)
    s["cmd_out"].send_multipart(_pickled_command({1}))
    wire.send_message(s["cmd_out"], "not yet", KIND_COMMAND)
    wire.send_message(s["cmd_out"], "stop", KIND_COMMAND)
    assert s["cmd_in"].poll(WAIT_MS) and s["res_in"].poll(WAIT_MS)
    assert next_result() is STOP
    assert [obj for _, obj in calls.commands] == ["not yet", "stop"]
    assert calls.malformed[-1][0] == "command"
    assert next_result() == 7
    with pytest.raises(zc.ReceiverTimeoutException, match="no result within 20 ms"):
        next_result(20)
    with pytest.raises(zc.ReceiverTimeoutException, match="no result within 0 ms"):
        wire.sink_next(s["res_in"], None, 0, calls.on_command, calls.on_malformed)
    assert stats.messages_received == 3 + 3 + 4


def test_sink_next_wait_is_not_extended_by_messages_that_are_no_results(wire, ctx,
                                                                         sink_sockets):
    s = sink_sockets
    stop = threading.Event()
    sender = ctx.socket(zmq.PUSH)
    sender.connect("inproc://sink-res")

    def garbage():
        while not stop.wait(0.02):
            sender.send(b"garbage")

    thread = threading.Thread(target=garbage, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(zc.ReceiverTimeoutException):
            wire.sink_next(s["res_in"], s["cmd_in"], 300, lambda k, o: False,
                           lambda channel, exc: None)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join()
        sender.close(0)
    assert 0.29 <= elapsed < 2.5


def test_send_requests_contract(wire, inproc_pair):
    push, pull = inproc_pair
    tracked = []
    stats = Stats()
    requests = [zc.ClusterRequest(1), "bare", zc.ClusterRequest(np.ones(MIB // 8))]
    sent = wire.send_requests(push, iter(requests), itertools.count(100), tracked.append, stats)
    assert sent == 3 and stats.messages_sent == 3
    assert (requests[0].task_id, requests[2].task_id) == (100, 102)
    assert len(tracked) == 1  # only the message with a zero-copy frame
    got = [_recv(wire, pull) for _ in range(3)]
    assert [task_id for _, task_id, _ in got] == [100, 101, 102]
    assert got[1][2] == "bare"
    del got
    gc.collect()
    tracked[0].wait(WAIT_MS / 1000)
    with pytest.raises(TypeError):  # an item that cannot be encoded: the ones before are sent
        wire.send_requests(push, [5, lambda: None, 6], itertools.count(1), tracked.append)
    assert _recv(wire, pull) == (KIND_REQUEST, 1, 5)
    assert not pull.poll(50)
