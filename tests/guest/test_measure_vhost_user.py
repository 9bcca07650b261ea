"""Fast tests of the vhost-user comparison helpers, which need no QEMU or root."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from .measure_vhost_user import (
    Configuration,
    _derived_fields,
    _run_ok,
    format_table,
    paired_ratios,
    pool_reports,
    summarize,
)
from .netns import HostLink
from .vhost_user_backend import (
    _last_json_object,
    backend_command,
    cpu_times,
    listening,
)


def builtin_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "ok": True,
        "udp_sent": 1000,
        "udp_pps": 40_000,
        "ping_rtt_avg_ms": 1.5,
        "received_datagrams": 1000,
        "distinct_datagrams": 1000,
        "tap_rx_packets": 1020,
        "tx_kicks_run": 204,
        "tx_interrupts_run": 51,
        "tx_kicks_per_packet": 0.2,
    }
    record.update(changes)
    record.update(_derived_fields(record))
    return record


def vhost_user_record(**changes: Any) -> dict[str, Any]:
    record = builtin_record(tx_kicks_run=None, tx_interrupts_run=None)
    record.update(
        backend_exit_code=0,
        backend_killed=False,
        backend_sent=1020,
        backend_dropped={},
        backend_protocol_errors=0,
        backend_tx_kicks=10,
        backend_tx_kick_writes=12,
        backend_tx_interrupts=20,
        backend_cpu_s=0.0204,
        backend_cpu_system_s=0.0102,
    )
    record.update(changes)
    record.update(_derived_fields(record))
    return record


def test_derived_fields_of_builtin_run() -> None:
    record = builtin_record()

    assert record["tx_kicks_per_frame"] == 0.2
    assert record["tx_interrupts_per_frame"] == 0.05
    assert record["backend_cpu_us_per_frame"] is None
    assert record["lost"] == 0
    assert record["duplicates"] == 0


def test_derived_fields_prefer_kick_writes() -> None:
    record = vhost_user_record()

    assert record["tx_kicks_per_frame"] == round(12 / 1020, 4)
    assert record["tx_interrupts_per_frame"] == round(20 / 1020, 4)
    assert record["backend_cpu_us_per_frame"] == 20.0
    assert record["backend_system_us_per_frame"] == 10.0


def test_derived_fields_without_probe_use_kicks() -> None:
    record = vhost_user_record(backend_tx_kick_writes=None)

    assert record["tx_kicks_per_frame"] == round(10 / 1020, 4)


def test_derived_fields_count_losses_and_duplicates() -> None:
    record = builtin_record(received_datagrams=998, distinct_datagrams=997)

    assert record["lost"] == 2
    assert record["duplicates"] == 1
    assert not _run_ok(record)


def test_run_ok_checks_backend() -> None:
    assert _run_ok(vhost_user_record())
    assert not _run_ok(vhost_user_record(backend_exit_code=1))
    assert not _run_ok(vhost_user_record(backend_killed=True))
    assert not _run_ok(vhost_user_record(backend_dropped={"frame-empty": 1}))
    assert not _run_ok(vhost_user_record(backend_protocol_errors=1))


def test_summarize_gives_median_and_range() -> None:
    runs = [builtin_record(udp_pps=pps) for pps in (30_000, 50_000, 40_000)]
    runs.append(builtin_record(udp_pps=None, ok=False))

    summary = summarize(runs)

    assert summary["udp_pps"] == 40_000
    assert summary["udp_pps_range"] == [30_000, 50_000]
    assert summary["backend_cpu_us_per_frame"] is None
    assert summary["runs"] == 4
    assert summary["ok_runs"] == 3


def test_format_table_has_one_row_per_configuration() -> None:
    configurations = [
        Configuration("builtin", "bh", True),
        Configuration("vhost-user", "bh", True),
    ]
    report = {
        "configurations": [
            {
                "device": c.device,
                "tx": c.tx,
                "event_idx": c.event_idx,
                "median": summarize([vhost_user_record()]),
            }
            for c in configurations
        ]
    }

    lines = format_table(report).splitlines()

    assert len(lines) == 4
    assert lines[2].startswith("| bh | on | builtin | 40,000 [40,000-40,000] |")
    assert lines[3].endswith("| 10.0 [10.0-10.0] | 0/0 | 1/1 |")


def test_configuration_name() -> None:
    assert Configuration("vhost-user", "timer", False).name == (
        "timer/event_idx=off/vhost-user"
    )


def test_last_json_object_skips_text() -> None:
    text = 'starting\n{"sent": 3}\n\n'

    assert _last_json_object(text) == {"sent": 3}
    assert _last_json_object("no json here") is None
    assert _last_json_object("{broken") is None


def test_listening_sees_listener_only(tmp_path: Path) -> None:
    path = tmp_path / "probe.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        assert not listening(path)
        server.listen(1)
        assert listening(path)
    finally:
        server.close()


def test_cpu_times_of_running_process() -> None:
    times = cpu_times(os.getpid())

    assert times is not None
    assert times.user_s + times.system_s > 0
    assert cpu_times(2**22 + 1) is None


def test_backend_command_options(tmp_path: Path) -> None:
    link = HostLink(namespace="vne-test", tap="vnetap0")

    plain = backend_command(link, tmp_path / "s.sock", "timer", duration_s=2.0)
    probed = backend_command(link, tmp_path / "s.sock", "bh", probe=True)

    assert plain[:3] == [sys.executable, "-m", "device.cli"]
    assert plain[3:] == [
        "vhost-user",
        "--socket", str(tmp_path / "s.sock"),
        "--to", "tap:vnetap0",
        "--netns", "vne-test",
        "--tx-mode", "timer",
        "--json",
        "--duration", "2.0",
    ]  # fmt: skip
    assert probed[1].endswith("backend_probe.py")
    assert "--duration" not in probed


def test_pool_reports_merges_equal_configurations() -> None:
    def report(pps: int) -> dict[str, Any]:
        runs = [vhost_user_record(udp_pps=pps)]
        entry = {"device": "vhost-user", "tx": "bh", "event_idx": True, "runs": runs}
        other = {**entry, "event_idx": False}
        return {"configurations": [entry, other]}

    pooled = pool_reports([report(10_000), report(30_000)])

    assert len(pooled["configurations"]) == 2
    first = pooled["configurations"][0]
    assert [run["udp_pps"] for run in first["runs"]] == [10_000, 30_000]
    assert first["median"]["udp_pps"] == 20_000
    assert first["median"]["runs"] == 2


def test_paired_ratios_pair_runs_by_round() -> None:
    def entry(device: str, rates: list[int]) -> dict[str, Any]:
        runs = [builtin_record(udp_pps=rate) for rate in rates]
        return {"device": device, "tx": "timer", "event_idx": False, "runs": runs}

    report = {
        "configurations": [
            entry("builtin", [10_000, 40_000, 20_000]),
            entry("vhost-user", [20_000, 20_000, 30_000]),
        ]
    }

    lines = paired_ratios(report).splitlines()

    assert len(lines) == 3
    assert lines[2] == "| timer | off | 1.50 [0.50-2.00] | 2 of 3 |"
