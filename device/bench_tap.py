"""``virtio-net-emu bench tap``: frames per second through a TAP, as ratios.

Both directions run the project's path next to the plainest Python loop on
the same TAP, in the same process, and report the ratio:

- TX: the guest model sends frames through the TX ring, the kick and the
  device's TX batching into the TAP (``Machine.send_many`` and ``run``),
  against ``os.write`` of the same frames, header included, to the same TAP.
- RX: frames the kernel routes out of the TAP are read by the backend,
  placed into the guest's posted receive buffers by the device and taken
  back by the guest's NAPI poll (``TapBackend.receive``,
  ``VirtioNetDevice.receive``, ``run_softirqs``), against ``os.read`` on
  the TAP. A load generator sends UDP datagrams to the guest's address
  through a static neighbour entry, faster than either reader takes them,
  so each reader is measured at its own limit. Its rate is reported too.

Everything lives in a network namespace created for the run (addresses from
192.0.2.0/24), which is deleted at the end together with the TAP and the
generator processes, also on error. Needs root. The generator is a small C
program compiled with gcc when gcc is present, else Python processes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backends import TapBackend, enter_namespace, network_namespace

from .cli import UserError
from .guest import GuestConfig
from .machine import TX_QUEUE, Machine
from .net_device import DEFAULT_MAC
from .responder import internet_checksum

__all__ = ["bench_tap", "udp_frame"]

logger = logging.getLogger(__name__)

HOST_ADDRESS = "192.0.2.1"
GUEST_ADDRESS = "192.0.2.2"
PREFIX = 24
DISCARD_PORT = 9
FRAME_BYTES = 60
"""Frame size of both directions: the shortest Ethernet frame without FCS."""
ROUNDS = 4
"""Each direction alternates project path and reference this often; the best
round of each counts, so a burst of load elsewhere hits both alike."""
TX_BATCH = 256
RX_BATCH = 64
GENERATOR_START_S = 0.3
GENERATOR_MARGIN = 1.1
NUD_PERMANENT = 0x80

# A UDP flood with sendmmsg(2): 64 datagrams per system call, until killed.
GENERATOR_SOURCE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH 64

int main(int argc, char **argv)
{
	struct sockaddr_in peer = {.sin_family = AF_INET};
	static char payload[BATCH][64];
	struct mmsghdr messages[BATCH];
	struct iovec vectors[BATCH];
	int fd, i, size;

	if (argc != 4 || inet_pton(AF_INET, argv[1], &peer.sin_addr) != 1)
		return 2;
	peer.sin_port = htons((unsigned short)atoi(argv[2]));
	size = atoi(argv[3]);
	if (size < 0 || size > 64)
		return 2;
	fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&peer, sizeof(peer)) < 0)
		return 1;
	memset(messages, 0, sizeof(messages));
	for (i = 0; i < BATCH; i++) {
		vectors[i].iov_base = payload[i];
		vectors[i].iov_len = (size_t)size;
		messages[i].msg_hdr.msg_iov = &vectors[i];
		messages[i].msg_hdr.msg_iovlen = 1;
	}
	for (;;)
		sendmmsg(fd, messages, BATCH, 0);
}
"""

PYTHON_GENERATOR = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.connect((sys.argv[1], int(sys.argv[2])))\n"
    "data = bytes(int(sys.argv[3]))\n"
    "send = s.send\n"
    "while True:\n"
    "    try:\n"
    "        send(data)\n"
    "    except OSError:\n"
    "        pass\n"
)


def udp_frame(
    destination_mac: bytes, source_mac: bytes, source: str, destination: str, size: int
) -> bytes:
    """Return an Ethernet frame of ``size`` bytes carrying one UDP datagram."""
    payload = bytes(size - 42)
    source_ip = ipaddress.IPv4Address(source).packed
    destination_ip = ipaddress.IPv4Address(destination).packed
    length = 8 + len(payload)
    pseudo = struct.pack("!4s4sBBH", source_ip, destination_ip, 0, 17, length)
    datagram = bytearray(struct.pack("!HHHH", 40000, DISCARD_PORT, length, 0) + payload)
    struct.pack_into("!H", datagram, 6, internet_checksum(pseudo + datagram) or 0xFFFF)
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + length,
            0,
            0,
            64,
            17,
            0,
            source_ip,
            destination_ip,
        )
    )
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return destination_mac + source_mac + b"\x08\x00" + bytes(header) + bytes(datagram)


