"""The pytest plugin of virtio-net-emu: the ``fake_nic`` fixture.

``fake_nic`` is a ``device.fake_nic.FakeNic`` with the loopback backend.
Ask for a TAP with the marker ``@pytest.mark.fake_nic_tap`` or with
``@pytest.mark.parametrize("fake_nic", ["tap"], indirect=True)``. The TAP
then lives in a network namespace created for the test, with IPv6 off so the
kernel sends nothing unasked, and the namespace is deleted after the test,
also when it fails. The marker takes the NIC's keyword arguments, plus
``host_address`` (default 192.0.2.1/24). TAP tests need root and
/dev/net/tun, and without them they skip with the reason.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["fake_nic", "tap_skip_reason"]

TAP_MARKER = "fake_nic_tap"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{TAP_MARKER}(**options): give the fake_nic fixture a TAP in a network"
        " namespace created for the test (needs root)",
    )


def tap_skip_reason() -> str | None:
    """Return why a TAP cannot be created here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace and a TAP"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing; load the tun module (modprobe tun)"
    return None


@pytest.fixture
def fake_nic(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Yield a NIC with the whole virtio path: guest model, rings, device, backend."""
    from device.fake_nic import FakeNic

    marker = request.node.get_closest_marker(TAP_MARKER)
    param = getattr(request, "param", "loopback")
    if param not in ("loopback", "tap"):
        raise ValueError(
            f"invalid fake_nic parameter {param!r}: use 'loopback' or 'tap'"
        )
    if marker is None and param == "loopback":
        with FakeNic() as nic:
            yield nic
        return
    reason = tap_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    options = dict(marker.kwargs) if marker is not None else {}
    with _test_namespace() as netns, FakeNic.on_tap(netns, **options) as nic:
        yield nic


@contextlib.contextmanager
def _test_namespace() -> Iterator[str]:
    from backends import enter_namespace, network_namespace

    with network_namespace() as name:
        with enter_namespace(name):
            for scope in ("all", "default"):
                path = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
                if os.path.exists(path):
                    with open(path, "w") as file:
                        file.write("1")
        yield name
