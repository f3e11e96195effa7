"""benchmarks/latency_cpu.py and stream_cpu.py as part of the suite: in quick
mode (CI) a few hundred round trips (a short stream), so that they never
rot; in full mode the real counts.
It asserts no timing: only that every mode reported, and that the pool's
round trips went to a leased worker directly."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_latency_cpu(pytestconfig):
    quick = pytestconfig._zc_settings.quick
    cmd = [sys.executable, os.path.join(HERE, "latency_cpu.py"), "--n", "300" if quick else "20000"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    for label in ("raw REQ/REP: p50", "[process]: p50", "[thread]: p50"):
        assert label in out.stdout
    assert "(no lease)" not in out.stdout
    print(out.stdout)


def test_stream_cpu(pytestconfig):
    """benchmarks/stream_cpu.py the same way: it ran, and found every process."""
    quick = pytestconfig._zc_settings.quick
    cmd = [sys.executable, os.path.join(HERE, "stream_cpu.py"),
           *(["--seconds", "0.5", "--n", "2000"] if quick else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    for who in ("caller", "scheduler", "worker0", "worker1", "CPU per task"):
        assert who in out.stdout
    print(out.stdout)
