"""Batch tables, pure-Python twin (the compiled one: framing_tables.pxi).

A batch message carries many tasks (or results) in one table frame: each
entry is fixed little-endian fields, two of them the length of an inline
header that follows the fields and the count of data frames of the
message, which follow the table frame in order (docs/scheduler.md, "Batch
tables"). :func:`walk_table` splits a table into its messages,
:func:`scan_table` into spans of it, and :func:`encode_task_table` makes a
table of tasks; both twins return the same values and bytes and raise the
same texts.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

from ._framing_errors import (
    T_FIELDS, T_FORMAT, T_FRAMES, T_NO_HEADER, T_OVERRUN, T_STRAY_BYTES, T_STRAY_FRAMES, T_TRUNCATED,
    TABLE_CODES,
)
from ._framing_py import encode
from .protocol import INLINE_HEADER_MAX, KIND_REQUEST, TASK_ENTRY_FORMAT

__all__ = ["walk_table", "scan_table", "encode_task_table"]

#: A table as it may come: any bytes-like object (read as bytes).
Table = Union[bytes, bytearray, memoryview]
#: What encode_task_table returns.
TaskTable = tuple[bytes, list[Any], list[int], list[int], Any]

_structs: dict[str, struct.Struct] = {}


def _entry_struct(fmt: str) -> struct.Struct:
    s = _structs.get(fmt)
    if s is None:
        if (type(fmt) is not str or len(fmt) < 2 or fmt[0] != "<"
                or any(c not in TABLE_CODES for c in fmt[1:])):
            raise ValueError(T_FORMAT % (fmt,))
        s = _structs[fmt] = struct.Struct(fmt)
    return s


def scan_table(table: Table, count: int, fmt: str, inline_at: int, nframes_at: int,
               ndata: int, error: type[Exception]) -> list[tuple[tuple[Any, ...], int, int, int]]:
    """The ``count`` entries of ``table`` as spans, for a reader that keeps
    offsets rather than messages (the scheduler): a list of ``(fields,
    start, end, first)``: the entry's fields, where it starts and ends in
    ``table`` (its inline header included) and the index of its first data
    frame among the ``ndata`` that came with the table. Checks and raises
    as :func:`walk_table`."""
    entry = _entry_struct(fmt)
    if not (0 <= inline_at < len(fmt) - 1 and 0 <= nframes_at < len(fmt) - 1
            and inline_at != nframes_at
            and fmt[1 + inline_at] == "I" and fmt[1 + nframes_at] == "I"):
        raise ValueError(T_FIELDS % (inline_at, nframes_at, fmt))
    n = len(table)
    out: list[tuple[tuple[Any, ...], int, int, int]] = []
    append = out.append
    unpack = entry.unpack_from
    size = entry.size
    off = first = 0
    for _ in range(count):
        if off + size > n:
            raise error(T_TRUNCATED % len(out))
        fields = unpack(table, off)
        inline = fields[inline_at]
        nfr = fields[nframes_at]
        end = off + size + inline
        if end > n:
            raise error(T_OVERRUN)
        if not (inline or nfr):
            raise error(T_NO_HEADER % len(out))
        if first + nfr > ndata:
            raise error(T_FRAMES)
        append((fields, off, end, first))
        off = end
        first += nfr
    if off != n:
        raise error(T_STRAY_BYTES % (n - off))
    if first != ndata:
        raise error(T_STRAY_FRAMES % (ndata - first))
    return out


def walk_table(table: Table, count: int, fmt: str, inline_at: int, nframes_at: int,
               data: Sequence[Any], error: type[Exception]
               ) -> list[tuple[tuple[Any, ...], list[Any]]]:
    """The ``count`` entries of ``table`` with their messages: a list of
    ``(fields, message)``. ``fmt``: the entry's struct format ('<' and the
    codes Q, I, d); ``inline_at``/``nframes_at``: the positions, among the
    fields, of the inline header's length and of the message's data frame
    count (two I fields). ``message`` is the message's frames: the inline
    header (bytes), then its frames from ``data``; or, without an inline
    header, its frames from ``data`` only. Raises ``error(text)``, having
    returned nothing, when the table and the frames disagree; ValueError
    for a ``fmt`` of other codes."""
    if type(table) is not bytes:
        table = bytes(table)
    size = _entry_struct(fmt).size
    out: list[tuple[tuple[Any, ...], list[Any]]] = []
    for fields, start, end, first in scan_table(table, count, fmt, inline_at, nframes_at,
                                                len(data), error):
        nfr = fields[nframes_at]
        if end > start + size:
            msg = [table[start + size:end]]
            if nfr:
                msg.extend(data[first:first + nfr])
        else:
            msg = list(data[first:first + nfr])
        out.append((fields, msg))
    return out


_TASK_ENTRY = struct.Struct(TASK_ENTRY_FORMAT)


def encode_task_table(chunks: Iterator[Sequence[Any]], mode: int, key: int, timeout: int,
                      first_tid: int, max_tasks: int, max_items: int, max_bytes: int,
                      stats: Any = None, shm: Any = None,
                      pin: Callable[[int], int] | None = None) -> TaskTable:
    """Encode chunks read from ``chunks`` as one batch table of tasks:
    ``(table, frames, lengths, sizes, stop)``.

    Task ``i`` is ``first_tid + i``, a REQUEST whose payload is ``(mode,
    chunk)`` (encoded as ``encode`` does, with ``stats`` and ``shm``); its
    entry is TASK_ENTRY_FORMAT's (task id, ``key``, ``timeout``,
    inline_len, n_frames) followed by its header frame when that is under
    INLINE_HEADER_MAX bytes, its other frames going to ``frames`` in order.
    ``lengths[i]`` is the chunk's length, ``sizes[i]`` the task's bytes: its
    entry, its data frames and, when the encoding put arrays in ``shm``'s
    slots, what ``pin(tid)`` returns (the caller pins them there).

    The first chunk is always read; another only while fewer than
    ``max_tasks`` tasks, ``max_items`` items and ``max_bytes`` bytes are in
    the table. ``stop`` says why it ended: None (a limit), StopIteration
    (the class: ``chunks`` ended), ``(exc, None)`` (``chunks`` raised
    ``exc``) or ``(exc, chunk)`` (``chunk`` could not be encoded: it is not
    in the table)."""
    parts: list[bytes] = []
    frames: list[Any] = []
    lengths: list[int] = []
    sizes: list[int] = []
    pack = _TASK_ENTRY.pack
    stop: Any = None
    items = nbytes = 0
    while not parts or (len(parts) < max_tasks and items < max_items and nbytes < max_bytes):
        try:
            chunk = next(chunks)
        except StopIteration:
            stop = StopIteration
            break
        except Exception as exc:
            stop = (exc, None)
            break
        tid = first_tid + len(parts)
        before = 0 if shm is None else shm.arrays_sent
        try:
            msg = encode((mode, chunk), KIND_REQUEST, tid, stats, shm)
        except Exception as exc:
            stop = (exc, chunk)
            break
        size = 0
        if shm is not None and shm.arrays_sent != before and pin is not None:
            size = pin(tid)
        header = msg[0]
        if len(header) < INLINE_HEADER_MAX:
            entry = pack(tid, key, timeout, len(header), len(msg) - 1) + header
            data = msg[1:]
        else:
            entry = pack(tid, key, timeout, 0, len(msg))
            data = msg
        size += len(entry)
        for f in data:
            size += len(f) if type(f) is bytes else memoryview(f).nbytes
        frames.extend(data)
        parts.append(entry)
        lengths.append(len(chunk))
        sizes.append(size)
        items += len(chunk)
        nbytes += size
    return b"".join(parts), frames, lengths, sizes, stop
