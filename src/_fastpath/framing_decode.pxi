# Decode: the header reader, values, pickles, exceptions and ``decode``.
# Part of framing.pyx (included there); arrays and dtypes have their own
# files. The order of reads and checks is the pure twin's, so that both
# reject a message with the same text.

# Where a pickle is refused whatever allow_pickle says.
cdef enum:
    _PICKLE_OK = 0
    _PICKLE_IN_COMMAND = 1
    _PICKLE_IN_ARGS = 2


cdef struct Dec:
    const unsigned char* p      # the header frame's bytes
    Py_ssize_t n                # ... and their number
    Py_ssize_t pos              # offset of the next byte to read
    Py_ssize_t used             # buffer frames referenced so far
    Py_ssize_t nframes          # buffer frames in the message
    PyObject* frames            # the frames (borrowed: decode() holds them)
    PyObject* header            # the object whose memory p points into, or NULL...
    PyObject* lazy              # ... then a bytes copy made when needed (owned)
    PyObject* allow_pickle
    PyObject* copy_threshold
    PyObject* alignment
    bint threshold_c            # copy_threshold is an exact int, in threshold
    long long threshold
    int align_mode              # 0: dtype's, 1: align_c, 2: Python arithmetic
    Py_ssize_t align_c
    Py_ssize_t copied           # payload bytes copied, for decode's stats
    bint trusted                # rebuild exceptions (allow_pickle, not a COMMAND)
    int pickle_ban              # _PICKLE_*: where a pickle is refused anyway
    bint load                   # second pass: load pickles, rebuild exceptions
    Py_ssize_t deferred         # first pass: pickles and exceptions to load
    bint top                    # a ClusterRequest body is read as (payload, metadata)...
    bint unwrapped              # ... and was
    PyObject* shm               # a SharedMemory (borrowed), or NULL


cdef object _frame_data(object frame, const unsigned char** ptr, Py_ssize_t* size,
                        bint* writeable):
    """Point at a frame's bytes; returns the object that owns them (keep it)."""
    cdef Py_buffer view
    if type(frame) is bytes:
        ptr[0] = <const unsigned char*>PyBytes_AS_STRING(frame)
        size[0] = PyBytes_GET_SIZE(frame)
        writeable[0] = False
        return frame
    if isinstance(frame, Frame):
        ptr[0] = <const unsigned char*>libzmq.zmq_msg_data(&(<Frame>frame).zmq_msg)
        size[0] = <Py_ssize_t>libzmq.zmq_msg_size(&(<Frame>frame).zmq_msg)
        writeable[0] = True  # pyzmq exports a Frame's memory writeable
        return frame
    buf = _as_buffer(frame)  # a memoryview of format "B", as in the pure twin
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    ptr[0] = <const unsigned char*>view.buf
    size[0] = view.len
    writeable[0] = not view.readonly
    PyBuffer_Release(&view)  # the memoryview still holds its own export
    return buf


cdef Py_ssize_t _truncated_at(Dec* d, Py_ssize_t n, str what) except -1:
    raise _truncated(what, n, d.pos, d.n - d.pos)


cdef inline Py_ssize_t _take(Dec* d, Py_ssize_t n, str what) except -1:
    cdef Py_ssize_t start = d.pos
    if n > d.n - start:
        return _truncated_at(d, n, what)
    d.pos = start + n
    return start


cdef inline Py_ssize_t _u32(Dec* d, str what) except -1:
    return zc_get_u32(d.p + _take(d, 4, what))


cdef inline Py_ssize_t _items(Dec* d, str field, str what, Py_ssize_t per_item) except -1:
    """A u32 count (``field``) of ``what`` items, each at least ``per_item``
    bytes long: every allocation it leads to is bounded by the header's size."""
    cdef Py_ssize_t count = _u32(d, field)
    if count * per_item > d.n - d.pos:
        raise _count_error(what, count, per_item, d.pos, d.n - d.pos)
    return count


cdef object _header_obj(Dec* d):
    """The header as an object (a decode from raw memory makes a bytes copy
    the first time a slow path needs one; _release drops it)."""
    if d.header == NULL:
        obj = PyBytes_FromStringAndSize(<char*>d.p, d.n)
        Py_INCREF(obj)
        d.lazy = <PyObject*>obj
        d.header = d.lazy
    return <object>d.header


cdef inline void _release(Dec* d) noexcept:
    Py_XDECREF(d.lazy)
    d.lazy = NULL


cdef object _header_slice(Dec* d, Py_ssize_t start, Py_ssize_t n):
    """``header[start:start + n]`` of the pure twin: a memoryview slice."""
    return memoryview(_header_obj(d))[start:start + n]


