"""The step debugger: run a scenario in virtual time and stop at trace records.

``Stepper`` drives a ``Machine`` one trace record at a time. The machine runs
on a worker thread that pauses inside the trace listener. A stop therefore
happens in the middle of the guest or host code that appended the record,
and ``state()`` reads the rings, the timer and the guest exactly as they are
at that record. Exactly one of the two threads runs at any time (each waits
on a semaphore while the other runs), so a stepped run makes the same records
as ``Machine.run()``.

Stops: ``step()`` (the next record), ``next_packet()`` (the next
``start_xmit``), ``continue_()`` (the next breakpoint or the end) and
``run_until(time_ns)``. Breakpoints are a step (``14``,
``"netif_stop_queue"``) or a condition on the TX ``RingState``
(``num_free_below(20)``, ``timer_armed()``, ``notifications_disabled()``,
``queue_stopped()`` or any predicate); a condition stops where it becomes
true. ``on_stop(stepper, stop)`` runs at each breakpoint hit, on the caller's
thread, so ``pdb.set_trace()`` works there.

``command`` is the ``virtio-net-emu step`` subcommand.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from virtio import Descriptor

from .guest import DEFAULT_MAX_SKB_FRAGS
from .machine import RX_QUEUE, TX_QUEUE, Machine, MachineStats
from .scenarios import SCENARIOS, build_scenario
from .trace import RingState, Step, TraceRecord

__all__ = [
    "Stepper",
    "Stop",
    "Breakpoint",
    "Condition",
    "MachineState",
    "QueueView",
    "num_free_below",
    "timer_armed",
    "notifications_disabled",
    "queue_stopped",
    "parse_breakpoint",
    "load_scenario",
    "format_record",
    "format_state",
    "command",
]


CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")
NEXT_CHAINS = 3
"""Available chains ``state()`` lists with their descriptors."""

# Descriptor flags (virtio 1.2, 2.7.5).
_DESC_NEXT = 1
_DESC_WRITE = 2
_DESC_INDIRECT = 4


# -- scenarios ---------------------------------------------------------------------


def load_scenario(
    name: str,
    *,
    tx_mode: str | None = None,
    queue_size: int = 256,
    max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS,
    capture: str | os.PathLike[str] | None = None,
    rate: float | None = None,
    **options: Any,
) -> Machine:
    """Build a scenario machine by name, or from a pcap or pcapng file.

    ``name`` is a key of ``SCENARIOS`` (``legacy_stall`` is accepted for
    ``legacy-stall``) or the path of a capture. ``capture`` is the file of
    the ``capture`` scenario (default: the bundled sample) and ``rate`` its
    frame rate in frames per second. A capture without a rate keeps its own
    timing. Raises ``ValueError`` for an unknown name, a missing file or a
    rate given to a scenario that is not a capture, and ``CaptureError``
    for a file that is not a valid capture.
    """
    key = name.replace("_", "-")
    if key not in SCENARIOS:
        if not _looks_like_capture(name):
            names = ", ".join(SCENARIOS)
            raise ValueError(
                f"unknown scenario {name!r}: use one of {names}, or the path of a"
                " pcap or pcapng file"
            )
        key, capture = "capture", name
    if key == "capture":
        if capture is not None and not os.path.isfile(capture):
            raise ValueError(f"capture file {os.fspath(capture)!r} not found")
        options.update(path=capture, rate_pps=rate)
    elif rate is not None:
        raise ValueError(
            f"a rate of {rate} frames per second applies only to a capture"
            f" scenario, not to {name!r}"
        )
    return build_scenario(key, tx_mode, queue_size, max_skb_frags, **options)


def _looks_like_capture(name: str) -> bool:
    return (
        os.path.exists(name)
        or os.sep in name
        or name.lower().endswith(CAPTURE_SUFFIXES)
    )


# -- breakpoints -------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A named predicate on the TX ``RingState`` of a record."""

    name: str
    test: Callable[[RingState], bool]

    def __call__(self, state: RingState) -> bool:
        return bool(self.test(state))


