"""Stopping the RX queue (vhost-user GET_VRING_BASE) with a mergeable frame half placed.

The chains gathered for a frame that does not fit yet are given back. When
they are the last ones popped they go back to the avail ring, so a restart
from the returned index offers them again. When the driver slipped a chain
with no writable buffer between them, they go to the used ring with length
0. Either way the queue stops without an error and no buffer stays in
flight.
"""

from __future__ import annotations

from test_races import MRG, V1, Driver, frame, queue, start

from device.net_device import RX_QUEUE

BIG_FRAME = frame(2000)


def _rx(descriptors: list[tuple[int, int, int]]) -> tuple:
    run = start([V1, MRG], {"0": queue(4)})
    rx = Driver(run, RX_QUEUE)
    for index, (addr, length, flags) in enumerate(descriptors):
        rx.desc(index, addr, length, flags)
    rx.post(*range(len(descriptors)))
    return run, rx


def test_stop_gives_gathered_chains_back_to_avail_ring() -> None:
    run, rx = _rx([(0x20000, 1526, 2), (0x21000, 16, 2)])
    run.device.receive(None, BIG_FRAME)  # 1542 bytes of room: not enough

    last_avail = run.device.stop_queue(RX_QUEUE)

    assert last_avail == 0
    assert rx.used_idx == 0
    assert run.device.stats.queue(RX_QUEUE).drops == {"queue-stopped": 1}


def test_stop_completes_gathered_chains_around_a_completed_one() -> None:
    # Chain 1 has no writable buffer: it is completed (len 0) between the
    # two chains gathered for the frame, so they cannot go back with unpop.
    run, rx = _rx([(0x20000, 1526, 2), (0x21000, 16, 0), (0x22000, 200, 2)])
    run.device.receive(None, BIG_FRAME)

    last_avail = run.device.stop_queue(RX_QUEUE)

    assert last_avail == 3
    assert rx.used_idx == 3
    assert sorted(rx.used_elem(slot) for slot in range(3)) == [
        (0, 0),
        (1, 0),
        (2, 0),
    ]
    assert run.device.error is None
    drops = run.device.stats.queue(RX_QUEUE).drops
    assert drops == {"no-writable-in-rx": 1, "queue-stopped": 1}
