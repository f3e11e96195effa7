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

import atexit
import errno
import logging
import mmap
import os
import selectors
import shutil
import socket
import struct
import tempfile
import threading
import weakref
from typing import Any, Iterable, Literal

import numpy as np

from .protocol import ALIGNED_BYTES

__all__ = ["SharedMemory", "AttachError", "DEFAULT_CAPACITY", "DEFAULT_SLOTS"]

log = logging.getLogger("zmq_cluster")

#: Bytes of a producer's memfd (the arrays' room). Pages are only backed
#: once written; written ones stay with the memfd until it is closed (the
#: cost: up to this much shared memory per producing process).
DEFAULT_CAPACITY = 1 << 30
#: Arrays a producer can have in flight at once (a ventilator may have a
#: whole high-water mark's worth of messages queued: 1024 arrays of 1 MiB
#: fill DEFAULT_CAPACITY).
DEFAULT_SLOTS = 1024

_MAGIC = 0x314D48534D43435A  # b"ZCCMSHM1", little-endian
_PAGE = mmap.PAGESIZE
#: The memfd's first bytes: magic, slot count, data offset, capacity.
_HEAD = struct.Struct("<QQQQ")
#: Per slot in the table after the head: generation, offset, size.
_ENTRY = struct.Struct("<QQQ")
#: What a consumer sends on its connection: op, slot, generation.
_NOTE = struct.Struct("<BIQ")
_CLAIM, _RELEASE = 1, 2
_FREE, _SENT, _CLAIMED = 0, 1, 2


#: Directories of slot servers still running: removed at exit.
_DIRECTORIES: set[str] = set()


@atexit.register
def _remove_directories() -> None:
    for directory in list(_DIRECTORIES):
        shutil.rmtree(directory, ignore_errors=True)


class AttachError(Exception):
    """A reference this process cannot map (the text says why)."""


def _peer_uid(conn: socket.socket) -> int:
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))[1]


