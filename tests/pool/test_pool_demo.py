"""The README's first command: the pool demo runs a real job and reports it."""

import subprocess
import sys


def test_pool_demo_command_line():
    proc = subprocess.run([sys.executable, "-m", "zmq_cluster.pool_demo", "--workers", "2",
                           "--arrays", "8", "--size", "30"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "LocalCluster at ipc://" in proc.stdout
    assert "8 SVDs of 30x30 matrices" in proc.stdout
    assert proc.stdout.count("  worker ") == 2
    assert "8/8" in proc.stderr  # the progress bar
