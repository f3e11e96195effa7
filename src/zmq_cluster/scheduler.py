"""The scheduler: one ROUTER socket, a ledger of every task, credit, liveness
and re-dispatch.

Pool clients and pool workers connect to the scheduler's one listen address
and say who they are in a HELLO (see :mod:`zmq_cluster.schedproto`). Clients
send batches of tasks; the scheduler queues them per client and hands them
to workers by credit: each worker says how many tasks (and bytes of
arguments) it is ready to hold, and updates the count with every batch of
results as its measured task time changes. The ledger records which worker
holds each task and since when. When a worker's connection closes (killed,
stopped past the heartbeat timeout, cut off), its tasks go back to the front
of their queues and run elsewhere; a result from a worker that no longer
holds the task (declared dead, then back) is dropped by task id, so each
result reaches its client once. Argument and result frames pass through
without being decoded or copied.

Run it with ``Scheduler(listen).run()`` or
``python -m zmq_cluster._start scheduler --listen ADDRESS``.
"""

import argparse
import collections
import gc
import logging
import os
import signal
import socket as _socket
import sys
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import schedproto as sp
from .functions import function_key
from .liveness import FdMap, heartbeat_options
from .wire import recv_any
from .trust import (
    EndpointKind, check_listen, classify_endpoint, is_private_ipc, sender_may_pickle,
)
from .taskcodec import task_failure

__all__ = ["Scheduler", "is_local_address"]

log = logging.getLogger("zmq_cluster.scheduler")

#: A task whose worker died while running it this many times fails.
MAX_DEATHS = 3
#: Messages read in a row before the scheduler dispatches.
DRAIN_BATCH = 256
#: How long a scheduler told to shut down waits for its workers to leave.
SHUTDOWN_SECONDS = 2.0
#: Tasks per TASKS message to one worker, at most.
MAX_BATCH = 256
#: A TASKS message is closed once it holds this many bytes (one large task
#: per message), so a worker starts on the first while the next is in transit.
MAX_BATCH_BYTES = 1 << 20

_Q, _TID, _KEY, _TIMEOUT, _ENTRY, _INLINE, _FRAMES, _NBYTES, _CLIENT, _WORKER, _DEATHS = range(11)


def is_local_address(address: str) -> bool:
    """Whether ``address`` reaches only this host (ipc, inproc, loopback tcp)."""
    return classify_endpoint(address) is not EndpointKind.NETWORK


class _Worker:
    __slots__ = ("rid", "no", "host", "pid", "trusted", "credit", "credit_bytes", "inhand",
                 "inhand_bytes", "funcs", "tasks", "busy", "last_seen", "head_since")

    def __init__(self, rid, no, hello, trusted, now):
        self.rid = rid
        self.no = no
        self.host = str(hello.get("host", "?"))
        self.pid = int(hello.get("pid", 0))
        self.trusted = trusted
        self.credit = max(1, int(hello.get("credit", 1)))
        self.credit_bytes = max(1, int(hello.get("credit_bytes", 1 << 28)))
        self.inhand = {}          # task id -> record, in dispatch (= run) order
        self.inhand_bytes = 0
        self.funcs = set()
        self.tasks = 0
        self.busy = 0.0
        self.last_seen = now
        self.head_since = now


class _Client:
    __slots__ = ("rid", "no", "trusted", "queue", "host", "pid")

    def __init__(self, rid, no, hello, trusted):
        self.rid = rid
        self.no = no
        self.trusted = trusted
        self.queue = collections.deque()
        self.host = str(hello.get("host", "?"))
        self.pid = int(hello.get("pid", 0))


