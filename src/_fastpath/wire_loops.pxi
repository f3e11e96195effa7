# The nodes' loops, with explicit contracts (included by wire.pyx; see
# zmq_cluster._wire_common for what each one promises).

cdef int _items(zmq_pollitem_t* items, object first, object second) except -1:
    """Poll items for ``first`` (may be None) and ``second``: their count."""
    cdef int n = 0
    if first is not None:
        _item(&items[0], first)
        n = 1
    _item(&items[n], second)
    return n + 1


cdef bint _command(list frames, object on_command, object on_malformed,
                   object stats) except -1:
    """A message from the command channel (never unpickled): whether
    ``on_command`` asks to stop."""
    try:
        kind, _, command = _decode_frames(frames, False, None, stats)
    except _MFE as exc:
        on_malformed(_COMMAND, exc)
        return False
    return bool(on_command(kind, command))


cdef int _send_result(object results, object result, object task_id, object on_unsendable,
                      object stats) except -1:
    cdef void* handle = _handle(results)
    try:
        frames = _encode(result, _KIND_RESULT, task_id, stats)
    except Exception as exc:  # whatever stops encoding: nothing was sent
        frames = _encode(on_unsendable(result, exc), _KIND_RESULT, task_id, stats)
    _send_encoded(handle, frames, 0, stats)
    return 0


def run_worker(requests, results, commands, *, handle, on_command, on_malformed,
               on_unsendable, long timeout_ms=-1, allow_pickle=True, alignment=None,
               stats=None):
    """The worker's loop (see ``_wire_common``)."""
    cdef zmq_pollitem_t items[2]
    cdef Parts p
    cdef int nitems = _items(items, commands, requests)
    cdef int request_index = nitems - 1
    cdef int which, start
    cdef int since_check = 0
    cdef long long checked_at = _now_ms()
    _handle(results)
    _parts_init(&p)
    while True:
        start = request_index
        if since_check >= _CHECK_EVERY or _now_ms() - checked_at >= _CHECK_MS:
            start = 0
            since_check = 0
            checked_at = _now_ms()
        since_check += 1
        which = _wait(items, nitems, timeout_ms, &p, start)
        if which == _TIMEOUT:
            raise _RTE("no request or command within %d ms" % timeout_ms)
        frames = _frames(&p)
        if stats is not None:
            stats.messages_received += 1
        if which != request_index:
            if _command(frames, on_command, on_malformed, stats):
                return
            continue
        try:
            kind, task_id, request = _decode_frames(frames, allow_pickle, alignment, stats)
        except _MFE as exc:
            result = on_malformed(_REQUEST, exc)
            header = exc.header
            task_id = header[1] if header is not None else 0
        else:
            result = handle(kind, task_id, request)
        frames = request = None  # the request's frames can go before the send
        if result is not None:
            _send_result(results, result, task_id, on_unsendable, stats)
            result = None


def sink_next(results, commands, long timeout_ms, on_command, on_malformed,
              allow_pickle=True, alignment=None, stats=None):
    """One step of a sink: the next result, or STOP (see ``_wire_common``)."""
    cdef zmq_pollitem_t items[2]
    cdef Parts p
    cdef int nitems = _items(items, commands, results)
    cdef int result_index = nitems - 1
    cdef int which
    cdef long wait = timeout_ms
    cdef long long deadline = _now_ms() + timeout_ms if timeout_ms > 0 else 0
    _parts_init(&p)
    while True:
        which = _wait(items, nitems, wait, &p, 0)
        if which == _TIMEOUT:
            raise _RTE("no result within %d ms" % timeout_ms)
        frames = _frames(&p)
        if stats is not None:
            stats.messages_received += 1
        if which != result_index:
            if _command(frames, on_command, on_malformed, stats):
                return _STOP
        else:
            try:
                return _decode_frames(frames, allow_pickle, alignment, stats)[2]
            except _MFE as exc:
                replacement = on_malformed(_RESULT, exc)
                if replacement is not None:
                    return replacement
        if timeout_ms > 0:
            wait = <long>max(0, deadline - _now_ms())


def send_requests(socket, requests, task_ids, track, stats=None):
    """Send every request with the next task id (see ``_wire_common``)."""
    cdef Py_ssize_t sent = 0
    _handle(socket)
    for request in requests:
        task_id = next(task_ids)
        tracker = _send(socket, request, _KIND_REQUEST, task_id, 0, stats)
        if tracker is not None:
            track(tracker)
        if type(request) is _Request:
            request.task_id = task_id
        sent += 1
    return sent
