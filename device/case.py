"""Replayable cases: one JSON file drives the device through a scenario.

A case is one JSON object in the format ``virtio-net-case/1``. It plays the
driver: it lays out guest memory, writes descriptors and rings, brings the
device up with a feature set and then runs actions (kicks, received frames,
virtual time, more writes, status writes, resets). ``run_case`` returns what
the device did; ``case_command`` is ``virtio-net-emu case FILE [--json]``.

Top-level fields:

- ``format``: ``"virtio-net-case/1"``; ``description``: free text.
- ``features``: names of the features the driver accepts, spelled as in the
  spec or the Linux headers (``VIRTIO_F_VERSION_1``, ``VIRTIO_RING_F_EVENT_IDX``,
  ``VIRTIO_NET_F_MRG_RXBUF`` or just ``MRG_RXBUF``).
- ``memory``: guest RAM regions, ``[{"gpa": 0, "size": 1048576}, ...]``.
- ``queues``: by virtqueue index as a string (``"0"`` receiveq1, ``"1"``
  transmitq1, ``"2"`` controlq): ``{"size", "desc", "avail", "used"}`` and
  optionally ``last_avail_idx`` and ``used_idx`` (the device's starting
  indices, default 0) and ``enabled`` (default true). Size 0 or
  ``enabled: false`` is a queue the driver never enabled.
- ``writes``: the driver's writes before the device starts, in order. Each
  is ``{"gpa", "desc": [[addr, len, flags, next], ...]}``, with flags a
  string of the letters N, W and I or a number, or ``{"gpa", "u16": [...]}``,
  ``"u32"``, ``"u64"``, or ``{"gpa", "hex": "..."}``.
- ``actions``: in order, each one of ``{"kick": QUEUE}``, ``{"rx": "HEX"}``
  (the backend delivers a frame; optional ``"header": "HEX"`` is the
  backend's virtio_net_hdr and ``"pad_to": N`` pads the frame with zeros),
  ``{"advance_us": N}`` (virtual time, so timers fire), ``{"writes": [...]}``,
  ``{"status": N}`` (a driver write of the status byte), ``{"reset": true}``
  and ``{"queues": {...}}`` (new queue set-up for the next DRIVER_OK). Any
  action may carry ``"repeat": N``.
- ``status``: the status the driver brings the device to before the actions,
  default 15 (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK); ``tx_mode``
  (default ``"immediate"``), ``tx_burst``, ``mtu`` and ``hold_limit`` set up
  the device.
- ``expect``: what the run must show (see ``EXPECT_KEYS``). The runner
  ignores it; ``case_command`` compares it with the result.

The runner acts as the driver does around status writes. Before a write
that sets FEATURES_OK (or DRIVER_OK without it, as a legacy driver does) it
writes the driver features; before a write that sets DRIVER_OK it hands the
device the guest memory and sets up every enabled queue of ``queues``. So
after ``{"reset": true}`` (or ``{"status": 0}``) a case brings the device
back with ``{"status": 15}``, and the queues start again from their set-up
indices. The initial bring-up writes 1, 3, 11 and then ``status``, and stops
when FEATURES_OK does not stick (the device refused the features, 2.2.2).

The backend records the frames the device sends. It stands for a TAP with
offloads: the device offers its full feature set (``DEFAULT_OFFER``) and
passes each virtio_net_hdr on, so ``sent`` shows frames as the driver wrote
them.

Numbers may be JSON integers or strings such as ``"0x1000"``.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.loopback import LoopbackBackend
from virtio import (
    DeviceQueue,
    DeviceStatus,
    GuestMemory,
    MemoryAccessError,
    MemoryRegion,
    RingLayout,
    StatusTransitionError,
    UsageError,
)
from virtio.layout import DESCRIPTOR_FORMAT

from .clock import NS_PER_US, VirtualClock
from .features import feature_from_name
from .net_device import VirtioNetDevice
from .notifier import CallbackInterrupt
from .tx_policy import TxMode

__all__ = [
    "FORMAT",
    "CaseError",
    "Case",
    "QueueSetup",
    "CaseRun",
    "EXPECT_KEYS",
    "load_case",
    "parse_case",
    "run_case",
    "case_command",
    "format_summary",
]

FORMAT = "virtio-net-case/1"
MAX_MEMORY = 256 << 20
"""Largest total guest memory a case may ask for, in bytes."""
MAX_REPEAT = 100_000
GUARD_BYTES = 4096
"""Bytes after each region's backing buffer, filled with ``GUARD_FILL``, that
no access through the region may change."""
GUARD_FILL = 0xA5
STATUS_UP = (
    DeviceStatus.ACKNOWLEDGE
    | DeviceStatus.DRIVER
    | DeviceStatus.FEATURES_OK
    | DeviceStatus.DRIVER_OK
)
_FLAG_LETTERS = {"N": 1, "W": 2, "I": 4}
_TOP_KEYS = {
    "format",
    "description",
    "features",
    "memory",
    "queues",
    "writes",
    "actions",
    "status",
    "tx_mode",
    "tx_burst",
    "mtu",
    "hold_limit",
    "expect",
}
EXPECT_KEYS = {
    "status": "the status byte at the end",
    "error_kind": "kind of the violation that broke the device, or null",
    "error_queue": "queue of that violation",
    "sent": "frames handed to the backend, hex, header removed",
    "sent_len": "lengths of those frames",
    "used": "per queue: idx and/or ring, as in the output",
    "interrupts": "per queue and config; a key left out means 0",
    "dropped": "reason to count; a reason left out means 0",
    "held": "received frames still held for lack of RX buffers",
    "memory": "list of {gpa, hex}: guest memory contents at the end",
}


class CaseError(ValueError):
    """The case file itself is invalid: bad JSON, a missing or wrong field."""


@dataclass(frozen=True)
class QueueSetup:
    """One queue's configuration as the driver writes it: layout and start indices."""

    layout: RingLayout | None
    last_avail_idx: int = 0
    used_idx: int = 0


