"""Task and result bodies of the pool, and remote exceptions.

A task is a REQUEST message (docs/protocol.md) whose payload is
``(mode, items)``: ``mode`` says how each item calls the function (MODE_MAP
``f(x)``, MODE_STAR ``f(*x)``, MODE_CALL ``f(*args, **kwargs)`` with
``x == (args, kwargs)``) and ``items`` is the chunk. Its result is a RESULT
message with the same task id whose payload is ``(values, errors)``:
``values`` has one entry per item (None where the item failed) and
``errors`` is None or a list of ``(index, type_name, message,
traceback_text, pickled_exception)`` (the pickle is bytes, or None when the
exception cannot be pickled), so a failure reaches a client that refuses
pickle too.
"""

import pickle
import traceback

import cloudpickle

from . import framing
from .exceptions import RemoteError, WorkerException
from .protocol import KIND_REQUEST, KIND_RESULT
from .schedproto import MODE_CALL, MODE_MAP, MODE_STAR

__all__ = ["encode_task", "run_items", "encode_result", "task_failure",
           "decode_result", "rebuild_error", "RemoteTraceback"]

_encode = framing.encode
_decode = framing.decode


class RemoteTraceback(Exception):
    """The text of a worker-side traceback, set as a rebuilt exception's
    ``__cause__`` (as multiprocessing does), so that it prints with it."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


def encode_task(mode, items, task_id):
    """The wire-format frames of one task (arrays as buffer frames)."""
    return _encode((mode, items), KIND_REQUEST, task_id)


def _error(index, exc):
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        # cloudpickle: an exception class that came with a function by value
        # goes back by value, and is the caller's own class again there.
        blob = cloudpickle.dumps(exc, protocol=5)
        pickle.loads(blob)  # an exception that does not rebuild travels without
    except Exception:
        blob = None
    name = "%s.%s" % (type(exc).__module__, type(exc).__qualname__)
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable %s>" % name
    return (index, name, message, tb, blob)


def run_items(fn, mode, items):
    """Run a chunk: ``(values, errors)`` as described above."""
    if mode == MODE_MAP:
        try:
            return [fn(x) for x in items], None
        except Exception:
            pass  # redo item by item to find which failed
    n = len(items)
    values = [None] * n
    errors = None
    for i in range(n):
        try:
            x = items[i]
            if mode == MODE_MAP:
                values[i] = fn(x)
            elif mode == MODE_STAR:
                values[i] = fn(*x)
            elif mode == MODE_CALL:
                args, kwargs = x
                values[i] = fn(*args, **kwargs)
            else:
                raise ValueError("unknown task mode %r" % (mode,))
        except Exception as exc:
            if errors is None:
                errors = []
            errors.append(_error(i, exc))
    return values, errors


def task_failure(exc, task_id):
    """The frames of a result in which every item of the task failed with
    ``exc``: ``values`` is None and ``errors`` holds one entry, index -1
    (the scheduler, which makes these, does not know the chunk's size)."""
    return _encode((None, [_error(-1, exc)]), KIND_RESULT, task_id)


def encode_result(values, errors, task_id):
    """The frames of a result. A value that cannot be encoded turns into a
    failure of its item, saying why."""
    try:
        return _encode((values, errors), KIND_RESULT, task_id)
    except Exception:
        pass
    values = list(values)
    errors = list(errors or ())
    for i, v in enumerate(values):
        try:
            _encode(v, KIND_RESULT)
        except Exception as exc:
            values[i] = None
            errors.append(_error(i, TypeError("result of item %d could not be sent back: %s"
                                              % (i, exc))))
    errors.sort(key=lambda e: e[0])
    return _encode((values, errors or None), KIND_RESULT, task_id)


def decode_result(frames, allow_pickle):
    """``(values, errors)`` of a result message."""
    kind, _, body = _decode(frames, allow_pickle=allow_pickle)
    if kind != KIND_RESULT or type(body) is not tuple or len(body) != 2:
        raise ValueError("not a pool result")
    return body


def rebuild_error(error, allow_pickle):
    """The exception to raise in the caller for one ``errors`` entry: the
    original type when it can be rebuilt (and pickle is allowed), with the
    remote traceback as its ``__cause__``; else a WorkerException carrying
    ``type_name``, ``message`` and ``remote_traceback``."""
    _, type_name, message, tb, blob = error
    exc = None
    if blob is not None and allow_pickle:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if isinstance(exc, BaseException):
        exc.__cause__ = RemoteTraceback(tb)
        try:
            exc.remote_traceback = tb
        except Exception:
            pass
        return exc
    remote = RemoteError("%s: %s" % (type_name, message))
    remote.type_name, remote.message, remote.remote_traceback = type_name, message, tb
    wexc = WorkerException("worker raised %s: %s" % (type_name, message), remote)
    wexc.type_name, wexc.message, wexc.remote_traceback = type_name, message, tb
    wexc.__cause__ = RemoteTraceback(tb)
    return wexc
