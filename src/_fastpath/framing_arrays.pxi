# Arrays, both directions. Part of framing.pyx (included there).
#
# Decoding an array is three steps, whatever the form: read and check its
# fields (_read_shape: ndim, shape, order, the limits), find its bytes (the
# header for 'A', a frame for 'a'), and make the array (_on: a view on the
# bytes, or _copied: an aligned copy). Where the bytes come from is the
# only step that differs between the forms.

# ------------------------------------------------------------------ encode

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
    """The bytes of a C- or Fortran-contiguous array as a flat uint8 array
    (a view): ``zmq_cluster._framing_buffers.frame_buffer``, compiled."""
    if type(arr) is cnp.ndarray and cnp.PyArray_FLAGS(<cnp.ndarray>arr) & (
            cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_F_CONTIGUOUS):
        return _frame_buffer(<cnp.ndarray>arr)
    return _py_frame_buffer(arr)


cdef int _enc_array(Writer* w, cnp.ndarray arr, list bufs, int depth) except -1:
    """Write an ndarray; 0 (nothing written) when it has no native form (a
    dtype outside the grammar, or of item size 0), else 1."""
    cdef cnp.dtype dtype = <cnp.dtype>cnp.PyArray_DESCR(arr)
    cdef int flags = cnp.PyArray_FLAGS(arr)
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(arr)
    cdef unsigned char order
    cdef unsigned char* p
    cdef const char* src
    cdef int nd
    cdef Py_ssize_t i, count
    cdef cnp.npy_intp* dims
    value = _dtype_header(dtype)
    if value is None or dtype.itemsize == 0:
        return 0
    if _has_text(dtype) and _array_bad_code_points(arr):
        raise _EncodeError(X_CODE_POINT % dtype)
    if flags & cnp.NPY_ARRAY_C_CONTIGUOUS:
        order = O_C
    elif flags & cnp.NPY_ARRAY_F_CONTIGUOUS:
        order = O_F
    else:
        order = 0  # neither: written in C order, from a copy
    nd = cnp.PyArray_NDIM(arr)
    if (w.shm != NULL and nbytes >= (<object>w.shm).min_bytes and type(value) is bytes):
        raw = _encode_shm_array(<object>w.shm, arr, value, depth)
        if raw is not None:
            w.shm_puts += 1
            _put_raw(w, <bytes>raw)
            w.copied += nbytes
            return 1
    if nbytes < _INLINE_LIMIT:
        # Inline: the elements go into the header, straight from the array's
        # memory (one copy; tobytes() gives C order for the others).
        _put_byte(w, T_INLINE)
        _put_dtype(w, value, bufs, depth + 1)
        if order == 0:
            raw = arr.tobytes()
            src = PyBytes_AS_STRING(raw)
            order = O_C
        else:
            src = <const char*>cnp.PyArray_DATA(arr)
        dims = cnp.PyArray_DIMS(arr)
        p = _reserve(w, 2 + 8 * nd + nbytes)
        p[0] = <unsigned char>nd
        for i in range(nd):
            zc_put_u64(p + 1 + 8 * i, <uint64_t>dims[i])
        p[1 + 8 * nd] = order
        memcpy(p + 2 + 8 * nd, src, nbytes)
        w.copied += nbytes
        return 1
    if order == 0:
        arr = np.ascontiguousarray(arr)
        order = O_C
        w.copied += nbytes
    if nbytes > _SPLIT_BYTES:
        # Split: frames of SPLIT_BYTES (the last holds the rest), each a
        # view of the array's memory.
        count = (nbytes + _SPLIT_BYTES - 1) // _SPLIT_BYTES
        if count > _U32_MAX:
            raise _EncodeError(X_U32 % ("an array", count, "buffer frames"))
        _put_byte(w, T_SPLIT)
        _put_u32(w, len(bufs) - 1)
        _put_u32(w, count)
    else:
        _put_byte(w, T_ARRAY)
        _put_u32(w, len(bufs) - 1)  # past U32_MAX, encode() refuses the frame count
    _put_dtype(w, value, bufs, depth + 1)
    dims = cnp.PyArray_DIMS(arr)
    p = _reserve(w, 2 + 8 * nd)
    p[0] = <unsigned char>nd
    for i in range(nd):
        zc_put_u64(p + 1 + 8 * i, <uint64_t>dims[i])
    p[1 + 8 * nd] = order
    flat = _frame_buffer(arr)
    if nbytes > _SPLIT_BYTES:
        for i in range(0, nbytes, _SPLIT_BYTES):
            bufs.append(flat[i:i + _SPLIT_BYTES])
    else:
        bufs.append(flat)
    return 1


