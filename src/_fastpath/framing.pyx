# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Compiled twin of the message framing (see docs/protocol.md).

Same functions, behaviour, exceptions and bytes as the pure-Python twin,
``zmq_cluster._framing_py``: read that module for the contract. The wire
constants, exceptions and records come from the pure-Python modules
(``zmq_cluster.protocol``...), never from here.

Encode writes the header into one C buffer (on the stack while it is small)
with direct little-endian stores, dispatching on the exact type of each value
in C. Decode walks the header as a ``const unsigned char*`` with a bounds
check before every read; a ``zmq.Frame`` is read through its ``zmq_msg_t``
without making a memoryview. Rare values (pickled objects, numpy scalars,
structured dtypes, odd arguments) go through the same numpy/pickle calls as
the pure-Python twin, so their bytes and errors match too.
"""

from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.list cimport PyList_New, PyList_SET_ITEM, PyList_GET_SIZE, PyList_GET_ITEM
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM, PyTuple_GET_SIZE, PyTuple_GET_ITEM
from cpython.dict cimport PyDict_Next, PyDict_Size, PyDict_SetItem
from cpython.long cimport (
    PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong, PyLong_FromLongLong,
    PyLong_FromUnsignedLongLong, PyLong_FromVoidPtr,
)
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_FromDouble
from cpython.complex cimport PyComplex_FromDoubles
from libc.stdint cimport uint32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcpy, memcmp
from libc.stdlib cimport malloc, realloc, free
from libc.limits cimport LLONG_MAX, LLONG_MIN

cimport numpy as cnp
from zmq cimport Frame, libzmq

import pickle

import numpy as np

from zmq_cluster import _framing_py
from zmq_cluster.exceptions import MessageFormatError
from zmq_cluster.messages import ClusterRequest, ClusterResult
from zmq_cluster.protocol import (
    COPY_THRESHOLD, HEADER, HEADER_SIZE, INLINE_LIMIT, INT64_MAX, INT64_MIN, KINDS, MAGIC,
    MAX_DEPTH, ORDER_C, ORDER_F, PICKLE_PROTOCOL, TAG_ARRAY, TAG_BIGINT, TAG_BYTES,
    TAG_COMPLEX, TAG_DICT, TAG_FALSE, TAG_FLOAT, TAG_INLINE_ARRAY, TAG_INT, TAG_LIST,
    TAG_NONE, TAG_PICKLE, TAG_REQUEST, TAG_RESULT, TAG_SCALAR, TAG_STR, TAG_TRUE, TAG_TUPLE,
    VERSION,
)

__all__ = ["encode", "decode", "frame_buffer"]

cnp.import_array()


cdef extern from "Python.h":
    int Py_EnterRecursiveCall(const char* where)  # non-zero, exception set, when too deep
    void Py_LeaveRecursiveCall()
    double PyComplex_RealAsDouble(object op) except? -1.0
    double PyComplex_ImagAsDouble(object op) except? -1.0


cdef extern from "numpy/arrayobject.h":
    object _new_from_descr "PyArray_NewFromDescr" (
        PyTypeObject* subtype, cnp.PyArray_Descr* descr, int nd, cnp.npy_intp* dims,
        cnp.npy_intp* strides, void* data, int flags, PyObject* obj)
    bint _dtype_flagchk "PyDataType_FLAGCHK" (cnp.dtype dtype, int flag)
    int NPY_ITEM_HASOBJECT
    cnp.npy_intp NPY_MAX_INTP


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #define ZC_U32_MAX ((Py_ssize_t)0xFFFFFFFF)
    static CYTHON_INLINE void zc_put_u32(unsigned char *p, uint32_t v) {
        p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
        p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
    }
    static CYTHON_INLINE void zc_put_u64(unsigned char *p, uint64_t v) {
        zc_put_u32(p, (uint32_t)v); zc_put_u32(p + 4, (uint32_t)(v >> 32));
    }
    static CYTHON_INLINE uint32_t zc_get_u32(const unsigned char *p) {
        return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16)
               | ((uint32_t)p[3] << 24);
    }
    static CYTHON_INLINE uint64_t zc_get_u64(const unsigned char *p) {
        return (uint64_t)zc_get_u32(p) | ((uint64_t)zc_get_u32(p + 4) << 32);
    }
    static CYTHON_INLINE uint64_t zc_double_bits(double d) {
        uint64_t u; memcpy(&u, &d, 8); return u;
    }
    static CYTHON_INLINE double zc_bits_double(uint64_t u) {
        double d; memcpy(&d, &u, 8); return d;
    }
    /* The bytes of an ASCII str (its UTF-8 form), or NULL when it is not
       pure ASCII: the caller then encodes it the slow way. */
    static CYTHON_INLINE const char *zc_ascii(PyObject *s, Py_ssize_t *n) {
    #if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(s) < 0) { PyErr_Clear(); return NULL; }
    #endif
        if (!PyUnicode_IS_ASCII(s)) return NULL;
        *n = PyUnicode_GET_LENGTH(s);
        return (const char *)PyUnicode_DATA(s);
    }
    """
    void zc_put_u32(unsigned char* p, uint32_t v)
    void zc_put_u64(unsigned char* p, uint64_t v)
    uint32_t zc_get_u32(const unsigned char* p)
    uint64_t zc_get_u64(const unsigned char* p)
    uint64_t zc_double_bits(double d)
    double zc_bits_double(uint64_t u)
    const char* zc_ascii(object s, Py_ssize_t* n)
    Py_ssize_t _U32_MAX "ZC_U32_MAX"
    object _decode_utf8 "PyUnicode_DecodeUTF8" (const char* s, Py_ssize_t size,
                                                  const char* errors)


