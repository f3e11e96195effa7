"""Task-shaped messages without their objects (framing's task helpers, in
both twins) and the loops built on them: run_worker's task mode,
receive_results, send_requests with pairs, Counters. The helpers must write
the very bytes ``encode`` writes for the objects they stand for, and read
what ``decode`` reads, refusing (or leaving to the full decoder) exactly
what it refuses."""

import importlib
import itertools
import threading

import numpy as np
import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import _framing_py, _framing_tasks
from zmq_cluster._compat import NO_EXTENSIONS
from zmq_cluster.exceptions import MessageFormatError
from zmq_cluster.protocol import KIND_COMMAND, KIND_REQUEST, KIND_RESULT

from helpers import WAIT_MS, WIRE_TWINS, push_pull


def _task_twins():
    """(framing module, its task helpers) for each twin."""
    twins = [pytest.param((_framing_py, _framing_tasks), id="py")]
    if not NO_EXTENSIONS:
        cy = importlib.import_module("zmq_cluster._fastpath.framing")
        twins.append(pytest.param((cy, cy), id="cy"))
    return twins


@pytest.fixture(params=_task_twins())
def tasks(request):
    return request.param


@pytest.fixture(params=WIRE_TWINS, ids=["py", "cy"][:len(WIRE_TWINS)])
def wire(request):
    return request.param


def _bytes(frames):
    return [bytes(memoryview(f).cast("B")) for f in frames]


IDENTITY = {"host": "h\u00f6st", "pid": 4242}

VALUES = [
    None, 0, -1, 2**63 - 1, 2**70, 1.5, float("nan"), "", "text", "t\u00e9xt", "\ud800",
    b"raw", True, False, 3j, [1, "a"], (1, None), {"k": 1, 2: "v"}, {"nested": {"a": [1]}},
    np.arange(3.0), np.arange(70_000, dtype=np.uint8), np.float32(2.5), {1, 2},
    ValueError("boom"),
]


@pytest.mark.parametrize("payload", VALUES, ids=repr)
@pytest.mark.parametrize("metadata", [None, 7, {"i": 3, "name": "x"}, "m\u00e9ta"], ids=repr)
def test_request_and_result_bytes_are_those_of_the_objects(tasks, payload, metadata):
    framing, helpers = tasks
    expected = framing.encode(zc.ClusterRequest(payload, metadata), KIND_REQUEST, 9)
    assert _bytes(helpers.encode_request(payload, metadata, 9)) == _bytes(expected)
    prefix = helpers.metadata_prefix(IDENTITY)
    expected = framing.encode(zc.ClusterResult("OK", payload, metadata,
                                               dict(IDENTITY, seconds=0.125)), KIND_RESULT, 11)
    assert _bytes(helpers.encode_ok(payload, metadata, prefix, 0.125, 11)) == _bytes(expected)


def test_metadata_prefix_only_for_a_plain_identity(tasks):
    _, helpers = tasks
    assert helpers.metadata_prefix({}) is not None
    assert helpers.metadata_prefix({"seconds": 1}) is None      # its position would differ
    assert helpers.metadata_prefix({"a": np.zeros(10_000)}) is None   # a frame of its own
    assert helpers.metadata_prefix([("host", "h")]) is None
    assert helpers.metadata_prefix({"f": lambda: None}) is None  # cannot be encoded


@pytest.mark.parametrize("payload", VALUES, ids=repr)
def test_decode_task_reads_what_decode_reads(tasks, payload):
    framing, helpers = tasks
    for obj, fields in ((zc.ClusterRequest(payload, {"m": 1}), (payload, {"m": 1})),
                        (payload, (payload, None))):
        frames = framing.encode(obj, KIND_REQUEST, 5)
        kind, task_id, got_payload, got_metadata = helpers.decode_task(_bytes(frames))
        assert (kind, task_id) == (KIND_REQUEST, 5)
        assert repr(got_payload) == repr(fields[0]) and got_metadata == fields[1]


