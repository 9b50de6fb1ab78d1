"""Tests of the fake drivers' malformed chains (``push_malformed``), one test body for both formats.

What a device author relies on here: ``push_malformed(kind)`` is the same call on the split and the
packed fake driver, so a hostile-driver test typed on :data:`AnyFakeQueue` covers both formats; it
returns the id the used entry names; the device then sees exactly the outcome
:class:`~virtio_schema.fake_queue.Malformed` documents for the kind and the format: ``error`` set by
the walk (and the chain back with length 0), :class:`UnmappedBuffer` only when the device touches a
buffer outside guest memory, or a broken ring; the queue serves the next well-formed chain after a
malformed one (not after a broken ring); the driver gets the descriptors and memory of a returned
malformed chain back; a kind one format cannot express raises :class:`NotInThisFormat` and writes
nothing. The outcomes are written out below independently of the builders, and every
:class:`ChainError` the walk can set has a builder that makes the walk set it, as the
``DescChain.error`` docstring lists them.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtio_schema.chain import ReadableChain
from virtio_schema.errors import DeviceUsageError, DriverError, VirtioError
from virtio_schema.fake_queue import (
    AnyFakeQueue,
    FakeMemory,
    Malformed,
    NotInThisFormat,
    UsedChain,
    make_queue,
)
from virtio_schema.queue import (
    BufferAddressOverflow,
    BufferIdOutOfRange,
    ChainError,
    ChainLengthOverflow,
    ChainNeverEnds,
    ChainTooLong,
    DescIndexOutOfRange,
    HeadOutOfRange,
    IndirectNotNegotiated,
    IndirectTableTooLarge,
    IndirectWithNext,
    InvalidIndirectLength,
    NestedIndirect,
    PackedQueue,
    QueueBroken,
    ReadableAfterWritable,
    UnmappedBuffer,
    UnmappedIndirectTable,
    VirtQueue,
)
from virtio_schema.queue import errors as queue_errors
from virtio_schema.schema import Feature

FORMATS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
KINDS = pytest.mark.parametrize("kind", list(Malformed), ids=[k.name for k in Malformed])

# --- what the device must see, written out apart from the builders ------------------------------

WALK = "walk sets chain.error"
ACCESS = "read/write raises"
RING = "the ring breaks"
REFUSED = "not in this format"
Outcome = tuple[str, type[VirtioError]]

EXPECTED: dict[Malformed, tuple[Outcome, Outcome]] = {  # kind: (split, packed)
    Malformed.NEXT_OUT_OF_RANGE: ((WALK, DescIndexOutOfRange), (REFUSED, NotInThisFormat)),
    Malformed.LOOP: ((WALK, ChainTooLong), (RING, ChainNeverEnds)),
    Malformed.TOO_LONG: ((WALK, ChainTooLong), (WALK, ChainTooLong)),
    Malformed.READABLE_AFTER_WRITABLE: (
        (WALK, ReadableAfterWritable),
        (WALK, ReadableAfterWritable),
    ),
    Malformed.ADDRESS_WRAP: ((WALK, BufferAddressOverflow), (WALK, BufferAddressOverflow)),
    Malformed.LENGTH_OVERFLOW: ((WALK, ChainLengthOverflow), (WALK, ChainLengthOverflow)),
    Malformed.UNMAPPED_READABLE: ((ACCESS, UnmappedBuffer), (ACCESS, UnmappedBuffer)),
    Malformed.UNMAPPED_WRITABLE: ((ACCESS, UnmappedBuffer), (ACCESS, UnmappedBuffer)),
    Malformed.STRADDLING_READABLE: ((ACCESS, UnmappedBuffer), (ACCESS, UnmappedBuffer)),
    Malformed.STRADDLING_WRITABLE: ((ACCESS, UnmappedBuffer), (ACCESS, UnmappedBuffer)),
    Malformed.INDIRECT_NOT_NEGOTIATED: (
        (WALK, IndirectNotNegotiated),
        (WALK, IndirectNotNegotiated),
    ),
    Malformed.INDIRECT_EMPTY: ((WALK, InvalidIndirectLength), (WALK, InvalidIndirectLength)),
    Malformed.INDIRECT_BAD_LENGTH: ((WALK, InvalidIndirectLength), (WALK, InvalidIndirectLength)),
    Malformed.INDIRECT_TOO_LARGE: ((WALK, IndirectTableTooLarge), (WALK, IndirectTableTooLarge)),
    Malformed.INDIRECT_WITH_NEXT: ((WALK, IndirectWithNext), (WALK, IndirectWithNext)),
    Malformed.INDIRECT_NOT_ALONE: ((REFUSED, NotInThisFormat), (WALK, IndirectWithNext)),
    Malformed.NESTED_INDIRECT: ((WALK, NestedIndirect), (WALK, NestedIndirect)),
    Malformed.UNMAPPED_INDIRECT: ((WALK, UnmappedIndirectTable), (WALK, UnmappedIndirectTable)),
    Malformed.ID_OUT_OF_RANGE: ((RING, HeadOutOfRange), (RING, BufferIdOutOfRange)),
}

# The bytes a straddling writable buffer has in guest memory: the device's write lands there.
STRADDLING_MAPPED = 8


def features_for(kind: Malformed) -> int:
    """The features a kind is shown with: INDIRECT_DESC, except where it must be off."""
    return 0 if kind is Malformed.INDIRECT_NOT_NEGOTIATED else int(Feature.INDIRECT_DESC)


# --- the device under test -------------------------------------------------------------------------


@dataclass
class Served:
    """One chain the device took: its id, its ``error``, what the device's reads/writes raised
    and the request it read."""

    head: int
    error: ChainError | None
    raised: DriverError | None
    request: bytes


def serve(queue: VirtQueue) -> list[Served]:
    """The README's device loop, an uppercase echo that fills the writable space: every chain goes
    back, a driver error is caught per chain and the loop goes on."""
    served: list[Served] = []
    while (chain := queue.next_chain()) is not None:
        raised: DriverError | None = None
        request = b""
        with chain:
            try:
                reader = ReadableChain(chain)
                request = reader.read()
                writer = reader.into_writable()
                space = chain.writable_len
                writer.write(request.upper().ljust(space, b".")[:space])
            except DriverError as exc:
                raised = exc
        served.append(Served(chain.head, chain.error, raised, request))
    return served


def device_survives(fq: AnyFakeQueue, kind: Malformed) -> None:
    """The hostile test a device author writes once, for both formats: a malformed chain of
    ``kind`` then a good one; the device is served both (unless the ring breaks) and each goes
    back as the kind's documented outcome says."""
    how, cls = EXPECTED[kind][isinstance(fq.queue, PackedQueue)]
    free_before = fq.driver.free_descriptors
    allocated_before = fq.memory.allocated
    bad = fq.driver.push_malformed(kind)
    good = fq.driver.publish([b"ping"], [4])  # None after a packed LOOP: it takes every slot
    if how == RING:
        with pytest.raises(QueueBroken) as info:
            serve(fq.queue)
        assert type(info.value.cause) is cls
        with pytest.raises(QueueBroken) as again:  # latched: the same cause, the good chain waits
            fq.queue.next_chain()
        assert again.value.cause is info.value.cause
        assert fq.driver.used() == []  # nothing can go back
        return
    assert good is not None
    served = serve(fq.queue)
    assert [s.head for s in served] == [bad, good]
    first, second = served
    assert second.error is None
    assert second.raised is None
    if how == WALK:
        assert type(first.error) is cls
        assert first.raised is first.error  # reading the chain raises its error
        written = 0
    else:
        assert first.error is None  # the walk does not translate buffers
        assert type(first.raised) is cls
        assert isinstance(first.raised, UnmappedBuffer)
        assert first.raised.head == bad
        assert first.raised.addr >= fq.memory.end  # where guest memory ends
        written = 0
        if kind is Malformed.STRADDLING_WRITABLE:  # the mapped part took the write's first bytes
            written = STRADDLING_MAPPED
            landed = fq.memory.read(fq.memory.end - written, written)
            assert landed == first.request.upper()[:written]
    assert fq.driver.used() == [UsedChain(bad, written, ()), UsedChain(good, 4, (b"PING",))]
    assert fq.driver.free_descriptors == free_before  # a returned malformed chain is taken apart
    assert fq.memory.allocated == allocated_before


