"""Same-host shared memory (zmq_cluster.sharedmem, tag 'h'): round trips in
both framing twins, the release protocol, reclaim after a consumer is
killed, the socket fallback, refusals (no shared memory, forged references,
another uid), and the nodes' ``shared_memory`` keyword end to end."""

import gc
import multiprocessing
import os
import signal
import struct
import time

import numpy as np
import pytest

import zmq_cluster as zc
from zmq_cluster import _framing_tasks
from zmq_cluster._framing_shm import E_SHM_NONE
from zmq_cluster.exceptions import MessageFormatError
from zmq_cluster.protocol import HEADER_SIZE, KIND_REQUEST, TAG_SHM_ARRAY
from zmq_cluster.sharedmem import AttachError, SharedMemory

from conftest import TWINS
from helpers import WAIT_MS, WIRE_TWINS, push_pull, worker_thread
from helpers import Stats as WireStats

MIB = 1 << 20


class Stats:
    copied_bytes = 0


def _until(predicate, what):
    """Wait (bounded) for ``predicate()``: the slot server runs in a thread."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        gc.collect()
        time.sleep(0.005)


@pytest.fixture
def shm():
    """A producer and a consumer (one process can be both)."""
    producer, consumer = SharedMemory(slots=4, capacity=64 * MIB), SharedMemory()
    yield producer, consumer
    gc.collect()
    # Every test claims (and drops) what it sent: the slot server then stops.
    assert producer.close(wait=WAIT_MS / 1000), "%d slots still held" % producer.slots_in_use()
    consumer.close()


def _refs(frames):
    """Whether the message's header holds a shared-memory reference."""
    return len(frames) == 1 and bytes([TAG_SHM_ARRAY]) in frames[0][HEADER_SIZE:]


