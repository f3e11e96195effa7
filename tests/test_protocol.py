"""The wire format of docs/protocol.md, pinned down.

(a) Golden messages: for every framing twin, encoding each object of
    tests/data/make_golden.py gives exactly the COMMITTED frames of
    tests/data/golden/, and decoding those frames gives the object back.
(b) A plain-pyzmq peer, written from docs/protocol.md with struct, numpy and
    zmq only, sends a request to a real worker and decodes its result.
(c) Every rejection condition of the decoder raises MessageFormatError with a
    message naming the problem, for every twin.
(d) Workers and sinks count and log malformed messages and keep serving; a
    worker answers a malformed request whose header is readable with a FAIL
    result carrying its task id.
"""

import importlib.util
import json
import logging
import os
import re
import socket
import struct
import sys
import types

import numpy as np
import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import MessageFormatError, framing
from zmq_cluster.messages import ClusterRequest, ClusterResult
from zmq_cluster.protocol import KIND_COMMAND, KIND_REQUEST, KIND_RESULT, MAX_DEPTH

from helpers import WAIT_MS, DoublingWorker, worker_thread

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
GOLDEN_DIR = os.path.join(DATA_DIR, "golden")


def _load_make_golden():
    spec = importlib.util.spec_from_file_location(
        "make_golden", os.path.join(DATA_DIR, "make_golden.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _load_make_golden()
CASES = {case["name"]: case for case in make_golden.cases()}

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="golden numpy scalars are little-endian")


def _fresh_case(name):
    """The case ``name`` with a newly built object (decoding sets task_id)."""
    return next(case for case in make_golden.cases() if case["name"] == name)


def _golden(name):
    with open(os.path.join(GOLDEN_DIR, name + ".frames")) as f:
        return json.load(f)


def _golden_frames(name):
    return [bytes.fromhex(frame) for frame in _golden(name)["frames"]]


def _as_bytes(frame):
    if isinstance(frame, zmq.Frame):
        return frame.bytes
    return bytes(memoryview(frame).cast("B"))


def assert_same(got, want, path="obj"):
    """Deep equality that also checks exact types, array dtype, shape and
    memory order, and numpy scalar dtypes."""
    assert type(got) is type(want), "%s: %s is not %s" % (path, type(got), type(want))
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.dtype.descr == want.dtype.descr, path
        assert got.shape == want.shape, path
        assert got.flags.c_contiguous == want.flags.c_contiguous, path
        assert got.flags.f_contiguous == want.flags.f_contiguous, path
        assert got.tobytes(order="A") == want.tobytes(order="A"), path
        assert got.flags.writeable and got.flags.aligned, path
    elif isinstance(want, np.generic):
        assert got.dtype == want.dtype, path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, "%s[%d]" % (path, i))
    elif isinstance(want, dict):
        assert_same(list(got), list(want), path + ".keys()")
        for key in want:
            assert_same(got[key], want[key], "%s[%r]" % (path, key))
    elif isinstance(want, ClusterRequest):
        for field in ("payload", "metadata", "task_id"):
            assert_same(getattr(got, field), getattr(want, field), path + "." + field)
    elif isinstance(want, ClusterResult):
        for field in ("status", "payload", "request_metadata", "metadata", "exception",
                      "task_id"):
            assert_same(getattr(got, field), getattr(want, field), path + "." + field)
    elif isinstance(want, BaseException):
        assert_same(got.args, want.args, path + ".args")
        for field in ("type_name", "message", "remote_traceback"):
            assert_same(getattr(got, field, None), getattr(want, field, None),
                        path + "." + field)
    else:
        assert got == want, "%s: %r != %r" % (path, got, want)


# ------------------------------------------------------------ (a) golden

def test_every_case_has_a_committed_golden_file():
    committed = {name[:-len(".frames")] for name in os.listdir(GOLDEN_DIR)
                 if name.endswith(".frames")}
    assert committed == set(CASES), "run tests/data/make_golden.py and commit the result"
    assert len(committed) >= 8


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_file_is_self_consistent(name):
    record = _golden(name)
    case = CASES[name]
    frames = _golden_frames(name)
    magic, version, kind, nframes, task_id = struct.unpack_from("<2sBBIQ", frames[0])
    assert (magic, version) == (b"ZC", 2)
    assert kind == record["kind_code"] == case["kind"]
    assert task_id == record["task_id"] == case["task_id"]
    assert nframes == len(frames) - 1
    assert record["description"]


@little_endian_only
@pytest.mark.parametrize("name", sorted(CASES))
def test_encode_gives_the_golden_frames(twin, name):
    case = _fresh_case(name)
    frames = twin.encode(case["obj"], case["kind"], case["task_id"])
    assert [_as_bytes(f).hex() for f in frames] == _golden(name)["frames"]