def num_free_below(count: int) -> Condition:
    """True while the guest has fewer than ``count`` free TX descriptors."""
    return Condition(f"num_free<{count}", lambda state: state.num_free < count)


def timer_armed() -> Condition:
    """True while the device's TX timer (or bottom half) is scheduled."""
    return Condition("timer_armed", lambda state: state.timer_armed)


def notifications_disabled() -> Condition:
    """True while the device requests no kicks for the TX queue."""
    return Condition(
        "notifications_disabled", lambda state: not state.host_notifications
    )


def queue_stopped() -> Condition:
    """True while the guest's TX queue is stopped (``netif_stop_queue``)."""
    return Condition("queue_stopped", lambda state: state.queue_stopped)


_NAMED_CONDITIONS: dict[str, Callable[[], Condition]] = {
    "timer_armed": timer_armed,
    "notifications_disabled": notifications_disabled,
    "queue_stopped": queue_stopped,
}
BREAKPOINT_HELP = (
    "a step number (14) or name (netif_stop_queue), or a condition:"
    " num_free<N, timer_armed, notifications_disabled, queue_stopped"
)


def parse_breakpoint(text: str | int) -> Step | Condition:
    """Parse a breakpoint as the command line writes it.

    Accepts a step number or name (``Step.parse``), ``num_free<N`` and the
    names of the other conditions. Raises ``ValueError`` naming the text.
    """
    if isinstance(text, int):
        return _parse_step(text)
    spec = text.strip().lower().replace("-", "_")
    if spec.startswith("num_free<"):
        count = spec.removeprefix("num_free<").strip()
        if not count.isdigit():
            raise ValueError(f"invalid breakpoint {text!r}: use num_free<N, N >= 0")
        return num_free_below(int(count))
    if spec in _NAMED_CONDITIONS:
        return _NAMED_CONDITIONS[spec]()
    return _parse_step(text)


def _parse_step(text: str | int) -> Step:
    try:
        return Step.parse(text)
    except ValueError:
        raise ValueError(
            f"invalid breakpoint {text!r}: use {BREAKPOINT_HELP}"
        ) from None


@dataclass
class Breakpoint:
    """One breakpoint: a step, or a condition that stops where it becomes true."""

    number: int
    step: Step | None = None
    condition: Condition | None = None
    enabled: bool = True
    hits: int = 0
    _was_true: bool = field(default=False, repr=False)

    def describe(self) -> str:
        if self.step is not None:
            return f"step {int(self.step)} {self.step.label}"
        assert self.condition is not None
        return f"condition {self.condition.name}"

    def matches(self, record: TraceRecord) -> bool:
        """Check one record; a condition is tracked even while disabled."""
        if self.condition is not None:
            now_true = self.condition(record.state)
            became_true = now_true and not self._was_true
            self._was_true = now_true
            return self.enabled and became_true
        return self.enabled and record.step == self.step


# -- stops and state ---------------------------------------------------------------


@dataclass(frozen=True)
class Stop:
    """The place and the reason of one stop of a motion command.

    ``reason`` is "step", "breakpoint", "packet", "time" or "end". ``record``
    is the record stopped at; it is None at the end and when ``run_until``
    stopped between events. ``breakpoint`` is the first breakpoint the
    record matched, also when ``step()`` stopped there anyway.
    """

    reason: str
    record: TraceRecord | None
    time_ns: int
    breakpoint: Breakpoint | None = None


@dataclass(frozen=True)
class QueueView:
    """One virtqueue as both sides see it: indices, heads in flight, next chains."""

    ring: RingState
    in_flight_heads: list[int]
    pending: int
    """Available chains the device has not popped yet."""
    next_chains: list[tuple[int, list[Descriptor]]]
    """Head and descriptors of the next available chains, from ``DeviceQueue.peek``."""


