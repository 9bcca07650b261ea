"""Turn fuzzer bytes into a whole-device case and check it.

``decode(data)`` reads the bytes as a stream of choices and builds a case
object in the ``virtio-net-case/1`` format. The case has guest memory (one
region, or two with or without a gap), a feature set, the status to bring
the device to and the TX policy. It has up to three queues with their ring
addresses and starting indices, descriptor tables, avail rings, indirect
tables and buffer contents. Then come the actions: kicks, received frames,
virtual time, more driver writes, status writes and resets.

Most choices come from small sets of values that reach the device's edges:
lengths around the header size and the frame limits, addresses at the end
of memory, indices near the wrap. The rest are raw bytes. When the input
runs out every further choice is 0, so any input decodes.

``check(case)`` replays it with the invariant checker of
``device.case_check`` after every step and returns the violations. An
unexpected exception from the device propagates.

Run ``python fuzz/device_decoder.py INPUT`` to print the case a raw input
decodes to, for keeping it under ``fuzz/corpus/device/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from device.case import CaseRun, load_case
from device.case_check import InvariantChecker

__all__ = ["ByteReader", "decode", "check", "MEMORY_SIZE"]

MEMORY_SIZE = 0x10000
"""Bytes of the first region; rings live below 0x8000, buffers above."""
BUFFERS = 0x8000
FEATURES = [
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTIO_NET_F_MRG_RXBUF",
    "VIRTIO_NET_F_CSUM",
    "VIRTIO_NET_F_GUEST_CSUM",
    "VIRTIO_NET_F_HOST_TSO4",
    "VIRTIO_NET_F_GUEST_TSO4",
    "VIRTIO_NET_F_MTU",
    "VIRTIO_NET_F_CTRL_VQ",
    "VIRTIO_NET_F_CTRL_RX",
    "VIRTIO_NET_F_HOST_ECN",
    "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_NET_F_MQ",
]
"""Candidate features; the last two are not offered, so FEATURES_OK fails."""
LENGTHS = [
    0,
    1,
    8,
    10,
    11,
    12,
    13,
    16,
    60,
    72,
    100,
    1000,
    1514,
    1526,
    4096,
    0xFFFF_FFFF,
]
FRAME_LENGTHS = [0, 1, 13, 14, 60, 64, 1514, 1515, 1518, 1600, 3000, 9000]
ODD_ADDRESSES = [
    MEMORY_SIZE - 8,
    MEMORY_SIZE,
    0xFFF0,
    1 << 63,
    (1 << 64) - 16,
    0x200000,
]
STATUS_VALUES = [15, 15, 15, 11, 7, 3, 0]
INITIAL_STATUS = [15] * 12 + [11, 7, 7, 3]
TX_MODES = ["immediate", "bh", "timer", "timer-legacy"]


class ByteReader:
    """Reads choices from fuzzer bytes; 0 once the bytes run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def byte(self) -> int:
        if self.position >= len(self.data):
            return 0
        value = self.data[self.position]
        self.position += 1
        return value

    def u16(self) -> int:
        return self.byte() | self.byte() << 8

    def u32(self) -> int:
        return self.u16() | self.u16() << 16

    def below(self, limit: int) -> int:
        return self.byte() % limit if limit > 0 else 0

    def choice(self, values: list) -> Any:
        return values[self.byte() % len(values)]

    def chance(self, out_of: int) -> bool:
        """True with probability about 1 / ``out_of``."""
        return self.byte() % out_of == 0

    def raw(self, length: int) -> bytes:
        return bytes(self.byte() for _ in range(length))


def _memory(reader: ByteReader) -> list[dict[str, int]]:
    regions = [{"gpa": 0, "size": MEMORY_SIZE}]
    shape = reader.below(4)
    if shape == 1:
        regions.append({"gpa": MEMORY_SIZE, "size": 0x4000})
    elif shape == 2:
        regions.append({"gpa": 0x40000, "size": 0x4000})
    return regions


_NEEDS = {
    "VIRTIO_NET_F_HOST_TSO4": "VIRTIO_NET_F_CSUM",
    "VIRTIO_NET_F_GUEST_TSO4": "VIRTIO_NET_F_GUEST_CSUM",
    "VIRTIO_NET_F_CTRL_RX": "VIRTIO_NET_F_CTRL_VQ",
    "VIRTIO_NET_F_HOST_ECN": "VIRTIO_NET_F_HOST_TSO4",
}


def _features(reader: ByteReader) -> list[str]:
    mask = reader.u16()
    names = [name for bit, name in enumerate(FEATURES) if mask >> bit & 1]
    # Rare bits: a feature that is not offered makes the whole run a refusal.
    names = [name for name in names if name not in FEATURES[-2:] or reader.chance(16)]
    if not reader.chance(8):
        # Mostly a set the device accepts: add what each feature requires.
        for name in reversed(list(_NEEDS)):
            if name in names and _NEEDS[name] not in names:
                names.append(_NEEDS[name])
    if "VIRTIO_F_VERSION_1" not in names and not reader.chance(4):
        names.insert(0, "VIRTIO_F_VERSION_1")
    return names


