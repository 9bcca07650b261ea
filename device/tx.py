"""The TX path of the device: from a descriptor chain to the backend.

``TxQueue.flush`` is the device's half of transmitting (QEMU's
``virtio_net_flush_tx``): pop chains up to a burst, split each into the
virtio_net_hdr and the frame wherever they fall across descriptors, hand them
to the backend, and complete the chain with used length 0. Chains whose frame
is malformed are completed with length 0 and counted by reason; nothing is
sent for them. When the backend is busy the chain stays in flight as the
pending chain and the flush stops with notifications disabled; ``resume``
sends it once the backend can take it, so no frame is lost or sent twice.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from backends.base import Backend, SendStatus
from virtio import Chain, DeviceQueue, DriverError

from .features import NetFeature
from .header import (
    GSO_ECN,
    MAX_FRAME_SIZE,
    NetHeader,
    check_tx_header,
    complete_checksum,
    exceeds_mtu,
)
from .stats import QueueStats
from .trace import Step, Trace

__all__ = ["TxQueue", "FlushResult", "split_frame"]


class FlushResult(enum.Enum):
    """A flush that could not complete: the backend is busy or the ring broke."""

    BUSY = "busy"
    BROKEN = "broken"


def split_frame(
    readable: list[memoryview], header_len: int
) -> tuple[bytes, list[memoryview]]:
    """Split a chain's readable buffers into header bytes and frame parts.

    The header may be spread over several descriptors and share the last of
    them with the start of the frame (virtio 1.2, 2.7.4: the device must not
    assume any arrangement). The caller has checked that the buffers hold
    more than ``header_len`` bytes.
    """
    first = readable[0]
    if len(first) == header_len:
        return bytes(first), readable[1:]
    if len(first) > header_len:
        return bytes(first[:header_len]), [first[header_len:], *readable[1:]]
    header = bytearray()
    for position, buffer in enumerate(readable):
        need = header_len - len(header)
        if len(buffer) <= need:
            header += buffer
            continue
        header += buffer[:need]
        return bytes(header), [buffer[need:], *readable[position + 1 :]]
    return bytes(header), []


class TxQueue:
    """The device's TX virtqueue with its backend and counters."""

    def __init__(
        self,
        queue: DeviceQueue,
        backend: Backend,
        *,
        header_len: int,
        features: int,
        stats: QueueStats,
        trace: Trace,
        interrupt: Callable[[int], None],
        suppressed: Callable[[int], None],
        on_break: Callable[[DriverError], None],
        max_frame: int = MAX_FRAME_SIZE,
        mtu: int | None = None,
        software_checksum: bool = False,
        on_busy: Callable[[], None] | None = None,
    ) -> None:
        self.queue = queue
        self.backend = backend
        self.header_len = header_len
        self.features = features
        self.stats = stats
        self.trace = trace
        self.interrupt = interrupt
        self.suppressed = suppressed
        self.on_break = on_break
        self.max_frame = max_frame
        self.mtu = mtu
        # Only a negotiated CSUM makes NEEDS_CSUM meaningful; without it the
        # flag is an unnegotiated bit and is ignored (5.1.6.2.1).
        self.software_checksum = software_checksum and bool(features & NetFeature.CSUM)
        self.send_burst = backend.send_burst
        self.pending: Chain | None = None
        self.pending_frame: tuple[bytes | memoryview, list[memoryview]] | None = None
        # Called when the backend returns BUSY, so an event loop can wait for
        # the backend to become writable and then call ``resume``.
        self.on_busy = on_busy or _ignore

    @property
    def plain_limit(self) -> int:
        """Maximum chain length, header included, that the fast paths send unchecked.

        A frame of at most mtu + 14 bytes cannot exceed the MTU, tagged or
        not, so they skip exceeds_mtu for it (5.1.4.2).
        """
        max_plain = self.max_frame
        if self.mtu is not None:
            max_plain = min(max_plain, self.mtu + _ETHERNET_HEADER)
        return self.header_len + max_plain

    @property
    def csum_passes(self) -> bool:
        """Whether NEEDS_CSUM alone may take the fast paths.

        Linux sets it on every TCP and UDP frame. When the backend completes
        checksums itself, the only check it needs is that the checksum lies
        in the frame.
        """
        return not self.software_checksum and bool(self.features & _CSUM)

    def flush(self, burst: int) -> int | FlushResult:
        """Transmit up to ``burst`` chains; return how many were completed.

        Returns ``FlushResult.BUSY`` when a frame is waiting for the backend
        (notifications are then disabled, as QEMU does with an asynchronous
        send) and ``FlushResult.BROKEN`` when the driver broke the ring.
        """
        if self.pending is not None:
            self.queue.disable_notification()
            return FlushResult.BUSY
        self.stats.flushes += 1
        self.trace.record(Step.TX_FLUSH)
        done = 0
        try:
            # Runs of one-descriptor chains go to the backend in bursts. The
            # general path takes the chain that ended a run, and hands back
            # after the next chain of one buffer, which likely starts a new run.
            while done < burst:
                if self.send_burst is not None:
                    count = self._flush_run(burst - done)
                    if count is FlushResult.BUSY:
                        return count
                    done += count
                    if done == burst:
                        break
                count = self._flush_chains(burst - done)
                if count is FlushResult.BUSY:
                    return count
                if not count:
                    break
                done += count
        except DriverError as error:
            self.on_break(error)
            return FlushResult.BROKEN
        self._publish()
        return done

    def _flush_run(self, limit: int) -> int | FlushResult:
        """Transmit the run of one-descriptor chains at the front of the ring.

        ``pop_single`` takes the run, so every chain is one buffer holding
        the header and a frame of plausible size. Frames whose header
        requests nothing the backend cannot do go out together through
        ``send_burst``. Any other frame goes alone through ``_transmit``, in
        ring order. Returns the count completed, or BUSY.
        """
        queue = self.queue
        header_len = self.header_len
        heads, buffers = queue.pop_single(limit, header_len + 1, self.plain_limit)
        csum_passes = self.csum_passes
        start = 0
        for index, buffer in enumerate(buffers):
            # The test of the general path's fast lane, on one buffer.
            if not buffer[1] and (
                not buffer[0]
                or buffer[0] == 1
                and csum_passes
                and (buffer[6] | buffer[7] << 8) + (buffer[8] | buffer[9] << 8)
                < len(buffer) - header_len - 1
            ):
                continue
            busy = self._send_run(heads, buffers, start, index)
            if busy < 0:
                chain = Chain(heads[index], [buffer], [], len(buffer), 0)
                if self._transmit(chain):
                    queue.add_used(chain.head, 0)
                    start = index + 1
                    continue
                busy = index
            return self._hold(heads, buffers, busy)
        busy = self._send_run(heads, buffers, start, len(heads))
        if busy < 0:
            return len(heads)
        return self._hold(heads, buffers, busy)

    def _send_run(
        self, heads: list[int], buffers: list[memoryview], start: int, end: int
    ) -> int:
        """Send frames ``start`` to ``end`` in bursts and complete their chains.

        A frame the backend drops is completed too, as in ``_transmit``.
        Returns -1 when every chain was completed, else the index of the
        frame the backend was too busy to take; its chain stays in flight.
        """
        stats = self.stats
        header_len = self.header_len
        while start < end:
            frames = buffers[start:end]
            sent, status = self.send_burst(frames)
            if sent:
                stats.frames += sent
                stats.bytes += sum(map(len, frames[:sent])) - sent * header_len
            stop = start + sent
            if status is _SENT:
                self.queue.add_used_many(heads[start:end])
                return -1
            if status is SendStatus.BUSY:
                self.queue.add_used_many(heads[start:stop])
                self._finish_send(split_frame([buffers[stop]], header_len), status)
                return stop
            self._finish_send(None, status)
            self.queue.add_used_many(heads[start : stop + 1])
            start = stop + 1
        return -1

    def _hold(
        self, heads: list[int], buffers: list[memoryview], index: int
    ) -> FlushResult:
        """Keep chain ``index`` of a run pending and give back the ones after it."""
        self.queue.unpop(len(heads) - index - 1)
        buffer = buffers[index]
        self._wait_for_backend(Chain(heads[index], [buffer], [], len(buffer), 0))
        return FlushResult.BUSY

    def _flush_chains(self, limit: int) -> int | FlushResult:
        """Transmit up to ``limit`` chains of any shape, one at a time.

        With ``send_burst`` it stops after a chain of one readable buffer, so
        that ``flush`` can try a run again.
        """
        done = 0
        queue = self.queue
        add_used = queue.add_used
        send_gather = self.backend.send_gather
        header_len = self.header_len
        plain_limit = self.plain_limit
        csum_passes = self.csum_passes
        hand_back = self.send_burst is not None
        sent = sent_bytes = 0
        try:
            for chain in queue.chains(limit):
                total = chain.readable_len
                readable = chain.readable
                done += 1
                # The fast lane is _extract's result for the usual chain: a
                # frame that is neither empty nor too large, with no offload
                # requested (header flags and gso_type 0), or NEEDS_CSUM alone
                # with the checksum inside the frame when the backend
                # completes checksums. The backend gets the chain's buffers as
                # they are, header included.
                if header_len < total <= plain_limit and not chain.writable_len:
                    first = readable[0]
                    if (
                        len(first) >= 10
                        and not first[1]
                        and (
                            not first[0]
                            or first[0] == 1
                            and csum_passes
                            and (first[6] | first[7] << 8) + (first[8] | first[9] << 8)
                            < total - header_len - 1
                        )
                    ):
                        status = send_gather(readable)
                        if status is _SENT:
                            sent += 1
                            sent_bytes += total - header_len
                        elif not self._finish_send(
                            split_frame(readable, header_len), status
                        ):
                            self._wait_for_backend(chain)
                            return FlushResult.BUSY
                        add_used(chain.head, 0)
                        if hand_back and len(readable) == 1:
                            break
                        continue
                if not self._transmit(chain):
                    self._wait_for_backend(chain)
                    return FlushResult.BUSY
                add_used(chain.head, 0)
                if hand_back and len(readable) == 1:
                    break
        finally:
            self.stats.frames += sent
            self.stats.bytes += sent_bytes
        return done

    def _wait_for_backend(self, chain: Chain) -> None:
        self.pending = chain
        self.queue.disable_notification()
        self._publish()

    def resume(self) -> bool:
        """Send the pending chain again; return True when it was completed."""
        chain = self.pending
        if chain is None:
            return True
        if not self._transmit(chain):
            return False
        self.pending = None
        self.pending_frame = None
        self.queue.add_used(chain.head, 0)
        self._publish()
        return True

    def stop(self) -> None:
        """Finish or give back the pending chain before the queue stops.

        The pending chain is sent if the backend takes it now. Otherwise it
        goes back to the avail ring (it is the last chain popped, because a
        flush stops at it), so a restart from ``last_avail_idx`` sends it and
        nothing is sent twice.
        """
        if self.pending is None or self.resume():
            return
        self.pending = None
        self.pending_frame = None
        if self.queue.broken is None:
            self.queue.unpop()

    def _transmit(self, chain: Chain) -> bool:
        """Send one chain's frame; False means the backend is busy."""
        frame = self.pending_frame if self.pending is chain else None
        if frame is None:
            frame = self._extract(chain)
            if frame is None:
                return True
        status = self.backend.send(*frame)
        if status is SendStatus.SENT:
            self.stats.frames += 1
            self.stats.bytes += chain.readable_len - self.header_len
            return True
        return self._finish_send(frame, status)

    def _finish_send(
        self,
        frame: tuple[bytes | memoryview, list[memoryview]] | None,
        status: SendStatus,
    ) -> bool:
        """Handle a send that returned BUSY or DROPPED. False means BUSY."""
        if status is SendStatus.BUSY:
            self.pending_frame = frame
            self.on_busy()
            return False
        self.stats.drop("backend-rejected")
        return True

    def _extract(self, chain: Chain) -> tuple[bytes, list[memoryview]] | None:
        """Check a chain and return its header and frame, or None if dropped.

        Policy: a chain whose ring structure is valid but whose frame is not
        (wrong direction, too short, too long, bad offloads) is dropped and
        completed with len 0 (DROP-CHAIN). Only ring violations break the
        device. The sizes come from the descriptor lengths, before any copy.
        """
        reason = None
        if chain.writable_len:
            reason = "writable-in-tx"
        elif chain.readable_len < self.header_len:
            reason = "header-incomplete"
        elif chain.readable_len == self.header_len:
            reason = "frame-empty"
        elif chain.readable_len - self.header_len > self.max_frame:
            reason = "frame-too-large"
        if reason is not None:
            self.stats.drop(reason)
            return None
        header, parts = split_frame(chain.readable, self.header_len)
        # A driver that negotiated MTU must not send longer frames without
        # GSO (5.1.4.2); there is no device rule, so the chain is dropped.
        if self.mtu is not None and not header[1] & ~GSO_ECN:
            frame_len = chain.readable_len - self.header_len
            if exceeds_mtu(parts, frame_len, self.mtu):
                self.stats.drop("frame-too-large")
                return None
        if header[0] or header[1]:
            return self._check_offloads(header, parts, chain.readable_len)
        return header, parts

    def _check_offloads(
        self, header: bytes, parts: list[memoryview], total: int
    ) -> tuple[bytes, list[memoryview]] | None:
        fields = NetHeader.unpack(header)
        frame_len = total - self.header_len
        reason = check_tx_header(fields, frame_len, self.features)
        if reason is not None:
            self.stats.drop(reason)
            return None
        if self.software_checksum and fields.flags & 1 and fields.gso_type == 0:
            frame = bytearray(b"".join(parts))
            complete_checksum(frame, fields.csum_start, fields.csum_offset)
            return bytes(self.header_len), [memoryview(frame)]
        return header, parts

    def _publish(self) -> None:
        """Make completed chains visible and notify the driver if it wants it."""
        queue = self.queue
        if not queue.unpublished:
            return
        if queue.publish():
            self.stats.interrupts += 1
            self.trace.record(Step.INTERRUPT)
            self.interrupt(queue.index)
        else:
            self.stats.interrupts_suppressed += 1
            self.trace.record(Step.INTERRUPT_SUPPRESSED)
            self.suppressed(queue.index)

    def drop_all(self) -> None:
        """Complete every available chain unsent (link down)."""
        try:
            self.queue.drop_all()
        except DriverError as error:
            self.on_break(error)
            return
        self._publish()


_SENT = SendStatus.SENT
# A plain int, because each & on the NetFeature flag builds a new enum member
# (3 % of the backend's time under testpmd).
_CSUM = int(NetFeature.CSUM)
_ETHERNET_HEADER = 14


def _ignore() -> None:
    return None
