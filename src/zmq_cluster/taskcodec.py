"""Task and result bodies of the pool, and the exceptions they carry.

A task is a REQUEST message (docs/protocol.md) whose payload is
``(mode, items)``: ``mode`` says how each item calls the function (MODE_MAP
``f(x)``, MODE_STAR ``f(*x)``, MODE_CALL ``f(*args, **kwargs)`` with
``x == (args, kwargs)``) and ``items`` is the chunk. Its result is a RESULT
message with the same task id whose payload is ``(values, errors)``:
``values`` has one entry per item (None where the item failed) and
``errors`` is None or a list of ``(index, exception)``. Exceptions travel in
the wire format's native form (type, args, message, traceback text), so a
failure reaches a client that refuses pickle too: a trusting receiver gets
the original type back, with the remote traceback as its ``__cause__``, any
other a RemoteError.

Shared memory (same host, opt-in: ``zmq_cluster.sharedmem``): a client with
a SharedMemory sends large arguments by slot reference and sets
``MODE_SHM_RESULTS`` in ``mode`` to say it can map the worker's slots too;
a worker with a SharedMemory then sends large result values the same way
(else over the socket, as every worker does for a client that did not ask).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import framing
from .exceptions import EncodeError, RemoteError, WorkerException
from .protocol import KIND_REQUEST, KIND_RESULT
from .schedproto import MODE_CALL, MODE_MAP, MODE_STAR

__all__ = ["CopyCount", "MODE_SHM_RESULTS", "encode_task", "run_items", "encode_result", "task_failure",
           "decode_result", "rebuild_error"]

_encode = framing.encode
_decode = framing.decode

#: A bit of a task's ``mode``: its client takes results by shared memory.
MODE_SHM_RESULTS = 0x100


class CopyCount:
    """The ``stats`` a pool peer gives the codec: ``copied_bytes`` is the
    payload bytes its encodes and decodes copied (docs/protocol.md,
    "Decoding: views, copies, alignment"): inline arrays, non-contiguous
    arrays made contiguous, arrays copied on receipt (small, or of 1 MiB
    and more not at 64 bytes) and split arrays assembled."""

    __slots__ = ("copied_bytes",)

    def __init__(self) -> None:
        self.copied_bytes = 0

    def __repr__(self) -> str:
        return "CopyCount(copied_bytes=%d)" % self.copied_bytes


def encode_task(mode: int, items: Sequence[Any], task_id: int,
                stats: CopyCount | None = None, shm: Any = None) -> list[Any]:
    """The wire-format frames of one task (arrays as buffer frames, or, with
    ``shm``, large ones by slot reference; ``mode`` then asks for results
    the same way)."""
    if shm is None:
        return _encode((mode, items), KIND_REQUEST, task_id, stats)
    return _encode((mode | MODE_SHM_RESULTS, items), KIND_REQUEST, task_id, stats, shm)


def run_items(fn: Callable[..., Any], mode: int,
              items: Sequence[Any]) -> tuple[list[Any], list[tuple[int, BaseException]] | None]:
    """Run a chunk: ``(values, errors)`` as described above."""
    if mode == MODE_MAP:
        try:
            if len(items) == 1:  # chunksize 1: no comprehension to set up
                return [fn(items[0])], None
            return [fn(x) for x in items], None
        except Exception:
            pass  # redo item by item to find which failed
    n = len(items)
    values: list[Any] = [None] * n
    errors: list[tuple[int, BaseException]] | None = None
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
            errors.append((i, exc))
    return values, errors


def task_failure(exc: BaseException, task_id: int) -> list[Any]:
    """The frames of a result in which every item of the task failed with
    ``exc``: ``values`` is None and ``errors`` holds one entry, index -1
    (the scheduler, which makes these, does not know the chunk's size)."""
    return _encode((None, [(-1, exc)]), KIND_RESULT, task_id)


def encode_result(values: Sequence[Any], errors: Sequence[tuple[int, BaseException]] | None,
                  task_id: int, stats: CopyCount | None = None, shm: Any = None) -> list[Any]:
    """The frames of a result. A value that cannot be encoded turns into a
    failure of its item, saying why. ``stats`` counts the copies of the
    message sent only. ``shm``: large arrays go by slot reference."""
    try:
        return _encode((values, errors), KIND_RESULT, task_id, stats, shm)
    except Exception:
        pass
    values = list(values)
    errors = list(errors or ())
    for i, v in enumerate(values):
        try:
            _encode(v, KIND_RESULT)
        except Exception as exc:
            values[i] = None
            errors.append((i, EncodeError("the result of item %d could not be sent back: %s"
                                          % (i, exc))))
    errors.sort(key=lambda e: e[0])
    return _encode((values, errors or None), KIND_RESULT, task_id, stats, shm)


def decode_result(frames: Sequence[Any], allow_pickle: bool,
                  stats: CopyCount | None = None, shm: Any = None) -> tuple[Any, Any]:
    """``(values, errors)`` of a result message (``shm``: the SharedMemory
    that maps arrays sent by slot reference)."""
    kind, _, body = _decode(frames, allow_pickle=allow_pickle, stats=stats, shm=shm)
    if kind != KIND_RESULT or type(body) is not tuple or len(body) != 2:
        raise ValueError("not a pool result")
    return body


def rebuild_error(error: tuple[int, Any], allow_pickle: bool = True) -> BaseException:
    """The exception to raise in the caller for one ``errors`` entry: the
    original type when the decoder could rebuild it (it trusts the sender
    and the type imports here), with the remote traceback as its
    ``__cause__`` and ``remote_traceback``; else a WorkerException carrying
    ``type_name``, ``message`` and ``remote_traceback`` (and the
    RemoteError as ``worker_exception``)."""
    exc = error[1]
    if isinstance(exc, RemoteError):
        return WorkerException(None, exc)
    if isinstance(exc, BaseException):
        return exc
    return WorkerException("a failure of unknown form: %r" % (exc,))
