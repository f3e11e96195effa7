"""A cluster across real TCP between network-namespace hosts
(tests/netns.py): the command line's scheduler on head (10.77.0.1), its
worker nannies on worker1 (.2) and worker2 (.3), pools in head and in the
intruder's host (.4).

* a map runs on both worker hosts (CURVE on);
* an intruder without keys (or with keys of its own) gets nothing: no
  connection, no task, no result that anyone receives, nothing run;
* on a scheduler started with --insecure, a network peer's pickles (an
  argument, a function, a result) are refused unexecuted;
* a worker host whose cable is cut mid-map: its tasks run elsewhere, every
  result arrives exactly once.
"""

import collections
import json
import os
import sys

import pytest

from netns import Lab, require_namespaces
from zmq_cluster.security import keygen

HERE = os.path.dirname(os.path.abspath(__file__))
POOL = os.path.join(HERE, "netns_pool.py")
HEAD = "10.77.0.1"
HEARTBEAT = "1.5"

pytestmark = pytest.mark.timeout(300)


def text(fragment):
    return lambda e: e.get("event") == "text" and fragment in e.get("text", "")


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in sys.path if p])
    e.pop("ZMQ_CLUSTER_CONFIG", None)
    return e


def cli(lab, host, *args):
    """``zmq-cluster ARGS`` in ``host`` as a lab Peer."""
    return lab.python(host, "-m", "zmq_cluster", *map(str, args), env=env())


