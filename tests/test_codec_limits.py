"""The limits of docs/protocol.md ("Limits"), for every framing twin: what a
receiver rejects (with MessageFormatError, before it allocates anything or
runs any pickle), and what an encoder refuses to send (EncodeError) or
sends pickled instead. One regression test per decoder bug found by the
fuzz of issue 6."""

import importlib
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from zmq_cluster._compat import NO_EXTENSIONS
from zmq_cluster.exceptions import EncodeError, MessageFormatError
from zmq_cluster.messages import ClusterRequest, ClusterResult
from zmq_cluster.protocol import (
    HEADER, KIND_COMMAND, KIND_REQUEST, KIND_RESULT, MAGIC, MAX_DEPTH, MAX_DTYPE_FIELDS,
    MAX_DTYPE_NESTING, VERSION,
)

from conftest import TWINS


def _msg(body, *frames, kind=KIND_REQUEST):
    return [HEADER.pack(MAGIC, VERSION, kind, len(frames), 9) + body] + list(frames)


def _s(text):
    raw = text.encode() if isinstance(text, str) else text
    return b"s" + struct.pack("<I", len(raw)) + raw


def _v(obj):
    """The header value of a dtype-like value: strs, ints, lists, tuples."""
    if isinstance(obj, (str, bytes)):
        return _s(obj)
    if isinstance(obj, int):
        return b"i" + struct.pack("<q", obj)
    return (b"l" if isinstance(obj, list) else b"t") + struct.pack("<I", len(obj)) + b"".join(
        _v(item) for item in obj)


def _shape(shape):
    return struct.pack("<B%dQ" % len(shape), len(shape), *shape)


def _inline(dtype, shape, data):
    return b"A" + _v(dtype) + _shape(shape) + b"C" + data


def _framed(dtype, shape, data):
    return _msg(b"a" + struct.pack("<I", 0) + _v(dtype) + _shape(shape) + b"C", data)


def _scalar(dtype, data):
    return b"g" + _v(dtype) + struct.pack("<I", len(data)) + data


def _rejects(twin, frames, pattern, **kwargs):
    with pytest.raises(MessageFormatError, match=pattern):
        twin.decode(frames, **kwargs)


def _same_rejection(frames, **kwargs):
    """Every twin rejects ``frames`` with the same text; returns it."""
    texts = set()
    for param in TWINS:
        with pytest.raises(MessageFormatError) as info:
            param.values[0].decode(frames, **kwargs)
        texts.add(str(info.value))
    assert len(texts) == 1, texts
    return texts.pop()


# ------------------------------------------------------------------ dtypes

# Each of these crashed a decoder with SIGFPE (a zero divisor), or reached
# numpy unchecked; all are refused before numpy sees them.
DIVISOR_DTYPES = ["<M8[s/0]", "<m8[s/0]", "M8[s/0]", "<M8[1/0s]", "<M8[s/2]", "<M8[0s]"]


@pytest.mark.parametrize("dtype", DIVISOR_DTYPES)
def test_datetime_units_with_a_divisor_or_zero_are_refused(twin, dtype):
    for frames in (_msg(_inline(dtype, (1,), bytes(8))), _framed(dtype, (1,), bytes(8)),
                   _msg(_scalar(dtype, bytes(8))),
                   _msg(_inline([("a", "<i4"), ("t", dtype)], (1,), bytes(12))),
                   _msg(_inline([("n", [("t", dtype, (2,))])], (1,), bytes(16)))):
        _rejects(twin, frames, r"bad dtype .*%s" % re.escape(repr(dtype)))
        _same_rejection(frames)


@pytest.mark.parametrize("dtype, reason", [
    ("=f8", "byte order"), ("!f8", "byte order"), ("|f8", "ambiguous"), ("f8", "byte order"),
    ("<f3", "item size 3 is not valid"), ("<i16", "not valid"), ("|b2", "not valid"),
    ("<f08", "decimal digits"), ("|S", "decimal digits"), ("S", "byte order"),
    ("|O", "Python objects"), ("<T", "unknown kind"), ("(2,)<f8", "byte order"),
    ("<f8,<i4", "unexpected"), ("<M8[generic]", "datetime unit"), ("<M8[us/2]", "datetime unit"),
    ("<M8[2147483648s]", "datetime unit"), ("<M8[B]", "datetime unit"),
    ("|S2147483648", "more than"), ("<U536870912", "more than"), ("<f8" + "0" * 60, "at most 40"),
    ("", "a type string is"), ("|?1", "takes no item size"),
])
def test_type_strings_outside_the_grammar_are_refused(twin, dtype, reason):
    _rejects(twin, _msg(_inline(dtype, (1,), bytes(8))), r"bad dtype .*" + reason)


