"""Plain data and protocols shared by the queue formats: ring memory, saved state, the notifier.

Nothing here touches guest memory. ``QueueState`` is plain data (after rust-vmm's split between the
state and the live queue), so save/restore, vhost-user's SET_VRING_BASE / GET_VRING_BASE and
migration are a matter of copying a small frozen record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from virtio_schema.errors import DeviceUsageError
from virtio_schema.mem import DeviceRange

__all__ = [
    "DriverNotify",
    "PackedInflightLog",
    "QueueMemory",
    "QueueState",
    "SplitInflightLog",
    "WriteLog",
    "vring_need_event",
]


@dataclass(frozen=True, slots=True)
class QueueMemory:
    """The three areas of a queue as device ranges (split: descriptor table, available ring, used
    ring; packed: descriptor ring, driver event area, device event area)."""

    desc: DeviceRange
    avail: DeviceRange
    used: DeviceRange


@dataclass(frozen=True, slots=True)
class QueueState:
    """Where a queue stands: the next available entry the device will read and the next used entry
    it will write (free-running u16 counters for split rings).

    For packed rings the indices are ring positions (``0 <= index < size``) and the wrap counters say
    which lap the device is on; split rings ignore the wrap counters.
    """

    next_avail: int = 0
    next_used: int = 0
    avail_wrap: bool = True
    used_wrap: bool = True

    def __post_init__(self) -> None:
        for name in ("next_avail", "next_used"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFF:
                raise DeviceUsageError(f"QueueState.{name} = {value} is not a u16")


class DriverNotify(Protocol):
    """How the device signals the driver that used buffers are ready (an interrupt, an eventfd
    write, a counter in a test). Called by the queue when the suppression rules say so."""

    def notify(self) -> None: ...


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Whether moving an index from ``old`` to ``new`` passes ``event`` (virtio 1.2, 2.7.10;
    Linux ``vring_need_event``): true iff ``event`` is in ``[old, new)`` modulo 2**16."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class SplitInflightLog(Protocol):
    """Where a split queue records the chains in flight, so that a restarted device can take
    them again (vhost-user's inflight region:
    :class:`~virtio_schema.vhost_user.inflight.SplitInflight`). The queue calls it as it takes
    and publishes chains (:meth:`~virtio_schema.queue.Queue.track_inflight`)."""

    def taken(self, head: int) -> None:
        """The chain at descriptor ``head`` was taken from the available ring."""
        ...

    def completing(self, heads: Sequence[int]) -> None:
        """These chains are about to be published in one ``used.idx`` store."""
        ...

    def completed(self, heads: Sequence[int], used_idx: int) -> None:
        """They were published: ``used.idx`` is now ``used_idx``."""
        ...


class PackedInflightLog(Protocol):
    """:class:`SplitInflightLog` for a packed queue
    (:class:`~virtio_schema.vhost_user.inflight.PackedInflight`): a chain is recorded with its
    ring descriptors (the used descriptors written later overwrite them in the ring)."""

    def taken(self, descs: Sequence[tuple[int, int, int, int]]) -> int:
        """The chain whose ring descriptors are ``descs`` (``(addr, len, id, flags)`` each) was
        taken; returns the entry that stands for it."""
        ...

    def completing(self, entries: Sequence[int], used_idx: int, used_wrap: int) -> None:
        """These chains are about to be published by one used descriptor; the used position
        will then be ``used_idx`` with wrap counter ``used_wrap``."""
        ...

    def completed(self, entries: Sequence[int]) -> None:
        """That used descriptor was published."""
        ...


class WriteLog(Protocol):
    """Where a queue marks the guest memory the device wrote (live migration's dirty log:
    :class:`~virtio_schema.vhost_user.dirty_log.DirtyLog`); see
    :meth:`~virtio_schema.queue.Queue.set_dirty_log`."""

    def mark(self, addr: int, length: int) -> None:
        """``length`` bytes at driver address ``addr`` were written."""
        ...
