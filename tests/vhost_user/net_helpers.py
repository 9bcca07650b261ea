"""Helpers of the virtio-net vhost-user tests: the back-end process and hugepages.

``BackendProcess`` runs ``virtio-net-emu vhost-user`` as a child process on
CPU 0, as a user would, and parses the JSON it prints at exit. testpmd's
forwarding core busy-polls CPU 1, so the back-end gets a CPU of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from device.vhost_user.testpmd import RUNTIME_DIR, testpmd_path

START_TIMEOUT = 15.0
EXIT_TIMEOUT = 15.0
#: Seconds the back-end gets after testpmd's ``stop`` to finish the chains
#: still in the rings, before ``quit`` stops the rings.
DRAIN_SECONDS = 1.0

GIGANTIC_PAGES = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")


def require_testpmd() -> None:
    """Skip unless dpdk-testpmd, root and CPUs 0 and 1 are available."""
    if testpmd_path() is None:
        pytest.skip("dpdk-testpmd not installed (apt-get install dpdk-dev)")
    if os.geteuid() != 0:
        pytest.skip("dpdk-testpmd needs root for /var/run/dpdk")
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("testpmd and the back-end need CPUs 0 and 1")


def file_prefix(name: str) -> str:
    """Return an EAL --file-prefix unique to this process and ``name``."""
    return f"vne{os.getpid()}{name}"


class BackendProcess:
    """``virtio-net-emu vhost-user`` pinned to CPU 0, stopped with SIGINT."""

    def __init__(self, directory: Path, to: str, options: Sequence[str] = ()) -> None:
        self.socket = directory / "vhost-user.sock"
        self.log = directory / "backend.log"
        self.command = [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-m",
            "device.cli",
            "-v",
            "vhost-user",
            "--socket",
            str(self.socket),
            "--to",
            to,
            "--json",
            *options,
        ]
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=log, text=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"back-end did not listen:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        """Stop the back-end with SIGINT and return its JSON statistics."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            stdout, _ = self.process.communicate(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"back-end did not exit on SIGINT:\n{self.log_text()}"
            ) from None
        assert self.process.returncode == 0, self.log_text()
        return json.loads(stdout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def memory_tables(self) -> list[str]:
        """Return the "memory table set" lines the back-end logged."""
        return [
            line
            for line in self.log.read_text().splitlines()
            if "memory table set:" in line
        ]

    def negotiated_features(self) -> list[int]:
        """Return every feature set the device was initialized with."""
        marker = "device initialized with features "
        return [
            int(line.split(marker)[1], 16)
            for line in self.log.read_text().splitlines()
            if marker in line
        ]


@contextmanager
def backend_process(
    directory: Path, to: str, options: Sequence[str] = ()
) -> Iterator[BackendProcess]:
    """Run a back-end for the block and kill it if the block did not stop it."""
    backend = BackendProcess(directory, to, options)
    backend.start()
    try:
        yield backend
    finally:
        backend.kill()


@contextmanager
def gigantic_pages(directory: Path, count: int = 2) -> Iterator[Path]:
    """Reserve ``count`` 1 GiB hugepages and mount hugetlbfs on ``directory``.

    Skips when the kernel has no 1 GiB pages or cannot reserve them. The
    files in the mount, the mount and the reservation are removed at the end.
    """
    if not GIGANTIC_PAGES.exists():
        pytest.skip("the kernel has no 1 GiB hugepages")
    before = int(GIGANTIC_PAGES.read_text())
    try:
        GIGANTIC_PAGES.write_text(str(before + count))
        reserved = int(GIGANTIC_PAGES.read_text()) - before
        if reserved < count:
            pytest.skip(f"only {reserved} of {count} 1 GiB hugepages reserved")
        directory.mkdir()
        subprocess.run(
            ["mount", "-t", "hugetlbfs", "-o", "pagesize=1G", "nodev", str(directory)],
            check=True,
        )
        try:
            yield directory
        finally:
            for path in directory.iterdir():
                path.unlink()
            subprocess.run(["umount", str(directory)], check=True)
    finally:
        GIGANTIC_PAGES.write_text(str(before))


def remove_runtime_dir(prefix: str) -> None:
    shutil.rmtree(RUNTIME_DIR / prefix, ignore_errors=True)
