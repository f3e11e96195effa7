"""Arrays by shared-memory reference (tag ``'h'``): the bytes both framing
twins write and read for them (neither twin has its own copy of this code,
so the two cannot differ). See docs/protocol.md, "Arrays", and
``zmq_cluster.sharedmem`` for the slots themselves.

The encoder of either twin calls ``encode_shm_array`` for an array of at
least ``shm.min_bytes`` when it was given a SharedMemory (``shm``); the
decoder calls ``decode_shm_array`` on tag ``'h'``, with the SharedMemory it
was given or None (then the message is refused, with the reason).
"""

import struct
from typing import Any, Optional, Tuple

import numpy as np

from ._framing_buffers import aligned_empty, array_nbytes, big_alignment
from ._framing_dtypes import bad_code_points, read_dtype
from ._framing_errors import E_CODE_POINT, E_NDIM, E_ORDER, E_UTF8, X_DEEP, truncated
from .exceptions import EncodeError, MessageFormatError
from .protocol import (
    ALIGNED_BYTES, MAX_DEPTH, MAX_NDIM, ORDER_C, ORDER_F, TAG_SHM_ARRAY, TAG_STR, U32,
)
from .sharedmem import AttachError

__all__ = ["encode_shm_array", "decode_shm_array", "E_SHM_NONE", "E_SHM_ATTACH", "E_SHM_PATH"]

#: slot, generation, offset
_REF = struct.Struct("<IQQ")
_HEAD = struct.Struct("<BIQQ")  # the tag, then _REF
#: Longest slot pool address (a Unix socket path) a receiver reads.
MAX_PATH = 4096

E_SHM_NONE = ("shared-memory array at offset %d refused: this receiver has no shared memory "
              "configured (shared_memory=...)")
E_SHM_ATTACH = "shared-memory array at offset %d refused: %s"
E_SHM_PATH = "shared-memory array at offset %d: its pool address is %s"


def encode_shm_array(shm: Any, arr: np.ndarray, dtype_header: bytes,
                     depth: int) -> Optional[bytes]:
    """The ``'h'`` value of ``arr`` (bytes), its elements copied into one of
    ``shm``'s slots; None (nothing written, nothing taken) when ``shm`` has
    no slot or room free: the caller then writes the array as usual.
    ``dtype_header`` is the array's ``dtype_header`` bytes; ``depth`` the
    array's nesting depth."""
    if depth + 1 > MAX_DEPTH:
        raise EncodeError(X_DEEP)
    where = shm.put(arr)
    if where is None:
        return None
    path, slot, generation, offset = where
    raw = path.encode("utf-8", "surrogateescape")
    flags = arr.flags
    order = ORDER_F if flags.f_contiguous and not flags.c_contiguous else ORDER_C
    shape = arr.shape
    return b"".join((_HEAD.pack(TAG_SHM_ARRAY, slot, generation, offset),
                     U32.pack(len(raw)).join((bytes([TAG_STR]), raw)), dtype_header,
                     struct.pack("<B%dQ" % len(shape), len(shape), *shape), bytes([order])))


def decode_shm_array(shm: Any, header: Any, pos: int, depth: int, load: bool,
                     alignment: Optional[int]) -> Tuple[Any, int, int]:
    """Read the ``'h'`` value whose fields start at ``pos`` (after its tag)
    of ``header``: ``(array, end, bytes copied)``. With ``load`` false the
    reference is only checked (the array is None): a decoder's first pass.
    Raises MessageFormatError when the fields are malformed, when ``shm``
    is None, or when the reference cannot be mapped or does not match its
    slot.

    The array is a writeable view of the producer's slot (no copy, 0
    bytes); its drop releases the slot. When ``alignment`` (or the dtype's
    alignment, and 64 from ALIGNED_BYTES up) does not divide its address,
    it is an aligned copy instead (its bytes counted), and the slot is
    released at once."""
    at = pos - 1
    size = len(header)
    if _REF.size > size - pos:
        raise truncated("a shared-memory reference", _REF.size, pos, size - pos)
    slot, generation, offset = _REF.unpack_from(header, pos)
    pos += _REF.size
    if 5 > size - pos:
        raise truncated("a pool address", 5, pos, size - pos)
    if header[pos] != TAG_STR:
        raise MessageFormatError(E_SHM_PATH % (at, "not a str (tag %r)" % chr(header[pos])))
    n = U32.unpack_from(header, pos + 1)[0]
    pos += 5
    if n > size - pos:
        raise truncated("a str", n, pos, size - pos)
    if n > MAX_PATH:
        raise MessageFormatError(E_SHM_PATH % (at, "%d bytes long (at most %d)" % (n, MAX_PATH)))
    try:
        path = str(header[pos:pos + n], "utf-8", "surrogateescape")
    except UnicodeDecodeError as exc:
        raise MessageFormatError(E_UTF8 % (pos, exc)) from None
    pos += n
    dtype, pos = read_dtype(header, pos, depth + 1)
    if 1 > size - pos:
        raise truncated("an array's ndim", 1, pos, size - pos)
    ndim = header[pos]
    pos += 1
    if ndim > MAX_NDIM:
        raise MessageFormatError(E_NDIM % (at, ndim))
    if 8 * ndim > size - pos:
        raise truncated("a shape", 8 * ndim, pos, size - pos)
    shape = struct.unpack_from("<%dQ" % ndim, header, pos)
    pos += 8 * ndim
    if 1 > size - pos:
        raise truncated("an array's order", 1, pos, size - pos)
    order = header[pos]
    pos += 1
    if order != ORDER_C and order != ORDER_F:
        raise MessageFormatError(E_ORDER % (at, chr(order)))
    nbytes = array_nbytes(at, shape, dtype)
    if shm is None:
        raise MessageFormatError(E_SHM_NONE % at)
    try:
        flat = shm.attach(path, slot, generation, offset, nbytes, load)
    except AttachError as exc:
        raise MessageFormatError(E_SHM_ATTACH % (at, exc)) from None
    if not load:
        return None, pos, 0
    if (dtype.kind == "U" or dtype.fields is not None) and bad_code_points(flat, dtype):
        raise MessageFormatError(E_CODE_POINT % ("array", at, dtype))
    align = alignment or dtype.alignment
    if nbytes >= ALIGNED_BYTES:
        align = big_alignment(align)
    copied = 0
    if flat.ctypes.data % align:
        received = flat
        flat = aligned_empty(nbytes, align)
        flat[:] = received
        del received  # the slot is released
        copied = nbytes
    return flat.view(dtype).reshape(shape, order="F" if order == ORDER_F else "C"), pos, copied
