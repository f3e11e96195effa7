"""The configuration file and the scheduler file.

**Config file.** A TOML file of flat top-level keys, named as the command
line's long flags with ``_`` for ``-``::

    # zmq-cluster.toml
    connect = "tcp://head:5555"
    workers = 8
    imports = ["numpy", "mylab.tasks"]
    heartbeat_timeout = 10.0
    keys = "keys"            # a `zmq-cluster keygen` directory beside this file

It is the file named by ``--config FILE`` (an option of every subcommand),
else by the ``ZMQ_CLUSTER_CONFIG`` environment variable, else none
(:func:`find_config`). The command line, ``ClusterPool(config=FILE)`` and anything else that takes these settings read it with
:func:`read_config` and combine it with :func:`merge`: flags override the
file, the file overrides defaults.

Keys and their types (:data:`KEYS`): ``listen``, ``connect`` (addresses:
``tcp://HOST:PORT`` or ``ipc://PATH``, :func:`check_endpoint`),
``scheduler_file``, ``secret_key``, ``scheduler_key``, ``authorized_keys``,
``keys`` (paths), ``workers`` (an integer >= 1), ``imports`` (an array of
module names), ``heartbeat_timeout`` (a number of seconds > 0),
``insecure``, ``malloc_tuning`` and ``shared_memory`` (booleans). An unknown key, a wrong type or a bad value is a
:class:`ConfigError` naming the key and the file. **Relative paths in a
config file are relative to the file's directory** (not to the directory a
command is run from), and ``~`` is expanded, so a file works from anywhere.

**Scheduler file.** JSON ``{"address": "tcp://...", "public_key": "<Z85>"
or null}``, written by a scheduler (:func:`write_scheduler_file`, atomic:
a reader sees the old file, no file, or the whole new one) and read by
workers and clients on a shared filesystem (:func:`read_scheduler_file`,
which can wait for it to appear).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from zmq.utils import z85

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "CONFIG_ENV",
    "Config",
    "ConfigError",
    "KEYS",
    "SchedulerFile",
    "SchedulerFileError",
    "check_endpoint",
    "find_config",
    "load_config",
    "merge",
    "read_config",
    "read_scheduler_file",
    "write_scheduler_file",
]

PathArg = Union[str, "os.PathLike[str]"]

#: The environment variable naming a config file when ``--config`` does not.
CONFIG_ENV = "ZMQ_CLUSTER_CONFIG"


class ConfigError(ValueError):
    """A config file that cannot be used: missing, not TOML, an unknown key,
    a wrong type or a bad value. The message names the file (and the key)."""


class SchedulerFileError(ValueError):
    """A scheduler file that is missing (after the wait) or malformed; the
    message names the file."""


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    if not value:
        raise ValueError("a non-empty string")
    return value


def check_endpoint(value: Any, *, listen: bool = False) -> str:
    """``value`` if it is an address a scheduler can listen on (``listen``)
    or a client can connect to; else ValueError (TypeError for a non-string)
    whose text says what it must be ("an address such as ...", to follow
    "must be").

    ``tcp://HOST:PORT`` with PORT 1-65535 (libzmq would take 70000 as
    70000 - 65536 without a word); to listen, PORT may also be 0 or ``*``
    (a free port) and HOST ``*`` or an interface name. ``ipc://PATH``.
    Nothing else: ``inproc://`` reaches only its own process, and the
    scheduler speaks no other transport.
    """
    if not isinstance(value, str):
        raise TypeError("an address such as tcp://HOST:PORT or ipc://PATH")
    transport, sep, rest = value.partition("://")
    if transport == "ipc" and rest:
        return value
    if transport != "tcp" or not sep:
        raise ValueError("an address such as tcp://HOST:PORT or ipc://PATH")
    host, sep, port = rest.rsplit(";", 1)[-1].rpartition(":")
    if not sep or not host or not port:
        raise ValueError("tcp://HOST:PORT, with a host and a port")
    if listen and port == "*":
        return value
    lowest = 0 if listen else 1
    if not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ValueError("tcp://HOST:PORT with a PORT of %d-65535%s"
                         % (lowest, " or *" if listen else ""))
    return value


def _listen_endpoint(value: Any) -> str:
    return check_endpoint(_string(value), listen=True)


def _connect_endpoint(value: Any) -> str:
    return check_endpoint(_string(value))


def _path(value: Any) -> str:
    return _string(value)  # resolved against the file's directory by load_config


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("an integer")
    if value < 1:
        raise ValueError("an integer >= 1")
    return value


def _positive_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("a number of seconds")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("a finite number of seconds > 0")
    return float(value)


def _module_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError("an array of module names")
    if not all(isinstance(v, str) and v for v in value):
        raise TypeError("an array of module names (non-empty strings)")
    return tuple(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("a boolean (true or false)")
    return value


#: Every config key: its checker, which returns the value to use or raises
#: TypeError/ValueError whose text says what the key must be.
KEYS: Mapping[str, Callable[[Any], Any]] = {
    "listen": _listen_endpoint,
    "connect": _connect_endpoint,
    "scheduler_file": _path,
    "workers": _positive_int,
    "imports": _module_names,
    "heartbeat_timeout": _positive_seconds,
    "insecure": _boolean,
    "malloc_tuning": _boolean,
    "shared_memory": _boolean,
    "secret_key": _path,
    "scheduler_key": _path,
    "authorized_keys": _path,
    "keys": _path,
}
_PATH_KEYS = frozenset(k for k, check in KEYS.items() if check is _path)


@dataclass(frozen=True)
class Config:
    """The settings of one config file (``path``), or of none.

    ``values`` holds only the keys the file sets, already checked, with
    paths absolute (:class:`pathlib.Path`), ``imports`` a tuple and
    ``heartbeat_timeout`` a float. ``Config()`` is the empty config.
    """

    path: Optional[Path] = None
    values: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """The file's value for ``key``, or ``default`` when it sets none."""
        if key not in KEYS:
            raise KeyError(key)
        return self.values.get(key, default)


