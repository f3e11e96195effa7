"""The compiled framing twin: that it is built and linked right, and that it
writes the same bytes, reads the same values and raises the same errors as
the pure-Python twin."""

import math
import os
import subprocess
import sys
import textwrap
import types
from collections import OrderedDict

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zmq_cluster import _framing_py as py_twin
from zmq_cluster._compat import NO_EXTENSIONS
from zmq_cluster.exceptions import EncodeError, MessageFormatError
from zmq_cluster.messages import ClusterRequest, ClusterResult
from zmq_cluster.protocol import (
    HEADER, INLINE_LIMIT, KIND_COMMAND, KIND_REQUEST, KIND_RESULT, MAGIC, VERSION,
)

if NO_EXTENSIONS:
    pytest.skip("ZMQ_CLUSTER_NO_EXTENSIONS is set: this module tests the compiled twin",
                allow_module_level=True)

# Imported at collection: without ZMQ_CLUSTER_NO_EXTENSIONS a missing or
# broken extension fails the run here instead of being skipped.
from zmq_cluster._fastpath import framing as cy_twin  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ the build

def test_extension_is_compiled():
    assert cy_twin.__file__.endswith(".so"), cy_twin.__file__
    assert cy_twin.__name__ == "zmq_cluster._fastpath.framing"
    import zmq_cluster
    import zmq_cluster.framing
    assert zmq_cluster.FASTPATH
    assert zmq_cluster.framing.encode is cy_twin.encode
    assert zmq_cluster.framing.decode is cy_twin.decode


_MAPS_SCRIPT = textwrap.dedent("""
    import sys
    for name in sys.argv[1:]:
        __import__(name)
    import zmq
    ctx = zmq.Context()          # make libzmq do some work too
    ctx.socket(zmq.PAIR).close()
    ctx.term()
    paths = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and "libzmq" in fields[5].rsplit("/", 1)[-1]:
                paths.add(fields[5].strip())
    print("\\n".join(sorted(paths)))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("imports", [
    ["zmq", "zmq_cluster._fastpath.framing"],
    ["zmq_cluster._fastpath.framing"],
    ["zmq_cluster"],
], ids=["zmq-then-extension", "extension", "package"])
def test_one_libzmq_in_the_process(imports):
    env = dict(os.environ)
    env.pop("ZMQ_CLUSTER_NO_EXTENSIONS", None)
    out = subprocess.run([sys.executable, "-c", _MAPS_SCRIPT, *imports], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    mapped = out.split()
    assert len(mapped) == 1, "several libzmq copies mapped: %s" % mapped


# ------------------------------------------------------------------ payloads

class _Point:
    """A user class: pickled."""

    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return type(other) is _Point and _same(other.x, self.x)


def _arrays():
    base = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    struct = np.dtype([("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")])
    aligned = np.dtype([("x", "u1"), ("y", "<f8")], align=True)
    out = [
        base, np.asfortranarray(base), base[:, ::2], base.transpose(2, 0, 1),
        np.arange(10, dtype=">f8"), np.arange(10, dtype="<i2")[::3],
        np.zeros(0), np.zeros((3, 0, 2), np.int32), np.array(5.5), np.array(7, ">u4"),
        np.arange(6).astype("M8[s]").reshape(2, 3), np.array(["NaT", "2020-01-01"], "M8[D]"),
        np.arange(4).astype(">m8[ms]"), np.zeros(3, struct), np.ones(2, aligned),
        np.array([b"ab", b"c"]), np.array(["hé", "日本"]), np.array([True, False]),
        np.arange(8, dtype=np.complex128), np.arange(8, dtype=np.float16),
        np.frombuffer(b"\x01\x02\x03\x04", np.uint8),            # read-only
        np.arange(1 << 14, dtype=np.float64),                     # 128 KiB: a view
    ]
    for dt in ("i1", "u1", "<i2", ">i2", "<u8", ">i8", "<f4", ">f4", "<c8", ">c16", "?"):
        out.append(np.arange(12).astype(dt).reshape(3, 4, order="F"))
    return out


def _payloads():
    request = ClusterRequest(7, {"index": 3, "name": "job"})
    request.task_id = 9  # not encoded: the header carries it
    return [
        None, True, False, 0, 1, -1, 2**63 - 1, -2**63, 2**63, -2**63 - 1, 2**200, -(3**150),
        0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 1e-310, 1j, complex(-0.0, math.nan),
        "", "ascii", "héllo wörld", "日本語 ✓ 🎉", "\ud800 lone surrogate", "x" * 5000,
        b"", b"\x00\xff" * 10, bytes(range(256)) * 20,
        [], (), {}, [1, [2, [3, (4, 5)]]], (1, "a", b"b", None), {"a": 1, 2: "b", (3, 4): [5]},
        {"nested": {"deeper": {"deepest": [1.5, {"x": None}]}}}, [[[]]] * 3,
        np.int8(-3), np.uint64(2**64 - 1), np.float16(1.5), np.float64(2.5), np.complex64(1j),
        np.bool_(True), np.datetime64("2020-01-01T12:00"), np.timedelta64(5, "s"),
        np.str_("np str"), np.bytes_(b"np bytes"),
        np.zeros(2, [("a", "<i4"), ("b", "S2")])[1],
        *_arrays(),
        {"arrays": [np.arange(3), np.ones((2, 2), ">f4")], "scalar": np.int32(4)},
        request,
        ClusterRequest(np.arange(5.0), None),
        ClusterResult("OK", b"8bytes!!", {"index": 3}, {"host": "h", "pid": 1, "seconds": 0.5}),
        ClusterResult("FAIL", None, None, {}, ValueError("boom", 3)),
        {1, 2, 3}, frozenset({"a"}), ValueError("an exception"), KeyError("k"),
        _Point([1, 2]), OrderedDict(a=1), np.array([1, "x"], dtype=object),
        [np.arange(3), _Point(np.arange(4))],                    # pickle-5 out-of-band buffers
    ]


def _same(a, b, layout=False):
    """Equality for decoded values: arrays by dtype, shape and bytes (and
    memory layout with ``layout``); NaN equals NaN; exceptions by type and
    args; records by fields."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        if a.dtype.hasobject:
            return a.shape == b.shape and all(_same(x, y) for x, y in zip(a.flat, b.flat))
        if layout and (a.flags.c_contiguous != b.flags.c_contiguous
                       or a.flags.f_contiguous != b.flags.f_contiguous
                       or a.flags.writeable != b.flags.writeable):
            return False
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a)
                                                     == math.copysign(1, b))
    if isinstance(a, complex):
        return _same(a.real, b.real) and _same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, layout) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k], layout) for k in a)
    if isinstance(a, BaseException):
        return a.args == b.args
    if isinstance(a, (ClusterRequest, ClusterResult)):
        return all(_same(getattr(a, f), getattr(b, f), layout) for f in type(a).__slots__)
    return a == b


