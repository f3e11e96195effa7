"""Batch tables (framing.walk_table, framing.scan_table): both twins give the
same entries and refuse the same damaged tables with the same text."""

import importlib
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmq_cluster import _framing_tables, framing, schedproto as sp
from zmq_cluster._compat import NO_EXTENSIONS

TWIN_MODULES = [pytest.param(_framing_tables, id="py")]
if not NO_EXTENSIONS:
    TWIN_MODULES.append(pytest.param(importlib.import_module("zmq_cluster._fastpath.framing"),
                                     id="cy"))
WALKERS = [pytest.param(m.values[0].walk_table, id=m.id) for m in TWIN_MODULES]
SCANNERS = [pytest.param(m.values[0].scan_table, id=m.id) for m in TWIN_MODULES]

TASK = ("<QQIII", 3, 4)      # schedproto.TASK_ENTRY
RESULT = ("<QIIId", 1, 2)    # schedproto.RESULT_ENTRY


class TableError(ValueError):
    pass


def _outcome(read, table, count, layout, data):
    try:
        return read(table, count, *layout, data, TableError)
    except TableError as exc:
        return ("refused", str(exc))


def _table(layout, entries):
    """``entries``: (head fields, inline header, n frames, tail fields)."""
    fmt, inline_at, nframes_at = layout
    out = []
    for head, header, nfr, tail in entries:
        fields = list(head)
        fields.insert(inline_at, len(header))
        fields.insert(nframes_at, nfr)
        out.append(struct.pack(fmt, *fields, *tail) + header)
    return b"".join(out)


def test_the_selected_walker_is_the_twin_in_use():
    compiled = not NO_EXTENSIONS
    assert (framing.walk_table is _framing_tables.walk_table) is not compiled
    assert (framing.scan_table is _framing_tables.scan_table) is not compiled


@pytest.mark.parametrize("scan", SCANNERS)
def test_scan_gives_each_entry_its_span_and_first_frame(scan):
    table = _table(TASK, [((1, 7, 0), b"H1", 0, ()), ((2, 7, 50), b"", 2, ()),
                          ((3, 8, 0), b"H3", 1, ())])
    size = struct.calcsize(TASK[0])
    assert scan(table, 3, *TASK, 3, TableError) == [
        ((1, 7, 0, 2, 0), 0, size + 2, 0), ((2, 7, 50, 0, 2), size + 2, 2 * size + 2, 0),
        ((3, 8, 0, 2, 1), 2 * size + 2, 3 * size + 4, 2)]
    with pytest.raises(TableError, match="2 data frames the batch table does not name"):
        scan(table, 3, *TASK, 5, TableError)


@pytest.mark.parametrize("walk", WALKERS)
def test_task_entries_with_inline_headers_and_frames(walk):
    data = [b"a", b"b", b"c"]
    table = _table(TASK, [((1, 7, 0), b"H1", 0, ()), ((2, 7, 50), b"", 2, ()),
                          ((3, 8, 0), b"H3", 1, ())])
    out = walk(table, 3, *TASK, data, TableError)
    assert out == [((1, 7, 0, 2, 0), [b"H1"]), ((2, 7, 50, 0, 2), [b"a", b"b"]),
                   ((3, 8, 0, 2, 1), [b"H3", b"c"])]
    assert out[1][1][0] is data[0]  # frames themselves, not copies
    assert type(out[0][1][0]) is bytes


@pytest.mark.parametrize("walk", WALKERS)
def test_result_entries_carry_a_float(walk):
    table = _table(RESULT, [((1 << 63,), b"R", 0, (3, -0.5)), ((5,), b"S", 0, (1, 1e300))])
    assert walk(table, 2, *RESULT, [], TableError) == [((1 << 63, 1, 0, 3, -0.5), [b"R"]),
                                                       ((5, 1, 0, 1, 1e300), [b"S"])]


