"""The guest's TX path: Linux virtio_net's start_xmit in two variants.

``ClassicTx`` is the start_xmit of the 23-step table (Linux 3.x and 4.x
without TX NAPI): reclaim used buffers, add the packet and kick. When fewer
than 2 + MAX_SKB_FRAGS descriptors are then free, it stops the queue and
asks for a delayed interrupt, and it reclaims at once if enough buffers were
already used. The TX interrupt (``skb_xmit_done``) masks interrupts and wakes the queue.

``NapiTx`` is today's path: start_xmit reclaims with interrupts masked,
kicks only at the end of an xmit_more batch or when the queue stops
(``check_sq_full_and_disable``), and the TX interrupt schedules a NAPI poll
that reclaims, wakes the queue and unmasks interrupts.

Each step is recorded in the trace with its number and charged its cost
after its effect, so the ring state of a record shows the step done.
"""

from __future__ import annotations

from collections.abc import Sequence

from virtio import DriverQueue, GuestMemory, QueueFull
from virtio.event_index import U16_MASK

from ..trace import Step
from .context import GuestContext
from .memory_plan import SlotPool

__all__ = ["TxBuffer", "TxPath", "ClassicTx", "NapiTx", "TX_QUEUE"]

TX_QUEUE = 1


class TxBuffer:
    """The token of one TX packet buffer: its slot and the packet in it."""

    __slots__ = ("slot", "address", "packet", "length")

    def __init__(self, slot: int, address: int) -> None:
        self.slot = slot
        self.address = address
        self.packet = 0
        self.length = 0

    def __repr__(self) -> str:
        return f"TxBuffer(slot={self.slot}, packet={self.packet})"


