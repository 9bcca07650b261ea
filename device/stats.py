"""Statistics of the device and of each queue: counters, never log lines.

Every drop has a named reason; the names are stable because reports, case
files and tests key on them:

- ``header-incomplete``: a TX chain shorter than the virtio_net_hdr;
- ``frame-empty``: a TX chain that is only a header;
- ``frame-too-large``: a TX frame over 65550 bytes, or a frame without GSO
  over the negotiated MTU in either direction;
- ``writable-in-tx``: a TX chain with a device-writable buffer;
- ``no-writable-in-rx``: an RX chain without a device-writable buffer;
- ``rx-never-fits``: a received frame no posted buffer can hold;
- ``rx-buffer-too-small``: a mergeable RX buffer shorter than the header;
- ``no-rx-buffer``: a received frame dropped because the hold queue was full;
- ``not-ready``: a frame or kick before DRIVER_OK, or after the device broke;
- ``queue-stopped``: a received frame held for RX, or being delivered, when
  its queue stopped or the device was reset;
- ``unknown-queue``: a kick for a queue that does not exist;
- ``backend-rejected``: the backend refused a frame for good;
- ``bad-gso``, ``bad-csum-offset``: TX offload requests the device cannot honour,
  and a received frame whose checksum offsets point past its end;
- ``rx-gso-not-negotiated``: a received GSO frame for a driver without that offload;
- ``filtered``: a received frame the receive filter rejected.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

__all__ = ["QueueStats", "DeviceStats", "DROP_REASONS"]

DROP_REASONS = (
    "header-incomplete",
    "frame-empty",
    "frame-too-large",
    "writable-in-tx",
    "no-writable-in-rx",
    "rx-never-fits",
    "rx-buffer-too-small",
    "no-rx-buffer",
    "not-ready",
    "queue-stopped",
    "unknown-queue",
    "backend-rejected",
    "bad-gso",
    "bad-csum-offset",
    "rx-gso-not-negotiated",
    "filtered",
)


@dataclass
class QueueStats:
    """Counters of one virtqueue."""

    frames: int = 0
    bytes: int = 0
    kicks: int = 0
    kicks_suppressed: int = 0
    vm_exits: int = 0
    interrupts: int = 0
    interrupts_suppressed: int = 0
    timer_arms: int = 0
    timer_fires: int = 0
    bh_runs: int = 0
    ring_polls: int = 0
    flushes: int = 0
    queue_stops: int = 0
    queue_wakes: int = 0
    held: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] += count

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["drops"] = dict(self.drops)
        return data


@dataclass
class DeviceStats:
    """Counters of the device: one ``QueueStats`` per queue plus device events."""

    queues: dict[int, QueueStats] = field(default_factory=dict)
    config_interrupts: int = 0
    resets: int = 0
    breaks: int = 0
    ignored_kicks: collections.Counter[str] = field(default_factory=collections.Counter)

    def queue(self, index: int) -> QueueStats:
        stats = self.queues.get(index)
        if stats is None:
            stats = self.queues[index] = QueueStats()
        return stats

    @property
    def drops(self) -> collections.Counter[str]:
        """Drops of every queue and ignored kicks, by reason."""
        total: collections.Counter[str] = collections.Counter()
        for stats in self.queues.values():
            total.update(stats.drops)
        total.update(self.ignored_kicks)
        return total

    def total(self, name: str) -> int:
        """Sum one counter over every queue."""
        return sum(getattr(stats, name) for stats in self.queues.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "queues": {str(i): s.to_dict() for i, s in sorted(self.queues.items())},
            "config_interrupts": self.config_interrupts,
            "resets": self.resets,
            "breaks": self.breaks,
            "drops": dict(self.drops),
        }
