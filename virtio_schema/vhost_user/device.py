"""What a device author implements to serve a device over vhost-user.

Subclass :class:`VhostUserDevice`, say which features, configuration space and how many queues the
device has, and implement :meth:`~VhostUserDevice.handle`, called with a ready
:class:`~virtio_schema.queue.Queue` or :class:`~virtio_schema.queue.PackedQueue` (whichever
format the driver negotiated) whenever that queue has work (and the ring is started and
enabled). Everything else, negotiation, memory, ring addresses, eventfds, stop and restart at the
right index, is the transport's.

A device that keeps queues to serve them outside ``handle`` (a receive queue filled when frames
arrive from elsewhere) keeps them from :meth:`~VhostUserDevice.enabled` to
:meth:`~VhostUserDevice.disabled`: a started but disabled ring must not be written
(vhost-user.rst, "Ring states"), and its queue hands out no chains.

Threads. By default the server calls every method of every device from its one thread, never two
at once. A device that sets :attr:`~VhostUserDevice.worker_threads` has each ring that runs with a
kick fd served by a worker thread of its own (the server's theory of operation, "Worker
threads"): :meth:`~VhostUserDevice.handle` then runs on the ring's worker, for different rings at
the same time, so what it shares between rings must be thread-safe. The hooks (``started``,
``enabled``, ``disabled``, ``stopped``, ``reset``, ``closed``), :meth:`~VhostUserDevice.poll`,
:meth:`~VhostUserDevice.on_events`,
:meth:`~VhostUserDevice.config` and :meth:`~VhostUserDevice.set_config` stay on the server's
thread, and run only while every worker of the connection is *quiesced* (between two turns, held
off): they need no lock against ``handle``. So does a ``handle`` the server runs itself (a ring
being stopped or disabled is served once more first; rings without a kick fd are polled there).
The quiescing is per connection: state the devices of several connections share (a disk image,
counters) is reached by several connections' workers at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from virtio_schema.queue import VirtQueue
from virtio_schema.schema import Feature
from virtio_schema.vhost_user.messages import ProtocolFeature

__all__ = ["OFFERED_PROTOCOL_FEATURES", "VhostUserDevice"]

log = logging.getLogger(__name__)

OFFERED_PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)
"""Protocol features the back-end implements (a device may offer fewer:
:meth:`VhostUserDevice.protocol_features`)."""


class VhostUserDevice:
    """Base class of a device served by :class:`~virtio_schema.vhost_user.server.VhostUserServer`.

    Override :attr:`num_queues`, :meth:`device_features`, :meth:`config` and :meth:`handle`.
    """

    num_queues: int = 1
    """Queues the device has (reported by GET_QUEUE_NUM)."""

    worker_threads: bool = False
    """Serve each ring that runs with a kick fd on a worker thread of its own, which waits on the
    kick fd, runs :meth:`handle` and signals the call fd itself (see the module's "Threads"). Only
    for a device whose ``handle`` is safe to run for several rings at once; it pays where
    ``handle`` waits without holding the GIL (a disk, a socket), not for Python work (the GIL
    runs one thread at a time). Busy polling does not apply to the workers' rings. Read when a
    front-end connects."""

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
        """vhost-user protocol features the device wants offered (default: all the back-end
        implements, :data:`OFFERED_PROTOCOL_FEATURES`, but INFLIGHT_SHMFD). A device whose
        front-end keeps the configuration space itself (QEMU's virtio-net) leaves CONFIG out.

        INFLIGHT_SHMFD (a restarted device process takes again the requests its predecessor
        had taken and not completed) is for devices whose requests can be carried out twice
        (a block read or write): a device opts in by adding it."""
        return OFFERED_PROTOCOL_FEATURES & ~int(ProtocolFeature.INFLIGHT_SHMFD)

    writable_config: tuple[range, ...] = ()
    """Byte ranges of :meth:`config` the driver may write (SET_CONFIG). A write must lie inside
    one range; anything else is refused (vhost-user.rst: back-ends MUST NOT accept SET_CONFIG for
    read-only fields), except the front-end's own migration writes."""

    def config(self) -> bytes:
        """The device configuration space (GET_CONFIG reads from it; a read past its end fails)."""
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """``data`` was written at ``offset`` of the configuration space: by the driver, inside
        :attr:`writable_config`, or by the front-end restoring a migrated device (any field).
        Ignored by default."""
        log.info("SET_CONFIG offset=%d size=%d ignored", offset, len(data))

    config_notifier: Callable[[], None] | None = None
    """Set by the transport: what :meth:`config_changed` calls."""

    def config_changed(self) -> None:
        """Call this when the configuration space changed on the device's side (the disk grew):
        the front-end is sent a configuration change notification (the back-end request channel,
        ``VHOST_USER_PROTOCOL_F_BACKEND_REQ``) as soon as a ring has started, reads the space
        again and tells the driver. On a connection without that channel nothing is sent (the
        driver sees the new space only when it reads it again). With :attr:`worker_threads`,
        call it from the server's thread (:meth:`poll`, a hook): called from ``handle`` on a
        worker, the notification waits for the connection's next message or poll."""
        if self.config_notifier is not None:
            self.config_notifier()

    def handle(self, index: int, queue: VirtQueue) -> None:
        """Serve what is available on queue ``index``: called for each turn of a started and
        enabled ring (a kick, a poll, or more work after a spent budget). The queue hands out at
        most a budget of chains per turn (the queue size by default), then ``None``: the server
        gives every other queue and connection its turn, then calls this again. Notifications
        the queue raises during a turn are coalesced into one."""
        raise NotImplementedError

    def poll(self) -> None:
        """Called every :attr:`poll_interval` seconds while a front-end is connected."""

    def events_fd(self) -> int | None:
        """An fd of the device's own that the server watches while a front-end is connected
        (read when it connects; ``None``, the default: none): when it is readable the server
        calls :meth:`on_events` on its thread, with the connection quiesced like :meth:`poll`.
        For a device that talks to the outside world on sockets of its own (the vsock example's
        host connections): typically a :class:`selectors.EpollSelector`'s ``fileno()``, over
        exactly the sockets the device can serve now (level-triggered: an event the device
        cannot serve yet must be taken out of it, or the server calls again at once). One
        connection at a time may have it: a device shared by several connections refuses the
        second (the server closes that connection)."""
        return None

    def on_events(self) -> None:
        """:meth:`events_fd` is readable: serve what is ready without blocking."""

    def closed(self) -> None:
        """The front-end connection ended (after every ring stopped and its memory was
        released): what the device kept for that driver (its connections to the outside world)
        can go."""

    def started(self, index: int, queue: VirtQueue) -> None:
        """Ring ``index`` started (SET_VRING_KICK with memory and addresses known), or its queue
        was rebuilt (new memory table, new addresses). It may still be disabled: do not serve it
        before :meth:`enabled`."""

    def enabled(self, index: int, queue: VirtQueue) -> None:
        """Ring ``index`` is started and enabled: ``queue`` may be served until
        :meth:`disabled`. A device that keeps queues keeps them from here."""

    def disabled(self, index: int) -> None:
        """Ring ``index`` is no longer enabled (SET_VRING_ENABLE 0, a stop, a rebuild): drop
        its queue and write nothing more to it."""

    def reset(self) -> None:
        """The front-end reset the device (RESET_DEVICE), after every ring stopped: return what
        the driver configured (writable configuration fields, negotiated modes) to its initial
        state; the front-end sets the device up again from the start."""

    def stopped(self, index: int) -> None:
        """Ring ``index`` stopped (GET_VRING_BASE, reset, disconnect), or its queue is about to
        be rebuilt."""
