"""DeviceQueue.pop and chains: walking NEXT chains and indirect tables."""

from __future__ import annotations

import pytest
from ring_builder import DATA_BASE, INDIRECT, NEXT, WRITE, RawRing, bytes_view

from virtio import (
    AvailIndexJump,
    Chain,
    Descriptor,
    GuestMemory,
    HeadOutOfRange,
    MemoryRegion,
    RingLayout,
    TooManyInFlight,
    WriteBeforeRead,
)


def test_pop_single_readable_descriptor() -> None:
    ring = RawRing(4)
    ring.memory.write(DATA_BASE, b"hello")
    ring.desc(2, DATA_BASE, 5)
    ring.post(2)

    chain = ring.device.pop()

    assert isinstance(chain, Chain)
    assert chain.head == 2
    assert bytes_view(chain.readable) == b"hello"
    assert chain.readable_len == 5
    assert list(chain.writable) == []
    assert chain.writable_len == 0
    assert ring.device.last_avail_idx == 1
    assert ring.device.inuse == 1
    assert ring.device.in_flight_heads() == [2]


def test_pop_follows_next_into_writable() -> None:
    ring = RawRing(8)
    ring.memory.write(DATA_BASE, b"head")
    ring.desc(5, DATA_BASE, 4, NEXT, 1)
    ring.desc(1, DATA_BASE + 0x100, 8, NEXT | WRITE, 6)
    ring.desc(6, DATA_BASE + 0x200, 2, WRITE)
    ring.post(5)

    chain = ring.device.pop()
    chain.writable[0][:8] = b"ABCDEFGH"
    chain.writable[1][:2] = b"IJ"

    assert chain.head == 5
    assert bytes_view(chain.readable) == b"head"
    assert [len(view) for view in chain.writable] == [8, 2]
    assert chain.writable_len == 10
    assert ring.memory.read(DATA_BASE + 0x100, 8) == b"ABCDEFGH"
    assert ring.memory.read(DATA_BASE + 0x200, 2) == b"IJ"


def test_pop_indirect_table() -> None:
    ring = RawRing(4, indirect=True)
    table = DATA_BASE + 0x1000
    length = ring.table(
        table,
        [
            (DATA_BASE, 3, NEXT, 1),
            (DATA_BASE + 0x10, 4, NEXT, 2),
            (DATA_BASE + 0x20, 16, WRITE, 0),
        ],
    )
    ring.memory.write(DATA_BASE, b"abc")
    ring.memory.write(DATA_BASE + 0x10, b"defg")
    ring.desc(3, table, length, INDIRECT)
    ring.post(3)

    chain = ring.device.pop()

    assert chain.head == 3
    assert bytes_view(chain.readable) == b"abcdefg"
    assert chain.readable_len == 7
    assert chain.writable_len == 16


def test_pop_direct_header_then_indirect_write_flag_ignored() -> None:
    ring = RawRing(4, indirect=True)
    table = DATA_BASE + 0x1000
    # The table contains one more readable buffer, then a writable one. The
    # INDIRECT descriptor also carries WRITE, which the device must ignore
    # (virtio 1.2, 2.7.5.3.2). A device that honoured it would see a readable
    # entry after a writable buffer and reject the chain.
    length = ring.table(
        table,
        [(DATA_BASE + 0x40, 6, NEXT, 1), (DATA_BASE + 0x80, 32, WRITE, 0)],
    )
    ring.memory.write(DATA_BASE, b"virtio-hdr")
    ring.memory.write(DATA_BASE + 0x40, b"packet")
    ring.desc(0, DATA_BASE, 10, NEXT, 2)
    ring.desc(2, table, length, INDIRECT | WRITE)
    ring.post(0)

    chain = ring.device.pop()

    assert ring.device.broken is None
    assert bytes_view(chain.readable) == b"virtio-hdrpacket"
    assert chain.readable_len == 16
    assert chain.writable_len == 32


def test_pop_skips_zero_length_descriptors() -> None:
    ring = RawRing(8)
    ring.memory.write(DATA_BASE, b"data")
    ring.desc(0, 0xFFFF_FFFF_FFFF_FFFF, 0, NEXT, 1)  # address is never used
    ring.desc(1, DATA_BASE, 4, NEXT, 2)
    ring.desc(2, DATA_BASE + 0x100, 0, NEXT | WRITE, 3)
    ring.desc(3, DATA_BASE + 0x200, 8, WRITE)
    ring.post(0)

    chain = ring.device.pop()

    assert ring.device.broken is None
    assert bytes_view(chain.readable) == b"data"
    assert len(chain.readable) == 1
    assert len(chain.writable) == 1
    assert chain.writable_len == 8


def test_pop_chain_of_only_zero_length_descriptors() -> None:
    ring = RawRing(4)
    ring.desc(0, 0, 0, NEXT | WRITE, 1)
    ring.desc(1, 0x9999_0000, 0, WRITE)
    ring.post(0)

    chain = ring.device.pop()

    assert chain.head == 0
    assert list(chain.readable) == []
    assert list(chain.writable) == []
    assert chain.readable_len == chain.writable_len == 0


