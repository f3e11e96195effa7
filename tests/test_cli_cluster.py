"""The command line running a cluster on this host: scheduler, worker
nanny, status, stop, restart-workers and local, as processes (loopback and
ipc only), with their exit statuses and one-line errors."""

import json
import os
import signal
import sys
import time

import pytest

import zmq_cluster as zc
from zmq_cluster.config import read_scheduler_file
from zmq_cluster.security import ClientSecurity, keygen
from zmq_cluster.trust import InsecureListenError

from cli_helpers import Command, free_port, one_line_error, run, wait_for_workers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "pool"))
from pool_helpers import wait_gone  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def square(x):
    return x * x


def start_scheduler(tmp_path, *extra, listen="tcp://127.0.0.1:0"):
    path = tmp_path / "scheduler.json"
    sched = Command("scheduler", "--listen", listen, "--scheduler-file", path,
                    "--heartbeat-timeout", "2", *extra)
    sched.expect("scheduler listening on")
    return sched, path, read_scheduler_file(path)


# ------------------------------------------------------------ the scheduler


def test_scheduler_refuses_a_network_address_without_keys(tmp_path):
    result = run("scheduler", "--listen", "tcp://0.0.0.0:%d" % free_port())
    assert result.returncode == 1
    one_line_error(result, "zmq-cluster scheduler: error: refusing to listen",
                   "zmq-cluster keygen DIR", "--insecure")
    # From Python too: secure by default on a network.
    with pytest.raises(InsecureListenError):
        zc.Scheduler("tcp://0.0.0.0:0")
    with pytest.raises(InsecureListenError):
        zc.Scheduler("tcp://*:0")


def test_insecure_scheduler_warns_and_stops_on_sigterm(tmp_path):
    sched = Command("scheduler", "--listen", "tcp://0.0.0.0:0", "--insecure",
                    "--scheduler-file", tmp_path / "s.json")
    try:
        line = sched.expect("scheduler listening on")
        assert "no keys" in line
        found = read_scheduler_file(tmp_path / "s.json")
        assert found.public_key is None and not found.address.startswith("tcp://0.0.0.0")
        sched.signal(signal.SIGTERM)
        assert sched.wait() == 0
        warning = [e for e in sched.stderr if "WARNING" in e]
        assert warning and "anyone who can reach" in warning[0]
        assert not (tmp_path / "s.json").exists()   # removed on the way out
    finally:
        sched.kill()


def test_bad_key_options_are_usage_errors(tmp_path, keys):
    result = run("scheduler", "--listen", "tcp://127.0.0.1:0", "--keys", tmp_path / "none")
    assert result.returncode == 2
    one_line_error(result, "not found")
    result = run("scheduler", "--listen", "tcp://127.0.0.1:0",
                 "--secret-key", keys.scheduler_secret)
    assert result.returncode == 2
    one_line_error(result, "--authorized-keys")


# ------------------------------------------- a whole cluster by hand, CURVE


def test_cluster_by_hand_with_keys(tmp_path, keys):
    sched, path, found = start_scheduler(tmp_path, "--keys", keys.directory)
    nanny = None
    security = ClientSecurity.from_directory(keys.directory)
    where = ["--scheduler-file", path, "--keys", keys.directory]
    try:
        assert found.public_key == security.server_key.decode()
        nanny = Command("worker", "-n", "2", *where, "--import", "json")
        nanny.expect("2 workers for the scheduler")
        workers = wait_for_workers(found.address, 2, security=security)
        first = {w["pid"] for w in workers}

        with zc.ClusterPool(found.address, keys=keys.directory) as pool:
            assert pool.trusted
            assert pool.map(square, range(50), chunksize=4) == [x * x for x in range(50)]
            assert pool.submit(lambda: 7).result(30) == 7   # pickled: CURVE is trusted
        # The same from a config file: the scheduler file gives the address
        # and the scheduler's key, the config the client keys.
        config = tmp_path / "zc.toml"
        config.write_text('scheduler_file = "scheduler.json"\nkeys = "keys"\n')
        with zc.ClusterPool(config=config) as pool:
            assert pool.trusted and pool.map(square, [2, 3]) == [4, 9]
        config.write_text('scheduler_file = "scheduler.json"\n')
        with pytest.raises(ValueError, match="uses CURVE"):
            zc.ClusterPool(config=config)

        result = run("status", *where)
        assert result.returncode == 0, result.stderr
        assert "2 workers" in result.stdout and "idle" in result.stdout
        result = run("status", "--json", *where)
        status = json.loads(result.stdout)
        assert {w["pid"] for w in status["workers"]} == first
        for w in status["workers"]:
            assert set(w) >= {"host", "pid", "uptime", "tasks", "mean_task_seconds", "state",
                              "task_age"}
            assert w["state"] == "idle" and w["task_age"] is None and w["uptime"] > 0
        assert sum(w["tasks"] for w in status["workers"]) >= 51
        assert status["queued"] == status["running"] == 0
        assert status["counters"]["curve_accepted"] >= 4

        # A worker killed: its nanny starts another.
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        workers = wait_for_workers(found.address, 2, security=security, exclude={victim})
        second = {w["pid"] for w in workers}
        assert victim not in second and len(second) == 2

        # restart-workers: every worker replaced.
        result = run("restart-workers", *where)
        assert result.returncode == 0, result.stderr
        assert "told 2 workers" in result.stdout
        assert wait_gone(second, 30) == []
        third = {w["pid"] for w in wait_for_workers(found.address, 2, security=security,
                                                     exclude=second)}
        assert not third & second

        # stop --workers-only: the workers and their nanny exit, the scheduler stays.
        result = run("stop", "--workers-only", *where)
        assert result.returncode == 0, result.stderr
        assert nanny.wait() == 0
        assert "the scheduler stopped them" in nanny.lines[-1]
        assert wait_gone(third, 10) == []
        status = json.loads(run("status", "--json", *where).stdout)
        assert status["workers"] == []

        # stop: the scheduler exits and removes its file.
        result = run("stop", *where)
        assert result.returncode == 0, result.stderr
        assert sched.wait() == 0
        assert not path.exists()
        result = run("status", "--connect", found.address, "--keys", keys.directory,
                     "--timeout", "0.5")
        assert result.returncode == 1
        one_line_error(result, "zmq-cluster status: error:", found.address)
    finally:
        if nanny is not None:
            nanny.kill()
        sched.kill()


