"""The nodes' documented semantics: BasicVentilator/BasicSink as pipes for
any object, kinds that never decide whether a message is seen, the result
rule of Sink.Receive, commands compared only as str/bytes, a worker's
failure path that cannot fail, malformed messages answered where someone
waits, counters, context managers and the ventilator's monitor."""

import logging
import pickle
import threading

import numpy as np
import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import _framing_py
from zmq_cluster.exceptions import EncodeError, MessageFormatError
from zmq_cluster.protocol import COPY_THRESHOLD, KIND_COMMAND, KIND_REQUEST, KIND_RESULT
from zmq_cluster.wire import send_message

from helpers import WAIT_MS, DoublingWorker, worker_thread


@pytest.fixture
def urls(ipc_url):
    return ipc_url("req"), ipc_url("res"), ipc_url("cmd")


@pytest.fixture
def push(ctx, urls):
    """A PUSH socket bound at the requests' address (a ventilator's)."""
    socket = ctx.socket(zmq.PUSH)
    socket.bind(urls[0])
    yield socket
    socket.close(0)


def _bound(url):
    return zc.Connect(url, bind=True)


@pytest.fixture
def sink_and_peer(ctx, urls):
    """A BasicSink bound on the result channel and a PUSH peer connected to it."""
    _, res, _ = urls
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, WAIT_MS)
    push.connect(res)
    yield res, push
    push.close(0)


def _encode(obj, kind, task_id=0):
    return [bytes(memoryview(f).cast("B")) for f in _framing_py.encode(obj, kind, task_id)]


def _relabel(frames, kind):
    header = frames[0]
    return [header[:3] + bytes([kind]) + header[4:]] + frames[1:]


# ------------------------------------------------------------------ pipes

def test_basic_ventilator_into_basic_sink_is_a_pipe_for_any_object(ctx, urls):
    req, _, _ = urls
    objects = [1, "two", {"three": 3}, None, [np.arange(3)], zc.ClusterResult("odd")]
    with zc.BasicSink(ctx, _bound(req), receiver_timeout=WAIT_MS) as sink, \
            zc.BasicVentilator(ctx, zc.Connect(req)) as vent:
        assert vent.Send(objects) == len(objects)
        got = list(sink.Receive(len(objects)))
    assert got[:4] == [1, "two", {"three": 3}, None]
    np.testing.assert_array_equal(got[4][0], np.arange(3))
    assert type(got[5]) is zc.ClusterResult and got[5].status == "odd"
    assert sink.malformed_messages == 0


def test_ventilator_requests_read_by_a_basic_sink_are_cluster_requests(ctx, urls):
    req, _, _ = urls
    with zc.BasicSink(ctx, _bound(req), receiver_timeout=WAIT_MS) as sink, \
            zc.Ventilator(ctx, zc.Connect(req)) as vent:
        requests = [np.ones(2), "x"]
        vent.Send(requests, metadata=[{"i": 0}, {"i": 1}])
        got = list(sink.Receive(2))
    assert [type(r) for r in got] == [zc.ClusterRequest] * 2
    np.testing.assert_array_equal(got[0].payload, np.ones(2))
    assert (got[1].payload, [r.metadata for r in got]) == ("x", [{"i": 0}, {"i": 1}])
    assert got[0].task_id is not None and got[1].task_id == got[0].task_id + 1


def test_results_sent_through_a_basic_ventilator_come_out_of_sink_unwrapped(ctx, urls):
    req, _, _ = urls
    ok = zc.ClusterResult("OK", np.arange(4), {"r": 1}, {"host": "h"})
    failed = zc.ClusterResult("FAIL", None, None, None, KeyError("k"))
    with zc.Sink(ctx, _bound(req), receiver_timeout=WAIT_MS) as sink, \
            zc.BasicVentilator(ctx, zc.Connect(req)) as vent:
        vent.Send([ok, ok, failed, ok])
        payload = next(sink.Receive(1))
        np.testing.assert_array_equal(payload, np.arange(4))
        payload, request_meta, result_meta = next(sink.Receive(1, metadata=True))
        assert (request_meta, result_meta) == ({"r": 1}, {"host": "h"})
        with pytest.raises(zc.WorkerException) as info:
            list(sink.Receive(1))
        assert isinstance(info.value.worker_exception, KeyError)
        assert len(list(sink.Receive(1))) == 1  # resumable after a FAIL


