"""Harness of the throughput suite (``python -m pytest benchmarks/``).

Each pipeline -- a driver process (ventilator + sink) and its worker
processes -- runs in subprocesses started by :class:`Pipeline`, with the
environment that selects the library's mode: ``ours-fast`` unsets
``ZMQ_CLUSTER_NO_EXTENSIONS`` (compiled framing), ``ours-py`` sets it (the
pure-Python twin); the alternatives (``raw``, ``pickle``, ``mp``) do not
import zmq_cluster at all. The pytest process only sends a control command
per batch and waits for the reply, so the timed part is the same for every
implementation: one control round trip (tens of microseconds) around a
batch that takes a large fraction of a second.

Options: ``--quick`` (or ``ZMQ_CLUSTER_BENCH_QUICK=1``): few rounds and small
batches, so that the suite runs in CI in well under two minutes; it checks
that nothing rotted and its figures mean little. ``--require-fastpath``
(or ``ZMQ_CLUSTER_BENCH_REQUIRE_FASTPATH=1``): fail, instead of skipping,
the ``ours-fast`` cases when the compiled extension does not import.
``--bench-summary PATH``: where the JSON summary goes (default
``.benchmarks/summary.json`` at the repository root).
"""

import atexit
import datetime
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import zmq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = HERE / "_pipelines.py"

#: Implementations, in the order the summary shows them.
IMPLS = ("ours-fast", "ours-py", "raw", "pickle", "mp")

#: Bound on one control reply (a batch, a start, a stop), seconds.
CALL_TIMEOUT = 600
START_TIMEOUT = 120
STOP_TIMEOUT = 30


# --------------------------------------------------------------- settings

