"""Pure-Python twin of the message framing: the reference implementation of
docs/protocol.md, and the one place the contract of ``encode`` and
``decode`` is written down.

``encode`` turns a payload into the frames of one multipart message;
``decode`` turns the frames back into the payload. The compiled twin,
``zmq_cluster._fastpath.framing``, has the same functions with the same
behaviour, the same error texts and the same bytes; ``zmq_cluster.framing``
picks one. Helpers both twins need live in modules both import:
``_framing_errors`` (error texts), ``_framing_buffers`` (array memory),
``_framing_dtypes`` (the dtype grammar), ``protocol`` (constants).
"""

import pickle
import struct
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ._framing_arrays_py import ArrayReader, ArrayWriter
from ._framing_buffers import as_buffer, frame_buffer
from ._framing_dtypes import (
    HeaderCursor, array_bad_code_points, bad_code_points, dtype_header, read_dtype,
)
from ._framing_errors import (
    E_CODE_POINT, E_DEEP, E_EMPTY, E_FRAME_ORDER, E_FRAME_RANGE, E_KIND, E_MAGIC, E_NFRAMES,
    E_NUMPY, E_PICKLE_ARGS, E_PICKLE_COMMAND, E_PICKLE_LOAD, E_PICKLE_REFUSED, E_SCALAR,
    E_SHORT, E_TAG, E_TRAILING, E_UNHASHABLE, E_UNREFERENCED, E_UTF8, E_VERSION, X_CODE_POINT,
    X_COMMAND, X_DEEP, X_PICKLE, X_U32, count_error,
)
from ._framing_exceptions import exception_fields, exception_value
from ._framing_shm import decode_shm_array
from .exceptions import EncodeError, MessageFormatError
from .messages import ClusterRequest, ClusterResult
from .protocol import (
    C128, COPY_THRESHOLD, F64, HEADER, HEADER_SIZE, I64, INT64_MAX, INT64_MIN, KIND_COMMAND,
    KINDS, MAGIC, MAX_DEPTH, PICKLE_PROTOCOL, TAG_ARRAY, TAG_BIGINT, TAG_BYTES, TAG_COMPLEX,
    TAG_DICT, TAG_EXCEPTION, TAG_FALSE, TAG_FLOAT, TAG_INLINE_ARRAY, TAG_INT, TAG_LIST,
    TAG_NONE, TAG_PICKLE, TAG_REQUEST, TAG_RESULT, TAG_SCALAR, TAG_SHM_ARRAY, TAG_SPLIT_ARRAY,
    TAG_STR, TAG_TRUE, TAG_TUPLE, TAG_U32, U32, U32_MAX, VERSION,
)

__all__ = ["encode", "decode", "frame_buffer"]

_NONE = bytes([TAG_NONE])
_TRUE = bytes([TAG_TRUE])
_FALSE = bytes([TAG_FALSE])


# --------------------------------------------------------------------- encode

