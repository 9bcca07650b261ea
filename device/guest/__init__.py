"""A model of Linux's virtio_net driver, sans-IO, in virtual time.

``VirtioNetDriver`` probes a ``VirtioNetDevice``, transmits frames from its
qdisc with the classic or the NAPI start_xmit, receives frames in small, big
or mergeable buffers, and sends control commands. ``device.machine.Machine``
wires it to a device, a clock, a kick notifier and a backend.
"""

from .config import (
    DEFAULT_MAX_SKB_FRAGS,
    GOOD_PACKET_LEN,
    MERGEABLE_BUFFER_LEN,
    GuestConfig,
    RxMode,
    TxVariant,
    negotiate,
)
from .control import VIRTIO_NET_ERR, VIRTIO_NET_OK, ControlQueue, ControlTimeout
from .costs import CostModel
from .driver import MemoryPlan, ProbeError, VirtioNetDriver
from .memory_plan import BumpAllocator, SlotPool
from .stats import GuestStats

__all__ = [
    "BumpAllocator",
    "ControlQueue",
    "ControlTimeout",
    "CostModel",
    "DEFAULT_MAX_SKB_FRAGS",
    "GOOD_PACKET_LEN",
    "GuestConfig",
    "GuestStats",
    "MERGEABLE_BUFFER_LEN",
    "MemoryPlan",
    "ProbeError",
    "RxMode",
    "SlotPool",
    "TxVariant",
    "VIRTIO_NET_ERR",
    "VIRTIO_NET_OK",
    "VirtioNetDriver",
    "negotiate",
]
