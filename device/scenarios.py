"""Named traffic scenarios: each returns a ``Machine`` with its traffic scheduled.

Every scenario takes ``tx_mode``, ``queue_size`` and ``max_skb_frags`` first,
then options of its own, and returns a machine that has not run yet: call
``run()``, or drive ``step()`` (or ``steps()``) to go event by event, as the
step debugger does. The trace is on unless ``trace=False``.

- ``figure``: the classic TX path with every one of the 23 steps. A first
  burst fills the ring so that the TX timer flushes it between the last
  packet's ``xmit_skb`` and its used check. ``enable_cb_delayed`` then
  fails and steps 19 to 23 run. A second burst fills the ring again and
  waits for the interrupt (step 18).
- ``saturate``: a steady stream faster than the guest and device drain it.
- ``trickle``: one packet per long interval, so every packet kicks.
- ``legacy-stall``: a burst longer than ``tx_burst`` and then silence; with
  ``timer-legacy`` the rest of the burst stays in the ring.
- ``capture``: the frames of a list or a pcap/pcapng file at a fixed rate,
  or at the capture's own pace.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .guest import DEFAULT_MAX_SKB_FRAGS, GuestConfig
from .machine import TX_QUEUE, Machine
from .tx_policy import DEFAULT_TX_BURST, DEFAULT_TX_TIMEOUT_NS

__all__ = [
    "SCENARIOS",
    "build_scenario",
    "figure",
    "saturate",
    "trickle",
    "legacy_stall",
    "capture",
    "make_frame",
    "frame_number",
    "SAMPLE_CAPTURE",
]

SAMPLE_CAPTURE = Path(__file__).with_name("data") / "sample.pcap"
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("525400abcdef")
ETHERTYPE_LOCAL = 0x88B5
"""IEEE 802 local experimental EtherType: frames that mean nothing to a stack."""
_SEQUENCE = struct.Struct("!I")
MIN_FRAME = 60


def make_frame(number: int, length: int = MIN_FRAME) -> bytes:
    """Return an Ethernet frame of ``length`` bytes that carries ``number``.

    ``frame_number`` reads the number back, so tests can check order and
    uniqueness at the backend. Raises ``ValueError`` below 18 bytes.
    """
    if length < 18:
        raise ValueError(f"frame length {length} is too short: use 18 bytes or more")
    header = PEER_MAC + GUEST_MAC + struct.pack("!H", ETHERTYPE_LOCAL)
    body = _SEQUENCE.pack(number & 0xFFFF_FFFF)
    padding = bytes((number + i) & 0xFF for i in range(length - 18))
    return header + body + padding


def frame_number(frame: bytes) -> int:
    """Return the number ``make_frame`` put into ``frame``."""
    return _SEQUENCE.unpack_from(frame, 14)[0]


def _machine(
    tx_mode: str,
    queue_size: int,
    max_skb_frags: int,
    options: dict[str, Any],
    **guest_defaults: Any,
) -> Machine:
    """Build a machine from scenario options: guest fields and machine fields."""
    guest_fields = set(GuestConfig.__dataclass_fields__)
    guest_options = {**guest_defaults}
    machine_options = {"trace": True}
    for name, value in options.items():
        if name in guest_fields:
            guest_options[name] = value
        else:
            machine_options[name] = value
    config = GuestConfig(
        queue_size=queue_size, max_skb_frags=max_skb_frags, **guest_options
    )
    return Machine(guest=config, tx_mode=tx_mode, **machine_options)


# -- figure --------------------------------------------------------------------


def figure(
    tx_mode: str = "timer",
    queue_size: int = 256,
    max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS,
    **options: Any,
) -> Machine:
    """Return a machine whose classic TX path runs all 23 steps.

    Each packet takes two descriptors (no indirect table, header in its own
    buffer), so the ring fills before the TX timer fires. The packet that
    stops the queue is timed so that the timer flush lands between its
    ``xmit_skb`` and the used check. ``enable_cb_delayed`` then finds more
    than 3/4 of the outstanding buffers used, so the driver reclaims at once
    (steps 19 to 23). A second burst fills the ring before the next timer
    and waits for the interrupt (step 18).

    The timing comes from running the same machine ahead, so it holds for
    any costs that leave time between the add and the used check. When the ring cannot fill within the TX timeout (a large
    queue), the timeout is doubled until it can, unless ``tx_timeout_ns``
    was given; ``tx_burst`` defaults to at least the queue size, so one
    flush completes more than 3/4 of the outstanding buffers. With a mode other than ``timer`` or ``timer-legacy`` no
    timer is pending and the packet that stops the queue is simply sent
    next.
    """
    defaults = {"variant": "classic", "indirect": False, "can_push": False}
    options = dict(options)
    adapt = "tx_timeout_ns" not in options
    options.setdefault("tx_timeout_ns", DEFAULT_TX_TIMEOUT_NS)
    options.setdefault("tx_burst", max(DEFAULT_TX_BURST, queue_size))
    for _ in range(FIGURE_TIMEOUT_DOUBLINGS):
        probe = _machine(tx_mode, queue_size, max_skb_frags, options, **defaults)
        arrivals, stopper_at = _figure_timing(probe)
        if not adapt or probe.device.stats.queue(TX_QUEUE).timer_fires == 0:
            break
        options["tx_timeout_ns"] *= 2
    machine = _machine(tx_mode, queue_size, max_skb_frags, options, **defaults)
    for number, when in enumerate(arrivals):
        machine.send(make_frame(number), when)
    machine.send(make_frame(len(arrivals)), stopper_at)
    first = len(arrivals) + 1
    frames = [make_frame(first + i) for i in range(queue_size // 2 + 8)]
    machine.send_many(frames, start_ns=stopper_at + FIGURE_PAUSE_NS)
    return machine


FIGURE_TIMEOUT_DOUBLINGS = 6
FIGURE_PAUSE_NS = 20_000
"""Idle time between the packet that stops the queue and the second burst."""


def _figure_timing(probe: Machine) -> tuple[list[int], int]:
    """Time the first burst and the packet that stops the queue on ``probe``.

    Sends packets back to back while the next one would not stop the queue.
    Returns their arrival times and the arrival time of the next packet,
    chosen so the pending TX timer fires between its add and its used check.
    """
    probe.run()
    tx = probe.guest.tx
    threshold = probe.guest.config.stop_threshold
    indirect = probe.guest.queues[TX_QUEUE].indirect_area is not None
    per_packet = 1 if tx.can_push or indirect else 2
    arrivals: list[int] = []
    limit = 4 * tx.queue.size
    while tx.queue.num_free - per_packet >= threshold and len(arrivals) < limit:
        now = probe.now_ns
        probe.send(make_frame(len(arrivals)), now)
        probe.run_until(now)
        arrivals.append(now)
    start = probe.now_ns
    deadline = probe.clock.next_deadline()
    if deadline is None or deadline <= start:
        return arrivals, start
    costs = probe.guest.config.costs
    # From arrival to the record of step 3: the qdisc, steps 1 and 2 (nothing
    # is used yet, so step 2 reclaims nothing). The flush must come after
    # the add and before enable_cb_delayed reads used.idx.
    before_add = costs.qdisc_dequeue + costs.start_xmit + costs.free_old_xmit
    window = costs.xmit_skb + costs.kick_prepare + costs.capacity_check
    stopper_at = deadline - before_add - max(1, window // 2)
    return arrivals, max(start, stopper_at)


# -- steady streams ----------------------------------------------------------------


def saturate(
    tx_mode: str = "bh",
    queue_size: int = 256,
    max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS,
    *,
    count: int = 2000,
    gap_ns: int = 400,
    length: int = MIN_FRAME,
    **options: Any,
) -> Machine:
    """Return a machine with ``count`` frames arriving ``gap_ns`` apart.

    At the default costs the guest spends about 650 ns per packet, so frames
    400 ns apart arrive faster than the guest and the device drain them: the
    qdisc grows and the ring fills.
    """
    machine = _machine(tx_mode, queue_size, max_skb_frags, options)
    machine.send_many((make_frame(i, length) for i in range(count)), gap_ns)
    return machine


def trickle(
    tx_mode: str = "bh",
    queue_size: int = 256,
    max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS,
    *,
    count: int = 10,
    interval_ns: int = 1_000_000,
    length: int = MIN_FRAME,
    **options: Any,
) -> Machine:
    """Return a machine with one frame every ``interval_ns`` (default 1 ms)."""
    machine = _machine(tx_mode, queue_size, max_skb_frags, options)
    start = machine.now_ns
    for i in range(count):
        machine.send(make_frame(i, length), start + i * interval_ns)
    return machine


def legacy_stall(
    tx_mode: str = "timer-legacy",
    queue_size: int = 256,
    max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS,
    *,
    tx_burst: int = 64,
    burst: int | None = None,
    **options: Any,
) -> Machine:
    """Return a machine that sends one burst longer than ``tx_burst``, then idles.

    The burst (default: 1.5 times ``tx_burst``) fits the ring without
    stopping the queue. With ``timer-legacy`` the timer flushes one burst,
    turns kicks back on and never re-arms, so the rest of the chains stay in
    the ring until the guest kicks again, which an idle guest never does.
    With ``timer`` a full burst re-arms the timer and everything goes out.
    """
    if burst is None:
        burst = tx_burst + tx_burst // 2
    options.setdefault("variant", "napi")
    machine = _machine(
        tx_mode, queue_size, max_skb_frags, options | {"tx_burst": tx_burst}
    )
    room = queue_size - (2 + max_skb_frags)
    if burst > room:
        raise ValueError(
            f"a burst of {burst} would stop the queue of {queue_size}: use at most"
            f" {room} frames"
        )
    machine.send_many(make_frame(i) for i in range(burst))
    return machine


# -- captures ----------------------------------------------------------------------


def capture(
    tx_mode: str = "bh",
    queue_size: int = 256,
    max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS,
    *,
    frames: Sequence[bytes] | None = None,
    path: str | os.PathLike[str] | None = None,
    rate_pps: float | None = None,
    **options: Any,
) -> Machine:
    """Return a machine that sends captured frames.

    ``frames`` are sent as given; otherwise the frames of the pcap or
    pcapng file at ``path`` (default: the bundled sample capture). With
    ``rate_pps`` frames are evenly spaced. Without it they keep the
    capture's own gaps, so a list or a capture without timestamps is sent
    back to back. Raises ``ValueError`` for a rate of 0 or less.
    """
    if rate_pps is not None and not rate_pps > 0:
        raise ValueError(f"rate of {rate_pps} frames per second is invalid: use > 0")
    timed = _capture_frames(frames, path)
    longest = max((len(frame) for _, frame in timed), default=MIN_FRAME)
    options.setdefault("tx_max_frame", max(longest, 1518))
    machine = _machine(tx_mode, queue_size, max_skb_frags, options)
    start = machine.now_ns
    for index, (offset_ns, frame) in enumerate(timed):
        if rate_pps is not None:
            offset_ns = round(index * 1e9 / rate_pps)
        machine.send(frame, start + offset_ns)
    return machine


def _capture_frames(
    frames: Iterable[bytes] | None, path: str | os.PathLike[str] | None
) -> list[tuple[int, bytes]]:
    """Return (offset in ns, frame) pairs from a list or a capture file."""
    if frames is not None:
        return [(0, bytes(frame)) for frame in frames]
    from backends.pcap import read_capture

    timed = []
    first: float | None = None
    for timestamp, frame in read_capture(path or SAMPLE_CAPTURE):
        if math.isnan(timestamp):
            offset = 0
        else:
            first = timestamp if first is None else first
            offset = max(0, round((timestamp - first) * 1e9))
        timed.append((offset, frame))
    return timed


SCENARIOS: dict[str, Callable[..., Machine]] = {
    "figure": figure,
    "saturate": saturate,
    "trickle": trickle,
    "legacy-stall": legacy_stall,
    "capture": capture,
}
"""Scenario functions by name."""


def build_scenario(
    name: str,
    tx_mode: str | None = None,
    queue_size: int = 256,
    max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS,
    **options: Any,
) -> Machine:
    """Build the scenario called ``name``; None for ``tx_mode`` keeps its default.

    Raises ``ValueError`` naming an unknown scenario.
    """
    scenario = SCENARIOS.get(name)
    if scenario is None:
        names = ", ".join(SCENARIOS)
        raise ValueError(f"unknown scenario {name!r}: use one of {names}")
    if tx_mode is None:
        return scenario(queue_size=queue_size, max_skb_frags=max_skb_frags, **options)
    return scenario(tx_mode, queue_size, max_skb_frags, **options)
