"""TAP backend: frames go to and come from a Linux TAP interface.

The TAP is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, so every read and
write on its file descriptor starts with a virtio_net_hdr. The TAP's header
size (TUNSETVNETHDRSZ) is set to the device's negotiated header size, so the
header bytes the driver wrote pass through unchanged, and the kernel applies
its flags and GSO fields (checksum and segmentation offload). TUNSETOFFLOAD
sets the offloads the guest accepts on receive, so the kernel may hand it
frames with a partial checksum or GSO frames larger than the MTU.

The file descriptor is non-blocking. ``send`` maps every write error to a
status and never raises for one. The kernel (checked on Linux 6.18) returns:

- EAGAIN when the TAP's send buffer (TUNSETSNDBUF) is full of frames that
  are still queued somewhere in the kernel: ``BUSY``;
- EINVAL for a frame shorter than 14 bytes or a header the kernel rejects
  (bad gso_type, hdr_len beyond the frame): ``DROPPED`` "backend-rejected";
- EIO while the interface is down: ``DROPPED`` "backend-io-error";
- EBADFD after the interface was deleted: ``DROPPED`` "backend-gone".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from .base import Backend, Buffer, SendStatus
from .errors import BackendError
from .netns import enter_namespace

__all__ = [
    "HEADER_SIZES",
    "MAX_FRAME_SIZE",
    "TUN_PATH",
    "TapBackend",
    "tun_offload_flags",
]

logger = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"

# ioctl request numbers and flags from linux/if_tun.h (_IOW('T', nr, int)).
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETSNDBUF = 0x400454D4
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000  # TUNSETIFF fails with EBUSY if the name exists
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

# virtio-net feature bits of the offloads the guest accepts (virtio 1.2, 5.1.3).
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10

_OFFLOAD_FLAGS = (
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
)

#: virtio_net_hdr sizes: without MRG_RXBUF (legacy), with num_buffers (MRG_RXBUF
#: or VERSION_1), and with the hash report fields (HASH_REPORT).
HEADER_SIZES = (10, 12, 20)

#: Largest frame ``receive`` accepts by default: an IPv6 packet of the maximum
#: payload length (65535 bytes plus the 40-byte header) in an Ethernet frame
#: with one VLAN tag. Longer frames are counted as "receive-truncated".
# NOTE: GSO sizes raised above 64 KiB (BIG TCP) can produce longer frames.
MAX_FRAME_SIZE = 65535 + 40 + 14 + 4

IFNAMSIZ = 16  # interface names are at most 15 bytes plus the NUL

_DROP_REASONS = {
    errno.EINVAL: "backend-rejected",
    errno.EMSGSIZE: "backend-rejected",
    errno.EFAULT: "backend-rejected",
    errno.EIO: "backend-io-error",
    errno.EBADFD: "backend-gone",
    errno.EBADF: "backend-gone",
    errno.ENODEV: "backend-gone",
    errno.ENXIO: "backend-gone",
    errno.EPIPE: "backend-gone",
    errno.ENOMEM: "backend-no-memory",
    errno.ENOBUFS: "backend-no-memory",
}


def tun_offload_flags(features: int) -> int:
    """Return the TUNSETOFFLOAD flags for a mask of virtio-net feature bits.

    Bits other than GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, GUEST_ECN and
    GUEST_UFO are ignored. Raises ValueError when a bit lacks the bit it
    requires (virtio 1.2, 5.1.3.1 "Feature bit requirements"), because the
    kernel rejects those combinations with EINVAL: TSO4, TSO6 and UFO require
    CSUM, and ECN requires TSO4 or TSO6.
    """
    flags = 0
    for bit, flag in _OFFLOAD_FLAGS:
        if features >> bit & 1:
            flags |= flag
    needs_csum = flags & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)
    if needs_csum and not flags & TUN_F_CSUM:
        raise ValueError(
            f"offload features {features:#x}: GUEST_TSO4, GUEST_TSO6 and"
            f" GUEST_UFO require GUEST_CSUM"
        )
    if flags & TUN_F_TSO_ECN and not flags & (TUN_F_TSO4 | TUN_F_TSO6):
        raise ValueError(
            f"offload features {features:#x}: GUEST_ECN requires GUEST_TSO4 or"
            f" GUEST_TSO6"
        )
    return flags


class TapBackend(Backend):
    """A TAP interface, created for this backend or attached to an existing one.

    ``name`` may contain ``%d``, which the kernel replaces with the first free
    number. ``netns`` names the network namespace the interface is created in
    (or looked up in, with ``attach=True``). ``mac``, ``mtu``, ``addresses``
    (strings such as ``"192.0.2.1/24"``) and ``up`` configure the interface
    through rtnetlink. ``sndbuf`` limits the bytes of written frames the kernel
    may hold before writes fail with EAGAIN (TUNSETSNDBUF). A created interface
    disappears when the backend closes. An attached one stays, with the
    configuration this backend applied.

    Attributes: ``name`` (the interface name the kernel chose), ``ifindex``,
    ``netns``, ``created`` (False when attached) and ``offload_flags`` (the
    TUN_F_* flags in effect).

    Raises BackendError when /dev/net/tun is missing or not accessible, when
    the caller lacks CAP_NET_ADMIN, when the interface exists (without
    ``attach``) or is missing (with ``attach``), and when configuring it
    fails. Raises NamespaceNotFoundError for a missing namespace and
    ValueError for invalid arguments.
    """

    takes_offloads = True

    def __init__(
        self,
        name: str | None = None,
        *,
        netns: str | None = None,
        attach: bool = False,
        mac: str | None = None,
        mtu: int | None = None,
        addresses: Sequence[str] = (),
        up: bool = True,
        header_size: int = 12,
        offloads: int = 0,
        sndbuf: int | None = None,
        max_frame_size: int = MAX_FRAME_SIZE,
        tun_path: str = TUN_PATH,
    ) -> None:
        super().__init__()
        if name is None:
            if attach:
                raise ValueError("attach=True needs the name of an existing TAP")
            name = "vnetap%d"
        _check_interface_name(name)
        interfaces = [ipaddress.ip_interface(address) for address in addresses]
        self.netns = netns
        self.created = not attach
        self.max_frame_size = max_frame_size
        self._fd = -1
        self._logged_reasons: set[str] = set()
        self._fd, self.name = _open_tap(name, netns, attach, tun_path)
        try:
            self.configure(header_size, offloads)
            if sndbuf is not None:
                _tun_ioctl(
                    self._fd,
                    TUNSETSNDBUF,
                    struct.pack("i", sndbuf),
                    f"TUNSETSNDBUF {sndbuf} on TAP {self.name!r}",
                )
            self.ifindex = _configure_link(self.name, netns, mac, mtu, interfaces, up)
        except BaseException:
            self.close()
            raise
        logger.debug(
            "opened TAP %s (created=%s, netns=%s)", self.name, self.created, netns
        )

    def configure(self, header_size: int, offloads: int = 0) -> None:
        """Set the TAP's vnet header size and receive offloads.

        ``offloads`` is a mask of virtio-net feature bits (see
        ``tun_offload_flags``). Raises ValueError for a header size other than
        10, 12 or 20 or an invalid offload combination, and BackendError when
        the kernel rejects the ioctl.
        """
        if header_size not in HEADER_SIZES:
            raise ValueError(
                f"invalid virtio_net_hdr size {header_size}; expected one of"
                f" {HEADER_SIZES}"
            )
        flags = tun_offload_flags(offloads)
        _tun_ioctl(
            self._fd,
            TUNSETVNETHDRSZ,
            struct.pack("i", header_size),
            f"TUNSETVNETHDRSZ {header_size} on TAP {self.name!r}",
        )
        # TUNSETOFFLOAD takes the flags as the ioctl argument itself.
        _tun_ioctl(
            self._fd,
            TUNSETOFFLOAD,
            flags,
            f"TUNSETOFFLOAD {flags:#x} on TAP {self.name!r}",
        )
        self.header_size = header_size
        self.offload_flags = flags
        # One spare byte separates a frame that fills the buffer exactly from
        # one the kernel cut short, because read(2) truncates without an error.
        self._receive_limit = header_size + self.max_frame_size
        self._receive_buffer = bytearray(self._receive_limit + 1)
        self._receive_view = memoryview(self._receive_buffer)
        self._receive_buffers = [self._receive_buffer]

    def send(self, header: Buffer, frame: Sequence[Buffer]) -> SendStatus:
        """Write one frame to the TAP with a single writev(2).

        Returns SENT when the kernel took the frame. Returns BUSY on EAGAIN:
        nothing was written, so the caller can send the same frame again
        later. Returns DROPPED, with the reason counted in ``drops``, for a
        frame of zero bytes ("empty-frame", not written) and for the write
        errors listed in the module docstring. Raises ValueError when
        ``header`` is not ``header_size`` bytes long, which is a bug of the
        caller.
        """
        if len(header) != self.header_size:
            raise ValueError(
                f"header of {len(header)} bytes, but the TAP expects"
                f" {self.header_size}"
            )
        if not any(frame):
            return self._drop("empty-frame", None)
        try:
            written = os.writev(self._fd, [header, *frame])
        except BlockingIOError:
            self.send_busy += 1
            return SendStatus.BUSY
        except OSError as exc:
            return self._drop(_DROP_REASONS.get(exc.errno, "backend-error"), exc)
        self.frames_sent += 1
        self.bytes_sent += written - self.header_size
        return SendStatus.SENT

    def send_gather(self, buffers: Sequence[Buffer]) -> SendStatus:
        """Write one frame given as header and frame bytes in a row, with writev(2).

        The buffers are written as they are, so the kernel gets the same
        bytes as from ``send``. Returns what ``send`` returns. Raises
        ValueError when the buffers hold fewer than ``header_size`` bytes.
        """
        size = 0
        for buffer in buffers:
            size += len(buffer)
        if size <= self.header_size:
            if size < self.header_size:
                raise ValueError(
                    f"buffers of {size} bytes, shorter than the"
                    f" {self.header_size}-byte header"
                )
            return self._drop("empty-frame", None)
        try:
            written = os.writev(self._fd, buffers)
        except BlockingIOError:
            self.send_busy += 1
            return SendStatus.BUSY
        except OSError as exc:
            return self._drop(_DROP_REASONS.get(exc.errno, "backend-error"), exc)
        self.frames_sent += 1
        self.bytes_sent += written - self.header_size
        return SendStatus.SENT

    def send_burst(self, frames: Sequence[Buffer]) -> tuple[int, SendStatus]:
        """Write a run of frames, each one buffer of header and frame, with write(2).

        One ``write`` per frame, as ``send_gather`` makes one ``writev``:
        the kernel takes or refuses each frame whole. Returns ``(sent,
        status)`` as described in ``backends.base``; the statuses and drop
        reasons are those of ``send``.
        """
        fd = self._fd
        header_size = self.header_size
        write = os.write
        sent = frames_written = bytes_written = 0
        try:
            for frame in frames:
                if len(frame) > header_size:
                    bytes_written += write(fd, frame) - header_size
                    frames_written += 1
                else:
                    # Too short for a frame: send_gather drops or raises.
                    status = self.send_gather((frame,))
                    if status is not SendStatus.SENT:
                        return sent, status
                sent += 1
        except BlockingIOError:
            self.send_busy += 1
            return sent, SendStatus.BUSY
        except OSError as exc:
            return sent, self._drop(_DROP_REASONS.get(exc.errno, "backend-error"), exc)
        finally:
            self.frames_sent += frames_written
            self.bytes_sent += bytes_written
        return sent, SendStatus.SENT

    def receive(self) -> tuple[bytes, bytes] | None:
        """Read the next frame the kernel sent out of the TAP, or return None.

        A frame longer than ``max_frame_size`` is counted as
        "receive-truncated" in ``drops`` and skipped. Raises BackendError for
        read errors other than EAGAIN, such as EBADFD after the interface was
        deleted.
        """
        while True:
            try:
                size = os.readv(self._fd, self._receive_buffers)
            except BlockingIOError:
                return None
            except OSError as exc:
                raise BackendError(
                    f"reading from TAP {self.name} failed: {exc.strerror}"
                    f"{_gone_hint(exc.errno)}",
                    errno=exc.errno,
                ) from exc
            if size > self._receive_limit:
                self.drops["receive-truncated"] += 1
                continue
            header_size = self.header_size
            view = self._receive_view
            self.frames_received += 1
            self.bytes_received += size - header_size
            return bytes(view[:header_size]), bytes(view[header_size:size])

    def fileno(self) -> int:
        """Return the TAP file descriptor, readable when a frame is waiting."""
        return self._fd

    def writable_fileno(self) -> int:
        """Return the TAP file descriptor, which polls writable with free sndbuf."""
        return self._fd

    def close(self) -> None:
        """Close the file descriptor. A TAP this backend created is deleted."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
            logger.debug("closed TAP %s", self.name)

    def __repr__(self) -> str:
        where = "" if self.netns is None else f", netns={self.netns!r}"
        return f"TapBackend(name={self.name!r}{where}, fd={self._fd})"

    def _drop(self, reason: str, exc: OSError | None) -> SendStatus:
        self.drops[reason] += 1
        if reason not in self._logged_reasons:
            # Logged once per reason, the counter keeps the total.
            self._logged_reasons.add(reason)
            logger.warning(
                "TAP %s dropped a frame (%s): %s; further drops are only counted",
                self.name,
                reason,
                "zero-length frame" if exc is None else exc,
            )
        return SendStatus.DROPPED