cdef object _value(Dec* d, int depth):
    cdef Py_ssize_t start, n
    cdef unsigned char tag, code
    if depth > _MAX_DEPTH:
        raise _MFE(E_DEEP)
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
            raise _MFE(E_UTF8 % (start, exc)) from None
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
    if code == C_SPLIT:
        return _split_array(d, depth)
    if code == C_SHM:
        return _shm_array(d, depth)
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
        metadata = _value(d, depth + 1)
        if depth == 0 and d.top:
            d.unwrapped = True
            return (payload, metadata)
        return _Request(payload, metadata)
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
        return _scalar(d, depth)
    if code == C_EXCEPTION:
        return _exception(d, depth)
    if code == C_PICKLE:
        return _pickled(d)
    raise _MFE(E_TAG % (chr(tag), d.pos - 1))


cdef object _sequence(Dec* d, int depth, bint is_list):
    cdef Py_ssize_t count = _items(d, "a sequence count", "sequence", 1)
    cdef Py_ssize_t i
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
    cdef Py_ssize_t count = _items(d, "a dict count", "dict", 2)
    cdef Py_ssize_t i, key_at
    cdef dict out = {}
    for i in range(count):
        key_at = d.pos
        key = _value(d, depth + 1)
        value = _value(d, depth + 1)
        try:
            PyDict_SetItem(out, key, value)
        except TypeError:
            raise _MFE(E_UNHASHABLE % key_at) from None
    return out


cdef object _frame(Dec* d, bint for_array, Py_ssize_t at):
    cdef Py_ssize_t index = _u32(d, "a frame index")
    if index != d.used:
        raise _MFE(E_FRAME_ORDER % (_frame_user(for_array, at), index, d.used))
    if index >= d.nframes:
        raise _MFE(E_FRAME_RANGE % (_frame_user(for_array, at), index, d.nframes))
    d.used += 1
    return (<object>d.frames)[index + 1]


cdef str _frame_user(bint for_array, Py_ssize_t at):
    return ("array at offset %d" if for_array else "pickle at offset %d") % at


cdef object _exception(Dec* d, int depth):
    cdef Py_ssize_t at = d.pos - 1
    cdef int ban
    module = _value(d, depth + 1)
    qualname = _value(d, depth + 1)
    ban = d.pickle_ban
    d.pickle_ban = ban or _PICKLE_IN_ARGS
    try:
        args = _value(d, depth + 1)
    finally:
        d.pickle_ban = ban
    message = _value(d, depth + 1)
    fields = (module, qualname, args, message, _value(d, depth + 1))
    if d.trusted and not d.load:
        _exception_value(fields, at, False)  # checks the fields; imports nothing
        d.deferred += 1
        return None
    return _exception_value(fields, at, d.trusted)


cdef object _shm_array(Dec* d, int depth):
    """A shared-memory array (tag 'h'): read by the helper both twins
    call; mapped and claimed on the second pass only."""
    arr, end, copied = _decode_shm_array(None if d.shm == NULL else <object>d.shm,
                                         _as_buffer(_header_obj(d)), d.pos, depth, d.load,
                                         <object>d.alignment)
    d.pos = end
    d.copied += copied
    if not d.load:
        d.deferred += 1
    return arr


cdef object _pickled(Dec* d):
    cdef Py_ssize_t at = d.pos - 1
    cdef Py_ssize_t n, start, count, i
    if d.pickle_ban:
        raise _MFE((E_PICKLE_COMMAND if d.pickle_ban == _PICKLE_IN_COMMAND
                    else E_PICKLE_ARGS) % at)
    if not <object>d.allow_pickle:
        raise _MFE(E_PICKLE_REFUSED % at)
    n = _u32(d, "a pickle length")
    start = _take(d, n, "pickle data")
    data = _header_slice(d, start, n)
    count = _items(d, "a pickle buffer count", "pickle buffer", 4)
    buffers = []
    for i in range(count):
        buffers.append(_as_buffer(_frame(d, False, at)))
    if not d.load:
        d.deferred += 1
        return None
    try:
        return _pickle_loads(data, buffers=buffers)
    except Exception as exc:
        raise _MFE(E_PICKLE_LOAD % (at, type(exc).__name__, exc)) from None


