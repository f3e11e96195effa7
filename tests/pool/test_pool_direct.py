"""Direct tasks: a pool on the scheduler's host leases a worker and sends it
single tasks straight, and nothing is lost when that worker dies, stops or
refuses. Waits are bounded and wait on answers (futures, STATS, marker
files the tasks write), never on sleeps."""

import os
import signal
import time

import numpy as np
import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import schedproto as sp
from zmq_cluster.functions import describe, function_key
from zmq_cluster.workerdirect import direct_endpoint
from zmq_cluster.taskcodec import decode_result, encode_task

from pool_helpers import scheduler_and_worker, scheduler_counters

RESULT_TIMEOUT = 30


def inc(x):
    return x + 1


def where(x):
    return x, os.getpid()


def fail(message):
    raise KeyError(message)


def mark_then_wait(directory, x):
    """Say (a file named for this process) that the task started, then
    wait for a file named ``go``; return ``(x, pid)``."""
    open(os.path.join(directory, "started-%d" % os.getpid()), "w").close()
    while not os.path.exists(os.path.join(directory, "go")):
        time.sleep(0.005)
    return x, os.getpid()


def _leased(pool, timeout=10.0):
    """Submit until the pool's lease is ready (bounded); the lease."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert pool.submit(inc, 1).result(RESULT_TIMEOUT) == 2
        lease = pool._client.lease
        if lease is not None and lease["ready"]:
            return lease
    pytest.fail("the pool got no lease within %g s" % timeout)


def _wait_file(path, timeout=RESULT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "%s never appeared" % path
        time.sleep(0.005)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_submit_goes_straight_to_the_leased_worker(mode):
    with zc.LocalCluster(2, heartbeat_timeout=5.0, scheduler=mode) as cluster:
        with zc.ClusterPool(cluster) as pool:
            lease = _leased(pool)
            assert lease["pid"] in cluster.worker_pids()
            client = pool._client
            direct_before = client.counters["direct_tasks"]
            dispatched_before = scheduler_counters(pool)["tasks"]
            assert [pool.submit(where, i).result(RESULT_TIMEOUT) for i in range(50)] == [
                (i, lease["pid"]) for i in range(50)]
            assert client.counters["direct_tasks"] - direct_before == 50
            # The scheduler handed out none of them ...
            assert scheduler_counters(pool)["tasks"] == dispatched_before
            # ... yet its statistics count them once the worker says so.
            deadline = time.monotonic() + 10
            while True:
                counters = scheduler_counters(pool)
                if counters.get("direct_tasks", 0) >= client.counters["direct_tasks"]:
                    break
                assert time.monotonic() < deadline, "the worker never reported its direct tasks"
            stats = {w["pid"]: w for w in pool.stats()}
            assert stats[lease["pid"]]["tasks"] >= 50
            # Arrays (shared memory above 1 MiB on a LocalCluster) and
            # exceptions with their remote traceback go the same way.
            big = np.arange(300_000, dtype=">f8").reshape(600, 500)[:, ::2]
            small = np.arange(10, dtype=np.int16)
            assert np.array_equal(pool.submit(np.negative, big).result(RESULT_TIMEOUT), -big)
            assert np.array_equal(pool.submit(np.negative, small).result(RESULT_TIMEOUT), -small)
            with pytest.raises(KeyError) as info:
                pool.submit(fail, "direct").result(RESULT_TIMEOUT)
            assert "fail" in str(info.value.__cause__)
            assert client.counters["direct_tasks"] - direct_before == 53
            assert client.unmatched_results == 0


def test_a_pool_made_with_direct_false_never_leases():
    with zc.LocalCluster(1, heartbeat_timeout=5.0) as cluster:
        with zc.ClusterPool(cluster, direct=False) as pool:
            assert [pool.submit(inc, i).result(RESULT_TIMEOUT) for i in range(20)] == list(
                range(1, 21))
            assert pool._client.lease is None
            assert pool._client.counters["direct_tasks"] == 0
            assert scheduler_counters(pool).get("leases", 0) == 0


def test_two_pools_lease_different_workers():
    with zc.LocalCluster(2, heartbeat_timeout=5.0) as cluster:
        with zc.ClusterPool(cluster) as a, zc.ClusterPool(cluster) as b:
            la, lb = _leased(a), _leased(b)
            assert la["worker_no"] != lb["worker_no"]
            fa = [a.submit(where, i) for i in range(20)]
            fb = [b.submit(where, -i) for i in range(20)]
            assert [f.result(RESULT_TIMEOUT)[0] for f in fa] == list(range(20))
            assert [f.result(RESULT_TIMEOUT)[0] for f in fb] == [-i for i in range(20)]
            assert a._client.unmatched_results == b._client.unmatched_results == 0


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_kill9_of_the_leased_worker_mid_task_loses_nothing(mode, tmp_path):
    with zc.LocalCluster(2, heartbeat_timeout=2.0, scheduler=mode) as cluster:
        with zc.ClusterPool(cluster) as pool:
            lease = _leased(pool)
            victim = lease["pid"]
            fut = pool.submit(mark_then_wait, str(tmp_path), 7)
            _wait_file(tmp_path / ("started-%d" % victim))  # it runs there, directly
            os.kill(victim, signal.SIGKILL)
            # The scheduler sees the worker go and revokes the lease; the
            # pool sends the task through the scheduler to the other worker.
            deadline = time.monotonic() + RESULT_TIMEOUT
            while pool._client.counters["direct_resent"] < 1:
                assert time.monotonic() < deadline, "the task was not re-sent"
                time.sleep(0.01)
            (tmp_path / "go").touch()
            x, pid = fut.result(RESULT_TIMEOUT)
            assert x == 7 and pid != victim
            assert pool._client.unmatched_results == 0
            # A new lease (on a live worker) serves later submits.
            assert _leased(pool)["pid"] != victim
            assert pool.submit(inc, 41).result(RESULT_TIMEOUT) == 42


def test_sigstop_of_the_leased_worker_reruns_its_task_once(tmp_path):
    timeout = 1.0
    with zc.LocalCluster(2, heartbeat_timeout=timeout) as cluster:
        with zc.ClusterPool(cluster, heartbeat_timeout=timeout) as pool:
            victim = _leased(pool)["pid"]
            fut = pool.submit(mark_then_wait, str(tmp_path), 3)
            _wait_file(tmp_path / ("started-%d" % victim))
            os.kill(victim, signal.SIGSTOP)
            try:
                (tmp_path / "go").touch()
                # Declared dead by its silence; the task runs on the other worker.
                x, pid = fut.result(RESULT_TIMEOUT)
                assert x == 3 and pid != victim
                assert pool._client.counters["direct_resent"] == 1
            finally:
                os.kill(victim, signal.SIGCONT)
            # Back, it finishes the task it held and finds nobody to give the
            # result to: the caller got exactly one.
            deadline = time.monotonic() + RESULT_TIMEOUT
            while victim not in {w["pid"] for w in pool.stats()}:
                assert time.monotonic() < deadline, "the stopped worker never came back"
            assert pool._client.unmatched_results == 0
            assert [pool.submit(inc, i).result(RESULT_TIMEOUT) for i in range(10)] == list(
                range(1, 11))


def test_a_cancelled_direct_task_is_not_delivered(tmp_path):
    with zc.LocalCluster(1, heartbeat_timeout=5.0) as cluster:
        with zc.ClusterPool(cluster) as pool:
            worker = _leased(pool)["pid"]
            client = pool._client
            fut = pool.submit(mark_then_wait, str(tmp_path), 1)
            _wait_file(tmp_path / ("started-%d" % worker))
            assert fut.cancel()
            (tmp_path / "go").touch()
            # Its result comes and is dropped; the lease serves the next one.
            assert pool.submit(inc, 1).result(RESULT_TIMEOUT) == 2
            deadline = time.monotonic() + RESULT_TIMEOUT
            while client.unmatched_results < 1:
                assert time.monotonic() < deadline
                pool.submit(inc, 1).result(RESULT_TIMEOUT)
            assert client.unmatched_results == 1
            assert client.counters["direct_resent"] == 0
            assert fut.cancelled()


# ----------------------------------------------------- the worker's side


def _peer(address, ctx):
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(address)
    return s


def _recv(sock, timeout_ms=10_000):
    assert sock.poll(timeout_ms), "no answer within %d ms" % timeout_ms
    frames = sock.recv_multipart()
    return sp.parse_ctl(frames[0]), frames[1:]


def _task(tid, key, x):
    msg = encode_task(sp.MODE_MAP, [x], tid)
    entry, data = sp.pack_entry(sp.TASK_ENTRY, (tid, key, 0), msg)
    return [sp.ctl(sp.TASKS, 1), entry] + list(data)


def test_the_direct_socket_serves_lease_holders_only(tmp_path, caplog):
    ctx = zmq.Context()
    with scheduler_and_worker("ipc://%s/sched" % tmp_path) as (_, worker):
        deadline = time.monotonic() + 10
        while worker.direct_address is None:  # bound once run() starts
            assert time.monotonic() < deadline
            time.sleep(0.005)
        blob = ("operator", "neg", None)
        key = function_key(blob)
        func = [sp.ctl(sp.FUNC), sp.body((key,) + blob)]
        stranger = _peer(worker.direct_address, ctx)
        try:
            # No DHELLO: refused with RESET, logged and counted.
            stranger.send_multipart(_task(5 << 40 | 1, key, 3))
            (mtype, _, _), _ = _recv(stranger)
            assert mtype == sp.RESET and worker.counters["direct_refused"] == 1
            # A forged token: refused.
            stranger.send_multipart(sp.message(sp.DHELLO, {
                "client_no": 5, "role": sp.DIRECT_RESULTS, "token": "00" * 32,
                "trusted": True}))
            (mtype, _, _), _ = _recv(stranger)
            assert mtype == sp.RESET and worker.counters["direct_refused"] == 2
            assert "not a valid lease" in caplog.text
        finally:
            stranger.close(0)
        # A real token (what the scheduler grants client 5), not trusted.
        token = sp.lease_token(worker._direct.key, 5, False)
        rx, tx = _peer(worker.direct_address, ctx), _peer(worker.direct_address, ctx)
        try:
            hello = {"client_no": 5, "token": token, "trusted": False}
            rx.send_multipart(sp.message(sp.DHELLO, dict(hello, role=sp.DIRECT_RESULTS)))
            (mtype, _, _), _ = _recv(rx)
            assert mtype == sp.DHELLO
            tx.send_multipart(sp.message(sp.DHELLO, dict(hello, role=sp.DIRECT_SUBMIT)))
            # Claiming trust the token was not made with: refused.
            liar = _peer(worker.direct_address, ctx)
            liar.send_multipart(sp.message(sp.DHELLO, dict(hello, role=sp.DIRECT_SUBMIT,
                                                           trusted=True)))
            (mtype, _, _), _ = _recv(liar)
            liar.close(0)
            assert mtype == sp.RESET and worker.counters["direct_refused"] == 3
            tx.send_multipart(func)
            tx.send_multipart(_task(5 << 40 | 2, key, 4))
            # Another client's task id: refused, counted, never run.
            tx.send_multipart(_task(6 << 40 | 3, key, 5))
            (mtype, count, _), frames = _recv(rx)
            assert mtype == sp.RESULTS and count == 1
            [(fields, msg)] = sp.walk(frames[0], count, sp.RESULT_ENTRY, frames[1:])
            assert fields[0] == 5 << 40 | 2
            values, errors = decode_result(msg, False)
            assert values == [-4] and errors is None
            deadline = time.monotonic() + 10
            while worker.counters["bad_task_id"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            # A function pickled by value from a client the token does not
            # trust: refused unexecuted, the task fails saying why.
            pickled = ("__main__", "f", describe(lambda x: x)[2])
            pkey = function_key(pickled)
            tx.send_multipart([sp.ctl(sp.FUNC), sp.body((pkey,) + pickled)])
            tx.send_multipart(_task(5 << 40 | 4, pkey, 1))
            (mtype, count, _), frames = _recv(rx)
            [(fields, msg)] = sp.walk(frames[0], count, sp.RESULT_ENTRY, frames[1:])
            values, errors = decode_result(msg, False)
            assert fields[0] == 5 << 40 | 4 and "pickle" in str(errors)
            assert worker.counters["pickle_refused"] == 1
        finally:
            rx.close(0)
            tx.close(0)
    ctx.term()


def test_where_a_worker_offers_a_direct_socket(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    endpoint = direct_endpoint("ipc://%s/sched" % private, secure=False)
    assert endpoint.startswith("ipc://%s/w%d-" % (private, os.getpid()))
    assert direct_endpoint("tcp://127.0.0.1:5555", secure=False) == "tcp://127.0.0.1:*"
    # Not for a network scheduler (its clients may be elsewhere), nor with
    # CURVE, nor beside a socket in a directory others can enter.
    assert direct_endpoint("tcp://10.1.2.3:5555", secure=False) is None
    assert direct_endpoint("tcp://0.0.0.0:5555", secure=False) is None
    assert direct_endpoint("tcp://127.0.0.1:5555", secure=True) is None
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    assert direct_endpoint("ipc://%s/sched" % shared, secure=False) is None


def test_lease_tokens_bind_the_client_and_its_trust():
    key = os.urandom(32)
    token = sp.lease_token(key, 3, True)
    assert token == sp.lease_token(key, 3, True)
    assert token != sp.lease_token(key, 4, True)
    assert token != sp.lease_token(key, 3, False)
    assert token != sp.lease_token(os.urandom(32), 3, True)
