"""ClusterPool's API on a LocalCluster: every method, chunking, inputs,
exceptions, functions by reference and by value, arrays."""

import concurrent.futures
import functools
import itertools
import math
import os
import threading

import numpy as np
import pytest

import zmq_cluster as zc
from zmq_cluster import RemoteTraceback

from pool_helpers import RESULT_TIMEOUT, cluster, pool  # noqa: F401 (fixtures)


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail_on_three(x):
    if x == 3:
        raise KeyError("three")
    return x


class CustomError(Exception):
    def __init__(self, code, note):
        super().__init__(code, note)
        self.code = code


def raise_custom(x):
    raise CustomError(x, "custom")


def raise_unpicklable(x):
    class Unimportable(Exception):  # no importable name: cannot be rebuilt
        pass

    raise Unimportable("nope %s" % x)


def pid_of(_):
    return os.getpid()


def describe_array(a):
    """What the task saw, and a changed copy-or-view to send back."""
    info = (a.dtype.str, a.shape, bool(a.flags.c_contiguous), bool(a.flags.f_contiguous),
            bool(a.flags.writeable))
    a[...] = np.zeros(1, a.dtype)  # must not change the caller's array
    return info, a


def test_map_in_order(pool):
    assert pool.map(square, range(100)) == [x * x for x in range(100)]


def test_map_builtin_and_numpy_function_by_reference(pool):
    arrays = [np.arange(5.0) - i for i in range(6)]
    out = pool.map(np.square, arrays)
    for a, b in zip(arrays, out):
        np.testing.assert_array_equal(b, np.square(a))
    assert pool.map(abs, [-1, -2]) == [1, 2]
    assert zc.functions.describe(np.square)[2] is None  # installed: by reference only


@pytest.mark.parametrize("chunksize", [None, 1, 2, 7, 100, 1000])
def test_map_chunksizes(pool, chunksize):
    assert pool.map(square, range(57), chunksize=chunksize) == [x * x for x in range(57)]


def test_bad_chunksize(pool):
    with pytest.raises(ValueError):
        pool.map(square, range(3), chunksize=0)
    with pytest.raises(ValueError):
        pool.imap(square, range(3), chunksize=-1)


def test_empty_inputs(pool):
    assert pool.map(square, []) == []
    assert list(pool.imap(square, [])) == []
    assert list(pool.imap_unordered(square, iter([]))) == []
    assert pool.starmap(add, []) == []


def test_generators(pool):
    assert pool.map(square, (x for x in range(20))) == [x * x for x in range(20)]
    assert list(pool.imap(square, (x for x in range(30)), chunksize=4)) == \
        [x * x for x in range(30)]
    assert sorted(pool.imap_unordered(square, (x for x in range(30)), chunksize=3)) == \
        [x * x for x in range(30)]


def test_imap_is_lazy_and_ordered(pool):
    seen = []

    def gen():
        for i in range(10_000):
            seen.append(i)
            yield i

    it = pool.imap(square, gen())
    assert seen == []  # nothing read before the first next()
    assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    assert len(seen) <= pool._max_ahead + 5
    assert list(it) == [x * x for x in range(5, 10_000)]


def test_imap_next_timeout(cluster):
    with zc.ClusterPool(cluster) as pool:
        it = pool.imap(pow, [(2, 1)], chunksize=1)  # pow((2, 1)) fails: one arg
        with pytest.raises(TypeError):
            it.next(RESULT_TIMEOUT)
        with pytest.raises(StopIteration):
            it.next(RESULT_TIMEOUT)


def test_starmap(pool):
    assert pool.starmap(add, [(1, 2), (3, 4), ("a", "b")]) == [3, 7, "ab"]
    assert pool.starmap(add, [(i, i) for i in range(50)], chunksize=8) == \
        [2 * i for i in range(50)]


