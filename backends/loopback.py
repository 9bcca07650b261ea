"""In-process backends: a loopback peer for tests and a null sink.

``LoopbackBackend`` replaces the network. Frames the device sends are
copied (the buffers are usually views of guest memory that the driver reuses)
and kept in a bounded queue that the test reads with ``sent_frames`` and
``pop_sent``. Frames the test passes to ``inject`` come out of ``receive``.
With ``echo=True`` every sent frame also comes back on ``receive``, so the
frames a driver transmits arrive on its own receive queue.

``fail_sends`` makes the next sends return BUSY or DROPPED, to test how the
device handles backpressure and drops.

``NullBackend`` counts frames and discards them.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from .base import Backend, Buffer, SendStatus, send_each

__all__ = ["LoopbackBackend", "NullBackend"]


class LoopbackBackend(Backend):
    """A peer in this process that stores sent frames and replays injected ones.

    ``capacity`` bounds the stored sent frames (the oldest are evicted and
    counted in ``frames_evicted``) and the receive queue (a full queue drops
    an echoed frame as "echo-queue-full", and ``inject`` raises). With
    ``discard=True`` sent frames are counted and not stored.
    """

    def __init__(
        self,
        *,
        echo: bool = False,
        discard: bool = False,
        capacity: int = 1024,
        header_size: int = 12,
    ) -> None:
        super().__init__()
        if capacity <= 0:
            raise ValueError(f"invalid capacity {capacity}: expected at least 1")
        if echo and discard:
            raise ValueError("echo=True and discard=True exclude each other")
        self.echo = echo
        self.discard = discard
        self.capacity = capacity
        self.header_size = header_size
        self.frames_evicted = 0
        self._sent: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._received: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._faults: collections.deque[tuple[SendStatus, str]] = collections.deque()

    def send(self, header: Buffer, frame: Sequence[Buffer]) -> SendStatus:
        """Store (or discard, or echo) a copy of one frame.

        Returns BUSY or DROPPED while faults from ``fail_sends`` are pending,
        DROPPED with "empty-frame" for a zero-length frame and with
        "echo-queue-full" when echoing into a full receive queue, else SENT.
        Raises ValueError when ``header`` is not ``header_size`` bytes long.
        """
        if len(header) != self.header_size:
            raise ValueError(
                f"header of {len(header)} bytes, but the backend expects"
                f" {self.header_size}"
            )
        if self._faults:
            return self._apply_fault()
        if not any(frame):
            self.drops["empty-frame"] += 1
            return SendStatus.DROPPED
        if self.echo and len(self._received) >= self.capacity:
            self.drops["echo-queue-full"] += 1
            return SendStatus.DROPPED
        data = b"".join(frame)
        self.frames_sent += 1
        self.bytes_sent += len(data)
        if self.discard:
            return SendStatus.SENT
        record = (bytes(header), data)
        if self.echo:
            self._received.append(record)
        if len(self._sent) >= self.capacity:
            self._sent.popleft()
            self.frames_evicted += 1
        self._sent.append(record)
        return SendStatus.SENT

    def receive(self) -> tuple[bytes, bytes] | None:
        """Return the oldest injected or echoed ``(header, frame)``, or None."""
        if not self._received:
            return None
        header, frame = self._received.popleft()
        self.frames_received += 1
        self.bytes_received += len(frame)
        return header, frame

    def inject(self, frame: Buffer, header: Buffer | None = None) -> None:
        """Queue a frame for ``receive``, with a zero header unless one is given.

        Raises ValueError when ``header`` is not ``header_size`` bytes long and
        OverflowError when the receive queue contains ``capacity`` frames.
        """
        if header is None:
            header = bytes(self.header_size)
        if len(header) != self.header_size:
            raise ValueError(
                f"header of {len(header)} bytes, but the backend expects"
                f" {self.header_size}"
            )
        if len(self._received) >= self.capacity:
            raise OverflowError(
                f"receive queue full ({self.capacity} frames); call receive()"
                f" first or raise capacity"
            )
        self._received.append((bytes(header), bytes(frame)))

    def sent_frames(self) -> list[bytes]:
        """Return the stored sent frames, oldest first, without removing them."""
        return [frame for _, frame in self._sent]

    def pop_sent(self) -> tuple[bytes, bytes] | None:
        """Remove and return the oldest stored ``(header, frame)``, or None."""
        if not self._sent:
            return None
        return self._sent.popleft()

    def fail_sends(
        self, count: int, status: SendStatus = SendStatus.BUSY, reason: str = "injected"
    ) -> None:
        """Make the next ``count`` sends return ``status`` without taking the frame.

        A DROPPED fault counts ``reason`` in ``drops``. A BUSY fault counts in
        ``send_busy``. Faults queue up behind the ones already pending. Raises
        ValueError for a negative count or for status SENT.
        """
        if count < 0:
            raise ValueError(f"invalid fault count {count}: expected 0 or more")
        if status is SendStatus.SENT:
            raise ValueError("a fault status must be BUSY or DROPPED")
        self._faults.extend([(status, reason)] * count)

    @property
    def pending_faults(self) -> int:
        """Number of sends that ``fail_sends`` still makes fail."""
        return len(self._faults)

    def _apply_fault(self) -> SendStatus:
        status, reason = self._faults.popleft()
        if status is SendStatus.BUSY:
            self.send_busy += 1
        else:
            self.drops[reason] += 1
        return status


class NullBackend(LoopbackBackend):
    """A sink that counts sent frames and discards them, for ``--to null``."""

    def __init__(self, *, header_size: int = 12) -> None:
        super().__init__(discard=True, header_size=header_size)

    def send(self, header: Buffer, frame: Sequence[Buffer]) -> SendStatus:
        """Count one frame and return what ``LoopbackBackend.send`` returns.

        The frame is measured instead of joined into one copy, which makes
        this the cheapest backend for throughput runs.
        """
        if len(header) != self.header_size:
            raise ValueError(
                f"header of {len(header)} bytes, but the backend expects"
                f" {self.header_size}"
            )
        if self._faults:
            return self._apply_fault()
        size = 0
        for part in frame:
            size += len(part)
        if not size:
            self.drops["empty-frame"] += 1
            return SendStatus.DROPPED
        self.frames_sent += 1
        self.bytes_sent += size
        return SendStatus.SENT

    def send_burst(self, frames: Sequence[Buffer]) -> tuple[int, SendStatus]:
        """Count a run of frames, each one buffer of header and frame.

        Returns ``(sent, status)`` as described in ``backends.base``. Runs
        with pending faults or a frame no longer than the header go frame by
        frame through ``send_gather``.
        """
        count = len(frames)
        header_size = self.header_size
        if self._faults or not count or min(map(len, frames)) <= header_size:
            return send_each(self.send_gather, frames)
        self.frames_sent += count
        self.bytes_sent += sum(map(len, frames)) - count * header_size
        return count, SendStatus.SENT

    def send_gather(self, buffers: Sequence[Buffer]) -> SendStatus:
        """Count one frame given as header and frame bytes in a row.

        Returns what ``send`` returns. Raises ValueError when the buffers
        hold fewer than ``header_size`` bytes.
        """
        if self._faults:
            return self._apply_fault()
        size = -self.header_size
        for buffer in buffers:
            size += len(buffer)
        if size <= 0:
            if size < 0:
                raise ValueError(
                    f"buffers of {size + self.header_size} bytes, shorter than"
                    f" the {self.header_size}-byte header"
                )
            self.drops["empty-frame"] += 1
            return SendStatus.DROPPED
        self.frames_sent += 1
        self.bytes_sent += size
        return SendStatus.SENT