# -- set-up ----------------------------------------------------------------------


def _prepare_namespace(netns: str) -> None:
    with enter_namespace(netns):
        for scope in ("all", "default"):
            path = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
            if os.path.exists(path):
                with open(path, "w") as file:
                    file.write("1")


def _add_neighbour(netns: str, tap: TapBackend, address: str, mac: bytes) -> None:
    from pyroute2 import IPRoute

    with IPRoute(netns=netns, flags=0) as ipr:
        ipr.neigh(
            "add",
            dst=address,
            lladdr=mac.hex(":"),
            ifindex=tap.ifindex,
            state=NUD_PERMANENT,
        )


def _tap_mac(netns: str, name: str) -> bytes:
    from pyroute2 import IPRoute

    with IPRoute(netns=netns, flags=0) as ipr:
        link = ipr.get_links(ifname=name)[0]
        return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))


def _discard_socket(netns: str) -> socket.socket:
    """Return a UDP socket on the discard port, never read, with a small buffer.

    TX frames are datagrams to it: the kernel runs its whole receive path
    and drops them at the full socket, without sending port unreachables.
    """
    with enter_namespace(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((HOST_ADDRESS, DISCARD_PORT))
    return sock


def _tap_counters(netns: str, name: str) -> tuple[int, int]:
    """Return the TAP's TX packets and TX drops (frames toward the reader)."""
    with enter_namespace(netns), open("/proc/thread-self/net/dev") as file:
        for line in file:
            label, _, values = line.partition(":")
            if label.strip() == name:
                fields = values.split()
                return int(fields[9]), int(fields[11])
    raise RuntimeError(f"interface {name} not found in /proc/net/dev of {netns}")


# -- measuring ---------------------------------------------------------------------


def _rate(round_fn: Callable[[float], int], seconds: float) -> float:
    started = time.perf_counter()
    count = round_fn(started + seconds)
    return count / (time.perf_counter() - started)


def _best_of(
    project: Callable[[float], int], reference: Callable[[float], int], seconds: float
) -> tuple[float, float]:
    project_best = reference_best = 0.0
    for _ in range(ROUNDS):
        project_best = max(project_best, _rate(project, seconds / ROUNDS))
        reference_best = max(reference_best, _rate(reference, seconds / ROUNDS))
    return project_best, reference_best


def _tx_rounds(
    tap: TapBackend, frame: bytes
) -> tuple[Callable[[float], int], Callable[[float], int]]:
    machine = Machine(backend=tap, keep_log=False, guest=GuestConfig())
    machine.run()
    batch = [frame] * TX_BATCH
    tx_stats = machine.device.stats.queue(TX_QUEUE)
    selector = selectors.DefaultSelector()
    fd = tap.writable_fileno()
    selector.register(fd, selectors.EVENT_WRITE)

    def project(deadline: float) -> int:
        before = tx_stats.frames
        while time.perf_counter() < deadline:
            machine.send_many(batch)
            machine.run()
            tx = machine.device.tx
            while tx is not None and tx.pending is not None:
                selector.select(1.0)
                machine.backend_writable()
                machine.run()
        return tx_stats.frames - before

    data = bytes(tap.header_size) + frame
    write = os.write

    def reference(deadline: float) -> int:
        count = 0
        while time.perf_counter() < deadline:
            for _ in range(TX_BATCH):
                try:
                    write(fd, data)
                except BlockingIOError:
                    selector.select(1.0)
                    continue
                count += 1
        return count

    return project, reference


def _rx_rounds(
    tap: TapBackend,
) -> tuple[Callable[[float], int], Callable[[float], int]]:
    machine = Machine(backend=tap, keep_log=False, guest=GuestConfig())
    machine.run()
    guest = machine.guest
    device_receive = machine.device.receive
    backend_receive = tap.receive
    run_softirqs = guest.run_softirqs
    fd = tap.fileno()
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)

    def project(deadline: float) -> int:
        before = guest.stats.rx_packets
        perf_counter = time.perf_counter
        while perf_counter() < deadline:
            for _ in range(RX_BATCH):
                item = backend_receive()
                if item is None:
                    selector.select(0.01)
                    break
                device_receive(*item)
            run_softirqs()
        return guest.stats.rx_packets - before

    read = os.read
    size = tap.header_size + 65550

    def reference(deadline: float) -> int:
        count = 0
        perf_counter = time.perf_counter
        while perf_counter() < deadline:
            for _ in range(RX_BATCH):
                try:
                    read(fd, size)
                except BlockingIOError:
                    selector.select(0.01)
                    break
                count += 1
        return count

    return project, reference


