"""An example virtio-rng (entropy) device (virtio 1.2, 5.4), served over vhost-user.

The simplest device there is: every chain is one or more device-writable buffers, and the device
fills them with random bytes. Linux's ``virtio-rng`` driver reads it through ``/dev/hwrng``.

    python -m virtio_schema.examples.rng --vhost-user SOCKET [--seed N] [--record FILE]

``--seed`` makes the stream reproducible and ``--record`` appends every byte produced to a file, so a
test can check that the guest got exactly bytes the device produced.

With a seed the device produces one stream, whatever sizes the driver's buffers have: bytes are drawn
from ``random.Random(seed)`` in blocks of :data:`SEED_BLOCK` (``randbytes(SEED_BLOCK)``, again and
again) and each buffer gets the next unread bytes. Asking for 3 then 3 bytes gives the same 6 bytes
as asking for 6 (``randbytes(3) + randbytes(3)`` would not: each call rounds up to whole 32-bit
words of the generator and drops the rest).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
from typing import BinaryIO

from virtio_schema._cli import parser
from virtio_schema.chain import WritableChain
from virtio_schema.errors import DriverError
from virtio_schema.examples.serving import add_server_arguments, make_server
from virtio_schema.queue import VirtQueue
from virtio_schema.schema import Feature
from virtio_schema.vhost_user import VhostUserDevice

__all__ = ["RngDevice", "main"]

log = logging.getLogger(__name__)

SEED_BLOCK = 4096
"""Bytes drawn from the seeded generator at a time; the seeded stream is the concatenation of
``randbytes(SEED_BLOCK)`` calls, served in slices."""


class RngDevice(VhostUserDevice):
    """Fills every writable buffer it is given with random bytes (``os.urandom``, or a seeded
    generator for tests)."""

    num_queues = 1

    def device_features(self) -> int:
        return super().device_features() | int(Feature.IN_ORDER)  # served strictly in order

    def __init__(self, *, seed: int | None = None, record: BinaryIO | None = None) -> None:
        self._rng = random.Random(seed) if seed is not None else None
        self._unread = bytearray()  # drawn from the seeded generator, not yet served
        self.record = record
        self.produced = 0

    def _random(self, n: int) -> bytes:
        """The next ``n`` bytes of the stream. Seeded, the generator is only ever asked for whole
        blocks, so the stream does not depend on how the driver splits its requests."""
        if self._rng is None:
            return os.urandom(n)
        while len(self._unread) < n:
            self._unread += self._rng.randbytes(SEED_BLOCK)
        data = bytes(self._unread[:n])
        del self._unread[:n]
        return data

    def handle(self, index: int, queue: VirtQueue) -> None:
        while (chain := queue.next_chain()) is not None:
            with chain:
                try:
                    writer = WritableChain(chain)
                    data = self._random(writer.remaining().bytes)
                    writer.write(data)
                except DriverError as exc:
                    log.warning("virtio-rng: bad request: %s", exc)
                    continue
                self.produced += len(data)
                if self.record is not None:
                    self.record.write(data)
                    self.record.flush()


DESCRIPTION = """\
Serve a virtio-rng (entropy) device to a vhost-user front-end (QEMU): every
buffer the driver offers comes back filled with random bytes (os.urandom, or a
seeded generator with --seed: one stream, however the driver splits its
requests). In a Linux guest it is /dev/hwrng."""

EPILOG = """\
example: the device, then QEMU connecting to it (guest memory must be
shareable: a memfd with share=on; -accel tcg where there is no KVM):

  %(prog)s --vhost-user /tmp/rng.sock
  qemu-system-x86_64 -accel tcg -m 256M \\
      -object memory-backend-memfd,id=mem,size=256M,share=on \\
      -machine pc,memory-backend=mem \\
      -chardev socket,id=rng0,path=/tmp/rng.sock \\
      -device vhost-user-rng-pci,chardev=rng0 \\
      -kernel vmlinuz -initrd initrd -append console=ttyS0 -nographic

In the guest: head -c 64 /dev/hwrng | od -An -tx1. With --seed and --record a
test can check that the guest read exactly bytes the device produced."""


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--help`` describes it."""
    p = parser("virtio_schema.examples.rng", DESCRIPTION, EPILOG)
    add_server_arguments(p)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="a reproducible stream from this seed, the same bytes whatever sizes the driver"
        " asks for (default: os.urandom)",
    )
    p.add_argument(
        "--record", metavar="FILE", default=None, help="append every byte produced to FILE"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    record = open(args.record, "ab") if args.record else None  # noqa: SIM115 - lives with the server
    try:
        device = RngDevice(seed=args.seed, record=record)
        server = make_server(args, lambda: device)
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        signal.signal(signal.SIGINT, lambda *_: server.stop())
        server.serve_forever(max_connections=args.max_connections)
        log.info("produced %d bytes", device.produced)
    finally:
        if record is not None:
            record.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
