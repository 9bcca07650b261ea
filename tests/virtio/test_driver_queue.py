"""DriverQueue, the Linux-like driver model: free list, kicks, reclaim, callbacks."""

from __future__ import annotations

import pytest
from ring_builder import DATA_BASE, INDIRECT, NEXT, WRITE

from virtio import (
    DeviceError,
    DeviceQueue,
    DriverQueue,
    GuestMemory,
    QueueFull,
    RingLayout,
    UsageError,
)
from virtio.layout import DESCRIPTOR_FORMAT

AREA = 0x2000
ENTRIES = 4


class Rig:
    """A DriverQueue and a DeviceQueue on one guest memory."""

    def __init__(
        self,
        size: int = 8,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        start: int = 0,
    ) -> None:
        self.memory = GuestMemory.anonymous(0x10000)
        self.layout = RingLayout.packed_after(size, 0)
        self.kicks = 0
        self.driver = DriverQueue(
            self.memory,
            self.layout,
            event_idx=event_idx,
            indirect_area=AREA if indirect else None,
            indirect_entries=ENTRIES if indirect else 0,
            notify=self.count_kick,
            start_index=start,
        )
        self.device = DeviceQueue(
            self.memory,
            self.layout,
            event_idx=event_idx,
            indirect=indirect,
            last_avail_idx=start,
            used_idx=start,
        )

    def count_kick(self) -> None:
        self.kicks += 1

    def desc(self, index: int) -> tuple[int, int, int, int]:
        return DESCRIPTOR_FORMAT.unpack(
            self.memory.read(self.layout.desc + 16 * index, 16)
        )

    def u16(self, address: int) -> int:
        return int.from_bytes(self.memory.read(address, 2), "little")

    def write_u16(self, address: int, value: int) -> None:
        self.memory.write(address, value.to_bytes(2, "little"))

    def write_used_elem(self, slot: int, head: int, length: int) -> None:
        address = self.layout.used_elem_addr(slot)
        self.memory.write(
            address, head.to_bytes(4, "little") + length.to_bytes(4, "little")
        )

    def complete_all(self, length: int = 0) -> None:
        for chain in self.device.chains():
            self.device.add_used(chain.head, length)
        self.device.publish()

    @property
    def avail_idx(self) -> int:
        return self.u16(self.layout.avail_idx_addr)

    @property
    def avail_flags(self) -> int:
        return self.u16(self.layout.avail)

    @property
    def used_event(self) -> int:
        return self.u16(self.layout.used_event_addr)


def buf(n: int) -> tuple[int, int]:
    return (DATA_BASE + 0x100 * n, 16)


# -- adding buffers and the free list ----------------------------------------------------


def test_add_buf_writes_direct_chain() -> None:
    rig = Rig()

    head = rig.driver.add_buf([buf(0), buf(1)], [buf(2)], token="t", use_indirect=False)

    assert head == 0
    assert rig.desc(0) == (DATA_BASE, 16, NEXT, 1)
    assert rig.desc(1) == (DATA_BASE + 0x100, 16, NEXT, 2)
    assert rig.desc(2)[:3] == (DATA_BASE + 0x200, 16, WRITE)
    assert rig.avail_idx == 1
    assert rig.u16(rig.layout.avail_ring_addr(0)) == 0
    assert rig.driver.num_free == 5
    assert rig.driver.free_head == 3


def test_free_list_reuses_last_freed_first() -> None:
    rig = Rig(4)
    heads = [rig.driver.add_buf([buf(i)], token=i) for i in range(3)]
    assert heads == [0, 1, 2]
    rig.device.pop()
    chain = rig.device.pop()  # head 1
    rig.device.add_used(chain.head, 0)
    rig.device.publish()

    assert rig.driver.get_buf() == (1, 0)
    assert rig.driver.add_buf([buf(5)], token=5) == 1  # LIFO: 1 comes back first
    assert rig.driver.add_buf([buf(6)], token=6) == 3


def test_freed_chain_links_back_into_free_list() -> None:
    rig = Rig(4)
    rig.driver.add_buf([buf(0), buf(1)], token="a", use_indirect=False)  # descs 0, 1
    rig.complete_all()
    assert rig.driver.get_buf() == ("a", 0)

    head = rig.driver.add_buf([buf(0)] * 4, token="b", use_indirect=False)

    assert head == 0
    assert rig.driver.num_free == 0
    indices = [0]
    for _ in range(3):
        indices.append(rig.desc(indices[-1])[3])
    assert sorted(indices) == [0, 1, 2, 3]


