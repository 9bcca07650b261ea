"""dpdk-testpmd (DPDK 22.11, net_virtio_user) against ``virtio-net-emu vhost-user``.

Each test runs the real command on CPU 0 and testpmd, whose forwarding core
busy-polls CPU 1, for a few seconds, then compares testpmd's counters with
the JSON statistics of the back-end. testpmd runs interactively: ``stop``
prints its counters, the back-end gets ``DRAIN_SECONDS`` to finish the
chains still in the rings, and ``quit`` ends the connection.

The tests need root (EAL writes /var/run/dpdk) and dpdk-testpmd (Debian
package dpdk-dev). They skip with the reason otherwise.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from net_helpers import (
    DRAIN_SECONDS,
    BackendProcess,
    backend_process,
    file_prefix,
    gigantic_pages,
    require_testpmd,
)

from device.features import NetFeature
from device.vhost_user.testpmd import ForwardStats, Testpmd, virtio_user_vdev
from virtio import VirtioFeature

pytestmark = [pytest.mark.dpdk, pytest.mark.slow]

RUN_SECONDS = 3.0
#: testpmd's default burst size: ``start tx_first`` sends one burst of it.
BURST = 32
NO_HUGE = ("--no-huge", "-m", "256")
APP_OPTIONS = (
    "--total-num-mbufs=16384",
    "--nb-cores=1",
    # txonly frames carry documentation addresses instead of 198.18.0.x.
    "--tx-ip=192.0.2.1,192.0.2.2",
)
NEVER_NEGOTIATED = VirtioFeature.IN_ORDER | VirtioFeature.RING_PACKED

_RX_LINE = re.compile(
    r"src=(\S+) - dst=(\S+) - pool=\S+ - type=(0x[0-9a-f]+) - length=(\d+) -"
    r" nb_segs=(\d+) - sw ptype: (.*?)  -"
)


@pytest.fixture(autouse=True)
def testpmd_ready() -> None:
    require_testpmd()


def run_testpmd(
    tmp_path: Path,
    backend: BackendProcess,
    name: str,
    *,
    mode: str,
    txpkts: str = "64",
    devargs: str = "",
    tx_first: int = 0,
    setup: Sequence[str] = (),
    eal_memory: Sequence[str] = NO_HUGE,
    seconds: float = RUN_SECONDS,
) -> tuple[ForwardStats, str]:
    """Forward for ``seconds``, stop, let the back-end drain, quit.

    Returns testpmd's statistics and its whole output.
    """
    testpmd = Testpmd(
        virtio_user_vdev(backend.socket, devargs),
        file_prefix(name),
        tmp_path / f"testpmd-{name}.out",
        app_options=[*APP_OPTIONS, f"--forward-mode={mode}", f"--txpkts={txpkts}"],
        eal_memory=eal_memory,
    )
    with testpmd:
        testpmd.start()
        for command in setup:
            testpmd.run(command)
        testpmd.start_forwarding(tx_first)
        time.sleep(seconds)
        stats = testpmd.stop_forwarding()
        time.sleep(DRAIN_SECONDS)
    return stats, testpmd.text()


def check_features(backend: BackendProcess, mergeable: bool | None = None) -> None:
    negotiated = backend.negotiated_features()
    assert negotiated, backend.log_text()
    for features in negotiated:
        assert not features & NEVER_NEGOTIATED
        assert features & VirtioFeature.VERSION_1
        if mergeable is not None:
            assert bool(features & NetFeature.MRG_RXBUF) == mergeable


def check_clean(result: dict[str, Any]) -> None:
    assert result["dropped"] == {}
    assert result["protocol_errors"] == 0
    assert result["broken_queues"] == 0
    assert result["device_breaks"] == 0


@pytest.mark.parametrize("devargs", ["", ",in_order=0"])
@pytest.mark.parametrize(("txpkts", "frame_len"), [("64", 64), ("64,1400", 1464)])
def test_txonly_every_frame_sent_once(
    tmp_path: Path, txpkts: str, frame_len: int, devargs: str
) -> None:
    with backend_process(tmp_path, "null") as backend:
        stats, _ = run_testpmd(
            tmp_path, backend, "tx", mode="txonly", txpkts=txpkts, devargs=devargs
        )
        result = backend.stop()
    assert stats.tx_packets > 0
    assert result["sent"] == stats.tx_packets
    assert result["backend"]["frames_sent"] == stats.tx_packets
    assert result["tx"]["bytes"] == frame_len * stats.tx_packets
    assert result["received"] == 0
    assert result["connections"] == 1
    check_clean(result)
    check_features(backend)


@pytest.mark.parametrize(
    ("devargs", "mergeable"), [("", True), (",mrg_rxbuf=0", False)]
)
@pytest.mark.parametrize(("txpkts", "frame_len"), [("64", 64), ("64,1400", 1464)])
def test_loopback_io_frames_come_back(
    tmp_path: Path, txpkts: str, frame_len: int, devargs: str, mergeable: bool
) -> None:
    with backend_process(tmp_path, "loopback") as backend:
        stats, _ = run_testpmd(
            tmp_path,
            backend,
            "io",
            mode="io",
            txpkts=txpkts,
            devargs=devargs,
            tx_first=1,
        )
        result = backend.stop()
    # The frames of the first burst go round: testpmd forwards each one it
    # receives, so they passed the device many times.
    assert stats.tx_packets > 10 * BURST
    assert result["sent"] == stats.tx_packets
    assert result["received"] == result["sent"]
    # Only the burst that was in flight at ``stop`` did not come back.
    assert stats.tx_packets - stats.rx_packets == BURST
    assert stats.rx_dropped == 0
    assert stats.tx_dropped == 0
    assert result["rx"]["bytes"] == frame_len * result["received"]
    check_clean(result)
    check_features(backend, mergeable)


@pytest.mark.parametrize(
    ("devargs", "mergeable"), [("", True), (",mrg_rxbuf=0", False)]
)
@pytest.mark.parametrize(("txpkts", "frame_len"), [("64", 64), ("64,1400", 1464)])
def test_loopback_frames_unchanged(
    tmp_path: Path, txpkts: str, frame_len: int, devargs: str, mergeable: bool
) -> None:
    bursts = 4
    with backend_process(tmp_path, "loopback") as backend:
        stats, output = run_testpmd(
            tmp_path,
            backend,
            "rx",
            mode="rxonly",
            txpkts=txpkts,
            devargs=devargs,
            tx_first=bursts,
            setup=["set verbose 1"],
            seconds=1.0,
        )
        result = backend.stop()
    sent = bursts * BURST
    assert stats.tx_packets == sent
    assert result["sent"] == sent
    assert result["received"] == sent
    assert stats.rx_packets == result["received"]
    mac = re.search(r"Port 0: ([0-9A-F:]{17})", output)
    assert mac is not None
    frames = _RX_LINE.findall(output)
    assert len(frames) == sent
    for source, destination, ether_type, length, segments, ptype in frames:
        assert source == mac.group(1)
        assert destination == "02:00:00:00:00:00"
        assert ether_type == "0x0800"
        assert int(length) == frame_len
        assert int(segments) >= 1
        assert ptype == "L2_ETHER L3_IPV4 L4_UDP"
    check_clean(result)
    check_features(backend, mergeable)


def test_memory_table_of_several_regions(tmp_path: Path) -> None:
    # DPDK 22.11's vhost-user front-end sends at most 8 regions, and without
    # --single-file-segments each hugepage file is a region of its own. 2 MiB
    # pages exceed that (testpmd needs more than 16 MiB), so this test uses
    # two 1 GiB pages: two regions.
    with gigantic_pages(tmp_path / "hugepages") as mount:
        eal_memory = ("--huge-dir", str(mount), "--legacy-mem", "-m", "2048")
        with backend_process(tmp_path, "loopback") as backend:
            stats, _ = run_testpmd(
                tmp_path,
                backend,
                "huge",
                mode="io",
                tx_first=1,
                eal_memory=eal_memory,
            )
            result = backend.stop()
    tables = backend.memory_tables()
    assert tables
    assert all(table.count("region gpa") >= 2 for table in tables)
    assert stats.tx_packets > 10 * BURST
    assert result["sent"] == stats.tx_packets
    assert result["received"] == result["sent"]
    assert stats.tx_packets - stats.rx_packets == BURST
    check_clean(result)


def test_next_frontend_served_after_exit(tmp_path: Path) -> None:
    transmitted = []
    with backend_process(tmp_path, "null") as backend:
        for round_number in range(2):
            stats, _ = run_testpmd(
                tmp_path,
                backend,
                f"round{round_number}",
                mode="txonly",
                seconds=2.0,
            )
            transmitted.append(stats.tx_packets)
        result = backend.stop()
    assert all(count > 0 for count in transmitted)
    assert result["connections"] == 2
    assert result["sent"] == sum(transmitted)
    check_clean(result)
