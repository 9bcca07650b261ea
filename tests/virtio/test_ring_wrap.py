"""The main driver/device flows started just below the 16-bit index wrap."""

from __future__ import annotations

import pytest

from virtio import DeviceQueue, DriverQueue, GuestMemory, RingLayout, distance16, wrap16

DATA = 0x8000
AREA = 0x4000


def make_pair(size: int, start: int, event_idx: bool, indirect: bool):
    memory = GuestMemory.anonymous(0x10000)
    layout = RingLayout.packed_after(size, 0)
    driver = DriverQueue(
        memory,
        layout,
        event_idx=event_idx,
        indirect_area=AREA if indirect else None,
        indirect_entries=3 if indirect else 0,
        start_index=start,
    )
    device = DeviceQueue(
        memory,
        layout,
        event_idx=event_idx,
        indirect=indirect,
        last_avail_idx=start,
        used_idx=start,
    )
    return memory, layout, driver, device


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("start", [65530, 65535, 65534 - 8])
def test_request_response_across_wrap(
    start: int, event_idx: bool, indirect: bool
) -> None:
    memory, layout, driver, device = make_pair(8, start, event_idx, indirect)
    returned = []
    kicks = interrupts = 0

    for round_number in range(40):
        tokens = [f"{round_number}-{n}" for n in range(3)]
        for n, token in enumerate(tokens):
            driver.add_buf([(DATA + 64 * n, 8)], [(DATA + 0x1000 + 64 * n, 16)], token)
        kicks += driver.kick_prepare()
        device.disable_notification()
        for chain in device.chains():
            chain.writable[0][:4] = b"resp"
            device.add_used(chain.head, 4)
        assert device.enable_notification() is False
        interrupts += device.publish()
        while (item := driver.get_buf()) is not None:
            returned.append(item)
        assert driver.enable_cb() is True

    assert returned == [(f"{r}-{n}", 4) for r in range(40) for n in range(3)]
    assert driver.num_free == 8
    assert device.inuse == 0
    assert device.last_avail_idx == wrap16(start + 120)
    assert int.from_bytes(memory.read(layout.used_idx_addr, 2), "little") == wrap16(
        start + 120
    )
    # The device re-enabled kicks and the driver re-enabled interrupts after
    # every round, so every round kicked once and interrupted once.
    assert kicks == 40
    assert interrupts == 40


@pytest.mark.parametrize("event_idx", [False, True])
def test_full_ring_at_wrap(event_idx: bool) -> None:
    _, _, driver, device = make_pair(4, 65534, event_idx, False)

    for n in range(4):
        driver.add_buf([(DATA + n, 1)], token=n)

    assert driver.num_free == 0
    assert device.available() == 4  # 65534 -> 2 is exactly the queue size
    heads = [chain.head for chain in device.chains()]
    assert heads == [0, 1, 2, 3]
    for head in reversed(heads):
        device.add_used(head, 0)
    device.publish()
    assert [driver.get_buf() for _ in range(4)] == [(3, 0), (2, 0), (1, 0), (0, 0)]


def test_unpop_and_pop_across_wrap() -> None:
    _, _, driver, device = make_pair(4, 65535, False, False)
    driver.add_buf([(DATA, 1)], token="a")
    driver.add_buf([(DATA, 1)], token="b")
    list(device.chains())
    assert device.last_avail_idx == 1

    device.unpop(2)

    assert device.last_avail_idx == 65535
    assert [chain.head for chain in device.chains()] == [0, 1]


def test_event_idx_kicks_across_wrap() -> None:
    _, _, driver, device = make_pair(8, 65533, True, False)
    assert device.enable_notification() is False  # avail_event = 65533
    kicks = []

    for n in range(6):
        driver.add_buf([(DATA, 1)], token=n)
        kicks.append(driver.kick_prepare())

    # Only the first add crosses avail_event; the device has not popped, so
    # the later ones need no kick.
    assert kicks == [True, False, False, False, False, False]
    for chain in device.chains():
        device.add_used(chain.head, 0)
    assert device.avail_event() == wrap16(65533 + 6)
    driver.add_buf([(DATA, 1)], token=6)
    assert driver.kick_prepare() is True


def test_enable_cb_delayed_across_wrap() -> None:
    memory, layout, driver, device = make_pair(8, 65532, True, False)
    for n in range(8):
        driver.add_buf([(DATA, 1)], token=n)
    device.needs_notification()
    driver.disable_cb()
    assert driver.enable_cb_delayed() is True
    assert driver.used_event() == wrap16(65532 + 6)
    decisions = []

    for chain in device.chains():
        device.add_used(chain.head, 0)
        decisions.append(device.publish())

    # Only the element at used index 65532 + 6 (the seventh) interrupts.
    assert decisions == [False] * 6 + [True, False]
    assert distance16(device.used_idx, 65532) == 8