def test_clients_without_the_right_keys_are_refused(tmp_path, keys):
    outsider = keygen(tmp_path / "outsider")
    sched, path, found = start_scheduler(tmp_path, "--keys", keys.directory)
    try:
        # No keys at all, against a scheduler file that records a key: usage.
        result = run("status", "--scheduler-file", path)
        assert result.returncode == 2
        one_line_error(result, "uses CURVE")
        # Keys the scheduler does not admit: refused at the handshake, at once.
        start = time.monotonic()
        result = run("status", "--connect", found.address, "--secret-key",
                     outsider.client_secret, "--scheduler-key", keys.scheduler_public,
                     "--timeout", "30")
        assert result.returncode == 1 and time.monotonic() - start < 15
        one_line_error(result, "refused this key")
        with pytest.raises(zc.HandshakeRefused, match="uses CURVE and this side has no keys"):
            zc.ClusterPool(found.address, connect_timeout=30)
        reply = wait_for_workers(found.address, 0,
                                 security=ClientSecurity.from_directory(keys.directory))
        assert reply == []
    finally:
        sched.signal(signal.SIGINT)
        assert sched.wait() == 0
        sched.kill()


# ------------------------------------------------------- the worker nanny


def test_worker_nanny_stops_its_workers_on_sigterm_and_sigint(tmp_path):
    sched, path, found = start_scheduler(tmp_path)
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            nanny = Command("worker", "--connect", found.address, "-n", "2")
            try:
                nanny.expect("2 workers")
                pids = {w["pid"] for w in wait_for_workers(found.address, 2)}
                nanny.signal(signum)
                assert nanny.wait() == 0
                assert wait_gone(pids, 10) == []
            finally:
                nanny.kill()
            wait_for_workers(found.address, 0)
    finally:
        sched.kill()


