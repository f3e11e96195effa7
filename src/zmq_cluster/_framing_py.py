"""Pure-Python twin of the message framing (see docs/protocol.md).

``encode`` turns a payload into the frames of one multipart message;
``decode`` turns the frames back into the payload. The compiled twin,
``zmq_cluster._fastpath.framing``, has the same functions with the same
behaviour and writes the same bytes; ``zmq_cluster.framing`` picks one.
"""

import math
import pickle
import struct

import numpy as np

from .exceptions import MessageFormatError
from .messages import ClusterRequest, ClusterResult
from .protocol import (
    COPY_THRESHOLD, HEADER, HEADER_SIZE, INLINE_LIMIT, INT64_MAX, INT64_MIN, KINDS, MAGIC,
    MAX_DEPTH, ORDER_C, ORDER_F, PICKLE_PROTOCOL, TAG_ARRAY, TAG_BIGINT, TAG_BYTES,
    TAG_COMPLEX, TAG_DICT, TAG_FALSE, TAG_FLOAT, TAG_INLINE_ARRAY, TAG_INT, TAG_LIST,
    TAG_NONE, TAG_PICKLE, TAG_REQUEST, TAG_RESULT, TAG_SCALAR, TAG_STR, TAG_TRUE, TAG_TUPLE,
    VERSION,
)

__all__ = ["encode", "decode", "frame_buffer"]

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_C128 = struct.Struct("<dd")
_TAG_U32 = struct.Struct("<BI")
_ARRAY_HEAD = struct.Struct("<BI")

_NONE = bytes([TAG_NONE])
_TRUE = bytes([TAG_TRUE])
_FALSE = bytes([TAG_FALSE])
_INLINE = bytes([TAG_INLINE_ARRAY])


# --------------------------------------------------------------------- encode

def encode(obj, kind, task_id=0, stats=None):
    """Encode ``obj`` as the frames of one message of ``kind``.

    Returns a list whose first item is the header frame (``bytes``) and whose
    other items are the buffer frames, one per array of at least
    ``INLINE_LIMIT`` bytes (C- or Fortran-ordered arrays are not copied: the
    frame is a view of the array's memory) or per out-of-band pickle buffer.
    Smaller arrays are copied into the header frame (tag ``'A'``), so a
    message of small values is a single frame. ``task_id`` (an int in
    [0, 2**64)) goes in the header; 0 means "none".

    Copy accounting: when ``stats`` is not None, the number of payload bytes
    this call copied is added to its int attribute ``copied_bytes`` once the
    message is encoded (not when encoding fails): the ``nbytes`` of every
    inline array (copied into the header once, in C order when it was not
    contiguous) and of every frame array that was neither C- nor
    F-contiguous (made C-contiguous). Header bytes (tags, dtypes, shapes,
    other values) and pickled data are not counted; a C- or F-contiguous
    array of at least ``INLINE_LIMIT`` bytes counts 0.
    """
    if kind not in KINDS:
        raise ValueError("unknown message kind %r" % (kind,))
    parts = [b""]
    buffers = []
    copied = [0]
    _encode_value(obj, parts, buffers, copied)
    parts[0] = HEADER.pack(MAGIC, VERSION, kind, len(buffers), task_id)
    frames = [b"".join(parts)] + buffers
    if stats is not None:
        stats.copied_bytes += copied[0]
    return frames


