"""GuestMemory and MemoryRegion: translation, bounds and aligned index views."""

from __future__ import annotations

import array
import ctypes
import mmap
import os

import pytest

from virtio import GuestMemory, MemoryAccessError, MemoryRegion, UsageError

U64 = 1 << 64


def two_adjacent_regions() -> tuple[GuestMemory, bytearray, bytearray]:
    low = bytearray(0x1000)
    high = bytearray(0x1000)
    memory = GuestMemory([MemoryRegion(0x1000, high), MemoryRegion(0, low)])
    return memory, low, high


# -- regions ------------------------------------------------------------------


def test_region_from_bytearray_aliases_buffer() -> None:
    buffer = bytearray(64)
    memory = GuestMemory([MemoryRegion(0x100, buffer)])

    memory.view(0x108, 4)[:] = b"abcd"

    assert buffer[8:12] == b"abcd"
    assert memory.read(0x108, 4) == b"abcd"


def test_region_from_memfd_mmap() -> None:
    fd = os.memfd_create("guest-ram-test")
    try:
        os.ftruncate(fd, 0x2000)
        mapping = mmap.mmap(fd, 0x2000)
    finally:
        os.close(fd)
    memory = GuestMemory([MemoryRegion(0x10000, mapping)])

    memory.write(0x10FFE, b"\x01\x02\x03\x04")

    assert mapping[0xFFE:0x1002] == b"\x01\x02\x03\x04"
    assert memory.u16_array(0x10FFE, 2).tolist() == [0x0201, 0x0403]


@pytest.mark.parametrize(
    "make_buffer",
    [
        lambda: array.array("B", bytes(32)),
        lambda: array.array("I", [0] * 8),
        lambda: (ctypes.c_uint8 * 32)(),
        lambda: memoryview(bytearray(32)),
    ],
    ids=["array-B", "array-I", "ctypes", "memoryview"],
)
def test_region_from_any_writable_buffer(make_buffer) -> None:
    buffer = make_buffer()
    memory = GuestMemory([MemoryRegion(0, buffer)])

    memory.write(4, b"\xaa\xbb")

    assert memory.size == 32
    assert bytes(memoryview(buffer).cast("B")[4:6]) == b"\xaa\xbb"


def test_region_read_only_buffer_rejected() -> None:
    with pytest.raises(UsageError, match="read-only"):
        MemoryRegion(0, b"immutable")


def test_region_size_limits() -> None:
    region = MemoryRegion(0x1000, bytearray(0x100), size=0x80)

    assert region.size == 0x80
    assert region.end == 0x1080
    with pytest.raises(UsageError, match="does not fit"):
        MemoryRegion(0, bytearray(0x10), size=0x20)
    with pytest.raises(UsageError, match="does not fit"):
        MemoryRegion(0, bytearray(0x10), size=0)


def test_region_overflowing_64_bits_rejected() -> None:
    MemoryRegion(U64 - 0x10, bytearray(0x10))
    with pytest.raises(UsageError, match="overflows 64 bits"):
        MemoryRegion(U64 - 0x8, bytearray(0x10))


def test_memory_rejects_overlap_and_empty() -> None:
    with pytest.raises(UsageError, match="overlap"):
        GuestMemory(
            [MemoryRegion(0, bytearray(0x100)), MemoryRegion(0x80, bytearray(4))]
        )
    with pytest.raises(UsageError, match="at least one region"):
        GuestMemory([])


def test_memory_regions_sorted_and_found() -> None:
    memory, low, high = two_adjacent_regions()

    assert [region.gpa for region in memory.regions] == [0, 0x1000]
    assert memory.size == 0x2000
    assert memory.find_region(0xFFF) is memory.regions[0]
    assert memory.find_region(0x1000) is memory.regions[1]
    assert memory.find_region(0x2000) is None


def test_anonymous_memory_at_gpa() -> None:
    memory = GuestMemory.anonymous(0x100, gpa=0x4000)

    assert memory.read(0x4000, 4) == bytes(4)
    assert not memory.contains(0, 1)


# -- ranges across regions and outside memory -----------------------------------


def test_range_spanning_adjacent_regions() -> None:
    memory, low, high = two_adjacent_regions()

    memory.write(0xFFE, b"wxyz")
    parts = memory.views(0xFFE, 4)

    assert [bytes(part) for part in parts] == [b"wx", b"yz"]
    assert low[0xFFE:] == b"wx"
    assert high[:2] == b"yz"
    assert memory.read(0xFFE, 4) == b"wxyz"
    assert memory.contains(0xFFE, 4)


