"""A node-level fuzz: a worker and a sink, each fed a seeded stream of
malformed messages (random frames, truncated and mutated valid messages,
huge declared sizes, unknown kinds, evil dtypes, evil commands) with valid
work interleaved.

Each node must survive, keep its memory bounded, reject every malformed
message with a logged reason and count it, answer every message whose task
id was readable (the worker with a result, the sink by reporting it to its
caller), and do the valid work exactly once. What a node must do with each
message is worked out beforehand with the pure-Python decoder (the
reference), so a disagreement between the twins fails here too.

The nodes run on the wire twin this process selected; the suite runs once
per twin (README). ``ZMQ_CLUSTER_FUZZ_MESSAGES`` sets the number of fuzz
messages per node (default 3000; the issue's full run is 14000), and
``ZMQ_CLUSTER_FUZZ_SEED`` the seed.
"""

import collections
import logging
import os
import random
import resource
import struct
import threading
import time

import numpy as np
import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster import _framing_py
from zmq_cluster._wire_common import peek_header
from zmq_cluster.exceptions import MessageFormatError
from zmq_cluster.protocol import HEADER, KIND_COMMAND, KIND_REQUEST, KIND_RESULT

from helpers import WAIT_MS

MESSAGES = int(os.environ.get("ZMQ_CLUSTER_FUZZ_MESSAGES", "3000"))
SEED = int(os.environ.get("ZMQ_CLUSTER_FUZZ_SEED", "20261125"))
#: One valid task per this many fuzz messages.
VALID_EVERY = 10
#: A fuzz message goes to the command channel with this probability.
COMMAND_SHARE = 0.08
#: Bound on the growth of the process's peak memory during one fuzz.
MAX_RSS_GROWTH = 1 << 30
#: Task ids of valid work start here (fuzz task ids are below).
VALID_IDS = 1 << 48

pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------ the messages

def _u32(n):
    return struct.pack("<I", n)


def _s(text):
    raw = text.encode()
    return b"s" + _u32(len(raw)) + raw


def _shape(*dims, order=b"C"):
    return struct.pack("<B%dQ" % len(dims), len(dims), *dims) + order


def _nested(depth, leaf=0):
    obj = leaf
    for _ in range(depth):
        obj = [obj]
    return obj


def _values():
    """Payloads whose encodings the mutations start from."""
    return [
        0, -1, 2 ** 70, 1.5, 1 + 2j, "text", "ü" * 9, b"bytes", None, True, (1, "two"),
        [1, [2, [3]]], {"k": [1, 2], 3: None}, np.arange(5.0),
        np.ones((3, 4), np.int16, order="F"), np.zeros(600),            # 4800 bytes: a frame
        np.arange(70000, dtype=np.uint8),                                # zero-copy size
        np.float32(3.5), np.datetime64("2020-01-01", "s"),
        np.zeros(3, [("a", "<i4"), ("b", "S3")]), np.array(["ab", "c"]), _nested(40),
    ]