def _check_interface_name(name: str) -> None:
    encoded = name.encode()
    if not encoded or len(encoded) >= IFNAMSIZ or b"/" in encoded or b"\0" in encoded:
        raise ValueError(
            f"invalid interface name {name!r}: expected 1 to {IFNAMSIZ - 1} bytes"
            f" without '/'"
        )


def _open_tap(
    name: str, netns: str | None, attach: bool, tun_path: str
) -> tuple[int, str]:
    """Open the tun device and attach it to interface ``name``.

    Returns the descriptor and the interface name the kernel chose. The open
    happens inside ``netns`` because the kernel creates the interface in the
    namespace the descriptor was opened in.
    """
    context = enter_namespace(netns) if netns else contextlib.nullcontext()
    with context:
        if attach and not _interface_exists(name):
            where = "" if netns is None else f" in network namespace {netns!r}"
            raise BackendError(
                f"TAP interface {name!r} not found{where}; create it with"
                f" `ip tuntap add {name} mode tap` or pass attach=False",
                errno=errno.ENODEV,
            )
        fd = _open_tun_device(tun_path)
        try:
            chosen = _set_interface(fd, name, attach)
        except BaseException:
            os.close(fd)
            raise
    return fd, chosen


def _interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _open_tun_device(tun_path: str) -> int:
    try:
        return os.open(tun_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, IsADirectoryError) as exc:
        advice = (
            "load the tun kernel module (modprobe tun) or create the device"
            " node (mknod /dev/net/tun c 10 200)"
        )
        raise BackendError(
            f"opening {tun_path} failed: {exc.strerror}; {advice}", errno=exc.errno
        ) from exc
    except PermissionError as exc:
        raise BackendError(
            f"opening {tun_path} failed: {exc.strerror}; run as root or give this"
            f" user read and write access to {tun_path}",
            errno=exc.errno,
        ) from exc
    except OSError as exc:
        raise BackendError(
            f"opening {tun_path} failed: {exc.strerror}; check that the tun kernel"
            f" module is loaded",
            errno=exc.errno,
        ) from exc


