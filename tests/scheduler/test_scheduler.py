"""The scheduler against hand-made peers speaking its protocol: credit,
ledger, re-dispatch, dropped late results, rejections; and a standalone
scheduler with run_worker processes under a ClusterPool."""

import sys
import threading
import time

import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import schedproto as sp
from zmq_cluster.functions import function_key
from zmq_cluster.process import spawn
from zmq_cluster.taskcodec import decode_result, encode_result, encode_task

from scheduler_helpers import nothing, recv

WAIT_MS = 5000
KEY = function_key(("builtins", "abs", None))


@pytest.fixture
def scheduler(ipc_url):
    s = zc.Scheduler(ipc_url("sched"), heartbeat_timeout=1.0)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    yield s
    s.stop()
    t.join(10)
    assert not t.is_alive()


def worker(ctx, scheduler, credit=2):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(scheduler.address)
    sock.send_multipart(sp.message(sp.HELLO, {"role": "worker", "host": "h", "pid": 1,
                                              "credit": credit}))
    (mtype, _, _), _ = recv(sock)
    assert mtype == sp.WELCOME
    return sock


def client(ctx, scheduler):
    rx = ctx.socket(zmq.DEALER)
    rx.linger = 0
    rx.connect(scheduler.address)
    rx.send_multipart(sp.message(sp.HELLO, {"role": "client"}))
    (mtype, _, _), (body,) = recv(rx)
    assert mtype == sp.WELCOME
    no = sp.parse_body(body)["client_no"]
    tx = ctx.socket(zmq.DEALER)
    tx.linger = 0
    tx.connect(scheduler.address)
    tx.send_multipart(sp.message(sp.HELLO, {"role": "submit", "client_no": no}))
    tx.send_multipart([sp.ctl(sp.FUNC), sp.body((KEY, "builtins", "abs", None))])
    return rx, tx, no


def send_tasks(tx, no, values):
    entries, frames, ids = [], [], []
    for v in values:
        tid = (no << 40) | (v + 1)
        entry, data = sp.pack_entry(sp.TASK_ENTRY, (tid, KEY, 0), encode_task(0, [v], tid))
        entries.append(entry)
        frames.extend(data)
        ids.append(tid)
    tx.send_multipart([sp.ctl(sp.TASKS, len(entries)), b"".join(entries)] + frames)
    return ids


def task_ids(frames, count):
    return [f[0] for f, _ in sp.walk(frames[0], count, sp.TASK_ENTRY, frames[1:])]


def send_results(sock, ids, credit=2):
    entries = []
    for tid in ids:
        entry, _ = sp.pack_entry(sp.RESULT_ENTRY, (tid,), encode_result([tid], None, tid),
                                 (1, 0.001))
        entries.append(entry)
    sock.send_multipart([sp.ctl(sp.RESULTS, len(entries), credit), b"".join(entries)])


def result_ids(rx):
    (mtype, count, _), frames = recv(rx)
    assert mtype == sp.RESULTS
    out = []
    for (tid, *_), msg in sp.walk(frames[0], count, sp.RESULT_ENTRY, frames[1:]):
        values, errors = decode_result(msg, True)
        assert values == [tid] and errors is None
        out.append(tid)
    return out


def test_credit_bounds_what_a_worker_holds(ctx, scheduler):
    w = worker(ctx, scheduler, credit=2)
    rx, tx, no = client(ctx, scheduler)
    ids = send_tasks(tx, no, range(5))
    (mtype, _, _), _ = recv(w)
    assert mtype == sp.FUNC                   # the function first, once
    (mtype, count, flags), frames = recv(w)
    assert mtype == sp.TASKS and count == 2 and flags & sp.FLAG_TRUSTED
    assert task_ids(frames, count) == ids[:2]
    assert nothing(w)                         # credit 2: no more
    send_results(w, ids[:1])
    assert result_ids(rx) == ids[:1]
    (mtype, count, _), frames = recv(w)
    assert mtype == sp.TASKS and task_ids(frames, count) == ids[2:3]