def _evil_bodies():
    """Header bodies a hostile peer might write (the values after the
    16-byte fixed header), each with its buffer frames."""
    f8 = _s("<f8")
    return [
        (b"s" + _u32(0xFFFFFFFF), []),                     # lengths far beyond the frame
        (b"b" + _u32(0x7FFFFFFF) + b"x", []),
        (b"l" + _u32(0xFFFFFFFF), []),
        (b"m" + _u32(0xFFFFFFFF), []),
        (b"I" + _u32(0xFFFFFFFF), []),
        (b"A" + f8 + _shape(1 << 40), []),                 # 8 TiB declared, nothing there
        (b"A" + f8 + _shape(1 << 32, 1 << 32), []),        # the byte count overflows
        (b"A" + f8 + _shape(0xFFFFFFFFFFFFFFFF), []),
        (b"a" + _u32(0) + f8 + _shape(1 << 40), [bytes(8)]),
        (b"a" + _u32(0) + f8 + _shape(1 << 61), [bytes(8)]),
        (b"A" + _s("|S0") + _shape(1 << 40), []),          # zero itemsize, huge shape
        (b"A" + _s("|S0") + _shape(16), []),               # ... would show heap memory
        (b"A" + _s("<U0") + _shape(16), []),
        (b"A" + _s("|S") + _shape(1 << 33), []),
        (b"a" + _u32(0) + _s("|S0") + _shape(1 << 40), [b""]),
        (b"g" + _s("|S0") + _u32(0), []),
        (b"g" + _s("M8[s/0]") + _u32(8) + bytes(8), []),   # a zero divisor: SIGFPE in numpy
        (b"A" + _s("m8[7s/0]") + _shape(1) + bytes(8), []),
        (b"A" + b"l" + _u32(1) + b"t" + _u32(2) + _s("x") + _s("M8[s/0]") + _shape(1)
         + bytes(8), []),                                  # ... inside a structured dtype
        (b"A" + b"I" + _u32(1800) + b"\x07" * 1800 + _shape(1) + bytes(8), []),  # 4300 digits
        (b"A" + b"i" + struct.pack("<q", 10 ** 18) + _shape(1) + bytes(8), []),
        (b"A" + _s("O") + _shape(1) + bytes(8), []),       # Python objects
        (b"A" + _s("<f8") + _shape(1, order=b"X") + bytes(8), []),
        (b"A" + _s("<f8") + bytes([255]) + bytes(8 * 255) + b"C", []),
        (b"A" + b"p" + _u32(5) + b"\x80\x05N." + _u32(0) + _shape(1) + bytes(8), []),
        (b"p" + _u32(4) + b"\x80\x05N." + _u32(0), []),    # pickle, refused here
        (b"m" + _u32(1) + b"l" + _u32(0) + b"N", []),      # an unhashable key
        (b"s" + _u32(2) + b"\xff\xfe", []),                # not UTF-8
        (b"Z", []),
        (b"R" + b"i" + bytes(8), []),                      # a request without metadata
        (b"l" + _u32(1) + b"l" + _u32(1), []),
        ((b"l" + _u32(1)) * 257 + b"N", []),               # nested deeper than 256
        ((b"l" + _u32(1)) * 256 + b"N", []),               # 256: accepted, echoed one deeper
        (b"N", [b"unreferenced"]),
        (b"N", []),
    ]


def _header(kind, task_id, nframes):
    return HEADER.pack(b"ZC", 2, kind, nframes, task_id)


