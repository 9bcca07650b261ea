"""The typed trace of the TX path, step by step.

The path of one transmitted packet from a Linux guest into the host has 23
numbered steps (``Step``); the guest model, the notifiers, the TX policies and
the device each record the steps they perform, with the virtual time and a
snapshot of the ring state (``RingState``). Tests, the step debugger and the
timeline pictures all read the same records. Recording is a list append and a
few attribute reads: the trace is off the per-packet hot path of real runs
(``Trace(enabled=False)``), and there is no per-packet logging anywhere.

Besides the 23 steps the trace carries a few host events that the steps do not
name (the TX timer firing, a flush, an interrupt); they have numbers above 100
so the step numbers stay those of the table.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Side", "Step", "RingState", "TraceRecord", "Trace", "STEP_SIDES"]


class Side(enum.Enum):
    GUEST = "guest"
    HOST = "host"


class Step(enum.IntEnum):
    """The numbered steps of the TX path, plus extra host events (>= 100)."""

    START_XMIT = 1
    FREE_OLD_XMIT_SKBS = 2
    XMIT_SKB = 3
    VIRTQUEUE_KICK = 4
    VP_NOTIFY = 5
    PIO_WRITE = 6
    VM_EXIT = 7
    VMM_HANDLE_PIO = 8
    HANDLE_TX = 9
    SCHEDULE_FLUSH = 10
    SET_NOTIFICATION_OFF = 11
    NOTIFICATIONS_DISABLED = 12
    CAPACITY_CHECK = 13
    NETIF_STOP_QUEUE = 14
    ENABLE_CB_DELAYED = 15
    INTERRUPTS_UNMASKED = 16
    USED_CHECK = 17
    WAIT_FOR_INTERRUPT = 18
    FREE_OLD_XMIT_SKBS_AGAIN = 19
    CAPACITY_RECHECK = 20
    NETIF_START_QUEUE = 21
    VIRTQUEUE_DISABLE_CB = 22
    INTERRUPTS_MASKED = 23
    # Host and guest events outside the numbered table.
    TX_TIMER_FIRE = 101
    TX_BH_RUN = 102
    TX_FLUSH = 103
    NOTIFICATIONS_ENABLED = 104
    INTERRUPT = 105
    INTERRUPT_SUPPRESSED = 106
    KICK_SUPPRESSED = 107
    NETIF_WAKE_QUEUE = 108
    RX_DELIVER = 109
    RX_REFILL = 110
    NAPI_POLL = 111
    CONFIG_INTERRUPT = 112

    @property
    def side(self) -> Side:
        return STEP_SIDES[self]

    @property
    def label(self) -> str:
        """The name the table gives the step, as the pictures print it."""
        return STEP_LABELS.get(self, self.name.lower())

    @classmethod
    def parse(cls, text: str | int) -> Step:
        """Find a step by number (``14``) or by name (``netif_stop_queue``).

        Raises ``ValueError`` naming the text when nothing matches.
        """
        if isinstance(text, int) or str(text).isdigit():
            return cls(int(text))
        wanted = str(text).strip().lower()
        for step in cls:
            if wanted in (step.name.lower(), step.label.lower()):
                return step
        raise ValueError(f"no TX path step is called {text!r}")


STEP_LABELS: dict[Step, str] = {
    Step.START_XMIT: "start_xmit",
    Step.FREE_OLD_XMIT_SKBS: "free_old_xmit_skbs",
    Step.XMIT_SKB: "xmit_skb",
    Step.VIRTQUEUE_KICK: "virtqueue_kick",
    Step.VP_NOTIFY: "vp_notify",
    Step.PIO_WRITE: "pio_write",
    Step.VM_EXIT: "vm_exit",
    Step.VMM_HANDLE_PIO: "vmm_handle_pio",
    Step.HANDLE_TX: "virtio_net_handle_tx",
    Step.SCHEDULE_FLUSH: "schedule_flush",
    Step.SET_NOTIFICATION_OFF: "virtio_queue_set_notification_0",
    Step.NOTIFICATIONS_DISABLED: "host_notifications_disabled",
    Step.CAPACITY_CHECK: "capacity_check",
    Step.NETIF_STOP_QUEUE: "netif_stop_queue",
    Step.ENABLE_CB_DELAYED: "virtqueue_enable_cb_delayed",
    Step.INTERRUPTS_UNMASKED: "interrupts_unmasked",
    Step.USED_CHECK: "used_check",
    Step.WAIT_FOR_INTERRUPT: "wait_for_interrupt",
    Step.FREE_OLD_XMIT_SKBS_AGAIN: "free_old_xmit_skbs_again",
    Step.CAPACITY_RECHECK: "capacity_recheck",
    Step.NETIF_START_QUEUE: "netif_start_queue",
    Step.VIRTQUEUE_DISABLE_CB: "virtqueue_disable_cb",
    Step.INTERRUPTS_MASKED: "interrupts_masked",
    Step.TX_TIMER_FIRE: "tx_timer_fire",
    Step.TX_BH_RUN: "tx_bh_run",
    Step.TX_FLUSH: "virtio_net_flush_tx",
    Step.NOTIFICATIONS_ENABLED: "host_notifications_enabled",
    Step.INTERRUPT: "interrupt",
    Step.INTERRUPT_SUPPRESSED: "interrupt_suppressed",
    Step.KICK_SUPPRESSED: "kick_suppressed",
    Step.NETIF_WAKE_QUEUE: "netif_wake_queue",
    Step.RX_DELIVER: "rx_deliver",
    Step.RX_REFILL: "rx_refill",
    Step.NAPI_POLL: "napi_poll",
    Step.CONFIG_INTERRUPT: "config_interrupt",
}

_GUEST_STEPS = {1, 2, 3, 4, 5, 6, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23}
_GUEST_EVENTS = {
    Step.NETIF_WAKE_QUEUE,
    Step.KICK_SUPPRESSED,
    Step.RX_REFILL,
    Step.NAPI_POLL,
}
STEP_SIDES: dict[Step, Side] = {
    step: Side.GUEST if step in _GUEST_STEPS or step in _GUEST_EVENTS else Side.HOST
    for step in Step
}


@dataclass(frozen=True)
class RingState:
    """The state of one virtqueue and its users at an instant."""

    queue: int = 1
    avail_idx: int = 0
    used_idx: int = 0
    last_avail_idx: int = 0
    last_used_idx: int = 0
    num_free: int = 0
    in_flight: int = 0
    used_flags: int = 0
    avail_flags: int = 0
    avail_event: int | None = None
    used_event: int | None = None
    host_notifications: bool = True
    timer_armed: bool = False
    queue_stopped: bool = False


@dataclass(frozen=True)
class TraceRecord:
    """One step or event: what, when (virtual ns), which packet, ring state."""

    step: Step
    time_ns: int
    packet: int | None = None
    state: RingState = field(default_factory=RingState)
    detail: str = ""

    @property
    def side(self) -> Side:
        return self.step.side

    def to_dict(self) -> dict[str, Any]:
        """Return the record as plain JSON-ready data."""
        data = asdict(self.state)
        data.update(
            step=int(self.step),
            name=self.step.label,
            side=self.side.value,
            time_us=self.time_ns / 1000,
            packet=self.packet,
        )
        if self.detail:
            data["detail"] = self.detail
        return data


Listener = Callable[[TraceRecord], None]


class Trace:
    """An append-only list of trace records with listeners.

    ``state_source`` returns the current ``RingState``; the machine that wires
    device and guest sets it. Listeners run after each record is appended;
    the step debugger is one.
    """

    def __init__(self, enabled: bool = True, limit: int | None = None) -> None:
        self.enabled = enabled
        self.limit = limit
        self.records: list[TraceRecord] = []
        self.dropped = 0
        self.listeners: list[Listener] = []
        self.state_source: Callable[[], RingState] = RingState
        self.time_source: Callable[[], int] = lambda: 0

    def record(self, step: Step, packet: int | None = None, detail: str = "") -> None:
        """Append one record stamped with the current time and ring state."""
        if not self.enabled:
            return
        entry = TraceRecord(
            step, self.time_source(), packet, self.state_source(), detail
        )
        if self.limit is not None and len(self.records) >= self.limit:
            self.dropped += 1
        else:
            self.records.append(entry)
        for listener in self.listeners:
            listener(entry)

    def steps(self) -> list[int]:
        """Return the step numbers recorded, in order."""
        return [int(record.step) for record in self.records]

    def __iter__(self) -> Iterator[TraceRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)
