# Receiving and sending whole messages: the wire primitives (included by wire.pyx).

cdef enum:
    _STACK_PARTS = 8
    _STACK_ITEMS = 4
    _TIMEOUT = -2       # the poll timed out
    _ERROR = -3         # errno in Parts.err


cdef struct Parts:
    zmq_msg_t* msgs     # stack, or heap when more than _STACK_PARTS
    int n               # parts received (each initialized)
    int cap
    int err
    zmq_msg_t stack[_STACK_PARTS]


cdef inline void _parts_init(Parts* p) noexcept nogil:
    p.msgs = p.stack
    p.n = 0
    p.cap = _STACK_PARTS
    p.err = 0


cdef void _parts_close(Parts* p) noexcept nogil:
    cdef int i
    for i in range(p.n):
        libzmq.zmq_msg_close(&p.msgs[i])
    if p.msgs != p.stack:
        free(p.msgs)
    p.msgs = p.stack
    p.n = 0
    p.cap = _STACK_PARTS


cdef int _parts_grow(Parts* p) noexcept nogil:
    cdef int cap = p.cap * 2
    cdef int i
    cdef zmq_msg_t* msgs = <zmq_msg_t*>malloc(cap * sizeof(zmq_msg_t))
    if msgs == NULL:
        return -1
    for i in range(p.n):
        libzmq.zmq_msg_init(&msgs[i])
        libzmq.zmq_msg_move(&msgs[i], &p.msgs[i])
        libzmq.zmq_msg_close(&p.msgs[i])
    if p.msgs != p.stack:
        free(p.msgs)
    p.msgs = msgs
    p.cap = cap
    return 0


cdef int _recv_parts(void* handle, int flags, Parts* p) noexcept nogil:
    """Receive one whole message into ``p``: 0, or -1 with ``p.err`` set
    (nothing kept). The first part waits as ``flags`` say; the others are
    there already (a message arrives whole)."""
    cdef int rc
    libzmq.zmq_msg_init(&p.msgs[0])
    p.n = 1
    rc = libzmq.zmq_msg_recv(&p.msgs[0], handle, flags)
    if rc < 0:
        p.err = libzmq.zmq_errno()
        _parts_close(p)
        return -1
    while libzmq.zmq_msg_more(&p.msgs[p.n - 1]):
        if p.n == p.cap and _parts_grow(p) < 0:
            p.err = -1  # out of memory
            _parts_close(p)
            return -1
        libzmq.zmq_msg_init(&p.msgs[p.n])
        p.n += 1
        while True:
            rc = libzmq.zmq_msg_recv(&p.msgs[p.n - 1], handle, 0)
            if rc >= 0:
                break
            p.err = libzmq.zmq_errno()
            if p.err != EINTR:
                _parts_close(p)
                return -1
    return 0


cdef inline long long _now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef int _try_parts(zmq_pollitem_t* items, int nitems, Parts* p, int start,
                    unsigned char* drained=NULL) noexcept nogil:
    """A message from ``items[start:]`` without waiting: its index, _TIMEOUT
    when none has one, or _ERROR. Sockets ``drained`` marks are skipped;
    the marks are kept (see recv_any)."""
    cdef int i
    for i in range(start, nitems):
        if drained != NULL and drained[i]:
            continue
        if _recv_parts(items[i].socket, libzmq.ZMQ_DONTWAIT, p) == 0:
            if drained != NULL:
                drained[i] = 0
            return i
        if p.err != EAGAIN:
            return _ERROR
        if drained != NULL:
            drained[i] = 1
    return _TIMEOUT


cdef extern from "poll.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum: POLLIN


