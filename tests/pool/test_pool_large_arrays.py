"""Large arrays through the pool: split over several frames, forwarded by
the scheduler frame by frame without decoding, assembled 64-byte aligned
and writeable in the task and in the result; and the copy counters of the
client and the worker, exactly."""

import os

import numpy as np
import pytest

import zmq_cluster as zc
from zmq_cluster.protocol import ALIGNED_BYTES

from pool_helpers import scheduler_and_worker

MIB = 1 << 20
RESULT_TIMEOUT = 60


def checked_identity(x):
    """The array itself, once checked where the task runs."""
    if not ((x.nbytes < ALIGNED_BYTES or x.ctypes.data % 64 == 0) and x.flags.writeable):
        raise AssertionError("task array at %d mod 64, writeable=%s"
                             % (x.ctypes.data % 64, x.flags.writeable))
    x[0] = x[0]  # really writeable
    return x


def where(x):
    return os.getpid(), x.ctypes.data % 64, bool(x.flags.writeable), float(x.sum())


@pytest.fixture
def in_process(ipc_url):
    """A scheduler and one PoolWorker in threads of this process (so the
    worker's counters can be read), and a pool on them."""
    with scheduler_and_worker(ipc_url("large")) as (address, w):
        with zc.ClusterPool(address) as pool:
            yield pool, w


def test_64_mib_array_round_trips_through_a_local_cluster():
    arr = np.random.default_rng(3).random(64 * MIB // 8 + 3)  # split over 17 frames
    with zc.LocalCluster(1, heartbeat_timeout=10.0) as cluster:
        with zc.ClusterPool(cluster, shared_memory=False) as pool:  # the socket path
            pid, mod, writeable, total = pool.submit(where, arr).result(RESULT_TIMEOUT)
            assert pid != os.getpid() and (mod, writeable) == (0, True)
            assert total == float(arr.sum())
            [got] = pool.map(checked_identity, [arr], chunksize=1)
    np.testing.assert_array_equal(got, arr)
    assert got.ctypes.data % 64 == 0 and got.flags.writeable
    assert pool.copies_sent.copied_bytes == 0  # views of ``arr`` went out
    assert pool.copies_received.copied_bytes == arr.nbytes  # one assembly


@pytest.mark.parametrize("nbytes, copied", [
    (MIB // 2, 0),                      # a view on its frame at both ends
    (ALIGNED_BYTES * 2, ALIGNED_BYTES * 2),  # one frame, copied to 64 on receipt
    (64 * MIB, 64 * MIB),  # 16 frames, assembled on receipt
], ids=["512KiB", "2MiB", "64MiB"])
def test_copy_counters_of_client_and_worker_are_exact(in_process, nbytes, copied):
    pool, worker = in_process
    arr = np.arange(nbytes // 8, dtype=np.float64)
    [got] = pool.map(checked_identity, [arr], chunksize=1)
    np.testing.assert_array_equal(got, arr)
    assert got.flags.writeable
    if nbytes >= ALIGNED_BYTES:
        assert got.ctypes.data % 64 == 0
    # Sent as views both ways; received once each way: the worker's task,
    # the client's result.
    assert pool.copies_sent.copied_bytes == 0
    assert worker.copies.copied_bytes == copied
    assert pool.copies_received.copied_bytes == copied
