"""The device side of a split virtqueue (virtio 1.2, 2.7).

``DeviceQueue`` pops descriptor chains the driver made available, hands them
out as lists of readable and writable memoryviews into guest memory, takes
them back as used elements and publishes those in batches. It decides
notifications but never sends one: ``publish`` returns whether the driver
wants a used buffer notification, and ``enable_notification`` returns whether
buffers slipped in while notifications were off, so the caller drains again
instead of losing a kick.

Everything the driver wrote is validated before it is used, and every walk is
bounded by the queue size (or the indirect table's length). A violation raises
a ``DriverError`` subclass once and leaves the queue broken: from then on it
consumes nothing, writes nothing and each call returns at once, until
``reset``. A zero-length descriptor is legal and contributes no buffer.

Memory ordering. The driver may run concurrently (vhost-user). Index fields are
read and written with single aligned 16-bit accesses. Loads are not reordered
with other loads, nor stores with other stores, on x86 (TSO) and in CPython's
sequential execution, so the read of avail.idx before a ring entry, and the
write of a used element before used.idx, need no barrier here. A store
followed by a load of another location can be reordered on x86, so the two
places where the device stores and then loads a field the driver writes call
``memory.fence()``: publishing used.idx before reading the driver's
suppression fields (2.7.7.2), and enabling notifications before re-reading
avail.idx (2.7.10.2).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from . import errors
from .event_index import U16_MASK, need_event
from .layout import DESCRIPTOR_FORMAT, DESCRIPTOR_SIZE, RingLayout
from .memory import GuestMemory, MemoryAccessError

__all__ = ["DeviceQueue", "Chain", "Descriptor", "MAX_CHAIN_BYTES"]

MAX_CHAIN_BYTES = 0xFFFF_FFFF
"""Largest total length of one chain; the used ring's len is 32 bits (2.7.5.2)."""

MAX_INDIRECT_ENTRIES = 1024
"""Most entries an indirect table may have when the queue is smaller.

QEMU's limit (VIRTQUEUE_MAX_SIZE). It bounds the work of one chain walk,
since a table in a large guest could otherwise hold millions of entries."""

_NEXT = 1
_WRITE = 2
_INDIRECT = 4
_unpack_desc = DESCRIPTOR_FORMAT.unpack_from
_NO_BUFFERS: tuple = ()


@dataclass(frozen=True)
class Descriptor:
    """One descriptor as the driver wrote it, for inspection tools."""

    index: int
    addr: int
    len: int
    flags: int
    next: int
    indirect: bool = False


class Chain:
    """One popped descriptor chain: the buffers of one request.

    ``readable`` and ``writable`` are memoryviews into guest memory, in chain
    order, without zero-length descriptors. ``head`` is what ``add_used``
    takes back. The queue reuses the object when the same head is popped
    again, so a Chain is valid only until its head is added to the used ring.
    """

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, readable={self.readable_len} bytes in"
            f" {len(self.readable)}, writable={self.writable_len} bytes in"
            f" {len(self.writable)})"
        )


