"""Notifiers: how a kick reaches the device and an interrupt reaches the driver.

Both directions are pluggable. A kick notifier carries an available buffer
notification from the driver to the device; an interrupt notifier carries a
used buffer notification (or a configuration change) from the device to the
driver. Each counts what it carried. The ones here are sans-IO; the eventfd
notifiers for real event loops are in ``device.eventfd``.

``PioExitKick`` models what a kick costs a KVM guest: ``vp_notify()`` writes
the queue index to the device's notify register, the write traps (a VM exit),
and the VMM handles it before the device sees the kick. It records steps 5 to
8 of the TX path, counts VM exits and charges ``exit_cost_ns`` of virtual time
to the guest, during which host timers due in that window fire.
"""

from __future__ import annotations

from collections.abc import Callable

from .clock import VirtualClock
from .trace import Step, Trace

__all__ = [
    "KickNotifier",
    "DirectKick",
    "PioExitKick",
    "InterruptNotifier",
    "CallbackInterrupt",
    "DEFAULT_EXIT_COST_NS",
]

KickHandler = Callable[[int], None]

DEFAULT_EXIT_COST_NS = 2_000
"""Virtual time one PIO exit costs the vCPU. An estimate: a KVM exit to
userspace and back is a few microseconds; change it per run."""


class KickNotifier:
    """Base of the driver-to-device path: ``notify(queue)`` delivers a kick."""

    def __init__(self) -> None:
        self.handler: KickHandler = lambda queue: None
        self.kicks = 0

    def connect(self, handler: KickHandler) -> None:
        """Set the device's kick handler (``VirtioNetDevice.handle_kick``)."""
        self.handler = handler

    def notify(self, queue: int) -> None:
        raise NotImplementedError


class DirectKick(KickNotifier):
    """A kick is a plain call of the device's handler: no exit, no cost."""

    def notify(self, queue: int) -> None:
        self.kicks += 1
        self.handler(queue)


class PioExitKick(KickNotifier):
    """A kick through a trapped PIO write, as in a KVM guest (steps 5 to 8)."""

    def __init__(
        self,
        clock: VirtualClock,
        trace: Trace | None = None,
        exit_cost_ns: int = DEFAULT_EXIT_COST_NS,
        packet: Callable[[], int | None] = lambda: None,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.trace = trace if trace is not None else Trace(enabled=False)
        self.exit_cost_ns = exit_cost_ns
        self.vm_exits = 0
        self.exit_time_ns = 0
        self.packet = packet

    def notify(self, queue: int) -> None:
        record = self.trace.record
        packet = self.packet()
        record(Step.VP_NOTIFY, packet)
        record(Step.PIO_WRITE, packet, f"queue index {queue}")
        self.vm_exits += 1
        self.kicks += 1
        record(Step.VM_EXIT, packet)
        # The vCPU is stopped while the exit is handled; host timers keep
        # running, so advance the shared clock through the exit's cost.
        self.exit_time_ns += self.exit_cost_ns
        self.clock.advance(self.exit_cost_ns)
        record(Step.VMM_HANDLE_PIO, packet)
        self.handler(queue)


InterruptHandler = Callable[[int], None]


class InterruptNotifier:
    """Base of the device-to-driver path.

    ``interrupt(queue)`` sends a used buffer notification for a queue;
    ``config_interrupt()`` a configuration change notification. The device
    calls ``suppressed(queue)`` when it decided not to notify, so both
    figures live in one place.
    """

    def __init__(self) -> None:
        self.interrupts: dict[int, int] = {}
        self.suppressed_count: dict[int, int] = {}
        self.config_interrupts = 0

    def interrupt(self, queue: int) -> None:
        self.interrupts[queue] = self.interrupts.get(queue, 0) + 1
        self._deliver(queue)

    def suppressed(self, queue: int) -> None:
        self.suppressed_count[queue] = self.suppressed_count.get(queue, 0) + 1

    def config_interrupt(self) -> None:
        self.config_interrupts += 1
        self._deliver_config()

    def _deliver(self, queue: int) -> None:
        """Deliver a used buffer notification; subclasses override."""

    def _deliver_config(self) -> None:
        """Deliver a configuration change notification; subclasses override."""


class CallbackInterrupt(InterruptNotifier):
    """Interrupts are calls of the driver's handlers (the guest model's)."""

    def __init__(
        self,
        on_interrupt: InterruptHandler | None = None,
        on_config: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_interrupt = on_interrupt or (lambda queue: None)
        self.on_config = on_config or (lambda: None)

    def _deliver(self, queue: int) -> None:
        self.on_interrupt(queue)

    def _deliver_config(self) -> None:
        self.on_config()
