"""The fast paths the vhost-user back-end relies on, checked against the slow ones.

``TxQueue.flush`` hands the usual chain to ``Backend.send_gather`` as it is,
and everything else to the checking path. ``EventLoop`` polls for
``poll_ns`` after activity, and waits for a timer due within a millisecond
with select(2), since epoll would round the wait up.
"""

from __future__ import annotations

import struct

from backends.base import SendStatus
from backends.loopback import LoopbackBackend
from device.clock import VirtualClock
from device.event_loop import EventLoop, MonotonicClock
from device.stats import QueueStats
from device.trace import Trace
from device.tx import FlushResult, TxQueue
from virtio import DeviceQueue, GuestMemory, MemoryRegion, RingLayout

QUEUE_SIZE = 16
BUFFERS = 0x10000
FRAME = bytes.fromhex("ffffffffffff020000000002 88b5") + bytes(range(46))


class Ring:
    """A TX ring in anonymous memory, filled by hand like a driver would."""

    def __init__(self, memory: GuestMemory | None = None) -> None:
        self.memory = memory or GuestMemory.anonymous(0x40000)
        self.layout = RingLayout.packed_after(QUEUE_SIZE, 0x1000)
        self.table = self.memory.view(self.layout.desc, self.layout.desc_bytes)
        self.avail = self.memory.u16_array(self.layout.avail, 3 + QUEUE_SIZE)
        self.queue = DeviceQueue(self.memory, self.layout, index=1)
        self.next_descriptor = 0

    def add(self, buffers: list[tuple[int, bytes]]) -> None:
        """Write ``buffers`` (address, bytes) as one readable chain."""
        head = self.next_descriptor
        for position, (address, data) in enumerate(buffers):
            index = self.next_descriptor
            self.memory.write(address, data)
            last = position == len(buffers) - 1
            struct.pack_into(
                "<QIHH", self.table, 16 * index, address, len(data), 0 if last else 1,
                index + 1,
            )  # fmt: skip
            self.next_descriptor += 1
        slot = self.avail[1] % QUEUE_SIZE
        self.avail[2 + slot] = head
        self.avail[1] += 1


def make_tx(ring: Ring, backend: LoopbackBackend) -> TxQueue:
    backend.configure(12)
    return TxQueue(
        ring.queue,
        backend,
        header_len=12,
        features=1,  # CSUM, so that NEEDS_CSUM is honoured
        stats=QueueStats(),
        trace=Trace(enabled=False),
        interrupt=lambda queue: None,
        suppressed=lambda queue: None,
        on_break=lambda error: None,
    )


def test_fast_path_layouts_send_same_frame() -> None:
    ring = Ring()
    backend = LoopbackBackend()
    tx = make_tx(ring, backend)
    packet = bytes(12) + FRAME
    ring.add([(BUFFERS, packet)])
    ring.add([(BUFFERS + 0x1000, packet[:12]), (BUFFERS + 0x2000, packet[12:])])
    ring.add([(BUFFERS + 0x3000, packet[:5]), (BUFFERS + 0x4000, packet[5:30]),
              (BUFFERS + 0x5000, packet[30:])])  # fmt: skip
    assert tx.flush(16) == 3
    assert backend.sent_frames() == [FRAME, FRAME, FRAME]
    assert tx.stats.frames == 3
    assert tx.stats.bytes == 3 * len(FRAME)


def test_offload_header_takes_checking_path() -> None:
    ring = Ring()
    backend = LoopbackBackend()
    tx = make_tx(ring, backend)
    # NEEDS_CSUM with the checksum field beyond the frame: dropped as invalid.
    header = struct.pack("<BBHHHHH", 1, 0, 0, 0, 40, 200, 0)
    ring.add([(BUFFERS, header + FRAME)])
    assert tx.flush(16) == 1
    assert backend.sent_frames() == []
    assert sum(tx.stats.drops.values()) == 1


