"""Timeline pictures of a run: a guest lane and a host lane, and ring occupancy.

A run's trace becomes a sequence diagram with time flowing down. Packets,
kicks, VM exits, timer arms and fires, flushes, notification changes,
interrupts and queue stops and wakes are ticks at their virtual time, each
kind in its own narrow column beside its lane's lifeline. Kicks and
interrupts are also arrows between the lanes. Shaded bands show when the guest's
queue is stopped, when the TX timer is armed and when host notifications are
off. A plot to the right shows the TX ring's free descriptors and chains in
flight on the same time axis. Long idle gaps are cut out of the axis and
marked with their length.

Labels name the step (``Step.label``). Only the first ``label_limit``
occurrences of each kind get one, rarer kinds first, and labels that would
overlap are stacked apart with leader lines to their ticks. Ticks that fall on the same pixel row merge into one bar,
so the file size is bounded by the picture's height, not by the run's length.

The layout is a list of drawing primitives in pixels; ``write_svg`` writes
them by hand and ``write_png`` draws them with matplotlib (the ``plot``
extra). ``write_text`` prints one line per event. ``command`` is the
``virtio-net-emu timeline`` subcommand.
"""

from __future__ import annotations

import bisect
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TextIO
from xml.sax.saxutils import escape, quoteattr

from .guest import DEFAULT_MAX_SKB_FRAGS
from .machine import Machine, MachineStats
from .stepper import load_scenario
from .trace import Side, Step, TraceRecord

__all__ = [
    "EventKind",
    "KINDS",
    "Event",
    "Run",
    "collect_run",
    "build_run",
    "Canvas",
    "layout",
    "write_svg",
    "write_png",
    "write_text",
    "command",
]

# -- what is drawn -----------------------------------------------------------------


@dataclass(frozen=True)
class EventKind:
    """One kind of event the picture draws, with the steps that make it."""

    key: str
    steps: tuple[Step, ...]
    side: Side
    color: str
    description: str


KINDS: tuple[EventKind, ...] = (
    EventKind("packet", (Step.XMIT_SKB,), Side.GUEST, "#1f77b4", "packet added"),
    EventKind("kick", (Step.VP_NOTIFY,), Side.GUEST, "#2ca02c", "kick (notify)"),
    EventKind(
        "queue_stop", (Step.NETIF_STOP_QUEUE,), Side.GUEST, "#d62728", "queue stop"
    ),
    EventKind(
        "queue_wake",
        (Step.NETIF_START_QUEUE, Step.NETIF_WAKE_QUEUE),
        Side.GUEST,
        "#9467bd",
        "queue start or wake",
    ),
    EventKind("vm_exit", (Step.VM_EXIT,), Side.HOST, "#2ca02c", "VM exit"),
    EventKind(
        "timer_arm", (Step.SCHEDULE_FLUSH,), Side.HOST, "#ff7f0e", "timer arm or bh"
    ),
    EventKind(
        "timer_fire",
        (Step.TX_TIMER_FIRE, Step.TX_BH_RUN),
        Side.HOST,
        "#8c564b",
        "timer fire or bh run",
    ),
    EventKind("flush", (Step.TX_FLUSH,), Side.HOST, "#17becf", "TX flush"),
    EventKind(
        "notify_off",
        (Step.NOTIFICATIONS_DISABLED,),
        Side.HOST,
        "#e377c2",
        "notifications off",
    ),
    EventKind(
        "notify_on",
        (Step.NOTIFICATIONS_ENABLED,),
        Side.HOST,
        "#7f7f7f",
        "notifications on",
    ),
    EventKind("interrupt", (Step.INTERRUPT,), Side.HOST, "#bcbd22", "interrupt"),
)
_KIND_OF_STEP = {step: kind for kind in KINDS for step in kind.steps}


@dataclass(frozen=True)
class Event:
    """One drawn event: its kind and the record that made it."""

    kind: EventKind
    record: TraceRecord

    @property
    def time_ns(self) -> int:
        return self.record.time_ns

    @property
    def label(self) -> str:
        """The step number and name, the packet, and the queue of an RX kick."""
        record = self.record
        text = f"{int(record.step)} {record.step.label}"
        if record.packet is not None:
            text += f" p{record.packet}"
        if record.detail in ("qemu_mod_timer", "qemu_bh_schedule", "rx"):
            text += f" ({record.detail})"
        return text


@dataclass(frozen=True)
class Sample:
    """The TX ring's occupancy at one record."""

    time_ns: int
    num_free: int
    in_flight: int
    """Chains the driver added and has not reclaimed."""
    unpopped: int
    """Chains available that the device has not popped yet."""


