"""A Linux guest's virtio_net driver on QEMU's built-in virtio-net and a TAP.

This is the reference that the project's own device is compared with: the
guest pings the host and sends 20,000 64-byte UDP datagrams, and all of them
must reach the receiver in the namespace, with no driver errors in dmesg. The
guest boots once per module, and each test checks one aspect of that run.
"""

from __future__ import annotations

import dataclasses

import pytest

from .build_image import GuestImage
from .netns import HostLink, UdpReceiver, tap_counters
from .qemu import GuestRun, TapNetwork, boot_guest

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root]

DATAGRAMS = 20_000
PAYLOAD_BYTES = 64
PINGS = 20


@dataclasses.dataclass
class Outcome:
    run: GuestRun
    received: int
    distinct: int
    tap_rx_packets: int


@pytest.fixture(scope="module")
def outcome(guest_image: GuestImage, tap_link: HostLink) -> Outcome:
    network = TapNetwork(tap_link.namespace, tap_link.tap, tx="bh", event_idx=True)
    with UdpReceiver(tap_link.namespace) as receiver:
        run = boot_guest(
            guest_image,
            network,
            f"ping:{PINGS},udp:{DATAGRAMS}:{PAYLOAD_BYTES}",
            timeout_s=300,
        )
        tap_rx = tap_counters(tap_link)["rx_packets"]
        receiver.stop()
    return Outcome(run, receiver.datagrams, receiver.distinct_datagrams, tap_rx)


def _tail(run: GuestRun) -> str:
    return "\n".join(run.console.splitlines()[-30:]) + "\n" + run.stderr[-1000:]


def test_guest_powers_off_cleanly(outcome: Outcome) -> None:
    run = outcome.run
    assert not run.timed_out, f"QEMU timed out:\n{_tail(run)}"
    assert run.exit_code == 0, f"QEMU exit code {run.exit_code}:\n{_tail(run)}"
    assert run.done_status == "ok", f"guest /init failed:\n{_tail(run)}"
    assert run.errors == [], f"guest /init errors: {run.errors}"


def test_ping_gets_all_replies(outcome: Outcome) -> None:
    assert len(outcome.run.pings) == 1, _tail(outcome.run)
    ping = outcome.run.pings[0]
    assert ping["transmitted"] == PINGS
    assert ping["received"] == PINGS
    assert isinstance(ping.get("rtt_avg_ms"), float)


def test_all_datagrams_reach_receiver(outcome: Outcome) -> None:
    assert len(outcome.run.udp) == 1, _tail(outcome.run)
    assert outcome.run.udp[0]["sent"] == DATAGRAMS
    assert outcome.received == DATAGRAMS
    assert outcome.distinct == DATAGRAMS


def test_tap_counts_every_frame(outcome: Outcome) -> None:
    # The guest driver counts a frame as sent when it reclaims the used
    # buffer, which can lag, so its tx_packets is a lower bound for the TAP.
    assert outcome.tap_rx_packets >= DATAGRAMS + PINGS
    assert outcome.tap_rx_packets >= outcome.run.stats["tx_packets"]


def test_no_virtio_errors_in_dmesg(outcome: Outcome) -> None:
    assert outcome.run.virtio_errors == []


def test_timeout_kills_qemu(guest_image: GuestImage, tap_link: HostLink) -> None:
    network = TapNetwork(tap_link.namespace, tap_link.tap)
    run = boot_guest(guest_image, network, "sleep:60", timeout_s=2)

    assert run.timed_out
    assert run.exit_code is None
    assert run.done_status is None
    assert not run.ok
