"""The send/receive layer and the nodes' loops, for both twins (zmq_cluster._wire_py
and the compiled zmq_cluster._fastpath.wire): same bytes, same behaviour,
zero-copy lifetime (trackers), copy counters."""

import gc
import importlib
import logging

import numpy as np
import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import _wire_py, framing
from zmq_cluster import sink as sink_module
from zmq_cluster import ventilator as ventilator_module
from zmq_cluster import worker as worker_module
from zmq_cluster._compat import NO_EXTENSIONS
from zmq_cluster.exceptions import MessageFormatError
from zmq_cluster.protocol import COPY_THRESHOLD, KIND_COMMAND, KIND_REQUEST, KIND_RESULT

from helpers import WAIT_MS, worker_thread

MIB = 1 << 20


def _wire_twins():
    twins = [pytest.param(_wire_py, id="py")]
    if not NO_EXTENSIONS:
        twins.append(pytest.param(importlib.import_module("zmq_cluster._fastpath.wire"),
                                  id="cy"))
    return twins


@pytest.fixture(params=_wire_twins())
def wire(request, monkeypatch):
    """A wire module, also installed as the loops of the worker, sink and
    ventilator classes for the test."""
    module = request.param
    monkeypatch.setattr(worker_module, "run_worker", module.run_worker)
    monkeypatch.setattr(sink_module, "sink_next", module.sink_next)
    monkeypatch.setattr(ventilator_module, "send_requests", module.send_requests)
    return module


class Stats:
    def __init__(self):
        self.copied_bytes = self.messages_sent = self.messages_received = 0


@pytest.fixture
def inproc_pair(ctx):
    """(push, pull) over inproc: a message stays in libzmq's pipe, holding
    the sender's memory, until the receiver reads it."""
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://wire-pair")
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://wire-pair")
    yield push, pull
    push.close(0)
    pull.close(0)


def _recv(wire, socket, **kwargs):
    assert socket.poll(WAIT_MS), "nothing received within %d ms" % WAIT_MS
    return wire.recv_message(socket, **kwargs)


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
    got = [bytes(f) for f in pull.recv_multipart()]
    expected = [bytes(memoryview(f).cast("B")) for f in framing.encode(obj, KIND_REQUEST, 42)]
    assert got == expected


@pytest.mark.parametrize("obj", PAYLOADS, ids=range(len(PAYLOADS)))
def test_round_trip(wire, pair, obj):
    push, pull = pair
    wire.send_message(push, obj, KIND_RESULT, 9)
    kind, task_id, got = _recv(wire, pull)
    assert (kind, task_id) == (KIND_RESULT, 9)
    assert repr(got) == repr(obj) if not isinstance(obj, np.ndarray) else np.array_equal(got, obj)


def test_twins_read_each_other(pair):
    push, pull = pair
    twins = [p.values[0] for p in _wire_twins()]
    for sender in twins:
        for receiver in twins:
            sender.send_message(push, {"k": np.arange(3)}, KIND_COMMAND, 3)
            kind, task_id, got = _recv(receiver, pull)
            assert (kind, task_id) == (KIND_COMMAND, 3)
            np.testing.assert_array_equal(got["k"], np.arange(3))


def test_malformed_message_has_its_header(wire, pair):
    push, pull = pair
    frames = framing.encode(np.arange(4.0), KIND_REQUEST, 77)
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


def test_nonblocking_receive_raises_again(wire, pair):
    with pytest.raises(zmq.Again):
        wire.recv_message(pair[1], zmq.NOBLOCK)


def test_stats_count_messages_and_copies_the_same_in_both_twins(pair):
    push, pull = pair
    small = np.arange(1000, dtype=np.uint8)           # below COPY_THRESHOLD
    large = np.ones(MIB, dtype=np.uint8)              # zero-copy
    counts = []
    for twin in [p.values[0] for p in _wire_twins()]:
        sent, received = Stats(), Stats()
        for obj in ({"s": small, "l": large}, zc.ClusterRequest(small, None), large):
            twin.send_message(push, obj, KIND_REQUEST, 1, 0, sent)
            _recv(twin, pull, stats=received)
        assert sent.messages_sent == received.messages_received == 3
        assert sent.messages_received == received.messages_sent == 0
        counts.append((sent.copied_bytes, received.copied_bytes))
    assert len(set(counts)) == 1
    # The two small arrays are copied on the way out (in the header or as a
    # small frame) and on the way in; the large ones never.
    assert counts[0][0] == 2 * small.nbytes
    assert counts[0][1] in (0, 2 * small.nbytes)  # 0 until decode counts its copies