@dataclass(frozen=True)
class MachineState:
    """Everything ``Stepper.state()`` reads at a stop."""

    time_ns: int
    record: TraceRecord | None
    tx: QueueView
    rx: QueueView
    tx_mode: str
    timer_armed: bool
    flush_scheduled: bool
    """The device waits for its timer or bottom half (QEMU's tx_waiting)."""
    next_host_event_ns: int | None
    """Deadline of the earliest host timer (TX timer, bottom half, wake-up)."""
    queue_stopped: bool
    num_free: int
    stop_threshold: int
    qdisc_backlog: int
    """Frames waiting on the guest's qdisc."""
    stats: MachineStats

    def to_dict(self) -> dict[str, Any]:
        data = {
            "time_us": self.time_ns / 1000,
            "record": self.record.to_dict() if self.record is not None else None,
            "tx_mode": self.tx_mode,
            "timer_armed": self.timer_armed,
            "flush_scheduled": self.flush_scheduled,
            "next_host_event_us": _us_or_none(self.next_host_event_ns),
            "queue_stopped": self.queue_stopped,
            "num_free": self.num_free,
            "stop_threshold": self.stop_threshold,
            "qdisc_backlog": self.qdisc_backlog,
            "stats": self.stats.to_dict(),
        }
        for name, view in (("tx", self.tx), ("rx", self.rx)):
            data[name] = {
                **asdict(view.ring),
                "in_flight_heads": view.in_flight_heads,
                "pending": view.pending,
                "next_chains": [
                    {"head": head, "descriptors": [asdict(d) for d in chain]}
                    for head, chain in view.next_chains
                ],
            }
        return data


def _us_or_none(time_ns: int | None) -> float | None:
    return None if time_ns is None else time_ns / 1000


def _queue_view(machine: Machine, queue: int, chains: int) -> QueueView:
    ring = machine.ring_state(queue)
    device_queue = machine.device.queues.get(queue)
    if device_queue is None or not device_queue.ready:
        return QueueView(ring, [], 0, [])
    pending = (device_queue.avail_idx() - device_queue.last_avail_idx) & 0xFFFF
    return QueueView(
        ring,
        device_queue.in_flight_heads(),
        pending,
        list(device_queue.peek(chains)),
    )


def read_state(
    machine: Machine, record: TraceRecord | None = None, chains: int = NEXT_CHAINS
) -> MachineState:
    """Read the state of ``machine`` now; ``record`` is the record stopped at."""
    policy = machine.device.tx_policy
    tx_path = machine.guest.tx
    driver_queue = machine.guest.queues.get(TX_QUEUE)
    return MachineState(
        time_ns=machine.now_ns,
        record=record,
        tx=_queue_view(machine, TX_QUEUE, chains),
        rx=_queue_view(machine, RX_QUEUE, chains),
        tx_mode=machine.device.tx_mode,
        timer_armed=policy.timer_armed if policy is not None else False,
        flush_scheduled=policy.waiting if policy is not None else False,
        next_host_event_ns=machine.clock.next_deadline(),
        queue_stopped=tx_path.stopped if tx_path is not None else False,
        num_free=driver_queue.num_free if driver_queue is not None else 0,
        stop_threshold=machine.guest.config.stop_threshold,
        qdisc_backlog=len(machine.guest.qdisc),
        stats=machine.stats(),
    )


# -- the stepper -------------------------------------------------------------------


class _Closed(BaseException):
    """Unwinds the paused machine thread when the stepper closes."""


@dataclass
class _Message:
    """A message from the machine thread to the caller: a pause or the end."""

    kind: str
    """"record" (paused in the listener), "paused" (between events), "end"."""
    record: TraceRecord | None = None
    hit: Breakpoint | None = None
    reason: str = ""
    time_ns: int = 0
    error: BaseException | None = None


StopTest = Callable[[TraceRecord, Breakpoint | None], str | None]
OnStop = Callable[["Stepper", Stop], None]