def encode(obj: Any, kind: int, task_id: int = 0, stats: Any = None,
           shm: Any = None) -> List[Any]:
    """Encode ``obj`` as the frames of one message of ``kind``.

    Returns a list whose first item is the header frame (``bytes``) and whose
    other items are the buffer frames: one per array of ``INLINE_LIMIT`` to
    ``SPLIT_BYTES`` bytes, ``ceil(nbytes / SPLIT_BYTES)`` for a larger array
    (tag ``'c'``: frames of SPLIT_BYTES, the last holding the rest), one per
    out-of-band pickle buffer. Array frames of C- or Fortran-ordered arrays
    are views of the array's memory (flat uint8 arrays), never copies: the
    caller must not change the array until the message has left.
    Smaller arrays are copied into the header frame (tag ``'A'``), so a
    message of small values is a single frame. ``task_id`` (an int in
    [0, 2**64)) goes in the header; 0 means "none". Exceptions travel
    natively (tag ``'E'``); values with no native form are pickled, except
    in a COMMAND message.

    Raises :class:`~zmq_cluster.exceptions.EncodeError` (a TypeError) for a
    value no receiver would accept: one that needs pickle and that pickle
    cannot handle (or any that needs pickle in a COMMAND message), values
    nested deeper than ``MAX_DEPTH``, a length or count beyond the u32
    fields. ValueError for an unknown ``kind``; ``struct.error`` for a
    ``task_id`` outside [0, 2**64).

    Copy accounting (docs/protocol.md, "Decoding: views, copies,
    alignment"): when ``stats`` is not None, the payload bytes this call
    copied are added to its int attribute ``copied_bytes`` once the message
    is encoded: the ``nbytes`` of every inline array and of every frame
    array that was neither C- nor F-contiguous; never header bytes or
    pickled data.

    Shared memory: with ``shm`` (a ``zmq_cluster.sharedmem.SharedMemory``),
    an array of at least ``shm.min_bytes`` whose dtype is not structured is
    copied once into one of its slots and written as a reference (tag
    ``'h'``, no buffer frame), counted in ``copied_bytes``; when no slot is
    free it is written as usual. Not inside an exception's args.
    """
    if kind not in KINDS:
        raise ValueError("unknown message kind %r" % (kind,))
    encoder = _Encoder(kind == KIND_COMMAND, shm)
    try:
        encoder.value(obj, 0)
        buffers = encoder.buffers
        if len(buffers) > U32_MAX:
            raise EncodeError(X_U32 % ("a message", len(buffers), "buffer frames"))
        parts = encoder.parts
        parts[0] = HEADER.pack(MAGIC, VERSION, kind, len(buffers), task_id)
    except BaseException:
        encoder.abandon()
        raise
    encoder.commit()
    frames = [b"".join(parts)] + buffers
    if stats is not None and encoder.copied:
        stats.copied_bytes += encoder.copied
    return frames


