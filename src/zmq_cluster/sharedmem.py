"""Same-host shared memory for large arrays (opt-in): a producer copies an
array once into a slot of a memfd, and the message names the slot; a
consumer on the same host maps the memfd once and receives the array as a
writeable view of that slot, without the bytes crossing a socket.

One :class:`SharedMemory` per node plays both parts:

* **producer** (``put``): a pool of slots in one memfd (``os.memfd_create``),
  made on first use. The memfd starts with a table of slots (generation,
  offset, size of each), then the arrays, each at a 64-byte-aligned offset
  (page-aligned in fact). The pool serves its memfd to consumers over a
  Unix socket in a private (0700) directory: a consumer's first connection
  gets the fd (``socket.send_fds``, SCM_RIGHTS), and then tells, on that
  connection, which slots it holds (claim) and drops (release). A slot is
  reused only after its consumer released it, or after that consumer's
  connection closed (its process died: the slot is reclaimed). Peers are
  checked with SO_PEERCRED: only processes of this uid (or of
  ``allowed_uids``) get the fd. ``put`` returns None when the array is below
  ``min_bytes``, when no slot is free or the pool is full: the caller then
  sends the array over the socket (nothing blocks, nothing is dropped).
* **consumer** (``attach``): maps each producer's memfd once per process,
  checks a reference against the producer's slot table (a reference that
  does not match its slot, or lies outside the memfd, is refused), and
  wraps the region as a writeable numpy array whose drop releases the slot.

A reference lost in transit (its receiver died before reading it) holds
its slot until the producer's process exits. The wire form (tag ``'h'``):
docs/protocol.md, "Shared-memory arrays"; ``_framing_shm`` reads and
writes it for both framing twins.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import weakref
from typing import Any, Iterable

import numpy as np

from ._shm_consumer import Attached
from ._shm_layout import ENTRY, HEAD, PAGE, AttachError, peer_uid
from ._shm_producer import Producer
from .protocol import ALIGNED_BYTES

__all__ = ["SharedMemory", "AttachError", "DEFAULT_CAPACITY", "DEFAULT_SLOTS", "DEFAULT_RETAIN",
           "node_shared_memory"]

#: Bytes of a producer's memfd (the arrays' room). Pages are only backed
#: once written.
DEFAULT_CAPACITY = 1 << 30
#: Bytes of freed slots that stay backed (the first of the memfd, where
#: slots are taken first), so that reusing them takes no page faults; the
#: pages of a freed slot beyond them go back to the OS (MADV_REMOVE). A
#: producing process so holds at most this much shared memory beyond the
#: slots in use.
DEFAULT_RETAIN = 256 << 20
#: Arrays a producer can have in flight at once (a ventilator may have a
#: whole high-water mark's worth of messages queued: 1024 arrays of 1 MiB
#: fill DEFAULT_CAPACITY).
DEFAULT_SLOTS = 1024


class _Pending(threading.local):
    """Per thread: the references ``put`` since the last commit or abandon
    (``refs``), and those of the last message committed (``last``). Set on
    each thread's first use, so reading them never raises (a getattr
    default would cost an AttributeError per message)."""

    def __init__(self) -> None:
        self.refs: list[tuple[int, int, int]] = []
        self.last: list[tuple[int, int, int]] | None = None


class SharedMemory:
    """A node's shared-memory transport for arrays of ``min_bytes`` or more
    between processes on this host (see the module's docstring).

    ``capacity`` bytes of room and ``slots`` arrays in flight for what this
    process sends, of which ``retain`` bytes stay backed when their slots
    are free (see DEFAULT_RETAIN); ``allowed_uids``: other uids whose processes may map this
    process's slots (and whose slot pools this process maps), besides its
    own. ``close()`` (also on exit from ``with``) stops serving the slots;
    arrays already received elsewhere stay valid.

    Counters: ``arrays_sent`` (by slot), ``fallbacks`` (arrays of
    ``min_bytes`` or more that went over the socket, no slot being free),
    ``arrays_received``, ``attach_failures``; the producer's ``reclaimed``
    slots and ``refused_peers`` are properties.
    """

    def __init__(self, min_bytes: int = ALIGNED_BYTES, capacity: int = DEFAULT_CAPACITY,
                 slots: int = DEFAULT_SLOTS, allowed_uids: Iterable[int] = (),
                 retain: int = DEFAULT_RETAIN) -> None:
        if min_bytes < 1 or capacity < PAGE or not 1 <= slots <= 1 << 16:
            raise ValueError("min_bytes >= 1, capacity >= one page, 1 <= slots <= 65536")
        self.min_bytes = int(min_bytes)
        self.capacity = int(capacity)
        self.retain = max(0, int(retain))
        self.slots = int(slots)
        self.allowed_uids = frozenset(int(uid) for uid in allowed_uids)
        self._producer: Producer | None = None
        self._attached: dict[str, Attached] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pending = _Pending()
        self.arrays_sent = 0
        self.fallbacks = 0
        self.arrays_received = 0
        self.attach_failures = 0

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # ------------------------------------------------------------ producer
    @property
    def path(self) -> str:
        """The address consumers fetch this process's slots from."""
        return self._pool().path

    def _pool(self) -> Producer:
        with self._lock:
            if self._producer is None:
                if self._closed:
                    raise ValueError("this SharedMemory is closed")
                self._producer = Producer(self.capacity, self.slots, self.allowed_uids,
                                          self.retain)
            return self._producer

    def put(self, arr: np.ndarray) -> tuple[str, int, int, int] | None:
        """Copy ``arr`` (at least ``min_bytes``) into a free slot:
        ``(path, slot, generation, offset)``, or None (the caller sends it
        over the socket) when no slot or room is free or this is closed."""
        if self._closed:
            return None
        pool = self._pool()
        where = pool.put(arr)
        if where is None:
            self.fallbacks += 1
            return None
        self.arrays_sent += 1
        self._pending.refs.append((where[0], where[1], arr.nbytes))
        return (pool.path,) + where

    def commit(self) -> None:
        """The references ``put`` by this thread since the last commit or
        abandon are in a message: an encoder calls this when it succeeds.
        They are this thread's :meth:`last_message` until the next commit."""
        local = self._pending
        pending = local.refs
        if pending:
            local.refs = []
            local.last = pending

    def last_message(self) -> list[tuple[int, int, int]]:
        """The slots of the last message this thread encoded with
        references (``(slot, generation, bytes of the array)`` each), taken:
        a second call returns []. To :meth:`pin` them, before the message
        is sent."""
        local = self._pending
        last = local.last
        if not last:
            return []
        local.last = None
        return last

    def pin(self, refs: Iterable[tuple[int, int, int]]) -> None:
        """Pin slots not yet sent (as :meth:`last_message` gives them): each
        stays taken, whatever its consumers do, until :meth:`unpin`. A pool
        pins a task's arguments until the task's result arrives, so that a
        task re-sent after its worker died (and the dead worker's claims
        were reclaimed) still finds them."""
        producer = self._producer
        if producer is not None:
            producer.pin([(slot, generation) for slot, generation, _ in refs])

    def unpin(self, refs: Iterable[tuple[int, int, int]]) -> None:
        """Drop pins: a slot no consumer holds is free at once, else once
        they all release it."""
        producer = self._producer
        pairs = [(slot, generation) for slot, generation, _ in refs]
        if producer is not None and pairs:
            producer.unpin(pairs)

    def withdraw(self, refs: Iterable[tuple[int, int, int]]) -> None:
        """Free the slots of a message that was encoded but could not be
        sent (as :meth:`last_message` gave them): no consumer can claim
        them. Slots a consumer holds already are left to it."""
        producer = self._producer
        pairs = [(slot, generation) for slot, generation, _ in refs]
        if producer is not None and pairs:
            producer.abandon(pairs)

    def abandon(self) -> None:
        """Free the slots ``put`` by this thread since the last commit or
        abandon: an encoder calls this when it fails (its message, and so
        the references, will never exist)."""
        pending = self._pending.refs
        if pending:
            refs = [(slot, generation) for slot, generation, _ in pending]
            pending.clear()
            self.arrays_sent -= len(refs)
            producer = self._producer
            if producer is not None:
                producer.abandon(refs)

    def slots_in_use(self) -> int:
        """Slots of this process not yet released (sent and not dropped)."""
        return 0 if self._producer is None else self._producer.in_use()

    @property
    def reclaimed(self) -> int:
        """Slots freed because the consumer holding them disconnected."""
        return 0 if self._producer is None else self._producer.reclaimed

    @property
    def refused_peers(self) -> int:
        """Consumers refused the fd because of their uid."""
        return 0 if self._producer is None else self._producer.refused_peers

    # ------------------------------------------------------------ consumer
    def _attach(self, path: str) -> Attached:
        pool = self._attached.get(path)
        if pool is not None:
            return pool
        with self._lock:
            if self._closed:
                raise AttachError("this receiver's SharedMemory is closed")
            pool = self._attached.get(path)
            if pool is None:
                try:
                    pool = self._attached[path] = self._connect(path)
                except AttachError:
                    self.attach_failures += 1
                    raise
        return pool

    def _connect(self, path: str) -> Attached:
        if not os.path.isabs(path) or "\0" in path:
            raise AttachError("slot pool address %r is not an absolute path" % path[:200])
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        fds: list[int] = []
        try:
            try:
                conn.connect(path)
                uid = peer_uid(conn)
                if uid != os.getuid() and uid not in self.allowed_uids:
                    raise AttachError("slot pool %s is served by uid %d, which is not allowed"
                                      % (path, uid))
                data, fds, _, _ = socket.recv_fds(conn, 8, 1)
            except OSError as exc:
                raise AttachError("cannot fetch slot pool %s: %s" % (
                    path, exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc)))) from None
            if len(data) != 8 or len(fds) != 1:
                raise AttachError("slot pool %s sent no memfd (refused?)" % path)
            (size,) = struct.unpack("<Q", data)
            if os.fstat(fds[0]).st_size != size or size < PAGE:
                raise AttachError("slot pool %s: its memfd is not %d bytes" % (path, size))
            try:
                pool = Attached(path, conn, fds[0], size)
            except (OSError, ValueError, struct.error) as exc:
                raise AttachError("cannot map slot pool %s: %s" % (path, exc)) from None
        except BaseException:
            conn.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        conn.settimeout(None)
        return pool

    def attach(self, path: str, slot: int, generation: int, offset: int, nbytes: int,
               claim: bool) -> Any:
        """The ``nbytes`` at ``offset`` of producer ``path``'s slot ``slot``
        (of ``generation``), checked against the producer's slot table: a
        writeable flat uint8 array, whose drop releases the slot, when
        ``claim``; else None (the reference is only checked). Raises
        AttachError when the pool cannot be mapped or the reference does not
        match its slot."""
        pool = self._attach(path)
        if slot >= pool.slots:
            raise AttachError("slot %d of a pool of %d slots" % (slot, pool.slots))
        table_generation, start, size = ENTRY.unpack_from(pool.map, HEAD.size + ENTRY.size * slot)
        if generation == 0 or table_generation != generation:
            raise AttachError("slot %d holds generation %d, not %d (stale or forged reference)"
                              % (slot, table_generation, generation))
        if offset != start or nbytes > size or offset % 64 or offset + nbytes > len(pool.view):
            raise AttachError("slot %d is %d bytes at offset %d, not %d at %d" % (
                slot, size, start, nbytes, offset))
        if pool.released.get(slot, 0) >= generation:
            raise AttachError("slot %d of generation %d was already released by this process "
                              "(a message decoded twice?)" % (slot, generation))
        if not claim:
            return None
        pool.claim(slot, generation)
        # Claim, then look again: a slot freed by an unpin (its task
        # cancelled or already answered) before the producer read the claim
        # shows a hidden or new entry now (see Producer.unpin).
        if ENTRY.unpack_from(pool.map, HEAD.size + ENTRY.size * slot)[0] != generation:
            pool.release(slot, generation)
            raise AttachError("slot %d of generation %d was freed while this process claimed it "
                              "(its task was cancelled or already answered)" % (slot, generation))
        flat = np.frombuffer(pool.view[offset:offset + nbytes], np.uint8)
        # numpy's own memoryview of the region: every view of the array
        # refers to it, so it dies with the last of them.
        weakref.finalize(flat.base, pool.release, slot, generation)
        self.arrays_received += 1
        return flat

    def close(self, wait: float | None = None) -> bool:
        """Send nothing more by slot; serve the slots already sent until
        their consumers release them (a consumer that has not attached yet
        still can), then remove the socket and its directory. Disconnect
        from other producers once the arrays received from them are gone (a
        disconnection frees their slots). ``wait``: seconds to wait for the
        slots' release (None: do not wait). Returns whether this process's
        slots are all released and their server gone."""
        with self._lock:
            self._closed = True
            producer = self._producer
            attached, self._attached = list(self._attached.values()), {}
        done = True
        if producer is not None:
            done = producer.close(wait)
        for pool in attached:
            with pool.lock:
                pool.closing = True
                if not pool.live:
                    pool.close()
        return done


def node_shared_memory(option: SharedMemory | bool | None) -> tuple[SharedMemory | None, bool]:
    """A node's ``shared_memory`` keyword: ``(the SharedMemory or None,
    whether the node made it and so closes it)``. True makes one with the
    defaults; a SharedMemory is used as it is (its owner closes it)."""
    if option is None or option is False:
        return None, False
    if option is True:
        return SharedMemory(), True
    if isinstance(option, SharedMemory):
        return option, False
    raise TypeError("shared_memory is a bool, None or a SharedMemory, not %s"
                    % type(option).__name__)

