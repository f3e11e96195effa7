"""Exceptions on the wire (docs/protocol.md, "Exceptions"), for every
framing twin: the native 'E' value, never pickled; the original type
rebuilt for a trusted sender, a RemoteError otherwise or when rebuilding
fails; relays; WorkerException's view of both; imports deferred until the
message is known to be valid."""

import os
import pickle
import struct
import sys
import traceback

import numpy as np
import pytest

from zmq_cluster.exceptions import (
    MessageFormatError, RemoteError, RemoteTraceback, WorkerException,
)
from zmq_cluster.messages import ClusterResult
from zmq_cluster.protocol import HEADER, KIND_COMMAND, KIND_RESULT, MAGIC, VERSION


def _raised(exc):
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 -- that is the point
        return caught


def _round_trip(twin, exc, **kwargs):
    return twin.decode(twin.encode(exc, KIND_RESULT), **kwargs)[2]


class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(a, b)


class Outer:
    class Inner(ValueError):
        pass


def _s(text):
    raw = text.encode()
    return b"s" + struct.pack("<I", len(raw)) + raw


def _exc_value(module, qualname, args=b"N", message="m", tb=""):
    return b"E" + _s(module) + _s(qualname) + args + _s(message) + _s(tb)


def _msg(body, kind=KIND_RESULT):
    return [HEADER.pack(MAGIC, VERSION, kind, 0, 4) + body]


# ------------------------------------------------------------------ the value

def test_wire_form_of_an_exception(twin):
    exc = _raised(ValueError("bad input", 3))
    tb = "".join(traceback.format_exception(exc))
    body = twin.encode(exc, KIND_RESULT)[0][16:]
    assert body == (b"E" + _s("builtins") + _s("ValueError")
                    + b"l\x02\x00\x00\x00" + _s("bad input") + b"i" + struct.pack("<q", 3)
                    + _s("('bad input', 3)") + _s(tb))


def test_an_exception_never_raised_has_an_empty_traceback(twin):
    body = twin.encode(KeyError("k"), KIND_RESULT)[0][16:]
    assert body.endswith(_s("'k'") + _s(""))


@pytest.mark.parametrize("exc", [
    ValueError("boom", 3), KeyError("k"), OSError(2, "not found"), ZeroDivisionError(),
    SystemExit(3), KeyboardInterrupt(), NeedsTwo(1, [2.5, "x"]), Outer.Inner("nested class"),
    ValueError(np.arange(3)), RuntimeError(ValueError("in args")), MessageFormatError("bad"),
], ids=lambda e: type(e).__qualname__)
def test_a_trusted_sender_gets_the_original_type_back(twin, exc):
    exc = _raised(exc)
    got = _round_trip(twin, exc)
    assert type(got) is type(exc)
    assert len(got.args) == len(exc.args)
    for a, b in zip(got.args, exc.args):
        assert type(a) is type(b) and (str(a) == str(b))
    tb = "".join(traceback.format_exception(exc))
    assert got.remote_traceback == tb
    assert type(got.__cause__) is RemoteTraceback and str(got.__cause__) == tb


@pytest.mark.parametrize("exc, type_name", [
    (ValueError("boom", 3), "builtins.ValueError"),
    (Outer.Inner("x"), __name__ + ".Outer.Inner"),
    (NeedsTwo(1, 2), __name__ + ".NeedsTwo"),
], ids=["builtin", "nested class", "user class"])
def test_an_untrusted_sender_gets_a_remote_error(twin, exc, type_name):
    exc = _raised(exc)
    for got in (_round_trip(twin, exc, allow_pickle=False),
                twin.decode(twin.encode(exc, KIND_COMMAND))[2]):  # commands are never trusted
        assert type(got) is RemoteError
        assert (got.type_name, got.message) == (type_name, str(exc))
        assert got.remote_traceback == "".join(traceback.format_exception(exc))
        assert str(got) == "%s: %s" % (type_name, exc)
        assert str(got.__cause__) == got.remote_traceback


def test_args_that_need_pickle_travel_as_none(twin):
    """The message is then what the receiver builds the exception from."""
    for exc in (ValueError({1, 2}), KeyError(lambda: 0), ValueError([1, {2}])):
        body = twin.encode(exc, KIND_RESULT)[0]
        assert b"p" not in body[16:17] and _s(type(exc).__name__) + b"N" in body
        got = _round_trip(twin, exc, allow_pickle=False)  # no pickle anywhere
        assert got.message == str(exc)
        rebuilt = _round_trip(twin, exc)
        assert type(rebuilt) is type(exc) and rebuilt.args == (str(exc),)


@pytest.mark.parametrize("module, qualname, args, reason", [
    ("no_such_module_zc", "Error", b"N", "module does not import"),
    ("builtins", "NoSuchError", b"N", "no such name"),
    ("builtins", "len", b"N", "not a type"),
    ("builtins", "dict", b"N", "not an exception type"),
    (__name__, "NeedsTwo", b"N", "constructor refuses the message"),
    (__name__, "NeedsTwo", b"l\x01\x00\x00\x00N", "constructor refuses the args"),
    ("builtins", "<lambda>", b"N", "a local name"),
    ("", "ValueError", b"N", "no module"),
    ("java.lang", "IllegalArgumentException", b"N", "another language"),
])
def test_a_type_that_cannot_be_rebuilt_gives_a_remote_error(twin, module, qualname, args, reason):
    got = twin.decode(_msg(_exc_value(module, qualname, args, "went wrong", "tb text")))[2]
    assert type(got) is RemoteError, reason
    assert got.type_name == (module + "." + qualname if module else qualname)
    assert (got.message, got.remote_traceback) == ("went wrong", "tb text")


