"""Ventilator -> worker(s) -> sink, end to end, over inproc, ipc and tcp."""

import os
import socket

import numpy as np
import pytest
import zmq

import zmq_cluster as zc

from helpers import WAIT_MS, DoublingWorker, worker_processes, worker_thread


@pytest.fixture
def urls(ipc_url):
    return ipc_url("req"), ipc_url("res"), ipc_url("cmd")


def _bound(url):
    return zc.Connect(url, bind=True)


def test_round_trip_with_metadata_and_task_ids(ctx, urls):
    req, res, cmd = urls
    with zc.Ventilator(ctx, _bound(req)) as vent, zc.Sink(ctx, _bound(res)) as sink, \
            worker_thread(ctx, req, res, cmd) as (worker, errors):
        requests = [np.arange(5.0), np.ones((300, 300)), 21]
        assert vent.Send(requests, metadata=["a", {"k": 1}, None]) == 3
        got = list(sink.Receive(3, timeout=WAIT_MS, metadata=True))
    assert not errors
    by_meta = {repr(meta): (payload, result_meta) for payload, meta, result_meta in got}
    np.testing.assert_array_equal(by_meta["'a'"][0], np.arange(5.0) * 2)
    np.testing.assert_array_equal(by_meta["{'k': 1}"][0], np.ones((300, 300)) * 2)
    assert by_meta["None"][0] == 42
    for _, result_meta in by_meta.values():
        assert result_meta["host"] == socket.gethostname()
        assert result_meta["pid"] == os.getpid()
        assert 0 <= result_meta["seconds"] < 10
    assert worker.requests_handled == 3


def test_basic_sink_yields_cluster_results_with_the_request_task_id(ctx, urls):
    req, res, cmd = urls
    with zc.BasicVentilator(ctx, _bound(req)) as vent, \
            zc.BasicSink(ctx, _bound(res), receiver_timeout=WAIT_MS) as sink, \
            worker_thread(ctx, req, res, cmd):
        requests = [zc.ClusterRequest(i, {"i": i}) for i in range(10)]
        assert vent.Send(requests) == 10
        results = list(sink.Receive(10))
    assert all(type(r) is zc.ClusterResult for r in results)
    assert all(r.status == zc.ClusterResult.STATUS_SUCCESS for r in results)
    sent_ids = {r.metadata["i"]: r.task_id for r in requests}
    assert len(set(sent_ids.values())) == 10 and None not in sent_ids.values()
    for result in results:
        assert result.payload == result.request_metadata["i"] * 2
        assert result.task_id == sent_ids[result.request_metadata["i"]]


def test_bare_objects_from_basic_ventilator_reach_the_handler_as_they_are(ctx, urls):
    req, res, cmd = urls
    with zc.BasicVentilator(ctx, _bound(req)) as vent, zc.Sink(ctx, _bound(res)) as sink, \
            worker_thread(ctx, req, res, cmd):
        vent.Send(["ab", (1, 2)])
        assert sorted(map(repr, sink.Receive(2, timeout=WAIT_MS))) == ["'abab'", "(1, 2, 1, 2)"]


def test_worker_exception_becomes_worker_exception_at_the_sink(ctx, urls):
    req, res, cmd = urls
    with zc.Ventilator(ctx, _bound(req)) as vent, zc.Sink(ctx, _bound(res)) as sink, \
            worker_thread(ctx, req, res, cmd):
        vent.Send(["boom"], metadata=["m"])
        with pytest.raises(zc.WorkerException) as info:
            next(sink.Receive(1, timeout=WAIT_MS))
        assert isinstance(info.value.worker_exception, KeyError)
        assert info.value.worker_exception.args == ("boom",)
        # the sink keeps working after a failed result
        vent.Send([5])
        assert list(sink.Receive(1, timeout=WAIT_MS)) == [10]


def test_fail_result_fields(ctx, urls):
    req, res, cmd = urls
    with zc.Ventilator(ctx, _bound(req)) as vent, zc.BasicSink(ctx, _bound(res)) as sink, \
            worker_thread(ctx, req, res, cmd):
        vent.Send(["boom"], metadata=[{"n": 1}])
        (result,) = sink.Receive(1, timeout=WAIT_MS)
    assert result.status == zc.ClusterResult.STATUS_FAIL
    assert result.payload is None and result.request_metadata == {"n": 1}
    assert isinstance(result.exception, KeyError)
    assert set(result.metadata) == {"host", "pid", "seconds"}


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling for you")


class _RaisesUnpicklable(zc.BasicWorker):
    def HandleRequest(self, request):
        raise _Unpicklable("odd")


def test_unpicklable_worker_exception_arrives_rebuilt(ctx, urls):
    """Exceptions travel natively (never pickled): one pickle refuses is
    rebuilt as its own type, with the worker's traceback."""
    req, res, cmd = urls
    with zc.Ventilator(ctx, _bound(req)) as vent, zc.Sink(ctx, _bound(res)) as sink, \
            worker_thread(ctx, req, res, cmd, worker_class=_RaisesUnpicklable):
        vent.Send([1])
        with pytest.raises(zc.WorkerException) as info:
            next(sink.Receive(1, timeout=WAIT_MS))
    got = info.value.worker_exception
    assert type(got) is _Unpicklable and got.args == ("odd",)
    assert "in HandleRequest" in got.remote_traceback
    assert info.value.type_name.endswith("._Unpicklable") and info.value.message == "odd"


