"""LocalCluster's scheduler as a process (the default) or as a thread of this
process: pools of this process reach the thread over inproc, pools of other
processes through ``cluster.address``; closing, trust, the registry."""

import concurrent.futures
import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import inprocess
from zmq_cluster import schedproto as sp
from zmq_cluster.client import SchedulerClient, SchedulerLost
from zmq_cluster.inprocess import SharedContext
from zmq_cluster.scheduler import Scheduler

RESULT_TIMEOUT = 30


def square(x):
    return x * x


def scheduler_threads():
    return [t for t in threading.enumerate() if t.name == "zmq-cluster-scheduler"]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_pool_in_this_process(mode):
    with zc.LocalCluster(1, scheduler=mode) as cluster:
        assert cluster.scheduler_mode == mode
        assert (cluster.scheduler is None) == (mode == "thread")
        with zc.ClusterPool(cluster) as pool:
            endpoint = pool._client.endpoint
            assert endpoint.startswith("inproc://" if mode == "thread" else "ipc://")
            assert pool._client.address == cluster.address
            assert pool.trusted  # inproc: this process; ipc: a private directory
            # A lambda travels pickled: both sides trust each other.
            assert pool.map(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]
            assert pool.submit(square, 7).result(RESULT_TIMEOUT) == 49
            stats = pool._client.stats()
            assert stats["clients"] >= 2  # the cluster's own and this pool's
            assert stats["counters"].get("untrusted_peers", 0) == 0
        # A pool given the address, not the cluster, takes the same path.
        with zc.ClusterPool(cluster.address) as pool:
            assert pool._client.endpoint == endpoint
            assert pool.map(square, range(3)) == [0, 1, 4]
    assert scheduler_threads() == []


def test_default_is_a_scheduler_process():
    with zc.LocalCluster(0) as cluster:
        assert cluster.scheduler_mode == "process" and cluster.scheduler is not None
    assert cluster.scheduler.returncode is not None


def test_thread_mode_tcp_cluster():
    with zc.LocalCluster(1, transport="tcp", scheduler="thread") as cluster, \
            zc.ClusterPool(cluster) as pool:
        assert cluster.address.startswith("tcp://127.0.0.1:")
        assert pool._client.endpoint.startswith("inproc://")
        assert pool.map(square, range(4)) == [0, 1, 4, 9]


POOL_SCRIPT = """
    import sys
    import zmq_cluster as zc
    with zc.ClusterPool(sys.argv[1]) as pool:
        print(pool._client.endpoint, pool.trusted, sum(pool.map(abs, range(-50, 50))), flush=True)
"""


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_pool_in_another_process_reaches_a_thread_scheduler(transport):
    with zc.LocalCluster(1, transport=transport, scheduler="thread") as cluster:
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(POOL_SCRIPT),
                              cluster.address], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        endpoint, trusted, total = out.stdout.split()
        assert endpoint == cluster.address  # not the inproc endpoint
        assert trusted == "True"  # loopback, or ipc in a private directory
        assert int(total) == sum(abs(x) for x in range(-50, 50))


def test_close_stops_the_thread_and_fails_what_an_open_pool_waits_for():
    # No workers: the task waits in the scheduler's queue.
    cluster = zc.LocalCluster(0, scheduler="thread")
    pool = zc.ClusterPool(cluster)
    try:
        assert len(scheduler_threads()) == 1
        running = pool.submit(square, 3)
        assert pool._client.stats()["queued"] == 1
        cluster.close()
        assert scheduler_threads() == []
        # The scheduler told its inproc client it stopped (no disconnection
        # event exists for inproc): what it waited for fails, new work too.
        with pytest.raises(SchedulerLost, match="stopped"):
            running.result(RESULT_TIMEOUT)
        with pytest.raises(SchedulerLost):
            pool.map(square, [1])
    finally:
        start = time.monotonic()
        pool.terminate()  # no scheduler: nothing waits for it
        assert time.monotonic() - start < 5
        cluster.close()
    # A new pool of the closed cluster does not find it in this process.
    assert cluster.address not in inprocess._IN_PROCESS


