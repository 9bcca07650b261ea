"""Invariants every replayed case must keep, checked after each step.

``InvariantChecker`` is a ``CaseObserver``: it snapshots guest memory before
each step of a ``CaseRun`` and compares afterwards. For every step that the
device runs (not the driver's own writes) it checks:

- the guard bytes after each region are unchanged, so nothing was written
  outside guest memory;
- every changed byte is one the device may write: used.flags (only without
  EVENT_IDX, 2.7.10.2), used.idx, the used elements written in this step,
  avail_event (only with EVENT_IDX), and the device-writable buffers of
  chains in flight. So the descriptor tables, the avail rings and every
  device-readable buffer stay byte-identical (2.7.5.1), and nothing at all
  is written while the device is not running (before DRIVER_OK, 2.1.2; after
  it broke or was reset);
- each used element names a head that was consumed and is still in flight,
  so no head completes twice, and its len is at most the chain's writable
  bytes (2.7.8.2);
- used.idx in memory moved by exactly the elements published;
- used.flags is 0 or 1, and 0 with EVENT_IDX, unless the driver wrote it;
- no interrupt while the device was not running at the start of the step;
- a break sets DEVICE_NEEDS_RESET, and it sends one configuration interrupt
  when VERSION_1 is negotiated.

Chains are walked here independently of the device, over the memory as it
was before the step, so a chain the device consumed but this walk finds
malformed is a violation too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from virtio import DESCRIPTOR_SIZE, DeviceQueue, DeviceStatus, VirtioFeature
from virtio.device_queue import MAX_CHAIN_BYTES, MAX_INDIRECT_ENTRIES
from virtio.layout import DESCRIPTOR_FORMAT, RingLayout

from .case import GUARD_BYTES, GUARD_FILL, Action, CaseObserver, CaseRun

__all__ = ["InvariantChecker", "walk_chain"]

_NEXT = 1
_WRITE = 2
_INDIRECT = 4
_CHUNK = 4096

Range = tuple[int, int]
"""A guest-physical range as (start, end), end exclusive."""


class Snapshot:
    """Guest memory as it was before a step, readable by address."""

    def __init__(self, run: CaseRun) -> None:
        self.regions = [
            (region.gpa, bytes(region.view)) for region in run.memory.regions
        ]

    def read(self, address: int, length: int) -> bytes | None:
        """Return ``length`` bytes at ``address``, or None outside memory."""
        data = bytearray()
        cursor = address
        end = address + length
        while cursor < end:
            for gpa, contents in self.regions:
                if gpa <= cursor < gpa + len(contents):
                    take = min(end, gpa + len(contents)) - cursor
                    data += contents[cursor - gpa : cursor - gpa + take]
                    cursor += take
                    break
            else:
                return None
        return bytes(data)

    def contains(self, address: int, length: int) -> bool:
        if length == 0:
            return True
        return self.read(address, length) is not None


@dataclass
class WalkedChain:
    """The buffers of one chain as the checker's own walk found them."""

    writable: list[Range]
    writable_len: int


def walk_chain(
    memory: Snapshot, layout: RingLayout, head: int, indirect: bool
) -> WalkedChain | str:
    """Walk the chain at ``head`` by the split ring rules; return it or why not.

    The rules are the device's: zero-length descriptors are skipped, the
    WRITE flag of an INDIRECT descriptor is ignored, a table may be longer
    than the queue up to ``MAX_INDIRECT_ENTRIES``.
    """
    size = layout.size
    table = memory.read(layout.desc, size * DESCRIPTOR_SIZE)
    if table is None or head >= size:
        return f"head {head} or its table is out of range"
    limit = size
    index = head
    count = 0
    in_table = False
    writable: list[Range] = []
    total = writable_len = 0
    seen_writable = False
    while True:
        count += 1
        if count > limit:
            return "loop"
        addr, length, flags, next_index = DESCRIPTOR_FORMAT.unpack_from(
            table, index * DESCRIPTOR_SIZE
        )
        if flags & _INDIRECT:
            bad = in_table or not indirect or flags & _NEXT
            entries = length // DESCRIPTOR_SIZE
            if bad or length == 0 or length % DESCRIPTOR_SIZE:
                return f"bad indirect descriptor {index}"
            if entries > max(size, MAX_INDIRECT_ENTRIES):
                return f"indirect table of {entries} entries"
            table = memory.read(addr, length)
            if table is None:
                return "indirect table outside memory"
            limit, index, count, in_table = entries, 0, 0, True
            continue
        if length and not memory.contains(addr, length):
            return f"descriptor {index} outside memory"
        if flags & _WRITE:
            seen_writable = True
            if length:
                writable.append((addr, addr + length))
            writable_len += length
        elif seen_writable:
            # The flag decides, not the length, as in the device.
            return f"readable descriptor {index} after a writable one"
        total += length
        if total > MAX_CHAIN_BYTES:
            return "chain longer than 2**32 - 1 bytes"
        if not flags & _NEXT:
            return WalkedChain(writable, writable_len)
        if next_index >= limit:
            return f"next {next_index} out of range"
        index = next_index


