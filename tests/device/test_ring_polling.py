"""Ring polling: notifications stay off while an event loop polls the TX ring.

A TX policy with ``ring_polling`` parks after it drained the ring instead of
turning notifications back on. ``poll`` then finds chains the driver added
without a kick, and ``poll_end``, called before the loop sleeps, turns
notifications on and re-reads the ring (2.7.10.2), so no chain waits for a
kick that will not come. ``EventLoop.add_poller`` calls the two.
"""

from __future__ import annotations

import struct

import pytest

from backends.loopback import LoopbackBackend
from device.clock import VirtualClock
from device.event_loop import EventLoop, MonotonicClock
from device.stats import QueueStats
from device.trace import Trace
from device.tx import TxQueue
from device.tx_policy import TxPolicy, make_policy
from virtio import DeviceQueue, GuestMemory, RingLayout

QUEUE_SIZE = 16
BUFFERS = 0x10000
FRAME = bytes.fromhex("ffffffffffff020000000002 88b5") + bytes(range(46))
NO_NOTIFY = 1


class Setup:
    """A TX ring, a loopback backend and a policy on a virtual clock."""

    def __init__(self, mode: str, *, event_idx: bool, ring_polling: bool) -> None:
        self.memory = GuestMemory.anonymous(0x40000)
        self.layout = RingLayout.packed_after(QUEUE_SIZE, 0x1000)
        self.queue = DeviceQueue(self.memory, self.layout, index=1, event_idx=event_idx)
        self.backend = LoopbackBackend()
        self.clock = VirtualClock()
        self.stats = QueueStats()
        self.tx = TxQueue(
            self.queue,
            self.backend,
            header_len=12,
            features=0,
            stats=self.stats,
            trace=Trace(enabled=False),
            interrupt=lambda queue: None,
            suppressed=lambda queue: None,
            on_break=lambda error: None,
        )
        self.policy: TxPolicy = make_policy(
            mode,
            self.tx,
            self.clock,
            Trace(enabled=False),
            self.stats,
            ring_polling=ring_polling,
        )
        self.added = 0

    def add(self, count: int = 1) -> None:
        """Make ``count`` one-descriptor frames available, as a driver would."""
        for _ in range(count):
            head = self.added % QUEUE_SIZE
            address = BUFFERS + 0x1000 * head
            self.memory.write(address, bytes(12) + FRAME)
            self.memory.write(
                self.layout.desc + 16 * head,
                struct.pack("<QIHH", address, 12 + len(FRAME), 0, 0),
            )
            self.memory.write(
                self.layout.avail_ring_addr(self.added % QUEUE_SIZE),
                struct.pack("<H", head),
            )
            self.added += 1
        self.memory.write(self.layout.avail_idx_addr, struct.pack("<H", self.added))

    def settle(self) -> None:
        """Run every scheduled flush."""
        self.clock.advance(10_000_000)

    @property
    def used_flags(self) -> int:
        return struct.unpack("<H", self.memory.read(self.layout.used, 2))[0]

    @property
    def avail_event(self) -> int:
        address = self.layout.avail_event_addr
        return struct.unpack("<H", self.memory.read(address, 2))[0]


@pytest.mark.parametrize("mode", ["bh", "timer", "immediate"])
def test_drained_ring_parks_with_notifications_off(mode: str) -> None:
    setup = Setup(mode, event_idx=False, ring_polling=True)
    setup.add(2)
    setup.policy.on_kick()
    setup.settle()

    assert setup.backend.frames_sent == 2
    assert setup.policy.parked
    assert setup.used_flags == NO_NOTIFY


@pytest.mark.parametrize("mode", ["bh", "timer", "immediate"])
def test_poll_finds_chains_added_without_kick(mode: str) -> None:
    setup = Setup(mode, event_idx=False, ring_polling=True)
    setup.add()
    setup.policy.on_kick()
    setup.settle()
    assert not setup.policy.poll()  # nothing new yet

    setup.add(3)
    assert setup.policy.poll()
    assert not setup.policy.parked
    setup.settle()

    assert setup.backend.frames_sent == 4
    assert setup.stats.ring_polls == 1
    assert setup.stats.kicks == 0  # the device counts kicks, the policy does not
    assert setup.policy.parked
    assert setup.used_flags == NO_NOTIFY


