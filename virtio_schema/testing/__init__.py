"""Test support for device authors: a QEMU guest harness (:mod:`virtio_schema.testing.qemu`)."""
