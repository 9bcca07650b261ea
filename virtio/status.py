"""The device status field and its state machine (virtio 1.2, 2.1 and 3.1).

The driver moves the device through ACKNOWLEDGE, DRIVER, FEATURES_OK and
DRIVER_OK by writing the status field, always adding bits, and resets it by
writing 0. The device may add DEVICE_NEEDS_RESET on its own. The rules are the
table ``REQUIRED_BEFORE``; a write that breaks it raises
``StatusTransitionError`` naming both values.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from .errors import FeatureError, StatusTransitionError

__all__ = ["DeviceStatus", "REQUIRED_BEFORE", "StatusRegister"]


class DeviceStatus(enum.IntFlag):
    """Bits of the device status field (2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


REQUIRED_BEFORE: dict[DeviceStatus, DeviceStatus] = {
    DeviceStatus.ACKNOWLEDGE: DeviceStatus(0),
    DeviceStatus.DRIVER: DeviceStatus.ACKNOWLEDGE,
    DeviceStatus.FEATURES_OK: DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER,
    DeviceStatus.DRIVER_OK: DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER,
    DeviceStatus.FAILED: DeviceStatus(0),
}
"""For each bit the driver may set, the bits that must already be set.

DRIVER_OK additionally needs FEATURES_OK when VERSION_1 was negotiated; a
legacy driver never writes FEATURES_OK (3.1.2).
"""


_int_and = int.__and__
_DRIVER_OK = int(DeviceStatus.DRIVER_OK)


class StatusRegister:
    """The device status byte as the device holds it.

    ``write`` applies a driver write. ``validate_features`` is called when the
    driver sets FEATURES_OK; if it raises ``FeatureError`` the bit stays clear,
    which is how a device refuses a feature set (2.2.2).
    """

    def __init__(self) -> None:
        self.value = DeviceStatus(0)

    @property
    def driver_ok(self) -> bool:
        # int.__and__ skips IntFlag's operator, which costs about a
        # microsecond, because the device asks for every received frame.
        return _int_and(self.value, _DRIVER_OK) != 0

    @property
    def needs_reset(self) -> bool:
        return bool(self.value & DeviceStatus.DEVICE_NEEDS_RESET)

    def write(
        self,
        requested: int,
        *,
        modern: bool = True,
        validate_features: Callable[[], None] | None = None,
    ) -> DeviceStatus:
        """Apply a driver write of the status field and return the new value.

        Writing 0 resets. Raises ``StatusTransitionError`` when the write
        clears a bit without resetting, sets DEVICE_NEEDS_RESET, or sets a bit
        before the bits it needs.
        """
        current = self.value
        if requested == 0:
            self.value = DeviceStatus(0)
            return self.value
        self._check_transition(current, requested, modern)
        new = DeviceStatus(requested)
        added = new & ~current
        if added & DeviceStatus.FEATURES_OK and validate_features is not None:
            try:
                validate_features()
            except FeatureError:
                new &= ~DeviceStatus.FEATURES_OK
        if modern and added & DeviceStatus.DRIVER_OK:
            if not new & DeviceStatus.FEATURES_OK:
                raise StatusTransitionError(
                    current, requested, "DRIVER_OK needs FEATURES_OK, which was refused"
                )
        self.value = new | (current & DeviceStatus.DEVICE_NEEDS_RESET)
        return self.value

    def set_needs_reset(self) -> bool:
        """Set DEVICE_NEEDS_RESET; return True if it was not set before."""
        if self.needs_reset:
            return False
        self.value |= DeviceStatus.DEVICE_NEEDS_RESET
        return True

    @staticmethod
    def _check_transition(current: int, requested: int, modern: bool) -> None:
        device_only = DeviceStatus.DEVICE_NEEDS_RESET
        if (current & ~device_only) & ~requested:
            raise StatusTransitionError(
                current, requested, "bits can only be cleared by writing 0"
            )
        if requested & device_only and not current & device_only:
            raise StatusTransitionError(
                current, requested, "DEVICE_NEEDS_RESET is set by the device only"
            )
        unknown = requested & ~sum(DeviceStatus)
        if unknown:
            raise StatusTransitionError(
                current, requested, f"unknown bits {unknown:#x}"
            )
        for bit, needed in REQUIRED_BEFORE.items():
            if requested & bit and not current & bit:
                if modern and bit is DeviceStatus.DRIVER_OK:
                    needed |= DeviceStatus.FEATURES_OK
                if (requested & needed) != needed:
                    raise StatusTransitionError(
                        current, requested, f"{bit.name} needs {needed!r} first"
                    )
