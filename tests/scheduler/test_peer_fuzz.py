"""The fuzz of the other sockets of the pool layer: a pool worker's
connection and a pool client's, each fed by a fake scheduler a seeded
stream of malformed messages with valid work interleaved (see
test_scheduler_fuzz.py for the generators and the rules)."""

import collections
import threading
import time

import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import schedproto as sp
from zmq_cluster.poolworker import PoolWorker
from zmq_cluster.taskcodec import decode_result, encode_result, encode_task

from test_scheduler_fuzz import (
    ABS_FUNC, ABS_KEY, MAX_RSS_GROWTH, MESSAGES, SEED, VALID_EVERY, WAIT_MS, Gen, _body_ok,
    _func_ok, _max_rss, _parses, _walks,
)

from rejection_log import rejections  # noqa: E402,F401 (a fixture)

pytestmark = pytest.mark.timeout(600)

VALID_BASE = 1 << 62


class PeerFuzz(Gen):
    """Messages from a scheduler, with what the receiver must make of them:
    (frames, outcome, task ids it must answer)."""

    def message(self, entry):
        rng = self.rng
        while True:
            how = rng.randrange(6)
            if how == 0:
                frames = self.random_frames()
            elif how in (1, 2):
                kind = sp.TASKS if entry is sp.TASK_ENTRY else sp.RESULTS
                count, table, data = self.table(entry, rng.randint(0, 4), 0)
                frames = [self.ctl(kind, count, rng.choice([0, 1])), table] + data
            elif how == 3:
                key = rng.getrandbits(64)
                frames = [self.ctl(sp.FUNC), self.body(
                    rng.choice([(key, "os", "system", None), (key, None, None, b"x"),
                                (key,), "func", None]))]
            elif how == 4:
                frames = [self.ctl(rng.choice([sp.STATS, sp.CONTROL])),
                          self.body(rng.choice([{"id": rng.randrange(1 << 40)}, [1], None]))]
            else:
                frames = [self.ctl(rng.choice(list(sp.TYPE_NAMES)))] + [
                    self.body(None)] * rng.randrange(2)
            parsed = _parses(frames)
            if parsed is None:
                return frames, "malformed", ()
            mtype, count, _ = parsed
            if mtype in (sp.STOP, sp.RESET):
                continue   # they would end the test's connection
            if mtype in (sp.WELCOME, sp.PROBE):
                return frames, "ignored", ()
            if len(frames) < 2:
                return frames, "malformed", ()
            if entry is sp.TASK_ENTRY:          # to a worker
                if mtype == sp.TASKS:
                    if not _walks(frames, count, sp.TASK_ENTRY):
                        return frames, "malformed", ()
                    ids = [f[0] for f, _ in sp.walk(frames[1], count, sp.TASK_ENTRY,
                                                    frames[2:])]
                    return frames, "answered", ids
                if mtype == sp.FUNC:
                    ok = _body_ok(frames[1], _func_ok)
                    return frames, "ignored" if ok else "malformed", ()
                return frames, "malformed", ()
            if mtype == sp.RESULTS:             # to a client
                if not _walks(frames, count, sp.RESULT_ENTRY):
                    return frames, "malformed", ()
                return frames, "unmatched", [f[0] for f, _ in sp.walk(
                    frames[1], count, sp.RESULT_ENTRY, frames[2:])]
            if mtype in (sp.STATS, sp.CONTROL):
                ok = _body_ok(frames[1], lambda b: type(b) is dict)
                return frames, "ignored" if ok else "malformed", ()
            return frames, "malformed", ()


def _router(ctx, address):
    r = ctx.socket(zmq.ROUTER)
    r.linger = 0
    r.sndhwm = r.rcvhwm = 0
    r.bind(address)
    return r


def _recv(sock, timeout=WAIT_MS):
    assert sock.poll(timeout), "nothing arrived within %d ms" % timeout
    return sock.recv_multipart()


# --------------------------------------------------------------- a worker