class Fuzz:
    """A seeded source of malformed and odd messages for one channel."""

    def __init__(self, seed, kind):
        self.rng = random.Random(seed)
        self.kind = kind
        self.next_id = 1
        self.corpus = [self._wrap(v) for v in _values()]
        self.evil = _evil_bodies()

    def _wrap(self, value):
        if self.kind == KIND_REQUEST:
            return zc.ClusterRequest(value, {"m": repr(type(value))})
        return zc.ClusterResult(self.rng.choice(["OK", "FAIL", "MAYBE", None]), value,
                                {"m": 1}, {"host": "h", "pid": 1, "seconds": 0.0})

    def _task_id(self):
        self.next_id += 1
        return self.next_id

    def _valid(self):
        obj = self.rng.choice(self.corpus)
        frames = _framing_py.encode(obj, self.kind, self._task_id())
        return [bytes(memoryview(f).cast("B")) for f in frames]

    def message(self):
        rng = self.rng
        how = rng.randrange(9)
        if how == 0:    # random frames, sometimes behind a plausible fixed header
            frames = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.5:
                frames[0] = _header(rng.choice([1, 2, 3, 0, 9]), self._task_id(),
                                    len(frames) - 1) + frames[0]
            return frames
        if how == 1:    # evil bodies
            body, buffers = rng.choice(self.evil)
            kind = self.kind if rng.random() < 0.8 else rng.choice([1, 2, 3, 0, 200])
            return [_header(kind, self._task_id(), len(buffers)) + body] + list(buffers)
        frames = self._valid()
        header = bytearray(frames[0])
        if how == 2:    # truncated
            return [bytes(header[:rng.randrange(0, len(header))])] + frames[1:]
        if how in (3, 4):   # bytes of the body replaced
            for _ in range(rng.randint(1, 4)):
                if len(header) > 16:
                    header[rng.randrange(16, len(header))] = rng.randrange(256)
            return [bytes(header)] + frames[1:]
        if how == 5:    # bytes inserted or removed
            at = rng.randrange(16, len(header) + 1)
            if rng.random() < 0.5:
                header[at:at] = rng.randbytes(rng.randint(1, 9))
            else:
                del header[at:at + rng.randint(1, 9)]
            return [bytes(header)] + frames[1:]
        if how == 6:    # frames dropped, added, resized; counts that lie
            frames = [bytes(header)] + frames[1:]
            choice = rng.randrange(4)
            if choice == 0 and len(frames) > 1:
                del frames[rng.randrange(1, len(frames))]
            elif choice == 1:
                frames.append(rng.randbytes(rng.randrange(0, 20)))
            elif choice == 2 and len(frames) > 1:
                i = rng.randrange(1, len(frames))
                frames[i] = frames[i][:-1] if rng.random() < 0.5 else frames[i] + b"\0"
            else:
                frames[0] = frames[0][:4] + _u32(rng.choice([0, 1, 2, 0xFFFFFFFF])) + frames[0][8:]
            return frames
        if how == 7:    # another kind, known or not
            header[3] = rng.choice([1, 2, 3, 0, 4, 255])
            return [bytes(header)] + frames[1:]
        header[0:2] = rng.choice([b"ZD", b"zc", b"\0\0"]) if rng.random() < 0.5 else b"ZC"
        header[2] = rng.choice([0, 1, 2, 255])     # magic and version
        return [bytes(header)] + frames[1:]

    def command(self, is_kill):
        """An evil or odd command that is not the kill."""
        rng = self.rng
        while True:
            how = rng.randrange(4)
            if how == 0:
                obj = rng.choice([np.array(["CLUSTER_WORKER_KILL"]), np.zeros(3),
                                  np.zeros((), [("a", "<i4")])[()], np.void(b"CLUSTER_"),
                                  np.str_("CLUSTER_SINK_KILL"), {"op": "kill"}, 7, None,
                                  "CLUSTER_WORKER_KIL", ["CLUSTER_SINK_KILL"]])
                frames = [bytes(memoryview(f).cast("B"))
                          for f in _framing_py.encode(obj, KIND_REQUEST)]
                frames[0] = frames[0][:3] + bytes([KIND_COMMAND]) + frames[0][4:]
            elif how == 1:   # a pickle on the command channel
                frames = _framing_py.encode({"CLUSTER_WORKER_KILL"}, KIND_REQUEST)
                frames = [frames[0][:3] + bytes([KIND_COMMAND]) + frames[0][4:]]
            else:
                frames = self.message()
            try:
                _, _, obj = _framing_py.decode(frames, allow_pickle=False)
            except MessageFormatError:
                return frames
            if not is_kill(obj):
                return frames


# ------------------------------------------------------------- the oracle

def _expect(frames, allow_pickle=False):
    """What a node must make of ``frames``: (decoded body or None, whether it
    is malformed, the task id it must answer or None)."""
    header = peek_header(frames)
    try:
        _, _, obj = _framing_py.decode(frames, allow_pickle=allow_pickle)
    except MessageFormatError:
        return None, True, None if header is None else header[1]
    return obj, False, header[1]


class CountingHandler(logging.Handler):
    """Counts the warnings that reject a message."""

    NEEDLES = ("rejected a malformed", "cannot be used")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        message = record.getMessage()
        if any(needle in message for needle in self.NEEDLES):
            self.count += 1


def _max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _kill_bytes(name):
    return lambda obj: (type(obj) is str and obj == name) or (type(obj) is bytes
                                                             and obj == name.encode())