def _set_interface(fd: int, name: str, attach: bool) -> str:
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    if not attach:
        flags |= IFF_TUN_EXCL
    request = struct.pack("16sH22x", name.encode(), flags)
    try:
        result = fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError as exc:
        raise BackendError(
            f"TUNSETIFF for TAP {name!r} failed: {exc.strerror};"
            f" {_set_interface_advice(exc.errno, name, attach)}",
            errno=exc.errno,
        ) from exc
    return result[:IFNAMSIZ].rstrip(b"\0").decode()


def _set_interface_advice(code: int | None, name: str, attach: bool) -> str:
    if code == errno.EPERM:
        example = "NAME" if "%" in name else name
        return (
            "creating or attaching a TAP needs CAP_NET_ADMIN; run as root, or"
            f" create a persistent TAP for your user with `ip tuntap add {example}"
            " mode tap user USER` and pass attach=True"
        )
    if code == errno.EBUSY and not attach:
        return "an interface with that name exists; choose another name or pass attach=True"
    if code == errno.EBUSY:
        return "another file descriptor is attached to that TAP; close it first"
    if code == errno.EINVAL:
        return "an interface with that name exists but is not a TAP"
    return "check the interface name and the kernel log"


def _tun_ioctl(fd: int, request: int, argument: int | bytes, description: str) -> None:
    """Run one tun ioctl, raising BackendError that names ``description``."""
    try:
        fcntl.ioctl(fd, request, argument)
    except OSError as exc:
        raise BackendError(
            f"{description} failed: {exc.strerror}", errno=exc.errno
        ) from exc


