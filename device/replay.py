"""``virtio-net-emu run`` and ``replay``: captures through the guest and the device.

Every frame of a pcap or pcapng capture goes through the guest driver model
(qdisc, start_xmit, the TX ring, the kick), the device's TX batching and the
backend, as a frame an application in the guest sends. The device logic runs
in virtual time and the backend does real I/O.

Without pacing the guest sends as fast as it can. The machine runs in
virtual time, and a BUSY backend stops it until the backend's
``writable_fileno`` polls writable. The guest is fed no more frames than
its qdisc takes, so backpressure loses nothing. With ``--pace`` (the
capture's own gaps) or ``--rate`` the machine runs on an ``EventLoop`` with
its clock slaved to real time (``LiveMachine``).

Frames are counted in one place each: ``sent`` (the backend took them) or
``dropped`` under a reason. Before a frame reaches the guest, one over 65550
bytes counts as "frame-too-large" and an empty one as "frame-empty". The
guest's and the device's reasons follow (see ``device.stats`` and
``device.guest.stats``), and then the backend's own reasons in place of the
device's "backend-rejected". At the end ``frames == sent + sum(dropped)``.

NOTE: without ``--netns`` a TAP is created in the current network namespace,
and its kernel may route the replayed frames onwards. Replay into a
namespace of its own unless that is intended.
"""

from __future__ import annotations

import argparse
import collections
import errno
import logging
import math
import os
import selectors
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from backends import (
    Backend,
    BackendError,
    CaptureError,
    LoopbackBackend,
    NamespaceNotFoundError,
    PcapBackend,
    TapBackend,
    read_capture,
)

from .cli import TX_MODES, UserError, print_json
from .features import DEFAULT_OFFER, NetFeature
from .guest import GOOD_PACKET_LEN, GuestConfig
from .header import MAX_FRAME_SIZE
from .live import LiveMachine
from .machine import TX_QUEUE, Machine
from .scenarios import SAMPLE_CAPTURE

__all__ = [
    "ReplayReport",
    "CaptureSummary",
    "open_backend",
    "replay",
    "replay_command",
    "run_command",
    "scan_capture",
]

logger = logging.getLogger(__name__)

MAX_QUEUE_SIZE = 32768
"""Largest split virtqueue (virtio 1.2, 2.7)."""
FEED_CHUNK = 256
"""Frames handed to the guest at a time when it sends as fast as it can."""
POLL_QDISC_NS = 100_000
"""Wait before a paced frame tries a full qdisc again."""
PROGRESS_MIN_FRAMES = 5000
"""Captures shorter than this show no progress bar."""
WRITABLE_TIMEOUT_S = 1.0


@dataclass
class CaptureSummary:
    """Frame count, sizes and first timestamp of a capture, from a first pass."""

    frames: int = 0
    bytes: int = 0
    largest: int = 0
    """Maximum length of a frame the device accepts (at most 65550), 0 if none."""
    first_timestamp: float = math.nan


@dataclass
class ReplayReport:
    """Figures of one replay, as the JSON output carries them."""

    capture: str
    backend: str
    frames: int = 0
    """Frames read from the capture."""
    bytes: int = 0
    sent: int = 0
    """Frames the backend took."""
    sent_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    kicks: int = 0
    kicks_suppressed: int = 0
    vm_exits: int = 0
    interrupts: int = 0
    interrupts_suppressed: int = 0
    timer_fires: int = 0
    bh_runs: int = 0
    backend_busy: int = 0
    """Sends for which the backend returned BUSY. Each frame was sent again later."""
    virtual_ns: int = 0
    elapsed_s: float = 0.0
    tx_mode: str = "bh"
    queue_size: int = 256
    event_idx: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the capture -----------------------------------------------------------------


def _frames(path: str | os.PathLike[str]) -> Iterator[tuple[float, bytes]]:
    """Yield the capture's frames, turning read errors into UserError."""
    try:
        yield from read_capture(path)
    except CaptureError as exc:
        raise UserError(str(exc)) from exc


