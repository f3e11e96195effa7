# The C interface of the compiled framing module to the compiled wire module
# (included by both framing.pyx and wire.pyx, so both see one layout). The
# framing module fills a FramingAPI with its functions and publishes it as the
# capsule ``zmq_cluster._fastpath.framing._C_API``; wire.pyx calls through it
# without a Python call. Every function adds the payload bytes it copied to
# ``*copied`` (the caller turns that into ``stats.copied_bytes``).
#
# The task helpers write and read the same bytes as encode/decode of the
# corresponding objects (tests/test_fast_tasks.py compares them); they exist
# so that the nodes' loops need not build a ClusterRequest or a ClusterResult
# per task:
#
# * encode_request(payload, metadata, task_id): the frames of
#   ClusterRequest(payload, metadata) as a REQUEST.
# * metadata_prefix(identity): the bytes of dict(identity, seconds=x) up to
#   x, or None when ``identity`` (a dict) cannot be written that way.
# * encode_ok(output, request_metadata, prefix, seconds, task_id): the frames
#   of ClusterResult("OK", output, request_metadata, dict(identity,
#   seconds=seconds)) as a RESULT, ``prefix`` being metadata_prefix(identity)
#   (the task id a C integer here).
# * decode_task(frames, allow_pickle, alignment): ``(payload, metadata)``,
#   a ClusterRequest body's fields, any other body as the payload with
#   metadata None; the kind and the task id go to ``*kind``, ``*task_id``.
#   Raises as decode does.
# * decode_ok(frames, allow_pickle, alignment, mode): for a message whose
#   body is a ClusterResult of status "OK" (the str), its payload (mode 1) or
#   ``(payload, request_metadata, metadata)`` (mode 2); for any other
#   message, malformed ones included, NOT_FAST: the caller then decodes it
#   in full (which raises, for a malformed one). Mode 1 checks the
#   metadata's bytes as decode would, without making the objects; when it
#   cannot be sure of them without decoding (a non-ASCII str, an array, a
#   pickle...), it answers NOT_FAST too.
#
# The wire module's hot loops skip the Python objects of a one-frame message
# with three variants: encode_ok_send sends a one-frame result with
# ``send(handle, data, n, 0)`` straight from the encoder's buffer (and
# returns None; a result with buffer frames comes back as frames to send);
# decode_task_raw and decode_ok_raw read a one-frame message from memory
# (``p``, ``n``: a received zmq_msg_t's, valid for the call), making a bytes
# copy of it only if a slow path needs one.
#
# ``shm`` (None, or a zmq_cluster.sharedmem.SharedMemory) is what encode's and
# decode's ``shm`` is: where arrays of at least shm.min_bytes go by shared
# memory, and what maps the ones received that way (tag 'h'). decode_ok has
# none: a result holding a shared-memory array is NOT_FAST there, so that
# the full decoder claims its slot once.

ctypedef object (*encode_fn)(object obj, object kind, object task_id, Py_ssize_t* copied,
                             object shm)
ctypedef object (*decode_fn)(object frames, object allow_pickle, object copy_threshold,
                             object alignment, Py_ssize_t* copied, object shm)
ctypedef object (*encode_request_fn)(object payload, object metadata, object task_id,
                                     Py_ssize_t* copied, object shm)
ctypedef object (*metadata_prefix_fn)(object identity)
ctypedef object (*encode_ok_fn)(object output, object request_metadata, object prefix,
                                double seconds, uint64_t task_id, Py_ssize_t* copied,
                                object shm)
ctypedef object (*decode_task_fn)(object frames, object allow_pickle, object alignment,
                                  Py_ssize_t* copied, int* kind, uint64_t* task_id, object shm)
ctypedef object (*decode_ok_fn)(object frames, object allow_pickle, object alignment, int mode,
                                Py_ssize_t* copied)
ctypedef int (*send_fn)(void* handle, const void* data, size_t n, int flags) except -1
ctypedef object (*encode_ok_send_fn)(object output, object request_metadata, object prefix,
                                     double seconds, uint64_t task_id, Py_ssize_t* copied,
                                     void* handle, send_fn send, object shm)
ctypedef object (*decode_task_raw_fn)(const unsigned char* p, Py_ssize_t n, object allow_pickle,
                                      object alignment, Py_ssize_t* copied, int* kind,
                                      uint64_t* task_id, object shm)
ctypedef object (*decode_ok_raw_fn)(const unsigned char* p, Py_ssize_t n, object allow_pickle,
                                    object alignment, int mode, Py_ssize_t* copied)

ctypedef struct FramingAPI:
    Py_ssize_t size             # sizeof(FramingAPI): both modules built together
    encode_fn encode
    decode_fn decode
    encode_request_fn encode_request
    metadata_prefix_fn metadata_prefix
    encode_ok_fn encode_ok
    encode_ok_send_fn encode_ok_send
    decode_task_fn decode_task
    decode_task_raw_fn decode_task_raw
    decode_ok_fn decode_ok
    decode_ok_raw_fn decode_ok_raw
    PyObject* not_fast          # the NOT_FAST sentinel