# --- every kind, both formats ----------------------------------------------------------------------


@FORMATS
@KINDS
def test_the_device_sees_the_documented_outcome_of_each_malformed_chain(
    kind: Malformed, packed: bool
) -> None:
    fq = make_queue(8, packed=packed, features=features_for(kind))
    how, cls = EXPECTED[kind][packed]
    if how == REFUSED:
        before = tuple(bytes(b) for b in fq.memory.buffers)
        with pytest.raises(cls, match=r"has no (split|packed) equivalent"):
            fq.driver.push_malformed(kind)
        assert tuple(bytes(b) for b in fq.memory.buffers) == before  # nothing written
        assert fq.queue.next_chain() is None
        return
    device_survives(fq, kind)


def test_one_test_body_serves_both_formats_through_any_fake_queue() -> None:
    """The point of ``push_malformed``: ``device_survives`` takes an ``AnyFakeQueue``, and a
    ``SplitFakeQueue`` and a ``PackedFakeQueue`` (concrete types, as ``make_queue`` gives them)
    both pass through it, kind after kind on the same queue."""
    split = make_queue(8, features=Feature.INDIRECT_DESC)
    packed = make_queue(8, packed=True, features=Feature.INDIRECT_DESC)
    for kind in (
        Malformed.TOO_LONG,
        Malformed.READABLE_AFTER_WRITABLE,
        Malformed.UNMAPPED_WRITABLE,
        Malformed.STRADDLING_WRITABLE,
        Malformed.NESTED_INDIRECT,
        Malformed.INDIRECT_WITH_NEXT,
    ):
        device_survives(split, kind)
        device_survives(packed, kind)