def _sender(socket, messages):
    """Send ``messages`` from a thread (the node reads concurrently)."""
    errors = []

    def run():
        try:
            for frames in messages:
                socket.send_multipart(frames)
        except Exception as exc:  # surfaced by the caller
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.fixture
def counting_log():
    logger = logging.getLogger("zmq_cluster")
    handler = CountingHandler()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# --------------------------------------------------------------- the worker

def test_worker_survives_the_fuzz(ctx, ipc_url, counting_log):
    req, res, cmd = ipc_url("req"), ipc_url("res"), ipc_url("cmd")
    fuzz = Fuzz(SEED, KIND_REQUEST)
    is_kill = _kill_bytes(zc.BasicWorker.CMD_KILL)
    requests, commands, valid = [], [], {}
    for i in range(MESSAGES):
        if fuzz.rng.random() < COMMAND_SHARE:
            commands.append(fuzz.command(is_kill))
        else:
            requests.append(fuzz.message())
        if i % VALID_EVERY == 0:
            task_id = VALID_IDS + i
            payload = np.arange(i % 50, dtype=np.int32) if i % 20 else {"i": i}
            valid[task_id] = payload
            requests.append([bytes(memoryview(f).cast("B")) for f in _framing_py.encode(
                zc.ClusterRequest(payload, i), KIND_REQUEST, task_id)])

    expected_ids = collections.Counter()
    expected_malformed = 0
    for frames in requests:
        _, malformed, task_id = _expect(frames)
        expected_malformed += malformed
        if task_id is not None:
            expected_ids[task_id] += 1
    expected_malformed += sum(_expect(frames)[1] for frames in commands)

    push = ctx.socket(zmq.PUSH)
    push.bind(req)
    pull = ctx.socket(zmq.PULL)
    pull.bind(res)
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.SNDHWM, 0)
    xpub.bind(cmd)
    worker = zc.BasicWorker(ctx, zc.Connect(req), zc.Connect(res),
                            zc.Connect(cmd, options={zmq.RCVHWM: 0}), receiver_timeout=WAIT_MS)
    worker.allow_pickle = False
    errors = []

    def run():
        try:
            worker.Run()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    rss_before = _max_rss()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert xpub.poll(WAIT_MS) and xpub.recv() == b"\x01"  # the worker subscribed
        cmd_sender, cmd_errors = _sender(xpub, commands)
        req_sender, req_errors = _sender(push, requests)
        got_ids = collections.Counter()
        results = {}
        total = sum(expected_ids.values())
        deadline = time.monotonic() + 300
        while sum(got_ids.values()) < total and time.monotonic() < deadline:
            if not pull.poll(WAIT_MS):
                break
            frames = pull.recv_multipart(copy=False)
            _, task_id, result = _framing_py.decode(frames)  # a result must decode
            got_ids[task_id] += 1
            if task_id >= VALID_IDS:
                results[task_id] = result
        req_sender.join(WAIT_MS / 1000)
        cmd_sender.join(WAIT_MS / 1000)
        assert req_errors == cmd_errors == []
        assert not pull.poll(200), "a result too many"
        assert thread.is_alive(), "the worker stopped: %r" % errors
        zc.BasicWorker.SendKillCommand(ctx, xpub)
        thread.join(WAIT_MS / 1000)
        assert not thread.is_alive() and errors == []
    finally:
        push.close(0)
        pull.close(0)
        xpub.close(0)
        thread.join(WAIT_MS / 1000)
    assert got_ids == expected_ids
    for task_id, payload in valid.items():
        result = results[task_id]
        assert result.status == "OK" and result.request_metadata == task_id - VALID_IDS
        if isinstance(payload, dict):
            assert result.payload == payload
        else:
            np.testing.assert_array_equal(result.payload, payload)
    assert worker.malformed_messages == expected_malformed
    assert counting_log.count == expected_malformed
    assert worker.requests_handled == len(requests) - sum(_expect(f)[1] for f in requests)
    assert _max_rss() - rss_before < MAX_RSS_GROWTH
    print("worker fuzz: %d messages (%d requests, %d commands, %d valid tasks): %d results, "
          "%d malformed, all valid work done once" % (
              len(requests) + len(commands), len(requests), len(commands), len(valid),
              sum(got_ids.values()), worker.malformed_messages))