@pytest.mark.parametrize("dtype", [
    "|b1", "|?", "|i1", "<i1", "|u1", "<i2", ">u2", "<i4", ">i8", "<u8", "<f2", ">f4", "<f8",
    "<c8", ">c16", "|S1", "|S3", "<U1", ">U3", "|V4", "<M8", "<M8[s]", ">M8[D]", "<m8[25ms]",
    "<M8[2147483647s]", "<m8[as]", "<M8[Y]", "<M8[W]",
])
def test_type_strings_in_the_grammar_decode(twin, dtype):
    want = np.dtype(dtype)
    data = bytes(want.itemsize)
    _, _, got = twin.decode(_msg(_inline(dtype, (1,), data)))
    assert got.dtype == want and got.tobytes() == data
    # and the encoders write every dtype numpy names this way
    assert np.dtype(want.str) == want


@pytest.mark.parametrize("descr, reason", [
    ([("a", "<f8", (2**31,))], "shape is a tuple"),
    ([("a", "<f8", (-1,))], "shape is a tuple"),
    ([("a", "<f8", (1,) * 65)], "shape is a tuple"),
    ([("a", "<f8", (2**30, 2**30))], "more than 2147483647 bytes"),
    ([("a", "|O")], "Python objects"),
    ([("a",)], "field is a tuple"),
    ([("a", "<f8", (1,), 4)], "field is a tuple"),
    ([(7, "<f8")], "name is a str"),
    ([(("t", "a", "x"), "<f8")], "name is a str"),
    ([["a", "<f8"]], "field is a tuple"),
    ([("a", 5)], "type is a type string"),
    ([("a", "<f8"), ("a", "<i4")], "numpy refuses it"),
    ([("x", "<f8")] * (MAX_DTYPE_FIELDS + 1), "a list or tuple of 4097 items"),
])
def test_descr_lists_outside_the_grammar_are_refused(twin, descr, reason):
    _rejects(twin, _msg(_inline(descr, (1,), bytes(8))), r"bad dtype at offset 17: .*" + reason)


def test_structured_nesting_and_field_count_limits(twin):
    descr = "<f8"
    for _ in range(MAX_DTYPE_NESTING):
        descr = [("x", descr)]
    _, _, got = twin.decode(_msg(_inline(descr, (1,), bytes(8))))
    assert got.dtype.itemsize == 8
    _rejects(twin, _msg(_inline([("y", descr)], (1,), bytes(8))), r"nested more than 16 levels")
    fields = [("f%d" % i, "|u1") for i in range(MAX_DTYPE_FIELDS)]
    _, _, got = twin.decode(_msg(_inline(fields, (1,), bytes(MAX_DTYPE_FIELDS))))
    assert len(got.dtype.names) == MAX_DTYPE_FIELDS
    _rejects(twin, _msg(_inline([("n", fields[:2048]), ("m", fields[:2048])], (1,),
                                bytes(4096))), r"more than 4096 fields")


@pytest.mark.parametrize("slot", [
    b"I" + struct.pack("<I", 1800) + b"\x7f" * 1800,                        # a 4,300-digit int
    b"i" + struct.pack("<q", 8), b"N", b"d" + bytes(8), b"m" + bytes(4), b"b\x03\x00\x00\x00<f8",
], ids=["bigint", "int", "None", "float", "dict", "bytes"])
def test_a_dtype_slot_holding_another_value_is_a_bad_dtype(twin, slot):
    for body in (b"A" + slot + _shape((1,)) + b"C" + bytes(8),
                 b"g" + slot + struct.pack("<I", 8) + bytes(8)):
        _rejects(twin, _msg(body), r"bad dtype at offset 17: a dtype is a type string \(tag 's'\) "
                                   r"or a descr list \(tag 'l'\), not tag")


# Set by the pickles below when they run.
RAN = []


def _record(what):
    RAN.append(what)


class _Marker:
    def __reduce__(self):
        return _record, ("ran",)


def _pickle_value(obj):
    import pickle
    data = pickle.dumps(obj, protocol=5)
    return b"p" + struct.pack("<I", len(data)) + data + struct.pack("<I", 0)


