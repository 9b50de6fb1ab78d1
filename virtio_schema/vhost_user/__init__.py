"""vhost-user: serve a virtio device to a front-end (QEMU, DPDK virtio-user) over a unix socket.

A transport, kept outside the core layers: the core never imports it. Implement a
:class:`~virtio_schema.vhost_user.device.VhostUserDevice`, then::

    server = VhostUserServer("/tmp/blk.sock", lambda: MyDevice())
    server.serve_forever()

* :mod:`~virtio_schema.vhost_user.messages`: the message schemas and the trace decoder;
* :mod:`~virtio_schema.vhost_user.backend`: the per-connection protocol state machine;
* :mod:`~virtio_schema.vhost_user.server`: sockets, fd passing, eventfds, the poll loop;
* :mod:`~virtio_schema.vhost_user.device`: what a device author implements.
"""

from virtio_schema.vhost_user.backend import Backend, EventfdNotify, FrontendError
from virtio_schema.vhost_user.device import VhostUserDevice
from virtio_schema.vhost_user.server import VhostUserServer

__all__ = ["Backend", "EventfdNotify", "FrontendError", "VhostUserDevice", "VhostUserServer"]
