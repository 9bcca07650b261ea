"""The step debugger: stops, breakpoints, state, and the ``step`` command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device.cli import main
from device.scenarios import SAMPLE_CAPTURE, figure
from device.stepper import (
    Condition,
    Stepper,
    load_scenario,
    notifications_disabled,
    num_free_below,
    parse_breakpoint,
    queue_stopped,
    timer_armed,
)
from device.trace import Step, TraceRecord

REPO = Path(__file__).resolve().parents[2]


def figure_records() -> tuple[list[TraceRecord], int]:
    """Run the figure scenario unstepped; return its records and stop threshold."""
    machine = figure()
    machine.run()
    return machine.trace.records, machine.guest.config.stop_threshold


def last_before(records: list[TraceRecord], index: int, step: Step) -> int | None:
    """Index of the last record of ``step`` before ``index`` for the same packet."""
    packet = records[index].packet
    for earlier in range(index - 1, -1, -1):
        record = records[earlier]
        if record.step is step and record.packet == packet:
            return earlier
    return None


def detail_number(record: TraceRecord) -> int:
    match = re.search(r"num_free (\d+)", record.detail)
    assert match is not None, f"no num_free in detail {record.detail!r}"
    return int(match.group(1))


# -- the figure scenario follows the table -------------------------------------------


def test_figure_has_all_23_steps() -> None:
    records, _ = figure_records()
    seen = {int(record.step) for record in records}
    missing = sorted(set(range(1, 24)) - seen)
    assert missing == []


def test_figure_packet_starts_in_order() -> None:
    records, _ = figure_records()
    first: dict[int, dict[int, int]] = {}
    for index, record in enumerate(records):
        if record.packet is not None and record.step <= Step.VIRTQUEUE_KICK:
            first.setdefault(record.packet, {}).setdefault(int(record.step), index)
    assert first, "no packet went through steps 1 to 4"
    for packet, steps in first.items():
        assert sorted(steps) == [1, 2, 3, 4], f"packet {packet} steps {steps}"
        order = [steps[1], steps[2], steps[3], steps[4]]
        assert order == sorted(order), f"packet {packet} out of order: {steps}"


def test_figure_host_steps_follow_an_exit() -> None:
    records, _ = figure_records()
    in_scheduled_work = False
    for index, record in enumerate(records):
        previous = records[index - 1].step if index else None
        if record.step in (Step.TX_TIMER_FIRE, Step.TX_BH_RUN):
            in_scheduled_work = True
        elif record.step is Step.VMM_HANDLE_PIO:
            in_scheduled_work = False
        if record.step is Step.HANDLE_TX:
            assert (
                previous is Step.VMM_HANDLE_PIO
            ), f"record {index}: 9 after {previous}"
        if record.step is Step.SCHEDULE_FLUSH:
            assert previous is Step.HANDLE_TX, f"record {index}: 10 after {previous}"
        if record.step is Step.SET_NOTIFICATION_OFF:
            # After the kick's timer arm, or a re-arm inside the timer's flush.
            assert (
                previous is Step.SCHEDULE_FLUSH or in_scheduled_work
            ), f"record {index}: 11 after {previous}"
        if record.step is Step.NOTIFICATIONS_DISABLED:
            assert previous is Step.SET_NOTIFICATION_OFF, f"record {index}: 12"


def test_figure_stops_only_below_threshold() -> None:
    records, threshold = figure_records()
    stops = [i for i, r in enumerate(records) if r.step is Step.NETIF_STOP_QUEUE]
    assert stops
    for index in stops:
        assert records[index].state.num_free < threshold
        check = last_before(records, index, Step.CAPACITY_CHECK)
        assert check is not None, f"stop at record {index} without step 13"
        assert detail_number(records[check]) < threshold
        assert records[index + 1].step is Step.ENABLE_CB_DELAYED
        assert records[index + 2].step is Step.INTERRUPTS_UNMASKED
        assert records[index + 3].step is Step.USED_CHECK
        assert records[index + 4].step in (
            Step.WAIT_FOR_INTERRUPT,
            Step.FREE_OLD_XMIT_SKBS_AGAIN,
        )


def test_figure_starts_queue_after_reclaim() -> None:
    records, threshold = figure_records()
    starts = [i for i, r in enumerate(records) if r.step is Step.NETIF_START_QUEUE]
    assert starts
    for index in starts:
        recheck = last_before(records, index, Step.CAPACITY_RECHECK)
        reclaim = last_before(records, index, Step.FREE_OLD_XMIT_SKBS_AGAIN)
        assert recheck is not None and reclaim is not None
        assert reclaim < recheck
        assert detail_number(records[recheck]) >= threshold
        assert records[index].state.num_free >= threshold
        assert records[index + 1].step is Step.VIRTQUEUE_DISABLE_CB
        assert records[index + 2].step is Step.INTERRUPTS_MASKED


# -- stepping ------------------------------------------------------------------------


def test_stepping_matches_unstepped_run() -> None:
    records, _ = figure_records()
    with Stepper(figure()) as stepper:
        stepped = list(stepper)
        assert stepper.finished
    assert stepped == records


def test_step_returns_next_record() -> None:
    with Stepper(figure()) as stepper:
        first = stepper.step()
        second = stepper.step()
        assert first.reason == "step"
        assert first.record is not None and second.record is not None
        assert second.record.time_ns >= first.record.time_ns
        assert stepper.record is second.record


def test_next_packet_stops_at_start_xmit() -> None:
    with Stepper(figure()) as stepper:
        packets = []
        for _ in range(3):
            stop = stepper.next_packet()
            assert stop.reason == "packet"
            assert stop.record.step is Step.START_XMIT
            packets.append(stop.record.packet)
    assert packets == [0, 1, 2]


def test_break_by_number() -> None:
    with Stepper(figure()) as stepper:
        breakpoint = stepper.add_breakpoint(14)
        stop = stepper.continue_()
        assert stop.reason == "breakpoint"
        assert stop.breakpoint is breakpoint
        assert stop.record.step is Step.NETIF_STOP_QUEUE
        assert breakpoint.hits == 1


def test_break_by_name() -> None:
    with Stepper(figure(), breakpoints=("netif_start_queue",)) as stepper:
        stop = stepper.continue_()
        assert stop.reason == "breakpoint"
        assert stop.record.step is Step.NETIF_START_QUEUE


def test_break_counts_every_hit() -> None:
    records, _ = figure_records()
    expected = sum(1 for r in records if r.step is Step.XMIT_SKB)
    with Stepper(figure()) as stepper:
        breakpoint = stepper.add_breakpoint("xmit_skb")
        stops = 0
        while stepper.continue_().reason == "breakpoint":
            stops += 1
    assert stops == expected
    assert breakpoint.hits == expected


def test_break_on_num_free_edge() -> None:
    machine = figure()
    threshold = machine.guest.config.stop_threshold
    with Stepper(machine) as stepper:
        stepper.add_breakpoint(num_free_below(threshold))
        stop = stepper.continue_()
        assert stop.reason == "breakpoint"
        assert stop.record.state.num_free < threshold
        index = machine.trace.records.index(stop.record)
        assert machine.trace.records[index - 1].state.num_free >= threshold


def test_break_on_timer_armed() -> None:
    with Stepper(figure(), breakpoints=(timer_armed(),)) as stepper:
        stop = stepper.continue_()
        assert stop.reason == "breakpoint"
        assert stop.record.state.timer_armed
        assert stepper.state().timer_armed


def test_break_on_notifications_disabled() -> None:
    with Stepper(figure()) as stepper:
        stepper.add_breakpoint(notifications_disabled())
        stop = stepper.continue_()
        assert stop.reason == "breakpoint"
        assert not stop.record.state.host_notifications
        assert stop.record.step is Step.SET_NOTIFICATION_OFF


def test_break_on_predicate() -> None:
    def device_used_something(state) -> bool:
        return state.used_idx > 0

    with Stepper(figure()) as stepper:
        breakpoint = stepper.add_breakpoint(device_used_something)
        stop = stepper.continue_()
        assert breakpoint.condition is not None
        assert breakpoint.condition.name == "device_used_something"
        assert stop.record.state.used_idx > 0


def test_on_stop_called_at_breakpoints() -> None:
    calls = []
    threads = []

    def on_stop(stepper: Stepper, stop) -> None:
        calls.append((stepper, stop))
        threads.append(threading.current_thread())

    stepper = Stepper.from_scenario("figure", breakpoints=(14,), on_stop=on_stop)
    with stepper:
        first = stepper.continue_()
        second = stepper.continue_()
        rest = stepper.continue_()
    assert [stop for _, stop in calls] == [first, second]
    assert all(owner is stepper for owner, _ in calls)
    # On the caller's thread, so pdb.set_trace() in the hook debugs the caller.
    assert threads == [threading.current_thread()] * 2
    assert rest.reason == "end"


def test_state_is_exact_mid_event() -> None:
    with Stepper(figure(), breakpoints=(14,)) as stepper:
        stop = stepper.continue_()
        state = stepper.state()
    ring = stop.record.state
    assert state.record is stop.record
    assert state.time_ns == stop.record.time_ns
    assert state.tx.ring.num_free == ring.num_free
    assert state.num_free == ring.num_free
    assert state.queue_stopped
    assert state.num_free < state.stop_threshold
    assert state.stats.queue_stops >= 1
    assert state.tx_mode == "timer"


def test_state_lists_next_chains() -> None:
    with Stepper(figure(), breakpoints=("xmit_skb",)) as stepper:
        stepper.continue_()
        state = stepper.state()
    assert state.tx.pending == 1
    head, chain = state.tx.next_chains[0]
    assert chain[0].index == head
    assert [d.len for d in chain][1] == 60  # header, then the 60-byte frame
    assert state.rx.pending > 0
    data = json.loads(json.dumps(state.to_dict()))
    assert data["tx"]["next_chains"][0]["head"] == head


def test_run_until_time() -> None:
    records, _ = figure_records()
    target = records[len(records) // 2].time_ns
    expected = next(r for r in records if r.time_ns >= target)
    with Stepper(figure()) as stepper:
        stop = stepper.run_until(target)
        assert stop.reason == "time"
        assert stop.record == expected
        index = stepper.machine.trace.records.index(stop.record)
        assert stepper.machine.trace.records[index - 1].time_ns < target


def test_run_until_idle_gap() -> None:
    machine = load_scenario("trickle", count=3, interval_ns=1_000_000)
    with Stepper(machine) as stepper:
        stop = stepper.run_until(500_000)
        assert stop.reason == "time"
        assert stop.record is None
        assert stop.time_ns == 500_000
        after = stepper.step()
        assert after.record.time_ns >= 1_000_000


def test_close_ends_machine_thread() -> None:
    stepper = Stepper(figure(), breakpoints=(3,))
    stepper.continue_()
    worker = stepper._worker
    assert worker is not None and worker.is_alive()
    stepper.close()
    assert not worker.is_alive()
    assert stepper._listen not in stepper.machine.trace.listeners


def test_machine_error_reaches_caller() -> None:
    machine = figure()

    def explode(record: TraceRecord) -> None:
        if record.step is Step.VM_EXIT:
            raise RuntimeError("boom at the VM exit")

    machine.trace.listeners.append(explode)
    with Stepper(machine) as stepper:
        with pytest.raises(RuntimeError, match="boom"):
            stepper.continue_()
        assert stepper.finished


def test_parse_breakpoint_forms() -> None:
    assert parse_breakpoint("14") is Step.NETIF_STOP_QUEUE
    assert parse_breakpoint(21) is Step.NETIF_START_QUEUE
    assert parse_breakpoint("netif_stop_queue") is Step.NETIF_STOP_QUEUE
    condition = parse_breakpoint("num_free<20")
    assert isinstance(condition, Condition)
    assert condition.name == "num_free<20"
    assert parse_breakpoint("queue-stopped").name == queue_stopped().name
    for text in ("99", "no_such_step", "num_free<x"):
        with pytest.raises(ValueError, match="invalid breakpoint"):
            parse_breakpoint(text)


def test_trace_off_is_rejected() -> None:
    with pytest.raises(ValueError, match="trace is off"):
        Stepper(figure(trace=False))


# -- scenarios by name -------------------------------------------------------------


def test_load_scenario_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        load_scenario("nope")
    missing = tmp_path / "missing.pcap"
    with pytest.raises(ValueError, match="not found"):
        load_scenario(str(missing))
    with pytest.raises(ValueError, match="only to a capture"):
        load_scenario("figure", rate=1000)


def test_capture_path_with_rate() -> None:
    with Stepper.from_scenario(str(SAMPLE_CAPTURE), rate=10_000) as stepper:
        starts = [r for r in stepper if r.step is Step.START_XMIT]
    assert len(starts) == 20
    gaps = {b.time_ns - a.time_ns for a, b in zip(starts, starts[1:])}
    assert min(gaps) >= 99_000


def test_legacy_stall_by_underscore_name() -> None:
    machine = load_scenario("legacy_stall")
    assert machine.device.tx_mode == "timer-legacy"


# -- the command: script and JSON ----------------------------------------------------


def test_script_prints_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    records, _ = figure_records()
    assert main(["step", "--scenario", "figure", "--script", "--break", "14"]) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = lines[:-1]
    assert len(steps) == len(records)
    assert lines[-1].startswith("end of run at")
    first = steps[0].split()
    assert first[0] == str(int(records[0].step))
    assert first[1] == records[0].side.value
    assert first[2] == records[0].step.label
    marked = [line for line in steps if line.endswith("<- breakpoint 1")]
    assert marked and all(" netif_stop_queue " in line for line in marked)
    assert all(" us " in line and "free=" in line for line in steps)


def test_json_prints_trace_records(capsys: pytest.CaptureFixture[str]) -> None:
    records, _ = figure_records()
    assert main(["step", "--scenario", "figure", "--json", "--script"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(records)
    decoded = [json.loads(line) for line in lines]
    assert decoded == [json.loads(json.dumps(r.to_dict())) for r in records]
    sample = decoded[0]
    for key in ("step", "name", "side", "time_us", "avail_idx", "num_free"):
        assert key in sample


def test_script_mode_without_tty() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "device.cli", "step", "--scenario", "trickle"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "(step)" not in result.stdout
    assert result.stdout.splitlines()[-1].startswith("end of run at")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenario", "nope"], "unknown scenario 'nope'"),
        (["--scenario", "/nonexistent/x.pcap"], "not found"),
        (["--scenario", "figure", "--rate", "100"], "only to a capture"),
        (["--break", "no_such_step"], "invalid breakpoint"),
        (["--queue-size", "100"], "queue size 100 is invalid"),
    ],
)
def test_command_user_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["step", "--script", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("virtio-net-emu step: ")
    assert message in err
    assert "Traceback" not in err


def test_module_run_reports_user_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "device.cli", "step", "--scenario", "nope"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("virtio-net-emu step: unknown scenario 'nope'")
    assert "Traceback" not in result.stderr


# -- the command in a real terminal --------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) with one session.

    ``close`` kills the server and removes its socket, so nothing of the
    test stays behind.
    """

    def __init__(self, command: list[str], socket: Path) -> None:
        self.socket = socket
        self.session = "stepper"
        shell = " ".join(_quote(part) for part in command)
        self.run(
            "new-session", "-d", "-s", self.session, "-x", "200", "-y", "50",
            "-c", str(REPO), shell,
        )  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def send(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def screen(self) -> str:
        return self.run(
            "capture-pane", "-p", "-J", "-S", "-", "-t", self.session
        ).stdout

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if len(re.findall(pattern, screen)) >= count:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} x{count} not on screen:\n{screen}")

    def alive(self) -> bool:
        return self.run("has-session", "-t", self.session).returncode == 0

    def close(self) -> None:
        self.run("kill-server")
        self.socket.unlink(missing_ok=True)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_interactive_in_tmux(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "device.cli", "step", "--scenario", "figure"]
    tmux = Tmux([*command, "--break", "14"], tmp_path / "tmux.sock")
    try:
        tmux.wait_for(r"\(step\) ")
        assert "breakpoint 1: step 14 netif_stop_queue" in tmux.screen()

        tmux.send("Enter")
        screen = tmux.wait_for(r"\(step\) ", 2)
        assert re.search(r"110 guest rx_refill +0\.000 us", screen)

        tmux.send("c", "Enter")
        screen = tmux.wait_for(r"\(step\) ", 3)
        assert "breakpoint 1, step 14 netif_stop_queue:" in screen
        assert re.search(r" 14 guest netif_stop_queue .* queue=stopped", screen)

        tmux.send("p", "Enter")
        screen = tmux.wait_for(r"\(step\) ", 4)
        assert re.search(r"TX queue 1: avail_idx \d+, used_idx \d+", screen)
        assert re.search(r"guest TX queue stopped, num_free \d+", screen)
        assert "TX policy timer: timer" in screen
        assert "stats: packets" in screen

        tmux.send("q", "Enter")
        deadline = time.monotonic() + 15
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not tmux.alive(), "q did not end the step command"
    finally:
        tmux.close()


def test_interactive_commands_without_terminal() -> None:
    """The command loop itself, fed from a pipe through the session object."""
    import io

    from device.stepper import _Session

    out = io.StringIO()
    with Stepper(figure()) as stepper:
        session = _Session(stepper, out, as_json=False)
        session.interact(
            io.StringIO("b 14\nb\nc\nn\nu 400\nd 1\nh\nzz\np\nq\n"), "figure"
        )
    text = out.getvalue()
    assert "breakpoint 1 at step 14 netif_stop_queue" in text
    assert "breakpoint 1, step 14 netif_stop_queue:" in text
    assert " 1 guest start_xmit " in text
    assert "deleted breakpoint 1" in text
    assert "commands:" in text
    assert "unknown command 'zz'" in text
    assert "TX queue 1:" in text
