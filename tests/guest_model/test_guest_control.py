"""Control queue commands of the guest model and the filters they set."""

from __future__ import annotations

import struct

import pytest

from device.guest import VIRTIO_NET_ERR, VIRTIO_NET_OK, ControlTimeout
from device.machine import RX_QUEUE, Machine
from device.net_device import ANNOUNCE
from device.rx import RxResult

GUEST_MAC = bytes.fromhex("525400123456")
OTHER_MAC = bytes.fromhex("5254000000aa")
BROADCAST = b"\xff" * 6
MULTICAST = bytes.fromhex("01005e000001")


def frame_to(destination: bytes, vlan: int | None = None) -> bytes:
    source = bytes.fromhex("525400999999")
    if vlan is None:
        return destination + source + b"\x88\xb5" + bytes(46)
    tag = b"\x81\x00" + struct.pack("!H", vlan)
    return destination + source + tag + b"\x88\xb5" + bytes(42)


def filtered(machine: Machine) -> int:
    return machine.device.stats.queue(RX_QUEUE).drops["filtered"]


@pytest.fixture
def machine() -> Machine:
    return Machine(kick="direct")


def test_promiscuous_off_filters_other_unicast(machine: Machine) -> None:
    assert machine.control.set_rx_mode("promiscuous", False) == VIRTIO_NET_OK
    assert machine.device.filter.promiscuous is False
    assert machine.deliver_rx(frame_to(OTHER_MAC)) is RxResult.DROPPED
    assert machine.deliver_rx(frame_to(GUEST_MAC)) is RxResult.DELIVERED
    assert machine.deliver_rx(frame_to(BROADCAST)) is RxResult.DELIVERED
    assert filtered(machine) == 1


def test_no_broadcast_filters_broadcast(machine: Machine) -> None:
    machine.control.set_rx_mode("promiscuous", False)
    assert machine.control.set_rx_mode("no_broadcast", True) == VIRTIO_NET_OK
    assert machine.deliver_rx(frame_to(BROADCAST)) is RxResult.DROPPED


def test_all_multicast_accepts_any_group(machine: Machine) -> None:
    machine.control.set_rx_mode("promiscuous", False)
    assert machine.deliver_rx(frame_to(MULTICAST)) is RxResult.DROPPED
    assert machine.control.set_rx_mode("all_multicast", True) == VIRTIO_NET_OK
    assert machine.deliver_rx(frame_to(MULTICAST)) is RxResult.DELIVERED


def test_mac_table_sets_both_filter_tables(machine: Machine) -> None:
    machine.control.set_rx_mode("promiscuous", False)
    ack = machine.control.set_mac_table([OTHER_MAC], [MULTICAST])
    assert ack == VIRTIO_NET_OK
    assert machine.device.filter.unicast_table == [OTHER_MAC]
    assert machine.device.filter.multicast_table == [MULTICAST]
    assert machine.deliver_rx(frame_to(OTHER_MAC)) is RxResult.DELIVERED
    assert machine.deliver_rx(frame_to(MULTICAST)) is RxResult.DELIVERED


def test_mac_address_changes_device_mac(machine: Machine) -> None:
    machine.control.set_rx_mode("promiscuous", False)
    assert machine.control.set_mac_address(OTHER_MAC) == VIRTIO_NET_OK
    assert machine.device.mac == OTHER_MAC
    assert machine.device.read_config()[:6] == OTHER_MAC
    assert machine.deliver_rx(frame_to(OTHER_MAC)) is RxResult.DELIVERED
    assert machine.deliver_rx(frame_to(GUEST_MAC)) is RxResult.DROPPED


def test_vlan_add_and_del_set_the_vlan_filter(machine: Machine) -> None:
    machine.control.set_rx_mode("promiscuous", False)
    assert machine.device.filter.vlan_filtering is True
    assert machine.deliver_rx(frame_to(GUEST_MAC, vlan=5)) is RxResult.DROPPED
    assert machine.control.vlan_add(5) == VIRTIO_NET_OK
    assert machine.device.filter.vlans == {5}
    assert machine.deliver_rx(frame_to(GUEST_MAC, vlan=5)) is RxResult.DELIVERED
    assert machine.control.vlan_del(5) == VIRTIO_NET_OK
    assert machine.device.filter.vlans == set()
    assert machine.deliver_rx(frame_to(GUEST_MAC, vlan=5)) is RxResult.DROPPED


def test_vlan_id_over_4095_gets_err(machine: Machine) -> None:
    assert machine.control.vlan_add(4096) == VIRTIO_NET_ERR


def test_unknown_class_gets_err(machine: Machine) -> None:
    assert machine.control.command(99, 0) == VIRTIO_NET_ERR
    assert machine.guest.stats.control_commands == 1


def test_announce_is_acknowledged_by_config_work(machine: Machine) -> None:
    machine.device.announce()
    assert machine.device.link_status & ANNOUNCE
    machine.run()
    assert not machine.device.link_status & ANNOUNCE
    assert machine.guest.stats.config_interrupts == 1
    assert machine.guest.stats.control_commands == 1


def test_direct_announce_ack_gets_ok(machine: Machine) -> None:
    assert machine.control.announce_ack() == VIRTIO_NET_OK


def test_link_down_stops_transmit_until_link_up(machine: Machine) -> None:
    machine.device.set_link(False)
    machine.run()
    machine.send(frame_to(OTHER_MAC))
    machine.run()
    assert machine.guest.carrier is False
    assert len(machine.guest.qdisc) == 1
    machine.device.set_link(True)
    machine.run()
    assert len(machine.sent_frames()) == 1


def test_command_waits_for_a_deferred_kick() -> None:
    machine = Machine(kick="ioeventfd")
    assert machine.control.set_rx_mode("promiscuous", False) == VIRTIO_NET_OK
    assert machine.device.filter.promiscuous is False


def test_command_without_reply_times_out(machine: Machine) -> None:
    machine.kick.connect(lambda queue: None)
    with pytest.raises(ControlTimeout, match="class 0 command 0"):
        machine.control.set_rx_mode("promiscuous", False)


def test_bad_arguments_raise(machine: Machine) -> None:
    with pytest.raises(ValueError, match="unknown RX mode 'loud'"):
        machine.control.set_rx_mode("loud", True)
    with pytest.raises(ValueError, match="not 6 bytes"):
        machine.control.set_mac_address(b"\x01\x02")
    with pytest.raises(ValueError, match="too long"):
        machine.control.command(0, 0, bytes(0x2000))
