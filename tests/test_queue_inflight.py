"""The queues record their chains in flight (``track_inflight``) and a restarted device takes them
again: the queue layer against the inflight region of :mod:`virtio_schema.vhost_user.inflight`,
with the fake driver, both ring formats.

A "crash" here is what a killed back-end leaves: the driver's ring and the inflight region as
they are, and a new queue (the new process's) built on them at the position the front-end gives.
Every chain the driver made available must then complete exactly once, whatever point the crash
came at: never lost (the driver would wait for it forever), never twice (Linux treats a second
completion of a head as a driver bug).
"""

from __future__ import annotations

import gc
import warnings

import pytest

from virtio_schema.chain import WritableChain
from virtio_schema.fake_queue import (
    FakeDriver,
    FakePackedDriver,
    FakeQueue,
    make_queue,
)
from virtio_schema.queue import (
    DescChain,
    PackedQueue,
    Queue,
    QueueState,
    VirtQueue,
    create_queue,
)
from virtio_schema.schema import DescFlags
from virtio_schema.util import NotificationCounter
from virtio_schema.vhost_user.inflight import (
    PACKED_DESC_STATE,
    PACKED_QUEUE_REGION,
    PackedInflight,
    SplitInflight,
    queue_region_size,
)

SIZE = 16
DATA = b"ok"

AnyFake = FakeQueue[VirtQueue, FakeDriver | FakePackedDriver]


class Tracked:
    """A queue with its fake driver and its inflight region; :meth:`restart` is a crash and a
    new device process on the same ring and region."""

    def __init__(self, packed: bool) -> None:
        self.packed = packed
        self.fq: AnyFake = make_queue(SIZE, packed=packed)
        self.region = bytearray(queue_region_size(SIZE, packed=packed))
        self.queue = self.fq.queue
        self.held: list[DescChain] = []
        """Chains taken and not completed: what a crash loses with the process."""
        self.resubmitted = 0
        self._track(fresh=True)

    def _track(self, *, fresh: bool) -> None:
        view = memoryview(self.region)
        queue = self.queue
        if isinstance(queue, Queue):
            split_log = SplitInflight(view, SIZE)
            used = self.fq.driver.used_idx
            rec = split_log.recover(used)
            assert rec.fresh == fresh
            state = QueueState(rec.next_avail, used)
            queue.track_inflight(split_log, state=state, resubmit=rec.heads)
            self.resubmitted = len(rec.heads)
        else:
            assert isinstance(queue, PackedQueue)
            packed_log = PackedInflight(view, SIZE)
            base = queue.state()
            prec = packed_log.recover(
                queue.ring.flags, used_idx=base.next_used, used_wrap=int(base.used_wrap)
            )
            assert prec.fresh == fresh
            state = QueueState(
                prec.next_avail, prec.next_used, bool(prec.avail_wrap), bool(prec.used_wrap)
            )
            chains = [(c.entry, c.descs) for c in prec.chains]
            queue.track_inflight(packed_log, state=state, resubmit=chains)
            self.resubmitted = len(prec.chains)

    def restart(self) -> None:
        """The device process dies; a new one builds its queue on the same ring (QEMU's base
        after a crash: the used index for split, an unreliable position for packed) and
        recovers from the region. The old process's chains die with it (never returned)."""
        self.queue.reset()  # the dead process's chains are stale: they never reach the ring
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # "never returned": as in a crash
            self.held.clear()
            gc.collect()
        driver = self.fq.driver
        state = (
            QueueState(driver.used_idx, driver.used_idx)
            if isinstance(driver, FakeDriver)
            else QueueState(0, 0)  # QEMU 7.2 does not restore a packed ring's position
        )
        self.queue = create_queue(
            driver.queue_memory(),
            SIZE,
            self.fq.memory,
            features=self.fq.queue.features,
            notify=NotificationCounter(),
            state=state,
        )
        self._track(fresh=False)

    def publish(self, n: int) -> list[int]:
        heads = [self.fq.driver.publish([], [len(DATA)]) for _ in range(n)]
        assert None not in heads
        return [h for h in heads if h is not None]

    def take(self, n: int) -> list[DescChain]:
        chains = []
        for _ in range(n):
            chain = self.queue.next_chain()
            assert chain is not None
            chains.append(chain)
        self.held += chains
        return chains

    def complete(self, chains: list[DescChain]) -> None:
        with self.queue.batch():
            for chain in chains:
                with chain:
                    if chain.error is None:  # a malformed chain goes back empty
                        WritableChain(chain).write(DATA)
                self.held.remove(chain)

    def used_heads(self) -> list[int]:
        return [u.head for u in self.fq.driver.used()]


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def tracked(request: pytest.FixtureRequest) -> Tracked:
    return Tracked(bool(request.param))


