"""``virtio-net-emu bench vhost-user``: testpmd's txonly into the back-end.

dpdk-testpmd (net_virtio_user, ``--forward-mode=txonly``, 64-byte frames)
transmits as fast as it can, its forwarding core busy-polling CPU 1. The
receiving side runs on CPU 0 and is measured over ``seconds`` after one
second of warm-up. One run measures, in order:

- ``ring``: the bare ring loop of ``bench ring`` (1-descriptor chains),
  the reference for the device path;
- ``null``: this back-end with ``--to null``;
- ``tap``: this back-end with a TAP in a network namespace the benchmark
  creates and deletes (frames are dropped by the kernel there, because
  their destination MAC is not the TAP's);
- ``raw_tap_write``: a Python loop of ``os.write`` of one 64-byte frame to
  the same TAP, the reference for ``tap``;
- ``dpdk_vhost``: DPDK's own vhost-user back-end (``net_vhost`` in a second
  testpmd, ``--forward-mode=rxonly``), as a reference from compiled code.

Rates are frames per second. Kicks and interrupts per frame come from the
device's counters, because DPDK's back-end does not report them. The ratios
compare figures of the same run, so they are steadier than the rates on a
shared machine.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backends.base import Backend

from .cli import UserError
from .net_device import TX_QUEUE
from .vhost_user.testpmd import Testpmd, testpmd_path, virtio_user_vdev

__all__ = ["bench_vhost_user", "GOALS"]

#: Targets of the ratios: the TAP path against the raw write loop, and the
#: null path against the bare ring loop.
GOALS = {"tap_vs_raw_write": 0.25, "null_vs_bare_ring": 0.4}

WARMUP_SECONDS = 1.0
BACKEND_CPU = 0
FRAME_LEN = 64
#: testpmd's txonly frames use these addresses (documentation range).
TX_ADDRESSES = "192.0.2.1,192.0.2.2"
_TXONLY = (
    "--total-num-mbufs=16384",
    "--nb-cores=1",
    "--forward-mode=txonly",
    f"--txpkts={FRAME_LEN}",
    f"--tx-ip={TX_ADDRESSES}",
)
# A 64-byte Ethernet/IPv4/UDP frame to a MAC no interface has, like testpmd's.
_RAW_FRAME = (
    bytes.fromhex("020000000000 020000000001 0800")
    + bytes.fromhex("4500 0032 0000 0000 4011 0000 c0000201 c0000202")
    + bytes.fromhex("0009 0009 001e 0000")
    + bytes(FRAME_LEN - 42)
)


def bench_vhost_user(seconds: float = 2.0) -> dict[str, Any]:
    """Measure each path for ``seconds`` and return rates, ratios and the machine.

    Raises ``UserError`` when dpdk-testpmd is missing, without root, or with
    fewer than two CPUs.
    """
    _check_requirements()
    from .bench_ring import bench_ring

    workdir = Path(tempfile.mkdtemp(prefix="vne-bench-"))
    try:
        with _pinned(BACKEND_CPU):
            ring = bench_ring(seconds=seconds)["shapes"]["1-descriptor"]
        null = _measure_service(workdir, "null", _null_backend, seconds)
        tap, raw = _measure_tap(workdir, seconds)
        dpdk = _measure_dpdk_vhost(workdir, seconds)
    finally:
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()
    bare = ring["bare_chains_per_second"]
    ratios = {
        "null_vs_bare_ring": round(null["frames_per_second"] / bare, 3),
        "tap_vs_raw_write": round(
            tap["frames_per_second"] / raw["frames_per_second"], 3
        ),
        "null_vs_dpdk_vhost": round(
            null["frames_per_second"] / dpdk["frames_per_second"], 3
        ),
    }
    return {
        "seconds": seconds,
        "frame_len": FRAME_LEN,
        "ring": {"bare_chains_per_second": bare},
        "null": null,
        "tap": tap,
        "raw_tap_write": raw,
        "dpdk_vhost": dpdk,
        "ratios": ratios,
        "goals": {
            name: {"target": target, "met": ratios[name] >= target}
            for name, target in GOALS.items()
        },
        "machine": _machine(),
    }


def _check_requirements() -> None:
    if testpmd_path() is None:
        raise UserError("dpdk-testpmd not found; install the dpdk-dev package")
    if os.geteuid() != 0:
        raise UserError("bench vhost-user needs root (DPDK, TAP, namespace)")
    if not {0, 1} <= os.sched_getaffinity(0):
        raise UserError("bench vhost-user needs CPUs 0 and 1")


# -- this back-end ----------------------------------------------------------------


def _null_backend() -> Backend:
    from backends.loopback import NullBackend

    return NullBackend()


def _measure_service(
    workdir: Path, name: str, open_backend: Callable[[], Backend], seconds: float
) -> dict[str, Any]:
    """Serve testpmd's txonly with a ``NetService`` on CPU 0 and measure it."""
    from .vhost_user.service import NetService

    socket_path = workdir / f"{name}.sock"
    service = NetService(socket_path, open_backend())
    thread = threading.Thread(target=_run_pinned, args=(service,), daemon=True)
    thread.start()
    try:
        testpmd = Testpmd(
            virtio_user_vdev(socket_path),
            f"vnebench{os.getpid()}{name}",
            workdir / f"testpmd-{name}.out",
            app_options=_TXONLY,
        )
        with testpmd:
            testpmd.start()
            testpmd.start_forwarding()
            time.sleep(WARMUP_SECONDS)
            first = _snapshot(service)
            time.sleep(seconds)
            last = _snapshot(service)
            testpmd.stop_forwarding()
    finally:
        service.stop()
        thread.join(10)
        service.close()
    return _rates(first, last)


