"""ClusterPool: multiprocessing.Pool's API (plus futures) on a scheduler.

The public face of the pool layer. ``submit`` makes a
:class:`~zmq_cluster.poolfuture.PoolFuture` (one task);
map/imap/imap_unordered/starmap make a
:class:`~zmq_cluster.poolstream.ResultStream` (chunking, the in-flight
window, ordering). Both reach the pool only through its
:class:`~zmq_cluster.poollink.PoolLink` (the scheduler connection, the task
settings and the count of tasks in flight). This module also resolves
where the scheduler is (a cluster, an address, or a config file).
"""

import concurrent.futures
import os
from collections.abc import Sized
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List,
                    Optional, Tuple, TypeVar)

from . import framing
from . import schedproto as sp
from .client import SchedulerClient
from .config import Config
from .poolfuture import FutureSink, PoolFuture
from .poollink import CLOSE, RUN, TERMINATE, PoolLink
from .poolstream import ResultStream
from .sharedmem import SharedMemory, node_shared_memory
from .taskcodec import MODE_SHM_RESULTS, CopyCount

if TYPE_CHECKING:
    from .local import LocalCluster
    from .security import ClientSecurity

T = TypeVar("T")

__all__ = ["ClusterPool"]

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
    unnecessary. ``connect_timeout``: how long to wait for the scheduler's
    answer (TimeoutError after it); a scheduler that refuses this side at
    the handshake (a key it does not admit, keys on one side only) raises
    :class:`~zmq_cluster.exceptions.HandshakeRefused` at once.

    **Copies.** ``copies_sent.copied_bytes`` and
    ``copies_received.copied_bytes`` (``taskcodec.CopyCount``) count the
    payload bytes this pool's codec copied encoding tasks and decoding
    results (docs/protocol.md, "Decoding: views, copies, alignment"):
    contiguous arrays go out as views (0), and a result array of 1 MiB or
    more arrives copied once (assembled or aligned to 64 bytes). The
    scheduler in between forwards frames without decoding or copying them.

    **Shared memory** (same host; README "Shared memory"):
    ``shared_memory`` True (or a
    :class:`~zmq_cluster.sharedmem.SharedMemory`) sends arrays of 1 MiB and
    more by slot reference (copied once, into a memfd the workers map) and
    asks the workers to return large results the same way (the result is
    then a writeable, 64-byte-aligned view of the worker's slot, received
    with no copy). None (the default) turns it on when ``cluster`` is a
    LocalCluster made with ``shared_memory=True`` (or the pool starts its
    own), off for an address: a worker that cannot map the slots (another
    host, another uid, started without ``--shared-memory``) fails such a
    task saying why. A task's argument slots stay pinned until its result
    arrives (a task re-sent after its worker died finds them); when no slot
    is free an array goes over the socket. ``copies_sent`` then counts the
    bytes copied into slots.

    **Direct tasks.** ``direct`` (True by default): ``submit`` may send a
    task straight to a worker the scheduler leased this pool (a worker on
    this host, when the pool is on the scheduler's host and no CURVE is
    used), which answers straight back: two process hops instead of four.
    The pool keeps such a task until its result arrives and sends it
    through the scheduler if the lease ends first (the worker died, or its
    connection closed), so nothing is lost; maps, and tasks with a
    ``task_timeout``, always go through the scheduler (docs/scheduler.md,
    "Direct tasks").
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
                 keys: "str | os.PathLike[str] | None" = None,
                 shared_memory: "SharedMemory | bool | None" = None,
                 direct: bool = True) -> None:
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
        if shared_memory is None:
            shared_memory = (not isinstance(cluster, str)
                             and getattr(cluster, "shared_memory", False) is True)
        self.address = address
        #: The pool's SharedMemory (None: arrays go over the socket). Its
        #: producer starts with the first array sent by slot.
        try:
            self.shared_memory, self._own_shm = node_shared_memory(shared_memory)
        except BaseException:
            if self._own_cluster is not None:
                self._own_cluster.close()
            raise
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be positive")
        timeout_ms = 0 if task_timeout is None else max(1, int(task_timeout * 1000))
        self._max_ahead = max(1, int(max_ahead))
        self._max_ahead_bytes = max(1, int(max_ahead_bytes))
        try:
            self._client = SchedulerClient(address,
                                           heartbeat_timeout=settings["heartbeat_timeout"],
                                           socket_options=socket_options,
                                           connect_timeout=connect_timeout, security=security,
                                           direct=direct)
        except BaseException:
            if self._own_cluster is not None:
                self._own_cluster.close()
            raise
        self._link = PoolLink(self._client, timeout_ms=timeout_ms, allow_pickle=allow_pickle,
                              copies_sent=self.copies_sent,
                              copies_received=self.copies_received, shm=self.shared_memory)

    @property
    def trusted(self) -> bool:
        """Whether this pool's connection to the scheduler is authenticated
        or local (results of trusted workers may then be unpickled)."""
        return self._client.trusted

    # ---------------------------------------------------------------- state

    @property
    def _pending(self) -> int:
        """Tasks sent and not yet answered, failed or cancelled."""
        return self._link.pending

    def _check_running(self) -> None:
        if self._link.state != RUN:
            raise ValueError("Pool not running")

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
        link = self._link
        shm = link.shm
        mode = sp.MODE_CALL if shm is None else sp.MODE_CALL | MODE_SHM_RESULTS
        table, frames, _, _, stop = framing.encode_task_table(
            iter([((args, kwargs),)]), mode, key, link.timeout_ms, tid, 1, 1, 1,
            link.copies_sent, shm, link.pin_encoded)
        if stop not in (None, StopIteration):
            raise stop[0]  # an argument that does not encode
        fut = PoolFuture(link, tid)
        link.send_table(table, 1, frames, (tid,), FutureSink(fut, link, tid), direct=True)
        return fut

    def apply(self, fn: Callable[..., T], args: Iterable[Any] = (),
              kwds: Optional[Dict[str, Any]] = None) -> T:
        """``fn(*args, **kwds)`` on a worker, waiting for its result."""
        return self.submit(fn, *args, **(kwds or {})).result()

    def _stream(self, fn: Callable[..., Any], iterable: Iterable[Any], chunksize: int, mode: int,
                ordered: bool, progress: bool, max_ahead: Optional[int] = None) -> ResultStream:
        self._check_running()
        total = len(iterable) if isinstance(iterable, Sized) else None
        if max_ahead is None:
            # Lazy input: at most max_ahead items ahead, but never fewer than
            # eight chunks, or the workers would wait for the round trip.
            max_ahead = max(self._max_ahead, 8 * chunksize)
        return ResultStream(self._link, fn, iterable, chunksize, mode, ordered, progress, total,
                            max_ahead, self._max_ahead_bytes)

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
        since the scheduler last heard from it). Tasks a pool sent a worker
        directly (``direct``) are counted once the worker reports them (at
        most 50 ms after they ran); ``state`` says only whether the worker
        holds tasks the scheduler gave it."""
        keys = ("host", "pid", "tasks", "mean_task_seconds", "state", "last_seen")
        return [{k: w[k] for k in keys} for w in self._client.stats()["workers"]]

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """No more work; what was given still runs (see join)."""
        if self._link.state == RUN:
            self._link.state = CLOSE

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the tasks given to the pool, then release its connection
        (after close() or terminate(), as multiprocessing requires)."""
        if self._link.state == RUN:
            raise ValueError("Pool is still running")
        self._link.wait_idle(timeout)
        self._shutdown()

    def terminate(self) -> None:
        """Cancel this pool's tasks (its pending futures are cancelled; other
        pools on the scheduler are untouched) and release its connection."""
        if self._link.state == TERMINATE and self._client.closed:
            return
        self._link.state = TERMINATE
        try:
            self._client.cancel(None)
        except Exception:
            pass
        streams: Dict[int, Any] = {}
        for sink in self._client.forget_all():
            if isinstance(sink, FutureSink):
                concurrent.futures.Future.cancel(sink.future)
            else:
                streams[id(sink)] = sink
        # A map or imap in progress (in another thread, or resumed later)
        # fails its pending items and ends, rather than waiting for good.
        cancelled = concurrent.futures.CancelledError("the pool was terminated")
        for sink in streams.values():
            sink.fail(cancelled)
            sink.wake()
        self._link.drop_pending()
        self._shutdown()

    def _shutdown(self) -> None:
        self._client.close()
        self._link.unpin_all()
        if self._own_shm and self.shared_memory is not None:
            # Slots still held by workers are served until released;
            # results received from workers stay valid.
            self.shared_memory.close()
        if self._own_cluster is not None:
            self._own_cluster.close()

    def __enter__(self) -> "ClusterPool":
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __del__(self) -> None:
        try:
            if self._link.state == RUN and not self._client.closed:
                self.terminate()
        except Exception:
            pass
