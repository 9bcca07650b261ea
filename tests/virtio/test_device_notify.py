"""DeviceQueue notification decisions (2.7.7) and kick suppression (2.7.10)."""

from __future__ import annotations

import pytest
from ring_builder import DATA_BASE, RawRing

from virtio import DriverQueue, GuestMemory, RingLayout, need_event


def complete(ring: RawRing, count: int) -> None:
    """Make ``count`` one-descriptor chains available, pop and complete them."""
    for _ in range(count):
        head = len(ring.device.in_flight_heads())
        ring.post_simple(head, length=1)
        ring.device.pop()
        ring.device.add_used(head, 0)


def publish_one_at_a_time(ring: RawRing, count: int) -> list[bool]:
    decisions = []
    for _ in range(count):
        complete(ring, 1)
        decisions.append(ring.device.publish())
    return decisions


# -- used buffer notifications without EVENT_IDX -----------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(0x0000, True), (0x0001, False), (0xFFFE, True), (0xFFFF, False), (0x0003, False)],
)
def test_notify_uses_only_no_interrupt_bit(flags: int, expected: bool) -> None:
    ring = RawRing(4)
    ring.set_avail_flags(flags)
    complete(ring, 1)

    assert ring.device.publish() is expected


@pytest.mark.parametrize("used_event", [0, 1, 2, 0x1234, 0xFFFF])
def test_notify_ignores_used_event_without_event_idx(used_event: int) -> None:
    ring = RawRing(4)
    ring.set_used_event(used_event)

    assert publish_one_at_a_time(ring, 3) == [True, True, True]
    ring.set_avail_flags(1)
    assert publish_one_at_a_time(ring, 3) == [False, False, False]


def test_publish_without_new_elements_never_notifies() -> None:
    ring = RawRing(4)

    assert ring.device.publish() is False
    complete(ring, 1)
    assert ring.device.publish() is True
    assert ring.device.publish() is False


# -- used buffer notifications with EVENT_IDX ---------------------------------------------


def test_first_decision_always_notifies() -> None:
    ring = RawRing(4, event_idx=True)
    ring.set_used_event(100)  # far outside the first window

    assert publish_one_at_a_time(ring, 2) == [True, False]


def test_used_event_inside_batch_notifies_once() -> None:
    ring = RawRing(8, event_idx=True)
    ring.device.needs_notification()  # the reference is now used.idx 0
    ring.set_used_event(3)
    complete(ring, 5)

    assert ring.device.publish() is True  # batch 0 -> 5 crosses 3
    assert publish_one_at_a_time(ring, 3) == [False, False, False]


def test_used_event_one_at_a_time_notifies_once() -> None:
    ring = RawRing(8, event_idx=True)
    ring.device.needs_notification()
    ring.set_used_event(3)

    # Only the element written at used index 3 (used.idx 3 -> 4) notifies.
    assert publish_one_at_a_time(ring, 6) == [False, False, False, True, False, False]


def test_used_event_beyond_batch_does_not_notify() -> None:
    ring = RawRing(8, event_idx=True)
    ring.device.needs_notification()
    ring.set_used_event(7)
    complete(ring, 5)

    assert ring.device.publish() is False


@pytest.mark.parametrize(
    ("used_event", "expected"), [(0xFFFF, True), (0x0001, True), (0x0003, False)]
)
def test_used_event_across_wrap(used_event: int, expected: bool) -> None:
    ring = RawRing(8, event_idx=True, last_avail_idx=0xFFFE, used_idx=0xFFFE)
    ring.device.needs_notification()
    ring.set_used_event(used_event)
    complete(ring, 5)  # used.idx 0xFFFE -> 0x0003

    assert ring.device.publish() is expected
    assert ring.used_idx == 0x0003


@pytest.mark.parametrize("flags", [0x0000, 0x0001, 0xFFFF])
def test_event_idx_ignores_flags(flags: int) -> None:
    inside = RawRing(4, event_idx=True)
    inside.device.needs_notification()
    inside.set_avail_flags(flags)
    inside.set_used_event(1)

    outside = RawRing(4, event_idx=True)
    outside.device.needs_notification()
    outside.set_avail_flags(flags)
    outside.set_used_event(9)

    assert publish_one_at_a_time(inside, 2) == [False, True]
    assert publish_one_at_a_time(outside, 2) == [False, False]


