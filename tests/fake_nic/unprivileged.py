"""Running the CLI as the unprivileged user 65534 (nobody) with setpriv.

The test's Python environment may live where that user cannot read it (a
pyenv under /root), so the modules the CLI imports are copied into a
temporary directory that every user can read, and each candidate
interpreter is tried before use.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NOBODY = "65534"
SETPRIV = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
PROJECT_PACKAGES = ("device", "virtio", "backends")
DEPENDENCIES = ("cffi", "pycparser", "_cffi_backend", "pyroute2")
REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_CODE = "import sys; from device.cli import main; sys.exit(main())"


def skip_reason() -> str | None:
    """Return why the CLI cannot be run as user 65534 here, or None."""
    if shutil.which("setpriv") is None:
        return "setpriv is missing (util-linux); cannot switch to an unprivileged user"
    if os.geteuid() != 0:
        return "needs root to switch to user 65534 with setpriv"
    return None


@dataclass
class Unprivileged:
    """An interpreter and a module path that user 65534 can use, and a work dir."""

    python: str
    library: Path
    workdir: Path

    def run(
        self, *arguments: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``virtio-net-emu ARGUMENTS`` as user 65534 in ``workdir``."""
        environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(self.library)}
        return subprocess.run(
            [*SETPRIV, self.python, "-c", CLI_CODE, *arguments],
            cwd=self.workdir,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@contextmanager
def unprivileged_cli() -> Iterator[Unprivileged | str]:
    """Yield an ``Unprivileged`` runner, or the reason none works here.

    The temporary directory is removed afterwards.
    """
    root = Path(tempfile.mkdtemp(prefix="vne-nobody-"))
    try:
        root.chmod(0o755)
        library = root / "lib"
        _copy_modules(library)
        workdir = root / "work"
        workdir.mkdir()
        workdir.chmod(0o777)
        yield _find_python(library, workdir)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _copy_modules(library: Path) -> None:
    library.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    for package in PROJECT_PACKAGES:
        shutil.copytree(REPO_ROOT / package, library / package, ignore=ignore)
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        if spec.submodule_search_locations:
            shutil.copytree(origin.parent, library / name, ignore=ignore)
        else:
            shutil.copy2(origin, library / origin.name)
    for path in library.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    library.chmod(0o755)


def _find_python(library: Path, workdir: Path) -> Unprivileged | str:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    failures = []
    for python in dict.fromkeys(candidates):
        if not os.path.exists(python):
            continue
        runner = Unprivileged(python, library, workdir)
        probe = subprocess.run(
            [*SETPRIV, python, "-c", "import device.replay"],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(library)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if probe.returncode == 0:
            return runner
        lines = probe.stderr.strip().splitlines()
        last_line = lines[-1] if lines else "no output"
        failures.append(f"{python}: {last_line}")
    return "no Python interpreter works for user 65534: " + "; ".join(failures)
