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


cdef int _send_result(void* handle, object result, object task_id, object on_unsendable,
                      object stats, object shm=None) except -1:
    try:
        frames = _encode_frames(result, _KIND_RESULT, task_id, stats, shm)
    except Exception as exc:  # whatever stops encoding: nothing was sent
        frames = _encode_frames(on_unsendable(result, exc), _KIND_RESULT, task_id, stats, shm)
    _send_encoded(handle, frames, 0, stats)
    return 0


cdef inline double _seconds_since(long long start_ns) noexcept nogil:
    return (_now_ns() - start_ns) / 1e9


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int _serve_task(void* handle, list frames, object handle_task, object identity,
                     object prefix, object on_malformed, object on_unsendable,
                     object allow_pickle, object alignment, object stats,
                     long long* now_ms, object shm) except -1:
    """One request of run_worker's task mode: decode, run, answer. Sets
    ``*now_ms`` to the clock read when the handler returned (0: not read)."""
    cdef Py_ssize_t copied = 0
    cdef int kind = 0
    cdef uint64_t task_id = 0
    now_ms[0] = 0
    try:
        fields = _F.decode_task(frames, allow_pickle, alignment, &copied, &kind, &task_id, shm)
    except _MFE as exc:
        exc.header = _peek_header(frames)
        result = on_malformed(_REQUEST, exc)
        if result is not None:
            header = exc.header
            _send_result(handle, result, header[1] if header is not None else 0,
                         on_unsendable, stats, shm)
        return 0
    frames = None  # the request's frames can go before the send
    _add(stats, _COPIED, copied)
    return _run_task(handle, fields, task_id, handle_task, identity, prefix, on_unsendable,
                     stats, now_ms, shm)


cdef int _serve_task_raw(void* handle, Parts* p, object handle_task, object identity,
                         object prefix, object on_malformed, object on_unsendable,
                         object allow_pickle, object alignment, object stats,
                         long long* now_ms, object shm) except -1:
    """_serve_task for a one-frame request still in ``p`` (closed here): read
    from libzmq's memory, no frame objects made. A request that does not
    decode goes the general way (the same decoder, so the same error)."""
    cdef Py_ssize_t copied = 0
    cdef int kind = 0
    cdef uint64_t task_id = 0
    try:
        fields = _F.decode_task_raw(<const unsigned char*>libzmq.zmq_msg_data(&p.msgs[0]),
                                    <Py_ssize_t>libzmq.zmq_msg_size(&p.msgs[0]),
                                    allow_pickle, alignment, &copied, &kind, &task_id, shm)
    except Exception:
        return _serve_task(handle, _frames(p), handle_task, identity, prefix, on_malformed,
                           on_unsendable, allow_pickle, alignment, stats, now_ms, shm)
    finally:
        if p.n:
            _parts_close(p)
    _add(stats, _COPIED, copied)
    return _run_task(handle, fields, task_id, handle_task, identity, prefix, on_unsendable,
                     stats, now_ms, shm)


cdef int _run_task(void* handle, tuple fields, uint64_t task_id, object handle_task,
                   object identity, object prefix, object on_unsendable, object stats,
                   long long* now_ms, object shm) except -1:
    """Run the handler on a request's fields (payload, metadata), answer."""
    cdef Py_ssize_t copied
    cdef long long start, end
    cdef double seconds
    payload, request_metadata = fields
    fields = None
    now_ms[0] = 0
    start = _now_ns()
    try:
        output = handle_task(payload)
        payload = None
    except Exception as exc:
        result = _Result(_STATUS_FAIL, None, request_metadata, None, exc)
    else:
        if prefix is not None:
            end = _now_ns()
            now_ms[0] = end // 1000000
            seconds = (end - start) / 1e9
            _add(stats, _HANDLED, 1)
            copied = 0
            try:
                out = _F.encode_ok_send(output, request_metadata, prefix, seconds, task_id,
                                        &copied, handle, _send_buf, shm)
            except _ZMQError:
                raise
            except Exception:
                pass  # the general way below finds the same error, and answers it
            else:
                _add(stats, _COPIED, copied)
                if out is None:  # sent
                    _add(stats, _SENT, 1)
                else:
                    _send_encoded(handle, out, 0, stats)
                return 0
            result = _Result(_STATUS_OK, output, request_metadata)
            result.metadata = dict(identity, seconds=seconds)
            _send_result(handle, result, PyLong_FromUnsignedLongLong(task_id), on_unsendable,
                         stats, shm)
            return 0
        result = _Result(_STATUS_OK, output, request_metadata)
    result.metadata = dict(identity, seconds=_seconds_since(start))
    _add(stats, _HANDLED, 1)
    _send_result(handle, result, PyLong_FromUnsignedLongLong(task_id), on_unsendable, stats,
                 shm)
    return 0


