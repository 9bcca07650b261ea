"""Compare the project's vhost-user backend with QEMU's built-in virtio-net.

For each TX mode and EVENT_IDX setting, the same guest runs the same job
(``ping:PINGS,udp:COUNT:SIZE``) on two devices:

- ``builtin``: QEMU's virtio-net with ``tx=MODE`` on a TAP. Kicks and
  interrupts come from QEMU's trace (``virtio_queue_notify``,
  ``virtio_notify``), as in measure.py.
- ``vhost-user``: ``virtio-net-emu vhost-user --tx-mode MODE`` on a TAP.
  Kicks and interrupts come from the backend's per-queue statistics (``tx``).
  The backend runs under backend_probe.py (unless ``--no-probe``), which also
  counts the guest's kick writes behind each kick the backend handled.

Both devices use vectors=0 (INTx) and a fresh namespace and TAP per boot.
Kicks and interrupts per frame are TX-queue counts over the whole boot,
divided by the frames that reached the TAP, because the backend cannot
split its counts at the udp step's marks. The backend's CPU time per frame
counts from the moment it listens until it stops, so it includes the guest's
boot and the event loop's polling. The runs are interleaved (one run
of every configuration, then the next round), so load that changes over
time spreads over all configurations.

    python -m tests.guest.measure_vhost_user --repeats 5 --output results.json

prints a Markdown table of medians and ranges, and one of the pps ratios of
the runs of one round. ``--table A.json B.json`` prints both tables again
for the runs of earlier outputs, pooled. All figures come from a TCG
guest on the machine the output records, and compare configurations on that
machine only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .build_image import GuestImage, build_image
from .debian_packages import HOST_PACKAGES, MissingDependency, ensure_packages
from .measure import machine_info, measure_configuration
from .netns import HostLink, tap_namespace
from .qemu import TapNetwork, VhostUserNetwork
from .vhost_user_backend import BackendRun, running_backend

__all__ = [
    "Configuration",
    "format_table",
    "main",
    "measure_run",
    "paired_ratios",
    "pool_reports",
    "summarize",
]

logger = logging.getLogger(__name__)

DEVICES = ("builtin", "vhost-user")

#: Fields summarized as median and range, in table order.
SUMMARY_FIELDS = (
    "udp_pps",
    "ping_rtt_avg_ms",
    "tx_kicks_per_frame",
    "tx_interrupts_per_frame",
    "tx_kicks_per_packet",
    "backend_cpu_us_per_frame",
    "backend_system_us_per_frame",
    "lost",
    "duplicates",
)

_TX_RING = "1"  # transmitq1 (virtio 1.2, 5.1.2), as JSON keys are strings


@dataclasses.dataclass(frozen=True)
class Configuration:
    device: str
    tx: str
    event_idx: bool

    @property
    def name(self) -> str:
        event_idx = "on" if self.event_idx else "off"
        return f"{self.tx}/event_idx={event_idx}/{self.device}"


def measure_run(
    image: GuestImage,
    configuration: Configuration,
    job: str,
    port: int = 9000,
    *,
    probe: bool = True,
    py_spy_output: Path | None = None,
    backend_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Boot once in a new namespace and return the run's record."""
    load = os.getloadavg()[0]
    with tap_namespace() as link:
        if configuration.device == "builtin":
            network = TapNetwork(
                link.namespace, link.tap, configuration.tx, configuration.event_idx
            )
            record = measure_configuration(image, network, job, port, link)
        else:
            record = _measure_vhost_user(
                image,
                configuration,
                job,
                port,
                link,
                probe,
                py_spy_output,
                backend_args,
            )
    record["load_average_1min"] = load
    record.update(_derived_fields(record))
    return record


