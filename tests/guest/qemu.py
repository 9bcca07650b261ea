"""Boot the test guest under QEMU (TCG) and parse what its /init reports.

``boot_guest`` starts ``qemu-system-x86_64`` with the image of
``build_image``, one virtio-net-pci device and a job for the guest's /init
(see init.sh for the job syntax and the console lines). The device is either
QEMU's own virtio-net on a TAP (``TapNetwork``) or a vhost-user backend on a
Unix socket (``VhostUserNetwork``). QEMU runs until the guest powers off or
the timeout ends it.

Fixed QEMU settings and their reasons:

- ``-accel tcg``: KVM guests were reported to hang at boot on the machines
  this was developed on, so KVM is not tried.
- ``vectors=0``: QEMU 7.2 with TCG was reported to crash when a vhost-user
  device's MSI-X vectors are unmasked. Without vectors the guest driver uses
  INTx. Both device kinds run that way, so that their figures compare.
- A shared memfd memory backend, because a vhost-user backend maps guest
  memory from the file descriptors QEMU sends it.
- ``romfile=`` (no option ROM): the guest boots with ``-kernel``, so iPXE
  is not needed. Skipping it saved 0.2 to 0.8 s per boot in four test boots.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .build_image import GuestImage
from .kick_trace import TRACE_EVENTS, KickTrace, parse_kick_trace
from .netns import GUEST_ADDRESS, HOST_ADDRESS, PREFIX_LENGTH

__all__ = [
    "QEMU_BINARY",
    "GuestRun",
    "TapNetwork",
    "VhostUserNetwork",
    "boot_guest",
    "kernel_append",
    "parse_console",
    "qemu_command",
]

logger = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
MEMORY_MB = 512

_RESULT_LINE = re.compile(r"(VNE-[A-Z]+(?:-[A-Z]+)*)(?: (.*))?$")


@dataclasses.dataclass(frozen=True)
class TapNetwork:
    """QEMU's built-in virtio-net on a TAP that exists in ``namespace``.

    ``tx`` is QEMU's TX mode: "bh" flushes the TX queue from a bottom half
    right after a kick, "timer" waits ``x-txtimer`` (150 us by default in
    QEMU 7.2) after a kick to batch more packets.
    """

    namespace: str
    tap: str
    tx: str = "bh"
    event_idx: bool = True

    def __post_init__(self) -> None:
        if self.tx not in ("bh", "timer"):
            raise ValueError(f"tx={self.tx!r} is invalid; expected 'bh' or 'timer'")


@dataclasses.dataclass(frozen=True)
class VhostUserNetwork:
    """A vhost-user backend listening on ``socket_path``; QEMU connects as client.

    ``namespace`` is where QEMU runs, or None for the caller's namespace. The
    guest's packets go wherever the backend sends them. This command line was
    checked with dpdk-testpmd's vhost PMD in icmpecho mode as the backend
    (DPDK 22.11 from Debian 12): ping and udpgen worked with vectors=0.
    """

    socket_path: Path
    event_idx: bool = True
    namespace: str | None = None


@dataclasses.dataclass
class GuestRun:
    """What one guest boot printed and measured."""

    command: list[str]
    #: QEMU's exit status; None when the timeout killed it.
    exit_code: int | None
    timed_out: bool
    #: Seconds from starting QEMU until it exited.
    wall_s: float
    #: Seconds from starting QEMU until the guest printed VNE-LINK (eth0 up).
    boot_s: float | None
    console: str
    stderr: str
    #: ``VNE-RESULT kind=ping`` lines, as key=value dicts.
    pings: list[dict[str, str | int | float]]
    #: ``VNE-UDPGEN`` lines of udpgen, as key=value dicts.
    udp: list[dict[str, str | int | float]]
    #: Guest eth0 counters at the end (``VNE-STATS``).
    stats: dict[str, str | int | float]
    #: ``VNE-VIRTIO-ERROR`` lines: driver errors found in the guest's dmesg.
    virtio_errors: list[str]
    #: ``VNE-ERROR`` lines: steps of /init that failed.
    errors: list[str]
    #: The status of ``VNE-DONE``, or None when the guest never got there.
    done_status: str | None
    #: Kick and interrupt counts, when ``boot_guest`` was asked to trace.
    trace: KickTrace | None = None

    @property
    def ok(self) -> bool:
        """QEMU exited 0 after the guest finished with no error of any kind."""
        return (
            self.exit_code == 0
            and self.done_status == "ok"
            and not self.errors
            and not self.virtio_errors
        )


def qemu_command(
    image: GuestImage,
    network: TapNetwork | VhostUserNetwork,
    append: str,
    trace_file: Path | None = None,
    qemu_binary: str = QEMU_BINARY,
) -> list[str]:
    """Return the QEMU command line (inside ``ip netns exec`` when needed)."""
    command = [
        qemu_binary,
        "-accel", "tcg",
        "-m", str(MEMORY_MB),
        "-nographic",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", append,
        "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MB}M,share=on",
        "-machine", "memory-backend=mem",
    ]  # fmt: skip
    command += _network_arguments(network)
    if trace_file is not None:
        for event in TRACE_EVENTS:
            command += ["-trace", event]
        command += ["-D", str(trace_file)]
    namespace = network.namespace
    if namespace is not None:
        command = ["ip", "netns", "exec", namespace, *command]
    return command


def _network_arguments(network: TapNetwork | VhostUserNetwork) -> list[str]:
    event_idx = "on" if network.event_idx else "off"
    device = f"virtio-net-pci,netdev=n0,vectors=0,event_idx={event_idx},romfile="
    if isinstance(network, TapNetwork):
        netdev = f"tap,id=n0,ifname={network.tap},script=no,downscript=no,vhost=off"
        return ["-netdev", netdev, "-device", f"{device},tx={network.tx}"]
    return [
        "-chardev", f"socket,id=c0,path={network.socket_path}",
        "-netdev", "vhost-user,id=n0,chardev=c0",
        "-device", device,
    ]  # fmt: skip


def kernel_append(
    job: str,
    peer: str = HOST_ADDRESS,
    address: str = f"{GUEST_ADDRESS}/{PREFIX_LENGTH}",
    port: int = 9000,
    extra: Sequence[str] = (),
) -> str:
    """Return the kernel command line for a job (see init.sh for the syntax).

    ``panic=-1`` turns a panic into a reboot, which ``-no-reboot`` turns into
    QEMU exiting, so a crashed guest does not wait for the timeout.
    """
    if any(character.isspace() for character in job):
        raise ValueError(f"job {job!r} contains whitespace; separate steps by ','")
    words = ["console=ttyS0", "quiet", "panic=-1", f"vne.job={job}"]
    if peer != HOST_ADDRESS:
        words.append(f"vne.peer={peer}")
    if address != f"{GUEST_ADDRESS}/{PREFIX_LENGTH}":
        words.append(f"vne.addr={address}")
    if port != 9000:
        words.append(f"vne.port={port}")
    return " ".join([*words, *extra])


def boot_guest(
    image: GuestImage,
    network: TapNetwork | VhostUserNetwork,
    job: str = "ping",
    *,
    peer: str = HOST_ADDRESS,
    address: str = f"{GUEST_ADDRESS}/{PREFIX_LENGTH}",
    port: int = 9000,
    extra_append: Sequence[str] = (),
    timeout_s: float = 300.0,
    trace_kicks: bool = False,
    qemu_binary: str = QEMU_BINARY,
) -> GuestRun:
    """Boot the guest once, wait for it to power off and return what it reported.

    ``job`` is the ``vne.job`` value of init.sh, such as "ping,udp:20000:64".
    With ``trace_kicks`` true, QEMU traces kicks, interrupts and console writes
    into a temporary file, and ``GuestRun.trace`` has the counts. That works for
    ``TapNetwork`` only, because vhost-user data queues bypass QEMU. On timeout
    QEMU is killed by its PID and the run has ``timed_out`` set. Raises
    FileNotFoundError when ``qemu_binary`` is not installed.
    """
    if shutil.which(qemu_binary) is None:
        raise FileNotFoundError(f"{qemu_binary} not found; install qemu-system-x86")
    append = kernel_append(job, peer, address, port, extra_append)
    with tempfile.TemporaryDirectory(prefix="vne-qemu-") as workdir:
        trace_file = Path(workdir) / "trace.log" if trace_kicks else None
        command = qemu_command(image, network, append, trace_file, qemu_binary)
        run = _run_qemu(command, timeout_s, Path(workdir) / "stderr.log")
        if trace_file is not None and trace_file.exists():
            with trace_file.open(errors="replace") as lines:
                run.trace = parse_kick_trace(lines)
    return run


def _run_qemu(command: list[str], timeout_s: float, stderr_path: Path) -> GuestRun:
    logger.info("starting %s", " ".join(command))
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    with stderr_path.open("w+") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert process.stdout is not None
        reader = threading.Thread(
            target=_read_console, args=(process.stdout, lines, start), daemon=True
        )
        reader.start()
        timed_out = False
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            logger.error(
                "QEMU (PID %d) timed out after %.0f s; killing it",
                process.pid,
                timeout_s,
            )
            process.kill()
            process.wait()
        wall_s = time.monotonic() - start
        reader.join(timeout=5)
        stderr.seek(0)
        stderr_text = stderr.read()
    run = parse_console(lines)
    run.command = command
    run.exit_code = None if timed_out else process.returncode
    run.timed_out = timed_out
    run.wall_s = wall_s
    run.stderr = stderr_text
    return run


def _read_console(
    stream: IO[bytes], lines: list[tuple[float, str]], start: float
) -> None:
    for raw in stream:
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        lines.append((time.monotonic() - start, text))
    stream.close()


def parse_console(lines: Sequence[tuple[float, str]]) -> GuestRun:
    """Parse timestamped console lines into a GuestRun (command and exit unset).

    The timestamps are seconds since QEMU started. Text before a ``VNE-`` tag
    on the same line (terminal escapes from the firmware) is ignored.
    """
    run = GuestRun(
        command=[], exit_code=None, timed_out=False, wall_s=0.0, boot_s=None,
        console="\n".join(text for _, text in lines), stderr="", pings=[], udp=[],
        stats={}, virtio_errors=[], errors=[], done_status=None,
    )  # fmt: skip
    for seconds, text in lines:
        start = text.find("VNE-")
        if start < 0:
            continue
        match = _RESULT_LINE.match(text, start)
        if match is None:
            continue
        tag, rest = match.group(1), match.group(2) or ""
        if tag == "VNE-LINK":
            run.boot_s = seconds
        elif tag == "VNE-RESULT":
            fields = _parse_fields(rest)
            if fields.get("kind") == "ping":
                run.pings.append(fields)
        elif tag == "VNE-UDPGEN":
            run.udp.append(_parse_fields(rest))
        elif tag == "VNE-STATS":
            run.stats = _parse_fields(rest)
        elif tag == "VNE-VIRTIO-ERROR":
            run.virtio_errors.append(rest)
        elif tag == "VNE-ERROR":
            run.errors.append(rest)
        elif tag == "VNE-DONE":
            run.done_status = str(_parse_fields(rest).get("status"))
    return run


def _parse_fields(text: str) -> dict[str, str | int | float]:
    """Parse "a=1 b=2.5 c=x" into {"a": 1, "b": 2.5, "c": "x"}."""
    fields: dict[str, str | int | float] = {}
    for word in text.split():
        key, separator, value = word.partition("=")
        if not separator:
            continue
        fields[key] = _number(value)
    return fields


def _number(value: str) -> str | int | float:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
