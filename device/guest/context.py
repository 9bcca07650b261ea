"""State that the parts of the guest driver model share while they run.

The TX path, the RX path and the control queue all charge virtual time to
the same clock, record into the same trace, count into the same statistics
and raise the same softirqs. Interrupt handlers run inside host callbacks
(a timer flush that publishes used buffers), so they never advance the
clock: they add their cost to ``deferred_ns`` and set a pending flag, and
the driver charges both when it next runs its softirqs.
"""

from __future__ import annotations

from collections.abc import Callable

from ..clock import VirtualClock
from ..trace import Step, Trace
from .costs import CostModel
from .stats import GuestStats

__all__ = ["GuestContext"]


class GuestContext:
    """The clock, trace, costs, counters and pending work of one guest."""

    def __init__(
        self,
        clock: VirtualClock,
        trace: Trace,
        costs: CostModel,
        stats: GuestStats,
        notify: Callable[[int], None],
        *,
        keep_log: bool = True,
    ) -> None:
        self.clock = clock
        self.trace = trace
        self.costs = costs
        self.stats = stats
        self.notify = notify
        self.packet: int | None = None
        """The packet whose TX path runs now; the PIO kick notifier reads it."""
        self.deferred_ns = 0
        # Pending softirq work: NAPI polls, the qdisc and the config work item.
        self.rx_napi = False
        self.tx_napi = False
        self.qdisc = False
        self.config_work = False
        self.transmitted: list[int] | None = [] if keep_log else None
        """Packet numbers added to the TX ring, in order."""
        self.dropped: list[tuple[int, str]] | None = [] if keep_log else None
        """Packet numbers the guest dropped, with the reason."""

    def record(self, step: Step, packet: int | None = None, detail: str = "") -> None:
        """Append a trace record when the trace is on."""
        trace = self.trace
        if trace.enabled:
            trace.record(step, packet, detail)

    def charge(self, ns: int) -> None:
        """Spend ``ns`` of guest CPU time; host timers due meanwhile run."""
        if ns:
            self.clock.advance(ns)

    def defer(self, ns: int) -> None:
        """Add interrupt time to charge at the next safe point."""
        self.deferred_ns += ns

    def charge_deferred(self) -> None:
        ns = self.deferred_ns
        if ns:
            self.deferred_ns = 0
            self.clock.advance(ns)

    def drop(self, reason: str, packet: int | None = None) -> None:
        """Count a guest-side drop, and log the packet number if there is one."""
        self.stats.drops[reason] += 1
        if packet is not None and self.dropped is not None:
            self.dropped.append((packet, reason))

    @property
    def softirq_pending(self) -> bool:
        return (
            self.rx_napi
            or self.tx_napi
            or self.qdisc
            or self.config_work
            or self.deferred_ns > 0
        )
