"""Wire-format promises about memory, over real sockets, for both twins:
zero-copy encode, views on received frames, alignment, order, pickle-5
out-of-band buffers."""

import dataclasses

import numpy as np
import pytest
import zmq

from zmq_cluster.protocol import COPY_THRESHOLD, KIND_REQUEST

WAIT_MS = 10000


@pytest.fixture(params=["ipc", "tcp", "inproc"])
def pair(request, ctx, ipc_url):
    """A connected (sender, receiver) PAIR of sockets on each transport."""
    url = {"ipc": ipc_url("pair"), "tcp": "tcp://127.0.0.1:*",
           "inproc": "inproc://pair"}[request.param]
    receiver = ctx.socket(zmq.PAIR)
    receiver.bind(url)
    sender = ctx.socket(zmq.PAIR)
    sender.connect(receiver.getsockopt_string(zmq.LAST_ENDPOINT))
    yield sender, receiver
    sender.close(0)
    receiver.close(0)


def _transfer(twin, pair, obj):
    sender, receiver = pair
    sender.send_multipart(twin.encode(obj, KIND_REQUEST, 5), copy=False)
    assert receiver.poll(WAIT_MS)
    frames = receiver.recv_multipart(copy=False)
    return frames, twin.decode(frames)


def test_encode_does_not_copy_contiguous_arrays(twin):
    for arr in (np.arange(1 << 16, dtype=np.float64).reshape(256, 256),
                np.asfortranarray(np.ones((300, 200), np.int16))):
        frames = twin.encode({"x": arr}, KIND_REQUEST)
        assert len(frames) == 2
        assert np.shares_memory(np.frombuffer(frames[1], np.uint8), arr)


def test_large_array_is_a_writeable_aligned_view_on_its_frame(twin, pair):
    arr = np.random.default_rng(0).random((512, 512))  # 2 MiB
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


def test_small_arrays_are_copied(twin, pair):
    arr = np.arange(10, dtype=np.int32)
    assert arr.nbytes < COPY_THRESHOLD
    frames, (_, _, got) = _transfer(twin, pair, arr)
    np.testing.assert_array_equal(got, arr)
    assert not np.shares_memory(got, np.frombuffer(frames[1].buffer, np.uint8))
    assert got.flags.writeable and got.flags.aligned


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
    payload = {"a": [1, (big, {"deep": np.zeros(3, np.uint8)})], ("k", 2): big[:10]}
    frames, (_, _, got) = _transfer(twin, pair, payload)
    assert len(frames) == 4  # header + three arrays
    np.testing.assert_array_equal(got["a"][1][0], big)
    np.testing.assert_array_equal(got["a"][1][1]["deep"], np.zeros(3, np.uint8))
    np.testing.assert_array_equal(got[("k", 2)], big[:10])


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