def _expected(obj, task_id):
    """What decoding ``obj`` sent with ``task_id`` must give."""
    if isinstance(obj, np.ndarray) and not obj.dtype.hasobject and not (
            obj.flags.c_contiguous or obj.flags.f_contiguous):
        return np.ascontiguousarray(obj)
    if isinstance(obj, (ClusterRequest, ClusterResult)):
        fields = [getattr(obj, name) for name in type(obj).__slots__ if name != "task_id"]
        obj = type(obj)(*fields)
        obj.task_id = task_id or None  # the header's, set by decode
    return obj


def _frame_bytes(frames):
    return [bytes(memoryview(f).cast("B")) for f in frames]


def _stats(start=0):
    return types.SimpleNamespace(copied_bytes=start)


def _check_twins_agree(obj, kind=KIND_REQUEST, task_id=5):
    """Same bytes, same decoded values and the same copy counts (encode's
    and decode's ``stats``) from both twins; returns encode's count."""
    py_stats, cy_stats = _stats(), _stats(7)
    py_frames = py_twin.encode(obj, kind, task_id, stats=py_stats)
    cy_frames = cy_twin.encode(obj, kind, task_id, stats=cy_stats)
    assert type(cy_frames) is list and type(cy_frames[0]) is bytes
    assert cy_frames[0] == py_frames[0]  # the header frame, byte for byte
    assert _frame_bytes(cy_frames[1:]) == _frame_bytes(py_frames[1:])
    assert cy_stats.copied_bytes - 7 == py_stats.copied_bytes
    expected = _expected(obj, task_id)
    for frames in (py_frames, cy_frames, [zmq.Frame(f) for f in _frame_bytes(py_frames)]):
        decoded, counts = [], []
        for twin in (py_twin, cy_twin):
            stats = _stats()
            decoded.append(twin.decode(frames, stats=stats))
            counts.append(stats.copied_bytes)
        for got_kind, got_task_id, got in decoded:
            assert (got_kind, got_task_id) == (kind, task_id)
            assert _same(got, expected), (got, expected)
        assert _same(decoded[0][2], decoded[1][2], layout=True)
        assert counts[0] == counts[1], counts
    return py_stats.copied_bytes


