"""``FakeNic``: a virtio-net NIC for tests, with the whole virtio path inside.

A test hands frames to the guest driver model (``send``), which puts them on
the TX ring and kicks. The device flushes them into the backend. Frames
from the network (``inject``, or a TAP's host side) go through the device
into the receive buffers the guest posted, and ``received`` returns what
the guest got. The machine runs in virtual time, and every call returns once
the guest and the device are idle again. Statistics and the trace are those
of the ``Machine`` underneath.

The default backend is an in-process ``LoopbackBackend``: ``sent_frames``
returns what the guest transmitted. ``FakeNic.on_tap`` creates a TAP in a
given network namespace, whose host side the test reaches with sockets from
``socket``.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Iterable
from typing import Any

from backends import Backend, LoopbackBackend, TapBackend, enter_namespace

from .guest import GuestConfig
from .machine import Machine
from .trace import Trace

__all__ = ["FakeNic", "DEFAULT_HOST_ADDRESS"]

DEFAULT_HOST_ADDRESS = "192.0.2.1/24"
"""Host side address of a TAP, from TEST-NET-1 (RFC 5737)."""
WRITABLE_TIMEOUT_S = 1.0


class FakeNic:
    """A guest driver model and a virtio-net device on ``backend``.

    Without ``backend`` a ``LoopbackBackend`` is used. ``tx_mode``,
    ``queue_size`` and ``event_idx`` set the device's TX batching and the
    rings; ``trace`` records the TX path step by step.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        tx_mode: str = "bh",
        queue_size: int = 256,
        event_idx: bool = True,
        trace: bool = True,
    ) -> None:
        self.backend = backend if backend is not None else LoopbackBackend()
        self.netns: str | None = None
        self.machine = Machine(
            guest=GuestConfig(queue_size=queue_size, event_idx=event_idx),
            tx_mode=tx_mode,
            backend=self.backend,
            trace=trace,
        )
        self.machine.run()

    @classmethod
    def on_tap(
        cls,
        netns: str,
        *,
        name: str = "vnetap%d",
        host_address: str | None = DEFAULT_HOST_ADDRESS,
        **options: Any,
    ) -> FakeNic:
        """Return a NIC on a new TAP in namespace ``netns``.

        The host side gets ``host_address`` unless it is None. Raises what
        ``TapBackend`` raises.
        """
        addresses = [host_address] if host_address else []
        tap = TapBackend(name, netns=netns, addresses=addresses)
        try:
            nic = cls(tap, **options)
        except BaseException:
            tap.close()
            raise
        nic.netns = netns
        return nic

    # -- what the test does ----------------------------------------------------

    def send(self, frame: bytes) -> int:
        """Have the guest transmit one frame; return its packet number."""
        packet = self.machine.send(frame)
        self.run()
        return packet

    def send_many(self, frames: Iterable[bytes]) -> list[int]:
        """Have the guest transmit frames as one burst; return their numbers."""
        packets = self.machine.send_many(frames)
        self.run()
        return packets

    def inject(self, frame: bytes, header: bytes | None = None) -> None:
        """Deliver one frame from the network to the guest.

        With the loopback backend the frame goes through the backend's
        receive queue. With a TAP it goes straight to the device, as if the
        TAP had delivered it.
        """
        if isinstance(self.backend, LoopbackBackend):
            self.backend.inject(frame, header)
            self.poll()
        else:
            self.machine.deliver_rx(frame, header)
            self.run()

    def received(self, timeout: float = 0.0) -> list[bytes]:
        """Return every frame the guest received so far, oldest first.

        Frames waiting in the backend are delivered first. With a TAP,
        ``timeout`` seconds are given to frames still on their way.
        """
        self.poll(timeout)
        return list(self.machine.received)

    def sent_frames(self) -> list[bytes]:
        """Return the frames the backend took, oldest first (loopback only).

        Raises TypeError for a TAP: read its host side with a socket.
        """
        if not isinstance(self.backend, LoopbackBackend):
            raise TypeError(
                "sent_frames() needs the loopback backend; on a TAP, capture the"
                " host side with a socket from FakeNic.socket()"
            )
        return self.backend.sent_frames()

    # -- machinery ---------------------------------------------------------------

    def run(self) -> None:
        """Run the machine until it is idle, waiting out a BUSY backend."""
        machine = self.machine
        while True:
            machine.run()
            tx = machine.device.tx
            if tx is None or tx.pending is None or machine.device.broken:
                return
            fd = self.backend.writable_fileno()
            if fd is not None:
                select.select([], [fd], [], WRITABLE_TIMEOUT_S)
            machine.backend_writable()

    def poll(self, timeout: float = 0.0) -> int:
        """Deliver the frames waiting in the backend; return how many.

        Waits up to ``timeout`` seconds for the first frame when none is
        waiting and the backend has a file descriptor.
        """
        fd = self.backend.fileno()
        if timeout > 0 and fd is not None:
            select.select([fd], [], [], timeout)
        device = self.machine.device
        delivered = 0
        while (item := self.backend.receive()) is not None:
            device.receive(*item)
            delivered += 1
        self.run()
        return delivered

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """Return a socket of the TAP's namespace (the host side).

        Raises TypeError when the NIC is not on a TAP in a namespace.
        """
        if self.netns is None:
            raise TypeError("socket() needs a NIC on a TAP in a network namespace")
        with enter_namespace(self.netns):
            return socket.socket(family, kind, proto)

    # -- inspection --------------------------------------------------------------

    @property
    def mac(self) -> bytes:
        """The device's MAC address."""
        return self.machine.device.mac

    @property
    def tap_name(self) -> str | None:
        """The TAP's interface name, or None on another backend."""
        return getattr(self.backend, "name", None) if self.netns else None

    @property
    def stats(self) -> dict[str, Any]:
        """Figures of the guest and the device (``MachineStats``) as a dict.

        ``backend`` adds the backend's own counters.
        """
        data = self.machine.stats().to_dict()
        data["backend"] = self.backend.stats
        return data

    @property
    def trace(self) -> Trace:
        return self.machine.trace

    def close(self) -> None:
        """Close the backend; a TAP the NIC created is deleted with it."""
        with contextlib.suppress(OSError):
            self.backend.close()

    def __enter__(self) -> FakeNic:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
