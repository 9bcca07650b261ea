"""``Backend.send_gather``: one frame as header and frame bytes in a row.

The TX path of the device passes a chain's buffers as they are. These tests
check that every backend treats them like ``send`` with the header split off.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from backends import (
    LoopbackBackend,
    NullBackend,
    SendStatus,
    TapBackend,
    enter_namespace,
)
from backends.base import split_header

HEADER = bytes(range(1, 13))
FRAME = bytes.fromhex("ffffffffffff020000000002 88b5") + bytes(range(50))


def pieces(data: bytes, *cuts: int) -> list[memoryview]:
    """Cut ``data`` into views at the given offsets."""
    view = memoryview(bytearray(data))
    bounds = [0, *cuts, len(data)]
    return [view[start:end] for start, end in zip(bounds, bounds[1:])]


@pytest.mark.parametrize(
    "cuts",
    [(), (12,), (5,), (5, 12, 20), (12, 12), (3, 7, 11, 40)],
    ids=["one", "header-alone", "header-split", "three", "empty-piece", "many"],
)
def test_split_header_any_boundaries(cuts: tuple[int, ...]) -> None:
    header, frame = split_header(pieces(HEADER + FRAME, *cuts), 12)
    assert header == HEADER
    assert b"".join(frame) == FRAME
    assert all(len(part) for part in frame)


def test_split_header_too_short_raises() -> None:
    with pytest.raises(ValueError, match="shorter than the 12-byte header"):
        split_header([b"\x00" * 7, b"\x00" * 4], 12)


def test_loopback_gather_matches_send() -> None:
    backend = LoopbackBackend()
    status = backend.send_gather(pieces(HEADER + FRAME, 4, 30))
    assert status is SendStatus.SENT
    assert backend.pop_sent() == (HEADER, FRAME)


def test_loopback_gather_echoes() -> None:
    backend = LoopbackBackend(echo=True)
    backend.send_gather(pieces(HEADER + FRAME, 12))
    assert backend.receive() == (HEADER, FRAME)


def test_null_gather_counts_frame_bytes() -> None:
    backend = NullBackend()
    assert backend.send_gather(pieces(HEADER + FRAME, 12)) is SendStatus.SENT
    assert backend.send_gather([HEADER + FRAME]) is SendStatus.SENT
    assert backend.frames_sent == 2
    assert backend.bytes_sent == 2 * len(FRAME)


def test_null_gather_empty_frame_dropped() -> None:
    backend = NullBackend()
    assert backend.send_gather([HEADER]) is SendStatus.DROPPED
    assert backend.drops == {"empty-frame": 1}
    assert backend.frames_sent == 0


def test_null_gather_short_header_raises() -> None:
    with pytest.raises(ValueError, match="shorter than the 12-byte header"):
        NullBackend().send_gather([HEADER[:8]])


def test_null_gather_applies_faults() -> None:
    backend = NullBackend()
    backend.fail_sends(1, SendStatus.BUSY)
    assert backend.send_gather([HEADER + FRAME]) is SendStatus.BUSY
    assert backend.send_busy == 1
    assert backend.send_gather([HEADER + FRAME]) is SendStatus.SENT


def test_null_send_counts_without_copy() -> None:
    backend = NullBackend()
    assert backend.send(HEADER, pieces(FRAME, 10)) is SendStatus.SENT
    assert backend.bytes_sent == len(FRAME)
    assert backend.sent_frames() == []


# TAP ------------------------------------------------------------------------


@pytest.fixture
def tap(netns: str) -> Iterator[TapBackend]:
    backend = TapBackend("vnegather0", netns=netns)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def capture(netns: str, tap: TapBackend) -> Iterator[socket.socket]:
    """An AF_PACKET socket for EtherType 88B5 on the kernel side of ``tap``."""
    with enter_namespace(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    with sock:
        sock.bind((tap.name, 0))
        sock.settimeout(2.0)
        yield sock


@pytest.mark.root
@pytest.mark.parametrize("cuts", [(), (12,), (5, 20)], ids=["one", "two", "three"])
def test_tap_gather_writes_frame(
    tap: TapBackend, capture: socket.socket, cuts: tuple[int, ...]
) -> None:
    status = tap.send_gather(pieces(bytes(12) + FRAME, *cuts))
    assert status is SendStatus.SENT
    assert capture.recv(2048) == FRAME
    assert tap.frames_sent == 1
    assert tap.bytes_sent == len(FRAME)


@pytest.mark.root
def test_tap_gather_empty_frame_dropped(tap: TapBackend) -> None:
    assert tap.send_gather([bytes(12)]) is SendStatus.DROPPED
    assert tap.drops == {"empty-frame": 1}


@pytest.mark.root
def test_tap_gather_short_header_raises(tap: TapBackend) -> None:
    with pytest.raises(ValueError, match="shorter than the 12-byte header"):
        tap.send_gather([bytes(8)])
