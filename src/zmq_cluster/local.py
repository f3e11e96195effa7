"""LocalCluster: a scheduler and worker processes on this host, by one line.

The scheduler and each worker run as ``python -m zmq_cluster.<module>``
subprocesses that die with this process (see :mod:`zmq_cluster.process`).
The cluster is their nanny: a supervisor thread waits on the workers'
process descriptors (pidfd) and starts a new worker for each one that dies
(killed, crashed, or ended by its task timeout).
"""

import atexit
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from typing import List, Optional

from .client import SchedulerClient
from .process import python_command, spawn

__all__ = ["LocalCluster"]

log = logging.getLogger("zmq_cluster.local")

_LIVE: "weakref.WeakSet[LocalCluster]" = weakref.WeakSet()


@atexit.register
def _close_all():
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
    """

    def __init__(self, n_workers: Optional[int] = None, *, transport: str = "ipc",
                 heartbeat_timeout: float = 10.0, start_timeout: float = 60.0,
                 log_level: str = "WARNING") -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError("transport must be 'ipc' or 'tcp', not %r" % (transport,))
        self.n_workers = (os.cpu_count() or 1) if n_workers is None else int(n_workers)
        if self.n_workers < 0:
            raise ValueError("n_workers must be >= 0")
        self.transport = transport
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.log_level = log_level
        self._dir = tempfile.mkdtemp(prefix="zc-cluster-")
        os.chmod(self._dir, 0o700)
        self._closed = False
        self._lock = threading.Lock()
        self.workers: List[subprocess.Popen] = []  # live worker processes
        self.restarts = 0
        self.scheduler: Optional[subprocess.Popen] = None
        self.address = ""
        self._control: Optional[SchedulerClient] = None
        self._wake_r, self._wake_w = os.pipe()
        _LIVE.add(self)
        try:
            self._start_scheduler(start_timeout)
            self._control = SchedulerClient(self.address, heartbeat_timeout=heartbeat_timeout,
                                            connect_timeout=start_timeout)
            for _ in range(self.n_workers):
                self.workers.append(self._start_worker())
            self._nanny = threading.Thread(target=self._supervise, name="zmq-cluster-nanny",
                                           daemon=True)
            self._nanny.start()
            self.wait_for_workers(self.n_workers, start_timeout)
        except BaseException:
            self.close()
            raise

    def _start_scheduler(self, timeout):
        listen = ("ipc://%s/scheduler" % self._dir if self.transport == "ipc"
                  else "tcp://127.0.0.1:0")
        r, w = os.pipe()
        try:
            self.scheduler = spawn(python_command(
                "zmq_cluster._start", "scheduler", "--listen", listen, "--heartbeat-timeout",
                self.heartbeat_timeout, "--ready-fd", w, "--log-level", self.log_level),
                pass_fds=(w,))
            os.close(w)
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

    def _start_worker(self):
        return spawn(python_command("zmq_cluster._start", "worker", "--connect", self.address,
                                    "--heartbeat-timeout", self.heartbeat_timeout,
                                    "--log-level", self.log_level))

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> int:
        """Wait until at least ``n`` workers are registered with the
        scheduler (its answer, not a sleep); TimeoutError after ``timeout``."""
        if self._control is None:
            raise RuntimeError("the cluster is not running")
        reply = self._control.stats(timeout=timeout, wait_workers=n)
        return len(reply["workers"])

    def worker_pids(self) -> List[int]:
        """The pids of the worker processes this cluster started and that run."""
        with self._lock:
            return [p.pid for p in self.workers if p.poll() is None]

    def _supervise(self):
        fds = {}
        while not self._closed:
            with self._lock:
                for p in self.workers:
                    if p.pid not in {q.pid for q in fds.values()}:
                        try:
                            fds[os.pidfd_open(p.pid)] = p
                        except ProcessLookupError:
                            fds[os.open("/dev/null", os.O_RDONLY)] = p  # already gone
            ready, _, _ = select.select([self._wake_r] + list(fds), [], [])
            if self._closed:
                break
            for fd in ready:
                if fd == self._wake_r:
                    continue
                p = fds.pop(fd)
                os.close(fd)
                code = p.wait()
                with self._lock:
                    if self._closed:
                        break
                    if p in self.workers:
                        self.workers.remove(p)
                    log.warning("worker pid %d exited with status %s; starting another",
                                p.pid, code)
                    self.restarts += 1
                    if p.stdin is not None:
                        p.stdin.close()
                    self.workers.append(self._start_worker())
        for fd in fds:
            os.close(fd)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers and the scheduler and remove the private directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _LIVE.discard(self)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        nanny = getattr(self, "_nanny", None)
        if nanny is not None:
            nanny.join(timeout)
        if self._control is not None:
            try:
                self._control.send_shutdown()
            except Exception:
                pass
        procs = list(self.workers) + ([self.scheduler] if self.scheduler else [])
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
            if p.stdin is not None:
                p.stdin.close()
        if self._control is not None:
            self._control.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self):
        return "LocalCluster(%r, n_workers=%d)" % (getattr(self, "address", None), self.n_workers)