def test_empty_and_oversized_frames_dropped() -> None:
    ring = Ring()
    backend = LoopbackBackend()
    tx = make_tx(ring, backend)
    tx.max_frame = 60
    ring.add([(BUFFERS, bytes(12))])
    ring.add([(BUFFERS + 0x1000, bytes(12) + bytes(61))])
    assert tx.flush(16) == 2
    assert tx.stats.drops == {"frame-empty": 1, "frame-too-large": 1}
    assert backend.sent_frames() == []


def test_busy_fast_path_resends_same_frame() -> None:
    ring = Ring()
    backend = LoopbackBackend()
    backend.fail_sends(1, SendStatus.BUSY)
    tx = make_tx(ring, backend)
    ring.add([(BUFFERS, bytes(12) + FRAME)])
    ring.add([(BUFFERS + 0x1000, bytes(12) + FRAME[::-1])])
    assert tx.flush(16) is FlushResult.BUSY
    assert tx.pending is not None
    assert tx.resume() is True
    assert tx.flush(16) == 1
    assert backend.sent_frames() == [FRAME, FRAME[::-1]]


def test_fast_path_in_second_region() -> None:
    low = MemoryRegion(0, bytearray(0x8000))
    high = MemoryRegion(0x10000, bytearray(0x20000))
    ring = Ring(GuestMemory([low, high]))
    backend = LoopbackBackend()
    tx = make_tx(ring, backend)
    # The ring is in the low region, so the buffers here are in the other one.
    ring.add([(0x10000, bytes(12) + FRAME)])
    ring.add([(0x4000, bytes(12) + FRAME[::-1])])
    assert tx.flush(16) == 2
    assert backend.sent_frames() == [FRAME, FRAME[::-1]]


# -- event loop ------------------------------------------------------------------


def test_timer_due_within_timer_slack_polls() -> None:
    loop = EventLoop(VirtualClock())
    loop.clock.call_at(1_000, lambda: None)
    assert loop._timeout(0, None) == 0.0
    loop = EventLoop(VirtualClock())
    loop.clock.call_at(500_000, lambda: None)
    assert loop._timeout(0, None) == 0.0005
    loop = EventLoop(VirtualClock())
    loop.clock.call_at(2_500_000, lambda: None)
    assert loop._timeout(0, None) == 0.0025


def test_timer_within_millisecond_sleeps_without_spinning() -> None:
    loop = EventLoop(MonotonicClock())
    turns: list[float | None] = []
    select = loop.selector.select

    def recording_select(timeout: float | None = None):  # type: ignore[no-untyped-def]
        turns.append(timeout)
        return select(timeout)

    loop.selector.select = recording_select  # type: ignore[method-assign]
    fired: list[int] = []
    loop.clock.call_later(300_000, lambda: fired.append(loop.clock.now_ns()))
    loop.clock.call_later(400_000, loop.stop)
    loop.run()
    loop.close()
    # A spinning loop turns thousands of times in 400 us; one that sleeps
    # in select(2) until each timer turns a few times.
    assert fired and fired[0] >= 300_000
    assert len(turns) < 20


def test_poll_ns_polls_then_sleeps() -> None:
    loop = EventLoop(MonotonicClock(), poll_ns=20_000_000)
    timeouts: list[float | None] = []
    select = loop.selector.select

    def recording_select(timeout: float | None = None):  # type: ignore[no-untyped-def]
        timeouts.append(timeout)
        return select(timeout)

    loop.selector.select = recording_select  # type: ignore[method-assign]
    loop.clock.call_later(100_000_000, loop.stop)
    loop.run()
    loop.close()
    assert timeouts[0] == 0.0
    assert any(timeout for timeout in timeouts)
    first_sleep = next(i for i, timeout in enumerate(timeouts) if timeout)
    assert all(timeout == 0.0 for timeout in timeouts[:first_sleep])


def test_no_poll_by_default() -> None:
    loop = EventLoop(MonotonicClock())
    timeouts: list[float | None] = []
    select = loop.selector.select

    def recording_select(timeout: float | None = None):  # type: ignore[no-untyped-def]
        timeouts.append(timeout)
        return select(timeout)

    loop.selector.select = recording_select  # type: ignore[method-assign]
    loop.clock.call_later(30_000_000, loop.stop)
    loop.run()
    loop.close()
    assert len(timeouts) < 5
