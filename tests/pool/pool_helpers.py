"""Helpers of the pool tests: the shared cluster and pool fixtures,
waiting for processes to end (pidfd, no sleeps) and asking the scheduler
who holds tasks.

A test module uses the fixtures by importing them by name
(``from pool_helpers import cluster, pool``): not from a conftest.py
here, which would shadow tests/conftest.py for the modules that import
from it."""

import contextlib
import os
import select
import threading
import time

import pytest

import zmq_cluster as zc
from zmq_cluster.poolworker import PoolWorker

#: Seconds a test waits for a result, at most.
RESULT_TIMEOUT = 30


@pytest.fixture(scope="module", params=["process", "thread"])
def cluster(request):
    """A LocalCluster of two workers, one per test module and scheduler
    mode (a process; a thread, which the module's pools reach over inproc)."""
    with zc.LocalCluster(2, heartbeat_timeout=5.0, scheduler=request.param) as c:
        yield c


@pytest.fixture
def pool(cluster):
    """A ClusterPool on the module's cluster, terminated after the test."""
    with zc.ClusterPool(cluster) as p:
        yield p


def wait_gone(pids, timeout):
    """Wait until every pid has exited (pidfd: no polling); the pids still
    alive after ``timeout`` seconds."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                fds.pop(fd)
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def scheduler_counters(pool):
    return pool._client.stats()["counters"]


def worker_holding_tasks(pool, timeout=10.0):
    """The pid of a worker that holds at least one task (STATS, bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in pool._client.stats()["workers"]:
            if w["in_hand"] > 0:
                return w["pid"]
    pytest.fail("no worker holds a task")


@contextlib.contextmanager
def scheduler_and_worker(address, **worker_options):
    """A scheduler listening on ``address`` and one PoolWorker (made with
    ``worker_options``) in threads of this process, so that the worker's
    counters can be read: yields ``(scheduler address, worker)``; both
    threads have ended when it exits."""
    s = zc.Scheduler(address)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    w = PoolWorker(s.address, heartbeat_timeout=5.0, **worker_options)
    wt = threading.Thread(target=w.run, daemon=True)
    wt.start()
    try:
        yield s.address, w
    finally:
        w.stop()
        s.stop()
        t.join(10)
        wt.join(10)
    assert not t.is_alive() and not wt.is_alive()
