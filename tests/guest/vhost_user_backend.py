"""Run the project's vhost-user backend as a subprocess for a guest boot.

``running_backend`` starts ``virtio-net-emu vhost-user --to tap:TAP --netns
NS --json`` (as ``python -m device.cli``, the module behind the command) on
the TAP of a ``HostLink``. It waits until the backend listens on its socket
and yields a ``BackendRun``. On exit, also on error, it sends SIGTERM to the
backend's PID, waits for it, and parses the JSON statistics the backend
prints. A backend that ignores SIGTERM is killed by its PID.

With ``probe`` true the backend runs under backend_probe.py, which also
counts the kick writes behind each kick (see that file for why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .netns import HostLink

__all__ = [
    "BackendRun",
    "CpuTimes",
    "backend_command",
    "cpu_times",
    "listening",
    "running_backend",
]

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
# The socket flag of a listening Unix socket in /proc/net/unix (__SO_ACCEPTCON
# in the kernel's include/linux/net.h).
_ACCEPTING = 0x10000


class CpuTimes(NamedTuple):
    """CPU seconds a process spent in user mode and in the kernel."""

    user_s: float
    system_s: float


@dataclasses.dataclass
class BackendRun:
    """One backend process: its command, and what it printed after it stopped."""

    command: list[str]
    socket_path: Path
    pid: int
    #: The backend's exit status; None while it runs.
    exit_code: int | None = None
    #: True when SIGTERM did not stop it and it was killed.
    killed: bool = False
    #: The JSON object it printed at exit, or None when there was none.
    stats: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""
    #: CPU times of the backend once it listened, and just before SIGTERM.
    #: The difference leaves out the start-up (imports).
    cpu_at_start: CpuTimes | None = None
    cpu_at_stop: CpuTimes | None = None


def backend_command(
    link: HostLink,
    socket_path: Path,
    tx_mode: str,
    *,
    probe: bool = False,
    duration_s: float | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Return the command line of the backend for ``link``'s TAP.

    ``extra_args`` go at the end, for options such as ``--ring-poll-us``.
    """
    if probe:
        program = [sys.executable, str(_HERE / "backend_probe.py")]
    else:
        program = [sys.executable, "-m", "device.cli"]
    command = [
        *program,
        "vhost-user",
        "--socket", str(socket_path),
        "--to", f"tap:{link.tap}",
        "--netns", link.namespace,
        "--tx-mode", tx_mode,
        "--json",
    ]  # fmt: skip
    if duration_s is not None:
        command += ["--duration", str(duration_s)]
    return [*command, *extra_args]


def listening(socket_path: Path) -> bool:
    """Tell whether a Unix socket of this network namespace listens on the path.

    /proc/net/unix lists the sockets of the reader's namespace. The backend
    creates its socket in the namespace it was started in (it enters the TAP's
    namespace only to open the TAP), so the caller sees it.
    """
    expected_path = str(socket_path)
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == expected_path:
                if int(fields[3], 16) & _ACCEPTING:
                    return True
    return False


@contextlib.contextmanager
def running_backend(
    link: HostLink,
    socket_path: Path,
    tx_mode: str,
    *,
    probe: bool = False,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    start_timeout_s: float = 30.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[BackendRun]:
    """Run the backend on ``link`` while the block runs, then stop it.

    ``socket_path`` must not exist yet, and its directory must hold the
    backend's output files (``backend.stdout``, ``backend.stderr``). Raises
    RuntimeError when the backend exits or does not listen within
    ``start_timeout_s``, with the end of its stderr.
    """
    command = backend_command(
        link, socket_path, tx_mode, probe=probe, extra_args=extra_args
    )
    directory = socket_path.parent
    stdout_path = directory / "backend.stdout"
    stderr_path = directory / "backend.stderr"
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
    logger.info("started backend (PID %d): %s", process.pid, " ".join(command))
    run = BackendRun(command=command, socket_path=socket_path, pid=process.pid)
    try:
        _wait_until_listening(process, socket_path, start_timeout_s, stderr_path)
        run.cpu_at_start = cpu_times(process.pid)
        yield run
    finally:
        run.cpu_at_stop = cpu_times(process.pid)
        _stop(process, run, stop_timeout_s)
        run.stdout = stdout_path.read_text(errors="replace")
        run.stderr = stderr_path.read_text(errors="replace")
        run.stats = _last_json_object(run.stdout)


def _wait_until_listening(
    process: subprocess.Popen[bytes],
    socket_path: Path,
    timeout_s: float,
    stderr_path: Path,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not listening(socket_path):
        if process.poll() is not None:
            problem = f"exited with {process.returncode} before listening"
        elif time.monotonic() > deadline:
            problem = f"did not listen within {timeout_s} s"
        else:
            time.sleep(0.05)
            continue
        stderr = _tail(stderr_path.read_text(errors="replace"))
        raise RuntimeError(
            f"backend (PID {process.pid}) {problem} on {socket_path}: {stderr}"
        )


def _stop(process: subprocess.Popen[bytes], run: BackendRun, timeout_s: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        run.exit_code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.error(
            "backend (PID %d) still runs %.0f s after SIGTERM; killing it",
            process.pid,
            timeout_s,
        )
        process.kill()
        run.exit_code = process.wait()
        run.killed = True
    logger.info("backend (PID %d) exited with %d", process.pid, run.exit_code)


def cpu_times(pid: int) -> CpuTimes | None:
    """Return the CPU times of a running process from /proc/PID/stat, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces, so count from its ")".
    fields = text[text.rindex(")") + 2 :].split()
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    return CpuTimes(
        user_s=int(fields[11]) / ticks_per_second,
        system_s=int(fields[12]) / ticks_per_second,
    )


def _last_json_object(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"