class Stepper:
    """Run a machine in virtual time and stop at its trace records.

    A record is appended after its step took effect, so a stop at a record
    shows the state right after that step. The machine must have its trace
    on (scenarios turn it on). ``on_stop`` is called with the stepper and
    the ``Stop`` at each stop on a record that hit a breakpoint. Close the
    stepper (or use it as a context manager) when abandoning a run before
    its end, so the paused machine thread exits.
    """

    def __init__(
        self,
        machine: Machine,
        *,
        breakpoints: tuple[str | int | Step | Condition, ...] = (),
        on_stop: OnStop | None = None,
    ) -> None:
        if not machine.trace.enabled:
            raise ValueError("the machine's trace is off: build it with trace=True")
        self.machine = machine
        self.on_stop = on_stop
        self.breakpoints: list[Breakpoint] = []
        self.record: TraceRecord | None = None
        """The record of the last stop, None before the first."""
        self.last_stop: Stop | None = None
        self.records_seen = 0
        self._numbers = iter(range(1, 1 << 31))
        self._stop_test: StopTest = _stop_always
        self._pause_before_event: Callable[[], int | None] = _never
        self._worker: threading.Thread | None = None
        self._to_worker = threading.Semaphore(0)
        self._to_caller = threading.Semaphore(0)
        self._message: _Message | None = None
        self._finished = False
        self._closing = False
        # Records made before the stepper attached (the probe's) come first;
        # the machine is not paused inside them, so state() reads it as now.
        self._backlog = collections.deque(machine.trace.records)
        machine.trace.listeners.append(self._listen)
        for spec in breakpoints:
            self.add_breakpoint(spec)

    @classmethod
    def from_scenario(
        cls,
        name: str,
        *,
        tx_mode: str | None = None,
        queue_size: int = 256,
        max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS,
        capture: str | os.PathLike[str] | None = None,
        rate: float | None = None,
        breakpoints: tuple[str | int | Step | Condition, ...] = (),
        on_stop: OnStop | None = None,
        **options: Any,
    ) -> Stepper:
        """Build the scenario ``name`` (see ``load_scenario``) and step it."""
        machine = load_scenario(
            name,
            tx_mode=tx_mode,
            queue_size=queue_size,
            max_skb_frags=max_skb_frags,
            capture=capture,
            rate=rate,
            **options,
        )
        return cls(machine, breakpoints=breakpoints, on_stop=on_stop)

    # -- breakpoints ----------------------------------------------------------------

    def add_breakpoint(
        self, spec: str | int | Step | Condition | Callable[[RingState], bool]
    ) -> Breakpoint:
        """Add a breakpoint at a step or on a condition; return it.

        ``spec`` is a ``Step``, a step number or name, a condition text (see
        ``parse_breakpoint``), a ``Condition`` or a predicate on
        ``RingState``. Raises ``ValueError`` for text that names nothing.
        """
        if isinstance(spec, Step):
            target: Step | Condition = spec
        elif isinstance(spec, (str, int)):
            target = parse_breakpoint(spec)
        elif isinstance(spec, Condition):
            target = spec
        elif callable(spec):
            target = Condition(getattr(spec, "__name__", "condition"), spec)
        else:
            raise ValueError(f"invalid breakpoint {spec!r}: use {BREAKPOINT_HELP}")
        number = next(self._numbers)
        if isinstance(target, Step):
            breakpoint = Breakpoint(number, step=target)
        else:
            # A condition already true now waits until it turns false and true.
            breakpoint = Breakpoint(number, condition=target)
            breakpoint._was_true = target(self._current_ring())
        self.breakpoints.append(breakpoint)
        return breakpoint

    def remove_breakpoint(self, number: int) -> Breakpoint:
        """Remove breakpoint ``number``; raise ``ValueError`` if there is none."""
        for index, breakpoint in enumerate(self.breakpoints):
            if breakpoint.number == number:
                return self.breakpoints.pop(index)
        raise ValueError(f"no breakpoint number {number}")

    def _current_ring(self) -> RingState:
        if self.record is not None:
            return self.record.state
        return self.machine.ring_state()

    # -- motion ---------------------------------------------------------------------

    def step(self) -> Stop:
        """Run to the next trace record."""
        return self._advance(_stop_always)

    def next_packet(self) -> Stop:
        """Run to the next ``start_xmit`` (step 1), or a breakpoint before it."""

        def test(record: TraceRecord, hit: Breakpoint | None) -> str | None:
            if hit is not None:
                return "breakpoint"
            return "packet" if record.step is Step.START_XMIT else None

        return self._advance(test)

    def continue_(self) -> Stop:
        """Run to the next breakpoint hit or to the end of the run."""
        return self._advance(_stop_at_breakpoint)

    def run_until(self, time_ns: int) -> Stop:
        """Run to the first record at or after ``time_ns``, or a breakpoint before.

        When no event runs between now and ``time_ns``, the machine pauses
        between events and its clock moves to ``time_ns`` (reason "time",
        record None).
        """
        machine = self.machine

        def test(record: TraceRecord, hit: Breakpoint | None) -> str | None:
            if hit is not None:
                return "breakpoint"
            return "time" if record.time_ns >= time_ns else None

        def quiet_until_then() -> int | None:
            if machine.guest.softirq_pending:
                return None
            upcoming = machine.next_event_ns()
            if upcoming is not None and upcoming > time_ns:
                return time_ns
            return None

        if self.time_ns >= time_ns and not self._finished:
            return self._make_stop("time", self.record, None)
        return self._advance(test, quiet_until_then)

    def run(self) -> Stop:
        """Run to the end of the run, ignoring breakpoints."""
        return self._advance(_stop_never)

    def __iter__(self) -> Iterator[TraceRecord]:
        """Step record by record to the end of the run."""
        while True:
            stop = self.step()
            if stop.record is None:
                return
            yield stop.record

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def time_ns(self) -> int:
        return self.machine.now_ns

    def state(self, chains: int = NEXT_CHAINS) -> MachineState:
        """Read the state at the current stop (see ``MachineState``)."""
        return read_state(self.machine, self.record, chains)

    # -- the machine thread ---------------------------------------------------------

    def _advance(
        self,
        stop_test: StopTest,
        pause_before_event: Callable[[], int | None] | None = None,
    ) -> Stop:
        """Run until ``stop_test`` names a reason to stop at a record.

        ``pause_before_event`` is asked before each machine event; a time it
        returns pauses the machine there, between events.
        """
        if self._closing:
            raise RuntimeError("the stepper is closed")
        if self._finished:
            return self._make_stop("end", None, None)

        while self._backlog:
            record = self._backlog.popleft()
            hit = self._check_breakpoints(record)
            stop_reason = stop_test(record, hit)
            if stop_reason is not None:
                return self._deliver(_Message("record", record, hit, stop_reason))

        self._stop_test = stop_test
        self._pause_before_event = pause_before_event or _never
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._run_machine, name="virtio-net-emu-stepper", daemon=True
            )
            self._worker.start()
        else:
            self._to_worker.release()
        self._to_caller.acquire()

        message = self._message
        assert message is not None
        self._message = None
        if message.kind == "record":
            return self._deliver(message)
        if message.kind == "paused":
            self.machine.clock.run_until(message.time_ns)
            return self._make_stop("time", None, None)
        self._finish()
        if message.error is not None:
            raise message.error
        return self._make_stop("end", None, None)

    def _deliver(self, message: _Message) -> Stop:
        self.record = message.record
        stop = self._make_stop(message.reason, message.record, message.hit)
        if stop.breakpoint is not None and self.on_stop is not None:
            self.on_stop(self, stop)
        return stop

    def _make_stop(
        self, reason: str, record: TraceRecord | None, hit: Breakpoint | None
    ) -> Stop:
        stop = Stop(reason, record, self.machine.now_ns, hit)
        self.last_stop = stop
        return stop

    def _run_machine(self) -> None:
        machine = self.machine
        try:
            while not self._closing:
                pause_at = self._pause_before_event()
                if pause_at is not None:
                    self._pause(_Message("paused", time_ns=pause_at))
                    continue
                if not machine.step():
                    break
        except _Closed:
            return
        except BaseException as error:  # noqa: BLE001 - re-raised by the caller
            self._message = _Message("end", error=error)
        else:
            self._message = _Message("end")
        self._to_caller.release()

    def _listen(self, record: TraceRecord) -> None:
        if threading.current_thread() is not self._worker:
            return
        if self._closing:
            raise _Closed
        hit = self._check_breakpoints(record)
        reason = self._stop_test(record, hit)
        if reason is not None:
            self._pause(_Message("record", record=record, hit=hit, reason=reason))

    def _check_breakpoints(self, record: TraceRecord) -> Breakpoint | None:
        """Count the hits of ``record``; return the first breakpoint it hit."""
        self.records_seen += 1
        hit = None
        for breakpoint in self.breakpoints:
            if breakpoint.matches(record):
                breakpoint.hits += 1
                hit = hit or breakpoint
        return hit

    def _pause(self, message: _Message) -> None:
        self._message = message
        self._to_caller.release()
        self._to_worker.acquire()
        if self._closing:
            raise _Closed

    def _finish(self) -> None:
        self._finished = True
        self.record = None
        if self._listen in self.machine.trace.listeners:
            self.machine.trace.listeners.remove(self._listen)

    def close(self) -> None:
        """Stop the machine thread and detach from the trace."""
        if self._closing:
            return
        self._closing = True
        worker = self._worker
        if worker is not None and worker.is_alive() and not self._finished:
            self._to_worker.release()
            worker.join()
        self._finish()

    def __enter__(self) -> Stepper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _stop_always(record: TraceRecord, hit: Breakpoint | None) -> str | None:
    return "step"


