"""Fixtures of the fake NIC tests: namespaces, the root marker, the corpus, the CLI.

Tests marked ``root`` create network namespaces and TAP interfaces; they skip
with the reason when the process is not root or /dev/net/tun is missing.
Every namespace a test creates is deleted afterwards, also when the test
fails, and the interfaces inside go with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import (
    BackendError,
    NamespaceNotFoundError,
    create_namespace,
    delete_namespace,
    enter_namespace,
)
from device.pytest_plugin import tap_skip_reason

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = [
    sys.executable,
    "-c",
    "import sys; from device.cli import main; sys.exit(main())",
]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        reason = tap_skip_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with lo up and IPv6 off, deleted after the test."""
    try:
        name = create_namespace()
    except BackendError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            pytest.skip(f"cannot create network namespaces here: {exc}")
        raise
    try:
        with enter_namespace(name):
            for scope in ("all", "default"):
                path = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
                if os.path.exists(path):
                    with open(path, "w") as file:
                        file.write("1")
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        with contextlib.suppress(NamespaceNotFoundError):
            delete_namespace(name)


@pytest.fixture
def corpus_dir() -> Path:
    """Directory of real Ethernet captures, or skip when it is absent.

    The directory comes from VNE_CORPUS_DIR, with a fallback beside the
    repository checkout.
    """
    configured = os.environ.get("VNE_CORPUS_DIR")
    if configured:
        path = Path(configured)
    else:
        path = REPO_ROOT.parent / "shared" / "corpus" / "tcpdump"
    if not path.is_dir():
        pytest.skip(f"capture corpus not found at {path}; set VNE_CORPUS_DIR")
    return path


def corpus_captures(directory: Path) -> list[Path]:
    """Return the pcap and pcapng files of ``directory``, sorted by name."""
    return sorted(
        path for path in directory.iterdir() if path.suffix in (".pcap", ".pcapng")
    )


def run_cli(
    *arguments: str,
    cwd: Path | str | None = None,
    prefix: tuple[str, ...] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``virtio-net-emu ARGUMENTS`` in a subprocess; return the result."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), environment.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return subprocess.run(
        [*prefix, *CLI, *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
