"""Fast tests of the guest harness parts that need no QEMU: cpio, parsers, udpgen."""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from .build_image import GuestImage
from .cpio import CpioWriter
from .debian_packages import MissingDependency, ensure_packages
from .kick_trace import RX_QUEUE, TX_QUEUE, parse_kick_trace
from .qemu import (
    TapNetwork,
    VhostUserNetwork,
    kernel_append,
    parse_console,
    qemu_command,
)

HERE = Path(__file__).resolve().parent


def read_newc(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """Parse a newc archive into (name, mode, data, rdev) entries, trailer last."""
    entries = []
    offset = 0
    while True:
        header = archive[offset : offset + 110]
        assert header[:6] == b"070701", f"bad magic at offset {offset}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        data_start = name_start + name_size
        data_start += -data_start % 4
        data = archive[data_start : data_start + size]
        entries.append((name, mode, data, (fields[9], fields[10])))
        offset = data_start + size
        offset += -offset % 4
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return entries


def test_cpio_entries_round_trip() -> None:
    writer = CpioWriter()
    writer.add_directory("bin")
    writer.add_file("/bin/tool", b"abcde", 0o755)
    writer.add_symlink("bin/sh", "/bin/tool")
    writer.add_char_device("dev/console", 5, 1, 0o600)
    entries = read_newc(writer.finish())

    names = [entry[0] for entry in entries]
    assert names == ["bin", "bin/tool", "bin/sh", "dev/console", "TRAILER!!!"]
    assert stat.S_ISDIR(entries[0][1])
    assert entries[1][2] == b"abcde"
    assert stat.S_IMODE(entries[1][1]) == 0o755
    assert stat.S_ISLNK(entries[2][1])
    assert entries[2][2] == b"/bin/tool"
    assert stat.S_ISCHR(entries[3][1])
    assert entries[3][3] == (5, 1)


def test_cpio_rejects_duplicate_name() -> None:
    writer = CpioWriter()
    writer.add_file("init", b"")
    with pytest.raises(ValueError, match="init"):
        writer.add_file("/init", b"")


def serial_lines(text: str) -> list[str]:
    return [f"serial_write write addr 0x00 val 0x{ord(c):02x}" for c in text]


KICK_TX = "virtio_queue_notify vdev 0x5500 n 1 vq 0x7f10"
KICK_RX = "virtio_queue_notify vdev 0x5500 n 0 vq 0x7f00"
NOTIFY_TX = "virtio_notify vdev 0x5500 vq 0x7f10"
NOTIFY_RX = "virtio_notify vdev 0x5500 vq 0x7f00"


def test_kick_trace_counts_window() -> None:
    trace = [
        NOTIFY_TX,  # before the pointer is known from a kick
        KICK_RX,
        KICK_TX,
        *serial_lines("VNE-MARK udp-begin\r\n"),
        KICK_TX,
        KICK_TX,
        NOTIFY_TX,
        NOTIFY_RX,
        *serial_lines("VNE-MARK udp-end\n"),
        KICK_TX,
    ]
    result = parse_kick_trace(trace)

    assert result.total[TX_QUEUE].kicks == 4
    assert result.total[TX_QUEUE].interrupts == 2
    assert result.total[RX_QUEUE].kicks == 1
    assert len(result.windows) == 1
    assert result.windows[0][TX_QUEUE].kicks == 2
    assert result.windows[0][TX_QUEUE].interrupts == 1
    assert result.windows[0][RX_QUEUE].interrupts == 1
    assert result.console == "VNE-MARK udp-begin\nVNE-MARK udp-end"
    assert result.unmapped_interrupts == {}


def test_kick_trace_ignores_divisor_latch() -> None:
    trace = [
        "serial_write write addr 0x03 val 0x83",  # DLAB on
        "serial_write write addr 0x00 val 0x01",  # divisor, not text
        "serial_write write addr 0x03 val 0x03",  # DLAB off
        *serial_lines("ok\n"),
    ]
    assert parse_kick_trace(trace).console == "ok"


def test_kick_trace_rejects_unpaired_end() -> None:
    with pytest.raises(ValueError, match="outside a window"):
        parse_kick_trace(serial_lines("VNE-MARK udp-end\n"))


def test_kick_trace_keeps_unmapped_interrupts() -> None:
    result = parse_kick_trace(["virtio_notify vdev 0x5500 vq 0x7f99"])
    assert result.unmapped_interrupts == {"0x7f99": 1}


def test_console_parser_reads_results() -> None:
    lines = [
        (0.5, "\x1bc\x1b[?7l\x1b[2JVNE-BOOT uptime_s=1.80"),
        (2.5, "VNE-LINK uptime_s=2.14"),
        (3.0, (
            "VNE-RESULT kind=ping peer=192.0.2.1 exit=0 transmitted=5 "
            "received=5 rtt_min_ms=0.8 rtt_avg_ms=0.9 rtt_max_ms=1.1"
        )),
        (4.0, (
            "VNE-UDPGEN sent=2000 size=64 elapsed_ns=51082947 pps=39152 "
            "retries=0 refused=0"
        )),
        (4.5, "VNE-STATS tx_packets=2007 rx_packets=7"),
        (4.6, "VNE-VIRTIO-ERROR [ 3.1] virtio_net virtio0: output.0:id 9 is not a head!"),
        (4.7, "VNE-ERROR udpgen exited with 1"),
        (4.8, "VNE-DONE status=failed"),
    ]  # fmt: skip
    run = parse_console(lines)

    assert run.boot_s == 2.5
    assert run.pings[0]["received"] == 5
    assert run.pings[0]["rtt_avg_ms"] == 0.9
    assert run.pings[0]["peer"] == "192.0.2.1"
    assert run.udp[0]["pps"] == 39152
    assert run.stats == {"tx_packets": 2007, "rx_packets": 7}
    assert run.virtio_errors == [
        "[ 3.1] virtio_net virtio0: output.0:id 9 is not a head!"
    ]
    assert run.errors == ["udpgen exited with 1"]
    assert run.done_status == "failed"
    assert not run.ok


def test_kernel_append_rejects_whitespace_job() -> None:
    with pytest.raises(ValueError, match="whitespace"):
        kernel_append("ping, udp:10:64")


def test_kernel_append_adds_non_default_port() -> None:
    append = kernel_append("ping", port=9100)
    assert "vne.job=ping" in append.split()
    assert "vne.port=9100" in append.split()
    assert "console=ttyS0" in append.split()


IMAGE = GuestImage(
    kernel=Path("/cache/vmlinuz"),
    initrd=Path("/cache/initramfs.cpio.gz"),
    kernel_package="linux-image-test",
    kernel_release="6.1.0-test",
    modules=("virtio_net",),
    builtin_modules=(),
    absent_modules=(),
)


def test_qemu_command_for_tap() -> None:
    network = TapNetwork("vne-ns", "vnetap0", tx="timer", event_idx=False)
    command = qemu_command(IMAGE, network, "console=ttyS0", Path("/tmp/t.log"))

    assert command[:4] == ["ip", "netns", "exec", "vne-ns"]
    assert command[command.index("-accel") + 1] == "tcg"
    device = command[command.index("-device") + 1]
    assert "vectors=0" in device.split(",")
    assert "tx=timer" in device.split(",")
    assert "event_idx=off" in device.split(",")
    assert "ifname=vnetap0" in command[command.index("-netdev") + 1]
    assert "share=on" in command[command.index("-object") + 1]
    assert command[command.index("-D") + 1] == "/tmp/t.log"


def test_qemu_command_for_vhost_user() -> None:
    network = VhostUserNetwork(Path("/run/vne.sock"))
    command = qemu_command(IMAGE, network, "console=ttyS0")

    assert command[0] == "qemu-system-x86_64"
    assert command[command.index("-chardev") + 1] == "socket,id=c0,path=/run/vne.sock"
    assert command[command.index("-netdev") + 1] == "vhost-user,id=n0,chardev=c0"
    device = command[command.index("-device") + 1]
    assert "vectors=0" in device.split(",")
    assert not any(part.startswith("tx=") for part in device.split(","))
    assert "-D" not in command


def test_tap_network_rejects_unknown_tx_mode() -> None:
    with pytest.raises(ValueError, match="'fast'"):
        TapNetwork("ns", "tap", tx="fast")


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs dpkg-query")
def test_missing_package_names_install_command() -> None:
    with pytest.raises(
        MissingDependency, match="apt-get install .* vne-no-such-package"
    ):
        ensure_packages(["vne-no-such-package"], install=False)


@pytest.fixture(scope="module")
def udpgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    output = tmp_path_factory.mktemp("udpgen") / "udpgen"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", "-o", str(output), str(HERE / "udpgen.c")],
        check=True,
    )
    return output