def _stop_never(record: TraceRecord, hit: Breakpoint | None) -> str | None:
    return None


def _stop_at_breakpoint(record: TraceRecord, hit: Breakpoint | None) -> str | None:
    return "breakpoint" if hit is not None else None


def _never() -> int | None:
    return None


# -- text --------------------------------------------------------------------------


def format_record(record: TraceRecord) -> str:
    """Format one record on one line: step, side, name, time, packet, ring state."""
    state = record.state
    packet = f"p{record.packet}" if record.packet is not None else "-"
    parts = [
        f"{int(record.step):>3} {record.side.value:<5} {record.step.label:<32}",
        f"{record.time_ns / 1000:>11.3f} us {packet:>6}",
        f" avail={state.avail_idx} used={state.used_idx}",
        f"last_avail={state.last_avail_idx} last_used={state.last_used_idx}",
        f"free={state.num_free} in_flight={state.in_flight}",
        f"kicks={'on' if state.host_notifications else 'off'}",
        f"timer={'armed' if state.timer_armed else 'idle'}",
        f"queue={'stopped' if state.queue_stopped else 'running'}",
    ]
    if state.used_event is not None:
        parts.append(f"used_event={state.used_event} avail_event={state.avail_event}")
    if record.detail:
        parts.append(f"({record.detail})")
    return " ".join(parts)


