"""Exceptions on the wire (tag ``'E'``), for both framing twins:
``exception_fields`` (encode) and ``exception_value`` (decode: a rebuilt
exception or a RemoteError). See docs/protocol.md, "Exceptions".
"""

import importlib
import sys
import traceback
from typing import Any, List, Optional, Sequence, Tuple

from ._framing_errors import E_EXCEPTION
from .exceptions import MessageFormatError, RemoteError, RemoteTraceback, _safe_str, _type_name

__all__ = ["exception_fields", "exception_value"]

#: exception_fields: module, qualname, args (or None), message, traceback
_Fields = Tuple[str, str, Optional[Tuple[Any, ...]], str, str]


def exception_fields(exc: BaseException) -> _Fields:
    """``(module, qualname, args, message, traceback)`` of an exception, as
    docs/protocol.md ("Exceptions") puts it on the wire. ``args`` is a tuple
    (the encoder writes N instead when it needs pickle) or None."""
    if isinstance(exc, RemoteError):  # relayed: the original's fields
        module, qualname = getattr(exc, "_wire_type", None) or _split_type_name(exc.type_name)
        return (module, qualname, None, _text(exc.message), _text(exc.remote_traceback))
    cls = type(exc)
    module = cls.__module__ if type(cls.__module__) is str else ""
    if exc.__traceback__ is not None:
        tb = "".join(traceback.format_exception(exc))
    else:
        tb = _text(getattr(exc, "remote_traceback", ""))
    try:
        args = exc.args
        args = args if type(args) is tuple else tuple(args)
    except Exception:
        args = None
    return module, cls.__qualname__, args, _safe_str(exc), tb


def _text(value: object) -> str:
    return value if type(value) is str else ("" if value is None else _safe_str_of(value))


def _safe_str_of(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return ""


def _split_type_name(type_name: object) -> Tuple[str, str]:
    module, _, qualname = _text(type_name).rpartition(".")
    return module, qualname


def exception_value(fields: Sequence[Any], at: int, trusted: bool) -> BaseException:
    """The exception decoded from its five fields (module, qualname, args,
    message, traceback) read at offset ``at``: the original type rebuilt
    when ``trusted``, else (or when rebuilding fails) a RemoteError."""
    module, qualname, args, message, tb = fields
    for name, value in (("module", module), ("qualname", qualname)):
        if type(value) is not str:
            raise MessageFormatError(E_EXCEPTION % (at, name, "a str", type(value).__name__))
    if args is not None and type(args) is not list:
        raise MessageFormatError(E_EXCEPTION % (at, "args", "a list or None",
                                                type(args).__name__))
    for name, value in (("message", message), ("traceback", tb)):
        if type(value) is not str:
            raise MessageFormatError(E_EXCEPTION % (at, name, "a str", type(value).__name__))
    if trusted:
        try:
            return _rebuild(module, qualname, args, message, tb)
        except Exception:
            pass
    error = RemoteError(_type_name(module, qualname), message, tb)
    error._wire_type = (module, qualname)  # type: ignore[attr-defined]
    return error


def _rebuild(module: str, qualname: str, args: Optional[List[Any]], message: str,
             tb: str) -> BaseException:
    if not module or not qualname or "<" in qualname:
        raise LookupError("no importable name")
    obj = sys.modules.get(module)
    if obj is None:
        obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise TypeError("not an exception type")
    exc = obj(*args) if args is not None else obj(message)
    if not isinstance(exc, BaseException):
        raise TypeError("the type did not make an exception")
    exc.remote_traceback = tb  # type: ignore[attr-defined]
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc
