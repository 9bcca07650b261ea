"""``virtio-net-emu attach``: a live fake NIC that replies on its address.

The guest driver model, the rings and the device run in real time on a TAP
(``LiveMachine``). Behind the guest's receive path sits a ``Responder``, so
the NIC replies to ARP and ICMP echo for ``--address`` and echoes UDP
datagrams sent to port 7. Ordinary tools on the host side of the TAP (ping, a UDP
client) can then talk to it. The TAP is created in ``--netns`` unless it
exists, and the host side gets ``--host-address``. On SIGINT, SIGTERM or
after ``--duration`` the command stops and removes what it created: the
TAP it created, or the host address it added to an existing TAP. Then it
prints its statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

from backends import Backend, LoopbackBackend, TapBackend, namespace_exists

from .cli import UserError, print_json
from .guest import GuestConfig
from .live import LiveMachine
from .machine import Machine
from .replay import check_queue_size, open_tap
from .responder import Responder

__all__ = ["command", "FakeNicService", "parse_address"]

logger = logging.getLogger(__name__)


def parse_address(text: str, option: str) -> ipaddress.IPv4Interface:
    """Parse ``ADDR/PREFIX`` as an IPv4 host address; raise UserError if invalid."""
    if "/" not in text:
        raise UserError(
            f"invalid {option} {text!r}: give ADDR/PREFIX, e.g. 192.0.2.2/24"
        )
    try:
        interface = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise UserError(f"invalid {option} {text!r}: {exc}") from exc
    if not isinstance(interface, ipaddress.IPv4Interface):
        raise UserError(f"invalid {option} {text!r}: only IPv4 addresses are supported")
    network = interface.network
    if network.prefixlen < 31 and interface.ip in (
        network.network_address,
        network.broadcast_address,
    ):
        raise UserError(
            f"invalid {option} {text!r}: that is the network or broadcast address"
            f" of {network}; use a host address"
        )
    return interface


def _check_addresses(
    address: ipaddress.IPv4Interface, host: ipaddress.IPv4Interface | None
) -> None:
    if host is None:
        return
    if host.ip == address.ip:
        raise UserError(
            f"--address and --host-address are both {address.ip}; give the host"
            f" side another address of {address.network}"
        )
    if address.ip not in host.network:
        raise UserError(
            f"--address {address} is not in the host's network {host.network};"
            f" use addresses of one network"
        )


def _addresses_in_use(netns: str | None) -> dict[str, str]:
    """Return every IPv4 address of the namespace, mapped to its interface name."""
    from pyroute2 import IPRoute

    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    with ipr:
        names = {
            link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
        }
        return {
            entry.get_attr("IFA_ADDRESS"): names.get(entry["index"], "?")
            for entry in ipr.get_addr(family=2)
        }


def _remove_address(
    netns: str | None, ifname: str, interface: ipaddress.IPv4Interface
) -> None:
    from pyroute2 import IPRoute

    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    with ipr:
        index = ipr.link_lookup(ifname=ifname)
        if index:
            ipr.addr(
                "del",
                index=index[0],
                address=str(interface.ip),
                prefixlen=interface.network.prefixlen,
            )


class FakeNicService:
    """A guest with a responder, live on one backend, with what it set up.

    ``close`` undoes what the constructor set up. Raises UserError for an
    invalid backend or address and for every failure to open the TAP that
    a user can fix.
    """

    def __init__(
        self,
        backend_spec: str,
        address: ipaddress.IPv4Interface,
        *,
        host_address: ipaddress.IPv4Interface | None = None,
        netns: str | None = None,
        tx_mode: str = "bh",
        queue_size: int = 256,
        event_idx: bool = True,
    ) -> None:
        check_queue_size(queue_size)
        _check_addresses(address, host_address)
        self.address = address
        self.netns = netns
        self.host_address = host_address
        self._added_address: tuple[str, ipaddress.IPv4Interface] | None = None
        self.backend = self._open(backend_spec)
        try:
            config = GuestConfig(queue_size=queue_size, event_idx=event_idx)
            self.machine = Machine(
                guest=config, tx_mode=tx_mode, backend=self.backend, keep_log=False
            )
        except BaseException:
            self.close()
            raise
        # Keep received frames only, for the responder; LiveMachine empties it.
        self.machine.guest.received = []
        self.responder = Responder(self.machine.device.mac, address.ip)
        self.live = LiveMachine(self.machine, on_frames=self._answer)
        self.started = time.monotonic()

    def _open(self, spec: str) -> Backend:
        kind, _, name = spec.partition(":")
        if kind == "loopback" and not name:
            if self.netns is not None or self.host_address is not None:
                raise UserError("--netns and --host-address need a tap:IFNAME backend")
            return LoopbackBackend(discard=True)
        if kind != "tap" or not name:
            raise UserError(f"invalid backend {spec!r}: use tap:IFNAME or loopback")
        if self.netns is not None and not _namespace_found(self.netns):
            raise UserError(
                f"network namespace {self.netns!r} not found; create it with"
                f" `ip netns add {self.netns}`"
            )
        in_use = self._used_addresses()
        owner = in_use.get(str(self.address.ip))
        if owner is not None:
            raise UserError(
                f"address {self.address.ip} is already in use on {owner}{self._where()};"
                f" choose a free address for --address"
            )
        backend = open_tap(name, self.netns)
        try:
            self._add_host_address(backend, in_use)
        except BaseException:
            backend.close()
            raise
        return backend

    def _where(self) -> str:
        return "" if self.netns is None else f" in network namespace {self.netns!r}"

    def _used_addresses(self) -> dict[str, str]:
        try:
            return _addresses_in_use(self.netns)
        except OSError as exc:
            raise UserError(
                f"listing the addresses{self._where()} failed: {exc}; run as root"
            ) from exc

    def _add_host_address(self, tap: TapBackend, in_use: dict[str, str]) -> None:
        host = self.host_address
        if host is None:
            return
        owner = in_use.get(str(host.ip))
        if owner == tap.name:
            return
        if owner is not None:
            raise UserError(
                f"--host-address {host.ip} is already in use on {owner}{self._where()};"
                f" choose a free address"
            )
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
            with ipr:
                ipr.addr(
                    "add",
                    index=tap.ifindex,
                    address=str(host.ip),
                    prefixlen=host.network.prefixlen,
                )
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise UserError(
                    f"--host-address {host} is already in use on {tap.name}"
                ) from exc
            raise UserError(
                f"adding --host-address {host} to {tap.name} failed: {exc}"
            ) from exc
        if not tap.created:
            self._added_address = (tap.name, host)

    def _answer(self, frames: list[bytes]) -> None:
        respond = self.responder.respond
        send = self.machine.send
        for frame in frames:
            reply = respond(frame)
            if reply is not None:
                send(reply)

    def run(self, duration_s: float | None = None) -> None:
        """Run until ``stop`` or ``duration_s`` seconds passed."""
        self.live.run(duration_s)

    def stop(self) -> None:
        self.live.stop()

    def statistics(self) -> dict[str, Any]:
        """Return what the NIC did: frames, replies, kicks, interrupts, drops."""
        stats = self.machine.stats()
        backend = self.backend
        drops = dict(stats.drops)
        for reason, count in backend.drops.items():
            drops[f"backend:{reason}"] = count
        return {
            "address": str(self.address),
            "backend": getattr(backend, "name", "loopback"),
            "netns": self.netns,
            "seconds": round(time.monotonic() - self.started, 3),
            "rx_frames": stats.rx_frames,
            "rx_bytes": stats.rx_bytes,
            "tx_frames": stats.frames,
            "tx_bytes": stats.bytes,
            "answered": dict(self.responder.answered),
            "ignored": dict(self.responder.ignored),
            "kicks": stats.kicks,
            "kicks_suppressed": stats.kicks_suppressed,
            "vm_exits": stats.vm_exits,
            "interrupts": stats.interrupts,
            "rx_interrupts": stats.rx_interrupts,
            "timer_fires": stats.timer_fires,
            "bh_runs": stats.bh_runs,
            "backend_busy": backend.send_busy,
            "dropped": drops,
        }

    def close(self) -> None:
        """Remove what was set up: the loop, the TAP or the added host address."""
        live = getattr(self, "live", None)
        if live is not None:
            live.close()
        if self._added_address is not None:
            ifname, interface = self._added_address
            self._added_address = None
            try:
                _remove_address(self.netns, ifname, interface)
            except OSError as exc:
                logger.error("removing %s from %s failed: %s", interface, ifname, exc)
        self.backend.close()


def _namespace_found(name: str) -> bool:
    try:
        return namespace_exists(name)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


@contextlib.contextmanager
def _stop_on_signals(service: FakeNicService) -> Iterator[None]:
    """Stop ``service`` on SIGINT or SIGTERM; a wake-up fd ends the wait at once."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    loop = service.live.loop

    def handle(signum: int, frame: object) -> None:
        logger.info("stopping on signal %d", signum)
        service.stop()

    def drain() -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(read_fd, 512)

    previous = {
        sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    loop.add_reader(read_fd, drain)
    try:
        yield
    finally:
        loop.remove_reader(read_fd)
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(read_fd)
        os.close(write_fd)


def _print_text(stats: dict[str, Any]) -> None:
    print(f"fake NIC {stats['address']} on {stats['backend']} for {stats['seconds']} s")
    print(f"  received: {stats['rx_frames']} frames ({stats['rx_bytes']} bytes)")
    print(f"  sent: {stats['tx_frames']} frames ({stats['tx_bytes']} bytes)")
    answered = ", ".join(f"{k} {v}" for k, v in sorted(stats["answered"].items()))
    ignored = ", ".join(f"{k} {v}" for k, v in sorted(stats["ignored"].items()))
    print(f"  answered: {answered or 'none'}")
    print(f"  ignored: {ignored or 'none'}")
    print(f"  kicks: {stats['kicks']} ({stats['kicks_suppressed']} suppressed)")
    print(f"  VM exits: {stats['vm_exits']}")
    print(f"  interrupts: {stats['interrupts']} TX, {stats['rx_interrupts']} RX")
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(stats["dropped"].items()))
    print(f"  dropped: {dropped or 'none'}")


def command(args: argparse.Namespace) -> int:
    """``attach BACKEND --address ADDR/PREFIX``: run until a signal or the duration."""
    if args.duration is not None and not args.duration > 0:
        raise UserError(f"invalid --duration {args.duration}: use seconds above 0")
    address = parse_address(args.address, "--address")
    host = None
    if args.host_address is not None:
        host = parse_address(args.host_address, "--host-address")
    service = FakeNicService(
        args.backend,
        address,
        host_address=host,
        netns=args.netns,
        tx_mode=args.tx_mode,
        queue_size=args.queue_size,
        event_idx=not args.no_event_idx,
    )
    try:
        logger.info("fake NIC %s running on %s", address, args.backend)
        with _stop_on_signals(service):
            service.run(args.duration)
        stats = service.statistics()
    finally:
        service.close()
    if args.json:
        print_json(stats)
    else:
        _print_text(stats)
    return 0
