"""TapBackend against real TAP interfaces inside a test namespace.

The TAP's kernel side has 192.0.2.1/24 and MAC 02:00:00:00:00:01. The test
plays the guest at 192.0.2.2 with MAC 02:00:00:00:00:02. Frames written with
``send`` are captured by an AF_PACKET socket inside the namespace, and frames
the kernel sends come out of ``receive``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from backends import (
    BackendError,
    NamespaceNotFoundError,
    SendStatus,
    TapBackend,
    delete_namespace,
    enter_namespace,
    namespace_exists,
    tun_offload_flags,
)
from backends.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
)

TAP_MAC = "02:00:00:00:00:01"
TAP_MAC_BYTES = bytes.fromhex("020000000001")
GUEST_MAC = bytes.fromhex("020000000002")
TAP_IP = "192.0.2.1"
GUEST_IP = "192.0.2.2"
BROADCAST_MAC = b"\xff" * 6
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
PACKET_OUTGOING = 4
NUD_PERMANENT = 0x80
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, ...
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
GUEST_CSUM = 1 << 1


# Frame builders ------------------------------------------------------------


def ethernet(
    destination: bytes, source: bytes, ethertype: int, payload: bytes
) -> bytes:
    return destination + source + struct.pack("!H", ethertype) + payload


def arp_request(sender_mac: bytes, sender_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1)
    body += sender_mac + socket.inet_aton(sender_ip)
    body += bytes(6) + socket.inet_aton(target_ip)
    return ethernet(BROADCAST_MAC, sender_mac, ETH_P_ARP, body)


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(
    destination_mac: bytes,
    source_ip: str,
    destination_ip: str,
    ports: tuple[int, int],
    payload: bytes,
) -> bytes:
    """Build an Ethernet/IPv4/UDP frame from the guest with valid checksums."""
    source, destination = socket.inet_aton(source_ip), socket.inet_aton(destination_ip)
    udp_length = 8 + len(payload)
    pseudo = source + destination + struct.pack("!BBH", 0, 17, udp_length)
    udp = struct.pack("!HHHH", ports[0], ports[1], udp_length, 0) + payload
    udp_checksum = internet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_checksum) + udp[8:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + udp_length, 1, 0, 64, 17, 0, source, destination
    )
    ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    return ethernet(destination_mac, GUEST_MAC, ETH_P_IP, ip + udp)


# Fixtures and helpers ------------------------------------------------------


@pytest.fixture
def tap(netns: str) -> Iterator[TapBackend]:
    backend = TapBackend(netns=netns, mac=TAP_MAC, mtu=1500, addresses=[f"{TAP_IP}/24"])
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def packet_socket(netns: str, tap: TapBackend) -> Iterator[socket.socket]:
    """An AF_PACKET socket on the kernel side of ``tap``."""
    with enter_namespace(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    with sock:
        sock.bind((tap.name, 0))
        yield sock


def ipr_in(netns: str) -> IPRoute:
    """An rtnetlink connection inside the namespace, which must exist."""
    return IPRoute(netns=netns, flags=0)


def udp_socket_in(netns: str) -> socket.socket:
    with enter_namespace(netns):
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def inbound_frames(sock: socket.socket, timeout: float) -> Iterator[bytes]:
    """Yield frames the kernel received on the socket's interface."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            return
        data, address = sock.recvfrom(70000)
        if address[2] != PACKET_OUTGOING:
            yield data


def capture(sock: socket.socket, expected: bytes, timeout: float = 2.0) -> bytes | None:
    """Return the first inbound frame equal to ``expected``, or None."""
    for frame in inbound_frames(sock, timeout):
        if frame == expected:
            return frame
    return None


