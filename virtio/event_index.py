"""Ring index arithmetic: 16-bit wrap helpers and the event index test.

Ring indices (avail.idx, used.idx, last_avail_idx, the event indices) are
free-running 16-bit counters: they increase by one per buffer and wrap at
65536 (virtio 1.2, 2.7.6 and 2.7.8). They are never reduced modulo the queue
size; only the slot a counter names is (``idx & (size - 1)``). Every
comparison between two of them is therefore a 16-bit difference, and every
value kept in a Python int is masked to 16 bits before it is compared or
written. This module is the one place that arithmetic lives.
"""

from __future__ import annotations

__all__ = ["U16_MASK", "wrap16", "distance16", "need_event"]

U16_MASK = 0xFFFF


def wrap16(value: int) -> int:
    """Return ``value`` reduced to a 16-bit ring index."""
    return value & U16_MASK


def distance16(new: int, old: int) -> int:
    """Return how far index ``new`` is ahead of ``old``, in 0..65535."""
    return (new - old) & U16_MASK


def need_event(event: int, new: int, old: int) -> bool:
    """Tell whether moving an index from ``old`` to ``new`` crossed ``event``.

    This is the event index test of virtio 1.2, 2.7.7.2 and 2.7.10.2 (the
    spec's ``vring_need_event``): the other side asked to be notified once
    the index passes ``event``, and it passed it if ``event`` lies in the
    half-open window ``[old, new)``. In 16-bit arithmetic that is
    ``(u16)(new - event - 1) < (u16)(new - old)``. Both the device (used
    buffer notifications against used_event) and the driver (kicks against
    avail_event) use it.
    """
    return ((new - event - 1) & U16_MASK) < ((new - old) & U16_MASK)