@dataclass
class Run:
    """The data of one run's picture: events, occupancy samples, bands, stats."""

    title: str
    tx_mode: str
    queue_size: int
    stop_threshold: int
    events: list[Event]
    samples: list[Sample]
    stats: MachineStats
    end_ns: int
    bands: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Intervals (start, end) in ns where the queue is stopped ("stopped"),
    the timer armed ("timer") and host notifications off ("notify_off")."""


def collect_run(machine: Machine, title: str) -> Run:
    """Run ``machine`` to the end and extract its picture from the trace."""
    machine.run()
    records = list(machine.trace)
    events = _events(records)
    samples = []
    for record in records:
        state = record.state
        in_flight = (state.avail_idx - state.last_used_idx) & 0xFFFF
        if state.num_free == 0 and in_flight == 0:
            continue  # the TX queue is not set up yet
        unpopped = (state.avail_idx - state.last_avail_idx) & 0xFFFF
        samples.append(Sample(record.time_ns, state.num_free, in_flight, unpopped))
    end_ns = max(machine.now_ns, records[-1].time_ns if records else 0)
    bands = {
        "stopped": _intervals(records, lambda r: r.state.queue_stopped, end_ns),
        "timer": _intervals(records, lambda r: r.state.timer_armed, end_ns),
        "notify_off": _intervals(
            records, lambda r: not r.state.host_notifications, end_ns
        ),
    }
    config = machine.guest.config
    return Run(
        title=title,
        tx_mode=machine.device.tx_mode,
        queue_size=config.queue_size,
        stop_threshold=config.stop_threshold,
        events=events,
        samples=samples,
        stats=machine.stats(),
        end_ns=end_ns,
        bands=bands,
    )


def _events(records: Sequence[TraceRecord]) -> list[Event]:
    events = []
    for index, record in enumerate(records):
        kind = _KIND_OF_STEP.get(record.step)
        if kind is None:
            continue
        if kind.key == "interrupt" and record.detail == "rx":
            continue
        if kind.key == "kick" and _kick_queue(records, index) == 0:
            record = TraceRecord(
                record.step, record.time_ns, record.packet, record.state, "rx"
            )
        events.append(Event(kind, record))
    return events


def _kick_queue(records: Sequence[TraceRecord], index: int) -> int | None:
    """Return the queue index the PIO write after a vp_notify names."""
    if index + 1 < len(records) and records[index + 1].step is Step.PIO_WRITE:
        detail = records[index + 1].detail
        if detail.startswith("queue index "):
            number = detail.removeprefix("queue index ").split(",")[0]
            if number.isdigit():
                return int(number)
    return None


def _intervals(
    records: Iterable[TraceRecord], test: Any, end_ns: int
) -> list[tuple[int, int]]:
    intervals = []
    start: int | None = None
    for record in records:
        if test(record):
            if start is None:
                start = record.time_ns
        elif start is not None:
            intervals.append((start, record.time_ns))
            start = None
    if start is not None:
        intervals.append((start, end_ns))
    return intervals


def build_run(
    scenario: str,
    tx_mode: str | None = None,
    queue_size: int = 256,
    max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS,
    rate: float | None = None,
    **options: Any,
) -> Run:
    """Build, run and collect one scenario (names as ``load_scenario``)."""
    machine = load_scenario(
        scenario,
        tx_mode=tx_mode,
        queue_size=queue_size,
        max_skb_frags=max_skb_frags,
        rate=rate,
        **options,
    )
    name = os.path.basename(scenario)
    title = f"{name}, tx-mode {machine.device.tx_mode}, queue size {queue_size}"
    return collect_run(machine, title)


# -- the time axis -----------------------------------------------------------------

GAP_PX = 120.0
"""A gap between events longer than this many pixels is cut out of the axis."""
BREAK_PX = 26.0
"""Height of a cut-out gap."""
MAX_PX_PER_NS = 0.04
"""At most 40 pixels per microsecond, so a short run is not stretched."""
TARGET_HEIGHT = 1400.0
SHARED_SCALE_RATIO = 3.0
"""Compared runs share one time scale unless theirs differ by more than this."""


class TimeScale:
    """Virtual time to a vertical pixel offset, with long idle gaps cut out."""

    def __init__(self, times: Sequence[int], px_per_ns: float) -> None:
        self.px_per_ns = px_per_ns
        points = sorted(set(times)) or [0]
        # Linear segments (first ns, last ns, offset of first ns) and cut gaps
        # (offset where the gap starts, duration in ns).
        self.segments: list[tuple[int, int, float]] = []
        self.breaks: list[tuple[float, int]] = []
        start = previous = points[0]
        offset = 0.0
        for time in points[1:]:
            if (time - previous) * px_per_ns > GAP_PX:
                self.segments.append((start, previous, offset))
                offset += (previous - start) * px_per_ns
                self.breaks.append((offset, time - previous))
                offset += BREAK_PX
                start = time
            previous = time
        self.segments.append((start, previous, offset))
        self.height = offset + (previous - start) * px_per_ns
        self._starts = [segment[0] for segment in self.segments]

    def y(self, time_ns: int) -> float:
        """Offset of ``time_ns``; a time inside a cut gap lies in its break."""
        index = max(0, bisect.bisect_right(self._starts, time_ns) - 1)
        start, last, offset = self.segments[index]
        if time_ns <= last or index + 1 == len(self.segments):
            return offset + (time_ns - start) * self.px_per_ns
        gap_start = offset + (last - start) * self.px_per_ns
        next_start = self.segments[index + 1][0]
        fraction = (time_ns - last) / (next_start - last)
        return gap_start + fraction * BREAK_PX

    @staticmethod
    def height_for(times: Sequence[int], px_per_ns: float) -> float:
        points = sorted(set(times))
        height = 0.0
        for before, after in zip(points, points[1:]):
            span = (after - before) * px_per_ns
            height += BREAK_PX if span > GAP_PX else span
        return height


def choose_scale(runs: Sequence[Sequence[int]], target: float = TARGET_HEIGHT) -> float:
    """Pick pixels per ns so the tallest run is about ``target`` pixels high."""
    low, high = 1e-9, MAX_PX_PER_NS
    if all(TimeScale.height_for(times, high) <= target for times in runs):
        return high
    for _ in range(60):
        middle = math.sqrt(low * high)
        if all(TimeScale.height_for(times, middle) <= target for times in runs):
            low = middle
        else:
            high = middle
    return low


def _nice_step(span_ns: float) -> int:
    """Round a tick distance in ns up to 1, 2 or 5 times a power of ten."""
    exponent = 10 ** math.floor(math.log10(max(span_ns, 1)))
    for factor in (1, 2, 5, 10):
        if factor * exponent >= span_ns:
            return int(factor * exponent)
    return int(10 * exponent)


def format_time(time_ns: int) -> str:
    """Format a virtual time in us below 10 ms, in ms above."""
    if time_ns >= 10_000_000:
        return f"{time_ns / 1e6:.3f} ms"
    return f"{time_ns / 1000:.1f} us"


def format_span(span_ns: int) -> str:
    if span_ns >= 1_000_000:
        return f"{span_ns / 1e6:.3f} ms"
    return f"{span_ns / 1000:.1f} us"


# -- drawing primitives ------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    color: str
    width: float = 1.0
    dash: bool = False
    opacity: float = 1.0


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    color: str
    opacity: float = 1.0


@dataclass(frozen=True)
class Polyline:
    points: tuple[tuple[float, float], ...]
    color: str
    width: float = 1.0


@dataclass(frozen=True)
class Polygon:
    points: tuple[tuple[float, float], ...]
    color: str
    opacity: float = 1.0


@dataclass(frozen=True)
class Text:
    """Text whose vertical center is at ``y``; ``anchor`` is start, middle or end."""

    x: float
    y: float
    text: str
    size: float = 11.0
    color: str = "#222222"
    anchor: str = "start"
    bold: bool = False


Shape = Line | Rect | Polyline | Polygon | Text


@dataclass
class Canvas:
    """A picture in pixels: its size and its shapes, drawn in order."""

    width: float
    height: float
    shapes: list[Shape] = field(default_factory=list)

    def add(self, shape: Shape) -> None:
        self.shapes.append(shape)


# -- layout ------------------------------------------------------------------------

PANEL_WIDTH = 1100.0
AXIS_X = 78.0
GUEST_X = 340.0
HOST_X = 540.0
COLUMN_WIDTH = 11.0
PLOT_LEFT = 890.0
PLOT_RIGHT = 1070.0
HEADER_HEIGHT = 112.0
LABEL_SIZE = 11.0
LABEL_LIMIT = 6
"""Maximum labelled occurrences of each kind of event."""
LABEL_ROW = 13.0
"""Vertical distance between two stacked labels, in pixels."""
LABEL_WINDOW = 40.0
LABEL_CROWD = 5
"""At most this many labels within ``LABEL_WINDOW`` pixels of one another."""
ARROW_LIMIT = 400
"""Maximum kicks and interrupts drawn as arrows; later ones are only ticks."""
BAND_COLORS = {"stopped": "#f4c7c3", "timer": "#fff1b8", "notify_off": "#f9d6ee"}
SERIES = (
    ("num_free", "#1f77b4", 1.2, "free descriptors"),
    ("unpopped", "#ff7f0e", 2.4, "chains not yet popped by the device"),
    ("in_flight", "#d62728", 1.0, "chains in flight (added, not reclaimed)"),
)
GUEST_KINDS = [kind for kind in KINDS if kind.side is Side.GUEST]
HOST_KINDS = [kind for kind in KINDS if kind.side is Side.HOST]


def _column_x(kind: EventKind) -> float:
    """Left edge of the tick column of ``kind``, beside its lane's lifeline."""
    if kind.side is Side.GUEST:
        position = GUEST_KINDS.index(kind)
        return GUEST_X - (len(GUEST_KINDS) - position) * COLUMN_WIDTH
    return HOST_X + 2 + HOST_KINDS.index(kind) * COLUMN_WIDTH


