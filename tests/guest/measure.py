"""Measure guest UDP throughput, ping RTT, kicks and interrupts as JSON.

Each configuration boots the guest ``--repeats`` times with the job
``ping:PINGS,udp:COUNT:SIZE``. Each run records the UDP packets per second
that udpgen measured in the guest, the average ping RTT, the datagrams that
reached the receiver and the boot time. For the built-in device it also
records the TX kicks and TX interrupts per datagram inside the udp window,
from QEMU's trace (see kick_trace.py), both inside the udp window and over
the whole boot (``*_run`` fields). The summary of a configuration is the
median over its runs. measure_vhost_user.py compares the built-in device
with the project's vhost-user backend.

Built-in device, TAP in a new namespace (default: tx=bh and tx=timer, each
with event_idx on and off)::

    python -m tests.guest.measure --repeats 3 --output baseline.json

vhost-user backend already listening on a socket::

    python -m tests.guest.measure --vhost-user /run/vne.sock [--namespace NS]

All figures come from a TCG guest, so they compare configurations on one
machine, not machines. The output records the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .build_image import GuestImage, build_image
from .debian_packages import HOST_PACKAGES, MissingDependency, ensure_packages
from .kick_trace import RX_QUEUE, TX_QUEUE, QueueCounts
from .netns import (
    HostLink,
    UdpReceiver,
    tap_counters,
    tap_namespace,
    udp_counters,
)
from .qemu import QEMU_BINARY, GuestRun, TapNetwork, VhostUserNetwork, boot_guest

__all__ = ["machine_info", "main", "measure_configuration"]

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = (
    "udp_pps",
    "ping_rtt_avg_ms",
    "tx_kicks_per_packet",
    "tx_interrupts_per_packet",
    "boot_s",
)


def machine_info(image: GuestImage) -> dict[str, Any]:
    """Describe the host, QEMU and the guest kernel that the figures come from."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    qemu_version = subprocess.run(
        [QEMU_BINARY, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "host_kernel": platform.release(),
        "qemu": qemu_version[0] if qemu_version else "unknown",
        "guest_kernel": image.kernel_package,
    }


def _per_packet(count: int | None, packets: int) -> float | None:
    if count is None or packets <= 0:
        return None
    return round(count / packets, 4)


def _run_record(
    run: GuestRun,
    received: int | None,
    tap_rx_packets: int | None,
    rcvbuf_errors: int | None,
) -> dict[str, Any]:
    udp = run.udp[0] if run.udp else {}
    ping = run.pings[0] if run.pings else {}
    sent = int(udp.get("sent", 0))

    record: dict[str, Any] = {
        "ok": run.ok,
        "udp_sent": sent,
        "udp_pps": udp.get("pps"),
        "udp_elapsed_ns": udp.get("elapsed_ns"),
        "udp_send_retries": udp.get("retries"),
        "ping_received": ping.get("received"),
        "ping_rtt_avg_ms": ping.get("rtt_avg_ms"),
        "ping_rtt_min_ms": ping.get("rtt_min_ms"),
        "ping_rtt_max_ms": ping.get("rtt_max_ms"),
        "received_datagrams": received,
        "tap_rx_packets": tap_rx_packets,
        "host_udp_rcvbuf_errors": rcvbuf_errors,
        "boot_s": None if run.boot_s is None else round(run.boot_s, 2),
        "wall_s": round(run.wall_s, 2),
        "virtio_errors": run.virtio_errors,
        "errors": run.errors,
    }
    record.update(_kick_fields(run, sent))

    if not run.ok:
        record["console_tail"] = run.console.splitlines()[-20:]
    return record