cdef object _body(Dec* d):
    """The header body's value, checked to the last byte and frame."""
    d.pos = 16
    d.used = 0
    d.copied = 0
    d.deferred = 0
    try:
        obj = _value(d, 0)
    except _MFE:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        # numpy refusing what the header describes: still the peer's
        # fault, not ours.
        raise _MFE(E_NUMPY % (d.pos, type(exc).__name__, exc)) from None
    if d.pos != d.n:
        raise _MFE(E_TRAILING % (d.n - d.pos, d.pos))
    if d.used != d.nframes:
        raise _MFE(E_UNREFERENCED % (d.nframes - d.used))
    return obj


cdef object _start(Dec* d, object frames, object allow_pickle, object copy_threshold,
                   object alignment, int* kind_out, uint64_t* task_id_out):
    """Check the fixed header and set ``d`` up to read the body; returns the
    object owning the header's bytes (the caller keeps it alive)."""
    cdef bint writeable
    if not frames:
        raise _MFE(E_EMPTY)
    header = _frame_data(frames[0], &d.p, &d.n, &writeable)
    d.header = <PyObject*>header
    d.frames = <PyObject*>frames
    _start_at(d, len(frames) - 1, allow_pickle, copy_threshold, alignment, kind_out,
              task_id_out)
    return header


cdef int _start_raw(Dec* d, const unsigned char* p, Py_ssize_t n, object allow_pickle,
                    object alignment, int* kind_out, uint64_t* task_id_out) except -1:
    """``_start`` for a one-frame message given as memory (``p``, ``n``),
    which must outlive ``d``; the caller calls _release(d) at the end."""
    d.p = p
    d.n = n
    d.header = NULL
    d.frames = NULL  # (never read: the message has no buffer frames)
    _start_at(d, 0, allow_pickle, _COPY_THRESHOLD, alignment, kind_out, task_id_out)
    return 0


cdef int _start_at(Dec* d, Py_ssize_t arrived, object allow_pickle, object copy_threshold,
                   object alignment, int* kind_out, uint64_t* task_id_out) except -1:
    cdef int overflow
    cdef long long value
    cdef Py_ssize_t nframes
    cdef unsigned char kind
    d.lazy = NULL
    if d.n < 16:
        raise _MFE(E_SHORT % (d.n, HEADER_SIZE))
    if d.p[0] != M0 or d.p[1] != M1:
        raise _MFE(E_MAGIC % (PyBytes_FromStringAndSize(<char*>d.p, 2), _MAGIC))
    if d.p[2] != V_VERSION:
        raise _MFE(E_VERSION % (d.p[2], VERSION))
    kind = d.p[3]
    if not _KIND_OK[kind]:
        raise _MFE(E_KIND % kind)
    nframes = zc_get_u32(d.p + 4)
    if nframes != arrived:
        raise _MFE(E_NFRAMES % (nframes, arrived))
    kind_out[0] = kind
    task_id_out[0] = zc_get_u64(d.p + 8)

    d.nframes = nframes
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
    d.trusted = kind != KIND_COMMAND and bool(allow_pickle)
    d.pickle_ban = _PICKLE_IN_COMMAND if kind == KIND_COMMAND else _PICKLE_OK
    d.load = False
    d.top = False
    d.unwrapped = False
    d.shm = NULL
    return 0


cdef object _decode(object frames, object allow_pickle, object copy_threshold,
                   object alignment, Py_ssize_t* copied, object shm):
    """``decode`` without the stats: the payload bytes copied go to ``copied``."""
    cdef Dec d
    cdef int kind
    cdef uint64_t task_id
    header = _start(&d, frames, allow_pickle, copy_threshold, alignment, &kind, &task_id)
    if shm is not None:
        d.shm = <PyObject*>shm
    obj = _body(&d)
    if d.deferred:
        # The message holds pickles or exceptions to rebuild, and is valid:
        # decode it again, loading them this time.
        d.load = True
        obj = _body(&d)
    task_id_obj = PyLong_FromUnsignedLongLong(task_id)
    if task_id and (type(obj) is _Request or type(obj) is _Result):
        obj.task_id = task_id_obj
    copied[0] += d.copied
    return kind, task_id_obj, obj


def decode(frames, allow_pickle=True, copy_threshold=COPY_THRESHOLD, alignment=None,
           stats=None, shm=None):
    """Decode the frames of one message: returns ``(kind, task_id, obj)``.

    The compiled twin of ``zmq_cluster._framing_py.decode``, whose docstring
    states the contract (views and copies, alignment, trust, errors, copy
    accounting).
    """
    cdef Py_ssize_t copied = 0
    out = _decode(frames, allow_pickle, copy_threshold, alignment, &copied, shm)
    if stats is not None and copied:
        stats.copied_bytes += copied
    return out
