"""The main job: the example virtio-blk device serving a simulated driver, every byte verified.

    python -m virtio_schema.examples.demo [--requests N] [--seed S] [--size-mib M]

A fake driver (:mod:`virtio_schema.fake_queue`) issues a few thousand mixed requests (IN, OUT, FLUSH,
GET_ID; direct and indirect chains; several in flight; a few deliberately malformed chains) to
:class:`~virtio_schema.examples.blk.BlkDevice` over a disk image in a temporary file. The driver
keeps its own copy of the disk and checks every byte it reads back, every status, and at the end the
whole image. Exit status 0 only if everything matched.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from virtio_schema._cli import parser, progress
from virtio_schema.examples.blk import SEG_MAX, BlkDevice
from virtio_schema.fake_queue import FakeDriver, FakeMemory, make_queue
from virtio_schema.records import BLK_REQ_HDR, BlkReqHdr
from virtio_schema.schema import BLK_SECTOR_SIZE, BlkStatus, BlkType, DescFlags, Feature

__all__ = ["main", "run"]

QUEUE_SIZE = 128


@dataclass
class _Request:
    kind: str
    sector: int
    data: bytes  # OUT: what was written; IN: what must come back
    data_len: int


@dataclass
class Summary:
    requests: Counter[str]
    bytes_read: int
    bytes_written: int
    malformed_returned: int
    notifications: int
    seconds: float
    mismatches: list[str]


def _publish(driver: FakeDriver, rng: random.Random, disk: bytearray, serial: bytes) -> _Request:
    """Publish one random, well-formed request; returns what the driver expects back."""
    capacity = len(disk) // BLK_SECTOR_SIZE
    kind = rng.choices(["in", "out", "flush", "get_id"], weights=[45, 45, 5, 5])[0]
    indirect = rng.random() < 0.7  # Linux uses indirect tables for nearly every request
    nsect = rng.choice([1, 8, 8, 16, 64, 128])
    sector = rng.randrange(0, capacity - nsect)
    length = nsect * BLK_SECTOR_SIZE
    segs = min(rng.randint(1, 4), nsect, SEG_MAX)
    cuts = sorted(rng.sample(range(1, nsect), segs - 1)) if segs > 1 else []
    bounds = [0, *cuts, nsect]
    seg_lens = [(b - a) * BLK_SECTOR_SIZE for a, b in itertools.pairwise(bounds)]
    if kind == "in":
        hdr = BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, sector))
        head = driver.publish([hdr], [*seg_lens, 1], indirect=indirect)
        req = _Request(kind, sector, bytes(disk[sector * 512 : sector * 512 + length]), length)
    elif kind == "out":
        data = rng.randbytes(length)
        hdr = BLK_REQ_HDR.pack(BlkReqHdr(BlkType.OUT, 0, sector))
        pieces = [data[sum(seg_lens[:k]) : sum(seg_lens[: k + 1])] for k in range(len(seg_lens))]
        head = driver.publish([hdr, *pieces], [1], indirect=indirect)
        req = _Request(kind, sector, data, length)
        # the device serves chains in ring order, so later requests see this data
        disk[sector * BLK_SECTOR_SIZE : sector * BLK_SECTOR_SIZE + length] = data
    elif kind == "flush":
        hdr = BLK_REQ_HDR.pack(BlkReqHdr(BlkType.FLUSH, 0, 0))
        head = driver.publish([hdr], [1], indirect=indirect)
        req = _Request(kind, 0, b"", 0)
    else:
        hdr = BLK_REQ_HDR.pack(BlkReqHdr(BlkType.GET_ID, 0, 0))
        head = driver.publish([hdr], [20, 1], indirect=indirect)
        req = _Request(kind, 0, serial, 20)
    assert head is not None, "the demo keeps the ring from filling up"
    return req


def _publish_malformed(driver: FakeDriver, descs: tuple[int, int]) -> None:
    """A chain with a readable descriptor after a writable one (catalogue row 4)."""
    a, b = descs
    buf = driver.alloc_buffer(16)
    driver.write_desc(a, buf, 16, DescFlags.WRITE | DescFlags.NEXT, b)
    driver.write_desc(b, buf, 16, 0, 0)
    driver.push_head(a)


PROGRESS_EVERY = 1.0
"""Seconds between two lines of progress (printed on a terminal only)."""


class _Progress:
    """The ``on_progress`` of :func:`main`: a line at most every ``PROGRESS_EVERY`` seconds."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, done: int, requests: int) -> None:
        if time.monotonic() - self.last >= PROGRESS_EVERY:
            self.last = time.monotonic()
            progress(f"  {done}/{requests} requests served and verified")


