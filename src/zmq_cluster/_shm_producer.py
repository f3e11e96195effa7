"""The producer's side of a same-host slot pool: a memfd of slots served
over a Unix socket (see ``zmq_cluster.sharedmem``)."""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import selectors
import shutil
import socket
import struct
import tempfile
import threading
from typing import Literal

import numpy as np

from ._shm_layout import CLAIM, ENTRY, HEAD, MAGIC, NOTE, PAGE, RELEASE, peer_uid

__all__ = ["Producer"]

log = logging.getLogger("zmq_cluster")

_FREE, _SENT, _CLAIMED = 0, 1, 2

#: Directories of slot servers still running: removed at exit.
_DIRECTORIES: set[str] = set()


@atexit.register
def _remove_directories() -> None:
    for directory in list(_DIRECTORIES):
        shutil.rmtree(directory, ignore_errors=True)




class Producer:
    """A pool of slots in one memfd, served over a Unix socket."""

    def __init__(self, capacity: int, slots: int, allowed_uids: frozenset[int],
                 retain: int = 1 << 62) -> None:
        self.slots = slots
        self.data_at = -(-(HEAD.size + ENTRY.size * slots) // PAGE) * PAGE
        self.size = self.data_at + -(-capacity // PAGE) * PAGE
        self.allowed_uids = allowed_uids
        self.retain_end = self.data_at + -(-retain // PAGE) * PAGE
        self.fd = os.memfd_create("zmq_cluster-slots", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes = np.frombuffer(self.map, np.uint8)
        HEAD.pack_into(self.map, 0, MAGIC, slots, self.data_at, self.size - self.data_at)
        self.state = [_FREE] * slots
        # The consumers holding each slot (a pinned slot re-sent after its
        # consumer died is held by the next one), and whether the sender
        # pins it (keeps it until it unpins, whoever releases it meanwhile).
        self.holders: list[set[socket.socket]] = [set() for _ in range(slots)]
        self.pinned = [False] * slots
        self.generation = [0] * slots
        self.extents: list[tuple[int, int]] = [(self.data_at, self.size - self.data_at)]
        self.lock = threading.Lock()
        #: Consumer connections and the part of a note each has sent.
        self.partial: dict[socket.socket, bytes] = {}
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
        need = -(-nbytes // PAGE) * PAGE
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
            ENTRY.pack_into(self.map, HEAD.size + ENTRY.size * slot, generation, start, need)
        order: Literal["C", "F"] = (
            "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C")
        dest = self.bytes[start:start + nbytes].view(arr.dtype).reshape(arr.shape, order=order)
        np.copyto(dest, arr, casting="no")
        return slot, generation, start

    def _free(self, slot: int) -> None:
        """Return ``slot``'s extent (under the lock)."""
        at = HEAD.size + ENTRY.size * slot
        _, start, size = ENTRY.unpack_from(self.map, at)
        ENTRY.pack_into(self.map, at, 0, 0, 0)
        self.state[slot] = _FREE
        self.holders[slot].clear()
        self.pinned[slot] = False
        if start + size > self.retain_end:  # beyond what stays backed
            lo = max(start, self.retain_end)
            self.map.madvise(mmap.MADV_REMOVE, lo, start + size - lo)
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

    def _let_go(self, slot: int, conn: socket.socket) -> None:
        """``conn`` no longer holds ``slot`` (released, or gone): the slot
        is free once nobody holds it and it is not pinned (under the lock)."""
        holders = self.holders[slot]
        holders.discard(conn)
        if not holders:
            if self.pinned[slot]:
                self.state[slot] = _SENT
            else:
                self._free(slot)

    def pin(self, refs: list[tuple[int, int]]) -> None:
        """Pin these ``(slot, generation)``, not yet sent: each stays taken
        until :meth:`unpin`, whatever its consumers do meanwhile."""
        with self.lock:
            for slot, generation in refs:
                if self.generation[slot] == generation and self.state[slot] == _SENT:
                    self.pinned[slot] = True

    def unpin(self, refs: list[tuple[int, int]]) -> None:
        """Drop the pins of these ``(slot, generation)``: each slot is free
        at once when no consumer holds it, else when the last lets go."""
        with self.lock:
            # A consumer claims first and checks the slot table after (see
            # SharedMemory.attach). So the entry is hidden first and the
            # notes drained after: a claim sent before the drain keeps the
            # slot (its entry comes back); one sent after finds the entry
            # hidden or gone and is refused by its consumer.
            hidden = []
            for slot, generation in refs:
                if self.generation[slot] == generation and self.pinned[slot]:
                    self.pinned[slot] = False
                    if self.state[slot] == _SENT:
                        at = HEAD.size + ENTRY.size * slot
                        _, start, size = ENTRY.unpack_from(self.map, at)
                        ENTRY.pack_into(self.map, at, 0, start, size)
                        hidden.append((slot, generation, start, size))
            self._drain()
            for slot, generation, start, size in hidden:
                if self.state[slot] == _SENT:
                    self._free(slot)
                else:  # claimed before the drain: the consumer keeps it
                    ENTRY.pack_into(self.map, HEAD.size + ENTRY.size * slot, generation,
                                    start, size)
            closed = self.closed
        if closed:
            try:
                self.wake_w.send(b"x")
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
        pending = self.partial
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
            uid = peer_uid(conn)
            if uid != os.getuid() and uid not in self.allowed_uids:
                self.refused_peers += 1
                log.warning("shared memory: refused a consumer of uid %d (not allowed)", uid)
                conn.close()
                return
            # Heard by unpin's drain before the consumer has the memory:
            # otherwise a claim it sends at once could be missed, and its
            # slot freed under it.
            conn.setblocking(False)
            with self.lock:
                pending[conn] = b""
            socket.send_fds(conn, [struct.pack("<Q", self.size)], [self.fd])
        except OSError:
            with self.lock:
                pending.pop(conn, None)
            conn.close()
            return
        sel.register(conn, selectors.EVENT_READ, None)

    def _read(self, sel: selectors.BaseSelector, pending: dict[socket.socket, bytes],
              conn: socket.socket) -> None:
        with self.lock:  # (unpin reads the connections too: one reader at a time)
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                self._notes(conn, data)
                return
            # The consumer is gone: reclaim what it held.
            del pending[conn]
            for slot in range(self.slots):
                if conn in self.holders[slot]:
                    self._let_go(slot, conn)
                    self.reclaimed += 1
        sel.unregister(conn)
        conn.close()

    def _drain(self) -> None:
        """Take the notes already sent on every connection (under the
        lock): an unpin must see a claim its consumer sent before it."""
        for conn in list(self.partial):
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:  # BlockingIOError: nothing more; else the server sees it
                    break
                if not data:
                    break
                self._notes(conn, data)

    def _notes(self, conn: socket.socket, data: bytes) -> None:
        """Apply the claim and release notes in ``data`` (under the lock)."""
        buf = self.partial[conn] + data
        end = len(buf) - len(buf) % NOTE.size
        for op, slot, generation in NOTE.iter_unpack(buf[:end]):
            if slot >= self.slots or self.generation[slot] != generation:
                self.bad_notes += 1
            elif op == CLAIM and (self.state[slot] == _SENT or (
                    self.pinned[slot] and self.state[slot] == _CLAIMED)):
                self.state[slot] = _CLAIMED
                self.holders[slot].add(conn)
            elif op == RELEASE and conn in self.holders[slot]:
                self._let_go(slot, conn)
            else:
                self.bad_notes += 1
        self.partial[conn] = buf[end:]

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


