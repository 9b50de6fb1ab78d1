"""The live-migration dirty log: one bit per 4 KiB page of guest memory that the device wrote.

Source: QEMU ``docs/interop/vhost-user.rst``, "Migration" and SET_LOG_BASE. While the front-end
migrates the guest it copies guest memory to the destination while the guest (and the device)
keep running; what changes after a page was copied must be copied again. The front-end sees the
guest's own writes; the device's it learns from the log: a bitmap the front-end allocates and
hands over with SET_LOG_BASE (its fd, ``mmap_size`` and ``mmap_offset``), bit ``p % 8`` of byte
``p // 8`` standing for the page at guest-physical address ``p * 4096``.

Theory of operation. :class:`DirtyLog` wraps the mapped bitmap (a writable ``memoryview``) and
does no I/O. The queues mark what they write (:meth:`~virtio_schema.queue.Queue.set_dirty_log`):
the bytes a returned chain's ``written`` count says it wrote into its device-writable buffers, in
one place that every write path goes through (the chain writers, the fd transfers, a device
writing through views: they all report ``written``), and the ring areas the device writes (the
used ring, or the packed descriptor ring and device event area), after the stores and before
the used index that publishes them. The transport switches the queues' log on and off with
``VHOST_F_LOG_ALL`` (feature bit 26) and stops the rings (GET_VRING_BASE) only after the last
mark, so the front-end's final pass sees every page.

Rules of this module:

1. Addresses are guest-physical, never the front-end's: the chain's buffer addresses, and for the
   rings the log address SET_VRING_ADDR gave with ``VHOST_VRING_F_LOG``.
2. A mark never writes outside the bitmap: the transport refuses a log too small for the memory
   table (:meth:`DirtyLog.covers`), and a page past the end is dropped and counted
   (:attr:`DirtyLog.missed`), not written.
3. A mark is a byte read-OR-write, made under the log's lock: the rings of one connection may be
   served by several worker threads (the server's worker model), and two marks in one byte made
   at once must not lose a bit (each would write back the byte it read, without the other's).
   The lock is taken only to mark, that is only while the front-end migrates: a queue without a
   log never reaches it. The front-end reads and clears bytes at the same time with an atomic
   exchange: a race with it can only leave a bit set that was already copied (one page copied
   again), never clear one we set after the data.
"""

from __future__ import annotations

import threading
from typing import Final

__all__ = ["PAGE_SHIFT", "PAGE_SIZE", "DirtyLog"]

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
"""The log's page: 4 KiB (``VHOST_LOG_PAGE``), whatever the guest's page size."""


class DirtyLog:
    """The dirty bitmap mapped from the front-end's log fd (``view``: its ``mmap_size`` bytes
    from ``mmap_offset``)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pages = 8 * len(view)
        """Pages the bitmap covers (from guest-physical 0)."""
        self.missed = 0
        """Marks dropped because their pages are past the bitmap (a front-end that did not
        grow the log with the memory)."""
        self.marks = 0
        """Marks made (a transport signals the front-end's log eventfd when it moved)."""
        self._lock = threading.Lock()  # rule 3: marks from several threads

    def covers(self, end: int) -> bool:
        """Whether the bitmap has a bit for every page below guest-physical ``end``."""
        return (end + PAGE_SIZE - 1) >> PAGE_SHIFT <= self.pages

    def mark(self, addr: int, length: int) -> None:
        """The device wrote ``length`` bytes at guest-physical ``addr``: set their pages' bits."""
        if length <= 0:
            return
        first = addr >> PAGE_SHIFT
        last = (addr + length - 1) >> PAGE_SHIFT
        with self._lock:  # the counts and every byte's read-OR-write (rule 3)
            self.marks += 1
            if last >= self.pages:
                self.missed += 1
                if first >= self.pages:
                    return
                last = self.pages - 1
            view = self.view
            while first <= last:
                byte = first >> 3
                if first & 7 == 0 and last - first >= 7:  # whole bytes: no read needed
                    span = min((last - first + 1) >> 3, len(view) - byte)
                    view[byte : byte + span] = b"\xff" * span
                    first += span << 3
                    continue
                view[byte] = view[byte] | (1 << (first & 7))
                first += 1

    def release(self) -> None:
        """Let go of the view (the owner may unmap the log)."""
        self.view.release()