@pytest.mark.parametrize("obj", _payloads(), ids=lambda obj: type(obj).__name__)
def test_twins_write_the_same_bytes_and_read_each_other(obj):
    _check_twins_agree(obj)


@pytest.mark.parametrize("kind, task_id", [
    (KIND_REQUEST, 0), (KIND_RESULT, 1), (KIND_COMMAND, 2**64 - 1), (True, 3),
    (np.uint8(2), np.uint64(2**63)), (KIND_REQUEST, True),
])
def test_header_fields(kind, task_id):
    obj = ClusterRequest(1, None)
    py_frames = py_twin.encode(obj, kind, task_id)
    assert cy_twin.encode(obj, kind, task_id)[0] == py_frames[0]
    assert cy_twin.decode(py_frames)[:2] == py_twin.decode(py_frames)[:2]


@pytest.mark.parametrize("kind, task_id", [
    (0, 0), (4, 0), ("1", 0), (1.5, 0), (KIND_REQUEST, -1), (KIND_REQUEST, 2**64),
    (KIND_REQUEST, 1.0), (KIND_REQUEST, "7"), ([1], 0),
])
def test_bad_header_arguments_raise_the_same(kind, task_id):
    _assert_same_error(lambda twin: twin.encode(None, kind, task_id))


def test_unpicklable_and_recursive_values_raise():
    kind, _ = _assert_same_error(lambda twin: twin.encode(lambda: 1, KIND_REQUEST))
    assert kind is EncodeError
    loop = []
    loop.append(loop)
    kind, text = _assert_same_error(lambda twin: twin.encode(loop, KIND_REQUEST))
    assert kind is EncodeError and "nested deeper than 256" in text


def test_long_headers_grow_past_the_stack_buffer():
    _check_twins_agree([{"k%d" % i: "v" * i} for i in range(300)])
    _check_twins_agree({"blob": b"\x01" * 100000, "text": "é" * 50000})


def test_dtype_changed_in_place_is_encoded_afresh():
    arr = np.zeros(2, [("a", "<i4"), ("b", "<f8")])
    _check_twins_agree(arr)
    arr.dtype.names = ("x", "y")  # a structured dtype's names can be reassigned
    _check_twins_agree(arr)
    assert cy_twin.decode(cy_twin.encode(arr, KIND_REQUEST))[2].dtype.names == ("x", "y")


@pytest.mark.parametrize("writeable", [False, True], ids=["bytes", "bytearray"])
@pytest.mark.parametrize("copy_threshold, alignment", [
    (0, None), (10**9, None), (0, 64), (0, 1), (1.5, None), (0, 4096.0), (0, 0), (-1, 8),
])
def test_views_copies_and_alignment_agree(writeable, copy_threshold, alignment):
    arr = np.arange(4096, dtype=np.float64).reshape(64, 64)
    sent = py_twin.encode({"a": arr, "f": np.asfortranarray(arr[:8])}, KIND_REQUEST)
    # The same frame objects for both twins: same addresses, same alignment.
    frames = sent[:1] + [bytearray(bytes(b)) if writeable else bytes(b) for b in sent[1:]]
    results = []
    for twin in (py_twin, cy_twin):
        try:
            got = twin.decode(frames, copy_threshold=copy_threshold, alignment=alignment)[2]
        except Exception as exc:  # noqa: BLE001 -- compared below
            results.append((type(exc), str(exc)))
            continue
        views = []
        for key, frame in zip(("a", "f"), frames[1:]):
            value = got[key]
            views.append((np.shares_memory(value, np.frombuffer(frame, np.uint8)),
                          value.flags.writeable, value.flags.aligned,
                          value.flags.c_contiguous, value.flags.f_contiguous))
            if alignment:
                assert value.ctypes.data % int(alignment) == 0
        np.testing.assert_array_equal(got["a"], arr)
        np.testing.assert_array_equal(got["f"], arr[:8])
        results.append(views)
    assert results[0] == results[1]


