"""Turn arbitrary bytes into a ring case, deterministically.

The fuzzers (hypothesis in ``test_replay.py``, atheris in ``atheris_ring.py``)
produce bytes. ``decode`` maps them onto the JSON case format of README.md, so
every input a fuzzer finds can be saved and replayed as a plain case file.
Exhausted input reads as zeros, so every byte string decodes to a valid case.

The choices are biased towards the interesting: addresses come from a palette
(inside RAM, at its end, in a gap, near 2**64), descriptor flags mix NEXT,
WRITE and INDIRECT, and heads are mostly in range with the odd 0xFFFF.

Usage: ``python fuzz/ring_decoder.py INPUT_FILE`` prints the decoded case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MEMORY_SIZE = 0x10000
GAP_START = 0x8000
GAP_END = 0x9000
DATA_BASE = 0x4000
TABLE_BASE = 0x3000
TABLE_SLOTS = 16
MAX_DECODED_OPS = 200
U64 = 1 << 64


class ByteReader:
    """Reads little-endian integers from a byte string; zeros past its end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    @property
    def exhausted(self) -> bool:
        return self.offset >= len(self.data)

    def take(self, count: int) -> int:
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return int.from_bytes(chunk.ljust(count, b"\0"), "little")

    def u8(self) -> int:
        return self.take(1)

    def u16(self) -> int:
        return self.take(2)

    def u32(self) -> int:
        return self.take(4)

    def u64(self) -> int:
        return self.take(8)

    def below(self, limit: int) -> int:
        return self.u8() % limit if limit <= 256 else self.u16() % limit


def decode(data: bytes) -> dict:
    """Decode ``data`` into a case dictionary (the JSON format of README.md)."""
    reader = ByteReader(data)
    size = 1 << reader.below(9)  # 1 .. 256
    options = reader.u8()
    memory_shape = reader.below(4)
    queue = {
        "size": size,
        "layout": _layout(reader, size),
        "event_idx": bool(options & 1),
        "indirect": bool(options & 2),
        "notify_on_empty": bool(options & 4),
    }
    start = _start_index(reader)
    queue["last_avail_idx"] = start
    queue["used_idx"] = start
    decoder = _Decoder(reader, size, memory_shape)
    init = decoder.initial_image(start)
    ops = []
    while not reader.exhausted and len(ops) < MAX_DECODED_OPS:
        ops.append(decoder.operation())
    return {
        "description": f"decoded from {len(data)} bytes",
        "memory": {"regions": _regions(memory_shape)},
        "queue": queue,
        "init": init,
        "ops": ops,
    }


def _regions(shape: int) -> list[dict]:
    if shape == 1:  # two adjacent regions
        return [
            {"gpa": 0, "size": GAP_START},
            {"gpa": GAP_START, "size": MEMORY_SIZE - GAP_START},
        ]
    if shape == 2:  # a hole between two regions
        return [
            {"gpa": 0, "size": GAP_START},
            {"gpa": GAP_END, "size": MEMORY_SIZE - GAP_END},
        ]
    return [{"gpa": 0, "size": MEMORY_SIZE}]


def _layout(reader: ByteReader, size: int) -> dict:
    shape = reader.below(32)
    if shape == 0:
        return {"desc": 8, "avail": 0x2000, "used": 0x2800}  # misaligned table
    if shape == 1:
        return {"desc": 0, "avail": 0x2001, "used": 0x2800}  # misaligned avail
    if shape == 2:
        return {"desc": 0, "avail": 0x2000, "used": MEMORY_SIZE - 8}  # past the end
    if shape == 3:
        return {"desc": MEMORY_SIZE, "avail": 0x2000, "used": 0x2800}  # outside
    if shape == 4:
        return {"desc": GAP_START - 32, "avail": 0x2000, "used": 0x2800}  # split
    return {"packed_after": 0}


def _start_index(reader: ByteReader) -> int:
    kind = reader.below(4)
    if kind == 0:
        return 0
    if kind == 1:
        return 0xFFFF - reader.below(8)  # just below the wrap
    return reader.u16()