def test_decode_task_refuses_what_decode_refuses(tasks):
    framing, helpers = tasks
    good = _bytes(framing.encode(zc.ClusterRequest(1, None), KIND_REQUEST, 5))
    for frames in ([good[0][:-1]], [good[0] + b"N"], [good[0], b"extra"],
                   [b"ZC\x02\x01" + bytes(12) + b"R" + b"s\x05\x00\x00\x00\xff\xfe"]):
        with pytest.raises(MessageFormatError) as expected:
            framing.decode(frames)
        with pytest.raises(MessageFormatError) as got:
            helpers.decode_task(frames)
        assert str(got.value) == str(expected.value)
    pickled = _bytes(framing.encode(zc.ClusterRequest({1, 2}), KIND_REQUEST, 5))
    with pytest.raises(MessageFormatError, match="pickle is not allowed"):
        helpers.decode_task(pickled, allow_pickle=False)


RESULT_METADATA = [None, dict(IDENTITY, seconds=0.5), {"\u00e9": 1.0}, {"a": np.zeros(2)},
                   {"a": [1, {"b": 2}]}, {(1, 2): 3.0}, "m"]


@pytest.mark.parametrize("metadata", RESULT_METADATA, ids=repr)
@pytest.mark.parametrize("payload", VALUES, ids=repr)
def test_decode_ok_reads_the_payload_of_ok_results_only(tasks, payload, metadata):
    framing, helpers = tasks
    frames = _bytes(framing.encode(zc.ClusterResult("OK", payload, {"r": 1}, metadata),
                                   KIND_RESULT, 3))
    full = framing.decode(frames)[2]
    got = helpers.decode_ok(frames, mode=1)
    if got is not helpers.NOT_FAST:   # else the full decoder decides (and says the same)
        assert repr(got) == repr(full.payload)
    got = helpers.decode_ok(frames, mode=2)
    if got is not helpers.NOT_FAST:
        assert repr(got) == repr((full.payload, full.request_metadata, full.metadata))


def test_decode_ok_reads_a_workers_result_itself(tasks):
    framing, helpers = tasks
    identity = {"host": "node-7.example", "pid": 4242}  # (a non-ASCII str may be left over)
    prefix = helpers.metadata_prefix(identity)
    for seconds in (0.0, 1.5, float("inf")):   # a prefix seen once is known to be valid
        frames = _bytes(helpers.encode_ok(41, None, prefix, seconds, 3))
        assert helpers.decode_ok(frames, mode=1) == 41
        assert helpers.decode_ok(frames, mode=2) == (41, None, dict(identity, seconds=seconds))


def test_decode_ok_leaves_everything_else_to_the_full_decoder(tasks):
    framing, helpers = tasks
    prefix = helpers.metadata_prefix({"host": "node-7.example", "pid": 4242})
    good = _bytes(helpers.encode_ok(41, None, prefix, 0.5, 3))[0]
    assert helpers.decode_ok([good], mode=1) == 41  # (and its prefix is now known)
    others = [
        framing.encode(zc.ClusterResult("FAIL", None, None, None, ValueError("x")), KIND_RESULT),
        framing.encode(zc.ClusterResult("OK ", 1), KIND_RESULT),
        framing.encode(zc.ClusterResult("OK", 1, exception=ValueError("x")), KIND_RESULT),
        framing.encode(zc.ClusterRequest(1), KIND_REQUEST),
        framing.encode(41, KIND_RESULT),
        [good[:-1]], [good + b"N"], [good, b"extra"], [good[:-10] + b"x" + good[-9:]],
        [good[:-2]], [good[:20]], [b""], [],
    ]
    for frames in others:
        for mode in (1, 2):
            assert helpers.decode_ok(_bytes(frames), mode=mode) is helpers.NOT_FAST


# ----------------------------------------------------------------- the loops

@pytest.fixture
def sockets(ctx):
    with push_pull(ctx, "inproc://fast-tasks") as pair:
        yield pair


@pytest.fixture
def channels(ctx):
    """A worker's channels over inproc: (requests PUSH, requests PULL,
    results PUSH, results PULL)."""
    with push_pull(ctx, "inproc://fast-tasks-req") as (req_out, req_in), \
            push_pull(ctx, "inproc://fast-tasks-res") as (res_out, res_in):
        yield req_out, req_in, res_out, res_in