def test_poll_in_timer_mode_arms_the_timer() -> None:
    setup = Setup("timer", event_idx=False, ring_polling=True)
    setup.add()
    setup.policy.on_kick()
    setup.settle()
    arms = setup.stats.timer_arms

    setup.add()
    setup.policy.poll()

    # The frame waits for the timer as after a kick: that is the batching.
    assert setup.stats.timer_arms == arms + 1
    assert setup.policy.timer_armed
    assert setup.backend.frames_sent == 1
    setup.settle()
    assert setup.backend.frames_sent == 2


def test_poll_end_turns_notifications_on() -> None:
    setup = Setup("bh", event_idx=False, ring_polling=True)
    setup.add()
    setup.policy.on_kick()
    setup.settle()

    assert not setup.policy.poll_end()

    assert setup.used_flags == 0
    assert not setup.policy.parked
    # Not parked: chains added now wait for the driver's kick.
    setup.add()
    assert not setup.policy.poll()
    assert not setup.policy.poll_end()


def test_poll_end_schedules_chains_that_slipped_in() -> None:
    setup = Setup("bh", event_idx=False, ring_polling=True)
    setup.add()
    setup.policy.on_kick()
    setup.settle()
    setup.add(2)  # the driver saw NO_NOTIFY and did not kick

    assert setup.policy.poll_end()

    assert setup.used_flags == NO_NOTIFY
    assert setup.policy.waiting
    setup.settle()
    assert setup.backend.frames_sent == 3


def test_event_idx_keeps_avail_event_stale_while_parked() -> None:
    setup = Setup("bh", event_idx=True, ring_polling=True)
    setup.add()
    setup.policy.on_kick()
    setup.settle()
    setup.add(2)
    event_while_parked = setup.avail_event

    setup.policy.poll()
    setup.settle()
    setup.policy.poll_end()

    # A stale avail_event is how EVENT_IDX says "do not kick" (2.7.10.2).
    assert event_while_parked < setup.added
    assert setup.used_flags == 0
    assert setup.avail_event == setup.added == 3
    assert setup.backend.frames_sent == 3


def test_kick_while_parked_schedules_as_usual() -> None:
    setup = Setup("bh", event_idx=False, ring_polling=True)
    setup.add()
    setup.policy.on_kick()
    setup.settle()
    setup.add()

    setup.policy.on_kick()

    assert not setup.policy.parked
    setup.settle()
    assert setup.backend.frames_sent == 2


def test_cancel_forgets_parking() -> None:
    setup = Setup("bh", event_idx=False, ring_polling=True)
    setup.add()
    setup.policy.on_kick()
    setup.settle()

    setup.policy.cancel()
    setup.add()

    assert not setup.policy.poll()
    assert not setup.policy.poll_end()


@pytest.mark.parametrize("mode", ["bh", "timer", "immediate"])
def test_without_ring_polling_notifications_go_back_on(mode: str) -> None:
    setup = Setup(mode, event_idx=False, ring_polling=False)
    setup.add()
    setup.policy.on_kick()
    setup.settle()
    setup.add()

    assert not setup.policy.parked
    assert setup.used_flags == 0
    assert not setup.policy.poll()
    assert not setup.policy.poll_end()


# -- EventLoop.add_poller ---------------------------------------------------------


class Poller:
    def __init__(self, *, found: bool = False) -> None:
        self.polls = 0
        self.ends = 0
        self.found = found

    def poll(self) -> bool:
        self.polls += 1
        return self.found

    def end(self) -> bool:
        self.ends += 1
        return False


def test_loop_polls_while_polling_window_is_open() -> None:
    loop = EventLoop(MonotonicClock(), poll_ns=10_000_000_000)
    poller = Poller()
    loop.add_poller(poller.poll, poller.end)

    loop.run(0.02)

    assert poller.polls > 1
    assert poller.ends == 0


def test_loop_ends_polling_before_it_sleeps() -> None:
    loop = EventLoop(MonotonicClock(), poll_ns=0)
    poller = Poller()
    loop.add_poller(poller.poll, poller.end)

    loop.run(0.02)

    assert poller.ends >= 1
    assert poller.polls == 0


def test_poller_that_finds_work_keeps_loop_awake() -> None:
    loop = EventLoop(MonotonicClock(), poll_ns=1_000_000)
    busy = Poller(found=True)
    loop.add_poller(busy.poll, busy.end)

    loop.run(0.02)

    # Every poll finds work, so the window never closes and end never runs.
    assert busy.polls > 10
    assert busy.ends == 0
