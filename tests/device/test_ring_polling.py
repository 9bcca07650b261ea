"""Ring polling: a drained TX queue keeps notifications off and polls its ring.

A TX policy with ``ring_poll_ns`` parks after it drained the ring instead of
turning notifications back on. A timer looks at avail.idx, and new chains
are flushed as after a kick. After ``ring_poll_ns`` without any, the policy
turns notifications on and re-reads the ring (2.7.10.2), so no chain waits
for a kick that will not come. All in virtual time.
"""

from __future__ import annotations

import struct

import pytest

from backends.loopback import LoopbackBackend
from device.clock import VirtualClock
from device.stats import QueueStats
from device.trace import Trace
from device.tx import TxQueue
from device.tx_policy import FIRST_CHECK_NS, TxPolicy, make_policy
from virtio import DeviceQueue, GuestMemory, RingLayout

QUEUE_SIZE = 64
BUFFERS = 0x10000
FRAME = bytes.fromhex("ffffffffffff020000000002 88b5") + bytes(range(46))
NO_NOTIFY = 1
INTERVAL = 100_000
PARK = 1_000_000


class Setup:
    """A TX ring, a loopback backend and a policy on a virtual clock."""

    def __init__(self, mode: str, *, event_idx: bool, ring_poll_ns: int) -> None:
        self.memory = GuestMemory.anonymous(0x80000)
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
            ring_poll_ns=ring_poll_ns,
            ring_poll_interval_ns=INTERVAL,
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

    def kick(self) -> None:
        """Kick and let the flush it schedules run, and nothing after it."""
        self.policy.on_kick()
        timer = self.policy.mode.value == "timer"
        self.clock.advance(self.policy.tx_timeout_ns if timer else 1_000)

    def wait(self, ns: int) -> None:
        self.clock.advance(ns)

    @property
    def used_flags(self) -> int:
        return struct.unpack("<H", self.memory.read(self.layout.used, 2))[0]

    @property
    def avail_event(self) -> int:
        address = self.layout.avail_event_addr
        return struct.unpack("<H", self.memory.read(address, 2))[0]


@pytest.mark.parametrize("mode", ["bh", "timer", "immediate"])
def test_drained_ring_parks_with_notifications_off(mode: str) -> None:
    setup = Setup(mode, event_idx=False, ring_poll_ns=PARK)
    setup.add(2)
    setup.kick()
    setup.wait(PARK // 2)

    assert setup.backend.frames_sent == 2
    assert setup.policy.parked
    assert setup.used_flags == NO_NOTIFY


@pytest.mark.parametrize("mode", ["bh", "timer", "immediate"])
def test_parked_queue_sends_chains_added_without_kick(mode: str) -> None:
    setup = Setup(mode, event_idx=False, ring_poll_ns=PARK)
    setup.add()
    setup.kick()

    for round_ in range(5):
        setup.add(3)  # no kick, because used.flags has NO_NOTIFY
        setup.wait(PARK // 2)
        assert setup.backend.frames_sent == 1 + 3 * (round_ + 1)
        assert setup.used_flags == NO_NOTIFY

    assert setup.stats.ring_polls == 5
    assert setup.policy.parked


def test_parked_timer_mode_looks_every_timeout() -> None:
    setup = Setup("timer", event_idx=False, ring_poll_ns=PARK)
    setup.add()
    setup.kick()
    fires = setup.stats.timer_fires

    setup.add()
    setup.wait(setup.policy.tx_timeout_ns - 1_000)
    assert setup.backend.frames_sent == 1
    setup.wait(2_000)

    # As QEMU's timer, re-armed while the driver keeps adding chains.
    assert setup.backend.frames_sent == 2
    assert setup.stats.timer_fires == fires + 1
    assert setup.stats.ring_polls == 1


def test_first_look_comes_soon() -> None:
    setup = Setup("bh", event_idx=False, ring_poll_ns=PARK)
    setup.add()
    setup.kick()

    setup.add()
    setup.wait(FIRST_CHECK_NS)

    assert setup.backend.frames_sent == 2
    assert setup.stats.ring_polls == 1


def test_empty_looks_back_off_to_interval() -> None:
    setup = Setup("bh", event_idx=False, ring_poll_ns=PARK)
    setup.add()
    setup.kick()
    # Empty looks at 10, 30, 70 and 150 us (delays 10, 20, 40, 80), then
    # every 100 us: at 250 us.
    setup.wait(200_000)
    setup.add()
    setup.wait(40_000)
    assert setup.backend.frames_sent == 1
    setup.wait(20_000)
    assert setup.backend.frames_sent == 2


def test_idle_parked_queue_turns_notifications_on() -> None:
    setup = Setup("bh", event_idx=False, ring_poll_ns=PARK)
    setup.add()
    setup.kick()

    setup.wait(PARK + 2 * INTERVAL)

    assert not setup.policy.parked
    assert setup.used_flags == 0
    # From now on a chain waits for the driver's kick.
    setup.add()
    setup.wait(PARK)
    assert setup.backend.frames_sent == 1
    setup.kick()
    assert setup.backend.frames_sent == 2


def test_chain_slipped_in_as_polling_ends_is_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup = Setup("bh", event_idx=False, ring_poll_ns=PARK)
    setup.add()
    setup.kick()
    setup.wait(PARK - INTERVAL)  # the check that gives up is yet to come

    # The driver adds a chain just before notifications go back on, and so
    # does not kick: the re-read after enabling finds it.
    enable = DeviceQueue.enable_notification

    def add_then_enable(queue: DeviceQueue) -> bool:
        setup.add()
        return enable(queue)

    monkeypatch.setattr(DeviceQueue, "enable_notification", add_then_enable)
    setup.wait(2 * INTERVAL)

    assert setup.backend.frames_sent == 2
    assert setup.used_flags == NO_NOTIFY
    assert setup.policy.parked


def test_event_idx_keeps_avail_event_stale_while_parked() -> None:
    setup = Setup("bh", event_idx=True, ring_poll_ns=PARK)
    setup.add()
    setup.kick()
    setup.add(2)
    event_while_parked = setup.avail_event
    setup.wait(PARK + 3 * INTERVAL)

    # With EVENT_IDX a stale avail_event suppresses the kick (2.7.10.2).
    assert event_while_parked == 0
    assert setup.backend.frames_sent == 3
    assert not setup.policy.parked
    assert setup.used_flags == 0
    assert setup.avail_event == setup.added == 3


def test_kick_while_parked_schedules_as_usual() -> None:
    setup = Setup("bh", event_idx=False, ring_poll_ns=PARK)
    setup.add()
    setup.kick()
    setup.add()

    setup.kick()

    assert setup.backend.frames_sent == 2
    assert setup.policy.parked


def test_cancel_forgets_parking() -> None:
    setup = Setup("bh", event_idx=False, ring_poll_ns=PARK)
    setup.add()
    setup.kick()

    setup.policy.cancel()
    setup.add()
    setup.wait(PARK)

    assert not setup.policy.parked
    assert setup.backend.frames_sent == 1
    assert setup.stats.ring_polls == 0


@pytest.mark.parametrize("mode", ["bh", "timer", "immediate"])
def test_without_ring_polling_notifications_go_back_on(mode: str) -> None:
    setup = Setup(mode, event_idx=False, ring_poll_ns=0)
    setup.add()
    setup.kick()
    setup.wait(setup.policy.tx_timeout_ns)
    setup.add()
    setup.wait(PARK)

    assert not setup.policy.parked
    assert setup.used_flags == 0
    assert setup.backend.frames_sent == 1