def receive_matching(
    tap: TapBackend, match: Callable[[bytes], bool], timeout: float = 2.0
) -> tuple[bytes, bytes] | None:
    """Return the first received (header, frame) whose frame matches, or None."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        select.select([tap.fileno()], [], [], remaining)
        while (received := tap.receive()) is not None:
            if match(received[1]):
                return received
    return None


def drain(tap: TapBackend) -> None:
    while tap.receive() is not None:
        pass


def add_guest_neighbour(netns: str, tap: TapBackend) -> None:
    with ipr_in(netns) as ipr:
        ipr.neigh(
            "add",
            dst=GUEST_IP,
            lladdr=GUEST_MAC.hex(":"),
            ifindex=tap.ifindex,
            state=NUD_PERMANENT,
        )


def is_udp_to_guest(frame: bytes) -> bool:
    return (
        frame[:6] == GUEST_MAC
        and frame[12:14] == b"\x08\x00"
        and frame[30:34] == socket.inet_aton(GUEST_IP)
        and frame[23] == 17
    )


def link_info(netns: str, name: str) -> dict[str, Any] | None:
    with ipr_in(netns) as ipr:
        indexes = ipr.link_lookup(ifname=name)
        if not indexes:
            return None
        link = ipr.get_links(indexes[0])[0]
        addresses = [
            (a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=indexes[0])
        ]
        return {
            "address": link.get("address"),
            "mtu": link.get("mtu"),
            "up": bool(link["flags"] & 1),
            "addresses": addresses,
        }


# Offload flags (no root needed) --------------------------------------------


@pytest.mark.parametrize(
    ("features", "flags"),
    [
        (0, 0),
        (1 << 1, TUN_F_CSUM),
        (1 << 1 | 1 << 7, TUN_F_CSUM | TUN_F_TSO4),
        (1 << 1 | 1 << 8, TUN_F_CSUM | TUN_F_TSO6),
        (1 << 1 | 1 << 7 | 1 << 9, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN),
        (1 << 1 | 1 << 10, TUN_F_CSUM | TUN_F_UFO),
        (
            1 << 1 | 1 << 7 | 1 << 8 | 1 << 9 | 1 << 10,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO,
        ),
        # Feature bits that are not guest offloads are ignored.
        (1 << 0 | 1 << 5 | 1 << 15 | 1 << 32, 0),
    ],
)
def test_offload_flags_mapping(features: int, flags: int) -> None:
    assert tun_offload_flags(features) == flags


@pytest.mark.parametrize(
    "features",
    [1 << 7, 1 << 8, 1 << 10, 1 << 1 | 1 << 9, 1 << 9],
    ids=["tso4-no-csum", "tso6-no-csum", "ufo-no-csum", "ecn-no-tso", "ecn-alone"],
)
def test_offload_flags_invalid_combination(features: int) -> None:
    with pytest.raises(ValueError, match="require"):
        tun_offload_flags(features)


def test_missing_tun_device(tmp_path: Path) -> None:
    missing = tmp_path / "tun"
    with pytest.raises(BackendError) as info:
        TapBackend(tun_path=str(missing), up=False)
    assert info.value.errno == errno.ENOENT
    assert str(missing) in str(info.value)
    assert "modprobe tun" in str(info.value)


def test_missing_namespace() -> None:
    with pytest.raises(NamespaceNotFoundError) as info:
        TapBackend(netns="vne-missing-namespace")
    assert info.value.name == "vne-missing-namespace"


def test_invalid_interface_name() -> None:
    with pytest.raises(ValueError, match="interface name"):
        TapBackend("a-name-longer-than-15")


def test_attach_needs_name() -> None:
    with pytest.raises(ValueError, match="attach"):
        TapBackend(attach=True)


# Sending -------------------------------------------------------------------


@pytest.mark.root
def test_send_arp_request_captured(
    tap: TapBackend, packet_socket: socket.socket
) -> None:
    frame = arp_request(GUEST_MAC, GUEST_IP, TAP_IP)

    status = tap.send(bytes(12), [frame])

    assert status is SendStatus.SENT
    assert capture(packet_socket, frame) == frame
    assert tap.frames_sent == 1
    assert tap.bytes_sent == len(frame)
    assert not tap.drops


@pytest.mark.root
@pytest.mark.parametrize("header_size", [10, 12, 20])
def test_send_udp_reaches_socket(netns: str, header_size: int) -> None:
    payload = b"virtio-net-emu %d" % header_size
    frame = udp_frame(TAP_MAC_BYTES, GUEST_IP, TAP_IP, (40000, 5000), payload)
    with (
        TapBackend(
            netns=netns,
            mac=TAP_MAC,
            addresses=[f"{TAP_IP}/24"],
            header_size=header_size,
        ) as tap,
        udp_socket_in(netns) as receiver,
    ):
        receiver.bind((TAP_IP, 5000))
        receiver.settimeout(2.0)

        status = tap.send(bytes(header_size), [frame])
        data, source = receiver.recvfrom(2048)

    assert status is SendStatus.SENT
    assert data == payload
    assert source == (GUEST_IP, 40000)


@pytest.mark.root
def test_send_split_buffers_one_frame(
    tap: TapBackend, packet_socket: socket.socket
) -> None:
    frame = udp_frame(TAP_MAC_BYTES, GUEST_IP, TAP_IP, (40000, 5001), bytes(range(200)))
    guest_memory = memoryview(bytearray(frame))
    buffers = [guest_memory[:14], guest_memory[14:34], guest_memory[34:]]

    status = tap.send(memoryview(bytearray(12)), buffers)

    assert status is SendStatus.SENT
    assert capture(packet_socket, frame) == frame
    assert tap.bytes_sent == len(frame)


@pytest.mark.root
def test_zero_length_frame_not_written(
    tap: TapBackend, packet_socket: socket.socket
) -> None:
    status = tap.send(bytes(12), [b"", memoryview(b"")])

    assert status is SendStatus.DROPPED
    assert tap.drops == {"empty-frame": 1}
    assert tap.frames_sent == 0
    assert list(inbound_frames(packet_socket, 0.3)) == []


@pytest.mark.root
def test_short_frame_rejected(tap: TapBackend) -> None:
    frame = arp_request(GUEST_MAC, GUEST_IP, TAP_IP)[:13]

    status = tap.send(bytes(12), [frame])

    # The kernel returns EINVAL for a TAP frame shorter than an Ethernet header.
    assert status is SendStatus.DROPPED
    assert tap.drops == {"backend-rejected": 1}
    assert tap.frames_sent == 0


@pytest.mark.root
def test_bad_gso_type_rejected(tap: TapBackend) -> None:
    frame = arp_request(GUEST_MAC, GUEST_IP, TAP_IP)
    header = VIRTIO_NET_HDR.pack(0, 0x55, 0, 0, 0, 0, 0)

    status = tap.send(header, [frame])

    assert status is SendStatus.DROPPED
    assert tap.drops == {"backend-rejected": 1}


@pytest.mark.root
def test_hdr_len_beyond_frame_rejected(tap: TapBackend) -> None:
    frame = arp_request(GUEST_MAC, GUEST_IP, TAP_IP)
    header = VIRTIO_NET_HDR.pack(0, 0, 5000, 0, 0, 0, 0)

    status = tap.send(header, [frame])

    assert status is SendStatus.DROPPED
    assert tap.drops == {"backend-rejected": 1}


@pytest.mark.root
def test_header_size_mismatch_raises(tap: TapBackend) -> None:
    with pytest.raises(ValueError, match="header of 10 bytes"):
        tap.send(bytes(10), [arp_request(GUEST_MAC, GUEST_IP, TAP_IP)])


@pytest.mark.root
def test_interface_down_drops_io_error(netns: str, tap: TapBackend) -> None:
    frame = arp_request(GUEST_MAC, GUEST_IP, TAP_IP)
    with ipr_in(netns) as ipr:
        ipr.link("set", index=tap.ifindex, state="down")

    down_status = tap.send(bytes(12), [frame])
    down_receive = tap.receive()

    with ipr_in(netns) as ipr:
        ipr.link("set", index=tap.ifindex, state="up")
    up_status = tap.send(bytes(12), [frame])

    # The kernel returns EIO for writes while the interface is down.
    assert down_status is SendStatus.DROPPED
    assert down_receive is None
    assert tap.drops == {"backend-io-error": 1}
    assert up_status is SendStatus.SENT


@pytest.mark.root
def test_interface_deleted_drops_gone(netns: str, tap: TapBackend) -> None:
    frame = arp_request(GUEST_MAC, GUEST_IP, TAP_IP)
    with ipr_in(netns) as ipr:
        ipr.link("del", index=tap.ifindex)

    status = tap.send(bytes(12), [frame])
    poller = select.poll()
    poller.register(tap.fileno(), select.POLLIN | select.POLLOUT)
    events = dict(poller.poll(0))

    # The kernel returns EBADFD for the descriptor of a deleted TAP.
    assert status is SendStatus.DROPPED
    assert tap.drops == {"backend-gone": 1}
    assert events[tap.fileno()] & select.POLLERR
    with pytest.raises(BackendError) as info:
        tap.receive()
    assert info.value.errno == errno.EBADFD
    assert "deleted" in str(info.value)


@pytest.mark.root
def test_namespace_deleted_tap_still_works(netns: str, tap: TapBackend) -> None:
    delete_namespace(netns)

    status = tap.send(bytes(12), [arp_request(GUEST_MAC, GUEST_IP, TAP_IP)])
    reply = receive_matching(tap, lambda frame: frame[12:14] == b"\x08\x06")

    # The open descriptor keeps the namespace alive after its name is gone, so
    # the kernel still replies to the ARP request.
    assert not namespace_exists(netns)
    assert status is SendStatus.SENT
    assert reply is not None
    assert reply[1][:6] == GUEST_MAC
    assert reply[1][20:22] == b"\x00\x02"  # ARP reply


@pytest.mark.root
def test_send_after_close_dropped(tap: TapBackend) -> None:
    tap.close()

    status = tap.send(bytes(12), [arp_request(GUEST_MAC, GUEST_IP, TAP_IP)])

    assert status is SendStatus.DROPPED
    assert tap.drops == {"backend-gone": 1}
    with pytest.raises(BackendError) as info:
        tap.receive()
    assert info.value.errno == errno.EBADF


@pytest.mark.root
def test_full_send_buffer_busy(
    bridged_tap: TapBackend, release_slow_qdisc: Callable[[], None]
) -> None:
    # A unicast frame to an unknown MAC, which the bridge floods to the veth.
    frame = ethernet(bytes.fromhex("020000000099"), GUEST_MAC, ETH_P_ARP, bytes(1000))
    statuses = []
    for _ in range(100):
        statuses.append(bridged_tap.send(bytes(12), [frame]))
        if statuses[-1] is SendStatus.BUSY:
            break
    poller = select.poll()
    poller.register(bridged_tap.writable_fileno(), select.POLLOUT)
    writable_while_full = poller.poll(0)

    release_slow_qdisc()  # frees the queued frames
    writable_after = poller.poll(1000)
    retry = bridged_tap.send(bytes(12), [frame])

    sent = statuses.count(SendStatus.SENT)
    assert statuses[-1] is SendStatus.BUSY
    assert 1 <= sent < 100
    assert bridged_tap.send_busy == 1
    assert bridged_tap.frames_sent == sent + 1
    assert not bridged_tap.drops
    assert writable_while_full == []
    assert len(writable_after) == 1
    assert writable_after[0][1] & select.POLLOUT
    assert retry is SendStatus.SENT


# Receiving -----------------------------------------------------------------


@pytest.mark.root
def test_receive_none_when_idle(tap: TapBackend) -> None:
    drain(tap)

    assert tap.receive() is None


@pytest.mark.root
def test_receive_udp_from_kernel(netns: str, tap: TapBackend) -> None:
    add_guest_neighbour(netns, tap)
    drain(tap)
    with udp_socket_in(netns) as sender:
        sender.sendto(b"from the kernel", (GUEST_IP, 9))

        received = receive_matching(tap, is_udp_to_guest)

    assert received is not None
    header, frame = received
    assert header == bytes(12)
    assert frame[6:12] == TAP_MAC_BYTES
    assert frame[26:30] == socket.inet_aton(TAP_IP)
    assert frame[-15:] == b"from the kernel"
    assert tap.frames_received >= 1
    assert tap.bytes_received >= len(frame)


@pytest.mark.root
def test_unread_frames_dropped_by_kernel(netns: str, tap: TapBackend) -> None:
    add_guest_neighbour(netns, tap)
    drain(tap)
    with ipr_in(netns) as ipr:
        ipr.link("set", index=tap.ifindex, txqlen=4)
    with udp_socket_in(netns) as sender:
        for index in range(20):
            sender.sendto(b"datagram %d" % index, (GUEST_IP, 9))

    received = []
    while (frame := tap.receive()) is not None:
        received.append(frame)
    with ipr_in(netns) as ipr:
        counters = ipr.get_links(tap.ifindex)[0].get("stats64")

    # A reader that falls behind loses frames in the kernel: the TAP's queue
    # contains txqueuelen frames and the kernel counts the rest in tx_dropped.
    assert len(received) == 4
    assert counters["tx_dropped"] == 16
    assert not tap.drops


@pytest.mark.root
def test_receive_guest_csum_partial(netns: str) -> None:
    with TapBackend(
        netns=netns, mac=TAP_MAC, addresses=[f"{TAP_IP}/24"], offloads=GUEST_CSUM
    ) as tap:
        add_guest_neighbour(netns, tap)
        with udp_socket_in(netns) as sender:
            sender.sendto(b"partial checksum", (GUEST_IP, 9))
            received = receive_matching(tap, is_udp_to_guest)

    assert received is not None
    flags, gso_type, _, _, csum_start, csum_offset, _ = VIRTIO_NET_HDR.unpack(
        received[0]
    )
    # With GUEST_CSUM the kernel leaves the UDP checksum to the guest.
    assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert gso_type == 0
    assert csum_start == 34
    assert csum_offset == 6


@pytest.mark.root
def test_receive_oversized_frame_counted(netns: str) -> None:
    with TapBackend(
        netns=netns,
        mac=TAP_MAC,
        mtu=1500,
        addresses=[f"{TAP_IP}/24"],
        max_frame_size=1000,
    ) as tap:
        add_guest_neighbour(netns, tap)
        drain(tap)
        with udp_socket_in(netns) as sender:
            sender.sendto(bytes(1200), (GUEST_IP, 9))
            sender.sendto(b"small", (GUEST_IP, 9))
            received = receive_matching(tap, is_udp_to_guest)

        assert tap.drops == {"receive-truncated": 1}
    assert received is not None
    assert received[1].endswith(b"small")


# Creating, attaching, closing ----------------------------------------------


@pytest.mark.root
def test_configuration_applied(netns: str, tap: TapBackend) -> None:
    info = link_info(netns, tap.name)

    assert info is not None
    assert info["address"] == TAP_MAC
    assert info["mtu"] == 1500
    assert info["up"] is True
    assert (TAP_IP, 24) in info["addresses"]
    assert tap.created is True
    assert tap.name.startswith("vnetap")


@pytest.mark.root
def test_close_deletes_created_interface(netns: str) -> None:
    tap = TapBackend(netns=netns)
    name = tap.name
    before = link_info(netns, name)

    tap.close()
    tap.close()

    assert before is not None
    assert link_info(netns, name) is None


@pytest.mark.root
def test_attach_existing_tap_keeps_it(netns: str) -> None:
    with ipr_in(netns) as ipr:
        ipr.link("add", ifname="vnepersist0", kind="tuntap", mode="tap")
    with TapBackend("vnepersist0", netns=netns, attach=True) as tap:
        status = tap.send(bytes(12), [arp_request(GUEST_MAC, GUEST_IP, TAP_IP)])
        created = tap.created

    assert created is False
    assert status is SendStatus.SENT
    assert link_info(netns, "vnepersist0") is not None


@pytest.mark.root
def test_attach_missing_interface(netns: str) -> None:
    with pytest.raises(BackendError) as info:
        TapBackend("vnenothere0", netns=netns, attach=True)

    assert "not found" in str(info.value)
    assert "vnenothere0" in str(info.value)


@pytest.mark.root
def test_create_existing_name_busy(netns: str) -> None:
    with TapBackend("vnetapdup", netns=netns):
        with pytest.raises(BackendError) as info:
            TapBackend("vnetapdup", netns=netns)

    assert info.value.errno == errno.EBUSY
    assert "attach=True" in str(info.value)


@pytest.mark.root
def test_attach_non_tap_interface(netns: str) -> None:
    with pytest.raises(BackendError) as info:
        TapBackend("lo", netns=netns, attach=True)

    assert info.value.errno == errno.EINVAL
    assert "not a TAP" in str(info.value)


@pytest.mark.root
def test_invalid_header_size(tap: TapBackend) -> None:
    with pytest.raises(ValueError, match="virtio_net_hdr size 11"):
        tap.configure(11)


@pytest.mark.root
def test_invalid_mtu_closes_tap(netns: str) -> None:
    with pytest.raises(BackendError) as info:
        TapBackend("vnetapmtu", netns=netns, mtu=1_000_000)

    assert "vnetapmtu" in str(info.value)
    assert "mtu" in str(info.value)
    assert link_info(netns, "vnetapmtu") is None


@pytest.mark.root
def test_without_cap_net_admin(netns: str) -> None:
    # setpriv drops CAP_NET_ADMIN from the bounding set, so the child runs as
    # root without it.
    script = (
        "import sys, backends\n"
        "try:\n"
        "    backends.TapBackend(netns=sys.argv[1])\n"
        "except backends.BackendError as exc:\n"
        "    print(exc.errno)\n"
        "    print(exc)\n"
    )
    command = ["setpriv", "--bounding-set=-net_admin", sys.executable, "-c", script]
    try:
        result = subprocess.run(
            [*command, netns], capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        pytest.skip("setpriv (util-linux) is not installed")

    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[0] == str(errno.EPERM)
    assert "CAP_NET_ADMIN" in lines[1]


@pytest.mark.root
def test_repr_names_interface(tap: TapBackend) -> None:
    assert tap.name in repr(tap)
    assert os.path.basename(str(tap.netns)) in repr(tap)
