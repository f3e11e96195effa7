"""The pickle rule through the scheduler: pickled functions, arguments and
results are loaded only on authenticated or local paths; from anyone else
they are refused unexecuted, with a logged reason and a counter.

``Scheduler(trusted=False)`` stands here for peers on the network without
CURVE (``--insecure``); tests/test_netns_cluster.py does the same with real
network peers. The malicious pickle creates a file when unpickled."""

import logging
import os
import pickle
import threading

import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import framing
from zmq_cluster import schedproto as sp
from zmq_cluster.functions import function_key
from zmq_cluster.poolworker import PoolWorker
from zmq_cluster.protocol import KIND_RESULT
from zmq_cluster.taskcodec import decode_result, encode_task

from scheduler_helpers import recv



class Evil:
    """Unpickling this calls open(path, "w"): it creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_evil_pickle_really_creates_a_file(tmp_path):
    target = tmp_path / "proof"
    frames = framing.encode([Evil(target)], KIND_RESULT, 1)
    framing.decode(frames, allow_pickle=True)   # what a trusting receiver would do
    assert target.exists()


@pytest.fixture
def untrusted(ipc_url):
    """A scheduler that trusts no peer, with one PoolWorker (in a thread)."""
    s = zc.Scheduler(ipc_url("untrusted"), trusted=False)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    w = PoolWorker(s.address, heartbeat_timeout=5.0)
    wt = threading.Thread(target=w.run, daemon=True)
    wt.start()
    yield s, w
    w.stop()
    s.stop()
    t.join(10)
    wt.join(10)
    assert not t.is_alive() and not wt.is_alive()


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings():
    handler = Records()
    logger = logging.getLogger("zmq_cluster")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_pickled_arguments_and_functions_from_untrusted_submitters_never_run(
        untrusted, tmp_path, warnings):
    scheduler, worker = untrusted
    target = tmp_path / "pwned"
    with zc.ClusterPool(scheduler.address) as pool:
        pool._client.stats(timeout=10, wait_workers=1)
        # A pickled argument: refused before anything runs.
        with pytest.raises(Exception, match="pickle"):
            pool.submit(abs, Evil(target)).result(10)
        assert not target.exists()
        # A function pickled by value (a lambda that would write the file).
        with pytest.raises(Exception, match="pickled functions run only for trusted"):
            pool.submit(lambda: open(str(target), "w")).result(10)
        assert not target.exists()
        # Functions by reference and native values still run.
        assert pool.map(abs, [-1, -2]) == [1, 2]
    assert worker.counters["pickle_refused"] == 2
    assert sum("refused task" in m and "pickle" in m for m in warnings) == 2


def test_a_malicious_function_blob_never_runs(untrusted, tmp_path, ctx):
    """A hand-made client whose FUNC blob is a malicious pickle."""
    scheduler, worker = untrusted
    target = tmp_path / "pwned-by-func"
    blob = (None, None, pickle.dumps(Evil(target)))
    key = function_key(blob)
    rx = ctx.socket(zmq.DEALER)
    rx.linger = 0
    rx.connect(scheduler.address)
    rx.send_multipart(sp.message(sp.HELLO, {"role": "client"}))
    (mtype, _, _), (body,) = recv(rx)
    no = sp.parse_body(body)["client_no"]
    tx = ctx.socket(zmq.DEALER)
    tx.linger = 0
    tx.connect(scheduler.address)
    tx.send_multipart(sp.message(sp.HELLO, {"role": "submit", "client_no": no}))
    tx.send_multipart([sp.ctl(sp.FUNC), sp.body((key,) + blob)])
    tid = (no << 40) | 1
    entry, data = sp.pack_entry(sp.TASK_ENTRY, (tid, key, 0), encode_task(0, [1], tid))
    tx.send_multipart([sp.ctl(sp.TASKS, 1), entry] + list(data))
    (mtype, count, flags), frames = recv(rx)
    assert mtype == sp.RESULTS and not flags & sp.FLAG_TRUSTED
    ((_, msg),) = sp.walk(frames[0], count, sp.RESULT_ENTRY, frames[1:])
    values, errors = decode_result(msg, False)
    assert values is None and "trusted submitters" in str(errors[0][1])
    assert not target.exists()
    assert worker.counters["pickle_refused"] == 1


def test_pickled_results_of_untrusted_workers_are_refused(ipc_url, ctx, tmp_path, warnings):
    """A hand-made worker the scheduler does not trust answers with a
    malicious pickle: the pool refuses it; the task fails saying why."""
    s = zc.Scheduler(ipc_url("evil-worker"), trusted=False)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    target = tmp_path / "pwned-by-result"
    w = ctx.socket(zmq.DEALER)
    w.linger = 0
    try:
        w.connect(s.address)
        w.send_multipart(sp.message(sp.HELLO, {"role": "worker", "host": "evil", "pid": 1,
                                               "credit": 4}))
        assert recv(w)[0][0] == sp.WELCOME
        with zc.ClusterPool(s.address, allow_pickle=None) as pool:
            fut = pool.submit(abs, -3)
            assert recv(w)[0][0] == sp.FUNC
            (mtype, count, _), frames = recv(w)
            ((fields, _),) = sp.walk(frames[0], count, sp.TASK_ENTRY, frames[1:])
            tid = fields[0]
            result = framing.encode(([Evil(target)], None), KIND_RESULT, tid)
            entry, data = sp.pack_entry(sp.RESULT_ENTRY, (tid,), result, (1, 0.0))
            w.send_multipart([sp.ctl(sp.RESULTS, 1, 2), entry] + list(data))
            with pytest.raises(Exception, match="pickle"):
                fut.result(10)
            assert pool._client.counters["pickle_refused"] == 1
        assert not target.exists()
        assert any("pool refused the result" in m for m in warnings)
    finally:
        w.close(0)
        s.stop()
        t.join(10)


def test_local_trusted_paths_still_carry_pickles(ipc_url):
    """The same pool features on a trusted (private ipc) scheduler."""
    with zc.LocalCluster(1) as cluster, zc.ClusterPool(cluster) as pool:
        assert pool.trusted
        assert pool.submit(lambda x: x + 1, 1).result(30) == 2
        assert pool.submit(len, {1, 2, 3}).result(30) == 3      # a set travels pickled
        assert os.getpid() not in {w["pid"] for w in pool.stats()}
