"""Shared memory on the pool path (ClusterPool -> scheduler -> pool worker
-> scheduler -> ClusterPool): arrays by slot both ways on a LocalCluster,
the copy counters exactly, the pins that let a task re-sent after its
worker was killed find its arguments, the in-flight byte bound counting the
bytes in slots, pins freed by cancel and terminate, a worker that cannot
map the slots failing the task with the reason, and a pool by address
(no shared memory) still working."""

import gc
import os
import signal
import time

import numpy as np
import pytest

import zmq_cluster as zc
from zmq_cluster.exceptions import MessageFormatError

from pool_helpers import (  # noqa: F401 (cluster: a fixture)
    RESULT_TIMEOUT, cluster, scheduler_and_worker, wait_gone,
)

MIB = 1 << 20


def bump(x):
    """``x + 1`` computed in place in the task's own array."""
    if not (x.ctypes.data % 64 == 0 and x.flags.writeable):
        raise AssertionError("task array at %d mod 64, writeable=%s"
                             % (x.ctypes.data % 64, x.flags.writeable))
    x += 1
    return x


def pid_and_bump(x):
    return os.getpid(), bump(x)


def slow_sum(x, seconds):
    time.sleep(seconds)
    return float(x.sum())


def sum_unless_first(x, marker):
    """The first run writes its pid to ``marker`` and waits to be killed;
    a run after that returns the sum."""
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return float(x.sum())
    os.write(fd, b"%d\n" % os.getpid())
    os.close(fd)
    time.sleep(120)
    return None


