"""A nanny: keeps N worker processes running.

:class:`Supervisor` starts ``n`` children with :func:`zmq_cluster.process.spawn`
(so they die with this process, even by SIGKILL) and a thread that waits on
their process descriptors (pidfd, no polling). A child that exits is
replaced, except one that exits with ``EXIT_STOPPED`` (0): the scheduler
told it to stop, or with ``EXIT_REFUSED`` (77): the scheduler refused it at
the security handshake, and would refuse its replacement alike (counted in
``refused``, logged). A child that keeps dying at start (within
``FAST_DEATH_SECONDS``) is restarted after a growing delay (0.1 s doubling
up to ``MAX_RESTART_DELAY``), so a worker that cannot start does not spin.

LocalCluster uses one (children that stop are simply not replaced), and so
does ``zmq-cluster worker``, with ``stop_with_workers=True``: once a worker
has stopped on the scheduler's word (``zmq-cluster stop``,
``stop --workers-only``), the supervisor stops the others and is done;
so it does once one was refused.
"""

import logging
import os
import select
import signal
import subprocess
import threading
import time
from typing import Callable, Dict, List, Optional

from .process import spawn
from .schedproto import EXIT_REFUSED, EXIT_RESTART, EXIT_STOPPED

__all__ = ["Supervisor"]

log = logging.getLogger("zmq_cluster.supervisor")

#: A child that exits sooner than this after it started died "at start".
FAST_DEATH_SECONDS = 2.0
#: The longest wait before restarting a child that keeps dying at start.
MAX_RESTART_DELAY = 10.0


