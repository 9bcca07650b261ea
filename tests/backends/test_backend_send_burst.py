"""``Backend.send_burst``: a run of frames, each one buffer of header and frame.

The contract (``backends.base``): the call returns ``(sent, status)``, the
first ``sent`` frames were taken, and when ``sent`` is short of the run,
``status`` is what ``send`` would return for ``frames[sent]`` and the frames
after it were not looked at. These tests check ``NullBackend`` and, in a
network namespace, ``TapBackend`` against it.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from backends import NullBackend, SendStatus, TapBackend, enter_namespace
from backends.base import send_each

HEADER = bytes(12)
ETH_P_LOCAL = 0x88B5
"""EtherType for local experiments (IEEE 802), which no protocol in the namespace handles."""
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def make_frame(number: int, length: int = 60) -> bytes:
    """Return an Ethernet frame of EtherType 88B5 to an unknown unicast MAC."""
    head = bytes.fromhex("020000000099" "020000000002") + ETH_P_LOCAL.to_bytes(2, "big")
    body = number.to_bytes(2, "big") + bytes((number + i) & 0xFF for i in range(2000))
    return (head + body)[:length]


def guest_buffers(packets: list[bytes]) -> list[memoryview]:
    """Return each packet as a view into one bytearray, like buffers in guest memory."""
    memory = bytearray(b"".join(packets))
    view = memoryview(memory)
    buffers = []
    offset = 0
    for packet in packets:
        buffers.append(view[offset : offset + len(packet)])
        offset += len(packet)
    return buffers


# -- send_each ---------------------------------------------------------------------


def test_send_each_stops_at_first_unsent() -> None:
    statuses = [SendStatus.SENT, SendStatus.SENT, SendStatus.BUSY, SendStatus.SENT]
    offered: list[bytes] = []

    def send_gather(buffers) -> SendStatus:
        offered.append(b"".join(buffers))
        return statuses[len(offered) - 1]

    frames = [bytes([n]) * 20 for n in range(4)]

    assert send_each(send_gather, frames) == (2, SendStatus.BUSY)
    assert offered == frames[:3]
    assert send_each(send_gather, []) == (0, SendStatus.SENT)


# -- NullBackend -------------------------------------------------------------------


def test_null_burst_counts_frames_and_bytes() -> None:
    backend = NullBackend()
    frames = [make_frame(n, 60 + n) for n in range(5)]
    buffers: list = guest_buffers([HEADER + frame for frame in frames])
    buffers[1] = bytes(buffers[1])
    buffers[3] = bytearray(buffers[3])

    assert backend.send_burst(buffers) == (5, SendStatus.SENT)

    assert backend.frames_sent == 5
    assert backend.bytes_sent == sum(map(len, frames))
    assert not backend.drops
    assert backend.send_busy == 0
    assert backend.sent_frames() == []


def test_null_burst_empty_run() -> None:
    backend = NullBackend()

    assert backend.send_burst([]) == (0, SendStatus.SENT)

    assert backend.frames_sent == 0
    assert backend.bytes_sent == 0


@pytest.mark.parametrize("status", [SendStatus.BUSY, SendStatus.DROPPED])
def test_null_burst_fault_stops_run(status: SendStatus) -> None:
    backend = NullBackend()
    backend.fail_sends(2, status, reason="injected")
    packets = [HEADER + make_frame(n) for n in range(3)]

    first = backend.send_burst(packets)

    # One fault per call: the frames after the failed one are not looked at.
    assert first == (0, status)
    assert backend.pending_faults == 1
    assert backend.frames_sent == 0
    if status is SendStatus.BUSY:
        assert backend.send_busy == 1
        assert not backend.drops
    else:
        assert backend.drops == {"injected": 1}

    assert backend.send_burst(packets) == (0, status)
    assert backend.pending_faults == 0
    assert backend.send_burst(packets) == (3, SendStatus.SENT)
    assert backend.frames_sent == 3
    assert backend.bytes_sent == 3 * 60


def test_null_burst_empty_frame_mid_run_dropped() -> None:
    backend = NullBackend()
    packets = [HEADER + make_frame(0), HEADER + make_frame(1, 70), HEADER]
    packets.append(HEADER + make_frame(3))

    assert backend.send_burst(guest_buffers(packets)) == (2, SendStatus.DROPPED)

    assert backend.drops == {"empty-frame": 1}
    assert backend.frames_sent == 2
    assert backend.bytes_sent == 60 + 70


def test_null_burst_frame_shorter_than_header_raises() -> None:
    backend = NullBackend()
    packets = [HEADER + make_frame(0), HEADER[:8], HEADER + make_frame(2)]

    with pytest.raises(ValueError, match="shorter than the 12-byte header"):
        backend.send_burst(packets)

    assert backend.frames_sent == 1
    assert backend.bytes_sent == 60


# -- TapBackend --------------------------------------------------------------------


@pytest.fixture
def tap(netns: str) -> Iterator[TapBackend]:
    backend = TapBackend("vneburst0", netns=netns)
    try:
        yield backend
    finally:
        backend.close()


def local_capture(netns: str, tap: TapBackend) -> socket.socket:
    """Return an AF_PACKET socket for every frame on the kernel side of ``tap``.

    It listens to all EtherTypes because the kernel hands a bridge port's
    frames to the bridge before the sockets of one EtherType see them.
    """
    with enter_namespace(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((tap.name, 0))
    return sock


@pytest.fixture
def capture(netns: str, tap: TapBackend) -> Iterator[socket.socket]:
    with local_capture(netns, tap) as sock:
        yield sock


def captured(sock: socket.socket, timeout: float = 0.5) -> list[bytes]:
    """Return the 88B5 frames the TAP's kernel side received, in order.

    Reads until ``timeout`` seconds pass without a frame.
    """
    frames = []
    while select.select([sock], [], [], timeout)[0]:
        data, address = sock.recvfrom(70000)
        outgoing = address[2] == PACKET_OUTGOING
        if not outgoing and data[12:14] == ETH_P_LOCAL.to_bytes(2, "big"):
            frames.append(data)
    return frames


@pytest.mark.root
def test_tap_burst_frames_reach_kernel_in_order(
    tap: TapBackend, capture: socket.socket
) -> None:
    frames = [make_frame(n, 60 + 50 * n) for n in range(6)]

    result = tap.send_burst(guest_buffers([HEADER + frame for frame in frames]))

    assert result == (6, SendStatus.SENT)
    assert captured(capture) == frames
    assert tap.frames_sent == 6
    assert tap.bytes_sent == sum(map(len, frames))
    assert not tap.drops


@pytest.mark.root
def test_tap_burst_empty_frame_stops_run(
    tap: TapBackend, capture: socket.socket
) -> None:
    frames = [make_frame(n) for n in range(4)]
    packets = [HEADER + frames[0], HEADER + frames[1], HEADER, HEADER + frames[3]]

    result = tap.send_burst(guest_buffers(packets))

    assert result == (2, SendStatus.DROPPED)
    assert tap.drops == {"empty-frame": 1}
    assert tap.frames_sent == 2
    assert tap.bytes_sent == 2 * 60
    assert captured(capture) == frames[:2]


@pytest.mark.root
def test_tap_burst_kernel_rejection_stops_run(
    tap: TapBackend, capture: socket.socket
) -> None:
    frames = [make_frame(n) for n in range(4)]
    # An unknown gso_type makes the kernel reject the write with EINVAL.
    bad_header = bytes([0, 0x55]) + bytes(10)
    packets = [HEADER + frames[0], bad_header + frames[1]]
    packets += [HEADER + frames[2], HEADER + frames[3]]

    result = tap.send_burst(guest_buffers(packets))

    assert result == (1, SendStatus.DROPPED)
    assert tap.drops == {"backend-rejected": 1}
    assert tap.frames_sent == 1
    assert tap.bytes_sent == 60
    assert captured(capture) == frames[:1]


@pytest.mark.root
def test_tap_burst_short_frame_raises(tap: TapBackend, capture: socket.socket) -> None:
    frames = [make_frame(n) for n in range(3)]
    packets = [HEADER + frames[0], HEADER[:8], HEADER + frames[2]]

    with pytest.raises(ValueError, match="shorter than the 12-byte header"):
        tap.send_burst(packets)

    assert tap.frames_sent == 1
    assert captured(capture) == frames[:1]


@pytest.mark.root
def test_tap_burst_full_send_buffer_busy(
    netns: str, bridged_tap: TapBackend, release_slow_qdisc: Callable[[], None]
) -> None:
    frames = [make_frame(n, 1000) for n in range(100)]
    packets = guest_buffers([HEADER + frame for frame in frames])
    with local_capture(netns, bridged_tap) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

        sent, status = bridged_tap.send_burst(packets)

        assert status is SendStatus.BUSY
        assert 1 <= sent < 100
        assert bridged_tap.send_busy == 1
        assert bridged_tap.frames_sent == sent
        assert bridged_tap.bytes_sent == sent * 1000
        assert not bridged_tap.drops
        assert captured(sock) == frames[:sent]

        release_slow_qdisc()
        poller = select.poll()
        poller.register(bridged_tap.writable_fileno(), select.POLLOUT)
        assert poller.poll(1000)
        # The rest of the run, offered again from the frame that was BUSY.
        position, end = sent, sent + 5
        deadline = time.monotonic() + 5
        while position < end:
            count, status = bridged_tap.send_burst(packets[position:end])
            position += count
            if status is SendStatus.BUSY:
                assert time.monotonic() < deadline, "the TAP stayed busy"
                poller.poll(100)
            else:
                assert status is SendStatus.SENT

        assert captured(sock) == frames[sent:end]
        assert bridged_tap.frames_sent == end
        assert not bridged_tap.drops
