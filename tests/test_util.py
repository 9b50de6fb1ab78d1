"""Tests of :mod:`virtio_schema.util`: notification counting and coalescing, the async chain stream.

What a device relies on here: :class:`NotificationCounter` counts exactly, even across threads;
:class:`BufferedNotify` turns a batch of returns into one driver notification; and
:class:`DescChainStream` delivers every chain the driver makes available exactly once, is woken by
``kick()`` from any thread without ever losing a wake-up, ends with ``StopAsyncIteration`` after
``close()`` and with :class:`~virtio_schema.queue.QueueBroken` when the ring breaks.

Every test that involves a queue runs on a split and on a packed ring (the ``packed`` fixture, ids
``[split]`` / ``[packed]``): the helpers serve either. The tests of the notifiers alone involve no
ring and run once.

The async tests run their own loop with ``asyncio.run`` and bound every wait with a generous
``asyncio.wait_for`` timeout, so a lost wake-up fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from virtio_schema.chain import ReadableChain
from virtio_schema.fake_queue import FakeDriver, FakeMemory, FakePackedDriver, FakeQueue, make_queue
from virtio_schema.queue import (
    AvailIndexJump,
    BufferIdOutOfRange,
    DescChain,
    QueueBroken,
    RingError,
    VirtQueue,
    create_queue,
)
from virtio_schema.ring import PackedDesc
from virtio_schema.util import BufferedNotify, DescChainStream, NotificationCounter

T = TypeVar("T")
Driver = FakeDriver | FakePackedDriver
AnyFakeQueue = FakeQueue[VirtQueue, Driver]

TIMEOUT = 20.0
"""Upper bound for anything that waits: a hang fails the test, speed is never asserted."""


def run(awaitable: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, TIMEOUT)

    return asyncio.run(bounded())


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    """The ring format a test runs on."""
    return bool(request.param)


def fake(packed: bool, size: int = 8) -> AnyFakeQueue:
    return make_queue(size, memory=FakeMemory(1 << 18), packed=packed)


def break_ring(driver: Driver) -> type[RingError]:
    """Make the driver break the ring so that the queue's next look latches it broken; the cause
    to expect. Split: ``avail.idx`` jumps past the queue size. Packed: a chain whose buffer id is
    not below the queue size (it could never be returned)."""
    if isinstance(driver, FakePackedDriver):
        driver.push_raw([PackedDesc(driver.alloc_buffer(1), 1, 0xFFFF, 0)])
        return BufferIdOutOfRange
    driver.set_avail_idx(driver.avail_idx + driver.size + 12)
    return AvailIndexJump


def publish(driver: Driver, payload: bytes) -> int:
    head = driver.publish([payload])
    assert head is not None
    return head


def payload_of(chain: DescChain) -> bytes:
    """Read the chain's bytes and return it to the driver."""
    with ReadableChain(chain) as r:
        return r.read()


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(10):
        await asyncio.sleep(0)


# --- NotificationCounter -------------------------------------------------------------------------


def test_notification_counter_counts_and_take_resets() -> None:
    counter = NotificationCounter()
    assert counter.count == 0
    assert counter.take() == 0
    counter.notify()
    counter.notify()
    counter.notify()
    assert counter.count == 3
    assert counter.take() == 3
    assert counter.count == 0
    assert counter.take() == 0
    counter.notify()
    assert counter.take() == 1


def test_notification_counter_is_exact_across_threads() -> None:
    counter = NotificationCounter()
    start = threading.Barrier(4)

    def hammer() -> None:
        start.wait()
        for _ in range(1000):
            counter.notify()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert counter.count == 4000
    assert counter.take() == 4000


def test_notification_counter_counts_queue_notifications(packed: bool) -> None:
    fq = fake(packed)
    for k in range(3):
        publish(fq.driver, bytes([k]))
    while (chain := fq.queue.next_chain()) is not None:
        chain.return_written(0)
    assert fq.notifier.take() == 3
    assert len(fq.driver.used()) == 3


# --- BufferedNotify ------------------------------------------------------------------------------


def owed(notify: BufferedNotify) -> bool:
    """``notify.owed``, read through a call so the type checker does not narrow it."""
    return notify.owed


def test_buffered_notify_holds_notifications_until_flush() -> None:
    inner = NotificationCounter()
    buffered = BufferedNotify(inner)
    assert buffered.inner is inner
    assert not owed(buffered)
    assert buffered.flush() is False
    buffered.notify()
    buffered.notify()
    assert owed(buffered)
    assert inner.count == 0
    assert buffered.flush() is True
    assert inner.count == 1
    assert not owed(buffered)
    assert buffered.flush() is False
    assert inner.count == 1