class Scheduler:
    """A scheduler listening on ``listen`` (``tcp://host:port``, ``ipc://path``).

    ``heartbeat_timeout`` (seconds): a worker whose connection carries no
    ZMTP heartbeat for that long is declared dead. ``trusted``: whether
    peers may send pickled functions and arguments (forwarded to workers as
    a per-task flag). None decides per connection, at its HELLO, by
    :func:`zmq_cluster.trust.sender_may_pickle`: loopback peers, and ipc
    peers when the socket's directory is private (as LocalCluster's), are
    trusted; network peers are not (CURVE-authenticated ones will be).
    ``socket_options``: extra options for the ROUTER socket (e.g. CURVE).
    ``run()`` serves until a SHUTDOWN message, :meth:`stop`, or SIGTERM.
    """

    def __init__(self, listen: str, *, heartbeat_timeout: float = 10.0,
                 trusted: Optional[bool] = None,
                 socket_options: Optional[Dict[int, Any]] = None,
                 context: Optional[zmq.Context] = None) -> None:
        self.listen = listen
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.trusted = trusted
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._router = self._ctx.socket(zmq.ROUTER)
        opts: Dict[Any, Any] = {zmq.ROUTER_MANDATORY: 1, zmq.SNDHWM: 0, zmq.RCVHWM: 0, zmq.LINGER: 0}
        opts.update(heartbeat_options(self.heartbeat_timeout))
        opts.update(socket_options or {})
        for opt, value in opts.items():
            self._router.setsockopt(opt, value)
        self._monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        # The command line refuses this without --insecure (zmq_cluster.trust);
        # from Python, say what it means.
        warning = check_listen(listen, secure=bool(opts.get(zmq.CURVE_SERVER)), insecure=True)
        if warning:
            log.warning("%s", warning)
        self._router.bind(listen)
        self.address = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._private_ipc = is_private_ipc(self.address)

        self._running = False
        self._stopping = None     # deadline once told to shut down
        self._peers: Dict[bytes, Tuple[str, Any]] = {}  # routing id -> (role, peer)
        self._workers: Dict[bytes, _Worker] = {}
        self._clients: Dict[int, _Client] = {}        # by client number
        self._active: Deque[_Client] = collections.deque()  # clients with queued tasks
        self._ledger: Dict[int, list] = {}           # task id -> record
        self._funcs: Dict[int, list] = {}            # fn key -> FUNC message frames
        self._fdmap = FdMap()
        self._stats_waiting: List[tuple] = []  # STATS requests waiting for enough workers
        self._timed = 0           # tasks in workers' hands that have a timeout
        self._next_client = 1
        self._next_worker = 1
        self.counters: "collections.Counter[str]" = collections.Counter()

    # ---------------------------------------------------------------- loop

    def run(self) -> None:
        """Serve until stopped; closes the sockets on the way out."""
        self._running = True
        probe_every = max(0.05, self.heartbeat_timeout / 2)
        next_probe = time.monotonic() + probe_every
        # The router first, then the monitor; waiting and receiving happen in
        # zmq_cluster.wire (without the GIL in the compiled twin).
        sockets = [self._router, self._monitor]
        try:
            handle = self._handle
            while self._running:
                now = time.monotonic()
                wait = next_probe - now
                if self._timed:
                    wait = min(wait, self._next_deadline(now) - now)
                got = recv_any(sockets, max(0, min(100, int(wait * 1000) + 1)))
                n = 0
                while got is not None:
                    which, frames = got
                    if which == 0:
                        handle(frames)
                    else:
                        self._monitor_event(frames)
                    n += 1
                    if n >= DRAIN_BATCH:
                        break
                    got = recv_any(sockets, 0)
                if self._active:
                    self._dispatch()
                now = time.monotonic()
                if now >= next_probe:
                    self._probe()
                    next_probe = now + probe_every
                if self._timed:
                    self._check_timeouts(now)
                if self._stopping is not None and (not self._workers or now > self._stopping):
                    break
        finally:
            self.close()

    def stop(self) -> None:
        """Make :meth:`run` return (from a signal handler or another thread)."""
        self._running = False

    def close(self) -> None:
        """Close the sockets (run() does this when it returns)."""
        for sock in (self._monitor, self._router):
            try:
                sock.close(linger=0)
            except zmq.ZMQError:
                pass
        if self._own_ctx:
            self._ctx.term()

    def _send(self, rid, frames):
        """Send to a peer: False (and the peer declared gone) when its
        connection no longer exists."""
        # Never block: with ROUTER_MANDATORY and no high-water mark, a pipe
        # that cannot take a message is one libzmq is tearing down.
        try:
            self._router.send_multipart([rid] + frames, zmq.DONTWAIT, copy=False)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self._gone(rid, "unreachable")
                return False
            raise

    # ------------------------------------------------------------ messages

    def _handle(self, frames):
        rid = frames[0]  # bytes (recv_any)
        try:
            if len(frames) < 3:
                raise sp.ProtocolError("%d frames" % len(frames))
            mtype, count, flags = sp.parse_ctl(frames[1].bytes)
            peer = self._peers.get(rid)
            if mtype == sp.HELLO:
                self._hello(rid, frames)
            elif peer is None:
                self.counters["unknown_peer"] += 1
                if mtype != sp.BYE:
                    self._send(rid, sp.message(sp.RESET))
            elif mtype == sp.RESULTS and peer[0] == "worker":
                self._results(peer[1], frames, count, flags)
            elif mtype == sp.TASKS and peer[0] in ("submit", "client"):
                self._tasks(peer[1], frames, count)
            elif mtype == sp.FUNC and peer[0] in ("submit", "client"):
                self._func(frames)
            elif mtype == sp.CANCEL:
                self._cancel(peer[1], sp.parse_body(frames[2].bytes))
            elif mtype == sp.STATS:
                self._stats(peer[1], sp.parse_body(frames[2].bytes))
            elif mtype == sp.BYE:
                self._gone(rid, "said BYE")
            elif mtype == sp.SHUTDOWN and peer[0] in ("submit", "client"):
                self._shutdown()
            else:
                raise sp.ProtocolError("%s from a %s" % (sp.TYPE_NAMES[mtype], peer[0]))
            if peer is not None and peer[0] == "worker":
                peer[1].last_seen = time.monotonic()
        except (sp.ProtocolError, ValueError, TypeError, KeyError) as exc:
            self.counters["malformed"] += 1
            log.warning("scheduler dropped a message from %r: %s", rid, exc)
            peer = self._peers.get(rid)
            if peer is not None and peer[0] == "worker":
                # Its tasks would wait for results that cannot be read:
                # they run elsewhere, and the worker must say HELLO again.
                self._send(rid, sp.message(sp.RESET))
                self._gone(rid, "sent a malformed message")

    def _hello(self, rid, frames):
        hello = sp.parse_body(frames[2].bytes)
        if type(hello) is not dict:
            raise sp.ProtocolError("HELLO body is not a dict")
        if rid in self._peers:
            self._gone(rid, "said HELLO again")
        try:
            fd = frames[2].get(zmq.SRCFD)
        except zmq.ZMQError:
            fd = None  # inproc: a peer in this process, which lives as long as we do
        if fd is not None:
            old = self._fdmap.hello(fd, rid)
            if old is not None:
                self._gone(old, "its descriptor was reused")
        trusted = self._trust(frames[2])
        role = hello.get("role")
        now = time.monotonic()
        if role == sp.ROLE_WORKER:
            worker = _Worker(rid, self._next_worker, hello, trusted, now)
            self._next_worker += 1
            self._peers[rid] = ("worker", worker)
            self._workers[rid] = worker
            self._send(rid, sp.message(sp.WELCOME, {"worker_no": worker.no}))
            log.info("worker %d joined (%s pid %d)", worker.no, worker.host, worker.pid)
            waiting, self._stats_waiting = self._stats_waiting, []
            for client, request in waiting:
                if self._clients.get(client.no) is client:
                    self._stats(client, request)
        elif role == sp.ROLE_CLIENT:
            client = _Client(rid, self._next_client, hello, trusted)
            self._next_client += 1
            self._clients[client.no] = client
            self._peers[rid] = ("client", client)
            self._send(rid, sp.message(sp.WELCOME, {"client_no": client.no,
                                                    "workers": len(self._workers)}))
        elif role == sp.ROLE_SUBMIT:
            client = self._clients.get(hello.get("client_no"))
            if client is None:
                raise sp.ProtocolError("submit connection for unknown client")
            self._peers[rid] = ("submit", client)
            # Tasks arrive on this connection: both must be trusted.
            client.trusted = client.trusted and trusted
        else:
            self._fdmap.forget(rid)
            raise sp.ProtocolError("HELLO with role %r" % (role,))

    def _trust(self, frame):
        """Whether the sender of ``frame`` may send pickles (see __init__)."""
        if self.trusted is not None:
            return bool(self.trusted)
        return sender_may_pickle(frame, private_ipc=self._private_ipc,
                                 inproc=self.address.startswith("inproc://"))

    def _tasks(self, client, frames, count):
        table = frames[2].bytes
        data = frames[3:]
        ledger = self._ledger
        queue = client.queue
        prefix = client.no
        funcs = self._funcs
        unpack = sp.TASK_ENTRY.unpack_from
        size = sp.TASK_ENTRY.size
        n = len(table)
        off = first = 0
        for _ in range(count):
            if off + size > n:
                raise sp.ProtocolError("batch table truncated")
            tid, key, timeout, inline, nfr = unpack(table, off)
            end = off + size + inline
            if end > n or not (inline or nfr):
                raise sp.ProtocolError("bad batch table entry")
            if nfr:
                fr = data[first:first + nfr]
                if len(fr) != nfr:
                    raise sp.ProtocolError("batch table names more frames than arrived")
                nbytes = end - off
                for f in fr:
                    nbytes += len(f)
                first += nfr
            else:
                fr = ()
                nbytes = end - off
            entry = table[off:end]
            off = end
            if tid >> 40 != prefix or tid in ledger:
                self.counters["bad_task_id"] += 1
                log.warning("scheduler rejected task id %x from client %d", tid, prefix)
                continue
            rec = [False, tid, key, timeout, entry, inline, fr, nbytes, client, None, 0]
            if key not in funcs:
                self._fail(rec, LookupError("the scheduler has no function %016x" % key))
                continue
            ledger[tid] = rec
            queue.append(rec)
        if off != n or first != len(data):
            log.warning("scheduler: stray bytes or frames after a batch table from client %d",
                        prefix)
            self.counters["malformed"] += 1
        if queue and client not in self._active:
            self._active.append(client)

    def _func(self, frames):
        key, module, qualname, pickled = sp.parse_body(frames[2].bytes)
        if type(key) is not int:
            raise sp.ProtocolError("FUNC key is not an int")
        if key != function_key((module, qualname, pickled)):
            # Keys are content hashes: a blob cannot claim another's key.
            raise sp.ProtocolError("FUNC key does not match its function")
        self._funcs.setdefault(key, [frames[1], frames[2]])

    def _cancel(self, client, ids):
        if ids is None:
            for rec in client.queue:
                rec[_Q] = True
                self._ledger.pop(rec[_TID], None)
            client.queue.clear()
            return
        for tid in ids:
            rec = self._ledger.get(tid)
            if rec is not None and rec[_WORKER] is None and rec[_CLIENT] is client:
                rec[_Q] = True
                del self._ledger[tid]

    def _stats(self, client, request):
        if type(request) is not dict:
            raise sp.ProtocolError("STATS body is not a dict")
        if len(self._workers) < request.get("wait_workers", 0):
            self._stats_waiting.append((client, request))
            return
        now = time.monotonic()
        workers = [{"host": w.host, "pid": w.pid, "tasks": w.tasks,
                    "mean_task_seconds": (w.busy / w.tasks) if w.tasks else 0.0,
                    "state": "busy" if w.inhand else "idle",
                    "last_seen": now - w.last_seen, "in_hand": len(w.inhand),
                    "credit": w.credit, "worker_no": w.no}
                   for w in self._workers.values()]
        queued = sum(len(c.queue) for c in self._clients.values())
        running = sum(len(w.inhand) for w in self._workers.values())
        self._send(client.rid, sp.message(sp.STATS, {
            "id": request.get("id"), "workers": workers, "queued": queued, "running": running,
            "counters": dict(self.counters)}))

    def _results(self, worker, frames, count, credit):
        table = frames[2].bytes
        data = frames[3:]
        counters = self.counters
        counters["result_batches"] += 1
        counters["results"] += count
        ledger = self._ledger
        inhand = worker.inhand
        if credit:
            worker.credit = credit
        forward = []
        first_client = None
        regroup = False
        unpack = sp.RESULT_ENTRY.unpack_from
        size = sp.RESULT_ENTRY.size
        n = len(table)
        off = first = 0
        parsed = []
        for _ in range(count):  # check the whole table before using any of it
            if off + size > n:
                raise sp.ProtocolError("result table truncated")
            fields = unpack(table, off)
            end = off + size + fields[1]
            nfr = fields[2]
            if end > n or not (fields[1] or nfr) or first + nfr > len(data):
                raise sp.ProtocolError("bad result table entry")
            parsed.append((fields, off, end, first))
            off = end
            first += nfr
        if off != n or first != len(data):
            raise sp.ProtocolError("stray bytes or frames after a result table")
        tasks = 0
        busy = 0.0
        for (tid, _, nfr, items, seconds), start, end, first in parsed:
            rec = ledger.get(tid)
            if rec is None or rec[_WORKER] is not worker:
                counters["late_results"] += 1
                regroup = True
                continue
            del ledger[tid]
            del inhand[tid]
            worker.inhand_bytes -= rec[_NBYTES]
            if rec[_TIMEOUT]:
                self._timed -= 1
            tasks += items
            busy += seconds
            client = rec[_CLIENT]
            if first_client is None:
                first_client = client
            elif client is not first_client:
                regroup = True
            forward.append((client, start, end, first, nfr))
        worker.tasks += tasks
        worker.busy += busy
        worker.head_since = time.monotonic()
        if not forward:
            return
        clients = self._clients
        if not regroup:
            # The common case: the batch goes to one client as it came.
            if clients.get(first_client.no) is first_client:
                self._send(first_client.rid, [frames[1], frames[2]] + list(data))
            return
        groups = {}
        for client, start, end, first, nfr in forward:
            g = groups.get(client)
            if g is None:
                groups[client] = g = ([], [])
            g[0].append(table[start:end])
            g[1].extend(data[first:first + nfr])
        for client, (ents, frs) in groups.items():
            if clients.get(client.no) is client:
                self._send(client.rid, [sp.ctl(sp.RESULTS, len(ents)), b"".join(ents)] + frs)

    def _fail(self, rec, exc):
        """Answer a task with a failure made here (every item fails)."""
        client = rec[_CLIENT]
        self._ledger.pop(rec[_TID], None)
        if self._clients.get(client.no) is not client:
            return
        frames = task_failure(exc, rec[_TID])
        entry, data = sp.pack_entry(sp.RESULT_ENTRY, (rec[_TID],), frames, (0, 0.0))
        self._send(client.rid, [sp.ctl(sp.RESULTS, 1), entry] + list(data))

    def _shutdown(self):
        """Stop every worker, then leave once they have gone (at most
        SHUTDOWN_SECONDS later)."""
        for worker in list(self._workers.values()):
            self._send(worker.rid, sp.message(sp.STOP))
        self._stopping = time.monotonic() + SHUTDOWN_SECONDS

    # ------------------------------------------------------------ dispatch

    def _dispatch(self):
        """Hand queued tasks to workers with credit: in passes, each worker
        taking at most its share of what is queued, so that tasks whose
        duration is not known yet are spread rather than piled on the first
        worker; clients take turns."""
        active = self._active
        while active:
            ready = [w for w in self._workers.values()
                     if w.credit > len(w.inhand)
                     and (not w.inhand or w.inhand_bytes < w.credit_bytes)]
            if not ready:
                return
            queued = 0
            for client in active:
                queued += len(client.queue)
            share = max(1, -(-queued // len(ready)))
            progress = False
            for worker in ready:
                if not active:
                    break
                client = active[0]
                queue = client.queue
                batch = []
                room = worker.credit_bytes - worker.inhand_bytes
                n = min(worker.credit - len(worker.inhand), share, MAX_BATCH)
                size = 0
                while queue and len(batch) < n and size < MAX_BATCH_BYTES:
                    rec = queue[0]
                    if rec[_Q]:
                        queue.popleft()
                        continue
                    if batch and rec[_NBYTES] > room:
                        break
                    queue.popleft()
                    room -= rec[_NBYTES]
                    size += rec[_NBYTES]
                    batch.append(rec)
                active.rotate(-1)
                if not queue:
                    active.remove(client)
                if batch:
                    progress = True
                    self._send_batch(worker, client, batch)
            if not progress:
                return

    def _send_batch(self, worker, client, batch):
        now = time.monotonic()
        if not worker.inhand:
            worker.head_since = now
        funcs = worker.funcs
        missing = {rec[_KEY] for rec in batch} - funcs
        for key in missing:  # each function once per worker, before its first task
            if not self._send(worker.rid, list(self._funcs[key])):
                self._requeue(batch)
                return False
            funcs.add(key)
        entries = []
        frames = []
        inhand = worker.inhand
        nbytes = 0
        for rec in batch:
            entries.append(rec[_ENTRY])
            if rec[_FRAMES]:
                frames.extend(rec[_FRAMES])
            rec[_WORKER] = worker
            inhand[rec[_TID]] = rec
            nbytes += rec[_NBYTES]
            if rec[_TIMEOUT]:
                self._timed += 1
        worker.inhand_bytes += nbytes
        flags = sp.FLAG_TRUSTED if client.trusted else 0
        counters = self.counters
        counters["task_batches"] += 1
        counters["tasks"] += len(batch)
        if not self._send(worker.rid, [sp.ctl(sp.TASKS, len(batch), flags),
                                       b"".join(entries)] + frames):
            return False  # _gone re-queued the batch with the worker's other tasks
        return True

    def _requeue(self, recs):
        """Put tasks back at the front of their clients' queues, in order."""
        for rec in reversed(recs):
            rec[_WORKER] = None
            client = rec[_CLIENT]
            if self._clients.get(client.no) is not client or rec[_Q]:
                self._ledger.pop(rec[_TID], None)
                continue
            client.queue.appendleft(rec)
            if client not in self._active:
                self._active.append(client)

    # ------------------------------------------------------------ liveness

    def _monitor_event(self, frames):
        event = parse_monitor_message([frames[0]] + [bytes(f) for f in frames[1:]])
        if event["event"] == zmq.EVENT_DISCONNECTED:
            rid = self._fdmap.disconnected(event["value"])
            if rid is not None:
                self._gone(rid, "disconnected")

    def _probe(self):
        probe = sp.message(sp.PROBE)
        for rid, (role, _) in list(self._peers.items()):
            if role != "submit" and rid in self._peers:
                self._send(rid, probe)

    def _gone(self, rid, why):
        """A peer left or was declared dead: re-dispatch what it held."""
        peer = self._peers.pop(rid, None)
        self._fdmap.forget(rid)
        if peer is None:
            return
        role, obj = peer
        if role == "worker":
            del self._workers[rid]
            log.info("worker %d (%s pid %d) gone: %s; %d tasks to re-dispatch",
                     obj.no, obj.host, obj.pid, why, len(obj.inhand))
            self.counters["workers_lost"] += 1
            recs = list(obj.inhand.values())
            obj.inhand.clear()
            self._timed -= sum(1 for rec in recs if rec[_TIMEOUT])
            if recs:
                head = recs[0]
                elapsed = time.monotonic() - obj.head_since
                if head[_TIMEOUT] and elapsed >= 0.9 * head[_TIMEOUT] / 1000:
                    recs.pop(0)
                    self._fail(head, TimeoutError("task ran for more than %g s"
                                                  % (head[_TIMEOUT] / 1000)))
                else:
                    head[_DEATHS] += 1
                    if head[_DEATHS] >= MAX_DEATHS:
                        recs.pop(0)
                        self._fail(head, RuntimeError(
                            "the worker running this task died %d times (last: %s pid %d)"
                            % (head[_DEATHS], obj.host, obj.pid)))
            self.counters["redispatched"] += len(recs)
            self._requeue(recs)
        elif role == "client":
            if self._clients.get(obj.no) is obj:
                del self._clients[obj.no]
            for rec in obj.queue:
                self._ledger.pop(rec[_TID], None)
            obj.queue.clear()
            if obj in self._active:
                self._active.remove(obj)
            for other, (r, o) in list(self._peers.items()):
                if r == "submit" and o is obj:
                    self._peers.pop(other)
                    self._fdmap.forget(other)

    def _next_deadline(self, now):
        deadline = now + 1.0
        for w in self._workers.values():
            if w.inhand:
                head = next(iter(w.inhand.values()))
                if head[_TIMEOUT]:
                    deadline = min(deadline, w.head_since + head[_TIMEOUT] / 1000)
        return deadline

    def _check_timeouts(self, now):
        for w in list(self._workers.values()):
            if w.inhand:
                head = next(iter(w.inhand.values()))
                if head[_TIMEOUT] and now - w.head_since >= head[_TIMEOUT] / 1000:
                    # The worker cannot answer while the task holds it; it ends
                    # itself (SIGALRM), and its tasks run elsewhere meanwhile.
                    self._send(w.rid, sp.message(sp.STOP))
                    self._gone(w.rid, "task timed out")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m zmq_cluster._start scheduler")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="write the bound address and a newline to this descriptor")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    from .process import die_with_parent
    die_with_parent()
    logging.basicConfig(level=args.log_level, format="%(asctime)s scheduler %(message)s")
    scheduler = Scheduler(args.listen, heartbeat_timeout=args.heartbeat_timeout)
    # Per-task records are short-lived containers: collect young objects
    # rarely (there are no cycles to find on the hot path).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    if args.ready_fd is not None:
        os.write(args.ready_fd, (scheduler.address + "\n").encode())
        os.close(args.ready_fd)
    scheduler.run()
    return 0

