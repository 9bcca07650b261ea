"""CLI mistakes a user can make end with one line on stderr and exit code 2.

Also: ``run`` works for an unprivileged user, in a folder of its own.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from unprivileged import skip_reason, unprivileged_cli

from backends import read_capture
from device.scenarios import SAMPLE_CAPTURE

EXIT_USAGE = 2


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], *words: str
) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_USAGE, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for word in words:
        assert word in lines[0]


def raw_ip_capture(path: Path) -> Path:
    """Write a pcap file of link type 101 (raw IP) with one 20-byte packet."""
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
    record = struct.pack("<IIII", 0, 0, 20, 20) + bytes(20)
    path.write_bytes(header + record)
    return path


def test_replay_missing_capture(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pcap"
    result = run_cli("replay", str(missing), "--to", "loopback")
    assert_one_line_error(result, str(missing), "not found")


def test_replay_raw_ip_link_type(tmp_path: Path) -> None:
    capture = raw_ip_capture(tmp_path / "raw.pcap")
    result = run_cli("replay", str(capture), "--to", "loopback")
    assert_one_line_error(result, "link type 101")


def test_replay_invalid_backend() -> None:
    result = run_cli("replay", str(SAMPLE_CAPTURE), "--to", "tape:x")
    assert_one_line_error(result, "tape:x", "pcap:PATH")


def test_replay_invalid_queue_size() -> None:
    result = run_cli(
        "replay", str(SAMPLE_CAPTURE), "--to", "loopback", "--queue-size", "100"
    )
    assert_one_line_error(result, "--queue-size 100")


def test_replay_invalid_rate() -> None:
    result = run_cli("replay", str(SAMPLE_CAPTURE), "--to", "loopback", "--rate", "0")
    assert_one_line_error(result, "--rate")


def test_replay_pcap_output_unwritable(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "out.pcap"
    result = run_cli("replay", str(SAMPLE_CAPTURE), "--to", f"pcap:{target}")
    assert_one_line_error(result, str(target))


@pytest.mark.root
def test_replay_namespace_not_found() -> None:
    result = run_cli(
        "replay", str(SAMPLE_CAPTURE), "--to", "tap:vnetest0", "--netns", "vne-missing"
    )
    assert_one_line_error(result, "vne-missing", "not found")


@pytest.mark.root
def test_attach_namespace_not_found() -> None:
    result = run_cli(
        "attach", "tap:vnetest0", "--address", "192.0.2.2/24", "--netns", "vne-missing"
    )
    assert_one_line_error(result, "vne-missing", "not found")


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("192.0.2.2", ("ADDR/PREFIX",)),
        ("192.0.2.300/24", ("192.0.2.300/24",)),
        ("2001:db8::2/64", ("only IPv4",)),
        ("192.0.2.0/24", ("network or broadcast",)),
        ("192.0.2.255/24", ("network or broadcast",)),
    ],
)
def test_attach_invalid_address(address: str, words: tuple[str, ...]) -> None:
    result = run_cli("attach", "loopback", "--address", address, "--duration", "1")
    assert_one_line_error(result, "--address", *words)


def test_attach_same_host_address() -> None:
    result = run_cli(
        "attach",
        "tap:vnetest0",
        "--address",
        "192.0.2.2/24",
        "--host-address",
        "192.0.2.2/24",
    )
    assert_one_line_error(result, "192.0.2.2")


def test_attach_host_address_other_network() -> None:
    result = run_cli(
        "attach",
        "tap:vnetest0",
        "--address",
        "192.0.2.2/25",
        "--host-address",
        "192.0.2.200/25",
    )
    assert_one_line_error(result, "192.0.2.2/25", "192.0.2.128/25")


@pytest.mark.root
def test_attach_address_in_use(netns: str) -> None:
    subprocess.run(
        ["ip", "-n", netns, "addr", "add", "192.0.2.2/32", "dev", "lo"], check=True
    )
    result = run_cli(
        "attach", "tap:vnetest0", "--address", "192.0.2.2/24", "--netns", netns
    )
    assert_one_line_error(result, "192.0.2.2", "already in use")


def test_attach_loopback_runs_for_duration() -> None:
    result = run_cli(
        "attach", "loopback", "--address", "192.0.2.2/24", "--duration", "0.2", "--json"
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["address"] == "192.0.2.2/24"
    assert stats["seconds"] >= 0.2


@pytest.fixture
def nobody():
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with unprivileged_cli() as runner:
        if isinstance(runner, str):
            pytest.skip(runner)
        yield runner


def test_run_without_root(nobody) -> None:
    result = nobody.run("run", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    output = nobody.workdir / "virtio-net-emu-run.pcap"
    frames = [frame for _, frame in read_capture(output)]
    expected = [frame for _, frame in read_capture(SAMPLE_CAPTURE)]
    assert frames == expected
    assert report["frames"] == len(expected)
    assert report["sent"] == len(expected)
    assert report["dropped"] == {}
    assert report["kicks"] >= 1
    assert report["vm_exits"] >= report["kicks"]


def test_run_text_without_root(nobody) -> None:
    result = nobody.run("run")
    assert result.returncode == 0, result.stderr
    for word in ("frames: 20", "kicks:", "VM exits:", "interrupts:", "timer fires:"):
        assert word in result.stdout
    assert "dropped: none" in result.stdout


def test_replay_tap_without_permission(nobody) -> None:
    capture = nobody.library / "device" / "data" / "sample.pcap"
    result = nobody.run("replay", str(capture), "--to", "tap:vnetest0")
    assert_one_line_error(result, "vnetest0", "CAP_NET_ADMIN")


def test_attach_tap_without_permission(nobody) -> None:
    address = free_address()
    result = nobody.run("attach", "tap:vnetest0", "--address", f"{address}/24")
    assert_one_line_error(result, "vnetest0", "CAP_NET_ADMIN")


def free_address() -> str:
    """Return an address of 192.0.2.0/24 that no interface here has."""
    listing = subprocess.run(
        ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True
    ).stdout
    for last in range(200, 250):
        address = f"192.0.2.{last}"
        if f" {address}/" not in listing:
            return address
    pytest.skip("every address from 192.0.2.200 to 192.0.2.249 is in use here")
