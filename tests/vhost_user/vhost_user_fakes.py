"""A fake device and a fake front-end for the vhost-user server tests.

``FakeDevice`` records every adapter call. ``FakeFrontend`` speaks the
protocol over a real Unix socket with memfd-backed guest memory and eventfds,
like QEMU does. ``Harness`` runs the server's ``poll`` on the test's own
thread while the front-end waits for a reply, so tests stay single-threaded.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from device.vhost_user import VhostUserServer
from device.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    VERSION,
    Message,
    MessageReader,
    ProtocolFeature,
    Request,
    VhostMemoryRegion,
    VringAddress,
    decode_u64,
    decode_vring_state,
    encode_memory_table,
    encode_message,
    encode_u64,
    encode_vring_address,
    encode_vring_state,
)
from virtio.errors import UsageError
from virtio.memory import GuestMemory

VERSION_1 = 1 << 32
F_PROTOCOL_FEATURES = 1 << 30
#: Features the fake device offers: VERSION_1, MRG_RXBUF, MAC, STATUS.
DEVICE_FEATURES = VERSION_1 | (1 << 15) | (1 << 5) | (1 << 16)

GUEST_GPA = 0x0
GUEST_SIZE = 0x20_0000
GUEST_USER_ADDR = 0x7F00_0000_0000
QUEUE_SIZE = 256

TIMEOUT = 5.0


@dataclass
class QueueStart:
    """The arguments of one ``start_queue`` call."""

    index: int
    memory: GuestMemory
    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int
    last_avail_idx: int
    kick_fd: int | None
    call_fd: int | None


@dataclass
class FakeDevice:
    """A ``VhostUserDevice`` that records calls instead of moving packets."""

    offered: int = DEVICE_FEATURES
    queues: int = 2
    acked: int | None = None
    starts: list[QueueStart] = field(default_factory=list)
    stops: list[int] = field(default_factory=list)
    kicks: list[int] = field(default_factory=list)
    call_fds: list[tuple[int, int | None]] = field(default_factory=list)
    resets: int = 0
    running: dict[int, QueueStart] = field(default_factory=dict)
    next_avail: dict[int, int] = field(default_factory=dict)
    fail_start: bool = False
    fail_kick: bool = False

    def features(self) -> int:
        return self.offered

    def set_features(self, features: int) -> None:
        self.acked = features

    def num_queues(self) -> int:
        return self.queues

    def queue_num(self) -> int:
        return self.queues // 2

    def start_queue(
        self,
        index: int,
        memory: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        last_avail_idx: int,
        kick_fd: int | None,
        call_fd: int | None,
    ) -> None:
        if self.fail_start:
            raise UsageError(f"queue {index}: start rejected by the test")
        start = QueueStart(
            index,
            memory,
            size,
            desc_gpa,
            avail_gpa,
            used_gpa,
            last_avail_idx,
            kick_fd,
            call_fd,
        )
        self.starts.append(start)
        self.running[index] = start
        self.next_avail.setdefault(index, last_avail_idx)

    def stop_queue(self, index: int) -> int:
        self.stops.append(index)
        del self.running[index]
        return self.next_avail.pop(index)

    def set_call_fd(self, index: int, call_fd: int | None) -> None:
        self.call_fds.append((index, call_fd))
        self.running[index].call_fd = call_fd

    def on_kick(self, index: int) -> None:
        if self.fail_kick:
            raise UsageError(f"queue {index}: kick rejected by the test")
        self.kicks.append(index)
        start = self.running[index]
        # Read the avail index through the mapping, as a device would.
        avail_idx = start.memory.u16_array(start.avail_gpa, 2)[1]
        self.next_avail[index] = avail_idx
        if start.call_fd is not None:
            os.eventfd_write(start.call_fd, 1)

    def reset(self) -> None:
        self.resets += 1
        self.acked = None


class FakeFrontend:
    """A vhost-user front-end with memfd guest memory and eventfd notifiers."""

    def __init__(self, sock: socket.socket, harness: Harness | None = None) -> None:
        self.sock = sock
        self.harness = harness
        self.memfd = os.memfd_create("vhost-user-test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, GUEST_SIZE)
        self.memory = mmap.mmap(self.memfd, GUEST_SIZE)
        self.kick = {index: os.eventfd(0, os.EFD_CLOEXEC) for index in range(2)}
        self.call = {
            index: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for index in range(2)
        }
        self.reader = MessageReader(replies=True)

    @property
    def region(self) -> VhostMemoryRegion:
        """The one memory region of the fake guest."""
        return VhostMemoryRegion(GUEST_GPA, GUEST_SIZE, GUEST_USER_ADDR, 0)

    def send(
        self,
        request: Request | int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        flags: int = VERSION,
    ) -> None:
        """Send one message with ``fds`` as SCM_RIGHTS."""
        data = encode_message(request, payload, flags)  # type: ignore[arg-type]
        ancillary = []
        if fds:
            ancillary = [
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
            ]
        self.sock.sendmsg([data], ancillary)
        self.pump()

    def pump(self) -> None:
        """Let the server handle everything it has received."""
        if self.harness is not None:
            self.harness.pump()

    def receive(self) -> Message | None:
        """Return the next reply, or None when the server closed the connection."""
        deadline = time.monotonic() + TIMEOUT
        self.sock.settimeout(0.01)
        while True:
            try:
                data = self.sock.recv(self.reader.bytes_needed())
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                self.pump()
                continue
            except ConnectionResetError:
                return None
            if not data:
                return None
            message = self.reader.feed(data)
            if message is not None:
                return message

    def call_request(
        self, request: Request, payload: bytes = b"", fds: list[int] | None = None
    ) -> Message:
        """Send a request and return its reply."""
        self.send(request, payload, fds)
        reply = self.receive()
        assert reply is not None, f"connection closed instead of a {request.name} reply"
        assert reply.request == request
        return reply

    def ack_request(
        self, request: Request, payload: bytes = b"", fds: list[int] | None = None
    ) -> int:
        """Send a request with NEED_REPLY and return the u64 acknowledgement."""
        self.send(request, payload, fds, VERSION | FLAG_NEED_REPLY)
        reply = self.receive()
        assert reply is not None, f"connection closed instead of a {request.name} ack"
        return decode_u64(reply)

    def is_closed(self) -> bool:
        """Tell whether the server closed the connection (after any replies)."""
        return self.receive() is None

    # -- QEMU's start-up sequence, in steps ---------------------------------------

    def negotiate(self, protocol_features: bool = True) -> int:
        """Negotiate features like QEMU 7.2; return the acknowledged features."""
        features = decode_u64(self.call_request(Request.GET_FEATURES))
        acked = features & (DEVICE_FEATURES | F_PROTOCOL_FEATURES)
        if protocol_features:
            offered = decode_u64(self.call_request(Request.GET_PROTOCOL_FEATURES))
            requested = ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask
            self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(offered & requested))
            self.call_request(Request.GET_QUEUE_NUM)
        else:
            acked &= ~F_PROTOCOL_FEATURES
        self.send(Request.SET_OWNER)
        self.send(Request.SET_FEATURES, encode_u64(acked))
        return acked

    def set_mem_table(self) -> int:
        """Send the memory table with NEED_REPLY; return the acknowledgement."""
        payload = encode_memory_table([self.region])
        return self.ack_request(Request.SET_MEM_TABLE, payload, [self.memfd])

    def ring_address(self, index: int, offset: int = 0) -> VringAddress:
        """Return user addresses of ring ``index`` inside the guest region."""
        base = GUEST_USER_ADDR + 0x1_0000 * (index + 1) + offset
        return VringAddress(index, 0, base, base + 0x2000, base + 0x1000, 0)

    def setup_ring(self, index: int, base: int = 0) -> None:
        """Send NUM, BASE, ADDR, KICK and CALL for one ring, as QEMU does."""
        self.send(Request.SET_VRING_NUM, encode_vring_state(index, QUEUE_SIZE))
        self.send(Request.SET_VRING_BASE, encode_vring_state(index, base))
        self.send(
            Request.SET_VRING_ADDR, encode_vring_address(self.ring_address(index))
        )
        self.send(Request.SET_VRING_KICK, encode_u64(index), [self.kick[index]])
        self.send(Request.SET_VRING_CALL, encode_u64(index), [self.call[index]])

    def get_vring_base(self, index: int) -> int:
        """Send GET_VRING_BASE, which stops ring ``index``, and return the index."""
        reply = self.call_request(Request.GET_VRING_BASE, encode_vring_state(index, 0))
        return decode_vring_state(reply).num

    def restart_ring(self, index: int, base: int) -> None:
        """Start stopped ring ``index`` again from avail index ``base``."""
        self.send(Request.SET_VRING_BASE, encode_vring_state(index, base))
        self.send(Request.SET_VRING_KICK, encode_u64(index), [self.kick[index]])

    def enable_ring(self, index: int, enable: bool = True) -> None:
        """Send SET_VRING_ENABLE."""
        self.send(Request.SET_VRING_ENABLE, encode_vring_state(index, int(enable)))

    def start(self) -> None:
        """Run the whole QEMU-like start-up for both rings."""
        self.negotiate()
        assert self.set_mem_table() == 0
        for index in (0, 1):
            self.setup_ring(index)
        for index in (0, 1):
            self.enable_ring(index)

    def close(self) -> None:
        """Close the socket, the memory and the eventfds."""
        self.sock.close()
        self.memory.close()
        os.close(self.memfd)
        for fd in [*self.kick.values(), *self.call.values()]:
            os.close(fd)


class Harness:
    """A server on a socket path in a temporary directory, plus its front-ends."""

    def __init__(self, path: Path, device: FakeDevice, **options: object) -> None:
        self.path = path
        self.device = device
        self.server = VhostUserServer(path, device, **options)  # type: ignore[arg-type]
        self.frontends: list[FakeFrontend] = []

    def pump(self) -> None:
        """Handle every ready event of the server without waiting."""
        while self.server.poll(0):
            pass

    def connect(self) -> FakeFrontend:
        """Connect a new front-end and let the server accept it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(os.fspath(self.path))
        frontend = FakeFrontend(sock, self)
        self.frontends.append(frontend)
        self.pump()
        return frontend

    def close(self) -> None:
        """Close every front-end and the server."""
        for frontend in self.frontends:
            frontend.close()
        self.server.close()


def open_fds() -> set[int]:
    """Return the descriptors this process has open.

    The directory descriptor that ``listdir`` used is closed by the time its
    link is read, so it drops out.
    """
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue
        fds.add(int(name))
    return fds
