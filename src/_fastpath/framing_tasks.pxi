# Task-shaped messages, and the C interface of the module (see
# framing_api.pxi for what each function promises). Part of framing.pyx
# (included there).

cdef class _NotFast:
    def __repr__(self):
        return "NOT_FAST"


#: decode_ok's answer for a message it leaves to the full decoder.
NOT_FAST = _NotFast()
cdef object _NOT_FAST = NOT_FAST
cdef object _COPY_THRESHOLD = COPY_THRESHOLD
cdef object _KIND_REQUEST = KIND_REQUEST
cdef object _KIND_RESULT = KIND_RESULT
#: A ClusterResult's tag and its status "OK", as _enc writes them.
cdef bytes _RESULT_OK = bytes([TAG_RESULT, TAG_STR, 2, 0, 0, 0]) + b"OK"


cdef object _encode_request(object payload, object metadata, object task_id,
                            Py_ssize_t* copied, object shm):
    cdef unsigned char stack[_STACK_BYTES]
    cdef Writer w
    _writer(&w, stack, False)
    if shm is not None:
        w.shm = <PyObject*>shm
    frames = [None]
    try:
        _put_byte(&w, T_REQUEST)
        _enc(&w, payload, frames, 1)
        _enc(&w, metadata, frames, 1)
        _finish(&w, frames, _KIND_REQUEST, task_id)
    except BaseException:
        _shm_abandon(&w)
        raise
    finally:
        if w.heap:
            free(w.data)
    _shm_commit(&w)
    copied[0] += w.copied
    return frames


cdef object _metadata_prefix(object identity):
    cdef unsigned char stack[_STACK_BYTES]
    cdef Writer w
    cdef Py_ssize_t ignored = 0
    if type(identity) is not dict or "seconds" in identity:
        return None
    _writer(&w, stack, False)
    frames = [None]
    try:
        _put_count(&w, T_DICT, len(identity) + 1, "a dict")
        for key, value in (<dict>identity).items():
            _enc(&w, key, frames, 2)
            _enc(&w, value, frames, 2)
        _enc(&w, "seconds", frames, 2)
        if len(frames) != 1:
            return None  # an array with a frame of its own: not a constant
        return PyBytes_FromStringAndSize(<char*>w.data + 16, w.len - 16)
    except Exception:
        return None  # the result then goes the general way, and fails there
    finally:
        if w.heap:
            free(w.data)


cdef object _encode_ok(object output, object request_metadata, object prefix, double seconds,
                       uint64_t task_id, Py_ssize_t* copied, object shm):
    return _encode_ok_send(output, request_metadata, prefix, seconds, task_id, copied, NULL,
                           NULL, shm)


cdef object _encode_ok_send(object output, object request_metadata, object prefix,
                            double seconds, uint64_t task_id, Py_ssize_t* copied,
                            void* handle, send_fn send, object shm):
    cdef unsigned char stack[_STACK_BYTES]
    cdef Writer w
    cdef unsigned char* p
    cdef Py_ssize_t nbuf
    _writer(&w, stack, False)
    if shm is not None:
        w.shm = <PyObject*>shm
    frames = [None]
    try:
        _put_raw(&w, _RESULT_OK)
        _enc(&w, output, frames, 1)
        _enc(&w, request_metadata, frames, 1)
        _put_raw(&w, <bytes>prefix)
        p = _reserve(&w, 10)
        p[0] = T_FLOAT
        zc_put_u64(p + 1, zc_double_bits(seconds))
        p[9] = T_NONE  # the exception
        nbuf = len(frames) - 1
        if nbuf > _U32_MAX:
            raise _EncodeError(X_U32 % ("a message", nbuf, "buffer frames"))
        p = w.data
        p[0] = M0
        p[1] = M1
        p[2] = V_VERSION
        p[3] = <unsigned char>KIND_RESULT
        zc_put_u32(p + 4, <uint32_t>nbuf)
        zc_put_u64(p + 8, task_id)
        copied[0] += w.copied
        if nbuf == 0 and send != NULL:
            send(handle, w.data, w.len, 0)  # straight from the buffer
            _shm_commit(&w)
            return None
        frames[0] = PyBytes_FromStringAndSize(<char*>w.data, w.len)
        _shm_commit(&w)
    except BaseException:
        _shm_abandon(&w)
        raise
    finally:
        if w.heap:
            free(w.data)
    return frames