def test_ventilator_metadata_length_mismatch(ctx, urls):
    req, res, cmd = urls
    with zc.Ventilator(ctx, _bound(req)) as vent, zc.Sink(ctx, _bound(res)) as sink, \
            worker_thread(ctx, req, res, cmd):
        with pytest.raises(ValueError):
            vent.Send([1, 2], metadata=["only one"])
        assert list(sink.Receive(1, timeout=WAIT_MS)) == [2]


def test_sink_receive_timeout(ctx, urls):
    with zc.BasicSink(ctx, _bound(urls[1]), receiver_timeout=50) as sink:
        with pytest.raises(zc.ReceiverTimeoutException):
            next(sink.Receive())
        with pytest.raises(zc.ReceiverTimeoutException):
            next(sink.Receive(timeout=10))


def test_worker_receiver_timeout(ctx, urls):
    req, res, cmd = urls
    worker = zc.BasicWorker(ctx, _bound(req), _bound(res), receiver_timeout=50)
    with pytest.raises(zc.ReceiverTimeoutException):
        worker.Run()
    assert worker._requests is None  # Run closed its sockets


def test_ventilator_worker_connect_delay_is_waited_once(ctx, urls, monkeypatch):
    slept = []
    monkeypatch.setattr("zmq_cluster.ventilator.time.sleep", slept.append)
    vent = zc.BasicVentilator(ctx, _bound(urls[0]), worker_connect_delay=0.5)
    vent.Setup()
    vent.Shutdown()
    assert slept == [0.5]


def test_wait_for_workers_counts_handshakes(ctx, urls):
    req, res, cmd = urls
    with zc.BasicVentilator(ctx, _bound(req)) as vent:
        with pytest.raises(zc.ReceiverTimeoutException, match="0 of 1 workers"):
            vent.WaitForWorkers(1, timeout=50)
        with zc.BasicSink(ctx, _bound(res)), worker_thread(ctx, req, res, cmd), \
                worker_thread(ctx, req, res, cmd):
            assert vent.WaitForWorkers(2, timeout=WAIT_MS) == 2


def test_components_accept_existing_sockets(ctx):
    push = ctx.socket(zmq.PUSH)
    push.bind("inproc://exist-req")
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://exist-res")
    cmd_pub = ctx.socket(zmq.PUB)
    cmd_pub.bind("inproc://exist-cmd")
    worker = DoublingWorker(ctx, zc.Connect("inproc://exist-req"),
                            zc.Connect("inproc://exist-res"), receiver_timeout=200)
    try:
        vent = zc.Ventilator(ctx, push)
        sink = zc.Sink(ctx, pull, receiver_timeout=WAIT_MS)
        worker.Setup()
        vent.Send([4])
        with pytest.raises(zc.ReceiverTimeoutException):
            worker.Run()  # serves the request, then times out waiting for the next
        assert worker.requests_handled == 1
        assert list(sink.Receive(1)) == [8]
        vent.Shutdown()
        sink.Shutdown()
        assert not push.closed and not pull.closed  # callers' sockets stay open
        with pytest.raises(ValueError):
            zc.BasicSink(ctx, push).Setup()
    finally:
        worker.Shutdown()
        for sock in (push, pull, cmd_pub):
            sock.close(0)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_two_worker_processes_share_the_work(ctx, ipc_url, transport):
    if transport == "tcp":
        vent = zc.Ventilator(ctx, zc.Connect("tcp://127.0.0.1:*", bind=True))
        sink = zc.Sink(ctx, zc.Connect("tcp://127.0.0.1:*", bind=True), receiver_timeout=30000)
        vent.Setup()
        sink.Setup()
        req = vent._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        res = sink._results.getsockopt_string(zmq.LAST_ENDPOINT)
        cmd = "tcp://127.0.0.1:%d" % _free_port()
    else:
        req, res, cmd = ipc_url("req"), ipc_url("res"), ipc_url("cmd")
        vent = zc.Ventilator(ctx, _bound(req))
        sink = zc.Sink(ctx, _bound(res), receiver_timeout=30000)
    try:
        with worker_processes(ctx, 2, req, res, cmd):
            assert vent.WaitForWorkers(2, timeout=30000) == 2
            n = 200
            arrays = [np.full((64, 64), i, dtype=np.float32) for i in range(n)]
            vent.Send(arrays, metadata=range(n))
            got = list(sink.Receive(n, metadata=True))
        assert sorted(meta for _, meta, _ in got) == list(range(n))
        for payload, meta, _ in got:
            np.testing.assert_array_equal(payload, arrays[meta] * 2)
        pids = {result_meta["pid"] for _, _, result_meta in got}
        assert len(pids) == 2 and os.getpid() not in pids  # round-robin reached both
    finally:
        vent.Shutdown()
        sink.Shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