cdef int _next_message(zmq_pollitem_t* items, int nitems, long timeout,
                       Parts* p, bint tried, long long* deadline,
                       unsigned char* drained=NULL) noexcept nogil:
    """The next message on any of ``items``: its index, _TIMEOUT, or
    _ERROR. Unless ``tried`` (every socket has just been tried, with
    nothing received and nothing done on any since), tries them all in
    order (the first is read first when several are waiting); then, unless
    ``timeout`` is 0, waits with poll(2) on the sockets' ``ZMQ_FD``s and
    tries only the sockets whose descriptor woke it, until ``timeout`` ms
    have passed (-1: for ever). A failed try is what makes that wait sound:
    like the ``ZMQ_EVENTS`` query that ``zmq_poll`` makes of every socket
    before and after its poll, it runs the socket's pending commands, after
    which a new message signals the descriptor; so one try per socket
    replaces the two queries and ``zmq_poll``'s extra poll. The clock is
    read only to poll: ``*deadline`` (0 until then) is when the wait ends."""
    cdef pollfd stack[_STACK_ITEMS]
    cdef pollfd* fds = stack
    cdef int i, rc
    cdef size_t size
    cdef long long now
    cdef long wait = -1
    if not tried:
        i = _try_parts(items, nitems, p, 0, drained)
        if i != _TIMEOUT:
            return i
    if timeout == 0:
        return _TIMEOUT
    if nitems > _STACK_ITEMS:
        fds = <pollfd*>malloc(nitems * sizeof(pollfd))
        if fds == NULL:
            p.err = -1  # out of memory
            return _ERROR
    try:
        for i in range(nitems):
            size = sizeof(libzmq.fd_t)
            if libzmq.zmq_getsockopt(items[i].socket, libzmq.ZMQ_FD, &fds[i].fd, &size) < 0:
                p.err = libzmq.zmq_errno()
                return _ERROR
            fds[i].events = POLLIN
            fds[i].revents = 0
        while True:
            if timeout > 0:
                now = _now_ms()
                if deadline[0] == 0:
                    deadline[0] = now + timeout
                wait = <long>max(0, deadline[0] - now)
            rc = poll(fds, nitems, wait)
            if rc == 0:
                return _TIMEOUT
            if rc < 0:
                p.err = libzmq.zmq_errno()  # poll(2)'s errno (EINTR: _wait goes on)
                return _ERROR
            for i in range(nitems):
                if fds[i].revents:
                    fds[i].revents = 0
                    if _recv_parts(items[i].socket, libzmq.ZMQ_DONTWAIT, p) == 0:
                        if drained != NULL:
                            drained[i] = 0
                        return i
                    if p.err != EAGAIN:
                        return _ERROR
                    if drained != NULL:
                        drained[i] = 1
            # Woken by commands that brought no message: wait out the time left.
    finally:
        if fds != stack:
            free(fds)


cdef int _raise_errno(int err) except -1:
    if err == -1:
        raise MemoryError()
    if err == EAGAIN:
        raise _Again(err)
    if err == libzmq.ZMQ_ETERM:
        raise _ContextTerminated(err)
    raise _ZMQError(err)


cdef int _wait(zmq_pollitem_t* items, int nitems, long timeout, Parts* p,
               int first, long long* deadline, unsigned char* drained=NULL) except? -10:
    """The next message on any of ``items`` (see _next_message): tries
    ``items[first:]``, then, unless ``timeout`` is 0, ``items[:first]``,
    then waits without the GIL, retrying on EINTR as pyzmq does (signal
    handlers run; a timed wait goes on with the time left, ``*deadline``
    being kept). Raises for other errors; returns an index or _TIMEOUT.
    ``drained``: see recv_any."""
    cdef int which, i
    cdef bint tried
    # A message already waiting is taken holding the GIL (releasing it costs
    # more than the take); the GIL goes only to wait.
    which = _try_parts(items, nitems, p, first, drained)
    if which == _TIMEOUT:
        if timeout == 0:
            return _TIMEOUT
        if first > 0:
            which = _try_parts(items, first, p, 0, drained)
    if which >= 0:
        return which
    tried = which == _TIMEOUT
    while True:
        if which == _ERROR:
            if p.err != EINTR:
                _raise_errno(p.err)
            PyErr_CheckSignals()
            tried = False  # a signal handler may have used the sockets
            if drained != NULL:
                for i in range(nitems):
                    drained[i] = 0
        with nogil:
            which = _next_message(items, nitems, timeout, p, tried, deadline, drained)
        if which != _ERROR:
            return which


cdef list _frames(Parts* p):
    """The received parts (closes ``p``): the first as bytes read straight
    from its zmq_msg_t, every other one moved into a zmq.Frame without a
    copy."""
    cdef int i
    cdef Frame frame
    cdef list frames
    try:
        frames = [PyBytes_FromStringAndSize(<char*>libzmq.zmq_msg_data(&p.msgs[0]),
                                            libzmq.zmq_msg_size(&p.msgs[0]))]
        for i in range(1, p.n):
            frame = _Frame()
            libzmq.zmq_msg_move(&frame.zmq_msg, &p.msgs[i])
            frames.append(frame)
    finally:
        _parts_close(p)
    return frames


