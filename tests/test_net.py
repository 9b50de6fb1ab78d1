"""The example virtio-net device (virtio 1.2, 5.1), driven directly on two fake queues.

The device normally runs under the vhost-user server; here a test plays the transport: it builds a
receive queue (0, device-writable chains) and a transmit queue (1, device-readable chains) with the
same negotiated features, hands both to the device with ``started`` and ``enabled``, and calls ``handle`` where a
kick would arrive: ``handle(1, tx)`` after the driver transmits, ``handle(0, rx)`` after it adds
receive buffers. Every queue test runs on split and packed rings; those where the receive layout
matters also run with and without MRG_RXBUF (virtio 1.2, 5.1.6.3.1).
"""

from __future__ import annotations

import gc
import threading
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import cycle
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_schema.examples.net import NetDevice
from virtio_schema.fake_queue import FakeDriver, FakePackedDriver, FakeQueue, UsedChain, make_queue
from virtio_schema.queue import VirtQueue
from virtio_schema.records import NET_CONFIG, NET_HDR, NetHdr
from virtio_schema.ring import PackedDesc
from virtio_schema.schema import DescFlags, Feature, NetFeature, NetStatus, PackedDescFlags

RX, TX = 0, 1
HDR = NET_HDR.size
DRIVER_MAC = bytes.fromhex("525400abcdef")
PEER_MAC = bytes.fromhex("020000000001")
TX_HDR = NET_HDR.pack(NetHdr(0, 0, 0, 0, 0, 0, 0))  # num_buffers is 0 on transmit (5.1.6.2)

NetQueue = FakeQueue[VirtQueue, FakeDriver | FakePackedDriver]


# --- the driver's side of the link ----------------------------------------------------------------


@dataclass
class Link:
    """A :class:`NetDevice` with both queues started on fake queues, seen from the driver."""

    dev: NetDevice
    rx: NetQueue
    tx: NetQueue

    def send(self, *frames: bytes) -> None:
        """Publish one transmit chain (header and frame in one buffer) per frame; no kick."""
        for f in frames:
            assert self.tx.driver.publish([TX_HDR + f]) is not None

    def transmit(self, *frames: bytes) -> list[UsedChain]:
        """Send ``frames``, kick the transmit queue; the transmit chains the device returned."""
        self.send(*frames)
        self.dev.handle(TX, self.tx.queue)
        return self.tx.driver.used()

    def post(self, *lengths: int) -> None:
        """Add one receive chain (one writable buffer) per length; no kick."""
        for n in lengths:
            assert self.rx.driver.publish([], [n]) is not None

    def give(self, *lengths: int) -> list[UsedChain]:
        """Add receive buffers, kick the receive queue; the receive chains the device used."""
        self.post(*lengths)
        self.dev.handle(RX, self.rx.queue)
        return self.rx.driver.used()


def make_link(
    dev: NetDevice, *, packed: bool, features: int = 0, rx_size: int = 16, tx_size: int = 16
) -> Link:
    negotiated = int(Feature.VERSION_1 | features)
    rx = make_queue(rx_size, features=negotiated, packed=packed, index=RX)
    tx = make_queue(tx_size, features=negotiated, packed=packed, index=TX)
    for index, fq in ((RX, rx), (TX, tx)):
        dev.started(index, fq.queue)
        dev.enabled(index, fq.queue)
    return Link(dev, rx, tx)


class RxFrame(NamedTuple):
    """One frame as the driver reassembles it from the receive queue's used chains."""

    hdr: NetHdr
    frame: bytes
    lens: tuple[int, ...]
    """The used length of each receive chain that carried it."""


