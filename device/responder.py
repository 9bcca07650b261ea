"""A tiny IPv4 host inside the guest: ARP, ICMP echo and UDP echo on port 7.

``Responder`` takes one received Ethernet frame and returns the reply frame,
or None. It replies to ARP requests for its address (RFC 826), to ICMP echo
requests (RFC 792) and to UDP datagrams for port 7, the echo service (RFC
862), by sending the datagram back to its source port. Headers are parsed with
``struct`` and every checksum is checked on input and computed on output
(RFC 1071). Fragments, IP options beyond the header length, VLAN tags and
IPv6 are not handled. Such frames are counted under a reason in ``ignored``
and get no reply.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
import struct

__all__ = [
    "Responder",
    "internet_checksum",
    "ETHERTYPE_ARP",
    "ETHERTYPE_IPV4",
    "ECHO_PORT",
]

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ECHO_PORT = 7
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ARP_REQUEST = 1
ARP_REPLY = 2
MIN_FRAME = 60
"""Shortest Ethernet frame without its FCS; shorter replies are padded."""
DEFAULT_TTL = 64
BROADCAST_MAC = b"\xff" * 6

_ETHERNET = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_ICMP_HEADER = struct.Struct("!BBH")
_UDP = struct.Struct("!HHHH")
_UDP_PSEUDO = struct.Struct("!4s4sBBH")


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """Return the RFC 1071 checksum of ``data``, padded with a zero byte if odd."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Responder:
    """The replies of one IPv4 host with ``mac`` and ``address``.

    ``answered`` counts replies by kind ("arp", "icmp-echo", "udp-echo") and
    ``ignored`` counts frames that got none, by reason.
    """

    def __init__(self, mac: bytes, address: str | ipaddress.IPv4Address) -> None:
        if len(mac) != 6:
            raise ValueError(f"invalid MAC address {mac.hex(':')}: expected 6 bytes")
        self.mac = bytes(mac)
        self.address = ipaddress.IPv4Address(address)
        self._ip = self.address.packed
        self.answered: collections.Counter[str] = collections.Counter()
        self.ignored: collections.Counter[str] = collections.Counter()
        self._ip_id = itertools.count()

    def respond(self, frame: bytes) -> bytes | None:
        """Return the reply to ``frame``, or None (counted in ``ignored``)."""
        if len(frame) < _ETHERNET.size:
            return self._ignore("frame-too-short")
        destination, source, ethertype = _ETHERNET.unpack_from(frame)
        if destination != self.mac and destination != BROADCAST_MAC:
            return self._ignore("other-destination-mac")
        if ethertype == ETHERTYPE_ARP:
            return self._arp(frame, source)
        if ethertype == ETHERTYPE_IPV4:
            return self._ipv4(frame, source)
        return self._ignore("other-ethertype")

    def _ignore(self, reason: str) -> None:
        self.ignored[reason] += 1
        return None

    # -- ARP ------------------------------------------------------------------

    def _arp(self, frame: bytes, source: bytes) -> bytes | None:
        if len(frame) < _ETHERNET.size + _ARP.size:
            return self._ignore("arp-too-short")
        fields = _ARP.unpack_from(frame, _ETHERNET.size)
        hardware, protocol, hardware_len, protocol_len, operation = fields[:5]
        sender_mac, sender_ip, _target_mac, target_ip = fields[5:]
        if (hardware, protocol, hardware_len, protocol_len) != (1, 0x0800, 6, 4):
            return self._ignore("arp-not-ethernet-ipv4")
        if operation != ARP_REQUEST:
            return self._ignore("arp-not-request")
        if target_ip != self._ip:
            return self._ignore("arp-other-target")
        reply = _ETHERNET.pack(sender_mac, self.mac, ETHERTYPE_ARP) + _ARP.pack(
            1, 0x0800, 6, 4, ARP_REPLY, self.mac, self._ip, sender_mac, sender_ip
        )
        self.answered["arp"] += 1
        return _pad(reply)

    # -- IPv4 -----------------------------------------------------------------

    def _ipv4(self, frame: bytes, source: bytes) -> bytes | None:
        start = _ETHERNET.size
        if len(frame) < start + _IPV4.size:
            return self._ignore("ipv4-too-short")
        fields = _IPV4.unpack_from(frame, start)
        version_ihl, _tos, total_len, _ident, fragment = fields[:5]
        _ttl, protocol, _checksum, sender, target = fields[5:]
        header_len = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or header_len < _IPV4.size:
            return self._ignore("ipv4-bad-header")
        if total_len < header_len or start + total_len > len(frame):
            return self._ignore("ipv4-bad-length")

        if internet_checksum(frame[start : start + header_len]):
            return self._ignore("ipv4-bad-checksum")
        if target != self._ip:
            return self._ignore("ipv4-other-destination")
        if fragment & 0x3FFF:
            # More-fragments set or a non-zero offset: reassembly is not done.
            return self._ignore("ipv4-fragment")

        payload = frame[start + header_len : start + total_len]
        if protocol == IPPROTO_ICMP:
            answer = self._icmp_echo(payload)
            kind = "icmp-echo"
        elif protocol == IPPROTO_UDP:
            answer = self._udp_echo(payload, sender)
            kind = "udp-echo"
        else:
            return self._ignore("ipv4-other-protocol")
        if answer is None:
            return None
        self.answered[kind] += 1
        return _pad(self._ipv4_frame(source, sender, protocol, answer))

    def _ipv4_frame(
        self, mac: bytes, destination: bytes, protocol: int, payload: bytes
    ) -> bytes:
        ident = next(self._ip_id) & 0xFFFF
        header = bytearray(
            _IPV4.pack(
                0x45,
                0,
                _IPV4.size + len(payload),
                ident,
                0,
                DEFAULT_TTL,
                protocol,
                0,
                self._ip,
                destination,
            )
        )
        struct.pack_into("!H", header, 10, internet_checksum(header))
        return _ETHERNET.pack(mac, self.mac, ETHERTYPE_IPV4) + bytes(header) + payload

    def _icmp_echo(self, message: bytes) -> bytes | None:
        if len(message) < 8:
            return self._ignore("icmp-too-short")
        kind, code, _checksum = _ICMP_HEADER.unpack_from(message)
        if kind != ICMP_ECHO_REQUEST or code != 0:
            return self._ignore("icmp-not-echo-request")
        if internet_checksum(message):
            return self._ignore("icmp-bad-checksum")
        reply = bytearray(message)
        reply[0] = ICMP_ECHO_REPLY
        reply[2:4] = b"\0\0"
        struct.pack_into("!H", reply, 2, internet_checksum(reply))
        return bytes(reply)

    def _udp_echo(self, datagram: bytes, sender: bytes) -> bytes | None:
        if len(datagram) < _UDP.size:
            return self._ignore("udp-too-short")
        source_port, destination_port, length, checksum = _UDP.unpack_from(datagram)
        if length < _UDP.size or length > len(datagram):
            return self._ignore("udp-bad-length")
        datagram = datagram[:length]
        # A checksum of 0 means the sender computed none (RFC 768).
        if checksum and _udp_checksum(sender, self._ip, datagram):
            return self._ignore("udp-bad-checksum")
        if destination_port != ECHO_PORT:
            return self._ignore("udp-other-port")
        reply = bytearray(_UDP.pack(ECHO_PORT, source_port, length, 0))
        reply += datagram[_UDP.size :]
        value = _udp_checksum(self._ip, sender, reply)
        # A computed 0 is sent as 0xFFFF, because 0 means "no checksum".
        struct.pack_into("!H", reply, 6, value or 0xFFFF)
        return bytes(reply)


def _udp_checksum(source: bytes, destination: bytes, datagram: bytes) -> int:
    pseudo = _UDP_PSEUDO.pack(source, destination, 0, IPPROTO_UDP, len(datagram))
    return internet_checksum(pseudo + bytes(datagram))


def _pad(frame: bytes) -> bytes:
    if len(frame) < MIN_FRAME:
        return frame + bytes(MIN_FRAME - len(frame))
    return frame