@little_endian_only
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("buffer_type", [bytes, bytearray])
def test_decode_of_the_golden_frames_gives_the_object(twin, name, buffer_type):
    case = _fresh_case(name)
    want = case.get("decoded", case["obj"])
    if type(want) in (ClusterRequest, ClusterResult):
        want.task_id = case["task_id"] or None
    kind, task_id, got = twin.decode([buffer_type(f) for f in _golden_frames(name)])
    assert (kind, task_id) == (case["kind"], case["task_id"])
    assert_same(got, want)


def test_golden_failure_from_an_untrusted_sender(twin):
    """Without trust the golden FAIL result's exception is a RemoteError
    carrying the three fields, and nothing in it needed pickle."""
    _, _, got = twin.decode(_golden_frames("result_fail_exception"), allow_pickle=False)
    assert_same(got.exception, zc.RemoteError("builtins.ValueError", make_golden.FAIL_MESSAGE,
                                              make_golden.FAIL_TRACEBACK))
    _, _, got = twin.decode(_golden_frames("exception_with_args"), allow_pickle=False)
    assert_same(got, zc.RemoteError("builtins.ValueError", "('bad input', 3)", ""))


def _doc_section(title, next_title):
    with open(os.path.join(os.path.dirname(DATA_DIR), "..", "docs", "protocol.md")) as f:
        doc = f.read()
    return doc[doc.index(title):doc.index(next_title)]


def _dumped_frames(section):
    """The header frames of the hex dumps in a docs section, as hex."""
    dumped = []
    for line in section.splitlines():
        # "off  hex bytes (1 or 2 spaces apart)   meaning"
        match = re.match(r"([0-9a-f]{4})  ([0-9a-f]{2}(?: {1,2}[0-9a-f]{2})*)(?:   |$)", line)
        if match:
            dumped.append((int(match.group(1), 16), bytes.fromhex(match.group(2))))
    frames = []
    for at, raw in dumped:
        if at == 0:
            frames.append(b"")
        assert at == len(frames[-1]), "offset %04x does not follow on" % at
        frames[-1] += raw
    return [f.hex() for f in frames]


def test_worked_example_in_docs_matches_the_golden_bytes():
    """The hex dump of docs/protocol.md is the golden request's header."""
    text = _dumped_frames(_doc_section("## Worked example", "## A peer in plain pyzmq"))
    request = _golden("request_array_metadata")["frames"]
    result = _golden("result_ok_metadata")["frames"]
    assert text == request + result


def test_exception_example_in_docs_matches_the_golden_bytes():
    text = _dumped_frames(_doc_section("## Exceptions", "## Pickle fallback"))
    assert text == _golden("result_fail_exception")["frames"]


# --------------------------------------------------- (b) a plain pyzmq peer
#
# Written from docs/protocol.md alone: these two functions use struct, numpy
# and zmq only, never zmq_cluster (test_peer_uses_only_struct_numpy_zmq).

def peer_encode_request(arr, metadata, task_id, inline=None):
    """The frames of ClusterRequest(arr, metadata); metadata: {str: int}.
    The array is inline ('A') when ``inline``, or by default (None) when it
    is smaller than 4096 bytes, as this package's encoders write it; else it
    has a buffer frame ('a')."""
    def str_value(text):
        raw = text.encode("utf-8")
        return b"s" + struct.pack("<I", len(raw)) + raw

    arr = np.asarray(arr)
    if arr.flags.c_contiguous:
        order = b"C"
    elif arr.flags.f_contiguous:
        order = b"F"
    else:
        arr, order = np.ascontiguousarray(arr), b"C"
    if inline is None:
        inline = arr.nbytes < 4096
    fields = [str_value(arr.dtype.str),
              struct.pack("<B%dQ" % arr.ndim, arr.ndim, *arr.shape), order]
    data = arr.tobytes(order="A")
    if inline:
        body, frames = [b"R", b"A"] + fields + [data], []
    else:
        body, frames = [b"R", b"a", struct.pack("<I", 0)] + fields, [data]
    body += [b"m", struct.pack("<I", len(metadata))]
    for key, value in metadata.items():
        body += [str_value(key), b"i", struct.pack("<q", value)]
    header = struct.pack("<2sBBIQ", b"ZC", 2, 1, len(frames), task_id)
    return [header + b"".join(body)] + frames


