"""Capture files: PcapWriter, PcapBackend and read_capture.

Test captures are built by hand with struct in both byte orders, checked
against tcpdump when it is installed, and against a directory of real
captures when one is configured (see ``corpus_dir`` in conftest.py).
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest

from backends import (
    CaptureError,
    CaptureFormatError,
    PcapBackend,
    PcapWriter,
    SendStatus,
    UnsupportedLinkTypeError,
    read_capture,
)

ETHERNET = 1
LINUX_SLL = 113
RAW_IP = 101

FRAMES = [
    bytes.fromhex("ffffffffffff020000000002 0806") + bytes(range(28)),
    bytes.fromhex("020000000001020000000002 0800") + bytes(range(256)) * 5,
    bytes(60),
]


class FakeClock:
    """A clock that starts at ``start`` and advances ``step`` per call."""

    def __init__(self, start: float = 1_700_000_000.0, step: float = 0.25) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


# Capture builders ----------------------------------------------------------


def classic_pcap(
    frames: Iterable[tuple[int, int, bytes]],
    *,
    order: str = "<",
    nanoseconds: bool = False,
    link_type: int = ETHERNET,
    snaplen: int = 65535,
) -> bytes:
    """Build a classic pcap file from (seconds, fraction, frame) records."""
    magic = 0xA1B23C4D if nanoseconds else 0xA1B2C3D4
    data = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, link_type)
    for seconds, fraction, frame in frames:
        data += struct.pack(order + "IIII", seconds, fraction, len(frame), len(frame))
        data += frame
    return data


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def block(order: str, block_type: int, body: bytes) -> bytes:
    body = padded(body)
    total = 12 + len(body)
    return (
        struct.pack(order + "II", block_type, total)
        + body
        + struct.pack(order + "I", total)
    )


def option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + padded(value)


def section_header(order: str) -> bytes:
    body = struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1)
    return block(order, 0x0A0D0D0A, body)


def interface_description(
    order: str,
    link_type: int = ETHERNET,
    snaplen: int = 0,
    tsresol: int | None = None,
    tsoffset: int | None = None,
) -> bytes:
    body = struct.pack(order + "HHI", link_type, 0, snaplen)
    options = b""
    if tsresol is not None:
        options += option(order, 9, bytes([tsresol]))
    if tsoffset is not None:
        options += option(order, 14, struct.pack(order + "q", tsoffset))
    if options:
        body += options + option(order, 0, b"")
    return block(order, 1, body)


def enhanced_packet(order: str, interface: int, ticks: int, frame: bytes) -> bytes:
    body = struct.pack(
        order + "IIIII",
        interface,
        ticks >> 32,
        ticks & 0xFFFFFFFF,
        len(frame),
        len(frame),
    )
    return block(order, 6, body + padded(frame))


def simple_packet(order: str, frame: bytes) -> bytes:
    return block(order, 3, struct.pack(order + "I", len(frame)) + frame)


def obsolete_packet(order: str, interface: int, ticks: int, frame: bytes) -> bytes:
    body = struct.pack(
        order + "HHIIII",
        interface,
        0,
        ticks >> 32,
        ticks & 0xFFFFFFFF,
        len(frame),
        len(frame),
    )
    return block(order, 2, body + frame)


def interface_statistics(order: str) -> bytes:
    return block(order, 5, struct.pack(order + "III", 0, 0, 0))


def write_bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# Writing -------------------------------------------------------------------


def test_round_trip_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "round.pcap"
    clock = FakeClock(step=0.000001)
    with PcapWriter(path, clock=clock) as writer:
        for frame in FRAMES:
            middle = len(frame) // 2
            writer.write([memoryview(frame)[:middle], memoryview(frame)[middle:]])
        records = writer.records_written

    read = list(read_capture(path))

    assert records == len(FRAMES)
    assert [frame for _, frame in read] == FRAMES
    assert [timestamp for timestamp, _ in read] == [
        1_700_000_000.0,
        1_700_000_000.000001,
        1_700_000_000.000002,
    ]


def test_file_and_record_headers(tmp_path: Path) -> None:
    path = tmp_path / "header.pcap"
    with PcapWriter(path, clock=lambda: 1_700_000_000.5) as writer:
        writer.write([FRAMES[0]])

    data = path.read_bytes()

    assert data[:24] == struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)
    assert data[24:40] == struct.pack(
        "<IIII", 1_700_000_000, 500_000, len(FRAMES[0]), len(FRAMES[0])
    )
    assert data[40:] == FRAMES[0]


def test_explicit_timestamp(tmp_path: Path) -> None:
    path = tmp_path / "timestamp.pcap"
    with PcapWriter(path, clock=FakeClock()) as writer:
        writer.write([FRAMES[0]], timestamp=12.345678)

    assert list(read_capture(path)) == [(12.345678, FRAMES[0])]


@pytest.mark.parametrize("timestamp", [-1.0, float(1 << 32)])
def test_timestamp_out_of_range(tmp_path: Path, timestamp: float) -> None:
    with PcapWriter(tmp_path / "range.pcap") as writer:
        with pytest.raises(ValueError, match="outside the range"):
            writer.write([FRAMES[0]], timestamp=timestamp)


def test_snaplen_cuts_frame(tmp_path: Path) -> None:
    path = tmp_path / "snap.pcap"
    frame = FRAMES[1]
    with PcapWriter(path, snaplen=100, clock=FakeClock()) as writer:
        length = writer.write([frame[:60], frame[60:]])

    data = path.read_bytes()
    captured, original = struct.unpack_from("<II", data, 24 + 8)

    assert length == len(frame)
    assert captured == 100
    assert original == len(frame)
    assert [f for _, f in read_capture(path)] == [frame[:100]]


def test_invalid_snaplen(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="snaplen"):
        PcapWriter(tmp_path / "bad.pcap", snaplen=0)


def test_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "out.pcap"
    with pytest.raises(CaptureError) as info:
        PcapWriter(path)

    assert info.value.errno == errno.ENOENT
    assert str(path) in str(info.value)
    assert "No such file or directory" in str(info.value)


def test_path_is_directory(tmp_path: Path) -> None:
    with pytest.raises(CaptureError) as info:
        PcapBackend(tmp_path)

    assert info.value.errno == errno.EISDIR
    assert info.value.path == str(tmp_path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full is missing")
def test_full_device_at_open() -> None:
    with pytest.raises(CaptureError) as info:
        PcapBackend("/dev/full")

    assert info.value.errno == errno.ENOSPC
    assert "/dev/full" in str(info.value)
    assert "free disk space" in str(info.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full is missing")
def test_full_device_while_writing(tmp_path: Path) -> None:
    path = tmp_path / "full.pcap"
    backend = PcapBackend(path, clock=FakeClock())
    first = backend.send(bytes(12), [FRAMES[0]])
    # Swap the file for /dev/full under the writer: every write now fails
    # with ENOSPC, as on a full disk.
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, backend.writer.fileno())
    os.close(full)

    failed = backend.send(bytes(12), [FRAMES[1]])
    later = backend.send(bytes(12), [FRAMES[2]])
    backend.close()

    assert first is SendStatus.SENT
    assert failed is SendStatus.DROPPED
    assert later is SendStatus.DROPPED
    assert backend.drops == {"pcap-write-error": 2}
    assert backend.error is not None
    assert backend.error.errno == errno.ENOSPC
    assert backend.frames_sent == 1
    assert [frame for _, frame in read_capture(path)] == [FRAMES[0]]


@pytest.mark.root
def test_full_tmpfs_keeps_whole_records(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    # The child gets a private mount namespace, so the 16 KiB tmpfs is only
    # visible to it and disappears when it exits.
    script = textwrap.dedent("""
        import json, sys
        from backends import PcapBackend, SendStatus, read_capture
        path = sys.argv[1] + "/capture.pcap"
        backend = PcapBackend(path, clock=lambda: 1.0)
        statuses = [backend.send(bytes(12), [bytes(1000)]).name for _ in range(40)]
        backend.close()
        frames = [len(frame) for _, frame in read_capture(path)]
        print(json.dumps({
            "statuses": statuses,
            "drops": dict(backend.drops),
            "errno": backend.error and backend.error.errno,
            "message": str(backend.error),
            "frames_sent": backend.frames_sent,
            "frames_read": frames,
        }))
        """)
    # sh gets the mount point as $1, the interpreter as $2 and the script as $3.
    shell = 'mount -t tmpfs -o size=16k tmpfs "$1" && exec "$2" -c "$3" "$1"'
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell]
    result = subprocess.run(
        [*command, "sh", str(mount_point), sys.executable, script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    sent = report["frames_sent"]
    assert 1 <= sent < 40
    assert report["statuses"] == ["SENT"] * sent + ["DROPPED"] * (40 - sent)
    assert report["drops"] == {"pcap-write-error": 40 - sent}
    assert report["errno"] == errno.ENOSPC
    assert "No space left on device" in report["message"]
    assert report["frames_read"] == [1000] * sent
    assert list(mount_point.iterdir()) == []


# PcapBackend ---------------------------------------------------------------


def test_backend_drops_header(tmp_path: Path) -> None:
    path = tmp_path / "backend.pcap"
    with PcapBackend(path, clock=FakeClock()) as backend:
        statuses = [backend.send(b"\x01" * 12, [frame]) for frame in FRAMES]
        empty = backend.send(bytes(12), [b""])
        received = backend.receive()

    assert statuses == [SendStatus.SENT] * len(FRAMES)
    assert empty is SendStatus.DROPPED
    assert received is None
    assert backend.drops == {"empty-frame": 1}
    assert backend.frames_sent == len(FRAMES)
    assert backend.bytes_sent == sum(map(len, FRAMES))
    assert backend.error is None
    assert backend.path == str(path)
    assert [frame for _, frame in read_capture(path)] == FRAMES


def test_backend_close_twice(tmp_path: Path) -> None:
    backend = PcapBackend(tmp_path / "twice.pcap")
    backend.flush()
    backend.close()
    backend.close()

    status = backend.send(bytes(12), [FRAMES[0]])

    assert status is SendStatus.DROPPED
    assert backend.drops == {"pcap-write-error": 1}
    assert backend.error is not None
    assert backend.error.errno == errno.EBADF


# Reading classic pcap --------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_read_microseconds(tmp_path: Path, order: str) -> None:
    records = [(1_000, 1, FRAMES[0]), (1_001, 999_999, FRAMES[1])]
    path = write_bytes(tmp_path, "us.pcap", classic_pcap(records, order=order))

    assert list(read_capture(path)) == [
        (1000.000001, FRAMES[0]),
        (1001.999999, FRAMES[1]),
    ]


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_read_nanoseconds(tmp_path: Path, order: str) -> None:
    records = [(1_000, 500_000_001, FRAMES[0])]
    data = classic_pcap(records, order=order, nanoseconds=True)
    path = write_bytes(tmp_path, "ns.pcap", data)

    [(timestamp, frame)] = list(read_capture(path))

    assert timestamp == pytest.approx(1000.500000001, abs=1e-9)
    assert frame == FRAMES[0]


def test_read_header_only_file(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "none.pcap", classic_pcap([]))

    assert list(read_capture(path)) == []


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_read_rejects_linux_sll(tmp_path: Path, order: str) -> None:
    data = classic_pcap([(1, 0, FRAMES[0])], order=order, link_type=LINUX_SLL)
    path = write_bytes(tmp_path, "sll.pcap", data)

    with pytest.raises(UnsupportedLinkTypeError) as info:
        list(read_capture(path))

    assert info.value.link_type == LINUX_SLL
    assert "link type 113 (LINUX_SLL" in str(info.value)
    assert str(path) in str(info.value)


def test_read_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.pcap"
    with pytest.raises(CaptureError) as info:
        list(read_capture(path))

    assert info.value.errno == errno.ENOENT
    assert "not found" in str(info.value)
    assert str(path) in str(info.value)


def test_read_empty_file(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "empty.pcap", b"")

    with pytest.raises(CaptureFormatError, match="empty"):
        list(read_capture(path))


def test_read_unknown_magic(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "text.pcap", b"# not a capture\n")

    with pytest.raises(CaptureFormatError, match="magic number 23206e6f"):
        list(read_capture(path))


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (3, "magic number"),
        (10, "truncated pcap file header"),
        (30, "truncated header of record 0"),
        (24 + 16 + 5, "record 0 is truncated"),
        (24 + 16 + len(FRAMES[0]) + 16 + 1, "record 1 is truncated"),
    ],
)
def test_read_truncated_pcap(tmp_path: Path, cut: int, message: str) -> None:
    data = classic_pcap([(1, 0, FRAMES[0]), (2, 0, FRAMES[1])])
    path = write_bytes(tmp_path, "cut.pcap", data[:cut])

    with pytest.raises(CaptureFormatError, match=message):
        list(read_capture(path))


def test_read_every_cut_point(tmp_path: Path) -> None:
    data = classic_pcap([(1, 0, FRAMES[0]), (2, 0, FRAMES[2])])
    boundaries = {24: 0, 24 + 16 + len(FRAMES[0]): 1, len(data): 2}
    for cut in range(1, len(data) + 1):
        path = write_bytes(tmp_path, "cut.pcap", data[:cut])
        if cut in boundaries:
            assert len(list(read_capture(path))) == boundaries[cut], cut
        else:
            with pytest.raises(CaptureFormatError):
                list(read_capture(path))


# Reading pcapng --------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_read_pcapng_blocks(tmp_path: Path, order: str) -> None:
    data = (
        section_header(order)
        + interface_description(order)
        + interface_description(order, tsresol=9, tsoffset=100)
        + enhanced_packet(order, 0, 1_700_000_000_250_000, FRAMES[0])
        + interface_statistics(order)
        + enhanced_packet(order, 1, 1_500_000_000, FRAMES[1])
        + simple_packet(order, FRAMES[2])
        + obsolete_packet(order, 0, 2_000_001, FRAMES[0])
    )
    path = write_bytes(tmp_path, "blocks.pcapng", data)

    read = list(read_capture(path))

    assert [frame for _, frame in read] == [FRAMES[0], FRAMES[1], FRAMES[2], FRAMES[0]]
    assert read[0][0] == pytest.approx(1_700_000_000.25)
    assert read[1][0] == pytest.approx(101.5)  # 1.5 s in nanoseconds, offset 100
    assert math.isnan(read[2][0])
    assert read[3][0] == pytest.approx(2.000001)


def test_read_pcapng_sections_switch_order(tmp_path: Path) -> None:
    data = (
        section_header("<")
        + interface_description("<", tsresol=0x80 | 20)  # 2**-20 s
        + enhanced_packet("<", 0, 3 << 20, FRAMES[0])
        + section_header(">")
        + interface_description(">")
        + enhanced_packet(">", 0, 7_000_000, FRAMES[1])
    )
    path = write_bytes(tmp_path, "sections.pcapng", data)

    assert list(read_capture(path)) == [(3.0, FRAMES[0]), (7.0, FRAMES[1])]


def test_read_pcapng_simple_packet_snaplen(tmp_path: Path) -> None:
    data = (
        section_header("<")
        + interface_description("<", snaplen=20)
        + block("<", 3, struct.pack("<I", len(FRAMES[1])) + FRAMES[1][:20])
    )
    path = write_bytes(tmp_path, "spb.pcapng", data)

    [(_, frame)] = list(read_capture(path))

    assert frame == FRAMES[1][:20]


def test_read_pcapng_rejects_raw_ip(tmp_path: Path) -> None:
    data = (
        section_header("<")
        + interface_description("<")
        + interface_description("<", link_type=RAW_IP)
        + enhanced_packet("<", 0, 0, FRAMES[0])
        + enhanced_packet("<", 1, 0, FRAMES[0][14:])
    )
    path = write_bytes(tmp_path, "raw.pcapng", data)
    reader = read_capture(path)

    first = next(reader)
    with pytest.raises(UnsupportedLinkTypeError) as info:
        next(reader)

    assert first[1] == FRAMES[0]
    assert info.value.link_type == RAW_IP
    assert info.value.interface == 1
    assert "interface 1 has link type 101 (RAW" in str(info.value)


def test_read_pcapng_unknown_interface(tmp_path: Path) -> None:
    data = (
        section_header("<")
        + interface_description("<")
        + enhanced_packet("<", 3, 0, FRAMES[0])
    )
    path = write_bytes(tmp_path, "iface.pcapng", data)

    with pytest.raises(
        CaptureFormatError, match="interface 3, but the section defines 1"
    ):
        list(read_capture(path))


def test_read_pcapng_length_mismatch(tmp_path: Path) -> None:
    packet = bytearray(enhanced_packet("<", 0, 0, FRAMES[0]))
    packet[-4:] = struct.pack("<I", len(packet) + 4)
    data = section_header("<") + interface_description("<") + bytes(packet)
    path = write_bytes(tmp_path, "mismatch.pcapng", data)

    with pytest.raises(CaptureFormatError, match="does not match trailing"):
        list(read_capture(path))


def test_read_pcapng_bad_byte_order_magic(tmp_path: Path) -> None:
    data = bytearray(section_header("<"))
    data[8:12] = b"\x00\x01\x02\x03"
    path = write_bytes(tmp_path, "magic.pcapng", bytes(data))

    with pytest.raises(CaptureFormatError, match="byte-order magic 00010203"):
        list(read_capture(path))


def test_read_pcapng_captured_length_overruns(tmp_path: Path) -> None:
    body = struct.pack("<IIIII", 0, 0, 0, 500, 500) + FRAMES[0]
    data = section_header("<") + interface_description("<") + block("<", 6, body)
    path = write_bytes(tmp_path, "overrun.pcapng", data)

    with pytest.raises(CaptureFormatError, match="captured length 500 overruns"):
        list(read_capture(path))


def test_read_pcapng_every_cut_point(tmp_path: Path) -> None:
    first = section_header("<") + interface_description("<")
    data = first + enhanced_packet("<", 0, 0, FRAMES[0])
    for cut in range(1, len(data)):
        path = write_bytes(tmp_path, "cut.pcapng", data[:cut])
        if cut in (len(section_header("<")), len(first)):
            assert list(read_capture(path)) == [], cut
        else:
            with pytest.raises(CaptureFormatError):
                list(read_capture(path))


# Cross-checks with tcpdump -----------------------------------------------------


def tcpdump_frames(path: Path) -> list[tuple[str, bytes]]:
    """Return (timestamp text, frame) for each packet as tcpdump prints it."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        pytest.skip("tcpdump is not installed")
    result = subprocess.run(
        [tcpdump, "-r", str(path), "-nn", "-tt", "-xx"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    packets: list[tuple[str, bytes]] = []
    for line in result.stdout.splitlines():
        if line.startswith("\t0x"):
            hex_text = line.split(":", 1)[1].strip().split("  ")[0]
            timestamp, data = packets[-1]
            packets[-1] = (timestamp, data + bytes.fromhex(hex_text.replace(" ", "")))
        elif line and not line[0].isspace():
            packets.append((line.split(" ", 1)[0], b""))
    return packets


def test_tcpdump_reads_written_file(tmp_path: Path) -> None:
    path = tmp_path / "tcpdump.pcap"
    with PcapWriter(path, clock=FakeClock(start=1_700_000_000.000001)) as writer:
        for frame in FRAMES:
            writer.write([frame])

    packets = tcpdump_frames(path)

    assert [data for _, data in packets] == FRAMES
    assert [text for text, _ in packets] == [
        "1700000000.000001",
        "1700000000.250001",
        "1700000000.500001",
    ]


def test_tcpdump_reads_test_pcapng(tmp_path: Path) -> None:
    # Checks the pcapng builder of these tests against libpcap.
    data = (
        section_header(">")
        + interface_description(">", tsresol=9)
        + enhanced_packet(">", 0, 1_700_000_000_123_456_789, FRAMES[1])
        + simple_packet(">", FRAMES[0])
    )
    path = write_bytes(tmp_path, "check.pcapng", data)

    packets = tcpdump_frames(path)

    assert [frame for _, frame in packets] == [FRAMES[1], FRAMES[0]]
    assert packets[0][0] == "1700000000.123456"
    assert [frame for _, frame in read_capture(path)] == [FRAMES[1], FRAMES[0]]


# Real captures -----------------------------------------------------------------


def test_corpus_reads_or_rejects(corpus_dir: Path, tmp_path: Path) -> None:
    files = sorted(p for p in corpus_dir.iterdir() if p.suffix in (".pcap", ".pcapng"))
    assert files, f"no .pcap or .pcapng files in {corpus_dir}"
    read_files = 0
    rejected: dict[str, int] = {}
    frames_total = 0
    for path in files:
        try:
            records = list(read_capture(path))
        except UnsupportedLinkTypeError as exc:
            assert exc.link_type != ETHERNET
            assert str(exc.link_type) in str(exc)
            rejected[path.name] = exc.link_type
            continue
        read_files += 1
        frames_total += len(records)
        assert all(frame for _, frame in records), path.name

        copy = tmp_path / "copy.pcap"
        with PcapWriter(copy) as writer:
            for timestamp, frame in records:
                writer.write([frame], timestamp=timestamp)
        assert list(read_capture(copy)) == records, path.name

    assert read_files + len(rejected) == len(files)
    assert frames_total > 0


def test_corpus_matches_tcpdump(corpus_dir: Path) -> None:
    files = sorted(p for p in corpus_dir.iterdir() if p.suffix == ".pcap")
    # A sample keeps the test fast: every 20th file, at least one.
    for path in itertools.islice(files, 0, None, 20):
        try:
            records = list(read_capture(path))
        except UnsupportedLinkTypeError:
            continue
        packets = tcpdump_frames(path)
        assert [frame for _, frame in packets] == [
            frame for _, frame in records
        ], path.name
