"""A hand-driven split ring for tests: raw descriptor, avail and used access.

``RawRing`` plays a driver that writes guest memory directly, so tests can
build rings that ``DriverQueue`` never would (loops, bad indices, indirect
tables in odd places). It also reads back the used ring the device wrote.
"""

from __future__ import annotations

from virtio import DeviceQueue, GuestMemory, MemoryRegion, RingLayout
from virtio.layout import DESCRIPTOR_FORMAT, DESCRIPTOR_SIZE

NEXT = 1
WRITE = 2
INDIRECT = 4

DATA_BASE = 0x4000
"""First guest-physical address the tests use for buffers and tables."""


class RawRing:
    """One guest memory, one ring layout and a ``DeviceQueue`` on top of it."""

    def __init__(
        self,
        size: int = 8,
        *,
        memory: GuestMemory | None = None,
        memory_size: int = 0x10000,
        layout: RingLayout | None = None,
        last_avail_idx: int = 0,
        used_idx: int = 0,
        **device_options: object,
    ) -> None:
        if memory is None:
            memory = GuestMemory([MemoryRegion(0, bytearray(memory_size))])
        self.memory = memory
        self.layout = layout or RingLayout.packed_after(size, 0)
        self.size = self.layout.size
        self.avail_idx = last_avail_idx & 0xFFFF
        if self.memory.contains(self.layout.avail_idx_addr, 2):
            self.write_u16(self.layout.avail_idx_addr, self.avail_idx)
        if self.memory.contains(self.layout.used_idx_addr, 2):
            self.write_u16(self.layout.used_idx_addr, used_idx & 0xFFFF)
        self.device = DeviceQueue(
            self.memory,
            self.layout,
            last_avail_idx=last_avail_idx,
            used_idx=used_idx,
            **device_options,  # type: ignore[arg-type]
        )

    # -- raw memory -----------------------------------------------------------

    def read_u16(self, address: int) -> int:
        return int.from_bytes(self.memory.read(address, 2), "little")

    def write_u16(self, address: int, value: int) -> None:
        self.memory.write(address, (value & 0xFFFF).to_bytes(2, "little"))

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.memory.read(address, 4), "little")

    # -- driver-side writes ---------------------------------------------------

    def desc(
        self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0
    ) -> None:
        """Write descriptor ``index`` of the queue's descriptor table."""
        self.write_desc_at(
            self.layout.desc + index * DESCRIPTOR_SIZE, addr, length, flags, next_index
        )

    def write_desc_at(
        self, address: int, addr: int, length: int, flags: int = 0, next_index: int = 0
    ) -> None:
        """Write one descriptor at any guest-physical address."""
        self.memory.write(
            address, DESCRIPTOR_FORMAT.pack(addr, length, flags, next_index)
        )

    def table(self, address: int, entries: list[tuple[int, int, int, int]]) -> int:
        """Write an indirect table of (addr, len, flags, next); return its length."""
        for position, (addr, length, flags, next_index) in enumerate(entries):
            self.write_desc_at(
                address + position * DESCRIPTOR_SIZE, addr, length, flags, next_index
            )
        return len(entries) * DESCRIPTOR_SIZE

    def post(self, *heads: int) -> None:
        """Put ``heads`` in the next avail slots and publish avail.idx."""
        for head in heads:
            slot = self.avail_idx & (self.size - 1)
            self.write_u16(self.layout.avail_ring_addr(slot), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write_u16(self.layout.avail_idx_addr, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.write_u16(self.layout.avail_idx_addr, self.avail_idx)

    def set_avail_flags(self, value: int) -> None:
        self.write_u16(self.layout.avail, value)

    def set_used_event(self, value: int) -> None:
        self.write_u16(self.layout.used_event_addr, value)

    # -- device-side fields, read back -----------------------------------------

    @property
    def used_idx(self) -> int:
        return self.read_u16(self.layout.used_idx_addr)

    @property
    def used_flags(self) -> int:
        return self.read_u16(self.layout.used)

    @property
    def avail_event(self) -> int:
        return self.read_u16(self.layout.avail_event_addr)

    def used_elem(self, index: int) -> tuple[int, int]:
        """Return (id, len) of the used element at free-running ``index``."""
        address = self.layout.used_elem_addr(index & (self.size - 1))
        return self.read_u32(address), self.read_u32(address + 4)

    def used_ring_bytes(self) -> bytes:
        return self.memory.read(self.layout.used, self.layout.used_bytes)

    def driver_area_bytes(self) -> bytes:
        """The descriptor table and the avail ring, which the device must not write."""
        return self.memory.read(self.layout.desc, self.layout.desc_bytes) + (
            self.memory.read(self.layout.avail, self.layout.avail_bytes)
        )

    # -- shortcuts ------------------------------------------------------------

    def post_simple(self, head: int, length: int = 16, flags: int = 0) -> None:
        """Write a one-descriptor chain at ``head`` and make it available."""
        self.desc(head, DATA_BASE + 0x100 * head, length, flags)
        self.post(head)


def bytes_view(views: list[memoryview]) -> bytes:
    """Join a chain's buffer views into one bytes object."""
    return b"".join(bytes(view) for view in views)
