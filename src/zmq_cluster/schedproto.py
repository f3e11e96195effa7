"""The scheduler protocol: message types, batch tables and control bodies.

Every peer of a scheduler (pool clients, pool workers) talks to its one
ROUTER socket through a DEALER. A message is::

    frame 0   control frame: struct CTL "<2sBBII": magic b"ZS", version,
              message type, count, flags
    frame 1   for TASKS and RESULTS: the batch table; for control messages:
              a body encoded with zmq_cluster.framing (native values only,
              decoded with allow_pickle=False)
    frame 2.. for TASKS and RESULTS: the data frames of the batch's entries

A batch table is ``count`` entries back to back. Each entry is a fixed
struct (TASK_ENTRY or RESULT_ENTRY) followed by ``inline_len`` bytes: the
task's (or result's) wire-format header frame (docs/protocol.md) when it is
small, so that a batch of small tasks is a single frame. ``n_frames`` data
frames of the message belong to the entry, in order: the header frame first
when it is not inline (``inline_len == 0``), then its buffer frames. So the
scheduler splits a batch, keeps each task as its own ledger entry and
forwards its frames without decoding or copying them.

Direct tasks (docs/scheduler.md, "Direct tasks"): LEASE, REVOKE and
DIRECT go between the scheduler and its peers; a leased worker's direct
socket speaks DHELLO, FUNC, TASKS and RESULTS with the same frames (no
routing by the scheduler: one task per TASKS message).

Each task body is a REQUEST message (task id in its header) whose payload
is ``(mode, items)``; its result is a RESULT message (same task id) whose
payload is ``(values, errors)``: see :mod:`zmq_cluster.taskcodec`.
"""

import hashlib
import hmac
import struct
from typing import Any, List, Mapping, Sequence, Tuple, Union

from . import framing
from .framing import scan_table as _scan_table, walk_table as _walk_table
from .protocol import INLINE_HEADER_MAX as INLINE_HEADER_MAX  # (re-exported)
from .protocol import KIND_COMMAND, RESULT_ENTRY_FORMAT, TASK_ENTRY_FORMAT
from .trust import EndpointKind, classify_endpoint

MAGIC = b"ZS"
VERSION = 1

#: A frame as received or sent: zmq.Frame, bytes, memoryview, or another
#: buffer (a numpy array's data).
Frame = Any
#: A bytes-like frame (a table, a control frame).
Bytes = Union[bytes, bytearray, memoryview]

CTL = struct.Struct("<2sBBII")
CTL_SIZE = CTL.size

#: task_id, fn_key, timeout_ms, inline_len, n_frames
TASK_ENTRY = struct.Struct(TASK_ENTRY_FORMAT)
#: task_id, inline_len, n_frames, items, seconds
RESULT_ENTRY = struct.Struct(RESULT_ENTRY_FORMAT)

#: Bounds on what a HELLO may announce.
MAX_HELLO_CREDIT = 1 << 20

#: Functions a scheduler keeps (and so sends a worker), at most: their
#: count, and the bytes of their FUNC messages.
MAX_FUNCTIONS = 4096
MAX_FUNCTION_BYTES = 1 << 30


# Message types.
HELLO = 1      # peer -> scheduler: who I am (body: dict)
WELCOME = 2    # scheduler -> peer: registered (body: dict)
TASKS = 3      # client -> scheduler -> worker: a batch of tasks
RESULTS = 4    # worker -> scheduler -> client: a batch of results
FUNC = 5       # client -> scheduler -> worker: a function (body: tuple)
CANCEL = 6     # client -> scheduler: drop queued tasks (body: list of ids, or None: all)
STATS = 7      # client -> scheduler (body: request id); scheduler -> client (body: dict)
STOP = 8       # scheduler -> worker: exit
RESET = 9      # scheduler -> peer: you are not registered (any more): say HELLO again
PROBE = 10     # scheduler -> worker: liveness backstop; ignored
BYE = 11       # peer -> scheduler: leaving
SHUTDOWN = 12  # client -> scheduler: stop the workers, then the scheduler
CONTROL = 13   # client -> scheduler (body: {"id", "op"}); scheduler -> client (body: reply)
LEASE = 14     # client -> scheduler (body: {"id"}); scheduler -> client (body: a grant, see below)
REVOKE = 15    # scheduler -> client: a lease is void (body: {"worker_no"}); re-send its tasks
DIRECT = 16    # worker -> scheduler: direct tasks run since the last note (body: {"tasks", "seconds"})
DHELLO = 17    # client -> worker's direct socket: a lease's credentials; worker -> client: welcome

