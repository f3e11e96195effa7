"""Task-shaped messages without their objects: the pure-Python twin of the
compiled ``framing_tasks.pxi`` (whose C interface, ``framing_api.pxi``,
states the contract of each function).

The nodes' loops use these so that a worker builds no ClusterRequest nor
ClusterResult per task, and a sink no ClusterResult per result; the bytes
written and the values read are those of ``encode``/``decode`` of the
objects (tests/test_fast_tasks.py compares them, in both twins). Unlike the
compiled functions, these take ``stats`` (as ``encode``/``decode`` do).
"""

from __future__ import annotations

import struct
from typing import Any, Optional, Sequence, Tuple

from ._framing_buffers import as_buffer
from ._framing_py import _Decoder, _Encoder, _start, decode
from .exceptions import MessageFormatError
from .messages import ClusterResult
from .protocol import (
    COPY_THRESHOLD, F64, HEADER, HEADER_SIZE, I64, INT64_MAX, INT64_MIN, KIND_REQUEST,
    KIND_RESULT, KINDS, MAGIC, TAG_DICT, TAG_REQUEST, TAG_RESULT, TAG_STR, TAG_U32, U32,
    U32_MAX, VERSION,
)

__all__ = ["NOT_FAST", "metadata_prefix", "encode_request", "encode_ok", "decode_task",
           "decode_ok"]


class _NotFast:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_FAST"


#: decode_ok's answer for a message it leaves to the full decoder.
NOT_FAST = _NotFast()

#: A ClusterResult's tag and its status "OK", as the encoder writes them.
_RESULT_OK = bytes([TAG_RESULT]) + TAG_U32.pack(TAG_STR, 2) + b"OK"
_REQUEST = bytes([TAG_REQUEST])
_NONE = b"N"
_FLOAT = b"d"
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_pack_f64 = F64.pack
_pack_i64 = I64.pack
_pack_tag_u32 = TAG_U32.pack
_unpack_i64 = I64.unpack_from
_unpack_f64 = F64.unpack_from
_unpack_u32 = U32.unpack_from
_I, _D, _S, _N, _T, _F, _M = b"idsNTFm"
#: Dict prefixes (see _skip_metadata) seen to decode, so known to be valid.
_VALID_PREFIXES: dict[bytes, None] = {}
_PREFIXES_MAX = 64


class _Slow(Exception):
    """Raised by the fast readers and writers: the general path decides."""


# The fast readers handle the values small tasks are made of (None, bools,
# int64s, floats, strs, and dicts of them, one level deep) and raise _Slow
# (or IndexError, struct.error, UnicodeDecodeError) for anything else; their
# callers then run the general decoder, which decides, so that both accept
# and refuse exactly the same bytes and make the same values.

def _small(h: bytes, pos: int, nested: bool = False) -> tuple[Any, int]:
    tag = h[pos]
    if tag == _I:
        return _unpack_i64(h, pos + 1)[0], pos + 9
    if tag == _N:
        return None, pos + 1
    if tag == _D:
        return _unpack_f64(h, pos + 1)[0], pos + 9
    if tag == _S:
        end = pos + 5 + _unpack_u32(h, pos + 1)[0]
        if end > len(h):
            raise _Slow
        return str(h[pos + 5:end], "utf-8", "surrogatepass"), end
    if tag == _T:
        return True, pos + 1
    if tag == _F:
        return False, pos + 1
    if tag == _M and not nested:
        count = _unpack_u32(h, pos + 1)[0]
        pos += 5
        if 2 * count > len(h) - pos:
            raise _Slow
        out = {}
        for _ in range(count):
            key, pos = _small(h, pos, True)
            out[key], pos = _small(h, pos, True)
        return out, pos
    raise _Slow


