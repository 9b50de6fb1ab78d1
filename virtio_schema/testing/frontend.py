"""A vhost-user FRONT-END for tests and benchmarks: the part QEMU plays, over a real unix socket.

Theory of operation. The back-end under test (a :class:`~virtio_schema.vhost_user.VhostUserServer`
serving in a thread of the test process) sees exactly what it would see from QEMU: messages sent
with ``sendmsg`` and file descriptors passed as SCM_RIGHTS, guest memory that is a ``memfd`` it must
``mmap`` itself, and ``eventfd``\\ s for kicks and calls. The pieces:

* :class:`Frontend`: one connection; sends requests (well-formed or not), reads replies, and tells a
  closed connection from a slow one;
* :class:`GuestRam`: guest RAM as ``memfd_create`` + ``mmap``, at a guest-physical base and a
  *different* fake front-end ("userspace") base, so the back-end's uva -> gpa translation is
  exercised; the mapping is wrapped in a :class:`~virtio_schema.fake_queue.FakeMemory`
  (:meth:`~virtio_schema.fake_queue.FakeMemory.over`), whose allocator hands out ring and buffer
  space;
* :class:`SplitRingDriver`: the guest's driver of a split virtqueue in that memory. It IS the fake
  driver, :class:`~virtio_schema.fake_queue.FakeDriver`, on the RAM's ``FakeMemory``: ring layout,
  publishing, used entries, buffer bookkeeping and the well-behaved driver's checks are that one
  implementation, shared with the in-process tests. It adds only what a front-end needs: the
  SET_VRING_ADDR addresses in the front-end's address space, ``used_event`` kept at the last used
  entry consumed, and :meth:`SplitRingDriver.attach` to new RAM after a memory table change;
* eventfd helpers: :func:`make_eventfd`, :func:`kick`, :func:`wait_signalled`.

Rules of this module:

1. Every blocking wait has a timeout (a back-end that stops answering must fail a test, not hang it).
2. Everything that opens an fd, a socket or a mapping is closed by its ``close`` (or ``with``):
   the test suite runs with ``filterwarnings = error`` and counts the process's fds.
3. Nothing here knows a device: requests and chains are bytes; the tests give them meaning.

Imports: the standard library and :mod:`virtio_schema` (messages, the fake driver, schema).
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from virtio_schema.errors import DeviceUsageError
from virtio_schema.fake_queue import FakeDriver, FakeMemory, UsedChain
from virtio_schema.schema import Feature
from virtio_schema.vhost_user.inflight import INFLIGHT, InflightRec
from virtio_schema.vhost_user.messages import (
    CONFIG_HDR,
    HEADER,
    MEM_REGION,
    MEMORY_HDR,
    NOFD,
    SINGLE_MEM_REGION,
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
        self,
        size: int = 1 << 20,
        *,
        gpa: int = GPA_BASE,
        uva: int = UVA_BASE,
        name: str = "vu-ram",
        sealable: bool = True,
    ) -> None:
        self.size = size
        self.gpa = gpa
        self.uva = uva
        self.name = name
        # ``sealable`` (the default), as QEMU's memory-backend-memfd: the back-end seals it
        # against shrinking; else sealed against new seals by the kernel, as DPDK's --no-huge
        # memory: it can never be sealed, and the back-end's memory policy decides
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
        self.fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.memory = FakeMemory.over([(gpa, self.mm)])
        """The fake driver's memory: the mapping, and the allocator of ring and buffer space."""
        self.closed = False

    def alloc(self, size: int, align: int = 16) -> int:
        """Guest address of ``size`` fresh (zeroed) bytes from :attr:`memory`'s allocator, the
        one the drivers in this RAM allocate from too."""
        return self.memory.alloc(size, align)

    def uva_of(self, gpa: int) -> int:
        """The front-end's address of guest address ``gpa``."""
        return gpa - self.gpa + self.uva

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
        """A new memfd with the same addresses and a copy of the contents (and allocations)."""
        other = GuestRam(self.size, gpa=self.gpa, uva=self.uva, name=name)
        other.mm[:] = self.mm[:]
        other.memory.copy_allocations(self.memory)
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


# --- the guest's driver: the fake driver on GuestRam ------------------------------------------


class SplitRingDriver(FakeDriver):
    """The fake driver of a split ring of ``size`` entries placed in ``ram``: a well-behaved guest
    driver (:class:`~virtio_schema.fake_queue.FakeDriver`, which does all the ring work) plus what
    a vhost-user front-end needs.

    ``features`` are the ones the driver honours (by default INDIRECT_DESC, for
    ``publish(indirect=True)``). The driver keeps ``used_event`` at the last used index it
    consumed, so a device with EVENT_IDX notifies once per batch, and it always kicks (it ignores
    ``avail_event``/NO_NOTIFY).
    """

    def __init__(
        self, ram: GuestRam, size: int = 16, features: int = int(Feature.INDIRECT_DESC)
    ) -> None:
        super().__init__(ram.memory, size, features)
        self.ram = ram
        self.set_used_event(self.last_used)

    def attach(self, ram: GuestRam) -> None:
        """Use ``ram`` from now on (after a memory table change: same addresses, new memfd, the
        allocations copied by :meth:`GuestRam.clone`)."""
        self.ram = ram
        self.remap(ram.memory)

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
        """:meth:`FakeDriver.publish <virtio_schema.fake_queue.FakeDriver.publish>`; a full ring
        is the test's mistake here (:class:`~virtio_schema.errors.DeviceUsageError`)."""
        head = super().publish(readable, writable, indirect=indirect)
        if head is None:
            raise DeviceUsageError(
                f"no room in the ring ({self.free_descriptors} descriptors free,"
                f" {self.in_flight} chains in flight): take the used chains back first"
            )
        return head

    def used(self) -> list[UsedChain]:
        """:meth:`FakeDriver.used <virtio_schema.fake_queue.FakeDriver.used>`, then ``used_event``
        set to the new last used index: the next used entry is notified (virtio 1.2, 2.7.7)."""
        out = super().used()
        self.set_used_event(self.last_used)
        return out


