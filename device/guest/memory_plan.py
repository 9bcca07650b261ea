"""Guest-physical memory for the driver model: a bump allocator and slot pools.

``BumpAllocator`` hands out aligned ranges from a base address upwards and
never frees. The driver lays out everything once at probe (rings, indirect
tables, packet buffers), then creates guest memory of the size it reached.
``SlotPool`` is a free list of equal-sized buffers inside one such range.
"""

from __future__ import annotations

__all__ = ["BumpAllocator", "SlotPool", "FIRST_ADDRESS"]

FIRST_ADDRESS = 0x1000
"""Guest-physical address of the first allocation. Page 0 stays unused, so a
descriptor with address 0 points outside every buffer the model owns."""


class BumpAllocator:
    """Allocate aligned ranges of guest-physical memory upwards from ``base``."""

    def __init__(self, base: int = FIRST_ADDRESS) -> None:
        self.base = base
        self.top = base

    def allocate(self, size: int, align: int = 16) -> int:
        """Return the address of ``size`` fresh bytes aligned to ``align``.

        Raises ``ValueError`` for a negative size or an alignment that is not
        a power of two.
        """
        if size < 0:
            raise ValueError(f"allocation of {size} bytes is invalid: use 0 or more")
        if align < 1 or align & (align - 1):
            raise ValueError(f"alignment {align} is invalid: use a power of two")
        address = (self.top + align - 1) & ~(align - 1)
        self.top = address + size
        return address

    @property
    def used(self) -> int:
        """Bytes from ``base`` to the end of the last allocation."""
        return self.top - self.base


class SlotPool:
    """``count`` buffers, ``slot_size`` bytes apart, from ``base`` on.

    ``take`` returns the slot freed most recently (a stack), which keeps
    recently used buffers hot, as a slab allocator would.
    """

    __slots__ = ("base", "slot_size", "count", "_free")

    def __init__(self, base: int, slot_size: int, count: int) -> None:
        self.base = base
        self.slot_size = slot_size
        self.count = count
        self._free = list(range(count - 1, -1, -1))

    @classmethod
    def allocate(
        cls, allocator: BumpAllocator, slot_size: int, count: int, align: int = 64
    ) -> SlotPool:
        """Reserve the pool's memory from ``allocator`` and return the pool."""
        stride = (slot_size + align - 1) & ~(align - 1)
        base = allocator.allocate(stride * count, align)
        return cls(base, stride, count)

    def address(self, slot: int) -> int:
        return self.base + slot * self.slot_size

    def take(self) -> int | None:
        """Return a free slot number, or None when every slot is in use."""
        free = self._free
        return free.pop() if free else None

    def give_back(self, slot: int) -> None:
        """Return ``slot`` to the free list."""
        self._free.append(slot)

    def reset(self) -> None:
        """Mark every slot free again."""
        self._free = list(range(self.count - 1, -1, -1))

    @property
    def available(self) -> int:
        return len(self._free)
