"""malloc_tuning: glibc malloc tunables for the processes the library starts
(LocalCluster's scheduler and workers, ``zmq-cluster worker``, ``zmq-cluster
local``), off by default; a tunable the user set wins."""

import ctypes
import os
import signal

import pytest

import zmq_cluster as zc
from zmq_cluster import process
from zmq_cluster.cli.main import build_parser
from zmq_cluster.process import MALLOC_TUNABLES, merge_tunables, worker_environment

from cli_helpers import Command, one_line_error, run, wait_for_workers

pytestmark = pytest.mark.timeout(120)

OURS = ":".join("%s=%s" % pair for pair in MALLOC_TUNABLES)
needs_glibc = pytest.mark.skipif(not process.is_glibc(), reason="GLIBC_TUNABLES is glibc's")
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="no /proc")


def started_environment(pid):
    """The environment process ``pid`` was started with. (glibc's tunable
    parser writes into that copy of GLIBC_TUNABLES: it may read cut short
    at a ``:``; the process's own ``os.environ`` has all of it.)"""
    with open("/proc/%d/environ" % pid, "rb") as f:
        data = f.read()
    return dict(item.decode().split("=", 1) for item in data.split(b"\0") if b"=" in item)


def malloc_probe(_):
    """(GLIBC_TUNABLES, whether glibc served a 64 MiB malloc with a fresh
    mmap), in the worker."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd   # bytes in mmapped chunks
    p = libc.malloc(64 << 20)
    mmapped = libc.mallinfo2().hblkhd - before >= 64 << 20
    libc.free(p)
    return os.environ.get("GLIBC_TUNABLES"), mmapped


# ------------------------------------------------------------ the environment


def test_merge_tunables_keeps_what_the_user_set():
    assert merge_tunables(None) == merge_tunables("") == OURS
    mine = "glibc.malloc.arena_max=4:glibc.pthread.rseq=0"
    merged = merge_tunables(mine).split(":")
    assert merged[:2] == mine.split(":")   # the user's first, unchanged
    assert "glibc.malloc.arena_max=1" not in merged
    assert "glibc.malloc.mmap_threshold=1073741824" in merged
    assert "glibc.malloc.trim_threshold=1073741824" in merged
    assert merge_tunables(OURS) == OURS


@needs_glibc
def test_worker_environment_malloc_tuning_is_opt_in():
    assert "GLIBC_TUNABLES" not in worker_environment(1, {"PATH": "/bin"})
    assert worker_environment(None, {"A": "b"}, malloc_tuning=True) == {
        "A": "b", "GLIBC_TUNABLES": OURS}
    env = worker_environment(1, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"},
                             malloc_tuning=True)
    assert env["GLIBC_TUNABLES"].split(":")[0] == "glibc.malloc.mmap_threshold=4096"
    assert env["OMP_NUM_THREADS"] == "1"


def test_malloc_tuning_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(process, "is_glibc", lambda: False)
    assert worker_environment(None, {"A": "b"}, malloc_tuning=True) == {"A": "b"}


def test_local_cluster_checks_malloc_tuning():
    with pytest.raises(TypeError, match="malloc_tuning must be True or False"):
        zc.LocalCluster(0, malloc_tuning="yes")


# ------------------------------------------------------------ started processes


@needs_glibc
@needs_proc
def test_local_cluster_workers_and_scheduler_get_the_tunables(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    # The scheduler in its own process, so that its environment can be read.
    with zc.LocalCluster(1, malloc_tuning=True, scheduler="process") as cluster, \
            zc.ClusterPool(cluster) as pool:
        # glibc took them: a 64 MiB block now comes from the heap.
        assert pool.map(malloc_probe, [0]) == [(OURS, False)]
        seen = started_environment(cluster.scheduler.pid)["GLIBC_TUNABLES"]
        assert seen and OURS.startswith(seen)
    assert "GLIBC_TUNABLES" not in os.environ


@needs_glibc
@needs_proc
def test_local_cluster_leaves_malloc_alone_by_default(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with zc.LocalCluster(1, scheduler="process") as cluster, zc.ClusterPool(cluster) as pool:
        assert pool.map(malloc_probe, [0]) == [(None, True)]
        assert "GLIBC_TUNABLES" not in started_environment(cluster.scheduler.pid)


@needs_glibc
def test_a_users_tunable_wins_in_the_workers(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=33554432")
    with zc.LocalCluster(1, malloc_tuning=True) as cluster, zc.ClusterPool(cluster) as pool:
        tunables, mmapped = pool.map(malloc_probe, [0])[0]
    assert tunables.split(":")[0] == "glibc.malloc.mmap_threshold=33554432"
    assert "glibc.malloc.arena_max=1" in tunables.split(":")
    assert mmapped  # 64 MiB is above the user's 32 MiB threshold


# ------------------------------------------------------------ command line


def test_cli_flags_parse():
    parser = build_parser()
    for sub in ("worker", "local"):
        extra = ["--connect", "ipc:///x"] if sub == "worker" else []
        assert parser.parse_args([sub, *extra]).malloc_tuning is None
        assert parser.parse_args([sub, *extra, "--malloc-tuning"]).malloc_tuning is True
        assert parser.parse_args([sub, *extra, "--no-malloc-tuning"]).malloc_tuning is False


def test_cli_rejects_a_bad_malloc_tuning_key(tmp_path):
    config = tmp_path / "zc.toml"
    config.write_text('connect = "ipc:///nowhere"\nmalloc_tuning = "yes"\n')
    result = run("worker", "--config", config)
    assert result.returncode == 2
    one_line_error(result, "'malloc_tuning'", str(config), "must be a boolean")


@needs_glibc
def test_worker_nanny_malloc_tuning_from_config_and_flag(tmp_path, ipc_url):
    address = ipc_url("sched")
    sched = Command("scheduler", "--listen", address, "--heartbeat-timeout", "2",
                    env={"GLIBC_TUNABLES": ""})
    try:
        sched.expect("scheduler listening on")
        config = tmp_path / "zc.toml"
        config.write_text('connect = "%s"\nworkers = 1\nmalloc_tuning = true\n' % address)
        seen = set()
        for flags, expected in (([], OURS), (["--no-malloc-tuning"], "")):
            nanny = Command("worker", "--config", config, *flags, env={"GLIBC_TUNABLES": ""})
            try:
                nanny.expect("1 workers")
                pid, = {w["pid"] for w in wait_for_workers(address, 1, exclude=seen)} - seen
                with zc.ClusterPool(address) as pool:
                    assert pool.map(malloc_probe, [0]) == [(expected, not expected)], flags
                seen.add(pid)
                nanny.signal(signal.SIGTERM)
                assert nanny.wait() == 0
            finally:
                nanny.kill()
            wait_for_workers(address, 0)
    finally:
        sched.kill()
