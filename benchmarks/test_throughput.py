"""Throughput suite: zmq_cluster (fast path and pure-Python twin) beside the
alternatives, in the same run. A benchmark, not a timing test: nothing here
asserts on speed; the processes check every result's contents.

* small tasks, free-running: ventilator, workers and sink each in a process
  of its own; the ventilator sends N ints as fast as the high-water mark
  lets it, each worker returns ``x + 1``, the sink takes N results. 1 and 2
  workers, over ipc:// and tcp://127.0.0.1; against raw pyzmq (8-byte
  frames), the documented module's send_pyobj design and
  multiprocessing.Pool.imap (chunksize 1, and Pool.map's default chunksize
  as an extra row).
* small tasks, windowed: the same task, ventilator and sink in one process
  with at most 1000 tasks in flight (ipc, 1 worker).
* large arrays: 1, 16 and 64 MiB float64 arrays there and back, 1 worker,
  ipc://; against raw pyzmq multipart copy=False + np.frombuffer, and pickle;
  ``ours-shm`` is the compiled twin with every node's ``shared_memory=True``.
* latency: p50/p99 round trip of one small task at a time.

Throughput figures are N / median round time (tasks/s), and for arrays the
bytes moved both ways / median round time (GB/s, 1e9 bytes). See
benchmarks/README.md.
"""

import statistics

import numpy as np
import pytest

from _harness import FreePipeline

# Generous per-test bound (pytest-timeout, if a project-wide one is lower).
pytestmark = pytest.mark.timeout(900)

OURS = ("ours-fast", "ours-py")


def _case(impl, transport, workers):
    return pytest.param(impl, transport, workers,
                        id="%s-%s-w%d" % (impl, transport or "pool", workers))


#: Free-running small tasks: every implementation of a case runs in the same
#: test, its pipelines all started, their rounds interleaved (A B C A B C...),
#: so that the load of a shared machine drifting during the case weighs on
#: each alike. mp has no transport: it runs with the ipc cases.
SMALL_IMPLS = OURS + ("raw", "raw-echo", "pickle")
SMALL = [pytest.param(transport, workers, id="%s-w%d" % (transport, workers))
         for transport in ("ipc", "tcp") for workers in (1, 2)]

WINDOWED = [_case(impl, "ipc", 1) for impl in OURS + ("raw", "pickle")]
WINDOWED += [_case("mp", None, 1)]

LARGE_MIB = (1, 16, 64)
#: ours-shm: the compiled twin with shared_memory=True on every node (same
#: host: arrays of 1 MiB or more by memfd slot, docs/protocol.md "Arrays").
LARGE = [_case(impl, "ipc", 1) for impl in OURS + ("ours-shm", "raw", "pickle")]

LATENCY = [_case(impl, transport, 1)
           for transport in ("ipc", "tcp") for impl in OURS + ("raw", "pickle")]


def _use(pipelines, available, impl, transport, workers):
    if impl in OURS or impl == "ours-shm":
        available(impl)
    return pipelines.get(impl, transport, workers)


def _guard(pipelines, fn):
    try:
        return fn()
    except BaseException:
        pipelines.discard()  # a failed pipeline is restarted by the next case
        raise


@pytest.mark.parametrize("transport,workers", SMALL)
def test_small_tasks(benchmark, pipelines, available, settings, record, transport, workers):
    pipelines.close()  # (the shared one of other cases: idle, but still processes)
    n = settings.free_n
    benchmark.group = "small free-running %s w%d" % (transport, workers)
    impls = []
    for impl in SMALL_IMPLS:
        try:
            if impl in OURS:
                available(impl)  # (fails the case for a fast path that is required)
        except pytest.skip.Exception:
            continue
        impls.append(impl)
    if transport == "ipc":
        impls.append("mp")
    chunked = -(-n // (4 * workers))  # Pool.map's default chunksize
    seconds = {impl: [] for impl in impls + ["mp-chunked"]}
    started = []
    try:
        for impl in impls:
            started.append(FreePipeline(impl, None if impl == "mp" else transport,
                                        workers).start())

        def one_round():
            for pipeline in started:
                seconds[pipeline.impl].append(pipeline.round(n))
                if pipeline.impl == "mp":   # Pool.map, its default chunksize
                    seconds["mp-chunked"].append(pipeline.round(n, chunked))

        benchmark.pedantic(one_round, rounds=settings.free_rounds, iterations=1)
    finally:
        for pipeline in started:
            pipeline.close()
    for impl, times in seconds.items():
        if not times:
            continue
        info = {"tasks_per_s": n / statistics.median(times), "n": n, "payload_bytes": 8,
                "workers": workers, "transport": None if impl.startswith("mp") else transport,
                "rounds_tasks_per_s": [n / t for t in times]}
        if impl == "mp-chunked":
            info["chunksize"] = chunked
        benchmark.extra_info[impl] = info
        record("small", impl=impl, **info)


@pytest.mark.parametrize("impl,transport,workers", WINDOWED)
def test_small_windowed(benchmark, pipelines, available, settings, record, timed, impl,
                        transport, workers):
    pipeline = _use(pipelines, available, impl, transport, workers)
    n = settings.small_n
    benchmark.group = "small windowed %s w%d" % (transport or "ipc/tcp", workers)
    seconds, _ = _guard(pipelines, lambda: timed(pipeline, "small", n=n))
    info = {"tasks_per_s": n / seconds, "mode": impl, "transport": transport,
            "workers": workers, "n": n, "payload_bytes": 8}
    benchmark.extra_info.update(info)
    record("small-windowed", impl=impl, **{k: v for k, v in info.items() if k != "mode"})


@pytest.mark.parametrize("mib", LARGE_MIB)
@pytest.mark.parametrize("impl,transport,workers", LARGE)
def test_large_arrays(benchmark, pipelines, available, settings, record, timed, impl, transport,
                      workers, mib):
    pipeline = _use(pipelines, available, impl, transport, workers)
    n = settings.large_n(mib)
    benchmark.group = "large %d MiB %s w%d" % (mib, transport, workers)

    def run():
        nbytes = pipeline.run("prepare", mib=mib)["bytes"]
        return nbytes, timed(pipeline, "large", n=n)[0]

    nbytes, seconds = _guard(pipelines, run)
    info = {"tasks_per_s": n / seconds, "gb_per_s": 2 * n * nbytes / seconds / 1e9,
            "mode": impl, "transport": transport, "workers": workers, "n": n, "mib": mib}
    benchmark.extra_info.update(info)
    record("large", impl=impl, **{k: v for k, v in info.items() if k != "mode"})


@pytest.mark.parametrize("impl,transport,workers", LATENCY)
def test_latency(benchmark, pipelines, available, settings, record, timed, impl, transport,
                 workers):
    pipeline = _use(pipelines, available, impl, transport, workers)
    n = settings.latency_n
    benchmark.group = "latency %s" % transport
    _, replies = _guard(pipelines,
                        lambda: timed(pipeline, "latency", n=n))
    rtt = np.concatenate([np.asarray(r["rtt_ns"], dtype=np.float64) for r in replies]) / 1e3
    assert replies and all(len(r["rtt_ns"]) == n for r in replies)
    p50, p99 = np.percentile(rtt, [50, 99])
    info = {"p50_us": float(p50), "p99_us": float(p99), "mean_us": float(rtt.mean()),
            "mode": impl, "transport": transport, "workers": workers, "n": int(rtt.size)}
    benchmark.extra_info.update(info)
    record("latency", impl=impl, **{k: v for k, v in info.items() if k != "mode"})