cdef object _task_body(Dec* d, uint64_t task_id, Py_ssize_t* copied):
    d.top = True
    obj = _body(d)
    if d.deferred:
        d.load = True
        d.unwrapped = False
        obj = _body(d)
    copied[0] += d.copied
    if d.unwrapped:
        return obj
    if task_id and type(obj) is _Result:
        obj.task_id = PyLong_FromUnsignedLongLong(task_id)
    return (obj, None)


cdef object _decode_task(object frames, object allow_pickle, object alignment,
                         Py_ssize_t* copied, int* kind, uint64_t* task_id, object shm):
    cdef Dec d
    header = _start(&d, frames, allow_pickle, _COPY_THRESHOLD, alignment, kind, task_id)
    if shm is not None:
        d.shm = <PyObject*>shm
    return _task_body(&d, task_id[0], copied)


cdef object _decode_task_raw(const unsigned char* p, Py_ssize_t n, object allow_pickle,
                             object alignment, Py_ssize_t* copied, int* kind,
                             uint64_t* task_id, object shm):
    cdef Dec d
    d.lazy = NULL
    try:
        _start_raw(&d, p, n, allow_pickle, alignment, kind, task_id)
        if shm is not None:
            d.shm = <PyObject*>shm
        return _task_body(&d, task_id[0], copied)
    finally:
        _release(&d)


cdef object _decode_ok(object frames, object allow_pickle, object alignment, int mode,
                       Py_ssize_t* copied):
    cdef Dec d
    cdef int kind
    cdef uint64_t task_id
    try:
        header = _start(&d, frames, allow_pickle, _COPY_THRESHOLD, alignment, &kind, &task_id)
    except Exception:
        return _NOT_FAST  # malformed: the full decoder says how
    return _ok_body(&d, mode, copied)


cdef object _decode_ok_raw(const unsigned char* p, Py_ssize_t n, object allow_pickle,
                           object alignment, int mode, Py_ssize_t* copied):
    cdef Dec d
    cdef int kind
    cdef uint64_t task_id
    d.lazy = NULL
    try:
        try:
            _start_raw(&d, p, n, allow_pickle, alignment, &kind, &task_id)
        except Exception:
            return _NOT_FAST
        return _ok_body(&d, mode, copied)
    finally:
        _release(&d)


cdef object _ok_body(Dec* d, int mode, Py_ssize_t* copied):
    try:
        if d.n < 24 or memcmp(d.p + 16, PyBytes_AS_STRING(_RESULT_OK), 8) != 0:
            return _NOT_FAST
        d.pos = 24
        d.used = 0
        d.copied = 0
        d.deferred = 0
        payload = _value(d, 1)
        if mode == 1:
            if not (_skip(d, 1) and _skip(d, 1)):
                return _NOT_FAST
        else:
            request_metadata = _value(d, 1)
            metadata = _value(d, 1)
        if d.pos >= d.n or d.p[d.pos] != T_NONE:
            return _NOT_FAST  # an exception on an OK result: the full decoder's
        d.pos += 1
    except Exception:
        return _NOT_FAST  # malformed: the full decoder says how
    if d.pos != d.n or d.used != d.nframes or d.deferred:
        return _NOT_FAST
    copied[0] += d.copied
    if mode == 1:
        return payload
    return (payload, request_metadata, metadata)


