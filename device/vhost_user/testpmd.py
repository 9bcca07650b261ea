"""Drive ``dpdk-testpmd`` in interactive mode, for tests and benchmarks.

``Testpmd`` starts testpmd with one virtual device (``net_virtio_user`` as
a vhost-user front-end, or ``net_vhost`` as a back-end), sends it commands
on stdin and parses what it prints: the forward statistics that ``stop``
prints, ``show port stats``, and the per-frame lines of ``set verbose 1``.
Interactive mode is used because ``stop`` then prints final counters after
the forwarding core has stopped, and testpmd keeps the port open until
``quit``, so the back-end can finish the frames still in its rings first.

testpmd's stdout goes through ``stdbuf -oL`` into a file, so the prompt and
each line appear as soon as testpmd prints them. ``close`` ends testpmd (by
``quit``, or by killing the process it started) and removes its runtime
directory under /var/run/dpdk.

Checked against DPDK 22.11 (Debian 12 package dpdk-dev).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

__all__ = [
    "ForwardStats",
    "RUNTIME_DIR",
    "Testpmd",
    "TestpmdError",
    "testpmd_path",
    "virtio_user_vdev",
]

#: Parent of the EAL runtime directories, one per ``--file-prefix``.
RUNTIME_DIR = Path("/var/run/dpdk")
#: Seconds testpmd may take to print its prompt (EAL start-up and port start).
START_TIMEOUT = 30.0
#: Seconds a command may take to print what it prints.
COMMAND_TIMEOUT = 15.0

PROMPT = "testpmd> "

_FORWARD_STATS = re.compile(
    r"Accumulated forward statistics for all ports\+*\s*"
    r"RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)\s+RX-total:\s*\d+\s*"
    r"TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)"
)
_THROUGHPUT = re.compile(r"Rx-pps:\s*(\d+).*?\n.*?Tx-pps:\s*(\d+)", re.DOTALL)
_PORT_MAC = re.compile(r"Port 0: ([0-9A-F:]{17})")


class TestpmdError(RuntimeError):
    """testpmd exited early, or did not print what a command prints."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class ForwardStats:
    """The "Accumulated forward statistics" that ``stop`` prints."""

    rx_packets: int
    rx_dropped: int
    tx_packets: int
    tx_dropped: int


def testpmd_path() -> str | None:
    """Return the path of dpdk-testpmd, or None when it is not installed."""
    return shutil.which("dpdk-testpmd")


def virtio_user_vdev(socket_path: str | os.PathLike[str], devargs: str = "") -> str:
    """Return the ``--vdev`` of a virtio-user port on ``socket_path``.

    ``devargs`` is appended as is, for example ``",mrg_rxbuf=0"``.
    """
    return (
        f"net_virtio_user0,path={os.fspath(socket_path)},queues=1,queue_size=256"
        f"{devargs}"
    )


