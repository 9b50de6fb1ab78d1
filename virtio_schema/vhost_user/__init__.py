"""vhost-user: serve a virtio device to a front-end (QEMU, DPDK virtio-user) over a unix socket.

A transport, kept outside the core layers: the core never imports it. Implement a
:class:`~virtio_schema.vhost_user.device.VhostUserDevice`, then::

    with VhostUserServer("/tmp/blk.sock", MyDevice) as server:
        server.serve_forever()

* :mod:`~virtio_schema.vhost_user.messages`: the message schemas and the trace decoder;
* :mod:`~virtio_schema.vhost_user.framing`: messages out of a byte stream (no I/O);
* :mod:`~virtio_schema.vhost_user.rings`: the ring states and their transitions, as a table;
* :mod:`~virtio_schema.vhost_user.backend`: the per-connection protocol core (no I/O);
* :mod:`~virtio_schema.vhost_user.host`: fd checks, sealed memory mappings, call signals;
* :mod:`~virtio_schema.vhost_user.server`: the non-blocking server around it all;
* :mod:`~virtio_schema.vhost_user.device`: what a device author implements.
"""

from virtio_schema.vhost_user.backend import Backend
from virtio_schema.vhost_user.device import VhostUserDevice
from virtio_schema.vhost_user.errors import FrontendError, RequestRefused
from virtio_schema.vhost_user.host import MemoryPolicy
from virtio_schema.vhost_user.server import ServerAddressInUse, VhostUserServer

__all__ = [
    "Backend",
    "FrontendError",
    "MemoryPolicy",
    "RequestRefused",
    "ServerAddressInUse",
    "VhostUserDevice",
    "VhostUserServer",
]