def _encode_value(obj, parts, buffers, copied):
    # Exact type checks: a subclass (a bool is not an int here, a user's dict
    # subclass is not a dict) must round-trip as itself, so it is pickled.
    append = parts.append
    t = type(obj)
    if obj is None:
        append(_NONE)
    elif obj is True:
        append(_TRUE)
    elif obj is False:
        append(_FALSE)
    elif t is int:
        if INT64_MIN <= obj <= INT64_MAX:
            append(b"i" + _I64.pack(obj))
        else:
            raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
            append(_TAG_U32.pack(TAG_BIGINT, len(raw)))
            append(raw)
    elif t is float:
        append(b"d" + _F64.pack(obj))
    elif t is str:
        raw = obj.encode("utf-8", "surrogatepass")
        append(_TAG_U32.pack(TAG_STR, len(raw)))
        append(raw)
    elif t is bytes:
        append(_TAG_U32.pack(TAG_BYTES, len(obj)))
        append(obj)
    elif t is list or t is tuple:
        append(_TAG_U32.pack(TAG_LIST if t is list else TAG_TUPLE, len(obj)))
        for item in obj:
            _encode_value(item, parts, buffers, copied)
    elif t is dict:
        append(_TAG_U32.pack(TAG_DICT, len(obj)))
        for key, value in obj.items():
            _encode_value(key, parts, buffers, copied)
            _encode_value(value, parts, buffers, copied)
    elif t is np.ndarray and not obj.dtype.hasobject:
        _encode_array(obj, parts, buffers, copied)
    elif t is ClusterRequest:
        append(b"R")
        _encode_value(obj.payload, parts, buffers, copied)
        _encode_value(obj.metadata, parts, buffers, copied)
    elif t is ClusterResult:
        append(b"S")
        _encode_value(obj.status, parts, buffers, copied)
        _encode_value(obj.payload, parts, buffers, copied)
        _encode_value(obj.request_metadata, parts, buffers, copied)
        _encode_value(obj.metadata, parts, buffers, copied)
        _encode_value(obj.exception, parts, buffers, copied)
    elif t is complex:
        append(b"j" + _C128.pack(obj.real, obj.imag))
    elif isinstance(obj, np.generic) and t.__module__ == "numpy" and not obj.dtype.hasobject:
        # asarray: an empty str_/bytes_ scalar has dtype '<U0'/'|S0' but
        # tobytes() gives one (zero) character; the array form agrees.
        scalar = np.asarray(obj)
        raw = scalar.tobytes()
        append(b"g")
        _encode_dtype(scalar.dtype, parts, buffers)
        append(_U32.pack(len(raw)))
        append(raw)
    else:
        _encode_pickle(obj, parts, buffers)


def _encode_dtype(dtype, parts, buffers):
    # A dtype value holds strs, ints, lists and tuples only: nothing copied.
    if dtype.fields is None:
        _encode_value(dtype.str, parts, buffers, None)
    else:
        _encode_value(_dtype_descr(dtype), parts, buffers, None)


def _dtype_descr(dtype):
    # np.lib.format's descr keeps field order, byte order, padding and
    # subarray shapes; it is the form .npy files use for the same job.
    return np.lib.format.dtype_to_descr(dtype)


def _encode_array(arr, parts, buffers, copied):
    flags = arr.flags
    if flags.c_contiguous:
        order = ORDER_C
    elif flags.f_contiguous:
        order = ORDER_F
    else:
        order = 0  # neither: written in C order, from a copy
    nbytes = arr.nbytes
    if nbytes < INLINE_LIMIT:
        # Inline: the elements go into the header, straight from the array's
        # memory (one copy, in C order when the array is not contiguous).
        parts.append(_INLINE)
        _encode_dtype(arr.dtype, parts, buffers)
        shape = arr.shape
        parts.append(struct.pack("<B%dQ" % len(shape), len(shape), *shape))
        if order == ORDER_F:
            parts.append(_U8.pack(ORDER_F))
            parts.append(arr.tobytes("F"))
        else:
            parts.append(_U8.pack(ORDER_C))
            parts.append(arr.tobytes("C"))
        copied[0] += nbytes
        return
    if not order:
        arr = np.ascontiguousarray(arr)
        order = ORDER_C
        copied[0] += nbytes
    parts.append(_ARRAY_HEAD.pack(TAG_ARRAY, len(buffers)))
    _encode_dtype(arr.dtype, parts, buffers)
    shape = arr.shape
    parts.append(struct.pack("<B%dQ" % len(shape), len(shape), *shape))
    parts.append(_U8.pack(order))
    buffers.append(frame_buffer(arr))


