"""Network backends of the virtio-net device: TAP, pcap and loopback."""

import logging

from .base import Backend, Buffer, SendStatus
from .errors import (
    BackendError,
    CaptureError,
    CaptureFormatError,
    NamespaceNotFoundError,
    UnsupportedLinkTypeError,
)
from .loopback import LoopbackBackend, NullBackend
from .netns import (
    create_namespace,
    delete_namespace,
    enter_namespace,
    namespace_exists,
    network_namespace,
)
from .pcap import PcapBackend, PcapWriter, read_capture
from .tap import TapBackend, tun_offload_flags

__all__ = [
    "Backend",
    "BackendError",
    "Buffer",
    "CaptureError",
    "CaptureFormatError",
    "LoopbackBackend",
    "NamespaceNotFoundError",
    "NullBackend",
    "PcapBackend",
    "PcapWriter",
    "SendStatus",
    "TapBackend",
    "UnsupportedLinkTypeError",
    "create_namespace",
    "delete_namespace",
    "enter_namespace",
    "namespace_exists",
    "network_namespace",
    "read_capture",
    "tun_offload_flags",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
