"""Wire-format constants shared by both framing twins.

The bytes these constants describe are specified in ``docs/protocol.md``;
this module is the single place the numbers live. Both the pure-Python twin
(``_framing_py``) and the compiled one (``zmq_cluster._fastpath.framing``)
import them from here, so they cannot drift apart.
"""

import struct

#: First two bytes of every header frame.
MAGIC = b"ZC"
#: Version of the wire format this build writes and reads. Version 2 added
#: arrays split over several buffer frames (tag ``'c'``); a receiver reads
#: its own version only, and rejects any other with a MessageFormatError
#: that names both.
VERSION = 2

#: Message kinds (byte 3 of the header).
KIND_REQUEST = 1
KIND_RESULT = 2
KIND_COMMAND = 3
KINDS = {KIND_REQUEST: "REQUEST", KIND_RESULT: "RESULT", KIND_COMMAND: "COMMAND"}

#: Fixed part of the header frame: magic, version, kind, number of buffer
#: frames that follow the header, task id.
HEADER = struct.Struct("<2sBBIQ")
HEADER_SIZE = HEADER.size  # 16

#: Little-endian fields of the header body (docs/protocol.md, "Conventions"):
#: u8, u32, int64, float64, complex128 (two float64), and a tag with its u32.
U8 = struct.Struct("<B")
U32 = struct.Struct("<I")
I64 = struct.Struct("<q")
F64 = struct.Struct("<d")
C128 = struct.Struct("<dd")
TAG_U32 = struct.Struct("<BI")

#: One-byte value tags of the header body (see docs/protocol.md, "Values").
TAG_NONE = ord("N")
TAG_TRUE = ord("T")
TAG_FALSE = ord("F")
TAG_INT = ord("i")        # int64
TAG_BIGINT = ord("I")     # u32 length + signed little-endian two's complement
TAG_FLOAT = ord("d")      # float64
TAG_COMPLEX = ord("j")    # two float64
TAG_STR = ord("s")        # u32 length + UTF-8
TAG_BYTES = ord("b")      # u32 length + raw bytes
TAG_LIST = ord("l")       # u32 count + values
TAG_TUPLE = ord("t")      # u32 count + values
TAG_DICT = ord("m")       # u32 count + key/value pairs
TAG_ARRAY = ord("a")      # u32 frame, dtype value, u8 ndim, u64 shape..., u8 order
TAG_SPLIT_ARRAY = ord("c")   # u32 first frame, u32 frame count, dtype value, u8 ndim, ...
TAG_SHM_ARRAY = ord("h")  # u32 slot, u64 generation, u64 offset, str pool, dtype, ...
TAG_INLINE_ARRAY = ord("A")  # dtype value, u8 ndim, u64 shape..., u8 order, raw bytes
TAG_SCALAR = ord("g")     # dtype value + u32 length + raw bytes
TAG_REQUEST = ord("R")    # payload, metadata
TAG_RESULT = ord("S")     # status, payload, request_metadata, metadata, exception
TAG_PICKLE = ord("p")     # u32 length + pickle bytes, u32 count + u32 frames...
TAG_EXCEPTION = ord("E")  # module, qualname, args (list or None), message, traceback

ORDER_C = ord("C")
ORDER_F = ord("F")

#: Largest int encoded as TAG_INT; beyond it TAG_BIGINT is used.
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

#: Nesting depth past which a header body is rejected as malformed. It keeps
#: a hostile peer from exhausting the decoder's stack; encoders refuse (with
#: EncodeError) to write what would decode deeper. See docs/protocol.md,
#: "Limits".
MAX_DEPTH = 256

#: Largest value of a u32 field (a length, a count, a frame index).
U32_MAX = 0xFFFFFFFF

#: Most dimensions an array (or a structured field's subarray) may have:
#: numpy's own limit (NPY_MAXDIMS).
MAX_NDIM = 64

#: Largest item size of a dtype, in bytes: numpy's own limit for 'S' and 'V'
#: (a C int). A structured dtype's fields and subarrays add up to at most this.
MAX_ITEMSIZE = (1 << 31) - 1

#: Largest array, in bytes, counting only its non-zero dimensions (numpy's
#: npy_intp limit, which it applies to empty arrays too).
MAX_ARRAY_BYTES = (1 << 63) - 1

