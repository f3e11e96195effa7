"""The wording of every MessageFormatError and EncodeError the framing
twins raise (``E_*`` and ``X_*`` format strings, and the builders of the
commonest errors), in one module both twins import, so that the twins
cannot word a rejection differently.
"""

from .exceptions import MessageFormatError
from .protocol import MAX_ARRAY_BYTES, MAX_DEPTH, MAX_NDIM, U32_MAX

# MessageFormatError texts (decode). docs/protocol.md, "What receivers
# reject", quotes them.
E_EMPTY = "empty message: no header frame"
E_SHORT = "header frame is %d bytes, shorter than the %d-byte fixed header"
E_MAGIC = "bad magic %r (expected %r): not a zmq_cluster message"
E_VERSION = "unknown wire format version %d (this build reads %d)"
E_KIND = "unknown message kind %d"
E_NFRAMES = "header announces %d buffer frames but %d arrived"
E_TRUNCATED = "header truncated: %s needs %d bytes at offset %d, %d left"
E_DEEP = "values nested deeper than %d levels" % MAX_DEPTH
E_UTF8 = "invalid UTF-8 in str at offset %d: %s"
E_TAG = "unknown value tag %r at offset %d"
E_UNHASHABLE = "unhashable dict key at offset %d"
E_FRAME_ORDER = "%s refers to buffer frame %d; frame %d was expected next"
E_FRAME_RANGE = "%s refers to buffer frame %d of %d"
E_ORDER = "array at offset %d has order %r, expected 'C' or 'F'"
E_NDIM = "array at offset %%d has %%d dimensions, more than the %d allowed" % MAX_NDIM
E_ITEMSIZE0 = "array at offset %d has dtype %s of item size 0: an array needs bytes per item"
E_TOO_BIG = ("array at offset %%d of shape %%s and dtype %%s is beyond the size limit "
             "(%d bytes, counting non-zero dimensions)" % MAX_ARRAY_BYTES)
E_FRAME_SIZE = "array at offset %d is %s %s (%d bytes) but its frame has %d bytes"
E_SPLIT_COUNT = "split array at offset %d has 0 buffer frames: it needs at least 1"
E_SPLIT_SIZE = "split array at offset %d is %s %s (%d bytes) but its %d frames hold %d bytes"
E_SCALAR = "scalar of dtype %s has %d bytes, expected %d"
E_CODE_POINT = "%s at offset %d holds a character beyond U+10FFFF (dtype %s)"
E_PICKLE_REFUSED = "pickled value at offset %d refused: pickle is not allowed from this peer"
E_PICKLE_COMMAND = "pickled value at offset %d in a COMMAND message: commands never carry pickle"
E_PICKLE_ARGS = ("pickled value at offset %d in an exception's args: exception args are "
                 "native values only")
E_PICKLE_LOAD = "pickled value at offset %d does not load: %s: %s"
E_EXCEPTION = "exception at offset %d: its %s must be %s, not %s"
E_TRAILING = "%d unexpected bytes after the value at offset %d of the header"
E_UNREFERENCED = "%d buffer frames are not referenced by the header"
E_NUMPY = "malformed value in the header (at offset %d): %s: %s"
E_BAD_DTYPE = "bad dtype %sat offset %d: %s"

# EncodeError texts (encode).
X_DEEP = ("cannot encode values nested deeper than %d levels (MAX_DEPTH): receivers "
          "reject them" % MAX_DEPTH)
X_U32 = "cannot encode %%s of %%d %%s: the format's u32 field holds at most %d" % U32_MAX
X_PICKLE = "cannot encode %s object: %s"
X_CODE_POINT = ("cannot encode an array or scalar of dtype %s holding a character beyond "
                "U+10FFFF: no numpy can read it")
X_COMMAND = ("cannot encode %s object in a COMMAND message: it has no native encoding, and "
             "commands never carry pickle")


def truncated(what: str, n: int, at: int, left: int) -> MessageFormatError:
    """The MessageFormatError for ``n`` bytes of ``what`` wanted at ``at``."""
    return MessageFormatError(E_TRUNCATED % (what, n, at, left))


def count_error(what: str, count: int, per_item: int, at: int, left: int) -> MessageFormatError:
    """The MessageFormatError for a ``what`` of ``count`` items, each at
    least ``per_item`` bytes, that cannot fit in the ``left`` bytes at ``at``."""
    return truncated("a %s of %d items" % (what, count), count * per_item, at, left)



# Batch-table texts (walk_table); raised as the caller's ``error`` class.
T_TRUNCATED = "batch table truncated at entry %d"
T_OVERRUN = "an inline header overruns the batch table"
T_NO_HEADER = "entry %d has no header"
T_FRAMES = "the batch table names more frames than arrived"
T_STRAY_BYTES = "%d stray bytes after the batch table"
T_STRAY_FRAMES = "%d data frames the batch table does not name"
#: The entry formats walk_table reads: little-endian, of these codes.
TABLE_CODES = "QId"
T_FORMAT = "a batch table entry format must be '<' and codes of %r, not %%r" % TABLE_CODES
T_FIELDS = "fields %d and %d of %r cannot be a length and a frame count"
