"""The results of one map/imap: chunking, the in-flight window, ordering.

A :class:`ResultStream` reads its input lazily in chunks (``chunksize``,
as in multiprocessing), each chunk its own task; sends them in batches
while its window has room (``max_ahead`` items and ``max_ahead_bytes``
bytes of encoded arguments read ahead of the consumer, the bytes placed in
shared-memory slots included), so ``imap`` over
an endless generator runs in bounded memory; and yields the results in
input order or as they come. A failing item fails alone: the other items
of its chunk still return their results. It is the
:class:`zmq_cluster.client.ResultSink` of its tasks, and reaches the pool
only through a :class:`~zmq_cluster.poollink.PoolLink`.
"""

import collections
import itertools
import sys
import threading
import time
from typing import (
    Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple,
)

from . import framing
from .poollink import RUN, PoolLink
from .protocol import COPY_THRESHOLD, KIND_RESULT
from .taskcodec import MODE_SHM_RESULTS, rebuild_error

__all__ = ["ResultStream", "BATCH_TASKS", "BATCH_BYTES"]

_decode = framing.decode
_encode_task_table = framing.encode_task_table

#: Tasks per batch a stream sends at once, at most.
BATCH_TASKS = 256
#: Bytes of arguments per batch, about.
BATCH_BYTES = 4 << 20

#: A chunk's outcome: its values, the exceptions of its failed items by
#: position (or None), and the bytes of its encoded arguments.
_Chunk = Tuple[List[Any], Optional[Dict[int, BaseException]], int]


