"""Functions as tasks: by reference when the worker can import them, else by
value (cloudpickle).

A client describes a function once as a *blob* ``(module, qualname,
pickled)``:

* ``module``/``qualname`` name it when importing ``module`` and following
  ``qualname`` gives back the very same object (else both are None);
* ``pickled`` is its cloudpickle by value, or None for a function of an
  installed package or the standard library (every worker can import those).
  Functions of the user's own code (``__main__``, a test module, a notebook,
  a script's directory) carry both: a worker that cannot import the module
  falls back to the pickle.

The blob's *key* is a 64-bit hash of it: the scheduler keeps each blob once
and sends it to a worker before the first task that needs it.

Pickled functions run only for trusted submitters (a worker refuses to
unpickle on behalf of an untrusted one); functions by reference run for
anyone, as any importable function is what a task is.
"""

import hashlib
import importlib
import os
import sys
import sysconfig
import threading
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import cloudpickle

__all__ = ["describe", "function_key", "FunctionCache", "FunctionUnavailable"]

#: ``(module, qualname, pickled)``: see the module docstring.
Blob = Tuple[Optional[str], Optional[str], Optional[bytes]]


class FunctionUnavailable(Exception):
    """A worker could not get the function a task names."""


def _installed_dirs() -> Tuple[str, ...]:
    dirs = set()
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(name)
        if path:
            dirs.add(os.path.realpath(path))
    return tuple(sorted(dirs))


_INSTALLED = _installed_dirs()
_PICKLE_LOCK = threading.Lock()


def _is_installed(module: ModuleType) -> bool:
    path = getattr(module, "__file__", None)
    if path is None:
        return True  # builtin or frozen
    path = os.path.realpath(path)
    return any(path.startswith(d + os.sep) for d in _INSTALLED)


def _resolve(module_name: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def describe(fn: Callable[..., Any]) -> Blob:
    """The blob ``(module, qualname, pickled)`` for callable ``fn``."""
    if not callable(fn):
        raise TypeError("%r is not callable" % (fn,))
    module_name = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    module = None
    if (isinstance(module_name, str) and isinstance(qualname, str)
            and module_name != "__main__" and "<" not in qualname):
        try:
            if _resolve(module_name, qualname) is fn:
                module = sys.modules[module_name]
        except Exception:
            module = None
    if module is None:
        return (None, None, _dumps(fn, None))
    if _is_installed(module):
        return (module_name, qualname, None)
    return (module_name, qualname, _dumps(fn, module))


def _user_modules() -> List[ModuleType]:
    """Modules of the user's own code now loaded: not the standard library,
    not an installed package, not this package (every worker has it)."""
    out = []
    for name, module in list(sys.modules.items()):
        if (module is None or "." in name or name == "__main__"
                or name in _NEVER_BY_VALUE or getattr(module, "__file__", None) is None):
            continue
        if not _is_installed(module):
            out.append(module)
    return out


_NEVER_BY_VALUE = {"zmq_cluster", "_pytest", "pytest", "pluggy", "py"}


def _dumps(fn: Callable[..., Any], module: Optional[ModuleType]) -> bytes:
    """cloudpickle ``fn`` by value, and with it what it uses from the user's
    own modules (a test module, a script's directory), which the workers may
    not be able to import."""
    with _PICKLE_LOCK:
        registered = _registered()
        added = []
        for mod in _user_modules():
            if mod.__name__ not in registered:
                try:
                    cloudpickle.register_pickle_by_value(mod)
                    added.append(mod)
                except ValueError:
                    pass
        try:
            return cloudpickle.dumps(fn, protocol=5)
        finally:
            for mod in added:
                cloudpickle.unregister_pickle_by_value(mod)


def _registered() -> Set[str]:
    try:
        from cloudpickle import cloudpickle as _cp
        return getattr(_cp, "_PICKLE_BY_VALUE_MODULES", set())
    except ImportError:  # pragma: no cover
        return set()


def function_key(blob: Blob) -> int:
    """A non-zero 64-bit key for a blob."""
    module_name, qualname, pickled = blob
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((module_name, qualname)).encode())
    if pickled is not None:
        h.update(pickled)
    return int.from_bytes(h.digest(), "little") or 1


class FunctionCache:
    """A worker's functions by key: blobs as they arrive, loaded on first use."""

    def __init__(self) -> None:
        self._blobs: Dict[int, Blob] = {}
        # key -> (function, came_from_pickle)
        self._loaded: Dict[int, Tuple[Callable[..., Any], bool]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    def add(self, key: int, blob: Blob) -> None:
        self._blobs[key] = blob

    def get(self, key: int, trusted: bool) -> Callable[..., Any]:
        """The function for ``key``; FunctionUnavailable when it is unknown,
        cannot be loaded, or needs unpickling for an untrusted submitter."""
        hit = self._loaded.get(key)
        if hit is not None:
            fn, from_pickle = hit
            if from_pickle and not trusted:
                raise FunctionUnavailable("the function was pickled; pickled functions run "
                                          "only for trusted submitters")
            return fn
        blob = self._blobs.get(key)
        if blob is None:
            raise FunctionUnavailable("function %016x was never sent to this worker" % key)
        module_name, qualname, pickled = blob
        error = None
        if module_name is not None and qualname is not None:
            try:
                fn = _resolve(module_name, qualname)
                self._loaded[key] = (fn, False)
                return fn
            except Exception as exc:
                error = exc
        if pickled is None:
            raise FunctionUnavailable("cannot import %s.%s: %r" % (module_name, qualname, error))
        if not trusted:
            raise FunctionUnavailable(
                "%s arrives pickled, and pickled functions run only for trusted submitters"
                % (qualname or "the function"))
        try:
            fn = cloudpickle.loads(pickled)
        except Exception as exc:
            raise FunctionUnavailable("the pickled function does not load: %r" % (exc,)) from exc
        self._loaded[key] = (fn, True)
        return fn