Write = tuple[int, bytes]
Action = tuple


@dataclass
class Case:
    """A parsed, validated case."""

    description: str
    features: int
    regions: list[tuple[int, int]]
    queues: dict[int, QueueSetup]
    writes: list[Write]
    actions: list[Action]
    status: int = int(STATUS_UP)
    tx_mode: str = "immediate"
    tx_burst: int | None = None
    mtu: int = 1500
    hold_limit: int | None = None
    expect: dict[str, Any] = field(default_factory=dict)


# -- parsing ------------------------------------------------------------------


def _number(value: Any, what: str, low: int = 0, high: int = (1 << 64) - 1) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise CaseError(f"{what}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CaseError(f"{what}: expected a number, got {value!r}")
    if not low <= value <= high:
        raise CaseError(f"{what}: {value} is outside {low}..{high}")
    return value


def _field(data: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in data:
        raise CaseError(f"{what}: missing field {key!r}")
    return data[key]


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise CaseError(f"{what}: expected a hex string, got {value!r}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise CaseError(f"{what}: {value[:40]!r} is not valid hex") from None


def _flags(value: Any, what: str) -> int:
    if not isinstance(value, str):
        return _number(value, what, 0, 0xFFFF)
    flags = 0
    for letter in value.upper():
        if letter not in _FLAG_LETTERS:
            raise CaseError(f"{what}: unknown flag letter {letter!r}; use N, W, I")
        flags |= _FLAG_LETTERS[letter]
    return flags


def _descriptors(entries: Any, what: str) -> bytes:
    if not isinstance(entries, list):
        raise CaseError(f"{what}: expected a list of [addr, len, flags, next]")
    data = bytearray()
    for position, entry in enumerate(entries):
        where = f"{what} entry {position}"
        if not isinstance(entry, list) or len(entry) != 4:
            raise CaseError(f"{where}: expected [addr, len, flags, next]")
        data += DESCRIPTOR_FORMAT.pack(
            _number(entry[0], f"{where} addr"),
            _number(entry[1], f"{where} len", 0, 0xFFFF_FFFF),
            _flags(entry[2], f"{where} flags"),
            _number(entry[3], f"{where} next", 0, 0xFFFF),
        )
    return bytes(data)


_WORDS = {"u16": ("<H", 0xFFFF), "u32": ("<I", 0xFFFF_FFFF), "u64": ("<Q", None)}


def _write(entry: Any, what: str) -> Write:
    if not isinstance(entry, dict):
        raise CaseError(f"{what}: expected an object with gpa and data")
    gpa = _number(_field(entry, "gpa", what), f"{what} gpa")
    kinds = [key for key in ("desc", "u16", "u32", "u64", "hex") if key in entry]
    if len(kinds) != 1:
        raise CaseError(f"{what}: give exactly one of desc, u16, u32, u64, hex")
    kind = kinds[0]
    value = entry[kind]
    if kind == "desc":
        return gpa, _descriptors(value, f"{what} desc")
    if kind == "hex":
        return gpa, _hex(value, f"{what} hex")
    if not isinstance(value, list):
        raise CaseError(f"{what} {kind}: expected a list of numbers")
    fmt, high = _WORDS[kind]
    high = high if high is not None else (1 << 64) - 1
    data = b"".join(
        struct.pack(fmt, _number(item, f"{what} {kind}[{i}]", 0, high))
        for i, item in enumerate(value)
    )
    return gpa, data


def _writes(entries: Any, what: str) -> list[Write]:
    if not isinstance(entries, list):
        raise CaseError(f"{what}: expected a list of writes")
    return [_write(entry, f"{what}[{i}]") for i, entry in enumerate(entries)]


def _regions(entries: Any) -> list[tuple[int, int]]:
    if not isinstance(entries, list) or not entries:
        raise CaseError("memory: expected a non-empty list of {gpa, size}")
    regions = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CaseError(f"memory[{i}]: expected an object with gpa and size")
        gpa = _number(_field(entry, "gpa", f"memory[{i}]"), f"memory[{i}] gpa")
        size = _number(_field(entry, "size", f"memory[{i}]"), f"memory[{i}] size", 1)
        regions.append((gpa, size))
    regions.sort()
    for (gpa, size), (next_gpa, _) in zip(regions, regions[1:]):
        if gpa + size > next_gpa:
            raise CaseError(f"memory: region at {gpa:#x} overlaps {next_gpa:#x}")
    total = sum(size for _, size in regions)
    if total > MAX_MEMORY:
        raise CaseError(f"memory: {total} bytes in all, more than {MAX_MEMORY}")
    if regions[-1][0] + regions[-1][1] > 1 << 64:
        raise CaseError("memory: the last region ends beyond 2**64")
    return regions


def _queue(index: int, entry: Any) -> QueueSetup:
    what = f"queues[{index}]"
    if not isinstance(entry, dict):
        raise CaseError(f"{what}: expected an object with size, desc, avail, used")
    size = _number(_field(entry, "size", what), f"{what} size", 0, 32768)
    start = (
        _number(entry.get("last_avail_idx", 0), f"{what} last_avail_idx", 0, 0xFFFF),
        _number(entry.get("used_idx", 0), f"{what} used_idx", 0, 0xFFFF),
    )
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise CaseError(f"{what} enabled: expected true or false")
    if size == 0 or not enabled:
        return QueueSetup(None, *start)
    if size & (size - 1):
        raise CaseError(f"{what} size: {size} is not a power of two")
    layout = RingLayout(
        size,
        _number(_field(entry, "desc", what), f"{what} desc"),
        _number(_field(entry, "avail", what), f"{what} avail"),
        _number(_field(entry, "used", what), f"{what} used"),
    )
    return QueueSetup(layout, *start)


def _queues(entries: Any, what: str = "queues") -> dict[int, QueueSetup]:
    if not isinstance(entries, dict):
        raise CaseError(f'{what}: expected an object such as {{"1": {{...}}}}')
    queues = {}
    for key, entry in entries.items():
        index = _number(key, f"{what} key", 0, 0xFFFF)
        queues[index] = _queue(index, entry)
    return queues


_ACTION_KEYS = {
    "kick": set(),
    "rx": {"header", "pad_to"},
    "advance_us": set(),
    "writes": set(),
    "status": set(),
    "reset": set(),
    "queues": set(),
}


def _action(entry: Any, what: str) -> list[Action]:
    if not isinstance(entry, dict):
        raise CaseError(f"{what}: expected an object")
    repeat = _number(entry.get("repeat", 1), f"{what} repeat", 1, MAX_REPEAT)
    kinds = [key for key in _ACTION_KEYS if key in entry]
    if len(kinds) > 1:
        raise CaseError(f"{what}: one action per object, got {kinds}")
    if kinds:
        extra = set(entry) - {kinds[0], "repeat"} - _ACTION_KEYS[kinds[0]]
        if extra:
            raise CaseError(f"{what}: unknown fields {sorted(extra)}")
    if "kick" in entry:
        action = ("kick", _number(entry["kick"], f"{what} kick", 0, 0xFFFF_FFFF))
    elif "rx" in entry:
        frame = _hex(entry["rx"], f"{what} rx")
        pad_to = _number(entry.get("pad_to", 0), f"{what} pad_to", 0, 1 << 20)
        frame += bytes(max(0, pad_to - len(frame)))
        header = None
        if "header" in entry:
            header = _hex(entry["header"], f"{what} header")
            if len(header) < 10:
                raise CaseError(f"{what} header: {len(header)} bytes, at least 10")
        action = ("rx", header, frame)
    elif "advance_us" in entry:
        action = ("advance_us", _number(entry["advance_us"], f"{what} advance_us"))
    elif "writes" in entry:
        action = ("writes", _writes(entry["writes"], f"{what} writes"))
    elif "status" in entry:
        action = ("status", _number(entry["status"], f"{what} status", 0, 0xFF))
    elif "reset" in entry:
        if entry["reset"] is not True:
            raise CaseError(f"{what} reset: expected true")
        action = ("reset",)
    elif "queues" in entry:
        action = ("queues", _queues(entry["queues"], f"{what} queues"))
    else:
        raise CaseError(
            f"{what}: unknown action {sorted(entry)}; use kick, rx, advance_us,"
            " writes, status, reset or queues"
        )
    return [action] * repeat


def parse_case(data: Any) -> Case:
    """Validate a case object and return it parsed.

    Raises ``CaseError`` naming the first problem.
    """
    if not isinstance(data, dict):
        raise CaseError("a case is one JSON object")
    if data.get("format") != FORMAT:
        raise CaseError(f"format: expected {FORMAT!r}, got {data.get('format')!r}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise CaseError(f"unknown top-level fields {sorted(unknown)}")
    names = data.get("features", [])
    if not isinstance(names, list):
        raise CaseError("features: expected a list of feature names")
    features = 0
    for name in names:
        try:
            features |= feature_from_name(str(name))
        except ValueError as error:
            raise CaseError(f"features: {error}") from None
    actions_data = data.get("actions", [])
    if not isinstance(actions_data, list):
        raise CaseError("actions: expected a list")
    actions: list[Action] = []
    for i, entry in enumerate(actions_data):
        actions += _action(entry, f"actions[{i}]")
    tx_mode = data.get("tx_mode", "immediate")
    try:
        TxMode(tx_mode)
    except ValueError:
        modes = ", ".join(mode.value for mode in TxMode)
        raise CaseError(f"tx_mode: unknown mode {tx_mode!r}; use {modes}") from None
    expect = data.get("expect", {})
    if not isinstance(expect, dict) or set(expect) - set(EXPECT_KEYS):
        raise CaseError(f"expect: an object with keys among {sorted(EXPECT_KEYS)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise CaseError("description: expected a string")
    regions = _regions(_field(data, "memory", "case"))
    writes = _writes(data.get("writes", []), "writes")
    _check_writes_inside(regions, writes, "writes")
    for i, action in enumerate(actions):
        if action[0] == "writes":
            _check_writes_inside(regions, action[1], f"actions[{i}] writes")
    return Case(
        description=description,
        features=features,
        regions=regions,
        queues=_queues(data.get("queues", {})),
        writes=writes,
        actions=actions,
        status=_number(data.get("status", int(STATUS_UP)), "status", 0, 0xFF),
        tx_mode=tx_mode,
        tx_burst=_optional(data, "tx_burst", 1, 1 << 20),
        mtu=_number(data.get("mtu", 1500), "mtu", 68, 65535),
        hold_limit=_optional(data, "hold_limit", 0, 1 << 20),
        expect=expect,
    )


def _check_writes_inside(
    regions: list[tuple[int, int]], writes: list[Write], what: str
) -> None:
    """Raise ``CaseError`` for a driver write that is not inside guest memory.

    A write may span adjacent regions.
    """
    for i, (gpa, data) in enumerate(writes):
        cursor, end = gpa, gpa + len(data)
        for start, size in regions:
            if start <= cursor < start + size:
                cursor = min(end, start + size)
        if cursor < end:
            raise CaseError(
                f"{what}[{i}]: {len(data)} bytes at {gpa:#x} are not all inside"
                " guest memory"
            )


def _optional(data: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    if key not in data:
        return None
    return _number(data[key], key, low, high)


def load_case(source: str | Path | Mapping[str, Any]) -> Case:
    """Read and parse a case from a path or an already decoded object.

    Raises ``CaseError`` for a file that cannot be read, is not JSON or is
    not a valid case.
    """
    if isinstance(source, Mapping):
        return parse_case(dict(source))
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as error:
        raise CaseError(f"cannot read {source}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise CaseError(
            f"not a JSON text file (byte {error.object[error.start]:#04x} at offset"
            f" {error.start} is not UTF-8)"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CaseError(f"not valid JSON: {error}") from None
    return parse_case(data)


# -- running ------------------------------------------------------------------


class CaseObserver:
    """Hooks around each step of a run; the invariant checker is one."""

    def before_step(self, run: CaseRun, step: Action) -> None:
        """Called before a step changes anything."""

    def after_step(self, run: CaseRun, step: Action) -> None:
        """Called after the step and after the run recorded its used entries."""


@dataclass
class TrackedQueue:
    """One device queue object and the used entries already recorded for it."""

    index: int
    queue: DeviceQueue
    published: int


class CaseBackend(LoopbackBackend):
    """The backend of a replay: it records frames with their header, as a TAP
    with offloads gets them, so the device offers and passes on the offloads."""

    takes_offloads = True


class CaseRun:
    """One replay of a case: the guest memory, the device and what it did.

    ``run`` executes the steps: the initial writes, the bring-up, then every
    action. ``observer`` sees each step before and after.
    """

    def __init__(self, case: Case, observer: CaseObserver | None = None) -> None:
        self.case = case
        self.observer = observer or CaseObserver()
        self.buffers = [bytearray(size + GUARD_BYTES) for _, size in case.regions]
        for buffer, (_, size) in zip(self.buffers, case.regions):
            buffer[size:] = bytes([GUARD_FILL]) * GUARD_BYTES
        self.memory = GuestMemory(
            MemoryRegion(gpa, buffer, size=size)
            for buffer, (gpa, size) in zip(self.buffers, case.regions)
        )
        self.backend = CaseBackend(capacity=1 << 16)
        self.interrupts = CallbackInterrupt()
        self.clock = VirtualClock()
        options: dict[str, Any] = {"mtu": case.mtu, "tx_mode": case.tx_mode}
        if case.tx_burst is not None:
            options["tx_burst"] = case.tx_burst
        if case.hold_limit is not None:
            options["hold_limit"] = case.hold_limit
        self.device = VirtioNetDevice(
            self.backend, interrupts=self.interrupts, clock=self.clock, **options
        )
        self.queue_setups: dict[int, QueueSetup] = dict(case.queues)
        self.used_log: dict[int, list[tuple[int, int]]] = {}
        self.tracked: list[TrackedQueue] = []
        self.rejected_status: list[tuple[int, str]] = []

    # -- steps ----------------------------------------------------------------

    def steps(self) -> list[Action]:
        """The initial writes, the bring-up and the actions, in order."""
        return [("writes", self.case.writes), ("start", self.case.status)] + list(
            self.case.actions
        )

    def run(self) -> dict[str, Any]:
        """Execute every step and return the result (see ``result``)."""
        for step in self.steps():
            self.observer.before_step(self, step)
            self.apply(step)
            self.track_used()
            self.observer.after_step(self, step)
        return self.result()

    def apply(self, step: Action) -> None:
        """Execute one step against the device or guest memory."""
        kind = step[0]
        device = self.device
        if kind == "kick":
            device.handle_kick(step[1])
        elif kind == "rx":
            device.receive(step[1], step[2])
        elif kind == "advance_us":
            self.clock.advance(step[1] * NS_PER_US)
        elif kind == "writes":
            self.apply_writes(step[1])
        elif kind == "status":
            self.write_status(step[1])
        elif kind == "reset":
            self.write_status(0)
        elif kind == "queues":
            self.queue_setups.update(step[1])
        elif kind == "start":
            self.bring_up(step[1])
        else:
            raise CaseError(f"unknown step {kind!r}")

    def apply_writes(self, writes: Iterable[Write]) -> None:
        """Write driver data into guest memory; raises ``CaseError`` outside it."""
        for gpa, data in writes:
            try:
                self.memory.write(gpa, data)
            except MemoryAccessError as error:
                raise CaseError(
                    f"a write of the case is outside memory: {error}"
                ) from None

    def bring_up(self, target: int) -> None:
        """Initialize the device as a driver does (3.1.1), up to ``target``.

        Stops after FEATURES_OK when the device did not keep it.
        """
        values: list[int] = []
        for bits in (0x01, 0x03, 0x0B, target):
            value = target & bits
            if value and value not in values:
                values.append(value)
        for value in values:
            self.write_status(value)
            features_ok = DeviceStatus.FEATURES_OK
            if value & features_ok and not self.device.status.value & features_ok:
                return

    def write_status(self, value: int) -> None:
        """A driver write of the status byte, with what a driver does before it."""
        device = self.device
        if value == 0:
            device.write_status(0)
            return
        current = device.status.value
        started = DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK
        if value & started and not current & started:
            device.write_driver_features(self.case.features)
        if value & DeviceStatus.DRIVER_OK and not current & DeviceStatus.DRIVER_OK:
            device.set_memory(self.memory)
            for index, setup in sorted(self.queue_setups.items()):
                if setup.layout is not None:
                    device.setup_queue(
                        index, setup.layout, setup.last_avail_idx, setup.used_idx
                    )
        try:
            device.write_status(value)
        except StatusTransitionError as error:
            self.rejected_status.append((value, str(error)))

    # -- used entries ---------------------------------------------------------

    def track_used(self) -> None:
        """Record the used entries each queue published since the last step."""
        known = {id(entry.queue) for entry in self.tracked}
        for index, queue in self.device.queues.items():
            if id(queue) not in known:
                start = self.queue_setups[index].used_idx
                self.tracked.append(TrackedQueue(index, queue, start))
        for entry in self.tracked:
            queue = entry.queue
            published = (queue.used_idx - queue.unpublished) & 0xFFFF
            count = (published - entry.published) & 0xFFFF
            log = self.used_log.setdefault(entry.index, [])
            for offset in range(max(0, count - queue.size), count):
                slot = (entry.published + offset) & (queue.size - 1)
                log.append(self.read_used_elem(queue.layout, slot))
            entry.published = published

    def read_used_elem(self, layout: RingLayout, slot: int) -> tuple[int, int]:
        data = self.memory.read(layout.used_elem_addr(slot), 8)
        head, length = struct.unpack("<II", data)
        return head, length

    def read_u16(self, address: int) -> int | None:
        try:
            return int.from_bytes(self.memory.read(address, 2), "little")
        except MemoryAccessError:
            return None

    # -- result ---------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        """What the device did, as the ``--json`` output shows it."""
        device = self.device
        error = device.error
        used = {}
        for index, setup in sorted(self.queue_setups.items()):
            if setup.layout is None and index not in self.used_log:
                continue
            idx = None
            if setup.layout is not None:
                idx = self.read_u16(setup.layout.used_idx_addr)
            ring = [list(entry) for entry in self.used_log.get(index, [])]
            used[str(index)] = {"idx": idx, "ring": ring}
        interrupts = {
            str(queue): count
            for queue, count in sorted(self.interrupts.interrupts.items())
            if count
        }
        interrupts["config"] = self.interrupts.config_interrupts
        return {
            "status": int(device.status.value),
            "error": (
                None
                if error is None
                else {"kind": error.kind, "queue": error.queue, "message": str(error)}
            ),
            "sent": [frame.hex() for frame in self.backend.sent_frames()],
            "used": used,
            "interrupts": interrupts,
            "dropped": dict(sorted(device.stats.drops.items())),
            "held": len(device.rx.held) if device.rx is not None else 0,
            "rejected_status": [
                {"value": value, "message": message}
                for value, message in self.rejected_status
            ],
        }

    # -- expectations ---------------------------------------------------------

    def check(self, result: dict[str, Any]) -> list[str]:
        """Compare ``result`` with the case's ``expect``; return the mismatches."""
        expect = self.case.expect
        problems: list[str] = []
        for key, wanted in expect.items():
            checker = _EXPECT_CHECKS[key]
            problems += checker(self, result, wanted)
        return problems


def _mismatch(name: str, wanted: Any, got: Any) -> list[str]:
    if wanted == got:
        return []
    return [f"{name}: expected {_short(wanted)}, got {_short(got)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _counts(name: str, wanted: Any, got: Mapping[str, int]) -> list[str]:
    if not isinstance(wanted, dict):
        raise CaseError(f"expect {name}: expected an object of counts")
    keys = set(wanted) | set(got)
    full_wanted = {key: wanted.get(key, 0) for key in sorted(keys)}
    full_got = {key: got.get(key, 0) for key in sorted(keys)}
    return _mismatch(name, full_wanted, full_got)


def _check_used(run: CaseRun, result: dict[str, Any], wanted: Any) -> list[str]:
    if not isinstance(wanted, dict):
        raise CaseError("expect used: expected an object by queue")
    problems = []
    for queue, fields in wanted.items():
        got = result["used"].get(str(queue), {"idx": None, "ring": []})
        for key, value in fields.items():
            if key not in ("idx", "ring"):
                raise CaseError(f"expect used {queue}: unknown field {key!r}")
            problems += _mismatch(f"used[{queue}].{key}", value, got[key])
    return problems


def _check_memory(run: CaseRun, result: dict[str, Any], wanted: Any) -> list[str]:
    if not isinstance(wanted, list):
        raise CaseError("expect memory: expected a list of {gpa, hex}")
    problems = []
    for entry in wanted:
        gpa = _number(_field(entry, "gpa", "expect memory"), "expect memory gpa")
        data = _hex(_field(entry, "hex", "expect memory"), "expect memory hex")
        got = run.memory.read(gpa, len(data))
        problems += _mismatch(f"memory at {gpa:#x}", data.hex(), got.hex())
    return problems


def _error_field(result: dict[str, Any], key: str) -> Any:
    error = result["error"]
    return None if error is None else error[key]


_ExpectCheck = Callable[[CaseRun, dict[str, Any], Any], list[str]]
_EXPECT_CHECKS: dict[str, _ExpectCheck] = {
    "status": lambda run, result, wanted: _mismatch("status", wanted, result["status"]),
    "error_kind": lambda run, result, wanted: _mismatch(
        "error kind", wanted, _error_field(result, "kind")
    ),
    "error_queue": lambda run, result, wanted: _mismatch(
        "error queue", wanted, _error_field(result, "queue")
    ),
    "sent": lambda run, result, wanted: _mismatch("sent", wanted, result["sent"]),
    "sent_len": lambda run, result, wanted: _mismatch(
        "sent lengths", wanted, [len(frame) // 2 for frame in result["sent"]]
    ),
    "used": _check_used,
    "interrupts": lambda run, result, wanted: _counts(
        "interrupts", wanted, result["interrupts"]
    ),
    "dropped": lambda run, result, wanted: _counts(
        "dropped", wanted, result["dropped"]
    ),
    "held": lambda run, result, wanted: _mismatch("held", wanted, result["held"]),
    "memory": _check_memory,
}


def run_case(
    source: str | Path | Mapping[str, Any], observer: CaseObserver | None = None
) -> dict[str, Any]:
    """Replay a case (a path or a decoded object) and return the result.

    The result has ``status``, ``error``, ``sent``, ``used``, ``interrupts``,
    ``dropped``, ``held`` and ``rejected_status``. Raises ``CaseError`` for
    an invalid case.
    """
    return CaseRun(load_case(source), observer).run()


# -- the command --------------------------------------------------------------


def _status_names(value: int) -> str:
    names = [bit.name for bit in DeviceStatus if value & bit]
    return "|".join(names) if names else "0"


def format_summary(case: Case, result: dict[str, Any]) -> str:
    """Return a readable summary of a result."""
    lines = []
    if case.description:
        lines.append(f"case: {case.description}")
    status = result["status"]
    lines.append(f"status: {status:#04x} ({_status_names(status)})")
    error = result["error"]
    if error is None:
        lines.append("error: none")
    else:
        lines.append(f"error: {error['kind']} on queue {error['queue']}")
        lines.append(f"  {error['message']}")
    sent = result["sent"]
    lengths = ", ".join(str(len(frame) // 2) for frame in sent[:8])
    more = ", ..." if len(sent) > 8 else ""
    lines.append(
        f"sent: {len(sent)} frames" + (f" ({lengths}{more} bytes)" if sent else "")
    )
    for queue, used in result["used"].items():
        ring = " ".join(f"{{{head}, {length}}}" for head, length in used["ring"][:8])
        more = " ..." if len(used["ring"]) > 8 else ""
        lines.append(
            f"used queue {queue}: idx {used['idx']}, {len(used['ring'])} entries"
            + (f": {ring}{more}" if ring else "")
        )
    interrupts = ", ".join(
        f"{key} {count}" for key, count in result["interrupts"].items()
    )
    lines.append(f"interrupts: {interrupts}")
    dropped = ", ".join(f"{key} {count}" for key, count in result["dropped"].items())
    lines.append(f"dropped: {dropped or 'none'}")
    if result["held"]:
        lines.append(f"held: {result['held']} received frames")
    for rejected in result["rejected_status"]:
        lines.append(
            f"status write {rejected['value']:#04x} rejected: {rejected['message']}"
        )
    return "\n".join(lines)


def case_command(path: str, as_json: bool) -> int:
    """Replay the case in ``path`` and print the result.

    Returns 0 when the run matches the case's ``expect`` section (or it has
    none), 1 when it does not, and 2 when the file itself is invalid; the
    mismatches and the file error go to stderr in one line each.
    """
    # A case that breaks the device is an expected outcome here, reported in
    # the result, so the device's own error log line is not shown.
    device_log = logging.getLogger("device.net_device")
    level = device_log.level
    device_log.setLevel(logging.CRITICAL)
    try:
        case = load_case(path)
        run = CaseRun(case)
        result = run.run()
        problems = run.check(result)
    except (CaseError, UsageError) as error:
        print(
            f"virtio-net-emu case: invalid case file {path}: {error}", file=sys.stderr
        )
        return 2
    finally:
        device_log.setLevel(level)
    if as_json:
        print(json.dumps(result))
    else:
        print(format_summary(case, result))
    for problem in problems:
        print(f"virtio-net-emu case: expectation not met: {problem}", file=sys.stderr)
    return 1 if problems else 0
