"""``virtio-net-emu vhost-user``: serve the virtio-net device on a socket.

The command listens on ``--socket``, serves one vhost-user front-end after
another (QEMU's ``vhost-user`` netdev, DPDK's ``net_virtio_user``) and
connects the device to ``--to``:

- ``tap:IFNAME``: a TAP interface, created (in ``--netns`` when given) or
  attached when it exists. ``--host-address`` gives it an address.
- ``loopback``: every frame the driver transmits comes back on its receive
  queue;
- ``null``: frames are counted after the device processed them and
  discarded.

It stops on SIGINT, SIGTERM or after ``--duration`` seconds and prints its
statistics, with ``--json`` as one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import stat
import sys
from types import FrameType
from typing import Any

from backends.base import Backend
from backends.errors import BackendError
from backends.loopback import NullBackend
from backends.netns import enter_namespace

from ..cli import UserError, print_json
from .service import DEFAULT_RING_POLL_NS, EchoBackend, NetService

__all__ = ["command", "open_backend", "check_socket_path"]

_BACKEND_HELP = "use tap:IFNAME, loopback or null"


#: Maximum --ring-poll-us: one second. A longer time only keeps the timer
#: looking at an idle ring long after the driver stopped sending.
MAX_RING_POLL_US = 1_000_000


def command(args: argparse.Namespace) -> int:
    """Run the back-end until it is stopped and return the exit code."""
    if args.duration is not None and args.duration <= 0:
        raise UserError(f"invalid --duration {args.duration}: expected seconds > 0")
    ring_poll_us = getattr(args, "ring_poll_us", None)
    if ring_poll_us is None:
        ring_poll_ns = DEFAULT_RING_POLL_NS
    elif not 0 <= ring_poll_us <= MAX_RING_POLL_US:
        raise UserError(
            f"invalid --ring-poll-us {ring_poll_us}: expected microseconds from 0"
            f" to {MAX_RING_POLL_US}"
        )
    else:
        ring_poll_ns = round(ring_poll_us * 1000)
    check_socket_path(args.socket)
    backend = open_backend(
        args.to, netns=args.netns, host_address=getattr(args, "host_address", None)
    )
    with _SignalStop() as signals:
        try:
            service = _start_service(args.socket, backend, args.tx_mode, ring_poll_ns)
        except BaseException:
            backend.close()
            raise
        with service:
            signals.attach(service)
            try:
                service.run(args.duration)
            finally:
                signals.detach()
    stats = service.stats()
    if args.json:
        print_json(stats)
    else:
        _print_text(stats)
    return 0


def open_backend(
    spec: str, *, netns: str | None = None, host_address: str | None = None
) -> Backend:
    """Open the backend that ``--to`` names.

    Raises ``UserError`` for an invalid specification, an option that does
    not apply to the backend, and a TAP that cannot be opened (no
    permission, namespace not found).
    """
    kind, _, name = spec.partition(":")
    if kind == "tap":
        if not name:
            raise UserError(f"invalid backend {spec!r}: tap needs an interface name")
        return _open_tap(name, netns, host_address)
    if name:
        raise UserError(f"invalid backend {spec!r}: {_BACKEND_HELP}")
    if netns is not None or host_address is not None:
        raise UserError(
            f"--netns and --host-address apply to tap:IFNAME only, not to {spec!r}"
        )
    if kind == "loopback":
        return EchoBackend()
    if kind == "null":
        return NullBackend()
    raise UserError(f"invalid backend {spec!r}: {_BACKEND_HELP}")


def check_socket_path(path: str) -> None:
    """Reject a socket path that another process listens on, or that is no socket.

    A socket file without a listener is stale, and the server replaces it.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise UserError(f"cannot check socket path {path}: {error.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise UserError(
            f"{path} exists and is not a socket; remove it or choose another --socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return
    except OSError as error:
        raise UserError(f"cannot check socket path {path}: {error.strerror}") from None
    finally:
        probe.close()
    raise UserError(
        f"socket {path} is in use: another process accepts connections on it;"
        " stop that process or choose another --socket"
    )


def _open_tap(name: str, netns: str | None, host_address: str | None) -> Backend:
    # TapBackend imports pyroute2 and the tap module only when a TAP is used.
    from backends.tap import TapBackend

    addresses = [host_address] if host_address else []
    try:
        attach = _interface_exists(name, netns)
        return TapBackend(name, netns=netns, attach=attach, addresses=addresses)
    except BackendError as error:
        raise UserError(str(error)) from None
    except ValueError as error:
        raise UserError(f"invalid TAP option: {error}") from None


def _interface_exists(name: str, netns: str | None) -> bool:
    context = enter_namespace(netns) if netns else contextlib.nullcontext()
    with context:
        try:
            socket.if_nametoindex(name)
        except OSError:
            return False
    return True


def _start_service(
    path: str, backend: Backend, tx_mode: str, ring_poll_ns: int
) -> NetService:
    try:
        return NetService(path, backend, tx_mode=tx_mode, ring_poll_ns=ring_poll_ns)
    except PermissionError as error:
        raise UserError(
            f"no permission to create socket {path}: {error.strerror}; choose a"
            " directory you can write to"
        ) from None
    except FileNotFoundError as error:
        raise UserError(
            f"cannot create socket {path}: {error.strerror}; create its directory"
            " first"
        ) from None
    except FileExistsError as error:
        raise UserError(f"{error}; remove it or choose another --socket") from None
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.ENAMETOOLONG, errno.EROFS):
            raise UserError(f"cannot listen on {path}: {error.strerror}") from None
        if error.errno is None:
            # load_full_fence: its message names the missing library.
            raise UserError(str(error)) from None
        raise


class _SignalStop:
    """Stop the service on SIGINT and SIGTERM, from before it listens.

    The handlers are installed before the socket exists, so a signal sent as
    soon as the socket appears stops the service instead of killing the
    process. The signal module writes to a wakeup socket that the event loop
    watches, so the loop returns from its wait at once.
    """

    def __init__(self) -> None:
        self.service: NetService | None = None
        self.signalled = False
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous: dict[int, Any] = {}
        self._old_wakeup = -1

    def __enter__(self) -> _SignalStop:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        self._old_wakeup = signal.set_wakeup_fd(
            self._writer.fileno(), warn_on_full_buffer=False
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._reader.close()
        self._writer.close()

    def attach(self, service: NetService) -> None:
        """Watch the wakeup socket in ``service``'s loop and stop it on a signal."""
        self.service = service
        service.loop.add_reader(self._reader.fileno(), self._drain)
        if self.signalled:
            service.stop()

    def detach(self) -> None:
        if self.service is not None:
            self.service.loop.remove_reader(self._reader.fileno())
            self.service = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True
        if self.service is not None:
            self.service.stop()

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._reader.recv(64)


def _print_text(stats: dict[str, Any]) -> None:
    print(
        f"sent {stats['sent']} frames, received {stats['received']} frames,"
        f" {stats['bytes']} bytes in {stats['seconds']} s"
    )
    print(
        f"kicks {stats['kicks']}, interrupts {stats['interrupts']}"
        f" ({stats['interrupts_suppressed']} suppressed),"
        f" connections {stats['connections']}"
    )
    dropped = stats["dropped"]
    if dropped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in dropped.items())
        print(f"dropped: {reasons}")
    sys.stdout.flush()