class Supervisor:
    """Keeps ``n`` processes of ``command()`` (a fresh argument list each
    time) running; see the module docstring.

    ``start()`` starts them and the supervising thread; ``wait()`` waits
    until the supervisor is done (every child stopped on the scheduler's
    word with ``stop_with_workers``, or :meth:`halt`/:meth:`terminate`
    called); ``terminate()`` stops the children (SIGTERM, then SIGKILL after
    ``timeout``) and reaps them. ``env``: the children's environment
    (default: this process's; see :func:`zmq_cluster.process.worker_environment`).
    """

    def __init__(self, command: Callable[[], List[str]], n: int, *,
                 stop_with_workers: bool = False, name: str = "worker",
                 env: Optional[Dict[str, str]] = None) -> None:
        self.command = command
        self.env = env
        self.n = n
        self.stop_with_workers = stop_with_workers
        self.name = name
        #: The live children (Popen objects), in start order.
        self.processes: List[subprocess.Popen] = []
        #: How many children were started to replace one that exited.
        self.restarts = 0
        #: How many children the scheduler refused at the handshake.
        self.refused = 0
        self._started_at: Dict[int, float] = {}  # pid -> monotonic start time
        self._lock = threading.Lock()
        self._halted = False
        self._done = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: Optional[threading.Thread] = None
        self._fast_deaths = 0
        self._winding_down = False   # a worker stopped on the scheduler's word

    # ------------------------------------------------------------ public

    def start(self) -> "Supervisor":
        with self._lock:
            for _ in range(self.n):
                self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="zmq-cluster-nanny",
                                        daemon=True)
        self._thread.start()
        return self

    def pids(self) -> List[int]:
        """The pids of the children that run."""
        with self._lock:
            return [p.pid for p in self.processes if p.poll() is None]

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the supervisor is done; False after ``timeout``."""
        return self._done.wait(timeout)

    def halt(self) -> None:
        """Stop replacing children (they keep running) and end the thread."""
        with self._lock:
            self._halted = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        self._done.set()

    def terminate(self, timeout: float = 10.0) -> List[int]:
        """Halt, then stop every child: SIGTERM (a worker finishes its task
        and says goodbye), SIGKILL for those still running after
        ``timeout`` seconds. Returns their exit statuses."""
        self.halt()
        with self._lock:
            procs = list(self.processes)
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        return self.reap(procs, timeout)

    def reap(self, procs: List[subprocess.Popen], timeout: float) -> List[int]:
        """Wait for ``procs`` (at most ``timeout`` seconds in all), SIGKILL
        the rest, and release them."""
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs:
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
            codes.append(p.wait())
            if p.stdin is not None:
                p.stdin.close()
            with self._lock:
                if p in self.processes:
                    self.processes.remove(p)
        return codes

    def close(self) -> None:
        """Release the wake-up pipe (after :meth:`terminate` or :meth:`halt`)."""
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ----------------------------------------------------------- private

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _spawn(self) -> "subprocess.Popen[bytes]":
        p = spawn(self.command(), env=self.env)
        self.processes.append(p)
        self._started_at[p.pid] = time.monotonic()
        return p

    def _supervise(self) -> None:
        fds: Dict[int, "subprocess.Popen[bytes]"] = {}   # pidfd -> Popen
        due: List[float] = []   # when each pending replacement starts
        try:
            while True:
                with self._lock:
                    if self._halted:
                        return
                    watched = {p.pid for p in fds.values()}
                    for p in self.processes:
                        if p.pid not in watched:
                            try:
                                fds[os.pidfd_open(p.pid)] = p
                            except ProcessLookupError:  # already gone: reported at once
                                fds[os.open("/dev/null", os.O_RDONLY)] = p
                    if self.stop_with_workers and not self.processes and not due:
                        return
                now = time.monotonic()
                timeout = max(0.0, min(due) - now) if due else None
                ready, _, _ = select.select([self._wake_r] + list(fds), [], [], timeout)
                if self._wake_r in ready:
                    os.read(self._wake_r, 64)
                for fd in ready:
                    if fd == self._wake_r:
                        continue
                    p = fds.pop(fd)
                    os.close(fd)
                    self._exited(p, due)
                now = time.monotonic()
                with self._lock:
                    if self._halted:
                        return
                    while due and due[0] <= now:
                        due.pop(0)
                        self.restarts += 1
                        p = self._spawn()
                        log.info("started %s pid %d", self.name, p.pid)
        finally:
            for fd in fds:
                os.close(fd)
            self._done.set()

    def _exited(self, p: "subprocess.Popen[bytes]", due: List[float]) -> None:
        code = p.wait()
        if p.stdin is not None:
            p.stdin.close()
        lived = time.monotonic() - self._started_at.pop(p.pid, time.monotonic())
        with self._lock:
            if p in self.processes:
                self.processes.remove(p)
            if self._halted:
                return
            if code in (EXIT_STOPPED, EXIT_REFUSED):
                if code == EXIT_STOPPED:
                    log.info("%s pid %d stopped as the scheduler asked", self.name, p.pid)
                else:
                    self.refused += 1
                    log.error("%s pid %d was refused by the scheduler at the handshake; not"
                              " replaced", self.name, p.pid)
                if self.stop_with_workers:
                    # The scheduler stopped this host's workers (or refuses
                    # them): stop the rest too (a replacement may have missed
                    # the word) and be done.
                    self._winding_down = True
                    due.clear()
                    for other in self.processes:
                        if other.poll() is None:
                            other.send_signal(signal.SIGTERM)
                return
            if self._winding_down:
                return
            if code == EXIT_RESTART:
                log.info("%s pid %d restarts as the scheduler asked", self.name, p.pid)
                delay = 0.0
            else:
                if lived < FAST_DEATH_SECONDS:
                    self._fast_deaths += 1
                    delay = min(MAX_RESTART_DELAY, 0.1 * 2 ** (self._fast_deaths - 1))
                else:
                    self._fast_deaths = 0
                    delay = 0.0
                log.warning("%s pid %d exited with status %s after %.1f s; starting another%s",
                            self.name, p.pid, code, lived,
                            " in %.1f s" % delay if delay else "")
            due.append(time.monotonic() + delay)
            due.sort()