def test_frame_buffer_matches():
    for arr in _arrays():
        if arr.flags.c_contiguous or arr.flags.f_contiguous:
            got, want = cy_twin.frame_buffer(arr), py_twin.frame_buffer(arr)
            assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape
            assert got.tobytes() == want.tobytes()
            assert got.flags.writeable == want.flags.writeable
            if arr.nbytes:
                assert np.shares_memory(got, arr)


# --------------------------------------------------------- hypothesis: arrays

_DTYPES = (hnp.scalar_dtypes() | hnp.byte_string_dtypes(max_len=4)
           | hnp.unicode_string_dtypes(max_len=3)
           | hnp.datetime64_dtypes() | hnp.timedelta64_dtypes()
           | hnp.integer_dtypes(endianness="=") | hnp.floating_dtypes(endianness=">")
           | hnp.array_dtypes(hnp.scalar_dtypes(), max_size=3)
           | hnp.nested_dtypes(max_leaves=4))


@st.composite
def _laid_out_arrays(draw):
    arr = draw(hnp.arrays(_DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0,
                                                    max_side=4)))
    layout = draw(st.sampled_from(["C", "F", "strided", "transposed"]))
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim:
        arr = arr[..., ::2]
    elif layout == "transposed":
        arr = arr.T
    return arr


@FUZZ
@given(arr=_laid_out_arrays(), kind=st.sampled_from([KIND_REQUEST, KIND_RESULT]),
       task_id=st.integers(0, 2**64 - 1))
def test_hypothesis_arrays(arr, kind, task_id):
    _check_twins_agree(arr, kind, task_id)
    _check_twins_agree(ClusterResult("OK", [arr, arr.dtype.str], {"n": arr.size}), kind, task_id)


@st.composite
def _arrays_near_the_inline_limit(draw):
    """Arrays whose nbytes is INLINE_LIMIT or a few items either side, in
    every layout, with a shape of 1 to 3 dims."""
    dtype = draw(st.sampled_from(["u1", "<i2", ">i4", "<f8", ">c16", "S3", "<M8[s]",
                                  [("a", "<i4"), ("b", "S3")]]))
    dtype = np.dtype(dtype)
    count = INLINE_LIMIT // dtype.itemsize + draw(st.integers(-2, 2))
    layout = draw(st.sampled_from(["C", "F", "strided"]))
    seed = draw(st.integers(0, 2**32 - 1))
    raw = np.random.default_rng(seed).integers(0, 256, 2 * count * dtype.itemsize, np.uint8)
    base = raw.view(dtype)
    arr = base[::2].copy() if layout != "strided" else base[::2]
    assert arr.size == count
    split = draw(st.sampled_from([1, 2, 3]))
    if split > 1:
        arr = arr[:count - count % split].reshape(split, -1)
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim == 2:
        arr = arr.T
    return arr


@FUZZ
@given(arr=_arrays_near_the_inline_limit(), kind=st.sampled_from([KIND_REQUEST, KIND_RESULT]))
def test_hypothesis_arrays_near_the_inline_limit(arr, kind):
    contiguous = arr.flags.c_contiguous or arr.flags.f_contiguous
    inline = arr.nbytes < INLINE_LIMIT
    copied = _check_twins_agree(arr, kind, 3)
    assert copied == (arr.nbytes if inline or not contiguous else 0)
    frames = cy_twin.encode(ClusterRequest(arr, {"i": 3}), kind, 3)
    assert len(frames) == (1 if inline else 2)
    assert frames[0][17] == (ord("A") if inline else ord("a"))
    _check_twins_agree(ClusterResult("OK", [arr, np.ones(1)], {"i": 3},
                                     {"host": "h", "pid": 1, "seconds": 0.1}), kind, 3)


