"""The guest's RX path: posting receive buffers and the NAPI poll.

Linux virtio_net posts receive buffers in one of three ways (virtio 1.2,
5.1.6.3), chosen at probe:

- small: one buffer of header + 1518 bytes per chain;
- big: a chain of a header buffer and page-sized buffers, room for a
  65550-byte frame (65562 bytes with a 12-byte header);
- mergeable (MRG_RXBUF): single 1536-byte buffers; a frame spans
  ``num_buffers`` of them and the header sits at the start of the first.

The RX interrupt schedules a NAPI poll, which masks interrupts, takes up to
a budget of frames, refills the ring when more than half of it is free
(kicking if the device requests it), and completes with
``enable_cb_prepare`` and ``poll``, polling again if buffers slipped in.
"""

from __future__ import annotations

from collections.abc import Callable

from virtio import DriverQueue, GuestMemory, QueueFull

from ..trace import Step
from .config import GOOD_PACKET_LEN, MERGEABLE_BUFFER_LEN, PAGE_SIZE, RxMode
from .context import GuestContext
from .memory_plan import SlotPool

__all__ = [
    "RxBuffer",
    "RxPath",
    "RX_QUEUE",
    "BIG_FRAME_ROOM",
    "buffer_bytes",
    "chain_descriptors",
]

RX_QUEUE = 0
BIG_FRAME_ROOM = 65550
"""Frame bytes a big receive chain holds: the largest frame the device sends."""
ETH_HLEN = 14
NUM_BUFFERS_OFFSET = 10
"""Offset of num_buffers in virtio_net_hdr_mrg_rxbuf (5.1.6)."""


def buffer_bytes(mode: RxMode, header_len: int) -> int:
    """Return the bytes of one receive buffer (or big chain) in ``mode``."""
    if mode is RxMode.MERGEABLE:
        return MERGEABLE_BUFFER_LEN
    if mode is RxMode.BIG:
        return header_len + BIG_FRAME_ROOM
    return header_len + GOOD_PACKET_LEN