def scan_capture(path: str | os.PathLike[str]) -> CaptureSummary:
    """Read the whole capture once: count, size and first timestamp.

    Raises UserError for a missing, unreadable or malformed capture and for
    one of a link type other than Ethernet.
    """
    summary = CaptureSummary()
    for timestamp, frame in _frames(path):
        if summary.frames == 0:
            summary.first_timestamp = timestamp
        summary.frames += 1
        summary.bytes += len(frame)
        if len(frame) <= MAX_FRAME_SIZE:
            summary.largest = max(summary.largest, len(frame))
    return summary


# -- backends ------------------------------------------------------------------


def open_backend(
    spec: str,
    netns: str | None = None,
    clock: Callable[[], float] = time.time,
) -> Backend:
    """Open the backend ``spec`` names: ``pcap:PATH``, ``tap:IFNAME`` or ``loopback``.

    A TAP is created in ``netns`` (or the current namespace) unless it exists,
    in which case this attaches to it. ``clock`` gives the timestamps of a
    pcap file's records. Raises UserError for an invalid spec and for every
    failure a user can fix: a capture file that cannot be created, no
    permission for /dev/net/tun, a namespace that does not exist.
    """
    kind, _, argument = spec.partition(":")
    if netns is not None and kind != "tap":
        raise UserError(f"--netns {netns} needs a tap:IFNAME backend, not {spec!r}")
    if kind == "loopback" and not argument:
        return LoopbackBackend(discard=True)
    if kind == "pcap" and argument:
        try:
            return PcapBackend(argument, clock=clock)
        except CaptureError as exc:
            raise UserError(str(exc)) from exc
    if kind == "tap" and argument:
        return open_tap(argument, netns)
    raise UserError(f"invalid backend {spec!r}: use pcap:PATH, tap:IFNAME or loopback")


def open_tap(name: str, netns: str | None, **options: Any) -> TapBackend:
    """Create TAP ``name`` (or attach to it if it exists); raise UserError on failure."""
    try:
        try:
            return TapBackend(name, netns=netns, **options)
        except BackendError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # The name exists: attach to it instead of creating it.
            return TapBackend(name, netns=netns, attach=True, **options)
    except NamespaceNotFoundError as exc:
        raise UserError(str(exc)) from exc
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    except BackendError as exc:
        raise UserError(str(exc)) from exc


# -- the machine ---------------------------------------------------------------


def check_queue_size(size: int) -> None:
    """Raise UserError unless ``size`` is a power of two from 2 to 32768."""
    if size < 2 or size > MAX_QUEUE_SIZE or size & (size - 1):
        raise UserError(
            f"invalid --queue-size {size}: use a power of two from 2 to"
            f" {MAX_QUEUE_SIZE}"
        )


def build_machine(
    backend: Backend,
    *,
    tx_mode: str,
    queue_size: int,
    event_idx: bool,
    largest: int,
) -> Machine:
    """Return a machine whose guest can send frames up to ``largest`` bytes.

    The device does not offer MTU, so the only limit on a frame is the
    device's 65550 bytes, not a negotiated MTU of 1500.
    """
    try:
        config = GuestConfig(
            queue_size=queue_size,
            event_idx=event_idx,
            tx_max_frame=min(max(largest, GOOD_PACKET_LEN), MAX_FRAME_SIZE),
        )
    except ValueError as exc:
        raise UserError(f"invalid guest settings: {exc}") from exc
    return Machine(
        guest=config,
        tx_mode=tx_mode,
        backend=backend,
        keep_log=False,
        offered=DEFAULT_OFFER & ~NetFeature.MTU,
    )


def frames_done(machine: Machine) -> int:
    """Return the packets the guest handed over that were sent or dropped."""
    tx = machine.device.stats.queue(TX_QUEUE)
    return tx.frames + sum(tx.drops.values()) + sum(machine.guest.stats.drops.values())


def _tx_pending(machine: Machine) -> bool:
    tx = machine.device.tx
    return tx is not None and tx.pending is not None


# -- sending -------------------------------------------------------------------


