"""CURVE key files, both ends of a CURVE connection, and the ZAP
authenticator, with real sockets on loopback and ipc."""

import contextlib
import os
import shutil
import stat

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from zmq_cluster.security import (
    ClientSecurity, CurveAuthenticator, KeyExistsError, KeyFileError, KeyOptionsError,
    KeyPaths, SecurityError, ServerSecurity, authenticator_for, client_security, keygen,
    load_authorized_keys, load_public_key, load_secret_key, server_security,
)
from zmq_cluster.trust import sender_may_pickle

WAIT_MS = 5000


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------ keygen


def test_keygen_writes_exactly_the_five_files_with_safe_modes(tmp_path):
    paths = keygen(tmp_path / "keys")
    d = tmp_path / "keys"
    assert sorted(os.listdir(d)) == ["authorized", "client.key", "client.key_secret",
                                     "scheduler.key", "scheduler.key_secret"]
    assert os.listdir(d / "authorized") == ["client.key"]
    assert mode(d) == 0o700
    assert mode(paths.scheduler_secret) == mode(paths.client_secret) == 0o600
    assert mode(paths.scheduler_public) == mode(paths.client_public) == 0o644
    assert mode(paths.authorized_client) == 0o644
    # zmq.auth's own format: its loader reads every file back.
    for name in ("scheduler", "client"):
        public, secret = zmq.auth.load_certificate(d / (name + ".key_secret"))
        assert zmq.curve_public(secret) == public
        assert zmq.auth.load_certificate(d / (name + ".key")) == (public, None)
    assert list(zmq.auth.load_certificates(d / "authorized")) == [
        load_public_key(paths.client_public)]
    assert load_public_key(paths.scheduler_public) != load_public_key(paths.client_public)


def test_keygen_refuses_to_overwrite_and_writes_nothing(keys):
    before = {p: p.read_bytes() for p in keys.files()}
    with pytest.raises(KeyExistsError, match="scheduler.key_secret.*--force"):
        keygen(keys.directory)
    assert {p: p.read_bytes() for p in keys.files()} == before


def test_keygen_refuses_when_any_one_file_exists(tmp_path):
    paths = KeyPaths(tmp_path / "keys")
    paths.authorized.mkdir(parents=True)
    paths.authorized_client.write_text("mine")
    with pytest.raises(KeyExistsError, match="authorized/client.key"):
        keygen(paths.directory)
    assert not paths.scheduler_secret.exists()
    assert paths.authorized_client.read_text() == "mine"


def test_keygen_overwrite_replaces_keys_and_keeps_other_authorized_keys(keys, tmp_path):
    other = tmp_path / "other"
    keygen(other)
    shutil.copy(KeyPaths(other).client_public, keys.authorized / "colleague.key")
    old = load_public_key(keys.client_public)
    keygen(keys.directory, overwrite=True)
    assert load_public_key(keys.client_public) != old
    assert load_authorized_keys(keys.authorized) == {
        load_public_key(keys.client_public), load_public_key(KeyPaths(other).client_public)}
    assert not [n for n in os.listdir(keys.directory) if n.startswith(".keygen")]


# --------------------------------------------------------------- key files


def test_load_secret_key_returns_the_pair(keys):
    pair = load_secret_key(keys.client_secret)
    assert len(pair.public) == len(pair.secret) == 40
    assert pair.public == load_public_key(keys.client_public)


@pytest.mark.parametrize("content, message", [
    (None, "secret key file not found: .*zmq-cluster keygen DIR"),
    ("hello\n", "is not a CURVE certificate"),
    ("curve\n    public-key = \"short\"\n", "not a 40-character Z85"),
])
def test_load_secret_key_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.key_secret"
    if content is not None:
        path.write_text(content)
        path.chmod(0o600)
    with pytest.raises(KeyFileError, match=message) as info:
        load_secret_key(path)
    assert str(path) in str(info.value)


def test_a_public_key_file_where_a_secret_is_needed(keys):
    with pytest.raises(KeyFileError, match="holds only a public key.*key_secret"):
        load_secret_key(keys.client_public)


def test_a_secret_key_readable_by_others_is_refused(keys):
    keys.client_secret.chmod(0o644)
    with pytest.raises(KeyFileError, match="accessible to others.*chmod 600"):
        load_secret_key(keys.client_secret)


def test_a_secret_key_of_another_pair_is_refused(keys, tmp_path):
    other = load_secret_key(keygen(tmp_path / "o").client_secret)
    text = keys.client_secret.read_text()
    mine = load_secret_key(keys.client_secret)
    keys.client_secret.write_text(text.replace(mine.secret.decode(), other.secret.decode()))
    with pytest.raises(KeyFileError, match="does not belong"):
        load_secret_key(keys.client_secret)


def test_a_directory_is_not_a_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_public_key(tmp_path)


def test_load_public_key_accepts_a_secret_certificate(keys):
    assert load_public_key(keys.client_secret) == load_public_key(keys.client_public)
    with pytest.raises(KeyFileError, match="public key file not found"):
        load_public_key(keys.directory / "nope.key")