@FORMATS
@pytest.mark.parametrize("size", [1, 2, 4])
def test_a_loop_is_a_malformed_chain_in_any_queue_size(packed: bool, size: int) -> None:
    """Split: a ``next`` loop over two descriptors (one, pointing at itself, in a queue of 1) is
    too long once ``size`` buffers are accepted; packed: NEXT on every slot breaks the ring."""
    fq = make_queue(size, packed=packed)
    head = fq.driver.push_malformed(Malformed.LOOP)
    if packed:
        with pytest.raises(QueueBroken) as info:
            fq.queue.next_chain()
        assert isinstance(info.value.cause, ChainNeverEnds)
        return
    chain = fq.queue.next_chain()
    assert chain is not None
    assert isinstance(chain.error, ChainTooLong)
    assert chain.error.limit == size
    chain.return_written(0)
    assert fq.driver.used() == [UsedChain(head, 0, ())]
    assert fq.driver.free_descriptors == size


@FORMATS
@pytest.mark.parametrize("size", [1, 8])
def test_too_long_is_one_entry_over_the_queue_size(packed: bool, size: int) -> None:
    fq = make_queue(size, packed=packed, features=Feature.INDIRECT_DESC)
    fq.driver.push_malformed(Malformed.TOO_LONG)
    chain = fq.queue.next_chain()
    assert chain is not None
    assert isinstance(chain.error, ChainTooLong)
    # the indirect descriptor, then the entries up to the first one over the limit
    assert fq.queue.descriptors_read == 1 + size + 1
    chain.return_written(0)


