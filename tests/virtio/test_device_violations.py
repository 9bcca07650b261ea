"""Every driver violation DeviceQueue detects, and the broken state after it.

Each case builds a malformed ring by hand and checks the whole contract: the
right ``DriverError`` kind is raised once, nothing is consumed, and from then
on the queue reads no guest memory, pops nothing and writes nothing.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from ring_builder import DATA_BASE, INDIRECT, NEXT, WRITE, RawRing

from virtio import (
    DRIVER_ERROR_KINDS,
    DriverError,
    GuestMemory,
    MemoryRegion,
    RingLayout,
)
from virtio.device_queue import MAX_INDIRECT_ENTRIES

QUEUE_INDEX = 5
TABLE = DATA_BASE + 0x1000
MEMORY_SIZE = 0x10000
U64 = 1 << 64


def gapped_memory() -> GuestMemory:
    return GuestMemory(
        [MemoryRegion(0, bytearray(0x8000)), MemoryRegion(0x9000, bytearray(0x1000))]
    )


def adjacent_memory() -> GuestMemory:
    return GuestMemory(
        [MemoryRegion(0, bytearray(0x8000)), MemoryRegion(0x8000, bytearray(0x8000))]
    )


@dataclass
class Case:
    """One malformed ring: how to build it and which kind it must raise."""

    kind: str
    build: Callable[[RawRing], None]
    size: int = 4
    indirect: bool = False
    start: int = 0
    memory: Callable[[], GuestMemory] | None = None
    layout: Callable[[], RingLayout] | None = None
    options: dict = field(default_factory=dict)

    def make_ring(self) -> RawRing:
        memory = self.memory() if self.memory else GuestMemory.anonymous(MEMORY_SIZE)
        layout = self.layout() if self.layout else None
        return RawRing(
            self.size,
            memory=memory,
            layout=layout,
            last_avail_idx=self.start,
            used_idx=self.start,
            indirect=self.indirect,
            index=QUEUE_INDEX,
        )


def pop_one_then(build: Callable[[RawRing], None]) -> Callable[[RawRing], None]:
    """Make one good chain in flight before ``build`` breaks the ring."""

    def setup(ring: RawRing) -> None:
        ring.post_simple(0)
        assert ring.device.pop().head == 0
        build(ring)

    return setup


def one_desc(addr: int, length: int, flags: int = 0) -> Callable[[RawRing], None]:
    def build(ring: RawRing) -> None:
        ring.desc(1, addr, length, flags)
        ring.post(1)

    return build


def indirect_desc(length: int, flags: int = INDIRECT, addr: int = TABLE):
    def build(ring: RawRing) -> None:
        ring.table(TABLE, [(DATA_BASE, 4, 0, 0), (DATA_BASE, 4, 0, 0)])
        ring.desc(1, addr, length, flags)
        ring.post(1)

    return build


def indirect_table(entries: list[tuple[int, int, int, int]]):
    def build(ring: RawRing) -> None:
        length = ring.table(TABLE, entries)
        ring.desc(1, TABLE, length, INDIRECT)
        ring.post(1)

    return build


def direct_chain(*descs: tuple[int, int, int, int, int], head: int = 0):
    """Write descriptors given as (index, addr, len, flags, next); post ``head``."""

    def build(ring: RawRing) -> None:
        for index, addr, length, flags, next_index in descs:
            ring.desc(index, addr, length, flags, next_index)
        ring.post(head)

    return build


def header_then_indirect(entries: list[tuple[int, int, int, int]], header_flags: int):
    def build(ring: RawRing) -> None:
        length = ring.table(TABLE, entries)
        ring.desc(0, DATA_BASE, 8, header_flags | NEXT, 1)
        ring.desc(1, TABLE, length, INDIRECT)
        ring.post(0)

    return build


def post_more(count: int) -> Callable[[RawRing], None]:
    def build(ring: RawRing) -> None:
        for head in range(1, 1 + count):
            ring.desc(head, DATA_BASE, 1)
        ring.post(*range(1, 1 + count))

    return build


def repost_head_zero(ring: RawRing) -> None:
    ring.post(0)


def nothing(ring: RawRing) -> None:
    """Leave the ring as it is: the layout itself is the fault."""


CASES: dict[str, Case] = {
    # avail.idx moves more than the queue size ahead (2.7.6).
    "avail-jump": Case("avail-index-jump", lambda ring: ring.set_avail_idx(5)),
    "avail-jump-max": Case("avail-index-jump", lambda ring: ring.set_avail_idx(0xFFFF)),
    "avail-jump-at-wrap": Case(
        "avail-index-jump", lambda ring: ring.set_avail_idx(0x0003), start=0xFFFE
    ),
    # The avail ring names a descriptor beyond the table.
    "head-equal-size": Case("head-out-of-range", lambda ring: ring.post(4)),
    "head-ffff": Case("head-out-of-range", lambda ring: ring.post(0xFFFF)),
    # NEXT points beyond the table.
    "next-equal-size": Case(
        "next-out-of-range", direct_chain((0, DATA_BASE, 4, NEXT, 4))
    ),
    "next-ffff": Case(
        "next-out-of-range", direct_chain((0, DATA_BASE, 4, NEXT, 0xFFFF))
    ),
    "next-out-of-indirect-table": Case(
        "next-out-of-range",
        indirect_table([(DATA_BASE, 4, NEXT, 1), (DATA_BASE, 4, NEXT, 2)]),
        indirect=True,
    ),
    # Loops, in the descriptor table and inside an indirect table.
    "loop-two": Case(
        "descriptor-loop",
        direct_chain((0, DATA_BASE, 4, NEXT, 1), (1, DATA_BASE, 4, NEXT, 0)),
    ),
    "loop-self": Case(
        "descriptor-loop", direct_chain((2, DATA_BASE, 4, NEXT, 2), head=2)
    ),
    "loop-self-queue-of-one": Case(
        "descriptor-loop", direct_chain((0, DATA_BASE, 4, NEXT, 0)), size=1
    ),
    "loop-zero-length": Case(
        "descriptor-loop",
        direct_chain((0, 0, 0, NEXT, 1), (1, 0, 0, NEXT, 0)),
    ),
    "loop-in-indirect": Case(
        "descriptor-loop",
        indirect_table([(DATA_BASE, 4, NEXT, 1), (DATA_BASE, 4, NEXT, 0)]),
        indirect=True,
    ),
    "loop-self-in-indirect": Case(
        "descriptor-loop",
        indirect_table([(DATA_BASE, 4, NEXT, 0)]),
        indirect=True,
    ),
    # Malformed INDIRECT descriptors (2.7.5.3).
    "indirect-not-negotiated": Case("bad-indirect-table", indirect_desc(32)),
    "indirect-zero-size": Case("bad-indirect-table", indirect_desc(0), indirect=True),
    "indirect-length-24": Case("bad-indirect-table", indirect_desc(24), indirect=True),
    "indirect-length-8": Case("bad-indirect-table", indirect_desc(8), indirect=True),
    "indirect-and-next": Case(
        "bad-indirect-table", indirect_desc(32, INDIRECT | NEXT), indirect=True
    ),
    "indirect-nested": Case(
        "nested-indirect",
        indirect_table([(DATA_BASE, 4, NEXT, 1), (TABLE, 32, INDIRECT, 0)]),
        indirect=True,
    ),
    "indirect-table-outside-memory": Case(
        "address-out-of-range", indirect_desc(32, addr=0x100000), indirect=True
    ),
    "indirect-table-crossing-end": Case(
        "address-out-of-range", indirect_desc(32, addr=MEMORY_SIZE - 16), indirect=True
    ),
    "indirect-table-wrapping-64-bits": Case(
        "address-out-of-range", indirect_desc(32, addr=U64 - 16), indirect=True
    ),
    # Buffers outside guest memory.
    "buffer-outside-memory": Case("address-out-of-range", one_desc(0x100000, 4)),
    "buffer-crossing-end": Case("address-out-of-range", one_desc(MEMORY_SIZE - 4, 8)),
    "writable-buffer-outside": Case(
        "address-out-of-range", one_desc(0x100000, 4, WRITE)
    ),
    "buffer-wrapping-64-bits": Case("address-out-of-range", one_desc(U64 - 16, 0x20)),
    "buffer-at-top-of-address-space": Case(
        "address-out-of-range", one_desc(U64 - 1, 1)
    ),
    "buffer-in-gap": Case(
        "address-out-of-range", one_desc(0x8800, 4), memory=gapped_memory
    ),
    "buffer-in-indirect-outside": Case(
        "address-out-of-range",
        indirect_table([(DATA_BASE, 4, NEXT, 1), (0x100000, 4, WRITE, 0)]),
        indirect=True,
    ),
    # Device-readable after device-writable (2.7.4.2).
    "readable-after-writable": Case(
        "write-before-read",
        direct_chain((0, DATA_BASE, 4, WRITE | NEXT, 1), (1, DATA_BASE, 4, 0, 0)),
    ),
    "readable-after-writable-in-indirect": Case(
        "write-before-read",
        indirect_table([(DATA_BASE, 4, WRITE | NEXT, 1), (DATA_BASE, 4, 0, 0)]),
        indirect=True,
    ),
    "writable-header-then-readable-table": Case(
        "write-before-read",
        header_then_indirect([(DATA_BASE, 4, 0, 0)], WRITE),
        indirect=True,
    ),
    # Rings that do not fit guest memory or break the 1.x alignment.
    "ring-desc-outside": Case(
        "ring-out-of-range",
        nothing,
        layout=lambda: RingLayout(4, 0x100000, 0x100, 0x200),
    ),
    "ring-avail-outside": Case(
        "ring-out-of-range", nothing, layout=lambda: RingLayout(4, 0, 0x100000, 0x200)
    ),
    "ring-used-outside": Case(
        "ring-out-of-range", nothing, layout=lambda: RingLayout(4, 0, 0x100, 0x100000)
    ),
    "ring-used-crossing-end": Case(
        "ring-out-of-range",
        nothing,
        layout=lambda: RingLayout(4, 0, 0x100, MEMORY_SIZE - 16),
    ),
    "ring-desc-misaligned": Case(
        "ring-out-of-range", nothing, layout=lambda: RingLayout(4, 0x08, 0x100, 0x200)
    ),
    "ring-avail-misaligned": Case(
        "ring-out-of-range", nothing, layout=lambda: RingLayout(4, 0, 0x101, 0x200)
    ),
    "ring-used-misaligned": Case(
        "ring-out-of-range", nothing, layout=lambda: RingLayout(4, 0, 0x100, 0x202)
    ),
    "ring-desc-split-across-regions": Case(
        "ring-out-of-range",
        nothing,
        memory=adjacent_memory,
        layout=lambda: RingLayout(4, 0x8000 - 32, 0x100, 0x200),
    ),
    # More chains than the queue size outstanding.
    "in-flight-plus-available": Case("too-many-in-flight", pop_one_then(post_more(4))),
    "head-reposted-in-flight": Case(
        "too-many-in-flight", pop_one_then(repost_head_zero)
    ),
}


def assert_broken_and_inert(ring: RawRing, error: DriverError) -> None:
    """Check the broken-queue contract after ``error`` was raised."""
    device = ring.device
    layout = device.layout
    mapped = ring.memory.contains(layout.used, layout.used_bytes)
    used_before = ring.used_ring_bytes() if mapped else b""

    assert device.broken is error
    assert not device.ready
    assert device.available() == 0
    assert device.pop() is None
    assert list(device.chains()) == []
    assert device.in_flight_heads() == []
    assert device.inuse == 0
    for head in range(device.size):
        device.add_used(head, 1)  # ignored: nothing is in flight any more
    assert device.publish() is False
    assert device.needs_notification() is False
    assert device.enable_notification() is False
    device.disable_notification()
    assert device.drop_all() == 0
    if used_before:
        assert ring.used_ring_bytes() == used_before


@pytest.mark.parametrize("name", sorted(CASES))
def test_violation_breaks_queue(name: str) -> None:
    case = CASES[name]
    ring = case.make_ring()
    case.build(ring)
    last_avail = ring.device.last_avail_idx

    with pytest.raises(DriverError) as caught:
        ring.device.pop()

    error = caught.value
    assert error.kind == case.kind
    assert type(error) is DRIVER_ERROR_KINDS[case.kind]
    assert error.queue == QUEUE_INDEX
    assert str(error).startswith(f"queue {QUEUE_INDEX}: ")
    assert ring.device.last_avail_idx == last_avail  # nothing consumed
    assert ring.device.inuse == 0
    assert_broken_and_inert(ring, error)


def test_cases_cover_every_kind() -> None:
    covered = {case.kind for case in CASES.values()}

    assert covered | {"chain-too-large"} == set(DRIVER_ERROR_KINDS)


@pytest.mark.parametrize("name", ["avail-jump", "in-flight-plus-available"])
def test_available_raises_like_pop(name: str) -> None:
    case = CASES[name]
    ring = case.make_ring()
    case.build(ring)

    with pytest.raises(DriverError) as caught:
        ring.device.available()

    assert caught.value.kind == case.kind
    assert ring.device.broken is caught.value


def test_broken_queue_reads_no_guest_memory() -> None:
    ring = CASES["head-ffff"].make_ring()
    CASES["head-ffff"].build(ring)
    with pytest.raises(DriverError):
        ring.device.pop()

    # Garbage everywhere: a queue that still walked the ring would raise or
    # return chains; a broken one returns at once.
    ring.memory.write(0, b"\xff" * MEMORY_SIZE)

    assert ring.device.pop() is None
    assert ring.device.available() == 0
    assert ring.device.avail_idx() == ring.device.last_avail_idx
    assert ring.device.used_event() == 0


def test_broken_queue_skips_earlier_completions() -> None:
    ring = RawRing(4, index=QUEUE_INDEX)
    ring.post_simple(0)
    chain = ring.device.pop()
    ring.post(0xFFFF)
    with pytest.raises(DriverError):
        ring.device.pop()
    used_before = ring.used_ring_bytes()

    ring.device.add_used(chain.head, 16)

    assert ring.device.publish() is False
    assert ring.used_ring_bytes() == used_before


def test_error_attributes_name_the_fault() -> None:
    ring = RawRing(4, index=2)
    ring.desc(0, DATA_BASE, 4, NEXT, 9)
    ring.post(0)

    with pytest.raises(DriverError) as caught:
        ring.device.pop()

    assert caught.value.kind == "next-out-of-range"
    assert caught.value.index == 0
    assert caught.value.value == 9
    assert "next 9" in str(caught.value)


def test_head_error_names_slot_and_head() -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.post(300)
    ring.device.pop()

    with pytest.raises(DriverError) as caught:
        ring.device.pop()

    assert caught.value.index == 1
    assert caught.value.value == 300
    assert "slot 1 names head 300" in str(caught.value)


def test_ring_error_raised_on_first_use_only() -> None:
    case = CASES["ring-used-misaligned"]
    ring = case.make_ring()  # the constructor does not raise
    assert ring.device.enable_notification() is False

    with pytest.raises(DriverError) as caught:
        ring.device.available()

    assert caught.value.kind == "ring-out-of-range"
    assert "used ring at 0x202" in str(caught.value)
    assert ring.device.pop() is None


def test_reset_clears_broken_state() -> None:
    ring = RawRing(4)
    ring.post(0xFFFF)
    with pytest.raises(DriverError):
        ring.device.pop()

    ring.device.reset()
    ring.set_avail_idx(0)
    ring.post_simple(1)

    assert ring.device.broken is None
    assert ring.device.pop().head == 1


def test_reset_keeps_ring_error() -> None:
    ring = CASES["ring-desc-outside"].make_ring()
    with pytest.raises(DriverError):
        ring.device.pop()

    ring.device.reset()

    with pytest.raises(DriverError) as caught:
        ring.device.pop()
    assert caught.value.kind == "ring-out-of-range"


# -- boundaries that must pass ------------------------------------------------------


@pytest.mark.parametrize("start", [0, 0xFFFE, 0xFFFC, 0xFFFF])
def test_avail_distance_equal_to_size_passes(start: int) -> None:
    ring = RawRing(4, last_avail_idx=start, used_idx=start)
    for head in range(4):
        ring.post_simple(head)

    assert ring.device.available() == 4
    assert [chain.head for chain in ring.device.chains()] == [0, 1, 2, 3]
    assert ring.device.last_avail_idx == (start + 4) & 0xFFFF


def test_chain_as_long_as_queue_passes() -> None:
    ring = RawRing(4)
    for index in range(3):
        ring.desc(index, DATA_BASE, 1, NEXT, index + 1)
    ring.desc(3, DATA_BASE, 1, WRITE)
    ring.post(0)

    chain = ring.device.pop()

    assert chain.readable_len == 3
    assert chain.writable_len == 1


def test_indirect_table_longer_than_queue_passes() -> None:
    ring = RawRing(2, indirect=True)
    entries = [(DATA_BASE, 1, NEXT, i + 1) for i in range(7)] + [(DATA_BASE, 1, 0, 0)]
    length = ring.table(TABLE, entries)
    ring.desc(0, TABLE, length, INDIRECT)
    ring.post(0)

    chain = ring.device.pop()

    assert chain.readable_len == 8


# -- chain length limit (2.7.5.2: at most 2**32 - 1 bytes) ---------------------------

BIG = 0x3FFF_FFFF


@pytest.fixture(scope="module")
def big_memory():
    """2 GiB of guest memory backed by an anonymous mapping; pages stay untouched."""
    mapping = mmap.mmap(-1, 1 << 31)
    yield GuestMemory([MemoryRegion(0, mapping)])


def big_ring(memory: GuestMemory, lengths: list[int], use_table: bool) -> RawRing:
    ring = RawRing(8, memory=memory, indirect=True)
    count = len(lengths)
    entries = [
        (DATA_BASE, length, NEXT if i < count - 1 else 0, i + 1)
        for i, length in enumerate(lengths)
    ]
    if use_table:
        length = ring.table(TABLE, entries)
        ring.desc(0, TABLE, length, INDIRECT)
    else:
        for i, (addr, length, flags, next_index) in enumerate(entries):
            ring.desc(i, addr, length, flags, next_index)
    ring.post(0)
    return ring


@pytest.mark.parametrize("use_table", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize(
    "lengths",
    [[BIG] * 4, [0x5555_5555] * 3],
    ids=["4x-3fffffff", "3x-55555555-exactly-max"],
)
def test_chain_up_to_max_bytes_passes(big_memory, lengths, use_table) -> None:
    ring = big_ring(big_memory, lengths, use_table)

    chain = ring.device.pop()

    assert ring.device.broken is None
    assert chain.readable_len == sum(lengths)
    assert chain.readable_len <= 0xFFFF_FFFF


@pytest.mark.parametrize("use_table", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize(
    "lengths",
    [[BIG] * 5, [0x5555_5555] * 3 + [1], [BIG] * 4 + [4]],
    ids=["5x-3fffffff", "max-plus-one", "4x-3fffffff-plus-4"],
)
def test_chain_over_max_bytes_raises(big_memory, lengths, use_table) -> None:
    ring = big_ring(big_memory, lengths, use_table)

    with pytest.raises(DriverError) as caught:
        ring.device.pop()

    assert caught.value.kind == "chain-too-large"
    assert caught.value.value > 0xFFFF_FFFF
    assert ring.device.broken is caught.value
    assert ring.device.pop() is None


def test_break_publishes_chains_completed_before_fault() -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.device.pop()
    ring.device.add_used(0, 8)
    ring.post(0xFFFF)

    with pytest.raises(DriverError):
        ring.device.pop()

    # The completed chain was processed in full, so it becomes visible; from
    # then on the queue writes nothing.
    assert ring.used_idx == 1
    assert ring.used_elem(0) == (0, 8)
    used_ring = ring.used_ring_bytes()
    assert ring.device.publish() is False
    assert ring.used_ring_bytes() == used_ring


# -- indirect table length limit -------------------------------------------------------


def long_table_ring(size: int, entries: int) -> RawRing:
    memory = GuestMemory.anonymous(0x100000)
    ring = RawRing(size, memory=memory, indirect=True)
    table = 0x40000
    ring.table(table, [(DATA_BASE, 1, NEXT, i + 1) for i in range(entries - 1)])
    ring.write_desc_at(table + 16 * (entries - 1), DATA_BASE, 1)
    ring.desc(0, table, 16 * entries, INDIRECT)
    ring.post(0)
    return ring


def test_indirect_table_at_entry_limit_passes() -> None:
    ring = long_table_ring(4, MAX_INDIRECT_ENTRIES)

    chain = ring.device.pop()

    assert chain.readable_len == MAX_INDIRECT_ENTRIES


def test_indirect_table_over_entry_limit_rejected() -> None:
    ring = long_table_ring(4, MAX_INDIRECT_ENTRIES + 1)

    with pytest.raises(DriverError) as caught:
        ring.device.pop()

    assert caught.value.kind == "bad-indirect-table"
    assert f"{MAX_INDIRECT_ENTRIES + 1} entries" in str(caught.value)


def test_indirect_table_up_to_queue_size_passes() -> None:
    ring = long_table_ring(2048, 2048)

    assert ring.device.pop().readable_len == 2048
