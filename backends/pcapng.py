"""A reader of pcapng capture files, for Ethernet packets.

A pcapng file is a sequence of sections. Each section starts with a Section
Header Block (SHB) whose byte-order magic sets the byte order of the whole
section, and defines its own interfaces with Interface Description Blocks
(IDB). Packets come in Enhanced Packet Blocks (EPB), Simple Packet Blocks
(SPB) or the obsolete Packet Blocks, each tied to an interface, whose link
type and timestamp resolution (if_tsresol) and offset (if_tsoffset) apply.
Other blocks (name resolution, statistics, custom) are skipped.

Every block is ``type, total length, body, total length`` with 32-bit fields
in the section's byte order and the total a multiple of 4.
Reference: the IETF draft draft-ietf-opsawg-pcapng.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import CaptureFormatError, UnsupportedLinkTypeError

__all__ = ["LINKTYPE_ETHERNET", "PCAPNG_BLOCK_TYPE", "read_pcapng"]

LINKTYPE_ETHERNET = 1

#: First four bytes of a pcapng file: the SHB block type, a palindrome, so it
#: reads the same in both byte orders.
PCAPNG_BLOCK_TYPE = b"\x0a\x0d\x0d\x0a"

BYTE_ORDER_MAGIC = 0x1A2B3C4D
SECTION_HEADER_BLOCK = 0x0A0D0D0A
INTERFACE_DESCRIPTION_BLOCK = 0x00000001
PACKET_BLOCK = 0x00000002  # obsolete, still written by old tools
SIMPLE_PACKET_BLOCK = 0x00000003
ENHANCED_PACKET_BLOCK = 0x00000006

OPTION_END = 0
OPTION_IF_TSRESOL = 9
OPTION_IF_TSOFFSET = 14

_MINIMUM_BLOCK_SIZE = 12
_MINIMUM_SECTION_HEADER_SIZE = 28


@dataclass
class _Interface:
    link_type: int
    snaplen: int
    units_per_second: int = 1_000_000  # if_tsresol default: microseconds
    offset_seconds: int = 0  # if_tsoffset


@dataclass
class _Block:
    type: int
    offset: int
    body: memoryview


def read_pcapng(
    file: BinaryIO, path: str | os.PathLike[str], size: int
) -> Iterator[tuple[float, bytes]]:
    """Yield ``(timestamp, frame)`` for every packet of a pcapng file.

    ``file`` is positioned after the first four bytes, which the caller read
    and matched against ``PCAPNG_BLOCK_TYPE``. ``size`` is the file size,
    which bounds block lengths before anything is allocated. Timestamps of
    Simple Packet Blocks are NaN. Raises CaptureFormatError for a malformed
    or truncated block and UnsupportedLinkTypeError for a packet of a
    non-Ethernet interface.
    """
    reader = _BlockReader(file, path, size)
    interfaces: list[_Interface] = []
    for block in reader.blocks():
        if block.type == SECTION_HEADER_BLOCK:
            interfaces = []
        elif block.type == INTERFACE_DESCRIPTION_BLOCK:
            interfaces.append(_parse_interface(block, reader))
        elif block.type in _PACKET_PARSERS:
            yield _PACKET_PARSERS[block.type](block, reader, interfaces)


class _BlockReader:
    """Splits a pcapng file into blocks and keeps the section's byte order."""

    def __init__(self, file: BinaryIO, path: str | os.PathLike[str], size: int):
        self.file = file
        self.path = path
        self.size = size
        self.order = "<"

    def error(self, offset: int, message: str) -> CaptureFormatError:
        return CaptureFormatError(self.path, offset, message)

    def blocks(self) -> Iterator[_Block]:
        offset = 0
        block_type = PCAPNG_BLOCK_TYPE
        while block_type:
            if len(block_type) < 4:
                raise self.error(offset, "truncated block type")
            if block_type == PCAPNG_BLOCK_TYPE:
                block = self._read_section_header(offset)
            else:
                block = self._read_block(offset, block_type)
            yield block
            offset += 12 + len(block.body)
            block_type = self.file.read(4)

    def _read_section_header(self, offset: int) -> _Block:
        head = self.file.read(8)
        if len(head) < 8:
            raise self.error(offset, "truncated section header block")
        magic = head[4:]
        if magic == BYTE_ORDER_MAGIC.to_bytes(4, "little"):
            self.order = "<"
        elif magic == BYTE_ORDER_MAGIC.to_bytes(4, "big"):
            self.order = ">"
        else:
            raise self.error(offset, f"invalid byte-order magic {magic.hex()}")
        (total,) = struct.unpack(self.order + "I", head[:4])
        if total < _MINIMUM_SECTION_HEADER_SIZE:
            raise self.error(offset, f"section header block length {total} < 28")
        body = magic + self._read_rest(offset, total, 12)
        block = _Block(SECTION_HEADER_BLOCK, offset, memoryview(body))
        (major,) = struct.unpack_from(self.order + "H", body, 4)
        if major != 1:
            raise self.error(offset, f"unsupported pcapng major version {major}")
        return block

    def _read_block(self, offset: int, type_bytes: bytes) -> _Block:
        head = self.file.read(4)
        if len(head) < 4:
            raise self.error(offset, "truncated block length")
        block_type, total = struct.unpack(self.order + "II", type_bytes + head)
        if total < _MINIMUM_BLOCK_SIZE:
            raise self.error(offset, f"block length {total} < 12")
        body = self._read_rest(offset, total, 8)
        return _Block(block_type, offset, memoryview(body))

    def _read_rest(self, offset: int, total: int, consumed: int) -> bytes:
        """Read the body and trailing length of a block; return the body."""
        if total % 4:
            raise self.error(offset, f"block length {total} is not a multiple of 4")
        remaining = total - consumed
        if offset + total > self.size:
            raise self.error(
                offset,
                f"truncated block: length {total} but"
                f" {self.size - offset} bytes left in the file",
            )
        data = self.file.read(remaining)
        if len(data) < remaining:
            raise self.error(offset, "truncated block: the file shrank")
        (trailer,) = struct.unpack(self.order + "I", data[-4:])
        if trailer != total:
            raise self.error(
                offset, f"block length {total} does not match trailing {trailer}"
            )
        return data[:-4]