def test_zero_length_writable_starts_write_part() -> None:
    ring = RawRing(4)
    # The WRITE flag decides the order (2.7.4.2), not the length: a readable
    # descriptor after a zero-length writable one is readable after writable.
    ring.desc(0, DATA_BASE, 0, NEXT | WRITE, 1)
    ring.desc(1, DATA_BASE, 4)
    ring.post(0)

    with pytest.raises(WriteBeforeRead):
        ring.device.pop()

    assert isinstance(ring.device.broken, WriteBeforeRead)


def test_pop_zero_length_inside_indirect_table() -> None:
    ring = RawRing(4, indirect=True)
    table = DATA_BASE + 0x1000
    length = ring.table(
        table, [(0, 0, NEXT, 1), (DATA_BASE, 2, NEXT, 2), (0, 0, WRITE, 0)]
    )
    ring.desc(0, table, length, INDIRECT)
    ring.post(0)

    chain = ring.device.pop()

    assert chain.readable_len == 2
    assert list(chain.writable) == []


def test_pop_buffer_spanning_two_regions() -> None:
    memory = GuestMemory(
        [MemoryRegion(0, bytearray(0x8000)), MemoryRegion(0x8000, bytearray(0x1000))]
    )
    ring = RawRing(4, memory=memory)
    memory.write(0x7FFC, b"01234567")
    ring.desc(0, 0x7FFC, 8, NEXT, 1)
    ring.desc(1, 0x8100, 4, WRITE)  # entirely in the second region
    ring.post(0)

    chain = ring.device.pop()

    assert [bytes(view) for view in chain.readable] == [b"0123", b"4567"]
    assert chain.readable_len == 8
    assert chain.writable_len == 4


def test_pop_indirect_table_spanning_two_regions() -> None:
    memory = GuestMemory(
        [MemoryRegion(0, bytearray(0x8000)), MemoryRegion(0x8000, bytearray(0x1000))]
    )
    ring = RawRing(4, memory=memory, indirect=True)
    table = 0x8000 - 16  # first entry in region one, second in region two
    length = ring.table(table, [(DATA_BASE, 4, NEXT, 1), (DATA_BASE + 8, 4, WRITE, 0)])
    ring.desc(0, table, length, INDIRECT)
    ring.post(0)

    chain = ring.device.pop()

    assert chain.readable_len == 4
    assert chain.writable_len == 4


def test_pop_empty_returns_none() -> None:
    ring = RawRing(4)

    assert ring.device.pop() is None
    assert ring.device.available() == 0
    assert ring.device.inuse == 0


def test_available_counts_without_consuming() -> None:
    ring = RawRing(8)
    for head in range(3):
        ring.post_simple(head)

    assert ring.device.available() == 3
    assert ring.device.available() == 3
    assert ring.device.last_avail_idx == 0


def test_chains_limit_leaves_rest_available() -> None:
    ring = RawRing(8)
    for head in (4, 2, 7, 1):
        ring.post_simple(head)

    heads = [chain.head for chain in ring.device.chains(3)]

    assert heads == [4, 2, 7]
    assert ring.device.available() == 1
    assert ring.device.pop().head == 1


def test_chains_stopped_early_consumes_only_yielded() -> None:
    ring = RawRing(8)
    for head in range(5):
        ring.post_simple(head)

    for chain in ring.device.chains():
        if chain.head == 1:
            break

    assert ring.device.last_avail_idx == 2
    assert [chain.head for chain in ring.device.chains()] == [2, 3, 4]


def test_chains_sees_buffers_added_while_iterating() -> None:
    ring = RawRing(8)
    ring.post_simple(0)
    seen = []

    for chain in ring.device.chains():
        seen.append(chain.head)
        if chain.head == 0:
            ring.post_simple(1)

    assert seen == [0, 1]


def test_add_used_between_chains() -> None:
    ring = RawRing(2)
    ring.post_simple(0)
    ring.post_simple(1)

    for chain in ring.device.chains():
        ring.device.add_used(chain.head, 0)

    assert ring.device.inuse == 0
    assert ring.device.used_idx == 2


def test_chain_object_reused_per_head() -> None:
    ring = RawRing(1)
    ring.post_simple(0, length=4)
    first = ring.device.pop()
    ring.device.add_used(0, 0)
    ring.post_simple(0, length=6)

    second = ring.device.pop()

    assert second is first
    assert second.readable_len == 6
    assert "head=0" in repr(second)