def run_worker(requests, results, commands, *, handle=None, on_command, on_malformed,
               on_unsendable, long timeout_ms=-1, allow_pickle=True, alignment=None,
               stats=None, handle_task=None, result_metadata=None, shm=None):
    """The worker's loop (see ``_wire_common``)."""
    cdef zmq_pollitem_t items[2]
    cdef Parts p
    cdef int nitems = _items(items, commands, requests)
    cdef int request_index = nitems - 1
    cdef int which, start
    cdef int since_check = 0
    cdef long long checked_at = _now_ms(), now = 0, deadline
    cdef void* out = _handle(results)
    prefix = None
    if handle_task is not None:
        identity = {} if result_metadata is None else dict(result_metadata)
        prefix = _F.metadata_prefix(identity)
    elif handle is None:
        raise TypeError("run_worker needs handle or handle_task")
    _parts_init(&p)
    while True:
        start = request_index
        if now == 0:  # (else the last task's clock, read as its handler returned)
            now = _now_ms()
        if since_check >= _CHECK_EVERY or now - checked_at >= _CHECK_MS:
            start = 0
            since_check = 0
            checked_at = now
        since_check += 1
        now = 0
        deadline = 0
        which = _wait(items, nitems, timeout_ms, &p, start, &deadline)
        if which == _TIMEOUT:
            raise _RTE("no request or command within %d ms" % timeout_ms)
        _add(stats, _RECEIVED, 1)
        if which == request_index and handle_task is not None:
            try:
                out = _handle(results)  # (closed meanwhile: raises)
            except BaseException:
                _parts_close(&p)
                raise
            if p.n == 1:
                _serve_task_raw(out, &p, handle_task, identity, prefix, on_malformed,
                                on_unsendable, allow_pickle, alignment, stats, &now, shm)
            else:
                _serve_task(out, _frames(&p), handle_task, identity, prefix, on_malformed,
                            on_unsendable, allow_pickle, alignment, stats, &now, shm)
            continue
        frames = _frames(&p)
        if which != request_index:
            if _command(frames, on_command, on_malformed, stats):
                return
            continue
        out = _handle(results)  # (closed meanwhile: raises)
        try:
            kind, task_id, request = _decode_frames(frames, allow_pickle, alignment, stats,
                                                    shm)
        except _MFE as exc:
            result = on_malformed(_REQUEST, exc)
            header = exc.header
            task_id = header[1] if header is not None else 0
        else:
            result = handle(kind, task_id, request)
        frames = request = None  # the request's frames can go before the send
        if result is not None:
            _send_result(out, result, task_id, on_unsendable, stats, shm)
            result = None


def sink_next(results, commands, long timeout_ms, on_command, on_malformed,
              allow_pickle=True, alignment=None, stats=None, *, shm=None):
    """One step of a sink: the next result, or STOP (see ``_wire_common``)."""
    # One step of a receive_results without unwrap: the one loop both run
    # (made without __init__'s checks: the step checks the sockets itself).
    cdef receive_results one = receive_results.__new__(receive_results)
    one.results, one.commands = results, commands
    one.on_command, one.on_malformed = on_command, on_malformed
    one.allow_pickle, one.alignment, one.stats, one.shm = allow_pickle, alignment, stats, shm
    one.timeout_ms = timeout_ms
    one.left = -1  # (mode 0 and unwrap None, as __new__ leaves them)
    return one._next()


