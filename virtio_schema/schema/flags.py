"""Flag, feature and constant enums of the virtio wire formats.

Plain :class:`enum.IntFlag` / :class:`enum.IntEnum` values. The Construct schemas keep flags as plain
integers (Construct's ``FlagsEnum`` drops unknown bits on a round trip, and a dissector must show the
bits a hostile driver really wrote); these enums are for testing and naming bits.

Sources: virtio 1.2, 2.7 (split), 2.8 (packed), 6 (reserved feature bits); Linux
``include/uapi/linux/virtio_ring.h`` and ``virtio_config.h``.
"""

from __future__ import annotations

import enum

__all__ = [
    "AvailFlags",
    "DescFlags",
    "EventFlags",
    "Feature",
    "PackedDescFlags",
    "UsedFlags",
]


class DescFlags(enum.IntFlag):
    """Split descriptor ``flags`` (virtio 1.2, 2.7.5)."""

    NEXT = 1
    """The buffer continues via the ``next`` field."""
    WRITE = 2
    """The buffer is device-writable (otherwise device-readable)."""
    INDIRECT = 4
    """The buffer holds a table of descriptors (needs :attr:`Feature.INDIRECT_DESC`)."""


class AvailFlags(enum.IntFlag):
    """Available ring ``flags`` (virtio 1.2, 2.7.6): written by the driver."""

    NO_INTERRUPT = 1
    """The driver asks the device not to notify it (ignored with :attr:`Feature.EVENT_IDX`)."""


class UsedFlags(enum.IntFlag):
    """Used ring ``flags`` (virtio 1.2, 2.7.8): written by the device."""

    NO_NOTIFY = 1
    """The device asks the driver not to kick it (ignored with :attr:`Feature.EVENT_IDX`)."""


class PackedDescFlags(enum.IntFlag):
    """Packed descriptor ``flags`` (virtio 1.2, 2.8.1 and 2.8.13)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4
    AVAIL = 1 << 7
    """Equal to the driver's wrap counter when the driver made the descriptor available."""
    USED = 1 << 15
    """Equal to the device's wrap counter when the device marked the descriptor used."""


class EventFlags(enum.IntEnum):
    """Event suppression area ``flags`` (virtio 1.2, 2.8.10): values, not bits."""

    ENABLE = 0
    """Notify on every event."""
    DISABLE = 1
    """Do not notify."""
    DESC = 2
    """Notify when the ring position in ``off_wrap`` is reached (needs :attr:`Feature.EVENT_IDX`)."""


class Feature(enum.IntFlag):
    """Device-independent feature bits (virtio 1.2, 6), as masks over the 64-bit feature word.

    ``features & Feature.EVENT_IDX`` tests a negotiated bit; ``Feature.EVENT_IDX.bit`` gives the bit
    number (29) used by transports that list bit positions.
    """

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30
    """vhost-user only: the back-end speaks vhost-user protocol features."""
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40

    @property
    def bit(self) -> int:
        """The bit number of a single feature (``Feature.RING_PACKED.bit == 34``)."""
        return int(self).bit_length() - 1