# ------------------------------------------------------------------ decode

cdef struct Shape:
    cnp.npy_intp dims[_MAX_NDIM]
    int ndim
    Py_ssize_t shape_at         # header offset of the u64 shape
    Py_ssize_t nbytes           # prod(shape) * itemsize: within the limits
    bint zero                   # a dim is 0 (nbytes is 0 then)
    unsigned char order         # O_C or O_F


cdef int _read_shape(Dec* d, Py_ssize_t at, cnp.dtype dtype, Shape* s) except -1:
    """An array's ndim, shape and order fields, checked against the limits
    (the pure twin's ``array_fields``), and its size in bytes."""
    cdef int i
    cdef uint64_t dim, count = 1, itemsize = <uint64_t>dtype.itemsize
    cdef bint overflow = False
    s.ndim = d.p[_take(d, 1, "an array's ndim")]
    if s.ndim > _MAX_NDIM:
        raise _MFE(E_NDIM % (at, s.ndim))
    s.shape_at = _take(d, 8 * s.ndim, "a shape")
    s.zero = False
    for i in range(s.ndim):
        dim = zc_get_u64(d.p + s.shape_at + 8 * i)
        s.dims[i] = <cnp.npy_intp>dim
        if dim == 0:
            s.zero = True
        elif not overflow:
            if count > <uint64_t>NPY_MAX_INTP // dim:
                overflow = True
            else:
                count *= dim
    s.order = d.p[_take(d, 1, "an array's order")]
    if s.order != O_C and s.order != O_F:
        raise _MFE(E_ORDER % (at, chr(s.order)))
    if itemsize == 0:
        raise _MFE(E_ITEMSIZE0 % (at, dtype))
    if overflow or count > <uint64_t>NPY_MAX_INTP // itemsize:
        raise _MFE(E_TOO_BIG % (at, _shape_text(_shape_of(d, s)), dtype))
    s.nbytes = 0 if s.zero else <Py_ssize_t>(count * itemsize)
    return 0


cdef inline bint _simple(Shape* s, cnp.dtype dtype):
    """Whether PyArray_NewFromDescr builds the array the pure twin's
    view + reshape would (else the pure twin's numpy calls run)."""
    return not s.zero and not cnp.PyDataType_HASSUBARRAY(dtype)


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
    # Empty arrays: the pure twin's numpy calls.
    return flat.view(dtype).reshape(_shape_of(d, s), order="F" if s.order == O_F else "C")


cdef inline Py_ssize_t _lcm64(Py_ssize_t align):
    """big_alignment() for an alignment in C: a multiple of it and of 64."""
    cdef Py_ssize_t a = align, b = _ARRAY_ALIGNMENT, t
    while b:
        t = a % b
        a = b
        b = t
    return align // a * _ARRAY_ALIGNMENT


cdef Py_ssize_t _align_of(Dec* d, cnp.dtype dtype, Py_ssize_t nbytes):
    """The alignment a received array of ``nbytes`` needs, when that fits
    in C (``align_mode`` 0 or 1): the asked one or the dtype's, and 64 from
    ALIGNED_BYTES up."""
    cdef Py_ssize_t align = dtype.alignment if d.align_mode == 0 else d.align_c
    if nbytes >= _ALIGNED_BYTES and align % _ARRAY_ALIGNMENT:
        return _lcm64(align)
    return align


cdef object _copied(Dec* d, Shape* s, cnp.dtype dtype, const unsigned char* src):
    """An aligned, writeable copy of the ``s.nbytes`` bytes at ``src`` as the
    array ``s`` describes: the pure twin's ``aligned_empty`` + view."""
    flat = _aligned_for(d, s, dtype)
    if flat is None:
        # The hot case: numpy allocates the array, one memcpy fills it.
        Py_INCREF(dtype)  # PyArray_NewFromDescr steals it
        arr = _new_from_descr(
            _ndarray_type, <cnp.PyArray_Descr*>dtype, s.ndim, s.dims, NULL, NULL,
            cnp.NPY_ARRAY_F_CONTIGUOUS if s.order == O_F else 0, NULL)
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>arr), src, <cnp.npy_intp>s.nbytes)
        return arr
    memcpy(cnp.PyArray_DATA(<cnp.ndarray>flat), src, <cnp.npy_intp>s.nbytes)
    return _on(d, s, dtype, flat)