def peer_decode_result(frames):
    """(task_id, {status, payload, request_metadata, metadata, exception})."""
    header = bytes(frames[0])
    magic, version, kind, nframes, task_id = struct.unpack_from("<2sBBIQ", header)
    assert (magic, version, kind, nframes) == (b"ZC", 2, 2, len(frames) - 1)
    pos, used = 16, 0

    def take(fmt):  # a tuple of values
        nonlocal pos
        values = struct.unpack_from(fmt, header, pos)
        pos += struct.calcsize(fmt)
        return values

    def value():
        nonlocal pos, used
        tag = chr(*take("<B"))
        if tag in "NTF":
            return {"N": None, "T": True, "F": False}[tag]
        if tag in "idj":
            numbers = take({"i": "<q", "d": "<d", "j": "<dd"}[tag])
            return complex(*numbers) if tag == "j" else numbers[0]
        if tag in "sbI":
            (n,) = take("<I")
            raw, pos = header[pos:pos + n], pos + n
            if tag == "I":
                return int.from_bytes(raw, "little", signed=True)
            return raw.decode("utf-8") if tag == "s" else raw
        if tag in "lt":
            items = [value() for _ in range(*take("<I"))]
            return items if tag == "l" else tuple(items)
        if tag == "m":
            return {value(): value() for _ in range(*take("<I"))}  # key, then item
        if tag in "aA":  # an array in buffer frame `index`, or inline
            if tag == "a":
                (index,) = take("<I")
                assert index == used, "buffer frames are referenced in order"
                used += 1
            descr = value()
            dtype = (np.dtype(descr) if isinstance(descr, str)
                     else np.lib.format.descr_to_dtype(descr))
            shape = take("<%dQ" % take("<B"))
            order = chr(*take("<B"))
            if tag == "a":
                data = frames[index + 1]
            else:  # the elements follow in the header: prod(shape) * itemsize bytes
                n = dtype.itemsize
                for dim in shape:
                    n *= dim
                data, pos = header[pos:pos + n], pos + n
            return np.frombuffer(data, dtype).reshape(shape, order=order)
        if tag == "S":
            names = ("status", "payload", "request_metadata", "metadata", "exception")
            return dict(zip(names, [value() for _ in names]))
        if tag == "E":
            names = ("module", "qualname", "args", "message", "traceback")
            return dict(zip(names, [value() for _ in names]))
        raise ValueError("tag %r is not handled by this peer" % tag)

    result = value()
    assert pos == len(header) and used == nframes
    return task_id, result


def peer_encode_failure(task_id, request_metadata_i, module, qualname, message, traceback,
                        host="node1", pid=4242, seconds=0.25):
    """The frames of a FAIL ClusterResult whose exception is an 'E' value
    with args N (built from its message): a failure without pickle."""
    def str_value(text):
        raw = text.encode("utf-8")
        return b"s" + struct.pack("<I", len(raw)) + raw

    body = [b"S", str_value("FAIL"), b"N",                         # status, payload
            b"m", struct.pack("<I", 1), str_value("i"), b"i",       # request_metadata
            struct.pack("<q", request_metadata_i),
            b"m", struct.pack("<I", 3),                              # metadata
            str_value("host"), str_value(host), str_value("pid"), b"i", struct.pack("<q", pid),
            str_value("seconds"), b"d", struct.pack("<d", seconds),
            b"E", str_value(module), str_value(qualname), b"N",     # exception
            str_value(message), str_value(traceback)]
    return [struct.pack("<2sBBIQ", b"ZC", 2, 2, 0, task_id) + b"".join(body)]


def test_peer_uses_only_struct_numpy_zmq():
    used = set()

    def walk(code):
        used.update(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const)

    for function in (peer_encode_request, peer_decode_result, peer_encode_failure):
        walk(function.__code__)
    used = {name for name in used if not name.startswith("@")}  # pytest's assert rewriting
    assert used & set(globals()) <= {"struct", "np", "zmq"}


def test_peer_encoder_writes_the_golden_request():
    case = CASES["request_array_metadata"]
    frames = peer_encode_request(case["obj"].payload, case["obj"].metadata, case["task_id"])
    assert [f.hex() for f in frames] == _golden("request_array_metadata")["frames"]


def test_peer_encoder_writes_what_the_twins_write(twin):
    for arr in (np.ones(1), np.arange(511.0), np.arange(512.0), np.ones((2, 3), order="F"),
                np.arange(20, dtype=">i2")[::2], np.array(3.5)):
        want = twin.encode(ClusterRequest(arr, {"i": 1}), KIND_REQUEST, 8)
        got = peer_encode_request(arr, {"i": 1}, 8)
        assert [_as_bytes(f) for f in got] == [_as_bytes(f) for f in want]