def _parse_interface(block: _Block, reader: _BlockReader) -> _Interface:
    if len(block.body) < 8:
        raise reader.error(block.offset, "interface description block too short")
    link_type, _, snaplen = struct.unpack_from(reader.order + "HHI", block.body)
    interface = _Interface(link_type, snaplen)
    for code, value in _parse_options(block, reader, 8):
        if code == OPTION_IF_TSRESOL and len(value) >= 1:
            exponent = value[0] & 0x7F
            # The high bit selects a power of 2, else a power of 10.
            base = 2 if value[0] & 0x80 else 10
            interface.units_per_second = base**exponent
        elif code == OPTION_IF_TSOFFSET and len(value) >= 8:
            (interface.offset_seconds,) = struct.unpack_from(reader.order + "q", value)
    return interface


def _parse_options(
    block: _Block, reader: _BlockReader, start: int
) -> Iterator[tuple[int, memoryview]]:
    body = block.body
    position = start
    while position + 4 <= len(body):
        code, length = struct.unpack_from(reader.order + "HH", body, position)
        if code == OPTION_END:
            return
        end = position + 4 + length
        if end > len(body):
            raise reader.error(
                block.offset, f"option {code} of length {length} overruns its block"
            )
        yield code, body[position + 4 : end]
        position = end + (-length % 4)


def _interface_for(
    block: _Block, reader: _BlockReader, interfaces: list[_Interface], index: int
) -> _Interface:
    if index >= len(interfaces):
        raise reader.error(
            block.offset,
            f"packet refers to interface {index}, but the section defines"
            f" {len(interfaces)}",
        )
    interface = interfaces[index]
    if interface.link_type != LINKTYPE_ETHERNET:
        raise UnsupportedLinkTypeError(
            reader.path, block.offset, interface.link_type, interface=index
        )
    return interface


def _timestamp(interface: _Interface, high: int, low: int) -> float:
    ticks = high << 32 | low
    return ticks / interface.units_per_second + interface.offset_seconds


def _packet_data(
    block: _Block, reader: _BlockReader, start: int, captured: int
) -> bytes:
    if start + captured > len(block.body):
        raise reader.error(
            block.offset,
            f"captured length {captured} overruns a block of"
            f" {len(block.body) + 12} bytes",
        )
    return bytes(block.body[start : start + captured])


def _parse_enhanced_packet(
    block: _Block, reader: _BlockReader, interfaces: list[_Interface]
) -> tuple[float, bytes]:
    if len(block.body) < 20:
        raise reader.error(block.offset, "enhanced packet block too short")
    index, high, low, captured, _ = struct.unpack_from(
        reader.order + "IIIII", block.body
    )
    interface = _interface_for(block, reader, interfaces, index)
    data = _packet_data(block, reader, 20, captured)
    return _timestamp(interface, high, low), data


def _parse_packet(
    block: _Block, reader: _BlockReader, interfaces: list[_Interface]
) -> tuple[float, bytes]:
    if len(block.body) < 20:
        raise reader.error(block.offset, "packet block too short")
    index, _, high, low, captured, _ = struct.unpack_from(
        reader.order + "HHIIII", block.body
    )
    interface = _interface_for(block, reader, interfaces, index)
    data = _packet_data(block, reader, 20, captured)
    return _timestamp(interface, high, low), data


def _parse_simple_packet(
    block: _Block, reader: _BlockReader, interfaces: list[_Interface]
) -> tuple[float, bytes]:
    """Parse an SPB, which belongs to interface 0 and carries no timestamp."""
    if len(block.body) < 4:
        raise reader.error(block.offset, "simple packet block too short")
    interface = _interface_for(block, reader, interfaces, 0)
    (original,) = struct.unpack_from(reader.order + "I", block.body)
    # The captured length is implicit: the original length, cut to the
    # interface's snaplen (0 means no limit) and to the block's size.
    captured = min(original, len(block.body) - 4)
    if interface.snaplen:
        captured = min(captured, interface.snaplen)
    return math.nan, bytes(block.body[4 : 4 + captured])


_PACKET_PARSERS = {
    ENHANCED_PACKET_BLOCK: _parse_enhanced_packet,
    PACKET_BLOCK: _parse_packet,
    SIMPLE_PACKET_BLOCK: _parse_simple_packet,
}
