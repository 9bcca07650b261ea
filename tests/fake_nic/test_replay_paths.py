"""``replay`` through the guest and the device: backpressure, pacing, counting."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import CLI, REPO_ROOT, run_cli

from backends import Buffer, LoopbackBackend, PcapWriter, SendStatus, read_capture
from device.replay import PROGRESS_MIN_FRAMES, ProgressBar, replay
from device.scenarios import SAMPLE_CAPTURE, frame_number, make_frame


class BusyBackend(LoopbackBackend):
    """A loopback that returns BUSY for every ``period``-th send.

    Its writable descriptor is the write end of a pipe, which always polls
    writable, so a waiting replay resumes at once.
    """

    def __init__(self, period: int) -> None:
        super().__init__(capacity=1 << 20)
        self.period = period
        self.calls = 0
        self._read_fd, self._write_fd = os.pipe()

    def send(self, header: Buffer, frame: Sequence[Buffer]) -> SendStatus:
        self.calls += 1
        if self.calls % self.period == 0:
            self.send_busy += 1
            return SendStatus.BUSY
        return super().send(header, frame)

    def writable_fileno(self) -> int:
        return self._write_fd

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            os.close(fd)


def write_capture(path: Path, frames: list[bytes], gap_s: float = 0.001) -> Path:
    with PcapWriter(path) as writer:
        for index, frame in enumerate(frames):
            writer.write([frame], timestamp=1_000_000 + index * gap_s)
    return path


@pytest.fixture
def numbered_capture(tmp_path: Path) -> tuple[Path, list[bytes]]:
    frames = [make_frame(number, 60 + number % 1400) for number in range(3000)]
    return write_capture(tmp_path / "numbered.pcap", frames), frames


@pytest.mark.parametrize("tx_mode", ["bh", "timer", "timer-legacy", "immediate"])
def test_replay_busy_loses_nothing(numbered_capture, tx_mode: str) -> None:
    path, frames = numbered_capture
    backend = BusyBackend(period=7)
    try:
        report = replay(path, backend, tx_mode=tx_mode)
    finally:
        backend.close()
    assert backend.sent_frames() == frames
    assert report.sent == len(frames)
    assert report.dropped == {}
    assert report.backend_busy > 0


def test_replay_rate_busy_loses_nothing(numbered_capture) -> None:
    path, frames = numbered_capture
    backend = BusyBackend(period=5)
    try:
        report = replay(path, backend, rate_pps=50_000)
    finally:
        backend.close()
    assert [frame_number(f) for f in backend.sent_frames()] == list(range(len(frames)))
    assert report.sent == len(frames)
    assert report.dropped == {}


def test_replay_rate_takes_its_time(tmp_path: Path) -> None:
    frames = [make_frame(number) for number in range(200)]
    path = write_capture(tmp_path / "rate.pcap", frames)
    backend = LoopbackBackend()
    started = time.monotonic()
    report = replay(path, backend, rate_pps=2000)
    elapsed = time.monotonic() - started
    assert backend.sent_frames() == frames
    # 200 frames at 2000 per second: the last one leaves after 99.5 ms.
    assert elapsed >= 0.099
    assert report.virtual_ns >= 99_500_000
    # Frames that arrive together (a late wake-up) share a kick, so the
    # count depends on the machine's load; a paced run kicks more than once.
    assert report.kicks > 1


def test_replay_pace_keeps_capture_gaps(tmp_path: Path) -> None:
    frames = [make_frame(number) for number in range(20)]
    path = write_capture(tmp_path / "paced.pcap", frames, gap_s=0.01)
    backend = LoopbackBackend()
    started = time.monotonic()
    report = replay(path, backend, pace=True)
    elapsed = time.monotonic() - started
    assert backend.sent_frames() == frames
    assert elapsed >= 0.19
    assert report.sent == 20


def test_replay_counts_oversized_frames(tmp_path: Path) -> None:
    frames = [make_frame(0), make_frame(1, 65550), make_frame(2, 65551), make_frame(3)]
    path = write_capture(tmp_path / "big.pcap", frames)
    backend = LoopbackBackend()
    report = replay(path, backend)
    assert backend.sent_frames() == [frames[0], frames[1], frames[3]]
    assert report.dropped == {"frame-too-large": 1}
    assert report.frames == 4
    assert report.sent == 3


def test_replay_counts_backend_drops(numbered_capture) -> None:
    path, frames = numbered_capture
    backend = LoopbackBackend(capacity=1 << 20)
    backend.fail_sends(3, SendStatus.DROPPED, "backend-rejected")
    report = replay(path, backend)
    assert report.dropped == {"backend-rejected": 3}
    assert report.sent == len(frames) - 3
    assert backend.sent_frames() == frames[3:]


@pytest.mark.parametrize("options", [[], ["--no-event-idx"], ["--queue-size", "64"]])
def test_replay_cli_to_pcap(tmp_path: Path, options: list[str]) -> None:
    output = tmp_path / "out.pcap"
    result = run_cli(
        "replay", str(SAMPLE_CAPTURE), "--to", f"pcap:{output}", "--json", *options
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    frames = [frame for _, frame in read_capture(SAMPLE_CAPTURE)]
    assert [frame for _, frame in read_capture(output)] == frames
    for key in ("frames", "sent", "dropped", "kicks", "kicks_suppressed"):
        assert key in report
    for key in ("interrupts", "vm_exits", "timer_fires"):
        assert key in report
    assert report["frames"] == report["sent"] == len(frames)
    assert report["event_idx"] is ("--no-event-idx" not in options)


def test_replay_no_progress_bar_off_terminal(tmp_path: Path) -> None:
    count = PROGRESS_MIN_FRAMES + 10
    path = write_capture(tmp_path / "long.pcap", [make_frame(n) for n in range(count)])
    result = run_cli("replay", str(path), "--to", "loopback", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout)["sent"] == count


def test_progress_bar_draws_and_clears() -> None:
    stream = io.StringIO()
    bar = ProgressBar(200, stream)
    bar(100)
    bar(200)
    bar.close()
    text = stream.getvalue()
    assert "100/200 frames" in text
    assert "200/200 frames" in text
    assert text.endswith("\r\x1b[K")


def test_replay_progress_bar_on_terminal(tmp_path: Path) -> None:
    count = PROGRESS_MIN_FRAMES + 10
    path = write_capture(tmp_path / "long.pcap", [make_frame(n) for n in range(count)])
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [*CLI, "replay", str(path), "--to", "loopback", "--json"],
            stdout=subprocess.PIPE,
            stderr=terminal,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        )
        os.close(terminal)
        terminal = -1
        stdout, _ = process.communicate(timeout=120)
        drawn = _read_all(controller)
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    assert process.returncode == 0
    assert json.loads(stdout)["sent"] == count
    assert f"{count}/{count} frames" in drawn


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            # Linux reports EIO once the other side of the pty is closed.
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
