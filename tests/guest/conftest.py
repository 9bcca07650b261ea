"""Fixtures of the real-guest tests: the guest image and the host's TAP namespace.

Outside CI a missing QEMU, busybox, compiler or kernel skips the tests with
the apt-get command that would fix it. Under CI (CI set to anything but
"", "0" or "false") the fixtures install what is missing and fail if that
does not work, so a broken install step cannot pass as a skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from .build_image import GuestImage, build_image
from .debian_packages import HOST_PACKAGES, MissingDependency, ensure_packages
from .netns import HostLink, tap_namespace


def running_under_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    install = running_under_ci()
    if os.geteuid() != 0 and not install:
        pytest.skip("guest tests need root (apt, TAP devices, network namespaces)")
    try:
        ensure_packages(HOST_PACKAGES, install=install)
        if shutil.which("qemu-system-x86_64") is None:
            raise MissingDependency(
                "qemu-system-x86_64 not found although qemu-system-x86 is installed"
            )
        return build_image(install=install)
    except MissingDependency as error:
        if install:
            pytest.fail(f"CI could not set up the guest: {error}")
        pytest.skip(f"guest image unavailable: {error}")


@pytest.fixture(scope="module")
def tap_link() -> Iterator[HostLink]:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun for a TAP in a network namespace")
    with tap_namespace() as link:
        yield link
