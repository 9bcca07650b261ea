"""Counters of the guest driver model; drops are counted by reason.

Guest-side drop reasons:

- ``qdisc-full``: ``send`` found the qdisc at its limit (txqueuelen);
- ``tx-ring-full``: ``xmit_skb`` found too few free descriptors, which
  Linux reports as an unexpected TX queue failure and drops the packet;
- ``tx-reset``: a packet in the TX ring that the device had not completed
  when the driver reset it;
- ``rx-too-short``: a used RX buffer shorter than the header plus an
  Ethernet header (Linux counts it in rx_length_errors);
- ``rx-too-long``: a used length beyond the buffer the driver posted;
- ``rx-bad-num-buffers``: a mergeable header whose num_buffers is 0 or
  names more buffers than the device made used.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GuestStats"]


@dataclass
class GuestStats:
    """Counters of the driver model, named like Linux's per-queue statistics."""

    tx_packets: int = 0
    """Packets added to the TX ring."""
    tx_bytes: int = 0
    tx_reclaimed: int = 0
    """TX buffers taken back from the used ring."""
    kicks: int = 0
    """TX notifications sent to the device."""
    kicks_suppressed: int = 0
    """TX kicks that kick_prepare found unnecessary (step 4)."""
    kicks_deferred: int = 0
    """Packets sent with xmit_more, which do not try to kick at all."""
    queue_stops: int = 0
    queue_wakes: int = 0
    """Restarts of a stopped TX queue (netif_wake_queue and netif_start_queue)."""
    tx_interrupts: int = 0
    tx_napi_polls: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_interrupts: int = 0
    rx_napi_polls: int = 0
    rx_buffers_posted: int = 0
    rx_kicks: int = 0
    control_commands: int = 0
    control_interrupts: int = 0
    config_interrupts: int = 0
    resets: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def interrupts(self) -> int:
        """Used buffer notifications of every queue the driver took."""
        return self.tx_interrupts + self.rx_interrupts + self.control_interrupts

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["drops"] = dict(self.drops)
        return data
