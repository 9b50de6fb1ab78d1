"""The errors a front-end causes (no imports from the rest of the transport, so every vhost-user
module can raise them)."""

from __future__ import annotations

from virtio_schema.errors import DriverError

__all__ = ["FrontendError", "RequestRefused"]


class FrontendError(DriverError):
    """The front-end sent a malformed or unexpected message (the connection is closed)."""


class RequestRefused(FrontendError):
    """A well-formed request the back-end does not honour; nothing changed. Answered with a
    non-zero ack when the front-end asked for one (REPLY_ACK), else the connection is closed."""