def test_a_pickle_in_the_dtype_slot_never_runs(twin):
    RAN.clear()
    for body in (b"A" + _pickle_value(_Marker()) + _shape((1,)) + b"C" + bytes(8),
                 b"A" + _v([("a", "<f8")])[:5] + _pickle_value(_Marker()) + _shape((1,)) + b"C"):
        _rejects(twin, _msg(body), r"bad dtype at offset 17: a dtype .*not tag 'p'")
    assert RAN == []


# ------------------------------------------------------------------ arrays

@pytest.mark.parametrize("dtype", ["|S0", "<U0", "|V0", [], [("a", "|S0")], [("a", [])]],
                         ids=["S0", "U0", "V0", "empty structured", "S0 field", "empty field"])
def test_arrays_of_item_size_0_are_refused(twin, dtype):
    """They decoded as S1/U1 arrays of uninitialised memory, as large as
    their shape said (memory disclosed to the peer they were echoed to)."""
    for frames in (_msg(_inline(dtype, (2**20,), b"")), _framed(dtype, (2**20,), b"")):
        _rejects(twin, frames, r"has dtype .* of item size 0")


@pytest.mark.parametrize("shape", [(2**40,), (2**20, 2**20), (2**64 - 1,), (0, 2**62), (2**63, 4)])
def test_huge_shapes_are_refused_before_allocating(twin, shape):
    for frames in (_msg(_inline("<f8", shape, bytes(8))), _framed("<f8", shape, bytes(8))):
        text = _same_rejection(frames)
        assert ("beyond the size limit" in text or "needs" in text
                or "but its frame has 8 bytes" in text), text


def test_too_many_dimensions_are_refused(twin):
    _rejects(twin, _msg(_inline("<f8", (1,) * 65, bytes(8))),
             r"array at offset 16 has 65 dimensions, more than the 64 allowed")
    _rejects(twin, _msg(b"A" + _v("<f8") + b"\xff"), r"255 dimensions")  # before the shape
    _, _, got = twin.decode(_msg(_inline("<f8", (1,) * 64, bytes(8))))
    assert got.ndim == 64


@pytest.mark.parametrize("body, what", [
    (b"l\xff\xff\xff\xff", "a sequence of 4294967295 items needs 4294967295 bytes"),
    (b"t\x00\x00\x00\x80N", "a sequence of 2147483648 items"),
    (b"m\x02\x00\x00\x00NNN", "a dict of 2 items needs 4 bytes at offset 21, 3 left"),
    (b"p\x00\x00\x00\x00\xff\xff\xff\xff", "a pickle buffer of 4294967295 items needs"),
])
def test_counts_beyond_the_bytes_that_arrived_are_refused(twin, body, what):
    _rejects(twin, _msg(body), "header truncated: " + what)


@pytest.mark.parametrize("dtype", ["<U1", ">U2", [("a", "<i4"), ("t", "<U1", (2,))]],
                         ids=["U1", "U2 big-endian", "U field"])
def test_text_beyond_the_last_code_point_is_refused(twin, dtype):
    """numpy raised SystemError making a str of it (even printing the array)."""
    dt = np.dtype(dtype)
    data = bytearray(dt.itemsize)
    at = dt.fields["t"][1] + 4 if dt.names else 0
    data[at:at + 4] = (0x110000).to_bytes(4, "big" if dt.str.startswith(">") else "little")
    for frames in (_msg(_inline(dtype, (1,), bytes(data))), _msg(_scalar(dtype, bytes(data)))):
        _rejects(twin, frames, r"holds a character beyond U\+10FFFF")
    with pytest.raises(EncodeError, match="beyond U"):
        twin.encode(np.frombuffer(bytes(data), dt), KIND_REQUEST)


# ------------------------------------------------------------------ pickles

def test_a_pickle_runs_only_once_the_whole_message_is_valid(twin):
    RAN.clear()
    good = _msg(b"l\x02\x00\x00\x00" + _pickle_value(_Marker()) + b"N")
    _rejects(twin, _msg(b"l\x02\x00\x00\x00" + _pickle_value(_Marker()) + b"Z"), "tag 'Z'")
    _rejects(twin, _msg(b"l\x02\x00\x00\x00" + _pickle_value(_Marker()) + b"NN"), "unexpected")
    _rejects(twin, [good[0][:4] + b"\x01\x00\x00\x00" + good[0][8:], b"x"], "not referenced")
    assert RAN == []
    _, _, got = twin.decode(good)
    assert got == [None, None] and RAN == ["ran"]  # loaded once, not once per pass