def test_worker_serves_every_kind_on_its_request_channel(ctx, urls, push):
    req, res, cmd = urls
    with zc.BasicSink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink, \
            worker_thread(ctx, req, res, cmd) as (worker, errors):
        send_message(push, zc.ClusterRequest(3, "m"), KIND_RESULT, 1)
        send_message(push, "ab", KIND_COMMAND, 2)
        got = sorted(sink.Receive(2), key=lambda r: r.task_id)
    assert [(r.task_id, r.status, r.payload) for r in got] == [(1, "OK", 6), (2, "OK", "abab")]
    assert got[0].request_metadata == "m"
    assert worker.malformed_messages == 0 and errors == []


def test_wait_sent_returns_once_libzmq_released_the_arrays_sent_zero_copy(ctx):
    """Over inproc a message stays in the pipe, holding the array, until the
    peer reads it: WaitSent times out before, returns the pending count after."""
    peer = ctx.socket(zmq.PULL)
    try:
        with zc.BasicVentilator(ctx, zc.Connect("inproc://wait-sent", bind=True)) as vent:
            peer.connect("inproc://wait-sent")
            assert vent.WaitSent(0) == 0  # nothing sent yet
            vent.Send([np.ones(COPY_THRESHOLD // 4), np.ones(8)])  # zero-copy, then copied
            with pytest.raises(zc.ReceiverTimeoutException, match="1 zero-copy messages"):
                vent.WaitSent(50)
            assert peer.poll(WAIT_MS)
            peer.recv_multipart()  # copied out: libzmq releases the message
            assert vent.WaitSent(WAIT_MS) == 1
            assert vent.WaitSent(0) == 0
    finally:
        peer.close(0)


# --------------------------------------------------------- the result rule

UNUSABLE = [
    (zc.ClusterResult("MAYBE", 1), "status str 'MAYBE' is neither"),
    (zc.ClusterResult(None, 1), "status NoneType None"),
    (zc.ClusterResult(b"OK", 1), "status bytes b'OK'"),
    (zc.ClusterResult(np.array(["OK", "FAIL"]), 1), "status ndarray"),
    (zc.ClusterResult(np.zeros((), "V4")[()]), "status void"),
    (7, "it is int 7, not a ClusterResult"),
    (zc.ClusterRequest(1, "m"), "it is ClusterRequest"),
]


@pytest.mark.parametrize("body,problem", UNUSABLE, ids=range(len(UNUSABLE)))
def test_sink_reports_a_result_it_cannot_use_as_a_failure(ctx, sink_and_peer, caplog, body,
                                                         problem):
    res, push = sink_and_peer
    with caplog.at_level(logging.WARNING, logger="zmq_cluster"), \
            zc.Sink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink:
        send_message(push, body, KIND_RESULT, 41)
        send_message(push, zc.ClusterResult("OK", "next"), KIND_RESULT, 42)
        with pytest.raises(zc.WorkerException) as info:
            list(sink.Receive(2))
        error = info.value.worker_exception
        assert isinstance(error, MessageFormatError) and problem in str(error)
        assert "task 41" in str(error) or not isinstance(body, (zc.ClusterResult,
                                                                zc.ClusterRequest))
        assert sink.malformed_messages == 1
        assert list(sink.Receive(1)) == ["next"]  # resumable, as after a FAIL
    assert [r for r in caplog.records if problem in r.getMessage()]


def test_unusable_results_count_toward_num_results(ctx, sink_and_peer):
    res, push = sink_and_peer
    with zc.Sink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink:
        for status in ("OK", "??", "OK"):
            send_message(push, zc.ClusterResult(status, status), KIND_RESULT, 1)
        receive = sink.Receive(3)
        assert next(receive) == "OK"
        with pytest.raises(zc.WorkerException):
            next(receive)
        assert list(sink.Receive(1)) == ["OK"]
        assert sink.malformed_messages == 1


def test_malformed_results_with_a_readable_header_are_reported(ctx, sink_and_peer, caplog):
    res, push = sink_and_peer
    truncated = _encode(zc.ClusterResult("OK", 1), KIND_RESULT, 5)
    truncated[0] = truncated[0][:-3]
    pickled = _encode(zc.ClusterResult("OK", {1, 2}), KIND_RESULT, 6)
    with caplog.at_level(logging.WARNING, logger="zmq_cluster"), \
            zc.BasicSink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink:
        sink.allow_pickle = False
        push.send(b"")                                   # not a zmq_cluster message: dropped
        push.send_multipart(truncated)
        push.send_multipart(pickled)
        push.send_multipart([b"ZC\x02\x02" + bytes(12), b"unreferenced"])  # task id 0
        send_message(push, zc.ClusterResult("OK", 3), KIND_RESULT, 7)
        got = list(sink.Receive(4))
    assert [(r.status, r.task_id) for r in got] == [("FAIL", 5), ("FAIL", 6), ("FAIL", None),
                                                   ("OK", 7)]
    assert all(isinstance(r.exception, MessageFormatError) for r in got[:3])
    assert "pickle is not allowed" in str(got[1].exception)
    assert sink.malformed_messages == 4
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 4


def test_sink_raises_for_a_malformed_result_with_a_readable_header(ctx, sink_and_peer):
    res, push = sink_and_peer
    with zc.Sink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink:
        push.send(_encode(zc.ClusterResult("OK", 1), KIND_RESULT, 5)[0][:-1])
        with pytest.raises(zc.WorkerException) as info:
            next(sink.Receive(1))
        assert isinstance(info.value.worker_exception, MessageFormatError)
        assert sink.malformed_messages == 1


# ----------------------------------------------------------------- commands

def _evil_commands():
    structured = np.zeros((), [("a", "<i4"), ("b", "<f8")])[()]
    return [
        _encode(np.array(["CLUSTER_WORKER_KILL", "CLUSTER_SINK_KILL"]), KIND_COMMAND),
        _encode(np.zeros(3), KIND_COMMAND),
        _encode(structured, KIND_COMMAND),
        _encode(np.void(b"CLUSTER_"), KIND_COMMAND),
        _encode(np.str_("CLUSTER_WORKER_KILL"), KIND_COMMAND),   # not a str: no kill
        _encode({"op": "CLUSTER_WORKER_KILL"}, KIND_COMMAND),
        _relabel(_encode({"CLUSTER_WORKER_KILL"}, KIND_REQUEST), KIND_COMMAND),  # pickle
        _relabel(_encode(pickle.loads, KIND_REQUEST), KIND_COMMAND),
        [b"ZC\x02\x03" + bytes(12) + b"s\xff\xff\xff\xff"],
    ]


def _run_in_thread(target):
    errors = []

    def run():
        try:
            target()
        except Exception as exc:  # surfaced by the caller
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_evil_commands_neither_kill_nor_stop_a_worker(ctx, urls):
    req, res, cmd = urls
    xpub = ctx.socket(zmq.XPUB)
    xpub.bind(cmd)
    try:
        with zc.Ventilator(ctx, _bound(req)) as vent, \
                zc.Sink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink:
            worker = DoublingWorker(ctx, zc.Connect(req), zc.Connect(res), zc.Connect(cmd),
                                    receiver_timeout=WAIT_MS)
            thread, errors = _run_in_thread(worker.Run)
            assert xpub.poll(WAIT_MS) and xpub.recv() == b"\x01"  # subscribed
            for frames in _evil_commands():
                xpub.send_multipart(frames)
            vent.Send([21])
            assert list(sink.Receive(1)) == [42]    # still serving
            xpub.send_multipart(_encode(b"CLUSTER_WORKER_KILL", KIND_COMMAND))  # bytes: a kill
            thread.join(WAIT_MS / 1000)
        assert not thread.is_alive() and errors == []
        assert worker.malformed_messages == 3  # the two pickles and the truncated str
    finally:
        xpub.close(0)


def test_evil_commands_neither_kill_nor_stop_a_sink(ctx, urls):
    _, res, cmd = urls
    xpub = ctx.socket(zmq.XPUB)
    xpub.bind(cmd)
    push = ctx.socket(zmq.PUSH)
    try:
        with zc.BasicSink(ctx, _bound(res), zc.Connect(cmd), receiver_timeout=WAIT_MS) as sink:
            push.connect(res)
            assert xpub.poll(WAIT_MS) and xpub.recv() == b"\x01"
            for frames in _evil_commands():
                xpub.send_multipart(frames)
            xpub.send_multipart(_encode("CLUSTER_WORKER_KILL", KIND_COMMAND))  # not the sink's
            send_message(push, "result", KIND_RESULT, 1)
            assert sink._results.poll(WAIT_MS)
            assert list(sink.Receive(1)) == ["result"]
            xpub.send_multipart(_encode("CLUSTER_SINK_KILL", KIND_COMMAND))
            assert list(sink.Receive()) == []
            assert sink.malformed_messages == 3
    finally:
        xpub.close(0)
        push.close(0)


# ------------------------------------------------ the worker's failure path

def test_request_metadata_that_cannot_travel_back_still_gets_a_fail_result(ctx, urls, push):
    """Metadata that decodes to a memoryview (a pickle-5 out-of-band buffer)
    cannot be encoded in the result, nor in its FAIL fallback: the fallback
    drops it, and the worker keeps serving."""
    req, res, cmd = urls
    with zc.BasicSink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink, \
            worker_thread(ctx, req, res, cmd) as (worker, errors):
        buffer = pickle.PickleBuffer(bytearray(b"x" * 100))
        push.send_multipart(_encode(zc.ClusterRequest(3, buffer), KIND_REQUEST, 1))
        send_message(push, zc.ClusterRequest(4, "ok"), KIND_REQUEST, 2)
        push.send_multipart(_encode(zc.ClusterRequest("boom", buffer), KIND_REQUEST, 3))
        got = sorted(sink.Receive(3), key=lambda r: r.task_id)
    assert errors == []
    assert (got[0].status, got[0].payload, got[0].request_metadata) == ("FAIL", None, None)
    assert type(got[0].exception) is EncodeError  # rebuilt: this sink trusts the worker
    assert "cannot encode memoryview" in str(got[0].exception)
    assert "request metadata (memoryview) could not be sent" in str(got[0].exception)
    assert set(got[0].metadata) == {"host", "pid", "seconds"}
    assert (got[1].status, got[1].payload, got[1].request_metadata) == ("OK", 8, "ok")
    # The handler raised, and its FAIL could not carry the metadata: the
    # EncodeError names the handler's exception too.
    assert (got[2].status, got[2].request_metadata) == ("FAIL", None)
    assert type(got[2].exception) is EncodeError
    assert "raised by the handler: builtins.KeyError: 'boom'" in str(got[2].exception)


class _ReturnsTooDeep(zc.BasicWorker):
    def HandleRequest(self, request):
        return _nested(300, request)


def _nested(depth, leaf=0):
    obj = leaf
    for _ in range(depth):
        obj = [obj]
    return obj


def test_output_nested_too_deep_comes_back_as_a_fail_naming_the_reason(ctx, urls, push):
    """Checked before sending: the worker's result says why, rather than a
    result every receiver rejects."""
    req, res, cmd = urls
    with zc.BasicSink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink, \
            worker_thread(ctx, req, res, cmd, worker_class=_ReturnsTooDeep) as (w, errors):
        send_message(push, zc.ClusterRequest(1, "m"), KIND_REQUEST, 1)
        got = next(sink.Receive(1))
        assert (got.task_id, got.status, got.request_metadata) == (1, "FAIL", "m")
        assert type(got.exception) is EncodeError
        assert "deeper than 256" in str(got.exception)
        assert sink.malformed_messages == 0
    assert errors == []


def test_a_request_at_the_depth_limit_is_answered(ctx, urls, push):
    """A request nested exactly 256 levels deep is accepted; echoed, it
    would be 257 levels: the worker answers with a FAIL instead."""
    req, res, cmd = urls
    with zc.Sink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink, \
            worker_thread(ctx, req, res, cmd, worker_class=zc.BasicWorker):
        frames = _encode(_nested(256), KIND_REQUEST, 3)   # 256 lists, the int inside
        push.send_multipart(frames)
        with pytest.raises(zc.WorkerException) as info:
            next(sink.Receive(1))
        assert info.value.type_name == "zmq_cluster.exceptions.EncodeError"
        assert "deeper than 256" in info.value.message


class _NoPickleSink(zc.Sink):
    allow_pickle = False


class _Unsendable(DoublingWorker):
    def HandleRequest(self, request):
        if request == "unsendable":
            return lambda: None
        return super().HandleRequest(request)


def test_failures_reach_a_sink_that_does_not_allow_pickle(ctx, urls, push):
    """Exceptions travel natively: a sink that trusts no pickle still gets
    every FAIL, as a RemoteError carrying type, message and traceback."""
    req, res, cmd = urls
    with _NoPickleSink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink, \
            worker_thread(ctx, req, res, cmd, worker_class=_Unsendable) as (w, errors):
        send_message(push, zc.ClusterRequest("boom", "m"), KIND_REQUEST, 1)
        send_message(push, zc.ClusterRequest("unsendable", "m"), KIND_REQUEST, 2)
        push.send_multipart(_encode(1, KIND_REQUEST, 3)[:1] + [b"unreferenced"])
        send_message(push, zc.ClusterRequest(21, "m"), KIND_REQUEST, 4)
        failures = []
        for _ in range(3):
            with pytest.raises(zc.WorkerException) as info:
                next(sink.Receive(1))
            failures.append(info.value)
        assert list(sink.Receive(1)) == [42]
        assert sink.malformed_messages == 0
    assert errors == []
    by_type = {f.type_name: f for f in failures}
    assert set(by_type) == {"builtins.KeyError", "zmq_cluster.exceptions.EncodeError",
                            "zmq_cluster.exceptions.MessageFormatError"}
    for failure in failures:
        assert type(failure.worker_exception) is zc.RemoteError
    assert by_type["builtins.KeyError"].message == "'boom'"
    assert "in HandleRequest" in by_type["builtins.KeyError"].remote_traceback
    assert "cannot encode function" in by_type["zmq_cluster.exceptions.EncodeError"].message
    assert "buffer frames" in by_type["zmq_cluster.exceptions.MessageFormatError"].message


# ------------------------------------------------- counters, setup, monitor

def test_worker_is_a_context_manager(ctx, urls):
    req, res, cmd = urls
    worker = zc.BasicWorker(ctx, _bound(req), _bound(res), receiver_timeout=20)
    with worker as entered:
        assert entered is worker and worker._requests is not None
        with pytest.raises(zc.ReceiverTimeoutException):
            worker.Run()
    assert worker._requests is None


def test_counters_that_would_always_be_zero_are_gone(ctx, urls):
    vent = zc.BasicVentilator(ctx, _bound(urls[0]))
    sink = zc.BasicSink(ctx, _bound(urls[1]))
    worker = zc.BasicWorker(ctx, zc.Connect(urls[0]), zc.Connect(urls[1]))
    assert not hasattr(vent, "messages_received") and not hasattr(sink, "messages_sent")
    for node, names in ((vent, ["messages_sent", "copied_bytes"]),
                        (sink, ["messages_received", "copied_bytes", "malformed_messages"]),
                        (worker, ["messages_sent", "messages_received", "copied_bytes",
                                  "malformed_messages"])):
        assert [getattr(node, name) for name in names] == [0] * len(names)
    assert sink.allow_pickle is True and worker.allow_pickle is True


def test_ventilator_setup_on_a_socket_that_had_a_monitor(ctx, ipc_url):
    """pyzmq's default monitor address is named after the socket's fd and
    stays bound a moment after disable_monitor(): the ventilator uses an
    address of its own."""
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    url = ipc_url("monitored")
    pull.bind(url)
    try:
        monitor = push.get_monitor_socket()  # e.g. the caller waited for peers
        push.disable_monitor()
        monitor.close(0)
        for _ in range(30):  # and each Shutdown disables the ventilator's own
            with zc.BasicVentilator(ctx, push) as vent:
                push.connect(url)
                assert vent.WaitForWorkers(1, timeout=WAIT_MS) == 1
                push.disconnect(url)
    finally:
        push.close(0)
        pull.close(0)