def test_load_authorized_keys(keys):
    assert load_authorized_keys(keys.authorized) == {load_public_key(keys.client_public)}
    shutil.copy(keys.scheduler_secret, keys.authorized / "ignored.key_secret")
    (keys.authorized / "README").write_text("not a key")
    assert len(load_authorized_keys(keys.authorized)) == 1
    (keys.authorized / "broken.key").write_text("nonsense")
    with pytest.raises(KeyFileError, match="broken.key"):
        load_authorized_keys(keys.authorized)
    with pytest.raises(KeyFileError, match="authorized keys directory not found"):
        load_authorized_keys(keys.directory / "missing")


# ------------------------------------------------ building both ends


def test_security_from_a_keygen_directory(keys):
    server = ServerSecurity.from_directory(keys.directory)
    client = ClientSecurity.from_directory(keys.directory)
    assert server.public_key == client.server_key == load_public_key(keys.scheduler_public)
    assert client.public_key == load_public_key(keys.client_public)
    assert server.authorized_keys == keys.authorized
    assert server.public_key_text == server.public_key.decode()


def test_server_security_options(keys, tmp_path):
    assert server_security() is None
    assert server_security(keys=keys.directory) == ServerSecurity.from_directory(keys.directory)
    other = keygen(tmp_path / "other")
    mixed = server_security(keys=keys.directory, secret_key=other.scheduler_secret)
    assert mixed.public_key == load_public_key(other.scheduler_public)
    assert mixed.authorized_keys == keys.authorized
    with pytest.raises(KeyOptionsError, match="--secret-key needs --authorized-keys"):
        server_security(secret_key=keys.scheduler_secret)
    with pytest.raises(KeyOptionsError, match="--authorized-keys needs --secret-key"):
        server_security(authorized_keys=keys.authorized)
    with pytest.raises(KeyFileError):
        server_security(keys=tmp_path / "nothing-here")


def test_client_security_options(keys, tmp_path):
    scheduler_key = load_public_key(keys.scheduler_public)
    assert client_security() is None
    assert client_security(scheduler_public_key=scheduler_key) is None
    assert client_security(keys=keys.directory) == ClientSecurity.from_directory(keys.directory)
    # The scheduler file's key serves when no key file is given...
    from_file = client_security(secret_key=keys.client_secret,
                                scheduler_public_key=scheduler_key.decode())
    assert from_file.server_key == scheduler_key
    # ... and must agree with one that is.
    other = keygen(tmp_path / "other")
    with pytest.raises(KeyOptionsError, match="differs"):
        client_security(keys=keys.directory,
                        scheduler_public_key=load_public_key(other.scheduler_public))
    with pytest.raises(KeyOptionsError, match="needs the scheduler's public key"):
        client_security(secret_key=keys.client_secret)
    with pytest.raises(KeyOptionsError, match="--scheduler-key needs --secret-key"):
        client_security(scheduler_key=keys.scheduler_public)


# ------------------------------------------ real sockets and the ZAP handler


@pytest.fixture
def curve_server(ctx, keys):
    """A CURVE ROUTER on loopback guarded by the keys' authenticator."""
    security = ServerSecurity.from_directory(keys.directory)
    auth = security.start_authenticator(ctx)
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    server.rcvtimeo = WAIT_MS
    security.apply(server)
    server.bind("tcp://127.0.0.1:*")
    yield server, auth
    server.close(0)
    auth.stop()


def connect_client(ctx, server, security, payload=b"hello"):
    client = ctx.socket(zmq.DEALER)
    client.linger = 0
    client.rcvtimeo = WAIT_MS
    if security is not None:
        security.apply(client)
    monitor = client.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    monitor.rcvtimeo = WAIT_MS
    client.connect(server.getsockopt_string(zmq.LAST_ENDPOINT))
    # A refused handshake leaves the DEALER no pipe, and a blocking send
    # would wait forever if it failed before this line: don't block.
    with contextlib.suppress(zmq.Again):
        client.send(payload, zmq.DONTWAIT)
    try:
        event = recv_monitor_message(monitor)
    finally:
        client.disable_monitor()
        monitor.close(0)
    return client, (zmq.Event(event["event"]).name, event["value"])


def test_authorized_client_is_admitted_and_identified(ctx, keys, curve_server):
    server, auth = curve_server
    client, result = connect_client(ctx, server, ClientSecurity.from_directory(keys.directory))
    assert result[0] == "HANDSHAKE_SUCCEEDED"
    routing_id, body = server.recv_multipart(copy=False)
    assert body.bytes == b"hello"
    assert body.get("User-Id") == load_public_key(keys.client_public).decode()
    assert body.get("Peer-Address") == "127.0.0.1"
    assert sender_may_pickle(body, curve="server")
    server.send_multipart([routing_id.bytes, b"back"])
    reply = client.recv(copy=False)
    assert reply.bytes == b"back"
    assert sender_may_pickle(reply, curve="client")
    assert (auth.accepted, auth.refused) == (1, 0)
    client.close(0)