def chain_descriptors(mode: RxMode) -> int:
    """Return the descriptors one receive chain takes in ``mode``."""
    if mode is RxMode.BIG:
        return 1 + -(-BIG_FRAME_ROOM // PAGE_SIZE)
    return 1


def big_chain_specs(address: int, header_len: int) -> tuple[tuple[int, int], ...]:
    """Return the buffers of one big chain: the header, then pages.

    The frame room is cut into page-sized buffers. The last one is shorter,
    so the chain has room for exactly ``BIG_FRAME_ROOM`` frame bytes.
    """
    specs = [(address, header_len)]
    start = address + header_len
    remaining = BIG_FRAME_ROOM
    while remaining:
        take = min(PAGE_SIZE, remaining)
        specs.append((start, take))
        start += take
        remaining -= take
    return tuple(specs)


class RxBuffer:
    """The token of one posted receive buffer (or big chain)."""

    __slots__ = ("slot", "address", "specs")

    def __init__(self, slot: int, address: int, specs: tuple[tuple[int, int], ...]):
        self.slot = slot
        self.address = address
        self.specs = specs

    def __repr__(self) -> str:
        return f"RxBuffer(slot={self.slot})"


class RxPath:
    """The receive queue of the driver: buffers, NAPI poll and frame assembly."""

    def __init__(
        self,
        ctx: GuestContext,
        queue: DriverQueue,
        memory: GuestMemory,
        pool: SlotPool,
        *,
        mode: RxMode,
        header_len: int,
        budget: int,
        on_frame: Callable[[bytes], None],
    ) -> None:
        self.ctx = ctx
        self.queue = queue
        self.memory = memory
        self.pool = pool
        self.mode = mode
        self.header_len = header_len
        self.budget = budget
        self.on_frame = on_frame
        self.buffer_len = buffer_bytes(mode, header_len)
        self._buffers = [self._make_buffer(slot) for slot in range(pool.count)]
        self._receive = {
            RxMode.SMALL: self._receive_linear,
            RxMode.BIG: self._receive_linear,
            RxMode.MERGEABLE: self._receive_mergeable,
        }[mode]

    def _make_buffer(self, slot: int) -> RxBuffer:
        address = self.pool.address(slot)
        if self.mode is RxMode.BIG:
            specs = big_chain_specs(address, self.header_len)
        else:
            specs = ((address, self.buffer_len),)
        return RxBuffer(slot, address, specs)

    # -- posting buffers --------------------------------------------------------

    def fill(self) -> int:
        """Post buffers until the ring or the pool runs out (``try_fill_recv``).

        Kicks the device afterwards if ``kick_prepare`` returns True. Returns
        the number of buffers posted.
        """
        ctx = self.ctx
        queue = self.queue
        pool = self.pool
        buffers = self._buffers
        posted = 0
        while queue.num_free:
            slot = pool.take()
            if slot is None:
                break
            buffer = buffers[slot]
            try:
                queue.add_buf((), buffer.specs, buffer)
            except QueueFull:
                pool.give_back(slot)
                break
            posted += 1
        ctx.stats.rx_buffers_posted += posted
        if ctx.trace.enabled:
            ctx.trace.record(Step.RX_REFILL, None, f"posted {posted}")
        ctx.charge(posted * ctx.costs.refill_per_buffer)
        if queue.kick_prepare():
            ctx.stats.rx_kicks += 1
            ctx.packet = None
            ctx.notify(RX_QUEUE)
        return posted

    # -- interrupt and NAPI -----------------------------------------------------

    def interrupt(self) -> None:
        """Handle the RX used buffer notification (``skb_recv_done``, hard IRQ)."""
        ctx = self.ctx
        ctx.stats.rx_interrupts += 1
        ctx.defer(ctx.costs.hardirq)
        self.schedule_napi()

    def schedule_napi(self) -> None:
        """``virtqueue_napi_schedule``: mask interrupts and schedule a poll."""
        ctx = self.ctx
        if ctx.rx_napi:
            return
        self.queue.disable_cb()
        ctx.rx_napi = True

    def poll(self) -> int:
        """``virtnet_poll``: receive up to the budget; return frames handled.

        With the budget used up the poll stays scheduled, as NAPI repolls.
        """
        ctx = self.ctx
        queue = self.queue
        ctx.stats.rx_napi_polls += 1
        received = 0
        while received < self.budget:
            item = queue.get_buf()
            if item is None:
                break
            self._receive(item[0], item[1])
            received += 1
        if ctx.trace.enabled:
            ctx.trace.record(Step.NAPI_POLL, None, f"rx, received {received}")
        costs = ctx.costs
        ctx.charge(costs.napi_poll + received * costs.rx_per_frame)
        if queue.num_free > queue.size // 2:
            self.fill()
        if received >= self.budget:
            ctx.rx_napi = True
            return received
        opaque = queue.enable_cb_prepare()
        if queue.poll(opaque):
            self.schedule_napi()
        return received

    # -- frames -------------------------------------------------------------------

    def _release(self, token: object) -> RxBuffer | None:
        if type(token) is not RxBuffer:
            return None
        self.pool.give_back(token.slot)
        return token

    def _receive_linear(self, token: object, length: int) -> None:
        """Receive one frame from a small buffer or a big chain."""
        buffer = self._release(token)
        if buffer is None:
            return
        if not self._length_ok(length, self.buffer_len):
            return
        header_len = self.header_len
        self._deliver(
            self.memory.read(buffer.address + header_len, length - header_len)
        )

    def _receive_mergeable(self, token: object, length: int) -> None:
        """Receive one frame spread over ``num_buffers`` mergeable buffers.

        As in Linux, a first buffer too short for a frame is dropped alone,
        while a frame with a buffer that is too long is dropped whole.
        """
        buffer = self._release(token)
        if buffer is None:
            return
        header_len = self.header_len
        if length < header_len + ETH_HLEN:
            self.ctx.drop("rx-too-short")
            return
        memory = self.memory
        if length <= self.buffer_len:
            # The buffer lies in guest memory the driver laid out, so one view
            # gives num_buffers and, for the usual one-buffer frame, the frame.
            posted = memory.view(buffer.address, length)
            count = posted[NUM_BUFFERS_OFFSET] | posted[NUM_BUFFERS_OFFSET + 1] << 8
            if count == 1:
                self._deliver(bytes(posted[header_len:]))
                return
        else:
            count = int.from_bytes(
                memory.read(buffer.address + NUM_BUFFERS_OFFSET, 2), "little"
            )
        if count == 0:
            self.ctx.drop("rx-bad-num-buffers")
            return
        parts: list[bytes] | None = []
        if length > self.buffer_len:
            parts = None
        else:
            parts.append(memory.read(buffer.address + header_len, length - header_len))
        for _ in range(count - 1):
            item = self.queue.get_buf()
            if item is None:
                self.ctx.drop("rx-bad-num-buffers")
                return
            more = self._release(item[0])
            if more is None or item[1] > self.buffer_len:
                parts = None
            elif parts is not None:
                parts.append(memory.read(more.address, item[1]))
        if parts is None:
            self.ctx.drop("rx-too-long")
            return
        self._deliver(b"".join(parts))

    def _length_ok(self, length: int, room: int) -> bool:
        if length < self.header_len + ETH_HLEN:
            self.ctx.drop("rx-too-short")
            return False
        if length > room:
            self.ctx.drop("rx-too-long")
            return False
        return True

    def _deliver(self, frame: bytes) -> None:
        stats = self.ctx.stats
        stats.rx_packets += 1
        stats.rx_bytes += len(frame)
        self.on_frame(frame)

    # -- reset --------------------------------------------------------------------

    def drain_used(self) -> int:
        """Receive every used buffer now, with no budget; return frames handled."""
        received = 0
        while True:
            item = self.queue.get_buf()
            if item is None:
                return received
            self._receive(item[0], item[1])
            received += 1

    def detach_all(self) -> int:
        """Take back every posted buffer after a device reset; return how many."""
        count = 0
        while True:
            token = self.queue.detach_unused_buf()
            if token is None:
                return count
            self._release(token)
            count += 1