def test_indirect_used_when_more_than_one_buffer() -> None:
    rig = Rig(4, indirect=True)

    head = rig.driver.add_buf([buf(0), buf(1)], [buf(2)], token="t")

    table_addr = AREA + head * ENTRIES * 16
    assert rig.desc(head) == (table_addr, 48, INDIRECT, 0)
    assert rig.driver.num_free == 3
    entries = [
        DESCRIPTOR_FORMAT.unpack(rig.memory.read(table_addr + 16 * i, 16))
        for i in range(3)
    ]
    assert entries == [
        (DATA_BASE, 16, NEXT, 1),
        (DATA_BASE + 0x100, 16, NEXT, 2),
        (DATA_BASE + 0x200, 16, WRITE, 3),
    ]
    chain = rig.device.pop()
    assert chain.readable_len == 32
    assert chain.writable_len == 16


def test_single_buffer_stays_direct() -> None:
    rig = Rig(4, indirect=True)

    head = rig.driver.add_buf([buf(0)])

    assert rig.desc(head)[2] == 0
    assert rig.driver.num_free == 3


def test_indirect_choices() -> None:
    rig = Rig(8, indirect=True)

    single = rig.driver.add_buf([buf(0)], use_indirect=True)
    forced_direct = rig.driver.add_buf([buf(0), buf(1)], use_indirect=False)
    too_many = rig.driver.add_buf([buf(0)] * (ENTRIES + 1))

    assert rig.desc(single)[2] == INDIRECT
    assert rig.desc(forced_direct)[2] == NEXT
    assert rig.desc(too_many)[2] == NEXT  # larger than a table: direct
    assert rig.driver.num_free == 8 - 1 - 2 - 5 + 0
    with pytest.raises(UsageError, match="no indirect table of 5 entries"):
        rig.driver.add_buf([buf(0)] * 5, use_indirect=True)


def test_indirect_requested_without_area_raises() -> None:
    rig = Rig(4)

    with pytest.raises(UsageError, match="no indirect table"):
        rig.driver.add_buf([buf(0)], use_indirect=True)


def test_queue_full_and_num_free() -> None:
    rig = Rig(4)
    rig.driver.add_buf([buf(0), buf(1), buf(2)])
    assert rig.driver.num_free == 1

    with pytest.raises(QueueFull, match="2 descriptors needed, 1 free"):
        rig.driver.add_buf([buf(0), buf(1)])

    assert rig.driver.num_free == 1
    assert rig.avail_idx == 1
    rig.driver.add_buf([buf(3)])
    assert rig.driver.num_free == 0
    with pytest.raises(QueueFull):
        rig.driver.add_buf([buf(4)])


def test_queue_full_with_indirect_and_no_free_descriptor() -> None:
    rig = Rig(2, indirect=True)
    rig.driver.add_buf([buf(0)])
    rig.driver.add_buf([buf(1)])

    with pytest.raises(QueueFull):
        rig.driver.add_buf([buf(0), buf(1)])


def test_add_buf_rejects_empty_request_and_none_token() -> None:
    rig = Rig(4)

    with pytest.raises(UsageError):
        rig.driver.add_buf([], [])
    with pytest.raises(UsageError):
        rig.driver.add_buf([buf(0)], token=None)
    assert rig.driver.num_free == 4


# -- kicks ----------------------------------------------------------------------------


def test_kick_without_event_idx_follows_no_notify() -> None:
    rig = Rig(8)
    rig.driver.add_buf([buf(0)])
    assert rig.driver.kick() is True
    assert rig.kicks == 1

    rig.device.disable_notification()
    rig.driver.add_buf([buf(1)])
    assert rig.driver.kick() is False
    assert rig.kicks == 1

    rig.device.enable_notification()
    rig.driver.add_buf([buf(2)])
    assert rig.driver.kick() is True
    assert rig.kicks == 2


@pytest.mark.parametrize(
    ("avail_event", "expected"),
    # The driver added indices 2, 3 and 4 since its last decision (old 2, new 5).
    [(1, False), (2, True), (3, True), (4, True), (5, False), (0xFFFF, False)],
)
def test_kick_with_event_idx_uses_need_event(avail_event: int, expected: bool) -> None:
    rig = Rig(8, event_idx=True)
    rig.driver.add_buf([buf(0)])
    rig.driver.add_buf([buf(1)])
    rig.driver.kick_prepare()
    for n in range(3):
        rig.driver.add_buf([buf(n)])
    rig.write_u16(rig.layout.avail_event_addr, avail_event)

    assert rig.driver.kick_prepare() is expected
    assert rig.driver.kick_prepare() is False  # nothing added since


