"""A scheduler that refuses a peer at the security handshake: the pool's
client (SchedulerClient, ClusterPool) fails at once with HandshakeRefused,
and a pool worker stops with EXIT_REFUSED, instead of waiting for an answer
that cannot come (libzmq does not reconnect after an AUTH or PROTOCOL
handshake failure). Real schedulers on loopback, in threads of this process;
the command line's side is in test_cli_errors.py."""

import contextlib
import pickle
import sys
import threading
import time

import pytest
import zmq

import zmq_cluster as zc
from zmq_cluster.client import SchedulerClient
from zmq_cluster.poolworker import EXIT_REFUSED, PoolWorker
from zmq_cluster.security import ClientSecurity, ServerSecurity, keygen, load_public_key
from zmq_cluster.supervisor import Supervisor

pytestmark = pytest.mark.timeout(60)

#: The connect timeout the refusals must not wait for; a refusal takes
#: milliseconds, and the bound asserted is loose (a busy machine).
CONNECT_TIMEOUT = 30.0


@contextlib.contextmanager
def running_scheduler(security=None):
    """A Scheduler on loopback (``security``: ServerSecurity or None) in a
    thread; yields its address; the thread has ended when it exits."""
    scheduler = zc.Scheduler("tcp://127.0.0.1:0", security=security)
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        yield scheduler.address
    finally:
        scheduler.stop()
        thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def curve_scheduler(keys):
    """The address of a CURVE scheduler admitting only the keys' client key."""
    with running_scheduler(ServerSecurity.from_directory(keys.directory)) as address:
        yield address


@pytest.fixture
def outsider(keys, tmp_path):
    """A key pair the scheduler does not admit, with the scheduler's public key."""
    other = keygen(tmp_path / "outsider")
    return ClientSecurity.from_files(other.client_secret, keys.scheduler_public)


def refused(connect, reason):
    """The HandshakeRefused ``connect()`` raises, checking it came well
    before the connect timeout."""
    start = time.monotonic()
    with pytest.raises(zc.HandshakeRefused) as info:
        connect()
    assert time.monotonic() - start < CONNECT_TIMEOUT / 2
    assert info.value.reason == reason
    return info.value


def test_a_pool_with_an_unauthorized_key_fails_at_once(keys, curve_scheduler, tmp_path):
    other = keygen(tmp_path / "outsider")
    exc = refused(lambda: zc.ClusterPool(curve_scheduler, secret_key=other.client_secret,
                                         scheduler_key=keys.scheduler_public,
                                         connect_timeout=CONNECT_TIMEOUT), "auth")
    assert isinstance(exc, ConnectionError) and not isinstance(exc, TimeoutError)
    assert exc.address == curve_scheduler
    message = str(exc)
    assert "the scheduler at %s refused this key" % curve_scheduler in message
    # It names the key, to look for among the authorized ones.
    assert load_public_key(other.client_public).decode() in message
    assert "authorized keys" in message
    # An authorized key still gets in (and the scheduler is none the worse).
    with zc.ClusterPool(curve_scheduler, keys=keys.directory,
                        connect_timeout=CONNECT_TIMEOUT) as pool:
        assert pool.trusted


def test_a_client_without_keys_is_refused_by_a_curve_scheduler_at_once(curve_scheduler):
    exc = refused(lambda: SchedulerClient(curve_scheduler, connect_timeout=CONNECT_TIMEOUT),
                  "protocol")
    assert "the scheduler uses CURVE and this side has no keys" in str(exc)


def test_a_client_with_keys_is_refused_by_a_scheduler_without_at_once(keys):
    with running_scheduler() as address:
        exc = refused(lambda: SchedulerClient(
            address, security=ClientSecurity.from_directory(keys.directory),
            connect_timeout=CONNECT_TIMEOUT), "protocol")
        assert "this side uses CURVE keys and the scheduler at that address does not" in str(exc)
        client = SchedulerClient(address, connect_timeout=CONNECT_TIMEOUT)
        client.close()


