"""The consumer's side of a same-host slot pool: a producer's memfd as
this process maps it (see ``zmq_cluster.sharedmem``)."""

from __future__ import annotations

import mmap
import socket
import threading

from ._shm_layout import CLAIM, ENTRY, HEAD, MAGIC, NOTE, PAGE, RELEASE, AttachError

__all__ = ["Attached"]


class Attached:
    """A producer's memfd as this process maps it, and the connection that
    tells the producer which slots are held."""

    def __init__(self, path: str, conn: socket.socket, fd: int, size: int) -> None:
        self.path = path
        self.conn = conn
        self.map = mmap.mmap(fd, size)
        self.view = memoryview(self.map)
        magic, slots, data_at, capacity = HEAD.unpack_from(self.map, 0)
        if (magic != MAGIC or data_at % PAGE or data_at + capacity != size
                or HEAD.size + ENTRY.size * slots > data_at):
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
            self._send(CLAIM, slot, generation)

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
                    self._send(RELEASE, slot, generation)
            if self.closing and not self.live:
                self.close()

    def _send(self, op: int, slot: int, generation: int) -> None:
        if not self.broken:
            try:
                self.conn.sendall(NOTE.pack(op, slot, generation))
            except OSError:  # the producer is gone: nothing to tell
                self.broken = True

    def close(self) -> None:
        """Close the connection (under the lock): the producer then reclaims
        whatever this process still held, so only once ``live`` is 0."""
        self.broken = True
        self.conn.close()


