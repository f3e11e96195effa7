"""ClusterPool: multiprocessing.Pool's API (plus futures) on a scheduler.

Tasks are chunks of items (``chunksize``, as in multiprocessing), each its
own task id, ledger entry and result; chunks travel in batches. A failing
item fails alone: the other items of its chunk still return their results.
Lazy input is read only as the stream's window frees up (``max_ahead``
items and ``max_ahead_bytes`` bytes of encoded arguments read ahead of the
consumer), so ``imap`` over an endless generator runs in bounded memory.
"""

import collections
import concurrent.futures
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Sized
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, List,
                    Optional, Tuple, TypeVar, Union)

from . import schedproto as sp
from .client import SchedulerClient
from . import framing
from .protocol import KIND_REQUEST, KIND_RESULT
from .schedproto import INLINE_HEADER_MAX
from .config import Config
from .taskcodec import CopyCount, decode_result, encode_task, rebuild_error

if TYPE_CHECKING:
    from .local import LocalCluster
    from .security import ClientSecurity

T = TypeVar("T")

_encode = framing.encode
_decode = framing.decode
_TASK_ENTRY_PACK = sp.TASK_ENTRY.pack

__all__ = ["ClusterPool"]

log = logging.getLogger("zmq_cluster.pool")

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"
#: Tasks per batch a stream sends at once, at most.
BATCH_TASKS = 256
#: Bytes of arguments per batch, about.
BATCH_BYTES = 4 << 20

#: A chunk's outcome: its values, the exceptions of its failed items by
#: position (or None), and the bytes of its encoded arguments.
_Chunk = Tuple[List[Any], Optional[Dict[int, BaseException]], int]


def _frames_nbytes(frames: Iterable[Any]) -> int:
    n = 0
    for f in frames:
        n += len(f) if isinstance(f, bytes) else memoryview(f).nbytes
    return n


class _Future(concurrent.futures.Future):
    """A Future whose cancel() also drops the task at the scheduler, and
    whose result() and exception() read the result connection themselves
    while they wait (see SchedulerClient.read_until): the result wakes the
    waiting thread directly, not through the pool's I/O thread."""

    _pool: Optional["ClusterPool"] = None
    _tid: int = 0

    def _read_until_done(self, timeout: Optional[float]) -> Optional[float]:
        """Wait in the result connection (when this thread may) until done;
        the time left of ``timeout``."""
        pool = self._pool
        if pool is None or self.done():
            return timeout
        if timeout is None:
            pool._client.read_until(self.done)
            return None
        deadline = time.monotonic() + timeout
        pool._client.read_until(self.done, timeout)
        return max(0.0, deadline - time.monotonic())

    def result(self, timeout: Optional[float] = None) -> Any:
        return super().result(self._read_until_done(timeout))

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        return super().exception(self._read_until_done(timeout))

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        pool = self._pool
        if pool is not None and pool._client.forget(self._tid) is not None:
            pool._tasks_done(1)
            try:
                pool._client.cancel([self._tid])
            except Exception:
                pass  # the pool is closing: nothing will run it
        return True


def _allow(setting: Optional[bool], trusted: bool) -> bool:
    """Whether a result may be unpickled: the pool's ``allow_pickle`` when
    set, else the trust of the result's path (connection and worker)."""
    return trusted if setting is None else setting


def _refused(pool: "ClusterPool", tid: int, exc: BaseException) -> None:
    """A result that does not decode (a pickle from an untrusted worker, a
    malformed message): logged and counted; it fails its items."""
    reason = "pickle_refused" if "pickle" in str(exc) else "malformed_results"
    pool._client.counters[reason] += 1
    log.warning("pool refused the result of task %x: %s", tid, exc)


class _FutureSink:
    __slots__ = ("future", "allow_pickle", "pool")

    def __init__(self, future: "concurrent.futures.Future[Any]", allow_pickle: Optional[bool],
                 pool: "ClusterPool") -> None:
        self.future = future
        self.allow_pickle = allow_pickle
        self.pool = pool

    def deliver(self, tid: int, frames: List[Any], trusted: bool = False) -> None:
        allow = _allow(self.allow_pickle, trusted)
        outcome: Any
        try:
            values, errors = decode_result(frames, allow, self.pool.copies_received)
        except Exception as exc:
            _refused(self.pool, tid, exc)
            ok, outcome = False, exc
        else:
            if errors:
                ok, outcome = False, rebuild_error(errors[0], allow)
            else:
                ok, outcome = True, values[0]
        if self.future.set_running_or_notify_cancel():
            if ok:
                self.future.set_result(outcome)
            else:
                self.future.set_exception(outcome)
        self.pool._tasks_done(1)

    def fail(self, exc: BaseException) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(exc)
        self.pool._tasks_done(1)

    def wake(self) -> None:
        pass


