"""virtio-net feature bits (virtio 1.2, 5.1.3), their dependencies and names.

``NetFeature`` holds the device-specific bits; the transport bits
(VERSION_1, EVENT_IDX, INDIRECT_DESC, ...) are ``virtio.VirtioFeature``.
``feature_from_name`` accepts every spelling a user may copy from the spec or
the Linux headers: ``VIRTIO_NET_F_MRG_RXBUF``, ``VIRTIO_F_EVENT_IDX``,
``VIRTIO_RING_F_EVENT_IDX``, or just ``MRG_RXBUF``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from virtio import VirtioFeature
from virtio.features import Requirement

__all__ = [
    "NetFeature",
    "NET_DEPENDENCIES",
    "DEFAULT_OFFER",
    "GUEST_OFFLOADS",
    "HOST_OFFLOADS",
    "feature_from_name",
    "features_from_names",
    "feature_names",
]


class NetFeature(enum.IntFlag):
    """Device feature bits of virtio-net, named as in the spec without the prefix."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GSO = 1 << 6
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    HASH_REPORT = 1 << 57
    GUEST_HDRLEN = 1 << 59
    RSS = 1 << 60
    RSC_EXT = 1 << 61
    STANDBY = 1 << 62
    SPEED_DUPLEX = 1 << 63


F = NetFeature
NET_DEPENDENCIES: Mapping[int, Requirement] = {
    F.GUEST_TSO4: F.GUEST_CSUM,
    F.GUEST_TSO6: F.GUEST_CSUM,
    F.GUEST_ECN: (F.GUEST_TSO4, F.GUEST_TSO6),
    F.GUEST_UFO: F.GUEST_CSUM,
    F.GUEST_USO4: F.GUEST_CSUM,
    F.GUEST_USO6: F.GUEST_CSUM,
    F.HOST_TSO4: F.CSUM,
    F.HOST_TSO6: F.CSUM,
    F.HOST_ECN: (F.HOST_TSO4, F.HOST_TSO6),
    F.HOST_UFO: F.CSUM,
    F.HOST_USO: F.CSUM,
    F.CTRL_RX: F.CTRL_VQ,
    F.CTRL_VLAN: F.CTRL_VQ,
    F.CTRL_RX_EXTRA: F.CTRL_RX,
    F.GUEST_ANNOUNCE: F.CTRL_VQ,
    F.MQ: F.CTRL_VQ,
    F.CTRL_MAC_ADDR: F.CTRL_VQ,
    F.CTRL_GUEST_OFFLOADS: F.CTRL_VQ,
    F.RSC_EXT: (F.HOST_TSO4, F.HOST_TSO6),
    F.RSS: F.CTRL_VQ,
}
"""Feature to the features it requires (5.1.3.1); a tuple means any one of."""

GUEST_OFFLOADS = F.GUEST_CSUM | F.GUEST_TSO4 | F.GUEST_TSO6 | F.GUEST_ECN | F.GUEST_UFO
"""Offloads of frames the device hands to the driver (RX)."""

HOST_OFFLOADS = F.CSUM | F.HOST_TSO4 | F.HOST_TSO6 | F.HOST_ECN | F.HOST_UFO
"""Offloads of frames the driver hands to the device (TX)."""

DEFAULT_OFFER = (
    VirtioFeature.VERSION_1
    | VirtioFeature.EVENT_IDX
    | VirtioFeature.INDIRECT_DESC
    | F.MAC
    | F.STATUS
    | F.MTU
    | F.MRG_RXBUF
    | GUEST_OFFLOADS
    | HOST_OFFLOADS
    | F.CTRL_VQ
    | F.CTRL_RX
    | F.CTRL_VLAN
    | F.CTRL_MAC_ADDR
    | F.GUEST_ANNOUNCE
)
"""What the device offers unless told otherwise."""

_PREFIXES = ("VIRTIO_NET_F_", "VIRTIO_RING_F_", "VIRTIO_F_")


def feature_from_name(name: str) -> int:
    """Return the bit mask of one feature name, in any common spelling.

    Raises ``ValueError`` naming the unknown name.
    """
    short = name.strip().upper()
    for prefix in _PREFIXES:
        if short.startswith(prefix):
            short = short[len(prefix) :]
            break
    for enum_class in (NetFeature, VirtioFeature):
        member = enum_class.__members__.get(short)
        if member is not None:
            return int(member)
    raise ValueError(f"unknown virtio-net feature name {name!r}")


def features_from_names(names: Iterable[str]) -> int:
    """Return the mask of several feature names."""
    mask = 0
    for name in names:
        mask |= feature_from_name(name)
    return mask


_SPEC_NAMES: dict[int, str] = {
    **{int(member): f"VIRTIO_F_{member.name}" for member in VirtioFeature},
    **{int(member): f"VIRTIO_NET_F_{member.name}" for member in NetFeature},
}


def feature_names(mask: int) -> list[str]:
    """Return the spec names of the bits in ``mask``, lowest bit first."""
    names = []
    for bit in range(64):
        value = 1 << bit
        if mask & value:
            names.append(_SPEC_NAMES.get(value, f"bit {bit}"))
    return names