@dataclass
class QueueState:
    """The checker's record of one device queue object."""

    index: int
    queue: DeviceQueue
    last_avail: int
    used: int
    published: int
    outstanding: int = 0
    """Chains consumed and not yet completed, by count."""
    overrun: bool = False
    """Heads are no longer matched one to one for this queue: the driver
    overran the ring (see ``_account_consumed``), or a used element lies
    under another queue's used ring or a writable buffer."""
    before: int = 0
    """``published`` at the start of the current step."""
    in_flight: dict[int, list[WalkedChain]] = field(default_factory=dict)
    """Head to its chains in flight, oldest first. Within one step a head may
    be consumed, completed and consumed again (the driver re-posted it), so
    a step's consumptions are matched with its completions as a multiset."""


class InvariantChecker(CaseObserver):
    """Collects violations of the invariants in ``violations``, one line each."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.states: dict[int, QueueState] = {}
        self.driver_writes: list[Range] = []
        self.step_number = 0
        self._before: Snapshot | None = None
        self._running = False
        self._driver_ok = False
        self._interrupts: dict[int, int] = {}
        self._config = 0
        self._broken = False

    # -- hooks ------------------------------------------------------------------

    def before_step(self, run: CaseRun, step: Action) -> None:
        self.step_number += 1
        self._track_new_queues(run)
        self._before = Snapshot(run)
        self._running = run.device.running
        self._driver_ok = run.device.status.driver_ok
        self._interrupts = dict(run.interrupts.interrupts)
        self._config = run.interrupts.config_interrupts
        self._broken = run.device.error is not None
        self._completed: list[Range] = []
        for state in self.states.values():
            state.before = state.published
        self._known_before = set(self.states)
        self._ready_before = {
            key for key, state in self.states.items() if state.queue.ready
        }

    def after_step(self, run: CaseRun, step: Action) -> None:
        if step[0] == "writes":
            self.driver_writes += [(gpa, gpa + len(data)) for gpa, data in step[1]]
            return

        where = f"step {self.step_number} ({step[0]})"
        # The device may work in the step that sets DRIVER_OK: it looks at
        # restored rings at once, and may break doing so.
        started = not self._driver_ok and run.device.status.driver_ok
        self._running = self._running or started
        self._track_new_queues(run)
        live = {
            key: state for key, state in self.states.items() if not state.queue.detached
        }
        for state in live.values():
            self._account_consumed(state, f"{where} queue {state.index}")

        buffers = [
            writable
            for state in live.values()
            for chains in state.in_flight.values()
            for chain in chains
            for writable in chain.writable
        ]
        rings = {key: _used_ring(state.queue) for key, state in live.items()}
        allowed = list(buffers)
        for key, state in live.items():
            # Another queue's used ring on top of this one is written by the
            # device too, like a writable buffer there.
            others = [ring for other, ring in rings.items() if other != key]
            allowed += self._check_queue(run, state, key, buffers + others, where)
        for key, state in live.items():
            others = [ring for other, ring in rings.items() if other != key]
            covering = buffers + self._completed + others
            self._check_used_fields(run, state, covering, where)

        if not self._running:
            allowed = []
        self._check_guards(run, where)
        self._check_changes(run, allowed, where)
        self._check_notifications(run, where)

        # A reset detached these queues for good; newer ones share their rings.
        for key in [key for key, state in self.states.items() if state.queue.detached]:
            del self.states[key]

    # -- helpers ----------------------------------------------------------------

    def _fail(self, where: str, message: str) -> None:
        self.violations.append(f"{where}: {message}")

    def _track_new_queues(self, run: CaseRun) -> None:
        for index, queue in run.device.queues.items():
            if id(queue) in self.states:
                continue
            setup = run.queue_setups[index]
            self.states[id(queue)] = QueueState(
                index,
                queue,
                setup.last_avail_idx,
                setup.used_idx,
                setup.used_idx,
                before=setup.used_idx,
            )

    def _check_queue(
        self,
        run: CaseRun,
        state: QueueState,
        key: int,
        covering: list[Range],
        where: str,
    ) -> list[Range]:
        """Check one queue's used ring; return the ring fields it may write.

        ``covering`` are the ranges something else may also write. A queue
        detached by a reset in this step is not checked: it may have given
        chains back (unpop) on its way out, and it may write nothing more.
        """
        queue = state.queue
        where = f"{where} queue {state.index}"
        allowed = self._account_used(run, state, covering, where)
        started = key not in self._known_before
        if started or key in self._ready_before or queue.ready:
            allowed += _device_fields(queue)

        for head, chains in state.in_flight.items():
            if len(chains) > 1 and not state.overrun:
                self._fail(where, f"head {head} consumed again while in flight")
        state.in_flight = {
            head: chains for head, chains in state.in_flight.items() if chains
        }
        if queue.ready and not state.overrun and queue.inuse != len(state.in_flight):
            self._fail(
                where,
                f"the device has {queue.inuse} chains in flight, the checker"
                f" {len(state.in_flight)}",
            )
        return allowed

    def _account_consumed(self, state: QueueState, where: str) -> None:
        """Add the chains the device consumed in this step to those in flight."""
        queue = state.queue
        consumed = (queue.last_avail_idx - state.last_avail) & 0xFFFF
        if consumed and not self._running:
            self._fail(where, f"consumed {consumed} chains while not running")
        if consumed > 2 * queue.size:
            self._fail(where, f"consumed {consumed} chains in one step")
            consumed = 0
        elif consumed > queue.size:
            # Possible only when the driver moved avail.idx more than the
            # queue size past the device after the device last read it: the
            # device then finds entries the driver overwrote, and the checker
            # stops matching heads for this queue.
            state.overrun = True
        for offset in range(consumed):
            slot = (state.last_avail + offset) & (queue.size - 1)
            self._consume(state, slot, where)
        state.last_avail = queue.last_avail_idx
        state.outstanding += consumed

    def _account_used(
        self, run: CaseRun, state: QueueState, covering: list[Range], where: str
    ) -> list[Range]:
        """Match the used elements of this step; return the slots written.

        An element under ``covering`` may have been overwritten after the
        device wrote it, so it cannot be matched: from then on the queue's
        heads are not matched one to one (``overrun``).
        """
        queue = state.queue
        layout = queue.layout
        written = (queue.used_idx - state.used) & 0xFFFF
        published = (queue.used_idx - queue.unpublished) & 0xFFFF
        fresh = (published - state.published) & 0xFFFF
        if written > state.outstanding:
            # Counted without matching heads, so this holds on an overrun too.
            self._fail(
                where,
                f"{written} used elements written for {state.outstanding} chains"
                " consumed and not completed",
            )
        state.outstanding = max(0, state.outstanding - written)
        if written > 2 * queue.size or fresh > 2 * queue.size:
            self._fail(where, f"{written} used elements written in one step")
            written = fresh = 0
        elif written > queue.size or fresh > queue.size:
            # The same overrun: the first elements were overwritten in the
            # step, so only the last queue-size ones can be read back.
            state.overrun = True
            skipped = max(0, fresh - queue.size)
            state.published = (state.published + skipped) & 0xFFFF
            fresh -= skipped

        slots: list[Range] = []
        for offset in range(min(written, queue.size)):
            address = layout.used_elem_addr((state.used + offset) & (queue.size - 1))
            slots.append((address, address + 8))
        for offset in range(fresh):
            slot = (state.published + offset) & (queue.size - 1)
            address = layout.used_elem_addr(slot)
            if _overlaps(covering, address, 8):
                state.overrun = True
                continue
            chain = self._complete(run, state, address, where)
            if chain is not None:
                self._completed += chain.writable

        state.used = queue.used_idx
        state.published = published
        return slots

    def _consume(self, state: QueueState, slot: int, where: str) -> None:
        assert self._before is not None
        layout = state.queue.layout
        data = self._before.read(layout.avail_ring_addr(slot), 2)
        if data is None:
            self._fail(where, f"consumed avail slot {slot} outside memory")
            return
        head = int.from_bytes(data, "little")
        chain = walk_chain(self._before, layout, head, state.queue.indirect)
        if isinstance(chain, str):
            self._fail(where, f"consumed the malformed chain at head {head}: {chain}")
            chain = WalkedChain([], 0)
        state.in_flight.setdefault(head, []).append(chain)

    def _complete(
        self, run: CaseRun, state: QueueState, address: int, where: str
    ) -> WalkedChain | None:
        head, length = struct.unpack("<II", run.memory.read(address, 8))
        chains = state.in_flight.get(head)
        if not chains:
            if not state.overrun:
                message = f"used element for head {head}, which is not in flight"
                self._fail(where, message)
            return None
        chain = chains.pop(0)
        if length > chain.writable_len:
            self._fail(
                where,
                f"used len {length} for head {head} exceeds its"
                f" {chain.writable_len} writable bytes",
            )
        return chain

    def _check_used_fields(
        self, run: CaseRun, state: QueueState, buffers: list[Range], where: str
    ) -> None:
        """Check used.flags and used.idx, unless something else covers them.

        A driver may write the used ring itself, hand out a writable buffer
        that overlaps it, or place two used rings on top of each other. Then
        the fields contain what the driver or the device wrote there for
        another purpose, so there is nothing to check. used.flags is checked
        only when it changed in this step, because a buffer that covered it
        in an earlier step may have left any value there.
        """
        assert self._before is not None
        queue = state.queue
        layout = queue.layout
        published = state.published
        where = f"{where} queue {state.index}"
        flags = run.read_u16(layout.used)
        if _overlaps(buffers, layout.used, 4):
            return
        old_flags = self._before.read(layout.used, 2)
        changed = old_flags is not None and int.from_bytes(old_flags, "little") != flags
        if flags is not None and changed and not self._driver_wrote(layout.used, 2):
            allowed = (0,) if queue.event_idx else (0, 1)
            if flags not in allowed:
                self._fail(where, f"used.flags is {flags:#x}")
        before = self._before.read(layout.used_idx_addr, 2)
        after = run.read_u16(layout.used_idx_addr)
        if before is None or after is None:
            return
        if int.from_bytes(before, "little") == state.before and after != published:
            self._fail(
                where, f"used.idx is {after} in memory but {published} were published"
            )

    def _driver_wrote(self, address: int, length: int) -> bool:
        return _overlaps(self.driver_writes, address, length)

    def _check_guards(self, run: CaseRun, where: str) -> None:
        for buffer, (gpa, size) in zip(run.buffers, run.case.regions):
            if buffer[size:] != bytes([GUARD_FILL]) * GUARD_BYTES:
                self._fail(where, f"bytes after the region at {gpa:#x} changed")

    def _check_changes(self, run: CaseRun, allowed: list[Range], where: str) -> None:
        assert self._before is not None
        merged = _merge(allowed)
        for (gpa, before), region in zip(self._before.regions, run.memory.regions):
            after = bytes(region.view)
            if before == after:
                continue
            for start, end in _changed_runs(before, after, gpa):
                outside = _first_uncovered(start, end, merged)
                if outside is not None:
                    self._fail(
                        where,
                        f"the device wrote {outside:#x}, outside the used rings"
                        " and the writable buffers in flight",
                    )
                    return

    def _check_notifications(self, run: CaseRun, where: str) -> None:
        device = run.device
        interrupts = run.interrupts.interrupts
        if not self._running:
            for queue, count in interrupts.items():
                if count != self._interrupts.get(queue, 0):
                    self._fail(where, f"interrupt for queue {queue} while not running")
        config = run.interrupts.config_interrupts - self._config
        broke = device.error is not None and not self._broken
        if broke:
            if not device.status.value & DeviceStatus.DEVICE_NEEDS_RESET:
                self._fail(where, "the device broke without DEVICE_NEEDS_RESET")
            modern = bool(device.negotiated & VirtioFeature.VERSION_1)
            if config != int(modern):
                self._fail(where, f"{config} configuration interrupts at a break")
        elif config:
            self._fail(where, f"{config} configuration interrupts without a break")


def _used_ring(queue: DeviceQueue) -> Range:
    return (queue.layout.used, queue.layout.end)


def _device_fields(queue: DeviceQueue) -> list[Range]:
    """Return the used ring fields the device writes besides the elements.

    used.idx always; used.flags only without EVENT_IDX and avail_event only
    with it (2.7.10.2).
    """
    layout = queue.layout
    fields = [(layout.used_idx_addr, layout.used_idx_addr + 2)]
    if queue.event_idx:
        fields.append((layout.avail_event_addr, layout.avail_event_addr + 2))
    else:
        fields.append((layout.used, layout.used + 2))
    return fields


def _overlaps(ranges: list[Range], address: int, length: int) -> bool:
    end = address + length
    return any(start < end and address < stop for start, stop in ranges)


def _merge(ranges: list[Range]) -> list[Range]:
    merged: list[Range] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _changed_runs(before: bytes, after: bytes, base: int) -> list[Range]:
    """Return the runs of bytes that differ, as guest-physical ranges."""
    runs: list[Range] = []
    for offset in range(0, len(before), _CHUNK):
        old = before[offset : offset + _CHUNK]
        new = after[offset : offset + _CHUNK]
        if old == new:
            continue
        for i, (a, b) in enumerate(zip(old, new)):
            if a == b:
                continue
            address = base + offset + i
            if runs and runs[-1][1] == address:
                runs[-1] = (runs[-1][0], address + 1)
            else:
                runs.append((address, address + 1))
    return runs


def _first_uncovered(start: int, end: int, merged: list[Range]) -> int | None:
    """Return the first address of [start, end) outside ``merged``, or None."""
    cursor = start
    for low, high in merged:
        if high <= cursor:
            continue
        if low > cursor:
            return cursor
        cursor = high
        if cursor >= end:
            return None
    return cursor if cursor < end else None