def test_commands_never_carry_pickle(twin):
    RAN.clear()
    frames = _msg(_pickle_value(_Marker()), kind=KIND_COMMAND)
    _rejects(twin, frames, r"pickled value at offset 16 in a COMMAND message")
    assert RAN == []
    with pytest.raises(EncodeError, match="COMMAND message"):
        twin.encode({"kill", "now"}, KIND_COMMAND)
    with pytest.raises(EncodeError, match="COMMAND message"):
        twin.encode(np.array([1, "x"], object), KIND_COMMAND)
    # native values are fine, arrays included
    assert twin.decode(twin.encode(["CLUSTER_WORKER_KILL", np.arange(3)], KIND_COMMAND))[0] == 3


# ------------------------------------------------------------------ encoder

def _nested(depth, leaf):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize("wrap, levels", [
    (lambda v: v, 0),
    (lambda v: ClusterRequest(v), 1),
    (lambda v: ClusterResult("OK", v), 1),
    (lambda v: ClusterResult("OK", ClusterRequest({"k": v})), 3),
], ids=["bare", "request", "result", "result-request-dict"])
def test_encoders_refuse_what_decoders_would_refuse_as_too_deep(twin, wrap, levels):
    """The encoder counts depth as the decoder does, wrappers included: what
    it writes decodes, and it writes nothing that would not."""
    fits = wrap(_nested(MAX_DEPTH - levels, 1))
    twin.decode(twin.encode(fits, KIND_RESULT))
    with pytest.raises(EncodeError, match=r"nested deeper than 256 levels"):
        twin.encode(wrap(_nested(MAX_DEPTH - levels + 1, 1)), KIND_RESULT)
    # An array's dtype value is one level below the array.
    twin.decode(twin.encode(wrap(_nested(MAX_DEPTH - levels - 1, np.ones(2))), KIND_RESULT))
    with pytest.raises(EncodeError, match=r"nested deeper"):
        twin.encode(wrap(_nested(MAX_DEPTH - levels, np.ones(2))), KIND_RESULT)
    struct_array = np.zeros(2, [("a", "<i4")])  # its descr: list, tuple, str
    twin.decode(twin.encode(wrap(_nested(MAX_DEPTH - levels - 3, struct_array)), KIND_RESULT))
    with pytest.raises(EncodeError):
        twin.encode(wrap(_nested(MAX_DEPTH - levels - 2, struct_array)), KIND_RESULT)


def test_a_request_echoed_at_the_limit_cannot_be_sent_back(twin):
    """A bare payload nested 256 deep is a valid request; the worker's
    ClusterResult around it would be 257 deep: EncodeError, not a result
    every receiver drops."""
    payload = _nested(MAX_DEPTH, 1)
    assert twin.decode(twin.encode(payload, KIND_REQUEST))[2] == payload
    with pytest.raises(EncodeError):
        twin.encode(ClusterResult("OK", payload), KIND_RESULT)


@pytest.mark.parametrize("arr", [
    np.zeros(3, "V0"), np.zeros(3, []), np.zeros(3, [("a", "O")]),
    np.zeros(2, [("f%d" % i, "u1") for i in range(MAX_DTYPE_FIELDS + 1)]),
    np.zeros(3, np.dtypes.StringDType()) if hasattr(np, "dtypes") else np.zeros(3, "O"),
], ids=["V0", "empty structured", "object field", "4097 fields", "StringDType"])
def test_arrays_without_a_native_form_travel_pickled(twin, arr):
    frames = twin.encode(arr, KIND_REQUEST)
    assert frames[0][16:17] == b"p"
    got = twin.decode(frames)[2]
    assert got.dtype == arr.dtype and got.shape == arr.shape
    with pytest.raises(MessageFormatError, match="pickle is not allowed"):
        twin.decode(frames, allow_pickle=False)


def test_encode_errors_are_type_errors():
    assert issubclass(EncodeError, TypeError)


def test_an_unpicklable_object_is_an_encode_error(twin):
    with pytest.raises(EncodeError, match=r"cannot encode function object"):
        twin.encode(ClusterResult("OK", lambda: 1), KIND_RESULT)


def test_neither_twin_imports_the_other():
    """Shared pieces live in modules both twins import (_framing_errors,
    _framing_buffers, _framing_dtypes...)."""
    code = textwrap.dedent("""
        import sys
        import zmq_cluster._fastpath.framing
        print("zmq_cluster._framing_py" in sys.modules)
    """)
    if not NO_EXTENSIONS:  # the package imports the compiled twin only
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert out.strip() == "False"
    with open(importlib.util.find_spec("zmq_cluster._framing_py").origin) as f:
        assert "_fastpath" not in f.read().split('"""', 2)[2]  # past the docstring
