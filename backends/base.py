"""The contract between the virtio-net device and a network backend.

The device hands each transmitted frame to ``Backend.send`` as the negotiated
virtio_net_hdr bytes plus the frame, given as a list of buffers (usually
memoryview slices of guest memory, so a TAP can ``writev`` them without a
copy). ``send`` returns a ``SendStatus``:

- ``SENT``: the backend took the frame;
- ``BUSY``: the backend cannot take it now (EAGAIN); the device keeps the
  chain and calls ``send`` again with the same frame once the backend is
  writable, so nothing is lost and nothing is sent twice;
- ``DROPPED``: the backend refused this frame for good (EINVAL, EIO, the
  interface is gone); the backend counts it under a reason in ``drops``.

Frames arriving from the network come out of ``receive`` as ``(header,
frame)``: a virtio_net_hdr of ``header_size`` bytes (zeros when the backend
has none) and the Ethernet frame, or None when nothing is waiting.

A backend that can take a run of frames in one call, and never calls back
into the device while doing it, also defines ``send_burst(frames)``: each
frame is one buffer holding the header and the frame, and it returns
``(sent, status)``. The first ``sent`` frames were taken; when ``sent`` is
less than ``len(frames)``, ``status`` is what ``send`` would have returned for
``frames[sent]`` (BUSY: not taken, offer it again; DROPPED: counted in
``drops`` and done with) and the frames after it were not looked at. The
device sends the TX frames of one-descriptor chains this way, one call per
run instead of one per frame. Backends without it have ``send_burst = None``
and get ``send_gather`` per frame, with the device checking between frames
whether a callback reset or broke it.

Every backend counts frames and bytes (frame bytes only, without the header)
in ``frames_sent``, ``bytes_sent``, ``frames_received`` and
``bytes_received``, and the ``send`` calls that returned ``BUSY`` in
``send_busy``. ``stats`` returns them together.
"""

from __future__ import annotations

import abc
import collections
import enum
from collections.abc import Callable, Sequence
from typing import Self, Union

__all__ = ["Backend", "SendStatus", "Buffer", "split_header", "send_each"]

Buffer = Union[bytes, bytearray, memoryview]


class SendStatus(enum.Enum):
    """Outcome of one ``Backend.send`` call."""

    SENT = "sent"
    BUSY = "busy"
    DROPPED = "dropped"


class Backend(abc.ABC):
    """A place frames go to and come from: a TAP, a pcap file, a loopback."""

    #: Size of the virtio_net_hdr in front of each frame passed to ``send`` and
    #: returned by ``receive``; the device sets it from the negotiated features.
    header_size: int = 12

    #: True when the backend passes the virtio_net_hdr on (a TAP with
    #: IFF_VNET_HDR), so checksum and segmentation offloads can be left to
    #: the peer. Otherwise the device completes checksums itself and does not
    #: offer segmentation offloads.
    takes_offloads: bool = False

    #: ``send_burst(frames) -> (sent, status)`` when the backend has it; see
    #: the module docstring.
    send_burst: Callable[[Sequence[Buffer]], tuple[int, SendStatus]] | None = None

    def __init__(self) -> None:
        self.drops: collections.Counter[str] = collections.Counter()
        self.frames_sent = 0
        self.bytes_sent = 0
        self.frames_received = 0
        self.bytes_received = 0
        self.send_busy = 0

    def configure(self, header_size: int, offloads: int = 0) -> None:
        """Set the header size and the negotiated guest offload bits.

        ``offloads`` is a mask of virtio-net feature bits (GUEST_CSUM,
        GUEST_TSO4, ...) that a TAP turns into TUNSETOFFLOAD flags.
        """
        self.header_size = header_size

    @abc.abstractmethod
    def send(self, header: Buffer, frame: Sequence[Buffer]) -> SendStatus:
        """Transmit one frame; see the module docstring for the statuses."""

    def send_gather(self, buffers: Sequence[Buffer]) -> SendStatus:
        """Transmit one frame given as the header and frame bytes in a row.

        The concatenation of ``buffers`` is ``header_size`` bytes of
        virtio_net_hdr followed by the frame, wherever the boundaries fall:
        the device passes a TX chain's buffers as they are, so a backend that
        writes them out (a TAP's writev) needs no split. Returns what ``send``
        returns. This default splits the buffers and calls ``send``. Raises
        ValueError when they hold fewer than ``header_size`` bytes.
        """
        header, frame = split_header(buffers, self.header_size)
        return self.send(header, frame)

    def receive(self) -> tuple[bytes, bytes] | None:
        """Return the next received ``(header, frame)``, or None."""
        return None

    def fileno(self) -> int | None:
        """Return a file descriptor an event loop can wait on, or None."""
        return None

    def writable_fileno(self) -> int | None:
        """Return a descriptor that polls writable when ``send`` may stop being BUSY.

        None means the backend has no such descriptor, so a device that got
        ``BUSY`` retries on its next event instead.
        """
        return None

    @property
    def stats(self) -> dict[str, int]:
        """Counters of the backend, with the drops of all reasons summed."""
        return {
            "frames_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent,
            "frames_received": self.frames_received,
            "bytes_received": self.bytes_received,
            "send_busy": self.send_busy,
            "frames_dropped": sum(self.drops.values()),
        }

    def close(self) -> None:
        """Release what the backend holds. Calling it twice is harmless."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def split_header(
    buffers: Sequence[Buffer], header_size: int
) -> tuple[bytes, list[memoryview]]:
    """Split buffers into ``header_size`` header bytes and views of the frame.

    Raises ValueError when the buffers hold fewer than ``header_size`` bytes.
    """
    header = bytearray()
    frame: list[memoryview] = []
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        need = header_size - len(header)
        if need > 0:
            header += view[:need]
            view = view[need:]
        if len(view):
            frame.append(view)
    if len(header) < header_size:
        raise ValueError(
            f"buffers of {len(header)} bytes, shorter than the {header_size}-byte"
            " header"
        )
    return bytes(header), frame


def send_each(
    send_gather: Callable[[Sequence[Buffer]], SendStatus], frames: Sequence[Buffer]
) -> tuple[int, SendStatus]:
    """Send ``frames`` one ``send_gather`` call each, as ``send_burst`` would.

    Stops at the first frame that is not SENT and returns ``(sent, status)``
    with the meaning the module docstring gives. A backend's ``send_burst``
    uses it for the frames its own loop does not handle.
    """
    for sent, frame in enumerate(frames):
        status = send_gather((frame,))
        if status is not SendStatus.SENT:
            return sent, status
    return len(frames), SendStatus.SENT
