"""CURVE keys as socket options, and ZAP authentication.

* **Key files** in pyzmq's certificate format (:mod:`zmq.auth`):
  :func:`keygen` writes a directory of keys (what ``zmq-cluster keygen DIR``
  does); :func:`load_secret_key`, :func:`load_public_key` and
  :func:`load_authorized_keys` read them back, with errors that name the
  file and say what is wrong with it.
* **Both ends of a CURVE connection**: :class:`ServerSecurity` (the
  scheduler's key pair plus the directory of public keys it admits) and
  :class:`ClientSecurity` (a worker's, pool's or CLI command's own key pair
  plus the scheduler's public key). Each ``apply(socket)`` sets the socket's
  options before it binds or connects. :func:`server_security` and
  :func:`client_security` build them from the command line's options
  (``--secret-key``, ``--authorized-keys``, ``--scheduler-key``, and
  ``--keys DIR`` for all of them).
* **ZAP**: :class:`CurveAuthenticator` is the handler that admits only the
  public keys in a directory, re-read on demand.

Measured on libzmq 4.3.5 (pyzmq 27.3): a CURVE server socket on a context
with no ZAP handler admits every client that knows the server's public key
(``ZMQ_ZAP_ENFORCE_DOMAIN``, which would refuse them, is accepted but has
no effect in this non-draft build). Hence :meth:`ServerSecurity.apply`
refuses a socket whose context runs no :class:`CurveAuthenticator`.

Whom to trust once connected (the listening policy, the pickle rule) is
:mod:`zmq_cluster.trust`.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

__all__ = [
    "ClientSecurity",
    "CurveAuthenticator",
    "KeyExistsError",
    "KeyFileError",
    "KeyOptionsError",
    "KeyPair",
    "KeyPaths",
    "SecurityError",
    "ServerSecurity",
    "authenticator_for",
    "client_security",
    "keygen",
    "load_authorized_keys",
    "load_public_key",
    "load_secret_key",
    "server_security",
]

log = logging.getLogger(__name__)

PathArg = Union[str, "os.PathLike[str]"]

#: How to make keys, for error messages.
KEYGEN_HINT = "make keys with `zmq-cluster keygen DIR` and pass `--keys DIR`"


class SecurityError(Exception):
    """Base of this module's errors."""


class KeyFileError(SecurityError, ValueError):
    """A key file or key directory is missing, unreadable, of the wrong kind
    or unsafe; the message names the path and the remedy."""


class KeyExistsError(SecurityError, FileExistsError):
    """:func:`keygen` found keys it would overwrite (``overwrite=False``)."""


class KeyOptionsError(SecurityError, ValueError):
    """An incomplete or contradictory set of key options (a secret key with
    no authorized-keys directory, two different scheduler keys...)."""


# ---------------------------------------------------------------- key files


@dataclass(frozen=True)
class KeyPaths:
    """The files :func:`keygen` writes in ``directory``, which ``keys=DIR``
    (``--keys DIR``) stands for."""

    directory: Path

    @property
    def scheduler_public(self) -> Path:
        return self.directory / "scheduler.key"

    @property
    def scheduler_secret(self) -> Path:
        return self.directory / "scheduler.key_secret"

    @property
    def client_public(self) -> Path:
        return self.directory / "client.key"

    @property
    def client_secret(self) -> Path:
        return self.directory / "client.key_secret"

    @property
    def authorized(self) -> Path:
        """The directory of public keys the scheduler admits."""
        return self.directory / "authorized"

    @property
    def authorized_client(self) -> Path:
        return self.authorized / "client.key"

    def files(self) -> tuple[Path, ...]:
        """Every file keygen writes, secrets included."""
        return (self.scheduler_public, self.scheduler_secret, self.client_public,
                self.client_secret, self.authorized_client)


