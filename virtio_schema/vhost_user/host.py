"""The operating system side of the vhost-user back-end: what the server does for the core.

Theory of operation. The protocol core (:mod:`~virtio_schema.vhost_user.backend`) never calls the
operating system; the server does it with the functions here: it classifies every received fd
(:func:`classify`), maps guest memory under a :class:`MemoryPolicy` (:class:`OsHost`), and signals
call fds (:func:`signal`).

Guest memory that can shrink. A front-end that truncates a memory file after the back-end mapped it
makes the next access to the missing pages raise SIGBUS, which kills a Python process (it cannot be
caught). So before mapping a region the host reads the file's seals (``F_GET_SEALS``) and seals it
against shrinking itself where the file allows it (``F_ADD_SEALS`` with ``F_SEAL_SHRINK``: a memfd
created with ``MFD_ALLOW_SEALING`` and not sealed with ``F_SEAL_SEAL``), and checks that the file
covers the mapping. QEMU's ``memory-backend-memfd`` seals its memfd itself (``seal=on``, the
default). What cannot be sealed (a regular file on tmpfs or hugetlbfs, which
``memory-backend-file`` and DPDK use; a memfd sealed with ``F_SEAL_SEAL`` but not against
shrinking) follows the policy the server's user chose:

* :attr:`MemoryPolicy.TRUST` (the default): map it, and log once per region that the back-end
  trusts this front-end not to shrink it;
* :attr:`MemoryPolicy.SEALED`: refuse it (the front-end's SET_MEM_TABLE fails).

Rules of this module:

1. Only :class:`OsHost` closes an fd the core owns, and it forgets a kick fd (``on_close``) before
   closing it, so the poller never watches a number the kernel may reuse.
2. Every operating-system error becomes :class:`~virtio_schema.vhost_user.backend.MemoryRefused`
   with the reason, or is suppressed where the peer alone suffers (a call fd nobody reads).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from virtio_schema.vhost_user.backend import Fd, FdKind, Mapping, MemoryRefused

__all__ = ["MemoryPolicy", "OsHost", "OsMapping", "classify", "signal"]

log = logging.getLogger(__name__)

_ONE = (1).to_bytes(8, "little")


class MemoryPolicy(enum.Enum):
    """What the back-end does with guest memory it cannot seal against shrinking."""

    TRUST = "trust"
    """Map it and log that the front-end is trusted not to shrink it (QEMU's
    ``memory-backend-file``, DPDK's virtio-user)."""
    SEALED = "sealed"
    """Refuse it: only memory sealed against shrinking is mapped."""


def classify(fd: int) -> Fd:
    """What ``fd`` is, by ``fstat`` (an eventfd is an anonymous inode named ``[eventfd]``).
    Eventfds, pipes and sockets are made non-blocking (a saturated or empty one never blocks the
    server)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return Fd(fd, FdKind.OTHER)
    kind = FdKind.OTHER
    if stat.S_ISREG(mode):
        kind = FdKind.FILE
    elif stat.S_ISFIFO(mode):
        kind = FdKind.PIPE
    elif stat.S_ISSOCK(mode):
        kind = FdKind.SOCKET
    elif stat.S_IFMT(mode) == 0:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]":
                kind = FdKind.EVENTFD
    if kind in (FdKind.PIPE, FdKind.EVENTFD, FdKind.SOCKET):
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)
    return Fd(fd, kind)


def signal(fd: int) -> None:
    """Signal a call fd (add 1 to an eventfd, or write 8 bytes to a pipe). A full or closed one
    is the front-end's problem: never raised, never blocking."""
    try:  # noqa: SIM105 - once per turn: a plain try costs less than contextlib.suppress
        os.write(fd, _ONE)
    except OSError:
        pass


@dataclass
class OsMapping:
    """A region mapped with ``mmap`` and the view the core uses."""

    mm: mmap.mmap
    view: memoryview

    def close(self) -> None:
        self.view.release()
        self.mm.close()  # BufferError if a view derived from it is alive (the core logs it)


class OsHost:
    """The :class:`~virtio_schema.vhost_user.backend.Host` of one connection."""

    def __init__(
        self,
        *,
        policy: MemoryPolicy = MemoryPolicy.TRUST,
        name: str = "vhost-user",
        on_close: Callable[[int], None] | None = None,
    ) -> None:
        self.policy = policy
        self.name = name
        self._on_close = on_close

    def close(self, fd: int) -> None:
        if self._on_close is not None:
            self._on_close(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def map(self, fd: Fd, offset: int, size: int) -> Mapping:
        try:
            file_size = os.fstat(fd.num).st_size
        except OSError as exc:
            raise MemoryRefused(f"cannot stat fd {fd.num}: {exc}") from None
        self._seal(fd.num)
        if offset + size > file_size:
            raise MemoryRefused(
                f"offset {offset:#x} + size {size:#x} is past the end of the file ({file_size:#x})"
            )
        try:
            mm = mmap.mmap(fd.num, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise MemoryRefused(f"cannot map fd {fd.num}: {exc}") from None
        # checked again after mapping: a front-end may have shrunk it in between (sealed now or
        # trusted by the policy, it cannot shrink it afterwards unnoticed by the policy's log)
        if os.fstat(fd.num).st_size < offset + size:
            mm.close()
            raise MemoryRefused(f"fd {fd.num} shrank below {offset + size:#x} while being mapped")
        return OsMapping(mm, memoryview(mm)[offset : offset + size])

    def create_shared(self, size: int) -> tuple[int, Mapping]:
        """A memfd of ``size`` zero bytes, sealed against growing, shrinking and new seals (the
        front-end cannot resize what we map), mapped shared."""
        try:
            fd = os.memfd_create("virtio-schema-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise MemoryRefused(f"memfd_create: {exc}") from None
        try:
            os.ftruncate(fd, size)
            seals = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise MemoryRefused(f"a shared region of {size} bytes: {exc}") from None
        return fd, OsMapping(mm, memoryview(mm))

    def _seal(self, fd: int) -> None:
        """Seal ``fd`` against shrinking where it can be; otherwise apply the policy."""
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = None  # not a memfd or a tmpfs file that supports seals
        if seals is not None and not seals & fcntl.F_SEAL_SHRINK and not seals & fcntl.F_SEAL_SEAL:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
                seals |= fcntl.F_SEAL_SHRINK
        if seals is not None and seals & fcntl.F_SEAL_SHRINK:
            return
        why = "it has no seals" if seals is None else "it is sealed against new seals"
        if self.policy is MemoryPolicy.SEALED:
            raise MemoryRefused(f"the memory cannot be sealed against shrinking ({why})")
        log.warning(
            "%s: guest memory fd cannot be sealed against shrinking (%s): trusting the"
            " front-end not to truncate it (a truncated mapping kills this process with SIGBUS;"
            " MemoryPolicy.SEALED refuses such memory)",
            self.name, why,
        )  # fmt: skip
