"""Helpers both framing twins import (neither twin imports the other).

* the wording of every MessageFormatError and EncodeError the twins raise
  (``E_*`` and ``X_*`` format strings), so that the twins cannot word a
  rejection differently;
* buffers: ``as_buffer``, ``aligned_empty``, ``assembly_buffer``, ``big_alignment``,
  ``frame_buffer``;
* dtypes: the allow-list grammar of docs/protocol.md ("dtypes"), used on
  both sides: ``dtype_value`` (encode: the header value of a dtype, or None
  when it has no native form) and ``read_dtype`` (decode: a restricted
  reader of the dtype slot, then the grammar, then numpy).

Exceptions on the wire are ``_framing_exceptions``'s, shared-memory
references ``_framing_shm``'s (both twins import those too). The compiled
twin calls these on its slow paths only (cache misses, structured dtypes,
exceptions, errors).
"""

import math
import re
import struct
import sys
import threading
from typing import Dict, List, Optional, Tuple

import numpy as np

from .exceptions import MessageFormatError
from .protocol import (
    ARRAY_ALIGNMENT, MAX_ARRAY_BYTES, MAX_DEPTH, MAX_DTYPE_FIELDS, MAX_DTYPE_NESTING, MAX_ITEMSIZE, MAX_NDIM,
    TAG_INT, TAG_LIST, TAG_STR, TAG_TUPLE, U32_MAX,
)

U8 = struct.Struct("<B")
U32 = struct.Struct("<I")
I64 = struct.Struct("<q")
U64 = struct.Struct("<Q")
F64 = struct.Struct("<d")
C128 = struct.Struct("<dd")
TAG_U32 = struct.Struct("<BI")

# ------------------------------------------------------------------ wording
# MessageFormatError texts (decode). docs/protocol.md, "What receivers
# reject", quotes them.
E_EMPTY = "empty message: no header frame"
E_SHORT = "header frame is %d bytes, shorter than the %d-byte fixed header"
E_MAGIC = "bad magic %r (expected %r): not a zmq_cluster message"
E_VERSION = "unknown wire format version %d (this build reads %d)"
E_KIND = "unknown message kind %d"
E_NFRAMES = "header announces %d buffer frames but %d arrived"
E_TRUNCATED = "header truncated: %s needs %d bytes at offset %d, %d left"
E_DEEP = "values nested deeper than %d levels" % MAX_DEPTH
E_UTF8 = "invalid UTF-8 in str at offset %d: %s"
E_TAG = "unknown value tag %r at offset %d"
E_UNHASHABLE = "unhashable dict key at offset %d"
E_FRAME_ORDER = "%s refers to buffer frame %d; frame %d was expected next"
E_FRAME_RANGE = "%s refers to buffer frame %d of %d"
E_ORDER = "array at offset %d has order %r, expected 'C' or 'F'"
E_NDIM = "array at offset %%d has %%d dimensions, more than the %d allowed" % MAX_NDIM
E_ITEMSIZE0 = "array at offset %d has dtype %s of item size 0: an array needs bytes per item"
E_TOO_BIG = ("array at offset %%d of shape %%s and dtype %%s is beyond the size limit "
             "(%d bytes, counting non-zero dimensions)" % MAX_ARRAY_BYTES)
E_FRAME_SIZE = "array at offset %d is %s %s (%d bytes) but its frame has %d bytes"
E_SPLIT_COUNT = "split array at offset %d has 0 buffer frames: it needs at least 1"
E_SPLIT_SIZE = "split array at offset %d is %s %s (%d bytes) but its %d frames hold %d bytes"
E_SCALAR = "scalar of dtype %s has %d bytes, expected %d"
E_CODE_POINT = "%s at offset %d holds a character beyond U+10FFFF (dtype %s)"
E_PICKLE_REFUSED = "pickled value at offset %d refused: pickle is not allowed from this peer"
E_PICKLE_COMMAND = "pickled value at offset %d in a COMMAND message: commands never carry pickle"
E_PICKLE_ARGS = ("pickled value at offset %d in an exception's args: exception args are "
                 "native values only")
E_PICKLE_LOAD = "pickled value at offset %d does not load: %s: %s"
E_EXCEPTION = "exception at offset %d: its %s must be %s, not %s"
E_TRAILING = "%d unexpected bytes after the value at offset %d of the header"
E_UNREFERENCED = "%d buffer frames are not referenced by the header"
E_NUMPY = "malformed value in the header (at offset %d): %s: %s"
E_BAD_DTYPE = "bad dtype %sat offset %d: %s"