# --- the connection ----------------------------------------------------------------------------


class Frontend:
    """One vhost-user connection to the back-end listening on ``path``."""

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Connect within ``timeout`` seconds. A unix socket whose listen backlog is full answers
        a connect with a timeout at once with EAGAIN, where a blocking one would wait for the
        server to accept: the connect is retried until the timeout."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.timeout = timeout
        self.channel: socket.socket | None = None
        """Our end of the back-end request channel (:meth:`set_backend_req_fd`)."""
        deadline = time.monotonic() + timeout
        try:
            self.sock.settimeout(timeout)
            while True:
                try:
                    self.sock.connect(path)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)
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
        if self.channel is not None:
            self.channel.close()

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

    def get_config(
        self, offset: int, size: int, flags: int = 0
    ) -> tuple[ConfigHdrRec, bytes] | None:
        """GET_CONFIG: the echoed header and the ``size`` bytes of configuration space, or
        ``None`` when the back-end answers with an empty payload (the specification's failed
        GET_CONFIG)."""
        req = CONFIG_HDR.pack(ConfigHdrRec(offset, size, flags)) + bytes(size)
        payload = self.call(Request.GET_CONFIG, req)
        if not payload:
            return None
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

    def reset_device(self) -> None:
        self.send(Request.RESET_DEVICE)

    def set_backend_req_fd(self, *, need_reply: bool = False) -> int | None:
        """SET_BACKEND_REQ_FD with one end of a new socket pair; the other end is
        :attr:`channel` (replacing, and closing, the one before)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.send(Request.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], need_reply=need_reply)
        finally:
            theirs.close()
        if self.channel is not None:
            self.channel.close()
        self.channel = ours
        return self.ack(Request.SET_BACKEND_REQ_FD) if need_reply else None

    def backend_request(self, timeout: float | None = None) -> HeaderRec:
        """The next request the back-end sent on :attr:`channel` (its header; payloads are
        read and checked empty: the requests this library sends have none)."""
        assert self.channel is not None, "no back-end channel: call set_backend_req_fd()"
        self.channel.settimeout(self.timeout if timeout is None else timeout)
        raw = b""
        while len(raw) < HEADER.size:
            chunk = self.channel.recv(HEADER.size - len(raw))
            if not chunk:
                raise ConnectionError("back-end closed its request channel")
            raw += chunk
        h = HEADER.unpack(raw)
        assert h.size == 0, f"back-end request {h.request} with a {h.size}-byte payload"
        return h

    def get_max_mem_slots(self) -> int:
        return self.get_u64(Request.GET_MAX_MEM_SLOTS)

    def add_mem_reg(self, ram: GuestRam, *, need_reply: bool = False, **changes: int) -> int | None:
        """ADD_MEM_REG of ``ram`` (its memfd; region fields overridable for hostile tests)."""
        payload = SINGLE_MEM_REGION.pack(ram.region(**changes))
        self.send(Request.ADD_MEM_REG, payload, fds=[ram.fd], need_reply=need_reply)
        return self.ack(Request.ADD_MEM_REG) if need_reply else None

    def rem_mem_reg(self, ram: GuestRam, *, need_reply: bool = False, **changes: int) -> int | None:
        """REM_MEM_REG of ``ram`` (no fd, ``mmap_offset`` 0, as QEMU 7.2 sends it)."""
        payload = SINGLE_MEM_REGION.pack(ram.region(**changes))
        self.send(Request.REM_MEM_REG, payload, need_reply=need_reply)
        return self.ack(Request.REM_MEM_REG) if need_reply else None

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[InflightRec, int | None]:
        """GET_INFLIGHT_FD: the region's description and its fd (``None`` if the back-end sent
        none: then ``mmap_size`` is 0, no tracking). The caller closes the fd."""
        self.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(InflightRec(0, 0, num_queues, queue_size)))
        raw, fds = bytearray(), list[int]()
        while len(raw) < HEADER.size:  # the fds come with the reply's first bytes
            chunk, anc, _, _ = self.sock.recvmsg(HEADER.size - len(raw), socket.CMSG_SPACE(32))
            if not chunk:
                raise ConnectionError("back-end closed the connection")
            raw += chunk
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", data[: len(data) - len(data) % 4])
        h = HEADER.unpack(bytes(raw))
        assert h.request == Request.GET_INFLIGHT_FD, f"reply to {h.request}"
        assert h.flags == VERSION | HeaderFlags.REPLY, f"reply flags {h.flags:#x}"
        assert len(fds) <= 1, f"{len(fds)} fds with the reply"
        return INFLIGHT.unpack(self._recv_exact(h.size)), (fds[0] if fds else None)

    def set_inflight_fd(self, rec: InflightRec, fd: int, *, need_reply: bool = False) -> int | None:
        """SET_INFLIGHT_FD with ``rec`` and the region's fd (QEMU: its copy, after every
        reconnect)."""
        self.send(Request.SET_INFLIGHT_FD, INFLIGHT.pack(rec), fds=[fd], need_reply=need_reply)
        return self.ack(Request.SET_INFLIGHT_FD) if need_reply else None
