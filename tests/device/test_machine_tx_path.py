"""The TX path through guest model, kick notifier, TX policy and backend."""

from __future__ import annotations

import pytest

from backends.base import SendStatus
from device.guest import GuestConfig
from device.machine import TX_QUEUE, IoeventfdKick, Machine
from device.scenarios import frame_number, legacy_stall, make_frame, saturate
from device.trace import Step

MODES = ["bh", "timer", "timer-legacy", "immediate"]


def numbered_steps(machine: Machine, start: int = 0) -> list[int]:
    return [int(r.step) for r in machine.trace.records[start:] if r.step < 100]


def sent_numbers(machine: Machine) -> list[int]:
    return [frame_number(frame) for frame in machine.sent_frames()]


@pytest.mark.parametrize("variant", ["classic", "napi"])
def test_one_packet_runs_steps_1_to_12_in_order(variant: str) -> None:
    machine = Machine(
        guest=GuestConfig(variant=variant), tx_mode="timer", kick="pio", trace=True
    )
    machine.run()
    start = len(machine.trace)
    machine.send(make_frame(0))
    machine.run()
    steps = numbered_steps(machine, start)
    first_twelve = [step for step in steps if step <= 12]
    assert first_twelve == list(range(1, 13))
    assert len(machine.sent_frames()) == 1


def test_one_packet_trace_carries_time_and_packet() -> None:
    machine = Machine(
        guest=GuestConfig(variant="classic"), tx_mode="timer", kick="pio", trace=True
    )
    machine.run()
    start = len(machine.trace)
    machine.send(make_frame(0))
    machine.run()
    records = machine.trace.records[start:]
    exit_record = next(r for r in records if r.step is Step.VM_EXIT)
    handled = next(r for r in records if r.step is Step.VMM_HANDLE_PIO)
    assert exit_record.packet == 0
    assert handled.time_ns - exit_record.time_ns == machine.kick.exit_cost_ns
    times = [r.time_ns for r in records]
    assert times == sorted(times)
    fire = next(r for r in records if r.step is Step.TX_TIMER_FIRE)
    armed = next(r for r in records if r.step is Step.SCHEDULE_FLUSH)
    assert fire.time_ns - armed.time_ns == 150_000


@pytest.mark.parametrize("variant", ["classic", "napi"])
def test_burst_fills_ring_and_restarts_after_timer(variant: str) -> None:
    config = GuestConfig(variant=variant, queue_size=64)
    machine = Machine(guest=config, tx_mode="timer", kick="pio", trace=True)
    machine.send_many(make_frame(i) for i in range(200))
    machine.run()
    records = machine.trace.records
    stop = next(i for i, r in enumerate(records) if r.step is Step.NETIF_STOP_QUEUE)
    fire = next(i for i, r in enumerate(records) if r.step is Step.TX_TIMER_FIRE)
    restart = next(
        i
        for i, r in enumerate(records)
        if r.step in (Step.NETIF_WAKE_QUEUE, Step.NETIF_START_QUEUE)
    )
    assert stop < fire < restart
    assert records[stop].state.num_free < config.stop_threshold
    assert sent_numbers(machine) == list(range(200))
    stats = machine.stats()
    assert stats.queue_stops >= 3
    assert stats.queue_wakes == stats.queue_stops


def saturated(mode: str, **options: object):
    machine = saturate(mode, count=2000, trace=False, **options)
    machine.run()
    return machine.stats()


@pytest.mark.parametrize("mode", ["timer", "timer-legacy"])
def test_timer_suppresses_almost_every_kick(mode: str) -> None:
    stats = saturated(mode, variant="classic")
    assert stats.kicks_per_packet < 0.01
    assert stats.kicks + stats.kicks_suppressed == stats.frames
    assert stats.frames + stats.drops.get("qdisc-full", 0) == 2000


def test_bh_suppresses_most_kicks() -> None:
    stats = saturated("bh", variant="classic")
    assert stats.kicks_per_packet < 0.4
    assert stats.kicks_suppressed > stats.kicks


