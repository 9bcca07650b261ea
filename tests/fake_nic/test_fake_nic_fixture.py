"""The ``fake_nic`` pytest fixture on the loopback backend and on a TAP."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

import pytest

from backends import PcapBackend
from device.fake_nic import FakeNic
from device.responder import internet_checksum
from device.scenarios import make_frame

GUEST_IP = "192.0.2.2"
HOST_IP = "192.0.2.1"
SIOCGIFHWADDR = 0x8927  # linux/sockios.h


def udp_frame(
    destination_mac: bytes, source_mac: bytes, port: int, payload: bytes
) -> bytes:
    """Return an Ethernet frame of a UDP datagram from GUEST_IP to HOST_IP."""
    source = ipaddress.IPv4Address(GUEST_IP).packed
    destination = ipaddress.IPv4Address(HOST_IP).packed
    length = 8 + len(payload)
    pseudo = struct.pack("!4s4sBBH", source, destination, 0, 17, length)
    udp = struct.pack("!HHHH", 40000, port, length, 0) + payload
    udp = (
        udp[:6] + struct.pack("!H", internet_checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    )
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0, 64, 17, 0, source, destination
        )
    )
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return destination_mac + source_mac + b"\x08\x00" + bytes(header) + udp


def test_fixture_arp_goes_out(fake_nic) -> None:
    frame = bytes.fromhex("ffffffffffff525400123456" "0806") + bytes(46)
    fake_nic.send(frame)
    assert fake_nic.sent_frames() == [frame]
    assert fake_nic.stats["kicks"] >= 1


def test_fixture_frame_comes_in(fake_nic) -> None:
    frame = bytes.fromhex("525400123456" "020000000001" "0800") + bytes(46)
    fake_nic.inject(frame)
    assert fake_nic.received() == [frame]


def test_fixture_burst_in_order(fake_nic) -> None:
    frames = [make_frame(number) for number in range(600)]
    packets = fake_nic.send_many(frames)
    assert packets == list(range(600))
    assert fake_nic.sent_frames() == frames
    stats = fake_nic.stats
    assert stats["frames"] == 600
    assert stats["drops"] == {}
    assert stats["kicks"] < 600


def test_fixture_trace_records_steps(fake_nic) -> None:
    fake_nic.send(make_frame(0))
    steps = {record.step.name for record in fake_nic.trace.records}
    assert "XMIT_SKB" in steps
    assert "VM_EXIT" in steps


def test_fixture_sent_frames_needs_loopback(tmp_path) -> None:
    with FakeNic(PcapBackend(tmp_path / "out.pcap")) as nic:
        with pytest.raises(TypeError, match="loopback"):
            nic.sent_frames()


@pytest.mark.root
@pytest.mark.fake_nic_tap
def test_fixture_tap_frame_reaches_host(fake_nic) -> None:
    assert fake_nic.netns is not None
    receiver = fake_nic.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver:
        receiver.bind((HOST_IP, 5555))
        receiver.settimeout(2)
        tap_mac = bytes.fromhex(_tap_mac(fake_nic).replace(":", ""))
        fake_nic.send(udp_frame(tap_mac, fake_nic.mac, 5555, b"hello host"))
        data, (source, port) = receiver.recvfrom(2048)
    assert data == b"hello host"
    assert source == GUEST_IP
    assert port == 40000


@pytest.mark.root
@pytest.mark.parametrize("fake_nic", ["tap"], indirect=True)
def test_fixture_tap_frame_reaches_guest(fake_nic) -> None:
    sender = fake_nic.socket(socket.AF_PACKET, socket.SOCK_RAW)
    frame = fake_nic.mac + bytes.fromhex("020000000001") + b"\x88\xb5" + bytes(50)
    with sender:
        sender.bind((fake_nic.tap_name, 0))
        sender.send(frame)
    assert fake_nic.received(timeout=2.0) == [frame]
    assert fake_nic.stats["rx_frames"] == 1


def _tap_mac(fake_nic) -> str:
    """Return the TAP's MAC address, read with SIOCGIFHWADDR in its namespace."""
    probe = fake_nic.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe:
        request = struct.pack("256s", fake_nic.tap_name.encode())
        result = fcntl.ioctl(probe.fileno(), SIOCGIFHWADDR, request)
    return result[18:24].hex(":")