def _queue(reader: ByteReader, index: int) -> dict[str, Any]:
    size = 1 << reader.below(5)
    if reader.chance(16):
        size = 0
    base = 0x800 + index * 0x2000
    layout = {"size": size, "desc": base, "avail": base + 0x800, "used": base + 0x1000}
    if reader.chance(8):
        part = reader.choice(["desc", "avail", "used"])
        layout[part] = reader.choice(ODD_ADDRESSES + [base + 1, base + 2, 0x7FF8])
    start = reader.choice([0, 0, 0, 0xFFFE, 0xFFFF, 0x8000, 5])
    layout["last_avail_idx"] = start
    layout["used_idx"] = start if not reader.chance(8) else reader.u16()
    return layout


def _address(reader: ByteReader) -> int:
    if reader.chance(16):
        return reader.choice(ODD_ADDRESSES)
    return BUFFERS + reader.below(112) * 0x100 + reader.choice([0, 0, 0, 4, 0xF8])


def _descriptor(reader: ByteReader, size: int) -> list[Any]:
    length = reader.choice(LENGTHS)
    if reader.chance(8):
        length = reader.u32()
    flags = reader.byte() & 7
    if reader.chance(16):
        flags |= reader.byte() << 3
    return [_address(reader), length, flags, reader.below(size + 2)]


def _mutate(reader: ByteReader, entry: list[Any], size: int) -> list[Any]:
    """Replace one field of a descriptor with a raw or edge value, rarely."""
    if not reader.chance(10):
        return entry
    field = reader.below(4)
    if field == 0:
        entry[0] = reader.choice(ODD_ADDRESSES)
    elif field == 1:
        entry[1] = reader.choice(LENGTHS) if reader.byte() & 1 else reader.u32()
    elif field == 2:
        entry[2] = reader.byte() & 7 if reader.byte() & 1 else reader.u16()
    else:
        entry[3] = reader.below(size + 2)
    return entry


def _chain(reader: ByteReader, index: int) -> list[list[Any]]:
    """The descriptors of one chain as the driver of queue ``index`` builds it.

    RX buffers are writable; TX chains are a header then the frame, both
    readable; a control request is readable data then a one-byte ack.
    """
    count = 1 + reader.below(3)
    entries = []
    for position in range(count):
        last = position == count - 1
        if index == 0:
            length, flags = reader.choice([1526, 1000, 100, 12, 8, 0]), 2
        elif index == 1:
            length = reader.choice([12, 72, 60, 4, 0, 13]) if position == 0 else 60
            flags = 0
        elif last and count > 1:
            length, flags = 1, 2
        else:
            length, flags = reader.choice([2, 3, 8]), 0
        if reader.chance(12):
            length = reader.choice(LENGTHS)
        if not last:
            flags |= 1
        entries.append([_address(reader), length, flags, 0])
    return entries


def _table(reader: ByteReader, index: int, size: int) -> tuple[list, list, list]:
    """Build a descriptor table of chains; return it, the heads and extra writes.

    Some chains go into an indirect table in the buffer area, pointed to by
    one INDIRECT descriptor.
    """
    table: list[list[Any]] = []
    heads: list[int] = []
    extra: list[dict[str, Any]] = []
    while len(table) < size and not (heads and reader.chance(3)):
        chain = _chain(reader, index)
        head = len(table)
        if reader.chance(5):
            for position, entry in enumerate(chain):
                entry[3] = position + 1
            gpa = BUFFERS + 0x7000 + reader.below(16) * 0x100
            extra.append({"gpa": gpa, "desc": [_mutate(reader, e, 4) for e in chain]})
            chain = [[gpa, 16 * len(chain), 4, 0]]
        if head + len(chain) > size:
            break
        for position, entry in enumerate(chain):
            if entry[2] & 1:
                entry[3] = head + position + 1
            table.append(_mutate(reader, entry, size))
        heads.append(head)
    while len(table) < size:
        table.append(_descriptor(reader, size))
    return table, heads, extra


def _ring_writes(
    reader: ByteReader, index: int, layout: dict[str, Any]
) -> list[dict[str, Any]]:
    size = layout["size"]
    if not size:
        return []
    writes: list[dict[str, Any]] = []
    table, heads, extra = _table(reader, index, size)
    if layout["desc"] + 16 * size <= MEMORY_SIZE:
        writes.append({"gpa": layout["desc"], "desc": table})
    writes += extra
    start = layout["last_avail_idx"]
    pending = len(heads)
    if reader.chance(12):
        pending = reader.below(size + 2) if reader.byte() & 1 else reader.u16()
    ring = [0] * size
    for offset, head in enumerate(heads):
        ring[(start + offset) % size] = head
    if reader.chance(12):
        ring[reader.below(size)] = reader.choice([size, 0xFFFF, reader.below(size)])
    flags = reader.choice([0, 0, 1, 0xFFFE])
    used_event = (start + reader.below(size + 2)) & 0xFFFF
    avail = [flags, (start + pending) & 0xFFFF, *ring, used_event]
    if layout["avail"] % 2 == 0 and layout["avail"] + 2 * len(avail) <= MEMORY_SIZE:
        writes.append({"gpa": layout["avail"], "u16": avail})
    used = layout["used"]
    if used % 2 == 0 and used + 4 <= MEMORY_SIZE:
        writes.append({"gpa": used, "u16": [0, layout["used_idx"]]})
    return writes