class TxPath:
    """Base of both variants: buffers, reclaiming, the kick and the queue state."""

    napi = False

    def __init__(
        self,
        ctx: GuestContext,
        queue: DriverQueue,
        memory: GuestMemory,
        pool: SlotPool,
        *,
        header_len: int,
        max_frame: int,
        stop_threshold: int,
        can_push: bool,
    ) -> None:
        self.ctx = ctx
        self.queue = queue
        self.memory = memory
        self.pool = pool
        self.header_len = header_len
        self.max_frame = max_frame
        self.stop_threshold = stop_threshold
        self.can_push = can_push
        self.stopped = False
        self._zero_header = bytes(header_len)
        self._buffers = [
            TxBuffer(slot, pool.address(slot)) for slot in range(pool.count)
        ]

    # -- the packet -------------------------------------------------------------

    def start_xmit(self, packet: int, frame: bytes, xmit_more: bool) -> None:
        """Transmit one packet the qdisc handed over (``ndo_start_xmit``)."""
        raise NotImplementedError

    def xmit_skb(self, packet: int, frame: bytes) -> bool:
        """Step 3: write header and frame and add them to the ring.

        Returns False when the ring had no room, after counting the drop.
        """
        ctx = self.ctx
        slot = self.pool.take()
        if slot is None:
            ctx.drop("tx-ring-full", packet)
            return False
        buffer = self._buffers[slot]
        address = buffer.address
        header_len = self.header_len
        length = len(frame)
        # One view of the slot takes both copies; a slot never crosses regions.
        view = self.memory.view(address, header_len + length)
        view[:header_len] = self._zero_header
        view[header_len:] = frame
        out: Sequence[tuple[int, int]]
        if self.can_push:
            out = ((address, header_len + length),)
        else:
            out = ((address, header_len), (address + header_len, length))
        buffer.packet = packet
        buffer.length = length
        try:
            self.queue.add_buf(out, (), buffer)
        except QueueFull:
            # Linux drops the packet and warns of an unexpected queue failure.
            self.pool.give_back(slot)
            ctx.drop("tx-ring-full", packet)
            return False
        stats = ctx.stats
        stats.tx_packets += 1
        stats.tx_bytes += length
        if ctx.transmitted is not None:
            ctx.transmitted.append(packet)
        ctx.record(Step.XMIT_SKB, packet)
        ctx.charge(ctx.costs.xmit_skb)
        return True

    def virtqueue_kick(self, packet: int | None) -> bool:
        """Step 4: notify the device if it asked for kicks; return whether it did."""
        ctx = self.ctx
        ctx.record(Step.VIRTQUEUE_KICK, packet)
        ctx.charge(ctx.costs.kick_prepare)
        if self.queue.kick_prepare():
            ctx.stats.kicks += 1
            ctx.packet = packet
            ctx.notify(TX_QUEUE)
            return True
        ctx.stats.kicks_suppressed += 1
        ctx.record(Step.KICK_SUPPRESSED, packet)
        return False

    # -- reclaiming -------------------------------------------------------------

    def reclaim(self) -> int:
        """Take back every used TX buffer (``free_old_xmit_skbs``); return how many.

        Tokens that are not this path's buffers (raw chains a test added
        through the DriverQueue) are taken back and ignored.
        """
        get_buf = self.queue.get_buf
        give_back = self.pool.give_back
        count = 0
        while True:
            item = get_buf()
            if item is None:
                break
            token = item[0]
            if type(token) is TxBuffer:
                give_back(token.slot)
            count += 1
        if count:
            self.ctx.stats.tx_reclaimed += count
        return count

    def free_old_xmit(self, step: Step, packet: int | None) -> int:
        """Reclaim used buffers as step 2 or 19, and charge the time."""
        count = self.reclaim()
        ctx = self.ctx
        if ctx.trace.enabled:
            ctx.trace.record(step, packet, f"reclaimed {count}")
        costs = ctx.costs
        ctx.charge(costs.free_old_xmit + count * costs.free_per_buffer)
        return count

    # -- queue state ------------------------------------------------------------

    def stop_queue(self, packet: int | None) -> None:
        """Step 14: ``netif_stop_queue``."""
        ctx = self.ctx
        self.stopped = True
        ctx.stats.queue_stops += 1
        ctx.record(Step.NETIF_STOP_QUEUE, packet)
        ctx.charge(ctx.costs.stop_queue)

    def wake_queue(self, detail: str) -> None:
        """``netif_wake_queue``: restart a stopped queue and schedule the qdisc.

        Runs in interrupt or NAPI context, so it charges no time itself.
        """
        if not self.stopped:
            return
        ctx = self.ctx
        self.stopped = False
        ctx.stats.queue_wakes += 1
        ctx.qdisc = True
        ctx.record(Step.NETIF_WAKE_QUEUE, None, detail)

    def enable_cb_delayed(self, packet: int | None) -> bool:
        """Steps 15 to 17: unmask interrupts for 3/4 of the outstanding buffers.

        Returns the result of ``virtqueue_enable_cb_delayed``: False when that
        many buffers are already used, so no interrupt will come for them.
        """
        ctx = self.ctx
        queue = self.queue
        result = queue.enable_cb_delayed()
        trace = ctx.trace
        if trace.enabled:
            used = (queue.used_idx() - queue.last_used_idx) & U16_MASK
            delay = queue.outstanding * 3 // 4
            trace.record(Step.ENABLE_CB_DELAYED, packet)
            trace.record(
                Step.INTERRUPTS_UNMASKED, packet, f"used_event {queue.used_event()}"
            )
            trace.record(
                Step.USED_CHECK,
                packet,
                f"used {used}, 3/4 of outstanding {delay}",
            )
        ctx.charge(ctx.costs.enable_cb_delayed)
        return result

    def interrupt(self) -> None:
        """Handle the TX used buffer notification (``skb_xmit_done``, hard IRQ)."""
        raise NotImplementedError

    def poll(self) -> None:
        """Run the TX NAPI poll; only the NAPI variant schedules one."""

    def clean_from_rx(self) -> None:
        """Reclaim TX buffers from the RX NAPI poll; only the NAPI variant does."""

    # -- reset ------------------------------------------------------------------

    def detach_all(self) -> int:
        """Drop every buffer still in the ring after a device reset.

        The caller reclaims used buffers first, so each one detached here is
        a packet the device never sent. Returns how many were dropped.
        """
        count = 0
        while True:
            token = self.queue.detach_unused_buf()
            if token is None:
                break
            if type(token) is TxBuffer:
                self.pool.give_back(token.slot)
                self.ctx.drop("tx-reset", token.packet)
            count += 1
        self.stopped = False
        return count


class ClassicTx(TxPath):
    """start_xmit as in the 23-step table: no TX NAPI, a kick per packet."""

    def start_xmit(self, packet: int, frame: bytes, xmit_more: bool) -> None:
        ctx = self.ctx
        ctx.record(Step.START_XMIT, packet)
        ctx.charge(ctx.costs.start_xmit)
        self.free_old_xmit(Step.FREE_OLD_XMIT_SKBS, packet)
        if not self.xmit_skb(packet, frame):
            return
        self.virtqueue_kick(packet)
        self._check_capacity(packet)

    def _check_capacity(self, packet: int) -> None:
        """Steps 13 to 23: stop the queue before the ring runs out."""
        ctx = self.ctx
        costs = ctx.costs
        queue = self.queue
        threshold = self.stop_threshold

        if ctx.trace.enabled:
            ctx.trace.record(Step.CAPACITY_CHECK, packet, f"num_free {queue.num_free}")
        ctx.charge(costs.capacity_check)
        if queue.num_free >= threshold:
            return

        self.stop_queue(packet)
        if self.enable_cb_delayed(packet):
            ctx.record(Step.WAIT_FOR_INTERRUPT, packet)
            return

        self.free_old_xmit(Step.FREE_OLD_XMIT_SKBS_AGAIN, packet)
        if ctx.trace.enabled:
            ctx.trace.record(
                Step.CAPACITY_RECHECK, packet, f"num_free {queue.num_free}"
            )
        ctx.charge(costs.capacity_check)
        if queue.num_free < threshold:
            return

        self.stopped = False
        ctx.stats.queue_wakes += 1
        ctx.record(Step.NETIF_START_QUEUE, packet)
        ctx.charge(costs.start_queue)
        queue.disable_cb()
        ctx.record(Step.VIRTQUEUE_DISABLE_CB, packet)
        ctx.record(Step.INTERRUPTS_MASKED, packet)
        ctx.charge(costs.disable_cb)

    def interrupt(self) -> None:
        ctx = self.ctx
        ctx.stats.tx_interrupts += 1
        ctx.defer(ctx.costs.hardirq)
        self.queue.disable_cb()
        self.wake_queue("skb_xmit_done")