def _results(wire, pull, n, **kwargs):
    malformed = []
    it = wire.receive_results(pull, None, n, WAIT_MS, lambda kind, obj: False,
                              lambda channel, exc: malformed.append(exc) or (
                                  zc.ClusterResult("FAIL", exception=exc)
                                  if exc.header is not None else None),
                              True, None, kwargs.pop("stats", None), **kwargs)
    return it, malformed


def test_receive_results_is_a_pipe_for_any_object(wire, sockets):
    push, pull = sockets
    for obj in (None, 1, zc.ClusterResult("OK", 2), [3]):
        wire.send_message(push, obj, KIND_RESULT, 1)
    push.send(b"not a message")
    stats = wire.Counters()
    it, malformed = _results(wire, pull, 4, stats=stats)
    got = list(it)
    assert [type(x).__name__ for x in got] == ["NoneType", "int", "ClusterResult", "list"]
    assert got[2].payload == 2 and got[2].task_id == 1
    assert stats.messages_received == 4 and malformed == []
    assert list(it) == []  # exhausted


def test_receive_results_unwraps_and_hands_the_rest_over(wire, sockets):
    push, pull = sockets
    sent = [zc.ClusterResult("OK", 1, "r", {"host": "h"}), zc.ClusterResult("OK", "\u00e9"),
            zc.ClusterResult("FAIL", None, None, None, ValueError("x")), 5]
    for obj in sent:
        wire.send_message(push, obj, KIND_RESULT, 1)
    push.send_multipart(_bytes(_framing_py.encode(zc.ClusterResult("OK", 1), KIND_RESULT, 9))[:1]
                        + [b"extra"])
    handed = []

    def unwrap(result):
        handed.append(result)
        if getattr(result, "status", None) == "FAIL":
            raise zc.WorkerException(worker_exception=result.exception)
        return ("other", result)

    it, malformed = _results(wire, pull, None, unwrap=unwrap)
    assert next(it) == 1
    assert next(it) == "\u00e9"
    with pytest.raises(zc.WorkerException):
        next(it)
    assert list(it) == []  # a raise ends it, as it ends a generator
    it, malformed = _results(wire, pull, 2, unwrap=unwrap, metadata=True)
    assert next(it) == ("other", 5)
    with pytest.raises(zc.WorkerException):   # the malformed one, answered with a FAIL
        next(it)
    assert len(malformed) == 1 and malformed[0].header == (KIND_RESULT, 9)
    assert [getattr(r, "status", r) for r in handed] == ["FAIL", 5, "FAIL"]


def test_receive_results_with_metadata(wire, sockets):
    push, pull = sockets
    wire.send_message(push, zc.ClusterResult("OK", 1, "r", {"host": "h", "seconds": 0.5}),
                      KIND_RESULT, 1)
    it, _ = _results(wire, pull, 1, unwrap=lambda r: pytest.fail("not handed over"),
                     metadata=True)
    assert list(it) == [(1, "r", {"host": "h", "seconds": 0.5})]


def test_receive_results_times_out_and_closes(wire, sockets):
    _, pull = sockets
    it = wire.receive_results(pull, None, None, 20, lambda k, o: False, lambda c, e: None)
    with pytest.raises(zc.ReceiverTimeoutException, match="no result within 20 ms"):
        next(it)
    it = wire.receive_results(pull, None, None, 20, lambda k, o: False, lambda c, e: None)
    it.close()
    assert list(it) == []
    with pytest.raises(TypeError):
        wire.receive_results("not a socket", None, 1, 20, lambda k, o: False, lambda c, e: None)


def test_send_requests_pairs(wire, sockets):
    push, pull = sockets
    stats = wire.Counters()
    pairs = [(1, None), ("x", {"m": 1}), (np.arange(3), None)]
    sent = wire.send_requests(push, iter(pairs), itertools.count(100), lambda t: None, stats,
                              pairs=True)
    assert sent == 3 and stats.messages_sent == 3 and stats.copied_bytes == 24
    for (payload, metadata), task_id in zip(pairs, itertools.count(100)):
        frames = pull.recv_multipart()
        assert frames == _bytes(_framing_py.encode(zc.ClusterRequest(payload, metadata),
                                                   KIND_REQUEST, task_id))