def test_immediate_with_pio_kicks_every_packet() -> None:
    # The exit is handled on the vCPU, so the device drains and turns kicks
    # back on before the guest adds the next packet.
    stats = saturated("immediate", variant="classic", kick="pio")
    assert stats.kicks_per_packet == 1.0


def test_immediate_with_event_idx_suppresses_most_kicks() -> None:
    stats = saturated("immediate", variant="classic", kick="ioeventfd")
    assert stats.kicks_per_packet < 0.2


def test_immediate_without_event_idx_kicks_every_packet() -> None:
    stats = saturated("immediate", variant="classic", kick="ioeventfd", event_idx=False)
    assert stats.kicks_per_packet > 0.9


@pytest.mark.parametrize("mode", MODES)
def test_napi_batches_leave_few_kicks(mode: str) -> None:
    stats = saturated(mode, variant="napi")
    assert stats.kicks_per_packet < 0.1
    assert stats.kicks_deferred > stats.frames // 2


def test_legacy_timer_leaves_chains_in_the_ring() -> None:
    machine = legacy_stall("timer-legacy", tx_burst=64, burst=96, trace=False)
    machine.run()
    machine.run_until(machine.now_ns + 10_000_000)
    queue = machine.device.queues[TX_QUEUE]
    assert machine.stats().frames == 64
    assert queue.avail_idx() - queue.last_avail_idx == 32
    assert machine.idle


def test_fixed_timer_sends_the_whole_burst() -> None:
    machine = legacy_stall("timer", tx_burst=64, burst=96, trace=False)
    machine.run()
    queue = machine.device.queues[TX_QUEUE]
    assert sent_numbers(machine) == list(range(96))
    assert queue.avail_idx() == queue.last_avail_idx
    assert machine.stats().timer_fires >= 2


def test_legacy_stall_ends_at_the_next_kick_without_event_idx() -> None:
    machine = legacy_stall(
        "timer-legacy", tx_burst=64, burst=96, trace=False, event_idx=False
    )
    machine.run()
    assert machine.stats().frames == 64
    machine.send(make_frame(96))
    machine.run()
    assert sent_numbers(machine) == list(range(97))


def test_legacy_stall_outlives_new_packets_with_event_idx() -> None:
    # The flush after re-enabling kicks moved avail_event to the device's
    # position (64), which the driver's avail index passed long ago, so new
    # packets do not cross it and the guest never kicks.
    machine = legacy_stall("timer-legacy", tx_burst=64, burst=96, trace=False)
    machine.run()
    machine.send_many((make_frame(96 + i) for i in range(10)), gap_ns=100_000)
    machine.run()
    stats = machine.stats()
    assert stats.frames == 64
    assert stats.kicks_suppressed >= 10
    assert machine.device.queues[TX_QUEUE].avail_event() == 64


def test_legacy_stall_rejects_a_burst_that_stops_the_queue() -> None:
    with pytest.raises(ValueError, match="would stop the queue"):
        legacy_stall(queue_size=32, burst=20)


@pytest.mark.parametrize(
    ("reason", "out_lengths", "in_length"),
    [
        ("header-incomplete", [5], 0),
        ("frame-empty", [12], 0),
        ("frame-too-large", [12, 65551], 0),
        ("writable-in-tx", [72], 64),
    ],
)
def test_malformed_chain_is_dropped_by_reason(
    reason: str, out_lengths: list[int], in_length: int
) -> None:
    machine = Machine(tx_mode="bh", kick="direct")
    queue = machine.guest.queues[TX_QUEUE]
    scratch, size = machine.guest.scratch
    address = scratch
    out = []
    for length in out_lengths:
        out.append((address, length))
        address += length
    in_ = [(address, in_length)] if in_length else []
    assert address + in_length <= scratch + size
    queue.add_buf(out, in_, token="raw chain")
    queue.kick()
    machine.run()
    drops = machine.device.stats.queue(TX_QUEUE).drops
    assert drops == {reason: 1}
    assert machine.sent_frames() == []
    machine.send(make_frame(1))
    machine.run()
    assert sent_numbers(machine) == [1]
    assert machine.guest.stats.tx_reclaimed >= 1


def test_frame_over_the_mtu_is_dropped() -> None:
    config = GuestConfig(tx_max_frame=1518)
    machine = Machine(tx_mode="bh", kick="direct", guest=config)
    machine.send(make_frame(0, 1515))
    machine.run()
    assert machine.device.stats.queue(TX_QUEUE).drops["frame-too-large"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_busy_backend_loses_nothing(mode: str) -> None:
    machine = Machine(tx_mode=mode, kick="direct")
    machine.backend.fail_sends(3, SendStatus.BUSY)
    machine.send_many(make_frame(i) for i in range(10))
    machine.run()
    assert machine.sent_frames() == []
    assert machine.device.tx.pending is not None
    for _ in range(3):
        machine.backend_writable()
        machine.run()
    assert sent_numbers(machine) == list(range(10))
    assert machine.backend.send_busy == 3


def test_busy_backend_blocks_a_full_ring_without_loss() -> None:
    config = GuestConfig(queue_size=32)
    machine = Machine(guest=config, tx_mode="bh", kick="direct")
    machine.backend.fail_sends(1, SendStatus.BUSY)
    machine.send_many(make_frame(i) for i in range(100))
    machine.run()
    assert machine.guest.tx.stopped
    assert len(machine.guest.qdisc) > 0
    machine.backend_writable()
    machine.run()
    assert sent_numbers(machine) == list(range(100))


def test_ioeventfd_kicks_coalesce() -> None:
    config = GuestConfig(variant="classic", event_idx=False)
    machine = Machine(guest=config, tx_mode="immediate", kick="ioeventfd")
    machine.send_many((make_frame(i) for i in range(20)), gap_ns=600)
    machine.run()
    kick = machine.kick
    assert isinstance(kick, IoeventfdKick)
    assert kick.coalesced > 0
    assert machine.device.stats.total("kicks") == kick.kicks - kick.coalesced
    assert sent_numbers(machine) == list(range(20))


def test_unknown_kick_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown kick mode 'mmio'"):
        Machine(kick="mmio")


def test_reset_drops_packets_the_device_had_not_sent() -> None:
    machine = Machine(tx_mode="timer", kick="direct")
    machine.send_many(make_frame(i) for i in range(10))
    machine.run_until(machine.now_ns + 20_000)
    assert machine.sent_frames() == []
    machine.reset()
    assert machine.guest.dropped == [(i, "tx-reset") for i in range(10)]
    machine.send_many(make_frame(i) for i in range(10, 15))
    machine.run()
    assert sent_numbers(machine) == list(range(10, 15))
    assert machine.device.stats.resets >= 2


def test_stats_merge_device_and_guest_figures() -> None:
    machine = Machine(guest=GuestConfig(variant="classic"), tx_mode="timer")
    machine.send_many((make_frame(i) for i in range(5)), gap_ns=1_000_000)
    machine.run()
    stats = machine.stats()
    assert stats.packets == 5
    assert stats.frames == 5
    assert stats.bytes == 300
    assert stats.kicks == 5
    assert stats.vm_exits == stats.kicks + machine.guest.stats.rx_kicks
    assert stats.timer_arms == 5
    assert stats.timer_fires == 5
    assert stats.kicks_per_packet == 1.0
    data = stats.to_dict()
    assert data["kicks_per_packet"] == 1.0
    assert data["drops"] == {}


def test_ring_state_shows_both_sides() -> None:
    machine = Machine(guest=GuestConfig(variant="classic"), tx_mode="timer")
    machine.send_many(make_frame(i) for i in range(3))
    machine.run_until(machine.now_ns + 10_000)
    state = machine.ring_state()
    assert state.avail_idx == 3
    assert state.last_avail_idx == 0
    assert state.num_free == 253
    assert state.timer_armed is True
    assert state.host_notifications is False
    assert state.avail_event is not None
    machine.run()
    state = machine.ring_state()
    assert state.used_idx == 3
    assert state.last_avail_idx == 3
    assert state.timer_armed is False
