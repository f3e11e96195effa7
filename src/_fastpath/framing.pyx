# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Compiled twin of the message framing (see docs/protocol.md).

Same functions, behaviour, error texts and bytes as the pure-Python twin,
``zmq_cluster._framing_py``, which states the contract of ``encode`` and
``decode``. The wire constants, error texts, records and slow-path helpers
come from the pure-Python modules both twins import
(``zmq_cluster.protocol``, ``zmq_cluster._framing_errors``,
``_framing_buffers``, ``_framing_dtypes``...), never from the other twin.

One module, built from this file and the ``.pxi`` files it includes, one
per role (as msgpack-python builds its compiled core):

* ``framing_encode.pxi``: the header writer and ``encode``;
* ``framing_decode.pxi``: the header reader, values, pickles, exceptions
  and ``decode``;
* ``framing_dtypes.pxi``: dtype values and their caches, both directions;
* ``framing_arrays.pxi``: arrays, both directions;
* ``framing_tasks.pxi``: task-shaped messages without their objects, and
  the C interface the compiled wire module calls (``framing_api.pxi``);
* ``framing_tables.pxi``: batch tables (``walk_table``, ``scan_table``, ``encode_task_table``).

Encode writes the header into one C buffer (on the stack while it is small)
with direct little-endian stores, dispatching on the exact type of each value
in C. Decode walks the header as a ``const unsigned char*`` with a bounds
check before every read; a ``zmq.Frame`` is read through its ``zmq_msg_t``
without making a memoryview. Rare values (pickled objects, exceptions,
numpy scalars, structured dtypes, dtype cache misses, odd arguments) go
through the same Python helpers as the pure-Python twin, so their bytes
and errors match too.
"""

from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.pycapsule cimport PyCapsule_New
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

from zmq_cluster import _framing_buffers, _framing_dtypes, _framing_errors, _framing_exceptions
from zmq_cluster._framing_errors import (
    E_CODE_POINT, E_DEEP, E_EMPTY, E_FRAME_ORDER, E_FRAME_RANGE, E_FRAME_SIZE, E_ITEMSIZE0, E_KIND, E_MAGIC,
    E_NDIM, E_NFRAMES, E_NUMPY, E_ORDER, E_PICKLE_ARGS, E_PICKLE_COMMAND, E_PICKLE_LOAD,
    E_PICKLE_REFUSED, E_SCALAR, E_SHORT, E_SPLIT_COUNT, E_SPLIT_SIZE, E_TAG, E_TOO_BIG, E_TRAILING, E_UNHASHABLE,
    E_UNREFERENCED, E_UTF8, E_VERSION, X_CODE_POINT, X_COMMAND, X_DEEP, X_PICKLE, X_U32,
)
from zmq_cluster.exceptions import EncodeError, MessageFormatError
from zmq_cluster.messages import ClusterRequest, ClusterResult
from zmq_cluster.protocol import (
    ALIGNED_BYTES, ARRAY_ALIGNMENT, SPLIT_BYTES, TAG_SPLIT_ARRAY, COPY_THRESHOLD, HEADER, HEADER_SIZE, INLINE_LIMIT, INT64_MAX, INT64_MIN, KIND_COMMAND,
    KIND_REQUEST, KIND_RESULT, KINDS,
    MAGIC, MAX_ARRAY_BYTES, MAX_DEPTH, MAX_NDIM, ORDER_C, ORDER_F, PICKLE_PROTOCOL, TAG_ARRAY,
    TAG_BIGINT, TAG_BYTES, TAG_COMPLEX, TAG_DICT, TAG_EXCEPTION, TAG_FALSE, TAG_FLOAT,
    TAG_INLINE_ARRAY, TAG_INT, TAG_LIST, TAG_NONE, TAG_PICKLE, TAG_REQUEST, TAG_RESULT,
    TAG_SCALAR, TAG_SHM_ARRAY, TAG_STR, TAG_TRUE, TAG_TUPLE, TAG_U32, U32_MAX, VERSION,
)
from zmq_cluster._framing_shm import decode_shm_array, encode_shm_array

__all__ = ["encode", "decode", "frame_buffer", "walk_table", "scan_table", "encode_task_table"]

include "framing_api.pxi"

cnp.import_array()


cdef extern from "Python.h":
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
# only hard-codes the fixed-header layout and the limits it keeps in C
# types, checked here against protocol.

if (HEADER.format != "<2sBBIQ" or HEADER_SIZE != 16 or len(MAGIC) != 2
        or INT64_MIN != -(1 << 63) or INT64_MAX != (1 << 63) - 1 or U32_MAX != 0xFFFFFFFF
        or MAX_NDIM != 64 or MAX_ARRAY_BYTES != (1 << 63) - 1):
    raise ImportError("zmq_cluster._fastpath.framing was compiled for another wire format "
                      "than zmq_cluster.protocol describes: rebuild the extension")

cdef enum:
    _STACK_BYTES = 512     # header bytes encoded before the first malloc
    _MAX_NDIM = 64         # protocol.MAX_NDIM, numpy's NPY_MAXDIMS
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
    C_EXCEPTION
    C_PICKLE
    C_SPLIT
    C_SHM

cdef unsigned char _CODE[256]
cdef unsigned char T_NONE = TAG_NONE, T_TRUE = TAG_TRUE, T_FALSE = TAG_FALSE
cdef unsigned char T_INT = TAG_INT, T_BIGINT = TAG_BIGINT, T_FLOAT = TAG_FLOAT
cdef unsigned char T_COMPLEX = TAG_COMPLEX, T_STR = TAG_STR, T_BYTES = TAG_BYTES
cdef unsigned char T_LIST = TAG_LIST, T_TUPLE = TAG_TUPLE, T_DICT = TAG_DICT
cdef unsigned char T_ARRAY = TAG_ARRAY, T_SCALAR = TAG_SCALAR, T_REQUEST = TAG_REQUEST
cdef unsigned char T_RESULT = TAG_RESULT, T_PICKLE = TAG_PICKLE, T_INLINE = TAG_INLINE_ARRAY
cdef unsigned char T_EXCEPTION = TAG_EXCEPTION, T_SPLIT = TAG_SPLIT_ARRAY
cdef unsigned char O_C = ORDER_C, O_F = ORDER_F
cdef unsigned char M0 = MAGIC[0], M1 = MAGIC[1]
cdef unsigned char V_VERSION = VERSION
cdef int _MAX_DEPTH = MAX_DEPTH
cdef Py_ssize_t _INLINE_LIMIT = INLINE_LIMIT
cdef Py_ssize_t _SPLIT_BYTES = SPLIT_BYTES
cdef Py_ssize_t _ALIGNED_BYTES = ALIGNED_BYTES
cdef Py_ssize_t _ARRAY_ALIGNMENT = ARRAY_ALIGNMENT


def _init_codes():
    pairs = [(TAG_NONE, C_NONE), (TAG_TRUE, C_TRUE), (TAG_FALSE, C_FALSE), (TAG_INT, C_INT),
             (TAG_BIGINT, C_BIGINT), (TAG_FLOAT, C_FLOAT), (TAG_COMPLEX, C_COMPLEX),
             (TAG_STR, C_STR), (TAG_BYTES, C_BYTES), (TAG_LIST, C_LIST),
             (TAG_TUPLE, C_TUPLE), (TAG_DICT, C_DICT), (TAG_ARRAY, C_ARRAY),
             (TAG_INLINE_ARRAY, C_INLINE), (TAG_SCALAR, C_SCALAR), (TAG_REQUEST, C_REQUEST),
             (TAG_RESULT, C_RESULT), (TAG_EXCEPTION, C_EXCEPTION), (TAG_PICKLE, C_PICKLE),
             (TAG_SPLIT_ARRAY, C_SPLIT), (TAG_SHM_ARRAY, C_SHM)]
    if len({tag for tag, _ in pairs}) != len(pairs):
        raise ImportError("zmq_cluster.protocol has two value tags with the same byte")
    cdef int i
    for i in range(256):
        _CODE[i] = C_BAD
    for tag, code in pairs:
        _CODE[tag] = code


_init_codes()

cdef dict _KINDS = KINDS
cdef bint _KIND_OK[256]
for _kind in range(256):
    _KIND_OK[_kind] = _kind in KINDS
cdef object _HEADER = HEADER
cdef object _MAGIC = MAGIC
cdef object _MFE = MessageFormatError
cdef object _EncodeError = EncodeError
cdef object _Request = ClusterRequest
cdef object _Result = ClusterResult
cdef object _np_generic = np.generic
cdef object _np_frombuffer = np.frombuffer
cdef object _np_zeros = np.zeros
cdef object _np_uint8 = np.uint8
cdef cnp.dtype _u8 = np.dtype(np.uint8)
cdef PyTypeObject* _ndarray_type = <PyTypeObject*>cnp.ndarray
cdef object _pickle_dumps = pickle.dumps
cdef object _pickle_loads = pickle.loads
cdef object _TAG_U32 = TAG_U32
# Slow paths: the helpers the pure twin uses too.
cdef object _as_buffer = _framing_buffers.as_buffer
cdef object _aligned_empty = _framing_buffers.aligned_empty
cdef object _big_alignment = _framing_buffers.big_alignment
cdef object _assembly_buffer = _framing_buffers.assembly_buffer
cdef object _py_frame_buffer = _framing_buffers.frame_buffer
cdef object _dtype_value = _framing_dtypes.dtype_value
cdef object _read_dtype = _framing_dtypes.read_dtype
cdef object _exception_fields = _framing_exceptions.exception_fields
cdef object _exception_value = _framing_exceptions.exception_value
cdef object _truncated = _framing_errors.truncated
cdef object _count_error = _framing_errors.count_error
cdef object _bad_code_points = _framing_dtypes.bad_code_points
cdef object _array_bad_code_points = _framing_dtypes.array_bad_code_points
cdef object _encode_shm_array = encode_shm_array
cdef object _decode_shm_array = decode_shm_array


cdef inline bint _has_text(cnp.dtype dtype):
    """Whether ``dtype`` may hold 'U' items (see bad_code_points)."""
    return dtype.type_num == cnp.NPY_UNICODE or cnp.PyDataType_HASFIELDS(dtype)


include "framing_encode.pxi"
include "framing_decode.pxi"
include "framing_dtypes.pxi"
include "framing_arrays.pxi"
include "framing_tasks.pxi"
include "framing_tables.pxi"