def test_run_worker_task_mode(wire, channels):
    req_out, req_in, res_out, res_in = channels
    res_in.rcvtimeo = WAIT_MS
    stats = wire.Counters()
    unsendable = []

    def handle_task(payload):
        if payload == "boom":
            raise KeyError(payload)
        if payload == "unsendable":
            return lambda: None
        if payload == "stop":
            raise SystemExit  # not an Exception: ends the loop
        return payload + 1

    def on_unsendable(result, exc):
        unsendable.append((result, exc))
        return zc.ClusterResult("FAIL", None, result.request_metadata, result.metadata, exc)

    wire.send_message(req_out, zc.ClusterRequest(1, "m1"), KIND_REQUEST, 1)
    wire.send_message(req_out, 41, KIND_COMMAND, 2)          # a bare payload, any kind
    wire.send_message(req_out, zc.ClusterRequest("boom"), KIND_REQUEST, 3)
    wire.send_message(req_out, zc.ClusterRequest("unsendable", "m4"), KIND_REQUEST, 4)
    req_out.send(b"ZC\x02\x01" + bytes(4) + b"\x05" + bytes(7) + b"R")   # truncated, id 5
    wire.send_message(req_out, "stop", KIND_REQUEST, 6)
    with pytest.raises(SystemExit):
        wire.run_worker(req_in, res_out, None, on_command=lambda k, o: True,
                        on_malformed=lambda channel, exc: zc.ClusterResult("FAIL", None,
                                                                           None, None, exc),
                        on_unsendable=on_unsendable, timeout_ms=WAIT_MS, stats=stats,
                        handle_task=handle_task, result_metadata=IDENTITY)
    got = [_framing_py.decode(res_in.recv_multipart()) for _ in range(5)]
    assert [task_id for _, task_id, _ in got] == [1, 2, 3, 4, 5]
    ok, bare, fail, unsent, malformed = (r for _, _, r in got)
    assert (ok.status, ok.payload, ok.request_metadata) == ("OK", 2, "m1")
    assert set(ok.metadata) == {"host", "pid", "seconds"} and ok.metadata["pid"] == 4242
    assert type(ok.metadata["seconds"]) is float and 0 <= ok.metadata["seconds"] < 10
    assert (bare.status, bare.payload, bare.request_metadata) == ("OK", 42, None)
    assert fail.status == "FAIL" and isinstance(fail.exception, KeyError)
    assert set(fail.metadata) == {"host", "pid", "seconds"}
    assert unsent.status == "FAIL" and unsent.request_metadata == "m4"
    assert len(unsendable) == 1 and unsendable[0][0].status == "OK"
    assert isinstance(unsendable[0][1], TypeError)
    assert malformed.status == "FAIL" and isinstance(malformed.exception, MessageFormatError)
    assert stats.requests_handled == 4  # not the one whose SystemExit ended the loop
    assert stats.messages_received == 6 and stats.messages_sent == 5


def test_run_worker_needs_a_handler(wire, sockets):
    push, pull = sockets
    with pytest.raises(TypeError, match="handle or handle_task"):
        wire.run_worker(pull, push, None, on_command=lambda k, o: True,
                        on_malformed=lambda c, e: None, on_unsendable=lambda r, e: None)


def test_node_counters_are_settable_properties(ctx):
    worker = zc.BasicWorker(ctx, zc.Connect("inproc://x"), zc.Connect("inproc://y"))
    assert (worker.messages_received, worker.messages_sent, worker.copied_bytes,
            worker.requests_handled) == (0, 0, 0, 0)
    worker.copied_bytes = 5
    assert worker.copied_bytes == 5 and worker._counters.copied_bytes == 5
    sink = zc.Sink(ctx, zc.Connect("inproc://z"))
    ventilator = zc.Ventilator(ctx, zc.Connect("inproc://w"))
    assert (sink.messages_received, sink.copied_bytes) == (0, 0)
    assert (ventilator.messages_sent, ventilator.copied_bytes) == (0, 0)


