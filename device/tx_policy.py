"""TX batching policies: when the device flushes the TX queue after a kick.

QEMU's virtio-net has two ways to batch transmits, and Firecracker a third:

``bh`` (QEMU's default): a kick disables notifications and schedules a
bottom half; the bottom half flushes up to ``tx_burst`` chains, reschedules
itself after a full burst, otherwise re-enables notifications, flushes again
whatever slipped in, and reschedules if anything did.

``timer`` (QEMU ``tx=timer``, as fixed in October 2022, "virtio-net: fix TX
timer with tx_burst"): a kick arms a ``tx_timeout`` timer and disables
notifications; a kick while the timer is pending flushes at once; the timer
flushes up to ``tx_burst``, re-arms after a full burst, otherwise re-enables
notifications, flushes again, and re-arms if anything slipped in.

``timer-legacy``: the timer mode before that fix. The timer re-enables
notifications and flushes one burst; after a full burst nothing re-arms the
timer, so the chains left in the ring wait for the guest's next kick.

``immediate`` (Firecracker): drain the queue on every kick, with
notifications disabled while draining and a re-check after re-enabling them.
Every policy yields after ``tx_burst`` chains and reschedules itself, so one
busy guest cannot monopolise the device and a reset is serviced in time.

Each policy is a small state machine: ``waiting`` is QEMU's ``tx_waiting``
(a flush is scheduled), and the scheduled work is a clock timer.
"""

from __future__ import annotations

import enum

from .clock import Clock, Timer
from .stats import QueueStats
from .trace import Step, Trace
from .tx import FlushResult, TxQueue

__all__ = [
    "TxMode",
    "TxPolicy",
    "BottomHalfPolicy",
    "TimerPolicy",
    "LegacyTimerPolicy",
    "ImmediatePolicy",
    "make_policy",
    "DEFAULT_TX_TIMEOUT_NS",
    "DEFAULT_TX_BURST",
    "DEFAULT_BH_DELAY_NS",
    "DEFAULT_RING_POLL_INTERVAL_NS",
]

DEFAULT_TX_TIMEOUT_NS = 150_000
"""QEMU's default tx_timeout: 150 microseconds."""
DEFAULT_TX_BURST = 256
"""QEMU's default tx_burst."""
DEFAULT_RING_POLL_INTERVAL_NS = 100_000
"""How often a parked policy looks at the ring (see ``TxPolicy._park``)."""
FIRST_CHECK_NS = 10_000
"""Delay of the first look at the ring of a parked queue."""
DEFAULT_BH_DELAY_NS = 1_000
"""Virtual time from scheduling a bottom half to its run. An estimate of the
main loop's latency; QEMU runs a bottom half as soon as its thread is free."""


class TxMode(str, enum.Enum):
    BH = "bh"
    TIMER = "timer"
    TIMER_LEGACY = "timer-legacy"
    IMMEDIATE = "immediate"