def test_unauthorized_key_is_refused_at_the_handshake_and_logged(ctx, keys, curve_server,
                                                                 tmp_path, caplog):
    server, auth = curve_server
    outsider = keygen(tmp_path / "outsider")
    intruder, result = connect_client(
        ctx, server, ClientSecurity.from_files(outsider.client_secret, keys.scheduler_public),
        b"attack")
    assert result == ("HANDSHAKE_FAILED_AUTH", 400)
    assert auth.refused == 1 and auth.accepted == 0
    assert any("refused CURVE client" in r.getMessage()
               and load_public_key(outsider.client_public).decode() in r.getMessage()
               for r in caplog.records)
    # The server is alive and serves others, and got nothing from the intruder.
    client, result = connect_client(ctx, server, ClientSecurity.from_directory(keys.directory))
    assert server.recv_multipart()[1] == b"hello"
    server.rcvtimeo = 200
    with pytest.raises(zmq.Again):
        server.recv_multipart()
    intruder.rcvtimeo = 200
    with pytest.raises(zmq.Again):
        intruder.recv()
    intruder.close(0)
    client.close(0)


def test_a_null_client_is_refused(ctx, curve_server):
    server, auth = curve_server
    intruder, result = connect_client(ctx, server, None, b"attack")
    assert result[0] == "HANDSHAKE_FAILED_PROTOCOL"
    server.rcvtimeo = 200
    with pytest.raises(zmq.Again):
        server.recv_multipart()
    intruder.close(0)


def test_reload_admits_added_keys_and_drops_removed_ones(ctx, keys, curve_server, tmp_path):
    server, auth = curve_server
    newcomer = keygen(tmp_path / "newcomer")
    security = ClientSecurity.from_files(newcomer.client_secret, keys.scheduler_public)
    first, result = connect_client(ctx, server, security)
    assert result == ("HANDSHAKE_FAILED_AUTH", 400)
    first.close(0)

    shutil.copy(newcomer.client_public, keys.authorized / "newcomer.key")
    assert auth.reload() == load_authorized_keys(keys.authorized)
    second, result = connect_client(ctx, server, security)
    assert result[0] == "HANDSHAKE_SUCCEEDED"
    assert server.recv_multipart()[1] == b"hello"

    os.remove(keys.authorized / "newcomer.key")
    auth.reload()
    third, result = connect_client(ctx, server, security)
    assert result == ("HANDSHAKE_FAILED_AUTH", 400)
    for sock in (second, third):
        sock.close(0)


def test_a_failed_reload_keeps_the_keys_in_force(keys, curve_server):
    server, auth = curve_server
    before = auth.keys
    (keys.authorized / "broken.key").write_text("nonsense")
    with pytest.raises(KeyFileError, match="broken.key"):
        auth.reload()
    assert auth.keys == before


def test_apply_refuses_a_context_without_authenticator(ctx, keys):
    security = ServerSecurity.from_directory(keys.directory)
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(SecurityError, match="start_authenticator"):
            security.apply(sock)
        assert not sock.curve_server
    finally:
        sock.close(0)


def test_one_authenticator_per_context(ctx, keys):
    with CurveAuthenticator(ctx, keys.authorized) as auth:
        assert authenticator_for(ctx) is auth and auth.running
        with pytest.raises(SecurityError, match="already runs"):
            CurveAuthenticator(ctx, keys.authorized).start()
    assert authenticator_for(ctx) is None and not auth.running
    auth.stop()  # idempotent


def test_authenticator_needs_its_directory(ctx, tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        CurveAuthenticator(ctx, tmp_path / "missing").start()
    assert authenticator_for(ctx) is None


def test_null_ipc_sockets_beside_the_authenticator_still_work(ctx, keys, curve_server,
                                                               ipc_url):
    # libzmq asks ZAP about NULL connections only when a ZAP domain is set.
    url = ipc_url("null")
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = WAIT_MS
    pull.bind(url)
    push = ctx.socket(zmq.PUSH)
    push.connect(url)
    push.send(b"local")
    assert pull.recv() == b"local"
    push.close(0)
    pull.close(0)


def test_without_zap_libzmq_admits_any_curve_client_and_sets_no_user_id(ctx, keys, tmp_path):
    # What the authenticator guards against (measured, libzmq 4.3.5): a
    # CURVE server with no ZAP handler lets in any client key.
    pair = load_secret_key(keys.scheduler_secret)
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    server.rcvtimeo = WAIT_MS
    server.curve_secretkey, server.curve_publickey = pair.secret, pair.public
    server.curve_server = True
    server.bind("tcp://127.0.0.1:*")
    outsider = keygen(tmp_path / "outsider")
    client, result = connect_client(
        ctx, server, ClientSecurity.from_files(outsider.client_secret, keys.scheduler_public))
    assert result[0] == "HANDSHAKE_SUCCEEDED"
    body = server.recv_multipart(copy=False)[1]
    with pytest.raises(zmq.ZMQError):  # hence curve="server" trusts only a User-Id
        body.get("User-Id")
    client.close(0)
    server.close(0)
