# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Compiled twin of the send/receive layer and the nodes' loops.

Same functions, behaviour and wire bytes as the pure-Python twin,
``zmq_cluster._wire_py``: read that module for the contract. The semantic
steps (kind checks, the handler, building results, the unsendable-result
fallback, malformed messages) are the nodes' Python methods, shared by both
twins; only the zmq calls differ.

Waiting and receiving happen without the GIL: one ``nogil`` block per
message tries the sockets without blocking (commands first), polls them with
``zmq_poll`` only when nothing is waiting, and receives every part of the
message into ``zmq_msg_t``s. With the GIL, the header is read straight from
its ``zmq_msg_t`` into a bytes object, and every buffer frame is moved into
an empty ``zmq.Frame`` (no copy), so decoded arrays can be views on it.
Sending copies the header and buffer frames below ``COPY_THRESHOLD`` with
``zmq_send``; larger frames go zero-copy, each in a tracked ``zmq.Frame``.
Objects that are not pyzmq sockets go through the pure twin.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EINTR, EAGAIN
from libc.stdlib cimport malloc, free
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from zmq cimport Frame, Socket, libzmq
from zmq.backend.cython.libzmq cimport zmq_msg_t, zmq_pollitem_t

import zmq

from zmq_cluster import _wire_py
from zmq_cluster._fastpath.framing import decode as _decode, encode as _encode
from zmq_cluster.exceptions import MessageFormatError, ReceiverTimeoutException
from zmq_cluster.messages import ClusterRequest
from zmq_cluster.protocol import COPY_THRESHOLD, KIND_REQUEST, KIND_RESULT, KIND_COMMAND

__all__ = ["send_message", "recv_message", "peek_header", "run_worker", "sink_next",
           "send_requests", "STOP", "SKIP"]

STOP = _wire_py.STOP
SKIP = _wire_py.SKIP
peek_header = _wire_py.peek_header

cdef object _STOP = STOP
cdef object _SKIP = SKIP
cdef object _peek_header = peek_header
cdef object _MFE = MessageFormatError
cdef object _RTE = ReceiverTimeoutException
cdef object _Request = ClusterRequest
cdef object _MessageTracker = zmq.MessageTracker
cdef object _ZMQError = zmq.ZMQError
cdef object _Again = zmq.Again
cdef object _ContextTerminated = zmq.ContextTerminated
cdef Py_ssize_t _THRESHOLD = COPY_THRESHOLD
cdef object _THRESHOLD_OBJ = COPY_THRESHOLD
cdef object _KIND_REQUEST = KIND_REQUEST
cdef object _KIND_RESULT = KIND_RESULT
cdef object _KIND_COMMAND = KIND_COMMAND
cdef object _py_send_message = _wire_py.send_message
cdef object _py_recv_message = _wire_py.recv_message
cdef object _py_timeout_ms = _wire_py._timeout_ms
cdef int _CHECK_EVERY = _wire_py.COMMAND_CHECK_EVERY
cdef long long _CHECK_MS = _wire_py.COMMAND_CHECK_MS

cdef enum:
    _STACK_PARTS = 8
    _NOTHING = -1       # no message waiting (a non-blocking try)
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


cdef int _next_message(zmq_pollitem_t* items, int nitems, long timeout,
                       Parts* p, int start) noexcept nogil:
    """The next message on any of ``items``: its index, _TIMEOUT, or
    _ERROR. Without polling, tries ``items[start:]`` in order (the first is
    read first when several are waiting); polls only when none of those has
    a message, and then tries them all."""
    cdef int i, rc
    while True:
        for i in range(start, nitems):
            if _recv_parts(items[i].socket, libzmq.ZMQ_DONTWAIT, p) == 0:
                return i
            if p.err != EAGAIN:
                return _ERROR
        rc = libzmq.zmq_poll(items, nitems, timeout)
        if rc == 0:
            return _TIMEOUT
        if rc < 0:
            p.err = libzmq.zmq_errno()
            return _ERROR
        start = 0


cdef inline long long _now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef int _raise_errno(int err) except -1:
    if err == -1:
        raise MemoryError()
    if err == EAGAIN:
        raise _Again(err)
    if err == libzmq.ZMQ_ETERM:
        raise _ContextTerminated(err)
    raise _ZMQError(err)


