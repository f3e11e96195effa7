"""The README's first command: the demo runs and checks its own results."""

import io
import subprocess
import sys

from zmq_cluster import demo


def test_demo_run_reports_what_it_did():
    out = io.StringIO()
    report = demo.run(workers=2, tasks=20, mib=0.25, out=out)
    assert report["tasks"] == 20 and report["workers_used"] == 2
    assert report["array_bytes"] == (1 << 18)
    assert report["tasks_per_s"] > 0 and report["gb_per_s"] > 0
    text = out.getvalue()
    assert "all 20 results checked" in text and "tasks/s" in text


def test_demo_command_line():
    proc = subprocess.run([sys.executable, "-m", "zmq_cluster.demo", "--tasks", "4",
                           "--mib", "0.01"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "all 4 results checked" in proc.stdout