def _run_pinned(service: Any) -> None:
    os.sched_setaffinity(0, {BACKEND_CPU})
    service.run()


def _snapshot(service: Any) -> tuple[float, int, int, int, int]:
    stats = service.device.stats.queue(TX_QUEUE)
    return (
        time.monotonic(),
        stats.frames,
        stats.kicks,
        stats.interrupts,
        stats.interrupts_suppressed,
    )


def _rates(
    first: tuple[float, int, int, int, int], last: tuple[float, int, int, int, int]
) -> dict[str, Any]:
    elapsed = last[0] - first[0]
    frames, kicks, interrupts, suppressed = (
        after - before for after, before in zip(last[1:], first[1:], strict=True)
    )
    per_frame = max(frames, 1)
    return {
        "frames_per_second": round(frames / elapsed),
        "kicks_per_frame": round(kicks / per_frame, 5),
        "interrupts_per_frame": round(interrupts / per_frame, 5),
        "interrupts_suppressed_per_frame": round(suppressed / per_frame, 5),
    }


def _measure_tap(workdir: Path, seconds: float) -> tuple[dict, dict]:
    """Measure the TAP path and the raw write loop on one TAP in a namespace."""
    from backends.netns import network_namespace
    from backends.tap import TapBackend

    with network_namespace() as namespace:

        def open_tap() -> Backend:
            return TapBackend("vnebench%d", netns=namespace)

        tap = _measure_service(workdir, "tap", open_tap, seconds)
        # Closing the service deleted its TAP, so the raw loop gets a new one
        # in the same namespace.
        with TapBackend("vnebench%d", netns=namespace) as raw_tap, _pinned(BACKEND_CPU):
            raw = _raw_write_rate(raw_tap.fileno(), raw_tap.header_size, seconds)
    return tap, raw


def _raw_write_rate(fd: int, header_size: int, seconds: float) -> dict[str, Any]:
    data = bytes(header_size) + _RAW_FRAME
    write = os.write
    count = busy = 0
    start = time.monotonic()
    deadline = start + seconds
    while True:
        for _ in range(1000):
            try:
                write(fd, data)
            except BlockingIOError:
                busy += 1
        count += 1000
        now = time.monotonic()
        if now >= deadline:
            break
    return {"frames_per_second": round((count - busy) / (now - start))}


# -- DPDK's back-end -------------------------------------------------------------


def _measure_dpdk_vhost(workdir: Path, seconds: float) -> dict[str, Any]:
    """Measure testpmd's net_vhost receiving from testpmd's virtio-user."""
    socket_path = workdir / "dpdk-vhost.sock"
    backend = Testpmd(
        f"net_vhost0,iface={socket_path},queues=1",
        f"vnebench{os.getpid()}vhost",
        workdir / "testpmd-vhost.out",
        app_options=(
            "--total-num-mbufs=16384",
            "--nb-cores=1",
            "--forward-mode=rxonly",
        ),
        # Forwarding on CPU 0, where this back-end runs in the other runs.
        main_lcore=1,
    )
    frontend = Testpmd(
        virtio_user_vdev(socket_path),
        f"vnebench{os.getpid()}front",
        workdir / "testpmd-front.out",
        app_options=_TXONLY,
    )
    with backend, frontend:
        backend.start()
        backend.start_forwarding()
        frontend.start()
        frontend.start_forwarding()
        time.sleep(WARMUP_SECONDS)
        backend.throughput()
        time.sleep(seconds)
        received_pps, _ = backend.throughput()
        frontend.stop_forwarding()
        backend.stop_forwarding()
    return {
        "frames_per_second": received_pps,
        "kicks_per_frame": None,
        "interrupts_per_frame": None,
    }


# -- helpers ---------------------------------------------------------------------


@contextlib.contextmanager
def _pinned(cpu: int) -> Iterator[None]:
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def _machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }
