"""Named scenarios: each builds a machine that runs deterministically."""

from __future__ import annotations

import pytest

from backends.pcap import read_capture
from device.scenarios import (
    SAMPLE_CAPTURE,
    SCENARIOS,
    build_scenario,
    capture,
    figure,
    frame_number,
    make_frame,
    saturate,
    trickle,
)
from device.trace import Step


def steps_by_packet(machine, packet: int) -> list[int]:
    return [int(r.step) for r in machine.trace if r.packet == packet and r.step < 100]


def test_figure_runs_all_23_steps() -> None:
    machine = figure()
    machine.run()
    seen = {int(r.step) for r in machine.trace if r.step < 100}
    assert seen == set(range(1, 24))


def test_figure_stopper_takes_the_reclaim_branch() -> None:
    machine = figure()
    machine.run()
    records = machine.trace.records
    stopper = next(r.packet for r in records if r.step is Step.FREE_OLD_XMIT_SKBS_AGAIN)
    steps = steps_by_packet(machine, stopper)
    assert steps[-10:] == [13, 14, 15, 16, 17, 19, 20, 21, 22, 23]
    own = [r for r in records if r.packet == stopper]
    add = next(r for r in own if r.step is Step.XMIT_SKB)
    check = next(r for r in own if r.step is Step.USED_CHECK)
    fire = next(r for r in records if r.step is Step.TX_TIMER_FIRE)
    assert add.time_ns < fire.time_ns <= check.time_ns


def test_figure_second_burst_waits_for_the_interrupt() -> None:
    machine = figure()
    machine.run()
    waits = [r.packet for r in machine.trace if r.step is Step.WAIT_FOR_INTERRUPT]
    reclaims = [
        r.packet for r in machine.trace if r.step is Step.FREE_OLD_XMIT_SKBS_AGAIN
    ]
    assert waits
    assert max(waits) > max(reclaims)
    sent = [frame_number(frame) for frame in machine.sent_frames()]
    assert sent == list(range(machine.packets))


@pytest.mark.parametrize(
    ("queue_size", "max_skb_frags"),
    [
        (64, 18),
        (128, 17),
        (512, 18),
        (1024, 18),
    ],
)
def test_figure_fits_other_rings(queue_size: int, max_skb_frags: int) -> None:
    machine = figure(queue_size=queue_size, max_skb_frags=max_skb_frags)
    machine.run()
    seen = {int(r.step) for r in machine.trace if r.step < 100}
    assert seen == set(range(1, 24))


def test_figure_is_deterministic() -> None:
    first = figure()
    first.run()
    second = figure()
    second.run()
    assert [(r.step, r.time_ns, r.packet) for r in first.trace] == [
        (r.step, r.time_ns, r.packet) for r in second.trace
    ]


@pytest.mark.parametrize("mode", ["bh", "immediate"])
def test_figure_runs_in_other_modes(mode: str) -> None:
    machine = figure(mode)
    machine.run()
    sent = [frame_number(frame) for frame in machine.sent_frames()]
    assert sent == list(range(machine.packets))


def test_saturate_counts_every_frame() -> None:
    machine = saturate("timer", count=3000, trace=False)
    machine.run()
    stats = machine.stats()
    sent = [frame_number(frame) for frame in machine.sent_frames()]
    assert sent == sorted(set(sent))
    assert stats.frames + stats.drops.get("qdisc-full", 0) == 3000
    assert stats.queue_stops > 0


def test_trickle_kicks_for_every_packet() -> None:
    machine = trickle("timer", count=5)
    machine.run()
    stats = machine.stats()
    assert stats.frames == 5
    assert stats.kicks == 5
    assert stats.timer_fires == 5
    assert stats.kicks_suppressed == 0


def test_capture_of_a_list_keeps_the_rate() -> None:
    frames = [make_frame(i) for i in range(10)]
    machine = capture("bh", frames=frames, rate_pps=100_000)
    start = machine.now_ns
    machine.run_until(start + 45_000)
    assert len(machine.sent_frames()) == 5
    machine.run()
    assert machine.sent_frames() == frames


def test_capture_of_the_sample_file_sends_every_frame() -> None:
    expected = [frame for _, frame in read_capture(SAMPLE_CAPTURE)]
    machine = capture("timer", rate_pps=1_000_000, trace=False)
    machine.run()
    assert machine.sent_frames() == expected


def test_capture_rejects_a_zero_rate() -> None:
    with pytest.raises(ValueError, match="rate of 0"):
        capture(frames=[make_frame(0)], rate_pps=0)


def test_build_scenario_by_name() -> None:
    assert set(SCENARIOS) == {
        "figure",
        "saturate",
        "trickle",
        "legacy-stall",
        "capture",
    }
    machine = build_scenario("legacy-stall")
    assert machine.device.tx_mode == "timer-legacy"
    machine = build_scenario("trickle", "bh", 64, 17, count=2)
    assert machine.guest.config.queue_size == 64
    assert machine.guest.config.stop_threshold == 19
    with pytest.raises(ValueError, match="unknown scenario 'storm'"):
        build_scenario("storm")


def test_steps_yield_increasing_times() -> None:
    machine = trickle("bh", count=3)
    times = list(machine.steps())
    assert times == sorted(times)
    assert machine.idle
    assert len(machine.sent_frames()) == 3


def test_trace_listener_sees_every_record() -> None:
    machine = figure()
    before = len(machine.trace)
    seen = []
    machine.trace.listeners.append(seen.append)
    machine.run()
    assert len(seen) == len(machine.trace) - before
    assert seen[-1].time_ns <= machine.now_ns
