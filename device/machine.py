"""A whole virtual machine in virtual time: guest driver, device, clock, backend.

``Machine`` wires one ``VirtioNetDriver`` to one ``VirtioNetDevice`` through
a kick notifier (driver to device) and a ``CallbackInterrupt`` (device to
driver), on one ``VirtualClock``, with one backend and one ``Trace``.

Time moves only in ``step``. The guest has one vCPU: frames handed to
``send`` arrive on its qdisc at their time, and the guest then runs
start_xmit for them, charging each step's cost to the clock. Host timers
(the TX timer, a bottom half, a deferred kick) fire inside those charges, at
their own deadlines. An interrupt only marks work for the guest, which runs
it (NAPI polls, the qdisc) after the current event, as softirqs run after a
hard IRQ. ``step`` does one event: pending guest work, the next arrival, or
the host timers of the next deadline. A step debugger drives ``step`` and
listens on the trace.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from backends.base import Backend
from backends.loopback import LoopbackBackend, NullBackend

from .clock import VirtualClock
from .features import DEFAULT_OFFER
from .guest import ControlQueue, GuestConfig, VirtioNetDriver
from .net_device import CTRL_QUEUE, RX_QUEUE, TX_QUEUE, VirtioNetDevice
from .notifier import (
    DEFAULT_EXIT_COST_NS,
    CallbackInterrupt,
    DirectKick,
    KickNotifier,
    PioExitKick,
)
from .rx import DEFAULT_HOLD_LIMIT, RxResult
from .trace import RingState, Step, Trace
from .tx_policy import DEFAULT_BH_DELAY_NS, DEFAULT_TX_BURST, DEFAULT_TX_TIMEOUT_NS

__all__ = [
    "Machine",
    "MachineStats",
    "IoeventfdKick",
    "KICK_MODES",
    "DEFAULT_IOEVENTFD_EXIT_NS",
    "DEFAULT_WAKEUP_NS",
    "CTRL_QUEUE",
    "RX_QUEUE",
    "TX_QUEUE",
]

KICK_MODES = ("pio", "direct", "ioeventfd")
DEFAULT_IOEVENTFD_EXIT_NS = 1_000
"""Guest time of a notify write that KVM turns into an eventfd signal. An
estimate: the exit stays in the kernel, so it costs less than a PIO exit."""
DEFAULT_WAKEUP_NS = 5_000
"""Virtual time from the eventfd signal to the host thread handling the kick.
An estimate of a thread wake-up on an idle host core."""
BACKEND_CAPACITY = 1 << 20
"""Frames the default loopback backend keeps before evicting the oldest."""


class IoeventfdKick(KickNotifier):
    """A kick through an ioeventfd: the host handles it later, on its own thread.

    The guest pays a short exit and goes on; the device's handler runs
    ``wakeup_ns`` after the first kick. Kicks that arrive before that are
    coalesced into the same wake-up, as writes to one eventfd are. Records
    steps 5 to 7 when the guest kicks and step 8 when the host wakes up.
    """

    def __init__(
        self,
        clock: VirtualClock,
        trace: Trace | None = None,
        exit_cost_ns: int = DEFAULT_IOEVENTFD_EXIT_NS,
        wakeup_ns: int = DEFAULT_WAKEUP_NS,
        packet: Callable[[], int | None] = lambda: None,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.trace = trace if trace is not None else Trace(enabled=False)
        self.exit_cost_ns = exit_cost_ns
        self.wakeup_ns = wakeup_ns
        self.packet = packet
        self.vm_exits = 0
        self.coalesced = 0
        self._pending: dict[int, Any] = {}

    def notify(self, queue: int) -> None:
        trace = self.trace
        packet = self.packet()
        if trace.enabled:
            trace.record(Step.VP_NOTIFY, packet)
            trace.record(Step.PIO_WRITE, packet, f"queue index {queue}, ioeventfd")
            trace.record(Step.VM_EXIT, packet, "handled in the kernel")
        self.kicks += 1
        self.vm_exits += 1
        if queue in self._pending:
            self.coalesced += 1
        else:
            wake = functools.partial(self._wake, queue)
            self._pending[queue] = self.clock.call_later(self.wakeup_ns, wake)
        self.clock.advance(self.exit_cost_ns)

    def _wake(self, queue: int) -> None:
        del self._pending[queue]
        if self.trace.enabled:
            self.trace.record(Step.VMM_HANDLE_PIO, None, f"eventfd of queue {queue}")
        self.handler(queue)


@dataclass
class MachineStats:
    """Device and guest figures of one run, merged."""

    time_ns: int = 0
    packets: int = 0
    """Frames handed to ``send``."""
    frames: int = 0
    """TX frames the device handed to the backend."""
    bytes: int = 0
    rx_frames: int = 0
    """Frames the guest received."""
    rx_bytes: int = 0
    kicks: int = 0
    """TX notifications the guest sent."""
    kicks_suppressed: int = 0
    kicks_deferred: int = 0
    device_kicks: int = 0
    """TX kicks the device handled (fewer than ``kicks`` when coalesced)."""
    vm_exits: int = 0
    """Exits of the kick notifier, for the kicks of every queue."""
    interrupts: int = 0
    """TX used buffer notifications the device sent."""
    interrupts_suppressed: int = 0
    rx_interrupts: int = 0
    timer_arms: int = 0
    timer_fires: int = 0
    bh_runs: int = 0
    queue_stops: int = 0
    queue_wakes: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    @property
    def kicks_per_packet(self) -> float:
        return self.kicks / self.frames if self.frames else 0.0

    @property
    def interrupts_per_packet(self) -> float:
        return self.interrupts / self.frames if self.frames else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["kicks_per_packet"] = self.kicks_per_packet
        data["interrupts_per_packet"] = self.interrupts_per_packet
        return data


class Machine:
    """One guest driver model and one device, wired together in virtual time.

    ``kick`` selects the notifier: "pio" (``PioExitKick``, a trapped write
    handled on the vCPU), "direct" (``DirectKick``, free) or "ioeventfd"
    (``IoeventfdKick``, handled later on a host thread). ``trace`` is a
    ``Trace`` or a bool that turns a new one on. The device options are
    those of ``VirtioNetDevice``. Without ``backend`` a ``LoopbackBackend``
    keeps the frames sent, or a ``NullBackend`` counts them when
    ``keep_log`` is False.
    """

    def __init__(
        self,
        *,
        guest: GuestConfig | None = None,
        tx_mode: str = "bh",
        kick: str = "pio",
        backend: Backend | None = None,
        trace: bool | Trace = False,
        offered: int = DEFAULT_OFFER,
        mtu: int = 1500,
        tx_timeout_ns: int = DEFAULT_TX_TIMEOUT_NS,
        tx_burst: int = DEFAULT_TX_BURST,
        bh_delay_ns: int = DEFAULT_BH_DELAY_NS,
        hold_limit: int = DEFAULT_HOLD_LIMIT,
        exit_cost_ns: int | None = None,
        wakeup_ns: int = DEFAULT_WAKEUP_NS,
        keep_log: bool = True,
    ) -> None:
        self.clock = VirtualClock()
        self.trace = trace if isinstance(trace, Trace) else Trace(enabled=trace)
        self.trace.time_source = self.clock.now_ns
        self.trace.state_source = self.ring_state

        if backend is None:
            backend = (
                LoopbackBackend(capacity=BACKEND_CAPACITY)
                if keep_log
                else NullBackend()
            )
        self.backend = backend
        self.interrupts = CallbackInterrupt()
        self.device = VirtioNetDevice(
            backend,
            interrupts=self.interrupts,
            clock=self.clock,
            trace=self.trace,
            offered=offered,
            mtu=mtu,
            tx_mode=tx_mode,
            tx_timeout_ns=tx_timeout_ns,
            tx_burst=tx_burst,
            bh_delay_ns=bh_delay_ns,
            hold_limit=hold_limit,
        )
        self.kick = self._make_kick(kick, exit_cost_ns, wakeup_ns)
        self.kick.connect(self.device.handle_kick)

        self.guest = VirtioNetDriver(
            self.device,
            self.clock,
            self.kick.notify,
            config=guest,
            trace=self.trace,
            keep_log=keep_log,
        )
        self.interrupts.on_interrupt = self.guest.interrupt
        self.interrupts.on_config = self.guest.config_interrupt

        self.drops: collections.Counter[str] = collections.Counter()
        self.packets = 0
        self._arrivals: list[tuple[int, int, int, bytes]] = []
        self._order = itertools.count()
        self.guest.probe()

    def _make_kick(
        self, kick: str, exit_cost_ns: int | None, wakeup_ns: int
    ) -> KickNotifier:
        def packet() -> int | None:
            return self.guest.ctx.packet

        if kick == "direct":
            return DirectKick()
        if kick == "pio":
            cost = DEFAULT_EXIT_COST_NS if exit_cost_ns is None else exit_cost_ns
            return PioExitKick(self.clock, self.trace, cost, packet)
        if kick == "ioeventfd":
            cost = DEFAULT_IOEVENTFD_EXIT_NS if exit_cost_ns is None else exit_cost_ns
            return IoeventfdKick(self.clock, self.trace, cost, wakeup_ns, packet)
        names = ", ".join(KICK_MODES)
        raise ValueError(f"unknown kick mode {kick!r}: use one of {names}")

    # -- input ----------------------------------------------------------------------

    @property
    def now_ns(self) -> int:
        return self.clock.now_ns()

    def send(self, frame: bytes, at_ns: int | None = None) -> int:
        """Schedule one frame for the guest to send; return its packet number.

        The frame reaches the qdisc at ``at_ns`` (default: now) when the
        machine runs. Raises ``ValueError`` for a frame the guest's buffers
        cannot hold and for a time in the past.
        """
        when = self.now_ns if at_ns is None else at_ns
        if when < self.now_ns:
            raise ValueError(f"send time {when} ns is before now ({self.now_ns} ns)")
        frame = bytes(frame)
        limit = self.guest.config.tx_max_frame
        if not 0 < len(frame) <= limit:
            raise ValueError(
                f"frame of {len(frame)} bytes is invalid: use 1 to {limit} bytes"
            )
        packet = self.packets
        self.packets += 1
        heapq.heappush(self._arrivals, (when, next(self._order), packet, frame))
        return packet

    def send_many(
        self, frames: Iterable[bytes], gap_ns: int = 0, start_ns: int | None = None
    ) -> list[int]:
        """Schedule frames ``gap_ns`` apart from ``start_ns`` (default: now).

        With a gap of 0 they all arrive at once, so the guest sends them as
        one xmit_more batch. Returns their packet numbers.
        """
        if gap_ns < 0:
            raise ValueError(f"gap of {gap_ns} ns is invalid: use 0 or more")
        when = self.now_ns if start_ns is None else start_ns
        packets = []
        for frame in frames:
            packets.append(self.send(frame, when))
            when += gap_ns
        return packets

    def deliver_rx(
        self, frame: bytes, header: bytes | None = None, at_ns: int | None = None
    ) -> RxResult | None:
        """Offer one frame from the network to the device.

        Without ``at_ns`` the device takes it now, after the events already
        due, and the guest handles the interrupt before this returns; the
        returned ``RxResult`` is what the device did with it. With ``at_ns`` it arrives then, as a
        host event, and None is returned.
        """
        if at_ns is None:
            self.run_until(self.now_ns)
            result = self.device.receive(header, bytes(frame))
            self.guest.run_softirqs()
            return result
        data = bytes(frame)
        self.clock.call_at(at_ns, lambda: self.device.receive(header, data))
        return None

    def deliver_rx_many(
        self, frames: Iterable[bytes], gap_ns: int = 0, start_ns: int | None = None
    ) -> None:
        """Schedule frames from the network ``gap_ns`` apart."""
        when = self.now_ns if start_ns is None else start_ns
        for frame in frames:
            self.deliver_rx(frame, at_ns=when)
            when += gap_ns

    def backend_writable(self) -> None:
        """Tell the device its backend takes frames again, then run the guest."""
        self.device.backend_writable()
        self.guest.run_softirqs()

    def reset(self) -> None:
        """Reset the device from the guest and probe again (``VirtioNetDriver.reset``)."""
        self.guest.reset()

    # -- running ----------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing is pending: no guest work, no arrival, no host timer."""
        return (
            not self.guest.softirq_pending
            and not self._arrivals
            and self.clock.next_deadline() is None
        )

    def next_event_ns(self) -> int | None:
        """Time of the next arrival or host timer, or None."""
        times = [self._arrivals[0][0]] if self._arrivals else []
        deadline = self.clock.next_deadline()
        if deadline is not None:
            times.append(deadline)
        return min(times) if times else None

    def step(self) -> bool:
        """Run one event; return False when nothing was left to run."""
        guest = self.guest
        if guest.softirq_pending:
            guest.run_softirqs()
            return True
        clock = self.clock
        arrival = self._arrivals[0][0] if self._arrivals else None
        deadline = clock.next_deadline()
        if arrival is None and deadline is None:
            return False
        now = clock.now_ns()
        if deadline is not None and (arrival is None or deadline <= arrival):
            clock.run_until(max(deadline, now))
        else:
            clock.run_until(max(arrival, now))
            self._admit_arrivals()
            guest.run_qdisc()
        guest.run_softirqs()
        return True

    def _admit_arrivals(self) -> None:
        arrivals = self._arrivals
        now = self.clock.now_ns()
        enqueue = self.guest.enqueue
        while arrivals and arrivals[0][0] <= now:
            _when, _order, packet, frame = heapq.heappop(arrivals)
            enqueue(packet, frame)

    def run_until(self, when_ns: int) -> None:
        """Run every event due up to ``when_ns``, then move the clock there.

        The guest may finish its last step a little after ``when_ns``.
        """
        while True:
            if not self.guest.softirq_pending:
                upcoming = self.next_event_ns()
                if upcoming is None or upcoming > when_ns:
                    break
            self.step()
        if self.clock.now_ns() < when_ns:
            self.clock.run_until(when_ns)

    def run(self, limit_ns: int | None = None) -> None:
        """Run until the machine is idle, or past ``limit_ns`` if one is given."""
        while self.step():
            if limit_ns is not None and self.clock.now_ns() >= limit_ns:
                return

    def steps(self) -> Iterator[int]:
        """Run event by event, yielding the virtual time after each one."""
        while self.step():
            yield self.clock.now_ns()

    # -- output -----------------------------------------------------------------------

    @property
    def received(self) -> list[bytes]:
        """Frames the guest received, header stripped, in order."""
        return self.guest.received if self.guest.received is not None else []

    @property
    def transmitted(self) -> list[int]:
        """Packet numbers the guest added to the TX ring, in order."""
        return self.guest.transmitted if self.guest.transmitted is not None else []

    def sent_frames(self) -> list[bytes]:
        """Frames the backend got, when it keeps them (``LoopbackBackend``)."""
        sent = getattr(self.backend, "sent_frames", None)
        return sent() if sent is not None else []

    @property
    def control(self) -> ControlQueue | None:
        """The guest's control queue, or None without CTRL_VQ."""
        return self.guest.control

    def stats(self) -> MachineStats:
        """Return the device's and the guest's figures, merged."""
        device = self.device.stats
        tx = device.queue(TX_QUEUE)
        rx = device.queue(RX_QUEUE)
        guest = self.guest.stats
        drops = collections.Counter(device.drops)
        drops.update(guest.drops)
        drops.update(self.drops)
        return MachineStats(
            time_ns=self.clock.now_ns(),
            packets=self.packets,
            frames=tx.frames,
            bytes=tx.bytes,
            rx_frames=guest.rx_packets,
            rx_bytes=guest.rx_bytes,
            kicks=guest.kicks,
            kicks_suppressed=guest.kicks_suppressed,
            kicks_deferred=guest.kicks_deferred,
            device_kicks=tx.kicks,
            vm_exits=getattr(self.kick, "vm_exits", 0),
            interrupts=tx.interrupts,
            interrupts_suppressed=tx.interrupts_suppressed,
            rx_interrupts=rx.interrupts,
            timer_arms=tx.timer_arms,
            timer_fires=tx.timer_fires,
            bh_runs=tx.bh_runs,
            queue_stops=guest.queue_stops,
            queue_wakes=guest.queue_wakes,
            drops=dict(drops),
        )

    def ring_state(self, queue: int = TX_QUEUE) -> RingState:
        """Return the state of one queue as both sides see it now.

        ``in_flight`` is the chains the device popped and has not completed;
        the event indices are given only when EVENT_IDX was negotiated.
        """
        tx = self.guest.tx
        stopped = tx.stopped if tx is not None else False
        device_queue = self.device.queues.get(queue)
        driver_queue = self.guest.queues.get(queue)
        if device_queue is None or driver_queue is None or not device_queue.ready:
            return RingState(queue=queue, queue_stopped=stopped)
        event_idx = driver_queue.event_idx
        policy = self.device.tx_policy if queue == TX_QUEUE else None
        return RingState(
            queue=queue,
            avail_idx=driver_queue.avail_idx_shadow,
            used_idx=driver_queue.used_idx(),
            last_avail_idx=device_queue.last_avail_idx,
            last_used_idx=driver_queue.last_used_idx,
            num_free=driver_queue.num_free,
            in_flight=device_queue.inuse,
            used_flags=device_queue.used_flags(),
            avail_flags=device_queue.avail_flags(),
            avail_event=device_queue.avail_event() if event_idx else None,
            used_event=driver_queue.used_event() if event_idx else None,
            host_notifications=device_queue.notification_enabled,
            timer_armed=policy.timer_armed if policy is not None else False,
            queue_stopped=stopped,
        )

    def __repr__(self) -> str:
        return (
            f"Machine(tx_mode={self.device.tx_mode!r},"
            f" variant={self.guest.config.variant.value!r},"
            f" now_ns={self.clock.now_ns()}, packets={self.packets})"
        )