def test_dead_worker_tasks_go_elsewhere_and_its_late_results_are_dropped(ctx, scheduler):
    a = worker(ctx, scheduler, credit=8)
    rx, tx, no = client(ctx, scheduler)
    ids = send_tasks(tx, no, range(5))
    recv(a)                                   # FUNC
    (_, count, _), frames = recv(a)
    assert task_ids(frames, count) == ids
    b = worker(ctx, scheduler, credit=8)
    assert nothing(b, 100)                    # all five are a's
    a.close(0)                                # a's connection drops
    recv(b)                                   # FUNC
    (_, count, _), frames = recv(b)
    assert task_ids(frames, count) == ids     # re-dispatched in order
    a2 = ctx.socket(zmq.DEALER)               # a, back on a new connection
    a2.linger = 0
    a2.connect(scheduler.address)
    send_results(a2, ids)
    (mtype, _, _), _ = recv(a2)
    assert mtype == sp.RESET                  # unknown: say HELLO again
    send_results(b, ids[:2])
    assert result_ids(rx) == ids[:2]          # only b's results reach the client
    assert nothing(rx)
    assert scheduler.counters["unknown_peer"] >= 1
    assert scheduler.counters["redispatched"] == 5


def test_result_from_a_worker_not_holding_the_task_is_dropped(ctx, scheduler):
    a = worker(ctx, scheduler, credit=4)
    rx, tx, no = client(ctx, scheduler)
    ids = send_tasks(tx, no, range(1))
    recv(a)
    recv(a)
    b = worker(ctx, scheduler, credit=4)
    send_results(b, ids)                      # b never held it
    assert nothing(rx)
    send_results(a, ids)
    assert result_ids(rx) == ids
    send_results(a, ids)                      # a duplicate
    assert nothing(rx)
    assert scheduler.counters["late_results"] == 2


def test_bad_messages_are_counted_and_service_goes_on(ctx, scheduler):
    rx, tx, no = client(ctx, scheduler)
    tx.send_multipart([b"junk", b"more", b"x"])
    tx.send_multipart([sp.ctl(sp.TASKS, 5), b"short"])
    other = (no + 1) << 40 | 1
    entry, data = sp.pack_entry(sp.TASK_ENTRY, (other, KEY, 0), encode_task(0, [1], other))
    tx.send_multipart([sp.ctl(sp.TASKS, 1), entry])   # another client's task id
    w = worker(ctx, scheduler, credit=2)
    ids = send_tasks(tx, no, [7])
    recv(w)
    (_, count, _), frames = recv(w)
    assert task_ids(frames, count) == ids
    assert scheduler.counters["malformed"] == 2
    assert scheduler.counters["bad_task_id"] == 1


def test_function_key_must_match_its_blob(ctx, scheduler):
    rx, tx, no = client(ctx, scheduler)
    forged = function_key(("os", "system", None))
    tx.send_multipart([sp.ctl(sp.FUNC), sp.body((forged, "builtins", "abs", None))])
    tid = (no << 40) | 1
    entry, data = sp.pack_entry(sp.TASK_ENTRY, (tid, forged, 0), encode_task(0, [1], tid))
    tx.send_multipart([sp.ctl(sp.TASKS, 1), entry])
    (mtype, count, _), frames = recv(rx)      # failed: the forged FUNC was refused
    ((_, msg),) = sp.walk(frames[0], 1, sp.RESULT_ENTRY, [])
    values, errors = decode_result(msg, True)
    assert values is None and "no function" in str(errors[0][1])
    assert scheduler.counters["malformed"] == 1