@pytest.mark.parametrize("walk", WALKERS)
def test_any_buffer_is_read_as_bytes(walk):
    table = _table(TASK, [((1, 7, 0), b"H", 0, ())])
    for form in (bytearray(table), memoryview(table)):
        assert walk(form, 1, *TASK, [], TableError) == [((1, 7, 0, 1, 0), [b"H"])]


@pytest.mark.parametrize("walk", WALKERS)
@pytest.mark.parametrize("fmt, inline_at, nframes_at", [
    ("QQIII", 3, 4), ("<QQIIh", 3, 4), ("<", 0, 0), (">QQIII", 3, 4), ("<QQIII", 3, 3),
    ("<QQIII", 1, 4), ("<QQIII", 3, 5), ("<QIIId", 1, 4)])
def test_formats_other_than_documented_are_value_errors(walk, fmt, inline_at, nframes_at):
    with pytest.raises(ValueError) as info:
        walk(b"", 0, fmt, inline_at, nframes_at, [], TableError)
    assert not isinstance(info.value, TableError)


@pytest.mark.parametrize("walk", WALKERS)
def test_schedproto_raises_protocol_errors(walk):
    with pytest.raises(sp.ProtocolError, match="truncated at entry 0"):
        sp.walk(b"\0" * 5, 1, sp.TASK_ENTRY, [])


_entry = st.tuples(st.integers(0, (1 << 64) - 1), st.binary(max_size=12), st.integers(0, 3))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(entries=st.lists(_entry, max_size=6), count_delta=st.integers(-1, 1),
       cut=st.integers(0, 6), extra_frames=st.integers(-2, 2), junk=st.binary(max_size=40),
       use_junk=st.booleans(), result=st.booleans())
def test_twins_agree_on_random_and_damaged_tables(entries, count_delta, cut, extra_frames,
                                                  junk, use_junk, result):
    layout = RESULT if result else TASK
    rows = [((tid,) if result else (tid, 9, 0), header, nfr, (1, 0.25) if result else ())
            for tid, header, nfr in entries]
    table = junk if use_junk else _table(layout, rows)
    if cut and not use_junk:
        table = table[:-cut]
    ndata = max(0, sum(nfr for _, _, nfr in entries) + extra_frames)
    data = [b"f%d" % i for i in range(ndata)]
    count = max(0, len(entries) + count_delta)
    outcomes = [_outcome(w.values[0], table, count, layout, data) for w in WALKERS]
    assert all(repr(o) == repr(outcomes[0]) for o in outcomes)  # (repr: a NaN field)
    spans = [_outcome(s.values[0], table, count, layout, len(data)) for s in SCANNERS]
    assert all(repr(o) == repr(spans[0]) for o in spans)
    if isinstance(outcomes[0], tuple) or isinstance(spans[0], tuple):  # ("refused", why)
        assert spans[0] == outcomes[0]  # the same checks, the same text
    else:
        assert [f for f, _ in outcomes[0]] == [f for f, *_ in spans[0]]
    if not (use_junk or cut or count_delta or extra_frames) and all(h or n for _, h, n in entries):
        assert [f[0] for f, _ in outcomes[0]] == [tid for tid, _, _ in entries]


ENCODERS = [pytest.param(m.values[0].encode_task_table, id=m.id) for m in TWIN_MODULES]


class InputError(Exception):
    pass


def _items(spec):
    """Chunks from a spec: ints, strs, bytes, arrays (small: inline; large:
    a frame of their own), a str whose header is too big to go inline, a
    lock (does not encode), and "raise" (the input raises there)."""
    def value(kind, i):
        return {"int": i, "str": "s%d" % i, "bytes": b"b" * i,
                "small": np.arange(i % 7, dtype=np.int16),
                "large": np.arange(2000 + i, dtype=np.float64),
                "huge": "h" * (70000 + i), "lock": threading.Lock()}[kind]
    for i, (kinds, raise_here) in enumerate(spec):
        if raise_here:
            raise InputError("input %d" % i)
        yield tuple(value(k, i) for k in kinds)