cdef object _decode_frames(list frames, object allow_pickle, object alignment, object stats,
                           object shm=None):
    cdef Py_ssize_t copied = 0
    try:
        out = _F.decode(frames, allow_pickle, _THRESHOLD_OBJ, alignment, &copied, shm)
    except _MFE as exc:
        exc.header = _peek_header(frames)
        raise
    _add(stats, _COPIED, copied)
    return out


cdef void* _handle(object socket) except NULL:
    """The libzmq socket of a pyzmq socket; TypeError for anything else,
    ENOTSOCK (as pyzmq raises) for a closed one."""
    if not isinstance(socket, Socket):
        raise TypeError("expected a zmq.Socket, got %s" % type(socket).__name__)
    if (<Socket>socket)._closed:
        raise _ZMQError(ENOTSOCK)
    return (<Socket>socket).handle


cdef inline void _item(zmq_pollitem_t* item, object socket) except *:
    item.socket = _handle(socket)
    item.fd = 0
    item.events = libzmq.ZMQ_POLLIN
    item.revents = 0


# ---------------------------------------------------------------- sending

cdef int _send_buf(void* handle, const void* data, size_t n, int flags) except -1:
    """zmq_send (a copy), retrying on EINTR. A send that cannot block is
    made holding the GIL (releasing it costs more than the send); one that
    would block waits without it."""
    cdef int rc, err
    rc = libzmq.zmq_send(handle, data, n, flags | libzmq.ZMQ_DONTWAIT)
    if rc >= 0:
        return 0
    err = libzmq.zmq_errno()
    if err == EAGAIN and flags & libzmq.ZMQ_DONTWAIT:
        _raise_errno(err)
    while True:
        if err == EAGAIN or err == EINTR:
            with nogil:
                rc = libzmq.zmq_send(handle, data, n, flags)
            if rc >= 0:
                return 0
            err = libzmq.zmq_errno()
        if err != EINTR:
            _raise_errno(err)
        PyErr_CheckSignals()


cdef int _send_frame(void* handle, Frame frame, int flags) except -1:
    """Send a reference to ``frame``'s message (no copy of its data)."""
    cdef zmq_msg_t msg
    cdef int rc, err
    libzmq.zmq_msg_init(&msg)
    libzmq.zmq_msg_copy(&msg, &frame.zmq_msg)
    rc = libzmq.zmq_msg_send(&msg, handle, flags | libzmq.ZMQ_DONTWAIT)  # as _send_buf
    if rc >= 0:
        return 0
    err = libzmq.zmq_errno()
    while True:
        if err == EAGAIN and not flags & libzmq.ZMQ_DONTWAIT or err == EINTR:
            with nogil:
                rc = libzmq.zmq_msg_send(&msg, handle, flags)
            if rc >= 0:
                return 0
            err = libzmq.zmq_errno()
        if err != EINTR:
            libzmq.zmq_msg_close(&msg)
            _raise_errno(err)
        try:
            PyErr_CheckSignals()
        except BaseException:
            libzmq.zmq_msg_close(&msg)
            raise


cdef int _send_raw(void* handle, object part, int flags) except -1:
    """Send one raw frame: a zmq.Frame by reference, a buffer below the
    threshold copied, a larger one zero-copy (untracked)."""
    cdef Py_buffer view
    if isinstance(part, Frame):
        return _send_frame(handle, <Frame>part, flags)
    PyObject_GetBuffer(part, &view, PyBUF_SIMPLE)
    try:
        if view.len < _THRESHOLD:
            return _send_buf(handle, view.buf, view.len, flags)
    finally:
        PyBuffer_Release(&view)
    return _send_frame(handle, _Frame(part, copy=False), flags)


cdef object _encode_frames(object obj, object kind, object task_id, object stats,
                           object shm=None):
    cdef Py_ssize_t copied = 0
    frames = _F.encode(obj, kind, task_id, &copied, shm)
    _add(stats, _COPIED, copied)
    return frames


cdef object _send(object socket, object obj, object kind, object task_id, int flags,
                  object stats, object envelope=None, object shm=None):
    cdef void* handle = _handle(socket)
    cdef list frames
    if kind not in _KINDS:
        raise ValueError("unknown message kind %r" % (kind,))
    frames = _encode_frames(obj, kind, task_id, stats, shm)
    if envelope:
        for part in envelope:
            _send_raw(handle, part, flags | libzmq.ZMQ_SNDMORE)
    return _send_encoded(handle, frames, flags, stats)