def _kick_fields(run: GuestRun, sent: int) -> dict[str, Any]:
    """Return the kick and interrupt counts of the first udp window, or Nones."""
    names = ("tx_kicks", "tx_interrupts", "rx_interrupts")
    run_names = ("tx_kicks_run", "tx_interrupts_run")
    if run.trace is None or not run.trace.windows:
        fields: dict[str, Any] = dict.fromkeys(names + run_names)
        fields["tx_kicks_per_packet"] = None
        fields["tx_interrupts_per_packet"] = None
        return fields

    window = run.trace.windows[0]
    tx = window.get(TX_QUEUE, QueueCounts())
    rx = window.get(RX_QUEUE, QueueCounts())
    # Whole-boot TX counts, comparable with a vhost-user backend's statistics,
    # which cover the whole connection.
    tx_run = run.trace.total.get(TX_QUEUE, QueueCounts())
    return {
        "tx_kicks": tx.kicks,
        "tx_interrupts": tx.interrupts,
        "rx_interrupts": rx.interrupts,
        "tx_kicks_per_packet": _per_packet(tx.kicks, sent),
        "tx_interrupts_per_packet": _per_packet(tx.interrupts, sent),
        "tx_kicks_run": tx_run.kicks,
        "tx_interrupts_run": tx_run.interrupts,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for field in SUMMARY_FIELDS:
        values = [run[field] for run in runs if run.get(field) is not None]
        summary[field] = statistics.median(values) if values else None
        summary[f"{field}_range"] = [min(values), max(values)] if values else None
    summary["all_ok"] = all(run["ok"] for run in runs)
    return summary


@contextlib.contextmanager
def _receiver(namespace: str | None, port: int) -> Iterator[UdpReceiver | None]:
    if namespace is None:
        yield None
        return
    try:
        receiver = UdpReceiver(namespace, port=port)
    except OSError as error:
        logger.warning("no UDP receiver in %s: %s", namespace, error)
        yield None
        return
    with receiver:
        yield receiver


def measure_configuration(
    image: GuestImage,
    network: TapNetwork | VhostUserNetwork,
    job: str,
    port: int,
    link: HostLink | None = None,
    trace: bool = True,
) -> dict[str, Any]:
    """Boot once with ``job`` and return the run's record.

    Kicks and interrupts are traced for the built-in device only, and only
    with ``trace`` true. ``link`` is the TAP whose counters are read
    afterwards, if any.
    """
    with _receiver(network.namespace, port) as receiver:
        run = boot_guest(
            image,
            network,
            job,
            port=port,
            trace_kicks=trace and isinstance(network, TapNetwork),
        )
        tap_rx = tap_counters(link)["rx_packets"] if link is not None else None
        received = receiver.stop() if receiver is not None else None
    rcvbuf_errors = None
    if received is not None and network.namespace is not None:
        rcvbuf_errors = udp_counters(network.namespace)["RcvbufErrors"]
    record = _run_record(run, received, tap_rx, rcvbuf_errors)
    record["distinct_datagrams"] = (
        receiver.distinct_datagrams if receiver is not None else None
    )
    return record


def _builtin_configurations(
    arguments: argparse.Namespace,
) -> Iterator[dict[str, Any]]:
    return (
        {"device": "builtin-tap", "tx": tx, "event_idx": event_idx == "on"}
        for tx, event_idx in itertools.product(arguments.tx, arguments.event_idx)
    )


def _measure_all(
    image: GuestImage, arguments: argparse.Namespace
) -> list[dict[str, Any]]:
    job = f"ping:{arguments.pings},udp:{arguments.count}:{arguments.size}"
    results = []
    if arguments.vhost_user is not None:
        configurations: list[dict[str, Any]] = [
            {"device": "vhost-user", "socket": str(arguments.vhost_user),
             "event_idx": event_idx == "on"}
            for event_idx in arguments.event_idx
        ]  # fmt: skip
    else:
        configurations = list(_builtin_configurations(arguments))
    for configuration in configurations:
        runs = []
        for repeat in range(arguments.repeats):
            logger.info(
                "measuring %s, run %d of %d",
                configuration,
                repeat + 1,
                arguments.repeats,
            )
            runs.append(_measure_once(image, configuration, job, arguments))
        results.append(
            {**configuration, "vectors": 0, "runs": runs, "median": _summary(runs)}
        )
    return results


def _measure_once(
    image: GuestImage,
    configuration: dict[str, Any],
    job: str,
    arguments: argparse.Namespace,
) -> dict[str, Any]:
    if configuration["device"] == "vhost-user":
        network = VhostUserNetwork(
            Path(configuration["socket"]),
            event_idx=configuration["event_idx"],
            namespace=arguments.namespace,
        )
        return measure_configuration(image, network, job, arguments.port)
    with tap_namespace() as link:
        tap = TapNetwork(
            link.namespace, link.tap, configuration["tx"], configuration["event_idx"]
        )
        return measure_configuration(
            image, tap, job, arguments.port, link, trace=not arguments.no_trace
        )


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    on_off = ("on", "off")

    parser.add_argument(
        "--count",
        type=int,
        default=20_000,
        help="UDP datagrams per run (default: %(default)s)",
    )
    parser.add_argument(
        "--size", type=int, default=64, help="UDP payload bytes (default: %(default)s)"
    )
    parser.add_argument(
        "--pings",
        type=int,
        default=20,
        help="ping requests per run, 0.2 s apart (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=9000,
        help="UDP destination port (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="boots per configuration (default: %(default)s)",
    )

    parser.add_argument(
        "--tx",
        nargs="+",
        choices=("bh", "timer"),
        default=["bh", "timer"],
        help="TX modes of the built-in device (default: both)",
    )
    parser.add_argument(
        "--event-idx",
        nargs="+",
        choices=on_off,
        default=list(on_off),
        help="event_idx settings (default: both)",
    )
    parser.add_argument(
        "--vhost-user",
        type=Path,
        default=None,
        metavar="SOCKET",
        help="measure a vhost-user backend on this socket instead",
    )
    parser.add_argument(
        "--namespace",
        default=None,
        help="with --vhost-user: run QEMU in this namespace and "
        "count datagrams at 192.0.2.1:PORT there",
    )

    parser.add_argument(
        "--no-trace",
        action="store_true",
        help="do not trace kicks and interrupts (to see what "
        "tracing costs in packets per second)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="also write the JSON to this file"
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="install missing Debian packages with apt-get",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        ensure_packages(HOST_PACKAGES, install=arguments.install)
        image = build_image(install=arguments.install)
    except MissingDependency as error:
        logger.error("%s", error)
        return 1
    report = {
        "machine": machine_info(image),
        "settings": {
            "count": arguments.count,
            "size": arguments.size,
            "pings": arguments.pings,
            "repeats": arguments.repeats,
            "script": "python -m tests.guest.measure "
            + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "configurations": _measure_all(image, arguments),
    }
    text = json.dumps(report, indent=2)
    if arguments.output is not None:
        arguments.output.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0 if all(c["median"]["all_ok"] for c in report["configurations"]) else 1


if __name__ == "__main__":
    sys.exit(main())
