"""The control virtqueue: RX mode, MAC tables, VLANs, announce (5.1.6.5).

Each request is a chain with a device-readable ``class, command`` pair and
its data, followed by one device-writable ack byte. The device writes
VIRTIO_NET_OK or VIRTIO_NET_ERR there; an unknown class or command, data of
the wrong size, or a command whose feature was not negotiated gets ERR.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

from .features import NetFeature
from .rx_filter import MAX_VLAN_ID, ReceiveFilter

__all__ = ["CtrlClass", "VIRTIO_NET_OK", "VIRTIO_NET_ERR", "ControlHandler"]

VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
MAC_TABLE_LIMIT = 64
"""Entries kept per MAC table; more switch the filter to all-uni/all-multi."""


class CtrlClass(enum.IntEnum):
    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5


_RX_MODES = {
    0: "promiscuous",
    1: "all_multicast",
    2: "all_unicast",
    3: "no_multicast",
    4: "no_unicast",
    5: "no_broadcast",
}
_MAC_TABLE_SET = 0
_MAC_ADDR_SET = 1
_VLAN_ADD = 0
_VLAN_DEL = 1
_ANNOUNCE_ACK = 0


class ControlHandler:
    """Applies control commands to the receive filter and device state."""

    def __init__(
        self,
        receive_filter: ReceiveFilter,
        features: int,
        *,
        on_mac: Callable[[bytes], None],
        on_announce_ack: Callable[[], None],
    ) -> None:
        self.filter = receive_filter
        self.features = features
        self.on_mac = on_mac
        self.on_announce_ack = on_announce_ack

    def handle(self, request: bytes) -> int:
        """Apply one request (class, command, data); return the ack value."""
        if len(request) < 2:
            return VIRTIO_NET_ERR
        ctrl_class, command, data = request[0], request[1], request[2:]
        handler = {
            CtrlClass.RX: self._rx,
            CtrlClass.MAC: self._mac,
            CtrlClass.VLAN: self._vlan,
            CtrlClass.ANNOUNCE: self._announce,
        }.get(ctrl_class)
        if handler is None:
            return VIRTIO_NET_ERR
        return VIRTIO_NET_OK if handler(command, data) else VIRTIO_NET_ERR

    def _has(self, feature: int) -> bool:
        return bool(self.features & feature)

    def _rx(self, command: int, data: bytes) -> bool:
        name = _RX_MODES.get(command)
        # All six modes are taken with CTRL_RX alone, as QEMU does; drivers
        # send the last four only after negotiating CTRL_RX_EXTRA.
        if name is None or len(data) != 1 or not self._has(NetFeature.CTRL_RX):
            return False
        setattr(self.filter, name, bool(data[0]))
        return True

    def _mac(self, command: int, data: bytes) -> bool:
        if command == _MAC_ADDR_SET:
            if len(data) != 6 or not self._has(NetFeature.CTRL_MAC_ADDR):
                return False
            self.filter.mac = bytes(data)
            self.on_mac(bytes(data))
            return True
        if command != _MAC_TABLE_SET or not self._has(NetFeature.CTRL_RX):
            return False
        tables = _parse_mac_tables(data)
        if tables is None:
            return False
        unicast, multicast = tables
        self.filter.unicast_table = unicast[:MAC_TABLE_LIMIT]
        self.filter.multicast_table = multicast[:MAC_TABLE_LIMIT]
        # A table too long to keep widens the filter instead of losing frames.
        self.filter.all_unicast |= len(unicast) > MAC_TABLE_LIMIT
        self.filter.all_multicast |= len(multicast) > MAC_TABLE_LIMIT
        return True

    def _vlan(self, command: int, data: bytes) -> bool:
        if len(data) != 2 or not self._has(NetFeature.CTRL_VLAN):
            return False
        vlan_id = struct.unpack("<H", data)[0]
        if vlan_id > MAX_VLAN_ID or command not in (_VLAN_ADD, _VLAN_DEL):
            return False
        if command == _VLAN_ADD:
            self.filter.vlans.add(vlan_id)
        else:
            self.filter.vlans.discard(vlan_id)
        return True

    def _announce(self, command: int, data: bytes) -> bool:
        if command != _ANNOUNCE_ACK or data or not self._has(NetFeature.GUEST_ANNOUNCE):
            return False
        self.on_announce_ack()
        return True


def _parse_mac_tables(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """Parse the two ``virtio_net_ctrl_mac`` tables; None when malformed."""
    tables = []
    offset = 0
    for _ in range(2):
        if offset + 4 > len(data):
            return None
        (count,) = struct.unpack_from("<I", data, offset)
        offset += 4
        end = offset + 6 * count
        if end > len(data):
            return None
        tables.append([bytes(data[i : i + 6]) for i in range(offset, end, 6)])
        offset = end
    if offset != len(data):
        return None
    return tables[0], tables[1]
