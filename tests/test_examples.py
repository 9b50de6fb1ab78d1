"""The example virtio-blk and virtio-rng devices and the demo main job."""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import pytest

from virtio_schema.examples import demo
from virtio_schema.examples.blk import SEG_MAX, SIZE_MAX, BlkDevice
from virtio_schema.examples.rng import SEED_BLOCK, RngDevice
from virtio_schema.fake_queue import SplitFakeQueue, make_queue
from virtio_schema.records import BLK_CONFIG, BLK_REQ_HDR, BlkReqHdr
from virtio_schema.schema import BlkFeature, BlkStatus, BlkType, DescFlags, Feature

SECTORS = 64


@pytest.fixture
def image(tmp_path: Path) -> Iterator[io.FileIO]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    with open(path, "r+b", buffering=0) as f:
        yield f


@pytest.fixture
def fq() -> Iterator[SplitFakeQueue]:
    q = make_queue(16, features=Feature.INDIRECT_DESC | Feature.EVENT_IDX)
    yield q
    q.memory.close()


def _hdr(kind: int, sector: int = 0) -> bytes:
    return BLK_REQ_HDR.pack(BlkReqHdr(kind, 0, sector))


def test_in_request_reads_the_image_into_the_data_buffers(
    image: io.FileIO, fq: SplitFakeQueue
) -> None:
    dev = BlkDevice(image)
    fq.driver.publish([_hdr(BlkType.IN, 2)], [512, 512, 1], indirect=True)
    assert dev.serve(fq.queue) == 1
    (used,) = fq.driver.used()
    image.seek(2 * 512)
    expected = image.read(1024)
    assert used.len == 1025
    assert used.written[0] + used.written[1] == expected
    assert used.written[2] == bytes([BlkStatus.OK])


def test_out_request_writes_the_image(image: io.FileIO, fq: SplitFakeQueue) -> None:
    dev = BlkDevice(image)
    data = b"\xa5" * 1024
    fq.driver.publish([_hdr(BlkType.OUT, 5), data[:512], data[512:]], [1])
    dev.serve(fq.queue)
    (used,) = fq.driver.used()
    assert used.written == (bytes([BlkStatus.OK]),)
    image.seek(5 * 512)
    assert image.read(1024) == data


def test_a_request_moves_all_its_segments_in_one_system_call_at_its_offset(
    image: io.FileIO, fq: SplitFakeQueue
) -> None:
    """Three data buffers, one ``preadv`` / ``pwritev`` each way; the file position stays put
    (queues on other threads may share the image)."""
    dev = BlkDevice(image)
    image.seek(7)
    data = bytes(range(200, 256)) * 27 + bytes(24)  # 1536 bytes
    fq.driver.publish([_hdr(BlkType.OUT, 3), data[:512], data[512:1024], data[1024:]], [1])
    fq.driver.publish([_hdr(BlkType.IN, 3)], [512, 512, 512, 1], indirect=True)
    with (
        mock.patch("os.pwritev", wraps=os.pwritev) as pwritev,
        mock.patch("os.preadv", wraps=os.preadv) as preadv,
    ):
        assert dev.serve(fq.queue) == 2
    assert (pwritev.call_count, preadv.call_count) == (1, 1)
    assert pwritev.call_args.args[2] == preadv.call_args.args[2] == 3 * 512
    out, back = fq.driver.used()
    assert out.written == (bytes([BlkStatus.OK]),)
    assert back.written == (data[:512], data[512:1024], data[1024:], bytes([BlkStatus.OK]))
    assert os.pread(image.fileno(), 1536, 3 * 512) == data
    assert image.tell() == 7


