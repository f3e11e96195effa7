"""dtypes on the wire, in one module both framing twins import: the
allow-list grammar of docs/protocol.md ("dtypes"), used on both sides.

* encode: ``dtype_value`` (the header value of a dtype, or None when it has
  no native form), ``dtype_header`` and ``array_dtype_header`` (the same,
  as header bytes, cached), ``array_bad_code_points``;
* decode: ``read_dtype`` (a restricted reader of the dtype slot, then the
  grammar, then numpy), ``bad_code_points``.

The compiled twin calls these on its slow paths only (cache misses,
structured dtypes, errors).
"""

import re
from typing import Any, Dict, List, Match, Optional, Tuple, Union, cast

import numpy as np

from ._framing_buffers import frame_buffer
from ._framing_errors import E_BAD_DTYPE, E_DEEP, E_UTF8, count_error, truncated
from .exceptions import MessageFormatError
from .protocol import (
    I64, MAX_DEPTH, MAX_DTYPE_FIELDS, MAX_DTYPE_NESTING, MAX_ITEMSIZE, MAX_NDIM, TAG_INT,
    TAG_LIST, TAG_STR, TAG_TUPLE, TAG_U32, U32,
)



class _BadDtype(Exception):
    """A dtype outside the grammar; the text says why."""


_NUMBER_SIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8, 16),
                 "c": (8, 16, 32)}
_DATETIME_UNITS = frozenset("Y M W D h m s ms us ns ps fs as".split())
_TYPESTR = re.compile(r"([0-9]*)(.*)\Z", re.S)
_UNIT = re.compile(r"\[([1-9][0-9]{0,9})?([A-Za-z]+)\]\Z")
_LONGEST_TYPESTR = 40


def typestr_itemsize(s: str) -> int:
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
    digits, rest = cast(Match[str], _TYPESTR.match(s, 2)).groups()  # (it always matches)
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


def _descr_itemsize(descr: List[Any], nesting: int, fields: List[int]) -> int:
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


def dtype_value(dtype: np.dtype) -> Union[str, List[Any], None]:
    """The header value of ``dtype`` (its type string, or for a structured
    dtype its descr list), or None when the grammar has no place for it
    (object fields, a kind outside the grammar, limits): such arrays and
    scalars are pickled."""
    if dtype.fields is None:
        try:
            return _VALUE_OF_DTYPE[dtype]
        except KeyError:
            pass
        value: Optional[str] = dtype.str
        try:
            typestr_itemsize(dtype.str)
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
_Plan = Tuple[np.dtype, List[Tuple[str, ...]]]
_CODE_POINT_PLANS: Dict[np.dtype, Optional[_Plan]] = {}


def bad_code_points(data: Any, dtype: np.dtype) -> bool:
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


def array_bad_code_points(arr: np.ndarray) -> bool:
    """bad_code_points for the items of an array (encode's check)."""
    dtype = arr.dtype
    if dtype.kind != "U" and dtype.fields is None:
        return False
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        arr = np.ascontiguousarray(arr)
    return bad_code_points(frame_buffer(arr), dtype)


def _code_point_plan(dtype: np.dtype) -> Optional[_Plan]:
    paths: List[Tuple[str, ...]] = []
    view_dtype = _code_point_dtype(dtype, (), paths)
    return (view_dtype, paths) if paths else None


def _code_point_dtype(dtype: np.dtype, path: Tuple[str, ...],
                      paths: List[Tuple[str, ...]]) -> np.dtype:
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
    names = cast(Tuple[str, ...], dtype.names)
    formats = [_code_point_dtype(dtype.fields[name][0], path + (name,), paths)
               for name in names]
    spec: Any = {"names": list(names), "formats": formats,
                 "offsets": [dtype.fields[name][1] for name in names], "itemsize": dtype.itemsize}
    return np.dtype(spec)


_HEADER_OF_DTYPE: Dict[np.dtype, Optional[bytes]] = {}  # simple dtype -> its header value


def dtype_header(dtype: np.dtype) -> Union[bytes, List[Any], None]:
    """``dtype_value``, but for a dtype without fields the bytes of its
    value as the header holds it (``s``, length, type string): cached."""
    if dtype.fields is not None:
        return cast(Optional[List[Any]], dtype_value(dtype))  # (a descr list or None)
    try:
        return _HEADER_OF_DTYPE[dtype]
    except KeyError:
        pass
    value = cast(Optional[str], dtype_value(dtype))  # (no fields: a type string or None)
    header = None
    if value is not None:
        raw = value.encode()
        header = TAG_U32.pack(TAG_STR, len(raw)) + raw
    if len(_HEADER_OF_DTYPE) >= _CACHE_MAX:
        _HEADER_OF_DTYPE.clear()
    _HEADER_OF_DTYPE[dtype] = header
    return header


_ARRAY_DTYPE: Dict[np.dtype, Optional[Tuple[Any, bool]]] = {}  # simple dtype -> entry


def array_dtype_header(dtype: np.dtype) -> Optional[Tuple[Any, bool]]:
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
    header = dtype_header(dtype)
    entry = None if header is None or dtype.itemsize == 0 else (header, dtype.kind == "U")
    if len(_ARRAY_DTYPE) >= _CACHE_MAX:
        _ARRAY_DTYPE.clear()
    _ARRAY_DTYPE[dtype] = entry
    return entry


def _short(s: Any) -> str:
    """repr(s) of a str or a (title, name) pair, cut short."""
    text = repr(s)
    return text if len(text) <= _LONGEST_TYPESTR else text[:_LONGEST_TYPESTR] + "..."


def dtype_of_str(s: str, at: int) -> np.dtype:
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


def dtype_of_descr(descr: List[Any], at: int) -> np.dtype:
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


def read_dtype(header: Any, pos: int, depth: int) -> Tuple[np.dtype, int]:
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


class HeaderCursor:
    """A position ``pos`` in a header frame ``header``, read forward: the
    dtype reader here and the pure twin's decoder."""

    header: Any
    pos: int

    def take(self, n: int, what: str) -> int:
        """The offset of the next ``n`` bytes (``what``, for the error),
        now taken; MessageFormatError when fewer are left."""
        start = self.pos
        left = len(self.header) - start
        if n > left:
            raise truncated(what, n, start, left)
        self.pos = start + n
        return start


class _DtypeReader(HeaderCursor):
    __slots__ = ("header", "pos", "at")

    def __init__(self, header: Any, pos: int) -> None:
        self.header = header
        self.pos = pos
        self.at = pos

    def value(self, depth: int, top: bool = False) -> Any:
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

