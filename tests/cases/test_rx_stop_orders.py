"""Stopping the RX queue with a mergeable frame gathered among unusable chains.

Chains without a writable buffer ("X") or with less room than the header
("S") are completed with length 0 as the device meets them. They can come
before, between or after the chains gathered ("G") for a frame that does not
fit yet. ``RxQueue.stop`` gives the gathered chains back, and a restart from
the returned index must offer each posted chain once: at the end every head
is in the used ring exactly once and none is in flight.
"""

from __future__ import annotations

import struct

import pytest
from test_races import EI, MRG, V1, Driver, frame, queue, start

from device.net_device import RX_QUEUE

QUEUE_SIZE = 8
BIG_FRAME = frame(2000)
SMALL_FRAME = frame(60)
WRITE = 2
USED_ELEM = struct.Struct("<II")
#: Descriptor of each chain kind: (length, flags). Two G chains hold 1542
#: bytes, less than the 2012 of the big frame with its header.
KINDS = {"G": (771, WRITE), "X": (64, 0), "S": (8, WRITE)}

ORDERS = [
    "XGG",
    "GGX",
    "GXG",
    "XGXGX",
    "SGG",
    "GSGX",
    "XSGSG",
    "GGXX",
]


def used_heads(rx: Driver, count: int) -> list[int]:
    heads = []
    for slot in range(count):
        address = rx.layout.used + 4 + 8 * (slot % QUEUE_SIZE)
        head, _ = USED_ELEM.unpack(rx.memory.read(address, 8))
        heads.append(head)
    return heads


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("order", ORDERS)
def test_stop_then_restart_offers_each_chain_once(order: str, event_idx: bool) -> None:
    features = [V1, MRG, EI] if event_idx else [V1, MRG]
    run = start(features, {"0": queue(QUEUE_SIZE)})
    device = run.device
    rx = Driver(run, RX_QUEUE)
    for head, kind in enumerate(order):
        length, flags = KINDS[kind]
        rx.desc(head, 0x20000 + 0x1000 * head, length, flags)
    rx.post(*range(len(order)))
    device.receive(None, BIG_FRAME)
    assert device.rx.held, "the big frame should wait for more buffers"

    layout = device.layouts[RX_QUEUE][0]
    last_avail = device.stop_queue(RX_QUEUE)
    used_idx = rx.read_u16(rx.layout.used_idx_addr)
    assert device.error is None
    assert 0 <= last_avail <= len(order)

    device.set_memory(run.memory)
    device.setup_queue(RX_QUEUE, layout, last_avail, used_idx)
    restarted = device.queues[RX_QUEUE]
    assert restarted.in_flight_heads() == []
    # One small frame for each chain still available, so every usable one is
    # taken; the unusable ones are completed on the way.
    for _ in range(len(order) - last_avail):
        device.receive(None, SMALL_FRAME)

    used_idx = rx.read_u16(rx.layout.used_idx_addr)
    assert used_idx == len(order)
    assert sorted(used_heads(rx, used_idx)) == list(range(len(order)))
    assert restarted.in_flight_heads() == []
    assert device.error is None


@pytest.mark.parametrize("order", ["XGG", "GXG", "GGX"])
def test_second_stop_after_regathering(order: str) -> None:
    run = start([V1, MRG], {"0": queue(QUEUE_SIZE)})
    device = run.device
    rx = Driver(run, RX_QUEUE)
    for head, kind in enumerate(order):
        length, flags = KINDS[kind]
        rx.desc(head, 0x20000 + 0x1000 * head, length, flags)
    rx.post(*range(len(order)))
    layout = device.layouts[RX_QUEUE][0]
    for _ in range(2):
        device.receive(None, BIG_FRAME)
        last_avail = device.stop_queue(RX_QUEUE)
        used_idx = rx.read_u16(rx.layout.used_idx_addr)
        device.set_memory(run.memory)
        device.setup_queue(RX_QUEUE, layout, last_avail, used_idx)
    # Three more G chains let the big frame fit, whether the gathered ones
    # went back to the avail ring or to the used ring.
    for head in (3, 4, 5):
        rx.desc(head, 0x20000 + 0x1000 * head, *KINDS["G"])
    rx.post(3, 4, 5)
    device.receive(None, BIG_FRAME)
    assert not device.rx.held
    used_idx = rx.read_u16(rx.layout.used_idx_addr)
    heads = used_heads(rx, used_idx)
    assert len(heads) == len(set(heads))
    assert set(heads) <= set(range(6))
    assert device.queues[RX_QUEUE].in_flight_heads() == []
    assert device.error is None
