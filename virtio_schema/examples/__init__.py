"""Example devices built on virtio_schema, short enough to read as documentation.

* :mod:`virtio_schema.examples.blk`: a virtio-blk device model over a disk-image file;
* :mod:`virtio_schema.examples.demo`: the main job: the blk device serving the fake driver.
"""
