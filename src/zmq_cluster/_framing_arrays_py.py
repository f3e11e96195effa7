"""Arrays in the pure-Python framing twin, both directions: the methods
``_framing_py``'s encoder and decoder take from the two mixins here (a
module of that twin, kept apart for its size). docs/protocol.md, "Arrays",
gives the bytes; the compiled twin's counterpart is framing_arrays.pxi.
"""

import struct
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ._framing_buffers import (
    aligned_empty, array_nbytes, as_buffer, assembly_buffer, big_alignment, frame_buffer,
    shape_text,
)
from ._framing_dtypes import array_bad_code_points, array_dtype_header, bad_code_points
from ._framing_errors import (
    E_CODE_POINT, E_FRAME_ORDER, E_FRAME_RANGE, E_FRAME_SIZE, E_NDIM, E_ORDER,
    E_SPLIT_COUNT, E_SPLIT_SIZE, X_CODE_POINT, X_U32,
)
from ._framing_shm import encode_shm_array
from .exceptions import EncodeError, MessageFormatError
from .protocol import (
    ALIGNED_BYTES, INLINE_LIMIT, MAX_NDIM, ORDER_C, ORDER_F, SPLIT_BYTES,
    TAG_ARRAY, TAG_INLINE_ARRAY, TAG_SPLIT_ARRAY, TAG_U32, U8, U32_MAX,
)

_INLINE = bytes([TAG_INLINE_ARRAY])
_ARRAY_HEAD = TAG_U32
_SPLIT_HEAD = struct.Struct("<BII")  # tag, first frame, frame count


