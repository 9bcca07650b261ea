"""The virtio-net device behind the vhost-user server: ``NetDeviceAdapter``.

``VirtioNetDevice`` models a device that a driver brings up through the
status field (virtio 1.2, 3.1.1). vhost-user has no status field: a ring
runs once the front-end has set it up and enabled it. The adapter maps one
model onto the other:

- ``set_features`` does the driver's part of initialization on the device:
  ACKNOWLEDGE, DRIVER, the features, FEATURES_OK and DRIVER_OK. A later
  SET_FEATURES with other bits (QEMU repeats it on each start) resets the
  device and restarts the rings that ran, from where they stopped.
- ``start_queue`` gives the device the front-end's memory and calls
  ``setup_queue``, which starts the queue at once because DRIVER_OK is set.
  The protocol carries no used index, so it is read from the used ring.
- ``stop_queue`` is ``VirtioNetDevice.stop_queue``: a TX chain waiting for
  the backend and the chains of a partly gathered RX frame are given back to
  the avail ring, and the returned index is where a restart reads next.
- Call descriptors go into an ``EventfdInterrupt``. The device has one
  queue pair (receiveq1 is ring 0, transmitq1 is ring 1) and no control
  queue.

Offered features. The device offers only the bits that the device side of
vhost-user implements (``VHOST_USER_FEATURES``). The control queue
(CTRL_VQ and the bits that need it) is left out because vhost-user
front-ends handle it themselves: QEMU's virtio-net model and DPDK's
virtio-user driver process control commands and never pass that ring to the
back-end. DPDK 22.11 also strips CTRL_VQ, MAC and STATUS from SET_FEATURES,
so offering CTRL_RX would lead to a feature set without the CTRL_VQ it
depends on. MAC, STATUS and MTU are configuration space fields, which this
back-end cannot serve (no GET_CONFIG), so they are not offered either.
IN_ORDER and RING_PACKED are never offered because the device does not
implement them, and DPDK acknowledges IN_ORDER whenever it is offered. A
front-end may acknowledge any subset: without MRG_RXBUF every received frame
goes into one chain (DPDK's ``mrg_rxbuf=0``), and without EVENT_IDX the
device uses the ring flags.

Memory ordering. The front-end runs on another CPU while the device reads
and writes the rings, so this back-end depends on these points:

- ``DeviceQueue`` reads avail.idx before the ring entries and descriptors it
  covers, and writes used elements before used.idx. x86-64 (TSO) keeps
  loads in order with loads and stores with stores, so these need no
  barrier. NOTE: a weakly ordered host (arm64) would need read and write
  barriers there, which the virtqueue code does not have.
- Where the device stores and then loads a field the driver writes, it
  calls ``memory.fence()``: after publishing used.idx before reading the
  driver's suppression fields (2.7.7.2), and after enabling notifications
  before reading avail.idx again (2.7.10.2). The server's ``GuestMemory``
  carries a real fence (``fence.load_full_fence``, a locked instruction on
  x86-64).
- ``start_queue`` reads used.idx once, before the queue runs: the front-end
  does not write it, and the previous back-end (or this one) wrote it before
  GET_VRING_BASE returned.
- ``start_queue`` enables notifications with that fence and processes what
  is already available. A queue stopped while notifications were off would
  otherwise keep NO_NOTIFY (or a stale avail_event) in the ring and the
  driver would never kick it again.
"""

from __future__ import annotations

import logging

from virtio import (
    DeviceStatus,
    FeatureError,
    GuestMemory,
    RingLayout,
    UsageError,
    VirtioFeature,
)

from ..eventfd import EventfdInterrupt
from ..features import GUEST_OFFLOADS, HOST_OFFLOADS, NetFeature
from ..net_device import RX_QUEUE, TX_QUEUE, VirtioNetDevice

__all__ = ["NetDeviceAdapter", "VHOST_USER_FEATURES", "QUEUE_PAIRS"]

logger = logging.getLogger(__name__)

#: Every feature bit the device may offer over vhost-user, as the module
#: docstring explains. ``VirtioNetDevice.offered`` is masked with it.
VHOST_USER_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.EVENT_IDX
    | VirtioFeature.INDIRECT_DESC
    | VirtioFeature.NOTIFY_ON_EMPTY
    | NetFeature.MRG_RXBUF
    | GUEST_OFFLOADS
    | HOST_OFFLOADS
)

#: Queue pairs of the device: one receiveq and one transmitq.
QUEUE_PAIRS = 1

_QUEUES = (RX_QUEUE, TX_QUEUE)
_INITIALIZED = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK


class _Ring:
    """The ``start_queue`` arguments of a running ring, kept for a restart."""

    __slots__ = ("memory", "layout", "kick_fd", "call_fd")

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        kick_fd: int | None,
        call_fd: int | None,
    ) -> None:
        self.memory = memory
        self.layout = layout
        self.kick_fd = kick_fd
        self.call_fd = call_fd


