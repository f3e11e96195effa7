"""The pool benchmark (benchmarks/pool_speed.py) as part of the suite: in
quick mode (CI) it runs with tiny sizes so that it never rots; in full mode
it runs the real sizes and prints its table. It asserts no timing."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_pool_speed(pytestconfig):
    quick = pytestconfig._zc_settings.quick
    cmd = [sys.executable, os.path.join(HERE, "pool_speed.py")] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "| imap_unordered(" in out.stdout and "| map(inc" in out.stdout
    # Both scheduler modes, side by side.
    assert "[thread] |" in out.stdout and "[process] |" in out.stdout
    # Large arrays with shared memory on and off, side by side.
    assert "shared memory on |" in out.stdout and "shared memory off |" in out.stdout
    print(out.stdout)