# EncodeError texts (encode).
X_DEEP = ("cannot encode values nested deeper than %d levels (MAX_DEPTH): receivers "
          "reject them" % MAX_DEPTH)
X_U32 = "cannot encode %%s of %%d %%s: the format's u32 field holds at most %d" % U32_MAX
X_PICKLE = "cannot encode %s object: %s"
X_CODE_POINT = ("cannot encode an array or scalar of dtype %s holding a character beyond "
                "U+10FFFF: no numpy can read it")
X_COMMAND = ("cannot encode %s object in a COMMAND message: it has no native encoding, and "
             "commands never carry pickle")


def truncated(what, n, at, left):
    """The MessageFormatError for ``n`` bytes of ``what`` wanted at ``at``."""
    return MessageFormatError(E_TRUNCATED % (what, n, at, left))


def count_error(what, count, per_item, at, left):
    """The MessageFormatError for a ``what`` of ``count`` items, each at
    least ``per_item`` bytes, that cannot fit in the ``left`` bytes at ``at``."""
    return truncated("a %s of %d items" % (what, count), count * per_item, at, left)


# ------------------------------------------------------------------ buffers

def shape_text(shape):
    """``shape`` as error texts show it: ``3x4``, or ``scalar``."""
    return "x".join(map(str, shape)) or "scalar"


def array_nbytes(at, shape, dtype):
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


def as_buffer(frame):
    """A frame's memory as a flat memoryview of bytes (format ``B``)."""
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is None:
        buf = memoryview(frame)
    return buf if buf.format == "B" else buf.cast("B")


def aligned_empty(nbytes, alignment):
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


def _refs(items, i):
    """``sys.getrefcount`` of ``items[i]``, counted the same way at
    calibration and in ``assembly_buffer`` (how a subscript and a call
    count their references differs between interpreter versions)."""
    return sys.getrefcount(items[i])


def _calibrate():
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


def assembly_buffer(nbytes, alignment):
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


def big_alignment(alignment):
    """The alignment of a received array of at least ``ALIGNED_BYTES``:
    ``alignment`` (the one asked for, or the dtype's) and ARRAY_ALIGNMENT
    both divide it."""
    if alignment % ARRAY_ALIGNMENT == 0:
        return alignment
    return math.lcm(int(alignment), ARRAY_ALIGNMENT)


def frame_buffer(arr):
    """The bytes of a C- or Fortran-contiguous array as a flat uint8 array.

    This is a view, never a copy; it exports the buffer protocol even for
    dtypes that cannot (datetime64, structured), and keeps ``arr`` alive.
    """
    return arr.reshape(-1, order="A").view(np.uint8)


# ------------------------------------------------------------------ dtypes

class _BadDtype(Exception):
    """A dtype outside the grammar; the text says why."""


_NUMBER_SIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8, 16),
                 "c": (8, 16, 32)}
_DATETIME_UNITS = frozenset("Y M W D h m s ms us ns ps fs as".split())
_TYPESTR = re.compile(r"([0-9]*)(.*)\Z", re.S)
_UNIT = re.compile(r"\[([1-9][0-9]{0,9})?([A-Za-z]+)\]\Z")
_LONGEST_TYPESTR = 40


def typestr_itemsize(s):
    """The item size of the type string ``s``; raises _BadDtype when ``s``
    is outside the grammar of docs/protocol.md ("dtypes")."""
    if len(s) > _LONGEST_TYPESTR:
        raise _BadDtype("a type string has at most %d characters" % _LONGEST_TYPESTR)
    if len(s) < 2 or s[0] not in "<>|":
        raise _BadDtype("a type string is a byte order ('<', '>' or '|'), a kind and an "
                        "item size")
    order, kind = s[0], s[1]
    if kind == "O":
        raise _BadDtype("it holds Python objects (such arrays travel pickled)")
    if kind not in "b?iufcmMSUV":
        raise _BadDtype("unknown kind %r (expected one of b ? i u f c m M S U V)" % kind)
    if kind == "?":
        if len(s) != 2:
            raise _BadDtype("kind '?' takes no item size")
        return 1
    digits, rest = _TYPESTR.match(s, 2).groups()
    if not digits or (len(digits) > 1 and digits[0] == "0") or len(digits) > 10:
        raise _BadDtype("kind %r needs an item size in decimal digits" % kind)
    n = int(digits)
    if kind in "mM":
        if n != 8:
            raise _BadDtype("a datetime or timedelta has item size 8")
        if rest:
            unit = _UNIT.match(rest)
            if (unit is None or unit.group(2) not in _DATETIME_UNITS
                    or int(unit.group(1) or 1) > MAX_ITEMSIZE):
                raise _BadDtype("datetime unit %r is not [unit] or [Nunit] with N a positive "
                                "integer below 2**31 and unit one of Y M W D h m s ms us ns "
                                "ps fs as" % rest)
    elif rest:
        raise _BadDtype("unexpected %r after the item size" % rest)
    if kind in _NUMBER_SIZES and n not in _NUMBER_SIZES[kind]:
        raise _BadDtype("item size %d is not valid for kind %r (expected %s)" % (
            n, kind, " or ".join(map(str, _NUMBER_SIZES[kind]))))
    size = 4 * n if kind == "U" else n
    if size > MAX_ITEMSIZE:
        raise _BadDtype("item size %d is more than %d bytes" % (size, MAX_ITEMSIZE))
    if order == "|" and size > 1 and kind not in "SV":
        raise _BadDtype("byte order '|' is ambiguous for a type of %d bytes: use '<' or '>'"
                        % size)
    return size