def keygen(directory: PathArg, *, overwrite: bool = False) -> KeyPaths:
    """Write a fresh set of CURVE keys into ``directory``.

    Writes, in :mod:`zmq.auth`'s certificate format (made by
    :func:`zmq.auth.create_certificates`): ``scheduler.key`` and
    ``scheduler.key_secret`` (the scheduler's pair), ``client.key`` and
    ``client.key_secret`` (the pair that workers, pools and the CLI share),
    and ``authorized/client.key`` (a copy of the client's public key in the
    directory of keys the scheduler admits; copy more ``*.key`` files there
    to admit more). Secret files are mode 0600, public files 0644. The
    directories are created as needed (a new ``directory`` gets mode 0700);
    other files already in ``authorized/`` are left alone.

    Each file is written in a private temporary directory inside
    ``directory`` and then moved into place, so a secret is never readable
    by others, and a file is never seen half-written.

    Raises :class:`KeyExistsError` naming the files that exist when any of
    the five does and ``overwrite`` is false (nothing is written then), and
    OSError when the directory cannot be written.
    """
    paths = KeyPaths(Path(directory))
    existing = [p for p in paths.files() if os.path.lexists(p)]
    if existing and not overwrite:
        raise KeyExistsError(
            "keys exist already: %s (pass --force, or overwrite=True, to replace them)"
            % ", ".join(str(p) for p in existing))
    paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.authorized.mkdir(mode=0o755, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".keygen-", dir=paths.directory) as tmp:
        made = {}
        for name in ("scheduler", "client"):
            public, secret = zmq.auth.create_certificates(tmp, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            made[name] = (Path(public), Path(secret))
        authorized_copy = Path(tmp) / "authorized-client.key"
        shutil.copyfile(made["client"][0], authorized_copy)
        os.chmod(authorized_copy, 0o644)
        moves = [(made["scheduler"][0], paths.scheduler_public),
                 (made["scheduler"][1], paths.scheduler_secret),
                 (made["client"][0], paths.client_public),
                 (made["client"][1], paths.client_secret),
                 (authorized_copy, paths.authorized_client)]
        for source, target in moves:
            os.replace(source, target)
    return paths


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair read from a secret certificate, Z85-encoded bytes
    (40 each), as pyzmq's ``curve_*key`` socket options take them."""

    public: bytes
    secret: bytes


def _check_z85_key(key: bytes, path: Path, what: str) -> bytes:
    try:
        valid = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError, IndexError):
        valid = False
    if not valid:
        raise KeyFileError("%s: the %s is not a 40-character Z85 CURVE key" % (path, what))
    return key


def _read_certificate(path: PathArg, kind: str) -> tuple[bytes, Optional[bytes]]:
    path = Path(path)
    if not path.exists():
        raise KeyFileError("%s file not found: %s (%s)" % (kind, path, KEYGEN_HINT))
    if not path.is_file():
        raise KeyFileError("%s file is not a regular file: %s" % (kind, path))
    try:
        public, secret = zmq.auth.load_certificate(path)
    except ValueError:
        raise KeyFileError(
            "%s is not a CURVE certificate (zmq.auth format, as `zmq-cluster keygen` writes):"
            " it has no public-key line" % path) from None
    except OSError as exc:
        raise KeyFileError("cannot read %s file %s: %s" % (kind, path, exc.strerror or exc)) \
            from None
    _check_z85_key(public, path, "public key")
    if secret is not None:
        _check_z85_key(secret, path, "secret key")
    return public, secret


def load_secret_key(path: PathArg) -> KeyPair:
    """Read a secret certificate (``*.key_secret``): its public and secret
    keys, Z85-encoded bytes, as ``.public`` and ``.secret``.

    Raises :class:`KeyFileError` when the file is missing, is not a
    certificate, holds only a public key (a ``.key`` file given where its
    ``.key_secret`` is needed), holds a secret key that does not belong to
    its public key, or can be read or written by others than its owner
    (the remedy, ``chmod 600 FILE``, is in the message: a secret key others
    can read is no secret).
    """
    path = Path(path)
    public, secret = _read_certificate(path, "secret key")
    if secret is None:
        raise KeyFileError(
            "%s holds only a public key; a secret key file (the matching .key_secret) is"
            " needed here" % path)
    if zmq.curve_public(secret) != public:
        raise KeyFileError("%s: its secret key does not belong to its public key" % path)
    mode = path.stat().st_mode
    if mode & 0o077:
        raise KeyFileError("secret key file %s is accessible to others (mode %04o);"
                           " run `chmod 600 %s`" % (path, stat.S_IMODE(mode), path))
    return KeyPair(public, secret)