cdef int _wait(zmq_pollitem_t* items, int nitems, long timeout, Parts* p,
               int first=0) except? -10:
    """_next_message without the GIL, retrying on EINTR as pyzmq does (signal
    handlers run; a timed poll goes on with the time left). Raises for other
    errors; returns an index or _TIMEOUT."""
    cdef int which
    cdef long long start = 0
    while True:
        if timeout > 0:
            start = _now_ms()
        with nogil:
            which = _next_message(items, nitems, timeout, p, first)
        if which != _ERROR:
            return which
        if p.err != EINTR:
            _raise_errno(p.err)
        PyErr_CheckSignals()
        if timeout > 0:
            timeout = max(0, timeout - (_now_ms() - start))


cdef object _Frame = Frame


cdef list _frames(Parts* p):
    """The received parts as decode's frames (closes ``p``): the header as
    bytes read straight from its zmq_msg_t, every buffer frame moved into a
    zmq.Frame without a copy."""
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


cdef object _decode_frames(list frames, object allow_pickle, object alignment, object stats):
    try:
        return _decode(frames, allow_pickle, _THRESHOLD_OBJ, alignment, stats)
    except _MFE as exc:
        exc.header = _peek_header(frames)
        raise


cdef inline bint _usable(object socket):
    return isinstance(socket, Socket) and not (<Socket>socket)._closed


# ---------------------------------------------------------------- send/recv

cdef int _send_buf(void* handle, const void* data, size_t n, int flags) except -1:
    """zmq_send (a copy) without the GIL, retrying on EINTR."""
    cdef int rc, err
    while True:
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
    while True:
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


cdef object _send(object socket, object obj, object kind, object task_id, int flags,
                  object stats):
    cdef void* handle = (<Socket>socket).handle
    cdef list frames
    cdef bytes header
    cdef Py_ssize_t i, last, copied = 0
    cdef Py_buffer view
    cdef int more
    cdef list events = None
    cdef Frame frame
    frames = _encode(obj, kind, task_id, stats)
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
    if stats is not None:
        stats.messages_sent += 1
        if copied:
            stats.copied_bytes += copied
    return None if events is None else _MessageTracker(*events)


def send_message(socket, obj, kind, task_id=0, flags=0, stats=None):
    """Encode ``obj`` and send it as one multipart message.

    Buffer frames of ``COPY_THRESHOLD`` bytes or more are handed to libzmq
    without a copy: the caller must not change such an array until libzmq
    has released it, which the returned tracker reports (``tracker.done``,
    ``tracker.wait()``). Returns None when every frame was copied.
    """
    if not _usable(socket):
        return _py_send_message(socket, obj, kind, task_id, flags, stats)
    return _send(socket, obj, kind, task_id, flags, stats)


cdef object _recv(object socket, int flags, object allow_pickle, object alignment,
                  object stats):
    cdef Parts p
    cdef zmq_pollitem_t item
    _parts_init(&p)
    item.socket = (<Socket>socket).handle
    item.fd = 0
    item.events = libzmq.ZMQ_POLLIN
    item.revents = 0
    while True:
        with nogil:
            rc = _recv_parts(item.socket, flags, &p)
        if rc == 0:
            break
        if p.err != EINTR:
            _raise_errno(p.err)
        PyErr_CheckSignals()
    frames = _frames(&p)
    if stats is not None:
        stats.messages_received += 1
    return _decode_frames(frames, allow_pickle, alignment, stats)


def recv_message(socket, flags=0, allow_pickle=True, alignment=None, stats=None):
    """Receive one multipart message: returns ``(kind, task_id, obj)``.

    Raises :class:`~zmq_cluster.exceptions.MessageFormatError` for a message
    that breaks the format, with ``exc.header`` set to ``(kind, task_id)``
    when the fixed header was readable (else None). The message is consumed
    either way, so the next call reads the next message.
    """
    if not _usable(socket):
        return _py_recv_message(socket, flags, allow_pickle, alignment, stats)
    return _recv(socket, flags, allow_pickle, alignment, stats)


# ------------------------------------------------------------------- loops

cdef int _items(zmq_pollitem_t* items, object first, object second) except -1:
    """Poll items for ``first`` (may be None) and ``second``: their count."""
    cdef int n = 0
    for sock in (first, second):
        if sock is None:
            continue
        items[n].socket = (<Socket>sock).handle
        items[n].fd = 0
        items[n].events = libzmq.ZMQ_POLLIN
        items[n].revents = 0
        n += 1
    return n


