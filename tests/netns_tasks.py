"""Task functions for the namespace tests, imported by reference by the
workers (``zmq-cluster worker --import netns_tasks``, tests/ on their
PYTHONPATH)."""

import os
import time


def where(item):
    """``item`` is ``(x, seconds)``: sleeps, then says where it ran:
    ``(x, x * x, network namespace, pid)``."""
    x, seconds = item
    if seconds:
        time.sleep(seconds)
    return x, x * x, os.readlink("/proc/self/ns/net"), os.getpid()