def test_worker_results_from_the_task_mode_match_the_objects(ctx):
    """A BasicWorker's result bytes are those of the ClusterResult its
    docstring describes (seconds aside)."""
    req_url, res_url, cmd_url = "inproc://w-req", "inproc://w-res", "inproc://w-cmd"
    push = ctx.socket(zmq.PUSH)
    push.bind(req_url)
    pull = ctx.socket(zmq.PULL)
    pull.bind(res_url)
    pull.rcvtimeo = WAIT_MS
    pub = ctx.socket(zmq.PUB)
    pub.bind(cmd_url)

    class PlusOne(zc.BasicWorker):
        def HandleRequest(self, request):
            return request + 1

    worker = PlusOne(ctx, zc.Connect(req_url), zc.Connect(res_url), zc.Connect(cmd_url),
                     receiver_timeout=WAIT_MS)
    thread = threading.Thread(target=worker.Run, daemon=True)
    thread.start()
    try:
        ventilator = zc.Ventilator(ctx, push)
        ventilator.Send([1, 2.5, np.arange(3)], metadata=["a", None, {"i": 1}])
        got = [_framing_py.decode(pull.recv_multipart()) for _ in range(3)]
    finally:
        zc.BasicWorker.SendKillCommand(ctx, pub, timeout=WAIT_MS)
        thread.join(WAIT_MS / 1000)
        for sock in (push, pull, pub):
            sock.close(0)
    for (_, task_id, result), (payload, metadata) in zip(
            got, [(2, "a"), (3.5, None), (np.arange(1, 4), {"i": 1})]):
        expected = zc.ClusterResult("OK", payload, metadata,
                                    dict(worker._identity, seconds=result.metadata["seconds"]))
        assert _bytes(_framing_py.encode(result, KIND_RESULT, task_id)) == _bytes(
            _framing_py.encode(expected, KIND_RESULT, task_id))
    assert worker.requests_handled == 3 and not thread.is_alive()


def test_loops_read_every_value_the_decoder_reads(wire, channels):
    """One-frame messages are read in libzmq's memory by the compiled loops:
    values that need the decoder's slow paths (pickles, scalars, dtypes not
    seen before, non-ASCII strs) come out as decode makes them."""
    req_out, req_in, res_out, res_in = channels
    values = VALUES + [np.zeros(2, dtype=">c8"), np.zeros((), dtype=[("a", "<i2")]),
                       np.datetime64("2020-01-01", "D"), {"\u00e9": 1.5}]
    for i, value in enumerate(values):
        wire.send_message(req_out, zc.ClusterRequest(value, {"i": i}), KIND_REQUEST, i + 1)
    wire.send_message(req_out, zc.ClusterRequest("stop"), KIND_REQUEST, 999)

    def handle_task(payload):
        if type(payload) is str and payload == "stop":
            raise SystemExit
        return payload

    with pytest.raises(SystemExit):
        wire.run_worker(req_in, res_out, None, on_command=lambda k, o: True,
                        on_malformed=lambda c, e: pytest.fail("malformed: %s" % e),
                        on_unsendable=lambda r, e: pytest.fail("unsendable: %s" % e),
                        timeout_ms=WAIT_MS, handle_task=handle_task,
                        result_metadata={"host": "h\u00f6st", "pid": 1})
    # (a result whose metadata is not plain ASCII may be handed over)
    it = wire.receive_results(res_in, None, len(values), WAIT_MS, lambda k, o: False,
                              lambda c, e: pytest.fail("malformed: %s" % e),
                              unwrap=lambda r: r.payload)
    assert [repr(x) for x in it] == [repr(v) for v in values]
    for i, value in enumerate(values):
        wire.send_message(req_out, zc.ClusterResult("OK", value, i, {"\u00e9": i}),
                          KIND_RESULT, 1)
    it = wire.receive_results(req_in, None, len(values), WAIT_MS, lambda k, o: False,
                              lambda c, e: pytest.fail("malformed: %s" % e),
                              unwrap=lambda r: (r.payload, r.request_metadata,
                                                r.metadata),
                              metadata=True)
    got = list(it)
    assert [repr(x) for x in got] == [repr((v, i, {"\u00e9": i}))
                                      for i, v in enumerate(values)]