class DeviceQueue:
    """Device side of one split virtqueue.

    ``last_avail_idx`` and ``used_idx`` may be given to start from a restored
    state (vhost-user SET_VRING_BASE, a replayed case). ``event_idx`` and
    ``indirect`` are the negotiated VIRTIO_F_EVENT_IDX and
    VIRTIO_F_INDIRECT_DESC; ``notify_on_empty`` is VIRTIO_F_NOTIFY_ON_EMPTY.
    """

    __slots__ = (
        "memory",
        "layout",
        "index",
        "size",
        "_mask",
        "event_idx",
        "indirect",
        "notify_on_empty",
        "broken",
        "detached",
        "_initial",
        "_mapping_error",
        "_desc_table",
        "_avail",
        "_avail_ring",
        "_used_head",
        "_used_elems",
        "_avail_event",
        "_ram",
        "_ram_base",
        "_ram_end",
        "last_avail_idx",
        "used_idx",
        "_shadow_avail_idx",
        "_published_idx",
        "signalled_used",
        "signalled_used_valid",
        "notification_enabled",
        "_advance_avail_event",
        "_index_gap",
        "_in_flight",
        "_fast_path",
        "_chains",
        "_slot_heads",
    )

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        index: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
        notify_on_empty: bool = False,
        last_avail_idx: int = 0,
        used_idx: int = 0,
    ) -> None:
        self.memory = memory
        self.layout = layout
        self.index = index
        self.size = layout.size
        self._mask = layout.size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        self.notify_on_empty = notify_on_empty
        self.broken: errors.DriverError | None = None
        self.detached = False
        self._initial = (last_avail_idx & U16_MASK, used_idx & U16_MASK)
        self._mapping_error: errors.DriverError | None = None
        self._map_rings()
        self.reset()

    # -- set-up ---------------------------------------------------------------

    def _map_rings(self) -> None:
        """Create the views of the three parts, or remember why that failed.

        A ring outside guest memory, misaligned, or split across two regions
        is not an error yet: the queue refuses to run and reports
        ``RingOutOfRange`` on first use, as a device must not fail the
        driver's configuration writes themselves.
        """
        layout = self.layout
        problem = layout.misalignment()
        try:
            if problem is None:
                self._desc_table = self.memory.view(layout.desc, layout.desc_bytes)
                avail = self.memory.u16_array(layout.avail, 3 + self.size)
                used_head = self.memory.u16_array(layout.used, 2)
                used_elems = self.memory.u32_array(layout.used + 4, 2 * self.size)
                avail_event = self.memory.u16_array(layout.avail_event_addr, 1)
        except MemoryAccessError as error:
            problem = str(error)
        if problem is not None:
            self._mapping_error = errors.RingOutOfRange(
                f"ring not usable: {problem}", queue=self.index, value=layout.desc
            )
            return
        self._avail = avail
        self._avail_ring = avail[2 : 2 + self.size]
        self._used_head = used_head
        self._used_elems = used_elems
        self._avail_event = avail_event
        # Buffers inside one region are sliced directly by ``chains`` and
        # ``_walk``, and others go through the slower ``memory.views``. That
        # region is the largest one, because it likely contains most buffers.
        # Among regions of equal size it is the one with the descriptor
        # table, because drivers often allocate rings and buffers together
        # (DPDK's testpmd with hugepages does).
        desc = layout.desc
        fast = max(
            self.memory.regions,
            key=lambda region: (region.size, region.gpa <= desc < region.end),
        )
        self._ram = fast.view
        self._ram_base = fast.gpa
        self._ram_end = fast.end
        self._fast_path = (self._desc_table, fast.gpa, fast.size, fast.view)

    def reset(self) -> None:
        """Return to the initial indices and clear a broken state (2.4, 2.6.1)."""
        last_avail, used = self._initial
        self.last_avail_idx = last_avail
        self.used_idx = used
        self._shadow_avail_idx = last_avail
        self._published_idx = used
        self.signalled_used = used
        self.signalled_used_valid = False
        self.notification_enabled = True
        self._advance_avail_event = self.event_idx
        self._index_gap = (last_avail - used) & U16_MASK
        # The upper half stays zero, so a negative head (which indexes from the
        # end) reads as "not in flight" without a separate sign test.
        self._in_flight = bytearray(2 * self.size)
        # One Chain object per head, reused: a head has at most one chain in
        # flight, and allocating an object per pop is a third of its cost.
        self._chains = [Chain(head, [], [], 0, 0) for head in range(self.size)]
        # The head popped from each avail slot, for unpop.
        self._slot_heads = [0] * self.size
        self.broken = None
        self.detached = False

    @property
    def inuse(self) -> int:
        """Chains popped and not yet added to the used ring.

        Derived from the indices: every pop advances last_avail_idx and every
        add_used advances used_idx, so their distance, less the distance they
        started at, is the count in flight.
        """
        return (self.last_avail_idx - self.used_idx - self._index_gap) & U16_MASK

    @property
    def ready(self) -> bool:
        """True while the rings are mapped and the queue is not broken or detached."""
        return self._mapping_error is None and self.broken is None and not self.detached

    def detach(self) -> None:
        """Detach the queue from the driver for good, as a device reset does.

        Unlike a driver fault, nothing pending is published: after a reset the
        device must not write the rings or notify (2.4.1), even from a
        transmit or a delivery that was under way when the reset came. From
        then on every call behaves as on a broken queue, until ``reset``.
        """
        self.detached = True
        self._in_flight = bytearray(len(self._in_flight))
        self._index_gap = (self.last_avail_idx - self.used_idx) & U16_MASK
        # Route a chains() loop that is still running through available().
        self._shadow_avail_idx = self.last_avail_idx

    # -- errors ---------------------------------------------------------------

    def mark_broken(self, error: errors.DriverError) -> None:
        """Stop the queue because the device broke elsewhere (another queue).

        The queue behaves as if it had seen ``error`` itself: chains completed
        before are published, then it consumes and writes nothing until
        ``reset``. Does nothing on a queue that is already broken.
        """
        if self.broken is None and not self.detached:
            self._fail(error)

    def _fail(self, error: errors.DriverError) -> errors.DriverError:
        """Mark the queue broken with ``error`` and return it for raising."""
        if error.queue is None:
            error.queue = self.index
        # Chains completed before the fault were processed in full (a frame
        # already went out), so their used elements are made visible now;
        # after this the queue writes nothing until reset.
        if self.used_idx != self._published_idx and self._mapping_error is None:
            self._used_head[1] = self.used_idx
            self._published_idx = self.used_idx
        self.broken = error
        self._in_flight = bytearray(2 * self.size)
        self._index_gap = (self.last_avail_idx - self.used_idx) & U16_MASK
        # Route every later pop through available(), which returns 0 at once.
        self._shadow_avail_idx = self.last_avail_idx
        return error

    # -- available ring -------------------------------------------------------

    def available(self) -> int:
        """Return how many chains are available, validating avail.idx.

        Raises ``AvailIndexJump`` when avail.idx is more than the queue size
        ahead, and ``TooManyInFlight`` when the chains in flight plus the new
        ones exceed the queue size (2.7). Returns 0 on a broken or detached queue.
        """
        if self.broken is not None or self.detached:
            return 0
        if self._mapping_error is not None:
            raise self._fail(self._mapping_error)
        avail_idx = self._avail[1]
        pending = (avail_idx - self.last_avail_idx) & U16_MASK
        if pending > self.size:
            raise self._fail(
                errors.AvailIndexJump(
                    f"avail.idx {avail_idx} is {pending} ahead of last_avail_idx"
                    f" {self.last_avail_idx}, more than the queue size {self.size}",
                    queue=self.index,
                    index=self.last_avail_idx,
                    value=avail_idx,
                )
            )
        if pending + self.inuse > self.size:
            raise self._fail(
                errors.TooManyInFlight(
                    f"{self.inuse} chains in flight plus {pending} available"
                    f" exceed the queue size {self.size}",
                    queue=self.index,
                    index=self.last_avail_idx,
                    value=pending + self.inuse,
                )
            )
        self._shadow_avail_idx = avail_idx
        return pending

    def pop(self) -> Chain | None:
        """Take the next available chain, or return None when there is none.

        Raises a ``DriverError`` subclass, and breaks the queue, when the ring
        or the chain is malformed; nothing is consumed in that case.
        """
        for chain in self.chains(1):
            return chain
        return None

    def chains(self, limit: int = -1) -> Iterator[Chain]:
        """Pop available chains one at a time, at most ``limit`` (-1: no limit).

        Each chain is consumed when it is yielded; a caller that stops early
        leaves the rest available. The caller may ``add_used`` or ``unpop``
        between chains, but must not keep the iterator across ``reset``.
        Raises like ``pop``. This is the per-packet path: resuming the
        generator is cheaper than a call to ``pop`` per chain.
        """
        if not self.ready:
            self.available()
            return
        size = self.size
        mask = self._mask
        avail_ring = self._avail_ring
        in_flight = self._in_flight
        chains = self._chains
        slot_heads = self._slot_heads
        table, base, span, ram = self._fast_path
        while limit:
            limit -= 1
            last = self.last_avail_idx
            if last == self._shadow_avail_idx:
                if self.broken is not None or not self.available():
                    return
            head = avail_ring[last & mask]
            if head >= size or in_flight[head]:
                raise self._head_error(last & mask, head)
            # Fast path: a direct chain whose buffers all lie in the first
            # memory region. Anything else (INDIRECT, another region, a fault)
            # restarts in _walk, which handles and reports every case.
            readable: list[memoryview] | tuple = _NO_BUFFERS
            writable: list[memoryview] | tuple = _NO_BUFFERS
            readable_len = writable_len = 0
            seen_writable = False
            index = head
            count = 1
            while True:
                addr, length, flags, next_index = _unpack_desc(table, index << 4)
                offset = addr - base
                if flags & _INDIRECT or offset < 0 or offset + length > span:
                    chain = self._walk(head)
                    break
                if flags & _WRITE:
                    seen_writable = True
                    if length:
                        if writable_len:
                            writable.append(ram[offset : offset + length])
                        else:
                            writable = [ram[offset : offset + length]]
                        writable_len += length
                elif seen_writable:
                    # The flag decides, not the length: a zero-length
                    # writable descriptor still ends the readable part.
                    raise self._order_error(head, index)
                elif length:
                    if readable_len:
                        readable.append(ram[offset : offset + length])
                    else:
                        readable = [ram[offset : offset + length]]
                    readable_len += length
                if not flags & _NEXT:
                    # One descriptor cannot exceed the limit: len is 32 bits.
                    if count > 1 and readable_len + writable_len > MAX_CHAIN_BYTES:
                        raise self._size_error(head, index, readable_len + writable_len)
                    chain = chains[head]
                    chain.readable = readable
                    chain.writable = writable
                    chain.readable_len = readable_len
                    chain.writable_len = writable_len
                    break
                count += 1
                if next_index >= size or count > size:
                    # _walk reports the exact fault: next out of range, a loop.
                    chain = self._walk(head)
                    break
                index = next_index
            in_flight[head] = 1
            slot_heads[last & mask] = head
            last = (last + 1) & U16_MASK
            self.last_avail_idx = last
            if self._advance_avail_event:
                self._avail_event[0] = last
            yield chain

    def pop_single(
        self, limit: int, min_len: int, max_len: int
    ) -> tuple[list[int], list[memoryview]]:
        """Pop the leading run of chains that are one readable buffer each.

        A chain belongs to the run when it is a single direct descriptor with
        neither NEXT nor WRITE set, ``min_len`` to ``max_len`` bytes long,
        inside the memory region that ``chains`` slices directly. That is how
        Linux and DPDK post a small TX frame with its header pushed in front.
        Returns the heads and the buffers, at most ``limit`` of each.

        The run ends at the first other chain, which stays available, and
        this method raises nothing once it has popped a chain: a malformed
        head or descriptor ends the run too, and ``chains`` then reports it.
        So the two together consume and validate exactly as ``chains``
        alone. It raises like ``available`` before the first pop.
        """
        heads: list[int] = []
        buffers: list[memoryview] = []
        last = self.last_avail_idx
        if last == self._shadow_avail_idx and not self.available():
            return heads, buffers
        limit = min(limit, (self._shadow_avail_idx - last) & U16_MASK)
        size = self.size
        mask = self._mask
        avail_ring = self._avail_ring
        in_flight = self._in_flight
        slot_heads = self._slot_heads
        avail_event = self._avail_event if self._advance_avail_event else None
        table, base, span, ram = self._fast_path
        while limit:
            limit -= 1
            slot = last & mask
            head = avail_ring[slot]
            if head >= size or in_flight[head]:
                break
            addr, length, flags, _ = _unpack_desc(table, head << 4)
            offset = addr - base
            if flags or not min_len <= length <= max_len:
                break
            if offset < 0 or offset + length > span:
                break
            heads.append(head)
            buffers.append(ram[offset : offset + length])
            in_flight[head] = 1
            slot_heads[slot] = head
            last = (last + 1) & U16_MASK
            if avail_event is not None:
                avail_event[0] = last
        self.last_avail_idx = last
        return heads, buffers

    def _head_error(self, slot: int, head: int) -> errors.DriverError:
        if head >= self.size:
            error: errors.DriverError = errors.HeadOutOfRange(
                f"avail ring slot {slot} names head {head}, beyond the queue"
                f" size {self.size}",
                queue=self.index,
                index=slot,
                value=head,
            )
        else:
            error = errors.TooManyInFlight(
                f"avail ring slot {slot} names head {head}, which is still in flight",
                queue=self.index,
                index=slot,
                value=head,
            )
        return self._fail(error)

    def _walk(self, head: int) -> Chain:
        """Follow the chain at ``head`` through NEXT and an indirect table.

        This is the per-packet path, so the common case (every buffer inside
        the first memory region) is inlined and everything else goes through
        helpers that also raise the errors.
        """
        table = self._desc_table
        limit = self.size
        index = head
        count = 0
        in_table = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_len = 0
        writable_len = 0
        seen_writable = False
        base = self._ram_base
        end = self._ram_end
        ram = self._ram
        while True:
            count += 1
            if count > limit:
                raise self._loop_error(head, index, limit, in_table)
            addr, length, flags, next_index = _unpack_desc(table, index << 4)
            if flags & _INDIRECT:
                table, limit = self._enter_indirect(
                    head, index, addr, length, flags, in_table
                )
                index = count = 0
                in_table = True
                continue
            if flags & _WRITE:
                seen_writable = True
                if length:
                    if base <= addr and addr + length <= end:
                        writable.append(ram[addr - base : addr - base + length])
                    else:
                        writable += self._translate(head, index, addr, length)
                    writable_len += length
            elif seen_writable:
                raise self._order_error(head, index)
            elif length:
                if base <= addr and addr + length <= end:
                    readable.append(ram[addr - base : addr - base + length])
                else:
                    readable += self._translate(head, index, addr, length)
                readable_len += length
            if readable_len + writable_len > MAX_CHAIN_BYTES:
                raise self._size_error(head, index, readable_len + writable_len)
            if not flags & _NEXT:
                chain = self._chains[head]
                chain.readable = readable
                chain.writable = writable
                chain.readable_len = readable_len
                chain.writable_len = writable_len
                return chain
            if next_index >= limit:
                raise self._next_error(head, index, next_index, limit)
            index = next_index

    def _size_error(self, head: int, index: int, total: int) -> errors.DriverError:
        return self._fail(
            errors.ChainTooLarge(
                f"chain at head {head} is longer than {MAX_CHAIN_BYTES} bytes"
                f" at descriptor {index}",
                queue=self.index,
                index=index,
                value=total,
            )
        )

    def _next_error(
        self, head: int, index: int, next_index: int, limit: int
    ) -> errors.DriverError:
        return self._fail(
            errors.NextOutOfRange(
                f"descriptor {index} of the chain at head {head} has next"
                f" {next_index}, beyond the table of {limit}",
                queue=self.index,
                index=index,
                value=next_index,
            )
        )

    def _enter_indirect(
        self, head: int, index: int, addr: int, length: int, flags: int, nested: bool
    ) -> tuple[memoryview | bytes, int]:
        """Validate an INDIRECT descriptor and return its table and length.

        The WRITE flag of the descriptor that points at the table is ignored
        (2.7.5.3.2). A table may hold more entries than the queue size: the
        driver rule against chains longer than the queue (2.7.5.3.1) is not
        enforced here, because Linux builds such tables for small queues. A
        table longer than both the queue and ``MAX_INDIRECT_ENTRIES`` is
        rejected, so one walk reads at most that many table entries.
        """

        def bad(kind: type[errors.DriverError], why: str) -> errors.DriverError:
            return self._fail(
                kind(
                    f"descriptor {index} of the chain at head {head}: {why}",
                    queue=self.index,
                    index=index,
                    value=length if kind is errors.BadIndirectTable else flags,
                )
            )

        if nested:
            raise bad(errors.NestedIndirect, "indirect table inside an indirect table")
        if not self.indirect:
            raise bad(errors.BadIndirectTable, "INDIRECT without INDIRECT_DESC")
        if flags & _NEXT:
            raise bad(errors.BadIndirectTable, "INDIRECT and NEXT are both set")
        if length == 0 or length % DESCRIPTOR_SIZE:
            raise bad(
                errors.BadIndirectTable,
                f"table length {length} is not a non-zero multiple of 16",
            )
        entries = length // DESCRIPTOR_SIZE
        if entries > max(self.size, MAX_INDIRECT_ENTRIES):
            raise bad(
                errors.BadIndirectTable,
                f"table of {entries} entries is longer than the queue size"
                f" {self.size} and the limit {MAX_INDIRECT_ENTRIES}",
            )
        try:
            parts = self.memory.views(addr, length)
        except MemoryAccessError:
            raise self._fail(
                errors.AddressOutOfRange(
                    f"indirect table of descriptor {index} at {addr:#x} length"
                    f" {length:#x} is outside guest memory",
                    queue=self.index,
                    index=index,
                    value=addr,
                )
            ) from None
        table = parts[0] if len(parts) == 1 else b"".join(bytes(p) for p in parts)
        return table, entries

    def _translate(self, head: int, index: int, addr: int, length: int) -> list:
        try:
            return self.memory.views(addr, length)
        except MemoryAccessError:
            raise self._fail(
                errors.AddressOutOfRange(
                    f"descriptor {index} of the chain at head {head}: buffer at"
                    f" {addr:#x} length {length:#x} is outside guest memory",
                    queue=self.index,
                    index=index,
                    value=addr,
                )
            ) from None

    def _order_error(self, head: int, index: int) -> errors.DriverError:
        return self._fail(
            errors.WriteBeforeRead(
                f"descriptor {index} of the chain at head {head} is device-readable"
                " but follows a device-writable one",
                queue=self.index,
                index=index,
                value=head,
            )
        )

    def _loop_error(
        self, head: int, index: int, limit: int, in_table: bool
    ) -> errors.DriverError:
        where = "indirect table" if in_table else "descriptor table"
        return self._fail(
            errors.DescriptorLoop(
                f"chain at head {head} has more than {limit} descriptors in its"
                f" {where}, which means a loop (at descriptor {index})",
                queue=self.index,
                index=index,
                value=head,
            )
        )

    def unpop(self, count: int = 1) -> None:
        """Give back the ``count`` most recently popped chains, unused.

        The next ``pop`` returns them again. Raises ``UsageError`` when fewer
        than ``count`` chains are in flight, or when one of the most recent
        ``count`` pops was already added to the used ring. The heads come from
        the device's own record of its pops, not from the avail ring, which
        the driver may have rewritten since.
        """
        if count > self.inuse:
            raise errors.UsageError(
                f"cannot unpop {count} chains: only {self.inuse} are in flight"
            )
        heads = [
            self._slot_heads[(self.last_avail_idx - back) & self._mask]
            for back in range(1, count + 1)
        ]
        for head in heads:
            if not self._in_flight[head]:
                raise errors.UsageError(
                    f"cannot unpop head {head}: it was already added to the used ring"
                )
        for head in heads:
            self._in_flight[head] = 0
        self.last_avail_idx = (self.last_avail_idx - count) & U16_MASK
        self._shadow_avail_idx = self.last_avail_idx

    rewind = unpop

    def recent_pops(self, count: int) -> list[int]:
        """Return the heads of the last ``count`` pops, oldest first.

        Only the heads still in flight, in a row from the most recent pop
        back, are listed: ``unpop`` can give back exactly these.
        """
        heads: list[int] = []
        for back in range(1, min(count, self.inuse) + 1):
            head = self._slot_heads[(self.last_avail_idx - back) & self._mask]
            if not self._in_flight[head]:
                break
            heads.append(head)
        heads.reverse()
        return heads

    def peek(self, count: int) -> Iterator[tuple[int, list[Descriptor]]]:
        """Yield up to ``count`` available chains as descriptor lists, unconsumed.

        For inspection tools: it validates nothing beyond the bounds it needs
        and never marks the queue broken; a malformed chain ends the listing.
        """
        if not self.ready:
            return
        avail_idx = self._avail[1]
        pending = min((avail_idx - self.last_avail_idx) & U16_MASK, self.size, count)
        for offset in range(pending):
            slot = (self.last_avail_idx + offset) & (self.size - 1)
            head = self._avail_ring[slot]
            if head >= self.size:
                return
            yield head, list(self._list_descriptors(head))

    def _list_descriptors(self, head: int) -> Iterator[Descriptor]:
        table: memoryview | bytes = self._desc_table
        limit = self.size
        index = head
        in_table = False
        for _ in range(2 * self.size):
            addr, length, flags, next_index = _unpack_desc(
                table, index * DESCRIPTOR_SIZE
            )
            yield Descriptor(index, addr, length, flags, next_index, in_table)
            if flags & _INDIRECT and not in_table:
                if length == 0 or length % DESCRIPTOR_SIZE:
                    return
                if not self.memory.contains(addr, length):
                    return
                table = self.memory.read(addr, length)
                limit = length // DESCRIPTOR_SIZE
                index = 0
                in_table = True
                continue
            if not flags & _NEXT or next_index >= limit:
                return
            index = next_index

    # -- used ring ------------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Write a used element for ``head`` with ``length`` bytes written.

        The element becomes visible to the driver at the next ``publish``.
        Raises ``UsageError`` when ``head`` is not in flight. Does nothing on a
        broken or detached queue.
        """
        in_flight = self._in_flight
        # A broken or detached queue has no heads in flight (_fail and detach
        # clear them), so one test covers a bad head and those states alike.
        try:
            held = in_flight[head]
        except IndexError:
            held = 0
        if not held:
            if self.broken is not None or self.detached:
                return
            raise errors.UsageError(f"queue {self.index}: head {head} is not in flight")
        used = self.used_idx
        slot = (used & self._mask) << 1
        elems = self._used_elems
        try:
            elems[slot + 1] = length
        except (ValueError, TypeError):
            raise errors.UsageError(
                f"queue {self.index}: used length {length!r} for head {head} is"
                " not a 32-bit unsigned integer"
            ) from None
        elems[slot] = head
        in_flight[head] = 0
        self.used_idx = (used + 1) & U16_MASK

    def add_used_many(self, heads: list[int], length: int = 0) -> None:
        """Write a used element for each of ``heads``, in order, all of ``length``.

        The same as calling ``add_used`` for each head, in one call: a TX
        burst completes every chain with length 0. Raises ``UsageError`` at
        the first head that is not in flight, after adding the ones before it.
        """
        if self.broken is not None or self.detached:
            return
        if not isinstance(length, int) or not 0 <= length <= 0xFFFF_FFFF:
            raise errors.UsageError(
                f"queue {self.index}: used length {length!r} is not a 32-bit"
                " unsigned integer"
            )
        in_flight = self._in_flight
        elems = self._used_elems
        mask = self._mask
        used = self.used_idx
        try:
            for head in heads:
                # A head beyond the table raises IndexError by itself; one
                # that is not in flight takes the same way out.
                if not in_flight[head]:
                    raise IndexError
                slot = (used & mask) << 1
                elems[slot] = head
                elems[slot + 1] = length
                in_flight[head] = 0
                used = (used + 1) & U16_MASK
        except IndexError:
            raise errors.UsageError(
                f"queue {self.index}: head {head} is not in flight"
            ) from None
        finally:
            self.used_idx = used

    @property
    def unpublished(self) -> int:
        """Used elements written but not yet visible through used.idx."""
        return (self.used_idx - self._published_idx) & U16_MASK

    def publish(self) -> bool:
        """Store used.idx for every element added since the last publish.

        Returns whether the driver must get a used buffer notification now
        (2.7.7.2); returns False when nothing was pending. All elements added
        since the last publish become visible to the driver in one 16-bit
        store, which is what lets a mergeable RX frame appear whole.
        """
        if self.broken is not None or self.detached:
            return False
        if self.used_idx == self._published_idx:
            return False
        old = self._published_idx
        new = self.used_idx
        self._used_head[1] = new
        self._published_idx = new
        # A completion count that passes signalled_used again makes the old
        # reference index meaningless: notify unconditionally next time.
        if _as_s16(new - self.signalled_used) < ((new - old) & U16_MASK):
            self.signalled_used_valid = False
        return self.needs_notification()

    def needs_notification(self) -> bool:
        """Decide whether the driver wants a used buffer notification.

        Without EVENT_IDX: notify unless avail.flags has NO_INTERRUPT (only
        bit 0 is looked at, 2.7.7.2). With EVENT_IDX: notify when used.idx
        moved past used_event since the last notification, with the
        ``need_event`` test; the low bit of avail.flags is ignored.
        """
        if not self.ready:
            return False
        self.memory.fence()
        if self.notify_on_empty and self.inuse == 0:
            if self._avail[1] == self.last_avail_idx:
                return True
        if not self.event_idx:
            return not self._avail[0] & 1
        valid = self.signalled_used_valid
        old = self.signalled_used
        # Decide over what the driver can see: elements added but not yet
        # published do not count.
        new = self._published_idx
        self.signalled_used_valid = True
        self.signalled_used = new
        return not valid or need_event(self._avail[2 + self.size], new, old)

    def drop_all(self) -> int:
        """Complete every available chain with length 0; return the count.

        Used when the device cannot process a queue (link down, no backend):
        the driver gets its buffers back instead of waiting for ever.
        """
        dropped = 0
        while True:
            chain = self.pop()
            if chain is None:
                return dropped
            self.add_used(chain.head, 0)
            dropped += 1

    def in_flight_heads(self) -> list[int]:
        """Heads popped and not yet added to the used ring."""
        return [head for head, flag in enumerate(self._in_flight) if flag]

    # -- available buffer notification suppression (2.7.10) -------------------

    def disable_notification(self) -> None:
        """Ask the driver not to kick.

        Without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY. With EVENT_IDX it
        writes nothing: avail_event keeps its last value and goes stale as the
        driver adds buffers, so the driver's need_event test stops firing.
        """
        if not self.ready:
            return
        self.notification_enabled = False
        self._advance_avail_event = False
        if not self.event_idx:
            # The whole field is written: the device sets flags to exactly 0
            # or 1 (2.7.10.2), whatever the driver may have stored there.
            if self._used_head[0] != 1:
                self._used_head[0] = 1

    def enable_notification(self) -> bool:
        """Ask the driver to kick again; return True if buffers slipped in.

        Without EVENT_IDX this clears VRING_USED_F_NO_NOTIFY; with EVENT_IDX it
        writes the current avail.idx into avail_event. Then, after a full
        barrier, it reads avail.idx again: buffers the driver added before it
        could see the change would otherwise never be kicked for.
        """
        if not self.ready:
            return False
        self.notification_enabled = True
        self._advance_avail_event = self.event_idx
        # Each field is stored only when it changes, so a queue that starts
        # with clean rings writes nothing here.
        if self.event_idx:
            avail_idx = self._avail[1]
            if self._avail_event[0] != avail_idx:
                self._avail_event[0] = avail_idx
        elif self._used_head[0]:
            self._used_head[0] = 0
        self.memory.fence()
        return self._avail[1] != self.last_avail_idx

    # -- inspection -----------------------------------------------------------

    def avail_idx(self) -> int:
        """Return the driver's avail.idx as it is in guest memory now."""
        return self._avail[1] if self.ready else self.last_avail_idx

    def used_event(self) -> int:
        """Return the driver's used_event field."""
        return self._avail[2 + self.size] if self.ready else 0

    def avail_flags(self) -> int:
        return self._avail[0] if self.ready else 0

    def used_flags(self) -> int:
        return self._used_head[0] if self.ready else 0

    def avail_event(self) -> int:
        """Return the device's avail_event field."""
        return self._avail_event[0] if self.ready else 0

    def __repr__(self) -> str:
        return (
            f"DeviceQueue(index={self.index}, size={self.size},"
            f" last_avail_idx={self.last_avail_idx}, used_idx={self.used_idx},"
            f" inuse={self.inuse}, broken={self.broken is not None})"
        )


def _as_s16(value: int) -> int:
    value &= U16_MASK
    return value - 0x10000 if value & 0x8000 else value