def test_a_remote_error_relayed_keeps_its_fields(twin):
    original = _raised(Outer.Inner("x"))
    first = twin.encode(original, KIND_RESULT)[0]
    received = twin.decode([first], allow_pickle=False)[2]
    relayed = twin.encode(received, KIND_RESULT)[0]
    # Same module, qualname, message and traceback; args are not kept.
    assert relayed == first.replace(b"l\x01\x00\x00\x00" + _s("x"), b"N")
    assert type(twin.decode([relayed])[2]) is Outer.Inner
    made_here = RemoteError("pkg.mod.Error", "m", "tb")
    assert twin.encode(made_here, KIND_RESULT)[0][16:] == _exc_value("pkg.mod", "Error", b"N",
                                                                       "m", "tb")


@pytest.mark.parametrize("field, value, text", [
    (0, b"i" + bytes(8), "its module must be a str, not int"),
    (1, b"N", "its qualname must be a str, not NoneType"),
    (2, b"t\x00\x00\x00\x00", "its args must be a list or None, not tuple"),
    (3, b"b\x00\x00\x00\x00", "its message must be a str, not bytes"),
    (4, b"N", "its traceback must be a str, not NoneType"),
])
def test_malformed_exception_values_are_rejected(twin, field, value, text):
    fields = [_s("builtins"), _s("ValueError"), b"N", _s("m"), _s("")]
    fields[field] = value
    with pytest.raises(MessageFormatError, match="exception at offset 16: " + text):
        twin.decode(_msg(b"E" + b"".join(fields)))
    with pytest.raises(MessageFormatError, match="exception at offset 16: " + text):
        twin.decode(_msg(b"E" + b"".join(fields)), allow_pickle=False)


def test_a_pickle_in_exception_args_is_refused(twin):
    data = pickle.dumps({1}, protocol=5)
    args = b"l\x01\x00\x00\x00p" + struct.pack("<I", len(data)) + data + struct.pack("<I", 0)
    with pytest.raises(MessageFormatError, match="in an exception's args"):
        twin.decode(_msg(_exc_value("builtins", "ValueError", args)))


# ------------------------------------------------------------------ deferral

def test_exception_types_are_imported_only_from_a_valid_message(twin, tmp_path, monkeypatch):
    name = "zc_exc_module_%d" % os.getpid()
    (tmp_path / (name + ".py")).write_text(
        "IMPORTED = True\nclass Custom(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    value = _exc_value(name, "Custom", b"l\x01\x00\x00\x00" + _s("arg"))
    try:
        for bad in (b"S" + _s("FAIL") + b"NNN" + value + b"Z",      # a trailing byte
                    b"l\x02\x00\x00\x00" + value + b"?"):            # an unknown tag after it
            with pytest.raises(MessageFormatError):
                twin.decode(_msg(bad))
            assert name not in sys.modules
        got = twin.decode(_msg(b"S" + _s("FAIL") + b"NNN" + value))[2]
        assert name in sys.modules
        assert type(got.exception).__name__ == "Custom" and got.exception.args == ("arg",)
    finally:
        sys.modules.pop(name, None)


def test_an_untrusted_decoder_imports_nothing(twin):
    name = "zc_never_imported_module"
    got = twin.decode(_msg(_exc_value(name, "X")), allow_pickle=False)[2]
    assert type(got) is RemoteError and name not in sys.modules


# ------------------------------------------------------------------ in results

def test_a_fail_result_without_pickle(twin):
    exc = _raised(ValueError("negative input", -1))
    result = ClusterResult("FAIL", None, {"i": 3}, {"host": "h", "pid": 1, "seconds": 0.1}, exc)
    frames = twin.encode(result, KIND_RESULT, 77)
    got = twin.decode(frames, allow_pickle=False)[2]
    assert (got.status, got.task_id) == ("FAIL", 77)
    assert type(got.exception) is RemoteError
    assert got.exception.type_name == "builtins.ValueError"
    error = WorkerException(worker_exception=got.exception)
    assert (error.type_name, error.message) == ("builtins.ValueError", "('negative input', -1)")
    assert "negative input" in error.remote_traceback
    assert str(error) == "worker raised builtins.ValueError: ('negative input', -1)"


# ------------------------------------------------------------------ exceptions.py

def test_worker_exception_describes_a_rebuilt_exception(twin):
    rebuilt = _round_trip(twin, _raised(KeyError("k")))
    error = WorkerException(worker_exception=rebuilt)
    assert (error.type_name, error.message) == ("builtins.KeyError", "'k'")
    assert error.remote_traceback == rebuilt.remote_traceback != ""
    assert error.__cause__ is rebuilt
    assert "RemoteTraceback" in "".join(traceback.format_exception(error))


def test_worker_exception_without_a_worker_exception():
    error = WorkerException("plain")
    assert (str(error), error.message, error.type_name, error.remote_traceback) == (
        "plain", "plain", None, None)
    local = WorkerException(worker_exception=ValueError("v"))
    assert (local.type_name, local.message, local.remote_traceback) == (
        "builtins.ValueError", "v", "")
    copy = pickle.loads(pickle.dumps(WorkerException(worker_exception=KeyError("k"))))
    assert copy.type_name == "builtins.KeyError" and type(copy.worker_exception) is KeyError


def test_remote_error_fields_and_pickling():
    error = RemoteError("mod.Err", "went wrong", "Traceback...\n")
    assert str(error) == "mod.Err: went wrong"
    assert str(RemoteError("mod.Err")) == "mod.Err"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.type_name, copy.message, copy.remote_traceback) == (
        "mod.Err", "went wrong", "Traceback...\n")
    assert str(copy.__cause__) == "Traceback...\n"
    assert str(RemoteTraceback("text")) == "text"
