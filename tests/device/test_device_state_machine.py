"""Random interleavings of guest, device, clock and backend, with invariants.

A hypothesis state machine drives one ``Machine`` (guest driver model,
device, virtual clock, loopback backend) through sends, batches, time
advances, received frames, a backend that turns busy and ready again, and
device resets. After every step it checks the rings: free descriptors plus
those of outstanding chains equal the queue size, and no head appears twice
among the used entries the driver has not taken yet. Frames carry their
number, so the checks also see that every frame the guest sent reaches the
backend once and in order, or is dropped under a counted reason, and that
every received frame reaches the guest or is counted.
"""

from __future__ import annotations

import struct

from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from backends.base import SendStatus
from device.guest import GuestConfig
from device.guest.rx import chain_descriptors
from device.machine import RX_QUEUE, TX_QUEUE, Machine
from device.scenarios import frame_number, make_frame

MAX_FRAME = 9014
RUN_LIMIT_NS = 1_000_000_000
RX_FIRST = 1 << 30
"""Received frames are numbered from here, so they never look like sent ones."""


class DeviceStateMachine(RuleBasedStateMachine):
    """The machine under random traffic, resets and backpressure."""

    @initialize(
        variant=st.sampled_from(["classic", "napi"]),
        tx_mode=st.sampled_from(["bh", "timer", "timer-legacy", "immediate"]),
        kick=st.sampled_from(["pio", "direct", "ioeventfd"]),
        event_idx=st.booleans(),
        indirect=st.booleans(),
        rx_mode=st.sampled_from(["small", "big", "mergeable"]),
        queue_size=st.sampled_from([8, 16, 32, 64]),
        rx_queue_size=st.sampled_from([8, 16, 32, 64]),
        max_skb_frags=st.sampled_from(["tight", 0, 2, 17, 18]),
        tx_burst=st.sampled_from([4, 16, 256]),
    )
    def start(
        self,
        variant: str,
        tx_mode: str,
        kick: str,
        event_idx: bool,
        indirect: bool,
        rx_mode: str,
        queue_size: int,
        rx_queue_size: int,
        max_skb_frags: int | str,
        tx_burst: int,
    ) -> None:
        if max_skb_frags == "tight":
            # The queue stops after every packet and restarts only when all
            # buffers are back, which exercises steps 14 to 23 most.
            max_skb_frags = queue_size - 2

        assume(rx_mode != "big" or indirect or rx_queue_size >= 32)
        assume(queue_size >= 2 + max_skb_frags)

        config = GuestConfig(
            variant=variant,
            queue_size=queue_size,
            rx_queue_size=rx_queue_size,
            max_skb_frags=max_skb_frags,
            event_idx=event_idx,
            indirect=indirect,
            rx_mode=rx_mode,
            tx_max_frame=MAX_FRAME,
        )
        self.machine = Machine(
            guest=config,
            tx_mode=tx_mode,
            kick=kick,
            mtu=9000,
            tx_burst=tx_burst,
        )
        self.tx_mode = tx_mode
        self.sent: list[int] = []
        self.rx_offered: list[int] = []
        self.busy_injected = 0
        # Frames are scheduled no earlier than those already scheduled, so
        # their numbers are also their order of arrival.
        self.last_tx_ns = 0
        self.last_rx_ns = 0

    # -- rules ------------------------------------------------------------------

    @rule(length=st.integers(18, MAX_FRAME))
    def send_frame(self, length: int) -> None:
        number = len(self.sent)
        self.last_tx_ns = max(self.machine.now_ns, self.last_tx_ns)
        self.machine.send(make_frame(number, length), self.last_tx_ns)
        self.sent.append(number)

    @rule(
        count=st.integers(1, 40),
        gap_ns=st.sampled_from([0, 100, 1_000, 20_000]),
        length=st.integers(18, 1514),
    )
    def send_batch(self, count: int, gap_ns: int, length: int) -> None:
        first = len(self.sent)
        numbers = list(range(first, first + count))
        start = max(self.machine.now_ns, self.last_tx_ns)
        frames = (make_frame(n, length) for n in numbers)
        self.machine.send_many(frames, gap_ns, start)
        self.last_tx_ns = start + gap_ns * (count - 1)
        self.sent.extend(numbers)

    @rule(ns=st.sampled_from([0, 500, 5_000, 50_000, 200_000, 2_000_000]))
    def advance(self, ns: int) -> None:
        self.machine.run_until(self.machine.now_ns + ns)

    @rule(length=st.integers(18, MAX_FRAME))
    def deliver_rx(self, length: int) -> None:
        number = RX_FIRST + len(self.rx_offered)
        frame = make_frame(number, length)
        if self.last_rx_ns > self.machine.now_ns:
            self.machine.deliver_rx(frame, at_ns=self.last_rx_ns)
        else:
            self.machine.deliver_rx(frame)
        self.rx_offered.append(number)

    @rule(count=st.integers(1, 40), gap_ns=st.sampled_from([0, 300, 5_000]))
    def deliver_rx_batch(self, count: int, gap_ns: int) -> None:
        first = RX_FIRST + len(self.rx_offered)
        numbers = list(range(first, first + count))
        start = max(self.machine.now_ns, self.last_rx_ns)
        frames = (make_frame(n) for n in numbers)
        self.machine.deliver_rx_many(frames, gap_ns, start)
        self.last_rx_ns = start + gap_ns * (count - 1)
        self.rx_offered.extend(numbers)

    @rule(count=st.integers(1, 3))
    def backend_busy(self, count: int) -> None:
        self.machine.backend.fail_sends(count, SendStatus.BUSY)
        self.busy_injected += count

    @rule()
    def backend_ready(self) -> None:
        self.machine.backend_writable()

    @rule()
    def reset(self) -> None:
        self.machine.reset()

    @precondition(lambda self: hasattr(self, "machine"))
    @rule()
    def drain_and_check(self) -> None:
        """Run to idle with a ready backend, then account for every frame."""
        self._drain()
        self._check_tx_complete()
        self._check_rx_complete()

    def teardown(self) -> None:
        if hasattr(self, "machine"):
            self.drain_and_check()

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def device_never_breaks(self) -> None:
        assert not self.machine.device.broken, self.machine.device.error

    @invariant()
    def rings_are_consistent(self) -> None:
        for index in (RX_QUEUE, TX_QUEUE):
            self._check_ring(index)

    @invariant()
    def backend_gets_frames_once_in_order(self) -> None:
        numbers = self._backend_numbers()
        assert numbers == sorted(set(numbers)), numbers
        dropped = {packet for packet, _ in self.machine.guest.dropped}
        assert not dropped & set(numbers)

    @invariant()
    def guest_gets_frames_once_in_order(self) -> None:
        numbers = [frame_number(frame) for frame in self.machine.received]
        assert numbers == sorted(set(numbers)), numbers

    # -- helpers --------------------------------------------------------------------

    def _check_ring(self, index: int) -> None:
        machine = self.machine
        driver = machine.guest.queues[index]
        device = machine.device.queues.get(index)
        if device is None or not device.ready:
            return
        size = driver.size
        per_chain = self._descriptors_per_chain(index)
        assert driver.num_free + per_chain * driver.outstanding == size
        assert 0 <= device.inuse <= size
        assert (device.avail_idx() - device.last_avail_idx) & 0xFFFF <= size
        waiting = (driver.used_idx() - driver.last_used_idx) & 0xFFFF
        assert waiting <= driver.outstanding
        heads = [
            self._used_head(driver.layout, driver.last_used_idx + i, size)
            for i in range(waiting)
        ]
        assert len(heads) == len(set(heads)), heads

    def _descriptors_per_chain(self, index: int) -> int:
        guest = self.machine.guest
        if guest.queues[index].indirect_area is not None:
            return 1
        if index == TX_QUEUE:
            return 1 if guest.tx.can_push else 2
        return chain_descriptors(guest.rx_mode)

    def _used_head(self, layout, used_index: int, size: int) -> int:
        address = layout.used_elem_addr(used_index & (size - 1))
        data = self.machine.guest.memory.read(address, 4)
        return struct.unpack("<I", data)[0]

    def _backend_numbers(self) -> list[int]:
        return [frame_number(frame) for frame in self.machine.sent_frames()]

    def _drain(self) -> None:
        machine = self.machine
        backend = machine.backend
        for _ in range(self.busy_injected + 1):
            machine.run(limit_ns=machine.now_ns + RUN_LIMIT_NS)
            if backend.send_busy >= self.busy_injected:
                break
            machine.backend_writable()
        machine.backend_writable()
        machine.run(limit_ns=machine.now_ns + RUN_LIMIT_NS)
        assert machine.idle

    def _check_tx_complete(self) -> None:
        machine = self.machine
        delivered = self._backend_numbers()
        dropped = [packet for packet, _ in machine.guest.dropped]
        missing = [n for n in self.sent if n not in set(delivered) | set(dropped)]
        if self.tx_mode != "timer-legacy":
            assert missing == [], missing
            return
        # The legacy timer may leave chains in the ring for good. They must
        # be the last packets added, and the qdisc contains what came after.
        transmitted = machine.transmitted
        stuck = [n for n in transmitted if n in set(missing)]
        assert stuck == transmitted[len(transmitted) - len(stuck) :]
        queued = [packet for packet, _ in machine.guest.qdisc]
        assert sorted(stuck + queued) == missing

    def _check_rx_complete(self) -> None:
        machine = self.machine
        received = [frame_number(frame) for frame in machine.received]
        device_drops = sum(machine.device.stats.queue(RX_QUEUE).drops.values())
        guest_drops = sum(
            count
            for reason, count in machine.guest.stats.drops.items()
            if reason.startswith("rx-")
        )
        rx = machine.device.rx
        held_frames = len(rx.held) if rx is not None else 0
        assert len(received) + device_drops + guest_drops + held_frames == len(
            self.rx_offered
        )


DeviceStateMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None
)
TestDeviceStateMachine = DeviceStateMachine.TestCase
