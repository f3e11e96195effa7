"""Wire-format promises about memory, over real sockets, for both twins:
zero-copy encode, views on received frames, inline small arrays, alignment,
order, pickle-5 out-of-band buffers, and the copy accounting (``stats``)."""

import dataclasses
import types

import numpy as np
import pytest

from zmq_cluster.messages import ClusterRequest, ClusterResult
from zmq_cluster._framing_buffers import aligned_empty
from zmq_cluster.exceptions import MessageFormatError
from zmq_cluster.protocol import (
    ALIGNED_BYTES, COPY_THRESHOLD, INLINE_LIMIT, KIND_REQUEST, KIND_RESULT, SPLIT_BYTES,
)

from helpers import push_pull

WAIT_MS = 10000


def _stats():
    return types.SimpleNamespace(copied_bytes=0)


def _transfer(twin, pair, obj, sent_stats=None, received_stats=None):
    sender, receiver = pair
    sender.send_multipart(twin.encode(obj, KIND_REQUEST, 5, stats=sent_stats), copy=False)
    assert receiver.poll(WAIT_MS)
    frames = receiver.recv_multipart(copy=False)
    return frames, twin.decode(frames, stats=received_stats)


def test_encode_does_not_copy_contiguous_arrays(twin):
    for arr in (np.arange(1 << 16, dtype=np.float64).reshape(256, 256),
                np.asfortranarray(np.ones((300, 200), np.int16))):
        frames = twin.encode({"x": arr}, KIND_REQUEST)
        assert len(frames) == 2
        assert np.shares_memory(np.frombuffer(frames[1], np.uint8), arr)


def test_large_array_is_a_writeable_aligned_view_on_its_frame(twin, pair):
    arr = np.random.default_rng(0).random((256, 256))  # 512 KiB, below ALIGNED_BYTES
    frames, (kind, task_id, got) = _transfer(twin, pair, arr)
    assert (kind, task_id) == (KIND_REQUEST, 5)
    np.testing.assert_array_equal(got, arr)
    frame_memory = np.frombuffer(frames[1].buffer, np.uint8)
    assert np.shares_memory(got, frame_memory)  # no second allocation
    assert got.ctypes.data == frame_memory.ctypes.data
    assert got.flags.writeable and got.flags.aligned
    assert got.ctypes.data % got.dtype.alignment == 0
    got[0, 0] = -1.0  # really writeable
    assert frame_memory[:8].view(np.float64)[0] == -1.0


def test_small_frame_arrays_are_copied(twin, pair):
    arr = np.arange(2048, dtype=np.int32)
    assert INLINE_LIMIT <= arr.nbytes < COPY_THRESHOLD
    frames, (_, _, got) = _transfer(twin, pair, arr)
    assert len(frames) == 2
    np.testing.assert_array_equal(got, arr)
    assert not np.shares_memory(got, np.frombuffer(frames[1].buffer, np.uint8))
    assert got.flags.writeable and got.flags.aligned


