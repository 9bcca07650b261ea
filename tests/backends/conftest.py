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
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from backends import (
    BackendError,
    NamespaceNotFoundError,
    TapBackend,
    create_namespace,
    delete_namespace,
    enter_namespace,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SLOW_VETH = "vneveth0"
"""The veth behind ``bridged_tap``, whose slow qdisc keeps the frames waiting."""


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


@pytest.fixture
def bridged_tap(netns: str) -> Iterator[TapBackend]:
    """A TAP with a 16 KiB send buffer, bridged to a veth with a slow qdisc.

    Frames written to the TAP are forwarded by the bridge into a token bucket
    filter at 8 kbit/s, where they wait while still charged to the TAP's send
    buffer. Once 16 KiB are waiting, writes fail with EAGAIN.
    """
    backend = TapBackend(netns=netns, sndbuf=16384, up=False)
    try:
        with IPRoute(netns=netns, flags=0) as ipr:
            ipr.link("add", ifname="vnebr0", kind="bridge")
            ipr.link("add", ifname=SLOW_VETH, kind="veth", peer="vneveth1")
            bridge = ipr.link_lookup(ifname="vnebr0")[0]
            veth = ipr.link_lookup(ifname=SLOW_VETH)[0]
            peer = ipr.link_lookup(ifname="vneveth1")[0]
            ipr.tc(
                "add",
                "tbf",
                veth,
                handle=0x10000,
                rate="8kbit",
                burst=1600,
                limit=1_000_000,
            )
            for index in (backend.ifindex, veth):
                ipr.link("set", index=index, master=bridge)
            for index in (backend.ifindex, veth, peer, bridge):
                ipr.link("set", index=index, state="up")
            # The veth has carrier, and forwards as a bridge port, only once
            # its peer is up. Until then the bridge drops the frames, so the
            # send buffer never fills.
            deadline = time.monotonic() + 2.0
            while ipr.get_links(veth)[0].get_attr("IFLA_OPERSTATE") != "UP":
                assert time.monotonic() < deadline, "the veth never came up"
                time.sleep(0.005)
        yield backend
    finally:
        backend.close()


@pytest.fixture
def release_slow_qdisc(netns: str) -> Callable[[], None]:
    """A function that deletes the slow qdisc of ``bridged_tap``, freeing its frames."""

    def release() -> None:
        with IPRoute(netns=netns, flags=0) as ipr:
            veth = ipr.link_lookup(ifname=SLOW_VETH)[0]
            ipr.tc("del", index=veth, root=True)

    return release