def _descr_itemsize(descr, nesting, fields):
    """The item size of the descr list ``descr``; raises _BadDtype when it
    is outside the grammar. ``fields`` is a one-item list counting fields."""
    if nesting > MAX_DTYPE_NESTING:
        raise _BadDtype("structured dtypes nested more than %d levels" % MAX_DTYPE_NESTING)
    total = 0
    for field in descr:
        fields[0] += 1
        if fields[0] > MAX_DTYPE_FIELDS:
            raise _BadDtype("more than %d fields" % MAX_DTYPE_FIELDS)
        if type(field) is not tuple or not 2 <= len(field) <= 3:
            raise _BadDtype("a field is a tuple (name, type) or (name, type, shape)")
        name, ftype = field[0], field[1]
        if not (type(name) is str or (type(name) is tuple and len(name) == 2
                                      and type(name[0]) is str and type(name[1]) is str)):
            raise _BadDtype("a field's name is a str or a (title, name) tuple of strs")
        if type(ftype) is str:
            try:
                size = typestr_itemsize(ftype)
            except _BadDtype as exc:
                raise _BadDtype("field %s: type %s: %s" % (_short(name), _short(ftype), exc))
        elif type(ftype) is list:
            size = _descr_itemsize(ftype, nesting + 1, fields)
        else:
            raise _BadDtype("a field's type is a type string or a descr list")
        if len(field) == 3:
            shape = field[2]
            if (type(shape) is not tuple or len(shape) > MAX_NDIM
                    or not all(type(dim) is int and 0 <= dim <= MAX_ITEMSIZE
                               for dim in shape)):
                raise _BadDtype("a field's shape is a tuple of at most %d ints in [0, 2**31)"
                                % MAX_NDIM)
            for dim in shape:
                size *= dim
        total += size
    if total > MAX_ITEMSIZE:
        raise _BadDtype("an item of more than %d bytes" % MAX_ITEMSIZE)
    return total


_VALUE_OF_DTYPE: Dict[np.dtype, Optional[str]] = {}  # simple dtype -> its type string or None
_DTYPE_OF_STR: Dict[str, np.dtype] = {}  # type string -> dtype
_CACHE_MAX = 512


def dtype_value(dtype):
    """The header value of ``dtype`` (its type string, or for a structured
    dtype its descr list), or None when the grammar has no place for it
    (object fields, a kind outside the grammar, limits): such arrays and
    scalars are pickled."""
    if dtype.fields is None:
        try:
            return _VALUE_OF_DTYPE[dtype]
        except KeyError:
            pass
        value = dtype.str
        try:
            typestr_itemsize(value)
        except _BadDtype:
            value = None
        if dtype.subdtype is not None:
            value = None
        if len(_VALUE_OF_DTYPE) >= _CACHE_MAX:
            _VALUE_OF_DTYPE.clear()
        _VALUE_OF_DTYPE[dtype] = value
        return value
    # Structured: never cached (its names can be reassigned in place).
    if dtype.hasobject:
        return None
    try:
        descr = np.lib.format.dtype_to_descr(dtype)
        _descr_itemsize(descr, 1, [0])
    except Exception:  # overlapping fields, a title that is not a str, limits...
        return None
    return descr


# dtype -> None, or (a dtype viewing its 'U' items as u4, the paths to them)
_CODE_POINT_PLANS: Dict[np.dtype, Optional[Tuple[np.dtype, List[Tuple[str, ...]]]]] = {}


