"""DeviceQueue's used side: add_used, publish, unpop, drop_all, write isolation."""

from __future__ import annotations

import pytest
from ring_builder import DATA_BASE, NEXT, WRITE, RawRing

from virtio import DriverQueue, GuestMemory, RingLayout, UsageError

# -- add_used -------------------------------------------------------------------------


def test_add_used_writes_element_not_index() -> None:
    ring = RawRing(4)
    ring.post_simple(2)
    chain = ring.device.pop()

    ring.device.add_used(chain.head, 123)

    assert ring.used_elem(0) == (2, 123)
    assert ring.used_idx == 0  # not visible until publish
    assert ring.device.used_idx == 1
    assert ring.device.unpublished == 1
    assert ring.device.inuse == 0
    assert ring.device.in_flight_heads() == []


@pytest.mark.parametrize("head", [0, 3, 4, 0xFFFF, -1, 1 << 40])
def test_add_used_head_never_popped_raises(head: int) -> None:
    ring = RawRing(4)
    used_before = ring.used_ring_bytes()

    with pytest.raises(UsageError, match=f"head {head} is not in flight"):
        ring.device.add_used(head, 0)

    assert ring.used_ring_bytes() == used_before
    assert ring.device.used_idx == 0


def test_add_used_twice_raises() -> None:
    ring = RawRing(4)
    ring.post_simple(1)
    ring.device.pop()
    ring.device.add_used(1, 0)

    with pytest.raises(UsageError, match="head 1 is not in flight"):
        ring.device.add_used(1, 0)

    assert ring.device.used_idx == 1


def test_add_used_in_any_order() -> None:
    ring = RawRing(4)
    for head in (0, 1, 2):
        ring.post_simple(head)
    list(ring.device.chains())

    for head in (2, 0, 1):
        ring.device.add_used(head, head * 10)

    assert [ring.used_elem(i) for i in range(3)] == [(2, 20), (0, 0), (1, 10)]


@pytest.mark.parametrize("length", [1 << 32, -1, 1.5])
def test_add_used_length_out_of_range_raises(length: int) -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.device.pop()

    with pytest.raises(UsageError, match="not a 32-bit unsigned integer"):
        ring.device.add_used(0, length)

    assert ring.device.in_flight_heads() == [0]


def test_add_used_many_completes_in_order() -> None:
    ring = RawRing(4)
    for head in (2, 0, 3):
        ring.post_simple(head)
    heads, _ = ring.device.pop_single(4, 1, 64)

    ring.device.add_used_many([3, 2], 7)
    ring.device.add_used_many([0])

    assert [ring.used_elem(i) for i in range(3)] == [(3, 7), (2, 7), (0, 0)]
    assert ring.device.used_idx == 3
    assert ring.used_idx == 0  # not visible until publish
    assert ring.device.inuse == 0


@pytest.mark.parametrize("bad", [1, 9, -1, 1 << 40])
def test_add_used_many_bad_head_raises(bad: int) -> None:
    ring = RawRing(4)
    for head in (0, 2):
        ring.post_simple(head)
    list(ring.device.chains())

    with pytest.raises(UsageError, match=f"head {bad} is not in flight"):
        ring.device.add_used_many([0, bad, 2])

    # The head before the bad one was added, the one after it was not.
    assert ring.device.used_idx == 1
    assert ring.used_elem(0) == (0, 0)
    assert ring.device.in_flight_heads() == [2]


@pytest.mark.parametrize("length", [1 << 32, -1, 1.5])
def test_add_used_many_length_out_of_range_raises(length: int) -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.device.pop()

    with pytest.raises(UsageError, match="not a 32-bit unsigned integer"):
        ring.device.add_used_many([0], length)

    assert ring.device.in_flight_heads() == [0]


# -- publish batching -------------------------------------------------------------------


def test_publish_stores_used_idx_once_for_batch() -> None:
    ring = RawRing(8)
    for head in range(5):
        ring.post_simple(head)
    chains = list(ring.device.chains())

    for chain in chains:
        ring.device.add_used(chain.head, 7)
        # Each element is in memory before used.idx covers it.
        assert ring.used_elem(ring.device.used_idx - 1) == (chain.head, 7)
        assert ring.used_idx == 0

    ring.device.publish()

    assert ring.used_idx == 5
    assert ring.device.unpublished == 0


