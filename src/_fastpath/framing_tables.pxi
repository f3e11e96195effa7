# Batch tables: walk_table, scan_table and encode_task_table, the compiled
# twins of zmq_cluster._framing_tables' (whose docstrings are the contracts).
# Part of framing.pyx (included there).

from cpython.sequence cimport PySequence_GetSlice
from cpython.list cimport PyList_Append
from zmq_cluster.protocol import INLINE_HEADER_MAX, TASK_ENTRY_FORMAT
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


if TASK_ENTRY_FORMAT != "<QQIII" or INLINE_HEADER_MAX != 65536:
    raise ImportError("zmq_cluster._fastpath.framing was compiled for another batch table "
                      "than zmq_cluster.protocol describes: rebuild the extension")

cdef enum:
    _TASK_ENTRY_SIZE = 28   # <QQIII
    _INLINE_HEADER_MAX = 65536


cdef inline Py_ssize_t _frame_nbytes(object f) except -1:
    if type(f) is bytes:
        return PyBytes_GET_SIZE(f)
    return memoryview(f).nbytes


def encode_task_table(chunks, object mode, uint64_t key, uint32_t timeout, uint64_t first_tid,
                      Py_ssize_t max_tasks, Py_ssize_t max_items, Py_ssize_t max_bytes,
                      stats=None, shm=None, pin=None):
    """Encode chunks read from ``chunks`` as one batch table of tasks; see
    ``zmq_cluster._framing_tables.encode_task_table``."""
    cdef Py_ssize_t copied = 0, ntasks = 0, items = 0, nbytes = 0, size, hl, nmsg, k, first
    cdef Py_ssize_t used = 0, cap = 0, need, n
    cdef unsigned char* buf = NULL
    cdef unsigned char* grown
    cdef unsigned char* q
    cdef uint64_t tid
    frames = []
    lengths = []
    sizes = []
    stop = None
    try:
        while ntasks == 0 or (ntasks < max_tasks and items < max_items and nbytes < max_bytes):
            try:
                chunk = next(chunks)
            except StopIteration:
                stop = StopIteration
                break
            except Exception as exc:
                stop = (exc, None)
                break
            tid = first_tid + <uint64_t>ntasks
            before = None if shm is None else shm.arrays_sent
            try:
                msg = _encode((mode, chunk), _KIND_REQUEST, tid, &copied, shm)
            except Exception as exc:
                stop = (exc, chunk)
                break
            size = 0
            if shm is not None and pin is not None and shm.arrays_sent != before:
                size = pin(tid)
            header = (<list>msg)[0]
            hl = PyBytes_GET_SIZE(header)
            nmsg = PyList_GET_SIZE(msg)
            if hl < _INLINE_HEADER_MAX:
                need = _TASK_ENTRY_SIZE + hl
                first = 1
            else:
                need = _TASK_ENTRY_SIZE
                first = 0
            if used + need > cap:
                cap = max(2 * cap, used + need, 4096)
                grown = <unsigned char*>realloc(buf, cap)
                if grown == NULL:
                    raise MemoryError()
                buf = grown
            q = buf + used
            zc_put_u64(q, tid)
            zc_put_u64(q + 8, key)
            zc_put_u32(q + 16, timeout)
            if first:
                zc_put_u32(q + 20, <uint32_t>hl)
                zc_put_u32(q + 24, <uint32_t>(nmsg - 1))
                memcpy(q + _TASK_ENTRY_SIZE, PyBytes_AS_STRING(header), hl)
            else:
                zc_put_u32(q + 20, 0)
                zc_put_u32(q + 24, <uint32_t>nmsg)
            used += need
            size += need
            for k in range(first, nmsg):
                f = (<list>msg)[k]
                size += _frame_nbytes(f)
                PyList_Append(frames, f)
            n = len(chunk)
            PyList_Append(lengths, n)
            PyList_Append(sizes, size)
            ntasks += 1
            items += n
            nbytes += size
        table = PyBytes_FromStringAndSize(<char*>buf, used)
    finally:
        free(buf)
        if stats is not None and copied:
            stats.copied_bytes += copied
    return table, frames, lengths, sizes, stop