# ------------------------------------------------------------ shared constants
# Everything below is read from zmq_cluster.protocol at import; the C code
# only hard-codes the fixed-header layout, checked here against HEADER.

if (HEADER.format != "<2sBBIQ" or HEADER_SIZE != 16 or len(MAGIC) != 2
        or INT64_MIN != -(1 << 63) or INT64_MAX != (1 << 63) - 1):
    raise ImportError("zmq_cluster._fastpath.framing was compiled for another fixed header "
                      "than zmq_cluster.protocol describes: rebuild the extension")

cdef enum:
    _STACK_BYTES = 512     # header bytes encoded before the first malloc
    _MAX_NDIM = 64         # numpy's NPY_MAXDIMS; more goes the slow way
    _CACHE_MAX = 512       # entries per dtype cache

cdef enum:
    C_BAD = 0
    C_NONE
    C_TRUE
    C_FALSE
    C_INT
    C_BIGINT
    C_FLOAT
    C_COMPLEX
    C_STR
    C_BYTES
    C_LIST
    C_TUPLE
    C_DICT
    C_ARRAY
    C_INLINE
    C_SCALAR
    C_REQUEST
    C_RESULT
    C_PICKLE

cdef unsigned char _CODE[256]
cdef unsigned char T_NONE = TAG_NONE, T_TRUE = TAG_TRUE, T_FALSE = TAG_FALSE
cdef unsigned char T_INT = TAG_INT, T_BIGINT = TAG_BIGINT, T_FLOAT = TAG_FLOAT
cdef unsigned char T_COMPLEX = TAG_COMPLEX, T_STR = TAG_STR, T_BYTES = TAG_BYTES
cdef unsigned char T_LIST = TAG_LIST, T_TUPLE = TAG_TUPLE, T_DICT = TAG_DICT
cdef unsigned char T_ARRAY = TAG_ARRAY, T_SCALAR = TAG_SCALAR, T_REQUEST = TAG_REQUEST
cdef unsigned char T_RESULT = TAG_RESULT, T_PICKLE = TAG_PICKLE, T_INLINE = TAG_INLINE_ARRAY
cdef unsigned char O_C = ORDER_C, O_F = ORDER_F
cdef unsigned char M0 = MAGIC[0], M1 = MAGIC[1]
cdef unsigned char V_VERSION = VERSION
cdef int _MAX_DEPTH = MAX_DEPTH
cdef Py_ssize_t _INLINE_LIMIT = INLINE_LIMIT


def _init_codes():
    pairs = [(TAG_NONE, C_NONE), (TAG_TRUE, C_TRUE), (TAG_FALSE, C_FALSE), (TAG_INT, C_INT),
             (TAG_BIGINT, C_BIGINT), (TAG_FLOAT, C_FLOAT), (TAG_COMPLEX, C_COMPLEX),
             (TAG_STR, C_STR), (TAG_BYTES, C_BYTES), (TAG_LIST, C_LIST),
             (TAG_TUPLE, C_TUPLE), (TAG_DICT, C_DICT), (TAG_ARRAY, C_ARRAY),
             (TAG_INLINE_ARRAY, C_INLINE), (TAG_SCALAR, C_SCALAR), (TAG_REQUEST, C_REQUEST), (TAG_RESULT, C_RESULT),
             (TAG_PICKLE, C_PICKLE)]
    if len({tag for tag, _ in pairs}) != len(pairs):
        raise ImportError("zmq_cluster.protocol has two value tags with the same byte")
    cdef int i
    for i in range(256):
        _CODE[i] = C_BAD
    for tag, code in pairs:
        _CODE[tag] = code


_init_codes()

cdef dict _KINDS = KINDS
cdef object _HEADER = HEADER
cdef object _MAGIC = MAGIC
cdef object _MFE = MessageFormatError
cdef object _Request = ClusterRequest
cdef object _Result = ClusterResult
cdef object _np_generic = np.generic
cdef object _np_dtype = np.dtype
cdef object _np_frombuffer = np.frombuffer
cdef object _np_empty = np.empty
cdef object _np_uint8 = np.uint8
cdef cnp.dtype _u8 = np.dtype(np.uint8)
cdef PyTypeObject* _ndarray_type = <PyTypeObject*>cnp.ndarray
cdef object _pickle_dumps = pickle.dumps
cdef object _pickle_loads = pickle.loads
cdef object _TAG_U32 = _framing_py._TAG_U32
cdef object _U32 = _framing_py._U32
# Rare paths share the pure twin's helpers, so they cannot drift apart.
cdef object _py_as_buffer = _framing_py._as_buffer
cdef object _py_aligned_empty = _framing_py._aligned_empty
cdef object _py_dtype_descr = _framing_py._dtype_descr
cdef object _py_frame_buffer = _framing_py.frame_buffer

# Encoded dtype values: id(dtype) -> (dtype, the bytes of its header value).
# The entry keeps its dtype alive, so an id is never reused while cached.
cdef dict _dtype_bytes = {}
# Decoded dtype strings: str -> dtype.
cdef dict _dtype_of_str = {}

# The last few dtype values decoded, by their header bytes ('s', u32 length,
# the str's bytes): the hot path of decoding an array's dtype, without
# making a str. Each entry holds a reference to its dtype (in _RAW_OWNERS).
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


# --------------------------------------------------------------------- encode

cdef struct Writer:
    unsigned char* data
    Py_ssize_t len
    Py_ssize_t cap
    bint heap
    Py_ssize_t copied           # payload bytes copied, for encode's stats


