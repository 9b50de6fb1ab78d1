"""The example virtio-blk device and the demo main job."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from virtio_schema.examples import demo
from virtio_schema.examples.blk import SEG_MAX, SIZE_MAX, BlkDevice
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