def load_public_key(path: PathArg) -> bytes:
    """Read the public key (Z85 bytes) of a certificate file.

    A public certificate (``*.key``) is what is expected; a secret one also
    holds the public key and is accepted. Raises :class:`KeyFileError` when
    the file is missing or is not a certificate.
    """
    public, _ = _read_certificate(path, "public key")
    return public


def load_authorized_keys(directory: PathArg) -> frozenset[bytes]:
    """The public keys (Z85 bytes) of every ``*.key`` file in ``directory``
    (the rule of :func:`zmq.auth.load_certificates`; other files, such as
    ``*.key_secret``, are ignored).

    Unlike :func:`zmq.auth.load_certificates`, a ``*.key`` file that is not a
    valid certificate is an error (:class:`KeyFileError` naming it), not a
    key silently skipped; so is a missing directory. An empty directory gives
    an empty set (no one is admitted).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise KeyFileError("authorized keys directory not found: %s (%s)"
                           % (directory, KEYGEN_HINT))
    return frozenset(load_public_key(p) for p in sorted(directory.glob("*.key")))


# -------------------------------------------------------- ZAP authenticator


_authenticators: dict[int, "CurveAuthenticator"] = {}
_authenticators_lock = threading.Lock()


class _ZapThread(ThreadAuthenticator):
    """pyzmq's thread authenticator, told the peer address of each request
    so that its owner can log who was refused."""

    def __init__(self, owner: "CurveAuthenticator", context: zmq.Context[Any]) -> None:
        super().__init__(context=context, log=log)
        self.owner = owner
        self.peer = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # One ZAP request at a time, in the authenticator's thread.
        self.peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)


class CurveAuthenticator:
    """The ZAP handler of a context: admits a CURVE client only when its
    public key is in ``authorized_keys`` (a directory of ``*.key`` files).

    Runs pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator` with a key
    check of its own. The directory is read by :meth:`start` and again by
    :meth:`reload` (after keys were added or removed), never behind the
    caller's back. Each refusal is counted in ``refused`` and logged on the
    ``zmq_cluster.security`` logger (a warning the first time a key is seen
    refused, then at debug level: a refused libzmq client may retry);
    ``accepted`` counts admissions.

    One per context (libzmq has one ZAP endpoint per context): starting a
    second on a context that has one raises :class:`SecurityError`. Start
    it before a CURVE server socket binds, and stop it only after those
    sockets are closed: libzmq admits every CURVE client on a context with
    no ZAP handler. Usable as a context manager (start on entry, stop on
    exit).
    """

    def __init__(self, context: zmq.Context[Any], authorized_keys: PathArg) -> None:
        self.context = context
        self.authorized_keys = Path(authorized_keys)
        self.keys: frozenset[bytes] = frozenset()
        self.accepted = 0
        self.refused = 0
        self._warned: set[bytes] = set()
        self._thread: Optional[_ZapThread] = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> "CurveAuthenticator":
        """Read the directory (:class:`KeyFileError` if it cannot be) and
        start answering ZAP requests on the context. Returns self."""
        if self._thread is not None:
            return self
        self.keys = load_authorized_keys(self.authorized_keys)
        with _authenticators_lock:
            if self.context.underlying in _authenticators:
                raise SecurityError("a CurveAuthenticator already runs on this context")
            thread = _ZapThread(self, self.context)
            thread.configure_curve_callback("*", credentials_provider=self)
            try:
                thread.start()
            except zmq.ZMQError as exc:  # another ZAP handler bound the endpoint
                thread.stop()
                raise SecurityError("cannot start the ZAP authenticator: %s" % exc) from None
            self._thread = thread
            _authenticators[self.context.underlying] = self
        log.info("ZAP authenticator admits %d key(s) from %s", len(self.keys),
                 self.authorized_keys)
        return self

    def reload(self) -> frozenset[bytes]:
        """Read the directory again and admit exactly its keys from now on
        (connections already admitted stay). On an error the previous keys
        stay in force and :class:`KeyFileError` is raised. Returns the keys."""
        keys = load_authorized_keys(self.authorized_keys)
        self.keys = keys  # one reference swap: the ZAP thread sees old or new
        log.info("ZAP authenticator reloaded %s: %d key(s)", self.authorized_keys, len(keys))
        return keys

    def stop(self) -> None:
        """Stop answering ZAP requests. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with _authenticators_lock:
            _authenticators.pop(self.context.underlying, None)
        thread.stop()

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook, called in the ZAP thread with
        the client's Z85 public key: admit it if it is authorized."""
        if key in self.keys:
            self.accepted += 1
            return True
        self.refused += 1
        peer = self._thread.peer if self._thread is not None else "?"
        first = key not in self._warned
        if first:
            if len(self._warned) >= 1024:  # bounded, whatever keys an intruder tries
                self._warned.clear()
            self._warned.add(key)
        log.log(logging.WARNING if first else logging.DEBUG,
                "refused CURVE client %s with public key %s: not in %s",
                peer, key.decode("ascii", "replace"), self.authorized_keys)
        return False

    def __enter__(self) -> "CurveAuthenticator":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def authenticator_for(context: zmq.Context[Any]) -> Optional[CurveAuthenticator]:
    """The running :class:`CurveAuthenticator` of ``context``, if any."""
    with _authenticators_lock:
        return _authenticators.get(context.underlying)


# ------------------------------------------------------- both ends of CURVE


@dataclass(frozen=True)
class ServerSecurity:
    """The listening side of CURVE (the scheduler): its key pair and the
    directory of client public keys it admits.

    Keys are Z85-encoded bytes. Build it from files with :meth:`from_files`
    or :meth:`from_directory` (or :func:`server_security` for the CLI's
    flags). Use::

        auth = security.start_authenticator(ctx)   # before binding
        security.apply(sock); sock.bind("tcp://0.0.0.0:5555")
        ...
        sock.close(); auth.stop()
    """

    public_key: bytes
    secret_key: bytes
    authorized_keys: Path

    @classmethod
    def from_files(cls, secret_key: PathArg, authorized_keys: PathArg) -> "ServerSecurity":
        """From a secret certificate (``scheduler.key_secret``) and a
        directory of authorized ``*.key`` files; :class:`KeyFileError` when
        either is missing or invalid."""
        pair = load_secret_key(secret_key)
        directory = Path(authorized_keys)
        load_authorized_keys(directory)  # fail now, not at the first client
        return cls(pair.public, pair.secret, directory)

    @classmethod
    def from_directory(cls, keys: PathArg) -> "ServerSecurity":
        """From a :func:`keygen` directory: ``DIR/scheduler.key_secret`` and
        ``DIR/authorized``."""
        paths = KeyPaths(Path(keys))
        return cls.from_files(paths.scheduler_secret, paths.authorized)

    @property
    def public_key_text(self) -> str:
        """The public key as text, as a scheduler file records it."""
        return self.public_key.decode("ascii")

    def start_authenticator(self, context: zmq.Context[Any]) -> CurveAuthenticator:
        """Start (and return) the ZAP handler admitting the authorized keys
        on ``context``; stop it with its ``stop()`` after closing the
        server sockets."""
        return CurveAuthenticator(context, self.authorized_keys).start()

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` a CURVE server with these keys; call before bind.

        Raises :class:`SecurityError` when no :class:`CurveAuthenticator`
        runs on the socket's context: without one libzmq would admit any
        client that knows the public key.
        """
        if authenticator_for(socket.context) is None:
            raise SecurityError("start_authenticator(context) must run before a CURVE server"
                                " socket is set up: without a ZAP handler libzmq admits"
                                " every client")
        socket.curve_secretkey = self.secret_key
        socket.curve_publickey = self.public_key
        socket.curve_server = True


@dataclass(frozen=True)
class ClientSecurity:
    """The connecting side of CURVE (a worker, pool or CLI command): its own
    key pair and the server's public key, Z85-encoded bytes.

    A socket it is applied to talks only to a server holding the matching
    secret key; the server admits it only if its public key is authorized.
    """

    public_key: bytes
    secret_key: bytes
    server_key: bytes

    @classmethod
    def from_files(cls, secret_key: PathArg, scheduler_key: PathArg) -> "ClientSecurity":
        """From the client's secret certificate and the scheduler's public
        certificate; :class:`KeyFileError` when either is missing or invalid."""
        pair = load_secret_key(secret_key)
        return cls(pair.public, pair.secret, load_public_key(scheduler_key))

    @classmethod
    def from_directory(cls, keys: PathArg) -> "ClientSecurity":
        """From a :func:`keygen` directory: ``DIR/client.key_secret`` and
        ``DIR/scheduler.key``."""
        paths = KeyPaths(Path(keys))
        return cls.from_files(paths.client_secret, paths.scheduler_public)

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` a CURVE client with these keys; call before connect."""
        socket.curve_secretkey = self.secret_key
        socket.curve_publickey = self.public_key
        socket.curve_serverkey = self.server_key


