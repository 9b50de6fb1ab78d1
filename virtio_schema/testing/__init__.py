"""Test support for device authors: a QEMU guest harness (:mod:`virtio_schema.testing.qemu`) and a
back-end as a child process, ended by its PID (:mod:`virtio_schema.testing.process`)."""
