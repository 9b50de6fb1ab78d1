"""An example virtio-blk device model over a disk-image file (virtio 1.2, 5.2).

Read it as documentation of how a device is written on this library: a request is a chain whose
readable part is the 16-byte header (read with :meth:`~virtio_schema.chain.ReadableChain.read_record`)
followed, for OUT, by the data; its writable part is, for IN and GET_ID, the data, and always ends
with one status byte. Data moves between the image and guest memory without intermediate copies and
in one system call per request: :meth:`~virtio_schema.chain.WritableChain.write_from_fd` and
:meth:`~virtio_schema.chain.ReadableChain.read_to_fd` hand the chain's buffers to ``os.preadv`` /
``os.pwritev`` at the request's offset (the file position is never used).

The disk may grow (or shrink) under a running guest: :meth:`BlkDevice.refresh_capacity` reads the
image's size again, and the vhost-user device (``--watch``) then tells the front-end
(:meth:`~virtio_schema.vhost_user.VhostUserDevice.config_changed`), which tells the driver: Linux
shows the new size in ``/sys/block/vda/size`` without a reboot. It serves as many request queues as
the front-end sets up (``VIRTIO_BLK_F_MQ``, QEMU's ``num-queues``), up to ``--max-queues``.

With ``--threads`` each request queue is served by a worker thread of its own
(:attr:`~virtio_schema.vhost_user.VhostUserDevice.worker_threads`): requests of different queues
are then served at the same time. The request path is safe for that: the image is read and written
with positional calls on one fd (``preadv``/``pwritev``, no shared file position), the counters
shared by the queues are updated under a lock, and each queue's own counter is touched only by the
thread that serves that queue.

It survives its own restart under a running guest: with ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`` the
queues record each request in flight in a region the front-end keeps, and a new process takes
again what the killed one had not completed (QEMU: ``-chardev socket,...,reconnect=1``).

The device never trusts the driver: a malformed chain, a request past the end of the disk or a
writable part too small for the status byte is logged, and the chain is returned (with length 0 when
no status could be written), so the driver never loses a slot and the device never crashes.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
import time

from virtio_schema._cli import parser
from virtio_schema.chain import InsufficientSpace, ReadableChain, WritableChain
from virtio_schema.errors import DriverError
from virtio_schema.examples.serving import add_server_arguments, make_server
from virtio_schema.queue import DescChain, VirtQueue
from virtio_schema.records import BLK_CONFIG, BLK_REQ_HDR, BlkConfig
from virtio_schema.schema import (
    BLK_ID_BYTES,
    BLK_SECTOR_SIZE,
    BlkFeature,
    BlkStatus,
    BlkType,
    Feature,
)
from virtio_schema.vhost_user import VhostUserDevice
from virtio_schema.vhost_user.device import OFFERED_PROTOCOL_FEATURES

__all__ = ["BlkDevice", "VhostUserBlk", "main"]

log = logging.getLogger(__name__)

SIZE_MAX = 65536
"""Largest single buffer the driver may use (``size_max``)."""
SEG_MAX = 126
"""Most data buffers in one request (``seg_max``); 126 * 64 KiB / 512 fits SeaBIOS's 16 bits."""
MAX_QUEUES = 8
"""Request queues offered by default (the front-end uses as many as it likes of them)."""
GEOMETRY_HEADS = 16
"""Heads of the reported geometry (:func:`geometry`)."""
GEOMETRY_SECTORS = 63
"""Sectors per track of the reported geometry."""
GEOMETRY_CYLINDERS = range(2, 16383 + 1)
"""The cylinder counts the geometry may report (QEMU's bounds)."""
_WCE = BLK_CONFIG.offsets["writeback"]
WRITEBACK = range(_WCE, _WCE + 1)
"""The ``writeback`` byte of the configuration space."""


