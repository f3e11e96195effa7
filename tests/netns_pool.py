"""Pool-side peers run inside a test host by tests/test_netns_cluster.py.

    python netns_pool.py map --connect ADDR [--keys DIR] [--items N] [--sleep S]
                             [--wait-workers N]
    python netns_pool.py attack --connect ADDR --target PATH [--keys DIR]
    python netns_pool.py fake-worker --connect ADDR --target PATH [--keys DIR]
    python netns_pool.py raw --host IP --port PORT

Prints one JSON object a line: {"event": "ready"}, {"event": "result", "x",
"ns", "pid"} for each result of a map (imap_unordered, so the test can act
mid-map), {"event": "refused", "what", "error"} for each attack refused,
and {"event": "done", ...} last.
"""

import argparse
import collections
import json
import socket
import sys

import zmq

import zmq_cluster as zc
from zmq_cluster import framing
from zmq_cluster import schedproto as sp
from zmq_cluster.protocol import KIND_RESULT
from zmq_cluster.security import ClientSecurity

import netns_tasks


def emit(**event):
    print(json.dumps(event), flush=True)


class Evil:
    """Unpickling this creates the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pool_for(args, **kw):
    return zc.ClusterPool(args.connect, keys=args.keys, connect_timeout=args.connect_timeout,
                          heartbeat_timeout=args.heartbeat_timeout, **kw)


def run_map(args):
    with pool_for(args) as pool:
        if args.wait_workers:
            pool._client.stats(timeout=60, wait_workers=args.wait_workers)
        emit(event="ready", trusted=pool.trusted)
        counts = collections.Counter()
        for x, square, ns, pid in pool.imap_unordered(
                netns_tasks.where, [(i, args.sleep) for i in range(args.items)]):
            assert square == x * x
            counts[x] += 1
            emit(event="result", x=x, ns=ns, pid=pid)
        stats = pool._client.stats(timeout=30)
        emit(event="done", counts={str(k): v for k, v in counts.items()},
             unmatched=pool._client.unmatched_results,
             malformed=pool._client.counters["malformed"], counters=stats["counters"],
             workers=[(w["host"], w["pid"]) for w in stats["workers"]])


def run_attack(args):
    """A client that tries to make the workers unpickle: a pickled argument,
    a function pickled by value, and a hand-made FUNC whose blob is a
    malicious pickle."""
    try:
        pool = pool_for(args)
    except (TimeoutError, zc.HandshakeRefused) as exc:
        emit(event="refused", what="connect", error=str(exc))
        emit(event="done")
        return
    with pool:
        emit(event="ready", trusted=pool.trusted)
        for what, call in [("pickled argument", lambda: pool.submit(abs, Evil(args.target))),
                           ("pickled function", lambda: pool.submit(
                               lambda: open(args.target, "w")))]:
            try:
                value = call().result(60)
                emit(event="ran", what=what, value=repr(value))
            except Exception as exc:
                emit(event="refused", what=what, error="%s: %s" % (type(exc).__name__, exc))
        assert pool.map(abs, [-1, -2]) == [1, 2]   # by reference, native values: allowed
        emit(event="done")


def run_fake_worker(args):
    """A worker that answers every task with a malicious pickle."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if args.keys:
        ClientSecurity.from_directory(args.keys).apply(sock)
    sock.connect(args.connect)
    sock.send_multipart(sp.message(sp.HELLO, {"role": "worker", "host": "intruder", "pid": 1,
                                              "credit": 8}))
    answered = 0
    welcomed = False
    while sys.stdin.readable():
        if not sock.poll(100):
            if answered >= args.answers:
                break
            continue
        frames = sock.recv_multipart()
        mtype, count, _ = sp.parse_ctl(frames[0])
        if mtype == sp.WELCOME and not welcomed:
            welcomed = True
            emit(event="ready")
        if mtype != sp.TASKS:
            continue
        entries, data = [], []
        for (tid, *_), _ in sp.walk(frames[1], count, sp.TASK_ENTRY, frames[2:]):
            result = framing.encode(([Evil(args.target)], None), KIND_RESULT, tid)
            e, d = sp.pack_entry(sp.RESULT_ENTRY, (tid,), result, (1, 0.0))
            entries.append(e)
            data.extend(d)
        sock.send_multipart([sp.ctl(sp.RESULTS, len(entries), 8), b"".join(entries)] + data)
        answered += len(entries)
        emit(event="answered", tasks=len(entries))
    sock.close()
    ctx.term()
    emit(event="done", answered=answered)


def run_raw(args):
    """Plain TCP: a ZMTP greeting claiming the NULL mechanism, then junk."""
    with socket.create_connection((args.host, args.port), timeout=5) as s:
        s.sendall(b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL" + bytes(16) + bytes(32))
        s.sendall(b"\x04\xff" + bytes(255) + b"junk" * 100)
        s.settimeout(2)
        got = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    emit(event="done", received=len(got), closed=True)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("map", "attack", "fake-worker"):
        p = sub.add_parser(name)
        p.add_argument("--connect", required=True)
        p.add_argument("--keys")
        p.add_argument("--items", type=int, default=100)
        p.add_argument("--sleep", type=float, default=0.0)
        p.add_argument("--wait-workers", type=int, default=0)
        p.add_argument("--target", default="/nonexistent")
        p.add_argument("--answers", type=int, default=1)
        p.add_argument("--connect-timeout", type=float, default=10.0)
        p.add_argument("--heartbeat-timeout", type=float, default=10.0)
    raw = sub.add_parser("raw")
    raw.add_argument("--host", required=True)
    raw.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    {"map": run_map, "attack": run_attack, "fake-worker": run_fake_worker,
     "raw": run_raw}[args.cmd](args)


if __name__ == "__main__":
    main()
