"""Clocks and timers, injected into the device and the guest model.

Time is an integer count of nanoseconds. ``Clock`` keeps a heap of timers and
runs the due ones in order of their deadline (ties in order of arming);
subclasses say where "now" comes from. ``VirtualClock`` is advanced by the
test, the stepper or the scenario, so runs are deterministic. The real-time
clock for live runs lives with the event loop (``device.event_loop``), which
is the only place that reads the system time.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

__all__ = ["Clock", "Timer", "VirtualClock", "NS_PER_US"]

NS_PER_US = 1000


class Timer:
    """One armed callback; ``cancel`` disarms it."""

    __slots__ = ("when_ns", "callback", "cancelled", "fired")

    def __init__(self, when_ns: int, callback: Callable[[], None]) -> None:
        self.when_ns = when_ns
        self.callback = callback
        self.cancelled = False
        self.fired = False

    @property
    def armed(self) -> bool:
        return not (self.cancelled or self.fired)

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """A source of time with a timer heap."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Timer]] = []
        self._order = itertools.count()

    def now_ns(self) -> int:
        raise NotImplementedError

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> Timer:
        """Arm ``callback`` to run once at ``when_ns``."""
        timer = Timer(when_ns, callback)
        heapq.heappush(self._heap, (when_ns, next(self._order), timer))
        return timer

    def call_later(self, delay_ns: int, callback: Callable[[], None]) -> Timer:
        """Arm ``callback`` to run once ``delay_ns`` from now."""
        return self.call_at(self.now_ns() + delay_ns, callback)

    def armed_timers(self) -> list[Timer]:
        """Return the armed timers, earliest first, for inspection."""
        return [timer for _, _, timer in sorted(self._heap) if timer.armed]

    def next_deadline(self) -> int | None:
        """Deadline of the earliest armed timer, or None."""
        heap = self._heap
        while heap and not heap[0][2].armed:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def run_due(self, now_ns: int | None = None) -> int:
        """Run every armed timer due at ``now_ns`` (default: now); return count."""
        limit = self.now_ns() if now_ns is None else now_ns
        ran = 0
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > limit:
                return ran
            _, _, timer = heapq.heappop(self._heap)
            timer.fired = True
            self._before_timer(timer)
            timer.callback()
            ran += 1

    def _before_timer(self, timer: Timer) -> None:
        """Hook for clocks that move time to a timer's deadline."""


class VirtualClock(Clock):
    """A clock that moves only when ``advance`` or ``run_until`` moves it."""

    def __init__(self, start_ns: int = 0) -> None:
        super().__init__()
        self._now = start_ns

    def now_ns(self) -> int:
        return self._now

    def _before_timer(self, timer: Timer) -> None:
        # Each timer runs at its own deadline, so work it schedules lands at
        # the right virtual time, not at the end of the advance.
        self._now = max(self._now, timer.when_ns)

    def advance(self, delta_ns: int) -> int:
        """Move time forward by ``delta_ns``, running due timers on the way."""
        when = self._now + delta_ns
        heap = self._heap
        if heap and heap[0][0] <= when:
            return self.run_until(when)
        # Nothing is due: the common case of a guest charging its own steps.
        if when > self._now:
            self._now = when
        return 0

    def run_until(self, when_ns: int) -> int:
        """Run every timer due up to ``when_ns``, then set now to it."""
        heap = self._heap
        if not heap or heap[0][0] > when_ns:
            # Nothing is due, not even a cancelled timer: the common case of
            # a guest charging a few hundred nanoseconds.
            if when_ns > self._now:
                self._now = when_ns
            return 0
        ran = self.run_due(when_ns)
        self._now = max(self._now, when_ns)
        return ran

    def run_next(self) -> bool:
        """Jump to the next timer and run it (and any due with it)."""
        deadline = self.next_deadline()
        if deadline is None:
            return False
        self.run_until(max(deadline, self._now))
        return True