def test_decision_matches_need_event_table() -> None:
    for used_event in range(0, 12):
        ring = RawRing(8, event_idx=True)
        ring.device.needs_notification()
        ring.set_used_event(used_event)
        complete(ring, 2)
        ring.device.publish()  # 0 -> 2
        complete(ring, 4)

        decision = ring.device.publish()  # 2 -> 6

        assert decision is need_event(used_event, 6, 2), used_event


def big_ring(size: int) -> RawRing:
    layout = RingLayout.packed_after(size, 0)
    memory = GuestMemory.anonymous(layout.end + 0x1000 + DATA_BASE)
    return RawRing(memory=memory, layout=layout, event_idx=True)


def test_batch_of_half_the_index_space_invalidates_reference() -> None:
    ring = big_ring(32768)
    ring.device.needs_notification()
    ring.set_used_event(0xF000)  # not inside [0, 0x8000)
    for head in range(32768):
        ring.desc(head, DATA_BASE, 1)
    ring.post(*range(32768))
    for chain in ring.device.chains():
        ring.device.add_used(chain.head, 0)

    # 0x8000 completions in one window: the reference index is no longer
    # meaningful in 16 bits, so the device notifies whatever value used_event has.
    assert ring.device.publish() is True


def test_batch_below_half_keeps_reference() -> None:
    ring = big_ring(32768)
    ring.device.needs_notification()
    ring.set_used_event(0xF000)
    for head in range(0x7FFF):
        ring.desc(head, DATA_BASE, 1)
    ring.post(*range(0x7FFF))
    for chain in ring.device.chains():
        ring.device.add_used(chain.head, 0)

    assert ring.device.publish() is False


def test_reference_follows_every_decision_past_65535() -> None:
    ring = big_ring(256)
    for head in range(256):
        ring.desc(head, DATA_BASE, 1)
    ring.device.needs_notification()
    notified = 0
    completions = 0
    while completions <= 70000:
        # The driver keeps used_event beyond the batch the device is about
        # to publish, so no window ever contains it.
        ring.set_used_event(ring.device.used_idx + 300)
        ring.post(*range(256))
        for chain in ring.device.chains():
            ring.device.add_used(chain.head, 0)
        notified += ring.device.publish()
        completions += 256

    ring.set_used_event(ring.device.used_idx)
    ring.post(0)
    ring.device.pop()
    ring.device.add_used(0, 0)

    assert notified == 0
    assert ring.device.publish() is True


def test_notify_on_empty_overrides_suppression() -> None:
    ring = RawRing(4, event_idx=True, notify_on_empty=True)
    ring.post_simple(0)
    ring.post_simple(1)
    # A decision on a non-empty queue sets the event index reference; on an
    # empty queue the NOTIFY_ON_EMPTY rule would decide first.
    ring.device.needs_notification()
    ring.set_used_event(50)
    ring.device.pop()
    ring.device.add_used(0, 0)

    assert ring.device.publish() is False  # chain 1 still available
    ring.device.pop()
    ring.device.add_used(1, 0)
    assert ring.device.publish() is True  # queue now empty


# -- device kick suppression ---------------------------------------------------------------


def test_no_notify_flag_without_event_idx() -> None:
    ring = RawRing(4)
    seen = {ring.used_flags}

    ring.device.disable_notification()
    seen.add(ring.used_flags)
    assert ring.used_flags == 1
    assert ring.device.notification_enabled is False
    ring.device.disable_notification()
    seen.add(ring.used_flags)
    ring.post_simple(0)
    ring.device.pop()
    seen.add(ring.used_flags)
    assert ring.device.enable_notification() is False
    seen.add(ring.used_flags)
    assert ring.used_flags == 0
    assert ring.device.notification_enabled is True

    assert seen == {0, 1}
    assert ring.avail_event == 0  # never written without EVENT_IDX


