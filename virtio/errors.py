"""Errors of the virtio core, split by blame.

``DriverError`` and its subclasses mean the *driver* (the guest, or whatever
wrote guest memory) broke a rule of the virtio specification. Each subclass
has a stable ``kind`` string that reports, replayable cases and statistics use
as a key, and carries the queue index, the ring or descriptor index and the
offending value as attributes. A device that sees one marks the queue broken
(virtio 1.2, 2.1.2) instead of retrying.

``DeviceError`` is the mirror image for the driver model: the *device* wrote a
used ring that a correct device cannot produce ("id 300 out of range").

``UsageError`` means the caller of this library misused its API (a queue size
that is not a power of two, adding used elements for a head that is not in
flight). It is a programming error on the host side, never guest-triggered.
"""

from __future__ import annotations

__all__ = [
    "VirtioError",
    "UsageError",
    "StatusTransitionError",
    "FeatureError",
    "MemoryAccessError",
    "DriverError",
    "AvailIndexJump",
    "HeadOutOfRange",
    "NextOutOfRange",
    "DescriptorLoop",
    "AddressOutOfRange",
    "BadIndirectTable",
    "NestedIndirect",
    "WriteBeforeRead",
    "TooManyInFlight",
    "RingOutOfRange",
    "ChainTooLarge",
    "DeviceError",
    "DRIVER_ERROR_KINDS",
]


class VirtioError(Exception):
    """Base class of every error this package raises."""


class UsageError(VirtioError):
    """The caller misused the API; nothing the guest did causes this."""


class StatusTransitionError(VirtioError):
    """A device status write that the status state machine does not allow."""

    def __init__(self, current: int, requested: int, reason: str) -> None:
        self.current = current
        self.requested = requested
        self.reason = reason
        super().__init__(
            f"invalid device status change from {current:#04x} to {requested:#04x}:"
            f" {reason}"
        )


class FeatureError(VirtioError):
    """The driver accepted a feature set the device cannot accept (2.2.2)."""

    def __init__(self, features: int, reason: str) -> None:
        self.features = features
        self.reason = reason
        super().__init__(f"invalid feature set {features:#x}: {reason}")


class MemoryAccessError(VirtioError):
    """An access to guest-physical memory fell outside every region."""

    def __init__(self, address: int, length: int, reason: str = "") -> None:
        self.address = address
        self.length = length
        detail = reason or "not inside guest memory"
        super().__init__(
            f"guest memory access at {address:#x} length {length:#x}: {detail}"
        )


class DriverError(VirtioError):
    """The driver broke a rule of the split ring; the queue is now broken.

    Attributes: ``queue`` (virtqueue index, or None when unknown), ``index``
    (the descriptor or ring index where the fault was seen) and ``value`` (the
    offending value).
    """

    kind = "driver-error"

    def __init__(
        self,
        message: str,
        *,
        queue: int | None = None,
        index: int | None = None,
        value: int | None = None,
    ) -> None:
        self.queue = queue
        self.index = index
        self.value = value
        self.detail = message
        where = "" if queue is None else f"queue {queue}: "
        super().__init__(f"{where}{message}")


class AvailIndexJump(DriverError):
    """avail.idx moved more than the queue size past the device's index."""

    kind = "avail-index-jump"


class HeadOutOfRange(DriverError):
    """An avail ring entry names a descriptor beyond the table."""

    kind = "head-out-of-range"


class NextOutOfRange(DriverError):
    """A descriptor's ``next`` field points beyond its table."""

    kind = "next-out-of-range"


class DescriptorLoop(DriverError):
    """A chain is longer than its table, which implies a loop."""

    kind = "descriptor-loop"


class AddressOutOfRange(DriverError):
    """A buffer (or indirect table) is not inside guest memory."""

    kind = "address-out-of-range"


class BadIndirectTable(DriverError):
    """An indirect table is empty, misaligned, not negotiated or also NEXT."""

    kind = "bad-indirect-table"


class NestedIndirect(DriverError):
    """An indirect table contains a descriptor that is itself INDIRECT."""

    kind = "nested-indirect"


class WriteBeforeRead(DriverError):
    """A device-readable descriptor follows a device-writable one (2.7.4.2)."""

    kind = "write-before-read"


class TooManyInFlight(DriverError):
    """In-flight plus newly available heads exceed the queue size."""

    kind = "too-many-in-flight"


class RingOutOfRange(DriverError):
    """The descriptor table or a ring does not fit in guest memory."""

    kind = "ring-out-of-range"


class ChainTooLarge(DriverError):
    """The lengths of one chain add up to more than 2**32 - 1 bytes (2.7.5.2)."""

    kind = "chain-too-large"


class DeviceError(VirtioError):
    """The device wrote a used ring entry that the driver model rejects."""

    def __init__(
        self, message: str, *, queue: int | None = None, value: int | None = None
    ) -> None:
        self.queue = queue
        self.value = value
        where = "" if queue is None else f"queue {queue}: "
        super().__init__(f"{where}{message}")


DRIVER_ERROR_KINDS: dict[str, type[DriverError]] = {
    cls.kind: cls
    for cls in (
        AvailIndexJump,
        HeadOutOfRange,
        NextOutOfRange,
        DescriptorLoop,
        AddressOutOfRange,
        BadIndirectTable,
        NestedIndirect,
        WriteBeforeRead,
        TooManyInFlight,
        RingOutOfRange,
        ChainTooLarge,
    )
}
"""Stable error kind name to class, as reports and case files spell them."""