def _format_chain(head: int, chain: list[Descriptor]) -> str:
    parts = []
    for descriptor in chain:
        flags = [
            name
            for bit, name in (
                (_DESC_NEXT, "NEXT"),
                (_DESC_WRITE, "WRITE"),
                (_DESC_INDIRECT, "INDIRECT"),
            )
            if descriptor.flags & bit
        ]
        where = "indirect " if descriptor.indirect else ""
        text = (
            f"{where}[{descriptor.index}] addr {descriptor.addr:#x}"
            f" len {descriptor.len} {'|'.join(flags) or '-'}"
        )
        if descriptor.flags & _DESC_NEXT:
            text += f" next {descriptor.next}"
        parts.append(text)
    return f"head {head}: " + ", ".join(parts)


def _format_queue(name: str, view: QueueView) -> list[str]:
    ring = view.ring
    lines = [
        f"{name} queue {ring.queue}: avail_idx {ring.avail_idx}, used_idx"
        f" {ring.used_idx}, last_avail_idx {ring.last_avail_idx}, last_used_idx"
        f" {ring.last_used_idx}, num_free {ring.num_free}",
        f"  {view.pending} chains available to the device, {ring.in_flight} in"
        f" flight (heads {view.in_flight_heads or 'none'})",
    ]
    if ring.used_event is not None:
        suppression = f"used_event {ring.used_event}, avail_event {ring.avail_event}"
    else:
        suppression = (
            f"avail.flags {ring.avail_flags:#x}, used.flags {ring.used_flags:#x}"
        )
    kicks = "on" if ring.host_notifications else "off"
    lines.append(f"  {suppression}; host notifications {kicks}")
    for head, chain in view.next_chains:
        lines.append("  next " + _format_chain(head, chain))
    return lines


