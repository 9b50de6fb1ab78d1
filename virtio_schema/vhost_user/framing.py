"""vhost-user message framing from a byte stream, without I/O: a message may arrive in any pieces.

Theory of operation. The server reads a non-blocking socket whenever it is readable and feeds
:class:`MessageReader` what arrived (bytes and the fds that came with them); the reader keeps a
partial message across reads and hands out each message once it is whole. :meth:`~MessageReader.want`
says how many bytes finish the current part (the header, then the payload), so the server never
reads past a message boundary: the fds of a read then belong to the message being assembled
(front-ends send a message's fds with its first bytes).

Rules of this module:

1. A payload size above :data:`~virtio_schema.vhost_user.messages.MAX_PAYLOAD` or more than
   :data:`~virtio_schema.vhost_user.messages.MAX_FDS` fds for one message is a
   :class:`~virtio_schema.vhost_user.backend.FrontendError` before anything more is read.
2. The reader owns the fds of the partial message until it hands the message out;
   :meth:`~MessageReader.discard` gives them back for closing when the connection ends.
"""

from __future__ import annotations

from typing import NamedTuple

from virtio_schema.errors import DeviceUsageError
from virtio_schema.vhost_user.errors import FrontendError
from virtio_schema.vhost_user.messages import HEADER, MAX_FDS, MAX_PAYLOAD, HeaderRec

__all__ = ["Message", "MessageReader"]


class Message(NamedTuple):
    """One whole message from the front-end."""

    request: int
    flags: int
    payload: bytes
    fds: list[int]


class MessageReader:
    """Assembles messages from pieces of a stream (see the module's theory of operation)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: HeaderRec | None = None
        self._fds: list[int] = []

    @property
    def partial(self) -> bool:
        """Part of a message (bytes or fds) has arrived, not all of it."""
        return bool(self._buf) or self._header is not None or bool(self._fds)

    def progress(self) -> tuple[int, int]:
        """``(bytes received, bytes expected)`` of the part being assembled (the header, then
        the payload)."""
        if self._header is None:
            return len(self._buf), HEADER.size
        return len(self._buf), self._header.size

    def want(self) -> int:
        """How many bytes finish the current part (at least 1)."""
        if self._header is None:
            return HEADER.size - len(self._buf)
        return max(1, self._header.size - len(self._buf))

    def feed(self, data: bytes, fds: list[int]) -> Message | None:
        """Take ``data`` (at most :meth:`want` bytes) and the fds that came with it; the message
        if it is now whole. Raises :class:`~virtio_schema.vhost_user.backend.FrontendError` (the fds are kept for
        :meth:`discard`)."""
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise FrontendError(f"{len(self._fds)} fds with one message (at most {MAX_FDS})")
        if len(data) > self.want():
            raise DeviceUsageError(f"fed {len(data)} bytes, want {self.want()}")
        self._buf += data
        if self._header is None:
            if len(self._buf) < HEADER.size:
                return None
            self._header = HEADER.unpack(bytes(self._buf))
            self._buf.clear()
            if self._header.size > MAX_PAYLOAD:
                raise FrontendError(
                    f"payload size {self._header.size} (request {self._header.request}) too large"
                )
        if len(self._buf) < self._header.size:
            return None
        message = Message(self._header.request, self._header.flags, bytes(self._buf), self._fds)
        self._header, self._fds = None, []
        self._buf.clear()
        return message

    def discard(self) -> list[int]:
        """Forget the partial message; its fds, for the caller to close."""
        fds, self._fds = self._fds, []
        self._header = None
        self._buf.clear()
        return fds