class NapiTx(TxPath):
    """Today's start_xmit with TX NAPI and xmit_more batching of kicks."""

    napi = True

    def start_xmit(self, packet: int, frame: bytes, xmit_more: bool) -> None:
        ctx = self.ctx
        ctx.record(Step.START_XMIT, packet)
        ctx.charge(ctx.costs.start_xmit)
        self._free_old_masked(packet, xmit_more)
        if not self.xmit_skb(packet, frame):
            return
        self._check_sq_full_and_disable(packet)
        if xmit_more and not self.stopped:
            ctx.stats.kicks_deferred += 1
            return
        self.virtqueue_kick(packet)

    def _free_old_masked(self, packet: int, xmit_more: bool) -> None:
        """Step 2: reclaim with interrupts masked, then unmask them (delayed).

        Inside an xmit_more batch interrupts stay masked; the last packet of
        the batch unmasks them, and reclaims again if 3/4 were already used.
        """
        queue = self.queue
        count = 0
        while True:
            queue.disable_cb()
            count += self.reclaim()
            if xmit_more or queue.enable_cb_delayed():
                break
        ctx = self.ctx
        if ctx.trace.enabled:
            ctx.trace.record(Step.FREE_OLD_XMIT_SKBS, packet, f"reclaimed {count}")
        costs = ctx.costs
        ctx.charge(costs.free_old_xmit + count * costs.free_per_buffer)

    def _check_sq_full_and_disable(self, packet: int) -> None:
        """Steps 13 to 18, or a NAPI poll in place of steps 19 to 23."""
        ctx = self.ctx
        queue = self.queue
        if ctx.trace.enabled:
            ctx.trace.record(Step.CAPACITY_CHECK, packet, f"num_free {queue.num_free}")
        ctx.charge(ctx.costs.capacity_check)
        if queue.num_free >= self.stop_threshold:
            return
        self.stop_queue(packet)
        if self.enable_cb_delayed(packet):
            ctx.record(Step.WAIT_FOR_INTERRUPT, packet)
            return
        self._schedule_napi()

    def _schedule_napi(self) -> None:
        """``virtqueue_napi_schedule``: mask interrupts and schedule a poll."""
        ctx = self.ctx
        if ctx.tx_napi:
            return
        self.queue.disable_cb()
        ctx.tx_napi = True

    def interrupt(self) -> None:
        ctx = self.ctx
        ctx.stats.tx_interrupts += 1
        ctx.defer(ctx.costs.hardirq)
        self.queue.disable_cb()
        self._schedule_napi()

    def poll(self) -> None:
        """``virtnet_poll_tx``: reclaim, wake the queue, unmask interrupts."""
        ctx = self.ctx
        queue = self.queue
        ctx.stats.tx_napi_polls += 1
        queue.disable_cb()
        count = self.reclaim()
        if ctx.trace.enabled:
            ctx.trace.record(Step.NAPI_POLL, None, f"tx, reclaimed {count}")
        if queue.num_free >= self.stop_threshold:
            self.wake_queue("virtnet_poll_tx")
        opaque = queue.enable_cb_prepare()
        costs = ctx.costs
        ctx.charge(costs.napi_poll + count * costs.free_per_buffer)
        if queue.poll(opaque):
            self._schedule_napi()

    def clean_from_rx(self) -> None:
        """``virtnet_poll_cleantx``: the RX poll reclaims TX buffers too."""
        queue = self.queue
        count = 0
        while True:
            queue.disable_cb()
            count += self.reclaim()
            if queue.enable_cb_delayed():
                break
        if queue.num_free >= self.stop_threshold:
            self.wake_queue("virtnet_poll_cleantx")
        ctx = self.ctx
        ctx.charge(count * ctx.costs.free_per_buffer)
