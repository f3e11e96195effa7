"""Child processes that die with their parent, started without fork-safety
traps.

The scheduler and the pool workers run as ``python -m zmq_cluster.<module>``
subprocesses (not multiprocessing), so a user's script without a
``__main__`` guard is safe. A child dies with its parent three ways:

* ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set by the child at start
  (:func:`die_with_parent`): the kernel kills it when the thread that
  started it ends, even if the child is stuck holding the GIL. So children
  are started by :func:`spawn` from one daemon thread that lives as long as
  the parent process, not from whichever thread the user happened to use;
* a check of ``getppid()`` right after, for a parent that died before that;
* its standard input is a pipe from the parent: a thread in the child exits
  the process when it reads end-of-file (the parent is gone).

Children start in their own session, so a Ctrl-C at the terminal reaches
the parent only, which then stops them in order.
"""

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["spawn", "die_with_parent", "python_command", "worker_environment",
           "THREAD_VARIABLES", "MALLOC_TUNABLES", "is_glibc", "merge_tunables"]

#: The environment variables that size the thread pools of OpenMP, MKL and
#: OpenBLAS (numpy's linear algebra). Each library starts one thread per
#: core by default, so N workers on N cores would run N*N threads.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

#: The glibc malloc tunables that ``malloc_tuning=True`` puts in
#: ``GLIBC_TUNABLES`` (README, "Tuning glibc malloc for large arrays"):
#: allocations below 1 GiB come from the heap, not from a fresh mmap each
#: (whose pages fault in and are zeroed one by one), up to 1 GiB of freed
#: memory stays mapped for reuse, and one arena serves every thread (glibc
#: cannot fit a message over 32 MiB in the heap of a thread's own arena, so
#: libzmq's I/O thread would mmap it anyway). The cost is memory kept from
#: the OS: a process keeps its high-water mark, up to 1 GiB above what it
#: uses. glibc reads these at process start, so they go in the environment.
MALLOC_TUNABLES = (
    ("glibc.malloc.mmap_threshold", "1073741824"),
    ("glibc.malloc.trim_threshold", "1073741824"),
    ("glibc.malloc.arena_max", "1"),
)

_PR_SET_PDEATHSIG = 1

_requests: "queue.Queue[tuple]" = queue.Queue()
_spawner: "threading.Thread | None" = None
_spawner_lock = threading.Lock()


def python_command(module: str, *args: object) -> List[str]:
    """``[python, -m, module, args...]``."""
    return [sys.executable, "-m", module, *map(str, args)]


def is_glibc() -> bool:
    """Whether this Python runs on GNU libc (whose malloc reads
    ``GLIBC_TUNABLES``); False on musl, macOS, Windows."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def merge_tunables(existing: Optional[str],
                   tunables: Iterable[Tuple[str, str]] = MALLOC_TUNABLES) -> str:
    """``existing`` (a ``GLIBC_TUNABLES`` value, ``name=value`` pairs joined
    by ``:``; None or empty for none) with each of ``tunables`` (name,
    value) pairs appended unless ``existing`` already names it: a tunable
    the user set wins, the others are added."""
    parts = [p for p in (existing or "").split(":") if p]
    named = {p.split("=", 1)[0] for p in parts}
    parts += ["%s=%s" % (name, value) for name, value in tunables if name not in named]
    return ":".join(parts)


def worker_environment(blas_threads: Optional[int] = 1,
                       env: Optional[Mapping[str, str]] = None, *,
                       malloc_tuning: bool = False) -> Dict[str, str]:
    """The environment for worker processes: ``env`` (default: this
    process's) with each of :data:`THREAD_VARIABLES` set to
    ``blas_threads``, except those already set there (an explicit setting
    wins). ``blas_threads=None`` changes nothing. Returns a new dict.

    One thread per worker is dask's nanny default too: a pool already runs
    one worker per core, and a BLAS that also starts a thread per core in
    every worker oversubscribes the machine.

    ``malloc_tuning=True`` adds :data:`MALLOC_TUNABLES` to
    ``GLIBC_TUNABLES`` (:func:`merge_tunables`: a tunable already set there
    wins, the user's other tunables are kept). Off by default; on a platform
    without glibc it changes nothing (nothing else reads that variable)."""
    out = dict(os.environ if env is None else env)
    if blas_threads is not None:
        if int(blas_threads) < 1:
            raise ValueError("blas_threads must be at least 1, or None")
        for name in THREAD_VARIABLES:
            out.setdefault(name, str(int(blas_threads)))
    if malloc_tuning and is_glibc():
        out["GLIBC_TUNABLES"] = merge_tunables(out.get("GLIBC_TUNABLES"))
    return out


def _spawn_loop() -> None:
    while True:
        args, kwargs, reply = _requests.get()
        try:
            reply.put((True, subprocess.Popen(args, **kwargs)))
        except BaseException as exc:  # handed to the caller
            reply.put((False, exc))


_Stream = Union[None, int, IO[Any]]


def spawn(args: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
          pass_fds: Iterable[int] = (), stdout: _Stream = None,
          stderr: _Stream = None) -> "subprocess.Popen[bytes]":
    """Start ``args`` as a child that dies with this process: Popen from the
    spawner thread, stdin a pipe the child watches, its own session."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawn_loop, name="zmq-cluster-spawner",
                                        daemon=True)
            _spawner.start()
    child_env = dict(os.environ if env is None else env)
    child_env["ZMQ_CLUSTER_PARENT_PID"] = str(os.getpid())
    reply: "queue.Queue[Tuple[bool, Any]]" = queue.Queue()
    _requests.put((args, dict(env=child_env, pass_fds=tuple(pass_fds), stdin=subprocess.PIPE,
                              stdout=stdout, stderr=stderr, start_new_session=True,
                              close_fds=True), reply))
    answer: Optional[Tuple[bool, Any]] = None
    try:
        answer = reply.get()
    finally:
        if answer is None:
            # Interrupted (Ctrl-C) while the spawner starts the child: it would
            # run on with no owner to stop it, so stop it (the spawner answers
            # at once).
            late = reply.get()
            if late[0]:
                late[1].kill()
                late[1].wait()
                if late[1].stdin is not None:
                    late[1].stdin.close()
    ok, value = answer
    if not ok:
        raise value
    process: "subprocess.Popen[bytes]" = value
    return process


def die_with_parent() -> None:
    """In a child started by :func:`spawn`: arrange to die with the parent.

    Sets PR_SET_PDEATHSIG (Linux), exits at once if the parent is already
    gone, and starts a thread that exits the process when stdin (a pipe
    from the parent) reaches end-of-file. Does nothing in a process that was
    not started by :func:`spawn`.
    """
    named = os.environ.get("ZMQ_CLUSTER_PARENT_PID")
    if not named:
        return
    parent = int(named)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the pipe below still works
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(1)

    threading.Thread(target=watch, name="zmq-cluster-parent-watch", daemon=True).start()