class ResultStream:
    """The results of one map/imap: reads input lazily, submits chunks in
    batches within its window, yields results in order or as they come.

    ``link``: the PoolLink of the pool. ``fn`` runs on each item (``mode``:
    schedproto.MODE_MAP) or on each item's arguments (MODE_STAR);
    ``ordered``: results in input order (else as they arrive);
    ``progress``: a tqdm bar of ``total`` items (None: unknown);
    ``max_ahead``/``max_ahead_bytes``: the window."""

    def __init__(self, link: PoolLink, fn: Callable[..., Any], iterable: Iterable[Any],
                 chunksize: int, mode: int, ordered: bool, progress: bool,
                 total: Optional[int], max_ahead: int, max_ahead_bytes: int) -> None:
        if chunksize < 1:
            raise ValueError("chunksize must be at least 1, not %r" % (chunksize,))
        self._link = link
        self._client = link.client
        self._key = self._client.function_key(fn)
        self._mode = mode
        self._ordered = ordered
        self._chunks = self._chunked(iter(iterable), chunksize)
        self._timeout_ms = link.timeout_ms
        self._allow_pickle = link.allow_pickle
        self._max_ahead = max_ahead
        self._max_ahead_bytes = max_ahead_bytes
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
    def _chunked(it: Iterator[Any], size: int) -> Iterator[Sequence[Any]]:
        if size == 1:
            return zip(it)  # 1-tuples, made in C (a chunk is any sequence)
        return ResultStream._slices(it, size)

    @staticmethod
    def _slices(it: Iterator[Any], size: int) -> Iterator[List[Any]]:
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

    def _has_arrived(self) -> bool:
        return bool(self._arrived)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # consumer side
    def __iter__(self) -> "ResultStream":
        return self

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

    __next__ = next  # (one call per item less than a wrapper)

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
            # Read the results in this thread when it may (no other thread
            # reads for itself): no hand-off from the pool's I/O thread.
            start = time.monotonic()
            self._client.read_until(self._has_arrived, timeout)
            if self._arrived:
                continue
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
            with self._cond:
                if not self._arrived:
                    if not self._cond.wait(left) and not self._arrived:
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
        """Read and submit chunks while the window has room, in batches
        (framing.encode_task_table makes each batch's table)."""
        if self._exhausted:
            return
        max_ahead = self._max_ahead
        max_bytes = self._max_ahead_bytes
        ahead = self._ahead
        ahead_bytes = self._ahead_bytes
        if max_ahead - ahead < min(64, max(1, max_ahead // 4)) and ahead:
            return
        if ahead_bytes >= max_bytes:
            return
        link = self._link
        reserve = self._client.reserve_task_ids
        key = self._key
        timeout = self._timeout_ms
        meta = self._meta
        chunks = self._chunks
        count = self._chunk_count
        batch = self._batch
        shm = link.shm
        copies = link.copies_sent
        pin = link.pin_encoded
        mode = self._mode if shm is None else self._mode | MODE_SHM_RESULTS
        try:
            while ahead < max_ahead and (ahead_bytes < max_bytes or not ahead):
                if not ahead and link.state != RUN:
                    break
                first = reserve(batch)
                table, frames, lengths, sizes, stop = _encode_task_table(
                    chunks, mode, key, timeout, first, batch, max_ahead - ahead,
                    min(max_bytes - ahead_bytes, BATCH_BYTES), copies, shm, pin)
                k = len(sizes)
                if k:
                    tids = range(first, first + k)
                    meta.update(zip(tids, zip(range(count, count + k), lengths, sizes)))
                    count += k
                    nbytes = sum(sizes)
                    ahead += sum(lengths)
                    ahead_bytes += nbytes
                    link.send_table(table, k, frames, tids, self)
                    if k >= batch or nbytes >= BATCH_BYTES:
                        # Small first batches get the workers going; then larger ones.
                        batch = min(BATCH_TASKS, 2 * batch)
                if stop is None:
                    continue
                if stop is StopIteration:
                    self._exhausted = True
                    break
                exc, chunk = stop
                if chunk is None:  # the input raised
                    self._exhausted = True
                    self._input_error = exc
                    break
                # A chunk that cannot be sent (an argument that does not
                # encode): its items go alone, and one that cannot fails at
                # its place.
                if len(chunk) > 1:
                    chunks = self._chunks = itertools.chain(zip(chunk), chunks)
                else:
                    self._outcome(count, [None], {0: exc}, 0)
                    count += 1
                    ahead += 1
        finally:
            self._chunk_count = count
            self._ahead = ahead
            self._ahead_bytes = ahead_bytes
            self._batch = batch

    def _take(self) -> None:
        """Move arrived results into the ready queue (in order if ordered)."""
        arrived = self._arrived
        popleft = arrived.popleft
        setting = self._allow_pickle
        meta = self._meta
        get_meta = meta.get
        ordered = self._ordered
        ready_append = self._ready.append
        link = self._link
        pins = link.pins
        shm = link.shm
        copies = link.copies_received
        done = 0
        try:
            while arrived:
                tid, frames, trusted = popleft()
                if tid is None:  # the connection is lost: every pending chunk fails
                    for t in list(meta):
                        link.unpin(t)
                        n = meta[t][1]
                        self._store(t, [None] * n, {i: frames for i in range(n)})
                    continue
                info = get_meta(tid)
                if info is None:
                    continue
                if pins:
                    link.unpin(tid)
                done += 1
                n = info[1]
                errs: Optional[Dict[int, BaseException]] = None
                allow = trusted if setting is None else setting
                try:
                    kind, _, body = _decode(frames, allow, COPY_THRESHOLD, None, copies, shm)
                    values, errors = body
                    if kind != KIND_RESULT:
                        raise ValueError("a message of kind %d as a result" % kind)
                except Exception as exc:
                    link.refused(tid, exc)
                    values, errs = [None] * n, {i: exc for i in range(n)}
                else:
                    if errors is None and type(values) is list and len(values) == n:
                        pass  # every item ran
                    elif values is None and errors:  # the whole task failed (the scheduler said)
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
                link.tasks_done(done)

    def _store(self, tid: int, values: List[Any],
               errors: Optional[Dict[int, BaseException]]) -> None:
        index, _, nbytes = self._meta.pop(tid)
        self._outcome(index, values, errors, nbytes)

    def _outcome(self, index: int, values: List[Any],
                 errors: Optional[Dict[int, BaseException]], nbytes: int) -> None:
        """Chunk ``index``'s outcome is known: ready now (unordered), or
        once every chunk before it is (ordered)."""
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
                self._link.unpin(tid)
            self._link.tasks_done(len(ids))
            self._meta.clear()
            try:
                self._client.cancel(ids)
            except Exception:
                pass
        self._finish()