def test_a_wrong_scheduler_key_is_not_definitive_and_times_out(keys, curve_scheduler, tmp_path):
    # The scheduler cannot open a HELLO sealed for another key and drops the
    # connection without a word: libzmq says "no detail" and reconnects (so
    # would it after a scheduler restart), so the client waits its timeout.
    other = keygen(tmp_path / "other")
    security = ClientSecurity.from_files(keys.client_secret, other.scheduler_public)
    with pytest.raises(TimeoutError, match="handshake failed [0-9]+ times with no detail.*"
                                           "scheduler key is the scheduler's public key"):
        SchedulerClient(curve_scheduler, security=security, connect_timeout=1.0)


def test_handshake_refused_pickles_with_its_fields():
    exc = zc.HandshakeRefused("refused", "protocol", "tcp://h:1")
    back = pickle.loads(pickle.dumps(exc))
    assert (type(back), str(back), back.reason, back.address) == (
        zc.HandshakeRefused, "refused", "protocol", "tcp://h:1")


def run_until_refused(worker):
    """Run ``worker`` in a thread; it must stop by itself, refused."""
    thread = threading.Thread(target=worker.run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(CONNECT_TIMEOUT / 2)
    if thread.is_alive():
        worker.stop()
        thread.join(10)
        pytest.fail("the refused worker kept running")
    assert time.monotonic() - start < CONNECT_TIMEOUT / 2
    assert worker.exit_code == EXIT_REFUSED


def test_a_refused_pool_worker_stops_with_exit_refused(curve_scheduler, outsider, caplog):
    worker = PoolWorker(curve_scheduler, security=outsider, direct=False)
    run_until_refused(worker)
    assert any("refused this worker at the handshake (HANDSHAKE_FAILED_AUTH)" in r.getMessage()
               for r in caplog.records)


def test_a_pool_worker_with_keys_stops_for_a_scheduler_without(keys):
    with running_scheduler() as address:
        worker = PoolWorker(address, security=ClientSecurity.from_directory(keys.directory),
                            direct=False)
        run_until_refused(worker)


def test_a_supervisor_does_not_replace_a_refused_worker():
    """LocalCluster's kind of nanny (stop_with_workers=False): a child that
    exits with EXIT_REFUSED is counted and not replaced (another would be
    refused alike); the command line's nanny stops altogether
    (test_cli_errors.py)."""
    nanny = Supervisor(lambda: [sys.executable, "-c", "raise SystemExit(%d)" % EXIT_REFUSED], 1)
    nanny.start()
    try:
        deadline = time.monotonic() + 20
        while nanny.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert nanny.refused == 1
        time.sleep(0.3)  # a replacement would be due in 0.1 s
        assert (nanny.restarts, nanny.pids()) == (0, [])
    finally:
        nanny.terminate()
        nanny.close()


@pytest.fixture
def refused_before_hello(monkeypatch):
    """Makes every tcp connect return only once its handshake has been
    refused and libzmq has taken the connection's queue away (nothing can
    be sent: no POLLOUT), the order a fast refusal can take on its own: the
    first HELLO must not wait for ever to be queued."""
    connect = zmq.Socket.connect

    def connect_then_wait_for_refusal(self, address):
        result = connect(self, address)
        if not address.startswith("tcp://"):  # the monitor's inproc PAIR
            return result
        deadline = time.monotonic() + 10
        while self.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
            assert time.monotonic() < deadline, "the handshake was not refused"
            time.sleep(0.005)
        return result

    monkeypatch.setattr(zmq.Socket, "connect", connect_then_wait_for_refusal)


def test_a_client_refused_before_its_hello_fails_at_once(curve_scheduler, outsider,
                                                         refused_before_hello):
    refused(lambda: SchedulerClient(curve_scheduler, security=outsider,
                                    connect_timeout=CONNECT_TIMEOUT), "auth")


def test_a_worker_refused_before_its_hello_stops(curve_scheduler, outsider,
                                                 refused_before_hello):
    run_until_refused(PoolWorker(curve_scheduler, security=outsider, direct=False))