def test_kick_with_event_idx_ignores_no_notify_flag() -> None:
    rig = Rig(8, event_idx=True)
    rig.write_u16(rig.layout.used, 1)
    rig.driver.add_buf([buf(0)])

    assert rig.driver.kick_prepare() is True


# -- reclaiming -------------------------------------------------------------------------


def test_get_buf_returns_tokens_in_used_order() -> None:
    rig = Rig(8)
    for token in "abc":
        rig.driver.add_buf([buf(0)], [buf(1)], token=token)
    chains = list(rig.device.chains())
    for chain, length in zip(reversed(chains), (30, 20, 10)):
        rig.device.add_used(chain.head, length)

    assert rig.driver.get_buf() is None  # not yet published
    rig.device.publish()

    assert rig.driver.more_used() is True
    assert [rig.driver.get_buf() for _ in range(3)] == [("c", 30), ("b", 20), ("a", 10)]
    assert rig.driver.get_buf() is None
    assert rig.driver.num_free == 8


@pytest.mark.parametrize(
    ("used_id", "message"),
    [(300, "id 300 out of range"), (8, "id 8 out of range"), (7, "id 7 is not a head")],
)
def test_get_buf_bad_id_breaks_queue(used_id: int, message: str) -> None:
    rig = Rig(8)
    rig.driver.add_buf([buf(0)], token="x")
    rig.write_used_elem(0, used_id, 0)
    rig.write_u16(rig.layout.used_idx_addr, 1)

    with pytest.raises(DeviceError, match=message) as caught:
        rig.driver.get_buf()

    assert caught.value.value == used_id
    assert rig.driver.broken is caught.value
    assert rig.driver.get_buf() is None
    assert rig.driver.more_used() is False
    with pytest.raises(DeviceError, match="broken"):
        rig.driver.add_buf([buf(0)])


def test_get_buf_rejects_non_head_of_chain() -> None:
    rig = Rig(8)
    rig.driver.add_buf([buf(0), buf(1)], token="x")  # descriptors 0 and 1
    rig.write_used_elem(0, 1, 0)
    rig.write_u16(rig.layout.used_idx_addr, 1)

    with pytest.raises(DeviceError, match="id 1 is not a head"):
        rig.driver.get_buf()


def test_get_buf_moves_used_event_while_callbacks_enabled() -> None:
    rig = Rig(8, event_idx=True)
    for n in range(3):
        rig.driver.add_buf([buf(n)], token=n)
    rig.complete_all()

    rig.driver.get_buf()
    assert rig.used_event == 1
    rig.driver.disable_cb()
    rig.driver.get_buf()

    assert rig.used_event == 0  # disable_cb wrote 0 and get_buf left it


def test_reset_clears_broken_queue() -> None:
    rig = Rig(4)
    rig.driver.add_buf([buf(0)])
    rig.write_used_elem(0, 99, 0)
    rig.write_u16(rig.layout.used_idx_addr, 1)
    with pytest.raises(DeviceError):
        rig.driver.get_buf()

    rig.driver.reset()

    assert rig.driver.broken is None
    assert rig.driver.num_free == 4
    assert rig.driver.add_buf([buf(0)]) == 0


# -- used buffer notification suppression ----------------------------------------------


def test_disable_cb_without_event_idx() -> None:
    rig = Rig(8)

    rig.driver.disable_cb()

    assert rig.avail_flags == 1
    assert rig.driver.callbacks_enabled is False
    assert rig.used_event == 0


def test_disable_cb_with_event_idx() -> None:
    rig = Rig(8, event_idx=True, start=100)
    assert rig.used_event == 100

    rig.driver.disable_cb()

    assert rig.used_event == 0
    assert rig.avail_flags == 0
    rig.write_u16(rig.layout.used_event_addr, 77)
    rig.driver.disable_cb()  # already disabled: writes nothing
    assert rig.used_event == 77


@pytest.mark.parametrize("event_idx", [False, True])
def test_enable_cb_prepare_and_poll(event_idx: bool) -> None:
    rig = Rig(8, event_idx=event_idx)
    rig.driver.disable_cb()
    rig.driver.add_buf([buf(0)], token="a")

    last = rig.driver.enable_cb_prepare()

    assert last == 0
    assert rig.used_event == 0
    assert rig.avail_flags == 0
    assert rig.driver.callbacks_enabled is True
    assert rig.driver.poll(last) is False
    rig.complete_all()
    assert rig.driver.poll(last) is True


