"""The bytes a same-host slot pool shares between its producer
(``_shm_producer``) and its consumers (``_shm_consumer``): the memfd's
head and slot table, the claim/release notes, and the error a consumer
raises. See ``zmq_cluster.sharedmem`` for the whole."""

from __future__ import annotations

import mmap
import socket
import struct

__all__ = ["AttachError", "peer_uid", "MAGIC", "PAGE", "HEAD", "ENTRY", "NOTE", "CLAIM", "RELEASE"]

MAGIC = 0x314D48534D43435A  # b"ZCCMSHM1", little-endian
PAGE = mmap.PAGESIZE
#: The memfd's first bytes: magic, slot count, data offset, capacity.
HEAD = struct.Struct("<QQQQ")
#: Per slot in the table after the head: generation, offset, size.
ENTRY = struct.Struct("<QQQ")
#: What a consumer sends on its connection: op, slot, generation.
NOTE = struct.Struct("<BIQ")
CLAIM, RELEASE = 1, 2


class AttachError(Exception):
    """A reference this process cannot map (the text says why)."""


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket."""
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))[1]