TYPE_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", TASKS: "TASKS", RESULTS: "RESULTS",
              FUNC: "FUNC", CANCEL: "CANCEL", STATS: "STATS", STOP: "STOP",
              RESET: "RESET", PROBE: "PROBE", BYE: "BYE", SHUTDOWN: "SHUTDOWN",
              CONTROL: "CONTROL", LEASE: "LEASE", REVOKE: "REVOKE", DIRECT: "DIRECT",
              DHELLO: "DHELLO"}

#: TASKS flags bit (scheduler -> worker): the submitter is trusted, so the
#: worker may unpickle the tasks' arguments and functions. RESULTS flags bit
#: (scheduler -> client): the worker that made the results is trusted, so
#: the client may unpickle them. Either side also needs its own connection
#: to the scheduler to be trusted (authenticated or local).
FLAG_TRUSTED = 1

#: RESET body (scheduler -> client) when the scheduler stops: a client
#: connected over inproc hears no disconnection, so the scheduler tells it.
RESET_STOPPED = "stopped"

#: CONTROL operations (the command line's stop, stop --workers-only and
#: restart-workers).
OP_STOP = "stop"                      # stop the workers, then the scheduler
OP_STOP_WORKERS = "stop-workers"      # stop the workers (and their nannies)
OP_RESTART_WORKERS = "restart-workers"  # each worker finishes its task, exits, is replaced
CONTROL_OPS = (OP_STOP, OP_STOP_WORKERS, OP_RESTART_WORKERS)

#: A worker's exit status when the scheduler told it to stop (its nanny does
#: not replace it, and stops too), and when told to restart (replaced).
EXIT_STOPPED = 0
EXIT_RESTART = 75
#: ... and when the scheduler refused it at the security handshake
#: (sysexits' EX_NOPERM): a nanny does not replace it, since another would
#: be refused alike (see zmq_cluster.supervisor).
EXIT_REFUSED = 77

#: Peer roles in HELLO.
ROLE_WORKER = "worker"
ROLE_CLIENT = "client"    # receives results
ROLE_SUBMIT = "submit"    # sends tasks for a client (its "client_no")

#: DHELLO roles (client -> worker's direct socket): the connection results
#: come back on, and the one tasks are sent on.
DIRECT_RESULTS = "results"
DIRECT_SUBMIT = "submit"


def lease_token(key: bytes, client_no: int, trusted: bool) -> str:
    """The credential a scheduler gives client ``client_no`` for a worker's
    direct socket (hex): an HMAC, under the secret ``key`` the worker told
    the scheduler in its HELLO, of the client's number and whether the
    scheduler trusts it with pickles. The worker recomputes it: a peer
    without a lease cannot make one, nor raise its own trust."""
    msg = b"%d:%d" % (client_no, 1 if trusted else 0)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


#: Task payload modes: f(x) per item, f(*args) per item, f(*args, **kwargs).
MODE_MAP = 0
MODE_STAR = 1
MODE_CALL = 2


class ProtocolError(ValueError):
    """A scheduler-protocol message that cannot be used; the text says why."""


def check_hello(hello: Mapping[Any, Any]) -> None:
    """ProtocolError unless the HELLO's fields have their types and ranges."""
    for key, kind in (("host", str), ("role", str), ("direct", str), ("direct_key", str)):
        if key in hello and type(hello[key]) is not kind:
            raise ProtocolError("HELLO %r is not a %s" % (key, kind.__name__))
    _check_direct(hello.get("direct"), hello.get("direct_key"))
    for key, low, high in (("pid", 0, 1 << 62), ("credit", 1, MAX_HELLO_CREDIT),
                           ("credit_bytes", 1, 1 << 62), ("client_no", 1, 1 << 23),
                           ("uptime", 0, 1 << 40)):
        value = hello.get(key)
        if value is None:
            continue
        if key == "uptime" and type(value) is float:
            value = int(value) if value == value and abs(value) < 1 << 40 else -1
        if type(value) is not int or not low <= value <= high:
            raise ProtocolError("HELLO %r out of range: %r" % (key, value))


def _check_direct(direct: Any, key: Any) -> None:
    """ProtocolError unless a worker's direct socket (if it offers one) is
    on this host and comes with a 32-byte key in hex."""
    if direct is None:
        return
    try:
        where = classify_endpoint(direct)
    except ValueError:
        where = EndpointKind.NETWORK
    if len(direct) > 1024 or where not in (EndpointKind.IPC, EndpointKind.LOOPBACK):
        raise ProtocolError("HELLO 'direct' is not an ipc or loopback address")
    if type(key) is not str or len(key) != 64 or key.strip("0123456789abcdef") != "":
        raise ProtocolError("HELLO 'direct_key' is not 32 bytes of hex")