def _encoded(encode, spec, limits):
    it = _items(spec)
    max_tasks, max_items, max_bytes = limits
    table, frames, lengths, sizes, stop = encode(it, 3, 77, 1500, 1 << 40, max_tasks, max_items,
                                                 max_bytes, None, None, None)
    if stop not in (None, StopIteration):
        exc, chunk = stop
        stop = (type(exc).__name__, str(exc), None if chunk is None else len(chunk))
    rest = 0  # what the encoder left unread: the same for both twins
    try:
        for _ in it:
            rest += 1
    except InputError:
        rest = (rest, "raised")
    return table, [bytes(memoryview(f).cast("B")) for f in frames], lengths, sizes, stop, rest


_kinds = st.sampled_from(["int", "str", "bytes", "small", "large", "huge", "lock"])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(spec=st.lists(st.tuples(st.lists(_kinds, min_size=1, max_size=3),
                               st.sampled_from([False] * 9 + [True])), max_size=8),
       limits=st.tuples(st.integers(1, 9), st.integers(1, 30), st.integers(1, 400_000)))
def test_task_table_twins_write_the_same_bytes(spec, limits):
    outcomes = [_encoded(e.values[0], spec, limits) for e in ENCODERS]
    assert all(o == outcomes[0] for o in outcomes)


@pytest.mark.parametrize("encode", ENCODERS)
def test_task_table_reads_back_through_walk_table(encode):
    chunks = [(1,), ("x", 2), (np.arange(5000.0),), ("y" * 70000,)]
    table, frames, lengths, sizes, stop = encode(iter(chunks), 0, 9, 0, 100, 10, 100, 1 << 30)
    assert stop is StopIteration and lengths == [1, 2, 1, 1]
    entries = sp.walk(table, 4, sp.TASK_ENTRY, frames)
    assert [f[:3] for f, _ in entries] == [(100, 9, 0), (101, 9, 0), (102, 9, 0), (103, 9, 0)]
    assert sum(sizes) == len(table) + sum(memoryview(f).nbytes for f in frames)
    for (fields, msg), chunk in zip(entries, chunks):
        kind, tid, (mode, items) = framing.decode(msg)
        assert tid == fields[0] and mode == 0 and len(items) == len(chunk)
    assert framing.decode(entries[2][1])[2][1][0].sum() == np.arange(5000.0).sum()


@pytest.mark.parametrize("encode", ENCODERS)
def test_task_table_limits_and_stops(encode):
    many = iter([(i,) for i in range(10)])
    _, _, lengths, _, stop = encode(many, 0, 1, 0, 1, 4, 100, 1 << 30)
    assert len(lengths) == 4 and stop is None and next(many) == (4,)   # max_tasks
    _, _, lengths, _, stop = encode(many, 0, 1, 0, 1, 100, 2, 1 << 30)
    assert len(lengths) == 2 and stop is None                          # max_items
    _, _, lengths, _, stop = encode(many, 0, 1, 0, 1, 100, 100, 1)
    assert len(lengths) == 1 and stop is None                          # max_bytes: one at least
    lock = threading.Lock()
    _, _, lengths, _, (exc, chunk) = encode(iter([(1,), (lock,), (2,)]), 0, 1, 0, 1, 9, 9, 1 << 30)
    assert lengths == [1] and chunk == (lock,) and "lock" in str(exc)


@pytest.mark.parametrize("encode", ENCODERS)
def test_task_table_pins_arrays_placed_in_shared_memory(encode):
    from zmq_cluster.sharedmem import SharedMemory
    with SharedMemory(min_bytes=1024) as shm:
        pinned = []

        def pin(tid):
            pinned.append((tid, shm.last_message()))
            return 5000

        chunks = iter([(1,), (np.ones(1000),), (2,)])
        table, frames, lengths, sizes, stop = encode(chunks, 0, 1, 0, 40, 9, 9, 1 << 30,
                                                     None, shm, pin)
        assert [t for t, _ in pinned] == [41] and len(pinned[0][1]) == 1
        assert frames == [] and sizes[1] > 5000 and sizes[0] < 5000
        shm.unpin(pinned[0][1])