def test_worker_nanny_with_shared_memory(tmp_path):
    """`zmq-cluster worker --shared-memory`: a pool on this host that asks
    for shared memory gets its large arguments taken and its results given
    by slot (the pool's counters say so), values intact."""
    import numpy as np
    sched, path, found = start_scheduler(tmp_path)
    try:
        nanny = Command("worker", "--connect", found.address, "-n", "1", "--shared-memory")
        try:
            nanny.expect("1 workers")
            wait_for_workers(found.address, 1)
            arrays = [np.arange(i, i + (2 << 20) // 8, dtype=np.float64) for i in range(3)]
            with zc.ClusterPool(found.address, shared_memory=True) as pool:
                out = pool.map(np.negative, arrays)
                shm = pool.shared_memory
                assert shm is not None
                sent, received = shm.arrays_sent, shm.arrays_received
            for a, b in zip(arrays, out):
                np.testing.assert_array_equal(b, -a)
            assert sent == 3 and received == 3
        finally:
            nanny.kill()
    finally:
        sched.kill()


def test_workers_die_with_a_sigkilled_nanny(tmp_path):
    sched, path, found = start_scheduler(tmp_path)
    nanny = Command("worker", "--scheduler-file", path, "-n", "2")
    try:
        nanny.expect("2 workers")
        pids = {w["pid"] for w in wait_for_workers(found.address, 2)}
        os.kill(nanny.process.pid, signal.SIGKILL)
        assert wait_gone(pids, 10) == []
    finally:
        nanny.kill()
        sched.kill()


def test_worker_settings_from_a_config_file(tmp_path):
    sched, path, found = start_scheduler(tmp_path)
    config = tmp_path / "zc.toml"
    config.write_text('scheduler_file = "scheduler.json"\nworkers = 1\nimports = ["json"]\n'
                      'heartbeat_timeout = 2.5\n')
    nanny = Command("worker", "--config", config)
    try:
        nanny.expect("1 workers for the scheduler at %s" % found.address)
        assert len(wait_for_workers(found.address, 1)) == 1
        with zc.ClusterPool(config=config) as pool:
            assert pool.map(square, [3]) == [9]
    finally:
        nanny.kill()
        sched.kill()


def test_worker_usage_and_runtime_errors(tmp_path):
    result = run("worker", "-n", "2")
    assert result.returncode == 2
    one_line_error(result, "--connect ADDRESS or --scheduler-file")
    result = run("worker", "--connect", "tcp://127.0.0.1:1", "-n", "0")
    assert result.returncode == 2
    one_line_error(result, "must be at least 1")
    result = run("worker", "--connect", "tcp://127.0.0.1:1", "--import", "no_such_module_zc")
    assert result.returncode == 1
    one_line_error(result, "cannot import no_such_module_zc")
    result = run("status", "--connect", "tcp://127.0.0.1:1", "--scheduler-file", "x")
    assert result.returncode == 2
    one_line_error(result, "not both")
    result = run("stop", "--connect", "tcp://127.0.0.1:1", "--timeout", "-1")
    assert result.returncode == 2
    one_line_error(result, "must be a number > 0")


@pytest.mark.parametrize("command", [["status"], ["stop"], ["stop", "--workers-only"],
                                     ["restart-workers"]])
def test_unreachable_scheduler_exits_1_within_the_timeout(command):
    start = time.monotonic()
    result = run(*command, "--connect", "tcp://127.0.0.1:%d" % free_port(), "--timeout", "0.5")
    assert result.returncode == 1
    assert time.monotonic() - start < 15
    one_line_error(result, "zmq-cluster %s: error: no scheduler answered" % command[0],
                   "within 0.5 s")


def test_missing_scheduler_file_exits_1(tmp_path):
    result = run("status", "--scheduler-file", tmp_path / "none.json")
    assert result.returncode == 1
    one_line_error(result, "scheduler file not found")


def test_stop_is_refused_to_an_untrusted_client(ipc_url):
    # trusted=False stands for a network peer without keys (--insecure).
    s = zc.Scheduler(ipc_url("untrusted"), trusted=False)
    import threading
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    try:
        for command in (["stop"], ["stop", "--workers-only"], ["restart-workers"]):
            result = run(*command, "--connect", s.address)
            assert result.returncode == 1
            one_line_error(result, "refused", "authenticated (CURVE) or local")
        assert s.counters["control_refused"] == 3
        assert t.is_alive()
    finally:
        s.stop()
        t.join(10)


# ------------------------------------------------------------------ local


def _local_started(local):
    """The address and worker pids that a started `zmq-cluster local` prints."""
    address = local.expect("ipc://")
    line = local.expect("Ctrl-C stops it")
    return address, [int(p) for p in line.split("(pids ")[1].split(")")[0].split()]


def test_local_runs_until_ctrl_c(tmp_path):
    local = Command("local", "-n", "2", "--scheduler-file", tmp_path / "s.json")
    try:
        address, pids = _local_started(local)
        assert read_scheduler_file(tmp_path / "s.json").address == address
        with zc.ClusterPool(address) as pool:
            assert pool.map(square, range(10)) == [x * x for x in range(10)]
            assert {w["pid"] for w in pool.stats()} == set(pids)
        result = run("status", "--connect", address, "--json")
        assert len(json.loads(result.stdout)["workers"]) == 2
        local.signal(signal.SIGINT)
        assert local.wait() == 0
        assert local.lines[-1] == "stopped"
        assert not (tmp_path / "s.json").exists()   # removed, as the scheduler's is
        assert wait_gone(pids, 10) == []
        assert not os.path.exists(address[len("ipc://"):])
    finally:
        local.kill()


def test_local_exits_when_zmq_cluster_stop_stops_it(tmp_path):
    # Before, its scheduler and workers stopped and `local` ran on for ever.
    local = Command("local", "-n", "1", "--scheduler-file", tmp_path / "s.json")
    try:
        address, pids = _local_started(local)
        result = run("stop", "--connect", address)
        assert result.returncode == 0, result.stderr
        assert local.wait() == 0
        assert local.lines[-2:] == ["the scheduler stopped (zmq-cluster stop); stopping",
                                    "stopped"]
        assert not (tmp_path / "s.json").exists()
        assert wait_gone(pids, 10) == []
    finally:
        local.kill()


def test_every_subcommand_has_help():
    for sub in ("scheduler", "worker", "status", "stop", "restart-workers", "local", "keygen"):
        result = run(sub, "--help")
        assert result.returncode == 0 and "--config FILE" in result.stdout, sub
