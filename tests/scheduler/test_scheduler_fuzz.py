"""A fuzz of every socket the pool layer listens on: the scheduler's ROUTER
(from an unregistered peer, a registered client and a registered worker),
a pool worker's connection and a pool client's, each fed a seeded stream of
malformed messages (random frames, truncated and mutated valid messages,
huge declared sizes and counts, unknown kinds and types, bodies of the
wrong form) with valid work interleaved.

Each must survive, keep its memory bounded, reject every malformed message
with a logged reason and a counter (the expected count is worked out for
each message beforehand from schedproto's parsers), answer where someone
waits, and do the valid work exactly once.

``ZMQ_CLUSTER_SCHED_FUZZ_MESSAGES`` sets the number of fuzz messages per
socket (default 10000, the issue's count; a few seconds),
``ZMQ_CLUSTER_FUZZ_SEED`` the seed.
"""

import collections
import os
import random
import resource
import struct
import threading
import time

import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import schedproto as sp
from zmq_cluster.functions import function_key
from zmq_cluster.poolworker import PoolWorker
from zmq_cluster.protocol import KIND_COMMAND, KIND_REQUEST
from zmq_cluster.taskcodec import encode_result, encode_task

MESSAGES = int(os.environ.get("ZMQ_CLUSTER_SCHED_FUZZ_MESSAGES", "10000"))
SEED = int(os.environ.get("ZMQ_CLUSTER_FUZZ_SEED", "20261125"))
#: Valid work: one task per this many fuzz messages.
VALID_EVERY = 10
MAX_RSS_GROWTH = 1 << 30
WAIT_MS = 10000
ABS_KEY = function_key(("builtins", "abs", None))
ABS_FUNC = [sp.ctl(sp.FUNC), sp.body((ABS_KEY, "builtins", "abs", None))]

from rejection_log import rejections  # noqa: E402,F401 (a fixture)

pytestmark = pytest.mark.timeout(600)


def _max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------ the messages

_EVIL_BODIES = [
    b"", b"\x00", b"ZC", struct.pack("<2sBBIQ", b"ZC", 2, KIND_COMMAND, 0xFFFFFFFF, 0) + b"N",
    struct.pack("<2sBBIQ", b"ZC", 2, KIND_COMMAND, 0, 0) + b"s" + struct.pack("<I", 0xFFFFFFFF),
    struct.pack("<2sBBIQ", b"ZC", 2, KIND_COMMAND, 0, 0) + b"l" + struct.pack("<I", 0xFFFFFFFF),
    struct.pack("<2sBBIQ", b"ZC", 2, KIND_COMMAND, 0, 0) + b"p" + struct.pack("<I", 4)
    + b"\x80\x05N.",                                          # a pickle in a control body
    struct.pack("<2sBBIQ", b"ZC", 2, KIND_REQUEST, 0, 0) + b"N",   # the wrong kind
]

#: HELLO bodies that must be refused.
_BAD_HELLOS = [
    None, 7, "worker", [1], {"role": 7}, {"role": "boss"}, {"role": "worker", "credit": 0},
    {"role": "worker", "credit": -5}, {"role": "worker", "credit": 1 << 70},
    {"role": "worker", "credit": 1.5}, {"role": "worker", "credit": float("nan")},
    {"role": "worker", "credit": float("inf")}, {"role": "worker", "pid": "x"},
    {"role": "worker", "host": 5}, {"role": "worker", "credit_bytes": 0},
    {"role": "worker", "uptime": float("inf")}, {"role": "worker", "uptime": -1},
    {"role": "submit", "client_no": 99999}, {"role": "submit", "client_no": [1]},
    {"role": "client", "pid": 1 << 80},
]


