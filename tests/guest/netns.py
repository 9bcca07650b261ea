"""The host side of a guest test: a network namespace, its TAP and a UDP receiver.

``tap_namespace`` creates a namespace with one TAP (host address 192.0.2.1/24
from the TEST-NET-1 documentation range, RFC 5737) and removes both on exit,
also on error. QEMU is started inside the namespace, so the guest can reach
nothing but the TAP. The host kernel replies to the guest's ICMP echo requests.
``UdpReceiver`` counts the datagrams that arrive at an address in the
namespace. All of it needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Self

__all__ = [
    "GUEST_ADDRESS",
    "HOST_ADDRESS",
    "PREFIX_LENGTH",
    "HostLink",
    "UdpReceiver",
    "socket_in_namespace",
    "tap_counters",
    "tap_namespace",
    "udp_counters",
]

logger = logging.getLogger(__name__)

HOST_ADDRESS = "192.0.2.1"
GUEST_ADDRESS = "192.0.2.2"
PREFIX_LENGTH = 24
_CLONE_NEWNET = 0x40000000
# Linux asm-generic/socket.h; Python's socket module does not export it.
_SO_RCVBUFFORCE = 33


@dataclasses.dataclass(frozen=True)
class HostLink:
    """A namespace with one TAP that has ``address`` and is up."""

    namespace: str
    tap: str
    address: str = HOST_ADDRESS


def _ip(*arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with exit code {result.returncode}: "
            f"{result.stderr.strip()}"
        )
    return result


@contextlib.contextmanager
def tap_namespace(prefix: str = "vne", tap: str = "vnetap0") -> Iterator[HostLink]:
    """Create a namespace with a TAP at 192.0.2.1/24 and remove both on exit.

    The namespace name is ``PREFIX-PID-RANDOM``, so parallel runs do not
    collide and nothing that someone else created is touched. The TAP is a
    persistent one that QEMU attaches to by name.
    """
    namespace = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    _ip("netns", "add", namespace)
    try:
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
        # No IPv6 link-local address, so the host sends no neighbour or router
        # solicitations that would count as guest RX interrupts.
        _ip("-n", namespace, "link", "set", tap, "addrgenmode", "none")
        _ip(
            "-n",
            namespace,
            "addr",
            "add",
            f"{HOST_ADDRESS}/{PREFIX_LENGTH}",
            "dev",
            tap,
        )
        _ip("-n", namespace, "link", "set", tap, "up")
        logger.info("created namespace %s with TAP %s", namespace, tap)
        yield HostLink(namespace=namespace, tap=tap)
    finally:
        _ip("-n", namespace, "link", "del", tap, check=False)
        result = _ip("netns", "del", namespace, check=False)
        if result.returncode != 0:
            logger.error("ip netns del %s failed: %s", namespace, result.stderr.strip())
        else:
            logger.info("removed namespace %s", namespace)


def socket_in_namespace(namespace: str, family: int, kind: int) -> socket.socket:
    """Create a socket that lives in ``namespace``.

    A short-lived thread enters the namespace with setns(2), which moves only
    that thread, and creates the socket there. A socket keeps the namespace
    it was created in, so the caller's threads can use it from anywhere.
    """
    outcome: dict[str, object] = {}

    def create() -> None:
        try:
            with open(f"/run/netns/{namespace}", "rb") as handle:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns to {namespace}: {os.strerror(code)}")
            outcome["socket"] = socket.socket(family, kind)
        except OSError as error:
            outcome["error"] = error

    thread = threading.Thread(target=create, name=f"setns-{namespace}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["socket"]  # type: ignore[return-value]


class UdpReceiver:
    """Counts UDP datagrams arriving at ``address:port`` in a namespace.

    The receive buffer is raised to ``buffer_bytes`` (SO_RCVBUFFORCE, root
    only), so datagrams wait in the socket instead of being dropped. With
    ``defer_reading`` true (the default) the thread reads nothing until
    ``stop``, because reading 40,000 datagrams per second in Python takes CPU
    time from QEMU on a small machine and skews the guest's figures. Then a
    burst must fit into the buffer. The kernel counts datagrams that did not
    fit as RcvbufErrors (see ``udp_counters``). With ``defer_reading`` false
    the thread reads while the guest sends. The first 4 payload bytes are read
    as a big-endian sequence number (udpgen writes one), which gives a count
    of distinct datagrams.
    """

    def __init__(
        self,
        namespace: str,
        address: str = HOST_ADDRESS,
        port: int = 9000,
        buffer_bytes: int = 64 << 20,
        defer_reading: bool = True,
    ) -> None:
        self.datagrams = 0
        self.payload_bytes = 0
        self._sequences: set[int] = set()
        self._stop = threading.Event()
        self._defer_reading = defer_reading
        self._socket = socket_in_namespace(namespace, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, buffer_bytes)
            self._socket.bind((address, port))
            self._socket.settimeout(0.2)
        except OSError:
            self._socket.close()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"udp-{port}", daemon=True
        )

    @property
    def distinct_datagrams(self) -> int:
        """Datagrams with distinct sequence numbers (payloads of 4 bytes or more)."""
        return len(self._sequences)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Read what is still queued, close the socket and return the count."""
        self._stop.set()
        self._thread.join()
        self._socket.close()
        return self.datagrams

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if not self._stop.is_set():
            self.stop()

    def _run(self) -> None:
        if self._defer_reading:
            self._stop.wait()
        buffer = bytearray(65536)
        while True:
            try:
                length = self._socket.recv_into(buffer)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            except OSError as error:
                if error.errno != errno.EBADF:
                    logger.error("UDP receiver stopped on error: %s", error)
                return
            self.datagrams += 1
            self.payload_bytes += length
            if length >= 4:
                self._sequences.add(int.from_bytes(buffer[:4], "big"))


def tap_counters(link: HostLink) -> dict[str, int]:
    """Return the TAP's packet counters (``ip -s -j link``), host point of view.

    ``rx_packets`` counts frames the guest sent that QEMU wrote into the TAP.
    """
    result = _ip("-n", link.namespace, "-s", "-j", "link", "show", "dev", link.tap)
    stats = json.loads(result.stdout)[0]["stats64"]
    return {
        "rx_packets": stats["rx"]["packets"],
        "rx_dropped": stats["rx"]["dropped"],
        "tx_packets": stats["tx"]["packets"],
        "tx_dropped": stats["tx"]["dropped"],
    }


def udp_counters(namespace: str) -> dict[str, int]:
    """Return the namespace's UDP counters from /proc/net/snmp (InDatagrams, ...)."""
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, "cat", "/proc/net/snmp"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [
        line.split()[1:]
        for line in result.stdout.splitlines()
        if line.startswith("Udp:")
    ]
    return {name: int(value) for name, value in zip(rows[0], rows[1])}
