"""The processes of a pipeline, started and stopped from the pytest process
(``conftest.py``) or from ``small_tasks.py``.

Every pipeline runs in subprocesses started with the environment that
selects the library's mode: ``ours-fast`` unsets ``ZMQ_CLUSTER_NO_EXTENSIONS``
(compiled twins), ``ours-py`` sets it (the pure-Python twins); ``raw``,
``pickle`` and ``mp`` do not import zmq_cluster at all. Each controlled
process has a PAIR control socket of its own, bound here; every reply is
bounded, and a process of the pipeline that dies fails the call at once.

* :class:`Pipeline` -- one driver (ventilator and sink in one process) and
  its workers: the windowed small tasks, large arrays, latency.
* :class:`FreePipeline` -- the free-running small tasks: ventilator, workers
  and sink each in a process of its own (``mp``: one process, the pool's).
"""

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import zmq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = HERE / "_pipelines.py"

#: Bound on one control reply (a batch, a start, a stop), seconds.
CALL_TIMEOUT = 600
START_TIMEOUT = 120
STOP_TIMEOUT = 30


def _base_env():
    """The environment of every subprocess: ours, with ``src`` put on
    PYTHONPATH when zmq_cluster is not importable otherwise (a checkout that
    was not installed)."""
    env = dict(os.environ)
    env.pop("ZMQ_CLUSTER_NO_EXTENSIONS", None)
    if find_spec("zmq_cluster") is None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def env_for(impl):
    env = _base_env()
    env.pop("ZMQ_CLUSTER_BENCH_RAW_ECHO", None)
    env.pop("ZMQ_CLUSTER_BENCH_SHM", None)
    if impl == "ours-shm":  # the compiled twin, nodes with shared_memory=True
        env["ZMQ_CLUSTER_BENCH_SHM"] = "1"
    if impl == "ours-py":
        env["ZMQ_CLUSTER_NO_EXTENSIONS"] = "1"
    if impl == "raw-echo":
        env["ZMQ_CLUSTER_BENCH_RAW_ECHO"] = "1"
    return env


_PROBE = "import zmq_cluster as z; print(int(z.FASTPATH))"