def run_worker(worker):
    """BasicWorker.Run's loop, on the sockets its Setup made: serve requests
    until HandleCommand returns True; ReceiverTimeoutException when neither a
    request nor a command arrives within ``worker.receiver_timeout`` ms.

    A message already waiting is read without polling; the loop polls (on
    both sockets) only when no request is waiting. While requests keep
    arriving, the command socket is looked at before the next request once
    COMMAND_CHECK_EVERY requests or COMMAND_CHECK_MS ms have passed since it
    was last looked at: an empty look costs libzmq two system calls.
    """
    requests, results, commands = worker._requests, worker._results, worker._commands
    if not (_usable(requests) and _usable(results)
            and (commands is None or _usable(commands))):
        return _wire_py.run_worker(worker)
    cdef zmq_pollitem_t items[2]
    cdef Parts p
    cdef int nitems = _items(items, commands, requests)
    cdef int request_index = nitems - 1
    cdef int which, start
    cdef long timeout = _py_timeout_ms(worker.receiver_timeout)
    cdef int since_check = 0
    cdef long long checked_at = _now_ms()
    _parts_init(&p)
    while True:
        start = request_index
        if since_check >= _CHECK_EVERY or _now_ms() - checked_at >= _CHECK_MS:
            start = 0
            since_check = 0
            checked_at = _now_ms()
        since_check += 1
        which = _wait(items, nitems, timeout, &p, start)
        if which == _TIMEOUT:
            raise _RTE("no request or command within %s ms" % worker.receiver_timeout)
        frames = _frames(&p)
        worker.messages_received += 1
        if which != request_index:  # a command
            try:
                kind, _, command = _decode_frames(frames, worker.allow_pickle, None, worker)
            except _MFE as exc:
                worker._malformed("command", exc)
            else:
                if worker._command(kind, command):
                    return
            continue
        try:
            kind, task_id, request = _decode_frames(frames, worker.allow_pickle,
                                                    worker.array_alignment, worker)
        except _MFE as exc:
            result = worker._malformed_request(exc)
            task_id = exc.header[1] if exc.header is not None else 0
        else:
            result = worker._request(kind, request)
        frames = request = None  # the request's frames can go before the send
        if result is not None:
            try:
                _send(results, result, _KIND_RESULT, task_id, 0, worker)
            except TypeError as exc:  # the output or exception cannot be encoded
                _send(results, worker._unsendable(result, exc), _KIND_RESULT, task_id, 0,
                      worker)
            result = None


def sink_next(sink, timeout):
    """One step of BasicSink.Receive: the next result on the sink's result
    socket, or STOP when a kill command arrives first (commands are looked at
    first). Malformed messages are dropped and the wait goes on. Raises
    ReceiverTimeoutException when nothing arrives within ``timeout`` ms (None
    waits for ever); a message already waiting is read without polling.
    """
    results, commands = sink._results, sink._commands
    if not (_usable(results) and (commands is None or _usable(commands))):
        return _wire_py.sink_next(sink, timeout)
    cdef zmq_pollitem_t items[2]
    cdef Parts p
    cdef int nitems = _items(items, commands, results)
    cdef int result_index = nitems - 1
    cdef int which
    cdef long wait = _py_timeout_ms(timeout)
    _parts_init(&p)
    while True:
        which = _wait(items, nitems, wait, &p)
        if which == _TIMEOUT:
            raise _RTE("no result within %s ms" % timeout)
        frames = _frames(&p)
        sink.messages_received += 1
        try:
            kind, _, obj = _decode_frames(frames, sink.allow_pickle, sink.array_alignment, sink)
        except _MFE as exc:
            sink._malformed_message(exc)
            continue
        if which != result_index:  # a command
            obj = sink._check(kind, obj, _KIND_COMMAND)
            if obj is not _SKIP and sink._is_kill(obj):
                return _STOP
            continue
        obj = sink._check(kind, obj, _KIND_RESULT)
        if obj is not _SKIP:
            return obj


def send_requests(ventilator, requests):
    """BasicVentilator.Send's loop: send each request with the next task id
    (set on a ClusterRequest), keeping the trackers of zero-copy frames
    (``ventilator._track``). Returns the number sent."""
    socket = ventilator._socket
    if not _usable(socket):
        return _wire_py.send_requests(ventilator, requests)
    task_ids = ventilator._task_ids
    track = ventilator._track
    cdef Py_ssize_t sent = 0
    for request in requests:
        task_id = next(task_ids)
        tracker = _send(socket, request, _KIND_REQUEST, task_id, 0, ventilator)
        if tracker is not None:
            track(tracker)
        if type(request) is _Request:
            request.task_id = task_id
        sent += 1
    return sent