def test_unknown_function_fails_the_task(ctx, scheduler):
    rx, tx, no = client(ctx, scheduler)
    tid = (no << 40) | 1
    entry, data = sp.pack_entry(sp.TASK_ENTRY, (tid, 999, 0), encode_task(0, [1], tid))
    tx.send_multipart([sp.ctl(sp.TASKS, 1), entry])
    (mtype, count, _), frames = recv(rx)
    ((_, msg),) = sp.walk(frames[0], 1, sp.RESULT_ENTRY, [])
    values, errors = decode_result(msg, True)
    assert values is None and errors[0][0] == -1 and "no function" in str(errors[0][1])


def test_untrusted_scheduler_flags_tasks_untrusted(ctx, ipc_url):
    s = zc.Scheduler(ipc_url("untrusted"), trusted=False)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    try:
        w = worker(ctx, s)
        rx, tx, no = client(ctx, s)
        send_tasks(tx, no, [1])
        recv(w)
        (_, _, flags), _ = recv(w)
        assert not flags & sp.FLAG_TRUSTED
    finally:
        s.stop()
        t.join(10)


def square(x):
    return x * x


def test_standalone_scheduler_with_run_worker_processes(ipc_url):
    s = zc.Scheduler(ipc_url("standalone"), heartbeat_timeout=2.0)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    code = "import sys, zmq_cluster as zc; zc.run_worker(sys.argv[1])"
    procs = [spawn([sys.executable, "-c", code, s.address]) for _ in range(2)]
    try:
        with zc.ClusterPool(s.address) as pool:
            pool._client.stats(timeout=30, wait_workers=2)
            assert pool.map(square, range(100), chunksize=3) == [x * x for x in range(100)]
            assert {w["pid"] for w in pool.stats()} == {p.pid for p in procs}
            pool._client.send_shutdown()
        t.join(10)
        if t.is_alive():
            import traceback
            frame = sys._current_frames()[t.ident]
            stack = "".join(traceback.format_stack(frame))
            pytest.fail("the scheduler did not stop: %s workers=%d stopping=%r\n%s" % (
                dict(s.counters), len(s.ledger.workers), s._stopping, stack))
        codes = [p.wait(10) for p in procs]
        assert codes == [0, 0], "workers exited with %s" % codes
    finally:
        s.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdin.close()


def test_bye_on_the_submit_connection_ends_the_client(ctx, scheduler):
    """A client's two connections are not ordered with each other, so it says
    BYE on the one that carried its last messages (SHUTDOWN, CANCEL)."""
    rx, tx, no = client(ctx, scheduler)
    tx.send_multipart(sp.message(sp.BYE))
    send_tasks(tx, no, [1])                       # after BYE: from nobody
    (mtype, _, _), _ = recv(tx)
    assert mtype == sp.RESET
    rx.send_multipart(sp.message(sp.STATS, {"id": 1}))
    (mtype, _, _), _ = recv(rx)
    assert mtype == sp.RESET                      # the result connection went too
    assert scheduler.counters["client gone: said BYE"] == 1


def test_shutdown_sent_just_before_a_client_closes_is_honoured(ctx, scheduler):
    """A client sends SHUTDOWN and BYE on its submit connection, then closes
    both connections: the result connection's close may reach the scheduler
    first. The client is gone then, but what it said on the submit
    connection still counts (nothing dropped); anything else it sends there
    is refused with RESET."""
    rx, tx, no = client(ctx, scheduler)
    deadline = time.monotonic() + WAIT_MS / 1000
    while "submit" not in [role for role, _ in list(scheduler._peers.values())]:
        assert time.monotonic() < deadline, "the submit connection never said HELLO"
        time.sleep(0.01)
    rx.close(0)
    while scheduler.counters["client gone: disconnected"] < 1:
        assert time.monotonic() < deadline, "the scheduler never saw the close"
        time.sleep(0.01)
    send_tasks(tx, no, [1])                       # nobody to answer: refused
    (mtype, _, _), _ = recv(tx)
    assert mtype == sp.RESET
    assert scheduler.counters["from a gone client"] == 1, dict(scheduler.counters)
    tx.send_multipart(sp.message(sp.SHUTDOWN))
    tx.send_multipart(sp.message(sp.BYE))
    deadline = time.monotonic() + WAIT_MS / 1000
    while scheduler._stopping is None:
        assert time.monotonic() < deadline, "SHUTDOWN was not honoured"
        time.sleep(0.01)
    assert scheduler.counters["unknown_peer"] == 0