# -- the load generator ------------------------------------------------------------


@contextlib.contextmanager
def _generator(netns: str, workdir: Path) -> Iterator[dict[str, Any]]:
    """Run the UDP load generator in ``netns``; stop it by PID on exit."""
    arguments = [GUEST_ADDRESS, str(DISCARD_PORT), str(FRAME_BYTES - 42)]
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is not None:
        source = workdir / "udpflood.c"
        binary = workdir / "udpflood"
        source.write_text(GENERATOR_SOURCE)
        subprocess.run(
            [compiler, "-O2", "-o", str(binary), str(source)],
            check=True,
            capture_output=True,
        )
        commands = [[str(binary), *arguments]]
        kind = "c-sendmmsg"
    else:
        senders = max(1, (os.cpu_count() or 2) - 1)
        commands = [[sys.executable, "-c", PYTHON_GENERATOR, *arguments]] * senders
        kind = f"python-{senders}-processes"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with enter_namespace(netns):
            # The children are forked by this thread, so they start inside
            # the namespace.
            for command in commands:
                processes.append(
                    subprocess.Popen(
                        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                )
        time.sleep(GENERATOR_START_S)
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"load generator {kind} exited with code {process.returncode}"
                )
        yield {"generator": kind, "processes": len(processes)}
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the benchmark -----------------------------------------------------------------


def _ratio(project: float, reference: float) -> float:
    return round(project / reference, 3) if reference else 0.0


def bench_tap(seconds: float = 2.0) -> dict[str, Any]:
    """Measure TX and RX frames per second through a TAP, against raw I/O.

    ``seconds`` is the time of each direction's project path and of its
    reference. Raises UserError without root or /dev/net/tun.
    """
    if os.geteuid() != 0:
        raise UserError(
            "bench tap needs root: it creates a network namespace and a TAP"
        )
    if not os.path.exists("/dev/net/tun"):
        raise UserError("/dev/net/tun is missing; load the tun module (modprobe tun)")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        netns = stack.enter_context(network_namespace())
        _prepare_namespace(netns)
        tap = stack.enter_context(
            TapBackend(
                "vnebench%d", netns=netns, addresses=[f"{HOST_ADDRESS}/{PREFIX}"]
            )
        )
        stack.enter_context(_discard_socket(netns))
        tap_mac = _tap_mac(netns, tap.name)
        frame = udp_frame(
            tap_mac, DEFAULT_MAC, GUEST_ADDRESS, HOST_ADDRESS, FRAME_BYTES
        )
        tx_project, tx_reference = _best_of(*_tx_rounds(tap, frame), seconds)
        _add_neighbour(netns, tap, GUEST_ADDRESS, DEFAULT_MAC)
        with _generator(netns, workdir) as generator:
            queued, dropped = _tap_counters(netns, tap.name)
            started = time.perf_counter()
            rx_project, rx_reference = _best_of(*_rx_rounds(tap), seconds)
            elapsed = time.perf_counter() - started
            queued_after, dropped_after = _tap_counters(netns, tap.name)
        offered = (queued_after - queued) + (dropped_after - dropped)
    return {
        "frame_bytes": FRAME_BYTES,
        "seconds": seconds,
        "tx": {
            "frames_per_second": round(tx_project),
            "raw_write_frames_per_second": round(tx_reference),
            "ratio": _ratio(tx_project, tx_reference),
        },
        "rx": {
            "frames_per_second": round(rx_project),
            "raw_read_frames_per_second": round(rx_reference),
            "ratio": _ratio(rx_project, rx_reference),
        },
        "generator": {
            **generator,
            "frames_per_second": round(offered / elapsed),
            # Below 10 % more than the raw reader takes, the raw reader may
            # have waited for frames, so its rate and the RX ratio understate
            # what os.read could do.
            "outruns_raw_reader": offered / elapsed > GENERATOR_MARGIN * rx_reference,
        },
    }