def run(
    requests: int = 3000,
    seed: int = 1,
    size_mib: int = 8,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Run the demo; returns its figures (``mismatches`` lists anything that did not verify).
    ``on_progress(done, requests)`` is called after every 500 requests or so."""
    rng = random.Random(seed)
    disk = bytearray(rng.randbytes(size_mib << 20))
    serial = b"virtio-schema-demo".ljust(20, b"\0")
    mismatches: list[str] = []
    kinds: Counter[str] = Counter()
    read_bytes = written_bytes = malformed = 0
    with tempfile.NamedTemporaryFile() as f:
        f.write(disk)
        f.flush()
        with open(f.name, "r+b", buffering=0) as image:
            device = BlkDevice(image, serial=b"virtio-schema-demo")
            fq = make_queue(
                QUEUE_SIZE,
                features=Feature.INDIRECT_DESC | Feature.EVENT_IDX,
                memory=FakeMemory(64 << 20),
            )
            driver, queue = fq.driver, fq.queue
            bad_descs = (driver.take_descriptor(), driver.take_descriptor())
            t0 = time.perf_counter()
            done = 0
            while done < requests:
                batch = min(rng.randint(1, 32), requests - done)
                pending: list[_Request] = []
                malformed_head: int | None = None
                for _ in range(batch):
                    if rng.random() < 0.01 and malformed_head is None:
                        malformed_head = bad_descs[0]
                        _publish_malformed(driver, bad_descs)
                        continue
                    req = _publish(driver, rng, disk, serial)
                    pending.append(req)
                driver.set_used_event(
                    driver.last_used + len(pending) + (malformed_head is not None) - 1
                )
                device.serve(queue)
                order = pending
                used = driver.used()
                for u in used:
                    if u.head == malformed_head:
                        malformed += 1
                        if u.len != 0:
                            mismatches.append(f"malformed chain returned with len {u.len}")
                        continue
                    req = order.pop(0)
                    kinds[req.kind] += 1
                    status = u.written[-1] if u.written else b""
                    if status != bytes([BlkStatus.OK]):
                        mismatches.append(f"{req.kind} at {req.sector}: status {status!r}")
                    if req.kind == "in":
                        got = b"".join(u.written[:-1])
                        read_bytes += len(got)
                        if got != req.data:
                            mismatches.append(f"IN at sector {req.sector}: data differs")
                    elif req.kind == "out":
                        written_bytes += req.data_len
                    elif req.kind == "get_id" and u.written[0] != req.data:
                        mismatches.append(f"GET_ID returned {u.written[0]!r}")
                if order:
                    mismatches.append(f"{len(order)} requests never came back")
                if on_progress is not None and (done + batch) // 500 > done // 500:
                    on_progress(done + batch, requests)
                done += batch
            seconds = time.perf_counter() - t0
            image.seek(0)
            if image.read() != bytes(disk):
                mismatches.append("the image file differs from the driver's copy")
            notifications = fq.notifier.count
            fq.memory.close()
    return Summary(kinds, read_bytes, written_bytes, malformed, notifications, seconds, mismatches)


DESCRIPTION = """\
The example virtio-blk device serving a simulated driver, every byte verified.

A fake driver issues a few thousand mixed requests (IN, OUT, FLUSH, GET_ID;
direct and indirect chains; several in flight; a few deliberately malformed
chains) to the device over a disk image in a temporary file. It keeps its own
copy of the disk and checks every byte read back, every status, and at the end
the whole image. The exit status is 0 only if everything matched."""

EPILOG = """\
the same device with a real driver: a Linux guest in QEMU, over vhost-user:

  python -m virtio_schema.examples.blk --vhost-user /tmp/blk.sock disk.img
  qemu-system-x86_64 -accel tcg -m 256M \\
      -object memory-backend-memfd,id=mem,size=256M,share=on \\
      -machine pc,memory-backend=mem \\
      -chardev socket,id=blk0,path=/tmp/blk.sock \\
      -device vhost-user-blk-pci,chardev=blk0 \\
      -kernel vmlinuz -initrd initrd -append console=ttyS0 -nographic

The demo's source: virtio_schema/examples/demo.py; the device's:
virtio_schema/examples/blk.py."""


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--help`` describes it."""
    p = parser("virtio_schema.examples.demo", DESCRIPTION, EPILOG)
    p.add_argument(
        "--requests", type=int, default=3000, metavar="N", help="requests to issue (default 3000)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        metavar="N",
        help="seed of the driver's random choices: the same seed, the same run (default 1)",
    )
    p.add_argument(
        "--size-mib", type=int, default=8, metavar="M", help="disk size in MiB (default 8)"
    )
    args = p.parse_args(argv)
    # the device logs each malformed chain; the summary counts them instead
    logging.getLogger("virtio_schema.examples.blk").setLevel(logging.ERROR)
    s = run(args.requests, args.seed, args.size_mib, on_progress=_Progress())
    total = sum(s.requests.values())
    print(
        "virtio-blk example device, fake split-queue driver (queue size 128, indirect + event idx)"
    )
    print(
        f"  requests served : {total} "
        + " ".join(f"{k}={v}" for k, v in sorted(s.requests.items()))
    )
    print(f"  malformed chains: {s.malformed_returned} (returned with length 0, queue kept going)")
    print(
        f"  data            : {s.bytes_read / 2**20:.1f} MiB read, {s.bytes_written / 2**20:.1f} MiB written"
    )
    print(f"  notifications   : {s.notifications} (event idx: one per batch)")
    print(
        f"  time            : {s.seconds:.2f} s, {total / s.seconds:,.0f} requests/s (driver simulation included)"
    )
    if s.mismatches:
        print(f"FAILED: {len(s.mismatches)} mismatches")
        for m in s.mismatches[:20]:
            print("  " + m)
        return 1
    print(
        "verified: every status, every byte read back, and the final image match the driver's copy"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
