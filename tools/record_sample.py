"""Record the sample capture that ``virtio-net-emu run`` replays.

Two network namespaces joined by a veth pair (192.0.2.1 and 192.0.2.2) talk
for a moment while a packet socket on one end records every frame: ARP
resolution, an ICMP echo and its reply, a UDP datagram and its echo, and a
TCP handshake with a little data and the close. The frames are written to
``device/data/sample.pcap``. Needs root; the namespaces are removed at the
end, also on failure.

Usage: ``python tools/record_sample.py [OUTPUT]``
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from backends import PcapWriter, enter_namespace, network_namespace

LEFT = "192.0.2.1"
RIGHT = "192.0.2.2"
ETH_P_ALL = 0x0003


def _ip(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "-n", namespace, *args], check=True)


def _link_namespaces(left: str, right: str) -> None:
    subprocess.run(
        ["ip", "link", "add", "vne-rec0", "netns", left, "type", "veth",
         "peer", "name", "vne-rec1", "netns", right],
        check=True,
    )
    _ip(left, "address", "add", f"{LEFT}/24", "dev", "vne-rec0")
    _ip(right, "address", "add", f"{RIGHT}/24", "dev", "vne-rec1")
    for namespace, device in ((left, "vne-rec0"), (right, "vne-rec1")):
        _ip(namespace, "link", "set", "lo", "up")
        _ip(namespace, "link", "set", device, "up")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ping(address: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        raw.settimeout(2)
        payload = b"virtio-net-emu sample"
        header = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1)
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), 0x1234, 1)
        raw.sendto(packet + payload, (address, 0))
        raw.recvfrom(2048)


def _serve(right: str, ready: threading.Event) -> None:
    with enter_namespace(right):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((RIGHT, 7))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind((RIGHT, 8080))
        tcp.listen(1)
    ready.set()
    data, peer = udp.recvfrom(2048)
    udp.sendto(data, peer)
    connection, _ = tcp.accept()
    connection.sendall(connection.recv(2048))
    connection.close()
    udp.close()
    tcp.close()


def _talk(left: str) -> None:
    with enter_namespace(left):
        _ping(RIGHT)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(2)
        udp.sendto(b"hello over virtio", (RIGHT, 7))
        udp.recvfrom(2048)
        udp.close()
        tcp = socket.create_connection((RIGHT, 8080), timeout=2)
        tcp.sendall(b"GET / HTTP/1.0\r\n\r\n")
        tcp.recv(2048)
        tcp.close()


def record(output: Path) -> int:
    frames: list[tuple[float, bytes]] = []
    with network_namespace() as left, network_namespace() as right:
        _link_namespaces(left, right)
        with enter_namespace(left):
            sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                    socket.htons(ETH_P_ALL))
            sniffer.bind(("vne-rec0", 0))
            sniffer.settimeout(0.5)
        ready = threading.Event()
        server = threading.Thread(target=_serve, args=(right, ready), daemon=True)
        server.start()
        ready.wait(5)
        _talk(left)
        server.join(5)
        time.sleep(0.3)
        while True:
            try:
                frames.append((time.time(), sniffer.recv(65535)))
            except TimeoutError:
                break
        sniffer.close()
    with PcapWriter(str(output)) as writer:
        for timestamp, frame in frames:
            writer.write([frame], timestamp)
    return len(frames)


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "device" / "data" / "sample.pcap"
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"{record(target)} frames written to {target}")