@pytest.mark.parametrize("make", [
    lambda: np.arange(MIB // 8 * 3, dtype=np.float64).reshape(3, -1),
    lambda: np.asfortranarray(np.arange(MIB // 4 * 3, dtype=np.int32).reshape(-1, 3)),
    lambda: np.arange(4 * MIB // 8, dtype=">f8")[::2],  # not contiguous: a C-order copy
    lambda: np.zeros((1024, 1024), dtype="<c16"),
], ids=["f64-C", "i32-F", "strided", "c16"])
def test_round_trip_aligned_writeable_and_counted(twin, shm, make):
    producer, consumer = shm
    arr = make()
    sent, received = Stats(), Stats()
    frames = twin.encode({"a": arr, "n": 3}, KIND_REQUEST, 5, stats=sent, shm=producer)
    assert _refs(frames)
    assert sent.copied_bytes == arr.nbytes  # the producer's copy
    _, task_id, obj = twin.decode(frames, stats=received, shm=consumer)
    got = obj["a"]
    assert task_id == 5 and obj["n"] == 3
    np.testing.assert_array_equal(got, arr)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    assert got.flags.writeable and got.ctypes.data % 64 == 0
    if arr.flags.f_contiguous and not arr.flags.c_contiguous:
        assert got.flags.f_contiguous and not got.flags.c_contiguous
    else:
        assert got.flags.c_contiguous
    assert received.copied_bytes == 0  # a view of the slot
    assert producer.slots_in_use() == 1
    del got, obj
    _until(lambda: producer.slots_in_use() == 0, "the release")


def test_writing_the_received_array_never_changes_the_senders(twin, shm):
    producer, consumer = shm
    arr = np.ones(MIB // 8)
    got = twin.decode(twin.encode(arr, KIND_REQUEST, shm=producer), shm=consumer)[2]
    got[:] = 7
    assert (arr == 1).all()
    # ...nor a later message from the same array
    again = twin.decode(twin.encode(arr, KIND_REQUEST, shm=producer), shm=consumer)[2]
    assert (again == 1).all() and (got == 7).all()


@pytest.mark.skipif(len(TWINS) < 2, reason="the compiled twin is not built (pure mode)")
def test_both_twins_write_the_same_bytes():
    class Fixed:
        min_bytes = MIB

        def put(self, arr):
            return "/tmp/zc-example/slots", 3, 0x0102030405060708, 4096

        def commit(self):
            pass

    py, cy = [param.values[0] for param in TWINS]
    for arr in (np.zeros((512, 256)), np.asfortranarray(np.zeros((256, 1024), "<i4")),
                np.zeros(MIB, "|u1")):
        payload = zc.ClusterRequest([arr, "x"], {"i": 1})
        assert py.encode(payload, KIND_REQUEST, 9, shm=Fixed()) == \
            cy.encode(payload, KIND_REQUEST, 9, shm=Fixed())


def test_a_held_array_blocks_reuse_and_its_release_frees_the_slot(twin):
    producer, consumer = SharedMemory(slots=1, capacity=8 * MIB), SharedMemory()
    try:
        arr = np.arange(MIB // 8, dtype=np.float64)
        held = twin.decode(twin.encode(arr, KIND_REQUEST, shm=producer), shm=consumer)[2]
        view = held[10:20]
        del held  # a view still refers to the slot
        gc.collect()
        # The only slot is held: the next array goes over the socket.
        frames = twin.encode(arr, KIND_REQUEST, shm=producer)
        assert not _refs(frames) and len(frames) == 2
        assert producer.fallbacks == 1
        np.testing.assert_array_equal(twin.decode(frames, shm=consumer)[2], arr)
        assert producer.slots_in_use() == 1
        del view
        _until(lambda: producer.slots_in_use() == 0, "the release")
        frames = twin.encode(arr + 1, KIND_REQUEST, shm=producer)
        assert _refs(frames)
        np.testing.assert_array_equal(twin.decode(frames, shm=consumer)[2], arr + 1)
        # Too large for the pool's room: the socket too.
        big = np.zeros(9 * MIB, np.uint8)
        _until(lambda: producer.slots_in_use() == 0, "no reference held")
        assert not _refs(twin.encode(big, KIND_REQUEST, shm=producer))
        # Below min_bytes: never by slot.
        assert not _refs(twin.encode(arr[:1000], KIND_REQUEST, shm=producer))
    finally:
        consumer.close()
        producer.close(wait=WAIT_MS / 1000)


def test_a_pinned_slot_outlives_its_consumers_until_unpinned(twin):
    """A pool pins a task's argument slots: a release, or the reclaim of a
    consumer that died, gives the slot back to the pin (a second consumer
    can still claim it, as a re-sent task's worker does); the unpin frees
    it, at once or at the last release."""
    producer, first, second = SharedMemory(slots=2, capacity=8 * MIB), SharedMemory(), SharedMemory()
    try:
        arr = np.arange(MIB // 8, dtype=np.float64)
        frames = twin.encode(arr, KIND_REQUEST, shm=producer)
        pins = producer.last_message()
        producer.pin(pins)
        assert producer.last_message() == []  # taken
        assert [(p[0], p[2]) for p in pins] == [(0, arr.nbytes)] and _refs(frames)
        got = twin.decode(frames, shm=first)[2]
        first.close()  # (the connection goes with its last array)
        del got
        gc.collect()
        _until(lambda: producer._producer.state[0] == 1, "the release back to the pin")
        assert producer.slots_in_use() == 1
        again = twin.decode(frames, shm=second)[2]  # the task, run again elsewhere
        np.testing.assert_array_equal(again, arr)
        producer.unpin(pins)
        assert producer.slots_in_use() == 1  # still held by the second consumer
        del again
        _until(lambda: producer.slots_in_use() == 0, "the last release")
        twin.encode(arr, KIND_REQUEST, shm=producer)  # sent, never claimed
        pins = producer.last_message()
        producer.pin(pins)
        producer.unpin(pins)
        assert producer.slots_in_use() == 0
    finally:
        second.close()
        producer.close(wait=WAIT_MS / 1000)


def test_an_unpin_racing_a_claim_never_frees_a_slot_in_use(twin):
    """A consumer claims, then checks the slot table; an unpin hides the
    entry, then reads the claims already sent. So a claim the producer read
    first keeps the slot (values intact), and a slot freed before the claim
    went out is refused by the consumer, never handed out as an array."""
    producer, consumer = SharedMemory(slots=2, capacity=8 * MIB), SharedMemory()
    try:
        arr = np.arange(MIB // 8, dtype=np.float64)
        pool = consumer._attach(producer.path)
        real_claim = pool.claim

        frames = twin.encode(arr, KIND_REQUEST, shm=producer)
        pins = producer.last_message()
        producer.pin(pins)

        def claim_then_unpin(slot, generation):
            real_claim(slot, generation)
            producer.unpin(pins)

        pool.claim = claim_then_unpin
        got = twin.decode(frames, shm=consumer)[2]
        np.testing.assert_array_equal(got, arr)
        assert producer.slots_in_use() == 1
        del got
        gc.collect()
        _until(lambda: producer.slots_in_use() == 0, "the release")

        frames = twin.encode(arr, KIND_REQUEST, shm=producer)
        pins = producer.last_message()
        producer.pin(pins)

        def unpin_then_claim(slot, generation):
            producer.unpin(pins)
            real_claim(slot, generation)

        pool.claim = unpin_then_claim
        with pytest.raises(MessageFormatError, match="freed while this process claimed it"):
            twin.decode(frames, shm=consumer)
        assert producer.slots_in_use() == 0
        assert pool.live == 0
    finally:
        consumer.close()
        producer.close(wait=WAIT_MS / 1000)


def test_freed_slots_beyond_retain_go_back_to_the_os(twin):
    producer, consumer = SharedMemory(slots=8, capacity=16 * MIB, retain=MIB), SharedMemory()
    try:
        arrays = [np.full(2 * MIB // 8, i, dtype=np.float64) for i in range(4)]
        held = [twin.decode(twin.encode(a, KIND_REQUEST, shm=producer), shm=consumer)[2]
                for a in arrays]
        fd = producer._producer.fd
        backed = os.fstat(fd).st_blocks * 512
        assert backed >= 8 * MIB
        del held
        _until(lambda: producer.slots_in_use() == 0, "the releases")
        assert os.fstat(fd).st_blocks * 512 <= backed - 7 * MIB  # 1 MiB (and the table) stay
    finally:
        consumer.close()
        producer.close(wait=WAIT_MS / 1000)


def test_a_receiver_without_shared_memory_refuses_with_the_reason(twin, shm):
    producer, consumer = shm
    frames = twin.encode(np.ones(MIB // 8), KIND_REQUEST, 1, shm=producer)
    with pytest.raises(MessageFormatError) as info:
        twin.decode(frames)
    assert str(info.value) == E_SHM_NONE % (HEADER_SIZE)
    assert "no shared memory configured" in str(info.value)
    twin.decode(frames, shm=consumer)  # (claimed and dropped: the slot is free)


def _forge(frames, **fields):
    """The message with its reference's slot, generation, offset, pool or
    first dimension changed (they sit at fixed places after the tag)."""
    header = bytearray(frames[0])
    at = HEADER_SIZE + 1
    slot, generation, offset = struct.unpack_from("<IQQ", header, at)
    slot = fields.get("slot", slot)
    generation = fields.get("generation", generation)
    offset = fields.get("offset", offset)
    struct.pack_into("<IQQ", header, at, slot, generation, offset)
    if "dim" in fields:
        n = struct.unpack_from("<I", header, at + 21)[0]
        dim_at = at + 21 + 4 + n + 8 + 1  # the path, the dtype '<f8' ('s', u32, 3), ndim
        struct.pack_into("<Q", header, dim_at, fields["dim"])
    if "path" in fields:
        n = struct.unpack_from("<I", header, at + 21)[0]
        path = fields["path"].encode()
        header[at + 21:at + 25 + n] = struct.pack("<I", len(path)) + path
    return [bytes(header)]


@pytest.mark.parametrize("forgery,reason", [
    ({"slot": 4}, "slot 4 of a pool of 4 slots"),
    ({"slot": 1}, "stale or forged"),
    ({"generation": 99}, "stale or forged"),
    ({"offset": 8192 + 64}, "not %d at" % MIB),
    ({"dim": MIB // 8 + 1}, "bytes at offset"),
    ({"path": "relative/slots"}, "not an absolute path"),
    ({"path": "/nonexistent/zmq_cluster/slots"}, "cannot fetch slot pool"),
])
def test_a_forged_reference_is_refused(twin, shm, forgery, reason):
    producer, consumer = shm
    frames = twin.encode(np.ones(MIB // 8), KIND_REQUEST, shm=producer)
    with pytest.raises(MessageFormatError, match="shared-memory array at offset 16") as info:
        twin.decode(_forge(frames, **forgery), shm=consumer)
    assert reason in str(info.value)
    np.testing.assert_array_equal(twin.decode(frames, shm=consumer)[2], 1.0)  # the real one


def _hold_then_wait(frames, ready):
    """A consumer process: map and hold the array, say so, wait to be killed."""
    from zmq_cluster import framing
    consumer = SharedMemory()
    arr = framing.decode(frames, shm=consumer)[2]
    ready.put(float(arr[5]))
    time.sleep(60)


def test_slots_of_a_consumer_killed_with_sigkill_are_reclaimed(shm):
    producer, _ = shm
    from zmq_cluster import framing
    frames = framing.encode(np.arange(MIB // 8, dtype=np.float64), KIND_REQUEST, shm=producer)
    mp = multiprocessing.get_context("spawn")
    ready = mp.Queue()
    proc = mp.Process(target=_hold_then_wait, args=(frames, ready), daemon=True)
    proc.start()
    try:
        assert ready.get(timeout=WAIT_MS / 1000) == 5.0
        assert producer.slots_in_use() == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(WAIT_MS / 1000)
        _until(lambda: producer.slots_in_use() == 0, "the reclaim")
        assert producer.reclaimed == 1
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        ready.close()


def _attach_as(uid, path, slot, generation, offset):
    """In a forked child: become ``uid`` and try to map the pool. Exit
    status 0: refused (as it should be), 1: mapped."""
    try:
        os.setgid(uid)
        os.setuid(uid)
        SharedMemory().attach(path, slot, generation, offset, MIB, True)
    except AttachError:
        os._exit(0)
    except BaseException:
        os._exit(2)
    os._exit(1)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
@pytest.mark.parametrize("open_directory", [False, True], ids=["0700-dir", "SO_PEERCRED"])
def test_another_uid_cannot_fetch_the_memfd(shm, open_directory):
    producer, consumer = shm
    path, slot, generation, offset = producer.put(np.ones(MIB // 8))
    if open_directory:  # past the directory: the server's uid check refuses
        os.chmod(os.path.dirname(path), 0o755)
        os.chmod(path, 0o777)
    pid = os.fork()
    if pid == 0:
        _attach_as(65534, path, slot, generation, offset)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    if open_directory:
        _until(lambda: producer.refused_peers == 1, "the refusal")
    consumer.attach(path, slot, generation, offset, MIB, True)  # we may


# ------------------------------------------------------------------ the nodes

class IdentityWorker(zc.BasicWorker):
    seen = None

    def HandleRequest(self, request):
        self.seen = (request.ctypes.data % 64, bool(request.flags.writeable))
        request[0] = request[0]
        return request


@pytest.fixture
def urls(ipc_url):
    return ipc_url("req"), ipc_url("res"), ipc_url("cmd")


@pytest.mark.parametrize("basic", [False, True], ids=["Ventilator/Sink", "Basic"])
@pytest.mark.parametrize("mib", [1, 16], ids=["1MiB", "16MiB"])
def test_nodes_with_shared_memory_end_to_end(ctx, urls, mib, basic):
    req, res, cmd = urls
    arrays = [np.full(mib * MIB // 8, float(i)) for i in range(3)]
    vent_class, sink_class = (zc.BasicVentilator, zc.BasicSink) if basic else (zc.Ventilator,
                                                                               zc.Sink)
    with vent_class(ctx, zc.Connect(req, bind=True), shared_memory=True) as vent, \
            sink_class(ctx, zc.Connect(res, bind=True), receiver_timeout=WAIT_MS,
                       shared_memory=True) as sink, \
            worker_thread(ctx, req, res, cmd, IdentityWorker,
                          shared_memory=True) as (worker, errors):
        assert vent.Send(arrays) == 3
        got = list(sink.Receive(3))
        if basic:
            assert all(r.status == zc.ClusterResult.STATUS_SUCCESS for r in got)
            got = [r.payload for r in got]
        worker_copied = worker.copied_bytes
        assert vent.shared_memory.arrays_sent == 3
        assert sink.shared_memory.arrays_received == 3
    assert not errors
    assert sorted(float(g[0]) for g in got) == [0.0, 1.0, 2.0]
    for g in got:
        assert g.flags.writeable and g.ctypes.data % 64 == 0
        np.testing.assert_array_equal(g, g[0])
    assert worker.seen == (0, True)
    # (Shutdown closed the worker's own SharedMemory; its counters stay.)
    assert worker.shared_memory.closed
    assert worker.shared_memory.arrays_received == worker.shared_memory.arrays_sent == 3
    nbytes = mib * MIB
    assert vent.copied_bytes == 3 * nbytes  # into its slots
    assert worker_copied == 3 * nbytes  # into its slots; received: views
    assert sink.copied_bytes == 0


def test_a_worker_without_shared_memory_answers_the_refusal(ctx, urls):
    req, res, cmd = urls
    with zc.Ventilator(ctx, zc.Connect(req, bind=True), shared_memory=True) as vent, \
            zc.BasicSink(ctx, zc.Connect(res, bind=True), receiver_timeout=WAIT_MS) as sink, \
            worker_thread(ctx, req, res, cmd, IdentityWorker) as (worker, errors):
        vent.Send([np.ones(MIB // 8)])
        [result] = list(sink.Receive(1))
        malformed = worker.malformed_messages
    assert not errors
    assert result.status == zc.ClusterResult.STATUS_FAIL
    assert isinstance(result.exception, MessageFormatError) or "no shared memory" in str(
        result.exception)
    assert "no shared memory configured" in str(result.exception)
    assert malformed == 1


def test_a_failed_encoding_frees_the_slots_it_took(twin, shm):
    producer, _ = shm
    unpicklable = lambda: 0  # noqa: E731  (pickle refuses a lambda)
    with pytest.raises(TypeError):
        twin.encode([np.ones(MIB // 8), unpicklable], KIND_REQUEST, shm=producer)
    assert producer.slots_in_use() == 0 and producer.arrays_sent == 0
    tasks = _framing_tasks if twin.__name__.endswith("_framing_py") else twin
    with pytest.raises(TypeError):
        tasks.encode_request(np.ones(MIB // 8), unpicklable, 1, shm=producer)
    with pytest.raises(TypeError):
        tasks.encode_ok(np.ones(MIB // 8), unpicklable, b"m\x00\x00\x00\x00", 0.5, 1,
                        shm=producer)
    assert producer.slots_in_use() == 0
    frames = tasks.encode_request(np.ones(MIB // 8), None, 1, shm=producer)
    assert _refs(frames) and producer.slots_in_use() == 1
    twin.decode(frames, shm=SharedMemory())  # claimed and dropped


def test_a_message_decoded_twice_shares_its_claim_then_is_refused(twin, shm):
    producer, consumer = shm
    frames = twin.encode(np.arange(MIB // 8, dtype=np.float64), KIND_REQUEST, shm=producer)
    first = twin.decode(frames, shm=consumer)[2]
    second = twin.decode(frames, shm=consumer)[2]
    assert np.shares_memory(first, second) or first.ctypes.data == second.ctypes.data
    del first
    gc.collect()
    time.sleep(0.05)  # (a release would have reached the slot server by now)
    assert producer.slots_in_use() == 1 and second[7] == 7.0
    del second
    _until(lambda: producer.slots_in_use() == 0, "the release")
    with pytest.raises(MessageFormatError, match="already released|stale or forged"):
        twin.decode(frames, shm=consumer)


@pytest.mark.parametrize("wire", WIRE_TWINS, ids=["py", "cy"][:len(WIRE_TWINS)])
def test_the_wire_primitives_and_the_handle_loop_carry_shared_memory(ctx, ipc_url, wire, shm):
    producer, consumer = shm
    arr = np.arange(2 * MIB // 8, dtype=np.float64)
    with push_pull(ctx, ipc_url("req")) as (push, pull), \
            push_pull(ctx, ipc_url("res")) as (back, results):
        stats = WireStats()
        wire.send_message(push, {"a": arr}, KIND_REQUEST, 3, stats=stats, shm=producer)
        assert stats.copied_bytes == arr.nbytes
        assert pull.poll(WAIT_MS)
        kind, task_id, got = wire.recv_message(pull, shm=consumer)
        np.testing.assert_array_equal(got["a"], arr)
        assert got["a"].ctypes.data % 64 == 0 and producer.slots_in_use() == 1
        del got
        _until(lambda: producer.slots_in_use() == 0, "the release")
        # run_worker's handle mode: the request in, its array doubled back out.
        worker_shm = SharedMemory()
        wire.send_message(push, arr, KIND_REQUEST, 4, shm=producer)
        wire.send_message(push, "stop", KIND_REQUEST, 5)

        def handle(kind, task_id, request):
            return None if type(request) is str else request * 2

        def on_command(kind, command):
            return True

        seen = []

        def on_malformed(channel, exc):
            seen.append(exc)

        def stop_after_two(kind, task_id, request):
            out = handle(kind, task_id, request)
            if out is None:
                raise StopIteration
            return out

        with pytest.raises(StopIteration):
            wire.run_worker(pull, back, None, handle=stop_after_two, on_command=on_command,
                            on_malformed=on_malformed, on_unsendable=None, timeout_ms=WAIT_MS,
                            shm=worker_shm)
        assert results.poll(WAIT_MS)
        _, task_id, doubled = wire.recv_message(results, shm=consumer)
        assert task_id == 4 and not seen
        np.testing.assert_array_equal(doubled, 2 * arr)
        assert worker_shm.arrays_sent == 1 and worker_shm.arrays_received == 1
        del doubled
        assert worker_shm.close(wait=WAIT_MS / 1000)
