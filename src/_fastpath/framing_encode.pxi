# Encode: the header writer, values, exceptions, pickles and ``encode``.
# Part of framing.pyx (included there); arrays and dtypes have their own
# files.

cdef struct Writer:
    unsigned char* data
    Py_ssize_t len
    Py_ssize_t cap
    bint heap
    Py_ssize_t copied           # payload bytes copied, for encode's stats
    bint native_only            # raise EncodeError instead of pickling
    bint in_command             # ... because the message is a COMMAND
    PyObject* shm               # a SharedMemory (borrowed: the caller holds it), or NULL
    Py_ssize_t shm_puts         # arrays put in its slots (freed again if encoding fails)


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


cdef inline int _put_byte(Writer* w, unsigned char b) except -1:
    _reserve(w, 1)[0] = b
    return 0


cdef inline int _put_count(Writer* w, unsigned char tag, Py_ssize_t n, str what) except -1:
    cdef unsigned char* p
    if n > _U32_MAX:
        raise _EncodeError(X_U32 % (what, n, "items"))
    p = _reserve(w, 5)
    p[0] = tag
    zc_put_u32(p + 1, <uint32_t>n)
    return 0


cdef inline int _put_u32(Writer* w, Py_ssize_t n) except -1:
    zc_put_u32(_reserve(w, 4), <uint32_t>n)  # n <= _U32_MAX: callers check
    return 0


cdef inline int _put_blob(Writer* w, unsigned char tag, const char* data,
                          Py_ssize_t n, str what) except -1:
    cdef unsigned char* p
    if n > _U32_MAX:
        raise _EncodeError(X_U32 % (what, n, "bytes"))
    p = _reserve(w, 5 + n)
    p[0] = tag
    zc_put_u32(p + 1, <uint32_t>n)
    memcpy(p + 5, data, n)
    return 0


cdef inline int _put_raw(Writer* w, bytes raw) except -1:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    memcpy(_reserve(w, n), PyBytes_AS_STRING(raw), n)
    return 0


cdef int _enc(Writer* w, object obj, list bufs, int depth) except -1:
    # Exact type checks, as in the pure twin: a subclass is pickled.
    cdef type t = type(obj)
    cdef unsigned char* p
    cdef long long v
    cdef int overflow
    cdef Py_ssize_t n, i
    cdef const char* s
    cdef PyObject* kp
    cdef PyObject* vp
    if depth > _MAX_DEPTH:
        raise _EncodeError(X_DEEP)
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
            _put_blob(w, T_BIGINT, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), "a big int")
    elif t is str:
        s = zc_ascii(obj, &n)
        if s != NULL:
            _put_blob(w, T_STR, s, n, "a str")
        else:
            raw = (<str>obj).encode("utf-8", "surrogatepass")
            _put_blob(w, T_STR, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), "a str")
    elif t is dict:
        n = PyDict_Size(obj)
        _put_count(w, T_DICT, n, "a dict")
        i = 0
        while PyDict_Next(obj, &i, &kp, &vp):
            key = <object>kp
            value = <object>vp
            _enc(w, key, bufs, depth + 1)
            _enc(w, value, bufs, depth + 1)
            if PyDict_Size(obj) != n:
                raise RuntimeError("dictionary changed size during iteration")
    elif t is bool:
        _put_byte(w, T_TRUE if obj is True else T_FALSE)
    elif t is float:
        p = _reserve(w, 9)
        p[0] = T_FLOAT
        zc_put_u64(p + 1, zc_double_bits(PyFloat_AS_DOUBLE(obj)))
    elif t is bytes:
        _put_blob(w, T_BYTES, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj), "bytes")
    elif t is list:
        _put_count(w, T_LIST, PyList_GET_SIZE(obj), "a list")
        i = 0
        while i < PyList_GET_SIZE(obj):  # a list iterator's semantics
            item = <object>PyList_GET_ITEM(obj, i)
            _enc(w, item, bufs, depth + 1)
            i += 1
    elif t is tuple:
        n = PyTuple_GET_SIZE(obj)
        _put_count(w, T_TUPLE, n, "a tuple")
        for i in range(n):
            _enc(w, <object>PyTuple_GET_ITEM(obj, i), bufs, depth + 1)
    elif t is cnp.ndarray:
        if not _enc_array(w, <cnp.ndarray>obj, bufs, depth):
            _enc_pickle(w, obj, bufs)
    elif t is _Request:
        _put_byte(w, T_REQUEST)
        _enc(w, obj.payload, bufs, depth + 1)
        _enc(w, obj.metadata, bufs, depth + 1)
    elif t is _Result:
        _put_byte(w, T_RESULT)
        _enc(w, obj.status, bufs, depth + 1)
        _enc(w, obj.payload, bufs, depth + 1)
        _enc(w, obj.request_metadata, bufs, depth + 1)
        _enc(w, obj.metadata, bufs, depth + 1)
        _enc(w, obj.exception, bufs, depth + 1)
    elif t is complex:
        p = _reserve(w, 17)
        p[0] = T_COMPLEX
        zc_put_u64(p + 1, zc_double_bits(PyComplex_RealAsDouble(obj)))
        zc_put_u64(p + 9, zc_double_bits(PyComplex_ImagAsDouble(obj)))
    elif isinstance(obj, BaseException):
        _enc_exception(w, obj, bufs, depth)
    elif not (isinstance(obj, _np_generic) and t.__module__ == "numpy"
              and _enc_scalar(w, obj, bufs, depth)):
        _enc_pickle(w, obj, bufs)  # no native form
    return 0


