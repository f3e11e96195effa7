"""Running ``zmq-cluster`` subcommands in the foreground from tests: a
process whose output lines are read by a thread and awaited with bounded
waits, killed with its process group at the end; and waiting on the
scheduler's own answers (STATS) instead of sleeping."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from zmq_cluster.client import SchedulerClient
from zmq_cluster.config import CONFIG_ENV

CLI = [sys.executable, "-m", "zmq_cluster"]


class Command:
    """``zmq-cluster ARGS`` running in its own process group."""

    def __init__(self, *args, env=None, cwd=None):
        self.args = [str(a) for a in args]
        self.process = subprocess.Popen(CLI + self.args, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                        text=True, env=_environment(env), cwd=cwd,
                                        start_new_session=True)
        self.lines = []
        self.stderr = []
        self._queue = queue.Queue()
        self._threads = [threading.Thread(target=self._read, args=(self.process.stdout, True),
                                          daemon=True),
                         threading.Thread(target=self._read, args=(self.process.stderr, False),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, stream, is_stdout):
        for line in stream:
            if is_stdout:
                self._queue.put(line.rstrip("\n"))
            else:
                self.stderr.append(line.rstrip("\n"))
        if is_stdout:
            self._queue.put(None)

    def expect(self, fragment, timeout=30.0):
        """The next stdout line containing ``fragment`` (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("%s: no line with %r within %gs\n%s" % (self, fragment, timeout,
                                                                  self.transcript()))
            if line is None:
                self._queue.put(None)
                pytest.fail("%s exited (%s) before a line with %r\n%s" % (
                    self, self.process.wait(5), fragment, self.transcript()))
            self.lines.append(line)
            if fragment in line:
                return line

    def signal(self, signum):
        self.process.send_signal(signum)

    def wait(self, timeout=30.0):
        """The exit status (bounded wait); stdout and stderr read to the end."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # its threads' stacks on stderr
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for t in self._threads:
                t.join(5)
            pytest.fail("%s did not exit within %gs (stderr ends with the stacks of its"
                        " threads)\n%s" % (self, timeout, self.transcript(tail=200)))
        for t in self._threads:
            t.join(5)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return code

    def kill(self):
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
        for t in self._threads:
            t.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()

    def transcript(self, tail=30):
        return "stdout:\n  %s\nstderr:\n  %s" % ("\n  ".join(self.lines),
                                                 "\n  ".join(self.stderr[-tail:]))

    def __repr__(self):
        return "<zmq-cluster %s>" % " ".join(self.args[:3])


def _environment(env):
    full_env = dict(os.environ)
    full_env.pop(CONFIG_ENV, None)
    # SIGABRT then dumps every thread's stack on stderr (see _stacks).
    full_env["PYTHONFAULTHANDLER"] = "1"
    full_env.update(env or {})
    return full_env


def _stacks(process, timeout=10):
    """What a process that did not exit in time was doing: SIGABRT (its
    faulthandler writes every thread's stack on stderr), then SIGKILL to
    its process group; returns (stdout, stderr) read to the end."""
    try:
        process.send_signal(signal.SIGABRT)
        return process.communicate(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        return None, None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout)


def run(*args, env=None, timeout=60, cwd=None):
    """Run ``zmq-cluster ARGS`` to the end: the CompletedProcess. One that
    has not exited after ``timeout`` seconds fails the test with its
    threads' stacks (which wait hung)."""
    argv = CLI + [str(a) for a in args]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_environment(env), cwd=cwd, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _stacks(process)
        pytest.fail("zmq-cluster %s did not exit within %gs\nstdout:\n%s\nstderr (with the"
                    " stacks of its threads):\n%s" % (" ".join(argv[3:]), timeout, stdout,
                                                      stderr))
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def one_line_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "error:" in lines[0], result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def wait_for_workers(address, n, *, security=None, timeout=30.0, exclude=()):
    """The scheduler's worker list once ``n`` workers whose pids are not in
    ``exclude`` are registered (its STATS answers; bounded)."""
    client = SchedulerClient(address, security=security, connect_timeout=timeout)
    try:
        deadline = time.monotonic() + timeout
        while True:
            reply = client.stats(timeout=timeout, wait_workers=n)
            workers = [w for w in reply["workers"] if w["pid"] not in exclude]
            if len(workers) >= n:
                return reply["workers"]
            if time.monotonic() > deadline:
                pytest.fail("%d workers (excluding %s) did not register: %s"
                            % (n, sorted(exclude), reply["workers"]))
            # A worker of the excluded set is still registered: ask again once
            # the scheduler has seen it go (the next answer comes at once).
            time.sleep(0.05)
    finally:
        client.close()


def free_port():
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