class _Encoder(ArrayWriter):
    """Appends the header body's pieces to ``parts``, buffer frames to
    ``buffers``; ``native_only``: raise EncodeError instead of pickling."""

    __slots__ = ("parts", "buffers", "copied", "native_only", "in_command", "shm", "shm_puts")

    def __init__(self, in_command: bool, shm: Any = None) -> None:
        self.parts = [b""]  # item 0 becomes the fixed header
        self.buffers = []
        self.copied = 0
        self.native_only = in_command
        self.in_command = in_command
        self.shm = shm
        self.shm_puts = 0  # arrays put in shm's slots (freed again if encoding fails)

    def value(self, obj: Any, depth: int) -> None:
        # Exact type checks: a subclass (a bool is not an int here, a user's
        # dict subclass is not a dict) must round-trip as itself, so it is
        # pickled (or, for an exception, sent as one).
        if depth > MAX_DEPTH:
            raise EncodeError(X_DEEP)
        append = self.parts.append
        t = type(obj)
        if obj is None:
            append(_NONE)
        elif obj is True:
            append(_TRUE)
        elif obj is False:
            append(_FALSE)
        elif t is int:
            if INT64_MIN <= obj <= INT64_MAX:
                append(b"i" + I64.pack(obj))
            else:
                raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                self.blob(TAG_BIGINT, raw, "a big int")
        elif t is float:
            append(b"d" + F64.pack(obj))
        elif t is str:
            raw = obj.encode("utf-8", "surrogatepass")
            try:  # (the hot types test the u32 limit the cheap way: struct's)
                append(TAG_U32.pack(TAG_STR, len(raw)))
            except struct.error:
                raise EncodeError(X_U32 % ("a str", len(raw), "bytes")) from None
            append(raw)
        elif t is bytes:
            self.blob(TAG_BYTES, obj, "bytes")
        elif t is list or t is tuple:
            try:
                append(TAG_U32.pack(TAG_LIST if t is list else TAG_TUPLE, len(obj)))
            except struct.error:
                raise EncodeError(X_U32 % ("a " + t.__name__, len(obj), "items")) from None
            value = self.value
            for item in obj:
                value(item, depth + 1)
        elif t is dict:
            try:
                append(TAG_U32.pack(TAG_DICT, len(obj)))
            except struct.error:
                raise EncodeError(X_U32 % ("a dict", len(obj), "items")) from None
            value = self.value
            for key, item in obj.items():
                value(key, depth + 1)
                value(item, depth + 1)
        elif t is np.ndarray:
            if not self.array(obj, depth):
                self.pickled(obj)
        elif t is ClusterRequest:
            append(b"R")
            self.value(obj.payload, depth + 1)
            self.value(obj.metadata, depth + 1)
        elif t is ClusterResult:
            append(b"S")
            self.value(obj.status, depth + 1)
            self.value(obj.payload, depth + 1)
            self.value(obj.request_metadata, depth + 1)
            self.value(obj.metadata, depth + 1)
            self.value(obj.exception, depth + 1)
        elif t is complex:
            append(b"j" + C128.pack(obj.real, obj.imag))
        elif isinstance(obj, BaseException):
            self.exception(obj, depth)
        elif not (isinstance(obj, np.generic) and t.__module__ == "numpy"
                  and self.scalar(obj, depth)):
            self.pickled(obj)  # no native form

    def commit(self) -> None:
        if self.shm_puts:
            self.shm.commit()

    def abandon(self) -> None:
        """Encoding failed: free the slots it took."""
        if self.shm_puts:
            self.shm.abandon()

    def blob(self, tag: int, raw: Any, what: str) -> None:
        if len(raw) > U32_MAX:
            raise EncodeError(X_U32 % (what, len(raw), "bytes"))
        self.parts.append(TAG_U32.pack(tag, len(raw)))
        self.parts.append(raw)

    def dtype(self, value: Any, depth: int) -> None:
        """Write a dtype_header value: its bytes, or a descr (strs, ints,
        lists and tuples only)."""
        if type(value) is bytes:
            if depth > MAX_DEPTH:
                raise EncodeError(X_DEEP)
            self.parts.append(value)
        else:
            self.value(value, depth)

    def scalar(self, obj: Any, depth: int) -> bool:
        """Write a numpy scalar; False when its dtype has no native form."""
        if obj.dtype.hasobject:
            return False
        # asarray: an empty str_/bytes_ scalar has dtype '<U0'/'|S0' but
        # tobytes() gives one (zero) character; the array form agrees.
        scalar = np.asarray(obj)
        value = dtype_header(scalar.dtype)
        if value is None:
            return False
        if array_bad_code_points(scalar):
            raise EncodeError(X_CODE_POINT % scalar.dtype)
        raw = scalar.tobytes()
        self.parts.append(b"g")
        self.dtype(value, depth + 1)
        self.parts.append(U32.pack(len(raw)))
        self.parts.append(raw)
        return True

    def exception(self, exc: BaseException, depth: int) -> None:
        module, qualname, args, message, tb = exception_fields(exc)
        self.parts.append(b"E")
        self.value(module, depth + 1)
        self.value(qualname, depth + 1)
        if args is None:
            self.parts.append(_NONE)
        else:
            # The args only when every one is native: else N, and the
            # receiver builds the exception from its message.
            mark = (len(self.parts), len(self.buffers), self.copied, self.native_only, self.shm)
            self.native_only = True
            self.shm = None  # (args rolled back must not hold a slot)
            try:
                self.value(list(args), depth + 1)
            except EncodeError:
                del self.parts[mark[0]:]
                del self.buffers[mark[1]:]
                self.copied = mark[2]
                self.parts.append(_NONE)
            finally:
                self.native_only = mark[3]
                self.shm = mark[4]
        self.value(message, depth + 1)
        self.value(tb, depth + 1)

    def pickled(self, obj: Any) -> None:
        if self.native_only:
            if self.in_command:
                raise EncodeError(X_COMMAND % type(obj).__name__)
            raise EncodeError(X_PICKLE % (type(obj).__name__, "it has no native encoding"))
        out_of_band: List[pickle.PickleBuffer] = []
        try:
            data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL,
                                buffer_callback=out_of_band.append)
        except Exception as exc:
            raise EncodeError(X_PICKLE % (type(obj).__name__, exc)) from exc
        self.blob(TAG_PICKLE, data, "a pickle")
        self.parts.append(U32.pack(len(out_of_band)))
        for pickle_buffer in out_of_band:
            self.parts.append(U32.pack(len(self.buffers) & U32_MAX))
            self.buffers.append(pickle_buffer.raw())