def test_view_rejects_range_crossing_regions() -> None:
    memory, _, _ = two_adjacent_regions()

    with pytest.raises(MemoryAccessError, match="crosses two regions"):
        memory.view(0xFFE, 4)


@pytest.mark.parametrize(
    ("address", "length"),
    [
        (0x2000, 1),  # first byte after the last region
        (0x1FFF, 2),  # last byte inside, next one outside
        (0x3000, 0x10),  # far outside
        (0x0800, 0x2000),  # starts inside, runs past the end
    ],
)
def test_bytes_outside_memory_raise(address: int, length: int) -> None:
    memory, _, _ = two_adjacent_regions()

    with pytest.raises(MemoryAccessError) as caught:
        memory.views(address, length)

    assert caught.value.address == address
    assert caught.value.length == length
    assert f"{address:#x}" in str(caught.value)
    assert f"{length:#x}" in str(caught.value)
    assert not memory.contains(address, length)


def test_gap_between_regions_raises() -> None:
    memory = GuestMemory(
        [MemoryRegion(0, bytearray(0x100)), MemoryRegion(0x200, bytearray(0x100))]
    )

    with pytest.raises(MemoryAccessError):
        memory.read(0xF0, 0x20)
    with pytest.raises(MemoryAccessError):
        memory.write(0x150, b"x")
    assert memory.read(0x200, 2) == b"\x00\x00"


@pytest.mark.parametrize(
    ("address", "length"),
    [
        (U64 - 8, 16),
        (U64 - 1, 2),
        (0xFFFF_FFFF_FFFF_F000, 0xFFFF_FFFF),
    ],
)
def test_range_overflowing_64_bits_raises(address: int, length: int) -> None:
    memory = GuestMemory([MemoryRegion(U64 - 0x1000, bytearray(0x1000))])

    with pytest.raises(MemoryAccessError) as caught:
        memory.views(address, length)

    assert caught.value.address == address
    assert caught.value.length == length
    assert f"{address:#x}" in str(caught.value)
    assert f"{length:#x}" in str(caught.value)


def test_top_of_address_space_is_usable() -> None:
    memory = GuestMemory([MemoryRegion(U64 - 0x1000, bytearray(0x1000))])

    memory.write(U64 - 4, b"last")

    assert memory.read(U64 - 4, 4) == b"last"


def test_negative_length_raises() -> None:
    memory = GuestMemory.anonymous(0x100)

    with pytest.raises(MemoryAccessError):
        memory.views(0x10, -1)


def test_zero_length_ranges() -> None:
    memory = GuestMemory.anonymous(0x100)

    assert memory.views(0x10, 0) == [memoryview(b"")]
    assert memory.contains(0x100, 0)  # the end of a region is a valid empty range
    assert not memory.contains(0x200, 0)


# -- aligned index views --------------------------------------------------------


def test_u16_array_reads_little_endian() -> None:
    memory = GuestMemory.anonymous(0x100)
    memory.write(0x20, b"\x34\x12\xff\xff")

    fields = memory.u16_array(0x20, 2)
    fields[1] = 0xBEEF

    assert fields[0] == 0x1234
    assert memory.read(0x22, 2) == b"\xef\xbe"
    assert fields.itemsize == 2


def test_u16_array_misaligned_rejected() -> None:
    memory = GuestMemory.anonymous(0x100)

    with pytest.raises(MemoryAccessError, match="aligned") as caught:
        memory.u16_array(0x21, 1)

    assert caught.value.address == 0x21


def test_u32_array_alignment() -> None:
    memory = GuestMemory.anonymous(0x100)

    assert memory.u32_array(0x40, 2).itemsize == 4
    with pytest.raises(MemoryAccessError, match="aligned"):
        memory.u32_array(0x42, 1)


def test_index_views_must_fit_one_region() -> None:
    memory, _, _ = two_adjacent_regions()

    with pytest.raises(MemoryAccessError):
        memory.u16_array(0xFFE, 2)
    with pytest.raises(MemoryAccessError):
        memory.u16_array(0x1FFE, 2)


def test_default_fence_and_custom_fence() -> None:
    calls = []
    memory = GuestMemory(
        [MemoryRegion(0, bytearray(16))], fence=lambda: calls.append(1)
    )

    memory.fence()

    assert calls == [1]
    assert GuestMemory.anonymous(16).fence() is None


def test_zero_length_write() -> None:
    memory = GuestMemory.anonymous(0x100)

    memory.write(0x10, b"")

    assert memory.read(0x10, 0) == b""
    with pytest.raises(MemoryAccessError):
        memory.write(0x200, b"")
