"""TX path of the guest driver model: classic and NAPI start_xmit."""

from __future__ import annotations

import pytest

from device.guest import GuestConfig
from device.machine import TX_QUEUE, Machine
from device.scenarios import frame_number, make_frame
from device.trace import Step


def classic(**options: object) -> GuestConfig:
    return GuestConfig(variant="classic", **options)


def records_of(machine: Machine, step: Step) -> list:
    return [record for record in machine.trace if record.step is step]


def test_classic_packet_with_direct_kick_skips_exit_steps() -> None:
    machine = Machine(guest=classic(), tx_mode="timer", kick="direct", trace=True)
    machine.run()
    start = len(machine.trace)
    machine.send(make_frame(0))
    machine.run_until(machine.now_ns)
    steps = [int(record.step) for record in machine.trace.records[start:]]
    assert steps == [1, 2, 3, 4, 9, 10, 11, 12, 13]


def test_classic_stops_below_threshold_of_19() -> None:
    config = classic(queue_size=32, max_skb_frags=17)
    machine = Machine(guest=config, tx_mode="timer", kick="direct", trace=True)
    machine.send_many(make_frame(i) for i in range(20))
    machine.run_until(machine.now_ns + 50_000)
    stops = records_of(machine, Step.NETIF_STOP_QUEUE)
    assert [record.packet for record in stops] == [13]
    assert stops[0].state.num_free == 18


def test_classic_stops_below_threshold_of_20() -> None:
    config = classic(queue_size=32, max_skb_frags=18)
    machine = Machine(guest=config, tx_mode="timer", kick="direct", trace=True)
    machine.send_many(make_frame(i) for i in range(20))
    machine.run_until(machine.now_ns + 50_000)
    stops = records_of(machine, Step.NETIF_STOP_QUEUE)
    assert [record.packet for record in stops] == [12]
    assert stops[0].state.num_free == 19


def test_stopped_queue_keeps_frames_on_the_qdisc() -> None:
    config = classic(queue_size=32)
    machine = Machine(guest=config, tx_mode="timer", kick="direct")
    machine.send_many(make_frame(i) for i in range(20))
    machine.run_until(machine.now_ns + 50_000)
    assert machine.guest.tx.stopped
    assert len(machine.guest.qdisc) == 7
    machine.run()
    assert [frame_number(f) for f in machine.sent_frames()] == list(range(20))
    assert not machine.guest.tx.stopped


def test_classic_interrupt_wakes_the_queue() -> None:
    config = classic(queue_size=32)
    machine = Machine(guest=config, tx_mode="timer", kick="direct", trace=True)
    machine.send_many(make_frame(i) for i in range(20))
    machine.run()
    wakes = records_of(machine, Step.NETIF_WAKE_QUEUE)
    assert [record.detail for record in wakes] == ["skb_xmit_done"]
    assert machine.guest.stats.queue_stops == 1
    assert machine.guest.stats.queue_wakes == 1
    assert machine.guest.stats.tx_interrupts >= 1


def test_napi_batches_kicks_with_xmit_more() -> None:
    config = GuestConfig(variant="napi", bulk_limit=4)
    machine = Machine(guest=config, tx_mode="bh", kick="direct", trace=True)
    machine.send_many(make_frame(i) for i in range(8))
    machine.run()
    stats = machine.guest.stats
    assert stats.kicks_deferred == 6
    assert stats.kicks + stats.kicks_suppressed == 2
    kicked = [record.packet for record in records_of(machine, Step.VIRTQUEUE_KICK)]
    assert kicked == [3, 7]
    assert len(machine.sent_frames()) == 8


def test_napi_without_bulk_tries_a_kick_per_packet() -> None:
    config = GuestConfig(variant="napi", bulk_limit=1)
    machine = Machine(guest=config, tx_mode="bh", kick="direct")
    machine.send_many(make_frame(i) for i in range(8))
    machine.run()
    stats = machine.guest.stats
    assert stats.kicks_deferred == 0
    assert stats.kicks + stats.kicks_suppressed == 8


def test_napi_poll_wakes_the_queue() -> None:
    config = GuestConfig(variant="napi", queue_size=32)
    machine = Machine(guest=config, tx_mode="timer", kick="direct", trace=True)
    machine.send_many(make_frame(i) for i in range(40))
    machine.run()
    wakes = records_of(machine, Step.NETIF_WAKE_QUEUE)
    assert wakes
    assert {record.detail for record in wakes} <= {
        "virtnet_poll_tx",
        "virtnet_poll_cleantx",
    }
    assert [frame_number(f) for f in machine.sent_frames()] == list(range(40))


@pytest.mark.parametrize(
    ("can_push", "indirect", "used"),
    [
        (True, False, 1),
        (False, False, 2),
        (False, True, 1),
    ],
)
def test_descriptors_per_packet(can_push: bool, indirect: bool, used: int) -> None:
    config = classic(can_push=can_push, indirect=indirect)
    machine = Machine(guest=config, tx_mode="timer", kick="direct")
    machine.send(make_frame(0))
    machine.run_until(machine.now_ns)
    assert machine.guest.queues[TX_QUEUE].num_free == 256 - used


def test_send_rejects_frames_the_buffers_cannot_hold() -> None:
    machine = Machine()
    with pytest.raises(ValueError, match="1519 bytes"):
        machine.send(bytes(1519))
    with pytest.raises(ValueError, match="0 bytes"):
        machine.send(b"")


def test_full_qdisc_drops_and_counts() -> None:
    machine = Machine(guest=GuestConfig(qdisc_limit=10), kick="direct")
    packets = machine.send_many(make_frame(i) for i in range(50))
    machine.run()
    assert machine.guest.stats.drops["qdisc-full"] == 40
    assert machine.guest.dropped == [(p, "qdisc-full") for p in packets[10:]]
    assert [frame_number(f) for f in machine.sent_frames()] == list(range(10))


def test_transmitted_lists_packets_in_ring_order() -> None:
    machine = Machine(kick="direct")
    machine.send_many((make_frame(i) for i in range(5)), gap_ns=10_000)
    machine.run()
    assert machine.transmitted == [0, 1, 2, 3, 4]
    assert machine.guest.stats.tx_packets == 5
    assert machine.guest.stats.tx_bytes == 5 * 60


def test_disabled_trace_records_nothing() -> None:
    machine = Machine(guest=classic(), tx_mode="timer", trace=False)
    machine.send_many(make_frame(i) for i in range(300))
    machine.run()
    assert len(machine.trace) == 0
    assert len(machine.sent_frames()) == 300


def test_costs_move_the_clock() -> None:
    machine = Machine(kick="direct", tx_mode="timer")
    machine.run()
    start = machine.now_ns
    machine.send(make_frame(0))
    machine.run_until(start)
    costs = machine.guest.config.costs
    least = costs.start_xmit + costs.xmit_skb + costs.kick_prepare
    assert machine.now_ns - start >= least