@pytest.mark.parametrize("arr", [
    np.ones(1), np.arange(10, dtype=np.int32), np.arange(INLINE_LIMIT // 8 - 1, dtype=">f8"),
    np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
    np.arange(40, dtype=np.uint8)[::3], np.array(2.5), np.zeros((0, 4)),
], ids=["1xf8", "i4", "largest", "F", "strided", "0-d", "empty"])
def test_small_arrays_travel_inline_in_one_frame(twin, pair, arr):
    assert arr.nbytes < INLINE_LIMIT
    frames, (_, _, got) = _transfer(twin, pair, ClusterRequest(arr, {"i": 3}))
    assert len(frames) == 1  # the header frame only
    payload = got.payload
    np.testing.assert_array_equal(payload, arr)
    assert payload.dtype == arr.dtype and payload.shape == arr.shape
    assert payload.flags.writeable and payload.flags.aligned
    want = arr if arr.flags.c_contiguous or arr.flags.f_contiguous else np.ascontiguousarray(arr)
    assert payload.flags.c_contiguous == want.flags.c_contiguous
    assert payload.flags.f_contiguous == want.flags.f_contiguous
    assert not np.shares_memory(payload, np.frombuffer(frames[0].buffer, np.uint8))
    payload[...] = 0  # really writeable, and not the header's memory
    np.testing.assert_array_equal(got.payload, np.zeros_like(arr))


def test_requested_64_byte_alignment(twin, pair):
    arr = np.ones((256, 256))
    frames, _ = _transfer(twin, pair, arr)
    _, _, got = twin.decode(frames, alignment=64)
    assert got.ctypes.data % 64 == 0 and got.flags.writeable
    np.testing.assert_array_equal(got, arr)
    frame_at = np.frombuffer(frames[1].buffer, np.uint8).ctypes.data
    # a view when the transport happened to place the frame at 64, else a copy
    assert np.shares_memory(got, np.frombuffer(frames[1].buffer, np.uint8)) == (
        frame_at % 64 == 0)


def test_memory_order_and_byte_order_survive(twin, pair):
    fortran = np.asfortranarray(np.arange(200_000, dtype=">f8").reshape(400, 500))
    strided = np.arange(100_000, dtype=np.int64)[::3]
    frames, (_, _, (f, s)) = _transfer(twin, pair, (fortran, strided))
    assert f.flags.f_contiguous and not f.flags.c_contiguous and f.dtype == np.dtype(">f8")
    np.testing.assert_array_equal(f, fortran)
    assert s.flags.c_contiguous
    np.testing.assert_array_equal(s, strided)
    assert frames[1].buffer.nbytes == fortran.nbytes  # sent as it is, not transposed


def test_arrays_anywhere_in_the_payload(twin, pair):
    big = np.ones(1 << 15)
    payload = {"a": [1, (big, {"deep": np.zeros(3, np.uint8)})], ("k", 2): big[:10],
               "medium": big[:INLINE_LIMIT // 8]}
    frames, (_, _, got) = _transfer(twin, pair, payload)
    assert len(frames) == 3  # header + the two arrays of at least INLINE_LIMIT bytes
    np.testing.assert_array_equal(got["a"][1][0], big)
    np.testing.assert_array_equal(got["a"][1][1]["deep"], np.zeros(3, np.uint8))
    np.testing.assert_array_equal(got[("k", 2)], big[:10])
    np.testing.assert_array_equal(got["medium"], big[:INLINE_LIMIT // 8])


@dataclasses.dataclass
class Sample:
    name: str
    data: np.ndarray


def test_user_objects_are_pickled_with_arrays_out_of_band(twin, pair):
    data = np.arange(1 << 16, dtype=np.float64)
    frames, (_, _, got) = _transfer(twin, pair, Sample("s", data))
    assert isinstance(got, Sample) and got.name == "s"
    np.testing.assert_array_equal(got.data, data)
    assert len(frames) == 2  # the array travelled as its own frame...
    assert len(frames[0].bytes) < 1024  # ...not inside the pickle
    assert np.shares_memory(got.data, np.frombuffer(frames[1].buffer, np.uint8))


def test_pickle_can_be_refused(twin):
    frames = twin.encode(Sample("s", np.zeros(2)), KIND_REQUEST)
    from zmq_cluster import MessageFormatError
    with pytest.raises(MessageFormatError, match="pickle"):
        twin.decode(frames, allow_pickle=False)
    # native values never need pickle
    assert twin.decode(twin.encode({"a": [np.zeros(2), 1.5, "x", b"y", None]}, KIND_REQUEST),
                       allow_pickle=False)[2]["a"][1:] == [1.5, "x", b"y", None]


# ------------------------------------------------------------ copy accounting

@pytest.mark.parametrize("arr", [
    np.random.default_rng(1).random((256, 256)),                     # 512 KiB, C order
    np.asfortranarray(np.arange(300 * 200, dtype=np.int16).reshape(300, 200)),
    np.arange(COPY_THRESHOLD // 8, dtype=np.float64),               # exactly the threshold
], ids=["C", "F", "threshold"])
def test_large_contiguous_arrays_are_never_copied(twin, pair, arr):
    sent, received = _stats(), _stats()
    obj = ClusterResult("OK", arr, {"i": 3}, {"host": "h", "pid": 1, "seconds": 0.1})
    frames, (_, _, got) = _transfer(twin, pair, obj, sent, received)
    assert (sent.copied_bytes, received.copied_bytes) == (0, 0)
    assert np.shares_memory(got.payload, np.frombuffer(frames[1].buffer, np.uint8))
    np.testing.assert_array_equal(got.payload, arr)


def test_copied_bytes_are_counted_exactly(twin, pair):
    small = np.arange(5, dtype=np.float64)                           # inline: 40
    small_f = np.asfortranarray(np.ones((3, 4), np.int16))           # inline: 24
    small_strided = np.arange(30, dtype=np.int32)[::3]               # inline, once: 40
    medium = np.arange(1024, dtype=np.float64)                       # frame, copied on receipt
    big_strided = np.arange(1 << 16, dtype=np.float64)[::2]          # made contiguous: 256 KiB
    big = np.ones((256, 256))                                        # a view both ways
    payload = [small, small_f, small_strided, medium, big_strided, big, np.zeros(0),
               {1, 2}]                                               # pickled: not counted
    sent, received = _stats(), _stats()
    frames, (_, _, got) = _transfer(twin, pair, payload, sent, received)
    assert len(frames) == 4  # header, medium, big_strided, big
    inline = small.nbytes + small_f.nbytes + small_strided.nbytes
    assert sent.copied_bytes == inline + big_strided.nbytes
    assert received.copied_bytes == inline + medium.nbytes
    for g, want in zip(got, payload[:7]):
        np.testing.assert_array_equal(g, want)


def test_stats_accumulate_and_count_reasons_for_copies(twin):
    stats = _stats()
    stats.copied_bytes = 100
    frames = twin.encode(np.ones(1), KIND_REQUEST, stats=stats)
    assert stats.copied_bytes == 108
    twin.decode(frames, stats=stats)
    assert stats.copied_bytes == 116
    big = np.ones(COPY_THRESHOLD // 8)
    frames = twin.encode(big, KIND_REQUEST, stats=stats)
    assert stats.copied_bytes == 116
    data = bytes(frames[1])
    twin.decode([frames[0], data], stats=stats)  # a read-only frame: copied
    assert stats.copied_bytes == 116 + big.nbytes
    twin.decode([frames[0], bytearray(data)], stats=stats, copy_threshold=10**9)
    assert stats.copied_bytes == 116 + 2 * big.nbytes  # below the threshold: copied
    twin.decode([frames[0], memoryview(bytearray(b"\0" + data))[1:]], stats=stats)
    assert stats.copied_bytes == 116 + 3 * big.nbytes  # misaligned: copied
    twin.decode([frames[0], bytearray(data)], stats=stats)  # a view
    assert stats.copied_bytes == 116 + 3 * big.nbytes
    twin.encode({3, 4}, KIND_REQUEST, stats=stats)  # pickled: not counted
    twin.decode(twin.encode(b"x" * 5000, KIND_REQUEST), stats=stats)  # not an array
    assert stats.copied_bytes == 116 + 3 * big.nbytes


def test_stats_untouched_when_the_call_fails(twin):
    from zmq_cluster import MessageFormatError
    stats = _stats()
    with pytest.raises(TypeError):
        twin.encode([np.ones(3), lambda: 1], KIND_REQUEST, stats=stats)
    frames = twin.encode([np.ones(3), 1], KIND_REQUEST)
    with pytest.raises(MessageFormatError):
        twin.decode([frames[0] + b"N"], stats=stats)
    assert stats.copied_bytes == 0
    twin.encode(np.ones(3), KIND_RESULT, stats=None)  # no stats: nothing to update


# ------------------------------------------------- large arrays: split, aligned

def _at(nbytes, offset, dtype=np.float64):
    """A writeable array of ``nbytes`` whose data sits ``offset`` bytes past
    a multiple of 64."""
    raw = aligned_empty(nbytes + 64, 64)
    arr = raw[offset:offset + nbytes].view(dtype)
    arr[:] = np.arange(arr.size, dtype=dtype)
    return arr


@pytest.mark.parametrize("nbytes", [ALIGNED_BYTES, SPLIT_BYTES, SPLIT_BYTES + 8,
                                    3 * SPLIT_BYTES - 8], ids=["1MiB", "split", "split+8", "3x"])
def test_large_arrays_arrive_64_byte_aligned_and_writeable(twin, pair, nbytes):
    arr = _at(nbytes, 8)  # the sender's memory is not at 64, so no transport places it there
    sent, received = _stats(), _stats()
    frames, (_, _, got) = _transfer(twin, pair, arr, sent, received)
    split = nbytes > SPLIT_BYTES
    assert len(frames) == 1 + (-(-nbytes // SPLIT_BYTES) if split else 1)
    np.testing.assert_array_equal(got, arr)
    assert got.ctypes.data % 64 == 0 and got.flags.writeable and got.flags.c_contiguous
    assert not np.shares_memory(got, arr)
    assert (sent.copied_bytes, received.copied_bytes) == (0, nbytes)  # one assembly copy
    got[-1] = -1.0


def test_split_array_frames_are_views_of_the_senders_array(twin):
    arr = np.asfortranarray(np.arange(3 * SPLIT_BYTES // 8, dtype=np.float64).reshape(-1, 3))
    stats = _stats()
    frames = twin.encode([arr, 5], KIND_REQUEST, stats=stats)
    assert stats.copied_bytes == 0
    assert [np.frombuffer(f, np.uint8).nbytes for f in frames[1:]] == [SPLIT_BYTES] * 3
    for i, frame in enumerate(frames[1:]):
        view = np.frombuffer(frame, np.uint8)
        assert np.shares_memory(view, arr)
        assert view.ctypes.data == arr.ctypes.data + i * SPLIT_BYTES
    got = twin.decode(frames)[2][0]
    assert got.flags.f_contiguous and got.ctypes.data % 64 == 0
    np.testing.assert_array_equal(got, arr)


def test_an_aligned_frame_of_a_large_array_stays_a_view(twin, ctx):
    # Over inproc a frame is the sender's memory: at 64 already, no copy.
    # A context of its own (the ctx fixture): zmq_close unregisters an
    # inproc name later, in libzmq's reaper thread, so in a shared context
    # the next twin's bind to the same name could find it still in use.
    arr = _at(2 * ALIGNED_BYTES, 0)
    with push_pull(ctx, "inproc://aligned-view") as (push, pull):
        push.send_multipart(twin.encode(arr, KIND_REQUEST), copy=False)
        assert pull.poll(WAIT_MS)
        received = _stats()
        got = twin.decode(pull.recv_multipart(copy=False), stats=received)[2]
    assert np.shares_memory(got, arr) and received.copied_bytes == 0


def test_alignment_asked_for_combines_with_64(twin):
    arr = _at(ALIGNED_BYTES, 8)
    frames = [bytearray(f) for f in twin.encode(arr, KIND_REQUEST)]
    for alignment, want in ((None, 64), (32, 64), (128, 128), (48, 192)):
        got = twin.decode(frames, alignment=alignment)[2]
        assert got.ctypes.data % want == 0, alignment
    small = twin.decode([bytearray(f) for f in twin.encode(arr[:1000], KIND_REQUEST)],
                        alignment=48)[2]
    assert small.ctypes.data % 48 == 0


def test_split_array_in_a_message_with_other_frames(twin):
    big = np.arange(SPLIT_BYTES // 4 + 1, dtype=np.int32)
    payload = [np.ones(1000), big, {1, 2}, np.arange(2000.0), bytearray(100000)]
    frames = [bytes(f) for f in twin.encode(payload, KIND_REQUEST)]
    got = twin.decode(frames)[2]
    for g, want in zip(got, payload):
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(g, want)
    assert got[2] == {1, 2}


def _split_message(twin, nbytes=SPLIT_BYTES + 16):
    return [bytes(f) for f in twin.encode(np.ones(nbytes // 8), KIND_REQUEST)]


def test_split_array_frames_may_have_any_sizes_that_add_up(twin):
    frames = _split_message(twin)
    body = frames[1] + frames[2]
    cut = [body[:7], body[7:100], b"", body[100:]]
    header = bytearray(frames[0])
    header[4:8] = (4).to_bytes(4, "little")
    header[21:25] = (4).to_bytes(4, "little")  # 'c' u32 first, u32 count
    got = twin.decode([bytes(header)] + cut)[2]
    assert got.nbytes == len(body) and (got == 1).all() and got.ctypes.data % 64 == 0


@pytest.mark.parametrize("change, error", [
    (lambda f: [f[0]] + [f[1], f[2][:-8]], r"its 2 frames hold %d bytes" % (SPLIT_BYTES + 8)),
    (lambda f: [f[0]] + [f[1], f[2] + b"x"], r"its 2 frames hold %d bytes" % (SPLIT_BYTES + 17)),
    (lambda f: [_count(f[0], 3, 2)] + f[1:] + [b""], r"1 buffer frames are not referenced"),
    (lambda f: [_count(f[0], 2, 3)] + f[1:], r"refers to buffer frame 2 of 2"),
    (lambda f: [_count(f[0], 2, 0)] + f[1:], r"has 0 buffer frames"),
    (lambda f: [_count(f[0], 2, 0xFFFFFFFF)] + f[1:], r"refers to buffer frame 4294967294 of 2"),
    (lambda f: [_first(f[0], 1)] + f[1:], r"refers to buffer frame 1; frame 0"),
    (lambda f: [f[0][:25]] + f[1:], r"header truncated"),
], ids=["short", "long", "extra frame", "count past end", "count 0", "count huge", "first",
        "truncated"])
def test_malformed_split_arrays_are_rejected_before_allocating(twin, change, error):
    frames = _split_message(twin)
    assert len(frames) == 3
    with pytest.raises(MessageFormatError, match=error):
        twin.decode(change(frames))


def _count(header, nframes, count):
    header = bytearray(header)
    header[4:8] = nframes.to_bytes(4, "little")
    header[21:25] = count.to_bytes(4, "little")
    return bytes(header)


def _first(header, first):
    header = bytearray(header)
    header[17:21] = first.to_bytes(4, "little")
    return bytes(header)


def test_version_1_messages_are_refused_with_both_versions_named(twin):
    frames = _split_message(twin)
    old = bytearray(frames[0])
    old[2] = 1
    with pytest.raises(MessageFormatError, match=r"version 1 \(this build reads 2\)"):
        twin.decode([bytes(old)] + frames[1:])


@pytest.mark.parametrize("holder", ["array", "slice", "memoryview", "frombuffer"])
def test_assembly_memory_is_reused_only_once_no_array_refers_to_it(twin, holder):
    import gc

    from zmq_cluster import _framing_buffers
    if _framing_buffers._FREE_REFS is None:
        pytest.skip("recycling is off on this interpreter (tested below)")
    arr = np.arange(2 * SPLIT_BYTES // 8 + 1, dtype=np.float64)
    frames = [bytes(f) for f in twin.encode(arr, KIND_REQUEST)]
    first = twin.decode(frames)[2]
    at = first.ctypes.data
    kept = {
        "array": lambda: first,
        "slice": lambda: first[::3],
        "memoryview": lambda: memoryview(first[5:]),
        "frombuffer": lambda: np.frombuffer(first[1:], np.float64),
    }[holder]()
    del first
    gc.collect()
    second = twin.decode(frames)[2]
    assert second.ctypes.data != at  # still in use through ``kept``
    del kept
    gc.collect()
    third = twin.decode(frames)[2]
    assert third.ctypes.data == at  # free again: reused
    third[:] = -1.0
    np.testing.assert_array_equal(second, arr)  # nothing else written over
    assert sum(r.nbytes for r in _framing_buffers._recycled) <= _framing_buffers.RECYCLE_MAX_BYTES


@pytest.mark.parametrize("nbytes", [ALIGNED_BYTES, SPLIT_BYTES], ids=["1MiB", "4MiB"])
def test_an_unaligned_single_frames_copy_is_reused_once_free_never_while_held(twin, nbytes):
    import gc

    from zmq_cluster import _framing_buffers
    if _framing_buffers._FREE_REFS is None:
        pytest.skip("recycling is off on this interpreter (tested below)")
    arr = _at(nbytes, 8)  # the frame is the sender's memory, 8 bytes past 64
    frames = twin.encode(arr, KIND_REQUEST)
    assert len(frames) == 2  # one frame, not split
    first = twin.decode(frames)[2]
    assert first.ctypes.data % 64 == 0 and first.flags.writeable
    assert not np.shares_memory(first, arr)
    at = first.ctypes.data
    assert any(np.shares_memory(first, r) for r in _framing_buffers._recycled)  # kept
    second = twin.decode(frames)[2]
    assert second.ctypes.data != at  # ``first`` still holds it
    first[:] = -1.0
    np.testing.assert_array_equal(second, arr)  # nothing written over
    del first
    gc.collect()
    third = twin.decode(frames)[2]
    assert third.ctypes.data == at  # free again: reused
    np.testing.assert_array_equal(third, arr)
    assert second.ctypes.data != third.ctypes.data


def test_free_count_is_calibrated_on_this_interpreter():
    from zmq_cluster import _framing_buffers
    free = _framing_buffers._calibrate()
    if free is None:
        assert _framing_buffers._FREE_REFS is None
        return
    items = [np.empty(1, np.uint8)]
    assert _framing_buffers._refs(items, 0) == free
    held = items[0]
    assert _framing_buffers._refs(items, 0) == free + 1
    del held


def test_recycling_off_gives_fresh_memory_every_time(twin, monkeypatch):
    from zmq_cluster import _framing_buffers
    monkeypatch.setattr(_framing_buffers, "_FREE_REFS", None)
    before = list(_framing_buffers._recycled)
    arr = np.arange(2 * SPLIT_BYTES // 8 + 1, dtype=np.float64)
    frames = [bytes(f) for f in twin.encode(arr, KIND_REQUEST)]
    got = [twin.decode(frames)[2] for _ in range(3)]
    for out in got:
        assert out.ctypes.data % 64 == 0 and out.flags.writeable
        np.testing.assert_array_equal(out, arr)
    assert len({out.ctypes.data for out in got}) == 3
    assert [r.ctypes.data for r in _framing_buffers._recycled] == [r.ctypes.data for r in before]
    assert not any(np.shares_memory(out, r) for out in got for r in _framing_buffers._recycled)


def test_threads_never_share_an_assembly_buffer(twin):
    import threading

    arr = np.arange(2 * SPLIT_BYTES // 8 + 1, dtype=np.float64)
    frames = [bytes(f) for f in twin.encode(arr, KIND_REQUEST)]
    barrier = threading.Barrier(4)
    held = []
    errors = []

    def decode_some():
        try:
            barrier.wait(timeout=30)
            for _ in range(4):
                held.append(twin.decode(frames)[2])  # all kept: none may be reused
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=decode_some) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(held) == 16
    assert len({out.ctypes.data for out in held}) == 16
    for out in held:
        np.testing.assert_array_equal(out, arr)


def test_a_pool_full_of_free_buffers_of_another_size_makes_room(twin, monkeypatch):
    from zmq_cluster import _framing_buffers
    monkeypatch.setattr(_framing_buffers, "_recycled", [])
    small = np.arange(SPLIT_BYTES // 8 + 1, dtype=np.float64)
    big = np.arange(3 * SPLIT_BYTES // 8 + 1, dtype=np.float64)
    small_frames = [bytes(f) for f in twin.encode(small, KIND_REQUEST)]
    big_frames = [bytes(f) for f in twin.encode(big, KIND_REQUEST)]
    monkeypatch.setattr(_framing_buffers, "RECYCLE_MAX_BYTES", 3 * small.nbytes + 3 * 64)
    held = [twin.decode(small_frames)[2] for _ in range(3)]  # fills the pool
    assert len(_framing_buffers._recycled) == 3
    del held
    out = twin.decode(big_frames)[2]  # drops as many free small ones as it needs
    np.testing.assert_array_equal(out, big)
    at = out.ctypes.data
    assert any(np.shares_memory(out, r) for r in _framing_buffers._recycled)
    assert sum(r.nbytes for r in _framing_buffers._recycled) <= _framing_buffers.RECYCLE_MAX_BYTES
    del out
    assert twin.decode(big_frames)[2].ctypes.data == at  # kept, so reused