def test_submit_and_as_completed(pool):
    futures = [pool.submit(add, i, b=10) for i in range(20)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    done = {f.result() for f in concurrent.futures.as_completed(futures,
                                                                 timeout=RESULT_TIMEOUT)}
    assert done == {i + 10 for i in range(20)}
    assert pool.apply(add, (1, 2)) == 3


def test_submit_exception(pool):
    fut = pool.submit(fail_on_three, 3)
    exc = fut.exception(RESULT_TIMEOUT)
    assert type(exc) is KeyError and exc.args == ("three",)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "fail_on_three" in str(exc.__cause__) and "KeyError" in str(exc.__cause__)
    assert "fail_on_three" in exc.remote_traceback


def test_map_raises_first_failure_in_input_order(pool):
    with pytest.raises(KeyError) as info:
        pool.map(fail_on_three, range(10), chunksize=1)
    assert info.value.args == ("three",)
    with pytest.raises(CustomError) as info:
        pool.map(raise_custom, [5, 6])
    assert info.value.code == 5


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_raises_at_its_place_then_goes_on(pool, chunksize):
    for method in (pool.imap, pool.imap_unordered):
        it = method(fail_on_three, range(8), chunksize=chunksize)
        got, errors = [], 0
        while True:
            try:
                got.append(next(it))
            except KeyError:
                errors += 1
            except StopIteration:
                break
        assert errors == 1
        assert sorted(got) == [0, 1, 2, 4, 5, 6, 7]
        if method == pool.imap:
            assert got == [0, 1, 2, 4, 5, 6, 7]


def test_failing_item_fails_alone_in_its_chunk(pool):
    it = pool.imap(fail_on_three, range(6), chunksize=6)  # one chunk
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError):
        next(it)
    assert list(it) == [4, 5]


def test_unpicklable_exception_becomes_worker_exception(pool):
    with pytest.raises(zc.WorkerException) as info:
        pool.submit(raise_unpicklable, 1).result(RESULT_TIMEOUT)
    exc = info.value
    assert exc.type_name.endswith("Unimportable")
    assert exc.message == "nope 1"
    assert "raise_unpicklable" in exc.remote_traceback
    assert exc.worker_exception is not None


def test_exception_without_pickle_allowed(cluster):
    with zc.ClusterPool(cluster, allow_pickle=False) as pool:
        with pytest.raises(zc.WorkerException) as info:
            pool.submit(fail_on_three, 3).result(RESULT_TIMEOUT)
        assert info.value.type_name == "builtins.KeyError"
        assert "three" in info.value.message
        assert "fail_on_three" in info.value.remote_traceback


def test_lambdas_closures_partials(pool):
    k = 7
    assert pool.map(lambda x: x + k, range(5)) == [x + 7 for x in range(5)]

    def closure(x, offset=k):
        return x - offset

    assert pool.map(closure, [7, 8]) == [0, 1]
    assert pool.map(functools.partial(add, 100), [1, 2]) == [101, 102]
    assert pool.submit(lambda: "no args").result(RESULT_TIMEOUT) == "no args"


def test_test_module_function_travels_by_value_too(pool):
    module, qualname, pickled = zc.functions.describe(square)
    assert qualname == "square" and pickled is not None
    module, qualname, pickled = zc.functions.describe(lambda x: x)
    assert module is None and pickled is not None


def test_unencodable_result_fails_its_item(pool):
    it = pool.imap(lambda x: threading.Lock() if x == 1 else x, range(3))
    assert next(it) == 0
    with pytest.raises(Exception) as info:
        next(it)
    assert "could not be sent back" in str(info.value) or "lock" in str(info.value).lower()
    assert next(it) == 2


@pytest.mark.parametrize("chunksize", [1, 2, 4])
@pytest.mark.parametrize("ordered", [True, False])
def test_an_argument_that_cannot_be_sent_fails_its_item_alone(pool, chunksize, ordered):
    """An input item that does not encode (a lock) fails at its place with
    the EncodeError; the other items, those of its chunk too, run; the
    stream and the pool go on (it was never sent: nothing waits for it)."""
    items = [0, 1, threading.Lock(), 3, 4, threading.Lock(), 6]
    method = pool.imap if ordered else pool.imap_unordered
    it = method(square, items, chunksize=chunksize)
    got, failed = [], 0
    while True:
        try:
            got.append(it.next(RESULT_TIMEOUT))
        except StopIteration:
            break
        except zc.EncodeError as exc:
            assert "lock" in str(exc)
            failed += 1
            if ordered:
                got.append("failed")
    if ordered:
        assert got == [0, 1, "failed", 9, 16, "failed", 36]
    else:
        assert sorted(got) == [0, 1, 9, 16, 36] and failed == 2
    with pytest.raises(zc.EncodeError):
        pool.map(square, items, chunksize=chunksize)
    assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


