"""The virtio-net device: features, status, configuration and its queues.

``VirtioNetDevice`` is what a transport drives (the guest model in virtual
time, the vhost-user server with a real guest): feature negotiation, the
device status state machine, the configuration space (virtio 1.2, 5.1.4),
queue set-up, kicks, reset. Frames from the backend come in through
``receive``. Queue 0 is receiveq1, 1 is transmitq1 and 2 the controlq, which
exists only when CTRL_VQ is negotiated (5.1.2).

A driver that breaks a ring breaks the device, as QEMU's ``virtio_error``
does: DEVICE_NEEDS_RESET is set, one configuration change interrupt is sent
(when DRIVER_OK is set, 2.1.2), and from then on every kick and frame is
ignored in O(1), counted, until the driver resets the device.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from backends.base import Backend
from virtio import (
    DeviceQueue,
    DeviceStatus,
    DriverError,
    GuestMemory,
    RingLayout,
    StatusRegister,
    UsageError,
    VirtioFeature,
    usable_features,
    validate_features,
)

from .clock import Clock, VirtualClock
from .control import VIRTIO_NET_ERR, ControlHandler
from .features import (
    DEFAULT_OFFER,
    GUEST_OFFLOADS,
    HOST_OFFLOADS,
    NET_DEPENDENCIES,
    NetFeature,
)
from .header import MAX_FRAME_SIZE, header_size
from .notifier import InterruptNotifier
from .rx import DEFAULT_HOLD_LIMIT, RxQueue, RxResult
from .rx_filter import ReceiveFilter
from .stats import DeviceStats
from .trace import Step, Trace
from .tx import TxQueue
from .tx_policy import (
    DEFAULT_BH_DELAY_NS,
    DEFAULT_TX_BURST,
    DEFAULT_TX_TIMEOUT_NS,
    TxMode,
    TxPolicy,
    make_policy,
)

__all__ = [
    "VirtioNetDevice",
    "RX_QUEUE",
    "TX_QUEUE",
    "CTRL_QUEUE",
    "LINK_UP",
    "ANNOUNCE",
    "DEFAULT_MAC",
]

log = logging.getLogger(__name__)

CONTROL_BUDGET = 64
"""Control requests handled per pass before the device yields."""
RX_QUEUE = 0
TX_QUEUE = 1
CTRL_QUEUE = 2
LINK_UP = 1
ANNOUNCE = 2
DEFAULT_MAC = bytes.fromhex("525400123456")
_CONFIG = struct.Struct("<6sHHH")
ETHERNET_HEADER = 14
VLAN_TAG = 4
MAX_CONTROL_REQUEST = 65536
"""Longest control request read, in bytes. A MAC table of 10000 entries fits;
no command the device knows needs more."""


class VirtioNetDevice:
    """One virtio-net device with one queue pair and an optional control queue.

    ``offered`` defaults to ``DEFAULT_OFFER``, less the segmentation offloads
    when the backend cannot pass a virtio_net_hdr on (``takes_offloads``).
    The backend receives frames on TX; frames for RX come from whoever owns
    the backend, through ``receive``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        interrupts: InterruptNotifier | None = None,
        clock: Clock | None = None,
        trace: Trace | None = None,
        offered: int | None = None,
        mac: bytes = DEFAULT_MAC,
        mtu: int = 1500,
        tx_mode: str = "bh",
        tx_timeout_ns: int = DEFAULT_TX_TIMEOUT_NS,
        tx_burst: int = DEFAULT_TX_BURST,
        bh_delay_ns: int = DEFAULT_BH_DELAY_NS,
        hold_limit: int = DEFAULT_HOLD_LIMIT,
        ring_poll_ns: int = 0,
    ) -> None:
        if offered is None:
            offered = DEFAULT_OFFER
            if not backend.takes_offloads:
                offered &= ~(GUEST_OFFLOADS | HOST_OFFLOADS) | NetFeature.CSUM
        validate_features(offered, offered, NET_DEPENDENCIES)
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} is invalid: use 68 to 65535 (5.1.4.1)")
        self.backend = backend
        self.interrupts = interrupts or InterruptNotifier()
        self.clock = clock or VirtualClock()
        self.trace = trace if trace is not None else Trace(enabled=False)
        self.offered = offered
        self.mac = bytes(mac)
        self.mtu = mtu
        self.tx_mode = tx_mode
        self.policy_options = {
            "tx_timeout_ns": tx_timeout_ns,
            "tx_burst": tx_burst,
            "bh_delay_ns": bh_delay_ns,
            "ring_poll_ns": ring_poll_ns,
        }
        TxMode(tx_mode)  # raises ValueError naming an unknown mode
        self.hold_limit = hold_limit
        #: Called when the backend returned BUSY for a TX frame; the owner of
        #: the backend then waits for it to be writable and calls
        #: ``backend_writable``.
        self.on_backend_busy: Callable[[], None] = _ignore
        self.stats = DeviceStats()
        self.status = StatusRegister()
        self.memory: GuestMemory | None = None
        self.link_status = LINK_UP
        self.reset()

    # -- lifecycle --------------------------------------------------------------

    def reset(self) -> None:
        """Return to the state after power-on (2.4): status 0, no queues."""
        policy = getattr(self, "tx_policy", None)
        if policy is not None:
            policy.cancel()
        rx = getattr(self, "rx", None)
        if rx is not None and rx.held:
            # Frames taken from the backend and not delivered are lost with
            # the reset; they are counted. The chains in flight need no
            # unpop: the driver sets the rings up again.
            rx.stats.drop("queue-stopped", len(rx.held))
            rx.held.clear()
        # A reset can come from inside a backend call, with a transmit or a
        # delivery still on the stack: the old queues must not touch the
        # rings or notify after the reset (2.4.1), so they are detached.
        for queue in getattr(self, "queues", {}).values():
            queue.detach()
        self.status.write(0)
        self.driver_features = 0
        self.error: DriverError | None = None
        self.layouts: dict[int, tuple[RingLayout, int, int]] = {}
        self.queues: dict[int, DeviceQueue] = {}
        self.rx: RxQueue | None = None
        self.tx: TxQueue | None = None
        self.tx_policy: TxPolicy | None = None
        self.filter = ReceiveFilter(mac=self.mac)
        self.control: ControlHandler | None = None
        self.link_status &= LINK_UP
        self.stats.resets += 1

    @property
    def negotiated(self) -> int:
        """Features in force: those accepted, once FEATURES_OK stuck."""
        return self.driver_features

    @property
    def header_len(self) -> int:
        return header_size(self.driver_features)

    @property
    def broken(self) -> bool:
        return self.error is not None

    @property
    def running(self) -> bool:
        """DRIVER_OK is set and the device is not broken."""
        return self.status.driver_ok and self.error is None

    # -- feature negotiation and status ----------------------------------------

    def write_driver_features(self, features: int) -> None:
        """Record the features the driver accepted (checked at FEATURES_OK)."""
        if self.status.value & DeviceStatus.FEATURES_OK:
            log.warning("driver features written after FEATURES_OK; ignored")
            return
        self.driver_features = features

    def _validate_driver_features(self) -> None:
        validate_features(self.offered, self.driver_features, NET_DEPENDENCIES)

    def write_status(self, value: int) -> DeviceStatus:
        """Apply a driver write of the status byte; 0 resets the device.

        Raises ``virtio.StatusTransitionError`` for a write the state machine
        does not allow. Setting DRIVER_OK starts the queues that were set up.
        """
        if value == 0:
            self.reset()
            return self.status.value
        was_ok = self.status.driver_ok
        modern = bool(self.driver_features & VirtioFeature.VERSION_1)
        new = self.status.write(
            value, modern=modern, validate_features=self._validate_driver_features
        )
        if new & DeviceStatus.DRIVER_OK and not was_ok:
            if not modern:
                # A legacy driver skips FEATURES_OK, so nothing checked its
                # choice: keep only what was offered and is consistent.
                self.driver_features = usable_features(
                    self.offered, self.driver_features, NET_DEPENDENCIES
                )
            self._start()
        return new

    def configure(
        self, features: int, memory: GuestMemory, layouts: dict[int, RingLayout]
    ) -> DeviceStatus:
        """Run the whole initialization a driver does, in one call (3.1.1).

        Sets ACKNOWLEDGE and DRIVER, writes ``features``, sets FEATURES_OK,
        sets up the queues and sets DRIVER_OK. Returns the final status; a
        refused feature set leaves FEATURES_OK clear and the device stopped.
        """
        self.write_status(DeviceStatus.ACKNOWLEDGE)
        self.write_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        self.write_driver_features(features)
        status = self.write_status(
            DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        )
        if not status & DeviceStatus.FEATURES_OK:
            return status
        self.set_memory(memory)
        for index, layout in layouts.items():
            self.setup_queue(index, layout)
        return self.write_status(status | DeviceStatus.DRIVER_OK)

    def set_memory(self, memory: GuestMemory) -> None:
        self.memory = memory

    def queue_exists(self, index: int) -> bool:
        if index in (RX_QUEUE, TX_QUEUE):
            return True
        return index == CTRL_QUEUE and bool(self.driver_features & NetFeature.CTRL_VQ)

    def setup_queue(
        self, index: int, layout: RingLayout, last_avail_idx: int = 0, used_idx: int = 0
    ) -> None:
        """Record a queue's layout (the queue address registers and enable).

        A queue that does not exist for the negotiated features is ignored.
        When DRIVER_OK is already set (vhost-user starts rings late), the
        queue starts at once.
        """
        if not self.queue_exists(index):
            return
        self.layouts[index] = (layout, last_avail_idx, used_idx)
        if self.status.driver_ok:
            self._start_queue(index)

    def stop_queue(self, index: int) -> int:
        """Stop one running queue and return its next avail index.

        This is vhost-user's GET_VRING_BASE (and a queue reset, 2.6.1): the
        device finishes or gives back the chains it popped (``TxQueue.stop``,
        ``RxQueue.stop``), forgets the queue and keeps no view of guest
        memory once no queue runs. Restarting with ``setup_queue`` from the
        returned index loses no chain. Raises ``UsageError`` when the queue
        is not running.
        """
        queue = self.queues.pop(index, None)
        if queue is None:
            raise UsageError(f"queue {index} is not running")
        self.layouts.pop(index, None)
        if index == TX_QUEUE:
            if self.tx_policy is not None:
                self.tx_policy.cancel()
            self.tx.stop()
            self.tx = None
            self.tx_policy = None
        elif index == RX_QUEUE:
            self.rx.stop()
            self.rx = None
        else:
            self.control = None
        if not self.queues:
            self.memory = None
        return queue.last_avail_idx

    def _start(self) -> None:
        for index in sorted(self.layouts):
            self._start_queue(index)

    def _start_queue(self, index: int) -> None:
        if self.memory is None:
            raise RuntimeError("set_memory must come before the queues start")
        layout, last_avail, used = self.layouts[index]
        features = self.driver_features
        queue = DeviceQueue(
            self.memory,
            layout,
            index=index,
            event_idx=bool(features & VirtioFeature.EVENT_IDX),
            indirect=bool(features & VirtioFeature.INDIRECT_DESC),
            notify_on_empty=bool(features & VirtioFeature.NOTIFY_ON_EMPTY),
            last_avail_idx=last_avail,
            used_idx=used,
        )
        # The queue starts from a reset, so used.idx at start is a valid
        # reference for the event index test (2.7.7.2): the first completion
        # notifies only if it crosses used_event, like every later one.
        queue.signalled_used_valid = True
        self.queues[index] = queue
        if index == RX_QUEUE:
            self.rx = self._make_rx(queue)
        elif index == TX_QUEUE:
            self.tx = self._make_tx(queue)
            self.tx_policy = make_policy(
                self.tx_mode,
                self.tx,
                self.clock,
                self.trace,
                self.stats.queue(TX_QUEUE),
                **self.policy_options,
            )
        else:
            self.control = ControlHandler(
                self.filter,
                features,
                on_mac=self._set_mac,
                on_announce_ack=self._announce_done,
            )
        self.filter.vlan_filtering = bool(features & NetFeature.CTRL_VLAN)
        self.backend.configure(self.header_len, features & GUEST_OFFLOADS)
        # used.flags and avail_event in guest memory may be left over from an
        # earlier run of the queue (a vhost-user frontend reconnecting), and a
        # stale value would keep the driver from ever kicking: write them.
        slipped_in = queue.enable_notification()
        if slipped_in and (last_avail or used):
            # A restored ring may hold chains whose kick went to the previous
            # backend; look at them now instead of waiting for the next kick.
            self.handle_kick(index)

    def _make_rx(self, queue: DeviceQueue) -> RxQueue:
        max_frame = 65535 + ETHERNET_HEADER
        if self.driver_features & NetFeature.MTU:
            max_frame = self.mtu + ETHERNET_HEADER + VLAN_TAG
        return RxQueue(
            queue,
            header_len=self.header_len,
            features=self.driver_features,
            stats=self.stats.queue(RX_QUEUE),
            trace=self.trace,
            interrupt=self.interrupts.interrupt,
            suppressed=self.interrupts.suppressed,
            on_break=self.fail,
            max_frame=max_frame,
            mtu=self._negotiated_mtu(),
            hold_limit=self.hold_limit,
        )

    def _negotiated_mtu(self) -> int | None:
        return self.mtu if self.driver_features & NetFeature.MTU else None

    def _make_tx(self, queue: DeviceQueue) -> TxQueue:
        return TxQueue(
            queue,
            self.backend,
            header_len=self.header_len,
            features=self.driver_features,
            stats=self.stats.queue(TX_QUEUE),
            trace=self.trace,
            interrupt=self.interrupts.interrupt,
            suppressed=self.interrupts.suppressed,
            on_break=self.fail,
            max_frame=MAX_FRAME_SIZE,
            mtu=self._negotiated_mtu(),
            software_checksum=not self.backend.takes_offloads,
            on_busy=self._backend_busy,
        )

    def _backend_busy(self) -> None:
        self.on_backend_busy()

    # -- the broken state --------------------------------------------------------

    def fail(self, error: DriverError) -> None:
        """Break the device after a driver violation (2.1.2)."""
        if self.error is not None:
            return
        self.error = error
        self.stats.breaks += 1
        log.error("virtio-net device broken: %s (%s)", error, error.kind)
        if self.tx_policy is not None:
            self.tx_policy.cancel()
        # Every queue stops now, not only the one that broke: a flush or a
        # delivery under way on another queue must not go on consuming.
        for queue in self.queues.values():
            queue.mark_broken(error)
        modern = bool(self.driver_features & VirtioFeature.VERSION_1)
        if self.status.set_needs_reset() and modern and self.status.driver_ok:
            self._config_interrupt()

    def _config_interrupt(self) -> None:
        self.stats.config_interrupts += 1
        self.trace.record(Step.CONFIG_INTERRUPT)
        self.interrupts.config_interrupt()

    # -- notifications from the driver -------------------------------------------

    def handle_kick(self, queue: int) -> None:
        """An available buffer notification for ``queue`` (the notify register).

        The value is taken as unsigned at the transport boundary: a queue that
        does not exist, or a kick before DRIVER_OK or after the device broke,
        is ignored and counted.
        """
        if not self.running:
            self.stats.ignored_kicks["not-ready"] += 1
            return
        if queue not in self.queues:
            self.stats.ignored_kicks["unknown-queue"] += 1
            return
        self.stats.queue(queue).kicks += 1
        if queue == TX_QUEUE:
            self.tx_policy.on_kick()
        elif queue == RX_QUEUE:
            self.rx.on_kick()
        else:
            self._process_control()

    def _process_control(self) -> None:
        queue = self.queues.get(CTRL_QUEUE)
        if queue is None or not self.running:
            return
        handled = 0
        try:
            for chain in queue.chains(CONTROL_BUDGET):
                handled += 1
                ack = VIRTIO_NET_ERR
                # The request is copied, so its guest-chosen length is bounded
                # first; a longer one gets ERR without being read.
                if chain.writable and chain.readable_len <= MAX_CONTROL_REQUEST:
                    request = b"".join(bytes(view) for view in chain.readable)
                    ack = self.control.handle(request)
                if not queue.ready:
                    # The command reset or broke the device: touch nothing.
                    return
                written = 0
                if chain.writable:
                    chain.writable[0][0] = ack
                    written = 1
                queue.add_used(chain.head, written)
        except DriverError as error:
            self.fail(error)
            return
        if queue.unpublished and queue.publish():
            self.interrupts.interrupt(CTRL_QUEUE)
        if handled >= CONTROL_BUDGET:
            # A driver that keeps refilling gets the rest on a later turn, so
            # one kick cannot hold the device (the TX path yields the same way).
            # Not 0: the other events due now (a frame, a reset) run first.
            self.clock.call_later(
                self.policy_options["bh_delay_ns"], self._process_control
            )

    def backend_writable(self) -> None:
        """The backend can take frames again after reporting BUSY."""
        if self.running and self.tx_policy is not None:
            self.tx_policy.on_backend_ready()

    # -- frames from the backend ---------------------------------------------------

    def receive(self, header: bytes | None, frame: bytes) -> RxResult:
        """Offer one received frame to the driver."""
        rx = self.rx
        if rx is None or not self.running:
            self.stats.queue(RX_QUEUE).drop("not-ready")
            return RxResult.DROPPED
        if not self.link_status & LINK_UP:
            rx.stats.drop("not-ready")
            return RxResult.DROPPED
        if not self.filter.accepts(frame):
            rx.stats.drop("filtered")
            return RxResult.DROPPED
        return rx.receive(header, frame)

    # -- configuration space (5.1.4) -------------------------------------------------

    def read_config(self) -> bytes:
        """The configuration space: mac, status, max_virtqueue_pairs, mtu."""
        return _CONFIG.pack(self.mac, self.link_status, 1, self.mtu)

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space.

        Only the MAC is writable, and only for legacy drivers without
        CTRL_MAC_ADDR; the mtu never changes once set (5.1.4.1).
        """
        modern = self.driver_features & VirtioFeature.VERSION_1
        if offset + len(data) <= 6 and not modern:
            mac = bytearray(self.mac)
            mac[offset : offset + len(data)] = data
            self._set_mac(bytes(mac))

    def set_link(self, up: bool) -> None:
        """Change the link state; a change sends a configuration interrupt."""
        old = self.link_status
        self.link_status = (old | LINK_UP) if up else (old & ~LINK_UP)
        if old != self.link_status:
            self._notify_config_change()
        if not up and self.running and self.tx is not None:
            self.tx.drop_all()

    def announce(self) -> None:
        """Ask the driver to announce itself (GUEST_ANNOUNCE), e.g. after migration."""
        if not self.driver_features & NetFeature.GUEST_ANNOUNCE:
            return
        self.link_status |= ANNOUNCE
        self._notify_config_change()

    def _announce_done(self) -> None:
        self.link_status &= ~ANNOUNCE

    def _notify_config_change(self) -> None:
        if self.status.driver_ok and self.driver_features & NetFeature.STATUS:
            self._config_interrupt()

    def _set_mac(self, mac: bytes) -> None:
        self.mac = mac
        self.filter.mac = mac


def _ignore() -> None:
    return None