cdef object _aligned_for(Dec* d, Shape* s, cnp.dtype dtype):
    """Uninitialised memory for the array ``s`` describes, aligned as the
    pure twin's ``aligned_empty`` makes it: a flat uint8 array, or None when
    numpy's own allocation of the array itself is aligned enough."""
    cdef Py_ssize_t align = 0
    cdef cnp.npy_intp n = <cnp.npy_intp>s.nbytes
    if d.align_mode != 2:
        align = _align_of(d, dtype, s.nbytes)
    if d.align_mode != 2 and 16 % align == 0:  # numpy's allocator gives 16
        if _simple(s, dtype):
            return None
        return cnp.PyArray_SimpleNew(1, &n, cnp.NPY_UINT8)
    if d.align_mode == 2:
        if s.nbytes >= _ALIGNED_BYTES:
            return _aligned_empty(s.nbytes, _big_alignment(<object>d.alignment))
        return _aligned_empty(s.nbytes, <object>d.alignment)
    return _aligned_empty(s.nbytes, align)


cdef object _inline_array(Dec* d, int depth):
    cdef Py_ssize_t at = d.pos - 1
    cdef Py_ssize_t start
    cdef Shape s
    # Same order as the pure twin: dtype, fields and limits, then the bytes.
    dtype = _dtype(d, depth)
    _read_shape(d, at, dtype, &s)
    start = _take(d, s.nbytes, "an inline array")
    if _has_text(dtype) and _bad_code_points(_header_slice(d, start, s.nbytes), dtype):
        raise _MFE(E_CODE_POINT % ("array", at, dtype))
    d.copied += s.nbytes
    return _copied(d, &s, dtype, d.p + start)


cdef object _array(Dec* d, int depth):
    cdef Py_ssize_t at = d.pos - 1
    cdef const unsigned char* fp = NULL
    cdef Py_ssize_t fsize = 0
    cdef bint fwrite = False, copy
    cdef Shape s
    # Same order as the pure twin: frame, dtype, fields and limits.
    frame = _frame(d, True, at)
    owner = _frame_data(frame, &fp, &fsize, &fwrite)
    dtype = _dtype(d, depth)
    _read_shape(d, at, dtype, &s)
    if s.nbytes != fsize:
        raise _MFE(E_FRAME_SIZE % (at, _shape_text(_shape_of(d, &s)), dtype, s.nbytes, fsize))
    if _has_text(dtype) and _bad_code_points(_as_buffer(owner), dtype):
        raise _MFE(E_CODE_POINT % ("array", at, dtype))
    # A view on the frame, or an aligned copy: the pure twin's rule.
    if d.threshold_c:
        copy = <long long>s.nbytes < d.threshold
    else:
        copy = bool(<object>s.nbytes < <object>d.copy_threshold)
    if not copy:
        if d.align_mode == 2:
            align_obj = <object>d.alignment
            if s.nbytes >= _ALIGNED_BYTES:
                align_obj = _big_alignment(align_obj)
            copy = bool(PyLong_FromVoidPtr(<void*>fp) % align_obj)
        else:
            copy = (<uintptr_t>fp) % <uintptr_t>_align_of(d, dtype, s.nbytes) != 0
        copy = copy or not fwrite
    if copy:
        d.copied += s.nbytes
        if s.nbytes >= _ALIGNED_BYTES:  # the pure twin's rule: recycled memory
            if d.align_mode == 2:
                flat = _assembly_buffer(s.nbytes, _big_alignment(<object>d.alignment))
            else:
                flat = _assembly_buffer(s.nbytes, _align_of(d, dtype, s.nbytes))
            memcpy(cnp.PyArray_DATA(<cnp.ndarray>flat), fp, <cnp.npy_intp>s.nbytes)
            return _on(d, &s, dtype, flat)
        return _copied(d, &s, dtype, fp)
    return _on(d, &s, dtype, _np_frombuffer(owner, _np_uint8))


