"""The guest-side responder: ARP, ICMP echo and UDP echo, with checksums."""

from __future__ import annotations

import struct

import pytest

from device.responder import Responder, internet_checksum

MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("020000000001")
ADDRESS = bytes([192, 0, 2, 2])
PEER = bytes([192, 0, 2, 1])


def ipv4(
    protocol: int, payload: bytes, *, fragment: int = 0, destination: bytes = ADDRESS
) -> bytes:
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            7,
            fragment,
            64,
            protocol,
            0,
            PEER,
            destination,
        )
    )
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return MAC + PEER_MAC + b"\x08\x00" + bytes(header) + payload


def echo_request(payload: bytes = b"abcdefgh") -> bytes:
    message = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, 5) + payload)
    struct.pack_into("!H", message, 2, internet_checksum(message))
    return bytes(message)


def udp(port: int, payload: bytes, checksum: bool = True) -> bytes:
    datagram = bytearray(
        struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    )
    if checksum:
        pseudo = struct.pack("!4s4sBBH", PEER, ADDRESS, 0, 17, len(datagram))
        struct.pack_into(
            "!H", datagram, 6, internet_checksum(pseudo + datagram) or 0xFFFF
        )
    return bytes(datagram)


@pytest.fixture
def responder() -> Responder:
    return Responder(MAC, "192.0.2.2")


def test_responder_answers_arp(responder: Responder) -> None:
    request = (
        b"\xff" * 6
        + PEER_MAC
        + b"\x08\x06"
        + struct.pack(
            "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, PEER_MAC, PEER, bytes(6), ADDRESS
        )
    )
    reply = responder.respond(request)
    assert reply is not None
    assert len(reply) == 60
    assert reply[:12] == PEER_MAC + MAC
    fields = struct.unpack_from("!HHBBH6s4s6s4s", reply, 14)
    assert fields == (1, 0x0800, 6, 4, 2, MAC, ADDRESS, PEER_MAC, PEER)


def test_responder_ignores_arp_for_others(responder: Responder) -> None:
    request = (
        b"\xff" * 6
        + PEER_MAC
        + b"\x08\x06"
        + struct.pack(
            "!HHBBH6s4s6s4s",
            1,
            0x0800,
            6,
            4,
            1,
            PEER_MAC,
            PEER,
            bytes(6),
            bytes([192, 0, 2, 9]),
        )
    )
    assert responder.respond(request) is None
    assert responder.ignored == {"arp-other-target": 1}


def test_responder_answers_ping(responder: Responder) -> None:
    reply = responder.respond(ipv4(1, echo_request()))
    assert reply is not None
    assert reply[:12] == PEER_MAC + MAC
    header = reply[14:34]
    assert internet_checksum(header) == 0
    assert header[12:16] == ADDRESS
    assert header[16:20] == PEER
    total_length = struct.unpack_from("!H", header, 2)[0]
    message = reply[34 : 14 + total_length]
    assert message[0] == 0
    assert internet_checksum(message) == 0
    assert message[4:] == echo_request()[4:]


def test_responder_ignores_bad_icmp_checksum(responder: Responder) -> None:
    message = bytearray(echo_request())
    message[-1] ^= 0xFF
    assert responder.respond(ipv4(1, bytes(message))) is None
    assert responder.ignored == {"icmp-bad-checksum": 1}


def test_responder_echoes_udp(responder: Responder) -> None:
    reply = responder.respond(ipv4(17, udp(7, b"payload!")))
    assert reply is not None
    total_length = struct.unpack_from("!H", reply, 16)[0]
    datagram = reply[34 : 14 + total_length]
    source_port, destination_port, length, _ = struct.unpack_from("!HHHH", datagram)
    assert (source_port, destination_port, length) == (7, 40000, 16)
    assert datagram[8:] == b"payload!"
    pseudo = struct.pack("!4s4sBBH", ADDRESS, PEER, 0, 17, len(datagram))
    assert internet_checksum(pseudo + datagram) == 0


def test_responder_echoes_udp_without_checksum(responder: Responder) -> None:
    reply = responder.respond(ipv4(17, udp(7, b"x", checksum=False)))
    assert reply is not None
    assert reply[42:43] == b"x"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (ipv4(17, udp(9, b"x")), "udp-other-port"),
        (ipv4(17, udp(7, b"x"), fragment=0x2000), "ipv4-fragment"),
        (
            ipv4(1, echo_request(), destination=bytes([192, 0, 2, 9])),
            "ipv4-other-destination",
        ),
        (ipv4(6, bytes(20)), "ipv4-other-protocol"),
        (PEER_MAC + MAC + b"\x08\x00" + bytes(46), "other-destination-mac"),
        (MAC + PEER_MAC + b"\x86\xdd" + bytes(46), "other-ethertype"),
        (MAC + PEER_MAC, "frame-too-short"),
    ],
)
def test_responder_ignores(responder: Responder, frame: bytes, reason: str) -> None:
    assert responder.respond(frame) is None
    assert responder.ignored == {reason: 1}


def test_responder_ignores_bad_udp_checksum(responder: Responder) -> None:
    datagram = bytearray(udp(7, b"abcd"))
    datagram[-1] ^= 1
    assert responder.respond(ipv4(17, bytes(datagram))) is None
    assert responder.ignored == {"udp-bad-checksum": 1}