def cli_run(lab, host, *args):
    """``zmq-cluster ARGS`` in ``host``, to the end."""
    import subprocess
    return subprocess.run(["ip", "netns", "exec", lab[host].namespace, sys.executable, "-m",
                           "zmq_cluster", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env())


def namespace_of(lab, host):
    return lab.run(host, "readlink", "/proc/self/ns/net").stdout.strip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A CURVE scheduler on head and one worker process on each worker host."""
    require_namespaces()
    base = tmp_path_factory.mktemp("netns-cluster")
    keys = keygen(base / "keys")
    outsider = keygen(base / "outsider")
    scheduler_file = base / "scheduler.json"
    with Lab(("head", "worker1", "worker2", "intruder")) as lab:
        scheduler = cli(lab, "head", "scheduler", "--listen", "tcp://%s:5555" % HEAD, "--keys",
                        keys.directory, "--scheduler-file", scheduler_file,
                        "--heartbeat-timeout", HEARTBEAT)
        scheduler.expect(text("scheduler listening on tcp://%s:5555" % HEAD))
        nannies = [cli(lab, host, "worker", "--scheduler-file", scheduler_file, "--keys",
                       keys.directory, "-n", "1", "--import", "netns_tasks",
                       "--heartbeat-timeout", HEARTBEAT)
                   for host in ("worker1", "worker2")]
        for nanny in nannies:
            nanny.expect(text("1 workers for the scheduler"))
        yield dict(lab=lab, keys=keys, outsider=outsider, file=scheduler_file,
                   address="tcp://%s:5555" % HEAD, scheduler=scheduler, nannies=nannies)


def status(c, host="head", *extra):
    result = cli_run(c["lab"], host, "status", "--json", "--scheduler-file", c["file"],
                     "--keys", c["keys"].directory, *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def run_map(c, items, sleep=0.0, host="head", **kw):
    return c["lab"].python(host, POOL, "map", "--connect", c["address"], "--keys",
                           c["keys"].directory, "--items", str(items), "--sleep", str(sleep),
                           "--wait-workers", "2", "--heartbeat-timeout", HEARTBEAT, env=env())


def test_a_map_runs_on_both_worker_hosts(cluster):
    c = cluster
    pool = run_map(c, 200, 0.002)
    assert pool.expect("ready", timeout=60)["trusted"] is True   # CURVE: authenticated
    done = pool.expect("done", timeout=120)
    assert done["counts"] == {str(i): 1 for i in range(200)}
    ran_in = collections.Counter(e["ns"] for e in pool.events if e["event"] == "result")
    assert set(ran_in) == {namespace_of(c["lab"], "worker1"), namespace_of(c["lab"], "worker2")}
    assert done["unmatched"] == done["malformed"] == 0
    pool.finish()


def test_an_intruder_without_keys_gets_nothing(cluster, tmp_path):
    c = cluster
    lab = c["lab"]
    target = tmp_path / "intruder-was-here"
    before = status(c)["counters"].get("curve_refused", 0)

    # 1. The command line without keys: the scheduler file says CURVE.
    result = cli_run(lab, "intruder", "status", "--scheduler-file", c["file"])
    assert result.returncode == 2 and "uses CURVE" in result.stderr
    # 2. ... pointed at the address: refused at the handshake.
    #    (libzmq reports PROTOCOL, or, when the scheduler resets the connection
    #    before the greeting is read, failures with no detail: both say CURVE.)
    result = cli_run(lab, "intruder", "stop", "--connect", c["address"], "--timeout", "2")
    assert result.returncode == 1 and "CURVE" in result.stderr and "keys" in result.stderr
    # 3. Keys of its own and the scheduler's public key: ZAP refuses them.
    result = cli_run(lab, "intruder", "stop", "--connect", c["address"], "--secret-key",
                     c["outsider"].client_secret, "--scheduler-key", c["keys"].scheduler_public,
                     "--timeout", "2")
    assert result.returncode == 1 and "refused this key" in result.stderr
    # 4. A pool that would make the workers unpickle a file-creating pickle.
    attack = lab.python("intruder", POOL, "attack", "--connect", c["address"], "--target",
                        str(target), "--connect-timeout", "2", env=env())
    refused = attack.expect("refused", timeout=30)
    assert refused["what"] == "connect" and "CURVE" in refused["error"]
    attack.finish()
    # 5. A worker nanny without keys starts no worker: the scheduler did not
    #    admit it (the handshake failed).
    result = cli_run(lab, "intruder", "worker", "--connect", c["address"], "-n", "1",
                     "--timeout", "2")
    assert result.returncode == 1 and "CURVE" in result.stderr and "keys" in result.stderr
    #    Workers of its own (no keys, as that nanny would have started; then
    #    outsider keys) to take tasks and answer with malicious results.
    workers = [lab.python("intruder", "-m", "zmq_cluster._start", "worker", "--connect",
                          c["address"], "--import", "netns_tasks", env=env()),
               lab.python("intruder", POOL, "fake-worker", "--connect", c["address"],
                          "--keys", c["outsider"].directory, "--target", str(target),
                          env=env())]
    # 6. Raw TCP: a ZMTP greeting and junk.
    raw = lab.python("intruder", POOL, "raw", "--host", HEAD, "--port", "5555", env=env())
    raw.expect("done", timeout=30)

    # Meanwhile the cluster's own work: only its two workers run it.
    pool = run_map(c, 100)
    pool.expect("ready", timeout=60)
    done = pool.expect("done", timeout=120)
    assert done["counts"] == {str(i): 1 for i in range(100)}
    ran_in = {e["ns"] for e in pool.events if e["event"] == "result"}
    assert namespace_of(lab, "intruder") not in ran_in
    assert done["unmatched"] == done["malformed"] == 0
    pool.finish()
    after = status(c)
    assert len(after["workers"]) == 2
    assert after["counters"]["curve_refused"] > before
    assert not target.exists()
    for w in workers:
        w.kill()


def test_insecure_scheduler_refuses_network_pickles(cluster, tmp_path):
    """--insecure: network peers connect, but their pickles never load."""
    c = cluster
    lab = c["lab"]
    target = tmp_path / "pickle-ran"
    scheduler = cli(lab, "head", "scheduler", "--listen", "tcp://0.0.0.0:5556", "--insecure")
    scheduler.expect(text("scheduler listening on"))
    insecure = "tcp://%s:5556" % HEAD
    worker = cli(lab, "worker1", "worker", "--connect", insecure, "-n", "1")
    worker.expect(text("1 workers"))
    try:
        # An intruder's pool: connected, but untrusted.
        attack = lab.python("intruder", POOL, "attack", "--connect", insecure, "--target",
                            str(target), env=env())
        assert attack.expect("ready", timeout=60)["trusted"] is False
        refusals = [attack.expect("refused", timeout=60) for _ in range(2)]
        assert {r["what"] for r in refusals} == {"pickled argument", "pickled function"}
        assert all("pickle" in r["error"] for r in refusals)
        attack.expect("done", timeout=60)
        attack.finish()
        assert not target.exists()

        # An intruder's worker answering with a malicious pickle: the head's
        # own (loopback, trusted) pool refuses it.
        worker.kill()
        fake = lab.python("intruder", POOL, "fake-worker", "--connect", insecure, "--target",
                          str(target), env=env())
        fake.expect("ready", timeout=30)
        local = lab.python("head", POOL, "attack", "--connect", "tcp://127.0.0.1:5556",
                           "--target", "/nonexistent", env=env())
        assert local.expect("ready", timeout=30)["trusted"] is True
        refused = local.expect(lambda e: e.get("event") in ("refused", "ran"), timeout=60)
        assert refused["event"] == "refused" and "pickle" in refused["error"], refused
        fake.expect("answered", timeout=30)
        assert not target.exists()
        local.kill()
        fake.kill()
    finally:
        scheduler.kill()
        worker.kill()


def test_a_worker_host_cut_off_mid_map_loses_its_tasks_to_the_other(cluster):
    c = cluster
    lab = c["lab"]
    pool = run_map(c, 300, 0.02)
    pool.expect("ready", timeout=60)
    ns2 = namespace_of(lab, "worker2")
    pool.expect(lambda e: e.get("event") == "result" and e["ns"] == ns2, timeout=60)
    for _ in range(20):
        pool.expect("result", timeout=60)
    lab.link_down("worker2")
    try:
        done = pool.expect("done", timeout=120)
        assert done["counts"] == {str(i): 1 for i in range(300)}   # each exactly once
        cut = [e for e in pool.events if e["event"] == "result"]
        ns1 = namespace_of(lab, "worker1")
        assert {e["ns"] for e in cut} == {ns1, ns2}
        assert cut[-1]["ns"] == ns1
        counters = done["counters"]
        # Its connection closed (ZMTP heartbeats): the scheduler learns it
        # from the monitor, or first from a send that finds no pipe.
        assert (counters.get("worker gone: disconnected", 0)
                + counters.get("worker gone: unreachable", 0)) >= 1, counters
        assert counters["redispatched"] >= 1
        pool.finish()
    finally:
        lab.link_up("worker2")
    # The cut worker comes back: it says HELLO again and is a worker again.
    pool = run_map(c, 20)
    pool.expect("ready", timeout=60)
    assert pool.expect("done", timeout=60)["counts"] == {str(i): 1 for i in range(20)}
    pool.finish()
