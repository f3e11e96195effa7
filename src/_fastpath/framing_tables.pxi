# Batch tables: walk_table and scan_table, the compiled twins of
# zmq_cluster._framing_tables' (whose docstrings are the contracts).
# Part of framing.pyx (included there).

from cpython.sequence cimport PySequence_GetSlice
from cpython.list cimport PyList_Append
from zmq_cluster._framing_errors import (
    T_FIELDS, T_FORMAT, T_FRAMES, T_NO_HEADER, T_OVERRUN, T_STRAY_BYTES, T_STRAY_FRAMES,
    T_TRUNCATED, TABLE_CODES,
)

cdef enum:
    _MAX_TABLE_FIELDS = 16


cdef Py_ssize_t _table_layout(str fmt, Py_ssize_t inline_at, Py_ssize_t nframes_at,
                              char* codes) except -1:
    """The entry size of ``fmt``, its codes into ``codes``; ValueError for
    a format walk_table does not read."""
    cdef Py_ssize_t nf = len(fmt) - 1, size = 0, i
    if nf < 1 or nf > _MAX_TABLE_FIELDS or fmt[0] != "<":
        raise ValueError(T_FORMAT % (fmt,))
    for i in range(nf):
        c = fmt[1 + i]
        if c not in TABLE_CODES:
            raise ValueError(T_FORMAT % (fmt,))
        codes[i] = ord(c)
        size += 4 if codes[i] == c'I' else 8
    if not (0 <= inline_at < nf and 0 <= nframes_at < nf and inline_at != nframes_at
            and codes[inline_at] == c'I' and codes[nframes_at] == c'I'):
        raise ValueError(T_FIELDS % (inline_at, nframes_at, fmt))
    return size


cdef list _table(table, Py_ssize_t count, str fmt, Py_ssize_t inline_at, Py_ssize_t nframes_at,
                 data, Py_ssize_t ndata, error, bint spans):
    cdef char codes[_MAX_TABLE_FIELDS]
    cdef Py_ssize_t nf = len(fmt) - 1, size, i, k
    cdef const unsigned char* p
    cdef const unsigned char* q
    cdef Py_ssize_t n, off = 0, first = 0, end, inline_len, nfr
    cdef uint32_t u
    size = _table_layout(fmt, inline_at, nframes_at, codes)
    if type(table) is not bytes:
        table = bytes(table)
    p = <const unsigned char*>PyBytes_AS_STRING(table)
    n = PyBytes_GET_SIZE(table)
    out = []
    for k in range(count):
        if off + size > n:
            raise error(T_TRUNCATED % k)
        fields = PyTuple_New(nf)
        q = p + off
        inline_len = nfr = 0
        for i in range(nf):
            if codes[i] == c'I':
                u = zc_get_u32(q)
                v = PyLong_FromUnsignedLongLong(u)
                if i == inline_at:
                    inline_len = u
                elif i == nframes_at:
                    nfr = u
                q += 4
            elif codes[i] == c'Q':
                v = PyLong_FromUnsignedLongLong(zc_get_u64(q))
                q += 8
            else:
                v = PyFloat_FromDouble(zc_bits_double(zc_get_u64(q)))
                q += 8
            Py_INCREF(v)
            PyTuple_SET_ITEM(fields, i, v)
        end = off + size + inline_len
        if end > n:
            raise error(T_OVERRUN)
        if inline_len == 0 and nfr == 0:
            raise error(T_NO_HEADER % k)
        if first + nfr > ndata:
            raise error(T_FRAMES)
        if spans:
            PyList_Append(out, (fields, off, end, first))
        elif inline_len:
            msg = [PyBytes_FromStringAndSize(<const char*>p + off + size, inline_len)]
            if nfr:
                msg.extend(PySequence_GetSlice(data, first, first + nfr))
            PyList_Append(out, (fields, msg))
        else:
            PyList_Append(out, (fields, list(PySequence_GetSlice(data, first, first + nfr))))
        off = end
        first += nfr
    if off != n:
        raise error(T_STRAY_BYTES % (n - off))
    if first != ndata:
        raise error(T_STRAY_FRAMES % (ndata - first))
    return out


def walk_table(table, Py_ssize_t count, str fmt, Py_ssize_t inline_at, Py_ssize_t nframes_at,
               data, error):
    """The entries of a batch table with their messages; see
    ``zmq_cluster._framing_tables.walk_table``."""
    return _table(table, count, fmt, inline_at, nframes_at, data, len(data), error, False)


def scan_table(table, Py_ssize_t count, str fmt, Py_ssize_t inline_at, Py_ssize_t nframes_at,
               Py_ssize_t ndata, error):
    """The entries of a batch table as spans; see
    ``zmq_cluster._framing_tables.scan_table``."""
    return _table(table, count, fmt, inline_at, nframes_at, None, ndata, error, True)