def test_chains_in_flight_at_a_crash_are_handed_out_again_first_and_complete_once(
    tracked: Tracked,
) -> None:
    heads = tracked.publish(4)
    tracked.complete(tracked.take(3)[:1])
    assert tracked.used_heads() == heads[:1]
    tracked.restart()  # taken[1], taken[2] in flight; heads[3] never taken
    assert tracked.resubmitted == 2
    again = tracked.take(3)
    assert [c.head for c in again] == heads[1:4]  # the resubmitted first, in order, then new
    assert tracked.queue.next_chain() is None
    tracked.complete(again)
    assert tracked.used_heads() == heads[1:4]


def test_a_batch_published_before_the_crash_is_not_handed_out_again(tracked: Tracked) -> None:
    heads = tracked.publish(5)
    tracked.complete(tracked.take(3))  # one batch: one used-index update
    tracked.take(2)
    assert tracked.used_heads() == heads[:3]
    tracked.restart()
    assert tracked.resubmitted == 2
    again = tracked.take(2)
    assert [c.head for c in again] == heads[3:]
    tracked.complete(again)
    assert tracked.used_heads() == heads[3:]


def test_repeated_crashes_lose_and_repeat_nothing(tracked: Tracked) -> None:
    completed: list[int] = []
    published: list[int] = []
    for _ in range(4):
        published += tracked.publish(3)
        tracked.complete(tracked.take(3)[:1])
        completed += tracked.used_heads()
        tracked.restart()
    while tracked.queue.pending():
        tracked.complete(tracked.take(1))
    completed += tracked.used_heads()
    assert sorted(completed) == sorted(published)  # each exactly once (heads are reused)


def test_a_chain_the_driver_corrupted_since_is_validated_again_and_returned_empty() -> None:
    """Split: the resubmitted chain is read from the ring as it is now (the driver owns its
    descriptors while they are in flight only by convention)."""
    tracked = Tracked(packed=False)
    (head,) = tracked.publish(1)
    tracked.take(1)
    driver = tracked.fq.driver
    assert isinstance(driver, FakeDriver)
    driver.write_desc(head, (1 << 64) - 8, 16, DescFlags.WRITE, 0)  # ends past 2**64
    tracked.restart()
    (chain,) = tracked.take(1)
    assert chain.error is not None
    tracked.complete([chain])
    used = driver.used()
    assert [(u.head, u.len) for u in used] == [(head, 0)]  # returned: no slot lost


def test_the_packed_copy_in_the_region_is_validated_again() -> None:
    """Packed: the resubmitted chain comes from the region's copy of its descriptors, which a
    hostile front-end may have changed: it is judged like a chain in the ring."""
    tracked = Tracked(packed=True)
    (buffer_id,) = tracked.publish(1)
    tracked.take(1)
    # the chain was recorded in entry 0 (the free list's first): its copy's buffer address
    addr = PACKED_QUEUE_REGION.size + PACKED_DESC_STATE.offsets["addr"]
    tracked.region[addr : addr + 8] = ((1 << 64) - 1).to_bytes(8, "little")  # ends past 2**64
    tracked.restart()
    (chain,) = tracked.take(1)
    assert chain.head == buffer_id
    assert chain.error is not None
    tracked.complete([chain])
    assert [(u.head, u.len) for u in tracked.fq.driver.used()] == [(buffer_id, 0)]
