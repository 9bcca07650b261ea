"""Every capture of the tcpdump corpus through the guest, the device and a backend.

To a TAP: a packet socket on the host side sees each frame the kernel took,
byte for byte and in order, and every other frame is counted under a named
reason. To a pcap file: the frames come out byte for byte.
"""

from __future__ import annotations

import collections
import json
import subprocess
from pathlib import Path

import pytest
from conftest import corpus_captures, run_cli
from tap_capture import HostCapture

from backends import PcapBackend, TapBackend, read_capture
from device.header import MAX_FRAME_SIZE
from device.replay import replay

TAP = "vnetest0"


def capture_frames(path: Path) -> list[bytes]:
    return [frame for _, frame in read_capture(path)]


def assert_totals_add_up(report) -> None:
    assert report.frames == report.sent + sum(report.dropped.values()), report


@pytest.mark.root
@pytest.mark.slow
def test_corpus_to_tap_byte_for_byte(netns: str, corpus_dir: Path) -> None:
    captures = corpus_captures(corpus_dir)
    assert captures, f"no captures in {corpus_dir}"
    totals: collections.Counter[str] = collections.Counter()
    with TapBackend(TAP, netns=netns) as tap:
        host = HostCapture(netns, tap.name)
        try:
            for path in captures:
                frames = capture_frames(path)
                report = replay(path, tap)
                arrived = host.drain()
                assert_totals_add_up(report)
                assert report.frames == len(frames)
                assert len(arrived) == report.sent, path.name
                accepted = [f for f in frames if len(f) <= MAX_FRAME_SIZE]
                if report.sent == len(accepted):
                    assert arrived == accepted, path.name
                else:
                    # The TAP refused some frames: the ones that arrived are
                    # still in the capture's order.
                    assert _is_subsequence(arrived, accepted), path.name
                totals["frames"] += report.frames
                totals["sent"] += report.sent
                totals.update(report.dropped)
            assert host.drops() == 0
        finally:
            host.close()
    dropped = sum(
        count for key, count in totals.items() if key not in ("frames", "sent")
    )
    assert totals["sent"] + dropped == totals["frames"]
    assert set(totals) - {"frames", "sent"} <= {
        "frame-too-large",
        "backend-rejected",
    }


def _is_subsequence(items: list[bytes], sequence: list[bytes]) -> bool:
    remaining = iter(sequence)
    return all(any(item == candidate for candidate in remaining) for item in items)


@pytest.mark.slow
def test_corpus_to_pcap_byte_for_byte(tmp_path: Path, corpus_dir: Path) -> None:
    for path in corpus_captures(corpus_dir):
        output = tmp_path / f"{path.stem}.out.pcap"
        with PcapBackend(output) as backend:
            report = replay(path, backend)
        frames = capture_frames(path)
        accepted = [f for f in frames if len(f) <= MAX_FRAME_SIZE]
        assert capture_frames(output) == accepted, path.name
        assert_totals_add_up(report)
        assert report.dropped.get("frame-too-large", 0) == len(frames) - len(accepted)


@pytest.mark.root
def test_cli_replay_to_tap(netns: str, corpus_dir: Path) -> None:
    path = max(corpus_captures(corpus_dir), key=lambda p: p.stat().st_size)
    frames = capture_frames(path)
    # A persistent TAP, so the packet socket is bound before the CLI sends;
    # the CLI attaches to it and leaves it in place.
    subprocess.run(["ip", "-n", netns, "tuntap", "add", TAP, "mode", "tap"], check=True)
    host = HostCapture(netns, TAP)
    try:
        result = run_cli(
            "replay", str(path), "--to", f"tap:{TAP}", "--netns", netns, "--json"
        )
        arrived = host.drain()
    finally:
        host.close()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    accepted = [f for f in frames if len(f) <= MAX_FRAME_SIZE]
    assert report["frames"] == len(frames)
    assert report["sent"] == len(accepted)
    assert report["frames"] == report["sent"] + sum(report["dropped"].values())
    assert arrived == accepted
    for key in ("kicks", "kicks_suppressed", "interrupts", "vm_exits"):
        assert key in report