def test_doc_snippets_are_right():
    """The plain-pyzmq encoder of docs/protocol.md writes the golden request."""
    with open(os.path.join(DATA_DIR, "..", "..", "docs", "protocol.md")) as f:
        doc = f.read()
    section = doc[doc.index("## A peer in plain pyzmq"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("ctx = zmq.Context()")]  # the function, not the sockets
    namespace = {}
    exec(compile(code, "docs/protocol.md", "exec"), namespace)
    encode_request = namespace["encode_request"]
    case = _fresh_case("request_array_metadata")
    frames = encode_request(case["obj"].payload, case["task_id"], 3)
    assert [f.hex() for f in frames] == _golden("request_array_metadata")["frames"]
    big = np.arange(1000.0).reshape(10, 100)
    frames = encode_request(big, 5, 3)
    assert [_as_bytes(f) for f in frames] == [
        _as_bytes(f) for f in framing.encode(ClusterRequest(big, {"i": 3}), KIND_REQUEST, 5)]


def test_peer_encoder_writes_the_golden_failure(twin):
    frames = peer_encode_failure(make_golden.EXAMPLE_TASK_ID, 3, "builtins", "ValueError",
                                 make_golden.FAIL_MESSAGE, make_golden.FAIL_TRACEBACK)
    assert [f.hex() for f in frames] == _golden("result_fail_exception")["frames"]
    _, _, got = twin.decode(frames, allow_pickle=False)
    assert got.status == "FAIL" and got.exception.type_name == "builtins.ValueError"


def test_peer_decoder_reads_the_golden_failure():
    task_id, result = peer_decode_result(_golden_frames("result_fail_exception"))
    assert task_id == make_golden.EXAMPLE_TASK_ID and result["status"] == "FAIL"
    assert result["exception"] == {
        "module": "builtins", "qualname": "ValueError", "args": None,
        "message": make_golden.FAIL_MESSAGE, "traceback": make_golden.FAIL_TRACEBACK}


def test_peer_decoder_reads_inline_and_frame_arrays():
    frames = _golden_frames("request_inline_and_frame_arrays")
    assert len(frames) == 2
    # The peer reads results: put that request's payload in one. Its body is
    # 'R', the payload, then 'N' (metadata), which becomes request_metadata.
    body = frames[0][16:]
    result = (struct.pack("<2sBBIQ", b"ZC", 2, 2, 1, 7)
              + b"S" + _s("OK") + body[1:] + b"NN")
    task_id, got = peer_decode_result([result, frames[1]])
    assert task_id == 7 and got["status"] == "OK"
    np.testing.assert_array_equal(got["payload"][0], np.arange(511.0))
    np.testing.assert_array_equal(got["payload"][1], np.arange(512.0))


def test_peer_decoder_reads_the_golden_result():
    task_id, result = peer_decode_result(_golden_frames("result_ok_metadata"))
    assert task_id == make_golden.EXAMPLE_TASK_ID
    assert result["status"] == "OK" and result["exception"] is None
    assert result["request_metadata"] == {"i": 3}
    assert result["metadata"] == {"host": "node1", "pid": 4242, "seconds": 0.25}
    np.testing.assert_array_equal(result["payload"], [[2.0, 4.0, 6.0], [8.0, 10.0, 12.0]])


@pytest.mark.parametrize("transport", ["inproc", "ipc"])
def test_plain_pyzmq_peer_talks_to_a_worker(ctx, ipc_url, transport):
    if transport == "inproc":
        req, res, cmd = "inproc://peer-req", "inproc://peer-res", "inproc://peer-cmd"
    else:
        req, res, cmd = ipc_url("req"), ipc_url("res"), ipc_url("cmd")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, WAIT_MS)  # a bound PUSH waits for its first peer
    push.bind(req)
    pull = ctx.socket(zmq.PULL)
    pull.bind(res)
    try:
        with worker_thread(ctx, req, res, cmd, receiver_timeout=WAIT_MS) as (worker, errors):
            # (array, inline?): the worker's result of a small array comes
            # back inline ('A'), in one frame, however the request sent it.
            payloads = {
                0x1234567800000001: (np.arange(6.0).reshape(2, 3), None),
                0xFFFFFFFF00000002: (np.asfortranarray(np.arange(12, dtype=">i4")
                                                       .reshape(3, 4)), None),
                3: (np.ones((300, 300)), None),  # large enough to travel zero-copy
                4: (np.ones(1), None),  # the hot case: an 8-byte payload
                5: (np.arange(10, dtype=np.int16), False),  # a foreign peer's small frame
                6: (np.arange(600.0), True),  # 4800 bytes sent inline: accepted too
            }
            for i, (task_id, (arr, inline)) in enumerate(payloads.items()):
                push.send_multipart(peer_encode_request(arr, {"i": i}, task_id, inline))
            for i, (task_id, (arr, _)) in enumerate(payloads.items()):
                assert pull.poll(WAIT_MS), "no result from the worker"
                frames = pull.recv_multipart()
                assert len(frames) == (1 if arr.nbytes < 4096 else 2)
                got_id, result = peer_decode_result(frames)
                assert got_id == task_id
                assert result["status"] == "OK" and result["exception"] is None
                np.testing.assert_array_equal(result["payload"], arr * 2)
                assert result["request_metadata"] == {"i": i}
                meta = result["metadata"]
                assert list(meta) == ["host", "pid", "seconds"]
                assert meta["host"] == socket.gethostname()
                assert meta["pid"] == os.getpid()
                assert type(meta["seconds"]) is float and meta["seconds"] >= 0
            assert worker.malformed_messages == 0
        assert errors == []
    finally:
        push.close(0)
        pull.close(0)