def geometry(capacity: int) -> tuple[int, int, int]:
    """The ``(cylinders, heads, sectors)`` reported for a disk of ``capacity`` sectors
    (VIRTIO_BLK_F_GEOMETRY, virtio 1.2, 5.2.4): QEMU's physical geometry for a disk it has no
    partition table to guess from (``guess_chs_for_size`` in QEMU's hw/block/hd-geometry.c), so
    firmware sees what QEMU's own virtio-blk shows for the same image. 16 heads and 63 sectors
    per track; the cylinders that fit, kept within 2..16383 (the ATA limit): a disk under 2016
    sectors is overstated, and SeaBIOS then translates with LBA, as for a disk too large for CHS.
    Only firmware uses it (SeaBIOS's INT 13h translation); every I/O is bounded by ``capacity``."""
    per_cylinder = GEOMETRY_HEADS * GEOMETRY_SECTORS
    cylinders = min(max(capacity // per_cylinder, GEOMETRY_CYLINDERS.start), GEOMETRY_CYLINDERS[-1])
    return cylinders, GEOMETRY_HEADS, GEOMETRY_SECTORS


class BlkDevice:
    """A virtio-blk device serving requests from ``image`` (a file opened ``r+b``, or ``rb`` with
    ``read_only``). Data goes straight to and from its file descriptor (positional, vectored
    I/O), never through the file object's Python-level buffer.

    ``handle(chain)`` serves one request and returns the chain; ``serve(queue)`` drains a queue.
    """

    def __init__(
        self,
        image: io.RawIOBase | io.BufferedIOBase,
        *,
        read_only: bool = False,
        serial: bytes = b"virtio-schema",
        num_queues: int = 1,
        latency: float = 0.0,
    ) -> None:
        self.image = image
        self._fd = image.fileno()
        self.read_only = read_only
        self.serial = serial[:BLK_ID_BYTES].ljust(BLK_ID_BYTES, b"\0")
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} outside 1..65535")
        self.num_queues = num_queues
        self.latency = latency
        """Seconds each request is held before it completes (a slow disk: restart drills)."""
        self.capacity = 0
        self.refresh_capacity()
        self.requests = 0
        self.errors = 0
        self._counting = threading.Lock()  # queues served on several threads update the counts
        self.writeback = 1
        """The ``writeback`` config field (CONFIG_WCE): 1 write-back (data is made durable by
        FLUSH), 0 write-through (every write is made durable before it completes)."""

    def refresh_capacity(self) -> bool:
        """Read the image's size again; whether the capacity (whole sectors) changed. Requests
        are checked against the new capacity from now on."""
        capacity = os.fstat(self._fd).st_size // BLK_SECTOR_SIZE
        if capacity == self.capacity:
            return False
        if self.capacity:
            log.info("virtio-blk: capacity %d -> %d sectors", self.capacity, capacity)
        self.capacity = capacity
        return True

    @property
    def features(self) -> int:
        """Feature bits offered to the driver."""
        f = (
            Feature.VERSION_1
            | Feature.INDIRECT_DESC
            | Feature.EVENT_IDX
            | BlkFeature.SIZE_MAX
            | BlkFeature.SEG_MAX
            | BlkFeature.GEOMETRY  # firmware (SeaBIOS) reads it for its CHS translation
            | BlkFeature.BLK_SIZE
            | BlkFeature.FLUSH
            | BlkFeature.CONFIG_WCE  # the driver may switch write-back/write-through
            | Feature.RING_PACKED
            | Feature.IN_ORDER  # requests complete in the order they arrive
        )
        if self.read_only:
            f |= BlkFeature.RO
        if self.num_queues > 1:
            f |= BlkFeature.MQ
        return int(f)

    def config(self) -> bytes:
        """The device configuration space (``struct virtio_blk_config``). The geometry follows
        the current capacity."""
        cylinders, heads, sectors = geometry(self.capacity)
        zeros = dict.fromkeys(BlkConfig._fields, 0)
        zeros.update(
            capacity=self.capacity,
            size_max=SIZE_MAX,
            seg_max=SEG_MAX,
            cylinders=cylinders,
            heads=heads,
            sectors=sectors,
            blk_size=BLK_SECTOR_SIZE,
            writeback=self.writeback,
            num_queues=self.num_queues,
        )
        return BLK_CONFIG.pack(BlkConfig(**zeros))

    def serve(self, queue: VirtQueue) -> int:
        """Serve every chain available on ``queue``; returns how many."""
        n = 0
        while (chain := queue.next_chain()) is not None:
            self.handle(chain)
            n += 1
        return n

    def handle(self, chain: DescChain) -> None:
        """Serve one request and return its chain (exactly once, whatever happens). Safe to call
        for several queues at once (on worker threads)."""
        with self._counting:
            self.requests += 1
        if self.latency:
            time.sleep(self.latency)
        with chain:
            try:
                self._request(chain)
            except DriverError as exc:
                with self._counting:
                    self.errors += 1
                log.warning("virtio-blk: bad request: %s", exc)

    def _request(self, chain: DescChain) -> None:
        reader = ReadableChain(chain)
        hdr = reader.read_record(BLK_REQ_HDR)
        if hdr.type == BlkType.OUT:
            status = self._write(reader, hdr.sector)
            writer = reader.into_writable(ignore_remaining=True)
        else:
            writer = reader.into_writable(ignore_remaining=True)
            if hdr.type == BlkType.IN:
                status = self._read(writer, hdr.sector)
            elif hdr.type == BlkType.FLUSH:
                status = self._flush()
            elif hdr.type == BlkType.GET_ID:
                status = self._get_id(writer)
            else:
                status = BlkStatus.UNSUPP
        self._finish(writer, status)

    def _in_range(self, sector: int, length: int) -> bool:
        return length % BLK_SECTOR_SIZE == 0 and sector * BLK_SECTOR_SIZE + length <= (
            self.capacity * BLK_SECTOR_SIZE
        )

    def _read(self, writer: WritableChain, sector: int) -> BlkStatus:
        length = writer.remaining().bytes - 1  # the last writable byte is the status
        if length < 0 or not self._in_range(sector, length):
            return BlkStatus.IOERR
        try:  # straight into the guest's buffers, one preadv
            got = writer.write_from_fd(self._fd, sector * BLK_SECTOR_SIZE, length)
        except OSError as exc:
            log.warning("virtio-blk: reading the image: %s", exc)
            return BlkStatus.IOERR
        return BlkStatus.OK if got == length else BlkStatus.IOERR

    def _write(self, reader: ReadableChain, sector: int) -> BlkStatus:
        length = reader.remaining().bytes
        if self.read_only:
            return BlkStatus.IOERR
        if not self._in_range(sector, length):
            return BlkStatus.IOERR
        try:  # straight from the guest's buffers, one pwritev
            put = reader.read_to_fd(self._fd, sector * BLK_SECTOR_SIZE, length)
            if not self.writeback:
                os.fdatasync(self._fd)
        except OSError as exc:
            log.warning("virtio-blk: writing the image: %s", exc)
            return BlkStatus.IOERR
        return BlkStatus.OK if put == length else BlkStatus.IOERR

    def _flush(self) -> BlkStatus:
        self.image.flush()
        os.fsync(self._fd)
        return BlkStatus.OK

    def _get_id(self, writer: WritableChain) -> BlkStatus:
        room = writer.remaining().bytes - 1
        if room < 0:
            return BlkStatus.IOERR
        writer.write(self.serial[:room])
        return BlkStatus.OK

    def _finish(self, writer: WritableChain, status: int) -> None:
        """Write the status byte into the last writable byte. Data bytes not produced (an error
        before the data) are zero-filled first: the used length counts bytes really written
        (virtio 1.2, 2.7.8.2), and the status must be inside it."""
        left = writer.remaining().bytes
        if left < 1:
            raise InsufficientSpace(writer.chain.queue_index, writer.chain.head, 1, 0)
        zeros = bytes(min(left - 1, SIZE_MAX))
        while left > 1:
            left -= writer.write(zeros[: left - 1])
        writer.write(bytes([status]))


class VhostUserBlk(VhostUserDevice):
    """:class:`BlkDevice` served over vhost-user: its ``num_queues`` request queues, each served
    the same way. With ``watch`` (seconds), the image's size is read again that often and a
    change is announced to the front-end (a configuration change notification). With
    ``threads``, each queue is served by a worker thread of its own
    (:attr:`~virtio_schema.vhost_user.VhostUserDevice.worker_threads`)."""

    def __init__(
        self, blk: BlkDevice, *, watch: float | None = None, threads: bool = False
    ) -> None:
        self.blk = blk
        self.num_queues = blk.num_queues
        self.poll_interval = watch
        self.worker_threads = threads
        self._capacity = blk.capacity  # what this front-end was last told
        self.served = [0] * self.num_queues
        """Requests served on each queue (logged when the ring stops). Each entry is written
        only by the thread serving that queue (``handle``); the hooks that read it run with
        the queue's worker quiesced."""

    def protocol_features(self) -> int:
        # a request taken again after a restart is read or written again: harmless for a disk
        return OFFERED_PROTOCOL_FEATURES

    def poll(self) -> None:
        self.blk.refresh_capacity()
        if self.blk.capacity != self._capacity:
            self._capacity = self.blk.capacity
            self.config_changed()

    def reset(self) -> None:
        self.blk.writeback = 1  # the initial mode (virtio 1.2, 5.2.5.1)

    def device_features(self) -> int:
        return self.blk.features

    def config(self) -> bytes:
        return self.blk.config()

    writable_config = (WRITEBACK,)  # the only field a driver may write (virtio 1.2, 5.2.4)

    def set_config(self, offset: int, data: bytes) -> None:
        config = bytearray(self.blk.config())
        config[offset : offset + len(data)] = data
        self.blk.writeback = BLK_CONFIG.unpack(bytes(config)).writeback
        log.info("virtio-blk: %s", "write-back" if self.blk.writeback else "write-through")

    def handle(self, index: int, queue: VirtQueue) -> None:
        self.served[index] += self.blk.serve(queue)

    def stopped(self, index: int) -> None:
        log.info("virtio-blk: queue %d: %d requests served", index, self.served[index])


DESCRIPTION = """\
Serve a disk image as a virtio-blk device to a vhost-user front-end (QEMU).

The image's size is the disk's capacity, and the driver is told when it changes
(--watch). A malformed request is logged and returned to the driver: the device
never trusts guest memory and never crashes on it."""

EPILOG = """\
example: the device, then QEMU connecting to it (guest memory must be
shareable: a memfd with share=on; -accel tcg where there is no KVM):

  %(prog)s --vhost-user /tmp/blk.sock disk.img
  qemu-system-x86_64 -accel tcg -m 256M \\
      -object memory-backend-memfd,id=mem,size=256M,share=on \\
      -machine pc,memory-backend=mem \\
      -chardev socket,id=blk0,path=/tmp/blk.sock \\
      -device vhost-user-blk-pci,chardev=blk0 \\
      -kernel vmlinuz -initrd initrd -append console=ttyS0 -nographic

The guest sees /dev/vda. Add reconnect=1 to -chardev to survive a restart of
the device; --trace shows every vhost-user message."""


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--help`` describes it."""
    p = parser("virtio_schema.examples.blk", DESCRIPTION, EPILOG)
    add_server_arguments(p)
    p.add_argument("image", help="disk image file (its size is the disk's capacity)")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="open the image read-only and offer VIRTIO_BLK_F_RO (a write gets IOERR)",
    )
    p.add_argument("--serial", default="virtio-schema", help="GET_ID string (20 bytes max)")
    p.add_argument(
        "--capture", metavar="FILE", default=None, help="append every vhost-user message, raw"
    )
    p.add_argument(
        "--max-queues",
        type=int,
        default=MAX_QUEUES,
        metavar="N",
        help=f"request queues offered; the front-end uses up to N (default {MAX_QUEUES})",
    )
    p.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="hold each request this long before serving it: a slow disk, for restart drills"
        " (the thread serving the queue waits: without --threads the whole server, no other"
        " ring or connection is served meanwhile; with --threads that queue only)",
    )
    p.add_argument(
        "--threads",
        action="store_true",
        help="serve each request queue on a worker thread of its own: a slow request then holds"
        " only its queue, and the disk's waits of several queues overlap (Python work does not"
        " run in parallel: the GIL); messages, polls and hooks stay on the server's thread",
    )
    p.add_argument(
        "--watch",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="read the image's size again this often and tell the driver when it changed"
        " (default 1; 0: never)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with open(args.image, "rb" if args.read_only else "r+b", buffering=0) as image:
        blk = BlkDevice(
            image,
            read_only=args.read_only,
            serial=args.serial.encode(),
            num_queues=args.max_queues,
            latency=args.latency,
        )
        watch = args.watch or None
        threads = args.threads
        server = make_server(
            args, lambda: VhostUserBlk(blk, watch=watch, threads=threads), capture=args.capture
        )
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        signal.signal(signal.SIGINT, lambda *_: server.stop())
        log.info(
            "virtio-blk on %s: %s, %d sectors%s", args.vhost_user, args.image, blk.capacity,
            ", a worker thread per queue" if threads else "",
        )  # fmt: skip
        server.serve_forever(max_connections=args.max_connections)
    log.info("served %d requests (%d errors)", blk.requests, blk.errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