def server_security(*, secret_key: Optional[PathArg] = None,
                    authorized_keys: Optional[PathArg] = None,
                    keys: Optional[PathArg] = None) -> Optional[ServerSecurity]:
    """The scheduler's security from its options (``--secret-key``,
    ``--authorized-keys``, ``--keys``, or the same keys of a config file).

    ``keys=DIR`` stands for ``secret_key=DIR/scheduler.key_secret`` and
    ``authorized_keys=DIR/authorized``; an explicit option overrides the one
    ``keys`` implies. Returns None when none is given (no CURVE). Raises
    :class:`KeyOptionsError` when only one of ``secret_key`` and
    ``authorized_keys`` is given, :class:`KeyFileError` for bad files.
    """
    if keys is not None:
        paths = KeyPaths(Path(keys))
        secret_key = paths.scheduler_secret if secret_key is None else secret_key
        authorized_keys = paths.authorized if authorized_keys is None else authorized_keys
    if secret_key is None and authorized_keys is None:
        return None
    if secret_key is None or authorized_keys is None:
        given, missing = (("--secret-key", "--authorized-keys") if authorized_keys is None
                          else ("--authorized-keys", "--secret-key"))
        raise KeyOptionsError("%s needs %s too (or --keys DIR for both)" % (given, missing))
    return ServerSecurity.from_files(secret_key, authorized_keys)


