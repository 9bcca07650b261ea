"""``attach`` on a TAP: the host kernel pings the fake NIC and gets UDP echoes.

The CLI runs as a subprocess inside the test's namespace setup; the clients
are sockets of that namespace, so nothing leaves it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import CLI, REPO_ROOT
from host_clients import ping, udp_echo

pytestmark = pytest.mark.root

GUEST = "192.0.2.2"
HOST = "192.0.2.1"
TAP = "vnetest0"
START_TIMEOUT_S = 20.0


class AttachProcess:
    """An ``attach`` subprocess; ``stop`` signals it by PID and returns its JSON."""

    def __init__(self, netns: str, *extra: str) -> None:
        environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.netns = netns
        self.process = subprocess.Popen(
            [
                *CLI,
                "attach",
                f"tap:{TAP}",
                "--address",
                f"{GUEST}/24",
                "--host-address",
                f"{HOST}/24",
                "--netns",
                netns,
                "--duration",
                "120",
                "--json",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )

    def wait_ready(self) -> None:
        """Wait until the TAP is up with the host address."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _, stderr = self.process.communicate()
                raise AssertionError(f"attach exited early: {stderr}")
            listing = subprocess.run(
                ["ip", "-n", self.netns, "-4", "addr", "show", "dev", TAP],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            if f"inet {HOST}/24" in listing and "UP" in listing:
                return
            time.sleep(0.05)
        raise AssertionError(f"TAP {TAP} did not come up in {START_TIMEOUT_S} s")

    def stop(self, signum: int = signal.SIGTERM) -> dict:
        """Signal the process, wait for it and return its statistics."""
        self.process.send_signal(signum)
        stdout, stderr = self.process.communicate(timeout=20)
        assert self.process.returncode == 0, stderr
        return json.loads(stdout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@contextmanager
def attached(netns: str, *extra: str) -> Iterator[AttachProcess]:
    process = AttachProcess(netns, *extra)
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


def tap_exists(netns: str) -> bool:
    result = subprocess.run(
        ["ip", "-n", netns, "link", "show", TAP], capture_output=True, check=False
    )
    return result.returncode == 0


def test_attach_answers_ping(netns: str) -> None:
    with attached(netns) as process:
        answered = ping(netns, GUEST, count=10)
        stats = process.stop(signal.SIGINT)
    assert answered == list(range(10))
    assert stats["answered"]["icmp-echo"] == 10
    assert stats["answered"]["arp"] >= 1
    assert stats["dropped"] == {}
    assert not tap_exists(netns)


@pytest.mark.parametrize("tx_mode", ["bh", "timer", "immediate"])
def test_attach_echoes_udp(netns: str, tx_mode: str) -> None:
    count = 5000
    with attached(netns, "--tx-mode", tx_mode) as process:
        sent, echoed, missing = udp_echo(netns, GUEST, 7, count, window=32)
        stats = process.stop()
    assert sent == count
    assert missing == []
    assert echoed == count
    assert stats["answered"]["udp-echo"] >= count
    assert stats["tx_frames"] >= count
    assert stats["dropped"] == {}
    assert not tap_exists(netns)


def test_attach_existing_tap_keeps_it(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "tuntap", "add", TAP, "mode", "tap"], check=True)
    with attached(netns) as process:
        answered = ping(netns, GUEST, count=3)
        process.stop()
    assert answered == [0, 1, 2]
    assert tap_exists(netns)
    listing = subprocess.run(
        ["ip", "-n", netns, "-4", "addr", "show", "dev", TAP],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert HOST not in listing
