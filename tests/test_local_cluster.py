"""LocalCluster's lifecycle as a user meets it: arguments checked before
anything starts, and nothing left behind when it stops."""

import os
import select
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import zmq_cluster as zc
from zmq_cluster.local import remove_stale_directories

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "pool"))
from pool_helpers import wait_gone  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"n_workers": 2.5}, TypeError, "n_workers must be an integer"),
    ({"n_workers": "2"}, TypeError, "n_workers must be an integer"),
    ({"n_workers": True}, TypeError, "n_workers must be an integer"),
    ({"heartbeat_timeout": 0}, ValueError, "heartbeat_timeout must be a finite number"),
    ({"heartbeat_timeout": -1}, ValueError, "heartbeat_timeout must be a finite number"),
    ({"heartbeat_timeout": float("nan")}, ValueError, "heartbeat_timeout must be"),
    ({"heartbeat_timeout": "10"}, TypeError, "heartbeat_timeout must be a number"),
    ({"start_timeout": 0}, ValueError, "start_timeout must be a finite number"),
    ({"log_level": "LOUD"}, ValueError, "log_level must be one of DEBUG, INFO"),
    ({"log_level": "info"}, ValueError, "log_level must be one of"),
])
def test_bad_arguments_raise_before_anything_starts(kwargs, error, message):
    # Before: a heartbeat_timeout <= 0 or a 2.5 was taken as it came, and a
    # start_timeout of 0 or an unknown log level failed in the scheduler
    # process, with its traceback on stderr.
    with pytest.raises(error, match=message):
        zc.LocalCluster(**{"n_workers": 1, **kwargs})


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _cluster_dir(where, pid, *, age, socket_state):
    """A directory as a LocalCluster leaves it: ``socket_state`` "dead" (a
    socket file nobody listens on), "listening" (returned, to keep open)."""
    path = where / ("zc-cluster-%d-%s" % (pid, socket_state[:4] + str(age)))
    path.mkdir(mode=0o700)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path / "scheduler"))
    if socket_state == "listening":
        sock.listen()
    else:
        sock.close()
    then = time.time() - age
    os.utime(path, (then, then))
    return path, sock


def test_only_stale_directories_are_removed(tmp_path):
    dead = _dead_pid()
    stale, _ = _cluster_dir(tmp_path, dead, age=120, socket_state="dead")
    young, _ = _cluster_dir(tmp_path, dead, age=1, socket_state="dead")
    running, _ = _cluster_dir(tmp_path, os.getpid(), age=120, socket_state="dead")
    served, listener = _cluster_dir(tmp_path, dead, age=120, socket_state="listening")
    (tmp_path / "zc-cluster-abcdef").mkdir()      # not one of ours by its name
    try:
        assert remove_stale_directories(str(tmp_path)) == [str(stale)]
    finally:
        listener.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (young, running, served, tmp_path / "zc-cluster-abcdef"))


KILLED = """
import sys, time
import zmq_cluster as zc
c = zc.LocalCluster(1)
print(c.address, c.scheduler.pid, *c.worker_pids(), flush=True)
time.sleep(120)
"""


def test_the_directory_of_a_sigkilled_cluster_goes_with_the_next_cluster(tmp_path,
                                                                          monkeypatch):
    where = tmp_path / "t"
    where.mkdir()
    env = dict(os.environ, TMPDIR=str(where))
    proc = subprocess.Popen([sys.executable, "-c", KILLED], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "the cluster did not start"
        address, *pids = proc.stdout.readline().split()
        assert address.startswith("ipc://%s/zc-cluster-%d-" % (where, proc.pid))
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert wait_gone([int(p) for p in pids], 10) == []
    left = os.path.dirname(address[len("ipc://"):])
    assert os.path.isdir(left)   # nothing in it could remove it
    then = time.time() - 120
    os.utime(left, (then, then))
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    with zc.LocalCluster(0) as cluster:
        assert not os.path.exists(left)
        assert cluster.address.startswith("ipc://%s/zc-cluster-%d-" % (where, os.getpid()))
    assert os.listdir(where) == []


def test_a_child_being_started_when_ctrl_c_comes_is_stopped(monkeypatch):
    """Ctrl-C while spawn() waits for the spawner thread (LocalCluster's
    start-up, the worker nanny): the child it was starting is stopped, not
    left to run with no owner (before, it ran on: nothing knew its pid)."""
    import queue
    from zmq_cluster import process
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):   # in the spawner thread
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    class InterruptedOnce(queue.Queue):
        """spawn()'s reply queue: its first get() is cut by a Ctrl-C."""
        interrupted = False

        def get(self, *args, **kwargs):
            if not InterruptedOnce.interrupted:
                InterruptedOnce.interrupted = True
                raise KeyboardInterrupt
            return super().get(*args, **kwargs)

    monkeypatch.setattr(process.subprocess, "Popen", popen)
    monkeypatch.setattr(process.queue, "Queue", InterruptedOnce)
    try:
        with pytest.raises(KeyboardInterrupt):
            process.spawn([sys.executable, "-c", "import time; time.sleep(60)"])
        assert len(started) == 1
        assert started[0].poll() is not None   # stopped, and reaped
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdin is not None:
                p.stdin.close()
