"""A Linux guest's virtio_net driver on the project's vhost-user backend.

QEMU connects to ``virtio-net-emu vhost-user`` as a vhost-user front-end, so
the guest's rings live in shared memory and the project's device moves
every frame between them and a TAP (192.0.2.1/24, in a namespace the test
creates). The guest (192.0.2.2/24) pings the host and sends 20,000 64-byte
UDP datagrams. Every ping must get a reply, every datagram must reach the
receiver exactly once, the guest's dmesg must show no virtio error and the
backend's statistics must agree. Then the backend must exit 0 on SIGTERM
and leave no socket, TAP or namespace behind.

The module-scoped fixture boots the guest once per TX mode and EVENT_IDX
setting, and each test checks one aspect of that boot. The whole file took
55 to 75 s on a shared 2-core machine (AMD EPYC, TCG guest).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from .build_image import GuestImage
from .netns import HostLink, UdpReceiver, tap_counters, tap_namespace, udp_counters
from .qemu import GuestRun, VhostUserNetwork, boot_guest
from .vhost_user_backend import BackendRun, backend_command, running_backend

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root]

DATAGRAMS = 20_000
PAYLOAD_BYTES = 64
PINGS = 20
BOOT_TIMEOUT_S = 120


@dataclasses.dataclass
class Outcome:
    run: GuestRun
    backend: BackendRun
    received: int
    distinct: int
    rcvbuf_errors: int
    tap_rx_packets: int
    link: HostLink
    #: Whether the namespace still existed after the test removed it.
    namespace_left: bool
    socket_left: bool


def _namespace_exists(name: str) -> bool:
    result = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    )
    return any(line.split()[0] == name for line in result.stdout.splitlines() if line)


def _require_tap_support() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun for a TAP in a network namespace")


@pytest.fixture(
    scope="module",
    params=[("bh", True), ("timer", True), ("bh", False), ("timer", False)],
    ids=["bh-event_idx", "timer-event_idx", "bh-flags", "timer-flags"],
)
def outcome(request: pytest.FixtureRequest, guest_image: GuestImage) -> Outcome:
    tx_mode, event_idx = request.param
    _require_tap_support()
    job = f"ping:{PINGS},udp:{DATAGRAMS}:{PAYLOAD_BYTES}"
    with tempfile.TemporaryDirectory(prefix="vne-vhost-") as directory:
        socket_path = Path(directory) / "vhost-user.sock"
        with tap_namespace() as link:
            with running_backend(link, socket_path, tx_mode) as backend:
                network = VhostUserNetwork(socket_path, event_idx, link.namespace)
                with UdpReceiver(link.namespace) as receiver:
                    run = boot_guest(
                        guest_image, network, job, timeout_s=BOOT_TIMEOUT_S
                    )
                    tap_rx = tap_counters(link)["rx_packets"]
                    receiver.stop()
                rcvbuf_errors = udp_counters(link.namespace)["RcvbufErrors"]
            socket_left = socket_path.exists()
        namespace_left = _namespace_exists(link.namespace)
    return Outcome(
        run=run,
        backend=backend,
        received=receiver.datagrams,
        distinct=receiver.distinct_datagrams,
        rcvbuf_errors=rcvbuf_errors,
        tap_rx_packets=tap_rx,
        link=link,
        namespace_left=namespace_left,
        socket_left=socket_left,
    )


def _tail(outcome: Outcome) -> str:
    run = outcome.run
    return (
        "guest console:\n"
        + "\n".join(run.console.splitlines()[-30:])
        + f"\nQEMU stderr:\n{run.stderr[-1000:]}"
        + f"\nbackend stderr:\n{outcome.backend.stderr[-2000:]}"
    )


def test_guest_powers_off_cleanly(outcome: Outcome) -> None:
    run = outcome.run
    assert not run.timed_out, f"QEMU timed out:\n{_tail(outcome)}"
    assert run.exit_code == 0, f"QEMU exit code {run.exit_code}:\n{_tail(outcome)}"
    assert run.done_status == "ok", f"guest /init failed:\n{_tail(outcome)}"
    assert run.errors == [], f"guest /init errors: {run.errors}"


def test_ping_gets_all_replies(outcome: Outcome) -> None:
    assert len(outcome.run.pings) == 1, _tail(outcome)
    ping = outcome.run.pings[0]
    assert ping["transmitted"] == PINGS
    assert ping["received"] == PINGS, _tail(outcome)
    assert isinstance(ping.get("rtt_avg_ms"), float)


def test_datagrams_arrive_once_each(outcome: Outcome) -> None:
    assert len(outcome.run.udp) == 1, _tail(outcome)
    assert outcome.run.udp[0]["sent"] == DATAGRAMS
    assert outcome.rcvbuf_errors == 0, "the receiver's buffer overflowed"
    assert outcome.received == DATAGRAMS
    # udpgen numbers its datagrams 0..DATAGRAMS-1, so a duplicate shows as
    # fewer distinct sequence numbers than datagrams.
    assert outcome.distinct == DATAGRAMS


def test_no_virtio_errors_in_dmesg(outcome: Outcome) -> None:
    assert outcome.run.virtio_errors == []


def test_backend_stats_agree(outcome: Outcome) -> None:
    stats = outcome.backend.stats
    assert stats is not None, f"no JSON statistics:\n{outcome.backend.stdout[-2000:]}"
    assert stats["sent"] >= DATAGRAMS + PINGS
    # Every frame the device took from the TX ring went into the TAP.
    assert stats["sent"] == outcome.tap_rx_packets
    assert stats["tx"]["frames"] == stats["sent"]
    # The guest counts a frame when it reclaims the used buffer, which can lag.
    assert stats["sent"] >= outcome.run.stats["tx_packets"]
    assert stats["received"] >= PINGS
    assert stats["dropped"] == {}
    assert stats["tx"]["kicks"] > 0
    assert stats["tx"]["interrupts"] > 0


def test_backend_sees_no_protocol_errors(outcome: Outcome) -> None:
    stats = outcome.backend.stats
    assert stats is not None
    assert stats["connections"] == 1
    assert stats["protocol_errors"] == 0
    assert stats["broken_queues"] == 0
    assert stats["device_breaks"] == 0
    assert stats["call_write_errors"] == 0


def test_backend_exits_on_sigterm(outcome: Outcome) -> None:
    assert not outcome.backend.killed, outcome.backend.stderr[-2000:]
    assert outcome.backend.exit_code == 0, outcome.backend.stderr[-2000:]


def test_nothing_left_behind(outcome: Outcome) -> None:
    assert not outcome.socket_left, f"{outcome.backend.socket_path} still exists"
    assert not outcome.namespace_left, f"namespace {outcome.link.namespace} remains"


def test_backend_stops_after_duration() -> None:
    _require_tap_support()
    with tempfile.TemporaryDirectory(prefix="vne-vhost-") as directory:
        socket_path = Path(directory) / "vhost-user.sock"
        with tap_namespace() as link:
            command = backend_command(link, socket_path, "bh", duration_s=1.0)
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=60, check=False
            )
            socket_left = socket_path.exists()

    assert result.returncode == 0, result.stderr[-2000:]
    assert '"connections": 0' in result.stdout
    assert not socket_left