# --------------------------------------------------------------------- decode

def decode(frames: Sequence[Any], allow_pickle: bool = True,
           copy_threshold: int = COPY_THRESHOLD, alignment: Optional[int] = None,
           stats: Any = None, shm: Any = None) -> Tuple[int, int, Any]:
    """Decode the frames of one message: returns ``(kind, task_id, obj)``.

    ``frames`` are ``zmq.Frame`` objects, or anything with the buffer
    protocol (``bytes``, ``memoryview``...). Arrays of at least
    ``copy_threshold`` bytes are views on their frame's memory when the
    frame is writeable; smaller ones, and those of read-only frames, are
    copies, so every decoded array is writeable. Inline arrays (tag ``'A'``)
    are always copied out of the header. An array view whose address is not
    a multiple of its dtype's alignment, or of ``alignment`` when that is
    given, is replaced by an aligned copy, so every decoded array is
    aligned (copies too honour ``alignment``). Arrays of at least
    ``ALIGNED_BYTES`` (1 MiB) are moreover always at a multiple of 64 (and
    of ``alignment``): a view elsewhere is copied, and a split array (tag
    ``'c'``) is always assembled into one new aligned array, one memcpy per
    frame, after its frames' sizes are checked against its shape.

    ``allow_pickle`` says whether the sender is trusted: pickled values are
    refused unless it is true, and exceptions (tag ``'E'``) are rebuilt as
    their original type only when it is true (else they are
    :class:`~zmq_cluster.exceptions.RemoteError`). A COMMAND message is
    never trusted, and a pickle in one is refused. Pickles are loaded, and
    exception types imported, only once the whole message has been checked:
    a message rejected for any other reason runs none.

    Shared memory (tag ``'h'``): with ``shm`` (a SharedMemory), such an
    array is a writeable view of the sender's slot (no copy, counted 0),
    mapped on the second pass only; its drop releases the slot. Without
    ``shm``, or when the reference cannot be mapped or does not match its
    slot, the message is refused (MessageFormatError saying why).

    A message that breaks the format or its limits raises
    :class:`~zmq_cluster.exceptions.MessageFormatError`; nothing is
    allocated beyond what the frames' sizes justify.

    Copy accounting (as for ``encode``): the ``nbytes`` of every array that
    was copied rather than viewed (inline arrays; frame arrays that were
    small, misaligned or in a read-only frame; split arrays) are added to
    ``stats.copied_bytes`` once the message is decoded, not when it is
    rejected.
    """
    header, kind, task_id = _start(frames)
    decoder = _Decoder(header, frames, kind, allow_pickle, copy_threshold, alignment, False, shm)
    obj = decoder.body()
    if decoder.deferred:
        # The message holds pickles, exceptions to rebuild or shared-memory
        # arrays, and is valid: decode it again, loading them this time.
        decoder = _Decoder(header, frames, kind, allow_pickle, copy_threshold, alignment, True,
                           shm)
        obj = decoder.body()
    if task_id and (type(obj) is ClusterRequest or type(obj) is ClusterResult):
        obj.task_id = task_id
    if stats is not None and decoder.copied:
        stats.copied_bytes += decoder.copied
    return kind, task_id, obj


def _start(frames: Sequence[Any]) -> Tuple[memoryview, int, int]:
    """Check a message's fixed header: ``(header, kind, task_id)``."""
    if not frames:
        raise MessageFormatError(E_EMPTY)
    header = as_buffer(frames[0])
    if len(header) < HEADER_SIZE:
        raise MessageFormatError(E_SHORT % (len(header), HEADER_SIZE))
    magic, version, kind, nframes, task_id = HEADER.unpack_from(header, 0)
    if magic != MAGIC:
        raise MessageFormatError(E_MAGIC % (bytes(magic), MAGIC))
    if version != VERSION:
        raise MessageFormatError(E_VERSION % (version, VERSION))
    if kind not in KINDS:
        raise MessageFormatError(E_KIND % kind)
    if nframes != len(frames) - 1:
        raise MessageFormatError(E_NFRAMES % (nframes, len(frames) - 1))
    return header, kind, task_id