def test_peek_lists_without_consuming() -> None:
    ring = RawRing(8, indirect=True)
    table = DATA_BASE + 0x1000
    length = ring.table(table, [(DATA_BASE, 4, NEXT, 1), (DATA_BASE, 4, WRITE, 0)])
    ring.desc(3, table, length, INDIRECT)
    ring.desc(0, DATA_BASE, 2, NEXT, 1)
    ring.desc(1, DATA_BASE, 2, WRITE)
    ring.post(3, 0)

    listing = list(ring.device.peek(8))

    assert [head for head, _ in listing] == [3, 0]
    assert listing[0][1] == [
        Descriptor(3, table, 32, INDIRECT, 0, False),
        Descriptor(0, DATA_BASE, 4, NEXT, 1, True),
        Descriptor(1, DATA_BASE, 4, WRITE, 0, True),
    ]
    assert [d.index for d in listing[1][1]] == [0, 1]
    assert ring.device.last_avail_idx == 0
    assert ring.device.broken is None


def test_peek_stops_at_bad_head_without_breaking() -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.post(99)

    listing = list(ring.device.peek(4))

    assert [head for head, _ in listing] == [0]
    assert ring.device.broken is None


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_full_ring_pops_every_head(size: int) -> None:
    memory = GuestMemory.anonymous(0x100000)
    layout = RingLayout.packed_after(size, 0)
    ring = RawRing(memory=memory, layout=layout)
    for head in range(size):
        ring.desc(head, layout.end + head, 1)
    ring.post(*reversed(range(size)))

    heads = [chain.head for chain in ring.device.chains()]

    assert heads == list(reversed(range(size)))
    assert ring.device.inuse == size
    assert ring.device.available() == 0


# -- pop_single: the run of one-descriptor readable chains -------------------------


def test_pop_single_takes_run_of_single_buffers() -> None:
    ring = RawRing(8, event_idx=True)
    for head, text in ((3, b"abc"), (1, b"defg")):
        ring.memory.write(DATA_BASE + 0x100 * head, text)
        ring.desc(head, DATA_BASE + 0x100 * head, len(text))
    ring.post(3, 1)

    heads, buffers = ring.device.pop_single(8, 1, 64)

    assert heads == [3, 1]
    assert [bytes(buffer) for buffer in buffers] == [b"abc", b"defg"]
    assert ring.device.last_avail_idx == 2
    assert ring.avail_event == 2
    assert sorted(ring.device.in_flight_heads()) == [1, 3]


@pytest.mark.parametrize(
    "shape",
    ["next", "writable", "indirect", "too-short", "too-long", "second-region"],
)
def test_pop_single_stops_at_other_chain(shape: str) -> None:
    memory = GuestMemory(
        [MemoryRegion(0, bytearray(0x8000)), MemoryRegion(0x8000, bytearray(0x1000))]
    )
    ring = RawRing(8, memory=memory, indirect=True)
    ring.post_simple(0)
    if shape == "next":
        ring.desc(1, DATA_BASE + 0x100, 16, NEXT, 2)
        ring.desc(2, DATA_BASE + 0x200, 16)
    elif shape == "writable":
        ring.desc(1, DATA_BASE + 0x100, 16, WRITE)
    elif shape == "indirect":
        length = ring.table(DATA_BASE + 0x800, [(DATA_BASE + 0x100, 16, 0, 0)])
        ring.desc(1, DATA_BASE + 0x800, length, INDIRECT)
    elif shape == "second-region":
        ring.desc(1, 0x8100, 16)  # legal, but not in the region sliced directly
    else:
        ring.desc(1, DATA_BASE + 0x100, 4 if shape == "too-short" else 100)
    ring.post(1)
    ring.post_simple(3)

    heads, _ = ring.device.pop_single(8, 8, 64)

    assert heads == [0]
    assert ring.device.available() == 2
    # The general path takes the chain that ended the run.
    chain = ring.device.pop()
    assert chain is not None and chain.head == 1


@pytest.mark.parametrize("bad_head", [8, 0])
def test_pop_single_leaves_bad_head_to_chains(bad_head: int) -> None:
    ring = RawRing(8)
    ring.post_simple(0)
    ring.post(bad_head)  # out of range, or head 0 a second time while in flight

    heads, _ = ring.device.pop_single(8, 1, 64)

    assert heads == [0]
    assert ring.device.broken is None
    with pytest.raises((HeadOutOfRange, TooManyInFlight)):
        ring.device.pop()
    assert ring.device.broken is not None


def test_pop_single_respects_limit_and_empty_ring() -> None:
    ring = RawRing(8)
    assert ring.device.pop_single(4, 1, 64) == ([], [])
    for head in range(3):
        ring.post_simple(head)

    assert ring.device.pop_single(2, 1, 64)[0] == [0, 1]
    assert ring.device.pop_single(4, 1, 64)[0] == [2]


def test_pop_single_raises_index_jump_before_popping() -> None:
    ring = RawRing(4)
    ring.set_avail_idx(9)

    with pytest.raises(AvailIndexJump):
        ring.device.pop_single(4, 1, 64)

    assert ring.device.last_avail_idx == 0


def test_pop_single_on_broken_queue_pops_nothing() -> None:
    ring = RawRing(4)
    ring.post(7)
    with pytest.raises(HeadOutOfRange):
        ring.device.pop()
    ring.post_simple(0)

    assert ring.device.pop_single(4, 1, 64) == ([], [])
