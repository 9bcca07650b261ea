"""The guest driver model: Linux virtio_net, sans-IO, in virtual time.

``VirtioNetDriver`` does what ``virtnet_probe`` and ``virtnet_open`` do: it
negotiates features from the device's offer, lays out the rings, indirect
tables and packet buffers in guest memory, configures the device, fills the
receive ring and enables NAPI. Then it transmits frames handed to its qdisc
(``enqueue`` and ``run_qdisc``), takes interrupts (``interrupt``) and runs
the deferred work they schedule (``run_softirqs``).

It talks to the device only through guest memory, ``notify`` (the kick
notifier) and the device's probe interface (offer, ``configure``,
``read_config``, ``write_status``). Interrupt handlers only set flags; the
caller runs ``run_softirqs`` when the guest's CPU is free again, which is
what the ``Machine`` does after each event.
"""

from __future__ import annotations

import collections
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from virtio import DeviceStatus, DriverQueue, GuestMemory, RingLayout, VirtioFeature

from ..clock import VirtualClock
from ..features import NetFeature
from ..header import header_size
from ..net_device import ANNOUNCE, LINK_UP, VirtioNetDevice
from ..trace import Trace
from .config import CONTROL_QUEUE_SIZE, GuestConfig, RxMode, TxVariant, negotiate
from .context import GuestContext
from .control import CONTROL_AREA_BYTES, CONTROL_QUEUE, ControlQueue
from .memory_plan import BumpAllocator, SlotPool
from .rx import RX_QUEUE, RxPath, buffer_bytes, chain_descriptors
from .stats import GuestStats
from .tx import TX_QUEUE, ClassicTx, NapiTx, TxPath

__all__ = ["VirtioNetDriver", "MemoryPlan", "ProbeError"]

log = logging.getLogger(__name__)

DESCRIPTOR_SIZE = 16
CONTROL_INDIRECT_ENTRIES = 3
_CONFIG = struct.Struct("<6sHHH")


class ProbeError(RuntimeError):
    """The device did not accept the driver (features refused, bad queue size)."""


@dataclass
class MemoryPlan:
    """Addresses of the rings, tables and buffer pools that probe placed."""

    rx_ring: RingLayout
    tx_ring: RingLayout
    control_ring: RingLayout | None
    tx_indirect: int | None
    rx_indirect: int | None
    control_indirect: int | None
    tx_pool: SlotPool
    rx_pool: SlotPool
    control_area: int
    scratch: int
    scratch_bytes: int
    end: int