def test_submit_of_an_argument_that_cannot_be_sent_raises_at_once(pool):
    with pytest.raises(zc.EncodeError, match="lock"):
        pool.submit(square, threading.Lock())
    assert pool.submit(square, 3).result(RESULT_TIMEOUT) == 9
    pool.close()
    pool.join()  # nothing was left pending by the refused submit


@pytest.mark.parametrize("dtype", ["<f8", ">i4", "<c16", "|u1", "<M8[ns]", "|S3"])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("shape", [(3,), (40, 50), (300, 200)])
def test_arrays_in_and_out(pool, dtype, order, shape):
    arr = np.asarray(np.arange(math.prod(shape)).reshape(shape), order=order)
    arr = arr.astype(dtype, order=order)
    original = arr.copy(order="A")
    (dt, sh, c, f, writeable), back = pool.submit(describe_array, arr).result(RESULT_TIMEOUT)
    assert dt == np.dtype(dtype).str and sh == shape and writeable
    if len(shape) > 1:
        assert (c, f) == ((True, False) if order == "C" else (False, True))
    np.testing.assert_array_equal(arr, original)  # the caller's array is untouched
    assert back.dtype == arr.dtype and back.shape == shape
    assert (back == np.zeros(1, back.dtype)).all()
    assert back.flags.writeable


def test_large_array_result_is_a_view_on_the_frame(pool):
    big = np.arange(1 << 17, dtype=np.float64)  # 1 MiB
    out = pool.submit(np.negative, big).result(RESULT_TIMEOUT)
    np.testing.assert_array_equal(out, -big)
    assert out.flags.writeable and not out.flags.owndata  # zero-copy view


def test_progress_bar(pool, capsys):
    assert pool.map(square, range(40), progress=True) == [x * x for x in range(40)]
    err = capsys.readouterr().err
    assert "40/40" in err
    assert sorted(pool.imap_unordered(square, iter(range(5)), progress=True)) == \
        [0, 1, 4, 9, 16]
    assert "5it" in capsys.readouterr().err.replace(" ", "").replace("item", "it")


def test_stats(pool, cluster):
    pool.map(square, range(200), chunksize=10)
    stats = pool.stats()
    assert len(stats) == cluster.n_workers
    assert {s["pid"] for s in stats} == set(cluster.worker_pids())
    for s in stats:
        assert set(s) == {"host", "pid", "tasks", "mean_task_seconds", "state", "last_seen"}
        assert s["state"] in ("busy", "idle") and s["last_seen"] >= 0
        assert s["mean_task_seconds"] >= 0
    assert sum(s["tasks"] for s in stats) >= 200  # items, not chunks


def test_closed_pool_refuses_work(cluster):
    pool = zc.ClusterPool(cluster)
    fut = pool.submit(square, 3)
    pool.close()
    with pytest.raises(ValueError):
        pool.map(square, [1])
    with pytest.raises(ValueError):
        pool.submit(square, 1)
    pool.join()
    assert fut.result(0) == 9


def test_join_requires_close(cluster):
    with zc.ClusterPool(cluster) as pool:
        with pytest.raises(ValueError):
            pool.join()


def test_terminate_cancels_pending_futures(cluster):
    pool = zc.ClusterPool(cluster)
    slow = [pool.submit(__import__("time").sleep, 0.2) for _ in range(20)]
    pool.terminate()
    assert all(f.cancelled() or f.done() for f in slow)
    assert any(f.cancelled() for f in slow)
    with pytest.raises(ValueError):
        pool.submit(square, 1)
    # Another pool on the same scheduler is untouched.
    with zc.ClusterPool(cluster) as other:
        assert other.map(square, range(10)) == [x * x for x in range(10)]