class Testpmd:
    """One interactive dpdk-testpmd process with one port.

    ``lcores`` and ``main_lcore`` are EAL's ``-l`` and ``--main-lcore``: the
    forwarding core is the other one, and it busy-polls. ``eal_memory`` are
    the EAL memory options (default ``--no-huge -m 256``). ``app_options``
    go after ``--``, before ``-i``. The output goes to ``output``.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        vdev: str,
        prefix: str,
        output: str | os.PathLike[str],
        *,
        app_options: Sequence[str] = (),
        lcores: str = "0-1",
        main_lcore: int = 0,
        eal_memory: Sequence[str] = ("--no-huge", "-m", "256"),
    ) -> None:
        binary = testpmd_path()
        if binary is None:
            raise TestpmdError("dpdk-testpmd not found; install the dpdk-dev package")
        self.prefix = prefix
        self.output = Path(output)
        self.command = [
            *(["stdbuf", "-oL"] if shutil.which("stdbuf") else []),
            binary,
            "-l",
            lcores,
            "--main-lcore",
            str(main_lcore),
            f"--file-prefix={prefix}",
            *eal_memory,
            "--no-pci",
            "--vdev",
            vdev,
            "--",
            *app_options,
            "-i",
        ]
        self.process: subprocess.Popen[str] | None = None
        self._read_offset = 0

    # -- process --------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start testpmd and wait for its first prompt."""
        with self.output.open("w") as output:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.wait_for(PROMPT, timeout)

    def send(self, *commands: str) -> None:
        """Write commands to testpmd's prompt, one a line."""
        if self.process is None or self.process.stdin is None:
            raise TestpmdError("testpmd is not running")
        try:
            self.process.stdin.write("".join(f"{line}\n" for line in commands))
            self.process.stdin.flush()
        except BrokenPipeError:
            raise TestpmdError(
                f"testpmd exited; its output ends with:\n{self.tail()}"
            ) from None

    def run(
        self, command: str, until: str = PROMPT, timeout: float = COMMAND_TIMEOUT
    ) -> str:
        """Send one command and return what testpmd printed before ``until``.

        ``until`` defaults to the next prompt. testpmd writes its prompt in
        pieces, which the forwarding core's output (``set verbose``) can
        split, so commands issued while frames are printed wait for a line
        of their own output instead.
        """
        self.mark()
        self.send(command)
        return self.wait_for(until, timeout)

    def mark(self) -> None:
        """Make ``wait_for`` look only at output printed after this call."""
        self._read_offset = len(self.text())

    def wait_for(self, text: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Wait until ``text`` appears after the mark and return the output before it.

        Raises ``TestpmdError`` when testpmd exits or ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            output = self.text()[self._read_offset :]
            found = output.find(text)
            if found >= 0:
                self._read_offset += found + len(text)
                return output[:found]
            if self.process is not None and self.process.poll() is not None:
                raise TestpmdError(
                    f"testpmd exited with {self.process.returncode} before"
                    f" printing {text!r}; its output ends with:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise TestpmdError(
                    f"testpmd did not print {text!r} within {timeout} s; its output"
                    f" ends with:\n{self.tail()}"
                )
            time.sleep(0.05)

    def text(self) -> str:
        """Return everything testpmd printed so far."""
        try:
            return self.output.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, characters: int = 3000) -> str:
        return self.text()[-characters:]

    def close(self, timeout: float = COMMAND_TIMEOUT) -> int | None:
        """Quit testpmd, kill it if it does not exit, remove its runtime files.

        Returns the exit status, or None if testpmd never started.
        """
        process = self.process
        if process is None:
            self._remove_runtime_dir()
            return None
        try:
            if process.poll() is None:
                try:
                    self.send("quit")
                    process.wait(timeout)
                except (TestpmdError, subprocess.TimeoutExpired):
                    _end(process)
        finally:
            if process.poll() is None:
                _end(process)
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except BrokenPipeError:
                    pass
            self._remove_runtime_dir()
        return process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _remove_runtime_dir(self) -> None:
        shutil.rmtree(RUNTIME_DIR / self.prefix, ignore_errors=True)

    # -- forwarding -----------------------------------------------------------

    def start_forwarding(self, tx_first: int = 0) -> None:
        """Send ``start``, or ``start tx_first N`` to send N bursts first."""
        command = "start" if tx_first == 0 else f"start tx_first {tx_first}"
        # The forwarding configuration that ``start`` prints ends with this.
        self.run(command, until="TX RS bit threshold=")

    def stop_forwarding(self) -> ForwardStats:
        """Send ``stop`` and return the statistics it prints."""
        output = self.run("stop", until="\nDone.")
        match = _FORWARD_STATS.search(output)
        if match is None:
            raise TestpmdError(f"no forward statistics after stop:\n{output[-2000:]}")
        rx, rx_dropped, tx, tx_dropped = (int(value) for value in match.groups())
        return ForwardStats(rx, rx_dropped, tx, tx_dropped)

    def throughput(self) -> tuple[int, int]:
        """Return (Rx-pps, Tx-pps) since the previous ``show port stats``."""
        output = self.run("show port stats 0", until="Tx-bps:")
        output += self.wait_for("\n")
        match = _THROUGHPUT.search(output)
        if match is None:
            raise TestpmdError(f"no throughput in port stats:\n{output[-2000:]}")
        return int(match.group(1)), int(match.group(2))

    def port_mac(self) -> str:
        """Return the MAC address testpmd printed for port 0 at start-up."""
        match = _PORT_MAC.search(self.text())
        if match is None:
            raise TestpmdError("testpmd printed no MAC address for port 0")
        return match.group(1)


def _end(process: subprocess.Popen[str]) -> None:
    """End a testpmd this module started: SIGINT first, then SIGKILL."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