cdef bint _skip(Dec* d, int depth) noexcept:
    """Step over the value at ``d.pos`` and say True when decoding it would
    succeed, with no side effect (plain values: None, bools, numbers, bytes,
    ASCII strs, and lists, tuples and dicts of them); False when it is
    something else, or malformed, or not certain: then the caller decodes in
    full."""
    cdef unsigned char code
    cdef Py_ssize_t n, i, start
    if depth > _MAX_DEPTH or d.pos >= d.n:
        return False
    code = _CODE[d.p[d.pos]]
    d.pos += 1
    if code == C_NONE or code == C_TRUE or code == C_FALSE:
        return True
    if code == C_INT or code == C_FLOAT:
        return _skip_bytes(d, 8)
    if code == C_COMPLEX:
        return _skip_bytes(d, 16)
    if code == C_STR or code == C_BYTES or code == C_BIGINT:
        if d.n - d.pos < 4:
            return False
        n = zc_get_u32(d.p + d.pos)
        d.pos += 4
        start = d.pos
        if not _skip_bytes(d, n):
            return False
        if code == C_STR:
            for i in range(start, start + n):
                if d.p[i] >= 0x80:
                    return False  # UTF-8 to check: the decoder's job
        return True
    if code == C_LIST or code == C_TUPLE or code == C_DICT:
        if d.n - d.pos < 4:
            return False
        n = zc_get_u32(d.p + d.pos)
        d.pos += 4
        if n * (2 if code == C_DICT else 1) > d.n - d.pos:
            return False
        for i in range(n):
            if code == C_DICT:
                # A key must be hashable: a scalar (a tuple key is left to
                # the decoder).
                if d.pos >= d.n or not _SCALAR_KEY[d.p[d.pos]]:
                    return False
                if not _skip(d, depth + 1):
                    return False
            if not _skip(d, depth + 1):
                return False
        return True
    return False


cdef inline bint _skip_bytes(Dec* d, Py_ssize_t n) noexcept:
    if n > d.n - d.pos:
        return False
    d.pos += n
    return True


cdef bint _SCALAR_KEY[256]


def _init_scalar_keys():
    cdef int i
    for i in range(256):
        _SCALAR_KEY[i] = False
    for tag in (TAG_NONE, TAG_TRUE, TAG_FALSE, TAG_INT, TAG_BIGINT, TAG_FLOAT, TAG_COMPLEX,
                TAG_STR, TAG_BYTES):
        _SCALAR_KEY[tag] = True


_init_scalar_keys()


# ------------------------------------------------------------- the C interface

cdef FramingAPI _api
_api.size = sizeof(FramingAPI)
_api.encode = _encode
_api.decode = _decode
_api.encode_request = _encode_request
_api.metadata_prefix = _metadata_prefix
_api.encode_ok = _encode_ok
_api.encode_ok_send = _encode_ok_send
_api.decode_task = _decode_task
_api.decode_task_raw = _decode_task_raw
_api.decode_ok = _decode_ok
_api.decode_ok_raw = _decode_ok_raw
_api.not_fast = <PyObject*>_NOT_FAST

#: The FramingAPI struct, for the compiled wire module.
_C_API = PyCapsule_New(<void*>&_api, "zmq_cluster._fastpath.framing._C_API", NULL)


def metadata_prefix(identity):
    """The bytes of ``dict(identity, seconds=x)`` up to ``x`` (for tests)."""
    return _metadata_prefix(identity)


def encode_request(payload, metadata, task_id=0, shm=None):
    """The frames of ``ClusterRequest(payload, metadata)`` as a REQUEST
    (for tests)."""
    cdef Py_ssize_t copied = 0
    return _encode_request(payload, metadata, task_id, &copied, shm)


def encode_ok(output, request_metadata, prefix, double seconds, uint64_t task_id=0, shm=None):
    """The frames of an OK ClusterResult (see framing_api.pxi; for tests)."""
    cdef Py_ssize_t copied = 0
    return _encode_ok(output, request_metadata, prefix, seconds, task_id, &copied, shm)


def decode_task(frames, allow_pickle=True, alignment=None, shm=None):
    """``(kind, task_id, payload, metadata)`` (see framing_api.pxi; for tests)."""
    cdef Py_ssize_t copied = 0
    cdef int kind = 0
    cdef uint64_t task_id = 0
    payload, metadata = _decode_task(frames, allow_pickle, alignment, &copied, &kind, &task_id,
                                     shm)
    return kind, task_id, payload, metadata


def decode_ok(frames, allow_pickle=True, alignment=None, int mode=1):
    """An OK result's payload, or NOT_FAST (see framing_api.pxi; for tests)."""
    cdef Py_ssize_t copied = 0
    return _decode_ok(frames, allow_pickle, alignment, mode, &copied)
