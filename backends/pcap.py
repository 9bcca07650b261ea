"""Capture files: a pcap writer backend and a pcap/pcapng reader.

``PcapWriter`` writes classic pcap (magic 0xa1b2c3d4 in little-endian byte
order, version 2.4, microsecond timestamps, link type 1 Ethernet). Each
record goes to the kernel in one writev(2) with no user-space buffer, so a
write error belongs to exactly one frame. After a failed or short write the
writer truncates the file back to the end of the last whole record, which
keeps the file readable.

``PcapBackend`` is the ``Backend`` on top of it: the virtio_net_hdr is
dropped and only the Ethernet frame is recorded.

``read_capture`` yields ``(timestamp, frame)`` from classic pcap files of
either byte order with microsecond or nanosecond timestamps, and from pcapng
files (see ``backends.pcapng``). Only Ethernet captures are accepted.

Format references: the pcap-savefile(5) manual page of libpcap for classic
pcap, and the IETF draft draft-ietf-opsawg-pcapng for pcapng.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Self

from .base import Backend, Buffer, SendStatus
from .errors import CaptureError, CaptureFormatError, UnsupportedLinkTypeError
from .pcapng import LINKTYPE_ETHERNET, PCAPNG_BLOCK_TYPE, read_pcapng

__all__ = [
    "DEFAULT_SNAPLEN",
    "LINKTYPE_ETHERNET",
    "PcapBackend",
    "PcapWriter",
    "read_capture",
]

logger = logging.getLogger(__name__)

PCAP_MAGIC_MICROSECONDS = 0xA1B2C3D4
PCAP_MAGIC_NANOSECONDS = 0xA1B23C4D
PCAP_VERSION = (2, 4)
#: Snapshot length of written files, the default of tcpdump 4.99.
DEFAULT_SNAPLEN = 262144

_FILE_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")


class PcapWriter:
    """A classic pcap file that frames are appended to.

    ``clock`` returns the timestamp of a record in seconds since the epoch
    (``time.time`` by default, a fake clock in tests). Frames longer than
    ``snaplen`` are cut to ``snaplen`` bytes and keep their original length in
    the record header. Raises CaptureError naming the path and the reason
    when the file cannot be created or its file header cannot be written
    (for example ENOSPC on a full disk).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < snaplen < 1 << 31:
            raise ValueError(f"invalid snaplen {snaplen}: expected 1 to 2**31 - 1")
        self.path = os.fspath(path)
        self.snaplen = snaplen
        self.clock = clock
        self.records_written = 0
        self._fd = _create_file(self.path)
        header = _FILE_HEADER.pack(
            PCAP_MAGIC_MICROSECONDS, *PCAP_VERSION, 0, 0, snaplen, LINKTYPE_ETHERNET
        )
        self._offset = 0  # end of the last whole record
        try:
            self._write_all([header])
        except OSError as exc:
            self.close()
            raise _write_error(self.path, "writing the pcap file header", exc) from exc
        self._offset = len(header)

    def write(self, frame: Sequence[Buffer], timestamp: float | None = None) -> int:
        """Append one record holding the concatenation of ``frame``.

        Returns the frame length. ``timestamp`` defaults to ``clock()``.
        Raises CaptureError after a write error, once the file is cut back to
        its last whole record. Raises ValueError for a timestamp that classic
        pcap cannot store (negative, or 2**32 seconds and later).
        """
        if timestamp is None:
            timestamp = self.clock()
        length = sum(map(len, frame))
        buffers: Sequence[Buffer] = frame
        captured = length
        if length > self.snaplen:
            captured = self.snaplen
            buffers = _cut_buffers(frame, captured)
        header = _RECORD_HEADER.pack(*_split_timestamp(timestamp), captured, length)
        try:
            self._write_all([header, *buffers])
        except OSError as exc:
            self._discard_partial_record()
            raise _write_error(self.path, "writing a record", exc) from exc
        self._offset += _RECORD_HEADER.size + captured
        self.records_written += 1
        return length

    def fileno(self) -> int:
        """Return the file descriptor, or -1 after ``close``."""
        return self._fd

    def flush(self) -> None:
        """Return at once, because every record reaches the kernel in ``write``.

        Kept so callers can treat the writer like a buffered file. It does not
        fsync(2).
        """

    def close(self) -> None:
        """Close the file. Calling it twice is harmless."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write_all(self, buffers: list[Buffer]) -> None:
        """Write every byte of ``buffers`` or raise OSError.

        writev(2) on a regular file returns a short count when the disk fills
        in the middle of a write, so the rest is written again, which then
        raises ENOSPC.
        """
        total = sum(map(len, buffers))
        written = os.writev(self._fd, buffers)
        if written == total:
            return
        remainder = memoryview(b"".join(buffers))[written:]
        while remainder:
            written = os.write(self._fd, remainder)
            if written == 0:
                raise OSError(errno.EIO, "write returned 0 bytes")
            remainder = remainder[written:]

    def _discard_partial_record(self) -> None:
        try:
            os.ftruncate(self._fd, self._offset)
            os.lseek(self._fd, self._offset, os.SEEK_SET)
        except OSError:
            # Character devices such as /dev/full cannot be truncated, and a
            # closed descriptor has nothing to repair.
            pass


class PcapBackend(Backend):
    """A Backend that records every sent frame in a classic pcap file.

    The virtio_net_hdr of each frame is dropped. ``receive`` never returns a
    frame. A write error is counted as "pcap-write-error" in ``drops`` and
    kept in ``error``. Every later frame is dropped with the same reason, so
    the file ends with whole records. Raises CaptureError when the file cannot
    be created.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.writer = PcapWriter(path, snaplen=snaplen, clock=clock)
        self.error: CaptureError | None = None

    @property
    def path(self) -> str:
        """Path of the capture file."""
        return self.writer.path

    def send(self, header: Buffer, frame: Sequence[Buffer]) -> SendStatus:
        """Record one frame and return SENT, or DROPPED with a counted reason.

        Reasons: "empty-frame" for a zero-length frame (not recorded) and
        "pcap-write-error" once writing has failed. Write errors are not
        raised, but ValueError is when the clock returns a time that classic
        pcap cannot store.
        """
        if self.error is not None:
            self.drops["pcap-write-error"] += 1
            return SendStatus.DROPPED
        if not any(frame):
            self.drops["empty-frame"] += 1
            return SendStatus.DROPPED
        try:
            length = self.writer.write(frame)
        except CaptureError as exc:
            self.error = exc
            self.drops["pcap-write-error"] += 1
            logger.error("%s; later frames are dropped and counted", exc)
            return SendStatus.DROPPED
        self.frames_sent += 1
        self.bytes_sent += length
        return SendStatus.SENT

    def flush(self) -> None:
        """Flush the writer (see ``PcapWriter.flush``)."""
        self.writer.flush()

    def close(self) -> None:
        """Close the capture file."""
        self.writer.close()


