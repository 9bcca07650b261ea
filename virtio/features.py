"""Transport feature bits (virtio 1.2, section 6) and feature negotiation.

Device types add their own bits (the virtio-net ones live in
``device.features``); negotiation here is generic: the driver may accept only
what the device offered, and every accepted feature must come with the
features it depends on (2.2.1 and 2.2.2).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from .errors import FeatureError

__all__ = [
    "VirtioFeature",
    "TRANSPORT_DEPENDENCIES",
    "validate_features",
    "usable_features",
    "bits",
]


class VirtioFeature(enum.IntFlag):
    """Reserved feature bits 24 to 41, named as in the spec without VIRTIO_F_."""

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    INDIRECT_DESC = 1 << 28  # VIRTIO_RING_F_INDIRECT_DESC
    EVENT_IDX = 1 << 29  # VIRTIO_RING_F_EVENT_IDX
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40


Requirement = int | tuple[int, ...]
"""What a feature needs: every bit of a mask, or any one mask of a tuple."""

TRANSPORT_DEPENDENCIES: Mapping[int, Requirement] = {}
"""Feature bit to what it requires; the transport bits have none."""


def bits(mask: int) -> list[int]:
    """Return the bit numbers set in ``mask``, lowest first."""
    return [bit for bit in range(mask.bit_length()) if mask >> bit & 1]


def validate_features(
    offered: int,
    accepted: int,
    dependencies: Mapping[int, int] = TRANSPORT_DEPENDENCIES,
) -> None:
    """Check a feature set the driver accepted against the offer.

    Raises ``FeatureError`` naming the first problem: a bit the device did not
    offer, or a feature whose required features are missing. A device that
    gets this error must leave FEATURES_OK clear (2.2.2).
    """
    unknown = accepted & ~offered
    if unknown:
        raise FeatureError(accepted, f"bits {bits(unknown)} were not offered")
    for feature, required in dependencies.items():
        if not accepted & feature:
            continue
        choices = required if isinstance(required, tuple) else (required,)
        if not any(accepted & choice == choice for choice in choices):
            wanted = " or ".join(str(bits(choice)) for choice in choices)
            raise FeatureError(
                accepted, f"bit {bits(feature)[0]} requires bits {wanted}"
            )


def _satisfied(features: int, required: Requirement) -> bool:
    choices = required if isinstance(required, tuple) else (required,)
    return any(features & choice == choice for choice in choices)


def usable_features(
    offered: int,
    accepted: int,
    dependencies: Mapping[int, Requirement] = TRANSPORT_DEPENDENCIES,
) -> int:
    """Return the largest valid part of ``accepted``.

    Bits that were not offered go, then every feature whose requirements are
    missing, until the set is stable. A device uses this for a legacy
    driver, which never writes FEATURES_OK and so cannot be refused (2.2.2).
    """
    features = accepted & offered
    changed = True
    while changed:
        changed = False
        for feature, required in dependencies.items():
            if features & feature and not _satisfied(features, required):
                features &= ~feature
                changed = True
    return features