def test_buffered_notify_with_block_flushes() -> None:
    inner = NotificationCounter()
    with BufferedNotify(inner) as buffered:
        buffered.notify()
        buffered.notify()
        assert inner.count == 0
    assert inner.count == 1
    with BufferedNotify(inner):
        pass
    assert inner.count == 1  # nothing owed, nothing sent


def test_buffered_notify_with_block_flushes_on_exception() -> None:
    inner = NotificationCounter()
    buffered = BufferedNotify(inner)

    def batch() -> None:
        with buffered:
            buffered.notify()
            raise RuntimeError("device failure")

    with pytest.raises(RuntimeError):
        batch()
    assert inner.count == 1


def test_batch_of_256_returns_notifies_the_driver_once(packed: bool) -> None:
    size = 256
    mem = FakeMemory(1 << 20)
    driver: Driver = FakePackedDriver(mem, size) if packed else FakeDriver(mem, size)
    inner = NotificationCounter()
    notify = BufferedNotify(inner)
    queue = create_queue(driver.queue_memory(), size, mem, features=driver.features, notify=notify)
    for _ in range(size):
        assert driver.publish([], [2]) is not None
    assert driver.publish([], [2]) is None  # the ring is full
    served = 0
    with notify:
        while (chain := queue.next_chain()) is not None:
            chain.written = 1
            chain.return_written()
            served += 1
        assert notify.owed
        assert inner.count == 0
    assert served == size
    assert inner.count == 1
    used = driver.used()
    assert len(used) == size
    assert all(u.len == 1 for u in used)


# --- DescChainStream -----------------------------------------------------------------------------


def test_stream_yields_chains_published_before_and_during_iteration(packed: bool) -> None:
    fq = fake(packed)
    for k in range(3):
        publish(fq.driver, b"early%d" % k)
    stream = DescChainStream(fq.queue)

    async def consume() -> list[bytes]:
        got: list[bytes] = []
        async for chain in stream:
            got.append(payload_of(chain))
            if len(got) == 3:
                publish(fq.driver, b"late0")
                publish(fq.driver, b"late1")
                stream.kick()
            if len(got) == 5:
                stream.close()
        return got

    assert run(consume()) == [b"early0", b"early1", b"early2", b"late0", b"late1"]
    assert len(fq.driver.used()) == 5


def test_stream_waits_until_kicked(packed: bool) -> None:
    """A chain published without a kick is not picked up (nobody polls); the kick delivers it."""
    fq = fake(packed)
    stream = DescChainStream(fq.queue)

    async def scenario() -> bytes:
        task = asyncio.ensure_future(anext(stream))
        await settle()
        assert not task.done()
        publish(fq.driver, b"quiet")
        await settle()
        assert not task.done()
        stream.kick()
        return payload_of(await task)

    assert run(scenario()) == b"quiet"


def test_kick_from_another_thread_wakes_the_waiting_iterator(packed: bool) -> None:
    fq = fake(packed)
    stream = DescChainStream(fq.queue)

    def driver_side() -> None:
        publish(fq.driver, b"from a thread")
        stream.kick()

    async def scenario() -> bytes:
        task = asyncio.ensure_future(anext(stream))
        await settle()
        assert not task.done()  # waiting on the event, not polling
        thread = threading.Thread(target=driver_side)
        thread.start()
        chain = await task
        thread.join(TIMEOUT)
        return payload_of(chain)

    assert run(scenario()) == b"from a thread"


def test_kick_before_iteration_is_harmless(packed: bool) -> None:
    fq = fake(packed)
    stream = DescChainStream(fq.queue)
    stream.kick()
    publish(fq.driver, b"x")

    async def first() -> bytes:
        return payload_of(await anext(stream))

    assert run(first()) == b"x"


def test_stream_is_woken_under_a_new_event_loop(packed: bool) -> None:
    """A stream that outlives one ``asyncio.run`` (a device loop restarted) is still woken by
    ``kick()`` when iterated under the next loop."""
    fq = fake(packed)
    stream = DescChainStream(fq.queue)
    publish(fq.driver, b"first")

    async def first() -> bytes:
        return payload_of(await anext(stream))

    assert run(first()) == b"first"

    async def second() -> bool:
        task = asyncio.ensure_future(anext(stream))
        await settle()
        publish(fq.driver, b"second")
        stream.kick()
        await settle()
        woken = task.done()
        if woken:
            payload_of(task.result())
        return woken

    assert run(second())


