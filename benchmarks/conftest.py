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
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import HERE, ROOT, Pipeline, probe  # noqa: E402

#: Implementations, in the order the summary shows them.
IMPLS = ("ours-fast", "ours-py", "raw", "raw-echo", "pickle", "mp")


# --------------------------------------------------------------- settings

class Settings:
    """Batch sizes and rounds; ``quick`` for CI."""

    def __init__(self, quick):
        self.quick = quick
        if quick:
            self.rounds, self.warmup = 2, 0
            self.free_rounds = 2
            self.free_n = 2_000
            self.small_n = 400
            self.large_bytes = 64 << 20   # per round, each way
            self.latency_n = 200
        else:
            self.rounds, self.warmup = 7, 1
            self.free_rounds = 7          # after the pipeline's own warm-up
            self.free_n = 100_000
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
    config._zc_load_start = os.getloadavg()
    config._zc_settings = Settings(config.getoption("--quick", False)
                                   or _env_flag("ZMQ_CLUSTER_BENCH_QUICK"))


@pytest.fixture(scope="session")
def settings(request):
    return request.config._zc_settings


# ------------------------------------------------------------ environments

@pytest.fixture(scope="session")
def modes(request):
    """{impl: None or the reason it cannot run} for ours-fast and ours-py."""
    found = {impl: probe(impl) for impl in ("ours-fast", "ours-py")}
    request.config._zc_modes = found
    return found


# --------------------------------------------------------------- pipelines

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
    """The pipeline a case uses, for cases that share one (None for the
    free-running cases, which start their own)."""
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
    mine = [i for i, item in enumerate(items) if item.path.parent == HERE]
    if mine and not _named(config):
        skip = pytest.mark.skip(reason="benchmarks run only when named: "
                                       "python -m pytest benchmarks/ [--quick]")
        for i in mine:
            items[i].add_marker(skip)
        return
    slots = [i for i in mine if pipeline_key(items[i]) is not None]
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
        why = modes.get("ours-fast" if impl == "ours-shm" else impl)
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
            replies.append(pipeline.run(op, **fields))
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


#: Cases, in the order the summary shows them.
CASES = ["small", "small-windowed", "large", "latency"]


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
        CASES.index(k[0]), str(k[1]), k[2] or 0, k[3] or 0))
    for case, transport, workers, mib in cases:
        if case.startswith("small") and transport is None:
            continue  # mp rows are shown beside each transport
        def get(impl, field, _case=case, _t=transport):
            t = None if impl.startswith("mp") else _t
            rec = by.get((_case, t, workers, mib, impl))
            return None if rec is None else rec.get(field)
        field = {"large": "gb_per_s", "latency": "p50_us"}.get(case, "tasks_per_s")
        for mode in ("ours-fast", "ours-py", "ours-shm"):
            ours = get(mode, field)
            if ours is None:
                continue
            row = {"case": case, "transport": transport, "workers": workers, "mib": mib,
                   "mode": mode, "unit": {"large": "GB/s", "latency": "us"}.get(case, "tasks/s"),
                   "ours": ours, "raw": get("raw", field), "raw_echo": get("raw-echo", field),
                   "pickle": get("pickle", field),
                   "mp": get("mp", field), "mp_chunked": get("mp-chunked", field),
                   "other_mode": get("ours-py" if mode == "ours-fast" else "ours-fast", field)}
            if case == "latency":
                row["ours_p99"] = get(mode, "p99_us")
                row["raw_p99"] = get("raw", "p99_us")
                row["pickle_p99"] = get("pickle", "p99_us")
            row["vs_raw"] = _ratio(ours, row["raw"])
            row["vs_raw_echo"] = _ratio(ours, row["raw_echo"])
            row["vs_pickle"] = _ratio(ours, row["pickle"])
            row["vs_mp"] = _ratio(ours, row["mp"])
            row["vs_mp_chunked"] = _ratio(ours, row["mp_chunked"])
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
    write("mode: %s; free-running small N=%d x %d rounds; windowed small N=%d, latency N=%d "
          "per round, %d rounds (+%d warm-up)"
          % ("QUICK (figures not meaningful)" if settings.quick else "full",
             settings.free_n, settings.free_rounds, settings.small_n, settings.latency_n,
             settings.rounds, settings.warmup))
    write("load average (1, 5, 15 min): at the start %s, at the end %s" % (
        " ".join("%.2f" % x for x in config._zc_load_start),
        " ".join("%.2f" % x for x in os.getloadavg())))
    missing = {k: v for k, v in (getattr(config, "_zc_modes", {}) or {}).items() if v}
    for impl, why in missing.items():
        write("%s not run: %s" % (impl, why))
    header = "%-22s %-9s %9s %9s %9s %9s %9s %9s %7s %7s %7s %7s %7s %7s" % (
        "case", "mode", "ours", "raw", "raw-echo", "pickle", "mp", "mp-chunk", "/raw", "/r-echo",
        "/pickle", "/mp", "/mp-ch", "fast/py")
    for case, title in (
            ("small", "small tasks, free-running: ventilator, workers and sink in their own "
                      "processes; tasks/s (ratios: ours/other, higher = ours faster)"),
            ("small-windowed", "small tasks, windowed (ventilator and sink in one process, "
                               "at most %d in flight); tasks/s" % 1000),
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
            write("%-22s %-9s %9s %9s %9s %9s %9s %9s %7s %7s %7s %7s %7s %7s" % (
                _case_label(r), r["mode"], _fmt(r["ours"], r["unit"]), _fmt(r["raw"], r["unit"]),
                _fmt(r["raw_echo"], r["unit"]), _fmt(r["pickle"], r["unit"]),
                _fmt(r["mp"], r["unit"]), _fmt(r["mp_chunked"], r["unit"]),
                _rfmt(r["vs_raw"]), _rfmt(r["vs_raw_echo"]), _rfmt(r["vs_pickle"]),
                _rfmt(r["vs_mp"]), _rfmt(r["vs_mp_chunked"]), _rfmt(r["fast_vs_py"])))
        if case == "latency":
            write("p99 us: " + "; ".join("%s %s: ours %s raw %s pickle %s" % (
                _case_label(r), r["mode"], _fmt(r["ours_p99"], "us"), _fmt(r["raw_p99"], "us"),
                _fmt(r["pickle_p99"], "us")) for r in sel))
    write("")
    write("raw: plain pyzmq whose worker does the + 1; raw-echo: the same sending each task "
          "back unchanged (plain pyzmq's best)")
    write("mp: Pool.imap(chunksize=1), ours' chunk (one task per message); mp-chunk: "
          "chunksize = ceil(n / (4 x workers)), Pool.map's default (an extra row for context)")
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
            "free_rounds": settings.free_rounds,
            "load_average": {"start": config._zc_load_start, "end": os.getloadavg()},
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
