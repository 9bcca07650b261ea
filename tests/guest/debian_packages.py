"""Debian package helpers for the guest tests: check, install, download, unpack.

Installing needs root and a Debian or Ubuntu host. Every apt and dpkg call
waits up to ``APT_LOCK_TIMEOUT_S`` for the dpkg lock, because another apt
process (a second test run, a package install) may hold it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "APT_LOCK_TIMEOUT_S",
    "HOST_PACKAGES",
    "MissingDependency",
    "apt_install_command",
    "download_package",
    "ensure_packages",
    "installed_version",
    "resolve_dependency",
    "unpack_package",
]

logger = logging.getLogger(__name__)

APT_LOCK_TIMEOUT_S = 600

#: Debian packages the guest tests run on: QEMU, a static busybox for the
#: initramfs, gcc and the static libc to build udpgen, and ``ip`` for the
#: namespace and the TAP. The guest kernel is downloaded, not installed.
HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "gcc", "libc6-dev", "iproute2")

_APT_OPTIONS = ("-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}")
_apt_lists_updated = False


class MissingDependency(RuntimeError):
    """A host package, binary or the guest kernel is missing and was not obtained."""


def apt_install_command(packages: Iterable[str]) -> list[str]:
    """Return the apt-get command line that installs ``packages``."""
    return [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        *_APT_OPTIONS,
        *packages,
    ]


def installed_version(package: str) -> str | None:
    """Return the installed version of a Debian package, or None."""
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    status, _, version = result.stdout.partition("\t")
    return version if status.endswith(" installed") else None


def ensure_packages(packages: Iterable[str], install: bool) -> None:
    """Install the packages that are missing, or raise MissingDependency.

    With ``install`` false nothing is installed and the error names the
    apt-get command to run.
    """
    missing = [name for name in packages if installed_version(name) is None]
    if not missing:
        return
    command = apt_install_command(missing)
    if not install:
        raise MissingDependency(
            f"Debian packages not installed: {', '.join(missing)}; "
            f"install them with: {' '.join(command)}"
        )
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise MissingDependency(
            f"cannot install {', '.join(missing)}: needs root and apt-get"
        )
    _update_apt_lists()
    logger.info("installing Debian packages: %s", " ".join(missing))
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(command, env=environment)


def resolve_dependency(metapackage: str, prefix: str, install: bool) -> str:
    """Return the first dependency of ``metapackage`` whose name starts with prefix.

    ``linux-image-cloud-amd64`` depends on one versioned kernel package, such as
    ``linux-image-6.1.0-57-cloud-amd64``. Empty apt lists are updated first
    when ``install`` is true.
    """
    name, output = _find_dependency(metapackage, prefix)
    if name is None and install:
        _update_apt_lists(force=True)
        name, output = _find_dependency(metapackage, prefix)
    if name is None:
        raise MissingDependency(
            f"apt-cache found no dependency {prefix}* of {metapackage}; "
            f"run 'apt-get update' first (apt-cache output: {output[:200]!r})"
        )
    return name


def _find_dependency(metapackage: str, prefix: str) -> tuple[str | None, str]:
    result = subprocess.run(
        ["apt-cache", "depends", metapackage],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in result.stdout.splitlines():
        kind, _, name = line.strip().partition(": ")
        if kind == "Depends" and name.startswith(prefix):
            return name, result.stdout
    return None, (result.stdout + result.stderr).strip()


def download_package(package: str, directory: Path) -> Path:
    """Download a .deb into ``directory`` with apt-get download; return its path.

    A .deb of that package already in the directory is reused.
    """
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(directory.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    # apt-get download runs as the _apt user by default (APT::Sandbox::User),
    # and _apt may not be able to write into a root-owned cache directory.
    _run(
        ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
        cwd=directory,
    )
    downloaded = sorted(directory.glob(f"{package}_*.deb"))
    if not downloaded:
        raise MissingDependency(
            f"apt-get download {package} left no {package}_*.deb in {directory}"
        )
    return downloaded[-1]


def unpack_package(deb: Path, directory: Path) -> None:
    """Extract the files of a .deb into ``directory`` (dpkg -x, no install)."""
    directory.mkdir(parents=True, exist_ok=True)
    _run(["dpkg", "-x", str(deb), str(directory)])


def _update_apt_lists(force: bool = False) -> None:
    global _apt_lists_updated
    if _apt_lists_updated and not force:
        return
    _run(["apt-get", "update", "-q", *_APT_OPTIONS])
    _apt_lists_updated = True


def _run(command: list[str], **kwargs: Any) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as error:
        raise MissingDependency(f"{command[0]} not found: {error}") from error
    except subprocess.CalledProcessError as error:
        output = (error.stdout + error.stderr).strip()[-2000:]
        raise MissingDependency(
            f"{' '.join(command)} failed with exit code {error.returncode}: {output}"
        ) from error