def test_storm_of_racing_kicks_delivers_every_chain_exactly_once(packed: bool) -> None:
    n_threads, per_thread = 4, 100
    fq = make_queue(32, memory=FakeMemory(1 << 20), packed=packed)
    stream = DescChainStream(fq.queue)
    driver_lock = threading.Lock()  # the fake driver is not thread-safe; the kicks race freely
    failures: list[BaseException] = []

    def publisher(t: int) -> None:
        try:
            for seq in range(per_thread):
                payload = struct.pack("<HH", t, seq)
                while True:
                    with driver_lock:
                        fq.driver.used()  # take back what the device returned
                        head = fq.driver.publish([payload])
                    if head is not None:
                        break
                    stream.kick()
                    threading.Event().wait(0.0005)  # the ring is full: let the device catch up
                stream.kick()
        except BaseException as e:  # pragma: no cover - reported by the assertion below
            failures.append(e)

    async def consume() -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        async for chain in stream:
            t, seq = struct.unpack("<HH", payload_of(chain))
            got.append((t, seq))
            if len(got) == n_threads * per_thread:
                break
        return got

    async def scenario() -> list[tuple[int, int]]:
        consumer = asyncio.ensure_future(consume())
        await settle()
        threads = [threading.Thread(target=publisher, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        try:
            return await consumer
        finally:
            for th in threads:
                th.join(TIMEOUT)

    got = run(scenario())
    assert not failures
    assert len(got) == len(set(got)) == n_threads * per_thread
    assert set(got) == {(t, s) for t in range(n_threads) for s in range(per_thread)}
    for t in range(n_threads):  # the avail ring is FIFO: each publisher's order is kept
        assert [s for tt, s in got if tt == t] == list(range(per_thread))
    with driver_lock:
        fq.driver.used()
    assert fq.driver.in_flight == 0
    assert fq.queue.next_chain() is None


def test_close_ends_a_waiting_iteration(packed: bool) -> None:
    fq = fake(packed)
    stream = DescChainStream(fq.queue)

    async def scenario() -> None:
        task = asyncio.ensure_future(anext(stream))
        await settle()
        assert not task.done()
        stream.close()
        with pytest.raises(StopAsyncIteration):
            await task

    run(scenario())


def test_close_from_another_thread_ends_the_iteration(packed: bool) -> None:
    fq = fake(packed)
    publish(fq.driver, b"one")
    stream = DescChainStream(fq.queue)

    closer = threading.Thread(target=stream.close)

    async def consume() -> list[bytes]:
        got: list[bytes] = []
        async for chain in stream:
            got.append(payload_of(chain))
            closer.start()
        return got

    assert run(consume()) == [b"one"]
    closer.join(TIMEOUT)


def test_closed_stream_yields_nothing(packed: bool) -> None:
    fq = fake(packed)
    publish(fq.driver, b"never")
    stream = DescChainStream(fq.queue)
    stream.close()

    async def consume() -> int:
        n = 0
        async for chain in stream:  # pragma: no cover - a closed stream yields nothing
            chain.return_written(0)
            n += 1
        return n

    assert run(consume()) == 0
    assert fq.queue.pending() == 1  # the chain was left for the driver's next device


def test_broken_queue_ends_a_waiting_iteration_with_queue_broken(packed: bool) -> None:
    fq = fake(packed, 8)
    stream = DescChainStream(fq.queue)

    cause: list[type[RingError]] = []

    def driver_side() -> None:
        cause.append(break_ring(fq.driver))
        stream.kick()

    async def scenario() -> None:
        task = asyncio.ensure_future(anext(stream))
        await settle()
        assert not task.done()
        thread = threading.Thread(target=driver_side)
        thread.start()
        with pytest.raises(QueueBroken) as info:
            await task
        thread.join(TIMEOUT)
        assert isinstance(info.value.cause, cause[0])

    run(scenario())
    assert isinstance(fq.queue.broken, cause[0])


def test_broken_queue_ends_iteration_after_good_chains(packed: bool) -> None:
    fq = fake(packed, 8)
    publish(fq.driver, b"good")
    stream = DescChainStream(fq.queue)

    async def consume(got: list[bytes]) -> None:
        async for chain in stream:
            got.append(payload_of(chain))
            break_ring(fq.driver)

    got: list[bytes] = []
    with pytest.raises(QueueBroken):
        run(consume(got))
    assert got == [b"good"]
    assert [u.data for u in fq.driver.used()] == [b""]