def _skip_metadata(h: bytes, pos: int) -> int:
    """The end of the result metadata at ``pos`` (a worker's dict, ending
    with a float), checked but not made: a dict prefix seen before is
    known valid whatever the float."""
    for prefix in _VALID_PREFIXES:
        if h.startswith(prefix, pos):
            end = pos + len(prefix)
            if h[end] == _D:
                return end + 9
    value, end = _small(h, pos)
    if type(value) is dict and value and h[end - 9] == _D and type(
            value[next(reversed(value))]) is float:
        if len(_VALID_PREFIXES) >= _PREFIXES_MAX:
            _VALID_PREFIXES.clear()
        _VALID_PREFIXES[h[pos:end - 9]] = None
    return end


def _small_bytes(obj: Any) -> bytes:
    """The encoding of a small value, or _Slow."""
    t = type(obj)
    if t is int:
        if INT64_MIN <= obj <= INT64_MAX:
            return b"i" + _pack_i64(obj)
    elif obj is None:
        return _NONE
    elif t is float:
        return _FLOAT + _pack_f64(obj)
    elif t is str:
        raw = obj.encode("utf-8", "surrogatepass")
        if len(raw) <= U32_MAX:
            return _pack_tag_u32(TAG_STR, len(raw)) + raw
    raise _Slow


def _frames(encoder: _Encoder, kind: int, task_id: int, stats: Any) -> list:
    encoder.commit()
    buffers = encoder.buffers
    parts = encoder.parts
    parts[0] = _pack_header(MAGIC, VERSION, kind, len(buffers), task_id)
    if stats is not None and encoder.copied:
        stats.copied_bytes += encoder.copied
    return [b"".join(parts)] + buffers if buffers else [b"".join(parts)]


def encode_request(payload: Any, metadata: Any, task_id: int = 0, stats: Any = None,
                   shm: Any = None) -> list:
    """The frames of ``ClusterRequest(payload, metadata)`` as a REQUEST."""
    try:
        return [b"".join((_pack_header(MAGIC, VERSION, KIND_REQUEST, 0, task_id), _REQUEST,
                          _small_bytes(payload), _small_bytes(metadata)))]
    except _Slow:
        pass
    encoder = _Encoder(False, shm)
    encoder.parts.append(_REQUEST)
    try:
        encoder.value(payload, 1)
        encoder.value(metadata, 1)
    except BaseException:
        encoder.abandon()
        raise
    return _frames(encoder, KIND_REQUEST, task_id, stats)


def metadata_prefix(identity: Any) -> Optional[bytes]:
    """The bytes of ``dict(identity, seconds=x)`` up to ``x``, or None when
    ``identity`` (a dict) cannot be written that way."""
    if type(identity) is not dict or "seconds" in identity or len(identity) >= U32_MAX:
        return None
    encoder = _Encoder(False)
    encoder.parts.append(TAG_U32.pack(TAG_DICT, len(identity) + 1))
    try:
        for key, value in identity.items():
            encoder.value(key, 2)
            encoder.value(value, 2)
        encoder.value("seconds", 2)
    except Exception:  # the result then goes the general way, and fails there
        return None
    if encoder.buffers:
        return None  # an array with a frame of its own: not a constant
    return b"".join(encoder.parts)


def encode_ok(output: Any, request_metadata: Any, prefix: bytes, seconds: float,
              task_id: int = 0, stats: Any = None, shm: Any = None) -> list:
    """The frames of ``ClusterResult("OK", output, request_metadata,
    dict(identity, seconds=seconds))`` as a RESULT, ``prefix`` being
    ``metadata_prefix(identity)``."""
    try:
        return [b"".join((_pack_header(MAGIC, VERSION, KIND_RESULT, 0, task_id), _RESULT_OK,
                          _small_bytes(output), _small_bytes(request_metadata), prefix,
                          _FLOAT, _pack_f64(seconds), _NONE))]
    except _Slow:
        pass
    encoder = _Encoder(False, shm)
    parts = encoder.parts
    parts.append(_RESULT_OK)
    try:
        encoder.value(output, 1)
        encoder.value(request_metadata, 1)
    except BaseException:
        encoder.abandon()
        raise
    parts.append(prefix)
    parts.append(_FLOAT + _pack_f64(seconds))
    parts.append(_NONE)
    return _frames(encoder, KIND_RESULT, task_id, stats)