def test_inline_arrays_honour_alignment():
    frames = py_twin.encode({"a": np.arange(9.0), "b": np.ones(3, np.int8)}, KIND_REQUEST)
    assert len(frames) == 1
    _assert_same_error(lambda twin: twin.decode(frames, alignment=4096.0))
    for alignment in (None, 1, 8, 64, 4096, 0, np.int64(32)):
        results = []
        for twin in (py_twin, cy_twin):
            got = twin.decode(frames, alignment=alignment)[2]
            for value in got.values():
                assert value.flags.writeable and value.flags.aligned
                if alignment:
                    assert value.ctypes.data % int(alignment) == 0
            results.append(got)
        assert _same(results[0], results[1], layout=True)


_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.complex_numbers() | st.text(max_size=20) | st.binary(max_size=20)
           | hnp.from_dtype(np.dtype("f8")).map(np.float64) | st.integers(-5, 5).map(np.int16))
_VALUES = st.recursive(
    _LEAVES,
    lambda children: (st.lists(children, max_size=4) | st.tuples(children, children)
                      | st.dictionaries(st.text(max_size=5) | st.integers(), children,
                                        max_size=4)),
    max_leaves=20)


@FUZZ
@given(value=_VALUES)
def test_hypothesis_values(value):
    _check_twins_agree(ClusterRequest(value, {"meta": value}))


# ------------------------------------------------------------ malformed input

def _assert_same_error(call):
    """``call(twin)`` raises for both twins: the same type, the same text."""
    errors = []
    for twin in (py_twin, cy_twin):
        with pytest.raises(Exception) as info:  # noqa: PT011 -- compared below
            call(twin)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    return errors[0]


def _header(body, nframes=0, kind=KIND_REQUEST, task_id=0):
    return HEADER.pack(MAGIC, VERSION, kind, nframes, task_id) + body


def _valid_messages():
    return [py_twin.encode(obj, KIND_REQUEST, 3) for obj in (
        ClusterRequest(7, {"index": 3, "name": "héllo"}),
        ClusterResult("OK", [1.5, 2**70, 1j, b"xy", (None, True)], None, {}, None),
        {"a": np.arange(6, dtype=">i4").reshape(2, 3), "s": np.float32(2),
         "st": np.zeros(2, [("a", "<i4"), ("b", "S2")])},
        [_Point(1), np.asfortranarray(np.ones((2, 2)))],
    )]