#: Most fields one structured dtype may hold, counting the fields of nested
#: structures and padding entries.
MAX_DTYPE_FIELDS = 4096

#: Most levels of structured dtypes nested in one another (a structure whose
#: field is a structure has 2 levels).
MAX_DTYPE_NESTING = 16

#: Buffer frames at least this large are sent zero-copy (``copy=False``) and
#: decoded as views on the received frame; smaller ones are copied, which is
#: faster than the bookkeeping of a zero-copy frame. Measured with
#: ``python benchmarks/copy_threshold.py`` (2 cores, ipc): zero-copy sends
#: were 0.3-0.7x as fast as copies up to 4 KiB, within noise (0.9-1.1x) from
#: 8 KiB to 512 KiB, 1.1x at 1 MiB. 64 KiB (pyzmq's own default) sits
#: safely inside the break-even band and keeps small arrays off the
#: zero-copy bookkeeping.
COPY_THRESHOLD = 65536

#: Arrays (exact ``ndarray``, no object dtype) of fewer bytes than this are
#: written inline in the header frame (tag ``'A'``); arrays of at least this
#: many bytes get a buffer frame of their own (tag ``'a'``). It is part of
#: the canonical encoding (docs/protocol.md), so both twins write the same
#: bytes. Why: every extra ZeroMQ frame cost ~3-4 us per message (profiled,
#: send plus receive), while copying a few KiB into the header costs well
#: under 1 us (memcpy runs at several GB/s), so a small array is cheaper
#: copied than framed; 4 KiB keeps the copy small and the header frame
#: inside one page, far below COPY_THRESHOLD, where frames start travelling
#: zero-copy anyway.
INLINE_LIMIT = 4096

#: Arrays of more bytes than this travel as several buffer frames (tag
#: ``'c'``) of SPLIT_BYTES each but the last, and the receiver assembles
#: them into one 64-byte-aligned array (one memcpy per frame). Why: libzmq
#: mallocs a receive buffer per frame, and glibc serves allocations above
#: its mmap threshold (dynamic, at most 32 MiB) with fresh pages that fault
#: in one by one, while smaller buffers come from reused heap memory.
#: Measured with ``python benchmarks/split_size.py`` (one hop over ipc, 2
#: cores shared with other work, two runs): 64 MiB as one frame 1.44-1.50
#: GB/s (16,300 page faults per message); split and assembled 3.7 GB/s
#: with 2 or 4 MiB frames, 3.0-3.2 with 8 MiB; 16 MiB as one frame
#: 3.9-4.2 GB/s, split into 4 MiB frames and assembled 4.3 (so the
#: assembly copy costs nothing there), 3.8-4.0 with 8 MiB. 4 MiB: the
#: fastest with the fewest frames, far under glibc's 32 MiB cap. Part of
#: the canonical encoding (docs/protocol.md).
SPLIT_BYTES = 4 << 20

#: Received arrays of at least this many bytes are always at a multiple of
#: ARRAY_ALIGNMENT (and writeable): a frame libzmq placed elsewhere (it
#: always does, 40 bytes into its allocation) is copied to aligned memory.
#: Below it, a frame array stays a zero-copy view unless ``alignment`` is
#: asked for. See docs/protocol.md, "Decoding: views, copies, alignment",
#: for the cost (one memcpy of arrays from 1 MiB to SPLIT_BYTES).
ALIGNED_BYTES = 1 << 20
ARRAY_ALIGNMENT = 64

#: Pickle protocol used for objects that have no native encoding.
PICKLE_PROTOCOL = 5

#: Batch tables of the pool's scheduler protocol (docs/scheduler.md, "Batch
#: tables"): a task entry's fields (task id, function key, timeout in ms,
#: inline_len, n_frames) and a result entry's (task id, inline_len,
#: n_frames, items, seconds), little-endian. Here because the framing twins
#: write and read them (framing.encode_task_table, walk_table).
TASK_ENTRY_FORMAT = "<QQIII"
RESULT_ENTRY_FORMAT = "<QIIId"
#: A task's or result's header frame up to this size travels inside the
#: batch table (copied once); a larger one is a frame of its own.
INLINE_HEADER_MAX = 65536