def test_an_image_error_answers_ioerr_and_the_device_goes_on(
    tmp_path: Path, fq: SplitFakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """The image is opened write-only, so reading it fails (EBADF); the request gets IOERR and a
    log line, the next request is served."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SECTORS * 512))
    with open(os.open(path, os.O_WRONLY), "wb", buffering=0) as f:  # no truncation
        dev = BlkDevice(f)
        fq.driver.publish([_hdr(BlkType.IN, 0)], [512, 1])
        fq.driver.publish([_hdr(BlkType.OUT, 1), b"z" * 512], [1])
        with caplog.at_level(logging.WARNING):
            assert dev.serve(fq.queue) == 2
    failed, written = fq.driver.used()
    assert failed.written == (bytes(512), bytes([BlkStatus.IOERR]))
    assert written.written == (bytes([BlkStatus.OK]),)
    assert "reading the image" in caplog.text
    assert path.read_bytes()[512:1024] == b"z" * 512


def test_header_split_across_descriptors_is_read_as_one_record(
    image: io.FileIO, fq: SplitFakeQueue
) -> None:
    dev = BlkDevice(image)
    hdr = _hdr(BlkType.IN, 1)
    fq.driver.publish([hdr[:5], hdr[5:]], [512, 1])
    dev.serve(fq.queue)
    (used,) = fq.driver.used()
    image.seek(512)
    assert used.written[0] == image.read(512)
    assert used.written[1] == bytes([BlkStatus.OK])


def test_get_id_returns_the_serial_padded_to_20_bytes(image: io.FileIO, fq: SplitFakeQueue) -> None:
    dev = BlkDevice(image, serial=b"disk-7")
    fq.driver.publish([_hdr(BlkType.GET_ID)], [20, 1])
    dev.serve(fq.queue)
    (used,) = fq.driver.used()
    assert used.written == (b"disk-7".ljust(20, b"\0"), bytes([BlkStatus.OK]))


def test_flush_answers_ok(image: io.FileIO, fq: SplitFakeQueue) -> None:
    dev = BlkDevice(image)
    fq.driver.publish([_hdr(BlkType.FLUSH)], [1])
    dev.serve(fq.queue)
    assert fq.driver.used()[0].written == (bytes([BlkStatus.OK]),)


def test_unknown_request_type_answers_unsupp(image: io.FileIO, fq: SplitFakeQueue) -> None:
    dev = BlkDevice(image)
    fq.driver.publish([_hdr(99)], [1])
    dev.serve(fq.queue)
    assert fq.driver.used()[0].written == (bytes([BlkStatus.UNSUPP]),)


def test_read_past_the_end_answers_ioerr_with_the_status_inside_the_used_length(
    image: io.FileIO, fq: SplitFakeQueue
) -> None:
    dev = BlkDevice(image)
    fq.driver.publish([_hdr(BlkType.IN, SECTORS - 1)], [1024, 1])
    dev.serve(fq.queue)
    (used,) = fq.driver.used()
    assert used.len == 1025
    assert used.written == (bytes(1024), bytes([BlkStatus.IOERR]))


def test_write_to_a_read_only_device_answers_ioerr(image: io.FileIO, fq: SplitFakeQueue) -> None:
    dev = BlkDevice(image, read_only=True)
    assert dev.features & BlkFeature.RO
    fq.driver.publish([_hdr(BlkType.OUT, 0), b"x" * 512], [1])
    dev.serve(fq.queue)
    assert fq.driver.used()[0].written == (bytes([BlkStatus.IOERR]),)
    image.seek(0)
    assert image.read(512) == bytes(range(256)) * 2


def test_malformed_chain_is_logged_returned_with_zero_and_the_queue_goes_on(
    image: io.FileIO, fq: SplitFakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    dev = BlkDevice(image)
    d = fq.driver
    a, b = d.take_descriptor(), d.take_descriptor()
    buf = d.alloc_buffer(16)
    d.write_desc(a, buf, 16, DescFlags.WRITE | DescFlags.NEXT, b)
    d.write_desc(b, buf, 16, 0, 0)
    d.push_head(a)
    d.publish([_hdr(BlkType.FLUSH)], [1])
    with caplog.at_level(logging.WARNING):
        assert dev.serve(fq.queue) == 2
    used = d.used()
    assert (used[0].head, used[0].len) == (a, 0)
    assert used[1].written == (bytes([BlkStatus.OK]),)
    assert dev.errors == 1
    assert "readable descriptor" in caplog.text


def test_request_without_room_for_the_status_is_returned_with_zero(
    image: io.FileIO, fq: SplitFakeQueue
) -> None:
    dev = BlkDevice(image)
    fq.driver.publish([_hdr(BlkType.FLUSH)], [])
    dev.serve(fq.queue)
    (used,) = fq.driver.used()
    assert used.len == 0
    assert dev.errors == 1


def test_config_space_reports_capacity_and_seabios_safe_limits(image: io.FileIO) -> None:
    cfg = BLK_CONFIG.unpack(BlkDevice(image).config())
    assert cfg.capacity == SECTORS
    assert (cfg.size_max, cfg.seg_max) == (SIZE_MAX, SEG_MAX)
    # SeaBIOS 1.16.2 overflows past this (observed)
    assert cfg.size_max * cfg.seg_max // 512 < 1 << 16


@pytest.mark.parametrize(
    ("size", "cylinders"),
    [
        (SECTORS, 2),  # under two cylinders: QEMU's floor
        (16 * 63 * 100 + 5, 100),  # the whole cylinders that fit
        (16 * 63 * 16383, 16383),
        (40 << 21, 16383),  # 40 GiB: QEMU's ceiling (the ATA limit)
    ],
)
def test_config_space_reports_a_16_head_63_sector_geometry_and_offers_it(
    tmp_path: Path, size: int, cylinders: int
) -> None:
    """SeaBIOS reads the geometry for its INT 13h translation; 0/0/0 is no geometry at all. The
    device offers VIRTIO_BLK_F_GEOMETRY and reports what QEMU's own virtio-blk would."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size * 512)  # sparse
    with open(path, "r+b", buffering=0) as f:
        dev = BlkDevice(f)
        raw = dev.config()
    assert dev.features & BlkFeature.GEOMETRY
    at = BLK_CONFIG.offsets["cylinders"]
    assert (BLK_CONFIG.offsets["heads"], BLK_CONFIG.offsets["sectors"]) == (at + 2, at + 3)
    assert raw[at : at + 4] == cylinders.to_bytes(2, "little") + bytes([16, 63])
    cfg = BLK_CONFIG.unpack(raw)
    assert (cfg.capacity, cfg.cylinders, cfg.heads, cfg.sectors) == (size, cylinders, 16, 63)


def test_geometry_follows_a_grown_disk(image: io.FileIO) -> None:
    dev = BlkDevice(image)
    assert BLK_CONFIG.unpack(dev.config()).cylinders == 2
    image.truncate(16 * 63 * 512 * 300)
    assert dev.refresh_capacity()
    assert BLK_CONFIG.unpack(dev.config()).cylinders == 300


def _rng_stream(seed: int, requests: Sequence[Sequence[int]]) -> bytes:
    """What a driver reads from a seeded rng: each request is one chain of writable buffers
    (their sizes), all served, the bytes concatenated in order."""
    device = RngDevice(seed=seed)
    fq = make_queue(16, features=Feature.INDIRECT_DESC)
    try:
        got = b""
        for sizes in requests:
            assert fq.driver.publish([], sizes) is not None
            device.handle(0, fq.queue)
            (used,) = fq.driver.used()
            assert used.len == sum(sizes)
            got += b"".join(used.written)
        assert device.produced == len(got)
        return got
    finally:
        fq.memory.close()


@pytest.mark.parametrize(
    "requests",
    [
        [[3], [3]],
        [[1], [5]],
        [[2, 4]],  # one chain, two buffers
        [[6]],
    ],
)
def test_seeded_rng_stream_is_the_same_whatever_the_request_sizes(
    requests: list[list[int]],
) -> None:
    assert _rng_stream(7, requests) == _rng_stream(7, [[6]])


def test_seeded_rng_stream_in_odd_chunks_across_blocks_is_one_stream() -> None:
    """64 bytes as 1+7+13+43, and a run across the generator's block boundary, equal one read;
    the stream is ``randbytes(SEED_BLOCK)`` after ``randbytes(SEED_BLOCK)``, as documented."""
    chunks = [[1], [7, 13], [43]]
    assert _rng_stream(11, chunks) == _rng_stream(11, [[64]])
    total = 2 * SEED_BLOCK + 300
    odd = [[SEED_BLOCK - 5], [3, 9], [SEED_BLOCK + 1], [total - 2 * SEED_BLOCK - 8]]
    assert sum(map(sum, odd)) == total
    expected = random.Random(11)
    blocks = b"".join(expected.randbytes(SEED_BLOCK) for _ in range(3))
    assert _rng_stream(11, odd) == blocks[:total]
    assert _rng_stream(12, [[64]]) != _rng_stream(11, [[64]])


def test_demo_verifies_every_byte() -> None:
    summary = demo.run(requests=400, seed=7, size_mib=2)
    assert summary.mismatches == []
    assert sum(summary.requests.values()) + summary.malformed_returned == 400
    assert summary.requests["in"] > 0
    assert summary.requests["out"] > 0


def test_demo_main_prints_a_verified_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--requests", "200", "--size-mib", "1"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out
    assert "requests served" in out