# Where a pickle is refused whatever allow_pickle says.
_PICKLE_OK, _PICKLE_IN_COMMAND, _PICKLE_IN_ARGS = 0, 1, 2


class _Decoder(ArrayReader, HeaderCursor):
    """Walks the header body; ``pos`` is the offset of the next byte.

    With ``load`` false, a pickle or an exception to rebuild is checked and
    counted in ``deferred`` (and read as None); with ``load`` true it is
    loaded or rebuilt. With ``top`` set, a ClusterRequest body is read as the
    tuple ``(payload, metadata)``, and ``unwrapped`` says that it was.
    """

    top = False
    unwrapped = False

    def __init__(self, header: Any, frames: Sequence[Any], kind: int, allow_pickle: bool,
                 copy_threshold: int, alignment: Optional[int], load: bool,
                 shm: Any = None) -> None:
        self.shm = shm
        self.header = header
        self.frames = frames
        self.allow_pickle = allow_pickle
        self.trusted = bool(allow_pickle) and kind != KIND_COMMAND
        self.pickle_ban = _PICKLE_IN_COMMAND if kind == KIND_COMMAND else _PICKLE_OK
        self.copy_threshold = copy_threshold
        self.alignment = alignment
        self.load = load
        self.deferred = 0
        self.pos = HEADER_SIZE
        self.used = 0
        self.copied = 0  # payload bytes copied, for decode's stats

    def body(self) -> Any:
        """The header body's value, checked to the last byte and frame."""
        try:
            obj = self.value(0)
        except MessageFormatError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            # numpy refusing what the header describes: still the peer's
            # fault, not ours.
            raise MessageFormatError(E_NUMPY % (self.pos, type(exc).__name__, exc)) from None
        if self.pos != len(self.header):
            raise MessageFormatError(E_TRAILING % (len(self.header) - self.pos, self.pos))
        if self.used != len(self.frames) - 1:
            raise MessageFormatError(E_UNREFERENCED % (len(self.frames) - 1 - self.used))
        return obj

    def u32(self, what: str) -> int:
        return U32.unpack_from(self.header, self.take(4, what))[0]

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise MessageFormatError(E_DEEP)
        header = self.header
        tag = header[self.take(1, "a value tag")]
        if tag == TAG_INT:
            return I64.unpack_from(header, self.take(8, "an int"))[0]
        if tag == TAG_STR:
            n = self.u32("a str length")
            start = self.take(n, "a str")
            try:
                return str(header[start:start + n], "utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise MessageFormatError(E_UTF8 % (start, exc)) from None
        if tag == TAG_NONE:
            return None
        if tag == TAG_FLOAT:
            return F64.unpack_from(header, self.take(8, "a float"))[0]
        if tag == TAG_LIST or tag == TAG_TUPLE:
            count = self.u32("a sequence count")
            if count > len(header) - self.pos:  # each item takes a byte at least
                raise count_error("sequence", count, 1, self.pos, len(header) - self.pos)
            items = [self.value(depth + 1) for _ in range(count)]
            return items if tag == TAG_LIST else tuple(items)
        if tag == TAG_DICT:
            count = self.u32("a dict count")
            if 2 * count > len(header) - self.pos:  # a key and an item
                raise count_error("dict", count, 2, self.pos, len(header) - self.pos)
            out = {}
            for _ in range(count):
                key_at = self.pos
                key = self.value(depth + 1)
                value = self.value(depth + 1)
                try:
                    out[key] = value
                except TypeError:
                    raise MessageFormatError(E_UNHASHABLE % key_at) from None
            return out
        if tag == TAG_INLINE_ARRAY:
            return self.inline_array(depth)
        if tag == TAG_ARRAY:
            return self.array(depth)
        if tag == TAG_SPLIT_ARRAY:
            return self.split_array(depth)
        if tag == TAG_SHM_ARRAY:
            arr, self.pos, copied = decode_shm_array(self.shm, header, self.pos, depth, self.load,
                                                     self.alignment)
            if not self.load:
                self.deferred += 1  # mapped and claimed on the second pass only
            self.copied += copied
            return arr
        if tag == TAG_TRUE:
            return True
        if tag == TAG_FALSE:
            return False
        if tag == TAG_BYTES:
            n = self.u32("a bytes length")
            start = self.take(n, "bytes")
            return bytes(header[start:start + n])
        if tag == TAG_REQUEST:
            payload = self.value(depth + 1)
            metadata = self.value(depth + 1)
            if depth == 0 and self.top:
                self.unwrapped = True
                return payload, metadata
            return ClusterRequest(payload, metadata)
        if tag == TAG_RESULT:
            fields = [self.value(depth + 1) for _ in range(5)]
            return ClusterResult(*fields)
        if tag == TAG_BIGINT:
            n = self.u32("a big int length")
            start = self.take(n, "a big int")
            return int.from_bytes(header[start:start + n], "little", signed=True)
        if tag == TAG_COMPLEX:
            real, imag = C128.unpack_from(header, self.take(16, "a complex"))
            return complex(real, imag)
        if tag == TAG_SCALAR:
            return self.scalar(depth)
        if tag == TAG_EXCEPTION:
            return self.exception(depth)
        if tag == TAG_PICKLE:
            return self.pickled()
        raise MessageFormatError(E_TAG % (chr(tag), self.pos - 1))

    def frame(self, what: str) -> memoryview:
        index = self.u32("a frame index")
        if index != self.used:
            raise MessageFormatError(E_FRAME_ORDER % (what, index, self.used))
        if index >= len(self.frames) - 1:
            raise MessageFormatError(E_FRAME_RANGE % (what, index, len(self.frames) - 1))
        self.used += 1
        return as_buffer(self.frames[index + 1])

    def dtype(self, depth: int) -> np.dtype:
        dtype, self.pos = read_dtype(self.header, self.pos, depth + 1)
        return dtype

    def scalar(self, depth: int) -> Any:
        at = self.pos - 1
        dtype = self.dtype(depth)
        n = self.u32("a scalar length")
        start = self.take(n, "a scalar")
        if n != dtype.itemsize:
            raise MessageFormatError(E_SCALAR % (dtype, n, dtype.itemsize))
        if n == 0:  # an empty str_, bytes_ or void: zeros, one item
            return np.zeros((), dtype)[()]
        data = self.header[start:start + n]
        if (dtype.kind == "U" or dtype.fields is not None) and bad_code_points(data, dtype):
            raise MessageFormatError(E_CODE_POINT % ("scalar", at, dtype))
        return np.frombuffer(data, dtype)[0]

    def exception(self, depth: int) -> Optional[BaseException]:
        at = self.pos - 1
        module = self.value(depth + 1)
        qualname = self.value(depth + 1)
        ban, self.pickle_ban = self.pickle_ban, self.pickle_ban or _PICKLE_IN_ARGS
        try:
            args = self.value(depth + 1)
        finally:
            self.pickle_ban = ban
        fields = (module, qualname, args, self.value(depth + 1), self.value(depth + 1))
        if self.trusted and not self.load:
            exception_value(fields, at, False)  # checks the fields; imports nothing
            self.deferred += 1
            return None
        return exception_value(fields, at, self.trusted)

    def pickled(self) -> Any:
        at = self.pos - 1
        if self.pickle_ban:
            raise MessageFormatError((E_PICKLE_COMMAND if self.pickle_ban == _PICKLE_IN_COMMAND
                                      else E_PICKLE_ARGS) % at)
        if not self.allow_pickle:
            raise MessageFormatError(E_PICKLE_REFUSED % at)
        n = self.u32("a pickle length")
        start = self.take(n, "pickle data")
        data = self.header[start:start + n]
        count = self.u32("a pickle buffer count")
        if 4 * count > len(self.header) - self.pos:  # a u32 frame index each
            raise count_error("pickle buffer", count, 4, self.pos, len(self.header) - self.pos)
        buffers = [self.frame("pickle at offset %d" % at) for _ in range(count)]
        if not self.load:
            self.deferred += 1
            return None
        try:
            return pickle.loads(data, buffers=buffers)
        except Exception as exc:
            raise MessageFormatError(E_PICKLE_LOAD % (at, type(exc).__name__, exc)) from None
