"""The interface between the vhost-user server and the device it serves.

The server speaks the protocol and owns the connection, the memory mappings
and every file descriptor. The device (virtio-net, or a test fake) gets only
the calls below, all made from the server's thread inside ``poll``:

``features()``
    The virtio feature bits the device offers. The server adds
    VHOST_USER_F_PROTOCOL_FEATURES (bit 30) and removes
    VIRTIO_F_ACCESS_PLATFORM (bit 33) and VIRTIO_F_RING_PACKED (bit 34),
    which it does not implement.
``set_features(features)``
    The bits the front-end acknowledged, without bit 30. It may be called
    again later, also while queues run (QEMU repeats SET_FEATURES on each
    start of the device).
``num_queues()``
    How many virtqueues the device has. Ring indices at or past it are
    rejected.
``queue_num()``
    The GET_QUEUE_NUM reply. For a network device it is the number of queue
    pairs, because QEMU's net/vhost-user.c compares it with the netdev's
    ``queues=`` option (one vhost device of two virtqueues per queue).
``start_queue(index, memory, size, desc_gpa, avail_gpa, used_gpa, last_avail_idx,
kick_fd, call_fd)``
    Begin processing a split virtqueue. ``memory`` is the front-end's RAM as
    a ``virtio.memory.GuestMemory`` with a real fence. The ring addresses are
    guest-physical and already checked to lie in one region each with their
    natural alignment. ``last_avail_idx`` is the first avail ring index to
    read. The protocol carries no used index: after a restart the device
    reads it from the used ring's ``idx`` field in ``memory``. ``kick_fd`` is
    None when the front-end requested polling. ``call_fd`` is None until the
    front-end sets one. Signal used buffers with
    ``os.eventfd_write(call_fd, 1)``.
``stop_queue(index) -> int``
    Stop processing and return the next avail index to read, which the
    server reports in GET_VRING_BASE and uses on a restart. A chain the device
    has taken from the avail ring must be put in the used ring before it
    returns, or the driver loses that buffer. After the call the device must
    not touch ``memory``, ``kick_fd`` or ``call_fd``: the server may unmap and
    close them.
``set_call_fd(index, call_fd)``
    Replace the call descriptor of a running queue (QEMU switches it when the
    guest masks interrupts). The old descriptor is closed after the call.
``on_kick(index)``
    The front-end kicked a running queue. The server has already drained the
    kick eventfd.
``reset()``
    Return to the initial state (RESET_DEVICE, or a new connection). Every
    queue is already stopped.

The device never owns a descriptor: it must not close ``kick_fd`` or
``call_fd``. A method may raise ``virtio.errors.VirtioError`` to reject a
request. The server then fails the request and closes the connection, except
in ``on_kick``, where it logs the error and stops watching that queue's kicks.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from virtio.memory import GuestMemory

__all__ = ["VhostUserDevice"]


@runtime_checkable
class VhostUserDevice(Protocol):
    """A device that a ``VhostUserServer`` drives; see the module docstring."""

    def features(self) -> int:
        """Return the virtio feature bits the device offers."""
        ...

    def set_features(self, features: int) -> None:
        """Apply the feature bits the front-end acknowledged."""
        ...

    def num_queues(self) -> int:
        """Return the number of virtqueues of the device."""
        ...

    def queue_num(self) -> int:
        """Return the GET_QUEUE_NUM reply (queue pairs for a network device)."""
        ...

    def start_queue(
        self,
        index: int,
        memory: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        last_avail_idx: int,
        kick_fd: int | None,
        call_fd: int | None,
    ) -> None:
        """Begin processing split virtqueue ``index``."""
        ...

    def stop_queue(self, index: int) -> int:
        """Stop processing queue ``index``; return its next avail index."""
        ...

    def set_call_fd(self, index: int, call_fd: int | None) -> None:
        """Use ``call_fd`` to signal used buffers of running queue ``index``."""
        ...

    def on_kick(self, index: int) -> None:
        """Process the avail ring of queue ``index`` after a kick."""
        ...

    def reset(self) -> None:
        """Return to the initial state; every queue is already stopped."""
        ...
