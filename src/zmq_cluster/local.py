"""LocalCluster: a scheduler and worker processes on this host, by one line.

The scheduler runs as a subprocess (the default) or as a thread of this
process (``scheduler="thread"``, as dask's LocalCluster does), bound on its
public address and on an inproc address that pools made in this process
use. Each worker runs
as a ``python -m zmq_cluster._start worker`` subprocess that dies with this
process (see :mod:`zmq_cluster.process`).
The cluster is their nanny (:class:`zmq_cluster.supervisor.Supervisor`, the
same one ``zmq-cluster worker`` runs): a thread waits on the workers'
process descriptors (pidfd) and starts a new worker for each one that dies
(killed, crashed, or ended by its task timeout).

Nothing can clean up after a process killed with SIGKILL: its children die
with it, but its private directory stays. The next LocalCluster of the same
user removes such directories (:func:`remove_stale_directories`).
"""

import atexit
import logging
import math
import numbers
import os
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from typing import List, Optional

from .client import SchedulerClient
from .inprocess import SharedContext, register_in_process, unregister_in_process
from .process import python_command, spawn, worker_environment
from .scheduler import Scheduler
from .supervisor import Supervisor

__all__ = ["LocalCluster", "remove_stale_directories"]

log = logging.getLogger("zmq_cluster.local")

_LIVE: "weakref.WeakSet[LocalCluster]" = weakref.WeakSet()

#: The ``log_level`` values the scheduler and worker processes take.
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


#: The private directories of LocalClusters are ``$TMPDIR/zc-cluster-PID-XXXX``.
DIR_PREFIX = "zc-cluster-"
#: A directory younger than this is never taken for stale (its cluster may
#: be starting in a process this one cannot see, in another pid namespace).
STALE_AFTER_SECONDS = 60.0