def test_plain_pyzmq_peer_reads_a_workers_failure(ctx):
    """A handler's exception comes back natively: a peer that knows no
    pickle reads its type, args, message and traceback."""
    req, res, cmd = "inproc://fail-req", "inproc://fail-res", "inproc://fail-cmd"
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, WAIT_MS)
    push.bind(req)
    pull = ctx.socket(zmq.PULL)
    pull.bind(res)
    try:
        with worker_thread(ctx, req, res, cmd, receiver_timeout=WAIT_MS) as (worker, errors):
            # ClusterRequest("boom", None): DoublingWorker raises KeyError("boom").
            body = b"R" + _s("boom") + b"N"
            push.send_multipart([struct.pack("<2sBBIQ", b"ZC", 2, 1, 0, 21) + body])
            assert pull.poll(WAIT_MS), "no result from the worker"
            task_id, result = peer_decode_result(pull.recv_multipart())
        assert errors == []
    finally:
        push.close(0)
        pull.close(0)
    assert task_id == 21 and result["status"] == "FAIL" and result["payload"] is None
    exc = result["exception"]
    assert (exc["module"], exc["qualname"], exc["args"], exc["message"]) == (
        "builtins", "KeyError", ["boom"], "'boom'")
    assert exc["traceback"].startswith("Traceback (most recent call last):")
    assert exc["traceback"].endswith("KeyError: 'boom'\n")


# ------------------------------------------------------ (c) rejections

def _header(nframes=0, kind=KIND_REQUEST, task_id=9, magic=b"ZC", version=2):
    return struct.pack("<2sBBIQ", magic, version, kind, nframes, task_id)


def _s(text):
    raw = text.encode() if isinstance(text, str) else text
    return b"s" + struct.pack("<I", len(raw)) + raw


def _array(index, dtype="<f8", shape=(2, 3), order=b"C"):
    dtype = _s(dtype) if isinstance(dtype, str) else dtype
    return (b"a" + struct.pack("<I", index) + dtype
            + struct.pack("<B%dQ" % len(shape), len(shape), *shape) + order)


def _inline(data, dtype="<f8", shape=(2, 3), order=b"C"):
    dtype = _s(dtype) if isinstance(dtype, str) else dtype
    return (b"A" + dtype + struct.pack("<B%dQ" % len(shape), len(shape), *shape) + order
            + data)


def _nested_lists(depth, inner=b"N"):
    return (b"l" + struct.pack("<I", 1)) * depth + inner


def _msg(body, *frames, nframes=None, **header):
    nframes = len(frames) if nframes is None else nframes
    return [_header(nframes, **header) + body] + list(frames)


F48 = bytes(48)