class Gen:
    """Seeded malformed messages (lists of bytes frames, as a DEALER sends)."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def ctl(self, mtype, count=0, flags=0):
        rng = self.rng
        how = rng.randrange(8)
        if how == 0:
            return rng.randbytes(rng.choice([0, 1, 11, 13, 20]))
        if how == 1:
            return sp.CTL.pack(rng.choice([b"ZT", b"\0\0", b"zs"]), 1, mtype, count, flags)
        if how == 2:
            return sp.CTL.pack(b"ZS", rng.choice([0, 2, 255]), mtype, count, flags)
        if how == 3:
            return sp.CTL.pack(b"ZS", 1, rng.choice([0, 14, 99, 255]), count, flags)
        return sp.CTL.pack(b"ZS", 1, mtype, count, flags)

    def body(self, obj):
        rng = self.rng
        if rng.random() < 0.3:
            return rng.choice(_EVIL_BODIES)
        raw = bytearray(sp.body(obj))
        if rng.random() < 0.5 and len(raw) > 16:
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(16, len(raw))] = rng.randrange(256)
        elif rng.random() < 0.5:
            raw = raw[:rng.randrange(len(raw))]
        return bytes(raw)

    def table(self, entry, count_ok, n_data):
        """A batch table of ``count_ok`` entries, then mutated: the
        message's (count, table, data frames)."""
        rng = self.rng
        entries, data = [], []
        for i in range(count_ok):
            tid = rng.getrandbits(64)
            if entry is sp.TASK_ENTRY:
                msg = encode_task(0, [i], tid)
                head = (tid, rng.choice([ABS_KEY, rng.getrandbits(64)]), 0)
                tail = ()
            else:
                msg = encode_result([i], None, tid)
                head = (tid,)
                tail = (1, rng.choice([0.001, float("nan"), -1.0, 1e300]))
            e, d = sp.pack_entry(entry, head, [bytes(memoryview(f).cast("B")) for f in msg],
                                 tail)
            entries.append(e)
            data.extend(d)
        table = bytearray(b"".join(entries))
        count = count_ok
        how = rng.randrange(9)
        if how == 0 and table:
            table = table[:rng.randrange(len(table))]
        elif how == 1 and table:
            for _ in range(rng.randint(1, 4)):
                table[rng.randrange(len(table))] = rng.randrange(256)
        elif how == 2:
            count = rng.choice([count + 1, 0xFFFFFFFF, max(0, count - 1)])
        elif how == 3 and len(table) >= entry.size:
            at = entry.size - 8 if entry is sp.TASK_ENTRY else 8   # inline_len
            table[at:at + 4] = struct.pack("<I", 0xFFFFFFFF)
        elif how == 4 and len(table) >= entry.size:
            at = entry.size - 4 if entry is sp.TASK_ENTRY else 12  # n_frames
            table[at:at + 4] = struct.pack("<I", rng.choice([0xFFFFFFFF, 7]))
        elif how == 5:
            data.append(rng.randbytes(rng.randrange(8)))
        elif how == 6 and data:
            data.pop()
        elif how == 7:
            table += rng.randbytes(rng.randint(1, 30))
        return count, bytes(table), data

    def random_frames(self):
        rng = self.rng
        return [rng.randbytes(rng.randrange(40)) for _ in range(rng.randint(0, 4))] or [b""]


def _parses(frames):
    """(type, count, flags) if the control frame parses, else None."""
    try:
        return sp.parse_ctl(frames[0])
    except sp.ProtocolError:
        return None


def _walks(frames, count, entry):
    try:
        sp.walk(frames[1], count, entry, frames[2:])
        return True
    except sp.ProtocolError:
        return False


def _body_ok(frame, check):
    try:
        return check(sp.parse_body(frame))
    except sp.ProtocolError:
        return False


def _func_ok(body):
    if type(body) is not tuple or len(body) != 4:
        return False
    key, module, qualname, pickled = body
    return (type(key) is int and (module is None or type(module) is str)
            and (qualname is None or type(qualname) is str)
            and (pickled is None or type(pickled) is bytes)
            and key == function_key((module, qualname, pickled)))


# ---------------------------------------------------------- the scheduler