cdef int _grow(Writer* w, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = w.cap
    cdef unsigned char* p
    while cap - w.len < need:
        cap *= 2
    if w.heap:
        p = <unsigned char*>realloc(w.data, cap)
    else:
        p = <unsigned char*>malloc(cap)
        if p != NULL:
            memcpy(p, w.data, w.len)
    if p == NULL:
        raise MemoryError()
    w.data = p
    w.cap = cap
    w.heap = True
    return 0


cdef inline unsigned char* _reserve(Writer* w, Py_ssize_t n) except NULL:
    cdef unsigned char* p
    if w.cap - w.len < n:
        _grow(w, n)
    p = w.data + w.len
    w.len += n
    return p


cdef inline int _enter(const char* where) except -1:
    if Py_EnterRecursiveCall(where):
        return -1  # RecursionError is set
    return 0


cdef inline int _put_byte(Writer* w, unsigned char b) except -1:
    _reserve(w, 1)[0] = b
    return 0


cdef inline int _put_count(Writer* w, unsigned char tag, Py_ssize_t n) except -1:
    cdef unsigned char* p
    if n > _U32_MAX:
        _TAG_U32.pack(tag, n)  # raises struct.error, as the pure twin does
    p = _reserve(w, 5)
    p[0] = tag
    zc_put_u32(p + 1, <uint32_t>n)
    return 0


cdef inline int _put_u32(Writer* w, Py_ssize_t n) except -1:
    if n > _U32_MAX:
        _U32.pack(n)  # raises struct.error
    zc_put_u32(_reserve(w, 4), <uint32_t>n)
    return 0


cdef inline int _put_blob(Writer* w, unsigned char tag, const char* data,
                          Py_ssize_t n) except -1:
    cdef unsigned char* p
    if n > _U32_MAX:
        _TAG_U32.pack(tag, n)  # raises struct.error
    p = _reserve(w, 5 + n)
    p[0] = tag
    zc_put_u32(p + 1, <uint32_t>n)
    memcpy(p + 5, data, n)
    return 0


cdef inline int _put_raw(Writer* w, bytes raw) except -1:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    memcpy(_reserve(w, n), PyBytes_AS_STRING(raw), n)
    return 0


cdef int _enc(Writer* w, object obj, list bufs) except -1:
    # Exact type checks, as in the pure twin: a subclass is pickled.
    cdef type t = type(obj)
    cdef unsigned char* p
    cdef long long v
    cdef int overflow
    cdef Py_ssize_t n, i
    cdef const char* s
    cdef PyObject* kp
    cdef PyObject* vp
    if obj is None:
        _put_byte(w, T_NONE)
    elif t is int:
        v = PyLong_AsLongLongAndOverflow(obj, &overflow)
        if overflow == 0:
            p = _reserve(w, 9)
            p[0] = T_INT
            zc_put_u64(p + 1, <uint64_t>v)
        else:
            raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
            _put_blob(w, T_BIGINT, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
    elif t is str:
        s = zc_ascii(obj, &n)
        if s != NULL:
            _put_blob(w, T_STR, s, n)
        else:
            raw = (<str>obj).encode("utf-8", "surrogatepass")
            _put_blob(w, T_STR, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
    elif t is dict:
        n = PyDict_Size(obj)
        _put_count(w, T_DICT, n)
        _enter(" while encoding a dict")
        try:
            i = 0
            while PyDict_Next(obj, &i, &kp, &vp):
                key = <object>kp
                value = <object>vp
                _enc(w, key, bufs)
                _enc(w, value, bufs)
                if PyDict_Size(obj) != n:
                    raise RuntimeError("dictionary changed size during iteration")
        finally:
            Py_LeaveRecursiveCall()
    elif t is bool:
        _put_byte(w, T_TRUE if obj is True else T_FALSE)
    elif t is float:
        p = _reserve(w, 9)
        p[0] = T_FLOAT
        zc_put_u64(p + 1, zc_double_bits(PyFloat_AS_DOUBLE(obj)))
    elif t is bytes:
        _put_blob(w, T_BYTES, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj))
    elif t is list:
        _put_count(w, T_LIST, PyList_GET_SIZE(obj))
        _enter(" while encoding a list")
        try:
            i = 0
            while i < PyList_GET_SIZE(obj):  # a list iterator's semantics
                item = <object>PyList_GET_ITEM(obj, i)
                _enc(w, item, bufs)
                i += 1
        finally:
            Py_LeaveRecursiveCall()
    elif t is tuple:
        n = PyTuple_GET_SIZE(obj)
        _put_count(w, T_TUPLE, n)
        _enter(" while encoding a tuple")
        try:
            for i in range(n):
                _enc(w, <object>PyTuple_GET_ITEM(obj, i), bufs)
        finally:
            Py_LeaveRecursiveCall()
    elif t is cnp.ndarray and not _dtype_flagchk(
            <cnp.dtype>cnp.PyArray_DESCR(<cnp.ndarray>obj), NPY_ITEM_HASOBJECT):
        _enc_array(w, <cnp.ndarray>obj, bufs)
    elif t is _Request:
        _put_byte(w, T_REQUEST)
        _enter(" while encoding a ClusterRequest")
        try:
            _enc(w, obj.payload, bufs)
            _enc(w, obj.metadata, bufs)
        finally:
            Py_LeaveRecursiveCall()
    elif t is _Result:
        _put_byte(w, T_RESULT)
        _enter(" while encoding a ClusterResult")
        try:
            _enc(w, obj.status, bufs)
            _enc(w, obj.payload, bufs)
            _enc(w, obj.request_metadata, bufs)
            _enc(w, obj.metadata, bufs)
            _enc(w, obj.exception, bufs)
        finally:
            Py_LeaveRecursiveCall()
    elif t is complex:
        p = _reserve(w, 17)
        p[0] = T_COMPLEX
        zc_put_u64(p + 1, zc_double_bits(PyComplex_RealAsDouble(obj)))
        zc_put_u64(p + 9, zc_double_bits(PyComplex_ImagAsDouble(obj)))
    elif (isinstance(obj, _np_generic) and t.__module__ == "numpy"
            and not obj.dtype.hasobject):
        # asarray: an empty str_/bytes_ scalar has dtype '<U0'/'|S0' but
        # tobytes() gives one (zero) character; the array form agrees.
        scalar = np.asarray(obj)
        raw = scalar.tobytes()
        _put_byte(w, T_SCALAR)
        _enc_dtype(w, scalar.dtype, bufs)
        _put_u32(w, len(raw))
        _put_raw(w, raw)
    else:
        _enc_pickle(w, obj, bufs)
    return 0


cdef int _enc_dtype(Writer* w, cnp.dtype dtype, list bufs) except -1:
    if cnp.PyDataType_HASFIELDS(dtype):
        # Structured: not cached, since a structured dtype's names can be
        # reassigned in place.
        return _enc(w, _py_dtype_descr(dtype), bufs)
    key = PyLong_FromVoidPtr(<void*>dtype)
    entry = _dtype_bytes.get(key)
    if entry is not None and (<tuple>entry)[0] is dtype:
        return _put_raw(w, <bytes>(<tuple>entry)[1])
    # The header value of dtype.str, as _enc writes a str; remembered.
    sb = (<str>dtype.str).encode("utf-8", "surrogatepass")
    raw = _TAG_U32.pack(T_STR, len(sb)) + sb
    if len(_dtype_bytes) >= _CACHE_MAX:
        _dtype_bytes.clear()
    _dtype_bytes[key] = (dtype, raw)
    return _put_raw(w, raw)


cdef object _frame_buffer(cnp.ndarray arr):
    """frame_buffer() for an exact, C- or F-contiguous ndarray."""
    cdef cnp.dtype dtype = <cnp.dtype>cnp.PyArray_DESCR(arr)
    cdef cnp.npy_intp n
    if dtype.itemsize == 0:
        return _py_frame_buffer(arr)
    n = cnp.PyArray_NBYTES(arr)
    Py_INCREF(_u8)  # PyArray_NewFromDescr steals it
    view = _new_from_descr(_ndarray_type, <cnp.PyArray_Descr*>_u8, 1, &n, NULL,
                           cnp.PyArray_DATA(arr),
                           cnp.NPY_ARRAY_WRITEABLE if cnp.PyArray_ISWRITEABLE(arr) else 0,
                           NULL)
    cnp.set_array_base(<cnp.ndarray>view, arr)
    return view


def frame_buffer(arr):
    """The bytes of a C- or Fortran-contiguous array as a flat uint8 array.

    This is a view, never a copy; it exports the buffer protocol even for
    dtypes that cannot (datetime64, structured), and keeps ``arr`` alive.
    """
    if type(arr) is cnp.ndarray and cnp.PyArray_FLAGS(<cnp.ndarray>arr) & (
            cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_F_CONTIGUOUS):
        return _frame_buffer(<cnp.ndarray>arr)
    return _py_frame_buffer(arr)


cdef int _enc_array(Writer* w, cnp.ndarray arr, list bufs) except -1:
    cdef int flags = cnp.PyArray_FLAGS(arr)
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(arr)
    cdef unsigned char order
    cdef unsigned char* p
    cdef const char* src
    cdef int nd, i
    cdef cnp.npy_intp* dims
    if flags & cnp.NPY_ARRAY_C_CONTIGUOUS:
        order = O_C
    elif flags & cnp.NPY_ARRAY_F_CONTIGUOUS:
        order = O_F
    else:
        order = 0  # neither: written in C order, from a copy
    if nbytes < _INLINE_LIMIT:
        # Inline: the elements go into the header, straight from the array's
        # memory (one copy; tobytes() gives C order for the others).
        _put_byte(w, T_INLINE)
        _enc_dtype(w, <cnp.dtype>cnp.PyArray_DESCR(arr), bufs)
        if order == 0:
            raw = arr.tobytes()
            src = PyBytes_AS_STRING(raw)
            order = O_C
        else:
            src = <const char*>cnp.PyArray_DATA(arr)
        nd = cnp.PyArray_NDIM(arr)
        dims = cnp.PyArray_DIMS(arr)
        p = _reserve(w, 2 + 8 * nd + nbytes)
        p[0] = <unsigned char>nd
        for i in range(nd):
            zc_put_u64(p + 1 + 8 * i, <uint64_t>dims[i])
        p[1 + 8 * nd] = order
        memcpy(p + 2 + 8 * nd, src, nbytes)
        w.copied += nbytes
        return 0
    if order == 0:
        arr = np.ascontiguousarray(arr)
        order = O_C
        w.copied += nbytes
    _put_count(w, T_ARRAY, len(bufs) - 1)
    _enc_dtype(w, <cnp.dtype>cnp.PyArray_DESCR(arr), bufs)
    nd = cnp.PyArray_NDIM(arr)
    dims = cnp.PyArray_DIMS(arr)
    p = _reserve(w, 2 + 8 * nd)
    p[0] = <unsigned char>nd
    for i in range(nd):
        zc_put_u64(p + 1 + 8 * i, <uint64_t>dims[i])
    p[1 + 8 * nd] = order
    bufs.append(_frame_buffer(arr))
    return 0


cdef int _enc_pickle(Writer* w, object obj, list bufs) except -1:
    out_of_band = []
    try:
        data = _pickle_dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=out_of_band.append)
    except Exception as exc:
        raise TypeError("cannot encode %s object: %s" % (type(obj).__name__, exc)) from exc
    _put_blob(w, T_PICKLE, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    _put_u32(w, len(out_of_band))
    for pickle_buffer in out_of_band:
        _put_u32(w, len(bufs) - 1)
        bufs.append(pickle_buffer.raw())
    return 0


cdef int _put_header(Writer* w, object kind, Py_ssize_t nbuf, object task_id) except -1:
    cdef long long k
    cdef int overflow
    cdef unsigned long long tid
    cdef unsigned char* p = w.data
    if type(kind) is int and type(task_id) is int and nbuf <= _U32_MAX:
        k = PyLong_AsLongLongAndOverflow(kind, &overflow)
        if overflow == 0 and 0 <= k <= 255 and task_id >= 0:
            try:
                tid = PyLong_AsUnsignedLongLong(task_id)
            except OverflowError:
                pass
            else:
                p[0] = M0
                p[1] = M1
                p[2] = V_VERSION
                p[3] = <unsigned char>k
                zc_put_u32(p + 4, <uint32_t>nbuf)
                zc_put_u64(p + 8, <uint64_t>tid)
                return 0
    # Anything else (a bool or numpy kind, an out-of-range task id...) goes
    # through the same struct call as the pure twin: same bytes, same errors.
    raw = _HEADER.pack(_MAGIC, VERSION, kind, nbuf, task_id)
    memcpy(p, PyBytes_AS_STRING(raw), 16)
    return 0


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
    cdef unsigned char stack[_STACK_BYTES]
    cdef Writer w
    if kind not in _KINDS:
        raise ValueError("unknown message kind %r" % (kind,))
    w.data = stack
    w.len = 16  # the fixed header, written last
    w.cap = _STACK_BYTES
    w.heap = False
    w.copied = 0
    frames = [None]  # item 0 becomes the header frame
    try:
        _enc(&w, obj, frames)
        _put_header(&w, kind, len(frames) - 1, task_id)
        frames[0] = PyBytes_FromStringAndSize(<char*>w.data, w.len)
    finally:
        if w.heap:
            free(w.data)
    if stats is not None:
        stats.copied_bytes += w.copied
    return frames


# --------------------------------------------------------------------- decode

cdef struct Dec:
    const unsigned char* p      # the header frame's bytes
    Py_ssize_t n                # ... and their number
    Py_ssize_t pos              # offset of the next byte to read
    Py_ssize_t used             # buffer frames referenced so far
    Py_ssize_t nframes          # buffer frames in the message
    PyObject* frames            # the frames (borrowed: decode() holds them)
    PyObject* header            # the object whose memory p points into
    PyObject* allow_pickle
    PyObject* copy_threshold
    PyObject* alignment
    bint threshold_c            # copy_threshold is an exact int, in threshold
    long long threshold
    int align_mode              # 0: dtype's, 1: align_c, 2: Python arithmetic
    Py_ssize_t align_c
    Py_ssize_t copied           # payload bytes copied, for decode's stats


cdef object _frame_data(object frame, const unsigned char** ptr, Py_ssize_t* size,
                        bint* writeable):
    """Point at a frame's bytes; returns the object that owns them (keep it)."""
    cdef Py_buffer view
    if isinstance(frame, Frame):
        ptr[0] = <const unsigned char*>libzmq.zmq_msg_data(&(<Frame>frame).zmq_msg)
        size[0] = <Py_ssize_t>libzmq.zmq_msg_size(&(<Frame>frame).zmq_msg)
        writeable[0] = True  # pyzmq exports a Frame's memory writeable
        return frame
    if type(frame) is bytes:
        ptr[0] = <const unsigned char*>PyBytes_AS_STRING(frame)
        size[0] = PyBytes_GET_SIZE(frame)
        writeable[0] = False
        return frame
    buf = _py_as_buffer(frame)  # a memoryview of format "B", as in the pure twin
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    ptr[0] = <const unsigned char*>view.buf
    size[0] = view.len
    writeable[0] = not view.readonly
    PyBuffer_Release(&view)  # the memoryview still holds its own export
    return buf


cdef Py_ssize_t _truncated(Dec* d, Py_ssize_t n, str what) except -1:
    raise _MFE("header truncated: %s needs %d bytes at offset %d, %d left"
               % (what, n, d.pos, d.n - d.pos))


cdef inline Py_ssize_t _take(Dec* d, Py_ssize_t n, str what) except -1:
    cdef Py_ssize_t start = d.pos
    if n > d.n - start:
        return _truncated(d, n, what)
    d.pos = start + n
    return start


cdef inline Py_ssize_t _u32(Dec* d, str what) except -1:
    return zc_get_u32(d.p + _take(d, 4, what))


cdef object _header_slice(Dec* d, Py_ssize_t start, Py_ssize_t n):
    """``header[start:start + n]`` of the pure twin: a memoryview slice."""
    return memoryview(<object>d.header)[start:start + n]


cdef object _value(Dec* d, int depth):
    cdef Py_ssize_t at, start, n, i, count
    cdef unsigned char tag, code
    if depth > _MAX_DEPTH:
        raise _MFE("values nested deeper than %d levels" % _MAX_DEPTH)
    tag = d.p[_take(d, 1, "a value tag")]
    code = _CODE[tag]
    if code == C_INT:
        return PyLong_FromLongLong(<int64_t>zc_get_u64(d.p + _take(d, 8, "an int")))
    if code == C_STR:
        n = _u32(d, "a str length")
        start = _take(d, n, "a str")
        try:
            return _decode_utf8(<const char*>d.p + start, n, "surrogatepass")
        except UnicodeDecodeError as exc:
            raise _MFE("invalid UTF-8 in str at offset %d: %s" % (start, exc)) from None
    if code == C_NONE:
        return None
    if code == C_FLOAT:
        return PyFloat_FromDouble(zc_bits_double(zc_get_u64(d.p + _take(d, 8, "a float"))))
    if code == C_DICT:
        return _dict(d, depth)
    if code == C_LIST or code == C_TUPLE:
        return _sequence(d, depth, code == C_LIST)
    if code == C_INLINE:
        return _inline_array(d, depth)
    if code == C_ARRAY:
        return _array(d, depth)
    if code == C_TRUE:
        return True
    if code == C_FALSE:
        return False
    if code == C_BYTES:
        n = _u32(d, "a bytes length")
        start = _take(d, n, "bytes")
        return PyBytes_FromStringAndSize(<char*>d.p + start, n)
    if code == C_REQUEST:
        payload = _value(d, depth + 1)
        return _Request(payload, _value(d, depth + 1))
    if code == C_RESULT:
        status = _value(d, depth + 1)
        payload = _value(d, depth + 1)
        request_metadata = _value(d, depth + 1)
        metadata = _value(d, depth + 1)
        exception = _value(d, depth + 1)
        return _Result(status, payload, request_metadata, metadata, exception)
    if code == C_BIGINT:
        n = _u32(d, "a big int length")
        start = _take(d, n, "a big int")
        return int.from_bytes(PyBytes_FromStringAndSize(<char*>d.p + start, n),
                              "little", signed=True)
    if code == C_COMPLEX:
        start = _take(d, 16, "a complex")
        return PyComplex_FromDoubles(zc_bits_double(zc_get_u64(d.p + start)),
                                     zc_bits_double(zc_get_u64(d.p + start + 8)))
    if code == C_SCALAR:
        dtype = _dtype(d, depth)
        n = _u32(d, "a scalar length")
        start = _take(d, n, "a scalar")
        if n == dtype.itemsize == 0:
            return np.zeros((), dtype)[()]
        if n != dtype.itemsize:
            raise _MFE("scalar of dtype %s has %d bytes, expected %d"
                       % (dtype, n, dtype.itemsize))
        return _np_frombuffer(_header_slice(d, start, n), dtype)[0]
    if code == C_PICKLE:
        return _pickled(d)
    raise _MFE("unknown value tag %r at offset %d" % (chr(tag), d.pos - 1))


cdef object _sequence(Dec* d, int depth, bint is_list):
    cdef Py_ssize_t count = _u32(d, "a sequence count")
    cdef Py_ssize_t i
    if count > d.n - d.pos:
        # Each value takes a byte at least: this header is truncated. Decode
        # item by item (rather than allocate ``count`` slots) to fail where
        # the pure twin fails.
        items = []
        for i in range(count):
            items.append(_value(d, depth + 1))
        return items if is_list else tuple(items)
    if is_list:
        out = PyList_New(count)
        for i in range(count):
            item = _value(d, depth + 1)
            Py_INCREF(item)
            PyList_SET_ITEM(out, i, item)
        return out
    out = PyTuple_New(count)
    for i in range(count):
        item = _value(d, depth + 1)
        Py_INCREF(item)
        PyTuple_SET_ITEM(out, i, item)
    return out


cdef dict _dict(Dec* d, int depth):
    cdef Py_ssize_t count = _u32(d, "a dict count")
    cdef Py_ssize_t i, key_at
    cdef dict out = {}
    for i in range(count):
        key_at = d.pos
        key = _value(d, depth + 1)
        value = _value(d, depth + 1)
        try:
            PyDict_SetItem(out, key, value)
        except TypeError:
            raise _MFE("unhashable dict key at offset %d" % key_at) from None
    return out


cdef object _frame(Dec* d, bint for_array, Py_ssize_t at):
    cdef Py_ssize_t index = _u32(d, "a frame index")
    if index != d.used:
        raise _MFE("%s refers to buffer frame %d; frame %d was expected next"
                   % (_frame_user(for_array, at), index, d.used))
    if index >= d.nframes:
        raise _MFE("%s refers to buffer frame %d of %d"
                   % (_frame_user(for_array, at), index, d.nframes))
    d.used += 1
    return (<object>d.frames)[index + 1]


cdef str _frame_user(bint for_array, Py_ssize_t at):
    return ("array at offset %d" if for_array else "pickle at offset %d") % at


cdef cnp.dtype _dtype(Dec* d, int depth):
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
    descr = _value(d, depth + 1)
    if type(descr) is str:
        cached = _dtype_of_str.get(descr)
        if cached is not None:
            _remember_raw(d, at, cached)
            return <cnp.dtype>cached
    try:
        if type(descr) is str:
            dtype = _np_dtype(descr)
        elif type(descr) is list:
            dtype = np.lib.format.descr_to_dtype(descr)
        else:
            raise TypeError("a dtype is a str or a list, not %s" % type(descr).__name__)
    except Exception as exc:
        raise _MFE("bad dtype %r at offset %d: %s" % (descr, at, exc)) from None
    if dtype.hasobject:
        raise _MFE("dtype %s at offset %d holds Python objects" % (dtype, at))
    if type(descr) is str:
        if len(_dtype_of_str) >= _CACHE_MAX:
            _dtype_of_str.clear()
        _dtype_of_str[descr] = dtype
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


cdef struct Shape:
    cnp.npy_intp dims[_MAX_NDIM]  # the first min(ndim, _MAX_NDIM) dims
    int ndim
    Py_ssize_t shape_at         # header offset of the u64 shape
    uint64_t nbytes             # prod(shape) * itemsize, unless overflow
    bint overflow               # ... which does not fit in 64 bits
    bint zero                   # a dim is 0 (nbytes is 0 then)
    bint plain                  # ndim <= _MAX_NDIM and every dim fits npy_intp
    unsigned char order         # O_C or O_F


cdef int _read_shape(Dec* d, Py_ssize_t at, cnp.dtype dtype, Shape* s) except -1:
    """An array's ndim, shape and order fields (the pure twin's
    ``shape_and_order``), and its size in bytes."""
    cdef int i
    cdef uint64_t dim, count = 1, itemsize
    s.ndim = d.p[_take(d, 1, "an array's ndim")]
    s.shape_at = _take(d, 8 * s.ndim, "a shape")
    s.plain = s.ndim <= _MAX_NDIM
    s.overflow = False
    s.zero = False
    s.nbytes = 0
    for i in range(s.ndim):
        dim = zc_get_u64(d.p + s.shape_at + 8 * i)
        if dim == 0:
            s.zero = True
        elif dim > <uint64_t>NPY_MAX_INTP:
            s.plain = False
        if not s.overflow and dim != 0:
            if count > 0xFFFFFFFFFFFFFFFFULL // dim:
                s.overflow = True
            else:
                count *= dim
        if i < _MAX_NDIM:
            s.dims[i] = <cnp.npy_intp>dim
    s.order = d.p[_take(d, 1, "an array's order")]
    if s.order != O_C and s.order != O_F:
        raise _MFE("array at offset %d has order %r, expected 'C' or 'F'" % (at, chr(s.order)))
    if s.zero:
        count = 0
        s.overflow = False
    itemsize = <uint64_t>dtype.itemsize
    if not s.overflow:
        if itemsize != 0 and count > 0xFFFFFFFFFFFFFFFFULL // itemsize:
            s.overflow = True
        else:
            s.nbytes = count * itemsize
    return 0


cdef object _nbytes_obj(Dec* d, Shape* s, cnp.dtype dtype):
    """prod(shape) * itemsize as a Python int (for messages about overflows)."""
    count = 1
    for dim in _shape(d, s.shape_at, s.ndim):
        count *= dim
    return count * dtype.itemsize


cdef inline bint _simple(Shape* s, cnp.dtype dtype):
    """Whether PyArray_NewFromDescr builds the array the pure twin's
    view + reshape would (else the pure twin's numpy calls run)."""
    return s.plain and not s.zero and not cnp.PyDataType_HASSUBARRAY(dtype)


cdef object _on(Dec* d, Shape* s, cnp.dtype dtype, object flat):
    """The array of shape ``s`` and ``dtype`` on the memory of the flat uint8
    array ``flat`` (which it keeps alive)."""
    if _simple(s, dtype):
        Py_INCREF(dtype)  # PyArray_NewFromDescr steals it
        arr = _new_from_descr(
            _ndarray_type, <cnp.PyArray_Descr*>dtype, s.ndim, s.dims, NULL,
            cnp.PyArray_DATA(<cnp.ndarray>flat),
            cnp.NPY_ARRAY_WRITEABLE | (cnp.NPY_ARRAY_F_CONTIGUOUS if s.order == O_F else 0),
            NULL)
        cnp.set_array_base(<cnp.ndarray>arr, flat)
        return arr
    # Empty, huge or subarray shapes: the pure twin's numpy calls, same errors.
    return flat.view(dtype).reshape(_shape_of(d, s), order="F" if s.order == O_F else "C")


cdef object _copied(Dec* d, Shape* s, cnp.dtype dtype, const unsigned char* src):
    """An aligned, writeable copy of the ``s.nbytes`` bytes at ``src`` as the
    array ``s`` describes: the pure twin's ``_aligned_empty`` + view."""
    cdef Py_ssize_t align = 0
    cdef cnp.npy_intp n = <cnp.npy_intp>s.nbytes
    if d.align_mode == 0:
        align = dtype.alignment
    elif d.align_mode == 1:
        align = d.align_c
    if d.align_mode != 2 and 16 % align == 0:  # numpy's allocator gives 16
        if _simple(s, dtype):
            # The hot case: numpy allocates the array, one memcpy fills it.
            Py_INCREF(dtype)  # PyArray_NewFromDescr steals it
            arr = _new_from_descr(
                _ndarray_type, <cnp.PyArray_Descr*>dtype, s.ndim, s.dims, NULL, NULL,
                cnp.NPY_ARRAY_F_CONTIGUOUS if s.order == O_F else 0, NULL)
            memcpy(cnp.PyArray_DATA(<cnp.ndarray>arr), src, n)
            return arr
        flat = cnp.PyArray_SimpleNew(1, &n, cnp.NPY_UINT8)
    elif d.align_mode == 2:
        flat = _py_aligned_empty(s.nbytes, <object>d.alignment)
    else:
        flat = _py_aligned_empty(s.nbytes, align)
    memcpy(cnp.PyArray_DATA(<cnp.ndarray>flat), src, n)
    return _on(d, s, dtype, flat)


cdef object _inline_array(Dec* d, int depth):
    cdef Py_ssize_t at = d.pos - 1
    cdef Py_ssize_t start
    cdef Shape s
    # Same order as the pure twin: dtype, ndim, shape, order, the bytes.
    dtype = _dtype(d, depth)
    _read_shape(d, at, dtype, &s)
    if s.overflow or s.nbytes > <uint64_t>(d.n - d.pos):
        raise _MFE("header truncated: %s needs %d bytes at offset %d, %d left"
                   % ("an inline array", _nbytes_obj(d, &s, dtype), d.pos, d.n - d.pos))
    start = d.pos
    d.pos += <Py_ssize_t>s.nbytes
    d.copied += <Py_ssize_t>s.nbytes
    if dtype.itemsize == 0:
        return _np_empty(_shape_of(d, &s), dtype, order="F" if s.order == O_F else "C")
    return _copied(d, &s, dtype, d.p + start)


cdef object _array(Dec* d, int depth):
    cdef Py_ssize_t at = d.pos - 1
    cdef const unsigned char* fp = NULL
    cdef Py_ssize_t fsize = 0
    cdef bint fwrite = False
    # Same order as the pure twin: frame, dtype, ndim, shape, order.
    frame = _frame(d, True, at)
    owner = _frame_data(frame, &fp, &fsize, &fwrite)
    dtype = _dtype(d, depth)
    return _array_body(d, at, owner, fp, fsize, fwrite, dtype)


cdef object _array_body(Dec* d, Py_ssize_t at, object owner, const unsigned char* fp,
                        Py_ssize_t fsize, bint fwrite, cnp.dtype dtype):
    cdef Shape s
    cdef bint copy
    cdef Py_ssize_t align = 0
    _read_shape(d, at, dtype, &s)
    if s.overflow or s.nbytes != <uint64_t>fsize:
        shape = _shape_of(d, &s)
        raise _MFE("array at offset %d is %s %s (%d bytes) but its frame has %d bytes"
                   % (at, "x".join(map(str, shape)) or "scalar", dtype,
                      _nbytes_obj(d, &s, dtype), fsize))
    if dtype.itemsize == 0:
        return _np_empty(_shape_of(d, &s), dtype, order="F" if s.order == O_F else "C")

    # A view on the frame, or an aligned copy: the pure twin's rule.
    if d.threshold_c:
        copy = <long long>s.nbytes < d.threshold
    else:
        copy = bool(<object>s.nbytes < <object>d.copy_threshold)
    if not copy:
        if d.align_mode == 2:
            copy = bool(PyLong_FromVoidPtr(<void*>fp) % <object>d.alignment)
        else:
            align = dtype.alignment if d.align_mode == 0 else d.align_c
            copy = (<uintptr_t>fp) % <uintptr_t>align != 0
        copy = copy or not fwrite
    if copy:
        d.copied += <Py_ssize_t>s.nbytes
        return _copied(d, &s, dtype, fp)
    return _on(d, &s, dtype, _np_frombuffer(owner, _np_uint8))


cdef inline tuple _shape_of(Dec* d, Shape* s):
    return _shape(d, s.shape_at, s.ndim)


cdef tuple _shape(Dec* d, Py_ssize_t shape_at, int ndim):
    return tuple([PyLong_FromUnsignedLongLong(zc_get_u64(d.p + shape_at + 8 * i))
                  for i in range(ndim)])


cdef object _pickled(Dec* d):
    cdef Py_ssize_t at = d.pos - 1
    cdef Py_ssize_t n, start, count, i
    if not <object>d.allow_pickle:
        raise _MFE("pickled value at offset %d refused: pickle is not allowed from this peer"
                   % at)
    n = _u32(d, "a pickle length")
    start = _take(d, n, "pickle data")
    data = _header_slice(d, start, n)
    count = _u32(d, "a pickle buffer count")
    buffers = []
    for i in range(count):
        buffers.append(_py_as_buffer(_frame(d, False, at)))
    try:
        return _pickle_loads(data, buffers=buffers)
    except Exception as exc:
        raise _MFE("pickled value at offset %d does not load: %s: %s"
                   % (at, type(exc).__name__, exc)) from None


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
    cdef Dec d
    cdef bint writeable
    cdef int overflow
    cdef long long value
    cdef Py_ssize_t nframes, arrived
    cdef unsigned char kind
    cdef uint64_t task_id
    if not frames:
        raise _MFE("empty message: no header frame")
    header = _frame_data(frames[0], &d.p, &d.n, &writeable)
    if d.n < 16:
        raise _MFE("header frame is %d bytes, shorter than the %d-byte fixed header"
                   % (d.n, HEADER_SIZE))
    if d.p[0] != M0 or d.p[1] != M1:
        raise _MFE("bad magic %r (expected %r): not a zmq_cluster message"
                   % (PyBytes_FromStringAndSize(<char*>d.p, 2), _MAGIC))
    if d.p[2] != V_VERSION:
        raise _MFE("unknown wire format version %d (this build reads %d)"
                   % (d.p[2], VERSION))
    kind = d.p[3]
    if kind not in _KINDS:
        raise _MFE("unknown message kind %d" % kind)
    nframes = zc_get_u32(d.p + 4)
    arrived = len(frames) - 1
    if nframes != arrived:
        raise _MFE("header announces %d buffer frames but %d arrived" % (nframes, arrived))
    task_id = zc_get_u64(d.p + 8)

    d.pos = 16
    d.used = 0
    d.copied = 0
    d.nframes = nframes
    d.frames = <PyObject*>frames
    d.header = <PyObject*>header
    d.allow_pickle = <PyObject*>allow_pickle
    d.copy_threshold = <PyObject*>copy_threshold
    d.alignment = <PyObject*>alignment
    d.threshold_c = type(copy_threshold) is int
    if d.threshold_c:
        value = PyLong_AsLongLongAndOverflow(copy_threshold, &overflow)
        d.threshold = value if overflow == 0 else (
            LLONG_MAX if overflow > 0 else LLONG_MIN)
    d.align_c = 0
    if alignment is None:
        d.align_mode = 0
    elif type(alignment) is int and 0 < alignment <= (1 << 30):
        d.align_mode = 1
        d.align_c = alignment
    elif not alignment:
        d.align_mode = 0
    else:
        d.align_mode = 2

    try:
        obj = _value(&d, 0)
    except _MFE:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        # numpy refusing what the header describes (too many dimensions, a
        # size beyond its limits, ...): still the peer's fault, not ours.
        raise _MFE("malformed value in the header (at offset %d): %s: %s"
                   % (d.pos, type(exc).__name__, exc)) from None
    if d.pos != d.n:
        raise _MFE("%d unexpected bytes after the value at offset %d of the header"
                   % (d.n - d.pos, d.pos))
    if d.used != nframes:
        raise _MFE("%d buffer frames are not referenced by the header" % (nframes - d.used))
    task_id_obj = PyLong_FromUnsignedLongLong(task_id)
    if task_id and (type(obj) is _Request or type(obj) is _Result):
        obj.task_id = task_id_obj
    if stats is not None:
        stats.copied_bytes += d.copied
    return kind, task_id_obj, obj
