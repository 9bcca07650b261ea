"""The real-time event loop at the edge: fds, the system clock, signals.

The device and the guest model are sans-IO and keep time through an injected
``Clock``. For live runs this loop owns the I/O: it waits on the backend's
file descriptor (readable: frames to receive; writable: a frame waited for
room) and on any extra fds (kick eventfds, sockets), reads the monotonic
clock, and runs due timers (the TX timer and bottom halves). It is the only
module of ``device`` that imports ``selectors`` or reads the system time.
"""

from __future__ import annotations

import logging
import select
import selectors
import time
from collections.abc import Callable

from backends.base import Backend

from .clock import Clock, VirtualClock

__all__ = ["MonotonicClock", "EventLoop", "attach_backend"]

log = logging.getLogger(__name__)


class MonotonicClock(Clock):
    """Nanoseconds of ``time.monotonic_ns`` since the clock was created."""

    def __init__(self) -> None:
        super().__init__()
        self._start = time.monotonic_ns()

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._start


class EventLoop:
    """Runs timers and fd callbacks until stopped or a deadline passes.

    ``clock`` may be a ``MonotonicClock`` or a ``VirtualClock``; a virtual
    clock is moved to real time before timers run, so code written for
    virtual time (the guest model) runs live unchanged.

    ``poll_ns`` makes the loop poll its descriptors without sleeping for that
    long after the last event or timer, like QEMU's ``poll-max-ns`` of an
    iothread. A peer that notifies again within that time (a busy
    vhost-user front-end kicking) is then served without a sleep and
    wake-up, which costs tens of microseconds, and much more on a loaded
    CPU. 0 (the default) never polls.
    """

    def __init__(self, clock: Clock, poll_ns: int = 0) -> None:
        self.clock = clock
        self.poll_ns = poll_ns
        self.selector = selectors.DefaultSelector()
        self.stopped = False
        self._origin = time.monotonic_ns() - clock.now_ns()
        self._watchers: dict[tuple[int, int], Callable[[], None]] = {}

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._origin

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(fd, selectors.EVENT_READ, callback)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(fd, selectors.EVENT_WRITE, callback)

    def remove_writer(self, fd: int) -> None:
        self._unwatch(fd, selectors.EVENT_WRITE)

    def remove_reader(self, fd: int) -> None:
        self._unwatch(fd, selectors.EVENT_READ)

    def _watch(self, fd: int, event: int, callback: Callable[[], None]) -> None:
        self._watchers[(fd, event)] = callback
        self._update(fd)

    def _unwatch(self, fd: int, event: int) -> None:
        if self._watchers.pop((fd, event), None) is not None:
            self._update(fd)

    def _update(self, fd: int) -> None:
        mask = 0
        for watched, event in self._watchers:
            if watched == fd:
                mask |= event
        try:
            self.selector.unregister(fd)
        except KeyError:
            pass
        if mask:
            self.selector.register(fd, mask)

    def stop(self) -> None:
        self.stopped = True

    def _sync_clock(self) -> int:
        """Run the due timers and return how many ran."""
        if isinstance(self.clock, VirtualClock):
            return self.clock.run_until(max(self.now_ns(), self.clock.now_ns()))
        return self.clock.run_due()

    def run(self, duration_s: float | None = None) -> None:
        """Run until ``stop`` is called or ``duration_s`` seconds passed.

        Only events on descriptors count as activity for ``poll_ns``: a
        timer that finds nothing to do (a parked TX queue looking at its
        ring) must not keep the loop spinning.
        """
        deadline = None if duration_s is None else self.now_ns() + int(duration_s * 1e9)
        active_ns = self.now_ns()
        while not self.stopped:
            self._sync_clock()
            now = self.now_ns()
            if deadline is not None and now >= deadline:
                return
            timeout = self._timeout(now, deadline)
            if now - active_ns < self.poll_ns:
                timeout = 0.0
            elif 0.0 < timeout < _EPOLL_RESOLUTION_S:
                self._wait_precisely(timeout)
                timeout = 0.0
            ready = self.selector.select(timeout)
            if ready:
                active_ns = self.now_ns()
            for key, events in ready:
                self._dispatch(key.fd, events)
            self._sync_clock()

    def _timeout(self, now: int, deadline: int | None) -> float:
        wake = self.clock.next_deadline()
        candidates = [t for t in (wake, deadline) if t is not None]
        if not candidates:
            return 0.5
        delay_ns = min(candidates) - now
        # A sleep of a few microseconds lasts the kernel's timer slack (50 us
        # by default) at least, so a bottom half due that soon is polled for.
        if delay_ns < _MIN_SLEEP_NS:
            return 0.0
        return delay_ns / 1e9

    def _wait_precisely(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds, less than a millisecond, for an event.

        epoll waits in whole milliseconds and rounds a shorter timeout up,
        which would run a TX timer of 150 us a millisecond late. select(2)
        takes microseconds, and the epoll descriptor is readable when one
        of its descriptors is ready.
        """
        try:
            select.select([self.selector.fileno()], [], [], timeout)
        except ValueError:
            # select(2) rejects descriptor numbers beyond FD_SETSIZE, so the
            # loop polls instead.
            pass

    def _dispatch(self, fd: int, events: int) -> None:
        for event in (selectors.EVENT_READ, selectors.EVENT_WRITE):
            if events & event:
                callback = self._watchers.get((fd, event))
                if callback is not None:
                    callback()

    def close(self) -> None:
        self.selector.close()


_EPOLL_RESOLUTION_S = 0.001
_MIN_SLEEP_NS = 50_000


def attach_backend(
    loop: EventLoop,
    backend: Backend,
    on_frame: Callable[[bytes, bytes], None],
    on_writable: Callable[[], None],
) -> Callable[[bool], None]:
    """Wire a backend's fd into the loop.

    Frames read are passed to ``on_frame(header, frame)`` (up to a batch per
    wake-up, so a flood cannot starve timers). Returns a function the caller
    uses to ask for (True) or stop (False) write-readiness callbacks while a
    frame waits for room.
    """
    fd = backend.fileno()
    if fd is None:
        return lambda wanted: None

    def readable() -> None:
        for _ in range(64):
            received = backend.receive()
            if received is None:
                return
            on_frame(*received)

    def writable() -> None:
        loop.remove_writer(fd)
        on_writable()

    loop.add_reader(fd, readable)

    def want_writable(wanted: bool) -> None:
        if wanted:
            loop.add_writer(fd, writable)
        else:
            loop.remove_writer(fd)

    return want_writable
