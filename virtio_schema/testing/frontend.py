"""A vhost-user FRONT-END for tests and benchmarks: the part QEMU plays, over a real unix socket.

Theory of operation. The back-end under test (a :class:`~virtio_schema.vhost_user.VhostUserServer`
serving in a thread of the test process) sees exactly what it would see from QEMU: messages sent
with ``sendmsg`` and file descriptors passed as SCM_RIGHTS, guest memory that is a ``memfd`` it must
``mmap`` itself, and ``eventfd``\\ s for kicks and calls. The pieces:

* :class:`Frontend`: one connection; sends requests (well-formed or not), reads replies, and tells a
  closed connection from a slow one;
* :class:`GuestRam`: guest RAM as ``memfd_create`` + ``mmap``, at a guest-physical base and a
  *different* fake front-end ("userspace") base, so the back-end's uva -> gpa translation is
  exercised; a bump allocator hands out ring and buffer space;
* :class:`SplitRingDriver`: the driver's half of a split virtqueue laid out in that memory with the
  library's own ring views (:mod:`virtio_schema.ring`); it publishes chains, reads used entries
  back and gives the SET_VRING_ADDR addresses in the front-end's address space;
* eventfd helpers: :func:`make_eventfd`, :func:`kick`, :func:`wait_signalled`.

Rules of this module:

1. Every blocking wait has a timeout (a back-end that stops answering must fail a test, not hang it).
2. Everything that opens an fd, a socket or a mapping is closed by its ``close`` (or ``with``):
   the test suite runs with ``filterwarnings = error`` and counts the process's fds.
3. Nothing here knows a device: requests and chains are bytes; the tests give them meaning.

Imports: the standard library and :mod:`virtio_schema` (messages, ring views, memory, schema).
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, Self

from virtio_schema.mem import DeviceRange, DriverRange, GuestMemory, write_barrier
from virtio_schema.ring import DESC, AvailRing, Desc, DescTable, UsedRing, linked_descs
from virtio_schema.schema import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    DescFlags,
    avail_ring,
    used_ring,
)
from virtio_schema.vhost_user.messages import (
    CONFIG_HDR,
    HEADER,
    MEM_REGION,
    MEMORY_HDR,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_STATE,
    ConfigHdrRec,
    HeaderFlags,
    HeaderRec,
    MemoryHdrRec,
    MemoryRegionRec,
    Request,
    U64Rec,
    VringAddrRec,
    VringStateRec,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "GPA_BASE",
    "NOFD",
    "UVA_BASE",
    "Frontend",
    "GuestRam",
    "SplitRingDriver",
    "UsedChain",
    "fd_count",
    "is_readable",
    "kick",
    "make_eventfd",
    "wait_for",
    "wait_signalled",
]

DEFAULT_TIMEOUT = 5.0
"""Seconds any single wait may take before the test fails."""

GPA_BASE = 0x4000_0000
"""Guest-physical base of the default RAM (what descriptors carry)."""

UVA_BASE = 0x7F00_0000_0000
"""The front-end's ("QEMU's") virtual address of that RAM (what SET_VRING_ADDR carries)."""

NOFD = 0x100
"""SET_VRING_KICK/CALL/ERR payload flag: no fd accompanies the message."""


# --- small waits -------------------------------------------------------------------------------


def wait_for(
    cond: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, step: float = 0.005
) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return cond()
        time.sleep(step)
    return True


def fd_count() -> int:
    """Open file descriptors of this process (the listing's own fd is counted every time)."""
    return len(os.listdir("/proc/self/fd"))


# --- eventfds ----------------------------------------------------------------------------------


def make_eventfd() -> int:
    """A non-blocking eventfd for a kick, call or err notification (the caller closes it)."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def kick(fd: int) -> None:
    """The driver's available-buffer notification."""
    os.eventfd_write(fd, 1)