class NetDeviceAdapter:
    """Serve a ``VirtioNetDevice`` as a ``VhostUserDevice``.

    The device must have been created with an ``EventfdInterrupt`` as its
    ``interrupts``, because the adapter puts the front-end's call
    descriptors into it. Raises ``ValueError`` otherwise.
    """

    def __init__(self, device: VirtioNetDevice) -> None:
        if not isinstance(device.interrupts, EventfdInterrupt):
            raise ValueError(
                "the device needs an EventfdInterrupt as interrupts, not"
                f" {type(device.interrupts).__name__}"
            )
        self.device = device
        self.interrupts: EventfdInterrupt = device.interrupts
        self.negotiated: int | None = None
        self._rings: dict[int, _Ring] = {}

    # -- VhostUserDevice ------------------------------------------------------

    def features(self) -> int:
        """Return the device's offered features less what vhost-user cannot carry."""
        return self.device.offered & VHOST_USER_FEATURES

    def set_features(self, features: int) -> None:
        """Initialize the device with ``features``, as a driver would (3.1.1).

        Raises ``FeatureError`` when the device refuses the set (FEATURES_OK
        did not stick), which makes the server reject SET_FEATURES.
        """
        if features == self.negotiated and self.device.running:
            return
        rings = dict(self._rings)
        restart = {index: self.stop_queue(index) for index in rings}
        self._initialize(features)
        for index, last_avail_idx in restart.items():
            ring = rings[index]
            self._start(index, ring, last_avail_idx)

    def num_queues(self) -> int:
        return len(_QUEUES)

    def queue_num(self) -> int:
        return QUEUE_PAIRS

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
        """Start ring ``index`` of the device from ``last_avail_idx``.

        A front-end that starts a ring without SET_FEATURES gets the device
        initialized with no features (a legacy driver). Raises
        ``UsageError`` for a ring that does not exist or already runs.
        """
        if index not in _QUEUES:
            raise UsageError(
                f"queue {index} does not exist: the device has queues 0 (RX)"
                " and 1 (TX)"
            )
        if index in self._rings:
            raise UsageError(f"queue {index} is already running")
        if self.negotiated is None:
            self._initialize(0)
        layout = RingLayout(size, desc_gpa, avail_gpa, used_gpa)
        self._start(index, _Ring(memory, layout, kick_fd, call_fd), last_avail_idx)

    def stop_queue(self, index: int) -> int:
        """Stop ring ``index`` and return the avail index a restart reads next."""
        ring = self._rings.pop(index, None)
        if ring is None:
            raise UsageError(f"queue {index} is not running")
        # The device may still complete a chain, and notify, while it stops.
        next_avail = self.device.stop_queue(index)
        self.interrupts.call_fds.pop(index, None)
        return next_avail

    def set_call_fd(self, index: int, call_fd: int | None) -> None:
        ring = self._rings.get(index)
        if ring is None:
            raise UsageError(f"queue {index} is not running")
        ring.call_fd = call_fd
        self._set_call_fd(index, call_fd)

    def on_kick(self, index: int) -> None:
        """Pass a kick to the device.

        Raises the ``DriverError`` that broke the device during this kick, so
        the server logs it and stops watching the ring.
        """
        device = self.device
        was_broken = device.broken
        device.handle_kick(index)
        if device.error is not None and not was_broken:
            raise device.error

    def reset(self) -> None:
        """Reset the device after the server stopped every ring."""
        self._rings.clear()
        self.interrupts.call_fds.clear()
        self.negotiated = None
        self.device.reset()

    # -- helpers --------------------------------------------------------------

    def _initialize(self, features: int) -> None:
        device = self.device
        device.reset()
        device.write_status(DeviceStatus.ACKNOWLEDGE)
        device.write_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        device.write_driver_features(features)
        status = device.write_status(_INITIALIZED)
        if not status & DeviceStatus.FEATURES_OK:
            self.negotiated = None
            raise FeatureError(features, "the device left FEATURES_OK clear")
        device.write_status(_INITIALIZED | DeviceStatus.DRIVER_OK)
        self.negotiated = features
        logger.info("device initialized with features %#x", features)

    def _start(self, index: int, ring: _Ring, last_avail_idx: int) -> None:
        device = self.device
        used_idx = ring.memory.u16_array(ring.layout.used, 2)[1]
        device.set_memory(ring.memory)
        device.setup_queue(index, ring.layout, last_avail_idx, used_idx)
        self._rings[index] = ring
        self._set_call_fd(index, ring.call_fd)
        queue = device.queues[index]
        if queue.enable_notification():
            self._process(index)

    def _process(self, index: int) -> None:
        """Handle chains that were available before the ring started."""
        if not self.device.running:
            return
        # Both paths catch the driver's errors and break the device themselves.
        if index == TX_QUEUE:
            self.device.tx_policy.on_kick()
        else:
            self.device.rx.on_kick()

    def _set_call_fd(self, index: int, call_fd: int | None) -> None:
        if call_fd is None:
            self.interrupts.call_fds.pop(index, None)
        else:
            self.interrupts.call_fds[index] = call_fd