class _Copied:
    __slots__ = ("copied_bytes",)

    def __init__(self) -> None:
        self.copied_bytes = 0


def decode_task(frames: Sequence[Any], allow_pickle: bool = True, alignment: Any = None,
                stats: Any = None, shm: Any = None) -> Tuple[int, int, Any, Any]:
    """``(kind, task_id, payload, metadata)``: a ClusterRequest body's
    fields, any other body as the payload with metadata None. Raises as
    ``decode`` does."""
    h = frames[0] if len(frames) == 1 else None
    if type(h) is bytes:
        try:
            magic, version, kind, nframes, task_id = _unpack_header(h)
            if magic == MAGIC and version == VERSION and kind in KINDS and not nframes:
                if h[HEADER_SIZE] == TAG_REQUEST:
                    payload, pos = _small(h, HEADER_SIZE + 1)
                    metadata, pos = _small(h, pos)
                else:
                    payload, pos = _small(h, HEADER_SIZE)
                    metadata = None
                if pos == len(h):
                    return kind, task_id, payload, metadata
        except (_Slow, IndexError, struct.error, UnicodeDecodeError):
            pass
    header, kind, task_id = _start(frames)
    decoder = _Decoder(header, frames, kind, allow_pickle, COPY_THRESHOLD, alignment, False,
                       shm)
    decoder.top = True
    obj = decoder.body()
    if decoder.deferred:
        decoder = _Decoder(header, frames, kind, allow_pickle, COPY_THRESHOLD, alignment, True,
                           shm)
        decoder.top = True
        obj = decoder.body()
    if stats is not None and decoder.copied:
        stats.copied_bytes += decoder.copied
    if decoder.unwrapped:
        return kind, task_id, obj[0], obj[1]
    if task_id and type(obj) is ClusterResult:
        obj.task_id = task_id
    return kind, task_id, obj, None


def decode_ok(frames: Sequence[Any], allow_pickle: bool = True, alignment: Any = None,
              mode: int = 1, stats: Any = None) -> Any:
    """For a message whose body is a ClusterResult of status "OK", its
    payload (mode 1) or ``(payload, request_metadata, metadata)`` (mode 2);
    NOT_FAST for any other message, malformed ones included."""
    h = frames[0] if len(frames) == 1 else None
    if type(h) is bytes:
        try:
            magic, version, kind, nframes, _ = _unpack_header(h)
            if (magic == MAGIC and version == VERSION and kind in KINDS and not nframes
                    and h.startswith(_RESULT_OK, HEADER_SIZE)):
                payload, pos = _small(h, HEADER_SIZE + 8)
                if mode == 1:
                    pos = _small(h, pos)[1]
                    pos = _skip_metadata(h, pos)
                    if h[pos] == _N and pos + 1 == len(h):
                        return payload
                else:
                    request_metadata, pos = _small(h, pos)
                    metadata, pos = _small(h, pos)
                    if h[pos] == _N and pos + 1 == len(h):
                        return payload, request_metadata, metadata
        except (_Slow, IndexError, struct.error, UnicodeDecodeError):
            pass
    copied = _Copied()
    try:
        if as_buffer(frames[0])[HEADER_SIZE:HEADER_SIZE + 8] != _RESULT_OK:
            return NOT_FAST
        # (Without shared memory: a result holding a shared-memory array is
        # NOT_FAST, so that its slot is claimed by one decode only.)
        _, _, result = decode(frames, allow_pickle, COPY_THRESHOLD, alignment, copied)
    except (MessageFormatError, IndexError):
        return NOT_FAST
    if type(result) is not ClusterResult or result.exception is not None:
        return NOT_FAST
    if stats is not None and copied.copied_bytes:
        stats.copied_bytes += copied.copied_bytes
    if mode == 1:
        return result.payload
    return result.payload, result.request_metadata, result.metadata
