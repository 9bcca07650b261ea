"""Host-side clients for the fake NIC tests: ICMP echo over a raw socket and UDP echo.

Sockets are created inside the test's network namespace and used from the
calling thread afterwards; a socket keeps the namespace it was created in.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

from backends import enter_namespace

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0


def checksum(data: bytes) -> int:
    """Return the RFC 1071 checksum of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def namespace_socket(
    netns: str, family: int, kind: int, proto: int = 0
) -> socket.socket:
    with enter_namespace(netns):
        return socket.socket(family, kind, proto)


def ping(netns: str, address: str, count: int, timeout_s: float = 2.0) -> list[int]:
    """Send ``count`` ICMP echo requests; return the sequence numbers that got a reply.

    Each request waits for its reply (or the timeout) before the next goes.
    """
    sock = namespace_socket(netns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    answered = []
    with sock:
        for sequence in range(count):
            payload = struct.pack("!d", time.time()) + bytes(range(48))
            header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, sequence)
            value = checksum(header + payload)
            message = struct.pack(
                "!BBHHH", ICMP_ECHO_REQUEST, 0, value, ident, sequence
            )
            sock.sendto(message + payload, (address, 0))
            if _wait_echo_reply(sock, address, ident, sequence, payload, timeout_s):
                answered.append(sequence)
    return answered


def _wait_echo_reply(
    sock: socket.socket,
    address: str,
    ident: int,
    sequence: int,
    payload: bytes,
    timeout_s: float,
) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            return False
        packet, (source, _) = sock.recvfrom(65535)
        header_len = (packet[0] & 0x0F) * 4
        message = packet[header_len:]
        if source != address or len(message) < 8:
            continue
        kind, code, _, reply_ident, reply_sequence = struct.unpack_from(
            "!BBHHH", message
        )
        if (kind, code, reply_ident, reply_sequence) != (
            ICMP_ECHO_REPLY,
            0,
            ident,
            sequence,
        ):
            continue
        return checksum(message) == 0 and message[8:] == payload


def udp_echo(
    netns: str,
    address: str,
    port: int,
    count: int,
    window: int = 32,
    size: int = 64,
    timeout_s: float = 5.0,
) -> tuple[int, int, list[int]]:
    """Send ``count`` numbered datagrams, at most ``window`` unanswered at a time.

    Returns (sent, echoed byte for byte, numbers never echoed). Datagram 0
    is sent alone first, and again until echoed, so that ARP has resolved the
    address before the window opens (the kernel keeps only a few packets
    while it resolves).
    """
    sock = namespace_socket(netns, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.connect((address, port))
        _first_echo(sock, size, timeout_s)
        pending: set[int] = set()
        echoed = 0
        sent = 1
        deadline = time.monotonic() + timeout_s
        while (sent < count or pending) and time.monotonic() < deadline:
            while sent < count and len(pending) < window:
                sock.send(_datagram(sent, size))
                pending.add(sent)
                sent += 1
            ready, _, _ = select.select([sock], [], [], 0.5)
            if not ready:
                continue
            data = sock.recv(65535)
            number = struct.unpack_from("!I", data)[0]
            if data == _datagram(number, size) and number in pending:
                pending.discard(number)
                echoed += 1
                deadline = time.monotonic() + timeout_s
        return sent, echoed + 1, sorted(pending)


def _first_echo(sock: socket.socket, size: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.send(_datagram(0, size))
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready and sock.recv(65535) == _datagram(0, size):
            return
    raise TimeoutError("the first UDP datagram was never echoed")


def _datagram(number: int, size: int) -> bytes:
    body = bytes((number + i) & 0xFF for i in range(size - 4))
    return struct.pack("!I", number) + body
