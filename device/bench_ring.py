"""``virtio-net-emu bench ring``: device-side pop plus add-used throughput.

The same ring work is done twice in one process: through ``DeviceQueue``
(validation, chain objects, notification decisions) and through a bare loop
that reads the same fields with the same primitives and checks nothing. The
bare loop is the practical limit for CPython, so the ratio of the two is the
figure of merit; it is stable on a noisy machine where absolute rates are not.
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable
from functools import partial

from virtio import DESCRIPTOR_SIZE, DeviceQueue, GuestMemory, RingLayout

__all__ = ["bench_ring", "RING_SHAPES"]

RING_SHAPES = {"1-descriptor": 1, "2-descriptor": 2}
"""Chain shapes measured: a frame in one buffer, or a header plus a frame."""

BUFFER_BASE = 0x100000
_desc_format = struct.Struct("<QIHH")


def _prepare(
    queue_size: int, descriptors_per_chain: int
) -> tuple[GuestMemory, RingLayout]:
    """Lay out a ring whose avail slots name ``queue_size`` ready chains."""
    memory = GuestMemory.anonymous(BUFFER_BASE + queue_size * 4096)
    layout = RingLayout.packed_after(queue_size * descriptors_per_chain, 0x1000)
    table = memory.view(layout.desc, layout.desc_bytes)
    avail = memory.u16_array(layout.avail, 3 + layout.size)
    for chain in range(queue_size):
        first = chain * descriptors_per_chain
        for offset in range(descriptors_per_chain):
            index = first + offset
            last = offset == descriptors_per_chain - 1
            length = 12 if descriptors_per_chain == 2 and offset == 0 else 64
            _desc_format.pack_into(
                table,
                index * DESCRIPTOR_SIZE,
                BUFFER_BASE + index * 2048,
                length,
                0 if last else 1,
                index + 1,
            )
        avail[2 + chain] = first
    return memory, layout


def _device_round(queue: DeviceQueue, avail: memoryview, batch: int) -> int:
    avail[1] = (avail[1] + batch) & 0xFFFF
    add_used = queue.add_used
    done = 0
    for chain in queue.chains():
        add_used(chain.head, 0)
        done += 1
    queue.publish()
    return done


def _bare_round(state: dict, avail: memoryview, batch: int) -> int:
    """Pop and complete chains with no checks: the reference loop.

    It does the same memory accesses as the device queue with EVENT_IDX on:
    read the head, the descriptors and their buffers, write avail_event after
    each pop, write the used element, and store used.idx once per batch.
    """
    avail[1] = (avail[1] + batch) & 0xFFFF
    table = state["table"]
    ram = state["ram"]
    used_elems = state["used_elems"]
    mask = state["mask"]
    last = state["last"]
    used = state["used"]
    avail_event = state["avail_event"]
    target = avail[1]
    unpack = _desc_format.unpack_from
    done = 0
    while last != target:
        head = avail[2 + (last & mask)]
        index = head
        readable = []
        while True:
            addr, length, flags, nxt = unpack(table, index * 16)
            readable.append(ram[addr : addr + length])
            if not flags & 1:
                break
            index = nxt
        slot = 2 * (used & mask)
        used_elems[slot] = head
        used_elems[slot + 1] = 0
        used = (used + 1) & 0xFFFF
        last = (last + 1) & 0xFFFF
        avail_event[0] = last
        done += 1
    state["used_head"][1] = used
    state["last"] = last
    state["used"] = used
    return done


def _rate(round_fn: Callable[[], int], seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        count += round_fn()
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def _bare_state(memory: GuestMemory, layout: RingLayout) -> dict:
    return {
        "table": memory.view(layout.desc, layout.desc_bytes),
        "ram": memory.regions[0].view,
        "used_elems": memory.u32_array(layout.used + 4, 2 * layout.size),
        "used_head": memory.u16_array(layout.used, 2),
        "avail_event": memory.u16_array(layout.avail_event_addr, 1),
        "mask": layout.size - 1,
        "last": 0,
        "used": 0,
    }


def bench_ring(seconds: float = 2.0, queue_size: int = 256, repeats: int = 10) -> dict:
    """Measure chains per second for each shape, device queue against bare loop.

    Each loop has a ring of its own, laid out alike. They alternate
    ``repeats`` times for ``seconds / repeats`` each; the ratio reported is
    the median of the ratios of the pairs, so a burst of load from elsewhere
    on the machine shifts one pair, not the figure. The rates are medians too.
    """
    results = {}
    for name, per_chain in RING_SHAPES.items():
        memory, layout = _prepare(queue_size, per_chain)
        device_avail = memory.u16_array(layout.avail, 3 + layout.size)
        queue = DeviceQueue(memory, layout, index=1, event_idx=True)
        bare_memory, bare_layout = _prepare(queue_size, per_chain)
        bare_avail = bare_memory.u16_array(bare_layout.avail, 3 + bare_layout.size)
        bare = _bare_state(bare_memory, bare_layout)
        slice_s = seconds / repeats
        pairs = []
        for _ in range(repeats):
            device_rate = _rate(
                partial(_device_round, queue, device_avail, queue_size), slice_s
            )
            bare_rate = _rate(
                partial(_bare_round, bare, bare_avail, queue_size), slice_s
            )
            pairs.append((device_rate, bare_rate))
        results[name] = {
            "chains_per_second": round(statistics.median(d for d, _ in pairs)),
            "bare_chains_per_second": round(statistics.median(b for _, b in pairs)),
            "ratio": round(statistics.median(d / b for d, b in pairs), 3),
        }
    return {"queue_size": queue_size, "repeats": repeats, "shapes": results}