class SchedulerFuzz(Gen):
    """Messages for the scheduler from three roles, with the oracle."""

    def anon(self):
        """From an unregistered peer: malformed, or unknown (RESET). Its
        HELLOs are all invalid, so it never registers."""
        rng = self.rng
        how = rng.randrange(4)
        if how == 0:
            frames = self.random_frames()
        elif how == 1:
            frames = [sp.ctl(sp.HELLO), sp.body(rng.choice(_BAD_HELLOS))]
        elif how == 2:
            frames = [sp.ctl(sp.HELLO), rng.choice(_EVIL_BODIES)]
        else:
            mtype = rng.choice([t for t in sp.TYPE_NAMES if t != sp.HELLO])
            frames = [self.ctl(mtype), self.body(None)] + [rng.randbytes(5)] * rng.randrange(2)
        parsed = _parses(frames) if len(frames) >= 2 else None
        if parsed is None or parsed[0] == sp.HELLO:
            return frames, "malformed"
        return frames, "unknown"

    def client(self):
        """From a registered client's submit connection (never a valid
        SHUTDOWN, BYE, HELLO, CANCEL or STATS, which would change the test)."""
        rng = self.rng
        while True:
            how = rng.randrange(6)
            if how == 0:
                frames = self.random_frames()
            elif how in (1, 2):
                count, table, data = self.table(sp.TASK_ENTRY, rng.randint(0, 4), 0)
                frames = [self.ctl(sp.TASKS, count), table] + data
            elif how == 3:
                frames = [self.ctl(sp.FUNC), self.body((ABS_KEY, "builtins", "abs", None))]
            elif how == 4:
                frames = [self.ctl(sp.CONTROL), self.body({"op": rng.choice(
                    ["stpo", "", None, 5, "restart"]), "id": 1})]
            else:
                frames = [self.ctl(rng.choice([sp.WELCOME, sp.STOP, sp.RESET, sp.PROBE,
                                               sp.RESULTS])), self.body(None)]
            parsed = _parses(frames) if len(frames) >= 2 else None
            if parsed is None:
                return frames, "malformed"
            mtype, count, _ = parsed
            if mtype in (sp.SHUTDOWN, sp.BYE, sp.HELLO, sp.CANCEL, sp.STATS):
                continue
            if mtype == sp.TASKS:
                return frames, "other" if _walks(frames, count, sp.TASK_ENTRY) else "malformed"
            if mtype == sp.FUNC:
                return frames, "other" if _body_ok(frames[1], _func_ok) else "malformed"
            if mtype == sp.CONTROL:
                ok = _body_ok(frames[1], lambda b: type(b) is dict
                              and b.get("op") in sp.CONTROL_OPS)
                if ok:
                    continue
                return frames, "malformed"
            if mtype == sp.LEASE:  # a client may ask for a lease
                ok = _body_ok(frames[1], lambda b: type(b) is dict and (
                    b.get("id") is None or type(b.get("id")) is int))
                return frames, "other" if ok else "malformed"
            return frames, "malformed"   # a type a client may not send

    def worker(self):
        """From a registered worker (after its HELLO)."""
        rng = self.rng
        while True:
            how = rng.randrange(4)
            if how == 0:
                frames = self.random_frames()
            elif how in (1, 2):
                count, table, data = self.table(sp.RESULT_ENTRY, rng.randint(0, 4), 0)
                frames = [self.ctl(sp.RESULTS, count, rng.choice([0, 3, 1 << 31])),
                          table] + data
            else:
                frames = [self.ctl(rng.choice(list(sp.TYPE_NAMES))), self.body(None)]
            parsed = _parses(frames) if len(frames) >= 2 else None
            if parsed is None:
                return frames, "malformed"
            mtype, count, _ = parsed
            if mtype in (sp.HELLO, sp.BYE, sp.STATS):
                continue
            if mtype == sp.RESULTS:
                return frames, "other" if _walks(frames, count, sp.RESULT_ENTRY) else "malformed"
            return frames, "malformed"


def _dealer(ctx, address):
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.sndhwm = s.rcvhwm = 0
    s.connect(address)
    return s


def _drain(sock):
    while sock.poll(0):
        sock.recv_multipart()


def _sync(sock, expect_type, send, timeout=WAIT_MS):
    """Send ``send`` and wait for a reply of ``expect_type`` (the scheduler
    has then handled everything sent before on this connection)."""
    sock.send_multipart(send)
    deadline = time.monotonic() + timeout / 1000
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and sock.poll(int(left * 1000) + 1), "no %s" % sp.TYPE_NAMES[expect_type]
        frames = sock.recv_multipart()
        if _parses(frames) and _parses(frames)[0] == expect_type:
            return frames


def _sync_peer(sock):
    """Register ``sock`` as a client and leave: once WELCOME is back, the
    scheduler has handled everything sent before on this connection."""
    sock.send_multipart(sp.message(sp.HELLO, {"role": "client"}))
    _recv_welcome(sock)
    sock.send_multipart(sp.message(sp.BYE))