def rx_frames(used: Sequence[UsedChain]) -> list[RxFrame]:
    """Reassemble frames the way a driver does (5.1.6.4): the first chain's header says how many
    chains (``num_buffers``) carry the frame, the next ones continue it without a header. Chains
    used with length 0 (dropped frames) between frames are skipped."""
    out: list[RxFrame] = []
    k = 0
    while k < len(used):
        if used[k].len == 0:
            k += 1
            continue
        hdr = NET_HDR.unpack(used[k].data[:HDR])
        n = hdr.num_buffers
        assert 1 <= n <= len(used) - k, f"num_buffers {n} with {len(used) - k} chains left"
        part = used[k : k + n]
        assert all(c.len > 0 for c in part), "an empty chain inside a merged frame"
        out.append(RxFrame(hdr, b"".join(c.data for c in part)[HDR:], tuple(c.len for c in part)))
        k += n
    return out


def frame(seq: int, size: int = 60) -> bytes:
    """An Ethernet frame from the driver to a peer, ``size`` bytes, its payload marked by ``seq``."""
    head = PEER_MAC + DRIVER_MAC + b"\x08\x00"
    return head + bytes((seq * 31 + k) & 0xFF for k in range(size - len(head)))


def reflected(f: bytes) -> bytes:
    """``f`` with destination and source MACs swapped: what reflect mode sends back."""
    return f[6:12] + f[0:6] + f[12:]


