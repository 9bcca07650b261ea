"""A ``Machine`` in real time: its virtual clock slaved to an ``EventLoop``.

The machine keeps its own rules: the guest model runs only between events
(``Machine.run_until``), and an interrupt only marks work for the guest.
``LiveMachine`` adds the real-time edge. The loop moves the virtual clock to
real time and fires the device's timers. The backend's descriptors wake it
for frames to receive (``fileno``) and for room after a BUSY send
(``writable_fileno``). After each such event the guest's pending work runs
up to the current time; this is called a pump.

The guest runs ahead of real time by the time it charges for its own steps.
The clock never goes backwards, so the next events run at a virtual time a
little later than real time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .clock import Timer
from .event_loop import EventLoop
from .machine import Machine

__all__ = ["LiveMachine", "RECEIVE_BATCH"]

logger = logging.getLogger(__name__)

RECEIVE_BATCH = 64
"""Frames read from the backend per wake-up before the guest runs, as a NAPI
budget; it also keeps a flood from starving the timers."""
POLL_BACKEND_NS = 1_000_000
"""Retry interval after BUSY from a backend without ``writable_fileno``."""

FramesHandler = Callable[[list[bytes]], None]


class LiveMachine:
    """Runs ``machine`` in real time on an ``EventLoop`` of its clock.

    With ``receive`` the backend's frames are read and delivered to the
    guest. ``on_frames`` gets the frames the guest received, after each
    pump, and may call ``machine.send`` to reply to them. This needs a guest
    that keeps received frames (``machine.guest.received`` is a list), which
    ``on_frames`` empties.
    """

    def __init__(
        self,
        machine: Machine,
        *,
        receive: bool = True,
        on_frames: FramesHandler | None = None,
    ) -> None:
        self.machine = machine
        self.loop = EventLoop(machine.clock)
        self.on_frames = on_frames
        self.stop_when: Callable[[], bool] | None = None
        """Checked after every pump and every ``check_interval_ns``; True stops."""
        self.on_pump: Callable[[], None] | None = None
        """Called at the start of every pump round, to hand the guest new frames."""
        self.check_interval_ns = 10_000_000
        self.busy_waits = 0
        """BUSY sends that waited for the backend to become writable."""
        self._pumping = False
        self._more = False
        self._pump_timer: Timer | None = None
        self._check_timer: Timer | None = None
        self._writable_fd: int | None = None
        machine.device.on_backend_busy = self._backend_busy
        machine.interrupts.on_interrupt = self._interrupt
        machine.interrupts.on_config = self._config_interrupt
        self._read_fd = machine.backend.fileno() if receive else None
        if self._read_fd is not None:
            self.loop.add_reader(self._read_fd, self._readable)

    # -- running --------------------------------------------------------------

    def send_at(self, frame: bytes, at_ns: int) -> int:
        """Schedule one frame for the guest at virtual time ``at_ns``.

        A time already past is moved to now. Returns the packet number.
        """
        machine = self.machine
        when = max(at_ns, machine.clock.now_ns())
        packet = machine.send(frame, when)
        machine.clock.call_at(when, self.pump)
        return packet

    def send(self, frame: bytes) -> int:
        """Hand one frame to the guest now and run it; return its packet number."""
        packet = self.machine.send(frame)
        self.pump()
        return packet

    def run(self, duration_s: float | None = None) -> None:
        """Run until ``stop``, ``stop_when`` or ``duration_s`` seconds passed."""
        self.loop.stopped = False
        if self.stop_when is not None:
            self._arm_check()
        self.pump()
        self.loop.run(duration_s)
        if self._check_timer is not None:
            self._check_timer.cancel()

    def stop(self) -> None:
        self.loop.stop()

    def close(self) -> None:
        """Stop watching the backend's descriptors and close the loop."""
        if self._read_fd is not None:
            self.loop.remove_reader(self._read_fd)
        if self._writable_fd is not None:
            self.loop.remove_writer(self._writable_fd)
        self.loop.close()

    def pump(self) -> None:
        """Run the guest's pending work and every event due up to now.

        A pump that starts while one runs (a timer fired during the guest's
        own charges) only makes the running one go round again.
        """
        if self._pumping:
            self._more = True
            return
        self._pumping = True
        machine = self.machine
        try:
            while True:
                self._more = False
                if self.on_pump is not None:
                    self.on_pump()
                now = max(self.loop.now_ns(), machine.clock.now_ns())
                machine.run_until(now)
                self._hand_over_received()
                if not self._more:
                    break
        finally:
            self._pumping = False
        if self.stop_when is not None and self.stop_when():
            self.loop.stop()

    # -- events ---------------------------------------------------------------

    def _interrupt(self, queue: int) -> None:
        self.machine.guest.interrupt(queue)
        self._request_pump()

    def _config_interrupt(self) -> None:
        self.machine.guest.config_interrupt()
        self._request_pump()

    def _request_pump(self) -> None:
        """Run a pump after the current host event, unless one runs now.

        The timer is due at once, so the clock runs it right after the timer
        or callback that raised the interrupt returns, with no guest code on
        the stack.
        """
        if self._pumping:
            return
        if self._pump_timer is None or not self._pump_timer.armed:
            self._pump_timer = self.machine.clock.call_later(0, self.pump)

    def _readable(self) -> None:
        machine = self.machine
        receive = machine.backend.receive
        deliver = machine.device.receive
        for _ in range(RECEIVE_BATCH):
            received = receive()
            if received is None:
                break
            deliver(*received)
        self.pump()

    def _backend_busy(self) -> None:
        fd = self.machine.backend.writable_fileno()
        if fd is None:
            self.machine.clock.call_later(POLL_BACKEND_NS, self._writable)
            return
        self._writable_fd = fd
        self.loop.add_writer(fd, self._writable)

    def _writable(self) -> None:
        if self._writable_fd is not None:
            self.loop.remove_writer(self._writable_fd)
            self._writable_fd = None
        self.busy_waits += 1
        self.machine.device.backend_writable()
        self._request_pump()

    def _hand_over_received(self) -> None:
        received = self.machine.guest.received
        if not received or self.on_frames is None:
            return
        frames = received[:]
        received.clear()
        self.on_frames(frames)
        self._more = True

    def _arm_check(self) -> None:
        self._check_timer = self.machine.clock.call_later(
            self.check_interval_ns, self._check
        )

    def _check(self) -> None:
        if self.stop_when is not None and self.stop_when():
            self.loop.stop()
            return
        self._arm_check()
