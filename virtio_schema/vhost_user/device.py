"""What a device author implements to serve a device over vhost-user.

Subclass :class:`VhostUserDevice`, say which features, configuration space and how many queues the
device has, and implement :meth:`~VhostUserDevice.handle`, called with a ready
:class:`~virtio_schema.queue.Queue` or :class:`~virtio_schema.queue.PackedQueue` (whichever
format the driver negotiated) whenever the driver kicked that queue (and the ring is started
and enabled). Everything else, negotiation, memory, ring addresses, eventfds, stop and restart at the
right index, is the transport's.
"""

from __future__ import annotations

import logging

from virtio_schema.queue import VirtQueue
from virtio_schema.schema import Feature
from virtio_schema.vhost_user.messages import ProtocolFeature

__all__ = ["VhostUserDevice"]

log = logging.getLogger(__name__)


class VhostUserDevice:
    """Base class of a device served by :class:`~virtio_schema.vhost_user.server.VhostUserServer`.

    Override :attr:`num_queues`, :meth:`device_features`, :meth:`config` and :meth:`handle`.
    """

    num_queues: int = 1
    """Queues the device has (reported by GET_QUEUE_NUM)."""

    poll_interval: float | None = None
    """If set, :meth:`poll` is called about this often (seconds), kicks or not: for devices that
    produce on their own (a traffic source, a timer)."""

    def device_features(self) -> int:
        """Virtio feature bits offered to the driver. The default offers the ring features the
        library implements; devices add their own bits."""
        return int(
            Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX | Feature.RING_PACKED
        )

    def protocol_features(self) -> int:
        """vhost-user protocol features the device wants offered (the back-end implements MQ,
        REPLY_ACK and CONFIG). A device whose front-end keeps the configuration space itself
        (QEMU's virtio-net) leaves CONFIG out."""
        return int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG)

    def config(self) -> bytes:
        """The device configuration space (GET_CONFIG reads from it)."""
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the configuration space (ignored by
        default: most fields are read-only)."""
        log.info("SET_CONFIG offset=%d size=%d ignored", offset, len(data))

    def handle(self, index: int, queue: VirtQueue) -> None:
        """Serve what is available on queue ``index``. Called on every kick of a started and
        enabled ring; notifications the queue raises while this runs are coalesced into one."""
        raise NotImplementedError

    def poll(self) -> None:
        """Called every :attr:`poll_interval` seconds while a front-end is connected."""

    def started(self, index: int, queue: VirtQueue) -> None:
        """Queue ``index`` was (re)started (SET_VRING_KICK with memory and addresses known)."""

    def stopped(self, index: int) -> None:
        """Queue ``index`` was stopped (GET_VRING_BASE, reset or disconnect)."""