def test_scheduler_survives_the_fuzz(ctx, ipc_url, rejections):
    s = zc.Scheduler(ipc_url("fuzz"), heartbeat_timeout=5.0)
    thread = threading.Thread(target=s.run, daemon=True)
    thread.start()
    worker = PoolWorker(s.address, heartbeat_timeout=5.0)
    wthread = threading.Thread(target=worker.run, daemon=True)
    wthread.start()
    fuzz = SchedulerFuzz(SEED)
    anon = _dealer(ctx, s.address)
    rx, tx = _dealer(ctx, s.address), _dealer(ctx, s.address)
    fake = _dealer(ctx, s.address)
    expected = collections.Counter()
    sent = collections.Counter()
    valid = 0
    rss_before = _max_rss()
    try:
        rx.send_multipart(sp.message(sp.HELLO, {"role": "client"}))
        no = sp.parse_body(_recv_welcome(rx))["client_no"]
        tx.send_multipart(sp.message(sp.HELLO, {"role": "submit", "client_no": no}))
        tx.send_multipart(ABS_FUNC)
        with zc.ClusterPool(s.address) as pool:
            pool._client.stats(timeout=10, wait_workers=1)
            done = 0
            while done < MESSAGES:
                # Valid work in flight while an unregistered peer and a
                # registered client send theirs...
                burst = min(200, MESSAGES - done)
                futures = {}
                for j in range(burst * 2 // 3):
                    role = fuzz.rng.choice(["anon", "client"])
                    frames, outcome = getattr(fuzz, role)()
                    (anon if role == "anon" else tx).send_multipart(frames)
                    expected[outcome] += 1
                    sent[role] += 1
                    if j % VALID_EVERY == 0:
                        valid += 1
                        futures[valid] = pool.submit(abs, -valid)
                for n, fut in futures.items():
                    assert fut.result(30) == n
                # ... then a registered worker sends its (each after a fresh
                # HELLO: a malformed message ends its registration), while
                # no valid task is queued that it could take and sit on.
                for _ in range(burst - burst * 2 // 3):
                    fake.send_multipart(sp.message(sp.HELLO, {
                        "role": "worker", "host": "fuzz", "pid": 1, "credit": 1}))
                    frames, outcome = fuzz.worker()
                    fake.send_multipart(frames)
                    expected[outcome] += 1
                    sent["worker"] += 1
                fake.send_multipart(sp.message(sp.BYE))
                if outcome == "malformed":  # it was dropped: the BYE is a stranger's
                    expected["unknown"] += 1
                _sync_peer(fake)
                _drain(fake)
                done += burst
            _sync_peer(anon)
            tx.send_multipart(sp.message(sp.STATS, {"id": 77}))
            _await_stats(rx, 77)
            assert pool.map(abs, range(-50, 0)) == list(range(50, 0, -1))
            reply = pool._client.stats(timeout=10)
        assert thread.is_alive()
    finally:
        for sock in (anon, rx, tx, fake):
            sock.close(0)
        worker.stop()
        s.stop()
        thread.join(10)
        wthread.join(10)
    counters = reply["counters"]
    assert (counters["malformed"], counters["unknown_peer"]) == (
        expected["malformed"], expected["unknown"]), (counters, expected)
    assert rejections["zmq_cluster.scheduler"] == expected["malformed"]
    assert _max_rss() - rss_before < MAX_RSS_GROWTH
    print("scheduler fuzz: %d messages %s, %d valid tasks done once, 50 more after;"
          " malformed %d (expected %d), from unknown peers %d, bad task ids %d, late results"
          " %d, workers kicked %d" % (
              sum(sent.values()), dict(sent), valid, counters["malformed"],
              expected["malformed"], counters["unknown_peer"],
              counters.get("bad_task_id", 0), counters.get("late_results", 0),
              counters.get("worker gone: sent a malformed message", 0)))


def _recv_welcome(sock):
    """The next WELCOME to a client (a worker's WELCOMEs, which the fuzz
    worker gets by the hundred, are passed over)."""
    while True:
        assert sock.poll(WAIT_MS)
        frames = sock.recv_multipart()
        if _parses(frames)[0] == sp.WELCOME and "client_no" in sp.parse_body(frames[1]):
            return frames[1]


def _await_stats(rx, rid):
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        assert rx.poll(WAIT_MS)
        frames = rx.recv_multipart()
        if _parses(frames)[0] == sp.STATS and sp.parse_body(frames[1]).get("id") == rid:
            return
    pytest.fail("no STATS reply")
