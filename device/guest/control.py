"""The guest's control queue: commands for RX mode, MACs, VLANs, announce.

Each command is one chain, as Linux's ``virtnet_send_command`` builds it: a
device-readable ``class, command`` pair, the command data, and one
device-writable status byte (virtio 1.2, 5.1.6.5). The driver kicks and
spins until the device has used the chain, then reads the status, which is
VIRTIO_NET_OK or VIRTIO_NET_ERR. The queue has no interrupt handler: Linux
creates it without a callback, so interrupts on it stay masked.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from virtio import DriverQueue, GuestMemory

from ..control import VIRTIO_NET_ERR, VIRTIO_NET_OK, CtrlClass
from .context import GuestContext

__all__ = [
    "ControlQueue",
    "ControlTimeout",
    "RX_MODES",
    "CONTROL_QUEUE",
    "CONTROL_AREA_BYTES",
    "VIRTIO_NET_OK",
    "VIRTIO_NET_ERR",
]

CONTROL_QUEUE = 2
CONTROL_AREA_BYTES = 0x2000
"""Guest memory for one command: the class and command, data and status."""
RX_MODES = {
    "promiscuous": 0,
    "all_multicast": 1,
    "all_unicast": 2,
    "no_multicast": 3,
    "no_unicast": 4,
    "no_broadcast": 5,
}
"""VIRTIO_NET_CTRL_RX command numbers by the receive filter field they set."""
MAC_TABLE_SET = 0
MAC_ADDR_SET = 1
VLAN_ADD = 0
VLAN_DEL = 1
ANNOUNCE_ACK = 0
MAX_SPINS = 1000
"""Rounds a command waits for its reply before ``ControlTimeout``."""
_PENDING = 0xFF


class ControlTimeout(RuntimeError):
    """The device did not use a control command's chain in time."""


class ControlQueue:
    """Sends control commands and returns the device's status byte."""

    def __init__(
        self, ctx: GuestContext, queue: DriverQueue, memory: GuestMemory, area: int
    ) -> None:
        self.ctx = ctx
        self.queue = queue
        self.memory = memory
        self.area = area
        # Linux creates the control queue without a callback.
        queue.disable_cb()

    def command(self, ctrl_class: int, command: int, data: bytes = b"") -> int:
        """Send one command and return the status the device wrote.

        Raises ``ValueError`` when ``data`` does not fit the command area and
        ``ControlTimeout`` when the device does not reply within
        ``MAX_SPINS`` rounds of spinning.
        """
        room = CONTROL_AREA_BYTES - 3
        if len(data) > room:
            raise ValueError(
                f"control data of {len(data)} bytes is too long: the limit is {room}"
            )
        ctx = self.ctx
        area = self.area
        status_addr = area + 2 + len(data)
        self.memory.write(
            area, bytes((ctrl_class, command)) + data + bytes((_PENDING,))
        )
        out = [(area, 2)]
        if data:
            out.append((area + 2, len(data)))
        self.queue.add_buf(out, [(status_addr, 1)], token=(ctrl_class, command))
        ctx.stats.control_commands += 1
        if self.queue.kick_prepare():
            ctx.packet = None
            ctx.notify(CONTROL_QUEUE)
        for _ in range(MAX_SPINS):
            if self.queue.get_buf() is not None:
                return self.memory.read(status_addr, 1)[0]
            ctx.charge(ctx.costs.control_spin or 1)
        raise ControlTimeout(
            f"control command class {ctrl_class} command {command} got no reply"
            f" after {MAX_SPINS} rounds; is the device running?"
        )

    def interrupt(self) -> None:
        """Count an interrupt the device sent anyway; nothing waits for it."""
        self.ctx.stats.control_interrupts += 1

    # -- commands -----------------------------------------------------------------

    def set_rx_mode(self, mode: str, enabled: bool) -> int:
        """Turn one receive mode on or off (``promiscuous``, ``all_multicast``, ...).

        Raises ``ValueError`` naming an unknown mode.
        """
        number = RX_MODES.get(mode)
        if number is None:
            names = ", ".join(RX_MODES)
            raise ValueError(f"unknown RX mode {mode!r}: use one of {names}")
        return self.command(CtrlClass.RX, number, bytes((int(enabled),)))

    def set_mac_table(
        self, unicast: Sequence[bytes], multicast: Sequence[bytes]
    ) -> int:
        """Replace the unicast and multicast MAC filter tables."""
        data = bytearray()
        for table in (unicast, multicast):
            data += struct.pack("<I", len(table))
            for mac in table:
                data += _mac_bytes(mac)
        return self.command(CtrlClass.MAC, MAC_TABLE_SET, bytes(data))

    def set_mac_address(self, mac: bytes) -> int:
        """Set the device's own MAC address (CTRL_MAC_ADDR)."""
        return self.command(CtrlClass.MAC, MAC_ADDR_SET, _mac_bytes(mac))

    def vlan_add(self, vlan_id: int) -> int:
        return self.command(CtrlClass.VLAN, VLAN_ADD, struct.pack("<H", vlan_id))

    def vlan_del(self, vlan_id: int) -> int:
        return self.command(CtrlClass.VLAN, VLAN_DEL, struct.pack("<H", vlan_id))

    def announce_ack(self) -> int:
        """Acknowledge a GUEST_ANNOUNCE request of the device."""
        return self.command(CtrlClass.ANNOUNCE, ANNOUNCE_ACK)


def _mac_bytes(mac: bytes) -> bytes:
    if len(mac) != 6:
        raise ValueError(f"MAC address {bytes(mac).hex(':')} is not 6 bytes long")
    return bytes(mac)