def test_future_cancel(pool):
    futs = [pool.submit(__import__("time").sleep, 0.05) for _ in range(10)]
    cancelled = futs[-1].cancel()
    for f in futs[:-1]:
        f.result(RESULT_TIMEOUT)
    assert cancelled == futs[-1].cancelled()


def test_threads_share_a_pool(pool):
    errors = []
    results = {}

    def work(t):
        try:
            base = t * 1000
            results[t] = (pool.map(add, range(base, base + 300), chunksize=7)
                          if False else pool.starmap(add, [(base, i) for i in range(300)]),
                          sorted(pool.imap_unordered(square, range(base, base + 50))),
                          pool.submit(add, t, t).result(RESULT_TIMEOUT))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    for t in range(4):
        base = t * 1000
        assert results[t][0] == [base + i for i in range(300)]
        assert results[t][1] == sorted(x * x for x in range(base, base + 50))
        assert results[t][2] == 2 * t


def test_several_maps_in_flight_from_one_pool(pool):
    its = [pool.imap(add, [(k, i) for i in range(200)], chunksize=3) for k in range(5)]
    its = [pool.imap(functools.partial(add, k * 10_000), range(200)) for k in range(5)]
    outs = [[] for _ in its]
    for values in itertools.zip_longest(*its):
        for out, v in zip(outs, values):
            out.append(v)
    for k, out in enumerate(outs):
        assert out == [k * 10_000 + i for i in range(200)]


def test_work_spreads_over_workers(pool, cluster):
    pids = set(pool.map(pid_of, range(400), chunksize=1))
    assert pids <= set(cluster.worker_pids()) and len(pids) >= 1


def test_pool_by_address_and_tcp_cluster():
    with zc.LocalCluster(1, transport="tcp") as c:
        assert c.address.startswith("tcp://127.0.0.1:")
        with zc.ClusterPool(c.address) as pool:
            assert pool.map(square, range(10)) == [x * x for x in range(10)]


def thread_variables(_):
    from zmq_cluster.process import THREAD_VARIABLES
    return [os.environ.get(name) for name in THREAD_VARIABLES]


def test_workers_get_one_blas_thread_by_default(pool):
    from zmq_cluster.process import THREAD_VARIABLES
    expected = [os.environ.get(name, "1") for name in THREAD_VARIABLES]
    assert pool.map(thread_variables, range(4), chunksize=1) == [expected] * 4


def test_worker_environment():
    from zmq_cluster.process import THREAD_VARIABLES, worker_environment
    env = worker_environment(1, {"PATH": "/bin", "MKL_NUM_THREADS": "8"})
    assert env["PATH"] == "/bin" and env["MKL_NUM_THREADS"] == "8"  # an explicit setting wins
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    assert worker_environment(None, {"PATH": "/bin"}) == {"PATH": "/bin"}
    assert all(worker_environment(3, {})[name] == "3" for name in THREAD_VARIABLES)
    with pytest.raises(ValueError):
        worker_environment(0, {})


def test_ipc_cluster_dir_is_private(cluster):
    assert cluster.address.startswith("ipc://")
    path = os.path.dirname(cluster.address[len("ipc://"):])
    assert os.stat(path).st_mode & 0o777 == 0o700


def sleep_pid(seconds):
    import time
    time.sleep(seconds)
    return os.getpid()


def test_tasks_of_unknown_duration_spread_over_workers(cluster):
    with zc.ClusterPool(cluster) as pool:
        pids = pool.map(sleep_pid, [0.2] * 4, chunksize=1)
    assert len(set(pids)) == cluster.n_workers  # not all piled on the first worker




def test_join_after_cancelled_futures(cluster):
    pool = zc.ClusterPool(cluster)
    futs = [pool.submit(sleep_pid, 0.05) for _ in range(30)]
    cancelled = [f for f in futs if f.cancel()]
    assert cancelled  # the tail was still queued or in flight
    pool.close()
    pool.join(timeout=RESULT_TIMEOUT)
    assert pool._pending == 0
    for f in futs:
        assert f.cancelled() or isinstance(f.result(0), int)