def plain_hdr(num_buffers: int) -> NetHdr:
    """The header of a received frame with no offloads negotiated (5.1.6.4)."""
    return NetHdr(0, 0, 0, 0, 0, 0, num_buffers)


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(params=[False, True], ids=["no-mrg", "mrg"])
def mrg(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _mrg(on: bool) -> int:
    return int(NetFeature.MRG_RXBUF) if on else 0


# --- configuration --------------------------------------------------------------------------------


def test_config_space_reports_mac_link_up_one_queue_pair_and_mtu() -> None:
    dev = NetDevice(mac=DRIVER_MAC, mtu=9000)
    raw = dev.config()
    assert len(raw) == NET_CONFIG.size
    cfg = NET_CONFIG.unpack(raw)
    assert cfg.mac == DRIVER_MAC
    assert cfg.status == NetStatus.LINK_UP
    assert cfg.max_virtqueue_pairs == 1
    assert cfg.mtu == 9000


def test_config_space_defaults_to_a_locally_administered_mac_and_mtu_1500() -> None:
    cfg = NET_CONFIG.unpack(NetDevice().config())
    assert len(cfg.mac) == 6
    assert cfg.mac[0] & 0x01 == 0  # unicast
    assert cfg.mac[0] & 0x02  # locally administered
    assert cfg.mtu == 1500


def test_device_features_offer_what_the_device_implements() -> None:
    offered = NetDevice().device_features()
    for bit in (
        Feature.VERSION_1,
        NetFeature.MAC,
        NetFeature.STATUS,
        NetFeature.MTU,
        NetFeature.MRG_RXBUF,
        Feature.INDIRECT_DESC,
        Feature.EVENT_IDX,
        Feature.RING_PACKED,
        Feature.IN_ORDER,
    ):
        assert offered & bit == bit, f"{bit!r} not offered"
    # nothing it does not implement: no offloads, no control queue, one queue pair
    for bit in (NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.CTRL_VQ, NetFeature.MQ):
        assert not offered & bit, f"{bit!r} offered"


def test_device_features_leave_out_what_without_names() -> None:
    dropped = Feature.IN_ORDER | NetFeature.MRG_RXBUF
    offered = NetDevice(without=dropped).device_features()
    assert not offered & dropped
    assert offered == NetDevice().device_features() & ~dropped


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        NetDevice("loopback")


# --- reflect --------------------------------------------------------------------------------------


def test_reflect_returns_the_frame_with_the_macs_swapped(packed: bool, mrg: bool) -> None:
    link = make_link(NetDevice(), packed=packed, features=_mrg(mrg))
    link.post(2048)
    sent = frame(1, 98)
    tx_used = link.transmit(sent)
    assert [c.len for c in tx_used] == [0]  # a transmit chain has nothing device-writable
    used = link.rx.driver.used()
    assert [c.len for c in used] == [HDR + len(sent)]
    (got,) = rx_frames(used)
    assert got.frame == reflected(sent)
    assert got.frame[12:] == sent[12:]
    assert got.hdr == plain_hdr(1)
    stats = link.dev.stats
    assert (stats.tx_frames, stats.tx_bytes) == (1, len(sent))
    assert (stats.rx_frames, stats.rx_bytes, stats.rx_chains) == (1, len(sent), 1)


@pytest.mark.parametrize(
    "ring",
    [0, Feature.EVENT_IDX, Feature.IN_ORDER | Feature.EVENT_IDX | Feature.INDIRECT_DESC],
    ids=["plain", "event_idx", "in_order"],
)
def test_reflect_keeps_the_order_of_several_frames(packed: bool, mrg: bool, ring: int) -> None:
    link = make_link(NetDevice(), packed=packed, features=_mrg(mrg) | ring)
    link.post(*[1600] * 6)
    sent = [frame(k, 60 + 97 * k) for k in range(6)]
    link.transmit(*sent)
    got = rx_frames(link.rx.driver.used())
    assert [g.frame for g in got] == [reflected(f) for f in sent]
    assert [g.hdr.num_buffers for g in got] == [1] * 6


@pytest.mark.parametrize("layout", ["one-buffer", "header-apart", "header-split", "indirect"])
def test_transmit_header_and_frame_may_lie_in_any_descriptors(packed: bool, layout: str) -> None:
    link = make_link(NetDevice(), packed=packed, features=Feature.INDIRECT_DESC)
    link.post(256)
    sent = frame(3, 80)
    pieces = {
        "one-buffer": [TX_HDR + sent],
        "header-apart": [TX_HDR, sent],
        "header-split": [TX_HDR[:5], TX_HDR[5:] + sent[:20], sent[20:]],
        "indirect": [TX_HDR, sent[:7], sent[7:]],
    }[layout]
    assert link.tx.driver.publish(pieces, indirect=layout == "indirect") is not None
    link.dev.handle(TX, link.tx.queue)
    assert [c.len for c in link.tx.driver.used()] == [0]
    (got,) = rx_frames(link.rx.driver.used())
    assert got.frame == reflected(sent)
    assert link.dev.stats.bad_chains == 0


def test_frames_wait_for_receive_buffers_and_none_are_lost(packed: bool, mrg: bool) -> None:
    link = make_link(NetDevice(), packed=packed, features=_mrg(mrg))
    sent = [frame(k, 64 + k) for k in range(5)]
    link.transmit(*sent)
    assert link.rx.driver.used() == []
    assert list(link.dev.pending) == [reflected(f) for f in sent]
    first = rx_frames(link.give(512, 512))
    assert [g.frame for g in first] == [reflected(f) for f in sent[:2]]
    assert len(link.dev.pending) == 3
    rest = rx_frames(link.give(512, 512, 512))
    assert [g.frame for g in rest] == [reflected(f) for f in sent[2:]]
    stats = link.dev.stats
    assert not link.dev.pending
    assert (stats.rx_frames, stats.dropped_backlog, stats.dropped_too_big) == (5, 0, 0)


def test_frames_transmitted_after_a_backlog_come_after_it(packed: bool) -> None:
    link = make_link(NetDevice(), packed=packed)
    link.transmit(frame(0), frame(1))
    got = rx_frames(link.give(256))
    link.transmit(frame(2))
    got += rx_frames(link.give(256, 256))
    assert [g.frame for g in got] == [reflected(frame(k)) for k in range(3)]


# --- MRG_RXBUF --------------------------------------------------------------------------------------


def test_mrg_spreads_a_large_frame_over_several_receive_chains_in_order(packed: bool) -> None:
    link = make_link(NetDevice(), packed=packed, features=NetFeature.MRG_RXBUF)
    link.post(256, 256, 256, 256)
    sent = frame(7, 700)
    link.transmit(sent)
    used = link.rx.driver.used()
    assert [c.len for c in used] == [256, 256, HDR + len(sent) - 512]
    assert sum(c.len for c in used) == HDR + len(sent)
    assert NET_HDR.unpack(used[0].data[:HDR]).num_buffers == 3
    (got,) = rx_frames(used)
    assert got.frame == reflected(sent)
    assert link.rx.driver.in_flight == 1  # the fourth buffer was not needed and not taken
    assert link.dev.stats.rx_chains == 3


def test_mrg_holds_some_buffers_and_completes_the_frame_when_more_arrive(packed: bool) -> None:
    link = make_link(NetDevice(), packed=packed, features=NetFeature.MRG_RXBUF)
    big, small = frame(1, 700), frame(2, 40)
    link.transmit(big, small)
    assert link.give(256) == []  # one of the three buffers the big frame needs: held
    assert link.give(256) == []  # two: still held, nothing returned early
    assert link.rx.driver.in_flight == 2
    assert len(link.dev.pending) == 2
    used = link.give(256, 256)
    got = rx_frames(used)
    assert [g.frame for g in got] == [reflected(big), reflected(small)]
    assert [g.lens for g in got] == [(256, 256, HDR + 700 - 512), (HDR + 40,)]
    assert got[0].hdr.num_buffers == 3
    assert got[1].hdr.num_buffers == 1
    assert not link.dev.pending
    assert link.rx.driver.in_flight == 0


def test_mrg_fills_each_receive_chain_across_its_buffers(packed: bool) -> None:
    link = make_link(NetDevice(), packed=packed, features=NetFeature.MRG_RXBUF)
    for _ in range(2):
        assert link.rx.driver.publish([], [20, 30, 50]) is not None  # 100 bytes per chain
    sent = frame(4, 150)
    link.transmit(sent)
    used = link.rx.driver.used()
    assert [c.len for c in used] == [100, HDR + 150 - 100]
    (got,) = rx_frames(used)
    assert got.frame == reflected(sent)
    assert got.hdr.num_buffers == 2


# --- without MRG_RXBUF: one buffer per frame ---------------------------------------------------------


def test_without_mrg_a_frame_larger_than_the_buffer_is_dropped_and_counted(packed: bool) -> None:
    link = make_link(NetDevice(), packed=packed)
    big, small = frame(1, 300), frame(2, 60)
    link.post(128, 128)
    link.transmit(big, small)
    used = link.rx.driver.used()
    assert [c.len for c in used] == [0, HDR + len(small)]
    assert used[0].data == b""
    (got,) = rx_frames(used)
    assert got.frame == reflected(small)
    assert got.hdr.num_buffers == 1
    stats = link.dev.stats
    assert (stats.dropped_too_big, stats.rx_frames, stats.tx_frames) == (1, 1, 2)


def test_without_mrg_a_frame_exactly_filling_the_buffer_is_delivered(packed: bool) -> None:
    link = make_link(NetDevice(), packed=packed)
    sent = frame(5, 116)
    link.post(HDR + len(sent))
    link.transmit(sent)
    (got,) = rx_frames(link.rx.driver.used())
    assert got.frame == reflected(sent)
    assert link.dev.stats.dropped_too_big == 0


# --- backlog ----------------------------------------------------------------------------------------


def test_frames_beyond_the_backlog_are_counted_never_silently_lost(packed: bool, mrg: bool) -> None:
    link = make_link(NetDevice(backlog=3), packed=packed, features=_mrg(mrg))
    sent = [frame(k) for k in range(5)]
    link.transmit(*sent)
    stats = link.dev.stats
    assert stats.dropped_backlog == 2
    assert len(link.dev.pending) == 3
    got = rx_frames(link.give(*[256] * 5))
    assert [g.frame for g in got] == [reflected(f) for f in sent[:3]]
    assert stats.tx_frames == stats.rx_frames + stats.dropped_backlog + stats.dropped_too_big


# --- sink -------------------------------------------------------------------------------------------


def test_sink_counts_and_checksums_the_frames_in_order(packed: bool) -> None:
    link = make_link(NetDevice("sink"), packed=packed)
    link.post(2048, 2048)
    bursts = [[frame(k, 60 + 13 * k) for k in range(4)], [frame(k, 1500) for k in range(4, 7)]]
    returned: list[UsedChain] = []
    for burst in bursts:
        returned += link.transmit(*burst)
    sent = [f for burst in bursts for f in burst]
    assert len(returned) == len(sent)
    assert all(c.len == 0 for c in returned)
    stats = link.dev.stats
    assert stats.tx_frames == len(sent)
    assert stats.tx_bytes == sum(len(f) for f in sent)
    assert stats.tx_crc == zlib.crc32(b"".join(sent))  # CRC-32 over the frames, in order
    assert link.rx.driver.used() == []  # a sink sends nothing back
    assert stats.rx_frames == 0


def test_sink_checksum_depends_on_the_order_of_frames(packed: bool) -> None:
    one = make_link(NetDevice("sink"), packed=packed)
    two = make_link(NetDevice("sink"), packed=packed)
    one.transmit(frame(1), frame(2))
    two.transmit(frame(2), frame(1))
    assert one.dev.stats.tx_bytes == two.dev.stats.tx_bytes
    assert one.dev.stats.tx_crc != two.dev.stats.tx_crc


# --- source -----------------------------------------------------------------------------------------


# The source frame layout (NetDevice._make_source_frames): destination (the device MAC), source,
# EtherType 0x88b5 (IEEE local experimental), a 32-bit big-endian sequence number, then the bytes
# 0, 1, 2, ... 255, 0, ...
SOURCE_ETHERTYPE = b"\x88\xb5"
SOURCE_SEQ = slice(14, 18)


def test_source_delivers_exactly_n_numbered_frames_then_stops(packed: bool, mrg: bool) -> None:
    n, size = 10, 100
    dev = NetDevice("source", mac=DRIVER_MAC, frames=n, size=size)
    link = make_link(dev, packed=packed, features=_mrg(mrg))
    buf = 64 if mrg else 128  # with MRG_RXBUF every frame takes two chains
    used: list[UsedChain] = []
    rounds = 0
    while dev.stats.rx_frames < n:  # rounds of four receive buffers
        rounds += 1
        assert rounds <= 10, "the source stalled although receive buffers kept coming"
        used += link.give(buf, buf, buf, buf)
    assert rounds == (5 if mrg else 3)
    got = rx_frames(used)
    assert len(got) == n
    assert [len(g.frame) for g in got] == [size] * n
    assert [int.from_bytes(g.frame[SOURCE_SEQ], "big") for g in got] == list(range(n))
    for g in got:
        assert g.frame[0:6] == DRIVER_MAC  # to the driver
        assert g.frame[6:12] == got[0].frame[6:12]
        assert g.frame[12:14] == SOURCE_ETHERTYPE
        assert g.frame[18:] == bytes(k & 0xFF for k in range(size - 18))
        assert g.hdr.num_buffers == (2 if mrg else 1)
    stats = link.dev.stats
    assert (stats.rx_frames, stats.rx_bytes) == (n, n * size)
    assert not link.dev.pending
    assert link.give(buf) == []  # stopped: buffers stay with the driver
    assert link.dev.stats.rx_frames == n


def test_source_sends_nothing_before_receive_buffers_arrive(packed: bool) -> None:
    link = make_link(NetDevice("source", frames=3, size=64), packed=packed)
    link.dev.handle(RX, link.rx.queue)
    assert link.rx.driver.used() == []
    assert link.dev.stats.rx_frames == 0
    got = rx_frames(link.give(128, 128, 128))
    assert len(got) == 3


# --- a driver that breaks the rules ----------------------------------------------------------------


def test_malformed_transmit_chain_is_counted_returned_and_the_device_goes_on(
    packed: bool, mrg: bool, caplog: pytest.LogCaptureFixture
) -> None:
    link = make_link(NetDevice(), packed=packed, features=_mrg(mrg))
    link.post(512)
    bad = link.tx.driver.publish([b"\x00" * 5])  # shorter than the 12-byte header
    good = frame(9, 70)
    link.send(good)
    link.dev.handle(TX, link.tx.queue)
    returned = link.tx.driver.used()
    assert returned[0].head == bad
    assert [c.len for c in returned] == [0, 0]
    stats = link.dev.stats
    assert stats.bad_chains == 1
    assert stats.tx_frames == 1
    (got,) = rx_frames(link.rx.driver.used())
    assert got.frame == reflected(good)
    assert "bad transmit chain" in caplog.text


def _publish_malformed_rx_chain(link: Link, buffer_id: int) -> int:
    """Publish a receive chain with a readable buffer after a writable one (virtio 1.2, 2.7.4.2
    and 2.8.9); returns the id its used entry will carry."""
    d = link.rx.driver
    w, r = d.alloc_buffer(64), d.alloc_buffer(b"oops")
    if isinstance(d, FakePackedDriver):
        flags = int(PackedDescFlags.WRITE | PackedDescFlags.NEXT)
        d.push_raw([PackedDesc(w, 64, buffer_id, flags), PackedDesc(r, 4, buffer_id, 0)])
        return buffer_id
    else:
        i, j = d.take_descriptor(), d.take_descriptor()
        d.write_desc(i, w, 64, int(DescFlags.WRITE | DescFlags.NEXT), j)
        d.write_desc(j, r, 4, 0, 0)
        d.push_head(i)
        return i


def test_malformed_receive_chain_is_counted_returned_and_skipped(packed: bool, mrg: bool) -> None:
    link = make_link(NetDevice(), packed=packed, features=_mrg(mrg))
    sent = frame(1, 90)
    link.transmit(sent)
    bad = _publish_malformed_rx_chain(link, buffer_id=9)
    used = link.give(256)
    assert used[0].head == bad
    assert [c.len for c in used] == [0, HDR + len(sent)]
    (got,) = rx_frames(used)
    assert got.frame == reflected(sent)
    assert link.dev.stats.bad_chains == 1


def test_malformed_receive_chain_while_chains_are_held_for_a_frame_is_survived(
    packed: bool,
) -> None:
    """IN_ORDER and MRG_RXBUF: a malformed receive chain arrives while the device holds a chain
    for an incomplete frame. A driver's mistake must not crash the device: the bad chain is
    counted and returned, every chain comes back in order, and the frame is still delivered in
    consecutive chains (a driver merges the ``num_buffers`` chains that follow the header)."""
    features = NetFeature.MRG_RXBUF | Feature.IN_ORDER
    link = make_link(NetDevice(), packed=packed, features=features)
    sent = frame(1, 500)
    link.transmit(sent)
    link.post(256)  # held: the frame needs two
    link.dev.handle(RX, link.rx.queue)
    bad = _publish_malformed_rx_chain(link, buffer_id=9)
    link.post(256, 256, 256)
    raised: str | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            link.dev.handle(RX, link.rx.queue)
        except Exception as exc:  # whatever escapes, report it below, after cleaning up
            raised = f"{type(exc).__name__}: {exc}"
        used = [] if raised else link.rx.driver.used()
        link.dev.disabled(RX)  # let go of anything still held, inside the warnings guard
        gc.collect()
    assert raised is None, f"handle() raised {raised}"
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert (bad, 0) in [(c.head, c.len) for c in used]
    (got,) = rx_frames(used)
    assert got.frame == reflected(sent)
    assert link.dev.stats.bad_chains == 1
    assert not link.dev.pending


# --- notifications ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ring", [0, Feature.EVENT_IDX, Feature.IN_ORDER], ids=["plain", "event_idx", "in_order"]
)
def test_a_burst_ends_with_one_notification_per_queue(packed: bool, mrg: bool, ring: int) -> None:
    link = make_link(NetDevice(), packed=packed, features=_mrg(mrg) | ring)
    assert link.give(*[256] * 8) == []  # nothing to deliver yet, nothing returned
    assert link.rx.notifier.take() == 0
    sent = [frame(k) for k in range(8)]
    link.send(*sent)
    with link.tx.queue.batch():  # as the transport serves a kick
        link.dev.handle(TX, link.tx.queue)
    assert link.tx.notifier.count == 1
    assert link.rx.notifier.count == 1
    assert len(link.tx.driver.used()) == 8
    got = rx_frames(link.rx.driver.used())
    assert [g.frame for g in got] == [reflected(f) for f in sent]


