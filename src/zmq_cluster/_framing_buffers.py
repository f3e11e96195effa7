"""Memory for the framing twins' arrays, in one module both twins import:
array sizes checked (``array_nbytes``, ``shape_text``), frames as bytes
(``as_buffer``, ``frame_buffer``), and aligned memory for received arrays
that must be copied (``aligned_empty``, ``big_alignment``, and
``assembly_buffer``, which recycles large buffers once nothing refers to
them).
"""

import math
import sys
import threading
from typing import Any, List, Optional, Sequence

import numpy as np

from ._framing_errors import E_ITEMSIZE0, E_TOO_BIG
from .exceptions import MessageFormatError
from .protocol import ARRAY_ALIGNMENT, MAX_ARRAY_BYTES



def shape_text(shape: Sequence[int]) -> str:
    """``shape`` as error texts show it: ``3x4``, or ``scalar``."""
    return "x".join(map(str, shape)) or "scalar"


def array_nbytes(at: int, shape: Sequence[int], dtype: np.dtype) -> int:
    """The byte size of an array of ``shape`` and ``dtype`` read at offset
    ``at``, checked: an item size other than 0, and within MAX_ARRAY_BYTES
    (an empty array too, counting its non-zero dimensions)."""
    itemsize = dtype.itemsize
    if itemsize == 0:
        raise MessageFormatError(E_ITEMSIZE0 % (at, dtype))
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_ARRAY_BYTES or not nbytes and math.prod(
            [dim for dim in shape if dim]) * itemsize > MAX_ARRAY_BYTES:
        raise MessageFormatError(E_TOO_BIG % (at, shape_text(shape), dtype))
    return nbytes


def as_buffer(frame: Any) -> memoryview:
    """A frame's memory as a flat memoryview of bytes (format ``B``)."""
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is None:
        buf = memoryview(frame)
    return buf if buf.format == "B" else buf.cast("B")


def aligned_empty(nbytes: int, alignment: int) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes`` at a multiple of ``alignment``."""
    if 16 % alignment == 0:  # numpy's allocator already gives 16
        return np.empty(nbytes, np.uint8)
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset:offset + nbytes]


#: Most bytes of assembly buffers (see ``assembly_buffer``) a process keeps
#: for reuse once the arrays on them are gone.
RECYCLE_MAX_BYTES = 256 << 20

_recycled: List[np.ndarray] = []
_recycled_lock = threading.Lock()


def _refs(items: List[np.ndarray], i: int) -> int:
    """``sys.getrefcount`` of ``items[i]``, counted the same way at
    calibration and in ``assembly_buffer`` (how a subscript and a call
    count their references differs between interpreter versions)."""
    return sys.getrefcount(items[i])


def _calibrate() -> Optional[int]:
    """The count ``_refs`` reports for an item only its list refers to, or
    None where reference counts cannot tell that a buffer is free: other
    interpreters than CPython, free-threaded builds (another thread may
    take or drop a reference between the count and its use), or a count
    that does not grow by one for one more reference."""
    if sys.implementation.name != "cpython":
        return None
    gil_enabled = getattr(sys, "_is_gil_enabled", None)
    if gil_enabled is not None and not gil_enabled():
        return None
    items = [np.empty(1, np.uint8)]
    free = _refs(items, 0)
    held = items[0]
    if _refs(items, 0) != free + 1:
        return None
    del held
    return free


#: What ``_refs`` says of a buffer only ``_recycled`` holds; None turns
#: recycling off (every assembly buffer is new memory).
_FREE_REFS: Optional[int] = _calibrate()


def assembly_buffer(nbytes: int, alignment: int) -> np.ndarray:
    """``aligned_empty`` for a received array of at least ALIGNED_BYTES that
    must be copied (assembled from split frames, or a single frame not at
    its alignment): memory that an earlier such array of the same size used,
    once nothing refers to that array any more, else new memory, kept (up
    to RECYCLE_MAX_BYTES in all) for the next one.

    Why: a buffer this large comes from a fresh mmap, and the kernel zeroes
    its pages as they fault in; profiled (perf, 64 MiB arrays through
    pool.map), that zeroing cost about twice the assembly's memcpy. A
    buffer is known unused when the list here holds its only reference:
    every numpy view of it (slices, reshapes, memoryviews of those,
    ``np.frombuffer`` of those) refers to it, so an array the user still
    holds is never reused. What counts as "only the list" is measured once
    at import (``_FREE_REFS``); where reference counts cannot be trusted
    (free-threaded builds, other interpreters) nothing is recycled. The
    test, the choice and the view handed out all happen under one lock, so
    two threads never get the same buffer. The cost is memory: up to
    RECYCLE_MAX_BYTES stay with the process after its arrays are gone.
    """
    size = nbytes + alignment
    if _FREE_REFS is None:
        return aligned_empty(nbytes, alignment)
    with _recycled_lock:
        # _recycled runs from least to most recently handed out. The size is
        # compared before the count, and the search stops at the first free
        # buffer of this size (in a steady stream, the oldest), so a pool
        # full of one size's buffers costs a short scan, not one count each.
        for i in range(len(_recycled)):
            if _recycled[i].nbytes == size and _refs(_recycled, i) == _FREE_REFS:
                raw = _recycled.pop(i)
                break
        else:
            free = [i for i in range(len(_recycled)) if _refs(_recycled, i) == _FREE_REFS]
            held = sum([r.nbytes for r in _recycled])
            # Make room by dropping free buffers of other sizes, least
            # recently used first, as many as it takes (a pool full of
            # another size's buffers must not leave every new one unkept).
            drop = []
            if held + size - sum([_recycled[i].nbytes for i in free]) <= RECYCLE_MAX_BYTES:
                for i in free:
                    if held + size <= RECYCLE_MAX_BYTES:
                        break
                    held -= _recycled[i].nbytes
                    drop.append(i)
            for i in reversed(drop):
                del _recycled[i]
            raw = np.empty(size, np.uint8)
            if held + size > RECYCLE_MAX_BYTES:
                offset = -raw.ctypes.data % alignment
                return raw[offset:offset + nbytes]  # not kept: the pool is all in use
        _recycled.append(raw)
        offset = -raw.ctypes.data % alignment
        return raw[offset:offset + nbytes]


def big_alignment(alignment: int) -> int:
    """The alignment of a received array of at least ``ALIGNED_BYTES``:
    ``alignment`` (the one asked for, or the dtype's) and ARRAY_ALIGNMENT
    both divide it."""
    if alignment % ARRAY_ALIGNMENT == 0:
        return alignment
    return math.lcm(int(alignment), ARRAY_ALIGNMENT)


def frame_buffer(arr: np.ndarray) -> np.ndarray:
    """The bytes of a C- or Fortran-contiguous array as a flat uint8 array.

    This is a view, never a copy; it exports the buffer protocol even for
    dtypes that cannot (datetime64, structured), and keeps ``arr`` alive.
    """
    return arr.reshape(-1, order="A").view(np.uint8)

