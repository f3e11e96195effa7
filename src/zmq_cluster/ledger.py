"""The scheduler's ledger: every task, where it is, and who gets it next.

Plain bookkeeping with one socket-free contract: ``send(routing_id,
frames) -> bool`` (False when the peer is gone, which the caller handles by
calling :meth:`Ledger.worker_gone` or :meth:`Ledger.client_gone`). The
:class:`~zmq_cluster.scheduler.Scheduler` owns the socket, the peers and
liveness, and hands the ledger its messages.

A record is a list ``[cancelled, task id, function key, timeout ms, table
entry (with its inline header), inline length, data frames, bytes, client,
worker or None, deaths]``. Each client has a queue; each worker holds its
tasks in an insertion-ordered dict, which is the order it runs them, so the
first is the running one, started at ``head_since``.
"""

import collections
import logging
import operator
import time
from typing import (Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence,
                    Set, Tuple)

from . import schedproto as sp
from .functions import function_key
from .taskcodec import task_failure

__all__ = ["Ledger", "MAX_DEATHS"]

log = logging.getLogger("zmq_cluster.scheduler")

#: A task whose worker died while running it this many times fails.
MAX_DEATHS = 3
#: Tasks per TASKS message to one worker, at most.
MAX_BATCH = 256
#: A TASKS message is closed once it holds this many bytes (one large task
#: per message), so a worker starts on the first while the next is in transit.
MAX_BATCH_BYTES = 1 << 20
#: Functions the scheduler keeps, at most (count, and bytes of their FUNC
#: messages); a FUNC beyond either is refused and its tasks fail.
MAX_FUNCTIONS = sp.MAX_FUNCTIONS
MAX_FUNCTION_BYTES = sp.MAX_FUNCTION_BYTES

#: A task's record (see the module docstring), indexed by these.
Record = List[Any]
_Q, _TID, _KEY, _TIMEOUT, _ENTRY, _INLINE, _FRAMES, _NBYTES, _CLIENT, _WORKER, _DEATHS = range(11)
_key_of = operator.itemgetter(_KEY)


class _Worker:
    __slots__ = ("rid", "no", "host", "pid", "trusted", "credit", "credit_bytes", "inhand",
                 "inhand_bytes", "funcs", "tasks", "busy", "last_seen", "head_since", "born",
                 "direct", "direct_key", "leases")

    def __init__(self, rid: bytes, no: int, hello: Mapping[str, Any], trusted: bool,
                 now: float) -> None:
        self.rid = rid
        self.no = no
        self.host = str(hello.get("host", "?"))
        self.pid = int(hello.get("pid", 0))
        self.trusted = trusted
        # When the worker process started, on this clock (it says how long ago).
        self.born = now - float(hello.get("uptime", 0.0))
        self.credit = max(1, int(hello.get("credit", 1)))
        self.credit_bytes = max(1, int(hello.get("credit_bytes", 1 << 28)))
        self.inhand: Dict[int, Record] = {}  # task id -> record, in dispatch (= run) order
        self.inhand_bytes = 0
        self.funcs: Set[int] = set()
        self.tasks = 0
        self.busy = 0.0
        self.last_seen = now
        self.head_since = now
        #: The worker's direct socket and the key its lease tokens are
        #: made with (None: it offers none), and the clients leasing it.
        self.direct: Optional[str] = hello.get("direct")
        key = hello.get("direct_key")
        self.direct_key: Optional[bytes] = bytes.fromhex(key) if self.direct and key else None
        if self.direct_key is None:
            self.direct = None
        self.leases: Set["_Client"] = set()


class _Client:
    __slots__ = ("rid", "no", "trusted", "queue", "host", "pid", "local", "lease")

    def __init__(self, rid: bytes, no: int, hello: Mapping[str, Any], trusted: bool,
                 local: bool = False) -> None:
        self.rid = rid
        self.no = no
        self.trusted = trusted
        #: Whether the client is on this host (it may lease a worker's
        #: direct socket), and the worker it leases.
        self.local = local
        self.lease: Optional[_Worker] = None
        self.queue: Deque[Record] = collections.deque()
        self.host = str(hello.get("host", "?"))
        self.pid = int(hello.get("pid", 0))