def frame_buffer(arr):
    """The bytes of a C- or Fortran-contiguous array as a flat uint8 array.

    This is a view, never a copy; it exports the buffer protocol even for
    dtypes that cannot (datetime64, structured), and keeps ``arr`` alive.
    """
    return arr.reshape(-1, order="A").view(np.uint8)


def _encode_pickle(obj, parts, buffers):
    out_of_band = []
    try:
        data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=out_of_band.append)
    except Exception as exc:
        raise TypeError("cannot encode %s object: %s" % (type(obj).__name__, exc)) from exc
    parts.append(_TAG_U32.pack(TAG_PICKLE, len(data)))
    parts.append(data)
    parts.append(_U32.pack(len(out_of_band)))
    for pickle_buffer in out_of_band:
        parts.append(_U32.pack(len(buffers)))
        buffers.append(pickle_buffer.raw())


# --------------------------------------------------------------------- decode

def decode(frames, allow_pickle=True, copy_threshold=COPY_THRESHOLD, alignment=None,
           stats=None):
    """Decode the frames of one message: returns ``(kind, task_id, obj)``.

    ``frames`` are ``zmq.Frame`` objects, or anything with the buffer
    protocol (``bytes``, ``memoryview``...). Arrays of at least
    ``copy_threshold`` bytes are views on their frame's memory when the
    frame is writeable; smaller ones, and those of read-only frames, are
    copies, so every decoded array is writeable. Inline arrays (tag ``'A'``)
    are always copied out of the header. An array view whose address is not
    a multiple of its dtype's alignment, or of ``alignment`` when that is
    given, is replaced by an aligned copy, so every decoded array is
    aligned (copies too honour ``alignment``). Pickled values are refused
    unless ``allow_pickle``. A message that breaks the format raises
    :class:`MessageFormatError`.

    Copy accounting: when ``stats`` is not None, the number of payload bytes
    this call copied is added to its int attribute ``copied_bytes`` once the
    message is decoded (not when it is rejected): the ``nbytes`` of every
    array that was copied rather than viewed (inline arrays; frame arrays
    that were small, misaligned or in a read-only frame). Header bytes and
    pickled values (in-band or out-of-band) are not counted; an array that
    is a view on its frame counts 0.
    """
    if not frames:
        raise MessageFormatError("empty message: no header frame")
    header = _as_buffer(frames[0])
    if len(header) < HEADER_SIZE:
        raise MessageFormatError(
            "header frame is %d bytes, shorter than the %d-byte fixed header"
            % (len(header), HEADER_SIZE))
    magic, version, kind, nframes, task_id = HEADER.unpack_from(header, 0)
    if magic != MAGIC:
        raise MessageFormatError("bad magic %r (expected %r): not a zmq_cluster message"
                                 % (bytes(magic), MAGIC))
    if version != VERSION:
        raise MessageFormatError("unknown wire format version %d (this build reads %d)"
                                 % (version, VERSION))
    if kind not in KINDS:
        raise MessageFormatError("unknown message kind %d" % kind)
    if nframes != len(frames) - 1:
        raise MessageFormatError("header announces %d buffer frames but %d arrived"
                                 % (nframes, len(frames) - 1))
    decoder = _Decoder(header, frames, allow_pickle, copy_threshold, alignment)
    try:
        obj = decoder.value(HEADER_SIZE, 0)
    except MessageFormatError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        # numpy refusing what the header describes (too many dimensions, a
        # size beyond its limits, ...): still the peer's fault, not ours.
        raise MessageFormatError("malformed value in the header (at offset %d): %s: %s"
                                 % (decoder.pos, type(exc).__name__, exc)) from None
    if decoder.pos != len(header):
        raise MessageFormatError("%d unexpected bytes after the value at offset %d of the header"
                                 % (len(header) - decoder.pos, decoder.pos))
    if decoder.used != nframes:
        raise MessageFormatError("%d buffer frames are not referenced by the header"
                                 % (nframes - decoder.used))
    if task_id and (type(obj) is ClusterRequest or type(obj) is ClusterResult):
        obj.task_id = task_id
    if stats is not None:
        stats.copied_bytes += decoder.copied
    return kind, task_id, obj