class _Counter:
    """Frames read from the capture and the ones refused before the guest."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self.frames = 0
        self.bytes = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.progress = progress

    def sendable(
        self, frames: Iterator[tuple[float, bytes]]
    ) -> Iterator[tuple[float, bytes]]:
        """Yield the frames the guest can send; count the others by reason."""
        for timestamp, frame in frames:
            self.frames += 1
            self.bytes += len(frame)
            if self.progress is not None:
                self.progress(self.frames)
            if not frame:
                self.refused["frame-empty"] += 1
            elif len(frame) > MAX_FRAME_SIZE:
                self.refused["frame-too-large"] += 1
            else:
                yield timestamp, frame


def _send_unpaced(machine: Machine, frames: Iterator[tuple[float, bytes]]) -> None:
    """Send every frame as fast as the guest can, in virtual time."""
    guest = machine.guest
    limit = guest.config.qdisc_limit
    selector = selectors.DefaultSelector()
    try:
        exhausted = False
        while True:
            if not exhausted:
                room = min(FEED_CHUNK, limit - len(guest.qdisc))
                chunk = [frame for _, frame in _take(frames, room)]
                exhausted = len(chunk) < room
                machine.send_many(chunk)
            machine.run()
            if machine.device.broken:
                # The device takes no more chains; the report shows the rest
                # as unaccounted for.
                return
            if _tx_pending(machine):
                _wait_writable(machine.backend, selector)
                machine.backend_writable()
            elif exhausted and machine.idle:
                return
    finally:
        selector.close()


def _take(
    frames: Iterator[tuple[float, bytes]], count: int
) -> Iterator[tuple[float, bytes]]:
    for _ in range(count):
        item = next(frames, None)
        if item is None:
            return
        yield item


def _wait_writable(backend: Backend, selector: selectors.BaseSelector) -> None:
    """Block until the backend may take a frame again (or a short while passed)."""
    fd = backend.writable_fileno()
    if fd is None:
        time.sleep(0.001)
        return
    selector.register(fd, selectors.EVENT_WRITE)
    try:
        selector.select(WRITABLE_TIMEOUT_S)
    finally:
        selector.unregister(fd)


def _send_paced(
    machine: Machine,
    frames: Iterator[tuple[float, bytes]],
    rate_pps: float | None,
) -> LiveMachine:
    """Send frames at the capture's own pace or at ``rate_pps``, in real time."""
    live = LiveMachine(machine, receive=False)
    feeder = _PacedFeeder(live, frames, rate_pps)
    live.on_pump = feeder.admit
    live.stop_when = feeder.finished
    try:
        live.run()
    finally:
        live.close()
    return live


class _PacedFeeder:
    """Hands frames to the guest when their time comes and its qdisc has room.

    A frame whose time came while the qdisc is full waits, as an application
    whose send blocks, so pacing never drops a frame in the guest. It then
    leaves late.
    """

    def __init__(
        self,
        live: LiveMachine,
        frames: Iterator[tuple[float, bytes]],
        rate_pps: float | None,
    ) -> None:
        self.live = live
        self.machine = live.machine
        self.frames = frames
        self.rate_pps = rate_pps
        self.start_ns = self.machine.clock.now_ns()
        self.index = 0
        self.first = math.nan
        self.exhausted = False
        self._due: int = self.start_ns
        self._next: bytes | None = None
        self._wake_at: int | None = None
        self._advance()

    def _advance(self) -> None:
        item = next(self.frames, None)
        if item is None:
            self.exhausted = True
            self._next = None
            return
        timestamp, frame = item
        # Frames keep the capture's order even where timestamps go back.
        self._due = max(self._due, self.start_ns + self._offset_ns(timestamp))
        self._next = frame
        self.index += 1

    def _offset_ns(self, timestamp: float) -> int:
        if self.rate_pps is not None:
            return round(self.index * 1e9 / self.rate_pps)
        if math.isnan(timestamp):
            return 0
        if math.isnan(self.first):
            self.first = timestamp
        return round((timestamp - self.first) * 1e9)

    def admit(self) -> None:
        """Hand over every frame that is due, as far as the qdisc has room."""
        machine = self.machine
        clock = machine.clock
        now = max(self.live.loop.now_ns(), clock.now_ns())
        room = machine.guest.config.qdisc_limit - len(machine.guest.qdisc)
        while self._next is not None and self._due <= now:
            if room <= 0:
                # Come back when the guest had time to drain its qdisc.
                self._wake(now + POLL_QDISC_NS)
                return
            machine.send(self._next)
            room -= 1
            self._advance()
        if self._next is not None:
            self._wake(self._due)

    def _wake(self, when_ns: int) -> None:
        if self._wake_at == when_ns:
            return
        self._wake_at = when_ns
        self.machine.clock.call_at(when_ns, self.live.pump)

    def finished(self) -> bool:
        machine = self.machine
        if machine.device.broken:
            # A broken device takes no more chains, so waiting is useless.
            return True
        return (
            self.exhausted
            and not _tx_pending(machine)
            and frames_done(machine) == machine.packets
        )


