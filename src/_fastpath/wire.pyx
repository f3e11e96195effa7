# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Compiled twin of the wire layer, on the compiled framing twin.

Same functions, behaviour and wire bytes as the pure-Python twin,
``zmq_cluster._wire_py``; the contract is stated once, in
``zmq_cluster._wire_common``, which both twins import.

A message already waiting is taken holding the GIL; waiting happens
without it: one ``nogil`` block per wait polls the sockets' ``ZMQ_FD``
descriptors (poll(2), not ``zmq_poll``, which asks every socket for
``ZMQ_EVENTS`` before and after its poll: each ask is a command check that
costs libzmq a ``getpid`` and a ``poll``; a failed try already made that
check), tries only the sockets that woke it, and receives every part of
the message into ``zmq_msg_t``s. With the GIL, the first frame is read straight from its
``zmq_msg_t`` into a bytes object, and every other frame is moved into an
empty ``zmq.Frame`` (no copy), so decoded arrays can be views on it.
Sending copies the header and frames below ``COPY_THRESHOLD`` with
``zmq_send``; larger frames go zero-copy, each in a tracked ``zmq.Frame``.
Only pyzmq sockets are accepted (TypeError otherwise).

Encoding and decoding go through the compiled framing module's C interface
(``framing_api.pxi``), not through Python calls; a node's counters are
bumped in C when its ``stats`` is a :class:`Counters`.

The module is split by role: ``wire_io.pxi`` (receiving and sending
messages, the primitives), ``wire_loops.pxi`` (the nodes' loops).
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.long cimport PyLong_FromUnsignedLongLong
from libc.stdint cimport uint32_t, uint64_t
from libc.errno cimport EINTR, EAGAIN, ENOTSOCK
from libc.stdlib cimport malloc, free
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from zmq cimport Frame, Socket, libzmq
from zmq.backend.cython.libzmq cimport zmq_msg_t, zmq_pollitem_t

import zmq

from zmq_cluster._fastpath.framing import _C_API
from zmq_cluster._wire_common import (
    COMMAND, COMMAND_CHECK_EVERY, COMMAND_CHECK_MS, REQUEST, RESULT, STOP, peek_header,
)
from zmq_cluster.exceptions import MessageFormatError, ReceiverTimeoutException
from zmq_cluster.messages import ClusterRequest, ClusterResult
from zmq_cluster.protocol import COPY_THRESHOLD, KIND_REQUEST, KIND_RESULT, KINDS

__all__ = ["send_message", "recv_message", "recv_any", "decode_message", "send_frames",
           "run_worker", "sink_next", "receive_results", "send_requests", "Counters"]

include "framing_api.pxi"

cdef FramingAPI* _F = <FramingAPI*>PyCapsule_GetPointer(
    _C_API, "zmq_cluster._fastpath.framing._C_API")
if _F.size != sizeof(FramingAPI):
    raise ImportError("zmq_cluster._fastpath.wire and .framing were built apart: rebuild")
cdef object _NOT_FAST = <object>_F.not_fast
cdef object _KINDS = KINDS

cdef object _STOP = STOP
cdef object _peek_header = peek_header
cdef object _MFE = MessageFormatError
cdef object _RTE = ReceiverTimeoutException
cdef object _Request = ClusterRequest
cdef object _Result = ClusterResult
cdef object _STATUS_OK = ClusterResult.STATUS_SUCCESS
cdef object _STATUS_FAIL = ClusterResult.STATUS_FAIL
cdef object _MessageTracker = zmq.MessageTracker
cdef object _ZMQError = zmq.ZMQError
cdef object _Again = zmq.Again
cdef object _ContextTerminated = zmq.ContextTerminated
cdef object _Frame = zmq.Frame  # the sugar class, as pyzmq itself returns
cdef Py_ssize_t _THRESHOLD = COPY_THRESHOLD
cdef object _THRESHOLD_OBJ = COPY_THRESHOLD
cdef object _KIND_REQUEST = KIND_REQUEST
cdef object _KIND_RESULT = KIND_RESULT
cdef object _REQUEST = REQUEST
cdef object _RESULT = RESULT
cdef object _COMMAND = COMMAND
cdef int _CHECK_EVERY = COMMAND_CHECK_EVERY
cdef long long _CHECK_MS = COMMAND_CHECK_MS



cdef class Counters:
    """A node's message counters, as the loops' ``stats`` (see
    ``zmq_cluster._wire_common``): ints, bumped in C."""

    cdef public long long messages_sent
    cdef public long long messages_received
    cdef public long long copied_bytes
    cdef public long long requests_handled

    def __repr__(self):
        return ("Counters(messages_sent=%d, messages_received=%d, copied_bytes=%d, "
                "requests_handled=%d)" % (self.messages_sent, self.messages_received,
                                          self.copied_bytes, self.requests_handled))


cdef enum:
    _SENT = 0
    _RECEIVED = 1
    _COPIED = 2
    _HANDLED = 3


cdef int _add(object stats, int field, Py_ssize_t n) except -1:
    """Add ``n`` to a counter of ``stats`` (None: nothing; 0: not touched)."""
    cdef Counters c
    if stats is None or n == 0:
        return 0
    if type(stats) is Counters:
        c = <Counters>stats
        if field == _SENT:
            c.messages_sent += n
        elif field == _RECEIVED:
            c.messages_received += n
        elif field == _COPIED:
            c.copied_bytes += n
        else:
            c.requests_handled += n
    elif field == _SENT:
        stats.messages_sent += n
    elif field == _RECEIVED:
        stats.messages_received += n
    elif field == _COPIED:
        stats.copied_bytes += n
    else:
        stats.requests_handled += n
    return 0


include "wire_io.pxi"
include "wire_loops.pxi"