def test_pool_worker_survives_the_fuzz(ctx, ipc_url, rejections):
    address = ipc_url("fake-scheduler")
    router = _router(ctx, address)
    worker = PoolWorker(address, heartbeat_timeout=5.0)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    fuzz = PeerFuzz(SEED + 2)
    expected = collections.Counter()
    answers = collections.Counter()      # task id -> answers the worker owes
    valid = {}
    rss_before = _max_rss()
    try:
        rid, *hello = _recv(router)
        assert _parses(hello)[0] == sp.HELLO
        router.send_multipart([rid] + sp.message(sp.WELCOME, {"worker_no": 1}))
        router.send_multipart([rid] + ABS_FUNC)
        for i in range(MESSAGES):
            frames, outcome, ids = fuzz.message(sp.TASK_ENTRY)
            router.send_multipart([rid] + frames)
            expected[outcome] += 1
            for tid in ids:
                answers[tid] += 1
            if i % VALID_EVERY == 0:
                tid = VALID_BASE + i
                valid[tid] = -i
                answers[tid] += 1
                entry, data = sp.pack_entry(sp.TASK_ENTRY, (tid, ABS_KEY, 0),
                                            encode_task(sp.MODE_MAP, [-i], tid))
                router.send_multipart([rid, sp.ctl(sp.TASKS, 1, 1), entry] + list(data))
        got = collections.Counter()
        values = {}
        deadline = time.monotonic() + 120
        while sum(got.values()) < sum(answers.values()) and time.monotonic() < deadline:
            frames = _recv(router)[1:]
            mtype, count, _ = sp.parse_ctl(frames[0])
            if mtype != sp.RESULTS:
                continue
            for (tid, *_), msg in sp.walk(frames[1], count, sp.RESULT_ENTRY, frames[2:]):
                got[tid] += 1
                if tid in valid:
                    values[tid] = decode_result(msg, False)
        assert not router.poll(200) or sp.parse_ctl(router.recv_multipart()[1])[0] != \
            sp.RESULTS, "a result too many"
        assert thread.is_alive()
    finally:
        worker.stop()
        thread.join(10)
        router.close(0)
    assert got == answers
    for tid, x in valid.items():
        assert values[tid] == ([abs(x)], None)
    assert worker.counters["malformed"] == expected["malformed"]
    assert rejections["zmq_cluster.worker"] == expected["malformed"]
    assert _max_rss() - rss_before < MAX_RSS_GROWTH
    print("worker fuzz: %d messages %s; %d answers (%d valid tasks, right values), %d tasks"
          " refused unexecuted" % (MESSAGES, dict(expected), sum(got.values()), len(valid),
                                   worker.counters["tasks_refused"]))


# ---------------------------------------------------------------- a pool


def test_pool_client_survives_the_fuzz(ctx, ipc_url, rejections):
    address = ipc_url("fake-scheduler")
    router = _router(ctx, address)
    fuzz = PeerFuzz(SEED + 3)
    expected = collections.Counter()
    pool = None
    rss_before = _max_rss()
    result = {}

    def connect():
        result["pool"] = zc.ClusterPool(address, connect_timeout=10)

    t = threading.Thread(target=connect)
    t.start()
    try:
        rx, *hello = _recv(router)
        assert sp.parse_body(hello[1])["role"] == "client"
        router.send_multipart([rx] + sp.message(sp.WELCOME, {"client_no": 1, "workers": 1}))
        t.join(10)
        pool = result["pool"]
        futures = {}
        for i in range(MESSAGES):
            frames, outcome, ids = fuzz.message(sp.RESULT_ENTRY)
            router.send_multipart([rx] + frames)
            expected[outcome] += 1
            expected["unmatched_results"] += len(ids)
            if i % VALID_EVERY == 0:
                futures[i] = pool.submit(abs, -i)
        # The fake scheduler answers the valid tasks as they come.
        answered = 0
        deadline = time.monotonic() + 60
        while answered < len(futures) and time.monotonic() < deadline:
            sender, *frames = _recv(router)
            mtype, count, _ = sp.parse_ctl(frames[0])
            if mtype != sp.TASKS:
                continue
            entries, out = [], []
            for (tid, *_), msg in sp.walk(frames[1], count, sp.TASK_ENTRY, frames[2:]):
                _, _, (mode, items) = zc.framing.decode(msg)
                (args, kwargs), = items
                e, d = sp.pack_entry(sp.RESULT_ENTRY, (tid,),
                                     encode_result([abs(*args)], None, tid), (1, 0.0))
                entries.append(e)
                out.extend(d)
                answered += 1
            router.send_multipart([rx, sp.ctl(sp.RESULTS, len(entries), sp.FLAG_TRUSTED),
                                   b"".join(entries)] + out)
        for i, fut in futures.items():
            assert fut.result(30) == i
        client = pool._client
        assert client._thread.is_alive() and client.lost is None
    finally:
        if pool is not None:
            pool.terminate()
        t.join(10)
        router.close(0)
    assert client.counters["malformed"] == expected["malformed"]
    assert rejections["zmq_cluster.pool"] == expected["malformed"]
    assert client.unmatched_results == expected["unmatched_results"]
    assert _max_rss() - rss_before < MAX_RSS_GROWTH
    print("pool fuzz: %d messages %s; %d valid results delivered once" % (
        MESSAGES, dict(expected), len(futures)))