cdef object _send_encoded(void* handle, list frames, int flags, object stats):
    """Send encoded frames: returns the tracker of the zero-copy ones, or None."""
    cdef bytes header
    cdef Py_ssize_t i, last, copied = 0
    cdef Py_buffer view
    cdef int more
    cdef list events = None
    cdef Frame frame
    last = len(frames) - 1
    header = <bytes>frames[0]
    _send_buf(handle, PyBytes_AS_STRING(header), PyBytes_GET_SIZE(header),
              flags | libzmq.ZMQ_SNDMORE if last else flags)
    for i in range(1, last + 1):
        buf = frames[i]
        more = flags | libzmq.ZMQ_SNDMORE if i < last else flags
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        if view.len < _THRESHOLD:
            try:
                _send_buf(handle, view.buf, view.len, more)
            finally:
                PyBuffer_Release(&view)
            copied += view.len
        else:
            PyBuffer_Release(&view)
            frame = _Frame(buf, track=True, copy=False)
            _send_frame(handle, frame, more)
            if events is None:
                events = [frame.tracker_event]
            else:
                events.append(frame.tracker_event)
            frame = None  # its own reference to the message goes
    _add(stats, _SENT, 1)
    _add(stats, _COPIED, copied)
    return None if events is None else _MessageTracker(*events)


def send_message(socket, obj, kind, task_id=0, flags=0, stats=None, *, envelope=(), shm=None):
    """Encode ``obj`` and send it as one message (see ``_wire_common``)."""
    return _send(socket, obj, kind, task_id, flags, stats, envelope, shm)


def send_frames(socket, frames, int flags=0, stats=None):
    """Send raw frames as one message (see ``_wire_common``)."""
    cdef void* handle = _handle(socket)
    cdef Py_ssize_t i, last = len(frames) - 1
    if last < 0:
        raise ValueError("a message has at least one frame")
    for i in range(last + 1):
        _send_raw(handle, frames[i], flags | libzmq.ZMQ_SNDMORE if i < last else flags)
    _add(stats, _SENT, 1)


# ---------------------------------------------------------------- receiving

cdef list _recv_frames(void* handle, int flags):
    cdef Parts p
    cdef int rc
    _parts_init(&p)
    while True:
        with nogil:
            rc = _recv_parts(handle, flags, &p)
        if rc == 0:
            return _frames(&p)
        if p.err != EINTR:
            _raise_errno(p.err)
        PyErr_CheckSignals()


def recv_message(socket, int flags=0, allow_pickle=True, alignment=None, stats=None, *,
                 shm=None):
    """Receive and decode one message (see ``_wire_common``)."""
    frames = _recv_frames(_handle(socket), flags)
    _add(stats, _RECEIVED, 1)
    return _decode_frames(frames, allow_pickle, alignment, stats, shm)


def decode_message(list frames, allow_pickle=True, alignment=None, stats=None, *, shm=None):
    """Decode received frames (see ``_wire_common``)."""
    return _decode_frames(frames, allow_pickle, alignment, stats, shm)


def recv_any(sockets, long timeout_ms=-1, int first=0, stats=None, bytearray drained=None):
    """Receive a whole message from whichever socket is ready (see
    ``_wire_common``)."""
    cdef zmq_pollitem_t stack[_STACK_ITEMS]
    cdef zmq_pollitem_t* items = stack
    cdef Parts p
    cdef int i, which
    cdef Py_ssize_t n = len(sockets)
    cdef unsigned char* marks = NULL
    if not 0 <= first < n:
        raise ValueError("first=%d is not an index of the %d sockets" % (first, n))
    if drained is not None:
        if len(drained) < n:
            raise ValueError("drained has %d entries for %d sockets" % (len(drained), n))
        marks = <unsigned char*>PyByteArray_AS_STRING(drained)
    if n > _STACK_ITEMS:
        items = <zmq_pollitem_t*>malloc(n * sizeof(zmq_pollitem_t))
        if items == NULL:
            raise MemoryError()
    cdef long long deadline = 0
    _parts_init(&p)
    try:
        for i in range(n):
            _item(&items[i], sockets[i])
        which = _wait(items, <int>n, timeout_ms, &p, first, &deadline, marks)
    finally:
        if items != stack:
            free(items)
    if which == _TIMEOUT:
        return None
    frames = _frames(&p)
    _add(stats, _RECEIVED, 1)
    return which, frames