def test_frames_delivered_when_buffers_arrive_take_one_notification(packed: bool) -> None:
    link = make_link(NetDevice(), packed=packed)
    sent = [frame(k) for k in range(6)]
    link.transmit(*sent)
    assert link.rx.notifier.count == 0
    got = rx_frames(link.give(*[256] * 6))  # no outer batch: the device's own
    assert len(got) == 6
    assert link.rx.notifier.count == 1


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
def test_the_device_leaves_kicks_to_the_transport(packed: bool, event_idx: bool) -> None:
    """The device drains the transmit ring and never turns kicks off itself: suppressing them
    while a ring streams, and re-checking when they come back, is the server's busy polling
    (``VhostUserServer(busy_poll=...)``, tested with the server)."""
    link = make_link(
        NetDevice("sink"), packed=packed, features=Feature.EVENT_IDX if event_idx else 0
    )
    link.transmit(frame(1), frame(2), frame(3))
    assert not link.tx.driver.no_notify
    before = link.tx.driver.avail_idx
    link.send(frame(4))
    assert link.tx.driver.kick_needed(before)  # the next frame is kicked
    link.dev.handle(TX, link.tx.queue)
    assert len(link.tx.driver.used()) == 1


def test_a_transmit_burst_ends_when_the_turn_budget_is_spent(packed: bool) -> None:
    """Under the vhost-user server a turn takes at most a budget of chains: the drain returns
    then (the server gives the ring another turn), it does not spin."""
    link = make_link(NetDevice("sink"), packed=packed)
    link.send(*(frame(k) for k in range(5)))
    link.tx.queue.set_budget(2)
    done = threading.Event()

    def turn() -> None:
        link.dev.handle(TX, link.tx.queue)
        done.set()

    threading.Thread(target=turn, daemon=True).start()
    assert done.wait(5), "the transmit loop spins on a spent budget"
    assert link.dev.stats.tx_frames == 2
    for served in (4, 5):
        link.tx.queue.set_budget(2)
        link.dev.handle(TX, link.tx.queue)
        assert link.dev.stats.tx_frames == served