def bad_code_points(data, dtype):
    """Whether the bytes ``data`` (a whole number of items of ``dtype``)
    hold, in a 'U' item, a code point beyond U+10FFFF: numpy cannot make a
    str of such an item (it raises SystemError), so no array may hold one."""
    try:
        plan = _CODE_POINT_PLANS[dtype]
    except KeyError:
        plan = _code_point_plan(dtype)
        if len(_CODE_POINT_PLANS) >= _CACHE_MAX:
            _CODE_POINT_PLANS.clear()
        _CODE_POINT_PLANS[dtype] = plan
    if plan is None or dtype.itemsize == 0:
        return False
    view_dtype, paths = plan
    values = np.frombuffer(data, view_dtype)
    for path in paths:
        leaf = values
        for name in path:
            leaf = leaf[name]
        if leaf.size and leaf.max() > 0x10FFFF:
            return True
    return False


def array_bad_code_points(arr):
    """bad_code_points for the items of an array (encode's check)."""
    dtype = arr.dtype
    if dtype.kind != "U" and dtype.fields is None:
        return False
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        arr = np.ascontiguousarray(arr)
    return bad_code_points(frame_buffer(arr), dtype)


def _code_point_plan(dtype):
    paths = []
    view_dtype = _code_point_dtype(dtype, (), paths)
    return (view_dtype, paths) if paths else None