class _Stream:
    """The results of one map/imap: reads input lazily, submits chunks in
    batches within its window, yields results in order or as they come."""

    def __init__(self, pool: "ClusterPool", fn: Callable[..., Any], iterable: Iterable[Any],
                 chunksize: int, mode: int, ordered: bool, progress: bool,
                 total: Optional[int], max_ahead: int) -> None:
        if chunksize < 1:
            raise ValueError("chunksize must be at least 1, not %r" % (chunksize,))
        self._pool = pool
        self._client = pool._client
        self._key = self._client.function_key(fn)
        self._mode = mode
        self._ordered = ordered
        self._chunks = self._chunked(iter(iterable), chunksize)
        self._timeout_ms = pool._timeout_ms
        self._allow_pickle = pool._allow_pickle
        self._max_ahead = max_ahead
        self._max_ahead_bytes = pool._max_ahead_bytes
        self._cond = threading.Condition(threading.Lock())
        # (tid, frames, trusted), or (None, exception, False): the connection is lost
        self._arrived: Deque[Tuple[Optional[int], Any, bool]] = collections.deque()
        self._meta: Dict[int, Tuple[int, int, int]] = {}  # tid -> (chunk index, n items, nbytes)
        self._done: Dict[int, _Chunk] = {}  # chunk index -> outcomes (ordered streams)
        self._next_chunk = 0   # next chunk index to yield (ordered)
        self._chunk_count = 0  # chunks read from the input
        self._ready: Deque[_Chunk] = collections.deque()  # (values, {index: exc} or None, nbytes)
        self._cur: Optional[_Chunk] = None  # the chunk being yielded, and the position in it
        self._pos = 0
        self._ahead = 0        # items read, not yet yielded
        self._ahead_bytes = 0
        self._exhausted = False
        self._batch = 4        # tasks in the next batch sent
        self._input_error: Optional[Exception] = None
        self._finished = False
        self._bar: Any = None  # a tqdm progress bar
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, file=sys.stderr, unit="item")

    @staticmethod
    def _chunked(it: Iterator[Any], size: int) -> Iterator[List[Any]]:
        if size == 1:
            for x in it:
                yield [x]
            return
        while True:
            chunk = list(itertools.islice(it, size))
            if not chunk:
                return
            yield chunk

    # called by the I/O thread
    def deliver(self, tid: int, frames: List[Any], trusted: bool = False) -> None:
        self._arrived.append((tid, frames, trusted))

    def fail(self, exc: BaseException) -> None:
        self._arrived.append((None, exc, False))

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # consumer side
    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: Optional[float] = None) -> Any:
        """The next result; raises the task's exception at its place (and
        goes on with the next item when called again), StopIteration at the
        end, TimeoutError after ``timeout`` seconds without one."""
        while True:
            cur = self._cur
            if cur is not None:
                values, errors, nbytes = cur
                i = self._pos
                self._pos = i + 1
                self._ahead -= 1
                if self._pos == len(values):
                    self._cur = None
                    self._ahead_bytes -= nbytes
                if self._bar is not None:
                    self._bar.update(1)
                if errors is not None and i in errors:
                    raise errors[i]
                return values[i]
            ready = self._ready
            if ready:
                chunk = ready.popleft()
                values = chunk[0]
                if len(values) == 1:  # chunksize 1: no position to keep
                    self._ahead -= 1
                    self._ahead_bytes -= chunk[2]
                    if self._bar is not None:
                        self._bar.update(1)
                    if chunk[1] is not None:
                        raise chunk[1][0]
                    return values[0]
                self._cur = chunk
                self._pos = 0
                continue
            if not self._wait(timeout):
                self._finish()
                if self._input_error is not None:
                    exc, self._input_error = self._input_error, None
                    raise exc
                raise StopIteration

    def _wait(self, timeout: Optional[float]) -> bool:
        """Submit what the window allows and wait for results to move into
        the ready queue: False at the end of the stream."""
        while not self._ready:
            self._fill()
            if self._arrived:
                self._take()
                continue
            if self._exhausted and not self._meta and not self._done:
                return False
            with self._cond:
                if not self._arrived:
                    if not self._cond.wait(timeout) and not self._arrived:
                        assert timeout is not None  # wait(None) returns only when notified
                        raise TimeoutError("no result within %g s" % timeout)
        return True

    def collect(self) -> List[Any]:
        """Every result, in order, as a list (map): chunk by chunk, raising
        the first failure in input order and cancelling the rest."""
        out: List[Any] = []
        extend = out.extend
        try:
            while self._wait(None):
                ready = self._ready
                while ready:
                    values, errors, nbytes = ready.popleft()
                    self._ahead -= len(values)
                    self._ahead_bytes -= nbytes
                    if errors is not None:
                        raise errors[min(errors)]
                    extend(values)
                    if self._bar is not None:
                        self._bar.update(len(values))
        except BaseException:
            self.cancel()
            raise
        self._finish()
        if self._input_error is not None:
            raise self._input_error
        return out

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            if self._bar is not None:
                self._bar.close()

    def _fill(self) -> None:
        """Read and submit chunks while the window has room."""
        if self._exhausted:
            return
        pool = self._pool
        room = self._max_ahead - self._ahead
        if room < min(64, max(1, self._max_ahead // 4)) and self._ahead:
            return
        if self._ahead_bytes >= self._max_ahead_bytes:
            return
        entries: List[bytes] = []
        frames: List[Any] = []
        tids: List[int] = []
        batch_bytes = 0
        client = self._client
        new_id = client.new_task_id
        pack = _TASK_ENTRY_PACK
        key = self._key
        timeout = self._timeout_ms
        task = (self._mode, None)
        meta = self._meta
        chunks = self._chunks
        while self._ahead < self._max_ahead and (self._ahead_bytes < self._max_ahead_bytes
                                                 or not self._ahead):
            if pool._state != _RUN and not self._ahead:
                break
            try:
                chunk = next(chunks)
            except StopIteration:
                self._exhausted = True
                break
            except Exception as exc:
                self._exhausted = True
                self._input_error = exc
                break
            tid = new_id()
            msg = _encode((task[0], chunk), KIND_REQUEST, tid, pool.copies_sent)
            header = msg[0]
            if len(msg) == 1 and len(header) < INLINE_HEADER_MAX:
                entry = pack(tid, key, timeout, len(header), 0) + header
                nbytes = len(entry)
            else:
                entry, data = sp.pack_entry(sp.TASK_ENTRY, (tid, key, timeout), msg)
                nbytes = len(entry) + _frames_nbytes(data)
                frames.extend(data)
            n = len(chunk)
            meta[tid] = (self._chunk_count, n, nbytes)
            self._chunk_count += 1
            self._ahead += n
            self._ahead_bytes += nbytes
            entries.append(entry)
            tids.append(tid)
            batch_bytes += nbytes
            if len(entries) >= self._batch or batch_bytes >= BATCH_BYTES:
                pool._send(entries, frames, tids, self)
                entries, frames, tids = [], [], []
                batch_bytes = 0
                # Small first batches get the workers going; then larger ones.
                self._batch = min(BATCH_TASKS, 2 * self._batch)
        if entries:
            pool._send(entries, frames, tids, self)

    def _take(self) -> None:
        """Move arrived results into the ready queue (in order if ordered)."""
        arrived = self._arrived
        setting = self._allow_pickle
        meta = self._meta
        ordered = self._ordered
        ready_append = self._ready.append
        done = 0
        try:
            while arrived:
                tid, frames, trusted = arrived.popleft()
                if tid is None:  # the connection is lost: every pending chunk fails
                    for t in list(meta):
                        n = meta[t][1]
                        self._store(t, [None] * n, {i: frames for i in range(n)})
                    continue
                info = meta.get(tid)
                if info is None:
                    continue
                done += 1
                n = info[1]
                errs: Optional[Dict[int, BaseException]] = None
                allow = trusted if setting is None else setting
                try:
                    kind, _, body = _decode(frames, allow, stats=self._pool.copies_received)
                    values, errors = body
                    if kind != KIND_RESULT:
                        raise ValueError("a message of kind %d as a result" % kind)
                except Exception as exc:
                    _refused(self._pool, tid, exc)
                    values, errs = [None] * n, {i: exc for i in range(n)}
                else:
                    if values is None and errors:  # the whole task failed (the scheduler said)
                        failure = rebuild_error(errors[0], allow)
                        values, errs = [None] * n, {i: failure for i in range(n)}
                    elif type(values) is not list or len(values) != n:
                        failure = ValueError("a result of %r for a chunk of %d items"
                                             % (type(values), n))
                        values, errs = [None] * n, {i: failure for i in range(n)}
                    elif errors:
                        errs = {e[0]: rebuild_error(e, allow) for e in errors}
                if ordered:
                    self._store(tid, values, errs)
                else:
                    del meta[tid]
                    ready_append((values, errs, info[2]))
        finally:
            if done:
                self._pool._tasks_done(done)

    def _store(self, tid: int, values: List[Any],
               errors: Optional[Dict[int, BaseException]]) -> None:
        index, n, nbytes = self._meta.pop(tid)
        if self._ordered:
            done = self._done
            done[index] = (values, errors, nbytes)
            nxt = self._next_chunk
            while nxt in done:
                self._ready.append(done.pop(nxt))
                nxt += 1
            self._next_chunk = nxt
        else:
            self._ready.append((values, errors, nbytes))

    def cancel(self) -> None:
        """Drop what is still queued for this stream (after a failure in map)."""
        ids = list(self._meta)
        if ids:
            for tid in ids:
                self._client.forget(tid)
            self._pool._tasks_done(len(ids))
            self._meta.clear()
            try:
                self._client.cancel(ids)
            except Exception:
                pass
        self._finish()


_EMPTY_CONFIG = Config()


def _resolve(cluster: "LocalCluster | str | None", config: "str | os.PathLike[str] | None",
             given: Dict[str, Any]
             ) -> Tuple[Optional[str], "Optional[ClientSecurity]", Dict[str, Any]]:
    """The scheduler's address (None: start a LocalCluster), the client's
    security and the settings, from ``cluster``, a config file and the
    arguments given (None: not given)."""
    from .config import merge, read_config, read_scheduler_file
    from .security import client_security
    values = merge({"heartbeat_timeout": 10.0},
                   read_config(config) if config is not None else _EMPTY_CONFIG, given)
    public_key = None
    if cluster is None:
        if values.get("connect") is not None and values.get("scheduler_file") is not None:
            raise ValueError("config file %s gives both connect and scheduler_file" % config)
        if values.get("connect") is not None:
            address = values["connect"]
        elif values.get("scheduler_file") is not None:
            found = read_scheduler_file(values["scheduler_file"])
            address, public_key = found.address, found.public_key
        else:
            address = None
    else:
        address = cluster if isinstance(cluster, str) else cluster.address
        if not address:
            raise ValueError("the cluster has no address (is it closed?)")
    security = client_security(secret_key=values.get("secret_key"),
                               scheduler_key=values.get("scheduler_key"),
                               keys=values.get("keys"), scheduler_public_key=public_key)
    if security is None and public_key is not None:
        raise ValueError("the scheduler uses CURVE (its scheduler file records its public key):"
                         " give keys= or secret_key=")
    return address, security, values


class ClusterPool:
    """A pool of workers behind a scheduler, used like multiprocessing.Pool.

    ``cluster``: a LocalCluster (or anything with an ``address``), a
    scheduler address (``"tcp://head:5555"``, ``"ipc://..."``), or None to
    start a LocalCluster owned (and closed) by the pool.

    ``task_timeout``: seconds after which a running task (a chunk) is
    abandoned, its worker replaced, and the task fails with TimeoutError.
    ``allow_pickle``: whether results may be unpickled here (exceptions
    rebuilt as their own type, pickled return values). None (the default)
    follows the pickle rule of :mod:`zmq_cluster.trust`: results are
    unpickled only when this pool's connection to the scheduler is
    authenticated (CURVE) or local (loopback, ipc in a private directory)
    *and* the scheduler says the worker that made them is too; elsewhere a
    pickled result is refused unexecuted (logged, counted, and the items
    fail saying why). ``max_ahead``/``max_ahead_bytes``: how
    far a map/imap reads its input ahead of the consumer (items, bytes of
    encoded arguments). ``socket_options``: extra options for the sockets to
    the scheduler.

    **Many machines.** ``secret_key`` (this side's secret key file, e.g.
    ``DIR/client.key_secret``) and ``scheduler_key`` (the scheduler's public
    key file), or ``keys`` (a ``zmq-cluster keygen`` directory, standing for
    both), connect to a CURVE scheduler. ``config``: a TOML config file (as
    the command line's ``--config``): its ``connect`` or ``scheduler_file``
    says where the scheduler is when ``cluster`` is None, its
    ``secret_key``/``scheduler_key``/``keys`` and ``heartbeat_timeout``
    serve when not given here, and its ``malloc_tuning`` applies to the
    LocalCluster the pool starts when it names no scheduler. A scheduler
    file that records the scheduler's public key makes ``scheduler_key``
    unnecessary.

    **Copies.** ``copies_sent.copied_bytes`` and
    ``copies_received.copied_bytes`` (``taskcodec.CopyCount``) count the
    payload bytes this pool's codec copied encoding tasks and decoding
    results (docs/protocol.md, "Decoding: views, copies, alignment"):
    contiguous arrays go out as views (0), and a result array of 1 MiB or
    more arrives copied once (assembled or aligned to 64 bytes). The
    scheduler in between forwards frames without decoding or copying them.
    """

    def __init__(self, cluster: "LocalCluster | str | None" = None, *,
                 task_timeout: Optional[float] = None, allow_pickle: Optional[bool] = None,
                 max_ahead: int = 4096, max_ahead_bytes: int = 256 << 20,
                 heartbeat_timeout: Optional[float] = None,
                 socket_options: Optional[Dict[int, Any]] = None,
                 connect_timeout: float = 30.0,
                 config: "str | os.PathLike[str] | None" = None,
                 secret_key: "str | os.PathLike[str] | None" = None,
                 scheduler_key: "str | os.PathLike[str] | None" = None,
                 keys: "str | os.PathLike[str] | None" = None) -> None:
        self._own_cluster = None
        self.copies_sent = CopyCount()
        self.copies_received = CopyCount()
        address, security, settings = _resolve(cluster, config, dict(
            secret_key=secret_key, scheduler_key=scheduler_key, keys=keys,
            heartbeat_timeout=heartbeat_timeout))
        if address is None:
            from .local import LocalCluster
            cluster = self._own_cluster = LocalCluster(
                malloc_tuning=bool(settings.get("malloc_tuning")))
            address = cluster.address
        self.address = address
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be positive")
        self._timeout_ms = 0 if task_timeout is None else max(1, int(task_timeout * 1000))
        self._allow_pickle = allow_pickle
        self._max_ahead = max(1, int(max_ahead))
        self._max_ahead_bytes = max(1, int(max_ahead_bytes))
        self._state = _RUN
        self._pending = 0
        self._cond = threading.Condition()
        try:
            self._client = SchedulerClient(address,
                                           heartbeat_timeout=settings["heartbeat_timeout"],
                                           socket_options=socket_options,
                                           connect_timeout=connect_timeout, security=security)
        except BaseException:
            if self._own_cluster is not None:
                self._own_cluster.close()
            raise

    @property
    def trusted(self) -> bool:
        """Whether this pool's connection to the scheduler is authenticated
        or local (results of trusted workers may then be unpickled)."""
        return self._client.trusted

    # ---------------------------------------------------------------- state

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _send(self, entries: List[bytes], frames: List[Any], tids: List[int],
              sink: Union[_FutureSink, _Stream]) -> None:
        with self._cond:
            self._pending += len(tids)
        self._client.send_tasks(entries, frames, tids, sink)

    def _tasks_done(self, n: int) -> None:
        with self._cond:
            self._pending -= n
            if self._pending <= 0:
                self._cond.notify_all()

    def _workers(self) -> int:
        try:
            return max(1, len(self._client.stats()["workers"]))
        except Exception:
            return max(1, self._client.workers_at_start)

    # ------------------------------------------------------------------ API

    def submit(self, fn: Callable[..., T], /, *args: Any,
               **kwargs: Any) -> "concurrent.futures.Future[T]":
        """Run ``fn(*args, **kwargs)`` on a worker: a concurrent.futures.Future.

        Arrays among the arguments are sent without a copy: do not change
        them until the future is done."""
        self._check_running()
        client = self._client
        key = client.function_key(fn)
        tid = client.new_task_id()
        fut = _Future()
        fut._pool, fut._tid = self, tid
        msg = encode_task(sp.MODE_CALL, [(args, kwargs)], tid, self.copies_sent)
        entry, data = sp.pack_entry(sp.TASK_ENTRY, (tid, key, self._timeout_ms), msg)
        sink = _FutureSink(fut, self._allow_pickle, self)
        self._send([entry], list(data), [tid], sink)
        return fut

    def apply(self, fn: Callable[..., T], args: Iterable[Any] = (),
              kwds: Optional[Dict[str, Any]] = None) -> T:
        """``fn(*args, **kwds)`` on a worker, waiting for its result."""
        return self.submit(fn, *args, **(kwds or {})).result()

    def _stream(self, fn: Callable[..., Any], iterable: Iterable[Any], chunksize: int, mode: int,
                ordered: bool, progress: bool, max_ahead: Optional[int] = None) -> _Stream:
        self._check_running()
        total = len(iterable) if isinstance(iterable, Sized) else None
        if max_ahead is None:
            # Lazy input: at most max_ahead items ahead, but never fewer than
            # eight chunks, or the workers would wait for the round trip.
            max_ahead = max(self._max_ahead, 8 * chunksize)
        return _Stream(self, fn, iterable, chunksize, mode, ordered, progress, total,
                       max_ahead)

    def imap(self, fn: Callable[[Any], T], iterable: Iterable[Any], chunksize: int = 1,
             progress: bool = False) -> Iterator[T]:
        """Like multiprocessing's imap: results in input order, input read lazily."""
        return self._stream(fn, iterable, chunksize, sp.MODE_MAP, True, progress)

    def imap_unordered(self, fn: Callable[[Any], T], iterable: Iterable[Any],
                       chunksize: int = 1, progress: bool = False) -> Iterator[T]:
        """Like imap, but results as they arrive."""
        return self._stream(fn, iterable, chunksize, sp.MODE_MAP, False, progress)

    def _chunksize(self, items: Sized, chunksize: Optional[int]) -> int:
        if chunksize is None:
            # multiprocessing's rule: about four chunks per worker.
            chunksize, extra = divmod(len(items), self._workers() * 4)
            if extra:
                chunksize += 1
            return max(1, chunksize)
        return chunksize

    def map(self, fn: Callable[[Any], T], iterable: Iterable[Any],
            chunksize: Optional[int] = None, progress: bool = False) -> List[T]:
        """``[fn(x) for x in iterable]`` on the workers, in order. Raises the
        first failure in input order (the rest of the map is cancelled)."""
        self._check_running()
        items = iterable if isinstance(iterable, Sized) else list(iterable)
        # The input is in memory already (as in multiprocessing): only the
        # bytes window bounds what is in flight.
        return self._stream(fn, items, self._chunksize(items, chunksize), sp.MODE_MAP, True,
                            progress, max_ahead=1 << 62).collect()

    def starmap(self, fn: Callable[..., T], iterable: Iterable[Iterable[Any]],
                chunksize: Optional[int] = None, progress: bool = False) -> List[T]:
        """``[fn(*args) for args in iterable]`` on the workers, in order."""
        self._check_running()
        items = iterable if isinstance(iterable, Sized) else list(iterable)
        return self._stream(fn, items, self._chunksize(items, chunksize), sp.MODE_STAR, True,
                            progress, max_ahead=1 << 62).collect()

    def stats(self) -> List[Dict[str, Any]]:
        """One dict per live worker: host, pid, tasks (items done),
        mean_task_seconds, state ("busy" or "idle"), last_seen (seconds
        since the scheduler last heard from it)."""
        keys = ("host", "pid", "tasks", "mean_task_seconds", "state", "last_seen")
        return [{k: w[k] for k in keys} for w in self._client.stats()["workers"]]

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """No more work; what was given still runs (see join)."""
        if self._state == _RUN:
            self._state = _CLOSE

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the tasks given to the pool, then release its connection
        (after close() or terminate(), as multiprocessing requires)."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        with self._cond:
            self._cond.wait_for(lambda: self._pending <= 0 or self._client.lost is not None,
                                timeout)
        self._shutdown()

    def terminate(self) -> None:
        """Cancel this pool's tasks (its pending futures are cancelled; other
        pools on the scheduler are untouched) and release its connection."""
        if self._state == _TERMINATE and self._client._closed:
            return
        self._state = _TERMINATE
        try:
            self._client.cancel(None)
        except Exception:
            pass
        for tid, sink in list(self._client._sinks.items()):
            self._client.forget(tid)
            if isinstance(sink, _FutureSink):
                concurrent.futures.Future.cancel(sink.future)
        with self._cond:
            self._pending = 0
            self._cond.notify_all()
        self._shutdown()

    def _shutdown(self) -> None:
        self._client.close()
        if self._own_cluster is not None:
            self._own_cluster.close()

    def __enter__(self) -> "ClusterPool":
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __del__(self) -> None:
        try:
            if self._state == _RUN and not self._client._closed:
                self.terminate()
        except Exception:
            pass