def test_pool_closed_before_cluster_and_cluster_closed_twice():
    with zc.LocalCluster(0, scheduler="thread") as cluster:
        pool = zc.ClusterPool(cluster)
        pool.close()
        pool.join()
        cluster.close()
        cluster.close()
    assert scheduler_threads() == []


def test_shared_context_is_terminated_by_its_last_user():
    shared = SharedContext()
    assert shared.acquire()
    sock = shared.context.socket(zmq.PAIR)
    shared.release()
    assert not shared.context.closed  # one user left
    sock.close()
    shared.release()
    assert shared.context.closed
    assert not shared.acquire()  # too late: its clients connect the ordinary way


@contextlib.contextmanager
def scheduler_thread(directory, mode, name):
    """A Scheduler on ``ipc://directory/s`` (the directory given ``mode``)
    and ``inproc://name``, served by a thread; stopped and joined after."""
    os.chmod(directory, mode)
    shared = SharedContext()
    sched = Scheduler("ipc://%s/s" % directory, context=shared.context,
                      inproc="inproc://" + name)
    thread = threading.Thread(target=sched.run, daemon=True)
    thread.start()
    try:
        yield shared, sched, thread
    finally:
        inprocess.unregister_in_process(sched.address)
        sched.stop()
        thread.join(10)
        assert not thread.is_alive()
        shared.release()
        assert shared.context.closed


def test_registry_is_for_this_process_only(tmp_path):
    """A fork copies the registry, not the scheduler thread: an entry
    recorded by another pid is ignored."""
    with scheduler_thread(tmp_path, 0o700, "zc-test-registry") as (shared, sched, _):
        inprocess._IN_PROCESS[sched.address] = (os.getpid() + 1, shared, sched.inproc)
        client = SchedulerClient(sched.address, connect_timeout=10)
        try:
            assert client.endpoint == sched.address
        finally:
            client.close()
        inprocess.register_in_process(sched.address, shared, sched.inproc)
        client = SchedulerClient(sched.address, connect_timeout=10)
        try:
            assert client.endpoint == "inproc://zc-test-registry"
            assert client.trusted
        finally:
            client.close()


def test_scheduler_inproc_peers_are_trusted_and_network_ones_are_not(tmp_path):
    """A scheduler on an ipc socket in a directory others may enter, plus
    an inproc endpoint: the inproc client is trusted, the ipc one is not."""
    with scheduler_thread(tmp_path, 0o755, "zc-test-trust") as (shared, sched, thread):
        inprocess.register_in_process(sched.address, shared, sched.inproc)
        inner = SchedulerClient(sched.address, connect_timeout=10)
        inprocess.unregister_in_process(sched.address)
        outer = SchedulerClient(sched.address, connect_timeout=10)
        try:
            assert inner.endpoint.startswith("inproc://") and inner.trusted
            assert outer.endpoint.startswith("ipc://") and not outer.trusted
            # Only the trusted one may stop the scheduler.
            assert not outer.control(sp.OP_STOP)["ok"]
            # (outer's submit connection said HELLO before that request)
            counters = inner.stats()["counters"]
            assert counters["untrusted_peers"] == 2  # outer's two connections
            assert counters["control_refused"] == 1
            assert inner.control(sp.OP_STOP)["ok"]
            thread.join(10)
            assert not thread.is_alive()
            # No disconnection event exists for inproc: the scheduler said so.
            deadline = time.monotonic() + 10
            while inner.lost is None and time.monotonic() < deadline:
                inner.read_until(lambda: inner.lost is not None, 0.1)
            assert "stopped" in str(inner.lost)
        finally:
            inner.close()
            outer.close()


def test_scheduler_inproc_argument_is_checked():
    with pytest.raises(ValueError, match="inproc://"):
        Scheduler("ipc:///nonexistent/s", inproc="ipc:///tmp/x")
    with pytest.raises(ValueError, match="scheduler must be"):
        zc.LocalCluster(0, scheduler="fiber")


def test_concurrent_submits_from_threads_over_inproc():
    with zc.LocalCluster(2, scheduler="thread") as cluster, zc.ClusterPool(cluster) as pool:
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda k: [pool.submit(square, k * 100 + i).result(RESULT_TIMEOUT)
                                          for i in range(50)], range(4)))
        assert outs == [[(k * 100 + i) ** 2 for i in range(50)] for k in range(4)]
