"""The RX path of the device: from a backend frame into driver buffers.

``RxQueue.receive`` places one frame, with its virtio_net_hdr, into the
buffers the driver posted (virtio 1.2, 5.1.6.3 and 5.1.6.4). Without
MRG_RXBUF a frame goes into one chain; with it, into as many chains as it
needs, ``num_buffers`` says how many, and all their used elements become
visible in one store of used.idx. The device only ever writes the
device-writable buffers of a chain.

When no buffers are posted the frame is held (up to ``hold_limit`` frames,
then dropped and counted) and notifications are enabled with a re-check, so
the driver's refill kick (``on_kick``) resumes delivery and no refill can slip
in unseen. A frame that no buffer can ever hold is dropped and counted.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable

from virtio import Chain, DeviceQueue, DriverError

from .features import NetFeature
from .header import (
    GSO_ECN,
    GsoType,
    HeaderFlags,
    NetHeader,
    complete_checksum,
    exceeds_mtu,
)
from .stats import QueueStats
from .trace import Step, Trace

__all__ = ["RxQueue", "RxResult", "DEFAULT_HOLD_LIMIT"]

DEFAULT_HOLD_LIMIT = 256
"""Frames held while the driver has no buffers posted; more are dropped."""

_GUEST_GSO_FEATURE = {
    GsoType.TCPV4: NetFeature.GUEST_TSO4,
    GsoType.TCPV6: NetFeature.GUEST_TSO6,
    GsoType.UDP: NetFeature.GUEST_UFO,
    GsoType.UDP_L4: NetFeature.GUEST_USO4 | NetFeature.GUEST_USO6,
}


class RxResult(enum.Enum):
    DELIVERED = "delivered"
    HELD = "held"
    DROPPED = "dropped"


class _NoBuffers(Exception):
    """Raised inside placement when the ring ran out of buffers."""


class RxQueue:
    """The device's RX virtqueue with its hold queue and counters."""

    def __init__(
        self,
        queue: DeviceQueue,
        *,
        header_len: int,
        features: int,
        stats: QueueStats,
        trace: Trace,
        interrupt: Callable[[int], None],
        suppressed: Callable[[int], None],
        on_break: Callable[[DriverError], None],
        max_frame: int,
        mtu: int | None = None,
        hold_limit: int = DEFAULT_HOLD_LIMIT,
    ) -> None:
        self.queue = queue
        self.header_len = header_len
        self.features = features
        self.mergeable = bool(features & NetFeature.MRG_RXBUF)
        self.stats = stats
        self.trace = trace
        self.interrupt = interrupt
        self.suppressed = suppressed
        self.on_break = on_break
        self.max_frame = max_frame
        self.mtu = mtu
        self.hold_limit = hold_limit
        self.held: collections.deque[tuple[bytes, bytes]] = collections.deque()
        # Mergeable chains popped for a frame that did not fit yet; they stay
        # in flight and are used by the next frame delivered.
        self._partial: list[Chain] = []
        plain = NetHeader()
        plain.num_buffers = 1 if header_len >= 12 else 0
        self._plain_header = plain.pack(header_len)

    # -- entry points ---------------------------------------------------------

    def receive(self, header: bytes | None, frame: bytes) -> RxResult:
        """Deliver one frame from the backend, hold it, or drop it."""
        prepared = self._prepare_header(header, frame)
        if prepared is None:
            return RxResult.DROPPED
        header_fields, frame = prepared
        if self.held:
            return self._hold(header_fields, frame)
        outcome = self._deliver(header_fields, frame)
        if outcome is None:
            return self._hold(header_fields, frame)
        return outcome

    def on_kick(self) -> int:
        """The driver posted buffers: deliver held frames; return how many."""
        delivered = 0
        while self.held:
            header_fields, frame = self.held[0]
            outcome = self._deliver(header_fields, frame)
            if outcome is None:
                return delivered
            self.held.popleft()
            delivered += outcome is RxResult.DELIVERED
        return delivered

    def stop(self) -> None:
        """Give back gathered chains and drop held frames before the queue stops.

        Chains popped for a mergeable frame that did not fit yet are the last
        ones popped, so they go back to the avail ring unused. Held frames are
        counted as "queue-stopped" drops.
        """
        if self._partial:
            if self.queue.ready:
                self._give_back(self._partial)
            self._partial = []
        if self.held:
            self.stats.drop("queue-stopped", len(self.held))
            self.held.clear()

    def _give_back(self, chains: list[Chain]) -> None:
        """Return gathered chains to the driver unwritten.

        They go back to the avail ring when they are the last chains popped.
        A chain completed between them (one with no writable buffer) makes
        that impossible. The driver may set this ring up again from
        ``last_avail_idx``, so they are completed with length 0 instead, like
        the chains of a frame too large for the ring's buffers.
        """
        queue = self.queue
        recent = queue.recent_pops(len(chains))
        if recent == [chain.head for chain in chains]:
            queue.unpop(len(chains))
            return
        queue.add_used_many([chain.head for chain in chains])
        self._publish()

    # -- header ---------------------------------------------------------------

    def _prepare_header(
        self, header: bytes | None, frame: bytes
    ) -> tuple[NetHeader | None, bytes] | None:
        """Turn the backend's header into what the driver may see (5.1.6.4.1).

        Returns (None, frame) for a plain frame, which is the fast path, or
        None when the frame is dropped.
        """
        fields = None
        if header is not None and (header[0] or header[1]):
            fields = NetHeader.unpack(header)
            gso = fields.gso_type & ~GSO_ECN
            if gso != GsoType.NONE:
                needed = _GUEST_GSO_FEATURE.get(gso, 0)
                if not self.features & needed:
                    self.stats.drop("rx-gso-not-negotiated")
                    return None
            elif self._too_long(frame):
                self.stats.drop("frame-too-large")
                return None
            if not self.features & NetFeature.GUEST_CSUM:
                if fields.flags & HeaderFlags.NEEDS_CSUM and gso == GsoType.NONE:
                    # The backend's offsets are checked before the device
                    # writes the checksum into its copy of the frame.
                    if fields.csum_start + fields.csum_offset + 2 > len(frame):
                        self.stats.drop("bad-csum-offset")
                        return None
                    frame = bytearray(frame)
                    complete_checksum(frame, fields.csum_start, fields.csum_offset)
                    frame = bytes(frame)
                fields.flags = 0
                fields.csum_start = fields.csum_offset = 0
            fields.flags &= HeaderFlags.NEEDS_CSUM | HeaderFlags.DATA_VALID
            fields.num_buffers = 0
        elif self._too_long(frame):
            self.stats.drop("frame-too-large")
            return None
        return fields, frame

    def _too_long(self, frame: bytes) -> bool:
        """Tell whether a frame without GSO is longer than the driver accepts."""
        if len(frame) > self.max_frame:
            return True
        # 5.1.4.1: no frame over mtu plus its Ethernet header once MTU is
        # negotiated.
        return self.mtu is not None and exceeds_mtu([frame], len(frame), self.mtu)

    def _hold(self, header_fields: NetHeader | None, frame: bytes) -> RxResult:
        if len(self.held) >= self.hold_limit:
            self.stats.drop("no-rx-buffer")
            return RxResult.DROPPED
        self.held.append((header_fields, frame))
        self.stats.held += 1
        return RxResult.HELD

    # -- placement ------------------------------------------------------------

    def _deliver(
        self, header_fields: NetHeader | None, frame: bytes
    ) -> RxResult | None:
        """Place a frame; None means no buffers now (the caller holds it)."""
        try:
            while True:
                try:
                    return self._place(header_fields, frame)
                except _NoBuffers:
                    if not self.queue.enable_notification():
                        # Chains dropped on the way (no writable buffer) are
                        # completed now, not when the next frame arrives.
                        self._publish()
                        return None
                    # Buffers slipped in while notifications were off.
        except DriverError as error:
            self.on_break(error)
            self.stats.drop("not-ready")
            return RxResult.DROPPED

    def _place(self, header_fields: NetHeader | None, frame: bytes) -> RxResult:
        total = self.header_len + len(frame)
        chains = self._gather(total)
        if chains is None:
            self.stats.drop("rx-never-fits")
            self._publish()
            return RxResult.DROPPED
        if self.queue.notification_enabled:
            self.queue.disable_notification()
        header = self._header_bytes(header_fields, len(chains))
        self._write(chains, header, frame)
        if not self.queue.ready:
            # A reset came during the delivery (a reentrant call): the frame
            # is lost with the queue, so it counts as dropped, not delivered.
            self.stats.drop("queue-stopped")
            return RxResult.DROPPED
        stats = self.stats
        stats.frames += 1
        stats.bytes += len(frame)
        if self.trace.enabled:
            self.trace.record(Step.RX_DELIVER, detail=f"{len(frame)} bytes")
        self._publish()
        return RxResult.DELIVERED

    def _gather(self, total: int) -> list[Chain] | None:
        """Pop chains until their writable room holds ``total`` bytes.

        Returns None when the frame can never fit. Raises ``_NoBuffers`` when
        the ring is empty for now.
        """
        if not self.mergeable:
            return self._gather_one(total)
        chains = self._partial
        if not chains:
            # The usual frame fits the first chain popped; anything else goes
            # on below with that chain gathered.
            chain = self.queue.pop()
            if chain is None:
                raise _NoBuffers
            if self._usable(chain):
                if chain.writable_len >= total:
                    return [chain]
                chains.append(chain)
        room = sum(chain.writable_len for chain in chains)
        while room < total:
            if len(chains) >= self.queue.size:
                # The frame does not fit all the ring's buffers together. It is
                # dropped, and the chains taken for it go back to the driver
                # unwritten (len 0) instead of staying in flight.
                for chain in chains:
                    self.queue.add_used(chain.head, 0)
                self._partial = []
                return None
            chain = self.queue.pop()
            if chain is None:
                raise _NoBuffers
            if not self._usable(chain):
                continue
            chains.append(chain)
            room += chain.writable_len
        self._partial = []
        return chains

    def _gather_one(self, total: int) -> list[Chain] | None:
        while True:
            chain = self.queue.pop()
            if chain is None:
                raise _NoBuffers
            if not self._usable(chain):
                continue
            if chain.writable_len < total:
                # Without mergeable buffers a frame takes one chain; give the
                # chain back for a smaller frame, as QEMU does (5.1.6.3.2).
                self.queue.unpop()
                return None
            return [chain]

    def _usable(self, chain: Chain) -> bool:
        """Complete a chain the device cannot write into; True if usable.

        Policy: such a chain is completed with len 0 (DROP-CHAIN), where QEMU
        breaks the device; the frame goes to the next usable chain or waits.
        """
        if not chain.writable:
            self.stats.drop("no-writable-in-rx")
        elif self.mergeable and chain.writable_len < self.header_len:
            self.stats.drop("rx-buffer-too-small")
        else:
            return True
        self.queue.add_used(chain.head, 0)
        return False

    def _header_bytes(self, fields: NetHeader | None, buffers: int) -> bytes:
        if fields is None:
            if buffers == 1:
                # The header of a plain frame in one buffer never changes.
                return self._plain_header
            fields = NetHeader()
        fields.num_buffers = buffers if self.header_len >= 12 else 0
        return fields.pack(self.header_len)

    def _write(self, chains: list[Chain], header: bytes, frame: bytes) -> None:
        """Scatter header and frame over the chains and add their used elements.

        Every buffer but the last is filled completely (5.1.6.4.1).
        """
        queue = self.queue
        add_used = queue.add_used
        total = len(header) + len(frame)
        first = chains[0].writable[0]
        if len(chains) == 1 and len(first) >= total and not queue.detached:
            # The usual frame fits the first buffer: two copies, no join.
            header_len = len(header)
            first[:header_len] = header
            first[header_len:total] = frame
            add_used(chains[0].head, total)
            return
        data = memoryview(header + frame)
        offset = 0
        for chain in chains:
            if queue.detached:
                # After a reset the buffers belong to the driver again, so
                # nothing more is written into them (2.4.1).
                return
            start = offset
            for view in chain.writable:
                if offset >= len(data):
                    break
                take = min(len(view), len(data) - offset)
                view[:take] = data[offset : offset + take]
                offset += take
            add_used(chain.head, offset - start)

    def _publish(self) -> None:
        queue = self.queue
        if not queue.unpublished:
            return
        if queue.publish():
            self.stats.interrupts += 1
            self.trace.record(Step.INTERRUPT, detail="rx")
            self.interrupt(queue.index)
        else:
            self.stats.interrupts_suppressed += 1
            self.suppressed(queue.index)
