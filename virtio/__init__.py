"""A sans-IO split virtqueue: guest memory, device side, driver side.

Nothing in this package does I/O or keeps time: guest memory and a memory
fence are handed in, and methods return decisions ("notify the driver",
"buffers slipped in, drain again") instead of acting on them.
"""

import logging

from .device_queue import MAX_CHAIN_BYTES, Chain, Descriptor, DeviceQueue
from .driver_queue import BufferSpec, DriverQueue, QueueFull
from .errors import (
    DRIVER_ERROR_KINDS,
    AddressOutOfRange,
    AvailIndexJump,
    BadIndirectTable,
    ChainTooLarge,
    DescriptorLoop,
    DeviceError,
    DriverError,
    FeatureError,
    HeadOutOfRange,
    MemoryAccessError,
    NestedIndirect,
    NextOutOfRange,
    RingOutOfRange,
    StatusTransitionError,
    TooManyInFlight,
    UsageError,
    VirtioError,
    WriteBeforeRead,
)
from .event_index import distance16, need_event, wrap16
from .features import VirtioFeature, usable_features, validate_features
from .layout import (
    DESCRIPTOR_SIZE,
    MAX_QUEUE_SIZE,
    AvailFlags,
    DescFlags,
    RingLayout,
    UsedFlags,
)
from .memory import GuestMemory, MemoryRegion
from .status import DeviceStatus, StatusRegister

__all__ = [
    "AddressOutOfRange",
    "AvailFlags",
    "AvailIndexJump",
    "BadIndirectTable",
    "BufferSpec",
    "Chain",
    "ChainTooLarge",
    "DESCRIPTOR_SIZE",
    "DRIVER_ERROR_KINDS",
    "DescFlags",
    "Descriptor",
    "DescriptorLoop",
    "DeviceError",
    "DeviceQueue",
    "DeviceStatus",
    "DriverError",
    "DriverQueue",
    "FeatureError",
    "GuestMemory",
    "HeadOutOfRange",
    "MAX_CHAIN_BYTES",
    "MAX_QUEUE_SIZE",
    "MemoryAccessError",
    "MemoryRegion",
    "NestedIndirect",
    "NextOutOfRange",
    "QueueFull",
    "RingLayout",
    "RingOutOfRange",
    "StatusRegister",
    "StatusTransitionError",
    "TooManyInFlight",
    "UsageError",
    "UsedFlags",
    "VirtioError",
    "VirtioFeature",
    "WriteBeforeRead",
    "distance16",
    "need_event",
    "usable_features",
    "validate_features",
    "wrap16",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