_BAD = [
    ("empty message", []),
    ("short header", [b"ZC\x01"]),
    ("bad magic", [b"XY" + _header(b"N")[2:]]),
    ("bad version", [b"ZC\x09" + _header(b"N")[3:]]),
    ("bad kind", [_header(b"N", kind=0)]),
    ("bad kind 200", [_header(b"N", kind=200)]),
    ("frame count", [_header(b"N", nframes=1)]),
    ("missing value", [_header(b"")]),
    ("unknown tag", [_header(b"?")]),
    ("unknown tag byte", [_header(b"\xff")]),
    ("trailing bytes", [_header(b"NN")]),
    ("unreferenced frame", [_header(b"N", nframes=1), b"x"]),
    ("truncated int", [_header(b"i\x01\x02")]),
    ("truncated float", [_header(b"d")]),
    ("truncated complex", [_header(b"j" + bytes(15))]),
    ("truncated str", [_header(b"s\x05\x00\x00\x00ab")]),
    ("str length", [_header(b"s\x05")]),
    ("invalid utf-8", [_header(b"s\x02\x00\x00\x00\xff\xfe")]),
    ("truncated bytes", [_header(b"b\xff\xff\xff\xffab")]),
    ("truncated bigint", [_header(b"I\x09\x00\x00\x00\x01")]),
    ("huge list", [_header(b"l\xff\xff\xff\xffNN")]),
    ("huge tuple", [_header(b"t\xff\xff\xff\xff")]),
    ("huge dict", [_header(b"m\xff\xff\xff\xffNN")]),
    ("unhashable key", [_header(b"m\x01\x00\x00\x00l\x00\x00\x00\x00N")]),
    ("dict missing value", [_header(b"m\x01\x00\x00\x00N")]),
    ("too deep", [_header(b"l\x01\x00\x00\x00" * 300 + b"N")]),
    ("deep but fine", [_header(b"l\x01\x00\x00\x00" * 250 + b"N")]),
    ("request missing metadata", [_header(b"Ri\x01\x00\x00\x00\x00\x00\x00\x00")]),
    ("result missing fields", [_header(b"SNNN")]),
    ("array frame index", [_header(b"a\x01\x00\x00\x00", nframes=2), b"", b""]),
    ("array frame missing", [_header(b"a\x00\x00\x00\x00")]),
    ("array bad dtype", [_header(b"a\x00\x00\x00\x00s\x03\x00\x00\x00zz9\x00C", 1), b""]),
    ("array dtype not str", [_header(b"a\x00\x00\x00\x00i" + bytes(8) + b"\x00C", 1), b""]),
    ("array object dtype", [_header(b"a\x00\x00\x00\x00s\x02\x00\x00\x00|O\x00C", 1), bytes(8)]),
    ("array bad order", [_header(b"a\x00\x00\x00\x00s\x03\x00\x00\x00<f8\x00X", 1), bytes(8)]),
    ("array size", [_header(b"a\x00\x00\x00\x00s\x03\x00\x00\x00<f8\x01\x02" + bytes(7) + b"C",
                            1), bytes(8)]),
    ("array overflow", [_header(b"a\x00\x00\x00\x00s\x03\x00\x00\x00<f8\x02" + b"\xff" * 16
                                + b"C", 1), bytes(8)]),
    ("array zero dim huge", [_header(b"a\x00\x00\x00\x00s\x03\x00\x00\x00<f8\x02" + bytes(8)
                                     + b"\xff" * 8 + b"C", 1), b""]),
    ("array 65 dims", [_header(b"a\x00\x00\x00\x00s\x03\x00\x00\x00<f8\x41"
                               + (b"\x01" + bytes(7)) * 65 + b"C", 1), bytes(8)]),
    ("array truncated shape", [_header(b"a\x00\x00\x00\x00s\x03\x00\x00\x00<f8\x03" + bytes(9),
                                       1), bytes(8)]),
    ("bad list dtype", [_header(b"a\x00\x00\x00\x00l\x01\x00\x00\x00N\x00C", 1), b""]),
    ("scalar size", [_header(b"gs\x03\x00\x00\x00<f8\x04\x00\x00\x00abcd")]),
    ("scalar bad dtype", [_header(b"gs\x01\x00\x00\x00?\x00\x00\x00\x00")]),
    ("pickle garbage", [_header(b"p\x03\x00\x00\x00abc\x00\x00\x00\x00")]),
    ("pickle frame index", [_header(b"p\x01\x00\x00\x00.\x01\x00\x00\x00\x05\x00\x00\x00",
                                    1), b""]),
    ("bigint of no bytes", [_header(b"I\x00\x00\x00\x00")]),
    ("inline ok", [_header(b"As\x03\x00\x00\x00<f8\x01\x02" + bytes(7) + b"C" + bytes(16))]),
    ("inline F", [_header(b"As\x03\x00\x00\x00<i2\x02\x02" + bytes(7) + b"\x03" + bytes(7)
                          + b"F" + bytes(range(12)))]),
    ("inline short", [_header(b"As\x03\x00\x00\x00<f8\x01\x02" + bytes(7) + b"C" + bytes(15))]),
    ("inline long", [_header(b"As\x03\x00\x00\x00<f8\x01\x02" + bytes(7) + b"C" + bytes(17))]),
    ("inline no data", [_header(b"As\x03\x00\x00\x00<f8\x00C")]),
    ("inline bad order", [_header(b"As\x03\x00\x00\x00<f8\x00c" + bytes(8))]),
    ("inline bad dtype", [_header(b"As\x03\x00\x00\x00zz9\x00C" + bytes(8))]),
    ("inline dtype not str", [_header(b"Ai" + bytes(8) + b"\x00C" + bytes(8))]),
    ("inline object dtype", [_header(b"As\x02\x00\x00\x00|O\x00C" + bytes(8))]),
    ("inline overflow", [_header(b"As\x03\x00\x00\x00<f8\x02" + b"\xff" * 16 + b"C")]),
    ("inline huge", [_header(b"As\x03\x00\x00\x00<f8\x01" + b"\xff" * 7 + b"\x0fC")]),
    ("inline zero dim huge", [_header(b"As\x03\x00\x00\x00<f8\x02" + bytes(8) + b"\xff" * 8
                                      + b"C")]),
    ("inline 65 dims", [_header(b"As\x03\x00\x00\x00<f8\x41" + (b"\x01" + bytes(7)) * 65
                                + b"C" + bytes(8))]),
    ("inline subarray dtype", [_header(b"As\x07\x00\x00\x00(2,)<f8\x01\x03" + bytes(7) + b"C"
                                       + bytes(48))]),
    ("inline structured", [_header(b"Al\x01\x00\x00\x00t\x02\x00\x00\x00s\x01\x00\x00\x00x"
                                   b"s\x03\x00\x00\x00<i2\x00C" + b"\x01\x02")]),
    ("inline zero itemsize", [_header(b"As\x03\x00\x00\x00|V0\x01\x05" + bytes(7) + b"C")]),
    ("inline in a request", [_header(b"RAs\x03\x00\x00\x00<f8\x00C" + bytes(8) + b"N")]),
    ("frame of wrong type", [_header(b"a\x00\x00\x00\x00s\x03\x00\x00\x00<f8\x00C", 1), 5]),
]