# --- queue lifecycle --------------------------------------------------------------------------------


def test_stopping_the_receive_queue_returns_the_chains_held_for_a_frame(packed: bool) -> None:
    """A chain returns itself exactly once: chains the device held for an incomplete frame
    (MRG_RXBUF) must be given back when the queue stops, not dropped for the garbage collector
    to return behind the transport's back."""
    link = make_link(NetDevice(), packed=packed, features=NetFeature.MRG_RXBUF)
    link.transmit(frame(1, 500))
    assert link.give(256) == []  # held
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        link.dev.disabled(RX)
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []
    assert [c.len for c in link.rx.driver.used()] == [0]


def test_a_restarted_receive_queue_serves_frames_still_pending(packed: bool) -> None:
    link = make_link(NetDevice(), packed=packed)
    link.transmit(frame(1))
    link.dev.disabled(RX)
    link.transmit(frame(2))  # no receive queue: the frame waits
    rx = make_queue(16, features=int(Feature.VERSION_1), packed=packed, index=RX)
    link.dev.started(RX, rx.queue)
    link.dev.enabled(RX, rx.queue)
    link.rx = rx
    got = rx_frames(link.give(256, 256))
    assert [g.frame for g in got] == [reflected(frame(1)), reflected(frame(2))]


def test_a_started_but_disabled_receive_ring_is_never_written(packed: bool) -> None:
    """vhost-user.rst, "Ring states": a started but disabled ring is processed without side
    effects; for a network device, no new receive frames. QEMU starts both rings of a queue pair
    and enables them one message at a time: a frame reflected in between must wait."""
    dev = NetDevice()
    negotiated = int(Feature.VERSION_1)
    rx = make_queue(16, features=negotiated, packed=packed, index=RX)
    tx = make_queue(16, features=negotiated, packed=packed, index=TX)
    dev.started(RX, rx.queue)
    dev.started(TX, tx.queue)
    dev.enabled(TX, tx.queue)  # the receive ring stays disabled
    rx.driver.publish([], [256])
    tx.driver.publish([TX_HDR + frame(1)])
    dev.handle(TX, tx.queue)
    assert rx.driver.used() == [], "the device wrote a frame into a disabled receive ring"
    assert len(dev.pending) == 1  # kept for later, not lost
    dev.enabled(RX, rx.queue)
    dev.handle(RX, rx.queue)
    got = rx_frames(rx.driver.used())
    assert [g.frame for g in got] == [reflected(frame(1))]