def layout(
    runs: Sequence[Run], title: str | None = None, label_limit: int = LABEL_LIMIT
) -> Canvas:
    """Lay out one panel per run, side by side.

    The panels share one time scale unless their own scales differ by more
    than ``SHARED_SCALE_RATIO``, and then the title notes that they differ.
    """
    times = [_times(run) for run in runs]
    own = [choose_scale([run_times]) for run_times in times]
    if max(own) <= SHARED_SCALE_RATIO * min(own):
        own = [min(own)] * len(own)
    elif title:
        title += " (time scales differ)"
    scales = [TimeScale(run_times, scale) for run_times, scale in zip(times, own)]
    top = 36.0 if title else 0.0
    body = max(scale.height for scale in scales)
    legend_top = top + HEADER_HEIGHT + body + 30
    canvas = Canvas(PANEL_WIDTH * len(runs), legend_top + _legend_height() + 10)
    canvas.add(Rect(0, 0, canvas.width, canvas.height, "#ffffff"))
    if title:
        canvas.add(Text(12, 18, title, 15, anchor="start", bold=True))
    for index, (run, scale) in enumerate(zip(runs, scales)):
        panel = _Panel(canvas, run, scale, index * PANEL_WIDTH, top, label_limit)
        panel.draw()
        _draw_legend(canvas, index * PANEL_WIDTH, legend_top)
    return canvas