# -- the report ----------------------------------------------------------------


def _report(
    machine: Machine,
    counter: _Counter,
    capture: str,
    backend_spec: str,
    elapsed_s: float,
) -> ReplayReport:
    stats = machine.stats()
    backend = machine.backend
    dropped: collections.Counter[str] = collections.Counter(counter.refused)
    dropped.update(stats.drops)
    # The device counts every frame the backend rejected as "backend-rejected".
    # The backend's own reasons name the cause, so they replace that count.
    device_rejected = machine.device.stats.queue(TX_QUEUE).drops["backend-rejected"]
    dropped["backend-rejected"] -= device_rejected
    dropped.update(backend.drops)
    config = machine.guest.config
    return ReplayReport(
        capture=capture,
        backend=backend_spec,
        frames=counter.frames,
        bytes=counter.bytes,
        sent=stats.frames,
        sent_bytes=stats.bytes,
        dropped={reason: count for reason, count in sorted(dropped.items()) if count},
        kicks=stats.kicks,
        kicks_suppressed=stats.kicks_suppressed,
        vm_exits=stats.vm_exits,
        interrupts=stats.interrupts,
        interrupts_suppressed=stats.interrupts_suppressed,
        timer_fires=stats.timer_fires,
        bh_runs=stats.bh_runs,
        backend_busy=backend.send_busy,
        virtual_ns=stats.time_ns,
        elapsed_s=round(elapsed_s, 6),
        tx_mode=machine.device.tx_mode,
        queue_size=config.queue_size,
        event_idx=config.event_idx,
    )


def replay(
    capture: str | os.PathLike[str],
    backend: Backend,
    *,
    backend_spec: str = "",
    summary: CaptureSummary | None = None,
    tx_mode: str = "bh",
    queue_size: int = 256,
    event_idx: bool = True,
    pace: bool = False,
    rate_pps: float | None = None,
    progress: Callable[[int], None] | None = None,
    on_machine: Callable[[Machine], None] | None = None,
) -> ReplayReport:
    """Send every frame of ``capture`` through a guest and a device into ``backend``.

    ``summary`` is the result of ``scan_capture`` when the caller has it.
    ``progress`` is called with the number of frames read so far, and
    ``on_machine`` with the machine before any frame is sent. The caller
    closes ``backend``. Raises UserError for capture errors and an invalid
    queue size or rate.
    """
    check_queue_size(queue_size)
    if rate_pps is not None and not rate_pps > 0:
        raise UserError(
            f"invalid --rate {rate_pps}: use a number of frames per second above 0"
        )
    if summary is None:
        summary = scan_capture(capture)
    machine = build_machine(
        backend,
        tx_mode=tx_mode,
        queue_size=queue_size,
        event_idx=event_idx,
        largest=summary.largest,
    )
    if on_machine is not None:
        on_machine(machine)
    counter = _Counter(progress)
    frames = counter.sendable(_frames(capture))
    started = time.monotonic()
    if pace or rate_pps is not None:
        _send_paced(machine, frames, rate_pps)
    else:
        _send_unpaced(machine, frames)
    elapsed = time.monotonic() - started
    report = _report(machine, counter, os.fspath(capture), backend_spec, elapsed)
    unaccounted = report.frames - report.sent - sum(report.dropped.values())
    if unaccounted:
        # Not expected: every frame ends sent or dropped before replay returns.
        logger.error("replay of %s: %d frames unaccounted for", capture, unaccounted)
    return report


