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
  ipc://; against raw pyzmq multipart copy=False + np.frombuffer, and pickle.
* latency: p50/p99 round trip of one small task at a time.

Throughput figures are N / median round time (tasks/s), and for arrays the
bytes moved both ways / median round time (GB/s, 1e9 bytes). See
benchmarks/README.md.
"""

import statistics

import numpy as np
import pytest

# Generous per-test bound (pytest-timeout, if a project-wide one is lower).
pytestmark = pytest.mark.timeout(900)

OURS = ("ours-fast", "ours-py")


def _case(impl, transport, workers):
    return pytest.param(impl, transport, workers,
                        id="%s-%s-w%d" % (impl, transport or "pool", workers))


SMALL = [_case(impl, transport, workers)
         for transport in ("ipc", "tcp") for workers in (1, 2)
         for impl in OURS + ("raw", "raw-echo", "pickle")]
SMALL += [_case("mp", None, workers) for workers in (1, 2)]

WINDOWED = [_case(impl, "ipc", 1) for impl in OURS + ("raw", "pickle")]
WINDOWED += [_case("mp", None, 1)]

LARGE_MIB = (1, 16, 64)
LARGE = [_case(impl, "ipc", 1) for impl in OURS + ("raw", "pickle")]

LATENCY = [_case(impl, transport, 1)
           for transport in ("ipc", "tcp") for impl in OURS + ("raw", "pickle")]


def _use(pipelines, available, impl, transport, workers, free=False):
    if impl in OURS:
        available(impl)
    return pipelines.get(impl, transport, workers, free)


def _guard(pipelines, fn):
    try:
        return fn()
    except BaseException:
        pipelines.discard()  # a failed pipeline is restarted by the next case
        raise


@pytest.mark.parametrize("impl,transport,workers", SMALL)
def test_small_tasks(benchmark, pipelines, available, settings, record, impl, transport,
                     workers):
    pipeline = _use(pipelines, available, impl, transport, workers, free=True)
    n = settings.free_n
    benchmark.group = "small free-running %s w%d" % (transport or "ipc/tcp", workers)
    chunked = -(-n // (4 * workers))  # Pool.map's default chunksize
    seconds, extra = [], []

    def one_round():
        seconds.append(pipeline.round(n))
        if impl == "mp":
            extra.append(pipeline.round(n, chunked))  # Pool.map, its default chunksize

    # Each round's own clock (first send to last receive, CLOCK_MONOTONIC)
    # is the figure; pytest-benchmark's includes the control messages.
    _guard(pipelines, lambda: benchmark.pedantic(one_round, rounds=settings.free_rounds,
                                                 iterations=1))
    info = {"tasks_per_s": n / statistics.median(seconds), "mode": impl,
            "transport": transport, "workers": workers, "n": n, "payload_bytes": 8,
            "rounds_tasks_per_s": [n / s for s in seconds]}
    benchmark.extra_info.update(info)
    record("small", impl=impl, **{k: v for k, v in info.items() if k != "mode"})
    if extra:
        record("small", impl="mp-chunked", transport=None, workers=workers, n=n,
               chunksize=chunked, tasks_per_s=n / statistics.median(extra))


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
