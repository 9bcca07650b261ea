"""DriverQueue and DeviceQueue on one guest memory, driven by hypothesis.

The state machine interleaves every driver and device operation at random
and checks, after each step, the ring invariants a correct driver and device
keep: descriptor accounting, index distances, kick and interrupt decisions
against the spec rules, and no lost wakeup on either side. At teardown it
drains the ring and checks that every buffer came back exactly once.

Set CI=1 for a derandomized run that stores no examples.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from virtio import (
    DeviceQueue,
    DriverQueue,
    GuestMemory,
    QueueFull,
    RingLayout,
    UsageError,
    distance16,
    need_event,
)

MEMORY_SIZE = 0x20000
TABLE_ENTRIES = 3
DATA_BASE = 0x10000
IN_CI = bool(os.environ.get("CI"))


def u16(memory: GuestMemory, address: int) -> int:
    return memory.u16_array(address, 1)[0]


class Buffer:
    """One add_buf request as the model remembers it."""

    def __init__(
        self,
        token: int,
        head: int,
        descriptors: int,
        buffers: int,
        out_len: int,
        in_len: int,
    ):
        self.token = token
        self.head = head
        self.descriptors = descriptors
        self.buffers = buffers
        self.out_len = out_len
        self.in_len = in_len


class RingMachine(RuleBasedStateMachine):
    """Random interleavings of one driver and one device on a split ring."""

    @initialize(
        size=st.sampled_from([1, 2, 4, 8, 16]),
        event_idx=st.booleans(),
        indirect=st.booleans(),
        start=st.one_of(
            st.sampled_from([0, 65520, 65530, 65532, 65533, 65534, 65535]),
            st.integers(min_value=0, max_value=65535),
        ),
    )
    def set_up(self, size: int, event_idx: bool, indirect: bool, start: int) -> None:
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.memory = GuestMemory.anonymous(MEMORY_SIZE)
        self.layout = RingLayout.packed_after(size, 0)
        self.next_token = 0
        self.create_queues(start)
        event(f"queue size {size}, event_idx={event_idx}, indirect={indirect}")
        if start >= 65535 - 16:
            event("start index within 16 of the wrap")

    def create_queues(self, start: int) -> None:
        """Create both queues at ring index ``start``, as after a restore."""
        self.start = start
        area = (self.layout.end + 15) // 16 * 16
        self.driver = DriverQueue(
            self.memory,
            self.layout,
            event_idx=self.event_idx,
            indirect_area=area if self.indirect else None,
            indirect_entries=TABLE_ENTRIES if self.indirect else 0,
            start_index=start,
        )
        self.device = DeviceQueue(
            self.memory,
            self.layout,
            event_idx=self.event_idx,
            indirect=self.indirect,
            last_avail_idx=start,
            used_idx=start,
        )
        self.forget_everything()

    def forget_everything(self) -> None:
        """Reset the model to a fresh ring (after set-up or a reset of both)."""
        self.outstanding: dict[int, Buffer] = {}  # token -> buffer
        self.by_head: dict[int, Buffer] = {}
        self.popped: list[int] = []  # heads in flight, in pop order
        self.pop_history: list[int] = []  # every head popped since reset
        self.completed: set[int] = set()  # tokens added to the used ring
        self.returned: set[int] = set()  # tokens get_buf handed back
        self.last_kick_idx = self.start
        self.published = self.start
        self.first_decision = True
        # Lost-wakeup tracking: the device sleeps after enable_notification
        # found nothing; the driver sleeps after enable_cb* returned True.
        self.device_sleeping = False
        self.driver_wait: tuple[int, int] | None = None

    # -- helpers ---------------------------------------------------------------------

    @property
    def avail_idx(self) -> int:
        return u16(self.memory, self.layout.avail_idx_addr)

    @property
    def used_idx(self) -> int:
        return u16(self.memory, self.layout.used_idx_addr)

    @property
    def used_flags(self) -> int:
        return u16(self.memory, self.layout.used)

    def note_wrap(self, before: int, after: int, what: str) -> None:
        if distance16(after, before) and after < before:
            event(f"{what} wrapped past 65535")

    # -- driver rules ------------------------------------------------------------------

    @rule(
        out_count=st.integers(min_value=0, max_value=3),
        in_count=st.integers(min_value=0, max_value=3),
        use_indirect=st.sampled_from([None, None, False]),
    )
    def add(self, out_count: int, in_count: int, use_indirect: bool | None) -> None:
        total = out_count + in_count
        if total == 0 or total > 3:
            return

        token = self.next_token
        self.next_token += 1
        out = [(DATA_BASE + 0x100 * n, 8 + n) for n in range(out_count)]
        in_ = [(DATA_BASE + 0x800 + 0x100 * n, 16 + n) for n in range(in_count)]
        free_before = self.driver.num_free
        before = self.avail_idx

        try:
            head = self.driver.add_buf(out, in_, token, use_indirect=use_indirect)
        except QueueFull:
            event("driver: QueueFull")
            assert free_before < total
            return

        used_descriptors = free_before - self.driver.num_free
        assert used_descriptors in (1, total)
        assert head not in self.by_head
        buffer = Buffer(
            token,
            head,
            used_descriptors,
            total,
            sum(length for _, length in out),
            sum(length for _, length in in_),
        )
        self.outstanding[token] = buffer
        self.by_head[head] = buffer

        self.note_wrap(before, self.avail_idx, "avail.idx")
        if self.driver.num_free == 0:
            event("driver: every descriptor in use")
        if distance16(self.avail_idx, self.used_idx) == self.size:
            event("ring full: avail.idx is queue size ahead of used.idx")

    @rule()
    def kick(self) -> None:
        new = self.avail_idx
        old = self.last_kick_idx
        if self.event_idx:
            avail_event = u16(self.memory, self.layout.avail_event_addr)
            expected = need_event(avail_event, new, old)
        else:
            expected = not self.used_flags & 1
        pending = distance16(new, self.device.last_avail_idx)

        decision = self.driver.kick_prepare()

        assert decision is expected
        if self.device_sleeping and pending:
            assert decision, "lost wakeup: the device sleeps and no kick was sent"
        self.last_kick_idx = new
        if decision:
            self.device_sleeping = False
            event("kick sent")

    @rule()
    def get_buf(self) -> None:
        self.driver_wait = None
        item = self.driver.get_buf()
        if item is None:
            return
        token, length = item
        assert token in self.completed
        assert token not in self.returned
        buffer = self.outstanding.pop(token)
        del self.by_head[buffer.head]
        self.returned.add(token)
        assert length == buffer.in_len

    @rule()
    def disable_cb(self) -> None:
        self.driver.disable_cb()
        self.driver_wait = None

    @rule()
    def enable_cb(self) -> None:
        last_used = self.driver.last_used_idx
        if self.driver.enable_cb():
            assert self.used_idx == last_used
            self.driver_wait = (last_used, 0)
        else:
            self.driver_wait = None
            event("enable_cb found used buffers")

    @rule()
    def enable_cb_delayed(self) -> None:
        last_used = self.driver.last_used_idx
        delay = self.driver.outstanding * 3 // 4
        if self.driver.enable_cb_delayed():
            assert distance16(self.used_idx, last_used) <= delay
            self.driver_wait = (last_used, delay)
        else:
            self.driver_wait = None
            event("enable_cb_delayed found enough used buffers")

    # -- device rules ------------------------------------------------------------------

    def take(self, chain) -> None:
        self.take_head(chain.head, chain.readable_len, chain.writable_len)

    def take_head(self, head: int, readable_len: int, writable_len: int) -> None:
        assert head not in self.popped, f"head {head} popped twice"
        buffer = self.by_head[head]
        assert buffer.token not in self.completed
        assert readable_len == buffer.out_len
        assert writable_len == buffer.in_len
        self.popped.append(head)
        self.pop_history.append(head)

    def is_single(self, buffer: Buffer, min_len: int, max_len: int) -> bool:
        """Whether ``pop_single`` with these bounds takes the buffer's chain."""
        # One buffer in one descriptor is direct: the driver model, like
        # Linux, uses an indirect table only for two buffers or more.
        return (
            buffer.buffers == buffer.descriptors == 1
            and buffer.in_len == 0
            and min_len <= buffer.out_len <= max_len
        )

    @rule(limit=st.integers(min_value=1, max_value=4))
    def pop(self, limit: int) -> None:
        self.device_sleeping = False
        before = self.device.last_avail_idx
        if limit == 1:
            chain = self.device.pop()
            if chain is not None:
                self.take(chain)
        else:
            count = 0
            for chain in self.device.chains(limit):
                self.take(chain)
                count += 1
            assert count <= limit
        self.note_wrap(before, self.device.last_avail_idx, "last_avail_idx")
        if self.event_idx and self.device.notification_enabled:
            assert self.device.avail_event() == self.device.last_avail_idx

    @rule(
        limit=st.integers(min_value=1, max_value=4),
        min_len=st.sampled_from([1, 8, 9]),
        max_len=st.sampled_from([8, 64]),
    )
    def pop_single(self, limit: int, min_len: int, max_len: int) -> None:
        self.device_sleeping = False
        heads, buffers = self.device.pop_single(limit, min_len, max_len)
        assert len(heads) == len(buffers) <= limit
        for head, buffer in zip(heads, buffers, strict=True):
            assert self.is_single(self.by_head[head], min_len, max_len)
            self.take_head(head, len(buffer), 0)
        # The run ends at the limit, at an empty ring or at another chain.
        last = self.device.last_avail_idx
        if len(heads) < limit and last != self.avail_idx:
            slot = self.layout.avail_ring_addr(last & (self.size - 1))
            following = self.by_head[u16(self.memory, slot)]
            assert not self.is_single(following, min_len, max_len)
            event("pop_single stopped at another chain")
        if heads and self.event_idx and self.device.notification_enabled:
            assert self.device.avail_event() == last

    @rule(data=st.data())
    def add_used_many(self, data) -> None:
        candidates = [head for head in self.popped if not self.by_head[head].in_len]
        if not candidates:
            return
        heads = data.draw(st.permutations(candidates))[: data.draw(st.integers(1, 3))]
        self.device.add_used_many(heads)
        for head in heads:
            self.popped.remove(head)
            self.completed.add(self.by_head[head].token)

    @rule(data=st.data())
    def add_used(self, data) -> None:
        if not self.popped:
            return
        head = data.draw(st.sampled_from(self.popped))
        buffer = self.by_head[head]
        self.device.add_used(head, buffer.in_len)
        self.popped.remove(head)
        self.completed.add(buffer.token)

    def unpoppable(self) -> int:
        """Count the most recent pops that are all still in flight."""
        count = 0
        seen = set()
        for head in reversed(self.pop_history):
            if head in seen or head not in self.popped:
                break
            seen.add(head)
            count += 1
        return count

    @rule(data=st.data())
    def unpop(self, data) -> None:
        if not self.popped:
            return
        allowed = self.unpoppable()
        count = data.draw(st.integers(min_value=1, max_value=len(self.popped)))
        if count > allowed:
            with pytest.raises(UsageError):
                self.device.unpop(count)
            event("device: unpop of a completed chain rejected")
            return
        self.device.unpop(count)
        # The device put the chains back itself, so it has work waiting and is
        # no longer asleep on a kick.
        self.device_sleeping = False
        for head in self.pop_history[-count:]:
            self.popped.remove(head)
        del self.pop_history[-count:]
        event("device: unpop")

    @rule()
    def publish(self) -> None:
        old = self.published
        pending = self.device.unpublished

        decision = self.device.publish()

        new = self.used_idx
        assert new == self.device.used_idx
        if not pending:
            assert decision is False
            return
        self.note_wrap(old, new, "used.idx")
        if self.event_idx:
            used_event = u16(self.memory, self.layout.used_event_addr)
            expected = self.first_decision or need_event(used_event, new, old)
        else:
            expected = not u16(self.memory, self.layout.avail) & 1
        assert decision is expected
        self.first_decision = False
        self.published = new
        if self.driver_wait is not None:
            base, delay = self.driver_wait
            if decision:
                self.driver_wait = None
                event("interrupt after the driver re-enabled callbacks")
            else:
                assert distance16(new, base) <= delay, (
                    "lost wakeup: used buffers passed the driver's event index"
                    " and no interrupt was sent"
                )

    @rule()
    def disable_notification(self) -> None:
        self.device.disable_notification()
        self.device_sleeping = False
        if self.event_idx:
            assert self.used_flags == 0
        else:
            assert self.used_flags == 1

    @rule()
    def enable_notification(self) -> None:
        pending = distance16(self.avail_idx, self.device.last_avail_idx)

        slipped_in = self.device.enable_notification()

        assert slipped_in is bool(pending)
        if self.event_idx:
            assert self.device.avail_event() == self.avail_idx
        # The device sleeps only when its re-check found nothing; otherwise
        # it drains again and needs no kick for what it already saw.
        self.device_sleeping = not slipped_in
        if slipped_in:
            event("enable_notification found buffers that slipped in")

    @rule()
    def device_round(self) -> None:
        """Pop everything available, complete every chain in flight, publish."""
        self.pop(limit=self.size)
        for head in list(self.popped):
            self.add_used_head(head)
        self.publish()

    @rule()
    def driver_round(self) -> None:
        """Reclaim every used buffer, as a driver's interrupt handler does."""
        for _ in range(self.size):
            self.get_buf()

    @rule(distance=st.integers(min_value=1, max_value=4))
    def restart_near_wrap(self, distance: int) -> None:
        """Re-create idle queues ``distance`` indices below the 16-bit wrap."""
        if self.outstanding:
            return
        self.create_queues(65536 - distance)
        event("queues re-created near the wrap")

    @rule(chance=st.integers(min_value=0, max_value=7))
    def reset_both(self, chance: int) -> None:
        # Only one draw in eight resets, so most runs get far enough to wrap.
        if chance:
            return
        self.driver.reset()
        self.device.reset()
        self.forget_everything()
        event("reset of driver and device")

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def queues_not_broken(self) -> None:
        if not hasattr(self, "driver"):
            return
        assert self.driver.broken is None
        assert self.device.broken is None

    @invariant()
    def descriptors_accounted(self) -> None:
        if not hasattr(self, "driver"):
            return
        held = sum(buffer.descriptors for buffer in self.outstanding.values())
        assert self.driver.num_free + held == self.size
        assert self.driver.outstanding == len(self.outstanding)

    @invariant()
    def index_distances(self) -> None:
        if not hasattr(self, "driver"):
            return
        assert distance16(self.avail_idx, self.used_idx) <= self.size
        assert distance16(self.avail_idx, self.device.last_avail_idx) <= self.size
        assert distance16(self.device.last_avail_idx, self.device.used_idx) <= self.size
        assert self.device.inuse == len(self.popped)
        assert sorted(self.device.in_flight_heads()) == sorted(self.popped)

    @invariant()
    def suppression_matches_memory(self) -> None:
        """The device's own view of kick suppression is what the driver reads."""
        if not hasattr(self, "driver"):
            return
        flags = self.used_flags
        assert flags in (0, 1)
        if self.event_idx:
            assert flags == 0
            drained = self.avail_idx == self.device.last_avail_idx
            if self.device.notification_enabled and drained:
                assert self.device.avail_event() == self.device.last_avail_idx
        else:
            assert flags == (0 if self.device.notification_enabled else 1)

    # -- teardown ------------------------------------------------------------------------

    def teardown(self) -> None:
        if not hasattr(self, "driver"):
            return
        for chain in self.device.chains():
            self.take(chain)
        for head in list(self.popped):
            self.add_used_head(head)
        self.device.publish()
        while (item := self.driver.get_buf()) is not None:
            token, _ = item
            assert token not in self.returned, f"token {token} returned twice"
            self.returned.add(token)
            buffer = self.outstanding.pop(token)
            del self.by_head[buffer.head]
        assert self.outstanding == {}, "buffers never returned to the driver"
        assert self.driver.num_free == self.size
        assert self.device.inuse == 0

    def add_used_head(self, head: int) -> None:
        buffer = self.by_head[head]
        self.device.add_used(head, buffer.in_len)
        self.popped.remove(head)
        self.completed.add(buffer.token)


RingMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    derandomize=IN_CI,
    database=None if IN_CI else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingStateMachine = RingMachine.TestCase