def test_every_error_the_walk_sets_has_a_builder_and_is_in_the_desc_chain_error_docstring() -> None:
    """The classes the walk sets as ``DescChain.error`` (over every kind, both formats) are every
    :class:`ChainError` but :class:`UnmappedBuffer`, which only the chain readers and writers
    raise; and they are the ones the ``DescChain.error`` docstring names before it turns to
    buffers outside guest memory."""
    walk: set[type[VirtioError]] = {
        cls for outcomes in EXPECTED.values() for how, cls in outcomes if how == WALK
    }
    chain_errors = {
        cls
        for name in queue_errors.__all__
        if isinstance(cls := getattr(queue_errors, name), type) and issubclass(cls, ChainError)
    } - {ChainError}
    assert walk == chain_errors - {UnmappedBuffer}
    source = Path(__file__).parent.parent / "virtio_schema" / "queue" / "desc_chain.py"
    doc = _attribute_docstring(source.read_text(), "DescChain", "error")
    set_by_walk, not_set = doc.split("Never set for")
    assert {
        getattr(queue_errors, name)
        for name in re.findall(r":class:`~virtio_schema\.queue\.(\w+)`", set_by_walk)
    } == walk
    assert "UnmappedBuffer" in not_set


def _attribute_docstring(source: str, cls: str, attribute: str) -> str:
    """The string literal after ``attribute``'s annotation in class ``cls`` of ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            body = node.body
            for k, stmt in enumerate(body[:-1]):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and stmt.target.id == attribute
                ):
                    doc = body[k + 1]
                    assert isinstance(doc, ast.Expr)
                    assert isinstance(doc.value, ast.Constant)
                    assert isinstance(doc.value.value, str)
                    return doc.value.value
    raise AssertionError(f"no docstring for {cls}.{attribute}")


# --- refusals: nothing is written -------------------------------------------------------------------


@FORMATS
@pytest.mark.parametrize(
    ("kind", "features", "message"),
    [
        (Malformed.NESTED_INDIRECT, 0, "needs INDIRECT_DESC"),
        (Malformed.TOO_LONG, 0, "needs INDIRECT_DESC"),
        (Malformed.INDIRECT_NOT_NEGOTIATED, int(Feature.INDIRECT_DESC), "without INDIRECT_DESC"),
    ],
)
def test_a_kind_the_features_would_hide_is_refused(
    packed: bool, kind: Malformed, features: int, message: str
) -> None:
    fq = make_queue(8, packed=packed, features=features)
    before = tuple(bytes(b) for b in fq.memory.buffers)
    with pytest.raises(DeviceUsageError, match=message):
        fq.driver.push_malformed(kind)
    assert tuple(bytes(b) for b in fq.memory.buffers) == before
    assert fq.queue.next_chain() is None


@FORMATS
def test_a_malformed_chain_that_does_not_fit_is_refused_and_allocates_nothing(packed: bool) -> None:
    fq = make_queue(2, packed=packed, memory=FakeMemory(1 << 16))
    assert fq.driver.publish([b"a"], [1]) is not None  # one of two descriptors/slots taken
    allocated = fq.memory.allocated
    with pytest.raises(DeviceUsageError, match="no room"):
        fq.driver.push_malformed(Malformed.READABLE_AFTER_WRITABLE)  # takes two
    assert fq.memory.allocated == allocated
    if packed:  # a packed LOOP takes the whole ring, so it waits for every chain to come back
        with pytest.raises(DeviceUsageError, match="whole ring"):
            fq.driver.push_malformed(Malformed.LOOP)
    served = serve(fq.queue)
    assert [s.error for s in served] == [None]
    assert len(fq.driver.used()) == 1
    fq.driver.push_malformed(Malformed.LOOP if packed else Malformed.READABLE_AFTER_WRITABLE)


@FORMATS
def test_a_queue_of_one_cannot_hold_a_two_descriptor_chain(packed: bool) -> None:
    """Most kinds take two descriptors; the buffers a refused one allocated are given back (the
    straddling one's too, so the end of memory can hold the next one)."""
    fq = make_queue(1, packed=packed)
    allocated = fq.memory.allocated
    for kind in (Malformed.UNMAPPED_READABLE, Malformed.STRADDLING_WRITABLE):
        with pytest.raises(DeviceUsageError, match="more than the queue size 1"):
            fq.driver.push_malformed(kind)
        assert fq.memory.allocated == allocated
    assert fq.queue.next_chain() is None
