"""Bad input to the command line, met as a user meets it: a one-line error,
a non-zero exit status, and nothing left behind (no worker started for a
scheduler that is not there, no scheduler file of a cluster that stopped)."""

import json
import os
import socket
import sys
import time

import pytest
import zmq

from zmq_cluster.config import write_scheduler_file
from zmq_cluster.security import ClientSecurity, keygen, load_public_key

from cli_helpers import Command, free_port, one_line_error, run, wait_for_workers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "pool"))

pytestmark = pytest.mark.timeout(120)


def workers_for(address):
    """The pids of the worker processes started for ``address`` (any parent)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"zmq_cluster._start" in argv and address.encode() in argv:
            found.append(int(pid))
    return found


@pytest.mark.parametrize("args, fragment", [
    (["scheduler", "--listen", "foo"], "argument --listen: must be an address such as"),
    # libzmq would listen on port 70000 - 65536 = 4464 without a word.
    (["scheduler", "--listen", "tcp://127.0.0.1:70000"], "with a PORT of 0-65535"),
    (["status", "--connect", "tcp://127.0.0.1"], "with a host and a port"),
    (["stop", "--connect", "foo"], "argument --connect: must be an address such as"),
    (["restart-workers", "--connect", "tcp://127.0.0.1:abc"], "with a PORT of 1-65535"),
    (["worker", "--connect", "head:5555", "-n", "1"], "must be an address such as"),
])
def test_addresses_are_checked_before_anything_starts(args, fragment):
    result = run(*args, timeout=30)
    assert result.returncode == 2, result
    one_line_error(result, "zmq-cluster %s: error:" % args[0], fragment)


def test_an_address_in_the_config_file_is_checked(tmp_path):
    config = tmp_path / "zc.toml"
    config.write_text('connect = "foo"\n')
    result = run("status", "--config", config, timeout=30)
    assert result.returncode == 2
    one_line_error(result, "key 'connect' in config file %s must be an address" % config)


def test_a_scheduler_file_with_a_bad_address_is_named(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"address": "tcp://head", "public_key": None}))
    result = run("status", "--scheduler-file", path, timeout=30)
    assert result.returncode == 1
    one_line_error(result, "scheduler file %s" % path, "with a host and a port")


def test_an_address_in_use_is_one_line(tmp_path):
    ctx = zmq.Context()
    taken = ctx.socket(zmq.REP)
    taken.setsockopt(zmq.LINGER, 0)
    try:
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        result = run("scheduler", "--listen", "tcp://127.0.0.1:%d" % port,
                     "--scheduler-file", tmp_path / "s.json", timeout=30)
        assert result.returncode == 1
        one_line_error(result, "cannot listen on tcp://127.0.0.1:%d: Address already in use"
                       % port, "another scheduler")
        assert not (tmp_path / "s.json").exists()
        result = run("scheduler", "--listen", "ipc://%s/no/such/dir/s" % tmp_path, timeout=30)
        assert result.returncode == 1
        one_line_error(result, "cannot listen on ipc://", "No such file or directory")
    finally:
        taken.close()
        ctx.term()


def test_an_unwritable_scheduler_file_is_named(tmp_path):
    path = tmp_path / "missing" / "s.json"
    result = run("scheduler", "--listen", "tcp://127.0.0.1:0", "--scheduler-file", path,
                 timeout=30)
    assert result.returncode == 1
    # It names the file asked for, not the temporary file beside it.
    one_line_error(result, "cannot write the scheduler file %s: No such file" % path)
    result = run("local", "-n", "1", "--scheduler-file", path, timeout=60)
    assert result.returncode == 1
    one_line_error(result, "cannot write the scheduler file %s" % path)


# ------------------------------------------ workers for a missing scheduler


def test_workers_are_not_started_for_a_dead_scheduler(tmp_path):
    """A scheduler file left by a killed scheduler: the nanny tries, reading
    the file again, then exits 1 with one line and has started no worker."""
    address = "tcp://127.0.0.1:%d" % free_port()
    path = tmp_path / "s.json"
    write_scheduler_file(path, address)
    start = time.monotonic()
    result = run("worker", "--scheduler-file", path, "-n", "1", "--timeout", "1", timeout=30)
    assert result.returncode == 1
    assert time.monotonic() - start < 20
    one_line_error(result, "zmq-cluster worker: error: no scheduler answered at %s" % address,
                   "tried for 1 s", str(path), "leave its file behind")
    assert workers_for(address) == []
    result = run("worker", "--connect", address, "-n", "1", "--timeout", "0.5", timeout=30)
    assert result.returncode == 1
    one_line_error(result, "no scheduler answered at %s within 0.5 s" % address)
    assert workers_for(address) == []


#: A nanny's --timeout that a refusal must not wait for (it takes
#: milliseconds; the bounds asserted below are loose: a busy machine).
REFUSAL_TIMEOUT = 30


def test_workers_are_not_started_with_a_refused_key(tmp_path, keys):
    """The scheduler refuses the key at the handshake: the nanny exits 1 at
    once (not after --timeout, not reading the scheduler file again), in one
    line naming the reason and the key, and has started no worker."""
    outsider = keygen(tmp_path / "outsider")
    sched = Command("scheduler", "--listen", "tcp://127.0.0.1:0", "--keys", keys.directory,
                    "--scheduler-file", tmp_path / "s.json")
    try:
        sched.expect("scheduler listening on")
        address = json.loads((tmp_path / "s.json").read_text())["address"]
        outsider_key = load_public_key(outsider.client_public).decode()
        for where in (["--scheduler-file", tmp_path / "s.json"],
                      ["--connect", address, "--scheduler-key", keys.scheduler_public]):
            start = time.monotonic()
            result = run("worker", *where, "--secret-key", outsider.client_secret, "-n", "1",
                         "--timeout", REFUSAL_TIMEOUT, timeout=60)
            assert result.returncode == 1, result.stderr
            assert time.monotonic() - start < REFUSAL_TIMEOUT / 2, result.stderr
            one_line_error(result, "zmq-cluster worker: error: the scheduler at %s refused this"
                           " key" % address, outsider_key, "authorized keys")
        # CURVE on one side only: refused as fast, saying which side lacks it.
        start = time.monotonic()
        result = run("worker", "--connect", address, "-n", "1", "--timeout", REFUSAL_TIMEOUT,
                     timeout=60)
        assert result.returncode == 1, result.stderr
        assert time.monotonic() - start < REFUSAL_TIMEOUT / 2, result.stderr
        one_line_error(result, "the scheduler uses CURVE and this side has no keys",
                       "--keys DIR")
        assert workers_for(address) == []
    finally:
        sched.kill()


def test_keys_for_a_scheduler_without_are_refused_at_once(tmp_path, keys):
    sched = Command("scheduler", "--listen", "tcp://127.0.0.1:0")
    try:
        address = sched.expect("scheduler listening on").split()[3]
        for command in (["worker", "-n", "1"], ["status"]):
            start = time.monotonic()
            result = run(*command, "--connect", address, "--keys", keys.directory,
                         "--timeout", REFUSAL_TIMEOUT, timeout=60)
            assert result.returncode == 1, result.stderr
            assert time.monotonic() - start < REFUSAL_TIMEOUT / 2, result.stderr
            one_line_error(result, "zmq-cluster %s: error: the security handshake with the"
                           " scheduler at %s failed" % (command[0], address),
                           "this side uses CURVE keys")
        assert workers_for(address) == []
    finally:
        sched.kill()


def test_a_nanny_whose_workers_are_refused_later_exits_1(tmp_path, keys):
    """Admitted at start, then a new scheduler at the same address refuses the
    key: the workers stop (libzmq would not try again), are not replaced,
    and the nanny exits 1 saying so."""
    address = "tcp://127.0.0.1:%d" % free_port()
    outsider = keygen(tmp_path / "outsider")
    sched = Command("scheduler", "--listen", address, "--keys", keys.directory)
    nanny = None
    try:
        sched.expect("scheduler listening on")
        nanny = Command("worker", "--connect", address, "--keys", keys.directory, "-n", "2")
        nanny.expect("2 workers for the scheduler at %s" % address)
        wait_for_workers(address, 2, security=ClientSecurity.from_directory(keys.directory))
        sched.kill()   # SIGKILL: it tells no worker to stop
        sched = Command("scheduler", "--listen", address, "--secret-key",
                        keys.scheduler_secret, "--authorized-keys", outsider.authorized)
        sched.expect("scheduler listening on")
        assert nanny.wait(REFUSAL_TIMEOUT) == 1
        errors = [line for line in nanny.stderr if "error:" in line]
        assert errors == ["zmq-cluster worker: error: the scheduler at %s refused the workers at"
                          " the security handshake (it no longer admits this key, or its"
                          " security changed); the workers stopped" % address], nanny.transcript()
        assert any("HANDSHAKE_FAILED_AUTH" in line for line in nanny.stderr)
        assert workers_for(address) == []
    finally:
        if nanny is not None:
            nanny.kill()
        sched.kill()


def test_workers_follow_a_scheduler_file_that_a_new_scheduler_replaces(tmp_path):
    """Under a batch system the file of the last run may still be there when
    the workers look: they read it again until a scheduler answers."""
    path = tmp_path / "s.json"
    write_scheduler_file(path, "tcp://127.0.0.1:%d" % free_port())
    nanny = Command("worker", "--scheduler-file", path, "-n", "1", "--timeout", "60")
    sched = None
    try:
        sched = Command("scheduler", "--listen", "tcp://127.0.0.1:0", "--scheduler-file", path)
        address = sched.expect("scheduler listening on").split()[3]
        nanny.expect("1 workers for the scheduler at %s " % address, timeout=60)
        assert len(wait_for_workers(address, 1)) == 1
    finally:
        nanny.kill()
        if sched is not None:
            sched.kill()



def test_ctrl_c_while_the_nanny_waits_for_its_scheduler(tmp_path):
    """Ctrl-C before the workers start: exit 130, one line, no worker."""
    import signal
    with socket.socket() as listener:   # accepts TCP, never speaks ZMTP
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(60)
        address = "tcp://127.0.0.1:%d" % listener.getsockname()[1]
        nanny = Command("worker", "--connect", address, "-n", "1", "--timeout", "60")
        try:
            conn, _ = listener.accept()   # the nanny is trying to reach its scheduler
            conn.close()
            nanny.signal(signal.SIGINT)
            assert nanny.wait() == 130
            assert nanny.stderr == ["zmq-cluster worker: error: interrupted"]
            assert workers_for(address) == []
        finally:
            nanny.kill()


# Loaded by every Python process of the test's `local` (PYTHONPATH): a
# worker process tells the test its pid through a FIFO, then never starts:
# it waits for its standard input, a pipe from its parent, to close (it has
# not yet set itself to die with its parent).
_HOLD_WORKERS = """
import os
argv = open("/proc/self/cmdline", "rb").read().split(b"\\0")
if b"zmq_cluster._start" in argv and b"worker" in argv:
    with open(os.environ["ZC_TEST_FIFO"], "w") as fifo:
        fifo.write("%d\\n" % os.getpid())
    while os.read(0, 4096):
        pass
    os._exit(1)
"""


def test_ctrl_c_while_local_starts(tmp_path):
    """Ctrl-C before the workers have joined: exit 130 at once, one line,
    the scheduler and the workers stopped (before, it waited for start-up
    to finish, up to a minute for workers that never join)."""
    import select
    import signal
    from pool_helpers import wait_gone
    (tmp_path / "sitecustomize.py").write_text(_HOLD_WORKERS)
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    local = Command("local", "-n", "1", env={
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "ZC_TEST_FIFO": str(fifo)})
    worker = None
    try:
        assert select.select([reader], [], [], 60)[0], "no worker started"
        worker = int(os.read(reader, 64).split()[0])
        start = time.monotonic()
        local.signal(signal.SIGINT)
        assert local.wait(30) == 130, local.transcript()
        assert time.monotonic() - start < 8
        assert local.stderr[-1] == "zmq-cluster local: error: interrupted", local.transcript()
        assert local.lines == []
        assert wait_gone([worker], 10) == []
    finally:
        os.close(reader)
        if worker is not None and wait_gone([worker], 0):
            os.kill(worker, signal.SIGKILL)   # it holds the output pipes
        local.kill()