REJECTIONS = {
    "empty message": ([], r"empty message"),
    "header of 0 bytes": ([b""], r"shorter than the 16-byte"),
    "header of 15 bytes": ([_header()[:15]], r"15 bytes, shorter than the 16-byte"),
    "bad magic": (_msg(b"N", magic=b"XC"), r"bad magic"),
    "bad magic, lower case": (_msg(b"N", magic=b"zc"), r"bad magic"),
    "version 0": (_msg(b"N", version=0), r"unknown wire format version 0"),
    "version 1": (_msg(b"N", version=1), r"unknown wire format version 1 \(this build reads 2\)"),
    "version 3": (_msg(b"N", version=3), r"unknown wire format version 3"),
    "kind 0": (_msg(b"N", kind=0), r"unknown message kind 0"),
    "kind 4": (_msg(b"N", kind=4), r"unknown message kind 4"),
    "more frames announced": (_msg(_array(0), F48, nframes=2),
                              r"announces 2 buffer frames but 1 arrived"),
    "fewer frames announced": (_msg(b"N", b"x", nframes=0),
                               r"announces 0 buffer frames but 1 arrived"),
    "no value": (_msg(b""), r"truncated"),
    "unknown tag Z": (_msg(b"Z"), r"unknown value tag 'Z'"),
    "unknown tag NUL": (_msg(b"l\x01\x00\x00\x00\x00"), r"unknown value tag"),
    "array frame too short": (_msg(_array(0), bytes(40)), r"48 bytes\) but its frame has 40"),
    "array frame too long": (_msg(_array(0), bytes(56)), r"but its frame has 56"),
    "0-d array, empty frame": (_msg(_array(0, shape=()), b""), r"its frame has 0 bytes"),
    "order byte X": (_msg(_array(0, order=b"X"), F48), r"order 'X', expected 'C' or 'F'"),
    "order byte c": (_msg(_array(0, order=b"c"), F48), r"expected 'C' or 'F'"),
    "dtype not understood": (_msg(_array(0, dtype="x9"), F48), r"bad dtype"),
    "dtype is an int": (_msg(_array(0, dtype=b"i" + struct.pack("<q", 8)), F48),
                        r"bad dtype"),
    "dtype descr malformed": (_msg(_array(0, dtype=b"l\x01\x00\x00\x00" + _s("x")), F48),
                              r"bad dtype"),
    "object dtype": (_msg(_array(0, dtype="|O", shape=(6,)), F48), r"Python objects"),
    "object field": (_msg(_array(0, dtype=b"l\x01\x00\x00\x00t\x02\x00\x00\x00"
                                           + _s("x") + _s("|O"), shape=(6,)), F48),
                     r"Python objects"),
    "object dtype scalar": (_msg(b"g" + _s("|O") + struct.pack("<I", 8) + bytes(8)),
                            r"Python objects"),
    "frames out of order": (_msg(b"l\x02\x00\x00\x00" + _array(1) + _array(0), F48, F48),
                            r"refers to buffer frame 1; frame 0 was expected next"),
    "frame referenced twice": (_msg(b"l\x02\x00\x00\x00" + _array(0) + _array(0), F48, F48),
                               r"refers to buffer frame 0; frame 1 was expected next"),
    "frame index out of range": (_msg(_array(0), nframes=0),
                                 r"refers to buffer frame 0 of 0"),
    "second frame out of range": (_msg(b"l\x02\x00\x00\x00" + _array(0) + _array(1), F48),
                                  r"refers to buffer frame 1 of 1"),
    "pickle frame out of range": (_msg(b"p" + struct.pack("<I", 1) + b"." + struct.pack(
        "<II", 1, 0)), r"refers to buffer frame 0 of 0"),
    "unreferenced frame": (_msg(b"N", b"spare"), r"1 buffer frames are not referenced"),
    "unreferenced second frame": (_msg(_array(0), F48, b""), r"not referenced"),
    "trailing byte": (_msg(b"NN"), r"1 unexpected bytes after the value"),
    "trailing bytes after a request": (_msg(b"R" + b"N" + b"N" + b"\x00\x00"),
                                       r"2 unexpected bytes"),
    "invalid UTF-8": (_msg(_s(b"\xff\xfe")), r"invalid UTF-8"),
    "cut UTF-8 sequence": (_msg(_s(b"caf\xc3")), r"invalid UTF-8"),
    "UTF-8 in a dict key": (_msg(b"m\x01\x00\x00\x00" + _s(b"\x80") + b"N"),
                            r"invalid UTF-8"),
    "nesting too deep": (_msg(_nested_lists(MAX_DEPTH + 1)), r"nested deeper than 256"),
    "nesting far too deep": (_msg(_nested_lists(5000)), r"nested deeper than 256"),
    "unhashable dict key": (_msg(b"m\x01\x00\x00\x00" + b"l\x00\x00\x00\x00" + b"N"),
                            r"unhashable dict key"),
    "scalar too short": (_msg(b"g" + _s("<f8") + struct.pack("<I", 4) + bytes(4)),
                         r"scalar of dtype float64 has 4 bytes, expected 8"),
    "scalar too long": (_msg(b"g" + _s("<i2") + struct.pack("<I", 4) + bytes(4)),
                        r"has 4 bytes, expected 2"),
    "pickle that does not load": (_msg(b"p" + struct.pack("<I", 3) + b"\x80\x05x"
                                       + struct.pack("<I", 0)), r"does not load"),
    "inline array too short": (_msg(_inline(bytes(40))),
                               r"header truncated: an inline array needs 48 bytes at offset "
                               r"\d+, 40 left"),
    "inline array, no bytes": (_msg(_inline(b"")), r"inline array needs 48 bytes"),
    "inline array too long": (_msg(_inline(bytes(49))), r"1 unexpected bytes after the value"),
    "inline 0-d array, no bytes": (_msg(_inline(b"", shape=())), r"needs 8 bytes"),
    "inline array in a list, short": (_msg(b"l\x01\x00\x00\x00" + _inline(bytes(47))),
                                      r"inline array needs 48 bytes at offset \d+, 47 left"),
    "inline array size overflows": (_msg(_inline(bytes(8), shape=(2**63, 4))),
                                    r"of shape 9223372036854775808x4 and dtype float64 is "
                                    r"beyond the size limit"),
    "inline order byte X": (_msg(_inline(bytes(48), order=b"X")),
                            r"order 'X', expected 'C' or 'F'"),
    "inline dtype not understood": (_msg(_inline(bytes(48), dtype="x9")), r"bad dtype"),
    "inline dtype is an int": (_msg(_inline(bytes(48), dtype=b"i" + struct.pack("<q", 8))),
                               r"bad dtype"),
    "inline object dtype": (_msg(_inline(bytes(48), dtype="|O", shape=(6,))),
                            r"Python objects"),
    "inline truncated shape": (_msg(b"A" + _s("<f8") + b"\x02" + bytes(12)),
                               r"a shape needs 16 bytes"),
    "inline missing order": (_msg(b"A" + _s("<f8") + b"\x01" + struct.pack("<Q", 1)),
                             r"an array's order needs 1 bytes"),
    "inline, frame announced": (_msg(_inline(bytes(48)), bytes(48)),
                                r"1 buffer frames are not referenced"),
    "lower-case tag for an inline array": (_msg(b"a" + _inline(bytes(48))[1:]),
                                           r"refers to buffer frame|truncated|bad dtype"),
}


