"""Per-ring state that the front-end sets up before a ring starts.

A ring is stopped, or started and processed by the device (QEMU
docs/interop/vhost-user.rst, "Ring states"). It starts once it has a size, an
address, a kick (SET_VRING_KICK) and guest memory, and is enabled. It stops on
GET_VRING_BASE, on SET_VRING_ENABLE 0, and on every change that needs the
device to look at the ring afresh (new memory table, new address, new kick).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .protocol import VringAddress

__all__ = ["MAX_QUEUE_SIZE", "RingLayout", "Vring", "ring_layouts"]

#: Largest split virtqueue size (virtio 1.2, 2.7: Queue Size is at most 32768).
MAX_QUEUE_SIZE = 32768


@dataclass(frozen=True)
class RingLayout:
    """One of the three parts of a split virtqueue, in user address space."""

    name: str
    user_addr: int
    length: int
    alignment: int


def ring_layouts(address: VringAddress, size: int) -> tuple[RingLayout, ...]:
    """Return the descriptor table, avail ring and used ring of a split queue.

    Sizes and alignments are from virtio 1.2, 2.7 ("Split Virtqueues"),
    including the event index field after each ring.
    """
    return (
        RingLayout("descriptor table", address.desc_user_addr, 16 * size, 16),
        RingLayout("avail ring", address.avail_user_addr, 6 + 2 * size, 2),
        RingLayout("used ring", address.used_user_addr, 6 + 8 * size, 4),
    )


@dataclass
class Vring:
    """The state of one ring, as set up by the front-end.

    The ring owns ``kick_fd``, ``call_fd`` and ``err_fd``. ``kicked`` is set
    by SET_VRING_KICK (even with the NOFD flag, which requests polling) and
    cleared by GET_VRING_BASE. ``broken`` is set when the device raised while
    processing a kick, and stops the server from watching the kick fd.
    """

    index: int
    size: int | None = None
    address: VringAddress | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    kicked: bool = False
    enabled: bool = False
    started: bool = False
    broken: bool = False

    def replace_kick_fd(self, fd: int | None) -> None:
        """Take ownership of a new kick descriptor and close the old one."""
        old, self.kick_fd = self.kick_fd, fd
        _close(old)

    def replace_call_fd(self, fd: int | None) -> int | None:
        """Take ownership of a new call descriptor; return the old one to close."""
        old, self.call_fd = self.call_fd, fd
        return old

    def replace_err_fd(self, fd: int | None) -> None:
        """Take ownership of a new error descriptor and close the old one."""
        old, self.err_fd = self.err_fd, fd
        _close(old)

    def close_fds(self) -> None:
        """Close every descriptor the ring owns."""
        self.replace_kick_fd(None)
        _close(self.replace_call_fd(None))
        self.replace_err_fd(None)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