def client_security(*, secret_key: Optional[PathArg] = None,
                    scheduler_key: Optional[PathArg] = None,
                    keys: Optional[PathArg] = None,
                    scheduler_public_key: Union[bytes, str, None] = None,
                    ) -> Optional[ClientSecurity]:
    """A client's security from its options (``--secret-key``,
    ``--scheduler-key``, ``--keys``, config keys, ``ClusterPool(...)``
    arguments).

    ``keys=DIR`` stands for ``secret_key=DIR/client.key_secret`` and
    ``scheduler_key=DIR/scheduler.key``; explicit options override it.
    ``scheduler_public_key`` is the scheduler's key known another way (the
    ``public_key`` of a scheduler file, Z85): it serves when no
    ``scheduler_key`` file is given, and must match it when one is.

    Returns None when no key option is given: a scheduler file's public key
    alone does not make a client secure (it has no key of its own to
    present). Raises :class:`KeyOptionsError` for a half-given set or a
    mismatch, :class:`KeyFileError` for bad files.
    """
    if keys is not None:
        paths = KeyPaths(Path(keys))
        secret_key = paths.client_secret if secret_key is None else secret_key
        scheduler_key = paths.scheduler_public if scheduler_key is None else scheduler_key
    if secret_key is None and scheduler_key is None:
        return None
    if secret_key is None:
        raise KeyOptionsError("--scheduler-key needs --secret-key too (or --keys DIR for both)")
    pair = load_secret_key(secret_key)
    known = None
    if scheduler_public_key is not None:
        known = (scheduler_public_key.encode("ascii")
                 if isinstance(scheduler_public_key, str) else bytes(scheduler_public_key))
        _check_z85_key(known, Path("<scheduler file>"), "scheduler public key")
    if scheduler_key is not None:
        server_key = load_public_key(scheduler_key)
        if known is not None and known != server_key:
            raise KeyOptionsError("the scheduler's public key in %s differs from the one the"
                                  " scheduler file gives" % scheduler_key)
    elif known is not None:
        server_key = known
    else:
        raise KeyOptionsError("--secret-key needs the scheduler's public key too:"
                              " --scheduler-key FILE, a scheduler file with a public key,"
                              " or --keys DIR")
    return ClientSecurity(pair.public, pair.secret, server_key)
