"""Guest CPU time per driver step, in virtual nanoseconds.

The guest model charges each step by advancing the shared ``VirtualClock``,
so host timers (the TX timer, a bottom half, a deferred kick) fire between
guest steps at the virtual time they would on a real machine.

NOTE: every default is an estimate of the order of magnitude of that code
path on a current x86 guest (a few dozen to a few hundred nanoseconds per
driver step, about half a microsecond to take an interrupt). None was
measured. Change them per run; the scenarios tune some on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["CostModel"]


@dataclass(frozen=True)
class CostModel:
    """Virtual time one guest step costs, in nanoseconds."""

    start_xmit: int = 150
    """Step 1: entering ``start_xmit`` for one packet."""
    free_old_xmit: int = 50
    """Steps 2 and 19: one pass of ``free_old_xmit_skbs``, without buffers."""
    free_per_buffer: int = 60
    """Each used buffer that ``free_old_xmit_skbs`` reclaims."""
    xmit_skb: int = 250
    """Step 3: building the header and adding the buffers."""
    kick_prepare: int = 30
    """Step 4: ``virtqueue_kick_prepare``, without the notification itself."""
    capacity_check: int = 10
    """Steps 13 and 20."""
    stop_queue: int = 20
    """Step 14."""
    enable_cb_delayed: int = 40
    """Steps 15 to 17: writing used_event and reading used.idx."""
    start_queue: int = 20
    """Step 21, and ``netif_wake_queue``."""
    disable_cb: int = 10
    """Steps 22 and 23."""
    qdisc_dequeue: int = 100
    """Taking one packet off the qdisc before ``start_xmit``."""
    hardirq: int = 500
    """Taking one interrupt: entry, the handler, exit."""
    napi_poll: int = 200
    """One NAPI poll, without the frames it handles."""
    rx_per_frame: int = 300
    """Receiving one frame in a NAPI poll."""
    refill_per_buffer: int = 80
    """Posting one receive buffer."""
    control_spin: int = 1_000
    """One round of spinning while a control command waits for its reply."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"cost {item.name}={value!r} is invalid: use an integer of"
                    f" nanoseconds, 0 or more"
                )

    @classmethod
    def free(cls) -> CostModel:
        """Return a model where every guest step takes no time."""
        return cls(**{item.name: 0 for item in fields(cls)})