class _Producer:
    """A pool of slots in one memfd, served over a Unix socket."""

    def __init__(self, capacity: int, slots: int, allowed_uids: frozenset[int]) -> None:
        self.slots = slots
        self.data_at = -(-(_HEAD.size + _ENTRY.size * slots) // _PAGE) * _PAGE
        self.size = self.data_at + -(-capacity // _PAGE) * _PAGE
        self.allowed_uids = allowed_uids
        self.fd = os.memfd_create("zmq_cluster-slots", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes = np.frombuffer(self.map, np.uint8)
        _HEAD.pack_into(self.map, 0, _MAGIC, slots, self.data_at, self.size - self.data_at)
        self.state = [_FREE] * slots
        self.holder: list[socket.socket | None] = [None] * slots
        self.generation = [0] * slots
        self.extents: list[tuple[int, int]] = [(self.data_at, self.size - self.data_at)]
        self.lock = threading.Lock()
        self.reclaimed = 0
        self.refused_peers = 0
        self.bad_notes = 0
        self.directory = tempfile.mkdtemp(prefix="zmq_cluster-shm-")  # mode 0700
        _DIRECTORIES.add(self.directory)
        self.path = os.path.join(self.directory, "slots")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(64)
        self.wake_r, self.wake_w = socket.socketpair()
        self.closed = False
        self.thread = threading.Thread(target=self._serve, name="zmq_cluster-shm", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- slots
    def put(self, arr: np.ndarray) -> tuple[int, int, int] | None:
        """Copy ``arr`` into a free slot: ``(slot, generation, offset)``, or
        None when no slot or room is free."""
        nbytes = arr.nbytes
        need = -(-nbytes // _PAGE) * _PAGE
        with self.lock:
            if self.closed:
                return None
            try:
                slot = self.state.index(_FREE)
            except ValueError:
                return None
            for i, (start, size) in enumerate(self.extents):
                if size >= need:
                    break
            else:
                return None
            if size == need:
                del self.extents[i]
            else:
                self.extents[i] = (start + need, size - need)
            self.state[slot] = _SENT
            self.generation[slot] += 1
            generation = self.generation[slot]
            _ENTRY.pack_into(self.map, _HEAD.size + _ENTRY.size * slot, generation, start, need)
        order: Literal["C", "F"] = (
            "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C")
        dest = self.bytes[start:start + nbytes].view(arr.dtype).reshape(arr.shape, order=order)
        np.copyto(dest, arr, casting="no")
        return slot, generation, start

    def _free(self, slot: int) -> None:
        """Return ``slot``'s extent (under the lock)."""
        at = _HEAD.size + _ENTRY.size * slot
        _, start, size = _ENTRY.unpack_from(self.map, at)
        _ENTRY.pack_into(self.map, at, 0, 0, 0)
        self.state[slot] = _FREE
        self.holder[slot] = None
        extents = self.extents
        extents.append((start, size))
        extents.sort()
        merged = [extents[0]]
        for s, n in extents[1:]:
            last_s, last_n = merged[-1]
            if last_s + last_n == s:
                merged[-1] = (last_s, last_n + n)
            else:
                merged.append((s, n))
        self.extents[:] = merged

    def abandon(self, refs: list[tuple[int, int]]) -> None:
        """Free the slots of references that never went out."""
        with self.lock:
            for slot, generation in refs:
                if self.generation[slot] == generation and self.state[slot] == _SENT:
                    self._free(slot)
            closed = self.closed
        if closed:
            try:
                self.wake_w.send(b"x")  # (the server may be waiting for these)
            except OSError:
                pass

    def in_use(self) -> int:
        with self.lock:
            return sum(state != _FREE for state in self.state)

    # ---------------------------------------------------------------- server
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ, None)
        sel.register(self.wake_r, selectors.EVENT_READ, None)
        pending: dict[socket.socket, bytes] = {}
        try:
            while True:
                for key, _ in sel.select():
                    sock = key.fileobj
                    if sock is self.wake_r:
                        self.wake_r.recv(64)
                    elif sock is self.server:
                        self._accept(sel, pending)
                    else:
                        self._read(sel, pending, sock)  # type: ignore[arg-type]
                # Closed: serve until the last slot is released (consumers
                # that have not attached yet still can), then go.
                if self.closed and not self.in_use():
                    return
        except Exception:
            log.exception("shared memory: the slot server stopped")
        finally:
            for conn in list(pending):
                conn.close()
            sel.close()
            self._teardown()

    def _accept(self, sel: selectors.BaseSelector, pending: dict[socket.socket, bytes]) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        try:
            uid = _peer_uid(conn)
            if uid != os.getuid() and uid not in self.allowed_uids:
                self.refused_peers += 1
                log.warning("shared memory: refused a consumer of uid %d (not allowed)", uid)
                conn.close()
                return
            socket.send_fds(conn, [struct.pack("<Q", self.size)], [self.fd])
        except OSError:
            conn.close()
            return
        conn.setblocking(False)
        pending[conn] = b""
        sel.register(conn, selectors.EVENT_READ, None)

    def _read(self, sel: selectors.BaseSelector, pending: dict[socket.socket, bytes],
              conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the consumer is gone: reclaim what it held
            sel.unregister(conn)
            del pending[conn]
            with self.lock:
                for slot in range(self.slots):
                    if self.holder[slot] is conn:
                        self._free(slot)
                        self.reclaimed += 1
            conn.close()
            return
        buf = pending[conn] + data
        end = len(buf) - len(buf) % _NOTE.size
        with self.lock:
            for op, slot, generation in _NOTE.iter_unpack(buf[:end]):
                if slot >= self.slots or self.generation[slot] != generation:
                    self.bad_notes += 1
                elif op == _CLAIM and self.state[slot] == _SENT:
                    self.state[slot] = _CLAIMED
                    self.holder[slot] = conn
                elif op == _RELEASE and self.holder[slot] is conn:
                    self._free(slot)
                else:
                    self.bad_notes += 1
        pending[conn] = buf[end:]

    def close(self, wait: float | None = None) -> bool:
        """No more ``put``; the slots are served until every one is
        released (or reclaimed), then the socket, its directory and the
        memfd go. ``wait``: seconds to wait for that (None: do not wait).
        Whether it is done."""
        with self.lock:
            self.closed = True
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass
        if wait is not None:
            self.thread.join(wait)
        return not self.thread.is_alive()

    def _teardown(self) -> None:
        for sock in (self.server, self.wake_r, self.wake_w):
            sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        _DIRECTORIES.discard(self.directory)
        # The memfd lives on while consumers map it; our mapping goes with
        # the arrays still viewing it (numpy keeps the mmap alive).
        os.close(self.fd)


class _Attached:
    """A producer's memfd as this process maps it, and the connection that
    tells the producer which slots are held."""

    def __init__(self, path: str, conn: socket.socket, fd: int, size: int) -> None:
        self.path = path
        self.conn = conn
        self.map = mmap.mmap(fd, size)
        self.view = memoryview(self.map)
        magic, slots, data_at, capacity = _HEAD.unpack_from(self.map, 0)
        if (magic != _MAGIC or data_at % _PAGE or data_at + capacity != size
                or _HEAD.size + _ENTRY.size * slots > data_at):
            raise AttachError("%s is not a zmq_cluster slot pool" % path)
        self.slots = slots
        self.data_at = data_at
        # Reentrant: a finalizer (a release) can run in the middle of
        # anything this thread does, a claim included.
        self.lock = threading.RLock()
        self.broken = False
        self.live = 0  # arrays handed out and not yet dropped
        self.closing = False  # close the connection once live is 0
        self.held: dict[int, list[int]] = {}  # slot -> [generation, arrays on it]
        self.released: dict[int, int] = {}  # slot -> last generation this process released

    def claim(self, slot: int, generation: int) -> None:
        """One more array on ``slot``: the producer is told of the first.
        A reference decoded again (the same message twice) shares the claim
        while an array of it lives, and is refused after its release."""
        with self.lock:
            held = self.held.get(slot)
            if self.released.get(slot, 0) >= generation or (held and held[0] != generation):
                raise AttachError("slot %d of generation %d was already released by this "
                                  "process (a message decoded twice?)" % (slot, generation))
            self.live += 1
            if held:
                held[1] += 1
                return
            self.held[slot] = [generation, 1]
            self._send(_CLAIM, slot, generation)

    def release(self, slot: int, generation: int) -> None:
        """An array on ``slot`` was dropped (a finalizer, from any thread):
        the producer is told when it was the last."""
        with self.lock:
            self.live -= 1
            held = self.held.get(slot)
            if held and held[0] == generation:
                held[1] -= 1
                if not held[1]:
                    del self.held[slot]
                    self.released[slot] = generation
                    self._send(_RELEASE, slot, generation)
            if self.closing and not self.live:
                self.close()

    def _send(self, op: int, slot: int, generation: int) -> None:
        if not self.broken:
            try:
                self.conn.sendall(_NOTE.pack(op, slot, generation))
            except OSError:  # the producer is gone: nothing to tell
                self.broken = True

    def close(self) -> None:
        """Close the connection (under the lock): the producer then reclaims
        whatever this process still held, so only once ``live`` is 0."""
        self.broken = True
        self.conn.close()


class SharedMemory:
    """A node's shared-memory transport for arrays of ``min_bytes`` or more
    between processes on this host (see the module's docstring).

    ``capacity`` bytes of room and ``slots`` arrays in flight for what this
    process sends; ``allowed_uids``: other uids whose processes may map this
    process's slots (and whose slot pools this process maps), besides its
    own. ``close()`` (also on exit from ``with``) stops serving the slots;
    arrays already received elsewhere stay valid.

    Counters: ``arrays_sent`` (by slot), ``fallbacks`` (arrays of
    ``min_bytes`` or more that went over the socket, no slot being free),
    ``arrays_received``, ``attach_failures``; the producer's ``reclaimed``
    slots and ``refused_peers`` are properties.
    """

    def __init__(self, min_bytes: int = ALIGNED_BYTES, capacity: int = DEFAULT_CAPACITY,
                 slots: int = DEFAULT_SLOTS, allowed_uids: Iterable[int] = ()) -> None:
        if min_bytes < 1 or capacity < _PAGE or not 1 <= slots <= 1 << 16:
            raise ValueError("min_bytes >= 1, capacity >= one page, 1 <= slots <= 65536")
        self.min_bytes = int(min_bytes)
        self.capacity = int(capacity)
        self.slots = int(slots)
        self.allowed_uids = frozenset(int(uid) for uid in allowed_uids)
        self._producer: _Producer | None = None
        self._attached: dict[str, _Attached] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pending = threading.local()  # references put by this thread, not yet committed
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

    def _pool(self) -> _Producer:
        with self._lock:
            if self._producer is None:
                if self._closed:
                    raise ValueError("this SharedMemory is closed")
                self._producer = _Producer(self.capacity, self.slots, self.allowed_uids)
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
        pending = getattr(self._pending, "refs", None)
        if pending is None:
            pending = self._pending.refs = []
        pending.append(where[:2])
        return (pool.path,) + where

    def commit(self) -> None:
        """The references ``put`` by this thread since the last commit or
        abandon are in a message: an encoder calls this when it succeeds."""
        pending = getattr(self._pending, "refs", None)
        if pending:
            pending.clear()

    def abandon(self) -> None:
        """Free the slots ``put`` by this thread since the last commit or
        abandon: an encoder calls this when it fails (its message, and so
        the references, will never exist)."""
        pending = getattr(self._pending, "refs", None)
        if pending:
            refs = list(pending)
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
    def _attach(self, path: str) -> _Attached:
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

    def _connect(self, path: str) -> _Attached:
        if not os.path.isabs(path) or "\0" in path:
            raise AttachError("slot pool address %r is not an absolute path" % path[:200])
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        fds: list[int] = []
        try:
            try:
                conn.connect(path)
                uid = _peer_uid(conn)
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
            if os.fstat(fds[0]).st_size != size or size < _PAGE:
                raise AttachError("slot pool %s: its memfd is not %d bytes" % (path, size))
            try:
                pool = _Attached(path, conn, fds[0], size)
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
        table_generation, start, size = _ENTRY.unpack_from(pool.map, _HEAD.size + _ENTRY.size * slot)
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