def _as_buffer(frame):
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is None:
        buf = memoryview(frame)
    return buf if buf.format == "B" else buf.cast("B")


class _Decoder:
    """Walks the header body; ``pos`` is the offset of the next byte."""

    def __init__(self, header, frames, allow_pickle, copy_threshold, alignment):
        self.header = header
        self.frames = frames
        self.allow_pickle = allow_pickle
        self.copy_threshold = copy_threshold
        self.alignment = alignment
        self.pos = 0
        self.used = 0
        self.copied = 0  # payload bytes copied, for decode's stats

    def take(self, n, what):
        start = self.pos
        end = start + n
        if end > len(self.header):
            raise MessageFormatError("header truncated: %s needs %d bytes at offset %d, "
                                     "%d left" % (what, n, start, len(self.header) - start))
        self.pos = end
        return start

    def u32(self, what):
        return _U32.unpack_from(self.header, self.take(4, what))[0]

    def value(self, pos, depth):
        if depth > MAX_DEPTH:
            raise MessageFormatError("values nested deeper than %d levels" % MAX_DEPTH)
        self.pos = pos
        header = self.header
        tag = header[self.take(1, "a value tag")]
        if tag == TAG_INT:
            return _I64.unpack_from(header, self.take(8, "an int"))[0]
        if tag == TAG_STR:
            n = self.u32("a str length")
            start = self.take(n, "a str")
            try:
                return str(header[start:start + n], "utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise MessageFormatError("invalid UTF-8 in str at offset %d: %s"
                                         % (start, exc)) from None
        if tag == TAG_NONE:
            return None
        if tag == TAG_FLOAT:
            return _F64.unpack_from(header, self.take(8, "a float"))[0]
        if tag == TAG_LIST or tag == TAG_TUPLE:
            count = self.u32("a sequence count")
            items = [self.value(self.pos, depth + 1) for _ in range(count)]
            return items if tag == TAG_LIST else tuple(items)
        if tag == TAG_DICT:
            count = self.u32("a dict count")
            out = {}
            for _ in range(count):
                key_at = self.pos
                key = self.value(key_at, depth + 1)
                value = self.value(self.pos, depth + 1)
                try:
                    out[key] = value
                except TypeError:
                    raise MessageFormatError("unhashable dict key at offset %d" % key_at) from None
            return out
        if tag == TAG_INLINE_ARRAY:
            return self.inline_array(depth)
        if tag == TAG_ARRAY:
            return self.array(depth)
        if tag == TAG_TRUE:
            return True
        if tag == TAG_FALSE:
            return False
        if tag == TAG_BYTES:
            n = self.u32("a bytes length")
            start = self.take(n, "bytes")
            return bytes(header[start:start + n])
        if tag == TAG_REQUEST:
            payload = self.value(self.pos, depth + 1)
            return ClusterRequest(payload, self.value(self.pos, depth + 1))
        if tag == TAG_RESULT:
            fields = [self.value(self.pos, depth + 1) for _ in range(5)]
            return ClusterResult(*fields)
        if tag == TAG_BIGINT:
            n = self.u32("a big int length")
            start = self.take(n, "a big int")
            return int.from_bytes(header[start:start + n], "little", signed=True)
        if tag == TAG_COMPLEX:
            real, imag = _C128.unpack_from(header, self.take(16, "a complex"))
            return complex(real, imag)
        if tag == TAG_SCALAR:
            dtype = self.dtype(depth)
            n = self.u32("a scalar length")
            start = self.take(n, "a scalar")
            if n == dtype.itemsize == 0:
                return np.zeros((), dtype)[()]
            if n != dtype.itemsize:
                raise MessageFormatError("scalar of dtype %s has %d bytes, expected %d"
                                         % (dtype, n, dtype.itemsize))
            return np.frombuffer(header[start:start + n], dtype)[0]
        if tag == TAG_PICKLE:
            return self.pickled()
        raise MessageFormatError("unknown value tag %r at offset %d" % (chr(tag), self.pos - 1))

    def frame(self, what):
        index = self.u32("a frame index")
        if index != self.used:
            raise MessageFormatError("%s refers to buffer frame %d; frame %d was expected next"
                                     % (what, index, self.used))
        if index >= len(self.frames) - 1:
            raise MessageFormatError("%s refers to buffer frame %d of %d"
                                     % (what, index, len(self.frames) - 1))
        self.used += 1
        return _as_buffer(self.frames[index + 1])

    def dtype(self, depth):
        at = self.pos
        descr = self.value(at, depth + 1)
        try:
            if type(descr) is str:
                dtype = np.dtype(descr)
            elif type(descr) is list:
                dtype = np.lib.format.descr_to_dtype(descr)
            else:
                raise TypeError("a dtype is a str or a list, not %s" % type(descr).__name__)
        except Exception as exc:
            raise MessageFormatError("bad dtype %r at offset %d: %s" % (descr, at, exc)) from None
        if dtype.hasobject:
            raise MessageFormatError("dtype %s at offset %d holds Python objects" % (dtype, at))
        return dtype

    def shape_and_order(self, at):
        """An array's ndim, shape and order fields: ``(shape, order byte)``."""
        ndim = self.header[self.take(1, "an array's ndim")]
        shape = struct.unpack_from("<%dQ" % ndim, self.header, self.take(8 * ndim, "a shape"))
        order = self.header[self.take(1, "an array's order")]
        if order != ORDER_C and order != ORDER_F:
            raise MessageFormatError("array at offset %d has order %r, expected 'C' or 'F'"
                                     % (at, chr(order)))
        return shape, order

    def inline_array(self, depth):
        at = self.pos - 1
        dtype = self.dtype(depth)
        shape, order = self.shape_and_order(at)
        nbytes = math.prod(shape) * dtype.itemsize
        start = self.take(nbytes, "an inline array")
        order = "F" if order == ORDER_F else "C"
        self.copied += nbytes
        if dtype.itemsize == 0:
            return np.empty(shape, dtype, order=order)
        flat = _aligned_empty(nbytes, self.alignment or dtype.alignment)
        flat[:] = self.header[start:start + nbytes]
        return flat.view(dtype).reshape(shape, order=order)

    def array(self, depth):
        at = self.pos - 1
        buf = self.frame("array at offset %d" % at)
        dtype = self.dtype(depth)
        shape, order = self.shape_and_order(at)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != buf.nbytes:
            raise MessageFormatError(
                "array at offset %d is %s %s (%d bytes) but its frame has %d bytes"
                % (at, "x".join(map(str, shape)) or "scalar", dtype, nbytes, buf.nbytes))
        order = "F" if order == ORDER_F else "C"
        if dtype.itemsize == 0:
            return np.empty(shape, dtype, order=order)
        flat = np.frombuffer(buf, np.uint8)
        align = self.alignment or dtype.alignment
        if (nbytes < self.copy_threshold or flat.ctypes.data % align
                or not flat.flags.writeable):
            received = flat
            flat = _aligned_empty(nbytes, align)
            flat[:] = received
            self.copied += nbytes
        return flat.view(dtype).reshape(shape, order=order)

    def pickled(self):
        at = self.pos - 1
        if not self.allow_pickle:
            raise MessageFormatError("pickled value at offset %d refused: pickle is not "
                                     "allowed from this peer" % at)
        n = self.u32("a pickle length")
        start = self.take(n, "pickle data")
        data = self.header[start:start + n]
        count = self.u32("a pickle buffer count")
        buffers = [self.frame("pickle at offset %d" % at) for _ in range(count)]
        try:
            return pickle.loads(data, buffers=buffers)
        except Exception as exc:
            raise MessageFormatError("pickled value at offset %d does not load: %s: %s"
                                     % (at, type(exc).__name__, exc)) from None


def _aligned_empty(nbytes, alignment):
    """An uninitialised uint8 array of ``nbytes`` at a multiple of ``alignment``."""
    if 16 % alignment == 0:  # numpy's allocator already gives 16
        return np.empty(nbytes, np.uint8)
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset:offset + nbytes]
