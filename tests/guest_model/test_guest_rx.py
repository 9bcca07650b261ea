"""RX path of the guest driver model: buffer modes, NAPI, refill."""

from __future__ import annotations

import pytest

from device.guest import GuestConfig
from device.machine import RX_QUEUE, Machine
from device.rx import RxResult
from device.scenarios import frame_number, make_frame


def machine_with(rx_mode: str, mtu: int = 1500, **options: object) -> Machine:
    return Machine(
        guest=GuestConfig(rx_mode=rx_mode, **options), mtu=mtu, kick="direct"
    )


@pytest.mark.parametrize("rx_mode", ["small", "big", "mergeable"])
def test_frame_arrives_without_header(rx_mode: str) -> None:
    machine = machine_with(rx_mode)
    frame = make_frame(7, 1514)
    result = machine.deliver_rx(frame)
    assert result is RxResult.DELIVERED
    assert machine.received == [frame]
    assert machine.guest.stats.rx_packets == 1
    assert machine.guest.stats.rx_bytes == 1514


def test_small_buffers_cannot_take_a_jumbo_frame() -> None:
    machine = machine_with("small", mtu=9000)
    result = machine.deliver_rx(make_frame(1, 2000))
    assert result is RxResult.DROPPED
    assert machine.device.stats.queue(RX_QUEUE).drops["rx-never-fits"] == 1
    assert machine.received == []


@pytest.mark.parametrize("indirect", [True, False])
def test_big_chain_takes_a_65549_byte_frame(indirect: bool) -> None:
    machine = machine_with("big", mtu=65535, indirect=indirect, queue_size=64)
    frame = make_frame(3, 65549)
    assert machine.deliver_rx(frame) is RxResult.DELIVERED
    assert machine.received == [frame]


def test_mergeable_frame_spans_three_buffers() -> None:
    machine = machine_with("mergeable", mtu=9000)
    queue = machine.guest.queues[RX_QUEUE]
    before = queue.last_used_idx
    frame = make_frame(5, 4000)
    assert machine.deliver_rx(frame) is RxResult.DELIVERED
    assert machine.received == [frame]
    assert queue.last_used_idx - before == 3


def test_mergeable_frames_of_many_sizes_round_trip() -> None:
    machine = machine_with("mergeable", mtu=9000)
    frames = [
        make_frame(i, length)
        for i, length in enumerate([60, 1523, 1524, 1525, 3059, 3060, 9014])
    ]
    for frame in frames:
        machine.deliver_rx(frame)
    assert machine.received == frames


def test_napi_polls_again_when_the_budget_runs_out() -> None:
    machine = machine_with("mergeable")
    frames = [make_frame(i) for i in range(100)]
    machine.deliver_rx_many(frames)
    machine.run()
    assert machine.received == frames
    stats = machine.guest.stats
    assert stats.rx_napi_polls >= 3
    assert stats.rx_interrupts == 1


def test_refill_posts_after_half_the_ring_is_used() -> None:
    machine = machine_with("small", queue_size=64)
    machine.deliver_rx_many(make_frame(i) for i in range(40))
    machine.run()
    assert machine.guest.stats.rx_buffers_posted == 64 + 40
    assert machine.guest.queues[RX_QUEUE].num_free == 0


def test_refill_does_not_kick_while_the_device_has_buffers() -> None:
    machine = machine_with("small", queue_size=64)
    machine.deliver_rx_many(make_frame(i) for i in range(40))
    machine.run()
    assert machine.guest.stats.rx_kicks == 1


def test_held_frames_are_delivered_after_refill() -> None:
    machine = machine_with("small", rx_queue_size=16)
    frames = [make_frame(i) for i in range(40)]
    machine.deliver_rx_many(frames)
    machine.run()
    assert [frame_number(f) for f in machine.received] == list(range(40))
    assert machine.device.stats.queue(RX_QUEUE).held > 0
    assert not machine.device.stats.drops
    assert machine.guest.stats.rx_kicks > 1


def test_short_frame_is_dropped_by_the_guest() -> None:
    machine = machine_with("mergeable")
    assert machine.deliver_rx(bytes(10)) is RxResult.DELIVERED
    assert machine.received == []
    assert machine.guest.stats.drops["rx-too-short"] == 1


def test_frames_arrive_at_their_time() -> None:
    machine = machine_with("small")
    start = machine.now_ns
    machine.deliver_rx_many((make_frame(i) for i in range(3)), gap_ns=10_000)
    machine.run_until(start + 15_000)
    assert len(machine.received) == 2
    machine.run()
    assert len(machine.received) == 3
