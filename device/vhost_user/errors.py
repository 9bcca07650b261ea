"""Errors of the vhost-user protocol layer, one class per kind of fault.

Every error here means the front-end sent something the back-end cannot
accept. The server logs it on one line, sends a failure reply when the message
asked for one, and closes the connection, because the byte stream or the
device state can no longer be trusted. Each error names the request (when
known) and the offending value.
"""

from __future__ import annotations

__all__ = [
    "DeviceRejectedError",
    "FdCountError",
    "FeatureNegotiationError",
    "HeaderError",
    "MemoryTableError",
    "PayloadSizeError",
    "QueueIndexError",
    "RingAddressError",
    "RingStateError",
    "UnknownRequestError",
    "UnsupportedRequestError",
    "VhostUserError",
]


class VhostUserError(Exception):
    """Base class: a front-end message the back-end rejects.

    ``request`` is the request name (``"SET_VRING_ADDR"``) or None when the
    header could not be decoded, and ``reason`` is the message without it.
    """

    kind = "vhost-user-error"

    def __init__(self, request: str | None, reason: str) -> None:
        self.request = request
        self.reason = reason
        prefix = f"{request}: " if request else ""
        super().__init__(f"{prefix}{reason}")


class HeaderError(VhostUserError):
    """The header has an unsupported version or invalid flag bits."""

    kind = "bad-header"


class UnknownRequestError(VhostUserError):
    """The request code is not a front-end request of the specification."""

    kind = "unknown-request"

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(None, f"unknown request code {code}")


class PayloadSizeError(VhostUserError):
    """The payload size does not match the layout of the request."""

    kind = "bad-payload-size"

    def __init__(self, request: str, size: int, expected: str) -> None:
        self.size = size
        super().__init__(
            request, f"payload size {size} is invalid, expected {expected}"
        )


class FdCountError(VhostUserError):
    """The message carries more or fewer file descriptors than it must."""

    kind = "bad-fd-count"

    def __init__(
        self, request: str | None, count: int | str, expected: int | str
    ) -> None:
        self.count = count
        self.expected = expected
        super().__init__(
            request, f"received {count} file descriptors, expected {expected}"
        )


class MemoryTableError(VhostUserError):
    """A memory region is empty, overlaps another, overflows or cannot be mapped."""

    kind = "bad-memory-table"


class RingAddressError(VhostUserError):
    """A ring address is in no memory region, is misaligned or does not fit."""

    kind = "bad-ring-address"

    def __init__(self, request: str, queue: int, reason: str) -> None:
        self.queue = queue
        super().__init__(request, f"queue {queue}: {reason}")


class QueueIndexError(VhostUserError):
    """A ring index is at or beyond the number of queues of the device."""

    kind = "queue-index-out-of-range"

    def __init__(self, request: str, index: int, num_queues: int) -> None:
        self.index = index
        self.num_queues = num_queues
        super().__init__(
            request,
            f"queue index {index} is out of range, the device has {num_queues} queues",
        )


class RingStateError(VhostUserError):
    """A ring value (size, base, enable) is invalid or not allowed in this state."""

    kind = "bad-ring-state"

    def __init__(self, request: str, queue: int, reason: str) -> None:
        self.queue = queue
        super().__init__(request, f"queue {queue}: {reason}")


class FeatureNegotiationError(VhostUserError):
    """The front-end acknowledged feature bits that the back-end did not offer."""

    kind = "bad-features"


class UnsupportedRequestError(VhostUserError):
    """A valid request that this back-end does not implement or did not offer."""

    kind = "unsupported-request"


class DeviceRejectedError(VhostUserError):
    """The device adapter raised while the back-end applied a request."""

    kind = "device-rejected"