def probe(impl):
    """None if ``impl``'s mode (ours-fast, ours-py) imports as expected,
    else why not."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env_for(impl),
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "importing zmq_cluster took over 120 s"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode]
        return lines[-1]
    want = "1" if impl == "ours-fast" else "0"
    if proc.stdout.strip() != want:
        return "zmq_cluster.FASTPATH is %s" % proc.stdout.strip()
    return None


class PipelineError(RuntimeError):
    pass


class Processes:
    """Subprocesses of one pipeline and the control sockets of those that
    take commands; :meth:`close` stops them all and removes the directory."""

    _counter = itertools.count()

    def __init__(self, impl, transport, workers):
        self.impl, self.transport, self.workers = impl, transport, workers
        self.kind = impl.split("-")[0]
        self.env = env_for(impl)
        self.expect = {"ours-fast": "1", "ours-shm": "1", "ours-py": "0"}.get(impl)
        self.dir = tempfile.mkdtemp(prefix="zcb-")  # short: ipc paths are < 108 bytes
        self.ctx = zmq.Context()
        self.procs = []
        self.ctls = {}        # name -> (PAIR socket, process)
        self.pending = set()  # names whose reply is still due
        self.closed = False

    def __repr__(self):
        return "%s(%s, %s, %d workers)" % (type(self).__name__, self.impl, self.transport,
                                           self.workers)

    @property
    def pids(self):
        return [proc.pid for proc in self.procs]

    def spawn(self, role, *args):
        cmd = [sys.executable, str(SCRIPT), role, "--impl", self.kind] + list(args)
        if self.expect is not None:
            cmd += ["--expect-fastpath", self.expect]
        proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def controlled(self, name, role, *args):
        """Start ``role`` with a control socket; returns its hello."""
        ctl = self.ctx.socket(zmq.PAIR)
        url = "ipc://%s/ctl-%s" % (self.dir, name)
        ctl.bind(url)
        proc = self.spawn(role, "--transport", self.transport or "ipc", "--dir", self.dir,
                          "--ctl", url, *args)
        self.ctls[name] = (ctl, proc)
        self.pending.add(name)
        return self.reply(name, START_TIMEOUT)

    def post(self, name, op, **fields):
        """Send a command without waiting for its reply."""
        self.ctls[name][0].send_json(dict(fields, op=op))
        self.pending.add(name)

    def reply(self, name, timeout=CALL_TIMEOUT, stopping=False):
        """``name``'s next reply; raises if it does not come in time, or if
        a process of the pipeline died meanwhile."""
        ctl, own = self.ctls[name]
        deadline = time.monotonic() + timeout
        while not ctl.poll(200):
            for proc in self.procs:
                if proc.poll() is not None and not (stopping and proc is not own):
                    raise PipelineError("%r: pid %d exited with status %s"
                                        % (self, proc.pid, proc.returncode))
            if time.monotonic() > deadline:
                raise PipelineError("%r: no reply from the %s within %d s" % (self, name, timeout))
        reply = ctl.recv_json()
        self.pending.discard(name)
        if not reply.get("ok"):
            raise PipelineError("%r: the %s failed:\n%s" % (self, name, reply.get("error")))
        return reply

    def call(self, name, op, timeout=CALL_TIMEOUT, **fields):
        self.post(name, op, **fields)
        return self.reply(name, timeout, stopping=(op == "stop"))

    def close(self):
        """Stop the processes through the pipeline's own stop path (the
        controlled ones in the order they were started, the last first),
        then make sure every process is gone and every socket closed."""
        if self.closed:
            return
        self.closed = True
        try:
            # A process still busy with an interrupted command is not asked
            # to stop: it is killed below.
            clean = not self.pending
            for name in reversed(list(self.ctls)):
                ctl, proc = self.ctls[name]
                if clean and proc.poll() is None:
                    try:
                        self.call(name, "stop", STOP_TIMEOUT)
                    except Exception as exc:
                        print("warning: %r did not stop cleanly: %s" % (self, exc),
                              file=sys.stderr)
                        clean = False
            deadline = time.monotonic() + (STOP_TIMEOUT if clean else 0)
            for proc in self.procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print("warning: %r: killing pid %d" % (self, proc.pid), file=sys.stderr)
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for ctl, _ in self.ctls.values():
                ctl.close(linger=0)
            self.ctx.destroy(linger=0)
            shutil.rmtree(self.dir, ignore_errors=True)


class Pipeline(Processes):
    """One driver process and its workers, all stopped by :meth:`close`."""

    def start(self):
        try:
            hello = self.controlled("driver", "driver")
            urls = hello["urls"]
            if self.kind != "mp":
                for _ in range(self.workers):
                    self.spawn("worker", *_worker_args(urls))
            self.call("driver", "connect", START_TIMEOUT, workers=self.workers)
        except BaseException:
            self.close()
            raise
        return self

    def run(self, op, **fields):
        return self.call("driver", op, **fields)


class FreePipeline(Processes):
    """Ventilator, workers and sink, each in a process of its own (mp: the
    pool's process only). :meth:`round` runs one free-running batch and
    returns its seconds: from the ventilator's first send to the sink's last
    receive, on CLOCK_MONOTONIC."""

    #: Tasks of the warm-up round that follows the connections.
    WARMUP = 2000

    def start(self):
        try:
            if self.kind == "mp":
                self.controlled("mp", "mp")
                self.call("mp", "connect", START_TIMEOUT, workers=self.workers)
            else:
                # The sink first, so that the ventilator's peers have
                # somewhere to send their results.
                urls = dict(self.controlled("sink", "sink"))
                urls.update(self.controlled("ventilator", "ventilator"))
                for _ in range(self.workers):
                    self.spawn("worker", *_worker_args(urls))
                self.post("sink", "connect", workers=self.workers)
                self.call("ventilator", "connect", START_TIMEOUT, workers=self.workers)
                self.reply("sink", START_TIMEOUT)
            self.round(self.WARMUP)
        except BaseException:
            self.close()
            raise
        return self

    def round(self, n, chunksize=1):
        if self.kind == "mp":
            reply = self.call("mp", "run", n=n, chunksize=chunksize)
            return (reply["t1"] - reply["t0"]) / 1e9
        self.post("sink", "recv", n=n)
        sent = self.call("ventilator", "send", n=n)
        received = self.reply("sink")
        return (received["t1"] - sent["t0"]) / 1e9


def _worker_args(urls):
    args = ["--requests", urls["requests"], "--results", urls["results"]]
    if "commands" in urls:
        args += ["--commands", urls["commands"]]
    return args