def test_udpgen_sends_count_on_loopback(udpgen: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(2)
        port = receiver.getsockname()[1]
        result = subprocess.run(
            [str(udpgen), "127.0.0.1", str(port), "100", "64"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        sequences = [int.from_bytes(receiver.recv(2048)[:4], "big") for _ in range(100)]

    fields = dict(word.split("=") for word in result.stdout.split()[1:])
    assert result.stdout.startswith("VNE-UDPGEN ")
    assert fields["sent"] == "100"
    assert fields["size"] == "64"
    assert int(fields["elapsed_ns"]) > 0
    assert sequences == list(range(100))


def test_udpgen_paces_to_rate(udpgen: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        result = subprocess.run(
            [str(udpgen), "127.0.0.1", str(port), "21", "8", "100"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip

    fields = dict(word.split("=") for word in result.stdout.split()[1:])
    # 21 datagrams at 100 per second: the last leaves 200 ms after the first.
    assert int(fields["elapsed_ns"]) >= 200_000_000


@pytest.mark.parametrize(
    "arguments",
    [["x", "9", "1", "1"], ["127.0.0.1", "70000", "1", "1"], ["127.0.0.1", "9", "1"]],
)
def test_udpgen_rejects_bad_arguments(udpgen: Path, arguments: list[str]) -> None:
    result = subprocess.run(
        [str(udpgen), *arguments], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr != ""