def _times(run: Run) -> list[int]:
    times = [0, run.end_ns]
    times += [event.time_ns for event in run.events]
    times += [sample.time_ns for sample in run.samples]
    return times


class _Panel:
    """The drawing of one run at a horizontal offset."""

    def __init__(
        self,
        canvas: Canvas,
        run: Run,
        scale: TimeScale,
        left: float,
        top: float,
        label_limit: int,
    ) -> None:
        self.canvas = canvas
        self.run = run
        self.scale = scale
        self.left = left
        self.top = top
        self.body_top = top + HEADER_HEIGHT
        self.label_limit = label_limit

    def x(self, offset: float) -> float:
        return self.left + offset

    def y(self, time_ns: int) -> float:
        return self.body_top + self.scale.y(time_ns)

    def draw(self) -> None:
        self._header()
        self._bands()
        self._axis()
        self._lifelines()
        self._arrows()
        self._ticks()
        self._labels()
        self._plot()

    def _header(self) -> None:
        add = self.canvas.add
        run = self.run
        stats = run.stats
        add(Text(self.x(12), self.top + 18, run.title, 14, bold=True))
        summary = (
            f"{stats.packets} packets, {stats.frames} sent, {stats.kicks} kicks,"
            f" {stats.vm_exits} VM exits, {stats.interrupts} interrupts,"
            f" {stats.timer_fires} timer fires, {stats.bh_runs} bh runs,"
            f" {stats.queue_stops} queue stops; run {format_span(run.end_ns)}"
        )
        add(Text(self.x(12), self.top + 40, summary, 11, color="#444444"))

        lane_y = self.top + 70
        headings = (
            (GUEST_X - 60, "guest (driver)"),
            (HOST_X + 60, "host (device)"),
            ((PLOT_LEFT + PLOT_RIGHT) / 2, "TX ring occupancy"),
        )
        for x, heading in headings:
            add(Text(self.x(x), lane_y, heading, 13, anchor="middle", bold=True))

        size = run.queue_size
        for value in (0, size // 2, size):
            x = self._plot_x(value)
            add(Text(x, self.body_top - 14, str(value), 10, "#555555", "middle"))

    def _bands(self) -> None:
        add = self.canvas.add
        bottom = self.body_top + self.scale.height
        columns = {
            "stopped": (GUEST_X - len(GUEST_KINDS) * COLUMN_WIDTH - 4, GUEST_X),
            "timer": (HOST_X, HOST_X + len(HOST_KINDS) * COLUMN_WIDTH + 4),
            "notify_off": (HOST_X - 6, HOST_X),
        }
        for name, intervals in self.run.bands.items():
            x1, x2 = columns[name]
            spans: list[tuple[float, float]] = []
            for start, end in intervals:
                y1 = self.y(start)
                y2 = min(max(self.y(end), y1 + 1), bottom)
                if spans and y1 <= spans[-1][1] + 1:
                    spans[-1] = (spans[-1][0], max(y2, spans[-1][1]))
                else:
                    spans.append((y1, y2))
            for y1, y2 in spans:
                add(Rect(self.x(x1), y1, x2 - x1, y2 - y1, BAND_COLORS[name]))

    def _axis(self) -> None:
        add = self.canvas.add
        scale = self.scale
        step = _nice_step(50 / scale.px_per_ns)
        right = self.x(PLOT_RIGHT)
        for number, (start, last, _offset) in enumerate(scale.segments):
            first_tick = -(-start // step) * step
            ticks = list(range(first_tick, last + 1, step))
            if number > 0 and (not ticks or ticks[0] - start > step / 4):
                ticks.insert(0, start)
            for tick in ticks:
                y = self.y(tick)
                add(Line(self.x(AXIS_X), y, right, y, "#e6e6e6", 0.6))
                add(
                    Text(self.x(AXIS_X - 6), y, format_time(tick), 10, "#555555", "end")
                )
        for offset, span in scale.breaks:
            y = self.body_top + offset
            add(
                Rect(
                    self.x(AXIS_X), y + 3, PLOT_RIGHT - AXIS_X, BREAK_PX - 6, "#f0f0f0"
                )
            )
            text = f"... {format_span(span)} without events ..."
            middle = (GUEST_X + HOST_X) / 2
            add(Text(self.x(middle), y + BREAK_PX / 2, text, 10, "#777777", "middle"))
        bottom = self.body_top + scale.height
        add(Line(self.x(AXIS_X), self.body_top, self.x(AXIS_X), bottom, "#999999"))

    def _lifelines(self) -> None:
        bottom = self.body_top + self.scale.height
        for x in (GUEST_X, HOST_X):
            self.canvas.add(
                Line(self.x(x), self.body_top, self.x(x), bottom, "#333333", 1.5)
            )

    def _arrows(self) -> None:
        events = self.run.events
        drawn = 0
        seen: set[tuple[str, int]] = set()
        for index, event in enumerate(events):
            key = event.kind.key
            if key not in ("kick", "interrupt"):
                continue
            y1 = self.y(event.time_ns)
            if (key, round(y1)) in seen or drawn >= ARROW_LIMIT:
                continue
            seen.add((key, round(y1)))
            drawn += 1
            if key == "kick":
                exit_time = _next_time(events, index, "vm_exit", event.time_ns)
                self._arrow(GUEST_X, y1, HOST_X, self.y(exit_time), event.kind.color)
            else:
                self._arrow(HOST_X, y1, GUEST_X, y1, event.kind.color)

    def _arrow(self, x1: float, y1: float, x2: float, y2: float, color: str) -> None:
        x1, x2 = self.x(x1), self.x(x2)
        self.canvas.add(Line(x1, y1, x2, y2, color, 1.0, opacity=0.7))
        length = math.hypot(x2 - x1, y2 - y1) or 1.0
        ux, uy = (x2 - x1) / length, (y2 - y1) / length
        head = (
            (x2, y2),
            (x2 - 8 * ux - 3.5 * uy, y2 - 8 * uy + 3.5 * ux),
            (x2 - 8 * ux + 3.5 * uy, y2 - 8 * uy - 3.5 * ux),
        )
        self.canvas.add(Polygon(head, color, 0.9))

    def _ticks(self) -> None:
        rows: dict[str, list[int]] = {}
        for event in self.run.events:
            rows.setdefault(event.kind.key, []).append(round(self.y(event.time_ns)))
        for kind in KINDS:
            pixel_rows = sorted(set(rows.get(kind.key, [])))
            x = self.x(_column_x(kind))
            # A tick is 2 pixels high, so ticks 2 rows apart already touch.
            for first, last in _runs_of(pixel_rows, gap=2):
                height = last - first + 2.0
                self.canvas.add(
                    Rect(x, first - 1, COLUMN_WIDTH - 2, height, kind.color)
                )

    def _labels(self) -> None:
        for side in (Side.GUEST, Side.HOST):
            chosen = self._choose_labels(side)
            targets = [self.y(event.time_ns) for event in chosen]
            placed = spread_labels(targets, LABEL_ROW)
            for event, y, label_y in zip(chosen, targets, placed):
                self._label(event, y, label_y)

    def _choose_labels(self, side: Side) -> list[Event]:
        """Pick the events of one lane that get a label, in time order.

        Rare kinds choose first (a queue stop matters more than the 7th
        packet), each at most ``label_limit`` times, and no more than
        ``LABEL_CROWD`` labels within ``LABEL_WINDOW`` pixels of each other.
        """
        by_kind: dict[str, list[tuple[int, Event]]] = {}
        for index, event in enumerate(self.run.events):
            if event.kind.side is side:
                by_kind.setdefault(event.kind.key, []).append((index, event))
        chosen: list[tuple[float, int, Event]] = []
        rows: list[float] = []
        for key in sorted(by_kind, key=lambda name: len(by_kind[name])):
            count = 0
            for index, event in by_kind[key]:
                if count >= self.label_limit:
                    break
                y = self.y(event.time_ns)
                low = bisect.bisect_left(rows, y - LABEL_WINDOW)
                high = bisect.bisect_right(rows, y + LABEL_WINDOW)
                if high - low >= LABEL_CROWD:
                    continue
                bisect.insort(rows, y)
                chosen.append((y, index, event))
                count += 1
        chosen.sort(key=lambda item: (item[0], item[1]))
        return [event for _, _, event in chosen]

    def _label(self, event: Event, y: float, label_y: float) -> None:
        """Draw the label of ``event`` at ``label_y``, with a leader to its tick."""
        kind = event.kind
        column = _column_x(kind)
        if kind.side is Side.GUEST:
            end = GUEST_X - len(GUEST_KINDS) * COLUMN_WIDTH - 8
            leader = Line(
                self.x(end + 2), label_y, self.x(column), y, kind.color, 0.6, dash=True
            )
            text = Text(
                self.x(end), label_y, event.label, LABEL_SIZE, kind.color, "end"
            )
        else:
            start = HOST_X + len(HOST_KINDS) * COLUMN_WIDTH + 10
            leader = Line(
                self.x(column + COLUMN_WIDTH),
                y,
                self.x(start - 2),
                label_y,
                kind.color,
                0.6,
                dash=True,
            )
            text = Text(self.x(start), label_y, event.label, LABEL_SIZE, kind.color)
        self.canvas.add(leader)
        self.canvas.add(text)

    def _plot_x(self, value: float) -> float:
        size = max(1, self.run.queue_size)
        return self.x(PLOT_LEFT + (PLOT_RIGHT - PLOT_LEFT) * value / size)

    def _plot(self) -> None:
        add = self.canvas.add
        top, bottom = self.body_top, self.body_top + self.scale.height
        left, right = self.x(PLOT_LEFT), self.x(PLOT_RIGHT)
        add(Line(left, top, left, bottom, "#999999"))
        add(Line(left, top, right, top, "#999999"))
        threshold = self._plot_x(self.run.stop_threshold)
        add(Line(threshold, top, threshold, bottom, "#d62728", 0.8, dash=True))
        for attribute, color, width, _label in SERIES:
            points = _step_points(
                [(self.y(s.time_ns), getattr(s, attribute)) for s in self.run.samples],
                bottom,
            )
            if len(points) > 1:
                scaled = tuple((self._plot_x(value), y) for y, value in points)
                add(Polyline(scaled, color, width))


def spread_labels(targets: Sequence[float], row: float) -> list[float]:
    """Move sorted label positions apart by at least ``row``, keeping their order.

    Labels that would overlap are stacked downwards, then each stack moves
    up by its mean displacement, as far as the stack above it allows, so a
    stack centers on the events it names.
    """
    placed: list[float] = []
    for y in targets:
        placed.append(y if not placed else max(y, placed[-1] + row))
    stacks: list[list[int]] = []
    for index in range(len(placed)):
        if stacks and placed[index] - placed[index - 1] <= row + 1e-6:
            stacks[-1].append(index)
        else:
            stacks.append([index])
    previous_bottom = -math.inf
    for stack in stacks:
        shift = sum(placed[i] - targets[i] for i in stack) / len(stack)
        room = placed[stack[0]] - (previous_bottom + row)
        shift = max(0.0, min(shift, room))
        for index in stack:
            placed[index] -= shift
        previous_bottom = placed[stack[-1]]
    return placed


def _next_time(events: Sequence[Event], index: int, key: str, default: int) -> int:
    """Return the time of a ``key`` event among the three after ``index``.

    Only an event within 10 us of ``default`` counts, as the VM exit of a kick
    does; without one, return ``default``.
    """
    for event in events[index + 1 : index + 4]:
        if event.kind.key == key and event.time_ns - default <= 10_000:
            return event.time_ns
    return default


def _runs_of(rows: Sequence[int], gap: int = 1) -> list[tuple[int, int]]:
    """Group sorted integers into runs whose neighbours are at most ``gap`` apart."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and row <= runs[-1][1] + gap:
            runs[-1] = (runs[-1][0], row)
        else:
            runs.append((row, row))
    return runs


def _step_points(
    samples: Sequence[tuple[float, int]], bottom: float
) -> list[tuple[float, int]]:
    """Turn (y, value) samples into the corners of a step plot, a few per pixel row.

    Within one pixel row only the first, lowest, highest and last values are
    kept, so the number of points is bounded by the plot's height.
    """
    points: list[tuple[float, int]] = []
    row: list[int] = []
    row_y = None
    for y, value in samples:
        pixel = round(y)
        if pixel != row_y:
            _flush_row(points, row_y, row)
            row_y, row = pixel, []
        row.append(value)
    _flush_row(points, row_y, row)
    if points:
        points.append((bottom, points[-1][1]))
    return points


def _flush_row(
    points: list[tuple[float, int]], y: float | None, row: list[int]
) -> None:
    if y is None or not row:
        return
    if points:
        points.append((y, points[-1][1]))  # hold the last value down to this row
    values = [row[0], min(row), max(row), row[-1]]
    for value in values:
        if not points or points[-1] != (y, value):
            points.append((y, value))


def _legend_height() -> float:
    rows = math.ceil(len(KINDS) / 2) + 1 + len(BAND_COLORS) + len(SERIES)
    return rows * LEGEND_ROW + 20


BAND_LEGEND = {
    "stopped": "guest TX queue stopped",
    "timer": "TX timer or bottom half scheduled",
    "notify_off": "host notifications off (kicks suppressed)",
}
LEGEND_ROW = 17.0


def _draw_legend(canvas: Canvas, left: float, top: float) -> None:
    add = canvas.add
    title = "event kinds (lane): step number and name; labels add the packet pN"
    add(Text(left + 12, top, title, 11, bold=True))

    y = top + 19
    for index, kind in enumerate(KINDS):
        x = left + 12 + (index % 2) * 470
        row_y = y + (index // 2) * LEGEND_ROW
        steps = ", ".join(f"{int(step)} {step.label}" for step in kind.steps)
        text = f"{kind.description} ({kind.side.value}): {steps}"
        add(Rect(x, row_y - 5, 10, 10, kind.color))
        add(Text(x + 16, row_y, text, 10.5))

    y += math.ceil(len(KINDS) / 2) * LEGEND_ROW + 4
    for name, color in BAND_COLORS.items():
        add(Rect(left + 12, y - 5, 10, 10, color))
        add(Text(left + 28, y, f"band: {BAND_LEGEND[name]}", 10.5))
        y += LEGEND_ROW

    for _attribute, color, _width, label in SERIES:
        add(Line(left + 12, y, left + 24, y, color, 2))
        add(Text(left + 28, y, f"plot: {label}", 10.5))
        y += LEGEND_ROW
    add(Line(left + 12, y, left + 24, y, "#d62728", 1, dash=True))
    threshold = "plot: stop threshold (2 + MAX_SKB_FRAGS descriptors)"
    add(Text(left + 28, y, threshold, 10.5))


# -- writers -----------------------------------------------------------------------


def _number(value: float) -> str:
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def write_svg(canvas: Canvas, out: IO[str]) -> None:
    """Write ``canvas`` as a standalone SVG document."""
    width, height = _number(canvas.width), _number(canvas.height)
    out.write(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}"'
        ' font-family="DejaVu Sans Mono, Menlo, Consolas, monospace">\n'
    )
    for shape in canvas.shapes:
        out.write(_svg_shape(shape))
        out.write("\n")
    out.write("</svg>\n")


def _svg_shape(shape: Shape) -> str:
    n = _number
    if isinstance(shape, Line):
        dash = ' stroke-dasharray="3,2"' if shape.dash else ""
        opacity = f' stroke-opacity="{shape.opacity}"' if shape.opacity < 1 else ""
        return (
            f'<line x1="{n(shape.x1)}" y1="{n(shape.y1)}" x2="{n(shape.x2)}"'
            f' y2="{n(shape.y2)}" stroke="{shape.color}"'
            f' stroke-width="{n(shape.width)}"{dash}{opacity}/>'
        )
    if isinstance(shape, Rect):
        opacity = f' fill-opacity="{shape.opacity}"' if shape.opacity < 1 else ""
        return (
            f'<rect x="{n(shape.x)}" y="{n(shape.y)}" width="{n(shape.width)}"'
            f' height="{n(shape.height)}" fill="{shape.color}"{opacity}/>'
        )
    if isinstance(shape, Polyline):
        points = " ".join(f"{n(x)},{n(y)}" for x, y in shape.points)
        return (
            f'<polyline points="{points}" fill="none" stroke="{shape.color}"'
            f' stroke-width="{n(shape.width)}"/>'
        )
    if isinstance(shape, Polygon):
        points = " ".join(f"{n(x)},{n(y)}" for x, y in shape.points)
        return f'<polygon points="{points}" fill="{shape.color}"/>'
    weight = ' font-weight="bold"' if shape.bold else ""
    # SVG places text by its baseline; a third of the size lower centers it.
    return (
        f'<text x="{n(shape.x)}" y="{n(shape.y + shape.size * 0.35)}"'
        f' font-size="{n(shape.size)}" fill="{shape.color}"'
        f" text-anchor={quoteattr(shape.anchor)}{weight}>{escape(shape.text)}</text>"
    )


PNG_DPI = 100


def write_png(canvas: Canvas, path: str) -> None:
    """Draw ``canvas`` with matplotlib into a PNG file of the same pixel size.

    Consecutive lines, rectangles and polygons of one style become one
    matplotlib collection, which keeps the drawing order and is fast.
    Raises ``ImportError`` when matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = PNG_DPI
    figure = Figure(figsize=(canvas.width / dpi, canvas.height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, canvas.width)
    axes.set_ylim(canvas.height, 0)
    axes.set_axis_off()
    batch: list[Shape] = []
    order = 0
    for shape in [*canvas.shapes, None]:
        if batch and (shape is None or _png_style(shape) != _png_style(batch[0])):
            order += 1
            _draw_png_batch(axes, batch, order, 72 / dpi)
            batch = []
        if shape is not None:
            batch.append(shape)
    figure.savefig(path, format="png", dpi=dpi)


def _png_style(shape: Shape) -> tuple[Any, ...]:
    """Shapes with equal styles are drawn as one collection."""
    if isinstance(shape, Line):
        return ("line", shape.color, shape.width, shape.dash, shape.opacity)
    if isinstance(shape, (Rect, Polygon)):
        return ("fill", shape.color, shape.opacity)
    return ("single", id(shape))


def _draw_png_batch(
    axes: Any, batch: list[Shape], order: int, points_per_px: float
) -> None:
    from matplotlib.collections import LineCollection, PolyCollection

    first = batch[0]
    if isinstance(first, Line):
        segments = [((s.x1, s.y1), (s.x2, s.y2)) for s in batch if isinstance(s, Line)]
        axes.add_collection(
            LineCollection(
                segments,
                colors=first.color,
                linewidths=first.width * points_per_px,
                linestyles=(0, (3, 2)) if first.dash else "solid",
                alpha=first.opacity,
                zorder=order,
            )
        )
    elif isinstance(first, (Rect, Polygon)):
        polygons = [_corners(shape) for shape in batch]
        axes.add_collection(
            PolyCollection(
                polygons,
                facecolors=first.color,
                edgecolors="none",
                alpha=first.opacity,
                zorder=order,
            )
        )
    elif isinstance(first, Polyline):
        xs = [x for x, _ in first.points]
        ys = [y for _, y in first.points]
        axes.plot(
            xs,
            ys,
            color=first.color,
            linewidth=first.width * points_per_px,
            zorder=order,
        )
    elif isinstance(first, Text):
        axes.text(
            first.x,
            first.y,
            first.text,
            fontsize=first.size * points_per_px,
            color=first.color,
            ha={"start": "left", "middle": "center", "end": "right"}[first.anchor],
            va="center",
            family="monospace",
            fontweight="bold" if first.bold else "normal",
            zorder=order,
        )


def _corners(shape: Shape) -> tuple[tuple[float, float], ...]:
    if isinstance(shape, Rect):
        x, y, width, height = shape.x, shape.y, shape.width, shape.height
        return ((x, y), (x + width, y), (x + width, y + height), (x, y + height))
    assert isinstance(shape, Polygon)
    return shape.points


def write_text(runs: Sequence[Run], out: TextIO) -> None:
    """Write one line per event: time, lane, step number and name, packet."""
    compare = len(runs) > 1
    for run in runs:
        stats = run.stats
        out.write(
            f"# {run.title}: {stats.packets} packets, {stats.kicks} kicks,"
            f" {stats.vm_exits} VM exits, {stats.interrupts} interrupts,"
            f" {stats.timer_fires} timer fires, run {format_span(run.end_ns)}\n"
        )
        prefix = f"{run.tx_mode:<13}" if compare else ""
        for event in run.events:
            out.write(
                f"{prefix}{event.time_ns / 1000:>12.3f} us  "
                f"{event.kind.side.value:<5}  {event.label}\n"
            )


# -- the command -------------------------------------------------------------------


def command(args: Any) -> int:
    """Run ``virtio-net-emu timeline``; return the exit code."""
    from backends.errors import CaptureError
    from virtio.errors import UsageError

    from .cli import TX_MODES, UserError

    modes = _compare_modes(args.compare, TX_MODES, UserError)
    if modes and args.tx_mode is not None:
        raise UserError("use either --tx-mode or --compare, not both")
    output = args.output
    suffix = os.path.splitext(output)[1].lower()
    if output != "-" and suffix not in (".svg", ".png"):
        raise UserError(
            f"cannot tell the picture format of {output!r}: name it .svg or .png,"
            " or use - for text"
        )
    if suffix == ".png":
        _require_matplotlib(UserError)
    options = {"event_idx": False} if args.no_event_idx else {}
    try:
        runs = [
            build_run(
                args.scenario,
                tx_mode=mode,
                queue_size=args.queue_size,
                max_skb_frags=args.max_skb_frags,
                rate=args.rate,
                **options,
            )
            for mode in (modes or [args.tx_mode])
        ]
    except (ValueError, CaptureError, UsageError) as error:
        raise UserError(str(error)) from None
    if output == "-":
        try:
            write_text(runs, sys.stdout)
        except BrokenPipeError:
            # The reader (a pager, head) went away: stop quietly, as cat does.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    title = None
    if len(runs) > 1:
        title = f"scenario {os.path.basename(args.scenario)}: " + " vs ".join(
            f"tx-mode {run.tx_mode}" for run in runs
        )
    canvas = layout(runs, title)
    try:
        if output.lower().endswith(".png"):
            write_png(canvas, output)
        else:
            with open(output, "w", encoding="utf-8") as file:
                write_svg(canvas, file)
    except OSError as error:
        raise UserError(
            f"cannot write {output}: {error.strerror or error}; check that the"
            " directory exists and is writable"
        ) from None
    return 0


def _compare_modes(
    text: str | None, known: Sequence[str], user_error: type[Exception]
) -> list[str]:
    if text is None:
        return []
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in known]
    if unknown or not 2 <= len(modes) <= 4:
        raise user_error(
            f"invalid --compare {text!r}: use two to four TX modes separated by"
            f" commas, from {', '.join(known)}"
        )
    return modes


def _require_matplotlib(user_error: type[Exception]) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise user_error(
            "PNG output needs matplotlib: pip install matplotlib (or the"
            " project's plot extra: pip install '.[plot]'), or write SVG"
            " (-o FILE.svg)"
        ) from None