class Settings:
    """Batch sizes and rounds; ``quick`` for CI."""

    def __init__(self, quick):
        self.quick = quick
        if quick:
            self.rounds, self.warmup = 2, 0
            self.small_n = 400
            self.large_bytes = 64 << 20   # per round, each way
            self.latency_n = 200
        else:
            self.rounds, self.warmup = 7, 1
            self.small_n = 20_000
            self.large_bytes = 512 << 20
            self.latency_n = 3_000

    def large_n(self, mib):
        return max(2, self.large_bytes // (mib << 20))


def pytest_addoption(parser):
    group = parser.getgroup("zmq-cluster benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="few rounds and small batches (also ZMQ_CLUSTER_BENCH_QUICK=1)")
    group.addoption("--require-fastpath", action="store_true", default=False,
                    help="fail the ours-fast cases when the compiled extension is missing "
                         "(also ZMQ_CLUSTER_BENCH_REQUIRE_FASTPATH=1)")
    group.addoption("--bench-summary", default=str(ROOT / ".benchmarks" / "summary.json"),
                    help="JSON file for the summary of ratios")


def _env_flag(name):
    return os.environ.get(name, "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout: pytest-timeout's per-test limit")
    config._zc_records = []
    config._zc_settings = Settings(config.getoption("--quick", False)
                                   or _env_flag("ZMQ_CLUSTER_BENCH_QUICK"))


@pytest.fixture(scope="session")
def settings(request):
    return request.config._zc_settings


# ------------------------------------------------------------ environments

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
    if impl == "ours-py":
        env["ZMQ_CLUSTER_NO_EXTENSIONS"] = "1"
    return env


_PROBE = "import zmq_cluster as z; print(int(z.FASTPATH))"


def _probe(impl):
    """None if ``impl``'s mode imports as expected, else why not."""
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


@pytest.fixture(scope="session")
def modes(request):
    """{impl: None or the reason it cannot run} for ours-fast and ours-py."""
    found = {impl: _probe(impl) for impl in ("ours-fast", "ours-py")}
    request.config._zc_modes = found
    return found


# --------------------------------------------------------------- pipelines

class PipelineError(RuntimeError):
    pass


class Pipeline:
    """One driver process and its workers, all stopped by :meth:`close`."""

    _counter = itertools.count()

    def __init__(self, impl, transport, workers):
        self.impl, self.transport, self.workers = impl, transport, workers
        self.kind = impl.split("-")[0]
        self.env = env_for(impl)
        self.expect = {"ours-fast": "1", "ours-py": "0"}.get(impl)
        self.dir = tempfile.mkdtemp(prefix="zcb-")  # short: ipc paths are < 108 bytes
        self.ctx = zmq.Context()
        self.ctl = None
        self.driver = None
        self.procs = []
        self.closed = False
        self.pending = False

    def __repr__(self):
        return "Pipeline(%s, %s, %d workers)" % (self.impl, self.transport, self.workers)

    def _spawn(self, role, *args):
        cmd = [sys.executable, str(SCRIPT), role, "--impl", self.kind] + list(args)
        if self.expect is not None:
            cmd += ["--expect-fastpath", self.expect]
        proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def start(self):
        try:
            self.ctl = self.ctx.socket(zmq.PAIR)
            url = "ipc://%s/ctl" % self.dir
            self.ctl.bind(url)
            self.driver = self._spawn("driver", "--transport", self.transport or "ipc",
                                      "--dir", self.dir, "--ctl", url)
            hello = self._reply(START_TIMEOUT)
            urls = hello["urls"]
            if self.kind != "mp":
                for _ in range(self.workers):
                    args = ["--requests", urls["requests"], "--results", urls["results"]]
                    if "commands" in urls:
                        args += ["--commands", urls["commands"]]
                    self._spawn("worker", *args)
            self.call("connect", START_TIMEOUT, workers=self.workers)
        except BaseException:
            self.close()
            raise
        return self

    def _reply(self, timeout, stopping=False):
        """The driver's next reply; raises if it does not come in time, or if
        a process of the pipeline died meanwhile."""
        deadline = time.monotonic() + timeout
        while not self.ctl.poll(200):
            for proc in self.procs:
                if proc.poll() is not None and not (stopping and proc is not self.driver):
                    raise PipelineError("%r: pid %d exited with status %s"
                                        % (self, proc.pid, proc.returncode))
            if time.monotonic() > deadline:
                raise PipelineError("%r: no reply within %d s" % (self, timeout))
        reply = self.ctl.recv_json()
        if not reply.get("ok"):
            raise PipelineError("%r failed:\n%s" % (self, reply.get("error")))
        return reply

    def call(self, op, timeout=CALL_TIMEOUT, **fields):
        self.ctl.send_json(dict(fields, op=op))
        self.pending = True  # until its reply is read
        reply = self._reply(timeout, stopping=(op == "stop"))
        self.pending = False
        return reply

    def close(self):
        """Stop the workers through the pipeline's own stop path, then make
        sure every process is gone and every socket closed."""
        if self.closed:
            return
        self.closed = True
        try:
            # A driver still busy with an interrupted command is not asked
            # to stop: its processes are killed below.
            if (self.driver is not None and self.driver.poll() is None and self.ctl is not None
                    and not self.pending):
                try:
                    self.call("stop", STOP_TIMEOUT)
                except Exception as exc:
                    print("warning: %r did not stop cleanly: %s" % (self, exc), file=sys.stderr)
            deadline = time.monotonic() + (0 if self.pending else STOP_TIMEOUT)
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
            if self.ctl is not None:
                self.ctl.close(linger=0)
            self.ctx.destroy(linger=0)
            shutil.rmtree(self.dir, ignore_errors=True)


class Pipelines:
    """Keeps one pipeline alive at a time: the tests are ordered so that all
    the cases of one pipeline run one after another (see
    pytest_collection_modifyitems), so each starts once."""

    def __init__(self):
        self.current = None
        atexit.register(self.close)

    def get(self, impl, transport, workers):
        key = (impl, transport, workers)
        if self.current is not None and (self.current[0] != key or self.current[1].closed):
            self.close()
        if self.current is None:
            self.current = (key, Pipeline(impl, transport, workers).start())
        return self.current[1]

    def discard(self):
        """Drop the current pipeline (after a failure its state is unknown)."""
        self.close()

    def close(self):
        if self.current is not None:
            pipeline, self.current = self.current[1], None
            pipeline.close()


@pytest.fixture(scope="session")
def pipelines():
    cache = Pipelines()
    yield cache
    cache.close()


def pipeline_key(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "impl" not in params or "workers" not in params:
        return None
    return params["impl"], params.get("transport"), params["workers"]


def _named(config):
    """Whether the command line names this directory or something in it (a
    plain ``pytest`` at the repository root only happens upon it)."""
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(session, config, items):
    """Group the benchmark items by pipeline (stable otherwise), leaving any
    other items where they are. When the run did not name benchmarks/ (a
    bare ``pytest`` that wandered in), skip them: they take minutes."""
    slots = [i for i, item in enumerate(items)
             if item.path.parent == HERE and pipeline_key(item) is not None]
    if slots and not _named(config):
        skip = pytest.mark.skip(reason="benchmarks run only when named: "
                                       "python -m pytest benchmarks/ [--quick]")
        for i in slots:
            items[i].add_marker(skip)
        return
    ours = [items[i] for i in slots]
    first = {}
    for item in ours:
        first.setdefault(pipeline_key(item), len(first))
    ours.sort(key=lambda item: first[pipeline_key(item)])
    for i, item in zip(slots, ours):
        items[i] = item


# ---------------------------------------------------------------- records

def median_seconds(benchmark, own_times, warmup):
    """Median seconds of the measured rounds: pytest-benchmark's when it
    timed them, else our own perf_counter figures (--benchmark-disable)."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and getattr(stats, "data", None):
        return stats.median
    return statistics.median(own_times[warmup:] or own_times)


@pytest.fixture
def available(request, modes):
    """available(impl): skip (or, with --require-fastpath, fail) a case of
    ours whose mode cannot run here."""
    def check(impl):
        why = modes.get(impl)
        if why is None:
            return
        if impl == "ours-fast" and (request.config.getoption("--require-fastpath", False)
                                    or _env_flag("ZMQ_CLUSTER_BENCH_REQUIRE_FASTPATH")):
            pytest.fail("fast path required but unavailable: %s" % why)
        pytest.skip("%s unavailable: %s" % (impl, why))
    return check


@pytest.fixture
def timed(benchmark, settings):
    """timed(pipeline, op, **fields): run the driver command ``op`` as the
    benchmark's rounds (``benchmark.pedantic``, one call per round); returns
    (median seconds, replies of the measured rounds)."""
    def run(pipeline, op, **fields):
        times, replies = [], []

        def one_round():
            start = time.perf_counter()
            replies.append(pipeline.call(op, **fields))
            times.append(time.perf_counter() - start)

        benchmark.pedantic(one_round, rounds=settings.rounds, iterations=1,
                           warmup_rounds=settings.warmup)
        return median_seconds(benchmark, times, settings.warmup), replies[-settings.rounds:]
    return run


@pytest.fixture
def record(request):
    """record(case, **figures): keep the figures for the summary."""
    def add(case, **fields):
        request.config._zc_records.append(dict(fields, case=case))
    return add


# ---------------------------------------------------------------- summary

def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "tasks/s":
        return "%.0f" % value
    if unit == "GB/s":
        return "%.2f" % value
    return "%.0f" % value  # us


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _rfmt(value):
    return "-" if value is None else "%.2fx" % value


def build_summary(records):
    """Ratios per case from this run's medians. Throughput ratios are ours /
    other (higher is better for ours); latency ratios are ours / raw of the
    round-trip time (lower is better for ours)."""
    by = {}
    for rec in records:
        by[(rec["case"], rec.get("transport"), rec.get("workers"), rec.get("mib"),
            rec["impl"])] = rec
    rows = []
    cases = sorted({k[:4] for k in by}, key=lambda k: (
        ["small", "large", "latency"].index(k[0]), str(k[1]), k[2] or 0, k[3] or 0))
    for case, transport, workers, mib in cases:
        if case == "small" and transport is None:
            continue  # mp rows are shown beside each transport
        def get(impl, field, _case=case, _t=transport):
            t = None if impl == "mp" else _t
            rec = by.get((_case, t, workers, mib, impl))
            return None if rec is None else rec.get(field)
        field = {"small": "tasks_per_s", "large": "gb_per_s", "latency": "p50_us"}[case]
        for mode in ("ours-fast", "ours-py"):
            ours = get(mode, field)
            if ours is None:
                continue
            row = {"case": case, "transport": transport, "workers": workers, "mib": mib,
                   "mode": mode, "unit": {"small": "tasks/s", "large": "GB/s",
                                          "latency": "us"}[case],
                   "ours": ours, "raw": get("raw", field), "pickle": get("pickle", field),
                   "mp": get("mp", field) if case == "small" else None,
                   "other_mode": get("ours-py" if mode == "ours-fast" else "ours-fast", field)}
            if case == "latency":
                row["ours_p99"] = get(mode, "p99_us")
                row["raw_p99"] = get("raw", "p99_us")
                row["pickle_p99"] = get("pickle", "p99_us")
            row["vs_raw"] = _ratio(ours, row["raw"])
            row["vs_pickle"] = _ratio(ours, row["pickle"])
            row["vs_mp"] = _ratio(ours, row["mp"])
            # fast path / pure Python: a speed-up for throughput, and for
            # latency py/fast so that > 1 also means the fast path wins.
            if mode == "ours-fast":
                row["fast_vs_py"] = (_ratio(row["other_mode"], ours) if case == "latency"
                                     else _ratio(ours, row["other_mode"]))
            else:
                row["fast_vs_py"] = None
            rows.append(row)
    return rows


def _case_label(row):
    if row["case"] == "large":
        return "large %3d MiB %s w%d" % (row["mib"], row["transport"], row["workers"])
    return "%s %s w%d" % (row["case"], row["transport"], row["workers"])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = getattr(config, "_zc_records", None)
    if not records:
        return
    rows = build_summary(records)
    write = terminalreporter.write_line
    terminalreporter.section("zmq-cluster throughput summary (medians of this run)")
    settings = config._zc_settings
    write("mode: %s; small N=%d, latency N=%d per round, %d rounds (+%d warm-up)"
          % ("QUICK (figures not meaningful)" if settings.quick else "full",
             settings.small_n, settings.latency_n, settings.rounds, settings.warmup))
    missing = {k: v for k, v in (getattr(config, "_zc_modes", {}) or {}).items() if v}
    for impl, why in missing.items():
        write("%s not run: %s" % (impl, why))
    header = "%-22s %-9s %9s %9s %9s %9s %8s %8s %8s %8s" % (
        "case", "mode", "ours", "raw", "pickle", "mp", "/raw", "/pickle", "/mp", "fast/py")
    for case, title in (("small", "small tasks, tasks/s (ratios: ours/other, higher = ours faster)"),
                        ("large", "large arrays, GB/s there and back (ratios: ours/other)"),
                        ("latency", "latency p50 round trip, us (ratios: ours/other, "
                                    "lower = ours faster; fast/py = py/fast)")):
        sel = [r for r in rows if r["case"] == case]
        if not sel:
            continue
        write("")
        write(title)
        write(header)
        for r in sel:
            write("%-22s %-9s %9s %9s %9s %9s %8s %8s %8s %8s" % (
                _case_label(r), r["mode"], _fmt(r["ours"], r["unit"]), _fmt(r["raw"], r["unit"]),
                _fmt(r["pickle"], r["unit"]), _fmt(r["mp"], r["unit"]), _rfmt(r["vs_raw"]),
                _rfmt(r["vs_pickle"]), _rfmt(r["vs_mp"]), _rfmt(r["fast_vs_py"])))
        if case == "latency":
            write("p99 us: " + "; ".join("%s %s: ours %s raw %s pickle %s" % (
                _case_label(r), r["mode"], _fmt(r["ours_p99"], "us"), _fmt(r["raw_p99"], "us"),
                _fmt(r["pickle_p99"], "us")) for r in sel))
    path = Path(config.getoption("--bench-summary", None) or ROOT / ".benchmarks" / "summary.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.name == ".benchmarks" and not (path.parent / ".gitignore").exists():
            (path.parent / ".gitignore").write_text("# generated by benchmarks/conftest.py\n*\n")
        path.write_text(json.dumps({
            "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": " ".join(sys.argv),
            "quick": settings.quick,
            "rounds": settings.rounds,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform(), "pyzmq": zmq.pyzmq_version(),
                        "libzmq": zmq.zmq_version()},
            "modes_not_run": missing,
            "rows": rows,
            "records": records,
        }, indent=1, sort_keys=True) + "\n")
        write("")
        write("summary written to %s" % path)
    except OSError as exc:
        write("could not write %s: %s" % (path, exc))