class _Decoder:
    def __init__(self, reader: ByteReader, size: int, memory_shape: int) -> None:
        self.reader = reader
        self.size = size
        self.memory_shape = memory_shape

    def address(self) -> int:
        reader = self.reader
        kind = reader.below(10)
        if kind == 0:
            return TABLE_BASE + 16 * reader.below(TABLE_SLOTS)
        if kind == 1:
            return 0
        if kind == 2:
            return MEMORY_SIZE - reader.below(32)  # at the end of RAM
        if kind == 3:
            return reader.u64()
        if kind == 4:
            return U64 - 1 - reader.below(64)  # wraps 64 bits with most lengths
        if kind == 5:
            return GAP_START + 0x400 + reader.below(64)  # in the hole, if any
        return DATA_BASE + (reader.u16() & 0x1FFF)

    def length(self) -> int:
        reader = self.reader
        kind = reader.below(8)
        if kind == 0:
            return 0
        if kind == 1:
            return 16 * reader.below(9)  # indirect table lengths, some empty
        if kind == 2:
            return reader.u32()
        if kind == 3:
            return 0xFFFF_FFFF
        if kind == 4:
            return 16 * reader.below(8) + reader.below(16)  # mostly not a multiple
        return 1 + reader.below(255)

    def flags(self) -> int:
        return self.reader.u8() & 7  # NEXT, WRITE, INDIRECT in any mix

    def next_index(self, limit: int) -> int:
        reader = self.reader
        if reader.below(16) == 0:
            return 0xFFFF
        return reader.below(limit + 1)

    def head(self) -> int:
        reader = self.reader
        if reader.below(32) == 0:
            return 0xFFFF
        return reader.below(self.size + 1)

    def descriptor(self, limit: int) -> list[int]:
        return [self.address(), self.length(), self.flags(), self.next_index(limit)]

    def initial_image(self, start: int) -> list[dict]:
        """Write a plausible ring: each head a one-buffer chain, some randomised."""
        reader = self.reader
        image: list[dict] = []
        for index in range(min(self.size, 64)):
            image.append(
                {
                    "op": "write_desc",
                    "index": index,
                    "desc": [DATA_BASE + 64 * index, 32, 0, 0],
                }
            )
        for _ in range(reader.below(8)):
            index = reader.below(min(self.size, 64))
            image.append(
                {"op": "write_desc", "index": index, "desc": self.descriptor(self.size)}
            )
        for _ in range(reader.below(8)):
            slot = reader.below(TABLE_SLOTS)
            image.append(
                {
                    "op": "write_desc",
                    "addr": TABLE_BASE + 16 * slot,
                    "desc": self.descriptor(TABLE_SLOTS),
                }
            )
        image.append({"op": "set_avail_idx", "value": start})
        return image

    def operation(self) -> dict:
        reader = self.reader
        code = reader.below(32)
        if code in (0, 1):
            return {"op": "pop"}
        if code in (2, 3):
            return {"op": "chains", "limit": reader.below(8) + 1}
        if code in (4, 5):
            return {"op": "add_used", "head": self.head(), "len": reader.u16()}
        if code == 6:
            return {"op": "add_used_all"}

        if code in (7, 8):
            return {"op": "publish"}
        if code == 9:
            return {"op": "enable_notification"}
        if code == 10:
            return {"op": "disable_notification"}
        if code == 11:
            return {"op": "unpop", "count": reader.below(4) + 1}
        if code == 12:
            return {"op": "drop_all"}
        if code == 13:
            return {"op": "available"}
        if code == 14:
            return {"op": "peek", "count": reader.below(8) + 1}
        if code == 15:
            return {"op": "needs_notification"}
        if code == 16:
            return {"op": "reset"} if reader.below(4) == 0 else {"op": "available"}
        if code == 17:
            return {"op": "detach"} if reader.below(8) == 0 else {"op": "pop"}

        # Driver writes.
        if code in (18, 19, 20, 21):
            count = reader.below(4) + 1
            return {"op": "post", "heads": [self.head() for _ in range(count)]}
        if code == 22:
            return {"op": "set_avail_idx", "value": reader.u16()}
        if code in (23, 24):
            index = reader.below(min(self.size, 64))
            return {
                "op": "write_desc",
                "index": index,
                "desc": self.descriptor(self.size),
            }
        if code == 25:
            slot = reader.below(TABLE_SLOTS)
            return {
                "op": "write_desc",
                "addr": TABLE_BASE + 16 * slot,
                "desc": self.descriptor(TABLE_SLOTS),
            }
        if code == 26:
            return {"op": "set_avail_flags", "value": reader.u16()}
        if code == 27:
            return {"op": "set_used_event", "value": reader.u16()}
        if code == 28:
            # A raw store anywhere in the rings, as a buggy driver might make.
            offset = reader.u16() & 0x3FFF
            data = bytes(reader.u8() for _ in range(reader.below(4) + 1))
            return {"op": "write", "addr": offset, "hex": data.hex()}
        return {"op": "pop"}


def main(argv: list[str]) -> int:
    for path in argv:
        print(json.dumps(decode(Path(path).read_bytes()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