def test_publish_with_nothing_added_writes_nothing() -> None:
    ring = RawRing(4)
    before = ring.used_ring_bytes()

    assert ring.device.publish() is False
    assert ring.used_ring_bytes() == before


def test_publish_calls_fence_before_reading_driver_fields() -> None:
    calls = []
    memory = GuestMemory.anonymous(0x10000)
    memory.fence = lambda: calls.append("fence")
    ring = RawRing(4, memory=memory)
    ring.post_simple(0)
    ring.device.pop()
    ring.device.add_used(0, 0)

    ring.device.publish()

    assert calls == ["fence"]


# -- unpop / rewind -------------------------------------------------------------------


def test_unpop_returns_chains_in_order() -> None:
    ring = RawRing(8)
    for head in (5, 6, 7):
        ring.post_simple(head)
    list(ring.device.chains())

    ring.device.unpop(2)

    assert ring.device.inuse == 1
    assert ring.device.in_flight_heads() == [5]
    assert ring.device.last_avail_idx == 1
    assert [chain.head for chain in ring.device.chains()] == [6, 7]


def test_rewind_is_unpop() -> None:
    ring = RawRing(4)
    ring.post_simple(3)
    ring.device.pop()

    ring.device.rewind()

    assert ring.device.inuse == 0
    assert ring.device.pop().head == 3


def test_unpop_more_than_in_flight_raises() -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.device.pop()

    with pytest.raises(UsageError, match="cannot unpop 2 chains: only 1"):
        ring.device.unpop(2)

    assert ring.device.inuse == 1


@pytest.mark.parametrize("start", [0xFFFF, 0])
def test_unpop_across_wrap(start: int) -> None:
    ring = RawRing(4, last_avail_idx=start, used_idx=start)
    ring.post_simple(1)
    ring.post_simple(2)
    list(ring.device.chains())

    ring.device.unpop(2)

    assert ring.device.last_avail_idx == start
    assert [chain.head for chain in ring.device.chains()] == [1, 2]


def test_unpop_zero_is_noop() -> None:
    ring = RawRing(4)

    ring.device.unpop(0)

    assert ring.device.last_avail_idx == 0


def test_unpop_ignores_rewritten_avail_slot() -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.post_simple(1)
    first = ring.device.pop()
    ring.device.pop()
    # A misbehaving driver overwrites the consumed slot 1 (head 1) with head 0.
    ring.write_u16(ring.layout.avail_ring_addr(1), 0)

    ring.device.unpop(1)

    assert ring.device.in_flight_heads() == [first.head]
    ring.device.add_used(first.head, 0)  # must not raise: head 0 is in flight


def test_recent_pops_in_flight_run() -> None:
    ring = RawRing(8)
    for head in (4, 1, 6):
        ring.post_simple(head)
    list(ring.device.chains())

    assert ring.device.recent_pops(2) == [1, 6]
    assert ring.device.recent_pops(9) == [4, 1, 6]
    ring.device.add_used(1, 0)
    # The run back from the last pop ends at the completed chain.
    assert ring.device.recent_pops(3) == [6]


def test_unpop_of_completed_chain_raises() -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.post_simple(1)
    ring.device.pop()
    ring.device.pop()
    ring.device.add_used(1, 0)

    with pytest.raises(UsageError, match="cannot unpop head 1"):
        ring.device.unpop(1)

    assert ring.device.inuse == 1
    assert ring.device.last_avail_idx == 2


# -- drop_all ---------------------------------------------------------------------------


def test_drop_all_completes_with_zero_length() -> None:
    ring = RawRing(8)
    for head in (3, 1, 4):
        ring.post_simple(head)

    dropped = ring.device.drop_all()

    assert dropped == 3
    assert [ring.used_elem(i) for i in range(3)] == [(3, 0), (1, 0), (4, 0)]
    assert ring.used_idx == 0  # the caller publishes
    assert ring.device.publish() is True
    assert ring.used_idx == 3
    assert ring.device.drop_all() == 0


