"""Example devices built on virtio_schema, short enough to read as documentation.

Each device is a module with a command line (``python -m virtio_schema.examples.NAME --help``),
served over vhost-user to a real driver:

* :mod:`virtio_schema.examples.blk`: virtio-blk over a disk-image file (Linux in QEMU);
* :mod:`virtio_schema.examples.rng`: virtio-rng, random bytes for the guest's ``/dev/hwrng``;
* :mod:`virtio_schema.examples.net`: virtio-net that reflects, sinks or sources frames (DPDK's
  virtio-user driver);
* :mod:`virtio_schema.examples.input`: a virtio-input keyboard that types into the guest;
* :mod:`virtio_schema.examples.vsock`: a virtio-vsock device: guest sockets bridged to host
  unix sockets.

and two that are not devices:

* :mod:`virtio_schema.examples.demo`: the main job, the blk device serving the library's fake
  driver (no transport, every byte verified);
* :mod:`virtio_schema.examples.serving`: the vhost-user server options every example's command
  line shares.

The examples are provisional API (``docs/api.rst``, "Which API is stable"): written to be read
and copied, they may change in any release.
"""

__all__: list[str] = []