def is_readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` seconds (an eventfd: counter > 0)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(int(timeout * 1000)))


def wait_signalled(fd: int, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Wait for a call eventfd to be signalled and consume the signal; ``False`` on timeout."""
    if not is_readable(fd, timeout):
        return False
    os.eventfd_read(fd)
    return True


# --- guest memory ------------------------------------------------------------------------------


class GuestRam:
    """``size`` bytes of guest RAM in a memfd named ``name`` (visible in ``/proc/self/maps`` as
    ``/memfd:NAME``), at guest-physical ``gpa`` and front-end virtual ``uva``."""

    def __init__(
        self, size: int = 1 << 20, *, gpa: int = GPA_BASE, uva: int = UVA_BASE, name: str = "vu-ram"
    ) -> None:
        self.size = size
        self.gpa = gpa
        self.uva = uva
        self.name = name
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.memory = GuestMemory([(gpa, self.mm)])
        self._next = gpa
        self.closed = False

    def alloc(self, size: int, align: int = 16) -> int:
        """Guest address of ``size`` fresh bytes (never freed: tests are short)."""
        start = -(-self._next // align) * align
        if start + size > self.gpa + self.size:
            raise MemoryError(f"GuestRam {self.name}: no room for {size} bytes")
        self._next = start + max(size, 1)
        return start

    def uva_of(self, gpa: int) -> int:
        """The front-end's address of guest address ``gpa``."""
        return gpa - self.gpa + self.uva

    def translate(self, gpa: int, length: int) -> DeviceRange:
        dr = self.memory.translate(DriverRange.from_addr_len(gpa, length))
        assert dr is not None, f"{gpa:#x}+{length:#x} is not in {self.name}"
        return dr

    def read(self, gpa: int, length: int) -> bytes:
        return self.memory.read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        self.memory.write(gpa, data)

    def region(self, **changes: int) -> MemoryRegionRec:
        """This RAM's entry of the memory table (fields overridable for hostile tests)."""
        rec = MemoryRegionRec(
            guest_phys_addr=self.gpa, memory_size=self.size, userspace_addr=self.uva, mmap_offset=0
        )
        return rec._replace(**changes)

    def clone(self, name: str) -> GuestRam:
        """A new memfd with the same addresses and a copy of the contents (and allocator)."""
        other = GuestRam(self.size, gpa=self.gpa, uva=self.uva, name=name)
        other.mm[:] = self.mm[:]
        other._next = self._next
        return other

    def mappings(self) -> int:
        """How many mappings of this memfd the process has (ours and the back-end's)."""
        tag = f"/memfd:{self.name} "
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if tag in line)

    def close(self) -> None:
        """Release the views, unmap, close the memfd (again: nothing happens)."""
        if self.closed:
            return
        self.closed = True
        self.memory.close()
        self.mm.close()
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- the driver's half of a split ring ---------------------------------------------------------


class UsedChain(NamedTuple):
    """A used entry as the driver sees it: head, used length and the bytes written (the
    writable buffers' contents, cut to the used length, concatenated)."""

    head: int
    len: int
    data: bytes


@dataclass
class _Chain:
    descs: list[int]
    writable: list[tuple[int, int]]  # (gpa, len)


class SplitRingDriver:
    """A well-behaved driver of a split ring of ``size`` entries placed in ``ram``.

    Rings are packed like Linux lays them out (table, avail, used, each at its alignment). The
    driver keeps ``used_event`` at the last used index it consumed, so a device with EVENT_IDX
    notifies once per batch, and it always kicks (it ignores ``avail_event``/NO_NOTIFY).
    """

    def __init__(self, ram: GuestRam, size: int = 16) -> None:
        self.size = size
        self.desc_addr = ram.alloc(DESC.size * size, DESC_ALIGN)
        self.avail_addr = ram.alloc(avail_ring(size).sizeof(), AVAIL_ALIGN)
        self.used_addr = ram.alloc(used_ring(size).sizeof(), USED_ALIGN)
        self.avail_idx = 0
        self.last_used = 0
        self._free = list(range(size - 1, -1, -1))  # a stack: descriptor 0 goes first
        self._chains: dict[int, _Chain] = {}
        self.attach(ram)

    def attach(self, ram: GuestRam) -> None:
        """Use ``ram`` from now on (after a memory table change: same addresses, new memfd)."""
        n = self.size
        self.ram = ram
        # The ranges are kept: GuestMemory tracks views through their DeviceRange (weakly), and
        # the ring views alone would outlive a GuestRam.close() and keep the mmap exported.
        self._areas = (
            ram.translate(self.desc_addr, DESC.size * n),
            ram.translate(self.avail_addr, avail_ring(n).sizeof()),
            ram.translate(self.used_addr, used_ring(n).sizeof()),
        )
        self.desc_table = DescTable(self._areas[0], n)
        self.avail = AvailRing(self._areas[1], n)
        self.used_ring = UsedRing(self._areas[2], n)

    def vring_addr(self, index: int = 0) -> VringAddrRec:
        """SET_VRING_ADDR for this ring: front-end addresses, not guest addresses."""
        uva = self.ram.uva_of
        return VringAddrRec(
            index=index,
            flags=0,
            descriptor=uva(self.desc_addr),
            used=uva(self.used_addr),
            available=uva(self.avail_addr),
            log=0,
        )

    def publish(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
    ) -> int:
        """Make a chain available: readable buffers (their contents), then writable buffers (their
        lengths); with ``indirect`` all of them sit in one indirect table. Returns the head."""
        entries: list[tuple[int, int, int]] = []
        chain = _Chain([], [])
        for data in readable:
            addr = self.ram.alloc(len(data), 8)
            self.ram.write(addr, data)
            entries.append((addr, len(data), 0))
        for length in writable:
            addr = self.ram.alloc(length, 8)
            entries.append((addr, length, DescFlags.WRITE))
            chain.writable.append((addr, length))
        count = len(entries)
        assert count, "a chain needs at least one buffer"
        if indirect:
            table = self.ram.alloc(DESC.size * count, 16)
            for k, desc in enumerate(linked_descs(entries, range(count))):
                self.ram.write(table + DESC.size * k, DESC.pack(desc))
            head = self._free.pop()
            chain.descs = [head]
            self.desc_table.set(head, Desc(table, DESC.size * count, DescFlags.INDIRECT, 0))
        else:
            assert count <= len(self._free), "no free descriptors"
            chain.descs = idx = [self._free.pop() for _ in range(count)]
            for i, desc in zip(idx, linked_descs(entries, idx), strict=True):
                self.desc_table.set(i, desc)
            head = idx[0]
        self._chains[head] = chain
        self.avail.set_used_event(self.last_used)
        self.avail.set_ring(self.avail_idx % self.size, head)
        write_barrier()  # the ring entry before the index that publishes it (virtio 1.2, 2.7.13)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.avail.set_idx(self.avail_idx)
        return head

    @property
    def used_idx(self) -> int:
        return self.used_ring.idx()

    def used(self) -> list[UsedChain]:
        """The used entries published since the last call, in order (their descriptors freed)."""
        out: list[UsedChain] = []
        end = self.used_ring.idx()
        while self.last_used != end:
            elem = self.used_ring.elem(self.last_used % self.size)
            self.last_used = (self.last_used + 1) & 0xFFFF
            chain = self._chains.pop(elem.id)
            data = bytearray()
            left = elem.len
            for addr, length in chain.writable:
                take = min(left, length)
                data += self.ram.read(addr, take)
                left -= take
            self._free.extend(reversed(chain.descs))
            out.append(UsedChain(elem.id, elem.len, bytes(data)))
        self.avail.set_used_event(self.last_used)
        return out


# --- the connection ----------------------------------------------------------------------------


class Frontend:
    """One vhost-user connection to the back-end listening on ``path``."""

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise

    # raw traffic

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes, with ``fds`` as SCM_RIGHTS on the first of them."""
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send(
        self,
        request: int,
        payload: bytes = b"",
        *,
        fds: Sequence[int] = (),
        flags: int = VERSION,
        need_reply: bool = False,
        size: int | None = None,
    ) -> None:
        """Send one message; ``size`` overrides the header's payload size (hostile tests)."""
        if need_reply:
            flags |= int(HeaderFlags.NEED_REPLY)
        hdr = HEADER.pack(HeaderRec(request, flags, len(payload) if size is None else size))
        self.send_raw(hdr + payload, fds)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"back-end closed the connection ({len(buf)} of {n} bytes)")
            buf += chunk
        return bytes(buf)

    def reply(self, request: int) -> bytes:
        """Read the reply to ``request``; checks its header (request, REPLY, version 1)."""
        h = HEADER.unpack(self._recv_exact(HEADER.size))
        assert h.request == request, f"reply to {h.request}, expected {request}"
        assert h.flags == VERSION | HeaderFlags.REPLY, f"reply flags {h.flags:#x}"
        return self._recv_exact(h.size)

    def call(
        self,
        request: int,
        payload: bytes = b"",
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> bytes:
        self.send(request, payload, fds=fds, need_reply=need_reply)
        return self.reply(request)

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Wait until the back-end closes the connection; returns what it sent before (nothing,
        from a back-end that drops a bad front-end). A reset counts as closed: Linux reports
        ECONNRESET when the peer closed with our unread bytes in its buffer."""
        got = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"back-end kept the connection open ({bytes(got)!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except ConnectionResetError:
                return bytes(got)
            except TimeoutError:
                continue
            if not chunk:
                return bytes(got)
            got += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # typed requests, in the words of vhost-user.rst

    def get_u64(self, request: int) -> int:
        return U64.unpack(self.call(request)).u64

    def set_u64(
        self, request: int, value: int, *, fds: Sequence[int] = (), need_reply: bool = False
    ) -> int | None:
        """Send a u64 message; with ``need_reply`` returns the REPLY_ACK value."""
        self.send(request, U64.pack(U64Rec(value)), fds=fds, need_reply=need_reply)
        return self.ack(request) if need_reply else None

    def ack(self, request: int) -> int:
        return U64.unpack(self.reply(request)).u64

    def get_features(self) -> int:
        return self.get_u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.set_u64(Request.SET_FEATURES, features)

    def get_protocol_features(self) -> int:
        return self.get_u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.set_u64(Request.SET_PROTOCOL_FEATURES, features)

    def get_queue_num(self) -> int:
        return self.get_u64(Request.GET_QUEUE_NUM)

    def set_owner(self) -> None:
        self.send(Request.SET_OWNER)

    def get_config(self, offset: int, size: int, flags: int = 0) -> tuple[ConfigHdrRec, bytes]:
        """GET_CONFIG: the echoed header and the ``size`` bytes of configuration space."""
        req = CONFIG_HDR.pack(ConfigHdrRec(offset, size, flags)) + bytes(size)
        payload = self.call(Request.GET_CONFIG, req)
        return CONFIG_HDR.unpack_from(payload), payload[CONFIG_HDR.size :]

    def set_mem_table(
        self,
        regions: Sequence[MemoryRegionRec],
        fds: Sequence[int],
        *,
        need_reply: bool = False,
        num_regions: int | None = None,
    ) -> int | None:
        """SET_MEM_TABLE (``num_regions`` overrides the count, for hostile tests)."""
        n = len(regions) if num_regions is None else num_regions
        payload = MEMORY_HDR.pack(MemoryHdrRec(n)) + b"".join(MEM_REGION.pack(r) for r in regions)
        self.send(Request.SET_MEM_TABLE, payload, fds=fds, need_reply=need_reply)
        return self.ack(Request.SET_MEM_TABLE) if need_reply else None

    def use_ram(self, *rams: GuestRam, need_reply: bool = False) -> int | None:
        """SET_MEM_TABLE with one region per RAM, each shared by its memfd."""
        return self.set_mem_table(
            [r.region() for r in rams], [r.fd for r in rams], need_reply=need_reply
        )

    def _vring_state(self, request: int, index: int, num: int, need_reply: bool) -> int | None:
        self.send(request, VRING_STATE.pack(VringStateRec(index, num)), need_reply=need_reply)
        return self.ack(request) if need_reply else None

    def set_vring_num(self, index: int, num: int, *, need_reply: bool = False) -> int | None:
        return self._vring_state(Request.SET_VRING_NUM, index, num, need_reply)

    def set_vring_base(self, index: int, num: int, *, need_reply: bool = False) -> int | None:
        return self._vring_state(Request.SET_VRING_BASE, index, num, need_reply)

    def set_vring_enable(self, index: int, enable: int, *, need_reply: bool = False) -> int | None:
        return self._vring_state(Request.SET_VRING_ENABLE, index, enable, need_reply)

    def get_vring_base(self, index: int) -> VringStateRec:
        payload = VRING_STATE.pack(VringStateRec(index, 0))
        return VRING_STATE.unpack(self.call(Request.GET_VRING_BASE, payload))

    def set_vring_addr(self, addr: VringAddrRec, *, need_reply: bool = False) -> int | None:
        self.send(Request.SET_VRING_ADDR, VRING_ADDR.pack(addr), need_reply=need_reply)
        return self.ack(Request.SET_VRING_ADDR) if need_reply else None

    def _vring_fd(self, request: int, index: int, fd: int | None, need_reply: bool) -> int | None:
        value = index if fd is not None else index | NOFD
        return self.set_u64(
            request, value, fds=[fd] if fd is not None else [], need_reply=need_reply
        )

    def set_vring_kick(self, index: int, fd: int | None, *, need_reply: bool = False) -> int | None:
        return self._vring_fd(Request.SET_VRING_KICK, index, fd, need_reply)

    def set_vring_call(self, index: int, fd: int | None, *, need_reply: bool = False) -> int | None:
        return self._vring_fd(Request.SET_VRING_CALL, index, fd, need_reply)

    def set_vring_err(self, index: int, fd: int | None, *, need_reply: bool = False) -> int | None:
        return self._vring_fd(Request.SET_VRING_ERR, index, fd, need_reply)