class VirtioNetDriver:
    """One Linux virtio_net driver instance bound to one device.

    ``notify(queue)`` delivers a kick (a kick notifier's ``notify``). With
    ``keep_log`` the driver keeps the received frames and the numbers of the
    packets it transmitted and dropped; long runs turn it off.
    """

    def __init__(
        self,
        device: VirtioNetDevice,
        clock: VirtualClock,
        notify: Callable[[int], None],
        *,
        config: GuestConfig | None = None,
        trace: Trace | None = None,
        keep_log: bool = True,
    ) -> None:
        self.device = device
        self.config = config or GuestConfig()
        self.stats = GuestStats()
        self.ctx = GuestContext(
            clock,
            trace if trace is not None else Trace(enabled=False),
            self.config.costs,
            self.stats,
            notify,
            keep_log=keep_log,
        )
        self.received: list[bytes] | None = [] if keep_log else None
        self.qdisc: collections.deque[tuple[int, bytes]] = collections.deque()
        self.memory: GuestMemory | None = None
        self.plan: MemoryPlan | None = None
        self.features = 0
        self.header_len = 0
        self.rx_mode = RxMode.SMALL
        self.mac = b""
        self.carrier = True
        self.tx: TxPath | None = None
        self.rx: RxPath | None = None
        self.control: ControlQueue | None = None
        self.queues: dict[int, DriverQueue] = {}

    # -- probe --------------------------------------------------------------------

    def probe(self) -> None:
        """Negotiate, lay out memory, configure the device and open the interface.

        Raises ``ProbeError`` when the device refuses the feature set.
        """
        config = self.config
        features = negotiate(self.device.offered, config)
        self.features = features
        self.header_len = header_size(features)
        self.rx_mode = config.rx_mode
        if config.rx_mode is RxMode.MERGEABLE and not features & NetFeature.MRG_RXBUF:
            self.rx_mode = RxMode.SMALL
        plan = self._lay_out(features)
        memory = self._memory_for(plan)
        self.queues = self._create_queues(plan, memory, features)
        layouts = {RX_QUEUE: plan.rx_ring, TX_QUEUE: plan.tx_ring}
        if plan.control_ring is not None:
            layouts[CONTROL_QUEUE] = plan.control_ring
        status = self.device.configure(features, memory, layouts)
        if not status & DeviceStatus.DRIVER_OK:
            raise ProbeError(
                f"the device rejected features {features:#x} (status {status!r});"
                f" check the device's offer or request fewer features"
            )
        self._read_config()
        self._create_paths(plan, memory)
        self._open()

    def _lay_out(self, features: int) -> MemoryPlan:
        """Place rings, indirect tables and buffers with a bump allocator."""
        config = self.config
        allocator = BumpAllocator()
        indirect = bool(features & VirtioFeature.INDIRECT_DESC)
        tx_size = config.queue_size
        rx_size = config.rx_size
        rx_ring = _allocate_ring(allocator, rx_size)
        tx_ring = _allocate_ring(allocator, tx_size)

        control_ring = None
        control_indirect = None
        if features & NetFeature.CTRL_VQ:
            control_ring = _allocate_ring(allocator, CONTROL_QUEUE_SIZE)
            if indirect:
                control_indirect = allocator.allocate(
                    CONTROL_QUEUE_SIZE * CONTROL_INDIRECT_ENTRIES * DESCRIPTOR_SIZE
                )

        tx_indirect = None
        if indirect:
            tx_indirect = allocator.allocate(
                tx_size * config.stop_threshold * DESCRIPTOR_SIZE
            )
        rx_indirect, rx_chains = self._lay_out_rx_tables(allocator, indirect)

        tx_pool = SlotPool.allocate(
            allocator, self.header_len + config.tx_max_frame, tx_size
        )
        rx_pool = SlotPool.allocate(
            allocator, buffer_bytes(self.rx_mode, self.header_len), rx_chains
        )
        control_area = allocator.allocate(CONTROL_AREA_BYTES, 64)
        scratch = allocator.allocate(config.scratch_bytes, 4096)

        return MemoryPlan(
            rx_ring=rx_ring,
            tx_ring=tx_ring,
            control_ring=control_ring,
            tx_indirect=tx_indirect,
            rx_indirect=rx_indirect,
            control_indirect=control_indirect,
            tx_pool=tx_pool,
            rx_pool=rx_pool,
            control_area=control_area,
            scratch=scratch,
            scratch_bytes=config.scratch_bytes,
            end=allocator.top,
        )

    def _lay_out_rx_tables(
        self, allocator: BumpAllocator, indirect: bool
    ) -> tuple[int | None, int]:
        """Return the RX indirect table area (big mode) and the chain count."""
        rx_size = self.config.rx_size
        if self.rx_mode is not RxMode.BIG:
            return None, rx_size
        descriptors = chain_descriptors(RxMode.BIG)
        if indirect:
            area = allocator.allocate(rx_size * descriptors * DESCRIPTOR_SIZE)
            return area, rx_size
        if rx_size < descriptors:
            raise ProbeError(
                f"big receive chains need {descriptors} descriptors, more than the"
                f" RX queue size {rx_size}; negotiate INDIRECT_DESC or use a"
                f" larger queue"
            )
        return None, rx_size // descriptors

    def _memory_for(self, plan: MemoryPlan) -> GuestMemory:
        """Reuse guest memory when the plan fits, zeroing the rings; else create it."""
        size = (plan.end + 4095) // 4096 * 4096
        memory = self.memory
        if memory is None or memory.size < size:
            memory = GuestMemory.anonymous(size)
        else:
            for ring in (plan.rx_ring, plan.tx_ring, plan.control_ring):
                if ring is not None:
                    memory.write(ring.desc, bytes(ring.end - ring.desc))
        self.memory = memory
        self.plan = plan
        return memory

    def _create_queues(
        self, plan: MemoryPlan, memory: GuestMemory, features: int
    ) -> dict[int, DriverQueue]:
        event_idx = bool(features & VirtioFeature.EVENT_IDX)
        notify = self.ctx.notify
        rx_entries = chain_descriptors(self.rx_mode)
        specs = [
            (RX_QUEUE, plan.rx_ring, plan.rx_indirect, rx_entries),
            (TX_QUEUE, plan.tx_ring, plan.tx_indirect, self.config.stop_threshold),
        ]
        if plan.control_ring is not None:
            specs.append(
                (
                    CONTROL_QUEUE,
                    plan.control_ring,
                    plan.control_indirect,
                    CONTROL_INDIRECT_ENTRIES,
                )
            )
        queues = {}
        for index, layout, area, entries in specs:
            queues[index] = DriverQueue(
                memory,
                layout,
                index=index,
                event_idx=event_idx,
                indirect_area=area,
                indirect_entries=entries if area is not None else 0,
                notify=lambda index=index: notify(index),
            )
        return queues

    def _read_config(self) -> None:
        mac, status, _pairs, _mtu = _CONFIG.unpack(self.device.read_config())
        self.mac = mac
        self.carrier = bool(status & LINK_UP) or not self.features & NetFeature.STATUS

    def _create_paths(self, plan: MemoryPlan, memory: GuestMemory) -> None:
        config = self.config
        can_push = config.can_push
        if can_push is None:
            can_push = bool(
                self.features & (VirtioFeature.ANY_LAYOUT | VirtioFeature.VERSION_1)
            )
        tx_class = ClassicTx if config.variant is TxVariant.CLASSIC else NapiTx
        self.tx = tx_class(
            self.ctx,
            self.queues[TX_QUEUE],
            memory,
            plan.tx_pool,
            header_len=self.header_len,
            max_frame=config.tx_max_frame,
            stop_threshold=config.stop_threshold,
            can_push=can_push,
        )
        self.rx = RxPath(
            self.ctx,
            self.queues[RX_QUEUE],
            memory,
            plan.rx_pool,
            mode=self.rx_mode,
            header_len=self.header_len,
            budget=config.napi_weight,
            on_frame=self._on_frame,
        )
        self.control = None
        if CONTROL_QUEUE in self.queues:
            self.control = ControlQueue(
                self.ctx, self.queues[CONTROL_QUEUE], memory, plan.control_area
            )

    def _open(self) -> None:
        """``virtnet_open``: fill the receive ring and enable NAPI.

        Enabling NAPI schedules one poll per queue, which unmasks interrupts.
        """
        self.rx.fill()
        self.rx.schedule_napi()
        if self.tx.napi:
            self.ctx.tx_napi = True

    # -- transmit -----------------------------------------------------------------

    def enqueue(self, packet: int, frame: bytes) -> bool:
        """Put one frame on the qdisc; return False if the qdisc dropped it.

        Raises ``ValueError`` for an empty frame or one longer than the TX
        buffers (``GuestConfig.tx_max_frame``).
        """
        length = len(frame)
        if not 0 < length <= self.config.tx_max_frame:
            raise ValueError(
                f"packet {packet}: frame of {length} bytes is invalid: use 1 to"
                f" {self.config.tx_max_frame} bytes"
            )
        if len(self.qdisc) >= self.config.qdisc_limit:
            self.ctx.drop("qdisc-full", packet)
            return False
        self.qdisc.append((packet, frame))
        return True

    def run_qdisc(self) -> int:
        """Hand queued frames to start_xmit until the qdisc empties or the queue stops.

        Frames go in bulk batches of up to ``bulk_limit``: every frame of a
        batch but the last is sent with ``xmit_more``, as a bulk dequeue
        does. Returns the number handed over.
        """
        tx = self.tx
        if tx is None:
            return 0
        qdisc = self.qdisc
        ctx = self.ctx
        cost = ctx.costs.qdisc_dequeue
        last_in_batch = self.config.bulk_limit - 1
        batched = 0
        handed = 0
        while qdisc and not tx.stopped and self.carrier:
            packet, frame = qdisc.popleft()
            ctx.charge(cost)
            xmit_more = bool(qdisc) and batched < last_in_batch
            batched = batched + 1 if xmit_more else 0
            tx.start_xmit(packet, frame, xmit_more)
            handed += 1
        return handed

    # -- interrupts and deferred work ---------------------------------------------

    def interrupt(self, queue: int) -> None:
        """Take a used buffer notification (the hard IRQ handler of ``queue``)."""
        if queue == TX_QUEUE and self.tx is not None:
            self.tx.interrupt()
        elif queue == RX_QUEUE and self.rx is not None:
            self.rx.interrupt()
        elif queue == CONTROL_QUEUE and self.control is not None:
            self.control.interrupt()

    def config_interrupt(self) -> None:
        """Take a configuration change notification; the work runs later."""
        ctx = self.ctx
        ctx.stats.config_interrupts += 1
        ctx.defer(ctx.costs.hardirq)
        ctx.config_work = True

    @property
    def softirq_pending(self) -> bool:
        return self.ctx.softirq_pending

    def run_softirqs(self) -> None:
        """Run NAPI polls, the qdisc and config work until none is pending."""
        ctx = self.ctx
        while True:
            ctx.charge_deferred()
            if ctx.rx_napi:
                ctx.rx_napi = False
                self.rx.poll()
                if self.config.rx_cleans_tx:
                    self.tx.clean_from_rx()
            elif ctx.tx_napi:
                ctx.tx_napi = False
                self.tx.poll()
            elif ctx.qdisc:
                ctx.qdisc = False
                self.run_qdisc()
            elif ctx.config_work:
                ctx.config_work = False
                self._config_changed()
            elif not ctx.deferred_ns:
                return

    def _config_changed(self) -> None:
        """``virtnet_config_changed_work``: follow the link, ack an announce."""
        _mac, status, _pairs, _mtu = _CONFIG.unpack(self.device.read_config())
        if status & ANNOUNCE and self.control is not None:
            if self.features & NetFeature.GUEST_ANNOUNCE:
                self.control.announce_ack()
        carrier = bool(status & LINK_UP)
        if carrier and not self.carrier:
            self.ctx.qdisc = True
        self.carrier = carrier

    # -- reset --------------------------------------------------------------------

    def reset(self) -> None:
        """Reset the device and probe again, as a driver does after an error.

        Used buffers are taken back first, so frames the device already sent
        or delivered are not lost; TX packets still in the ring are dropped
        as ``tx-reset``. The qdisc keeps its frames.
        """
        ctx = self.ctx
        self.stats.resets += 1
        if self.tx is not None:
            self.tx.reclaim()
        if self.rx is not None:
            self.rx.drain_used()
        self.device.write_status(0)
        if self.tx is not None:
            self.tx.detach_all()
        if self.rx is not None:
            self.rx.detach_all()
        ctx.rx_napi = ctx.tx_napi = ctx.config_work = False
        self.probe()
        ctx.qdisc = bool(self.qdisc)

    # -- inspection ---------------------------------------------------------------

    @property
    def transmitted(self) -> list[int] | None:
        """Numbers of the packets added to the TX ring, in order."""
        return self.ctx.transmitted

    @property
    def dropped(self) -> list[tuple[int, str]] | None:
        """Numbers of the packets the guest dropped, with the reason."""
        return self.ctx.dropped

    @property
    def scratch(self) -> tuple[int, int]:
        """Address and size of guest memory set aside for raw test chains."""
        if self.plan is None:
            raise RuntimeError("probe the driver before asking for scratch memory")
        return self.plan.scratch, self.plan.scratch_bytes

    def _on_frame(self, frame: bytes) -> None:
        if self.received is not None:
            self.received.append(frame)


def _allocate_ring(allocator: BumpAllocator, size: int) -> RingLayout:
    """Reserve a virtio 1.x ring of ``size`` entries, page aligned."""
    base = allocator.allocate(0, 4096)
    layout = RingLayout.packed_after(size, base)
    allocator.allocate(layout.end - base, 1)
    return layout