# ----------------------------------------------------------------- the sink

def test_sink_survives_the_fuzz(ctx, ipc_url, counting_log):
    res, cmd = ipc_url("res"), ipc_url("cmd")
    fuzz = Fuzz(SEED + 1, KIND_RESULT)
    is_kill = _kill_bytes(zc.BasicSink.CMD_KILL)
    results, commands, valid = [], [], {}
    for i in range(MESSAGES):
        if fuzz.rng.random() < COMMAND_SHARE:
            commands.append(fuzz.command(is_kill))
        else:
            results.append(fuzz.message())
        if i % VALID_EVERY == 0:
            task_id = VALID_IDS + i
            valid[task_id] = i
            results.append([bytes(memoryview(f).cast("B")) for f in _framing_py.encode(
                zc.ClusterResult("OK", i, None, {"host": "h"}), KIND_RESULT, task_id)])

    # Sink.Receive yields OK payloads and raises WorkerException for FAIL,
    # for a result it cannot use (the result rule) and for a malformed result
    # whose header was readable; every message with a readable header is one.
    expected_ok = collections.Counter()
    expected_failures = 0
    expected_malformed = sum(_expect(frames)[1] for frames in commands)
    for frames in results:
        obj, malformed, task_id = _expect(frames)
        if malformed:
            expected_malformed += 1
            expected_failures += task_id is not None
        elif (type(obj) is zc.ClusterResult and type(obj.status) is str
              and obj.status in ("OK", "FAIL")):
            if obj.status == "OK":
                expected_ok[task_id] += 1
            else:
                expected_failures += 1
        else:
            expected_malformed += 1   # the result rule
            expected_failures += 1

    push = ctx.socket(zmq.PUSH)
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.SNDHWM, 0)
    xpub.bind(cmd)
    sink = zc.Sink(ctx, zc.Connect(res, bind=True), zc.Connect(cmd, options={zmq.RCVHWM: 0}),
                   receiver_timeout=WAIT_MS)
    sink.allow_pickle = False
    rss_before = _max_rss()
    try:
        sink.Setup()
        push.connect(res)
        assert xpub.poll(WAIT_MS) and xpub.recv() == b"\x01"  # the sink subscribed
        cmd_sender, cmd_errors = _sender(xpub, commands)
        res_sender, res_errors = _sender(push, results)
        got_ok = collections.Counter()
        failures = 0
        total = sum(expected_ok.values()) + expected_failures
        while sum(got_ok.values()) + failures < total:
            try:
                for payload, _, info in sink.Receive(total - sum(got_ok.values()) - failures,
                                                     metadata=True):
                    # The fuzz's OK results carry no task id the caller sees:
                    # tell the valid ones by their payload and metadata.
                    got_ok[payload if info == {"host": "h"} and type(payload) is int
                           else "other"] += 1
            except zc.WorkerException:
                failures += 1
        res_sender.join(WAIT_MS / 1000)
        cmd_sender.join(WAIT_MS / 1000)
        assert res_errors == cmd_errors == []
        assert not sink._results.poll(200), "a result too many"
        zc.BasicSink.SendKillCommand(ctx, xpub)
        assert list(sink.Receive(timeout=WAIT_MS)) == []
    finally:
        sink.Shutdown()
        push.close(0)
        xpub.close(0)
    assert failures == expected_failures
    assert sum(got_ok.values()) == sum(expected_ok.values())
    for i in valid.values():
        assert got_ok[i] == 1, "valid result %d received %d times" % (i, got_ok[i])
    assert sink.malformed_messages == expected_malformed
    assert counting_log.count == expected_malformed
    assert _max_rss() - rss_before < MAX_RSS_GROWTH
    print("sink fuzz: %d messages (%d results, %d commands, %d valid): %d OK, %d failures, "
          "%d malformed" % (len(results) + len(commands), len(results), len(commands),
                            len(valid), sum(got_ok.values()), failures,
                            sink.malformed_messages))

