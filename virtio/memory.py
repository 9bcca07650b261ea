"""Guest-physical memory: regions backed by writable buffers.

A device sees guest RAM as one or more regions, each a guest-physical address
(GPA) range backed by a host buffer: a ``bytearray`` for tests, an ``mmap`` of
a file descriptor for vhost-user, or any object with a writable buffer.
Translation returns ``memoryview`` slices of those buffers, so the device reads
and writes guest memory in place.

Every access is checked: a byte outside every region, or an address plus
length that overflows 64 bits, raises ``MemoryAccessError`` naming the address
and the length. Nothing is ever clipped.

Ring index fields are read and written through ``memoryview.cast("H")`` views,
one aligned 16-bit load or store each, because a real guest may update the
same fields concurrently (vhost-user) and must never observe a torn index.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from .errors import MemoryAccessError, UsageError

__all__ = ["MemoryRegion", "GuestMemory"]

U64_LIMIT = 1 << 64

# NOTE: ring fields are read with native-order casts; virtio 1.x rings are
# little-endian, so a big-endian host would need byte swaps that are not here.
if sys.byteorder != "little":  # pragma: no cover - every supported host is LE
    raise ImportError("virtio.memory supports little-endian hosts only")


def _no_fence() -> None:
    return None


class MemoryRegion:
    """One contiguous guest-physical range backed by a writable host buffer.

    ``user_addr`` is the frontend's virtual address of the region's first byte
    when the memory comes from a vhost-user frontend; ring addresses in
    SET_VRING_ADDR are in that address space.
    """

    __slots__ = ("gpa", "size", "end", "buffer", "view", "user_addr")

    def __init__(
        self,
        gpa: int,
        buffer: Any,
        *,
        size: int | None = None,
        user_addr: int | None = None,
    ) -> None:
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise UsageError(f"region at {gpa:#x}: the backing buffer is read-only")
        if size is None:
            size = len(view)
        if size <= 0 or size > len(view):
            raise UsageError(
                f"region at {gpa:#x}: size {size:#x} does not fit a buffer of"
                f" {len(view):#x} bytes"
            )
        if gpa < 0 or gpa + size > U64_LIMIT:
            raise UsageError(f"region at {gpa:#x} size {size:#x} overflows 64 bits")
        self.gpa = gpa
        self.size = size
        self.end = gpa + size
        self.buffer = buffer
        self.view = view[:size]
        self.user_addr = user_addr

    def __repr__(self) -> str:
        return f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x})"


class GuestMemory:
    """The guest's RAM as a sorted set of non-overlapping regions.

    ``fence`` is called where the virtqueue code needs a full memory barrier
    between a store and a later load (virtio 1.2, 2.7.7.2 and 2.7.10.2). The
    default does nothing, which is right when the driver runs in this process;
    the vhost-user server passes one that executes a locked instruction.
    """

    def __init__(
        self,
        regions: Iterable[MemoryRegion],
        *,
        fence: Callable[[], None] | None = None,
    ) -> None:
        ordered = sorted(regions, key=lambda region: region.gpa)
        if not ordered:
            raise UsageError("guest memory needs at least one region")
        for before, after in zip(ordered, ordered[1:]):
            if after.gpa < before.end:
                raise UsageError(f"regions {before!r} and {after!r} overlap")
        self.regions: tuple[MemoryRegion, ...] = tuple(ordered)
        self.fence: Callable[[], None] = fence or _no_fence
        # The first region is cached for the fast path of view(): most guests
        # put every ring and buffer in one region.
        first = ordered[0]
        self._base = first.gpa
        self._end = first.end
        self._view = first.view

    @classmethod
    def anonymous(cls, size: int, gpa: int = 0) -> GuestMemory:
        """Create guest memory of one zero-filled region of ``size`` bytes."""
        return cls([MemoryRegion(gpa, bytearray(size))])

    @property
    def size(self) -> int:
        """Total bytes over all regions."""
        return sum(region.size for region in self.regions)

    def find_region(self, address: int) -> MemoryRegion | None:
        """Return the region that contains ``address``, or None."""
        for region in self.regions:
            if region.gpa <= address < region.end:
                return region
        return None

    def contains(self, address: int, length: int) -> bool:
        """Tell whether every byte of ``[address, address + length)`` is RAM."""
        try:
            self.views(address, length)
        except MemoryAccessError:
            return False
        return True

    def view(self, address: int, length: int) -> memoryview:
        """Return one writable view of ``length`` bytes at ``address``.

        Raises ``MemoryAccessError`` when any byte is outside guest memory, or
        when the range crosses from one region into another: callers that
        accept split ranges use ``views``.
        """
        if self._base <= address and address + length <= self._end and length >= 0:
            offset = address - self._base
            return self._view[offset : offset + length]
        parts = self.views(address, length)
        if len(parts) != 1:
            raise MemoryAccessError(address, length, "range crosses two regions")
        return parts[0]

    def views(self, address: int, length: int) -> list[memoryview]:
        """Return views covering ``length`` bytes at ``address``, in order.

        A range that spans adjacent regions comes back as one view per region.
        Raises ``MemoryAccessError`` on any byte outside every region, on a
        negative length, and when ``address + length`` overflows 64 bits.
        """
        if length < 0 or address < 0 or address + length > U64_LIMIT:
            raise MemoryAccessError(address, length, "range overflows 64 bits")
        if length == 0:
            region = self.find_region(address)
            if region is None and not any(r.end == address for r in self.regions):
                raise MemoryAccessError(address, length)
            return [memoryview(b"")]
        parts: list[memoryview] = []
        cursor = address
        remaining = length
        while remaining:
            region = self.find_region(cursor)
            if region is None:
                raise MemoryAccessError(address, length)
            offset = cursor - region.gpa
            take = min(remaining, region.size - offset)
            parts.append(region.view[offset : offset + take])
            cursor += take
            remaining -= take
        return parts

    def read(self, address: int, length: int) -> bytes:
        """Copy ``length`` bytes at ``address`` out of guest memory."""
        return b"".join(bytes(part) for part in self.views(address, length))

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``address``."""
        source = memoryview(data).cast("B")
        parts = self.views(address, len(source))
        if not len(source):
            # views() returns a read-only empty view for a zero length.
            return
        offset = 0
        for part in parts:
            part[:] = source[offset : offset + len(part)]
            offset += len(part)

    def u16_array(self, address: int, count: int) -> memoryview:
        """Return a view of ``count`` aligned little-endian 16-bit fields.

        Each item read or assigned through the view is one aligned 16-bit load
        or store, which is what makes ring indices safe against a concurrent
        guest. Raises ``MemoryAccessError`` if the address is misaligned or the
        range is not inside one region.
        """
        if address % 2:
            raise MemoryAccessError(address, 2 * count, "16-bit fields must be aligned")
        return self.view(address, 2 * count).cast("H")

    def u32_array(self, address: int, count: int) -> memoryview:
        """Return a view of ``count`` aligned little-endian 32-bit fields."""
        if address % 4:
            raise MemoryAccessError(address, 4 * count, "32-bit fields must be aligned")
        return self.view(address, 4 * count).cast("I")

    def __repr__(self) -> str:
        return f"GuestMemory({list(self.regions)!r})"
