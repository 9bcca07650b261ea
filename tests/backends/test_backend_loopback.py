"""LoopbackBackend and NullBackend: storage, echo, injection and faults."""

from __future__ import annotations

import pytest

from backends import LoopbackBackend, NullBackend, SendStatus

HEADER = bytes(12)
FRAME = bytes.fromhex("ffffffffffff0200000000020806") + bytes(28)


def test_sent_frames_stored_in_order() -> None:
    backend = LoopbackBackend()
    frames = [FRAME, FRAME + b"\x01", FRAME + b"\x02"]

    statuses = [backend.send(HEADER, [frame]) for frame in frames]

    assert statuses == [SendStatus.SENT] * 3
    assert backend.sent_frames() == frames
    assert backend.sent_frames() == frames  # reading does not remove
    assert backend.frames_sent == 3
    assert backend.bytes_sent == sum(map(len, frames))


def test_pop_sent_returns_header_and_frame() -> None:
    backend = LoopbackBackend()
    header = bytes([1, 0, 0, 0, 34, 0, 6, 0, 0, 0, 1, 0])
    backend.send(header, [FRAME[:10], FRAME[10:]])

    first = backend.pop_sent()
    second = backend.pop_sent()

    assert first == (header, FRAME)
    assert second is None
    assert backend.sent_frames() == []


def test_send_copies_guest_buffers() -> None:
    backend = LoopbackBackend()
    guest_memory = bytearray(FRAME)
    header_memory = bytearray(12)
    backend.send(memoryview(header_memory), [memoryview(guest_memory)])

    guest_memory[:6] = b"\x00" * 6
    header_memory[0] = 0xFF

    assert backend.pop_sent() == (HEADER, FRAME)


def test_capacity_evicts_oldest() -> None:
    backend = LoopbackBackend(capacity=2)
    for index in range(5):
        backend.send(HEADER, [FRAME + bytes([index])])

    assert backend.sent_frames() == [FRAME + b"\x03", FRAME + b"\x04"]
    assert backend.frames_evicted == 3
    assert backend.frames_sent == 5


def test_inject_then_receive() -> None:
    backend = LoopbackBackend()
    header = bytes(range(12))
    backend.inject(FRAME)
    backend.inject(memoryview(FRAME + b"\x01"), header=header)

    first = backend.receive()
    second = backend.receive()
    third = backend.receive()

    assert first == (HEADER, FRAME)
    assert second == (header, FRAME + b"\x01")
    assert third is None
    assert backend.frames_received == 2
    assert backend.bytes_received == 2 * len(FRAME) + 1


def test_inject_header_size_checked() -> None:
    backend = LoopbackBackend(header_size=10)

    with pytest.raises(ValueError, match="header of 12 bytes"):
        backend.inject(FRAME, header=HEADER)


def test_inject_full_queue_raises() -> None:
    backend = LoopbackBackend(capacity=1)
    backend.inject(FRAME)

    with pytest.raises(OverflowError, match="receive queue full"):
        backend.inject(FRAME)


def test_echo_returns_sent_frames() -> None:
    backend = LoopbackBackend(echo=True)
    header = bytes([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0])

    backend.send(header, [FRAME[:20], FRAME[20:]])
    received = backend.receive()

    assert received == (header, FRAME)
    assert backend.sent_frames() == [FRAME]
    assert backend.receive() is None


def test_echo_full_queue_drops() -> None:
    backend = LoopbackBackend(echo=True, capacity=1)

    first = backend.send(HEADER, [FRAME])
    second = backend.send(HEADER, [FRAME])

    assert first is SendStatus.SENT
    assert second is SendStatus.DROPPED
    assert backend.drops == {"echo-queue-full": 1}
    assert backend.frames_sent == 1


def test_empty_frame_dropped() -> None:
    backend = LoopbackBackend()

    status = backend.send(HEADER, [b"", memoryview(b"")])

    assert status is SendStatus.DROPPED
    assert backend.drops == {"empty-frame": 1}
    assert backend.sent_frames() == []


def test_header_size_mismatch_raises() -> None:
    backend = LoopbackBackend()
    backend.configure(10)

    with pytest.raises(ValueError, match="header of 12 bytes"):
        backend.send(HEADER, [FRAME])


def test_fail_sends_busy_then_sent() -> None:
    backend = LoopbackBackend()
    backend.fail_sends(2)

    statuses = [backend.send(HEADER, [FRAME]) for _ in range(3)]

    assert statuses == [SendStatus.BUSY, SendStatus.BUSY, SendStatus.SENT]
    assert backend.send_busy == 2
    assert backend.sent_frames() == [FRAME]
    assert not backend.drops
    assert backend.pending_faults == 0


def test_fail_sends_dropped_with_reason() -> None:
    backend = LoopbackBackend()
    backend.fail_sends(1, SendStatus.DROPPED, "backend-rejected")
    backend.fail_sends(1)

    statuses = [backend.send(HEADER, [FRAME]) for _ in range(3)]

    assert statuses == [SendStatus.DROPPED, SendStatus.BUSY, SendStatus.SENT]
    assert backend.drops == {"backend-rejected": 1}
    assert backend.send_busy == 1
    assert backend.frames_sent == 1


@pytest.mark.parametrize(
    ("count", "status"), [(-1, SendStatus.BUSY), (1, SendStatus.SENT)]
)
def test_fail_sends_invalid(count: int, status: SendStatus) -> None:
    with pytest.raises(ValueError):
        LoopbackBackend().fail_sends(count, status)


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="capacity"):
        LoopbackBackend(capacity=0)
    with pytest.raises(ValueError, match="exclude"):
        LoopbackBackend(echo=True, discard=True)


def test_null_backend_counts_and_discards() -> None:
    backend = NullBackend()

    statuses = [backend.send(HEADER, [FRAME]) for _ in range(3)]

    assert statuses == [SendStatus.SENT] * 3
    assert backend.sent_frames() == []
    assert backend.receive() is None
    assert backend.stats == {
        "frames_sent": 3,
        "bytes_sent": 3 * len(FRAME),
        "frames_received": 0,
        "bytes_received": 0,
        "send_busy": 0,
        "frames_dropped": 0,
    }


def test_loopback_has_no_descriptors() -> None:
    with LoopbackBackend() as backend:
        assert backend.fileno() is None
        assert backend.writable_fileno() is None