def read_capture(path: str | os.PathLike[str]) -> Iterator[tuple[float, bytes]]:
    """Yield ``(timestamp, frame)`` for every packet of a pcap or pcapng file.

    ``timestamp`` is in seconds since the epoch (NaN for a pcapng Simple
    Packet Block, which has none). The file is opened when iteration starts.
    Raises CaptureError when the file is missing or unreadable. Raises
    CaptureFormatError when it is not pcap or pcapng, or ends in the middle
    of a header or packet. Raises UnsupportedLinkTypeError, a subclass of
    CaptureFormatError that names the link type, for a link type other than
    Ethernet.
    """
    with _open_capture(path) as file:
        size = os.fstat(file.fileno()).st_size
        magic = file.read(4)
        if not magic:
            raise CaptureFormatError(path, 0, "the file is empty")
        if magic == PCAPNG_BLOCK_TYPE:
            yield from read_pcapng(file, path, size)
        else:
            yield from _read_pcap(file, path, magic, size)


def _create_file(path: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        raise CaptureError(
            path,
            f"cannot create the file: {exc.strerror}; check that the directory"
            f" exists and is writable",
            errno=exc.errno,
        ) from exc


def _write_error(path: str, action: str, exc: OSError) -> CaptureError:
    advice = "free disk space" if exc.errno == errno.ENOSPC else "check the file"
    return CaptureError(
        path, f"{action} failed: {exc.strerror}; {advice}", errno=exc.errno
    )


def _split_timestamp(timestamp: float) -> tuple[int, int]:
    seconds, microseconds = divmod(round(timestamp * 1_000_000), 1_000_000)
    if not 0 <= seconds < 1 << 32:
        raise ValueError(
            f"timestamp {timestamp} is outside the range of classic pcap"
            f" (0 to 2**32 - 1 seconds)"
        )
    return seconds, microseconds


def _cut_buffers(frame: Sequence[Buffer], size: int) -> list[Buffer]:
    """Return views of the first ``size`` bytes of ``frame``."""
    buffers: list[Buffer] = []
    for buffer in frame:
        if size <= 0:
            break
        view = memoryview(buffer)
        buffers.append(view[:size])
        size -= len(view)
    return buffers


def _open_capture(path: str | os.PathLike[str]) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError as exc:
        raise CaptureError(path, "not found", errno=exc.errno) from exc
    except OSError as exc:
        raise CaptureError(
            path, f"cannot open the file: {exc.strerror}", errno=exc.errno
        ) from exc


def _pcap_format(magic: bytes) -> tuple[str, int] | None:
    """Return the byte order and timestamp divisor for a pcap magic number."""
    for order in ("<", ">"):
        (value,) = struct.unpack(order + "I", magic)
        if value == PCAP_MAGIC_MICROSECONDS:
            return order, 1_000_000
        if value == PCAP_MAGIC_NANOSECONDS:
            return order, 1_000_000_000
    return None


def _read_pcap(
    file: BinaryIO, path: str | os.PathLike[str], magic: bytes, size: int
) -> Iterator[tuple[float, bytes]]:
    if len(magic) < 4 or (found := _pcap_format(magic)) is None:
        raise CaptureFormatError(
            path, 0, f"not a pcap or pcapng file: magic number {magic.hex()}"
        )
    order, divisor = found
    rest = file.read(_FILE_HEADER.size - 4)
    if len(rest) < _FILE_HEADER.size - 4:
        raise CaptureFormatError(
            path, 0, f"truncated pcap file header: {4 + len(rest)} of 24 bytes"
        )
    *_, link_field = struct.unpack(order + "HHiIII", rest)
    # The link type is the lower 16 bits. The upper bits can carry an FCS length.
    # NOTE: frames of a capture that declares an FCS keep their 4 FCS bytes.
    link_type = link_field & 0xFFFF
    if link_type != LINKTYPE_ETHERNET:
        raise UnsupportedLinkTypeError(path, 20, link_type)
    yield from _read_pcap_records(file, path, order, divisor, size)


def _read_pcap_records(
    file: BinaryIO, path: str | os.PathLike[str], order: str, divisor: int, size: int
) -> Iterator[tuple[float, bytes]]:
    record = struct.Struct(order + "IIII")
    offset = _FILE_HEADER.size
    index = 0
    while True:
        header = file.read(record.size)
        if not header:
            return
        if len(header) < record.size:
            raise CaptureFormatError(
                path,
                offset,
                f"truncated header of record {index}: {len(header)} of 16 bytes",
            )
        seconds, fraction, captured, _ = record.unpack(header)
        available = size - offset - record.size
        if captured > available:
            # The file may have grown since it was opened (a live capture).
            size = os.fstat(file.fileno()).st_size
            available = size - offset - record.size
        if captured > available:
            raise CaptureFormatError(
                path,
                offset,
                f"record {index} is truncated: captured length {captured} but"
                f" {max(available, 0)} bytes left in the file",
            )
        data = file.read(captured)
        if len(data) < captured:
            raise CaptureFormatError(
                path, offset, f"record {index} is truncated: the file shrank"
            )
        yield seconds + fraction / divisor, data
        offset += record.size + captured
        index += 1
