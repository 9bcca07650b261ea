"""The driver side of a split virtqueue, modelled on Linux's virtio_ring.c.

``DriverQueue`` does in guest memory what Linux's split ring code does: it
keeps a free list of descriptors, adds buffers with an opaque token (directly
or through an indirect table), publishes avail.idx, decides kicks with the
event index test or the NO_NOTIFY flag, reclaims used buffers, and turns
used buffer notifications off and on, including the delayed variant that asks
for an interrupt only after 3/4 of the outstanding buffers are used. It is
the reference driver for the tests and the guest model, and a harness other
code can reuse.

A device that writes a used element naming a descriptor out of range, or one
that is not the head of an outstanding chain, breaks the queue as Linux does
(``BAD_RING``): ``DeviceError`` is raised once and the queue does nothing more
until ``reset``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import errors
from .event_index import U16_MASK, need_event
from .layout import DESCRIPTOR_FORMAT, DESCRIPTOR_SIZE, RingLayout
from .memory import GuestMemory

__all__ = ["DriverQueue", "QueueFull", "BufferSpec"]

BufferSpec = tuple[int, int]
"""A buffer for ``add_buf``: (guest-physical address, length in bytes)."""

_NEXT = 1
_WRITE = 2
_INDIRECT = 4
_NO_INTERRUPT = 1


class QueueFull(errors.UsageError):
    """``add_buf`` found too few free descriptors (Linux returns -ENOSPC)."""


class DriverQueue:
    """Driver side of one split virtqueue.

    ``indirect_area`` is the guest-physical address of a region the model may
    use for indirect tables, ``indirect_entries`` descriptors per head; without
    it, ``add_buf`` always uses direct descriptors. ``notify`` is called when a
    kick is due (the transport's notifier). ``start_index`` starts avail.idx
    and used.idx at another value than 0, as after 65,000 requests, so tests
    reach the 16-bit wrap quickly; it writes both fields into guest memory.
    """

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        index: int = 0,
        event_idx: bool = False,
        indirect_area: int | None = None,
        indirect_entries: int = 0,
        notify: Callable[[], None] | None = None,
        start_index: int = 0,
    ) -> None:
        self.memory = memory
        self.start_index = start_index & U16_MASK
        self.layout = layout
        self.index = index
        self.size = layout.size
        self.event_idx = event_idx
        self.indirect_area = indirect_area
        self.indirect_entries = indirect_entries
        self.notify = notify or (lambda: None)
        self._desc = memory.view(layout.desc, layout.desc_bytes)
        self._avail = memory.u16_array(layout.avail, 3 + self.size)
        self._used_head = memory.u16_array(layout.used, 2)
        self._used_elems = memory.u32_array(layout.used + 4, 2 * self.size)
        self._avail_event = memory.u16_array(layout.avail_event_addr, 1)
        self.reset()

    def reset(self) -> None:
        """Forget every buffer and return to a fresh ring (after device reset)."""
        size = self.size
        self.free_head = 0
        self.num_free = size
        self.num_added = 0
        self.avail_idx_shadow = self.start_index
        self.avail_flags_shadow = 0
        self.last_used_idx = self.start_index
        self.broken: errors.DeviceError | None = None
        # Linux keeps its own copy of each descriptor's next and length
        # (desc_extra), so it never trusts the shared table when freeing.
        self._next = [(i + 1) % size for i in range(size)]
        self._chain_len = [0] * size
        self._tokens: list[Any] = [None] * size
        self._avail[0] = 0
        self._avail[1] = self.start_index
        self._avail[2 + size] = self.start_index
        self._used_head[1] = self.start_index
        # Linux's ring reset also clears the device's fields, so a NO_NOTIFY
        # flag or avail_event left from before cannot suppress the first kick.
        self._used_head[0] = 0
        self._avail_event[0] = self.start_index

    # -- adding buffers -------------------------------------------------------

    def add_buf(
        self,
        out: Sequence[BufferSpec],
        in_: Sequence[BufferSpec] = (),
        token: Any = True,
        *,
        use_indirect: bool | None = None,
    ) -> int:
        """Expose ``out`` (device-readable) and ``in_`` (device-writable) buffers.

        Returns the head descriptor index. Like Linux, it uses an indirect
        table when one is available and the request has more than one buffer,
        unless ``use_indirect`` says otherwise. Raises ``QueueFull`` when the
        free descriptors do not suffice, ``UsageError`` for an empty request
        or a None token, and ``DeviceError`` on a broken queue.
        """
        if self.broken is not None:
            raise errors.DeviceError("queue is broken", queue=self.index)
        total = len(out) + len(in_)
        if total == 0 or token is None:
            raise errors.UsageError("add_buf needs at least one buffer and a token")
        indirect = self._want_indirect(total, use_indirect)
        needed = 1 if indirect else total
        if self.num_free < needed:
            raise QueueFull(
                f"queue {self.index}: {needed} descriptors needed, {self.num_free} free"
            )
        head = self.free_head
        buffers = [(a, n, 0) for a, n in out] + [(a, n, _WRITE) for a, n in in_]
        if indirect:
            self._write_indirect(head, buffers)
            self.free_head = self._next[head]
        else:
            self.free_head = self._write_direct(head, buffers)
        self.num_free -= needed
        self._chain_len[head] = needed
        self._tokens[head] = token
        self._expose(head)
        return head

    def _want_indirect(self, total: int, requested: bool | None) -> bool:
        possible = self.indirect_area is not None and 0 < total <= self.indirect_entries
        if requested is None:
            return possible and total > 1 and self.num_free > 0
        if requested and not possible:
            raise errors.UsageError(
                f"no indirect table of {total} entries is available on queue {self.index}"
            )
        return requested

    def _write_direct(self, head: int, buffers: list[tuple[int, int, int]]) -> int:
        """Write a chain starting at ``head``; return the next free descriptor."""
        index = head
        last = len(buffers) - 1
        for position, (addr, length, flags) in enumerate(buffers):
            following = self._next[index]
            if position < last:
                flags |= _NEXT
            DESCRIPTOR_FORMAT.pack_into(
                self._desc, index * DESCRIPTOR_SIZE, addr, length, flags, following
            )
            if position < last:
                index = following
        return self._next[index]

    def _write_indirect(self, head: int, buffers: list[tuple[int, int, int]]) -> None:
        assert self.indirect_area is not None
        table_addr = self.indirect_area + head * self.indirect_entries * DESCRIPTOR_SIZE
        table = bytearray(len(buffers) * DESCRIPTOR_SIZE)
        last = len(buffers) - 1
        for position, (addr, length, flags) in enumerate(buffers):
            if position < last:
                flags |= _NEXT
            DESCRIPTOR_FORMAT.pack_into(
                table, position * DESCRIPTOR_SIZE, addr, length, flags, position + 1
            )
        self.memory.write(table_addr, table)
        DESCRIPTOR_FORMAT.pack_into(
            self._desc, head * DESCRIPTOR_SIZE, table_addr, len(table), _INDIRECT, 0
        )

    def _expose(self, head: int) -> None:
        """Put ``head`` in the next avail slot and publish avail.idx."""
        slot = self.avail_idx_shadow & (self.size - 1)
        self._avail[2 + slot] = head
        self.avail_idx_shadow = (self.avail_idx_shadow + 1) & U16_MASK
        self._avail[1] = self.avail_idx_shadow
        self.num_added += 1
        # Linux kicks by itself before num_added can wrap the 16-bit window
        # that kick_prepare compares against.
        if self.num_added == U16_MASK:
            self.kick()

    # -- kicks ----------------------------------------------------------------

    def kick_prepare(self) -> bool:
        """Decide whether the device wants a kick for the buffers just added.

        With EVENT_IDX: ``need_event(avail_event, new, old)`` over the window
        of indices added since the last decision. Without: kick unless the
        device set VRING_USED_F_NO_NOTIFY (2.7.10).
        """
        self.memory.fence()
        new = self.avail_idx_shadow
        old = (new - self.num_added) & U16_MASK
        self.num_added = 0
        if self.event_idx:
            return need_event(self._avail_event[0], new, old)
        return not self._used_head[0] & 1

    def kick(self) -> bool:
        """Notify the device if ``kick_prepare`` says so; return whether it did."""
        if self.kick_prepare():
            self.notify()
            return True
        return False

    # -- reclaiming used buffers ----------------------------------------------

    def more_used(self) -> bool:
        """True when the device has published used elements not yet reclaimed."""
        return self.broken is None and self._used_head[1] != self.last_used_idx

    def get_buf(self) -> tuple[Any, int] | None:
        """Reclaim the next used buffer: return ``(token, length)`` or None.

        Raises ``DeviceError`` and breaks the queue when the used element names
        a descriptor out of range or one that is not an outstanding head.
        """
        if not self.more_used():
            return None
        slot = 2 * (self.last_used_idx & (self.size - 1))
        head = self._used_elems[slot]
        length = self._used_elems[slot + 1]
        if head >= self.size:
            raise self._bad_ring(f"id {head} out of range", head)
        token = self._tokens[head]
        if token is None:
            raise self._bad_ring(f"id {head} is not a head", head)
        self._detach(head)
        self.last_used_idx = (self.last_used_idx + 1) & U16_MASK
        if not self.avail_flags_shadow & _NO_INTERRUPT:
            self._avail[2 + self.size] = self.last_used_idx
            self.memory.fence()
        return token, length

    def _detach(self, head: int) -> None:
        """Return the chain at ``head`` to the free list."""
        count = self._chain_len[head]
        last = head
        for _ in range(count - 1):
            last = self._next[last]
        self._next[last] = self.free_head
        self.free_head = head
        self.num_free += count
        self._tokens[head] = None
        self._chain_len[head] = 0

    def _bad_ring(self, message: str, value: int) -> errors.DeviceError:
        error = errors.DeviceError(message, queue=self.index, value=value)
        self.broken = error
        return error

    def detach_unused_buf(self) -> Any:
        """Take back one buffer the device never used (device reset path)."""
        for head, token in enumerate(self._tokens):
            if token is not None:
                self._detach(head)
                # Like Linux, take the buffer back out of the avail ring too.
                self.avail_idx_shadow = (self.avail_idx_shadow - 1) & U16_MASK
                self._avail[1] = self.avail_idx_shadow
                return token
        return None

    # -- used buffer notification suppression (2.7.7) --------------------------

    def disable_cb(self) -> None:
        """Ask the device not to interrupt.

        Without EVENT_IDX this sets VRING_AVAIL_F_NO_INTERRUPT. With EVENT_IDX,
        Linux writes 0 into used_event, a value the device is unlikely to
        cross soon, and keeps the flag only in its shadow.
        """
        if self.avail_flags_shadow & _NO_INTERRUPT:
            return
        self.avail_flags_shadow |= _NO_INTERRUPT
        if self.event_idx:
            self._avail[2 + self.size] = 0
        else:
            self._avail[0] = self.avail_flags_shadow

    def enable_cb_prepare(self) -> int:
        """Ask for an interrupt on the next used buffer; return the index to poll."""
        if self.avail_flags_shadow & _NO_INTERRUPT:
            self.avail_flags_shadow &= ~_NO_INTERRUPT
            if not self.event_idx:
                self._avail[0] = self.avail_flags_shadow
        self._avail[2 + self.size] = self.last_used_idx
        return self.last_used_idx

    def poll(self, last_used_idx: int) -> bool:
        """True when used buffers arrived after ``last_used_idx``."""
        self.memory.fence()
        return self._used_head[1] != last_used_idx

    def enable_cb(self) -> bool:
        """Enable interrupts; return False when used buffers are already waiting."""
        return not self.poll(self.enable_cb_prepare())

    def enable_cb_delayed(self) -> bool:
        """Enable interrupts, but ask for one only after 3/4 of the outstanding.

        used_event is set to last_used_idx plus 3/4 of the buffers the device
        still holds. Returns False when that many are already used, so the
        caller reclaims now instead of waiting for an interrupt.
        """
        if self.avail_flags_shadow & _NO_INTERRUPT:
            self.avail_flags_shadow &= ~_NO_INTERRUPT
            if not self.event_idx:
                self._avail[0] = self.avail_flags_shadow
        outstanding = (self.avail_idx_shadow - self.last_used_idx) & U16_MASK
        delay = outstanding * 3 // 4
        self._avail[2 + self.size] = (self.last_used_idx + delay) & U16_MASK
        self.memory.fence()
        used = (self._used_head[1] - self.last_used_idx) & U16_MASK
        return used <= delay

    # -- inspection -----------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Buffers added and not yet reclaimed."""
        return (self.avail_idx_shadow - self.last_used_idx) & U16_MASK

    @property
    def callbacks_enabled(self) -> bool:
        return not self.avail_flags_shadow & _NO_INTERRUPT

    def used_event(self) -> int:
        return self._avail[2 + self.size]

    def avail_event(self) -> int:
        return self._avail_event[0]

    def used_idx(self) -> int:
        return self._used_head[1]

    def __repr__(self) -> str:
        return (
            f"DriverQueue(index={self.index}, size={self.size},"
            f" num_free={self.num_free}, avail_idx={self.avail_idx_shadow},"
            f" last_used_idx={self.last_used_idx})"
        )
