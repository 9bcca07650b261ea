"""Fixtures of the backend tests: namespaces, the root marker, the corpus.

Tests marked ``root`` create network namespaces and TAP interfaces. They skip
with the reason when the process is not root or /dev/net/tun is missing.
Interfaces they create live in a namespace that the ``netns`` fixture
deletes afterwards, also when the test fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
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

REPO_ROOT = Path(__file__).resolve().parents[2]


def root_skip_reason() -> str | None:
    """Return why root tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces and TAP interfaces"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing; load the tun module (modprobe tun)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        reason = root_skip_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with IPv6 off, deleted after the test.

    IPv6 is off so that the kernel sends no router solicitations or MLD
    reports on the test's interfaces.
    """
    try:
        name = create_namespace()
    except BackendError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            pytest.skip(f"cannot create network namespaces here: {exc}")
        raise
    try:
        disable_ipv6(name)
        yield name
    finally:
        with contextlib.suppress(NamespaceNotFoundError):
            delete_namespace(name)


def disable_ipv6(name: str) -> None:
    """Turn IPv6 off for the current and future interfaces of namespace ``name``."""
    with enter_namespace(name):
        for scope in ("all", "default"):
            path = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
            if os.path.exists(path):
                with open(path, "w") as file:
                    file.write("1")


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