def test_a_peers_last_messages_are_handled_before_its_disconnection(ctx, ipc_url):
    """A client sends SHUTDOWN on its submit connection and closes it: the
    message is in the router before libzmq reports the close, but the loop
    reads connection events first. The scheduler handles what the router
    holds before it drops the peer, so the SHUTDOWN is honoured, not
    refused as from an unknown peer. (Driven by hand, in this order.)"""
    s = zc.Scheduler(ipc_url("settle"), heartbeat_timeout=5.0)
    rx = tx = None

    def handle_next():
        assert s._router.poll(WAIT_MS)
        frames = s._router.recv_multipart(copy=False)
        s._handle([frames[0].bytes] + frames[1:])  # (as the loop's recv_any gives them)

    try:
        rx, tx = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for sock, hello in ((rx, {"role": "client"}), (tx, None)):
            sock.linger = 1000
            sock.connect(s.address)
            if hello is not None:
                sock.send_multipart(sp.message(sp.HELLO, hello))
                handle_next()
                (mtype, _, _), (body,) = recv(rx)
                no = sp.parse_body(body)["client_no"]
        tx.send_multipart(sp.message(sp.HELLO, {"role": "submit", "client_no": no}))
        handle_next()
        tx.send_multipart(sp.message(sp.SHUTDOWN))
        tx.close()
        tx = None
        # Both are waiting: the SHUTDOWN in the router, the close in the monitor.
        assert s._monitor.poll(WAIT_MS) and s._router.poll(WAIT_MS)
        s._monitor_event(s._monitor.recv_multipart())
        assert s._stopping is not None, dict(s.counters)  # the SHUTDOWN was honoured
        assert s.counters["unknown_peer"] == 0
        assert s.counters["submit gone: disconnected"] == 1
    finally:
        for sock in (rx, tx):
            if sock is not None:
                sock.close(0)
        s.close()


def test_a_worker_that_says_hello_again_costs_its_task_no_death(ctx, scheduler):
    """A worker that says HELLO again has dropped what it held, alive: the
    task goes back to the queue without a death, so three such HELLOs do not
    fail it as one that killed three workers."""
    w = worker(ctx, scheduler, credit=1)
    rx, tx, no = client(ctx, scheduler)
    [tid] = send_tasks(tx, no, [7])
    for _ in range(4):
        while True:
            (mtype, count, _), frames = recv(w)
            if mtype == sp.TASKS:
                break
        assert task_ids(frames, count) == [tid]
        w.send_multipart(sp.message(sp.HELLO, {"role": "worker", "host": "h", "pid": 1,
                                               "credit": 1}))
    while True:
        (mtype, count, _), frames = recv(w)
        if mtype == sp.TASKS:
            break
    send_results(w, [tid])
    assert result_ids(rx) == [tid]          # its result, not "died 3 times"
    assert scheduler.counters["worker gone: said HELLO again"] == 4
    w.close(0)
    rx.close(0)
    tx.close(0)


@pytest.mark.parametrize("bad", ["foo", "tcp://127.0.0.1:70000", "tcp://x", "udp://1.2.3.4:5"])
def test_a_bad_address_is_a_clear_error_from_python(bad):
    """Not a ZMQError traceback, and not port 70000 taken as 4464."""
    with pytest.raises(ValueError, match="listen must be"):
        zc.Scheduler(bad)
    with pytest.raises(ValueError, match="address must be"):
        zc.ClusterPool(bad, connect_timeout=1)