def _code_point_dtype(dtype, path, paths):
    """``dtype`` with each 'U' item replaced by as many u4 of the same byte
    order (same offsets and size); appends the fields' paths to ``paths``."""
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return np.dtype((_code_point_dtype(base, path, paths), shape))
    if dtype.fields is None:
        if dtype.kind != "U":
            return dtype
        paths.append(path)
        return np.dtype((dtype.byteorder.replace("|", "=") + "u4", (dtype.itemsize // 4,)))
    names = dtype.names
    formats = [_code_point_dtype(dtype.fields[name][0], path + (name,), paths)
               for name in names]
    return np.dtype({"names": list(names), "formats": formats,
                     "offsets": [dtype.fields[name][1] for name in names],
                     "itemsize": dtype.itemsize})


_HEADER_OF_DTYPE: Dict[np.dtype, Optional[bytes]] = {}  # simple dtype -> its header value


def dtype_header(dtype):
    """``dtype_value``, but for a dtype without fields the bytes of its
    value as the header holds it (``s``, length, type string): cached."""
    if dtype.fields is not None:
        return dtype_value(dtype)
    try:
        return _HEADER_OF_DTYPE[dtype]
    except KeyError:
        pass
    value = dtype_value(dtype)
    if value is not None:
        raw = value.encode()
        value = TAG_U32.pack(TAG_STR, len(raw)) + raw
    if len(_HEADER_OF_DTYPE) >= _CACHE_MAX:
        _HEADER_OF_DTYPE.clear()
    _HEADER_OF_DTYPE[dtype] = value
    return value


_ARRAY_DTYPE: Dict[np.dtype, Optional[Tuple[bytes, bool]]] = {}  # simple dtype -> entry


def array_dtype_header(dtype):
    """For an array of ``dtype``: None when it has no native form (no
    dtype_header, or item size 0), else ``(dtype_header(dtype), whether its
    items may hold text to check with bad_code_points)``. Cached for dtypes
    without fields."""
    if dtype.fields is not None:
        value = dtype_value(dtype)
        return None if value is None or dtype.itemsize == 0 else (value, True)
    try:
        return _ARRAY_DTYPE[dtype]
    except KeyError:
        pass
    value = dtype_header(dtype)
    entry = None if value is None or dtype.itemsize == 0 else (value, dtype.kind == "U")
    if len(_ARRAY_DTYPE) >= _CACHE_MAX:
        _ARRAY_DTYPE.clear()
    _ARRAY_DTYPE[dtype] = entry
    return entry


def _short(s):
    """repr(s) of a str or a (title, name) pair, cut short."""
    text = repr(s)
    return text if len(text) <= _LONGEST_TYPESTR else text[:_LONGEST_TYPESTR] + "..."


def dtype_of_str(s, at):
    """The dtype of the type string ``s`` read at offset ``at``."""
    dtype = _DTYPE_OF_STR.get(s)
    if dtype is not None:
        return dtype
    try:
        typestr_itemsize(s)
    except _BadDtype as exc:
        raise MessageFormatError(E_BAD_DTYPE % (_short(s) + " ", at, exc)) from None
    try:
        dtype = np.dtype(s)
    except Exception as exc:  # a size this platform lacks ('<f16' on some)
        raise MessageFormatError(E_BAD_DTYPE % (_short(s) + " ", at, "numpy refuses it: %s: %s"
                                                % (type(exc).__name__, exc))) from None
    if len(_DTYPE_OF_STR) >= _CACHE_MAX:
        _DTYPE_OF_STR.clear()
    _DTYPE_OF_STR[s] = dtype
    return dtype


def dtype_of_descr(descr, at):
    """The structured dtype of the descr list ``descr`` read at ``at``."""
    try:
        _descr_itemsize(descr, 1, [0])
    except _BadDtype as exc:
        raise MessageFormatError(E_BAD_DTYPE % ("", at, exc)) from None
    try:
        return np.lib.format.descr_to_dtype(descr)
    except Exception as exc:  # two fields of one name...
        raise MessageFormatError(E_BAD_DTYPE % ("", at, "numpy refuses it: %s: %s"
                                                % (type(exc).__name__, exc))) from None


def read_dtype(header, pos, depth):
    """Read the dtype value at ``pos`` of ``header`` (a bytes-like object),
    a value at nesting ``depth``: returns ``(dtype, end)``.

    A restricted reader: a dtype value holds only strs, lists, tuples and
    ints (no pickle, no other tag), its lists and tuples at most
    MAX_DTYPE_FIELDS items; then the grammar; only then numpy.
    """
    size = len(header)
    if depth <= MAX_DEPTH and pos + 5 <= size and header[pos] == TAG_STR:
        # The hot case: a type string read before, by its bytes.
        end = pos + 5 + U32.unpack_from(header, pos + 1)[0]
        if end <= size:
            dtype = _DTYPE_OF_RAW.get(bytes(header[pos + 5:end]))
            if dtype is not None:
                return dtype, end
    reader = _DtypeReader(header, pos)
    value = reader.value(depth, True)
    if type(value) is str:
        dtype = dtype_of_str(value, pos)
        if len(_DTYPE_OF_RAW) >= _CACHE_MAX:
            _DTYPE_OF_RAW.clear()
        _DTYPE_OF_RAW[bytes(header[pos + 5:reader.pos])] = dtype
        return dtype, reader.pos
    return dtype_of_descr(value, pos), reader.pos


_DTYPE_OF_RAW: Dict[bytes, np.dtype] = {}  # UTF-8 of a type string -> its dtype


class _DtypeReader:
    __slots__ = ("header", "pos", "at")

    def __init__(self, header, pos):
        self.header = header
        self.pos = pos
        self.at = pos

    def take(self, n, what):
        start = self.pos
        left = len(self.header) - start
        if n > left:
            raise truncated(what, n, start, left)
        self.pos = start + n
        return start

    def value(self, depth, top=False):
        if depth > MAX_DEPTH:
            raise MessageFormatError(E_DEEP)
        header = self.header
        tag = header[self.take(1, "a value tag")]
        if tag == TAG_STR:
            n = U32.unpack_from(header, self.take(4, "a str length"))[0]
            start = self.take(n, "a str")
            try:
                return str(header[start:start + n], "utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise MessageFormatError(E_UTF8 % (start, exc)) from None
        if top and tag != TAG_LIST:
            raise MessageFormatError(E_BAD_DTYPE % (
                "", self.at, "a dtype is a type string (tag 's') or a descr list (tag 'l'), "
                "not tag %r" % chr(tag)))
        if tag == TAG_LIST or tag == TAG_TUPLE:
            count = U32.unpack_from(header, self.take(4, "a sequence count"))[0]
            if count > MAX_DTYPE_FIELDS:
                raise MessageFormatError(E_BAD_DTYPE % (
                    "", self.at, "a list or tuple of %d items (a dtype has at most %d fields)"
                    % (count, MAX_DTYPE_FIELDS)))
            left = len(header) - self.pos
            if count > left:
                raise count_error("sequence", count, 1, self.pos, left)
            items = [self.value(depth + 1) for _ in range(count)]
            return items if tag == TAG_LIST else tuple(items)
        if tag == TAG_INT:
            return I64.unpack_from(header, self.take(8, "an int"))[0]
        raise MessageFormatError(E_BAD_DTYPE % (
            "", self.at, "a dtype holds only strs, lists, tuples and ints, not tag %r (at "
            "offset %d)" % (chr(tag), self.pos - 1)))