def _configure_link(
    name: str,
    netns: str | None,
    mac: str | None,
    mtu: int | None,
    interfaces: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    up: bool,
) -> int:
    """Apply MAC, MTU, addresses and state with rtnetlink; return the ifindex."""
    from pyroute2 import IPRoute  # import takes about 0.15 s
    from pyroute2.netlink.exceptions import NetlinkError

    step = "looking up the interface"
    try:
        # flags=0 so that pyroute2 never creates a missing namespace.
        ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
        with ipr:
            index = ipr.link_lookup(ifname=name)[0]
            settings: dict[str, Any] = {}
            if mac is not None:
                settings["address"] = mac
            if mtu is not None:
                settings["mtu"] = mtu
            if settings:
                step = f"setting {settings}"
                ipr.link("set", index=index, **settings)
            for interface in interfaces:
                step = f"adding address {interface}"
                ipr.addr(
                    "add",
                    index=index,
                    address=str(interface.ip),
                    prefixlen=interface.network.prefixlen,
                )
            if up:
                step = "setting the interface up"
                ipr.link("set", index=index, state="up")
    except (NetlinkError, OSError, IndexError) as exc:
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        raise BackendError(
            f"configuring TAP {name!r} failed while {step}: {exc}", errno=code
        ) from exc
    return index


def _gone_hint(code: int | None) -> str:
    if code == errno.EBADFD:
        return " (the interface was deleted); close this backend and open a new one"
    if code == errno.EBADF:
        return " (the backend is closed)"
    return ""