cdef object _split_array(Dec* d, int depth):
    cdef Py_ssize_t at = d.pos - 1
    cdef Py_ssize_t first, count, last, i, held = 0, start = 0
    cdef const unsigned char* fp = NULL
    cdef Py_ssize_t fsize = 0
    cdef bint fwrite = False
    cdef Shape s
    cdef unsigned char* dest
    # Same order as the pure twin: frame index and count, dtype, fields and
    # limits, then the frames' sizes, all before allocating.
    first = _u32(d, "a frame index")
    count = _u32(d, "a frame count")
    if first != d.used:
        raise _MFE(E_FRAME_ORDER % (_frame_user(True, at), first, d.used))
    if count == 0:
        raise _MFE(E_SPLIT_COUNT % at)
    last = first + count - 1
    if last >= d.nframes:
        raise _MFE(E_FRAME_RANGE % (_frame_user(True, at), last, d.nframes))
    d.used += count
    frames = <object>d.frames
    owners = []
    for i in range(first + 1, last + 2):
        owners.append(_frame_data(frames[i], &fp, &fsize, &fwrite))
        held += fsize
    dtype = _dtype(d, depth)
    _read_shape(d, at, dtype, &s)
    if held != s.nbytes:
        raise _MFE(E_SPLIT_SIZE % (at, _shape_text(_shape_of(d, &s)), dtype, s.nbytes, count,
                                   held))
    # Assembled: one aligned array, one memcpy per frame.
    if s.nbytes >= _ALIGNED_BYTES:
        if d.align_mode == 2:
            flat = _assembly_buffer(s.nbytes, _big_alignment(<object>d.alignment))
        else:
            flat = _assembly_buffer(s.nbytes, _align_of(d, dtype, s.nbytes))
    else:
        flat = _aligned_for(d, &s, dtype)
    if flat is None:
        Py_INCREF(dtype)  # PyArray_NewFromDescr steals it
        out = _new_from_descr(
            _ndarray_type, <cnp.PyArray_Descr*>dtype, s.ndim, s.dims, NULL, NULL,
            cnp.NPY_ARRAY_F_CONTIGUOUS if s.order == O_F else 0, NULL)
        dest = <unsigned char*>cnp.PyArray_DATA(<cnp.ndarray>out)
    else:
        dest = <unsigned char*>cnp.PyArray_DATA(<cnp.ndarray>flat)
    for i in range(first + 1, last + 2):
        owner = _frame_data(frames[i], &fp, &fsize, &fwrite)
        if fsize:
            memcpy(dest + start, fp, fsize)
        start += fsize
    if flat is not None:
        if _has_text(dtype) and _bad_code_points(flat, dtype):
            raise _MFE(E_CODE_POINT % ("array", at, dtype))
        out = _on(d, &s, dtype, flat)
    elif _has_text(dtype) and _bad_code_points(_np_frombuffer(out, _np_uint8), dtype):
        raise _MFE(E_CODE_POINT % ("array", at, dtype))
    d.copied += s.nbytes
    return out


cdef object _scalar(Dec* d, int depth):
    cdef Py_ssize_t at = d.pos - 1
    cdef Py_ssize_t n, start
    cdef cnp.dtype dtype = _dtype(d, depth)
    n = _u32(d, "a scalar length")
    start = _take(d, n, "a scalar")
    if n != dtype.itemsize:
        raise _MFE(E_SCALAR % (dtype, n, dtype.itemsize))
    if n == 0:  # an empty str_, bytes_ or void: zeros, one item
        return _np_zeros((), dtype)[()]
    data = _header_slice(d, start, n)
    if _has_text(dtype) and _bad_code_points(data, dtype):
        raise _MFE(E_CODE_POINT % ("scalar", at, dtype))
    return _np_frombuffer(data, dtype)[0]


cdef inline tuple _shape_of(Dec* d, Shape* s):
    return tuple([PyLong_FromUnsignedLongLong(zc_get_u64(d.p + s.shape_at + 8 * i))
                  for i in range(s.ndim)])


cdef str _shape_text(tuple shape):
    return "x".join(map(str, shape)) or "scalar"