@pytest.mark.parametrize("frames,pattern", REJECTIONS.values(), ids=list(REJECTIONS))
def test_decoder_rejects(twin, frames, pattern):
    with pytest.raises(MessageFormatError, match=pattern):
        twin.decode(frames)


NUMPY_REFUSES = {
    "ndim 65": _msg(_array(0, shape=(1,) * 65), bytes(8)),
    "empty array beyond numpy's size limit": _msg(_array(0, shape=(0, 2**63)), b""),
    "subarray dtype string": _msg(_array(0, dtype="(2,)<f8", shape=(3,)), bytes(48)),
    "inline ndim 65": _msg(_inline(bytes(8), shape=(1,) * 65)),
    "inline empty array beyond numpy's size limit": _msg(_inline(b"", shape=(0, 2**63))),
    "inline subarray dtype string": _msg(_inline(bytes(48), dtype="(2,)<f8", shape=(3,))),
}


@pytest.mark.parametrize("frames", NUMPY_REFUSES.values(), ids=list(NUMPY_REFUSES))
def test_decoder_rejects_arrays_numpy_refuses(twin, frames):
    with pytest.raises(MessageFormatError):
        twin.decode(frames)


@pytest.mark.parametrize("obj", [np.str_(""), np.bytes_(b""), np.void(b"")],
                         ids=["str_", "bytes_", "void"])
def test_zero_itemsize_scalars_round_trip(twin, obj):
    _, _, got = twin.decode(twin.encode(obj, KIND_REQUEST))
    assert_same(got, obj)


@pytest.mark.parametrize("obj", [{1, 2}, ClusterRequest(np.arange(3), {"tags": frozenset()}),
                                 [np.arange(3), range(3)]],
                         ids=["set", "frozenset in metadata", "range after an array"])
def test_decoder_refuses_pickle_when_not_allowed(twin, obj):
    frames = twin.encode(obj, KIND_REQUEST, 1)
    with pytest.raises(MessageFormatError, match=r"pickle is not allowed"):
        twin.decode(frames, allow_pickle=False)
    twin.decode(frames)  # and accepts it by default


def test_nesting_limit_is_inclusive(twin):
    kind, _, got = twin.decode(_msg(_nested_lists(MAX_DEPTH, b"i" + struct.pack("<q", 1))))
    for _ in range(MAX_DEPTH):
        got, = got
    assert got == 1


def test_message_format_error_is_a_value_error():
    assert issubclass(MessageFormatError, ValueError)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_truncation_is_rejected(twin, name):
    frames = _golden_frames(name)
    header = frames[0]
    for cut in range(len(header)):
        with pytest.raises(MessageFormatError) as info:
            twin.decode([header[:cut]] + frames[1:])
        expected = "shorter than the 16-byte" if cut < 16 else "header truncated"
        assert expected in str(info.value), (cut, str(info.value))


