"""dpdk-testpmd (DPDK 22.11, net_virtio_user) as the front-end of the server.

The fake device does not move packets, so testpmd's TX ring fills up and
stays full. The test checks the message sequence up to the start of both
rings and the stop sequence when testpmd exits. It needs root (EAL writes
/var/run/dpdk) and the dpdk-dev package, and runs testpmd without hugepages.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_user_fakes import DEVICE_FEATURES, F_PROTOCOL_FEATURES, FakeDevice

from device.vhost_user import VhostUserServer

pytestmark = [pytest.mark.dpdk, pytest.mark.slow]

TESTPMD = shutil.which("dpdk-testpmd")
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0

# The requests dpdk-testpmd 22.11 sends before both rings run, in order.
STARTUP_SEQUENCE = [
    ("SET_OWNER", 0x1, 0),
    ("GET_FEATURES", 0x1, 0),
    ("GET_PROTOCOL_FEATURES", 0x1, 0),
    ("SET_PROTOCOL_FEATURES", 0x1, 0),
    ("SET_VRING_CALL", 0x1, 1),
    ("SET_VRING_CALL", 0x1, 1),
    ("SET_FEATURES", 0x1, 0),
    ("SET_MEM_TABLE", 0x9, 1),
    ("SET_VRING_NUM", 0x1, 0),
    ("SET_VRING_BASE", 0x1, 0),
    ("SET_VRING_ADDR", 0x1, 0),
    ("SET_VRING_KICK", 0x1, 1),
    ("SET_VRING_NUM", 0x1, 0),
    ("SET_VRING_BASE", 0x1, 0),
    ("SET_VRING_ADDR", 0x1, 0),
    ("SET_VRING_KICK", 0x1, 1),
    ("SET_VRING_ENABLE", 0x1, 0),
    ("SET_VRING_ENABLE", 0x1, 0),
]
STOP_SEQUENCE = [
    "SET_VRING_ENABLE",
    "SET_VRING_ENABLE",
    "GET_VRING_BASE",
    "GET_VRING_BASE",
]


class MessageRecorder(logging.Handler):
    """Keep (request, flags, fds) of every message the server logs at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[tuple[str, int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "%s flags %#x size %d fds %d":
            name, flags, _size, fds = record.args  # type: ignore[misc]
            self.messages.append((name, flags, fds))


@pytest.fixture
def recorder() -> Iterator[MessageRecorder]:
    logger = logging.getLogger("device.vhost_user.server")
    handler = MessageRecorder()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def cpu0_only() -> Iterator[None]:
    """Keep this process, and so the server thread, on CPU 0 for testpmd's lcore 1."""
    allowed = os.sched_getaffinity(0)
    if not {0, 1} <= allowed:
        pytest.skip("testpmd needs CPUs 0 and 1")
    os.sched_setaffinity(0, {0})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def build_testpmd_command(socket_path: Path, prefix: str, devargs: str) -> list[str]:
    assert TESTPMD is not None
    vdev = f"net_virtio_user0,path={socket_path},queues=1,queue_size=256{devargs}"
    return [
        TESTPMD,
        "-l",
        "0-1",
        "--main-lcore",
        "0",
        f"--file-prefix={prefix}",
        "--no-huge",
        "-m",
        "256",
        "--no-pci",
        "--vdev",
        vdev,
        "--",
        "--total-num-mbufs=16384",
        "--forward-mode=txonly",
        "--txpkts=64",
        "--auto-start",
        "--stats-period",
        "5",
        "--nb-cores=1",
    ]


def wait_for(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def run_testpmd(
    tmp_path: Path, device: FakeDevice, devargs: str = ""
) -> tuple[VhostUserServer, str]:
    """Run testpmd until both rings start, then stop it; return server and output."""
    socket_path = tmp_path / "vhost-user.sock"
    prefix = f"vne{os.getpid()}"
    server = VhostUserServer(socket_path, device)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop, 0.05))
    thread.start()
    output_path = tmp_path / "testpmd.out"
    process = None
    try:
        with output_path.open("w") as output:
            process = subprocess.Popen(
                build_testpmd_command(socket_path, prefix, devargs),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
            started = wait_for(lambda: len(device.running) == 2, START_TIMEOUT)
            process.send_signal(signal.SIGINT)
            process.wait(EXIT_TIMEOUT)
            assert started, output_path.read_text()[-2000:]
            wait_for(lambda: not server.connected, EXIT_TIMEOUT)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        stop.set()
        thread.join()
        server.close()
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
    return server, output_path.read_text()


@pytest.fixture
def testpmd_ready(cpu0_only: None) -> None:
    if TESTPMD is None:
        pytest.skip("dpdk-testpmd not installed (apt-get install dpdk-dev)")
    if os.geteuid() != 0:
        pytest.skip("dpdk-testpmd needs root for /var/run/dpdk")


@pytest.mark.usefixtures("testpmd_ready")
def test_testpmd_starts_both_rings(tmp_path: Path, recorder: MessageRecorder) -> None:
    device = FakeDevice()
    server, output = run_testpmd(tmp_path, device)
    startup = recorder.messages[: len(STARTUP_SEQUENCE)]
    assert startup == STARTUP_SEQUENCE
    stopping = [
        name for name, _flags, _fds in recorder.messages[len(STARTUP_SEQUENCE) :]
    ]
    assert stopping == STOP_SEQUENCE
    assert [start.index for start in device.starts] == [0, 1]
    assert all(start.size == 256 for start in device.starts)
    assert all(start.kick_fd is not None for start in device.starts)
    assert all(start.call_fd is not None for start in device.starts)
    # testpmd's TX queue is virtqueue 1 and kicks it.
    assert 1 in device.kicks
    assert sorted(device.stops) == [0, 1]
    assert server.counters["protocol_errors"] == 0
    assert "Port 0:" in output


@pytest.mark.usefixtures("testpmd_ready")
@pytest.mark.parametrize(
    ("devargs", "dropped_bit"),
    [(",mrg_rxbuf=0", 15), (",in_order=0", 35)],
)
def test_testpmd_devargs_drop_features(
    tmp_path: Path, devargs: str, dropped_bit: int
) -> None:
    offered = DEVICE_FEATURES | (1 << 35) | (1 << 28)
    acked = []

    class RecordingDevice(FakeDevice):
        def set_features(self, features: int) -> None:
            acked.append(features)
            super().set_features(features)

    run_testpmd(tmp_path, RecordingDevice(offered=offered), devargs)
    assert acked
    assert not acked[0] & (1 << dropped_bit)
    assert not acked[0] & F_PROTOCOL_FEATURES
    assert acked[0] & (1 << 32)
