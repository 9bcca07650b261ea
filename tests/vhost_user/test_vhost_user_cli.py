"""``virtio-net-emu vhost-user``: options, user errors, signals, statistics, TAP.

The TAP test needs root. It creates a network namespace with a TAP, sends a
frame each way through a fake front-end, and removes both at the end.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_user_fakes import (
    F_PROTOCOL_FEATURES,
    GUEST_SIZE,
    GUEST_USER_ADDR,
    QUEUE_SIZE,
    FakeFrontend,
)

from backends.base import SendStatus
from backends.loopback import NullBackend
from device.cli import main
from device.net_device import RX_QUEUE, TX_QUEUE
from device.vhost_user.cli import open_backend
from device.vhost_user.protocol import Request, decode_u64, encode_u64
from device.vhost_user.service import EchoBackend, NetService
from virtio import DriverQueue, GuestMemory, MemoryRegion, RingLayout

STATS_KEYS = {
    "sent",
    "received",
    "dropped",
    "kicks",
    "kicks_suppressed",
    "interrupts",
    "interrupts_suppressed",
    "frames",
    "bytes",
}


def run_cli(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str]:
    code = main(["vhost-user", *arguments])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# -- options and user errors ------------------------------------------------------


def test_duration_prints_json(tmp_path: Path, capsys) -> None:
    socket_path = tmp_path / "net.sock"
    code, output = run_cli(
        capsys,
        "--socket",
        str(socket_path),
        "--to",
        "null",
        "--duration",
        "0.2",
        "--json",
    )
    assert code == 0
    stats = json.loads(output)
    assert STATS_KEYS <= set(stats)
    assert stats["sent"] == 0
    assert stats["kicks_suppressed"] is None
    assert stats["dropped"] == {}
    assert not socket_path.exists()


def test_text_statistics(tmp_path: Path, capsys) -> None:
    code, output = run_cli(
        capsys, "--socket", str(tmp_path / "net.sock"), "--to", "loopback",
        "--duration", "0.1",
    )  # fmt: skip
    assert code == 0
    assert output.startswith("sent 0 frames, received 0 frames")


def test_socket_in_use_rejected(tmp_path: Path, capsys) -> None:
    socket_path = tmp_path / "net.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(socket_path))
        listener.listen(1)
        code, output = run_cli(
            capsys, "--socket", str(socket_path), "--to", "null", "--duration", "0.1"
        )
    assert code == 2
    assert "is in use" in output
    assert output.count("\n") == 1


def test_stale_socket_replaced(tmp_path: Path, capsys) -> None:
    socket_path = tmp_path / "net.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(socket_path))
    code, _ = run_cli(
        capsys, "--socket", str(socket_path), "--to", "null", "--duration", "0.1"
    )
    assert code == 0


def test_regular_file_rejected(tmp_path: Path, capsys) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    code, output = run_cli(capsys, "--socket", str(path), "--to", "null")
    assert code == 2
    assert "is not a socket" in output
    assert path.read_text() == "keep me"


def test_missing_directory_rejected(tmp_path: Path, capsys) -> None:
    code, output = run_cli(
        capsys, "--socket", str(tmp_path / "missing" / "net.sock"), "--to", "null"
    )
    assert code == 2
    assert "create its directory first" in output


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any directory")
def test_no_permission_rejected(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "locked"
    directory.mkdir(mode=0o500)
    code, output = run_cli(
        capsys, "--socket", str(directory / "net.sock"), "--to", "null"
    )
    assert code == 2
    assert "no permission" in output


def test_missing_namespace_rejected(tmp_path: Path, capsys) -> None:
    namespace = f"vne-missing-{os.getpid()}"
    code, output = run_cli(
        capsys, "--socket", str(tmp_path / "net.sock"), "--to", "tap:vnetest0",
        "--netns", namespace,
    )  # fmt: skip
    assert code == 2
    assert f"network namespace {namespace!r} not found" in output


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pcap:out.pcap", "invalid backend"),
        ("tap:", "needs an interface name"),
        ("null:x", "invalid backend"),
    ],
)
def test_invalid_backend_rejected(
    tmp_path: Path, capsys, spec: str, message: str
) -> None:
    code, output = run_cli(capsys, "--socket", str(tmp_path / "net.sock"), "--to", spec)
    assert code == 2
    assert message in output


def test_netns_needs_tap(tmp_path: Path, capsys) -> None:
    code, output = run_cli(
        capsys, "--socket", str(tmp_path / "net.sock"), "--to", "null",
        "--netns", "vne-any",
    )  # fmt: skip
    assert code == 2
    assert "apply to tap:IFNAME only" in output


def test_invalid_duration_rejected(tmp_path: Path, capsys) -> None:
    code, output = run_cli(
        capsys, "--socket", str(tmp_path / "net.sock"), "--to", "null",
        "--duration", "0",
    )  # fmt: skip
    assert code == 2
    assert "invalid --duration" in output


def test_open_backend_kinds() -> None:
    assert isinstance(open_backend("null"), NullBackend)
    echo = open_backend("loopback")
    try:
        assert isinstance(echo, EchoBackend)
    finally:
        echo.close()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_and_prints(tmp_path: Path, signal_number: int) -> None:
    socket_path = tmp_path / "net.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "device.cli", "vhost-user", "--socket",
         str(socket_path), "--to", "null", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        process.send_signal(signal_number)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert time.monotonic() - started < 2.0
    assert STATS_KEYS <= set(json.loads(stdout))
    assert not socket_path.exists()


# -- the echo backend -------------------------------------------------------------


def test_echo_backend_descriptor_follows_queue() -> None:
    backend = EchoBackend()
    try:
        fd = backend.fileno()
        assert fd is not None
        assert not _readable(fd)
        backend.send(bytes(12), [b"frame one"])
        backend.send(bytes(12), [b"frame two"])
        assert _readable(fd)
        assert backend.receive() == (bytes(12), b"frame one")
        assert backend.receive() == (bytes(12), b"frame two")
        assert backend.receive() is None
        assert not _readable(fd)
    finally:
        backend.close()
    assert backend.fileno() is None


def _readable(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


# -- a TAP in a namespace, through the service ------------------------------------


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    from backends.netns import network_namespace

    with network_namespace() as name:
        yield name


class ConnectedService:
    """A ``NetService`` in a thread with a fake front-end whose rings run.

    The front-end negotiates VERSION_1 only. ``rx`` and ``tx`` are the
    driver's queues in the front-end's memory.
    """

    def __init__(self, socket_path: Path, backend) -> None:  # type: ignore[no-untyped-def]
        self.service = NetService(socket_path, backend)
        self.thread = threading.Thread(target=self.service.run)
        self.thread.start()
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(str(socket_path))
        self.frontend = FakeFrontend(connection)
        self._mapping = mmap.mmap(self.frontend.memfd, GUEST_SIZE)
        self.memory = GuestMemory([MemoryRegion(0, self._mapping)])
        self.rx = self._driver(RX_QUEUE)
        self.tx = self._driver(TX_QUEUE)
        frontend = self.frontend
        offered = decode_u64(frontend.call_request(Request.GET_FEATURES))
        frontend.send(Request.SET_OWNER)
        features = offered & (1 << 32) | F_PROTOCOL_FEATURES
        frontend.send(Request.SET_FEATURES, encode_u64(features))
        assert frontend.set_mem_table() == 0
        for index in (RX_QUEUE, TX_QUEUE):
            frontend.setup_ring(index)
        for index in (RX_QUEUE, TX_QUEUE):
            frontend.enable_ring(index)
        assert wait_until(lambda: len(self.service.device.queues) == 2)

    def _driver(self, index: int) -> DriverQueue:
        address = self.frontend.ring_address(index)
        layout = RingLayout(
            QUEUE_SIZE,
            address.desc_user_addr - GUEST_USER_ADDR,
            address.avail_user_addr - GUEST_USER_ADDR,
            address.used_user_addr - GUEST_USER_ADDR,
        )
        kick_fd = self.frontend.kick[index]
        return DriverQueue(
            self.memory,
            layout,
            index=index,
            notify=lambda: os.eventfd_write(kick_fd, 1),
        )

    def transmit(self, frame: bytes, slot: int = 0) -> None:
        address = 0x10_0000 + slot * 2048
        self.memory.write(address, bytes(12) + frame)
        self.tx.add_buf([(address, 12 + len(frame))], token=slot)
        self.tx.kick()

    def close(self) -> None:
        self.service.stop()
        self.thread.join(10)
        self.service.close()
        self.rx = self.tx = self.memory = None  # type: ignore[assignment]
        self.frontend.close()


def wait_until(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@contextlib.contextmanager
def connected_service(socket_path: Path, backend) -> Iterator[ConnectedService]:  # type: ignore[no-untyped-def]
    connected = ConnectedService(socket_path, backend)
    try:
        yield connected
    finally:
        connected.close()


def test_busy_backend_resumes_when_writable(tmp_path: Path) -> None:
    backend = EchoBackend()
    backend.fail_sends(3, SendStatus.BUSY)
    frames = [bytes([slot]) * 60 for slot in range(4)]
    with connected_service(tmp_path / "net.sock", backend) as connected:
        for slot, frame in enumerate(frames):
            connected.transmit(frame, slot)
        assert wait_until(
            lambda: connected.service.device.stats.queue(TX_QUEUE).frames == 4
        )
        completed: list[tuple[int, int]] = []

        def all_completed() -> bool:
            while (used := connected.tx.get_buf()) is not None:
                completed.append(used)
            return len(completed) == 4

        assert wait_until(all_completed)
    assert backend.send_busy == 3
    assert backend.sent_frames() == frames
    assert sorted(slot for slot, _ in completed) == [0, 1, 2, 3]


@pytest.mark.root
def test_tap_in_namespace_both_ways(tmp_path: Path, namespace: str) -> None:
    from backends.netns import enter_namespace
    from backends.tap import TapBackend

    tap_name = "vnevu0"
    backend = open_backend(
        f"tap:{tap_name}", netns=namespace, host_address="192.0.2.1/24"
    )
    assert isinstance(backend, TapBackend)
    addresses = subprocess.run(
        ["ip", "-n", namespace, "-o", "addr", "show", "dev", tap_name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "192.0.2.1/24" in addresses
    with enter_namespace(namespace):
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    received: list[bytes] = []
    with capture, connected_service(tmp_path / "net.sock", backend) as connected:
        capture.bind((tap_name, 0))
        capture.settimeout(5)

        # Driver to TAP: a local experimental EtherType (IEEE 802, 88B5).
        frame = bytes.fromhex("ffffffffffff020000000002 88b5") + b"to the tap" * 5
        connected.transmit(frame)
        assert capture.recv(2048) == frame

        # TAP to driver. The kernel may send its own frames out of the TAP
        # too (IPv6 neighbour discovery), so several buffers are posted and
        # the reply is looked for among them.
        rx = connected.rx
        for slot in range(8):
            rx.add_buf([], [(0x18_0000 + slot * 2048, 2048)], token=slot)
        rx.kick()
        reply = bytes.fromhex("020000000002020000000003 88b5") + b"to the driver" * 4
        capture.send(reply)

        def reply_arrived() -> bool:
            while (used := rx.get_buf()) is not None:
                slot, length = used
                address = 0x18_0000 + slot * 2048 + 12
                received.append(connected.memory.read(address, length - 12))
            return reply in received

        assert wait_until(reply_arrived)
        stats = connected.service.stats()
    assert stats["sent"] == 1
    assert stats["received"] == len(received)
    with enter_namespace(namespace):
        assert tap_name not in [name for _, name in socket.if_nameindex()]


@pytest.mark.root
def test_existing_tap_attached(namespace: str) -> None:
    subprocess.run(
        ["ip", "-n", namespace, "tuntap", "add", "vneatt0", "mode", "tap"], check=True
    )
    backend = open_backend("tap:vneatt0", netns=namespace)
    try:
        assert backend.created is False  # type: ignore[attr-defined]
        assert backend.name == "vneatt0"  # type: ignore[attr-defined]
    finally:
        backend.close()