# ------------------------------------------- (d) receivers keep serving

def _recv(socket):
    assert socket.poll(WAIT_MS), "nothing received within %d ms" % WAIT_MS
    return framing.decode(socket.recv_multipart(copy=False))


class _NoPickleDoublingWorker(DoublingWorker):
    allow_pickle = False


def test_worker_drops_malformed_requests_and_keeps_serving(ctx, ipc_url, caplog):
    req, res, cmd = ipc_url("req"), ipc_url("res"), ipc_url("cmd")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, WAIT_MS)
    push.bind(req)
    pull = ctx.socket(zmq.PULL)
    pull.bind(res)
    good = np.arange(4.0)
    try:
        with caplog.at_level(logging.WARNING, logger="zmq_cluster"), \
                worker_thread(ctx, req, res, cmd, worker_class=_NoPickleDoublingWorker,
                              receiver_timeout=WAIT_MS) as (worker, errors):
            # Unreadable fixed headers: dropped, no result.
            push.send_multipart([b"garbage"])
            push.send_multipart(_msg(b"N", version=7, task_id=70))
            # Readable headers, broken bodies: FAIL results with their task ids.
            broken = {72: (_msg(b"Z", task_id=72), "unknown value tag"),
                      73: (_msg(_array(0), bytes(8), task_id=73), "its frame has 8 bytes"),
                      74: (_msg(_array(0), nframes=1, task_id=74), "announces 1 buffer"),
                      75: (framing.encode(ClusterRequest({1, 2}), KIND_REQUEST, 75),
                           "pickle is not allowed")}
            for frames, _ in broken.values():
                push.send_multipart(frames)
            push.send_multipart(framing.encode(ClusterRequest(good, "m"), KIND_REQUEST, 76))

            for task_id, (_, reason) in broken.items():
                kind, got_id, result = _recv(pull)
                assert (kind, got_id, result.task_id) == (KIND_RESULT, task_id, task_id)
                assert result.status == ClusterResult.STATUS_FAIL and result.payload is None
                assert isinstance(result.exception, MessageFormatError)
                assert reason in str(result.exception)
                assert set(result.metadata) == {"host", "pid", "seconds"}
            kind, got_id, result = _recv(pull)  # the worker still serves
            assert (kind, got_id, result.status) == (KIND_RESULT, 76, "OK")
            np.testing.assert_array_equal(result.payload, good * 2)
            assert result.request_metadata == "m"
            assert worker.malformed_messages == 2 + len(broken)
            assert worker.requests_handled == 1
            assert not pull.poll(0)  # nothing for the unreadable ones
        assert errors == []
    finally:
        push.close(0)
        pull.close(0)
    dropped = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(dropped) == 2 + len(broken)


def test_sink_drops_malformed_messages_and_keeps_serving(ctx, ipc_url, caplog):
    res, cmd = ipc_url("res"), ipc_url("cmd")
    sink = zc.BasicSink(ctx, zc.Connect(res, bind=True), zc.Connect(cmd),
                        receiver_timeout=WAIT_MS)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, WAIT_MS)
    xpub = ctx.socket(zmq.XPUB)
    xpub.bind(cmd)
    try:
        with caplog.at_level(logging.WARNING, logger="zmq_cluster"), sink:
            push.connect(res)
            malformed = [
                [b""],
                _msg(b"N", magic=b"QQ", kind=KIND_RESULT),
            ]  # readable headers are reported: tests/test_nodes.py
            for frames in malformed:
                push.send_multipart(frames)
            push.send_multipart(framing.encode(ClusterResult("OK", np.ones(3)), KIND_RESULT, 7))
            got = list(sink.Receive(1, timeout=WAIT_MS))
            assert len(got) == 1
            assert (got[0].status, got[0].task_id) == ("OK", 7)
            np.testing.assert_array_equal(got[0].payload, np.ones(3))
            assert sink.malformed_messages == len(malformed)

            # The command channel: a malformed command is dropped, the kill
            # that follows still ends Receive.
            assert xpub.poll(WAIT_MS) and xpub.recv() == b"\x01"  # the sink subscribed
            xpub.send_multipart([_header(kind=KIND_COMMAND)[:10]])
            xpub.send_multipart(framing.encode(zc.BasicSink.CMD_KILL, KIND_COMMAND))
            assert list(sink.Receive(timeout=WAIT_MS)) == []
            assert sink.malformed_messages == len(malformed) + 1
    finally:
        push.close(0)
        xpub.close(0)
    dropped = [r for r in caplog.records if r.levelno == logging.WARNING
               and r.name == "zmq_cluster"]
    assert len(dropped) == len(malformed) + 1
