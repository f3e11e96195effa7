"""Throughput suite: zmq_cluster (fast path and pure-Python twin) beside the
alternatives, in the same run. A benchmark, not a timing test: nothing here
asserts on speed; the drivers check every result's contents.

* small tasks: an 8-byte payload (a one-element float64 array; 8 raw bytes
  for raw pyzmq), identity task, 1 and 2 worker processes, over ipc:// and
  tcp://127.0.0.1; against raw pyzmq bytes frames, the pickled
  request/result design (send_pyobj) and multiprocessing.Pool.imap.
* large arrays: 1, 16 and 64 MiB float64 arrays there and back, 1 worker,
  ipc://; against raw pyzmq multipart copy=False + np.frombuffer, and pickle.
* latency: p50/p99 round trip of one small task at a time.

Throughput figures are N / median round time (tasks/s), and for arrays the
bytes moved both ways / median round time (GB/s, 1e9 bytes). See
benchmarks/README.md.
"""

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
         for impl in OURS + ("raw", "pickle")]
SMALL += [_case("mp", None, workers) for workers in (1, 2)]

LARGE_MIB = (1, 16, 64)
LARGE = [_case(impl, "ipc", 1) for impl in OURS + ("raw", "pickle")]

LATENCY = [_case(impl, transport, 1)
           for transport in ("ipc", "tcp") for impl in OURS + ("raw", "pickle")]


def _use(pipelines, available, impl, transport, workers):
    if impl in OURS:
        available(impl)
    return pipelines.get(impl, transport, workers)


def _guard(pipelines, fn):
    try:
        return fn()
    except BaseException:
        pipelines.discard()  # a failed pipeline is restarted by the next case
        raise


@pytest.mark.parametrize("impl,transport,workers", SMALL)
def test_small_tasks(benchmark, pipelines, available, settings, record, timed, impl, transport,
                     workers):
    pipeline = _use(pipelines, available, impl, transport, workers)
    n = settings.small_n
    benchmark.group = "small %s w%d" % (transport or "ipc/tcp", workers)
    seconds, _ = _guard(pipelines, lambda: timed(pipeline, "small", n=n))
    info = {"tasks_per_s": n / seconds, "mode": impl, "transport": transport,
            "workers": workers, "n": n, "payload_bytes": 8}
    benchmark.extra_info.update(info)
    record("small", impl=impl, **{k: v for k, v in info.items() if k != "mode"})


@pytest.mark.parametrize("mib", LARGE_MIB)
@pytest.mark.parametrize("impl,transport,workers", LARGE)
def test_large_arrays(benchmark, pipelines, available, settings, record, timed, impl, transport,
                      workers, mib):
    pipeline = _use(pipelines, available, impl, transport, workers)
    n = settings.large_n(mib)
    benchmark.group = "large %d MiB %s w%d" % (mib, transport, workers)

    def run():
        nbytes = pipeline.call("prepare", mib=mib)["bytes"]
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
