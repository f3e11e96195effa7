# Dtype values, both directions, and their caches. Part of framing.pyx
# (included there). The grammar itself, and every cache miss, is
# zmq_cluster._framing_dtypes's (dtype_value, read_dtype): the pure twin
# runs the same code, so both accept and refuse the same dtypes.

# Encode: id(dtype) -> (dtype, the bytes of its header value, or None when
# it has no native form). The entry keeps its dtype alive, so an id is never
# reused while cached. Structured dtypes are not cached: their names can be
# reassigned in place.
cdef dict _dtype_bytes = {}


cdef object _dtype_header(cnp.dtype dtype):
    """What to write for ``dtype``: the bytes of its str value, its descr
    list (structured), or None when it has no native form."""
    if cnp.PyDataType_HASFIELDS(dtype):
        return _dtype_value(dtype)
    key = PyLong_FromVoidPtr(<void*>dtype)
    entry = _dtype_bytes.get(key)
    if entry is not None and (<tuple>entry)[0] is dtype:
        return (<tuple>entry)[1]
    value = _dtype_value(dtype)
    if value is not None:
        sb = (<str>value).encode()
        value = _TAG_U32.pack(T_STR, len(sb)) + sb  # as _enc writes a str
    if len(_dtype_bytes) >= _CACHE_MAX:
        _dtype_bytes.clear()
    _dtype_bytes[key] = (dtype, value)
    return value


cdef int _put_dtype(Writer* w, object value, list bufs, int depth) except -1:
    """Write a dtype value (from _dtype_header) at nesting ``depth``."""
    if type(value) is bytes:
        if depth > _MAX_DEPTH:
            raise _EncodeError(X_DEEP)
        return _put_raw(w, <bytes>value)
    return _enc(w, value, bufs, depth)  # a descr: lists, tuples, strs, ints


# Decode: the last few str dtype values decoded, by their header bytes ('s',
# u32 length, the str's bytes): the hot path of decoding an array's dtype,
# without making a str. Each entry holds a reference to its dtype (in
# _RAW_OWNERS). Only values that passed the grammar get here.
cdef enum:
    _RAW_SLOTS = 4
    _RAW_MAX = 24          # longest cached value: tag, length and 19 bytes

cdef struct RawDtype:
    Py_ssize_t n           # bytes in raw; 0 = empty slot
    unsigned char raw[_RAW_MAX]
    PyObject* dtype        # borrowed from _RAW_OWNERS

cdef RawDtype _raw_dtypes[_RAW_SLOTS]
cdef int _raw_next = 0
cdef list _RAW_OWNERS = [None] * _RAW_SLOTS


cdef cnp.dtype _dtype(Dec* d, int depth):
    """The dtype value at ``d.pos``, of an array or scalar at ``depth``."""
    cdef Py_ssize_t at = d.pos
    cdef Py_ssize_t n, i
    cdef RawDtype* slot
    # Fast path: a str dtype value seen lately (the nesting check still
    # applies: the value is one level deeper).
    if depth < _MAX_DEPTH and d.n - at >= 5 and d.p[at] == T_STR:
        n = 5 + <Py_ssize_t>zc_get_u32(d.p + at + 1)
        if n <= _RAW_MAX and n <= d.n - at:
            for i in range(_RAW_SLOTS):
                slot = &_raw_dtypes[i]
                if slot.n == n and memcmp(slot.raw, d.p + at, n) == 0:
                    d.pos = at + n
                    return <cnp.dtype>slot.dtype
    # The restricted reader, the grammar and numpy, as in the pure twin.
    dtype, end = _read_dtype(memoryview(_header_obj(d)), at, depth + 1)
    d.pos = end
    if d.p[at] == T_STR:
        _remember_raw(d, at, dtype)
    return <cnp.dtype>dtype


cdef void _remember_raw(Dec* d, Py_ssize_t at, object dtype):
    """Put the str dtype value at ``at`` (just decoded) in _raw_dtypes."""
    global _raw_next
    cdef Py_ssize_t n = d.pos - at
    cdef RawDtype* slot
    if n > _RAW_MAX:
        return
    slot = &_raw_dtypes[_raw_next]
    slot.n = 0  # empty while its old dtype may be released
    _RAW_OWNERS[_raw_next] = dtype
    memcpy(slot.raw, d.p + at, n)
    slot.n = n
    slot.dtype = <PyObject*>dtype
    _raw_next = (_raw_next + 1) % _RAW_SLOTS