def test_event_idx_leaves_used_flags_zero() -> None:
    ring = RawRing(4, event_idx=True)
    ring.post_simple(0)

    ring.device.disable_notification()
    assert ring.used_flags == 0
    ring.device.pop()
    ring.device.enable_notification()
    assert ring.used_flags == 0


def test_event_idx_enable_writes_avail_idx() -> None:
    ring = RawRing(8, event_idx=True)
    ring.device.disable_notification()
    for head in range(3):
        ring.post_simple(head)

    assert ring.device.enable_notification() is True  # three slipped in
    assert ring.avail_event == 3


def test_event_idx_pops_advance_avail_event_while_enabled() -> None:
    ring = RawRing(8, event_idx=True, last_avail_idx=0xFFFE, used_idx=0xFFFE)
    for head in range(4):
        ring.post_simple(head)
    events = []

    for _ in ring.device.chains():
        events.append(ring.avail_event)

    assert events == [0xFFFF, 0x0000, 0x0001, 0x0002]


def test_event_idx_disable_writes_nothing() -> None:
    ring = RawRing(8, event_idx=True)
    ring.post_simple(0)
    ring.device.pop()
    used_ring = ring.used_ring_bytes()

    ring.device.disable_notification()
    assert ring.used_ring_bytes() == used_ring
    ring.post_simple(1)
    ring.device.pop()  # avail_event stays at 1 while disabled

    assert ring.avail_event == 1


@pytest.mark.parametrize("event_idx", [False, True])
def test_enable_detects_buffers_that_slipped_in(event_idx: bool) -> None:
    memory = GuestMemory.anonymous(0x10000)
    layout = RingLayout.packed_after(8, 0)
    driver = DriverQueue(memory, layout, event_idx=event_idx)
    ring = RawRing(memory=memory, layout=layout, event_idx=event_idx)
    device = ring.device

    driver.add_buf([(DATA_BASE, 4)])
    assert driver.kick_prepare() is True
    device.disable_notification()
    assert device.pop() is not None
    assert device.pop() is None  # the device's last check: ring empty

    # The driver adds a buffer between that check and enable_notification.
    # It reads kicks as suppressed and does not kick.
    driver.add_buf([(DATA_BASE, 4)])
    assert driver.kick_prepare() is False

    assert device.enable_notification() is True
    assert device.pop() is not None
    assert device.enable_notification() is False


@pytest.mark.parametrize("event_idx", [False, True])
def test_kick_follows_enable_that_found_nothing(event_idx: bool) -> None:
    memory = GuestMemory.anonymous(0x10000)
    layout = RingLayout.packed_after(8, 0)
    driver = DriverQueue(memory, layout, event_idx=event_idx)
    ring = RawRing(memory=memory, layout=layout, event_idx=event_idx)
    device = ring.device
    driver.add_buf([(DATA_BASE, 4)])
    driver.kick_prepare()
    device.disable_notification()
    device.pop()

    assert device.enable_notification() is False
    driver.add_buf([(DATA_BASE, 4)])
    assert driver.kick_prepare() is True


def test_enable_calls_fence_between_store_and_load() -> None:
    calls = []
    memory = GuestMemory.anonymous(0x10000)
    memory.fence = lambda: calls.append("fence")
    ring = RawRing(4, memory=memory, event_idx=True)

    ring.device.enable_notification()

    assert calls == ["fence"]


def test_used_flags_written_whole() -> None:
    ring = RawRing(4)
    ring.write_u16(ring.layout.used, 0xFFFE)  # a driver scribbled on the field

    ring.device.disable_notification()
    assert ring.used_flags == 1
    ring.device.enable_notification()
    assert ring.used_flags == 0


def test_needs_notification_ignores_unpublished() -> None:
    ring = RawRing(8, event_idx=True)
    ring.device.needs_notification()  # reference at used.idx 0
    ring.set_used_event(1)
    complete(ring, 3)  # added, not published: used.idx in memory is still 0

    assert ring.device.needs_notification() is False
    assert ring.device.publish() is True  # the publish that covers index 1