def format_state(state: MachineState) -> str:
    """Format ``MachineState`` as a few lines of text."""
    lines = [f"time {state.time_ns / 1000:.3f} us"]
    if state.record is not None:
        lines.append("at   " + format_record(state.record))
    lines += _format_queue("TX", state.tx)
    lines += _format_queue("RX", state.rx)
    deadline = state.next_host_event_ns
    lines.append(
        f"TX policy {state.tx_mode}: timer {'armed' if state.timer_armed else 'idle'},"
        f" flush {'scheduled' if state.flush_scheduled else 'not scheduled'},"
        " next host event "
        + ("none" if deadline is None else f"at {deadline / 1000:.3f} us")
    )
    lines.append(
        f"guest TX queue {'stopped' if state.queue_stopped else 'running'},"
        f" num_free {state.num_free} (stop threshold {state.stop_threshold}),"
        f" qdisc backlog {state.qdisc_backlog}"
    )
    stats = state.stats
    drops = ", ".join(f"{k} {v}" for k, v in sorted(stats.drops.items())) or "none"
    lines.append(
        f"stats: packets {stats.packets}, frames {stats.frames}, kicks {stats.kicks}"
        f" (suppressed {stats.kicks_suppressed}), vm_exits {stats.vm_exits},"
        f" interrupts {stats.interrupts} (suppressed {stats.interrupts_suppressed}),"
        f" timer arms {stats.timer_arms}, timer fires {stats.timer_fires},"
        f" bh runs {stats.bh_runs}, queue stops {stats.queue_stops},"
        f" queue wakes {stats.queue_wakes}, drops {drops}"
    )
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------

INTERACTIVE_HELP = """\
commands:
  Enter, s       step to the next trace record
  n              run to the next packet (start_xmit)
  c              continue to the next breakpoint or the end
  u TIME         run until TIME (virtual microseconds)
  b SPEC         set a breakpoint: {spec}
  b              list the breakpoints
  d N            delete breakpoint N
  p              print the state: rings, next chains, timer, guest queue, stats
  h              this help
  q              quit"""


def command(args: Any) -> int:
    """Run ``virtio-net-emu step``; return the exit code."""
    from .cli import UserError

    stepper = _open_stepper(args, UserError)
    with stepper:
        for spec in args.breaks:
            try:
                stepper.add_breakpoint(spec)
            except ValueError as error:
                raise UserError(f"--break: {error}") from None
        session = _Session(stepper, sys.stdout, args.json)
        try:
            if args.script or not sys.stdin.isatty():
                session.run_script()
            else:
                session.interact(sys.stdin, _describe(args, stepper.machine))
        except BrokenPipeError:
            # The reader (a pager, head) went away: stop quietly, as cat does.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
    return 0


def _open_stepper(args: Any, user_error: type[Exception]) -> Stepper:
    from backends.errors import CaptureError
    from virtio.errors import UsageError

    options = {"event_idx": False} if args.no_event_idx else {}
    try:
        return Stepper.from_scenario(
            args.scenario,
            tx_mode=args.tx_mode,
            queue_size=args.queue_size,
            max_skb_frags=args.max_skb_frags,
            rate=args.rate,
            **options,
        )
    except (ValueError, CaptureError, UsageError) as error:
        raise user_error(str(error)) from None


def _describe(args: Any, machine: Machine) -> str:
    config = machine.guest.config
    return (
        f"scenario {args.scenario}, tx-mode {machine.device.tx_mode}, queue size"
        f" {config.queue_size}, stop threshold {config.stop_threshold}"
    )


