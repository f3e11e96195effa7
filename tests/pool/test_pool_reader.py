"""A thread waiting in ``Future.result()`` reads the result connection
itself (SchedulerClient.read_until): every other consumer still gets its
results, from whichever thread reads, and closing or cancelling reaches a
thread that reads."""

import concurrent.futures
import threading
import time

import pytest

import zmq_cluster as zc
from zmq_cluster import resultreader

from pool_helpers import RESULT_TIMEOUT, cluster, pool  # noqa: F401 (fixtures)


def inc(x):
    return x + 1


def nap(seconds):
    time.sleep(seconds)
    return seconds


def test_result_reads_for_itself(pool):
    # The waiting thread took the connection over: the I/O thread did not
    # deliver the result.
    delivered_by = []
    fut = pool.submit(nap, 0.2)
    fut.add_done_callback(lambda f: delivered_by.append(threading.get_ident()))
    assert fut.result(RESULT_TIMEOUT) == 0.2
    assert delivered_by == [threading.get_ident()]
    # Called again at once, the next wait reads without a hand-off.
    assert [pool.submit(inc, i).result(RESULT_TIMEOUT) for i in range(200)] == \
        list(range(1, 201))


def test_other_consumers_get_their_results_while_a_thread_reads(pool):
    # One thread loops on submit().result() (reading for itself most of the
    # time) while this one waits on as_completed, callbacks and a stream.
    stop = threading.Event()
    errors = []
    counts = [0]

    def loop():
        try:
            i = 0
            while not stop.is_set():
                assert pool.submit(inc, i).result(RESULT_TIMEOUT) == i + 1
                i += 1
            counts[0] = i
        except BaseException as exc:  # reported below
            errors.append(exc)

    th = threading.Thread(target=loop)
    th.start()
    try:
        called = threading.Event()
        futs = [pool.submit(inc, -i) for i in range(50)]
        futs[-1].add_done_callback(lambda f: called.set())
        got = sorted(f.result() for f in concurrent.futures.as_completed(
            futs, timeout=RESULT_TIMEOUT))
        assert got == sorted(1 - i for i in range(50))
        assert called.wait(RESULT_TIMEOUT)
        assert sorted(pool.imap_unordered(inc, range(300))) == list(range(1, 301))
        assert pool.map(inc, range(1000), chunksize=7) == list(range(1, 1001))
    finally:
        stop.set()
        th.join(RESULT_TIMEOUT)
    assert not th.is_alive() and not errors, errors
    assert counts[0] > 0


def test_threads_waiting_at_once(pool):
    # Several threads wait at once: one reads, the others are woken by it.
    out = {}

    def work(t):
        out[t] = [pool.submit(inc, t * 1000 + i).result(RESULT_TIMEOUT) for i in range(100)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(RESULT_TIMEOUT * 2)
    assert not any(th.is_alive() for th in threads)
    assert out == {t: [t * 1000 + i + 1 for i in range(100)] for t in range(4)}


def test_result_timeout_while_reading(pool):
    fut = pool.submit(nap, 2.0)
    start = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        fut.result(0.2)
    assert time.monotonic() - start < 1.5
    # The connection went back: the next result still comes.
    assert fut.result(RESULT_TIMEOUT) == 2.0
    assert fut.exception(RESULT_TIMEOUT) is None


def test_terminate_reaches_a_reading_thread(cluster):
    pool = zc.ClusterPool(cluster)
    fut = pool.submit(nap, 3)
    outcome = []

    def wait():
        try:
            fut.result(RESULT_TIMEOUT)
            outcome.append("result")
        except concurrent.futures.CancelledError:
            outcome.append("cancelled")
        except BaseException as exc:
            outcome.append(exc)

    th = threading.Thread(target=wait)
    th.start()
    # The waiting thread reads (or is about to): terminate from this one.
    deadline = time.monotonic() + RESULT_TIMEOUT
    while pool._client._reading.reader_ident is None and time.monotonic() < deadline:
        th.join(0.01)
    assert pool._client._reading.reader_ident == th.ident
    start = time.monotonic()
    pool.terminate()
    th.join(RESULT_TIMEOUT)
    assert not th.is_alive()
    assert outcome == ["cancelled"]
    # It noticed within a slice or so, not at the task's end.
    assert time.monotonic() - start < 2


def test_connection_goes_back_to_the_io_thread(pool):
    # After a thread read for itself, the I/O thread reads again soon:
    # a callback fires with nobody waiting.
    assert pool.submit(inc, 1).result(RESULT_TIMEOUT) == 2
    called = threading.Event()
    fut = pool.submit(nap, 0.05)
    fut.add_done_callback(lambda f: called.set())
    assert called.wait(RESULT_TIMEOUT)
    deadline = time.monotonic() + RESULT_TIMEOUT
    while pool._client._reading.state != resultreader._IO and time.monotonic() < deadline:
        called.wait(0.01)
    assert pool._client._reading.state == resultreader._IO