def test_enable_cb_reports_pending_used() -> None:
    rig = Rig(8)
    rig.driver.add_buf([buf(0)], token="a")
    rig.driver.disable_cb()
    assert rig.driver.enable_cb() is True

    rig.driver.disable_cb()
    rig.complete_all()

    assert rig.driver.enable_cb() is False


@pytest.mark.parametrize(
    ("device_used", "expected"),
    [(0, True), (5, True), (6, True), (7, False), (8, False)],
)
def test_enable_cb_delayed(device_used: int, expected: bool) -> None:
    rig = Rig(8, event_idx=True, start=65533)
    for n in range(8):
        rig.driver.add_buf([buf(n)], token=n)
    rig.driver.disable_cb()
    for chain in rig.device.chains(device_used):
        rig.device.add_used(chain.head, 0)
    rig.device.publish()

    result = rig.driver.enable_cb_delayed()

    # 8 outstanding: used_event = last_used_idx + 6, and the driver waits
    # unless more than 6 are already used.
    assert rig.used_event == (65533 + 6) & 0xFFFF
    assert result is expected


def test_enable_cb_delayed_clears_flag_without_event_idx() -> None:
    rig = Rig(8)
    rig.driver.disable_cb()
    for n in range(4):
        rig.driver.add_buf([buf(n)])

    assert rig.driver.enable_cb_delayed() is True
    assert rig.avail_flags == 0
    assert rig.used_event == 3


# -- detach and reset ---------------------------------------------------------------------


def test_detach_unused_buf_returns_every_token() -> None:
    rig = Rig(8, indirect=True)
    rig.driver.add_buf([buf(0)], token="a")
    rig.driver.add_buf([buf(0), buf(1)], token="b")
    rig.driver.add_buf([buf(0)] * 6, token="c")

    tokens = []
    while (token := rig.driver.detach_unused_buf()) is not None:
        tokens.append(token)

    assert sorted(tokens) == ["a", "b", "c"]
    assert rig.driver.num_free == 8


def test_detach_unused_buf_takes_back_avail_index() -> None:
    rig = Rig(8)
    for n in range(3):
        rig.driver.add_buf([buf(n)], token=n)

    while rig.driver.detach_unused_buf() is not None:
        pass

    # Linux's virtqueue_detach_unused_buf decrements avail_idx_shadow and
    # stores it in avail.idx for every buffer it takes back.
    assert rig.avail_idx == 0
    assert rig.driver.outstanding == 0


@pytest.mark.parametrize("event_idx", [False, True])
def test_reset_reinitialises_ring_fields(event_idx: bool) -> None:
    rig = Rig(8, event_idx=event_idx, start=65530)
    for n in range(3):
        rig.driver.add_buf([buf(n)], token=n)
    rig.device.disable_notification()
    list(rig.device.chains())
    rig.driver.disable_cb()

    rig.driver.reset()

    assert rig.driver.num_free == 8
    assert rig.driver.free_head == 0
    assert rig.driver.outstanding == 0
    assert rig.driver.callbacks_enabled is True
    assert rig.avail_idx == 65530
    assert rig.avail_flags == 0
    assert rig.used_event == 65530
    assert rig.u16(rig.layout.used_idx_addr) == 65530
    # Linux's reset also clears the device's fields, so a stale NO_NOTIFY or
    # avail_event from before the reset does not suppress the first kick.
    assert rig.u16(rig.layout.used) == 0
    assert rig.u16(rig.layout.avail_event_addr) == 65530


@pytest.mark.parametrize("event_idx", [False, True])
def test_first_kick_after_reset(event_idx: bool) -> None:
    rig = Rig(8, event_idx=event_idx, start=65530)
    rig.driver.add_buf([buf(0)])
    rig.driver.kick_prepare()
    list(rig.device.chains())
    rig.device.disable_notification()

    rig.driver.reset()
    rig.device.reset()
    rig.driver.add_buf([buf(0)])

    assert rig.driver.kick_prepare() is True


def test_start_index_sets_ring_fields() -> None:
    rig = Rig(8, start=0x1_FFF0)

    assert rig.driver.start_index == 0xFFF0
    assert rig.avail_idx == 0xFFF0
    assert rig.used_event == 0xFFF0
    assert rig.u16(rig.layout.used_idx_addr) == 0xFFF0


def test_inspection_helpers() -> None:
    rig = Rig(4, event_idx=True)
    rig.driver.add_buf([buf(0)])
    rig.device.enable_notification()

    assert rig.driver.outstanding == 1
    assert rig.driver.avail_event() == 1
    assert rig.driver.used_event() == 0
    assert rig.driver.used_idx() == 0
    assert "num_free=3" in repr(rig.driver)
