"""An example virtio-net device (virtio 1.2, 5.1), served over vhost-user.

    python -m virtio_schema.examples.net --vhost-user SOCKET --mode reflect|sink|source
        [--frames N --size BYTES] [--stats FILE]

Queue 0 receives (device-writable chains: the device writes a 12-byte ``virtio_net_hdr`` and a
frame), queue 1 transmits (device-readable: the driver's header and frame). Modes:

* ``reflect``: every frame the driver transmits comes back on its receive queue, MACs swapped;
* ``sink``: frames are counted and checksummed (CRC-32 over the frames, in order);
* ``source``: ``--frames`` frames of ``--size`` bytes (a counter and a fixed pattern) are sent to
  the driver as receive buffers arrive.

With MRG_RXBUF a frame larger than one receive buffer is spread over several receive chains and
``num_buffers`` in the first header says how many. Frames wait for receive buffers (nothing is
dropped silently: frames are dropped only when a single buffer without MRG_RXBUF cannot hold one, or
when the backlog exceeds ``--backlog``, and both are counted). A burst of transmit chains (a turn's
budget) is served per kick and returned with one used-index update and at most one notification
per queue (the server's turn, and ``queue.batch()`` for the receive queue). With ``--busy-poll``
the server polls a ring with its kicks off while frames keep coming: a driver that streams is then
served without a kick per burst.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from virtio_schema._cli import parser
from virtio_schema.chain import ReadableChain, WritableChain
from virtio_schema.errors import DriverError, VirtioError
from virtio_schema.examples.serving import add_server_arguments, make_server
from virtio_schema.queue import DescChain, VirtQueue
from virtio_schema.records import NET_CONFIG, NET_HDR, NetConfig, NetHdr
from virtio_schema.schema import Feature, NetFeature, NetStatus
from virtio_schema.vhost_user import VhostUserDevice
from virtio_schema.vhost_user.messages import ProtocolFeature

__all__ = ["NetDevice", "NetStats", "main"]

log = logging.getLogger(__name__)

RX, TX = 0, 1
HDR = NET_HDR.size
DEFAULT_MAC = bytes.fromhex("525400123456")
ONE_BUFFER_HDR = NET_HDR.pack(NetHdr(0, 0, 0, 0, 0, 0, 1))
"""The header of a received frame in one chain (``num_buffers`` 1, no offloads)."""


@dataclass
class NetStats:
    """What the device saw and did (written to ``--stats`` as JSON)."""

    tx_frames: int = 0
    """Frames the driver transmitted (received by the device)."""
    tx_bytes: int = 0
    tx_crc: int = 0
    """CRC-32 over every transmitted frame, in order (sink mode)."""
    rx_frames: int = 0
    """Frames delivered to the driver."""
    rx_bytes: int = 0
    rx_chains: int = 0
    """Receive chains used (more than ``rx_frames`` with MRG_RXBUF)."""
    dropped_too_big: int = 0
    dropped_backlog: int = 0
    bad_chains: int = 0


class NetDevice(VhostUserDevice):
    """The virtio-net device of the module docstring."""

    num_queues = 2

    def __init__(
        self,
        mode: str = "reflect",
        *,
        mac: bytes = DEFAULT_MAC,
        mtu: int = 1500,
        frames: int = 0,
        size: int = 64,
        backlog: int = 4096,
        without: int = 0,
        start_delay: float = 0.0,
    ) -> None:
        if mode not in ("reflect", "sink", "source"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.mac = mac
        self.mtu = mtu
        self.backlog = backlog
        self.without = without
        self.stats = NetStats()
        self.queues: dict[int, VirtQueue] = {}
        self.pending: collections.deque[bytes] = collections.deque()
        self._partial: list[DescChain] = []  # MRG_RXBUF: receive chains held for the next frame
        self._mrg = False  # MRG_RXBUF negotiated on the receive queue (set when it is enabled)
        self._source_left = frames if mode == "source" else 0
        self._source_size = size
        self._source_seq = 0
        self._start_delay = start_delay
        self._source_at: float | None = None  # when the source may begin
        if mode == "source":
            self.poll_interval = 0.02
        self._source_head = mac + DEFAULT_MAC + b"\x88\xb5"
        self._source_body = bytes(range(256)) * (size // 256 + 1)

    # --- vhost-user device interface ------------------------------------------------------------

    def device_features(self) -> int:
        return ~self.without & int(
            Feature.VERSION_1
            | Feature.INDIRECT_DESC
            | Feature.EVENT_IDX
            | Feature.RING_PACKED
            | Feature.IN_ORDER
            | NetFeature.MAC
            | NetFeature.STATUS
            | NetFeature.MTU
            | NetFeature.MRG_RXBUF
        )

    def protocol_features(self) -> int:
        # QEMU 7.2's vhost-user netdev keeps virtio-net's config space itself and crashes when a
        # back-end offers CONFIG; DPDK's virtio-user does not use it either
        return super().protocol_features() & ~int(ProtocolFeature.CONFIG)

    def config(self) -> bytes:
        return NET_CONFIG.pack(NetConfig(self.mac, int(NetStatus.LINK_UP), 1, self.mtu))

    def _give_back_partial(self) -> None:
        """Return the receive chains held for an incomplete frame, empty (each exactly once)."""
        held, self._partial = self._partial, []
        for chain in held:
            with contextlib.suppress(VirtioError):
                chain.return_written(0)

    def enabled(self, index: int, queue: VirtQueue) -> None:
        # queues are kept only while enabled: a started but disabled receive ring must not be
        # given frames (vhost-user.rst, "Ring states")
        self.queues[index] = queue
        if index == RX:
            self._mrg = bool(queue.features & NetFeature.MRG_RXBUF)
            if self._source_at is None:
                self._source_at = time.monotonic() + self._start_delay

    def disabled(self, index: int) -> None:
        self.queues.pop(index, None)
        if index == RX:
            # the chains held for an incomplete frame go back unwritten (no side effect): the
            # driver keeps its buffers across a stop (QEMU disables a ring before stopping it)
            self._give_back_partial()

    def poll(self) -> None:
        """The source produces on its own: deliver whatever the receive queue has room for."""
        self._deliver()

    def handle(self, index: int, queue: VirtQueue) -> None:
        if index == TX:
            self._transmit(queue)
        self._deliver()

    # --- transmit: frames from the driver -------------------------------------------------------

    def _transmit(self, txq: VirtQueue) -> None:
        """Drain the transmit ring: a burst, up to the turn's budget (the server gives the ring
        another turn if that leaves chains and, with ``--busy-poll``, polls it while frames keep
        coming)."""
        while (chain := txq.next_chain()) is not None:
            with chain:
                try:
                    reader = ReadableChain(chain)
                    reader.read_record(NET_HDR)
                    frame = reader.read()
                except DriverError as exc:
                    self.stats.bad_chains += 1
                    log.warning("virtio-net: bad transmit chain: %s", exc)
                    continue
            self._on_frame(frame)

    def _on_frame(self, frame: bytes) -> None:
        st = self.stats
        st.tx_frames += 1
        st.tx_bytes += len(frame)
        if self.mode == "sink":
            st.tx_crc = zlib.crc32(frame, st.tx_crc)
        elif self.mode == "reflect":
            self._queue_frame(frame[6:12] + frame[0:6] + frame[12:] if len(frame) >= 12 else frame)

    def _queue_frame(self, frame: bytes) -> None:
        if len(self.pending) >= self.backlog:
            self.stats.dropped_backlog += 1
            return
        self.pending.append(frame)

    # --- receive: frames to the driver ----------------------------------------------------------

    def _make_source_frames(self) -> None:
        """Frames of ``size`` bytes: destination (the device MAC), source, EtherType 0x88b5
        (local experimental), a 4-byte sequence number, then the bytes 0, 1, 2, ... 255, 0, ..."""
        if not self._source_left or self._source_at is None or time.monotonic() < self._source_at:
            return
        body = self._source_body
        while self._source_left and len(self.pending) < 256:
            head = self._source_head + self._source_seq.to_bytes(4, "big")
            self.pending.append((head + body)[: max(self._source_size, len(head))])
            self._source_seq += 1
            self._source_left -= 1

    def _deliver(self) -> None:
        rxq = self.queues.get(RX)
        if rxq is None:
            return
        self._make_source_frames()
        with rxq.batch():
            while self.pending:
                if not self._put(rxq, self.pending[0]):
                    break
                self.pending.popleft()
                self._make_source_frames()

    def _put(self, rxq: VirtQueue, frame: bytes) -> bool:
        """Deliver one frame; ``False`` if the receive queue has no room yet (nothing lost)."""
        need = HDR + len(frame)
        chains = self._partial
        space = 0
        for held in chains:
            space += held.writable_len
        while not chains or (self._mrg and space < need):
            chain = rxq.next_chain()
            if chain is None:
                return False  # wait for buffers; held chains stay held
            if chain.error is not None:
                self.stats.bad_chains += 1
                # give back what was held for this frame first: returns stay in order (IN_ORDER)
                # and a merged frame stays in consecutive chains; the frame restarts after it
                for held in chains:
                    held.return_written(0)
                chains.clear()
                space = 0
                chain.return_written(0)
                continue
            chains.append(chain)
            space += chain.writable_len
        self._partial = []
        st = self.stats
        if space < need:  # one buffer without MRG_RXBUF: too small for this frame
            st.dropped_too_big += 1
            for c in chains:
                c.return_written(0)
            return True
        if len(chains) == 1:  # the frame fits one chain: header and frame, no concatenation
            writer = WritableChain(chains[0])
            writer.write(ONE_BUFFER_HDR)
            writer.write(frame)
            chains[0].return_written()
        else:
            data = memoryview(NET_HDR.pack(NetHdr(0, 0, 0, 0, 0, 0, len(chains))) + frame)
            at = 0
            for c in chains:
                at += WritableChain(c).write(data[at:])
                c.return_written()
        st.rx_frames += 1
        st.rx_bytes += len(frame)
        st.rx_chains += len(chains)
        return True


_OPTIONAL = {
    "indirect": Feature.INDIRECT_DESC,
    "event-idx": Feature.EVENT_IDX,
    "packed": Feature.RING_PACKED,
    "in-order": Feature.IN_ORDER,
    "mrg-rxbuf": NetFeature.MRG_RXBUF,
}


DESCRIPTION = """\
Serve a virtio-net device to a vhost-user front-end (DPDK's virtio-user, QEMU).
Queue 0 receives (the device writes frames to the driver), queue 1 transmits.

modes:
  reflect  every frame the driver sends comes back to it, MACs swapped
  sink     frames are counted and checksummed (CRC-32, in order)
  source   --frames frames of --size bytes are sent to the driver"""

EPILOG = """\
example: the device, then DPDK's testpmd as the driver (no virtual machine, no
hugepages; dpdk-testpmd is in Debian's dpdk-dev):

  %(prog)s --vhost-user /tmp/net.sock --mode reflect
  dpdk-testpmd -l 0,1 --main-lcore 0 --no-pci --no-huge -m 512 \\
      --vdev 'net_virtio_user0,path=/tmp/net.sock,queues=1,packed_vq=1,in_order=1' \\
      -- --total-num-mbufs=8192 --forward-mode=io --tx-first

A QEMU guest connects with -chardev socket,id=net0,path=/tmp/net.sock
-netdev vhost-user,id=net0,chardev=net0 -device virtio-net-pci,netdev=net0 (and
shareable guest memory, as for the other examples)."""


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--help`` describes it."""
    p = parser("virtio_schema.examples.net", DESCRIPTION, EPILOG)
    add_server_arguments(p)
    p.add_argument(
        "--mode",
        choices=["reflect", "sink", "source"],
        default="reflect",
        help="what the device does with frames (default reflect)",
    )
    p.add_argument("--frames", type=int, default=0, metavar="N", help="source: how many frames")
    p.add_argument(
        "--size", type=int, default=64, metavar="BYTES", help="source: frame size (default 64)"
    )
    p.add_argument(
        "--backlog",
        type=int,
        default=4096,
        metavar="FRAMES",
        help="frames that may wait for receive buffers; more are dropped and counted"
        " (default 4096)",
    )
    p.add_argument(
        "--start-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="source: seconds to wait after the receive queue starts (a driver may still be"
        " setting up: testpmd discards what arrives before it starts forwarding)",
    )
    p.add_argument("--stats", metavar="FILE", default=None, help="write counters as JSON on exit")
    p.add_argument(
        "--without",
        action="append",
        default=[],
        choices=sorted(_OPTIONAL),
        help="do not offer this feature (repeatable)",
    )
    p.add_argument("--cpu", type=int, default=None, metavar="N", help="pin the process to this CPU")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.cpu is not None:  # keep off the core a polling front-end spins on
        os.sched_setaffinity(0, {args.cpu})
    without = 0
    for name in args.without:
        without |= int(_OPTIONAL[name])
    device = NetDevice(
        args.mode,
        frames=args.frames,
        size=args.size,
        backlog=args.backlog,
        without=without,
        start_delay=args.start_delay,
    )
    server = make_server(args, lambda: device)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    try:
        server.serve_forever(max_connections=args.max_connections)
    finally:
        log.info("virtio-net %s: %s", args.mode, device.stats)
        if args.stats:
            Path(args.stats).write_text(json.dumps(asdict(device.stats)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
