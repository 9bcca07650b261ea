"""Run one ring case (the JSON format in README.md) and check the invariants.

A case is a guest memory image, a queue configuration and a list of
operations: driver-side writes that poke guest memory, and one operation per
public ``DeviceQueue`` method. ``run_case`` executes them in order against a
real ``DeviceQueue`` and raises ``InvariantViolation`` when the device breaks
its contract:

- only documented errors escape: a ``DriverError`` from ``pop``, ``chains``,
  ``available`` or ``drop_all``, raised once, after which the queue is
  broken. Nothing else (``IndexError``, ``struct.error``, ``ValueError``,
  ``MemoryAccessError``, ``UsageError`` from a valid call) may escape;
- the device writes guest memory only inside the used ring;
- a broken queue pops nothing and writes nothing until ``reset``;
- the device's in-flight heads match what it handed out, and no head is
  handed out twice while in flight;
- used buffer notification decisions follow the spec rule (2.7.7.2);
- every operation finishes within ``OP_TIME_LIMIT`` seconds.

Operations that are invalid for the caller to make (``add_used`` of a head
that is not in flight, ``unpop`` past a completed chain, a write outside
guest memory) are skipped and counted, not run.

Usage: ``python fuzz/run_ring.py CASE.json...`` prints one line per case and
exits 1 if any case violates an invariant.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtio import (
    DRIVER_ERROR_KINDS,
    DeviceQueue,
    DriverError,
    GuestMemory,
    MemoryRegion,
    RingLayout,
    UsageError,
    VirtioError,
    distance16,
    need_event,
)
from virtio.layout import DESCRIPTOR_FORMAT

MAX_MEMORY_BYTES = 1 << 20
"""Largest total guest memory a case may declare; each op snapshots all of it."""
MAX_OPS = 1024
MAX_CHAINS_LIMIT = 1024
OP_TIME_LIMIT = 1.0
"""Seconds one operation may take; every walk is bounded far below this."""

DRIVER_OPS = {
    "write",
    "write_u16",
    "write_desc",
    "write_chain",
    "post",
    "set_avail_idx",
    "set_avail_flags",
    "set_used_event",
}
DEVICE_OPS = {
    "pop",
    "chains",
    "add_used",
    "add_used_all",
    "publish",
    "needs_notification",
    "enable_notification",
    "disable_notification",
    "unpop",
    "drop_all",
    "available",
    "peek",
    "reset",
    "detach",
}
RAISING_OPS = {"pop", "chains", "available", "drop_all"}
"""Device operations that may raise a DriverError on a malformed ring."""


class CaseError(ValueError):
    """The case file itself is malformed (a harness input error, not a finding)."""


class InvariantViolation(AssertionError):
    """The device broke its contract while running a case."""


@dataclass
class RunResult:
    """Outcome of one case, compared with the ``expect`` object of a case file."""

    errors: list[str] = field(default_factory=list)
    broken: str | None = None
    popped: list[int] = field(default_factory=list)
    notifications: list[bool] = field(default_factory=list)
    skipped: int = 0
    ops_run: int = 0
    used_idx: int | None = None
    last_avail_idx: int = 0


# -- case parsing ---------------------------------------------------------------------


def _int(value: Any, what: str, low: int = 0, high: int = (1 << 64) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CaseError(f"{what} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise CaseError(f"{what} {value} is outside {low}..{high}")
    return value


def build_memory(spec: dict) -> GuestMemory:
    regions = spec.get("regions", [{"gpa": 0, "size": 0x10000}])
    if not isinstance(regions, list) or not regions:
        raise CaseError("memory.regions must be a non-empty list")
    total = 0
    built = []
    for number, region in enumerate(regions):
        if not isinstance(region, dict):
            raise CaseError(f"memory.regions[{number}] must be an object")
        gpa = _int(region.get("gpa"), f"memory.regions[{number}].gpa")
        size = _int(region.get("size"), f"memory.regions[{number}].size", 1)
        total += size
        if total > MAX_MEMORY_BYTES:
            raise CaseError(f"memory is larger than {MAX_MEMORY_BYTES} bytes")
        built.append(MemoryRegion(gpa, bytearray(size)))
    try:
        return GuestMemory(built)
    except UsageError as error:
        raise CaseError(f"memory: {error}") from None


def build_layout(queue: dict) -> RingLayout:
    size = _int(queue.get("size"), "queue.size", 1, 32768)
    if size & (size - 1):
        raise CaseError(f"queue.size {size} is not a power of two")
    layout = queue.get("layout", {"packed_after": 0})
    if not isinstance(layout, dict):
        raise CaseError("queue.layout must be an object")
    if "packed_after" in layout:
        return RingLayout.packed_after(
            size, _int(layout["packed_after"], "packed_after")
        )
    if "legacy" in layout:
        return RingLayout.legacy(size, _int(layout["legacy"], "legacy"))
    return RingLayout(
        size,
        _int(layout.get("desc"), "layout.desc"),
        _int(layout.get("avail"), "layout.avail"),
        _int(layout.get("used"), "layout.used"),
    )


def load_case(path: str | Path) -> dict:
    """Read a case file; raises CaseError if it is not a JSON object."""
    try:
        case = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise CaseError(f"{path}: {error}") from None
    if not isinstance(case, dict):
        raise CaseError(f"{path}: a case is a JSON object")
    return case


# -- the runner -------------------------------------------------------------------------


class RingRunner:
    """Executes one case and keeps the model the invariants compare against."""

    def __init__(self, case: dict, skip_ops: frozenset[str] = frozenset()) -> None:
        self.skip_ops = skip_ops

        queue = case.get("queue")
        if not isinstance(queue, dict):
            raise CaseError("the case needs a queue object")
        self.ops = case.get("ops", [])
        if not isinstance(self.ops, list) or len(self.ops) > MAX_OPS:
            raise CaseError(f"ops must be a list of at most {MAX_OPS} operations")
        self.memory = build_memory(case.get("memory", {}))
        self.layout = build_layout(queue)
        self.event_idx = bool(queue.get("event_idx", False))
        self.notify_on_empty = bool(queue.get("notify_on_empty", False))
        self.result = RunResult()

        for number, write in enumerate(case.get("init", [])):
            if (
                not isinstance(write, dict)
                or write.get("op", "write") not in DRIVER_OPS
            ):
                raise CaseError(f"init[{number}] is not a driver write")
            self.apply_driver_op(write)

        self.device = DeviceQueue(
            self.memory,
            self.layout,
            index=_int(queue.get("index", 0), "queue.index", 0, 0xFFFF),
            event_idx=self.event_idx,
            indirect=bool(queue.get("indirect", False)),
            notify_on_empty=self.notify_on_empty,
            last_avail_idx=_int(
                queue.get("last_avail_idx", 0), "last_avail_idx", 0, 0xFFFF
            ),
            used_idx=_int(queue.get("used_idx", 0), "used_idx", 0, 0xFFFF),
        )
        self.used_range = (self.layout.used, self.layout.used + self.layout.used_bytes)
        self.forget()

    def forget(self) -> None:
        """Reset the model, as after DeviceQueue.reset."""
        self.in_flight: dict[int, int] = {}  # head -> writable length
        self.pop_history: list[int] = []
        self.broken = False
        self.published = self.device.used_idx
        self.signalled_valid = False
        self.signalled = self.device.used_idx

    # -- memory helpers -----------------------------------------------------------

    def snapshot(self) -> list[bytes]:
        return [bytes(region.view) for region in self.memory.regions]

    def check_writes(self, before: list[bytes], name: str, was_broken: bool) -> None:
        """Raise unless every changed byte lies inside the used ring.

        A queue that was already broken or detached when the operation began
        must write nothing at all (a fault may still publish the used
        elements completed before it, inside the operation that raises).
        """
        low, high = self.used_range
        for region, old in zip(self.memory.regions, before):
            new = bytes(region.view)
            if new == old:
                continue
            for offset in _changed_offsets(old, new):
                address = region.gpa + offset
                if was_broken and not name.endswith("reset"):
                    raise InvariantViolation(
                        f"{name}: a broken queue wrote guest memory at {address:#x}"
                    )
                if not low <= address < high:
                    raise InvariantViolation(
                        f"{name}: the device wrote {address:#x}, outside the used"
                        f" ring {low:#x}..{high:#x}"
                    )

    def read_u16(self, address: int) -> int | None:
        if not self.memory.contains(address, 2):
            return None
        return int.from_bytes(self.memory.read(address, 2), "little")

    def write(self, address: int, data: bytes) -> None:
        if self.memory.contains(address, len(data)):
            self.memory.write(address, data)
        else:
            self.result.skipped += 1

    # -- driver operations ----------------------------------------------------------

    def apply_driver_op(self, op: dict) -> None:
        kind = op.get("op", "write")
        layout = self.layout
        if kind == "write":
            try:
                data = bytes.fromhex(op.get("hex", ""))
            except ValueError:
                raise CaseError(f"write: invalid hex {op.get('hex')!r}") from None
            self.write(_int(op.get("addr"), "write.addr"), data)
        elif kind == "write_u16":
            value = _int(op.get("value"), "write_u16.value", 0, 0xFFFF)
            self.write(
                _int(op.get("addr"), "write_u16.addr"), value.to_bytes(2, "little")
            )
        elif kind == "write_desc":
            if "index" in op:
                index = _int(op["index"], "write_desc.index", 0, layout.size - 1)
                address = layout.desc + 16 * index
            else:
                address = _int(op.get("addr"), "write_desc.addr")
            fields = op.get("desc")
            if not isinstance(fields, list) or len(fields) != 4:
                raise CaseError("write_desc.desc is [addr, len, flags, next]")
            addr = _int(fields[0], "desc addr")
            length = _int(fields[1], "desc len", 0, 0xFFFF_FFFF)
            flags = _int(fields[2], "desc flags", 0, 0xFFFF)
            next_index = _int(fields[3], "desc next", 0, 0xFFFF)
            self.write(address, DESCRIPTOR_FORMAT.pack(addr, length, flags, next_index))
        elif kind == "write_chain":
            self.write_chain(op)
        elif kind == "post":
            self.post(op.get("heads", []))
        elif kind == "set_avail_idx":
            value = _int(op.get("value"), "set_avail_idx.value", 0, 0xFFFF)
            self.write(layout.avail_idx_addr, value.to_bytes(2, "little"))
        elif kind == "set_avail_flags":
            value = _int(op.get("value"), "set_avail_flags.value", 0, 0xFFFF)
            self.write(layout.avail, value.to_bytes(2, "little"))
        elif kind == "set_used_event":
            value = _int(op.get("value"), "set_used_event.value", 0, 0xFFFF)
            self.write(layout.used_event_addr, value.to_bytes(2, "little"))
        else:
            raise CaseError(f"unknown driver operation {kind!r}")

    def write_chain(self, op: dict) -> None:
        """Write ``count`` table entries from ``index``, each linked to the next."""
        size = self.layout.size
        first = _int(op.get("index", 0), "write_chain.index", 0, size - 1)
        count = _int(op.get("count"), "write_chain.count", 1, size - first)
        fields = op.get("desc")
        if not isinstance(fields, list) or len(fields) != 3:
            raise CaseError("write_chain.desc is [addr, len, flags]")
        addr = _int(fields[0], "chain addr")
        length = _int(fields[1], "chain len", 0, 0xFFFF_FFFF)
        flags = _int(fields[2], "chain flags", 0, 0xFFFF)
        table = bytearray()
        for index in range(first, first + count):
            last = index == first + count - 1
            entry_flags = flags & ~1 if last else flags | 1
            table += DESCRIPTOR_FORMAT.pack(
                addr, length, entry_flags, 0 if last else index + 1
            )
        self.write(self.layout.desc + 16 * first, bytes(table))

    def post(self, heads: list) -> None:
        """Write heads into the next avail slots and advance avail.idx."""
        if not isinstance(heads, list):
            raise CaseError("post.heads must be a list")
        layout = self.layout
        avail_idx = self.read_u16(layout.avail_idx_addr)
        if avail_idx is None:
            self.result.skipped += 1
            return
        for head in heads:
            head = _int(head, "post head", 0, 0xFFFF)
            slot = avail_idx & (layout.size - 1)
            self.write(layout.avail_ring_addr(slot), head.to_bytes(2, "little"))
            avail_idx = (avail_idx + 1) & 0xFFFF
        self.write(layout.avail_idx_addr, avail_idx.to_bytes(2, "little"))

    # -- device operations ------------------------------------------------------------

    def run(self) -> RunResult:
        for number, op in enumerate(self.ops):
            if not isinstance(op, dict) or "op" not in op:
                raise CaseError(f"ops[{number}] must be an object with an 'op' key")
            name = op["op"]
            if name in DRIVER_OPS:
                self.apply_driver_op(op)
            elif name in DEVICE_OPS:
                self.run_device_op(number, name, op)
            else:
                raise CaseError(f"ops[{number}]: unknown operation {name!r}")
        self.result.broken = self.device.broken.kind if self.device.broken else None
        self.result.used_idx = self.read_u16(self.layout.used_idx_addr)
        self.result.last_avail_idx = self.device.last_avail_idx
        return self.result

    def run_device_op(self, number: int, name: str, op: dict) -> None:
        action = None if name in self.skip_ops else self.prepare(name, op)
        if action is None:
            self.result.skipped += 1
            return
        label = f"ops[{number}] {name}"
        was_broken = self.broken
        before = self.snapshot()
        started = time.perf_counter()
        try:
            action()
        except DriverError as error:
            self.on_driver_error(label, name, error)
        except VirtioError as error:
            raise InvariantViolation(f"{label}: unexpected {error!r}") from error
        except Exception as error:  # noqa: BLE001 - any other escape is a finding
            raise InvariantViolation(
                f"{label}: {type(error).__name__}: {error}"
            ) from error
        elapsed = time.perf_counter() - started
        if elapsed > OP_TIME_LIMIT:
            raise InvariantViolation(f"{label} took {elapsed:.2f} s")
        self.result.ops_run += 1
        self.check_writes(before, label, was_broken)
        self.check_model(label)

    def prepare(self, name: str, op: dict) -> Callable[[], None] | None:
        """Return the call for a device operation, or None to skip an invalid one."""
        device = self.device
        if name == "pop":
            return self.do_pop
        if name == "chains":
            limit = _int(op.get("limit", 1), "chains.limit", 0, MAX_CHAINS_LIMIT)
            return lambda: self.do_chains(limit)
        if name == "add_used":
            head = _int(op.get("head"), "add_used.head", 0, 0xFFFF)
            length = _int(op.get("len", 0), "add_used.len", 0, (1 << 64) - 1)
            if head not in self.in_flight or length > 0xFFFF_FFFF:
                return None
            return lambda: self.do_add_used(head, length)

        if name == "add_used_all":
            return self.do_add_used_all
        if name == "publish":
            return self.do_publish
        if name == "needs_notification":
            return self.do_needs_notification
        if name == "enable_notification":
            return self.do_enable
        if name == "disable_notification":
            return device.disable_notification

        if name == "unpop":
            count = _int(op.get("count", 1), "unpop.count", 0, 0xFFFF)
            if count > self.unpoppable():
                return None
            return lambda: self.do_unpop(count)

        if name == "drop_all":
            return self.do_drop_all
        if name == "available":
            return self.do_available
        if name == "peek":
            count = _int(op.get("count", 1), "peek.count", 0, MAX_CHAINS_LIMIT)
            return lambda: self.do_peek(count)
        if name == "reset":
            return self.do_reset
        if name == "detach":
            if not hasattr(device, "detach"):
                return None
            return self.do_detach
        return None

    def on_driver_error(self, label: str, name: str, error: DriverError) -> None:
        if name not in RAISING_OPS:
            raise InvariantViolation(f"{label} raised {error!r}") from error
        if self.broken:
            raise InvariantViolation(f"{label}: a broken queue raised again: {error!r}")
        if DRIVER_ERROR_KINDS.get(error.kind) is not type(error):
            raise InvariantViolation(f"{label}: undocumented error kind {error.kind!r}")
        if self.device.broken is not error:
            raise InvariantViolation(
                f"{label}: raised {error!r} but the queue is not broken"
            )
        self.result.errors.append(error.kind)
        self.broken = True
        self.in_flight.clear()

    # -- individual operations --------------------------------------------------------

    def take(self, chain) -> None:
        if chain.head in self.in_flight:
            raise InvariantViolation(
                f"head {chain.head} handed out twice while in flight"
            )
        if chain.readable_len != sum(len(view) for view in chain.readable):
            raise InvariantViolation(
                f"head {chain.head}: readable_len does not match views"
            )
        if chain.writable_len != sum(len(view) for view in chain.writable):
            raise InvariantViolation(
                f"head {chain.head}: writable_len does not match views"
            )
        if chain.readable_len + chain.writable_len > 0xFFFF_FFFF:
            raise InvariantViolation(f"head {chain.head}: chain longer than 2**32 - 1")
        self.in_flight[chain.head] = chain.writable_len
        self.pop_history.append(chain.head)
        self.result.popped.append(chain.head)

    def do_pop(self) -> None:
        chain = self.device.pop()
        if chain is not None:
            if self.broken:
                raise InvariantViolation("a broken queue popped a chain")
            self.take(chain)

    def do_chains(self, limit: int) -> None:
        count = 0
        for chain in self.device.chains(limit):
            if self.broken:
                raise InvariantViolation("a broken queue popped a chain")
            self.take(chain)
            count += 1
            if count > max(limit, 0):
                raise InvariantViolation(f"chains({limit}) yielded {count} chains")

    def do_add_used(self, head: int, length: int) -> None:
        self.device.add_used(head, length)
        del self.in_flight[head]

    def do_add_used_all(self) -> None:
        for head, length in list(self.in_flight.items()):
            self.device.add_used(head, length)
            del self.in_flight[head]

    def do_publish(self) -> None:
        device = self.device
        pending = device.unpublished
        old = self.published
        decision = device.publish()
        if self.broken or not device.ready:
            if decision:
                raise InvariantViolation("a broken or detached queue asked to notify")
            return
        if not pending:
            if decision:
                raise InvariantViolation("publish with nothing pending asked to notify")
            return
        new = self.read_u16(self.layout.used_idx_addr)
        if new != device.used_idx:
            raise InvariantViolation(f"used.idx is {new}, expected {device.used_idx}")
        self.published = new
        self.check_decision(decision, old, new, publishing=True)
        self.result.notifications.append(decision)

    def do_needs_notification(self) -> None:
        ready = self.device.ready
        decision = self.device.needs_notification()
        if not ready:
            if decision:
                raise InvariantViolation(
                    "needs_notification on a stopped queue is True"
                )
            return
        # NOTE: a standalone call decides over used_idx, which counts used
        # elements not yet published; the model follows that reference.
        self.check_decision(
            decision, self.signalled, self.device.used_idx, publishing=False
        )

    def check_decision(
        self, decision: bool, old: int, new: int, publishing: bool
    ) -> None:
        """Compare a notification decision with the rule of 2.7.7.2.

        ``old`` is used.idx before the publish, ``new`` after it. With
        EVENT_IDX the window starts at the index of the previous decision.
        """
        if self.notify_on_empty:
            # NOTE: the NOTIFY_ON_EMPTY override is not modelled; only the
            # event index reference is followed.
            self.signalled, self.signalled_valid = new, True
            return
        avail_flags = self.read_u16(self.layout.avail)
        used_event = self.read_u16(self.layout.used_event_addr)
        if self.event_idx:
            reference = self.signalled
            # A window of completions that passes the reference again leaves
            # it meaningless in 16 bits, so the device notifies once.
            if publishing and _as_s16(new - reference) < distance16(new, old):
                self.signalled_valid = False
            expected = not self.signalled_valid or need_event(
                used_event, new, reference
            )
            self.signalled, self.signalled_valid = new, True
        else:
            expected = not avail_flags & 1
        if decision is not expected:
            raise InvariantViolation(
                f"notification decision {decision}, spec rule gives {expected}"
                f" (old {old}, new {new}, used_event {used_event}, flags {avail_flags})"
            )

    def do_enable(self) -> None:
        ready = self.device.ready
        slipped_in = self.device.enable_notification()
        if not ready:
            if slipped_in:
                raise InvariantViolation(
                    "enable_notification on a stopped queue is True"
                )
            return
        avail_idx = self.read_u16(self.layout.avail_idx_addr)
        if slipped_in is not (avail_idx != self.device.last_avail_idx):
            raise InvariantViolation(f"enable_notification returned {slipped_in}")

    def unpoppable(self) -> int:
        count = 0
        seen: set[int] = set()
        for head in reversed(self.pop_history):
            if head in seen or head not in self.in_flight:
                break
            seen.add(head)
            count += 1
        return count

    def do_unpop(self, count: int) -> None:
        self.device.unpop(count)
        for head in self.pop_history[len(self.pop_history) - count :]:
            del self.in_flight[head]
        del self.pop_history[len(self.pop_history) - count :]

    def do_drop_all(self) -> None:
        before = set(self.in_flight)
        try:
            dropped = self.device.drop_all()
        finally:
            # drop_all pops and completes; chains it completed are not in flight.
            current = set(self.device.in_flight_heads())
            for head in list(self.in_flight):
                if head not in current:
                    del self.in_flight[head]
        if not self.broken and current != before:
            raise InvariantViolation(
                "drop_all changed which earlier chains are in flight"
            )
        # The dropped chains were popped and completed: unpop cannot go past them.
        self.pop_history.extend([-1] * dropped)
        if dropped < 0 or dropped > MAX_CHAINS_LIMIT * 64:
            raise InvariantViolation(f"drop_all returned {dropped}")

    def do_available(self) -> None:
        count = self.device.available()
        if self.broken:
            if count:
                raise InvariantViolation("a broken queue reported chains available")
            return
        if not 0 <= count <= self.layout.size:
            raise InvariantViolation(f"available() returned {count}")

    def do_peek(self, count: int) -> None:
        state = (self.device.last_avail_idx, self.device.inuse, self.device.broken)
        listed = list(self.device.peek(count))
        if len(listed) > count:
            raise InvariantViolation(f"peek({count}) listed {len(listed)} chains")
        after = (self.device.last_avail_idx, self.device.inuse, self.device.broken)
        if after != state:
            raise InvariantViolation("peek changed the queue state")

    def do_reset(self) -> None:
        self.device.reset()
        self.forget()

    def do_detach(self) -> None:
        self.device.detach()
        self.in_flight.clear()
        self.broken = True

    # -- model checks -------------------------------------------------------------------

    def check_model(self, label: str) -> None:
        device = self.device
        heads = sorted(device.in_flight_heads())
        if heads != sorted(self.in_flight):
            raise InvariantViolation(
                f"{label}: device has heads {heads} in flight, model has"
                f" {sorted(self.in_flight)}"
            )
        if device.inuse != len(self.in_flight):
            raise InvariantViolation(
                f"{label}: inuse {device.inuse}, model {len(self.in_flight)}"
            )
        if device.inuse > device.size:
            raise InvariantViolation(
                f"{label}: inuse {device.inuse} exceeds the queue size"
            )
        if self.broken and device.ready:
            raise InvariantViolation(f"{label}: queue reports ready after breaking")


def _as_s16(value: int) -> int:
    value &= 0xFFFF
    return value - 0x10000 if value & 0x8000 else value


def _changed_offsets(old: bytes, new: bytes) -> list[int]:
    """Return the offsets where two equal-length byte strings differ, coarsely."""
    offsets = []
    chunk = 4096
    for start in range(0, len(old), chunk):
        if old[start : start + chunk] != new[start : start + chunk]:
            end = min(start + chunk, len(old))
            offsets.extend(i for i in range(start, end) if old[i] != new[i])
    return offsets


def run_case(case: dict, skip_ops: frozenset[str] = frozenset()) -> RunResult:
    """Run one case; raise InvariantViolation on a finding, CaseError on bad input.

    ``skip_ops`` names device operations to skip, so a fuzzer can search past
    a finding that is already known.
    """
    return RingRunner(case, skip_ops).run()


def main(argv: list[str]) -> int:
    status = 0
    for path in argv:
        try:
            result = run_case(load_case(path))
        except InvariantViolation as error:
            print(f"{path}: VIOLATION: {error}")
            status = 1
            continue
        except CaseError as error:
            print(f"{path}: invalid case: {error}")
            status = 1
            continue
        print(
            f"{path}: ok, {result.ops_run} ops run, {result.skipped} skipped,"
            f" errors {result.errors}, broken {result.broken}"
        )
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