def _refill(reader: ByteReader, layout: dict[str, Any]) -> list[dict[str, Any]]:
    """More avail entries after the ones posted at start: heads and a new idx."""
    size = layout["size"]
    avail = layout["avail"]
    if not size or avail % 2 or avail + 4 + 2 * size > MEMORY_SIZE:
        return []
    slot = reader.below(size)
    heads = [reader.below(size + 1) for _ in range(1 + reader.below(size))]
    heads = heads[: size - slot]
    index = (layout["last_avail_idx"] + reader.below(2 * size + 2)) & 0xFFFF
    return [
        {"gpa": avail + 4 + 2 * slot, "u16": heads},
        {"gpa": avail + 2, "u16": [index]},
    ]


def _buffer_writes(reader: ByteReader) -> list[dict[str, Any]]:
    """Headers, frames and indirect tables in the buffer area."""
    writes: list[dict[str, Any]] = []
    for _ in range(reader.below(6)):
        gpa = BUFFERS + reader.below(128) * 0x100
        if reader.chance(3):
            table = [_descriptor(reader, 4) for _ in range(1 + reader.below(4))]
            writes.append({"gpa": gpa, "desc": table})
        else:
            writes.append({"gpa": gpa, "hex": reader.raw(reader.below(24)).hex()})
    return writes


def _frame(reader: ByteReader) -> dict[str, Any]:
    length = reader.choice(FRAME_LENGTHS)
    head = bytes.fromhex("525400123456525400000001") + reader.raw(2)
    action: dict[str, Any] = {"rx": (head + reader.raw(4))[:length].hex()}
    if length > 20:
        action["pad_to"] = length
    if reader.chance(4):
        action["header"] = reader.raw(12).hex()
    return action


def _action(
    reader: ByteReader, queues: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    kind = reader.below(10)
    if kind <= 2:
        return {"kick": reader.choice([0, 1, 1, 2, 0xFFFF, 0xFFFFFFFF])}
    if kind <= 4:
        return _frame(reader)
    if kind == 5:
        return {"advance_us": reader.choice([0, 1, 2, 150, 1000])}
    if kind == 6:
        name = reader.choice(["0", "1", "2"])
        writes = _refill(reader, queues[name])
        if reader.chance(3):
            writes += _ring_writes(reader, int(name), queues[name])
        return {"writes": writes + _buffer_writes(reader)}
    if kind == 7 and reader.chance(2):
        return {"status": reader.choice(STATUS_VALUES + [reader.byte()])}
    if kind == 8 and reader.chance(3):
        return {"reset": True}
    return {"writes": _buffer_writes(reader)}


def decode(data: bytes) -> dict[str, Any]:
    """Build a case object from fuzzer bytes; every input gives a valid case."""
    reader = ByteReader(data)
    case: dict[str, Any] = {
        "format": "virtio-net-case/1",
        "description": "decoded from fuzzer input",
        "memory": _memory(reader),
        "features": _features(reader),
        "status": reader.choice(INITIAL_STATUS),
        "tx_mode": reader.choice(TX_MODES),
        "tx_burst": reader.choice([1, 2, 4, 64, 256]),
        "mtu": reader.choice([68, 1500, 9000]),
        "hold_limit": reader.choice([0, 1, 4, 256]),
    }
    queues = {name: _queue(reader, int(name)) for name in ("0", "1", "2")}
    case["queues"] = queues
    writes = []
    for name, layout in queues.items():
        writes += _ring_writes(reader, int(name), layout)
    case["writes"] = writes + _buffer_writes(reader)
    actions = []
    for _ in range(1 + reader.below(12)):
        action = _action(reader, queues)
        if action is None:
            continue
        actions.append(action)
        if "reset" in action and not reader.chance(4):
            actions.append({"status": 15})
    case["actions"] = actions
    return case


def check(case: dict[str, Any]) -> list[str]:
    """Replay ``case`` with the invariant checker; return the violations."""
    checker = InvariantChecker()
    run = CaseRun(load_case(case), checker)
    run.run()
    return checker.violations


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python fuzz/device_decoder.py INPUT", file=sys.stderr)
        return 2
    case = decode(Path(argv[1]).read_bytes())
    print(json.dumps(case, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