class ArrayWriter:
    """The encoder's ``array``: it uses the encoder's ``parts``,
    ``buffers``, ``copied``, ``shm``, ``shm_puts`` and ``dtype``."""

    __slots__ = ()

    # The encoder's (declared for the type checker only; stores to them are
    # marked: it cannot see the subclass's __slots__).
    parts: List[Any]
    buffers: List[Any]
    copied: int
    shm: Any
    shm_puts: int
    dtype: Callable[[Any, int], None]

    def array(self, arr: np.ndarray, depth: int) -> bool:
        """Write an ndarray; False (nothing written) when it has no native
        form (a dtype outside the grammar, or of item size 0)."""
        entry = array_dtype_header(arr.dtype)
        if entry is None:
            return False
        value, text = entry
        if text and array_bad_code_points(arr):
            raise EncodeError(X_CODE_POINT % arr.dtype)
        flags = arr.flags
        if flags.c_contiguous:
            order = ORDER_C
        elif flags.f_contiguous:
            order = ORDER_F
        else:
            order = 0  # neither: written in C order, from a copy
        nbytes = arr.nbytes
        parts = self.parts
        shape = arr.shape
        shm = self.shm
        if shm is not None and nbytes >= shm.min_bytes and type(value) is bytes:
            raw = encode_shm_array(shm, arr, value, depth)
            if raw is not None:
                self.shm_puts += 1  # type: ignore[misc]
                parts.append(raw)
                self.copied += nbytes  # type: ignore[misc]
                return True
        if nbytes < INLINE_LIMIT:
            # Inline: the elements go into the header, straight from the
            # array's memory (one copy, in C order when it is not contiguous).
            parts.append(_INLINE)
            self.dtype(value, depth + 1)
            parts.append(struct.pack("<B%dQ" % len(shape), len(shape), *shape))
            if order == ORDER_F:
                parts.append(U8.pack(ORDER_F))
                parts.append(arr.tobytes("F"))
            else:
                parts.append(U8.pack(ORDER_C))
                parts.append(arr.tobytes("C"))
            self.copied += nbytes  # type: ignore[misc]
            return True
        if not order:
            arr = np.ascontiguousarray(arr)
            order = ORDER_C
            self.copied += nbytes  # type: ignore[misc]
        # (A frame index past U32_MAX cannot happen alone: encode() refuses the
        # frame count.)
        if nbytes > SPLIT_BYTES:
            # Split: frames of SPLIT_BYTES (the last holds the rest), each a
            # view of the array's memory.
            count = -(-nbytes // SPLIT_BYTES)
            if count > U32_MAX:
                raise EncodeError(X_U32 % ("an array", count, "buffer frames"))
            parts.append(_SPLIT_HEAD.pack(TAG_SPLIT_ARRAY, len(self.buffers) & U32_MAX, count))
        else:
            parts.append(_ARRAY_HEAD.pack(TAG_ARRAY, len(self.buffers) & U32_MAX))
        self.dtype(value, depth + 1)
        parts.append(struct.pack("<B%dQ" % len(shape), len(shape), *shape))
        parts.append(U8.pack(order))
        flat = frame_buffer(arr)
        if nbytes > SPLIT_BYTES:
            self.buffers.extend([flat[i:i + SPLIT_BYTES] for i in range(0, nbytes, SPLIT_BYTES)])
        else:
            self.buffers.append(flat)
        return True


class ArrayReader:
    """The decoder's arrays: they use the decoder's ``header``, ``frames``,
    ``pos``, ``used``, ``copied``, ``alignment``, ``copy_threshold``,
    ``take``, ``u32``, ``frame`` and ``dtype``."""

    # Arrays: where the bytes come from (the header, or a frame) is the only
    # difference between the two forms; both read and check their fields
    # with array_fields first.

    # The decoder's (declared for the type checker only).
    header: Any
    frames: Sequence[Any]
    pos: int
    used: int
    copied: int
    alignment: Optional[int]
    copy_threshold: int
    take: Callable[[int, str], int]
    u32: Callable[[str], int]
    frame: Callable[[str], memoryview]
    dtype: Callable[[int], np.dtype]

    def array_fields(self, at: int, dtype: np.dtype) -> Tuple[Tuple[int, ...], int, int]:
        """An array's ndim, shape and order fields, checked against the
        limits: ``(shape, order byte, nbytes)``."""
        ndim = self.header[self.take(1, "an array's ndim")]
        if ndim > MAX_NDIM:
            raise MessageFormatError(E_NDIM % (at, ndim))
        shape = struct.unpack_from("<%dQ" % ndim, self.header, self.take(8 * ndim, "a shape"))
        order = self.header[self.take(1, "an array's order")]
        if order != ORDER_C and order != ORDER_F:
            raise MessageFormatError(E_ORDER % (at, chr(order)))
        return shape, order, array_nbytes(at, shape, dtype)

    def inline_array(self, depth: int) -> np.ndarray:
        at = self.pos - 1
        dtype = self.dtype(depth)
        shape, order, nbytes = self.array_fields(at, dtype)
        start = self.take(nbytes, "an inline array")
        if (dtype.kind == "U" or dtype.fields is not None) and bad_code_points(
                self.header[start:start + nbytes], dtype):
            raise MessageFormatError(E_CODE_POINT % ("array", at, dtype))
        self.copied += nbytes
        flat = aligned_empty(nbytes, self.alignment or dtype.alignment)
        flat[:] = self.header[start:start + nbytes]
        return flat.view(dtype).reshape(shape, order="F" if order == ORDER_F else "C")

    def array(self, depth: int) -> np.ndarray:
        at = self.pos - 1
        buf = self.frame("array at offset %d" % at)
        dtype = self.dtype(depth)
        shape, order, nbytes = self.array_fields(at, dtype)
        if nbytes != buf.nbytes:
            raise MessageFormatError(E_FRAME_SIZE % (at, shape_text(shape), dtype, nbytes,
                                                     buf.nbytes))
        if (dtype.kind == "U" or dtype.fields is not None) and bad_code_points(buf, dtype):
            raise MessageFormatError(E_CODE_POINT % ("array", at, dtype))
        flat = np.frombuffer(buf, np.uint8)
        align = self.alignment or dtype.alignment
        if nbytes >= ALIGNED_BYTES:
            align = big_alignment(align)
        if (nbytes < self.copy_threshold or flat.ctypes.data % align
                or not flat.flags.writeable):
            received = flat
            if nbytes >= ALIGNED_BYTES:  # fresh pages of this size fault in slowly
                flat = assembly_buffer(nbytes, align)
            else:
                flat = aligned_empty(nbytes, align)
            flat[:] = received
            self.copied += nbytes
        return flat.view(dtype).reshape(shape, order="F" if order == ORDER_F else "C")

    def split_array(self, depth: int) -> np.ndarray:
        at = self.pos - 1
        what = "array at offset %d" % at
        first = self.u32("a frame index")
        count = self.u32("a frame count")
        if first != self.used:
            raise MessageFormatError(E_FRAME_ORDER % (what, first, self.used))
        if not count:
            raise MessageFormatError(E_SPLIT_COUNT % at)
        last = first + count - 1
        if last >= len(self.frames) - 1:
            raise MessageFormatError(E_FRAME_RANGE % (what, last, len(self.frames) - 1))
        self.used += count
        bufs = [as_buffer(frame) for frame in self.frames[first + 1:last + 2]]
        dtype = self.dtype(depth)
        shape, order, nbytes = self.array_fields(at, dtype)
        held = sum([buf.nbytes for buf in bufs])
        if held != nbytes:
            raise MessageFormatError(E_SPLIT_SIZE % (at, shape_text(shape), dtype, nbytes,
                                                     count, held))
        # Assembled: one aligned array, one memcpy per frame.
        align = self.alignment or dtype.alignment
        if nbytes >= ALIGNED_BYTES:
            flat = assembly_buffer(nbytes, big_alignment(align))
        else:
            flat = aligned_empty(nbytes, align)
        start = 0
        for buf in bufs:
            end = start + buf.nbytes
            flat[start:end] = np.frombuffer(buf, np.uint8)
            start = end
        if (dtype.kind == "U" or dtype.fields is not None) and bad_code_points(flat, dtype):
            raise MessageFormatError(E_CODE_POINT % ("array", at, dtype))
        self.copied += nbytes
        return flat.view(dtype).reshape(shape, order="F" if order == ORDER_F else "C")

