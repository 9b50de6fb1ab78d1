"""Test support for device authors (provisional API: ``docs/api.rst``, "Which API is stable").

* :mod:`virtio_schema.testing.qemu`: a Linux guest under QEMU against a vhost-user device;
* :mod:`virtio_schema.testing.process`: a back-end as a child process, ended by its PID;
* :mod:`virtio_schema.testing.frontend`: a vhost-user front-end over a real unix socket, the part
  QEMU plays, for tests and benchmarks;
* :mod:`virtio_schema.testing.fuzz`: a fuzz harness for both queue formats, raw ring memory plus
  device operations, checking the threat model's invariants.
"""

__all__: list[str] = []
