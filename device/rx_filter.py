"""Receive filtering by MAC address, broadcast, multicast, promiscuous and VLAN.

The state is what the driver sets through the control queue (virtio 1.2,
5.1.6.5.1 and 5.1.6.5.3): the RX mode flags, the unicast and multicast MAC
tables and the VLAN filter. After a reset the device is promiscuous, as QEMU
is, because a driver without CTRL_RX cannot change the mode and must still
receive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ReceiveFilter", "BROADCAST", "MAX_VLAN_ID"]

BROADCAST = b"\xff" * 6
MAX_VLAN_ID = 4095
_TPID_8021Q = b"\x81\x00"
ETHERNET_HEADER = 14


@dataclass
class ReceiveFilter:
    """Which received frames the driver wants."""

    mac: bytes = b"\x52\x54\x00\x12\x34\x56"
    promiscuous: bool = True
    all_multicast: bool = False
    all_unicast: bool = False
    no_multicast: bool = False
    no_unicast: bool = False
    no_broadcast: bool = False
    unicast_table: list[bytes] = field(default_factory=list)
    multicast_table: list[bytes] = field(default_factory=list)
    vlan_filtering: bool = False
    vlans: set[int] = field(default_factory=set)

    def accepts(self, frame: bytes | memoryview) -> bool:
        """Tell whether a received Ethernet frame passes the filter."""
        if self.promiscuous:
            return True
        if len(frame) < ETHERNET_HEADER:
            # Without a whole Ethernet header there is no address to match.
            return False
        if self.vlan_filtering and bytes(frame[12:14]) == _TPID_8021Q:
            vlan_id = int.from_bytes(frame[14:16], "big") & MAX_VLAN_ID
            if vlan_id not in self.vlans:
                return False
        destination = bytes(frame[:6])
        if destination[0] & 1:
            return self._accepts_group(destination)
        return self._accepts_unicast(destination)

    def _accepts_group(self, destination: bytes) -> bool:
        if destination == BROADCAST:
            return not self.no_broadcast
        if self.no_multicast:
            return False
        return self.all_multicast or destination in self.multicast_table

    def _accepts_unicast(self, destination: bytes) -> bool:
        if self.no_unicast:
            return False
        if self.all_unicast or destination == self.mac:
            return True
        return destination in self.unicast_table