# -- the progress bar ------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on a terminal, redrawn at most 10 times a second."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self._next_draw = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now < self._next_draw and done < self.total:
            return
        self._next_draw = now + 0.1
        width = 40
        filled = width * done // self.total
        percent = 100 * done // self.total
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r[{bar}] {percent:3d}% {done}/{self.total} frames")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


def _progress_for(total: int) -> ProgressBar | None:
    if total < PROGRESS_MIN_FRAMES:
        return None
    if not sys.stderr.isatty():
        return None
    return ProgressBar(total)


# -- the commands --------------------------------------------------------------


def _capture_clock(
    summary: CaptureSummary, holder: dict[str, Machine]
) -> Callable[[], float]:
    """Return a pcap clock: the capture's first timestamp plus virtual time."""
    base = summary.first_timestamp
    if math.isnan(base):
        base = time.time()

    def clock() -> float:
        machine = holder.get("machine")
        return base + (machine.clock.now_ns() / 1e9 if machine is not None else 0.0)

    return clock


def _run_replay(
    capture: str,
    backend_spec: str,
    netns: str | None,
    args: argparse.Namespace,
    pace: bool = False,
    rate_pps: float | None = None,
) -> ReplayReport:
    check_queue_size(args.queue_size)
    summary = scan_capture(capture)
    holder: dict[str, Machine] = {}
    backend = open_backend(backend_spec, netns, clock=_capture_clock(summary, holder))
    progress = _progress_for(summary.frames)
    try:
        return replay(
            capture,
            backend,
            backend_spec=backend_spec,
            summary=summary,
            tx_mode=args.tx_mode,
            queue_size=args.queue_size,
            event_idx=not args.no_event_idx,
            pace=pace,
            rate_pps=rate_pps,
            progress=progress,
            on_machine=lambda machine: holder.update(machine=machine),
        )
    finally:
        if progress is not None:
            progress.close()
        backend.close()


def print_report(report: ReplayReport) -> None:
    """Print a report as a few lines of text."""
    print(f"replayed {report.capture} to {report.backend}")
    print(f"  frames: {report.frames} ({report.bytes} bytes)")
    print(f"  sent: {report.sent} ({report.sent_bytes} bytes)")
    print(f"  kicks: {report.kicks} ({report.kicks_suppressed} suppressed)")
    print(f"  VM exits: {report.vm_exits}")
    print(
        f"  interrupts: {report.interrupts}"
        f" ({report.interrupts_suppressed} suppressed)"
    )
    print(f"  timer fires: {report.timer_fires}, bottom halves: {report.bh_runs}")
    print(f"  backend busy: {report.backend_busy}")
    if report.dropped:
        drops = ", ".join(
            f"{reason} {count}" for reason, count in report.dropped.items()
        )
    else:
        drops = "none"
    print(f"  dropped: {drops}")
    print(
        f"  virtual time: {report.virtual_ns} ns, real time: {report.elapsed_s:.3f} s"
    )


def run_command(args: argparse.Namespace) -> int:
    """``run``: the bundled sample capture into a pcap file in this folder."""
    report = _run_replay(str(SAMPLE_CAPTURE), f"pcap:{args.output}", None, args)
    report.capture = SAMPLE_CAPTURE.name
    if args.json:
        print_json(report.to_dict())
    else:
        print_report(report)
    return 0


def replay_command(args: argparse.Namespace) -> int:
    """``replay CAPTURE --to BACKEND``."""
    if args.tx_mode not in TX_MODES:
        raise UserError(f"invalid --tx-mode {args.tx_mode}: use one of {TX_MODES}")
    report = _run_replay(
        args.capture, args.to, args.netns, args, pace=args.pace, rate_pps=args.rate
    )
    if args.json:
        print_json(report.to_dict())
    else:
        print_report(report)
    return 0