@pytest.mark.parametrize("frames", [frames for _, frames in _BAD],
                         ids=[name for name, _ in _BAD])
def test_malformed_messages_raise_the_same_error(frames):
    results = []
    for twin in (py_twin, cy_twin):
        for wrap in (list, lambda fs: [zmq.Frame(f) if isinstance(f, bytes) else f
                                       for f in fs]):
            try:
                results.append(("ok", twin.decode(wrap(frames))))
            except Exception as exc:  # noqa: BLE001 -- compared below
                results.append((type(exc), str(exc)))
    first = results[0]
    if first[0] == "ok":
        assert all(r[0] == "ok" and _same(r[1], first[1], layout=True) for r in results), results
    else:
        assert all(r == first for r in results), results


def test_pickle_refused_by_both():
    frames = py_twin.encode({1, 2}, KIND_REQUEST)
    kind, text = _assert_same_error(lambda twin: twin.decode(frames, allow_pickle=False))
    assert kind is MessageFormatError and "refused" in text


def test_every_truncation_raises_the_same_error():
    for frames in _valid_messages():
        header = frames[0]
        for end in range(len(header)):
            cut = [header[:end]] + frames[1:]
            kind, _ = _assert_same_error(lambda twin: twin.decode(cut))
            assert kind is MessageFormatError


@FUZZ
@given(data=st.data())
def test_hypothesis_corrupted_headers(data):
    frames = data.draw(st.sampled_from(_valid_messages()))
    header = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(header) - 1))
        header[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        header += data.draw(st.binary(max_size=4))
    corrupted = [bytes(header)] + frames[1:]
    results = []
    for twin in (py_twin, cy_twin):
        try:
            results.append(("ok", twin.decode(corrupted, allow_pickle=False)))
        except Exception as exc:  # noqa: BLE001 -- compared below
            results.append((type(exc), str(exc)))
    if results[0][0] == "ok":
        assert results[1][0] == "ok" and _same(results[0][1], results[1][1]), results
    else:
        assert results[0] == results[1]


@pytest.mark.parametrize("tag", [b"A", b"a\x00\x00\x00\x00"], ids=["inline", "frame"])
def test_cached_dtypes_still_obey_the_nesting_limit(tag):
    """The compiled twin remembers the header bytes of recent dtype values;
    a remembered dtype one level too deep is still rejected."""
    for depth, ok in ((255, True), (256, False)):
        array = tag + b"s\x03\x00\x00\x00<f8\x01\x01" + bytes(7) + b"C"
        body = b"l\x01\x00\x00\x00" * depth + array + (bytes(8) if tag == b"A" else b"")
        frames = [_header(body, nframes=0 if tag == b"A" else 1)]
        frames += [] if tag == b"A" else [bytes(8)]
        for _ in range(2):  # the second time, '<f8' is remembered
            cy_twin.decode(py_twin.encode(np.ones(1), KIND_REQUEST))
            if ok:
                assert _same(cy_twin.decode(frames)[2], py_twin.decode(frames)[2], layout=True)
            else:
                kind, text = _assert_same_error(lambda twin: twin.decode(frames))
                assert "nested deeper than 256" in text