cdef class receive_results:
    """An iterator over a sink's results (see ``_wire_common``)."""

    cdef object results, commands, on_command, on_malformed, unwrap
    cdef object allow_pickle, alignment, stats, shm
    cdef long timeout_ms
    cdef Py_ssize_t left        # results still to give; -1: no limit
    cdef int mode
    cdef bint done

    def __init__(self, results, commands, num_results, long timeout_ms, on_command,
                 on_malformed, allow_pickle=True, alignment=None, stats=None, *, unwrap=None,
                 metadata=False, shm=None):
        _handle(results)
        if commands is not None:
            _handle(commands)
        self.results, self.commands = results, commands
        self.on_command, self.on_malformed, self.unwrap = on_command, on_malformed, unwrap
        self.allow_pickle, self.alignment, self.stats = allow_pickle, alignment, stats
        self.shm = shm
        self.timeout_ms = timeout_ms
        self.left = -1 if num_results is None else max(0, num_results)
        self.mode = 0 if unwrap is None else (2 if metadata else 1)
        self.done = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.done or self.left == 0:
            self.done = True
            raise StopIteration
        try:
            item = self._next()
        except BaseException:
            self.done = True  # as a generator ends when it raises
            raise
        if item is _STOP:
            self.done = True
            raise StopIteration
        return item

    def close(self):
        """End the iteration (as a generator's close does)."""
        self.done = True

    cdef object _next(self):
        """The next result, or _STOP (sink_next's loop too)."""
        cdef zmq_pollitem_t items[2]
        cdef Parts p
        cdef int nitems = _items(items, self.commands, self.results)
        cdef int result_index = nitems - 1
        cdef int which
        cdef long timeout_ms = self.timeout_ms
        cdef long long deadline = 0
        cdef Py_ssize_t copied
        cdef bint got
        stats = self.stats
        _parts_init(&p)
        while True:
            which = _wait(items, nitems, timeout_ms, &p, 0, &deadline)
            if which == _TIMEOUT:
                raise _RTE("no result within %d ms" % timeout_ms)
            _add(stats, _RECEIVED, 1)
            if which == result_index and self.mode and p.n == 1:
                # A one-frame result, read in libzmq's memory.
                copied = 0
                try:
                    item = _F.decode_ok_raw(
                        <const unsigned char*>libzmq.zmq_msg_data(&p.msgs[0]),
                        <Py_ssize_t>libzmq.zmq_msg_size(&p.msgs[0]), self.allow_pickle,
                        self.alignment, self.mode, &copied)
                except BaseException:
                    _parts_close(&p)
                    raise
                if item is not _NOT_FAST:
                    _parts_close(&p)
                    _add(stats, _COPIED, copied)
                    self._took()
                    return item
            frames = _frames(&p)
            if which != result_index:
                if _command(frames, self.on_command, self.on_malformed, stats):
                    return _STOP
            else:
                if self.mode and len(frames) > 1:
                    copied = 0
                    item = _F.decode_ok(frames, self.allow_pickle, self.alignment, self.mode,
                                        &copied)
                    if item is not _NOT_FAST:
                        _add(stats, _COPIED, copied)
                        self._took()
                        return item
                got = True
                try:
                    item = _decode_frames(frames, self.allow_pickle, self.alignment, stats,
                                          self.shm)[2]
                except _MFE as exc:
                    item = self.on_malformed(_RESULT, exc)
                    got = item is not None  # else not a result: the wait goes on
                if got:
                    self._took()
                    return item if self.mode == 0 else self.unwrap(item)
            if timeout_ms > 0 and deadline == 0:  # (it came without a wait)
                deadline = _now_ms() + timeout_ms

    cdef inline void _took(self) noexcept:
        if self.left > 0:
            self.left -= 1


def send_requests(socket, requests, task_ids, track, stats=None, *, pairs=False, shm=None):
    """Send every request with the next task id (see ``_wire_common``)."""
    cdef Py_ssize_t sent = 0, copied
    cdef void* handle = _handle(socket)
    if pairs:
        for payload, metadata in requests:
            task_id = next(task_ids)
            copied = 0
            frames = _F.encode_request(payload, metadata, task_id, &copied, shm)
            _add(stats, _COPIED, copied)
            handle = _handle(socket)
            tracker = _send_encoded(handle, frames, 0, stats)
            if tracker is not None:
                track(tracker)
            sent += 1
        return sent
    for request in requests:
        task_id = next(task_ids)
        tracker = _send(socket, request, _KIND_REQUEST, task_id, 0, stats, None, shm)
        if tracker is not None:
            track(tracker)
        if type(request) is _Request:
            request.task_id = task_id
        sent += 1
    return sent