# --------------------------------------------------------- zero-copy lifetime

def test_small_messages_are_untracked(wire, inproc_pair):
    push, pull = inproc_pair
    assert wire.send_message(push, np.arange(100.0), KIND_REQUEST) is None
    assert wire.send_message(push, "x", KIND_REQUEST) is None
    _recv(wire, pull)
    _recv(wire, pull)


def test_large_array_is_not_released_until_the_receiver_reads(wire, inproc_pair):
    push, pull = inproc_pair
    arr = np.ones(MIB // 8)
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
    first, second = np.ones(MIB // 8), np.zeros(MIB // 8)
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


def test_ventilator_wait_sent(wire, ctx):
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://vent-wait")
    vent = zc.BasicVentilator(ctx, zc.Connect("inproc://vent-wait"))
    try:
        with vent:
            arrays = [np.full(MIB // 8, float(i)) for i in range(3)]
            assert vent.Send(arrays + [np.arange(3.0)]) == 4
            assert len(vent._pending) == 3  # the small one is not tracked
            with pytest.raises(zc.ReceiverTimeoutException):
                vent.WaitSent(timeout=50)
            for i in range(4):
                _recv(wire, pull)
            gc.collect()
            assert vent.WaitSent(timeout=WAIT_MS) == 3
            assert vent._pending == [] and vent.WaitSent(0) == 0
            assert vent.messages_sent == 4
            assert vent.copied_bytes == 24  # the small array
    finally:
        pull.close(0)


def test_ventilator_prunes_finished_trackers(wire, ctx):
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://vent-prune")
    vent = zc.BasicVentilator(ctx, zc.Connect("inproc://vent-prune"))
    try:
        with vent:
            big = np.ones(COPY_THRESHOLD)
            for _ in range(200):
                vent.Send([big])
                _recv(wire, pull)
                gc.collect()
            assert len(vent._pending) < 200
            vent.WaitSent(WAIT_MS)
    finally:
        pull.close(0)


# ------------------------------------------------------------------- loops

@pytest.fixture
def urls(ipc_url):
    return ipc_url("req"), ipc_url("res"), ipc_url("cmd")


def test_pipeline_moves_large_arrays_without_copies(wire, ctx, urls):
    req, res, cmd = urls
    arr = np.random.default_rng(1).random(MIB // 8)  # 1 MiB
    with zc.BasicVentilator(ctx, zc.Connect(req, bind=True)) as vent, \
            zc.Sink(ctx, zc.Connect(res, bind=True)) as sink:
        with worker_thread(ctx, req, res, cmd, worker_class=zc.BasicWorker,
                           receiver_timeout=WAIT_MS) as (worker, errors):
            vent.Send([arr])
            got = list(sink.Receive(1, timeout=WAIT_MS))
            vent.WaitSent(WAIT_MS)
        assert errors == []
        np.testing.assert_array_equal(got[0], arr)
        assert (vent.copied_bytes, worker.copied_bytes, sink.copied_bytes) == (0, 0, 0)
        assert (vent.messages_sent, worker.messages_sent, sink.messages_received) == (1, 1, 1)
        assert worker.messages_received >= 2  # the request and the kill command


def test_worker_commands_timeout_and_malformed(wire, ctx, urls, caplog):
    req, res, cmd = urls
    push = ctx.socket(zmq.PUSH)
    push.bind(req)
    pull = ctx.socket(zmq.PULL)
    pull.bind(res)
    try:
        with caplog.at_level(logging.WARNING, logger="zmq_cluster"), \
                worker_thread(ctx, req, res, cmd, receiver_timeout=WAIT_MS) as (worker, errors):
            frames = framing.encode(np.arange(4.0), KIND_REQUEST, 70)
            push.send_multipart([frames[0], b"bad"] + frames[2:] if len(frames) > 1
                                else [frames[0] + b"junk"])
            push.send(b"garbage")
            wire.send_message(push, zc.ClusterResult("OK"), KIND_RESULT, 71)
            wire.send_message(push, zc.ClusterRequest(3, "m"), KIND_REQUEST, 72)
            kind, task_id, result = _recv(wire, pull)
            assert (kind, task_id, result.status) == (KIND_RESULT, 70, "FAIL")
            assert isinstance(result.exception, MessageFormatError)
            kind, task_id, result = _recv(wire, pull)
            assert (task_id, result.status, result.payload, result.request_metadata) == (
                72, "OK", 6, "m")
            assert worker.malformed_messages == 3
        assert errors == []
    finally:
        push.close(0)
        pull.close(0)
    # the worker's own timeout, with the pure loop's text
    worker = zc.BasicWorker(ctx, zc.Connect(req), zc.Connect(res), receiver_timeout=30)
    with pytest.raises(zc.ReceiverTimeoutException, match="no request or command within 30 ms"):
        worker.Run()


def test_worker_sends_unsendable_results_as_remote_errors(wire, ctx, urls):
    class Unsendable(zc.BasicWorker):
        def HandleRequest(self, request):
            return lambda: None

    req, res, cmd = urls
    with zc.BasicVentilator(ctx, zc.Connect(req, bind=True)) as vent, \
            zc.BasicSink(ctx, zc.Connect(res, bind=True)) as sink, \
            worker_thread(ctx, req, res, cmd, worker_class=Unsendable):
        vent.Send([1])
        result, = sink.Receive(1, timeout=WAIT_MS)
    assert result.status == "FAIL" and isinstance(result.exception, zc.RemoteError)


def test_sink_kill_timeout_and_counters(wire, ctx, urls):
    _, res, cmd = urls
    with zc.BasicSink(ctx, zc.Connect(res, bind=True), zc.Connect(cmd)) as sink:
        with pytest.raises(zc.ReceiverTimeoutException, match="no result within 20 ms"):
            next(sink.Receive(timeout=20))
        push = ctx.socket(zmq.PUSH)
        try:
            push.connect(res)
            wire.send_message(push, zc.ClusterResult("OK", 1), KIND_RESULT, 5)
            push.send(b"garbage")
            wire.send_message(push, zc.ClusterResult("OK", 2), KIND_RESULT, 6)
            got = [r.payload for r in sink.Receive(2, timeout=WAIT_MS)]
        finally:
            push.close(0)
        assert got == [1, 2] and sink.malformed_messages == 1
        assert sink.messages_received == 3
        zc.BasicSink.SendKillCommand(ctx, zc.Connect(cmd, bind=True), timeout=WAIT_MS)
        assert list(sink.Receive(timeout=WAIT_MS)) == []
        assert sink.messages_received == 4


def test_worker_sees_a_kill_among_a_stream_of_requests(wire, ctx):
    """While requests keep arriving, the command socket is looked at at least
    once per COMMAND_CHECK_EVERY requests (not before every request: an empty
    look costs libzmq two system calls)."""
    push = ctx.socket(zmq.PUSH)
    push.bind("inproc://stream-req")
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://stream-res")
    pub = ctx.socket(zmq.XPUB)
    pub.bind("inproc://stream-cmd")
    worker = zc.BasicWorker(ctx, zc.Connect("inproc://stream-req"),
                            zc.Connect("inproc://stream-res"),
                            zc.Connect("inproc://stream-cmd"), receiver_timeout=WAIT_MS)
    try:
        worker.Setup()
        assert pub.poll(WAIT_MS) and pub.recv() == b"\x01"  # the worker subscribed
        queued = 10 * _wire_py.COMMAND_CHECK_EVERY
        for i in range(queued):  # inproc: queued at the worker before Run starts
            wire.send_message(push, i, KIND_REQUEST, i + 1)
        wire.send_message(pub, zc.BasicWorker.CMD_KILL, KIND_COMMAND)
        worker.Run()  # returns on the kill, with requests still queued
        assert 0 < worker.requests_handled <= _wire_py.COMMAND_CHECK_EVERY + 1
        for _ in range(worker.requests_handled):
            assert _recv(wire, pull)[0] == KIND_RESULT
    finally:
        for sock in (push, pull, pub):
            sock.close(0)