def test_drop_all_keeps_earlier_chains_in_flight() -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.device.pop()
    ring.post_simple(1)

    assert ring.device.drop_all() == 1
    assert ring.device.in_flight_heads() == [0]


# -- what the device writes -------------------------------------------------------------


def run_full_exchange(ring: RawRing) -> None:
    """Pop everything, fill writable buffers, complete, publish, toggle notify."""
    device = ring.device
    device.disable_notification()
    for chain in device.chains():
        for view in chain.writable:
            view[:] = b"\xee" * len(view)
        device.add_used(chain.head, chain.writable_len)
    device.publish()
    device.enable_notification()
    device.needs_notification()


@pytest.mark.parametrize("event_idx", [False, True])
def test_device_writes_only_used_ring_and_writable_buffers(event_idx: bool) -> None:
    memory = GuestMemory.anonymous(0x10000)
    layout = RingLayout.packed_after(8, 0)
    driver = DriverQueue(
        memory, layout, event_idx=event_idx, indirect_area=0x2000, indirect_entries=4
    )
    ring = RawRing(memory=memory, layout=layout, event_idx=event_idx, indirect=True)
    memory.write(0x8000, bytes(range(256)) * 16)  # readable buffers
    driver.add_buf([(0x8000, 100)], [(0xA000, 64)])
    driver.add_buf([(0x8100, 10), (0x8200, 20)], [(0xA100, 8), (0xA200, 8)])
    driver.add_buf([(0x8300, 30)], use_indirect=True)
    before = bytearray(memory.read(0, 0x10000))

    run_full_exchange(ring)

    after = memory.read(0, 0x10000)
    writable = [(0xA000, 64), (0xA100, 8), (0xA200, 8)]
    allowed = [(layout.used, layout.used_bytes), *writable]
    for address, length in allowed:
        before[address : address + length] = after[address : address + length]
    assert after == bytes(before)
    for address, length in writable:
        assert memory.read(address, length) == b"\xee" * length


def test_device_never_writes_driver_area_on_violation() -> None:
    ring = RawRing(4)
    ring.desc(0, DATA_BASE, 4, WRITE | NEXT, 1)
    ring.desc(1, DATA_BASE + 0x10, 4)
    ring.post_simple(2)
    ring.post(0)
    driver_area = ring.driver_area_bytes()
    readable = ring.memory.read(DATA_BASE, 0x400)

    chain = ring.device.pop()
    ring.device.add_used(chain.head, 0)
    with pytest.raises(Exception, match="follows a device-writable"):
        ring.device.pop()
    ring.device.publish()

    assert ring.driver_area_bytes() == driver_area
    assert ring.memory.read(DATA_BASE, 0x400) == readable


# -- detach (device reset while chains are in flight) ---------------------------------


def test_detach_stops_all_writes() -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.post_simple(1)
    chain = ring.device.pop()
    ring.device.add_used(chain.head, 4)  # completed but not yet published
    ring.device.pop()
    ring.post_simple(2)
    before = ring.memory.read(0, 0x10000)

    ring.device.detach()

    assert ring.device.ready is False
    assert ring.device.pop() is None
    assert ring.device.available() == 0
    ring.device.add_used(1, 0)  # ignored
    assert ring.device.publish() is False
    assert ring.device.enable_notification() is False
    ring.device.disable_notification()
    assert ring.device.in_flight_heads() == []
    # Unlike a driver fault, detach publishes nothing pending (2.4.1).
    assert ring.memory.read(0, 0x10000) == before


def test_reset_after_detach_restarts() -> None:
    ring = RawRing(4)
    ring.post_simple(0)
    ring.device.pop()
    ring.device.detach()

    ring.device.reset()
    ring.set_avail_idx(0)
    ring.post_simple(3)

    assert ring.device.ready is True
    assert ring.device.pop().head == 3


def test_detach_leaves_nothing_in_use() -> None:
    ring = RawRing(4)
    ring.post_simple(2)
    ring.device.pop()

    ring.device.detach()

    assert ring.device.in_flight_heads() == []
    assert ring.device.inuse == 0
