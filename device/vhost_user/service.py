"""A running vhost-user network back-end: server, device, backend, event loop.

``NetService`` wires the pieces of ``virtio-net-emu vhost-user`` together
on one thread. One ``EventLoop`` with a ``MonotonicClock`` waits on:

- the server's selector, which contains the listening socket, the
  connection and the kick eventfds. The server drains a kick eventfd and
  calls ``on_kick``, so a kick reaches the device in one ``poll``;
- the backend's descriptor: received frames go to ``device.receive``, and
  while a TX frame waits after BUSY, write readiness calls
  ``device.backend_writable``;
- the device's timers (TX bottom halves and timers), on the loop's clock.

A front-end that disconnects makes the server stop the rings and reset the
device. The service keeps running and serves the next front-end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Self

from backends.base import Backend, Buffer, SendStatus
from backends.loopback import LoopbackBackend

from ..event_loop import EventLoop, MonotonicClock, attach_backend
from ..eventfd import EventfdInterrupt
from ..net_device import RX_QUEUE, TX_QUEUE, VirtioNetDevice
from .net_adapter import NetDeviceAdapter
from .server import VhostUserServer

__all__ = ["DEFAULT_POLL_NS", "DEFAULT_RING_POLL_NS", "EchoBackend", "NetService"]

logger = logging.getLogger(__name__)

#: Nanoseconds the event loop polls after the last event before it sleeps
#: (``EventLoop.poll_ns``). The value is an estimate: a front-end that
#: transmits without pause, like testpmd's txonly, kicks again within
#: microseconds, and after the traffic stops the loop spends at most this
#: much CPU time before it sleeps.
DEFAULT_POLL_NS = 50_000

#: Nanoseconds the TX queue polls its ring with notifications off after it
#: drained it. Each time notifications go back on, a driver without
#: EVENT_IDX kicks for every frame it adds until the back-end's thread
#: wakes, so this spans the gaps of a guest that transmits in bursts.
DEFAULT_RING_POLL_NS = 2_000_000


class EchoBackend(LoopbackBackend):
    """A loopback peer that returns every sent frame, with a descriptor to poll.

    ``LoopbackBackend(echo=True)`` has no descriptor, so an event loop would
    not know when echoed frames wait. This one keeps an eventfd readable
    while its receive queue is not empty: the first frame queued writes it,
    and ``receive`` reads it back once the queue is empty.
    """

    def __init__(self, *, capacity: int = 1024, header_size: int = 12) -> None:
        super().__init__(echo=True, capacity=capacity, header_size=header_size)
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._signalled = False

    def send(self, header: Buffer, frame: Sequence[Buffer]) -> SendStatus:
        status = super().send(header, frame)
        if status is SendStatus.SENT and not self._signalled:
            self._signalled = True
            os.eventfd_write(self._eventfd, 1)
        return status

    def receive(self) -> tuple[bytes, bytes] | None:
        received = super().receive()
        if received is None and self._signalled:
            self._signalled = False
            try:
                os.eventfd_read(self._eventfd)
            except BlockingIOError:
                pass
        return received

    def fileno(self) -> int | None:
        return self._eventfd if self._eventfd >= 0 else None

    def close(self) -> None:
        fd, self._eventfd = self._eventfd, -1
        if fd >= 0:
            os.close(fd)


class NetService:
    """Serve a virtio-net device on ``socket_path`` with ``backend``.

    The service owns the backend and closes it in ``close``. ``fence`` goes
    to the server (the default is libatomic's full barrier). ``poll_ns`` is
    the event loop's polling time (``EventLoop``), and ``ring_poll_ns`` how
    long the TX queue keeps notifications off and polls the ring after it
    drained it (``TxPolicy``), so that a front-end that keeps transmitting
    needs no kicks; 0 turns that off. Raises what
    ``VhostUserServer`` raises for the socket path, and ``OSError`` when the
    fence library cannot be loaded.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        backend: Backend,
        *,
        tx_mode: str = "bh",
        fence: Callable[[], None] | None = None,
        poll_ns: int = DEFAULT_POLL_NS,
        ring_poll_ns: int = DEFAULT_RING_POLL_NS,
    ) -> None:
        self.backend = backend
        self.clock = MonotonicClock()
        self.loop = EventLoop(self.clock, poll_ns=poll_ns)
        self.interrupts = EventfdInterrupt()
        self.device = VirtioNetDevice(
            backend,
            interrupts=self.interrupts,
            clock=self.clock,
            tx_mode=tx_mode,
            ring_poll_ns=ring_poll_ns,
        )
        self.adapter = NetDeviceAdapter(self.device)
        try:
            self.server = VhostUserServer(socket_path, self.adapter, fence=fence)
        except BaseException:
            self.loop.close()
            raise
        self.loop.add_reader(self.server.fileno(), self._poll_server)
        self._want_writable = attach_backend(
            self.loop, backend, self._on_frame, self.device.backend_writable
        )
        self.device.on_backend_busy = self._on_backend_busy
        self._started_ns = self.loop.now_ns()
        self._closed = False

    def run(self, duration: float | None = None) -> None:
        """Serve until ``stop`` is called or ``duration`` seconds have passed."""
        logger.info(
            "serving virtio-net on %s with %s, TX mode %s",
            self.server.path,
            type(self.backend).__name__,
            self.device.tx_mode,
        )
        self.loop.run(duration)
        logger.info("stopped serving on %s", self.server.path)

    def stop(self) -> None:
        """Make ``run`` return after the current event."""
        self.loop.stop()

    def close(self) -> None:
        """Disconnect the front-end, close the server, the loop and the backend."""
        if self._closed:
            return
        self._closed = True
        self.server.close()
        self.loop.close()
        self.backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- statistics -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Return the counters of the device, the backend and the server.

        ``sent`` counts frames the backend took from the TX queue and
        ``received`` the frames placed in the driver's RX buffers. ``frames``
        and ``bytes`` add both directions, counting frame bytes without the
        virtio_net_hdr. ``dropped`` maps each drop reason of the device and
        the backend to its count. ``kicks_suppressed`` is None because the
        device cannot see the kicks the driver left out while notifications
        were off.
        """
        device_stats = self.device.stats
        tx = device_stats.queue(TX_QUEUE)
        rx = device_stats.queue(RX_QUEUE)
        dropped = device_stats.drops + self.backend.drops
        return {
            "sent": tx.frames,
            "received": rx.frames,
            "dropped": dict(sorted(dropped.items())),
            "kicks": tx.kicks + rx.kicks,
            "kick_writes": {
                "rx": self.server.counters[f"kick_writes_{RX_QUEUE}"],
                "tx": self.server.counters[f"kick_writes_{TX_QUEUE}"],
            },
            "kicks_suppressed": None,
            "interrupts": tx.interrupts + rx.interrupts,
            "interrupts_suppressed": tx.interrupts_suppressed
            + rx.interrupts_suppressed,
            "frames": tx.frames + rx.frames,
            "bytes": tx.bytes + rx.bytes,
            "tx": _queue_summary(tx),
            "rx": _queue_summary(rx),
            "backend": self.backend.stats,
            "connections": self.server.counters["connections"],
            "protocol_errors": self.server.counters["protocol_errors"],
            "broken_queues": self.server.counters["broken_queues"],
            "device_breaks": device_stats.breaks,
            "call_write_errors": self.interrupts.errors,
            "seconds": round((self.loop.now_ns() - self._started_ns) / 1e9, 3),
        }

    # -- event callbacks ------------------------------------------------------

    def _poll_server(self) -> None:
        self.server.poll(0)

    def _on_frame(self, header: bytes, frame: bytes) -> None:
        self.device.receive(header, frame)

    def _on_backend_busy(self) -> None:
        self._want_writable(True)


def _queue_summary(stats: Any) -> dict[str, Any]:
    return {
        "frames": stats.frames,
        "bytes": stats.bytes,
        "kicks": stats.kicks,
        "ring_polls": stats.ring_polls,
        "interrupts": stats.interrupts,
        "interrupts_suppressed": stats.interrupts_suppressed,
        "drops": dict(sorted(stats.drops.items())),
    }
