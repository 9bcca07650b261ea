"""Split virtqueue geometry: where the descriptor table and rings lie.

A split virtqueue of ``size`` entries (a power of two up to 32768, 2.7) has
three parts in guest memory (2.7.5, 2.7.6, 2.7.8):

- the descriptor table, ``size`` entries of 16 bytes (addr, len, flags, next);
- the available ring: flags, idx, ring[size], used_event (all le16);
- the used ring: flags, idx (le16), ring[size] of {id, len} (le32 each),
  avail_event (le16).

Virtio 1.x lets the driver place each part anywhere with alignment 16, 2 and 4
(2.7.1, table "Virtqueue Part Alignment"). The legacy interface puts all three
in one block: the table, then the available ring, then the used ring at the
next multiple of the alignment (4096 on PCI) (2.7.2, "Legacy Interfaces").
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .cdefs import offsetof, sizeof
from .errors import UsageError

__all__ = [
    "DescFlags",
    "AvailFlags",
    "UsedFlags",
    "DESCRIPTOR_SIZE",
    "DESCRIPTOR_FORMAT",
    "USED_ELEM_SIZE",
    "MAX_QUEUE_SIZE",
    "LEGACY_ALIGN",
    "RingLayout",
    "check_queue_size",
]


class DescFlags(enum.IntFlag):
    """Descriptor flags (2.7.5)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class AvailFlags(enum.IntFlag):
    """Available ring flags (2.7.6)."""

    NO_INTERRUPT = 1


class UsedFlags(enum.IntFlag):
    """Used ring flags (2.7.8)."""

    NO_NOTIFY = 1


DESCRIPTOR_SIZE = sizeof("struct vring_desc")
DESCRIPTOR_FORMAT = struct.Struct("<QIHH")
"""One descriptor as (addr, len, flags, next); the hot path reads it with this."""
USED_ELEM_SIZE = sizeof("struct vring_used_elem")
RING_HEADER_SIZE = offsetof("struct vring_used", "ring")
MAX_QUEUE_SIZE = 32768
LEGACY_ALIGN = 4096

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


def check_queue_size(size: int) -> None:
    """Raise ``UsageError`` unless ``size`` is a power of two up to 32768."""
    if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
        raise UsageError(
            f"queue size {size} is invalid: use a power of two from 1 to {MAX_QUEUE_SIZE}"
        )


@dataclass(frozen=True)
class RingLayout:
    """Guest-physical addresses of one split virtqueue's three parts."""

    size: int
    desc: int
    avail: int
    used: int

    def __post_init__(self) -> None:
        check_queue_size(self.size)

    @classmethod
    def legacy(cls, size: int, base: int, align: int = LEGACY_ALIGN) -> RingLayout:
        """Return the legacy layout of a queue whose block starts at ``base``."""
        check_queue_size(size)
        avail = base + DESCRIPTOR_SIZE * size
        avail_end = avail + avail_ring_bytes(size)
        used = (avail_end + align - 1) // align * align
        return cls(size, base, avail, used)

    @classmethod
    def packed_after(cls, size: int, base: int) -> RingLayout:
        """Return a virtio 1.x layout with the parts back to back from ``base``.

        Each part starts at the next address its alignment allows; this is
        how tests and the guest model lay out a queue in a small memory.
        """
        check_queue_size(size)
        desc = _align_up(base, DESC_ALIGN)
        avail = _align_up(desc + DESCRIPTOR_SIZE * size, AVAIL_ALIGN)
        used = _align_up(avail + avail_ring_bytes(size), USED_ALIGN)
        return cls(size, desc, avail, used)

    @property
    def desc_bytes(self) -> int:
        return DESCRIPTOR_SIZE * self.size

    @property
    def avail_bytes(self) -> int:
        return avail_ring_bytes(self.size)

    @property
    def used_bytes(self) -> int:
        return used_ring_bytes(self.size)

    @property
    def end(self) -> int:
        """First address after the used ring."""
        return self.used + self.used_bytes

    def misalignment(self) -> str | None:
        """Describe the first part that breaks the 1.x alignment, or None."""
        for name, address, align in (
            ("descriptor table", self.desc, DESC_ALIGN),
            ("available ring", self.avail, AVAIL_ALIGN),
            ("used ring", self.used, USED_ALIGN),
        ):
            if address % align:
                return f"{name} at {address:#x} is not aligned to {align} bytes"
        return None

    # Field addresses, for tests and tools; the queues use views instead.
    @property
    def avail_idx_addr(self) -> int:
        return self.avail + 2

    def avail_ring_addr(self, slot: int) -> int:
        return self.avail + RING_HEADER_SIZE + 2 * slot

    @property
    def used_event_addr(self) -> int:
        return self.avail + RING_HEADER_SIZE + 2 * self.size

    @property
    def used_idx_addr(self) -> int:
        return self.used + 2

    def used_elem_addr(self, slot: int) -> int:
        return self.used + RING_HEADER_SIZE + USED_ELEM_SIZE * slot

    @property
    def avail_event_addr(self) -> int:
        return self.used + RING_HEADER_SIZE + USED_ELEM_SIZE * self.size


def avail_ring_bytes(size: int) -> int:
    """Bytes of an available ring of ``size`` entries, used_event included."""
    return RING_HEADER_SIZE + 2 * size + 2


def used_ring_bytes(size: int) -> int:
    """Bytes of a used ring of ``size`` entries, avail_event included."""
    return RING_HEADER_SIZE + USED_ELEM_SIZE * size + 2


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align