def _until(predicate, what, timeout=RESULT_TIMEOUT):
    """Wait (bounded) for ``predicate()``: releases travel to the slot
    server's thread, and workers let go of their arguments after a task."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        gc.collect()
        time.sleep(0.01)


def test_map_and_submit_by_shared_memory(cluster):
    arrays = [np.arange(MIB // 8 * 3, dtype=np.float64).reshape(3, -1),
              np.asfortranarray(np.arange(MIB // 4 * 2, dtype=">i4").reshape(-1, 2)),
              np.ones((1024, 1024), dtype=np.complex128)]
    before = [a.copy() for a in arrays]
    assert cluster.shared_memory  # the default
    with zc.ClusterPool(cluster) as pool:
        shm = pool.shared_memory
        assert shm is not None  # on by default for a LocalCluster
        out = pool.map(bump, arrays, chunksize=1)
        fut = pool.submit(bump, arrays[0])
        extra = fut.result(RESULT_TIMEOUT)
        for a, b, got in zip(arrays, before, out):
            np.testing.assert_array_equal(a, b)  # the caller's array unchanged
            np.testing.assert_array_equal(got, b + 1)
            assert got.dtype == b.dtype and got.shape == b.shape
            assert got.flags.f_contiguous == a.flags.f_contiguous
            assert got.ctypes.data % 64 == 0 and got.flags.writeable
        np.testing.assert_array_equal(extra, before[0] + 1)
        sent = sum(a.nbytes for a in arrays) + arrays[0].nbytes
        # Copied once each way, into a slot by its producer; received as views.
        assert pool.copies_sent.copied_bytes == sent
        assert pool.copies_received.copied_bytes == 0
        assert shm.arrays_sent == 4 and shm.arrays_received == 4 and shm.fallbacks == 0
        del out, extra, got
        _until(lambda: shm.slots_in_use() == 0, "the argument slots to be freed")


def test_a_task_rerun_after_its_worker_is_killed_finds_its_pinned_arguments(tmp_path):
    arr = np.arange(2 * MIB // 8, dtype=np.float64)
    marker = str(tmp_path / "first-run")
    with zc.LocalCluster(2, heartbeat_timeout=5.0) as cluster:
        with zc.ClusterPool(cluster) as pool:
            fut = pool.submit(sum_unless_first, arr, marker)
            _until(lambda: os.path.exists(marker) and open(marker).read().endswith("\n"),
                   "the first run to start")
            victim = int(open(marker).read())
            assert victim in cluster.worker_pids()
            os.kill(victim, signal.SIGKILL)
            assert fut.result(RESULT_TIMEOUT) == float(arr.sum())
            shm = pool.shared_memory
            assert shm.reclaimed >= 1  # the dead worker's claim went back to the pin
            assert pool.copies_sent.copied_bytes == arr.nbytes
            _until(lambda: shm.slots_in_use() == 0, "the pinned slot to be freed")


def test_a_result_stays_valid_after_its_worker_is_killed(tmp_path):
    """The client maps a worker's slots once: the memfd lives as long as a
    mapping of it, whatever happens to the worker."""
    arr = np.arange(2 * MIB // 8, dtype=np.float64)
    with zc.LocalCluster(1, heartbeat_timeout=5.0) as cluster:
        with zc.ClusterPool(cluster) as pool:
            pid, got = pool.submit(pid_and_bump, arr).result(RESULT_TIMEOUT)
            assert pool.shared_memory.arrays_received == 1
            os.kill(pid, signal.SIGKILL)
            assert wait_gone([pid], 10) == []
            np.testing.assert_array_equal(got, arr + 1)
            got += 1  # still writeable memory
            assert got[-1] == arr[-1] + 2
            del got  # its release goes nowhere: nothing breaks
            gc.collect()
            cluster.wait_for_workers(1, RESULT_TIMEOUT)  # a new worker, and the pool goes on
            pid2, again = pool.submit(pid_and_bump, arr).result(RESULT_TIMEOUT)
            assert pid2 != pid
            np.testing.assert_array_equal(again, arr + 1)


def test_in_flight_bytes_count_the_slots(cluster):
    reads = []

    def arrays():
        for i in range(30):
            reads.append(i)
            yield np.full(MIB // 8, i, dtype=np.float64)

    with zc.ClusterPool(cluster, max_ahead_bytes=3 * MIB) as pool:
        shm = pool.shared_memory
        it = pool.imap(bump, arrays())
        for i in range(30):
            got = it.next(timeout=RESULT_TIMEOUT)
            assert got[0] == i + 1
            assert len(reads) - (i + 1) <= 3, "%d inputs read ahead" % (len(reads) - i - 1)
            assert shm.slots_in_use() <= 4
            del got
        with pytest.raises(StopIteration):
            it.next(timeout=RESULT_TIMEOUT)
        _until(lambda: shm.slots_in_use() == 0, "the argument slots to be freed")


def test_cancel_and_terminate_free_the_pins(cluster):
    arr = np.ones(MIB // 8)
    pool = zc.ClusterPool(cluster)
    shm = pool.shared_memory
    try:
        futs = [pool.submit(slow_sum, arr, 0.2) for _ in range(6)]
        assert futs[-1].cancel()
        stream = pool.imap_unordered(slow_sum, [(arr, 0.2)] * 0)  # nothing: no pins
        assert list(stream) == []
        futs += [pool.submit(slow_sum, arr, 0.2) for _ in range(4)]
        assert shm.slots_in_use() >= 1
    finally:
        pool.terminate()
    assert all(f.cancelled() or f.done() for f in futs)
    _until(lambda: shm.slots_in_use() == 0, "every slot to be freed")


def test_a_pool_by_address_uses_the_socket(cluster):
    arrays = [np.arange(MIB // 8 * 2, dtype=np.float64) for _ in range(3)]
    with zc.ClusterPool(cluster.address) as pool:
        assert pool.shared_memory is None  # off for an address
        out = pool.map(bump, arrays, chunksize=1)
        for a, got in zip(arrays, out):
            np.testing.assert_array_equal(got, a + 1)
            assert got.ctypes.data % 64 == 0 and got.flags.writeable
        assert pool.copies_sent.copied_bytes == 0  # views of the arrays went out


@pytest.fixture(params=[True, False], ids=["worker-shm", "worker-no-shm"])
def in_process(request, ipc_url):
    """A scheduler and one PoolWorker (shared memory on or off) in threads of
    this process, so that the worker's counters can be read."""
    with scheduler_and_worker(ipc_url("shm"), shared_memory=request.param) as (address, w):
        yield address, w


def test_the_worker_side_and_a_worker_that_cannot_map(in_process):
    address, worker = in_process
    arr = np.arange(MIB // 8 * 2, dtype=np.float64)
    with zc.ClusterPool(address, shared_memory=True) as pool:
        shm = pool.shared_memory
        if worker.shared_memory is not None:
            got = pool.submit(bump, arr).result(RESULT_TIMEOUT)
            np.testing.assert_array_equal(got, arr + 1)
            assert worker.shared_memory.arrays_received == 1
            assert worker.shared_memory.arrays_sent == 1
            assert worker.copies.copied_bytes == arr.nbytes  # its result into its slot
            assert pool.copies_received.copied_bytes == 0
            del got
        else:
            with pytest.raises(MessageFormatError, match="no shared memory configured"):
                pool.submit(bump, arr).result(RESULT_TIMEOUT)
            assert worker.counters["shm_refused"] == 1
            assert worker.counters["tasks_refused"] == 1
        _until(lambda: shm.slots_in_use() == 0, "the argument slot to be freed")
