"""Errors that backends raise when they cannot be opened, configured or read.

The backends of this package do not raise out of ``Backend.send`` for an
operating system error. They return ``SendStatus.DROPPED`` and count a reason
instead. These
exceptions cover the other paths, where the caller has to act: opening a TAP
without permission, a network namespace that does not exist, a capture file
that cannot be created or parsed.
"""

from __future__ import annotations

import os

__all__ = [
    "BackendError",
    "CaptureError",
    "CaptureFormatError",
    "NamespaceNotFoundError",
    "UnsupportedLinkTypeError",
]


class BackendError(Exception):
    """Base class of every error the backends package raises.

    ``errno`` is the operating system error number behind the failure, or None
    when no system call failed.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        self.errno = errno
        super().__init__(message)


class NamespaceNotFoundError(BackendError):
    """A named network namespace does not exist under /run/netns."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        super().__init__(
            f"network namespace {name!r} not found ({path} is missing or not a"
            f" namespace mount); create it with network_namespace() or"
            f" `ip netns add {name}`"
        )


class CaptureError(BackendError):
    """A capture file could not be opened, written or read."""

    def __init__(
        self, path: str | os.PathLike[str], message: str, *, errno: int | None = None
    ) -> None:
        self.path = os.fspath(path)
        super().__init__(f"capture file {self.path}: {message}", errno=errno)


class CaptureFormatError(CaptureError):
    """A capture file is not valid pcap or pcapng, or ends in the middle.

    ``offset`` is the byte offset of the header or block where parsing failed.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int, message: str) -> None:
        self.offset = offset
        super().__init__(path, f"at offset {offset}: {message}")


class UnsupportedLinkTypeError(CaptureFormatError):
    """A capture file (or one pcapng interface) is not Ethernet (link type 1)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        offset: int,
        link_type: int,
        interface: int | None = None,
    ) -> None:
        self.link_type = link_type
        self.link_type_name = _LINK_TYPE_NAMES.get(link_type, "unknown")
        self.interface = interface
        where = "" if interface is None else f"interface {interface} has "
        super().__init__(
            path,
            offset,
            f"{where}link type {link_type} ({self.link_type_name}), but only link"
            f" type 1 (ETHERNET) is supported; capture on an Ethernet interface",
        )


# Names of common link types, from the LINKTYPE_ list of tcpdump.org.
_LINK_TYPE_NAMES = {
    0: "NULL, BSD loopback",
    1: "ETHERNET",
    101: "RAW, raw IP",
    105: "IEEE802_11",
    113: "LINUX_SLL, Linux cooked capture",
    127: "IEEE802_11_RADIOTAP",
    228: "IPV4",
    229: "IPV6",
    276: "LINUX_SLL2, Linux cooked capture v2",
}