def ctl(mtype: int, count: int = 0, flags: int = 0) -> bytes:
    """The control frame of a message."""
    return CTL.pack(MAGIC, VERSION, mtype, count, flags)


def parse_ctl(frame: Bytes) -> Tuple[int, int, int]:
    """``(type, count, flags)`` of a control frame (bytes-like)."""
    if len(frame) != CTL_SIZE:
        raise ProtocolError("control frame of %d bytes, expected %d" % (len(frame), CTL_SIZE))
    magic, version, mtype, count, flags = CTL.unpack(frame)
    if magic != MAGIC:
        raise ProtocolError("bad magic %r" % (magic,))
    if version != VERSION:
        raise ProtocolError("scheduler protocol version %d, expected %d" % (version, VERSION))
    if mtype not in TYPE_NAMES:
        raise ProtocolError("unknown message type %d" % mtype)
    return mtype, count, flags


def body(obj: object) -> bytes:
    """A control body: ``obj`` (native values only) as one frame."""
    frames = framing.encode(obj, KIND_COMMAND)
    if len(frames) != 1:
        raise TypeError("a control body must be a single frame")
    return frames[0]


def parse_body(frame: Bytes) -> Any:
    """The value of a control body; ProtocolError when it is not one."""
    try:
        kind, _, obj = framing.decode([frame], allow_pickle=False)
    except ValueError as exc:
        raise ProtocolError("bad control body: %s" % exc) from None
    if kind != KIND_COMMAND:
        raise ProtocolError("control body of kind %d" % kind)
    return obj


def message(mtype: int, obj: object = None, count: int = 0, flags: int = 0) -> List[bytes]:
    """A control message: ``[ctl, body]``."""
    return [ctl(mtype, count, flags), body(obj)]


def walk(table: Bytes, count: int, entry: struct.Struct,
         data: Sequence[Frame]) -> List[Tuple[Tuple[Any, ...], List[Frame]]]:
    """The entries of a batch table with their messages: a list of
    ``(fields, message)``, ``fields`` the entry's fixed fields and
    ``message`` its wire-format frames (the header, inline or a frame of
    ``data``, then its buffer frames from ``data``). Raises ProtocolError,
    having used nothing, when the table and the frames disagree. (The
    reading is framing.walk_table, compiled or not.)

    (The scheduler keeps offsets, not messages: :func:`scan`.)
    """
    return _walk_table(table, count, entry.format, _INLINE_AT[entry], _NFRAMES_AT[entry], data,
                       ProtocolError)


def scan(table: Bytes, count: int, entry: struct.Struct,
         ndata: int) -> List[Tuple[Tuple[Any, ...], int, int, int]]:
    """The entries of a batch table as spans, for the scheduler (which
    keeps offsets, not messages): a list of ``(fields, start, end, first)``,
    the entry's bytes being ``table[start:end]`` and its data frames
    ``n_frames`` of the ``ndata`` from ``first``. Raises ProtocolError, as
    :func:`walk` does, when the table and the frame count disagree."""
    return _scan_table(table, count, entry.format, _INLINE_AT[entry], _NFRAMES_AT[entry], ndata,
                       ProtocolError)


#: Where inline_len and n_frames sit among each entry struct's fields.
_INLINE_AT = {TASK_ENTRY: 3, RESULT_ENTRY: 1}
_NFRAMES_AT = {TASK_ENTRY: 4, RESULT_ENTRY: 2}


def pack_entry(struct_: struct.Struct, fields_head: Sequence[Any], msg_frames: Sequence[Frame],
               fields_tail: Sequence[Any] = ()) -> Tuple[bytes, Sequence[Frame]]:
    """One table entry for the wire-format message ``msg_frames``: the
    entry bytes (fixed fields and inline header) and the data frames.

    ``fields_head`` are the fields before (inline_len, n_frames), and
    ``fields_tail`` those after them.
    """
    header = msg_frames[0]
    if len(header) < INLINE_HEADER_MAX:
        return (struct_.pack(*fields_head, len(header), len(msg_frames) - 1, *fields_tail)
                + bytes(header)), msg_frames[1:]
    return struct_.pack(*fields_head, 0, len(msg_frames), *fields_tail), msg_frames
