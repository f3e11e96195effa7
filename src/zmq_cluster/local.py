"""LocalCluster: a scheduler and worker processes on this host, by one line.

The scheduler and each worker run as ``python -m zmq_cluster.<module>``
subprocesses that die with this process (see :mod:`zmq_cluster.process`).
The cluster is their nanny (:class:`zmq_cluster.supervisor.Supervisor`, the
same one ``zmq-cluster worker`` runs): a thread waits on the workers'
process descriptors (pidfd) and starts a new worker for each one that dies
(killed, crashed, or ended by its task timeout).
"""

import atexit
import logging
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from typing import List, Optional

from .client import SchedulerClient
from .process import python_command, spawn, worker_environment
from .supervisor import Supervisor

__all__ = ["LocalCluster"]

log = logging.getLogger("zmq_cluster.local")

_LIVE: "weakref.WeakSet[LocalCluster]" = weakref.WeakSet()


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

    ``shared_memory`` (default True): start the workers with
    ``--shared-memory`` (they map the slots of pools on this host and
    return large results in slots of their own, only for pools that ask,
    see :class:`~zmq_cluster.pool.ClusterPool`); a ClusterPool given this
    cluster then uses shared memory by default.
    """

    def __init__(self, n_workers: Optional[int] = None, *, transport: str = "ipc",
                 heartbeat_timeout: float = 10.0, start_timeout: float = 60.0,
                 log_level: str = "WARNING", blas_threads: Optional[int] = 1,
                 malloc_tuning: bool = False, shared_memory: bool = True) -> None:
        if not isinstance(malloc_tuning, bool):
            raise TypeError("malloc_tuning must be True or False, not %r" % (malloc_tuning,))
        if transport not in ("ipc", "tcp"):
            raise ValueError("transport must be 'ipc' or 'tcp', not %r" % (transport,))
        self.n_workers = (os.cpu_count() or 1) if n_workers is None else int(n_workers)
        if self.n_workers < 0:
            raise ValueError("n_workers must be >= 0")
        self.transport = transport
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.log_level = log_level
        self.malloc_tuning = malloc_tuning
        #: Whether the workers take and give arrays by shared memory.
        self.shared_memory = bool(shared_memory)
        self._dir = tempfile.mkdtemp(prefix="zc-cluster-")
        os.chmod(self._dir, 0o700)
        self._closed = False
        self._lock = threading.Lock()
        self.scheduler: Optional[subprocess.Popen] = None
        self.address = ""
        self._control: Optional[SchedulerClient] = None
        self._nanny = Supervisor(self._worker_command, self.n_workers,
                                 env=worker_environment(blas_threads,
                                                        malloc_tuning=malloc_tuning))
        _LIVE.add(self)
        try:
            self._start_scheduler(start_timeout)
            self._control = SchedulerClient(self.address, heartbeat_timeout=heartbeat_timeout,
                                            connect_timeout=start_timeout)
            self._nanny.start()
            self.wait_for_workers(self.n_workers, start_timeout)
        except BaseException:
            self.close()
            raise

    def _start_scheduler(self, timeout: float) -> None:
        listen = ("ipc://%s/scheduler" % self._dir if self.transport == "ipc"
                  else "tcp://127.0.0.1:0")
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
        self._nanny.halt()
        if self._control is not None:
            try:
                self._control.send_shutdown()
            except Exception:
                pass
        procs = list(self._nanny.processes) + ([self.scheduler] if self.scheduler else [])
        self._nanny.reap(procs, timeout)
        if self._control is not None:
            self._control.close()
        self._nanny.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "LocalCluster(%r, n_workers=%d)" % (getattr(self, "address", None), self.n_workers)