def find_config(explicit: Optional[PathArg] = None,
                environ: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The config file to read: ``explicit`` (``--config FILE``) if given,
    else ``$ZMQ_CLUSTER_CONFIG`` if set and non-empty, else None."""
    if explicit is not None:
        return Path(explicit)
    value = (os.environ if environ is None else environ).get(CONFIG_ENV, "")
    return Path(value) if value else None


def load_config(path: PathArg) -> Config:
    """Read and check the config file ``path``.

    Raises :class:`ConfigError` (naming the file, and the key where one is
    at fault) when the file is missing or unreadable, is not valid TOML,
    has a key not in :data:`KEYS` (tables included), or a value of the
    wrong type or range.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config file not found: %s" % path) from None
    except OSError as exc:
        raise ConfigError("cannot read config file %s: %s" % (path, exc.strerror or exc)) \
            from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config file %s is not valid TOML: %s" % (path, exc)) from None
    except UnicodeDecodeError:
        raise ConfigError("config file %s is not UTF-8 text" % path) from None
    base = path.resolve().parent
    values: dict[str, Any] = {}
    for key, raw in data.items():
        check = KEYS.get(key)
        if check is None:
            raise ConfigError("unknown key %r in config file %s (known: %s)"
                              % (key, path, ", ".join(KEYS)))
        try:
            value = check(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError("key %r in config file %s must be %s, not %r"
                              % (key, path, exc, raw)) from None
        if key in _PATH_KEYS:
            value = base / Path(value).expanduser()
        values[key] = value
    return Config(path, values)


def read_config(explicit: Optional[PathArg] = None,
                environ: Optional[Mapping[str, str]] = None) -> Config:
    """The config named by ``--config`` or ``ZMQ_CLUSTER_CONFIG``
    (:func:`find_config`), loaded; the empty :class:`Config` when neither
    names one. A file named by the environment variable that does not exist
    is a :class:`ConfigError` saying so."""
    path = find_config(explicit, environ)
    if path is None:
        return Config()
    if explicit is None and not path.exists():
        raise ConfigError("config file not found: %s (named by %s)" % (path, CONFIG_ENV))
    return load_config(path)


def merge(defaults: Mapping[str, Any], config: Config,
          flags: Mapping[str, Any]) -> dict[str, Any]:
    """Combine settings: a flag overrides the file, the file overrides the
    default.

    ``flags`` maps setting names (config key names) to the command line's
    values, None meaning "not given" (so argparse options should default
    to None, store_true ones included); ``defaults`` gives the value when
    neither sets one. Names that are not config keys (``timeout``,
    ``json``...) pass through from ``flags`` and ``defaults`` alike. A list
    flag replaces the file's list; it does not extend it. Returns a new
    dict with every name of the three.
    """
    merged: dict[str, Any] = dict(defaults)
    merged.update(config.values)
    merged.update((k, v) for k, v in flags.items() if v is not None)
    for key in flags:
        merged.setdefault(key, None)
    return merged


# ------------------------------------------------------------ scheduler file


@dataclass(frozen=True)
class SchedulerFile:
    """What a scheduler file says: where the scheduler listens, and its
    CURVE public key (Z85 text), None when it runs without CURVE."""

    address: str
    public_key: Optional[str] = None


def _check_public_key(key: Any) -> bool:
    if not isinstance(key, str) or len(key) != 40:
        return False
    try:
        return len(z85.decode(key.encode("ascii"))) == 32
    except (ValueError, KeyError, IndexError, UnicodeEncodeError):
        return False


def write_scheduler_file(path: PathArg, address: str,
                         public_key: Union[str, bytes, None] = None) -> None:
    """Write the scheduler file ``path`` atomically: the JSON goes to a
    temporary file in the same directory, is flushed to disk and renamed
    over ``path`` (mode 0644: the address and public key are not secrets).
    ``public_key`` is the scheduler's CURVE public key (Z85), or None.
    Raises ValueError for an empty address or a malformed key, OSError when
    the directory cannot be written."""
    if isinstance(public_key, bytes):
        public_key = public_key.decode("ascii")
    if not isinstance(address, str) or not address:
        raise ValueError("a scheduler file needs an address")
    if public_key is not None and not _check_public_key(public_key):
        raise ValueError("not a Z85 CURVE public key: %r" % (public_key,))
    path = Path(path)
    text = json.dumps({"address": address, "public_key": public_key}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".%s." % path.name, dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_scheduler_file(path: PathArg, *, timeout: float = 0.0,
                        poll_interval: float = 0.1) -> SchedulerFile:
    """Read the scheduler file ``path``.

    With ``timeout`` > 0, wait up to that many seconds for the file to
    appear (a worker started by ``srun`` beside its scheduler may look
    before the scheduler has written it), looking every ``poll_interval``
    seconds. Raises :class:`SchedulerFileError` naming the file when it is
    still missing, unreadable, not JSON, or not of the form
    ``{"address": "...", "public_key": "<Z85>" or null}``.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text(encoding="utf-8")
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                waited = " after waiting %gs" % timeout if timeout > 0 else ""
                raise SchedulerFileError("scheduler file not found: %s%s (is the scheduler"
                                         " running?)" % (path, waited)) from None
            time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
        except (OSError, UnicodeDecodeError) as exc:
            raise SchedulerFileError("cannot read scheduler file %s: %s" % (path, exc)) \
                from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SchedulerFileError("scheduler file %s is not JSON: %s" % (path, exc)) from None
    if not isinstance(data, dict):
        raise SchedulerFileError("scheduler file %s must hold a JSON object" % path)
    unknown = set(data) - {"address", "public_key"}
    if unknown:
        raise SchedulerFileError("scheduler file %s has unknown keys: %s"
                                 % (path, ", ".join(sorted(unknown))))
    try:
        address = check_endpoint(data.get("address"))
    except (TypeError, ValueError) as exc:
        raise SchedulerFileError("scheduler file %s: \"address\" must be %s, not %r"
                                 % (path, exc, data.get("address"))) from None
    key = data.get("public_key")
    if key is not None and not _check_public_key(key):
        raise SchedulerFileError("scheduler file %s: \"public_key\" must be a 40-character"
                                 " Z85 CURVE key or null, not %r" % (path, key))
    return SchedulerFile(address, key)