def remove_stale_directories(where: Optional[str] = None) -> List[str]:
    """Remove the private directories that LocalClusters killed with SIGKILL
    left in ``where`` (default: the temporary directory); returns their paths.

    Their processes died with them, but nothing could remove the directory
    and its dead socket. One is stale when it is this user's, its creator
    (the PID in its name) is gone, it is older than
    :data:`STALE_AFTER_SECONDS`, and nothing listens on its socket.
    """
    where = where or tempfile.gettempdir()
    removed: List[str] = []
    try:
        names = os.listdir(where)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        pid_text = name[len(DIR_PREFIX):].partition("-")[0]
        if not name.startswith(DIR_PREFIX) or not pid_text.isdigit():
            continue
        path = os.path.join(where, name)
        try:
            info = os.lstat(path)
            if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
                    or now - info.st_mtime < STALE_AFTER_SECONDS):
                continue
            os.kill(int(pid_text), 0)
            continue  # its creator runs
        except ProcessLookupError:
            pass
        except OSError:  # gone meanwhile, or a pid we may not signal: not ours
            continue
        if _listening(os.path.join(path, "scheduler")):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _listening(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


@atexit.register
def _close_all() -> None:
    for cluster in list(_LIVE):
        cluster.close()


class LocalCluster:
    """A scheduler and ``n_workers`` worker processes on this host.

    ``n_workers`` defaults to the number of cores. ``transport`` is "ipc"
    (a socket in a private directory, mode 0700) or "tcp" (loopback, a free
    port). ``cluster.address`` is what a ClusterPool, in this or another
    process, connects to. Start-up waits (at most ``start_timeout``
    seconds) until every worker has said HELLO to the scheduler.
    ``close()`` or leaving the ``with`` block stops everything.
    ``heartbeat_timeout``: seconds without a heartbeat after which a worker
    is declared dead. ``log_level``: what the scheduler and worker processes
    log on stderr ("DEBUG", "INFO", "WARNING", "ERROR" or "CRITICAL").
    A wrong type or value raises TypeError or ValueError before anything
    starts.

    ``blas_threads`` (default 1): the thread count each worker's OpenMP,
    MKL and OpenBLAS may use (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS``), as dask's nanny does: the cluster already
    runs a worker per core. A variable already set in this process's
    environment is passed on as it is; ``None`` leaves all three alone.

    ``malloc_tuning`` (default False): start the scheduler and the workers
    with glibc's malloc tuned for large arrays (``GLIBC_TUNABLES``, see
    :data:`zmq_cluster.process.MALLOC_TUNABLES`): 64 MiB arrays moved 1.5-1.9x
    faster through ``pool.map`` in ``benchmarks/malloc_tuning.py``, at the
    cost of memory not returned to the OS (each process keeps its
    high-water mark, up to 1 GiB more than it uses). A tunable already set
    in this process's ``GLIBC_TUNABLES`` wins. Without glibc it does nothing.
    With ``scheduler="thread"`` only the workers are tuned (this process's
    malloc is not changed).

    ``scheduler`` (default "process"): where the scheduler runs.

    * ``"process"``: a subprocess (``python -m zmq_cluster._start
      scheduler``) that dies with this process, as the workers do;
      ``cluster.scheduler`` is its ``subprocess.Popen``. Every pool reaches
      it through ``address``.
    * ``"thread"``: a thread of this process (the same
      :class:`~zmq_cluster.scheduler.Scheduler`, as in dask's
      LocalCluster), bound on ``address`` and on an ``inproc://`` address in
      a context it shares with the pools made in this process, which
      connect there (:func:`zmq_cluster.inprocess.register_in_process`): their
      frames reach the scheduler by pointer, with no copy and no process
      hop. Its log lines go to this process's logging (``log_level`` is
      then unused); ``cluster.scheduler`` is None.

    The trade-off, measured side by side (``benchmarks/pool_speed.py``,
    README "Pool"): with the thread, the p50 round trip of
    ``pool.submit(f, x).result()`` is 21-25% shorter and 64 MiB arrays
    through ``pool.map`` move as fast or up to 1.5x faster; but the
    scheduler then shares this process's GIL with the pool's threads, and
    streams of tiny tasks (``imap_unordered`` with chunksize 1) move
    20-25% slower. "process" is the default because it keeps the
    small-task target of issue 7 (at least 5x ``multiprocessing.Pool``)
    that the thread misses, while the thread meets neither the latency nor
    (except on a quiet machine) the large-array target it improves: choose
    "thread" for interactive ``submit`` loops and large arrays.

    Pools in other processes reach either through ``address``.

    ``shared_memory`` (default True): start the workers with
    ``--shared-memory`` (they map the slots of pools on this host and
    return large results in slots of their own, only for pools that ask,
    see :class:`~zmq_cluster.pool.ClusterPool`); a ClusterPool given this
    cluster then uses shared memory by default.
    """

    def __init__(self, n_workers: Optional[int] = None, *, transport: str = "ipc",
                 heartbeat_timeout: float = 10.0, start_timeout: float = 60.0,
                 log_level: str = "WARNING", blas_threads: Optional[int] = 1,
                 malloc_tuning: bool = False, scheduler: str = "process",
                 shared_memory: bool = True) -> None:
        if not isinstance(malloc_tuning, bool):
            raise TypeError("malloc_tuning must be True or False, not %r" % (malloc_tuning,))
        if scheduler not in ("thread", "process"):
            raise ValueError("scheduler must be 'thread' or 'process', not %r" % (scheduler,))
        if transport not in ("ipc", "tcp"):
            raise ValueError("transport must be 'ipc' or 'tcp', not %r" % (transport,))
        if n_workers is not None and (isinstance(n_workers, bool)
                                      or not isinstance(n_workers, numbers.Integral)):
            raise TypeError("n_workers must be an integer or None, not %r" % (n_workers,))
        self.n_workers = (os.cpu_count() or 1) if n_workers is None else int(n_workers)
        if self.n_workers < 0:
            raise ValueError("n_workers must be >= 0")
        for name, value in (("heartbeat_timeout", heartbeat_timeout),
                            ("start_timeout", start_timeout)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError("%s must be a number of seconds, not %r" % (name, value))
            if not (value > 0 and math.isfinite(value)):
                raise ValueError("%s must be a finite number of seconds > 0, not %r"
                                 % (name, value))
        if log_level not in _LOG_LEVELS:
            raise ValueError("log_level must be one of %s, not %r"
                             % (", ".join(_LOG_LEVELS), log_level))
        self.transport = transport
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.log_level = log_level
        self.malloc_tuning = malloc_tuning
        #: Whether the workers take and give arrays by shared memory.
        self.shared_memory = bool(shared_memory)
        remove_stale_directories()
        self._dir = tempfile.mkdtemp(prefix="%s%d-" % (DIR_PREFIX, os.getpid()))
        os.chmod(self._dir, 0o700)
        self._closed = False
        self._lock = threading.Lock()
        #: "thread" or "process": where the scheduler runs.
        self.scheduler_mode = scheduler
        #: The scheduler's process ("process" mode), else None.
        self.scheduler: Optional[subprocess.Popen] = None
        self._thread: Optional[threading.Thread] = None
        self._sched: Optional[Scheduler] = None
        self._shared: Optional[SharedContext] = None
        self.address = ""
        self._control: Optional[SchedulerClient] = None
        self._nanny = Supervisor(self._worker_command, self.n_workers,
                                 env=worker_environment(blas_threads,
                                                        malloc_tuning=malloc_tuning))
        _LIVE.add(self)
        try:
            if scheduler == "thread":
                self._start_scheduler_thread()
            else:
                self._start_scheduler(start_timeout)
            self._control = SchedulerClient(self.address, heartbeat_timeout=heartbeat_timeout,
                                            connect_timeout=start_timeout)
            self._nanny.start()
            self.wait_for_workers(self.n_workers, start_timeout)
        except BaseException:
            # Start-up failed or was interrupted (Ctrl-C): workers that have
            # not joined would hear no STOP, and close() would wait for them.
            self._nanny.terminate(timeout=2.0)
            self.close()
            raise

    def _listen(self) -> str:
        return ("ipc://%s/scheduler" % self._dir if self.transport == "ipc"
                else "tcp://127.0.0.1:0")

    def _start_scheduler_thread(self) -> None:
        self._shared = SharedContext()
        endpoint = "inproc://zc-scheduler-%d-%x" % (os.getpid(), id(self))
        self._sched = Scheduler(self._listen(), heartbeat_timeout=self.heartbeat_timeout,
                                context=self._shared.context, inproc=endpoint)
        self.address = self._sched.address
        # Sockets may change threads across a full memory barrier: the start.
        self._thread = threading.Thread(target=self._run_scheduler, args=(self._sched,),
                                        name="zmq-cluster-scheduler", daemon=True)
        self._thread.start()
        register_in_process(self.address, self._shared, endpoint)

    @staticmethod
    def _run_scheduler(sched: Scheduler) -> None:
        try:
            sched.run()
        except BaseException:
            log.exception("the scheduler thread failed")

    def _start_scheduler(self, timeout: float) -> None:
        listen = self._listen()
        r, w_end = os.pipe()
        w: Optional[int] = w_end
        try:
            self.scheduler = spawn(python_command(
                "zmq_cluster._start", "scheduler", "--listen", listen, "--heartbeat-timeout",
                self.heartbeat_timeout, "--ready-fd", w_end, "--log-level", self.log_level),
                pass_fds=(w_end,), env=worker_environment(None, malloc_tuning=self.malloc_tuning))
            os.close(w_end)
            w = None
            line = b""
            deadline = time.monotonic() + timeout
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([r], [], [], left)[0]:
                    raise TimeoutError("the scheduler did not start within %g s" % timeout)
                chunk = os.read(r, 4096)
                if not chunk:
                    raise RuntimeError("the scheduler exited with status %s before listening"
                                       % self.scheduler.wait())
                line += chunk
            self.address = line.decode().strip()
        finally:
            os.close(r)
            if w is not None:
                os.close(w)

    def _worker_command(self) -> List[str]:
        return python_command("zmq_cluster._start", "worker", "--connect", self.address,
                              "--heartbeat-timeout", self.heartbeat_timeout,
                              "--log-level", self.log_level,
                              *(["--shared-memory"] if self.shared_memory else []))

    @property
    def workers(self) -> List[subprocess.Popen]:
        """The live worker processes."""
        return list(self._nanny.processes)

    @property
    def restarts(self) -> int:
        """How many workers were started to replace one that died."""
        return self._nanny.restarts

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> int:
        """Wait until at least ``n`` workers are registered with the
        scheduler (its answer, not a sleep); TimeoutError after ``timeout``."""
        if self._control is None:
            raise RuntimeError("the cluster is not running")
        reply = self._control.stats(timeout=timeout, wait_workers=n)
        return len(reply["workers"])

    def worker_pids(self) -> List[int]:
        """The pids of the worker processes this cluster started and that run."""
        return self._nanny.pids()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers and the scheduler and remove the private directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _LIVE.discard(self)
        if self._shared is not None:
            unregister_in_process(self.address)  # new pools: not this scheduler
        self._nanny.halt()
        if self._control is not None:
            try:
                self._control.send_shutdown()
            except Exception:
                pass
        procs = list(self._nanny.processes) + ([self.scheduler] if self.scheduler else [])
        self._nanny.reap(procs, timeout)
        if self._thread is not None and self._sched is not None:
            if self._control is None:
                self._sched.stop()
            # SHUTDOWN: it STOPs the workers and returns once they are gone
            # (at most SHUTDOWN_SECONDS); stop() if it never got the message.
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._sched.stop()
                self._thread.join(timeout)
        elif self._sched is not None:
            self._sched.close()  # made, never run
        if self._control is not None:
            self._control.close()
        if self._shared is not None:
            self._shared.release()  # terminates the context once the last pool closes
        self._nanny.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "LocalCluster(%r, n_workers=%d, scheduler=%r)" % (
            getattr(self, "address", None), self.n_workers, self.scheduler_mode)