class Ledger:
    """Tasks, queues, credit and re-dispatch (see the module docstring)."""

    def __init__(self, send: Callable[[bytes, List[Any]], bool]) -> None:
        self.send = send
        self.workers: Dict[bytes, _Worker] = {}       # by routing id
        self.clients: Dict[int, _Client] = {}         # by client number
        self.active: Deque[_Client] = collections.deque()  # clients with queued tasks
        self.records: Dict[int, Record] = {}          # task id -> record
        self.funcs: Dict[int, list] = {}              # fn key -> FUNC message frames
        self.funcs_bytes = 0
        self.timed = 0   # tasks in workers' hands that have a timeout
        self.counters: "collections.Counter[str]" = collections.Counter()

    def add_tasks(self, client: _Client, frames: Sequence[sp.Frame], count: int) -> None:
        """A TASKS message from ``client``: each task its own record, queued.
        The whole table is checked before any of it is used (ProtocolError)."""
        table = frames[2].bytes
        data = frames[3:]
        recs: List[Record] = []
        append = recs.append
        for fields, off, end, first in sp.scan(table, count, sp.TASK_ENTRY, len(data)):
            tid, key, timeout, inline, nfr = fields
            nbytes = end - off
            if nfr:
                fr = data[first:first + nfr]
                for f in fr:
                    nbytes += len(f)
            else:
                fr = ()
            append([False, tid, key, timeout, table[off:end], inline, fr, nbytes, client, None, 0])
        ledger = self.records
        queue = client.queue
        prefix = client.no
        funcs = self.funcs
        for rec in recs:
            tid = rec[_TID]
            if tid >> 40 != prefix or tid in ledger:
                self.counters["bad_task_id"] += 1
                log.warning("scheduler rejected task id %x from client %d", tid, prefix)
                continue
            if rec[_KEY] not in funcs:
                self.fail(rec, LookupError("the scheduler has no function %016x" % rec[_KEY]))
                continue
            ledger[tid] = rec
            queue.append(rec)
        if queue and client not in self.active:
            self.active.append(client)

    def add_function(self, frames: Sequence[sp.Frame]) -> None:
        """A FUNC message: kept (once per key) for the workers that need it."""
        key, module, qualname, pickled = sp.parse_body(frames[2].bytes)
        if type(key) is not int:
            raise sp.ProtocolError("FUNC key is not an int")
        if key != function_key((module, qualname, pickled)):
            # Keys are content hashes: a blob cannot claim another's key.
            raise sp.ProtocolError("FUNC key does not match its function")
        if key in self.funcs:
            return
        size = len(frames[2])
        if len(self.funcs) >= MAX_FUNCTIONS or self.funcs_bytes + size > MAX_FUNCTION_BYTES:
            self.counters["functions_refused"] += 1
            raise sp.ProtocolError("the scheduler holds %d functions (%d bytes): no room for"
                                   " another" % (len(self.funcs), self.funcs_bytes))
        self.funcs[key] = [frames[1], frames[2]]
        self.funcs_bytes += size

    def cancel(self, client: _Client, ids: Optional[Iterable[int]]) -> None:
        """Drop queued tasks of ``client`` (all of them when ``ids`` is None)."""
        rec: Optional[Record]
        if ids is None:
            for rec in client.queue:
                rec[_Q] = True
                self.records.pop(rec[_TID], None)
            client.queue.clear()
            return
        for tid in ids:
            rec = self.records.get(tid)
            if rec is not None and rec[_WORKER] is None and rec[_CLIENT] is client:
                rec[_Q] = True
                del self.records[tid]

    def worker_stats(self, now: float) -> List[Dict[str, Any]]:
        """One dict per worker, for STATS."""
        return [{"host": w.host, "pid": w.pid, "tasks": w.tasks,
                 "mean_task_seconds": (w.busy / w.tasks) if w.tasks else 0.0,
                 "state": "busy" if w.inhand else "idle",
                 "last_seen": now - w.last_seen, "in_hand": len(w.inhand),
                 "credit": w.credit, "worker_no": w.no, "uptime": now - w.born,
                 "task_age": (now - w.head_since) if w.inhand else None,
                 "trusted": w.trusted, "leases": len(w.leases)}
                for w in self.workers.values()]

    def results(self, worker: _Worker, frames: Sequence[sp.Frame], count: int,
                credit: int) -> None:
        """A RESULTS message from ``worker``: accept what it holds, forward."""
        table = frames[2].bytes
        data = frames[3:]
        counters = self.counters
        counters["result_batches"] += 1
        counters["results"] += count
        ledger = self.records
        inhand = worker.inhand
        if credit:
            worker.credit = credit
        forward = []
        first_client: Optional[_Client] = None
        regroup = False
        parsed = sp.scan(table, count, sp.RESULT_ENTRY, len(data))
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
                self.timed -= 1
            tasks += items
            if 0.0 <= seconds < 1e9:  # a worker's clock, not a number to trust blindly
                busy += seconds
            client: _Client = rec[_CLIENT]
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
        clients = self.clients
        # The client may unpickle these results only if their worker is trusted.
        flags = sp.FLAG_TRUSTED if worker.trusted else 0
        if not regroup:
            # The common case: the batch goes to one client as it came.
            assert first_client is not None  # forward is not empty
            if clients.get(first_client.no) is first_client:
                self.send(first_client.rid, [sp.ctl(sp.RESULTS, count, flags), frames[2]]
                          + list(data))
            return
        groups: Dict[_Client, Tuple[List[bytes], List[sp.Frame]]] = {}
        for client, start, end, first, nfr in forward:
            g = groups.get(client)
            if g is None:
                groups[client] = g = ([], [])
            g[0].append(table[start:end])
            g[1].extend(data[first:first + nfr])
        for client, (ents, frs) in groups.items():
            if clients.get(client.no) is client:
                self.send(client.rid, [sp.ctl(sp.RESULTS, len(ents), flags), b"".join(ents)]
                          + frs)

    def fail(self, rec: Record, exc: BaseException) -> None:
        """Answer a task with a failure made here (every item fails)."""
        client: _Client = rec[_CLIENT]
        self.records.pop(rec[_TID], None)
        if self.clients.get(client.no) is not client:
            return
        frames = task_failure(exc, rec[_TID])
        entry, data = sp.pack_entry(sp.RESULT_ENTRY, (rec[_TID],), frames, (0, 0.0))
        # Made here, of native values only: trusted.
        self.send(client.rid, [sp.ctl(sp.RESULTS, 1, sp.FLAG_TRUSTED), entry] + list(data))

    def dispatch(self) -> None:
        """Hand queued tasks to workers with credit: in passes, each worker
        taking at most its share of what is queued, so that tasks whose
        duration is not known yet are spread rather than piled on the first
        worker; clients take turns."""
        active = self.active
        while active:
            ready = [w for w in self.workers.values()
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
                batch: List[Record] = []
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

    def _send_batch(self, worker: _Worker, client: _Client, batch: List[Record]) -> bool:
        now = time.monotonic()
        if not worker.inhand:
            worker.head_since = now
        funcs = worker.funcs
        missing = set(map(_key_of, batch)) - funcs
        for key in missing:  # each function once per worker, before its first task
            if not self.send(worker.rid, list(self.funcs[key])):
                self.requeue(batch)
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
                self.timed += 1
        worker.inhand_bytes += nbytes
        flags = sp.FLAG_TRUSTED if client.trusted else 0
        counters = self.counters
        counters["task_batches"] += 1
        counters["tasks"] += len(batch)
        if not self.send(worker.rid, [sp.ctl(sp.TASKS, len(batch), flags),
                                       b"".join(entries)] + frames):
            return False  # _gone re-queued the batch with the worker's other tasks
        return True

    def requeue(self, recs: Sequence[Record]) -> None:
        """Put tasks back at the front of their clients' queues, in order."""
        for rec in reversed(recs):
            rec[_WORKER] = None
            client: _Client = rec[_CLIENT]
            if self.clients.get(client.no) is not client or rec[_Q]:
                self.records.pop(rec[_TID], None)
                continue
            client.queue.appendleft(rec)
            if client not in self.active:
                self.active.append(client)

    # ------------------------------------------------------------ liveness

    def worker_gone(self, worker: _Worker, why: str, died: bool = True) -> None:
        """``worker`` left or was declared dead: what it held runs elsewhere
        (its running task fails instead when it timed out, or when it has
        now killed MAX_DEATHS workers). ``died``: whether the worker died
        (its connection closed or vanished); one that left alive (it said
        HELLO again, having dropped what it held, or was dropped for a
        malformed message) counts no death against its running task."""
        self.workers.pop(worker.rid, None)
        log.info("worker %d (%s pid %d) gone: %s; %d tasks to re-dispatch",
                 worker.no, worker.host, worker.pid, why, len(worker.inhand))
        self.counters["workers_lost"] += 1
        self._revoke(worker)
        recs = list(worker.inhand.values())
        worker.inhand.clear()
        self.timed -= sum(1 for rec in recs if rec[_TIMEOUT])
        if recs:
            head = recs[0]
            elapsed = time.monotonic() - worker.head_since
            if head[_TIMEOUT] and elapsed >= 0.9 * head[_TIMEOUT] / 1000:
                recs.pop(0)
                self.fail(head, TimeoutError("task ran for more than %g s"
                                             % (head[_TIMEOUT] / 1000)))
            elif died:
                head[_DEATHS] += 1
                if head[_DEATHS] >= MAX_DEATHS:
                    recs.pop(0)
                    self.fail(head, RuntimeError(
                        "the worker running this task died %d times (last: %s pid %d)"
                        % (head[_DEATHS], worker.host, worker.pid)))
        self.counters["redispatched"] += len(recs)
        self.requeue(recs)

    def client_gone(self, client: _Client) -> None:
        """``client`` left: its queued tasks go; results of its running
        ones will be dropped."""
        self.release_lease(client)
        if self.clients.get(client.no) is client:
            del self.clients[client.no]
        for rec in client.queue:
            self.records.pop(rec[_TID], None)
        client.queue.clear()
        if client in self.active:
            self.active.remove(client)

    # ------------------------------------------------------------ leases

    def lease(self, client: _Client) -> Optional[_Worker]:
        """Lease ``client`` a worker's direct socket (releasing the one it
        had): the worker with the fewest leases, then the fewest tasks in
        hand; None when no worker offers a direct socket."""
        self.release_lease(client)
        best: Optional[_Worker] = None
        for w in self.workers.values():
            if w.direct is not None and (best is None or (len(w.leases), len(w.inhand))
                                         < (len(best.leases), len(best.inhand))):
                best = w
        if best is not None:
            best.leases.add(client)
            client.lease = best
            self.counters["leases"] += 1
        return best

    def release_lease(self, client: _Client) -> None:
        """``client`` no longer leases a worker."""
        if client.lease is not None:
            client.lease.leases.discard(client)
            client.lease = None

    def _revoke(self, worker: _Worker) -> None:
        """``worker`` is gone: tell each client that leased it (REVOKE), so
        that it sends the tasks it gave the worker directly here instead."""
        clients, worker.leases = worker.leases, set()
        for client in clients:
            client.lease = None
            if self.clients.get(client.no) is client:
                self.counters["leases_revoked"] += 1
                self.send(client.rid, sp.message(sp.REVOKE, {"worker_no": worker.no}))

    def direct_done(self, worker: _Worker, note: Any) -> None:
        """A DIRECT note: tasks ``worker`` ran for direct clients (counted
        in its stats as the tasks the scheduler gave it are)."""
        if (type(note) is not dict or type(note.get("tasks")) is not int
                or type(note.get("seconds")) is not float or not 0 <= note["tasks"] < 1 << 40):
            raise sp.ProtocolError("DIRECT note of the wrong form")
        worker.tasks += note["tasks"]
        if 0.0 <= note["seconds"] < 1e9:
            worker.busy += note["seconds"]
        self.counters["direct_tasks"] += note["tasks"]

    def next_deadline(self, now: float) -> float:
        """When the first running task with a timeout times out (at most 1 s on)."""
        deadline = now + 1.0
        for w in self.workers.values():
            if w.inhand:
                head = next(iter(w.inhand.values()))
                if head[_TIMEOUT]:
                    deadline = min(deadline, w.head_since + head[_TIMEOUT] / 1000)
        return deadline

    def timed_out(self, now: float) -> List[_Worker]:
        """The workers whose running task has outlived its timeout."""
        out = []
        for w in self.workers.values():
            if w.inhand:
                head = next(iter(w.inhand.values()))
                if head[_TIMEOUT] and now - w.head_since >= head[_TIMEOUT] / 1000:
                    out.append(w)
        return out