class TxPolicy:
    """Base of the policies: the scheduling state shared by all four."""

    mode: TxMode

    def __init__(
        self,
        tx: TxQueue,
        clock: Clock,
        trace: Trace,
        stats: QueueStats,
        *,
        tx_timeout_ns: int = DEFAULT_TX_TIMEOUT_NS,
        tx_burst: int = DEFAULT_TX_BURST,
        bh_delay_ns: int = DEFAULT_BH_DELAY_NS,
        ring_poll_ns: int = 0,
        ring_poll_interval_ns: int = DEFAULT_RING_POLL_INTERVAL_NS,
    ) -> None:
        self.tx = tx
        self.clock = clock
        self.trace = trace
        self.stats = stats
        self.tx_timeout_ns = tx_timeout_ns
        self.tx_burst = tx_burst
        self.bh_delay_ns = bh_delay_ns
        self.ring_poll_ns = ring_poll_ns
        self.ring_poll_interval_ns = ring_poll_interval_ns
        self.waiting = False
        # Parked: the ring was drained and notifications stay off while the
        # policy looks at the ring itself (ring_poll_ns); see _park.
        self.parked = False
        self._parked_ns = 0
        self._check_delay = ring_poll_interval_ns
        self._timer: Timer | None = None
        self._ring_check: Timer | None = None

    @property
    def timer_armed(self) -> bool:
        return self._timer is not None and self._timer.armed

    def on_kick(self) -> None:
        """Handle an available buffer notification for the TX queue."""
        raise NotImplementedError

    def on_backend_ready(self) -> None:
        """The backend can take frames again: finish the pending chain.

        Like QEMU's ``virtio_net_tx_complete``: complete the pending chain,
        re-enable notifications, flush, and reschedule after a full burst.
        """
        if not self.tx.resume():
            return
        self._enable_notification()
        result = self.tx.flush(self.tx_burst)
        if isinstance(result, int) and result >= self.tx_burst:
            self._disable_notification()
            self._reschedule()

    def cancel(self) -> None:
        """Forget scheduled work (device reset)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self.waiting = False
        self._unpark()

    # -- helpers shared by the policies ---------------------------------------

    def _schedule(self, delay_ns: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.waiting = True
        self._unpark()
        self._timer = self.clock.call_later(delay_ns, self._run)

    def _run(self) -> None:
        self._timer = None
        self.waiting = False
        self.run()

    def run(self) -> None:
        """The scheduled work: the timer callback or the bottom half."""
        raise NotImplementedError

    def _disable_notification(self) -> None:
        self.tx.queue.disable_notification()
        self.trace.record(Step.SET_NOTIFICATION_OFF)
        self.trace.record(Step.NOTIFICATIONS_DISABLED)

    def _enable_notification(self) -> bool:
        slipped_in = self.tx.queue.enable_notification()
        self.trace.record(Step.NOTIFICATIONS_ENABLED)
        return slipped_in

    def _flush_and_recheck(self) -> None:
        """Flush one burst; reschedule after a full one, else re-enable and retry.

        This is the body QEMU's bottom half and fixed timer share.
        """
        result = self.tx.flush(self.tx_burst)
        if isinstance(result, FlushResult):
            return
        if result >= self.tx_burst:
            self._reschedule()
            return
        if self.ring_poll_ns:
            self._park()
            return
        self._enable_notification()
        result = self.tx.flush(self.tx_burst)
        if isinstance(result, int) and result > 0:
            self._disable_notification()
            self._reschedule()

    def _park(self) -> None:
        """Keep notifications off after draining the ring, and poll it instead.

        A vhost-user front-end kicks through an eventfd, and the device
        handles the kick only when its thread wakes. Without EVENT_IDX the
        driver kicks for every chain it adds until then. Parked, the device
        looks at avail.idx on a timer and runs a flush when chains came.
        After ``ring_poll_ns`` without any, it turns notifications back on
        and re-reads the ring (2.7.10.2). vhost-net's busy polling keeps
        notifications off the same way.

        The first look comes after ``FIRST_CHECK_NS``, soon enough for a
        driver that fills the ring faster than a sleep lasts (DPDK's), and
        the wait doubles up to ``_check_interval`` while the ring stays empty.
        """
        # A kick in immediate mode drains and parks again without going
        # through _schedule, so an earlier look may still be armed. It is
        # cancelled, because cancel() reaches only the latest one.
        self._unpark()
        self.parked = True
        self._parked_ns = self.clock.now_ns()
        self._check_delay = self._first_check_delay()
        self._ring_check = self.clock.call_later(self._check_delay, self._check_ring)

    def _check_ring(self) -> None:
        self._ring_check = None
        queue = self.tx.queue
        if queue.avail_idx() != queue.last_avail_idx:
            self.stats.ring_polls += 1
            self.parked = False
            self.run()
            return
        if self.clock.now_ns() - self._parked_ns < self.ring_poll_ns:
            self._check_delay = min(2 * self._check_delay, self._check_interval())
            self._ring_check = self.clock.call_later(
                self._check_delay, self._check_ring
            )
            return
        self.parked = False
        if self._enable_notification():
            self._disable_notification()
            self._reschedule()

    def _check_interval(self) -> int:
        """Maximum wait between two looks at the ring of a parked queue."""
        return self.ring_poll_interval_ns

    def _first_check_delay(self) -> int:
        """Wait before the first look at the ring of a parked queue."""
        return min(FIRST_CHECK_NS, self.ring_poll_interval_ns)

    def _unpark(self) -> None:
        self.parked = False
        if self._ring_check is not None:
            self._ring_check.cancel()
            self._ring_check = None

    def _reschedule(self) -> None:
        """Schedule the next run after a full burst or a late arrival."""
        raise NotImplementedError


class BottomHalfPolicy(TxPolicy):
    mode = TxMode.BH

    def on_kick(self) -> None:
        self.trace.record(Step.HANDLE_TX, detail="virtio_net_handle_tx_bh")
        if self.waiting:
            return
        self.trace.record(Step.SCHEDULE_FLUSH, detail="qemu_bh_schedule")
        self._disable_notification()
        self._schedule(self.bh_delay_ns)

    def run(self) -> None:
        self.stats.bh_runs += 1
        self.trace.record(Step.TX_BH_RUN)
        self._flush_and_recheck()

    def _reschedule(self) -> None:
        self._schedule(self.bh_delay_ns)


class TimerPolicy(TxPolicy):
    mode = TxMode.TIMER

    def on_kick(self) -> None:
        self.trace.record(Step.HANDLE_TX, detail="virtio_net_handle_tx_timer")
        if self.waiting:
            # Packets are already queued: flush now instead of waiting.
            self.cancel()
            self.run()
            return
        self._arm()

    def _arm(self) -> None:
        self.stats.timer_arms += 1
        self.trace.record(Step.SCHEDULE_FLUSH, detail="qemu_mod_timer")
        self._disable_notification()
        self._schedule(self.tx_timeout_ns)

    def run(self) -> None:
        self.stats.timer_fires += 1
        self.trace.record(Step.TX_TIMER_FIRE)
        self._flush_and_recheck()

    def _reschedule(self) -> None:
        self.stats.timer_arms += 1
        self._schedule(self.tx_timeout_ns)

    def _check_interval(self) -> int:
        # Parked, the ring is looked at as often as the timer would fire for
        # a driver that keeps kicking: every tx_timeout, the first time too.
        return self.tx_timeout_ns

    def _first_check_delay(self) -> int:
        return self.tx_timeout_ns


class LegacyTimerPolicy(TimerPolicy):
    mode = TxMode.TIMER_LEGACY

    def on_kick(self) -> None:
        self.trace.record(Step.HANDLE_TX, detail="virtio_net_handle_tx_timer")
        if self.waiting:
            self._enable_notification()
            self.cancel()
            self.tx.flush(self.tx_burst)
            return
        self._arm()

    def run(self) -> None:
        self.stats.timer_fires += 1
        self.trace.record(Step.TX_TIMER_FIRE)
        # The bug this mode keeps: notifications go back on and one burst is
        # flushed; if the burst was full, nothing schedules the rest.
        self._enable_notification()
        self.tx.flush(self.tx_burst)

    def on_backend_ready(self) -> None:
        if self.tx.resume():
            self._enable_notification()
            self.tx.flush(self.tx_burst)


class ImmediatePolicy(TxPolicy):
    mode = TxMode.IMMEDIATE

    _draining = False

    def on_kick(self) -> None:
        self.trace.record(Step.HANDLE_TX, detail="process_tx")
        # A kick from inside a drain (a backend that calls back) is not
        # served reentrantly: the drain re-reads the ring after re-enabling
        # notifications, so it finds what the kick announced.
        if self.waiting or self._draining:
            return
        self._disable_notification()
        self.run()

    def run(self) -> None:
        self._draining = True
        try:
            self._drain()
        finally:
            self._draining = False

    def _drain(self) -> None:
        self.stats.bh_runs += 1
        while True:
            result = self.tx.flush(self.tx_burst)
            if isinstance(result, FlushResult):
                return
            if result >= self.tx_burst:
                self._reschedule()
                return
            if self.ring_poll_ns:
                self._park()
                return
            if not self._enable_notification():
                return
            self._disable_notification()

    def _reschedule(self) -> None:
        # Yield after a budget of chains and come back without a kick. The
        # delay is not 0, so that the other events due now (a received frame,
        # a reset) run first, in virtual time too.
        self._schedule(self.bh_delay_ns)


_POLICIES: dict[TxMode, type[TxPolicy]] = {
    TxMode.BH: BottomHalfPolicy,
    TxMode.TIMER: TimerPolicy,
    TxMode.TIMER_LEGACY: LegacyTimerPolicy,
    TxMode.IMMEDIATE: ImmediatePolicy,
}


def make_policy(mode: str | TxMode, *args, **kwargs) -> TxPolicy:
    """Create the policy for ``mode`` (``bh``, ``timer``, ``timer-legacy``,
    ``immediate``). Raises ``ValueError`` naming an unknown mode."""
    try:
        policy_class = _POLICIES[TxMode(mode)]
    except ValueError:
        names = ", ".join(m.value for m in TxMode)
        raise ValueError(f"unknown TX mode {mode!r}: use one of {names}") from None
    return policy_class(*args, **kwargs)
