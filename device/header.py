"""The virtio_net_hdr in front of every frame (virtio 1.2, 5.1.6).

The header is 12 bytes when VERSION_1 or MRG_RXBUF is negotiated (the
num_buffers field is then always present) and 10 bytes for a legacy driver
without MRG_RXBUF (5.1.6.1); HASH_REPORT would make it 20, but this device
does not offer that feature. Fields are little-endian.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from virtio import VirtioFeature

from .features import NetFeature

__all__ = [
    "HeaderFlags",
    "GsoType",
    "NetHeader",
    "header_size",
    "ZERO_HEADER_12",
    "MAX_FRAME_SIZE",
    "check_tx_header",
    "exceeds_mtu",
    "complete_checksum",
]

MAX_FRAME_SIZE = 65550
"""Largest frame a TX chain may carry: 65535 + 14 + 1 of slack, as QEMU allows."""


class HeaderFlags(enum.IntFlag):
    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class GsoType(enum.IntEnum):
    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


GSO_ECN = 0x80

_FORMAT_10 = struct.Struct("<BBHHHH")
_FORMAT_12 = struct.Struct("<BBHHHHH")
ZERO_HEADER_12 = bytes(12)


def header_size(features: int) -> int:
    """Return the header length the negotiated ``features`` imply."""
    if features & (VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF):
        return 12
    return 10


@dataclass
class NetHeader:
    """The fields of one virtio_net_hdr."""

    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> NetHeader:
        """Parse 10 or 12 (or more) header bytes."""
        if len(data) >= 12:
            return cls(*_FORMAT_12.unpack_from(data))
        return cls(*_FORMAT_10.unpack_from(data))

    def pack(self, size: int = 12) -> bytes:
        """Encode the header in ``size`` (10 or 12) bytes."""
        if size == 10:
            return _FORMAT_10.pack(
                self.flags,
                self.gso_type,
                self.hdr_len,
                self.gso_size,
                self.csum_start,
                self.csum_offset,
            )
        return _FORMAT_12.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )


_GSO_FEATURE = {
    GsoType.TCPV4: NetFeature.HOST_TSO4,
    GsoType.TCPV6: NetFeature.HOST_TSO6,
    GsoType.UDP: NetFeature.HOST_UFO,
    GsoType.UDP_L4: NetFeature.HOST_USO,
}


def check_tx_header(header: NetHeader, frame_len: int, features: int) -> str | None:
    """Return a drop reason for a TX header the device cannot honour, or None.

    Unknown flag bits, and flags the driver may not set on TX (DATA_VALID,
    RSC_INFO), are ignored (5.1.6.2.2); so are num_buffers and hdr_len,
    which the device never relies on. A checksum request that points outside
    the frame, or a GSO type without its negotiated feature, without
    NEEDS_CSUM or with gso_size 0 are driver errors without a device rule:
    the frame is dropped under ``bad-csum-offset`` or ``bad-gso``.
    """
    if header.flags & HeaderFlags.NEEDS_CSUM and features & NetFeature.CSUM:
        if header.csum_start + header.csum_offset + 2 > frame_len:
            return "bad-csum-offset"
    gso = header.gso_type & ~GSO_ECN
    if gso == GsoType.NONE:
        return None
    needed = _GSO_FEATURE.get(gso)
    if needed is None or not features & needed:
        return "bad-gso"
    if header.gso_type & GSO_ECN and not features & NetFeature.HOST_ECN:
        return "bad-gso"
    if not header.flags & HeaderFlags.NEEDS_CSUM or header.gso_size == 0:
        return "bad-gso"
    return None


ETHERNET_HEADER = 14
VLAN_TAG = 4
_VLAN_TPIDS = (b"\x81\x00", b"\x88\xa8")


def exceeds_mtu(
    parts: list[bytes] | list[memoryview], frame_len: int, mtu: int
) -> bool:
    """Tell whether a frame is longer than ``mtu`` plus its Ethernet header.

    This is the limit of 5.1.4.1 and 5.1.4.2 for frames with gso_type NONE
    (or only ECN) once VIRTIO_NET_F_MTU is negotiated. The header is 14
    bytes, or 18 when the frame carries an 802.1Q or 802.1ad tag, because a
    VLAN device on the guest uses the same MTU with the tag in the frame.
    ``parts`` are the frame's buffers in order and ``frame_len`` their total.
    """
    if frame_len <= mtu + ETHERNET_HEADER:
        return False
    if frame_len > mtu + ETHERNET_HEADER + VLAN_TAG:
        return True
    head = bytearray()
    for part in parts:
        head += part[: ETHERNET_HEADER - len(head)]
        if len(head) == ETHERNET_HEADER:
            break
    return bytes(head[12:14]) not in _VLAN_TPIDS


def complete_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> None:
    """Fill in a partial checksum the way a NIC does for NEEDS_CSUM.

    The 16-bit ones' complement sum of ``frame[csum_start:]`` (which already
    includes the pseudo-header sum the driver stored in the checksum field) is
    written at ``csum_start + csum_offset``. Used when the backend cannot take
    the header (pcap, loopback) so the frame on the wire is correct.
    """
    data = frame[csum_start:]
    if len(data) % 2:
        data = data + b"\0"
    total = sum(memoryview(bytes(data)).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    checksum = ~total & 0xFFFF
    struct.pack_into("=H", frame, csum_start + csum_offset, checksum)