cdef int _enc_scalar(Writer* w, object obj, list bufs, int depth) except -1:
    """Write a numpy scalar; False when its dtype has no native form."""
    if obj.dtype.hasobject:
        return False
    # asarray: an empty str_/bytes_ scalar has dtype '<U0'/'|S0' but
    # tobytes() gives one (zero) character; the array form agrees.
    scalar = np.asarray(obj)
    value = _dtype_header(<cnp.dtype>scalar.dtype)
    if value is None:
        return False
    if _has_text(<cnp.dtype>scalar.dtype) and _array_bad_code_points(scalar):
        raise _EncodeError(X_CODE_POINT % scalar.dtype)
    raw = scalar.tobytes()
    _put_byte(w, T_SCALAR)
    _put_dtype(w, value, bufs, depth + 1)
    _put_u32(w, len(raw))  # an item size: at most MAX_ITEMSIZE
    _put_raw(w, raw)
    return True


cdef int _enc_exception(Writer* w, object exc, list bufs, int depth) except -1:
    cdef Py_ssize_t mark_len, mark_bufs, mark_copied
    cdef bint native_only
    cdef PyObject* shm
    module, qualname, args, message, tb = _exception_fields(exc)
    _put_byte(w, T_EXCEPTION)
    _enc(w, module, bufs, depth + 1)
    _enc(w, qualname, bufs, depth + 1)
    if args is None:
        _put_byte(w, T_NONE)
    else:
        # The args only when every one is native: else N, and the receiver
        # builds the exception from its message.
        mark_len, mark_bufs, mark_copied = w.len, len(bufs), w.copied
        native_only = w.native_only
        shm = w.shm
        w.native_only = True
        w.shm = NULL  # (args rolled back must not hold a slot)
        try:
            _enc(w, list(args), bufs, depth + 1)
        except EncodeError:
            w.len = mark_len
            del bufs[mark_bufs:]
            w.copied = mark_copied
            _put_byte(w, T_NONE)
        finally:
            w.native_only = native_only
            w.shm = shm
    _enc(w, message, bufs, depth + 1)
    _enc(w, tb, bufs, depth + 1)
    return 0


cdef int _enc_pickle(Writer* w, object obj, list bufs) except -1:
    if w.native_only:
        if w.in_command:
            raise _EncodeError(X_COMMAND % type(obj).__name__)
        raise _EncodeError(X_PICKLE % (type(obj).__name__, "it has no native encoding"))
    out_of_band = []
    try:
        data = _pickle_dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=out_of_band.append)
    except Exception as exc:
        raise _EncodeError(X_PICKLE % (type(obj).__name__, exc)) from exc
    _put_blob(w, T_PICKLE, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), "a pickle")
    _put_u32(w, len(out_of_band))  # fewer than the pickle's bytes
    for pickle_buffer in out_of_band:
        _put_u32(w, len(bufs) - 1)
        bufs.append(pickle_buffer.raw())
    return 0


cdef int _put_header(Writer* w, object kind, Py_ssize_t nbuf, object task_id) except -1:
    cdef long long k
    cdef int overflow
    cdef unsigned long long tid
    cdef unsigned char* p = w.data
    if type(kind) is int and type(task_id) is int:
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


cdef inline void _writer(Writer* w, unsigned char* stack, bint in_command) noexcept:
    w.data = stack
    w.len = 16  # the fixed header, written last
    w.cap = _STACK_BYTES
    w.heap = False
    w.copied = 0
    w.in_command = w.native_only = in_command
    w.shm = NULL
    w.shm_puts = 0


cdef list _finish(Writer* w, list frames, object kind, object task_id):
    """Write the fixed header and make the header frame (``frames[0]``)."""
    cdef Py_ssize_t nbuf = len(frames) - 1
    if nbuf > _U32_MAX:
        raise _EncodeError(X_U32 % ("a message", nbuf, "buffer frames"))
    _put_header(w, kind, nbuf, task_id)
    frames[0] = PyBytes_FromStringAndSize(<char*>w.data, w.len)
    return frames


cdef object _encode(object obj, object kind, object task_id, Py_ssize_t* copied, object shm):
    """``encode`` without the checks of ``kind`` and the stats: the payload
    bytes copied are added to ``copied``."""
    cdef unsigned char stack[_STACK_BYTES]
    cdef Writer w
    _writer(&w, stack, kind == KIND_COMMAND)
    if shm is not None:
        w.shm = <PyObject*>shm
    frames = [None]  # item 0 becomes the header frame
    try:
        _enc(&w, obj, frames, 0)
        _finish(&w, frames, kind, task_id)
    except BaseException:
        _shm_abandon(&w)
        raise
    finally:
        if w.heap:
            free(w.data)
    _shm_commit(&w)
    copied[0] += w.copied
    return frames


cdef inline int _shm_commit(Writer* w) except -1:
    """The slots this encoding took are in its message."""
    if w.shm_puts:
        (<object>w.shm).commit()
    return 0


cdef int _shm_abandon(Writer* w) except -1:
    """Encoding failed: free the slots it took."""
    if w.shm_puts:
        (<object>w.shm).abandon()
    return 0


def encode(obj, kind, task_id=0, stats=None, shm=None):
    """Encode ``obj`` as the frames of one message of ``kind``.

    The compiled twin of ``zmq_cluster._framing_py.encode``, whose docstring
    states the contract (frames, errors, copy accounting).
    """
    cdef Py_ssize_t copied = 0
    if kind not in _KINDS:
        raise ValueError("unknown message kind %r" % (kind,))
    frames = _encode(obj, kind, task_id, &copied, shm)
    if stats is not None and copied:
        stats.copied_bytes += copied
    return frames