class _Session:
    """The printing side of the command: script mode and the interactive loop."""

    def __init__(self, stepper: Stepper, out: TextIO, as_json: bool) -> None:
        self.stepper = stepper
        self.out = out
        self.as_json = as_json

    def write(self, text: str) -> None:
        self.out.write(text + "\n")

    def show_record(self, record: TraceRecord, hit: Breakpoint | None) -> None:
        if self.as_json:
            data = record.to_dict()
            if hit is not None:
                data["breakpoint"] = hit.number
            self.write(json.dumps(data, sort_keys=True))
            return
        line = format_record(record)
        if hit is not None:
            line += f"  <- breakpoint {hit.number}"
        self.write(line)

    def show_state(self) -> None:
        state = self.stepper.state()
        if self.as_json:
            self.write(json.dumps(state.to_dict(), sort_keys=True))
        else:
            self.write(format_state(state))

    def show_end(self) -> None:
        stepper = self.stepper
        if self.as_json:
            return
        stats = stepper.machine.stats()
        self.write(
            f"end of run at {stepper.time_ns / 1000:.3f} us:"
            f" {stepper.records_seen} records, {stats.frames} frames sent,"
            f" {stats.kicks} kicks, {stats.vm_exits} VM exits,"
            f" {stats.interrupts} interrupts"
        )

    def run_script(self) -> None:
        stepper = self.stepper
        while True:
            stop = stepper.step()
            if stop.record is None:
                break
            self.show_record(stop.record, stop.breakpoint)
        self.show_end()

    # -- interactive ------------------------------------------------------------

    def interact(self, stdin: TextIO, description: str) -> None:
        self.write(f"{description}: Enter steps, c continues, p prints, h helps")
        self.list_breakpoints()
        while True:
            try:
                self.out.write("(step) ")
                self.out.flush()
                line = stdin.readline()
            except KeyboardInterrupt:
                self.write("")
                continue
            if not line:
                self.write("")
                return
            if not self.execute(line.strip()):
                return

    def execute(self, line: str) -> bool:
        """Run one interactive command; return False to quit."""
        word, _, argument = line.partition(" ")
        word = word.lower()
        argument = argument.strip()
        stepper = self.stepper
        if word in ("q", "quit", "exit"):
            return False
        if word in ("", "s", "step"):
            self.show_stop(stepper.step())
        elif word in ("n", "next"):
            self.show_stop(stepper.next_packet())
        elif word in ("c", "cont", "continue"):
            self.show_stop(stepper.continue_())
        elif word in ("u", "until"):
            self.run_until(argument)
        elif word in ("b", "break"):
            self.add_breakpoint(argument)
        elif word in ("d", "delete"):
            self.delete_breakpoint(argument)
        elif word in ("p", "print"):
            self.show_state()
        elif word in ("h", "help", "?"):
            self.write(INTERACTIVE_HELP.format(spec=BREAKPOINT_HELP))
        else:
            self.write(f"unknown command {word!r}: h lists the commands")
        return True

    def show_stop(self, stop: Stop) -> None:
        if stop.reason == "end":
            if self.stepper.records_seen or self.stepper.finished:
                self.show_end()
            return
        if stop.record is None:
            self.write(f"paused between events at {stop.time_ns / 1000:.3f} us")
            return
        if stop.breakpoint is not None:
            self.write(
                f"breakpoint {stop.breakpoint.number}, {stop.breakpoint.describe()}:"
            )
        self.show_record(stop.record, None)

    def run_until(self, argument: str) -> None:
        try:
            time_us = float(argument)
        except ValueError:
            self.write(f"invalid time {argument!r}: use u TIME in microseconds")
            return
        self.show_stop(self.stepper.run_until(round(time_us * 1000)))

    def add_breakpoint(self, argument: str) -> None:
        if not argument:
            self.list_breakpoints()
            return
        try:
            breakpoint = self.stepper.add_breakpoint(argument)
        except ValueError as error:
            self.write(str(error))
            return
        self.write(f"breakpoint {breakpoint.number} at {breakpoint.describe()}")

    def delete_breakpoint(self, argument: str) -> None:
        try:
            removed = self.stepper.remove_breakpoint(int(argument))
        except ValueError:
            self.write(f"no breakpoint {argument!r}: b lists the breakpoints")
            return
        self.write(f"deleted breakpoint {removed.number} ({removed.describe()})")

    def list_breakpoints(self) -> None:
        breakpoints = self.stepper.breakpoints
        if not breakpoints:
            self.write("no breakpoints")
        for breakpoint in breakpoints:
            self.write(
                f"breakpoint {breakpoint.number}: {breakpoint.describe()},"
                f" {breakpoint.hits} hits"
            )
