"""Faults: killed, stopped and hung workers, GIL-holding tasks, shared
schedulers, bounded memory, and no orphans. Timing-sensitive parts use small
heartbeat timeouts and wait on answers (STATS, pidfds), never on sleeps."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import zmq_cluster as zc

from pool_helpers import scheduler_counters, wait_gone, worker_holding_tasks

RESULT_TIMEOUT = 60


def slow_echo(x):
    time.sleep(0.002)
    return x


def sleepy(x):
    time.sleep(0.02)
    return x


def hold_gil(n):
    """sum over a range runs in C without releasing the GIL."""
    return sum(range(n))


def _gil_n(seconds):
    n = 20_000_000
    start = time.perf_counter()
    sum(range(n))
    per = (time.perf_counter() - start) / n
    return int(seconds / per)


def add(a, b):
    return a + b


def first(a):
    return float(a[0])


def _kill_when_busy(pool, after, killed):
    """In a thread: once the workers have done ``after`` tasks, SIGKILL one
    that holds tasks (it answers STATS; bounded)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = pool._client.stats()["workers"]
        if sum(w["tasks"] for w in workers) >= after:
            for w in workers:
                if w["in_hand"] > 0:
                    os.kill(w["pid"], signal.SIGKILL)
                    killed.append(w["pid"])
                    return


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_kill9_one_of_three_workers_mid_map(mode):
    with zc.LocalCluster(3, heartbeat_timeout=2.0, scheduler=mode) as cluster:
        with zc.ClusterPool(cluster) as pool:
            killed = []
            killer = threading.Thread(target=_kill_when_busy, args=(pool, 300, killed))
            killer.start()
            try:
                out = pool.map(slow_echo, range(2000), chunksize=1)
            finally:
                killer.join(60)
            assert len(killed) == 1, "no worker was killed mid-map"
            assert out == list(range(2000))             # every result, in order
            assert pool._client.unmatched_results == 0  # none came twice
            counters = scheduler_counters(pool)
            assert counters["workers_lost"] >= 1 and counters["redispatched"] >= 1
            assert wait_gone(killed, 10) == []
            cluster.wait_for_workers(3, timeout=30)  # the nanny replaced it
            assert killed[0] not in cluster.worker_pids()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_sigstop_worker_tasks_rerun_and_late_results_dropped(mode):
    timeout = 1.0
    with zc.LocalCluster(2, heartbeat_timeout=timeout, scheduler=mode) as cluster:
        with zc.ClusterPool(cluster, heartbeat_timeout=timeout) as pool:
            it = pool.imap_unordered(sleepy, range(100))
            got = [it.next(RESULT_TIMEOUT) for _ in range(4)]
            victim = worker_holding_tasks(pool)
            os.kill(victim, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                # Declared dead within heartbeat_timeout (plus one heartbeat
                # interval and scheduling slack): it leaves the worker list.
                while victim in {w["pid"] for w in pool._client.stats()["workers"]}:
                    assert time.monotonic() - stopped < timeout + 1.5, \
                        "the stopped worker was not declared dead in time"
                declared = time.monotonic() - stopped
                assert declared >= timeout * 0.5  # by its silence, not by accident
                got += [it.next(RESULT_TIMEOUT) for _ in range(96)]
                elapsed = time.monotonic() - stopped
                with pytest.raises(StopIteration):
                    it.next(RESULT_TIMEOUT)
                workers = pool._client.stats()["workers"]
                assert victim not in {w["pid"] for w in workers}
            finally:
                os.kill(victim, signal.SIGCONT)
            assert sorted(got) == list(range(100))
            # 96 tasks of 20 ms on the one worker left (~2 s), plus the
            # heartbeat timeout before the stopped one's tasks moved.
            assert elapsed < timeout + 2.0 + 96 * 0.02 * 1.5
            # Back after SIGCONT: it says HELLO again on a new connection ...
            deadline = time.monotonic() + 30
            while victim not in {w["pid"] for w in pool._client.stats()["workers"]}:
                cluster.wait_for_workers(2, timeout=30)
                assert time.monotonic() < deadline, "the stopped worker never came back"
            # ... its late result was dropped at the scheduler, not delivered twice.
            counters = scheduler_counters(pool)
            assert counters.get("late_results", 0) + counters.get("unknown_peer", 0) >= 1
            assert pool._client.unmatched_results == 0
            assert sorted(pool.map(sleepy, range(20))) == list(range(20))


def test_gil_holding_task_longer_than_heartbeat_timeout_runs_once():
    timeout = 1.0
    n = _gil_n(4 * timeout)
    with zc.LocalCluster(1, heartbeat_timeout=timeout) as cluster:
        with zc.ClusterPool(cluster, heartbeat_timeout=timeout) as pool:
            pid = cluster.worker_pids()[0]
            start = time.monotonic()
            assert pool.submit(hold_gil, n).result(RESULT_TIMEOUT) == n * (n - 1) // 2
            assert time.monotonic() - start > 1.5 * timeout  # it really held on that long
            counters = scheduler_counters(pool)
            assert counters.get("workers_lost", 0) == 0
            assert counters.get("redispatched", 0) == 0
            assert [w["pid"] for w in pool._client.stats()["workers"]] == [pid]
            assert cluster.restarts == 0


def test_task_timeout_fails_task_and_replaces_worker():
    with zc.LocalCluster(2, heartbeat_timeout=2.0) as cluster:
        with zc.ClusterPool(cluster, task_timeout=1.0) as pool:
            pids = set(cluster.worker_pids())
            start = time.monotonic()
            hung = pool.submit(time.sleep, 120)
            gil_hung = pool.submit(hold_gil, 10**12)
            fine = [pool.submit(add, i, i) for i in range(10)]
            with pytest.raises(TimeoutError):
                hung.result(RESULT_TIMEOUT)
            with pytest.raises(TimeoutError):
                gil_hung.result(RESULT_TIMEOUT)
            assert time.monotonic() - start < 15
            assert [f.result(RESULT_TIMEOUT) for f in fine] == [2 * i for i in range(10)]
            # Each hung worker ended itself (SIGALRM, even holding the GIL)
            # and the nanny started another.
            assert len(wait_gone(sorted(pids), 15)) < len(pids)
            cluster.wait_for_workers(2, timeout=30)
            assert pool.starmap(add, [(1, 2)]) == [3]
            assert cluster.restarts >= 1


def offset(base):
    return lambda i: base + i


def test_two_pools_share_a_scheduler():
    with zc.LocalCluster(2) as cluster:
        pools = [zc.ClusterPool(cluster) for _ in range(2)]
        errors = []
        results = {}

        def run(p, k):
            try:
                base = p * 10**6 + k * 10**4
                its = [pools[p].imap_unordered(offset(base + j * 1000), range(300),
                                               chunksize=1 + k) for j in range(3)]
                results[p, k] = [sorted(it) for it in its]
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(p, k)) for p in range(2) for k in range(3)]
        for t in threads:
            t.start()
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent("""
                import sys, zmq_cluster as zc
                with zc.ClusterPool(sys.argv[1]) as pool:
                    print(sum(pool.map(abs, range(-1000, 0), chunksize=7)))
            """), cluster.address], stdout=subprocess.PIPE, text=True)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for t in threads:
            t.join(120)
        for pool in pools:
            assert pool._client.unmatched_results == 0
            pool.terminate()
        assert not errors
        assert out.strip() == str(sum(range(1, 1001)))
        for p in range(2):
            for k in range(3):
                base = p * 10**6 + k * 10**4
                assert results[p, k] == [[base + j * 1000 + i for i in range(300)]
                                         for j in range(3)]


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_imap_over_endless_generator_runs_in_bounded_memory():
    produced = [0]

    def endless():
        i = 0
        while True:
            produced[0] += 1
            yield np.full(1 << 17, float(i))  # 1 MiB
            i += 1

    with zc.LocalCluster(2) as cluster:
        with zc.ClusterPool(cluster) as pool:
            before = _rss()
            peak_rss = before
            most_ahead = 0
            it = pool.imap(first, endless())
            for k in range(2000):
                assert it.next(RESULT_TIMEOUT) == float(k)
                most_ahead = max(most_ahead, produced[0] - (k + 1))
                if k % 50 == 0:
                    time.sleep(0.01)  # a slow consumer
                    peak_rss = max(peak_rss, _rss())
            assert most_ahead <= 1000
            assert peak_rss - before < 500 << 20


def _script_pids(code, *args):
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        pytest.fail("the script did not start its cluster")
    return proc, [int(x) for x in line.split()]


CLUSTER_SCRIPT = """
    import signal, sys, time
    import zmq_cluster as zc
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with zc.LocalCluster(2, scheduler=sys.argv[1]) as c:
        print(*([c.scheduler.pid] if c.scheduler else []), *c.worker_pids(), flush=True)
        time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_children_die_with_a_sigkilled_parent(mode):
    proc, pids = _script_pids(CLUSTER_SCRIPT, mode)
    assert len(pids) == (2 if mode == "thread" else 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert wait_gone(pids, 15) == []


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_ctrl_c_stops_the_cluster(mode):
    proc, pids = _script_pids(CLUSTER_SCRIPT, mode)
    os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode != 0  # KeyboardInterrupt
    assert wait_gone(pids, 15) == []