def _measure_vhost_user(
    image: GuestImage,
    configuration: Configuration,
    job: str,
    port: int,
    link: HostLink,
    probe: bool,
    py_spy_output: Path | None,
    backend_args: Sequence[str],
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vne-measure-") as directory:
        socket_path = Path(directory) / "vhost-user.sock"
        with running_backend(
            link,
            socket_path,
            configuration.tx,
            probe=probe,
            extra_args=backend_args,
        ) as run:
            network = VhostUserNetwork(
                socket_path, configuration.event_idx, link.namespace
            )
            with _PySpyRecording(run.pid, py_spy_output):
                record = measure_configuration(image, network, job, port, link)
    record.update(_backend_fields(run))
    return record


class _PySpyRecording:
    """Record the backend's stacks with py-spy while the block runs, if asked."""

    def __init__(self, pid: int, output: Path | None) -> None:
        self._pid = pid
        self._output = output
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> None:
        if self._output is None:
            return
        command = [
            "py-spy", "record", "--pid", str(self._pid), "--rate", "1000",
            "--format", "raw", "--nonblocking", "--output", str(self._output),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def __exit__(self, *exc_info: object) -> None:
        if self._process is None:
            return
        # py-spy writes its output when it gets SIGINT.
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            logger.error("py-spy (PID %d) did not stop; killing it", self._process.pid)
            self._process.kill()
            self._process.wait()


def _backend_fields(run: BackendRun) -> dict[str, Any]:
    stats = run.stats or {}
    tx = stats.get("tx", {})
    writes = stats.get("probe_kick_writes", {}).get(_TX_RING)
    return {
        "backend_exit_code": run.exit_code,
        "backend_killed": run.killed,
        "backend_sent": stats.get("sent"),
        "backend_dropped": stats.get("dropped"),
        "backend_protocol_errors": stats.get("protocol_errors"),
        # Kicks the backend handled; an eventfd read can cover several writes.
        "backend_tx_kicks": tx.get("kicks"),
        "backend_tx_kick_writes": writes,
        "backend_tx_interrupts": tx.get("interrupts"),
        "backend_tx_interrupts_suppressed": tx.get("interrupts_suppressed"),
        **_cpu_fields(run),
        "backend_stderr_tail": run.stderr.splitlines()[-5:] if run.stderr else [],
    }


def _cpu_fields(run: BackendRun) -> dict[str, float | None]:
    start, stop = run.cpu_at_start, run.cpu_at_stop
    if start is None or stop is None:
        return {"backend_cpu_s": None, "backend_cpu_system_s": None}
    system_s = stop.system_s - start.system_s
    user_s = stop.user_s - start.user_s
    return {
        "backend_cpu_s": round(user_s + system_s, 3),
        "backend_cpu_system_s": round(system_s, 3),
    }


def _ratio(count: int | float | None, frames: int | None, scale: float = 1.0) -> Any:
    if count is None or not frames:
        return None
    return round(count * scale / frames, 4)


def _derived_fields(record: dict[str, Any]) -> dict[str, Any]:
    """Per-frame figures and loss counts, the same way for both devices."""
    frames = record.get("tap_rx_packets")
    if "backend_tx_kicks" in record:
        kicks = record["backend_tx_kick_writes"]
        if kicks is None:
            kicks = record["backend_tx_kicks"]
        interrupts = record["backend_tx_interrupts"]
    else:
        kicks = record.get("tx_kicks_run")
        interrupts = record.get("tx_interrupts_run")
    received = record.get("received_datagrams")
    distinct = record.get("distinct_datagrams")
    sent = record.get("udp_sent")
    return {
        "tx_kicks_per_frame": _ratio(kicks, frames),
        "tx_interrupts_per_frame": _ratio(interrupts, frames),
        "backend_cpu_us_per_frame": _ratio(record.get("backend_cpu_s"), frames, 1e6),
        "backend_system_us_per_frame": _ratio(
            record.get("backend_cpu_system_s"), frames, 1e6
        ),
        "lost": None if received is None or not sent else sent - received,
        "duplicates": (
            None if received is None or distinct is None else received - distinct
        ),
    }


def _run_ok(record: dict[str, Any]) -> bool:
    if not record["ok"] or record.get("lost") != 0 or record.get("duplicates") != 0:
        return False
    if "backend_exit_code" not in record:
        return True
    return (
        record["backend_exit_code"] == 0
        and not record["backend_killed"]
        and record["backend_dropped"] == {}
        and record["backend_protocol_errors"] == 0
    )


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the median and [min, max] of each summary field, and the ok count."""
    summary: dict[str, Any] = {}
    for field in SUMMARY_FIELDS:
        values = [run[field] for run in runs if run.get(field) is not None]
        summary[field] = statistics.median(values) if values else None
        summary[f"{field}_range"] = [min(values), max(values)] if values else None
    summary["runs"] = len(runs)
    summary["ok_runs"] = sum(_run_ok(run) for run in runs)
    return summary


def _cell(summary: dict[str, Any], field: str, digits: int) -> str:
    median = summary.get(field)
    if median is None:
        return "-"
    low, high = summary[f"{field}_range"]
    return f"{median:,.{digits}f} [{low:,.{digits}f}-{high:,.{digits}f}]"


def format_table(report: dict[str, Any]) -> str:
    """Return a Markdown table of the report's medians, with [min-max] ranges."""
    header = (
        "| mode | EVENT_IDX | device | UDP pps | ping RTT ms | TX kicks/frame"
        " | TX interrupts/frame | backend CPU us/frame | of which system"
        " | lost/dup | ok runs |"
    )
    lines = [header, "|" + "---|" * 11]
    for entry in report["configurations"]:
        summary = entry["median"]
        event_idx = "on" if entry["event_idx"] else "off"
        lost = summary["lost_range"][1] if summary["lost_range"] else "-"
        duplicates = (
            summary["duplicates_range"][1] if summary["duplicates_range"] else "-"
        )
        cells = [
            entry["tx"],
            event_idx,
            entry["device"],
            _cell(summary, "udp_pps", 0),
            _cell(summary, "ping_rtt_avg_ms", 2),
            _cell(summary, "tx_kicks_per_frame", 4),
            _cell(summary, "tx_interrupts_per_frame", 4),
            _cell(summary, "backend_cpu_us_per_frame", 1),
            _cell(summary, "backend_system_us_per_frame", 1),
            f"{lost}/{duplicates}",
            f"{summary['ok_runs']}/{summary['runs']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_ratios(report: dict[str, Any]) -> str:
    """Return a Markdown table of vhost-user/builtin UDP pps ratios, run by run.

    The n-th vhost-user run and the n-th built-in run of a mode ran in the
    same round, at most a few boots apart, so load that other processes put
    on the machine skews their ratio less than either figure. A ratio above
    1 means the backend was faster.
    """
    by_key = {
        (entry["device"], entry["tx"], entry["event_idx"]): entry["runs"]
        for entry in report["configurations"]
    }
    lines = [
        "| mode | EVENT_IDX | pps ratio vhost-user/builtin | backend faster |",
        "|---|---|---|---|",
    ]
    for (device, tx, event_idx), runs in by_key.items():
        builtin = by_key.get(("builtin", tx, event_idx))
        if device != "vhost-user" or builtin is None:
            continue
        ratios = [
            ours["udp_pps"] / theirs["udp_pps"]
            for ours, theirs in zip(runs, builtin)
            if ours.get("udp_pps") and theirs.get("udp_pps")
        ]
        if not ratios:
            continue
        median = statistics.median(ratios)
        faster = sum(ratio > 1 for ratio in ratios)
        lines.append(
            f"| {tx} | {'on' if event_idx else 'off'} | {median:.2f}"
            f" [{min(ratios):.2f}-{max(ratios):.2f}] | {faster} of {len(ratios)} |"
        )
    return "\n".join(lines)


def pool_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the runs of equal configurations of several reports, in first-seen order.

    The summaries are computed again over the pooled runs. Other fields of
    the configurations come from the first report that has them.
    """
    pooled: dict[tuple[str, str, bool], dict[str, Any]] = {}
    for report in reports:
        for entry in report["configurations"]:
            key = (entry["device"], entry["tx"], entry["event_idx"])
            if key in pooled:
                pooled[key]["runs"] = pooled[key]["runs"] + entry["runs"]
            else:
                pooled[key] = dict(entry)
    for entry in pooled.values():
        entry["median"] = summarize(entry["runs"])
    return {"configurations": list(pooled.values())}


def _configurations(arguments: argparse.Namespace) -> list[Configuration]:
    return [
        Configuration(device, tx, event_idx == "on")
        for tx in arguments.tx
        for event_idx in arguments.event_idx
        for device in arguments.devices
    ]


def _measure_all(
    image: GuestImage, arguments: argparse.Namespace
) -> list[dict[str, Any]]:
    job = f"ping:{arguments.pings},udp:{arguments.count}:{arguments.size}"
    configurations = _configurations(arguments)
    runs: dict[Configuration, list[dict[str, Any]]] = {c: [] for c in configurations}
    for repeat in range(arguments.repeats):
        for configuration in configurations:
            logger.info(
                "round %d of %d: %s", repeat + 1, arguments.repeats, configuration.name
            )
            py_spy_output = None
            if arguments.py_spy is not None and configuration.device == "vhost-user":
                arguments.py_spy.mkdir(parents=True, exist_ok=True)
                file_name = configuration.name.replace("/", "_") + f"_{repeat + 1}.txt"
                py_spy_output = arguments.py_spy / file_name
            record = measure_run(
                image,
                configuration,
                job,
                arguments.port,
                probe=not arguments.no_probe,
                py_spy_output=py_spy_output,
                backend_args=shlex.split(arguments.backend_args),
            )
            runs[configuration].append(record)
    return [
        {
            **dataclasses.asdict(configuration),
            "vectors": 0,
            "runs": records,
            "median": summarize(records),
        }
        for configuration, records in runs.items()
    ]


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job = parser.add_argument_group("guest job")
    job.add_argument(
        "--count", type=int, default=20_000,
        help="UDP datagrams per run (default: %(default)s)",
    )  # fmt: skip
    job.add_argument(
        "--size", type=int, default=64,
        help="UDP payload bytes (default: %(default)s)",
    )  # fmt: skip
    job.add_argument(
        "--pings", type=int, default=20,
        help="ping requests per run, 0.2 s apart (default: %(default)s)",
    )  # fmt: skip
    job.add_argument(
        "--port", type=int, default=9000,
        help="UDP destination port (default: %(default)s)",
    )  # fmt: skip

    matrix = parser.add_argument_group("configurations")
    matrix.add_argument(
        "--repeats", type=int, default=5,
        help="boots per configuration (default: %(default)s)",
    )  # fmt: skip
    matrix.add_argument(
        "--tx", nargs="+", choices=("bh", "timer"), default=["bh", "timer"],
        help="TX modes (default: both)",
    )  # fmt: skip
    matrix.add_argument(
        "--event-idx", nargs="+", choices=("on", "off"), default=["on", "off"],
        help="EVENT_IDX settings (default: both)",
    )  # fmt: skip
    matrix.add_argument(
        "--devices", nargs="+", choices=DEVICES, default=list(DEVICES),
        help="devices to measure (default: both)",
    )  # fmt: skip

    backend = parser.add_argument_group("vhost-user backend")
    backend.add_argument(
        "--no-probe", action="store_true",
        help="run the backend's plain command, without counting kick writes",
    )  # fmt: skip
    backend.add_argument(
        "--backend-args", default="", metavar="ARGS",
        help="extra options for the backend's vhost-user command, such as"
        " '--ring-poll-us 0'",
    )  # fmt: skip
    backend.add_argument(
        "--py-spy", type=Path, default=None, metavar="DIR",
        help="record the backend's stacks with py-spy into DIR (collapsed format)",
    )  # fmt: skip

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output", type=Path, default=None,
        help="write the JSON report to this file",
    )  # fmt: skip
    output.add_argument(
        "--table", type=Path, nargs="+", default=None, metavar="JSON",
        help="print the table of earlier JSON reports, their runs pooled, and exit",
    )  # fmt: skip
    parser.add_argument(
        "--install", action="store_true", help="install missing Debian packages"
    )
    return parser.parse_args(argv)


def _report(
    image: GuestImage, arguments: argparse.Namespace, argv: list[str] | None
) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine_info(image)}
    report["settings"] = {
        "count": arguments.count,
        "size": arguments.size,
        "pings": arguments.pings,
        "repeats": arguments.repeats,
        "probe": not arguments.no_probe,
        "backend_args": arguments.backend_args,
        "script": "python -m tests.guest.measure_vhost_user "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    report["configurations"] = _measure_all(image, arguments)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    return report


def main(argv: list[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    if arguments.table is not None:
        reports = [json.loads(path.read_text()) for path in arguments.table]
        pooled = pool_reports(reports)
        sys.stdout.write(format_table(pooled) + "\n\n" + paired_ratios(pooled) + "\n")
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        ensure_packages(HOST_PACKAGES, install=arguments.install)
        image = build_image(install=arguments.install)
    except MissingDependency as error:
        logger.error("%s", error)
        return 1

    report = _report(image, arguments, argv)
    if arguments.output is not None:
        arguments.output.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(format_table(report) + "\n\n" + paired_ratios(report) + "\n")
    all_ok = all(
        entry["median"]["ok_runs"] == entry["median"]["runs"]
        for entry in report["configurations"]
    )
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