# --- the invariant ----------------------------------------------------------------------------------


@settings(max_examples=60)
@given(
    packed=st.booleans(),
    mrg=st.booleans(),
    sizes=st.lists(st.integers(14, 400), min_size=1, max_size=10),
    buffers=st.lists(st.integers(32, 300), min_size=1, max_size=6),
    per_round=st.integers(1, 8),
)
def test_reflect_delivers_every_frame_in_order_or_counts_it_dropped(
    packed: bool, mrg: bool, sizes: list[int], buffers: list[int], per_round: int
) -> None:
    link = make_link(NetDevice(), packed=packed, features=_mrg(mrg))
    sent = [frame(k, n) for k, n in enumerate(sizes)]
    link.transmit(*sent)
    lengths = cycle(buffers)
    posted: list[int] = []
    used: list[UsedChain] = []
    for _ in range(100):
        if not link.dev.pending:
            break
        for _ in range(min(per_round, 16 - link.rx.driver.in_flight)):
            posted.append(next(lengths))
            link.post(posted[-1])
        link.dev.handle(RX, link.rx.queue)
        used += link.rx.driver.used()
    assert not link.dev.pending, "frames stuck although receive buffers kept coming"
    got = rx_frames(used)
    if mrg:  # every frame fits in enough chains
        expected = [reflected(f) for f in sent]
        assert [sum(g.lens) for g in got] == [HDR + len(f) for f in sent]
        assert [g.hdr.num_buffers for g in got] == [len(g.lens) for g in got]
    else:  # frame k lands in the k-th receive chain, or is dropped if it does not fit there
        expected = [reflected(f) for f, n in zip(sent, posted, strict=False) if HDR + len(f) <= n]
        assert all(g.hdr.num_buffers == 1 for g in got)
    assert [g.frame for g in got] == expected
    stats = link.dev.stats
    assert stats.rx_frames == len(expected)
    assert stats.tx_frames == stats.rx_frames + stats.dropped_too_big + stats.dropped_backlog
    assert stats.rx_chains == sum(len(g.lens) for g in got)
