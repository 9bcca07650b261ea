"""Count virtqueue kicks and interrupts from a QEMU trace log, per queue.

QEMU (checked with 7.2) writes one line per enabled trace event to the ``-D``
file, for example::

    virtio_queue_notify vdev 0x55dbd43a2c30 n 1 vq 0x7fc0a0e900a8
    virtio_notify vdev 0x55dbd43a2c30 vq 0x7fc0a0e900a8
    serial_write write addr 0x00 val 0x56

``virtio_queue_notify`` is a driver kick (a write to the queue's notify
register) and names the queue index. ``virtio_notify`` is a used-buffer
notification that passed the event index or NO_INTERRUPT check, so it raises
the interrupt, and names only the VirtQueue pointer. The index of that
pointer comes from the kicks. ``serial_write`` events rebuild the console
text in the same order as the virtio events, so the guest's ``VNE-MARK
udp-begin`` and ``VNE-MARK udp-end`` lines cut the log into one window per udp
step.

NOTE: with ioeventfd, QEMU handles kicks without ``virtio_queue_notify``. QEMU
enables ioeventfd only under KVM, so these counts hold for ``-accel tcg`` only.
For vhost-user the data queues are kicked in the backend, so QEMU traces no
kicks for them at all.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable

__all__ = [
    "CONTROL_QUEUE",
    "RX_QUEUE",
    "TRACE_EVENTS",
    "TX_QUEUE",
    "KickTrace",
    "QueueCounts",
    "parse_kick_trace",
]

#: Queue indices of a virtio-net device with one queue pair (virtio 1.2,
#: 5.1.2): receiveq1, transmitq1, then controlq.
RX_QUEUE = 0
TX_QUEUE = 1
CONTROL_QUEUE = 2

#: Events to pass to ``qemu-system-x86_64 -trace`` for ``parse_kick_trace``.
TRACE_EVENTS = ("virtio_queue_notify", "virtio_notify", "serial_write")

_KICK = re.compile(r"virtio_queue_notify vdev (0x[0-9a-f]+) n (\d+) vq (0x[0-9a-f]+)")
_NOTIFY = re.compile(r"virtio_notify vdev (0x[0-9a-f]+) vq (0x[0-9a-f]+)")
_SERIAL = re.compile(r"serial_write write addr 0x([0-9a-f]+) val 0x([0-9a-f]+)")

# 16550 UART registers: offset 0 is the transmit holding register unless the
# divisor latch access bit (bit 7 of the line control register at offset 3)
# is set, when it is the divisor latch instead.
_UART_DATA = 0
_UART_LINE_CONTROL = 3
_UART_DLAB = 0x80

_BEGIN_MARK = "VNE-MARK udp-begin"
_END_MARK = "VNE-MARK udp-end"


@dataclasses.dataclass
class QueueCounts:
    """Kicks (driver to device) and interrupts (device to driver) of one queue."""

    kicks: int = 0
    interrupts: int = 0


@dataclasses.dataclass
class KickTrace:
    """Per-queue counts of a whole run and of each marked udp window."""

    total: dict[int, QueueCounts]
    #: One dict per ``udp-begin``/``udp-end`` pair, in order.
    windows: list[dict[int, QueueCounts]]
    #: Interrupts of VirtQueues that the driver never kicked, by pointer.
    unmapped_interrupts: dict[str, int]
    #: Console text rebuilt from ``serial_write`` events.
    console: str


class _Counter:
    """Counts per VirtQueue pointer until the pointers can be mapped to indices."""

    def __init__(self) -> None:
        self.kicks: collections.Counter[int] = collections.Counter()
        self.interrupts: collections.Counter[str] = collections.Counter()

    def resolve(self, index_of: dict[str, int]) -> dict[int, QueueCounts]:
        counts: dict[int, QueueCounts] = collections.defaultdict(QueueCounts)
        for index, kicks in self.kicks.items():
            counts[index].kicks += kicks
        for pointer, interrupts in self.interrupts.items():
            if pointer in index_of:
                counts[index_of[pointer]].interrupts += interrupts
        return dict(counts)


def parse_kick_trace(lines: Iterable[str]) -> KickTrace:
    """Count kicks and interrupts per queue in a QEMU trace log.

    Raises ValueError when the udp marks do not pair up (a begin inside a
    window, or an end outside one), naming the mark's line number.
    """
    index_of: dict[str, int] = {}
    total = _Counter()
    windows: list[_Counter] = []
    window: _Counter | None = None
    console: list[str] = []
    current_line: list[str] = []
    divisor_latch = False

    for number, line in enumerate(lines, start=1):
        if match := _KICK.search(line):
            index = int(match.group(2))
            index_of[match.group(3)] = index
            total.kicks[index] += 1
            if window is not None:
                window.kicks[index] += 1
        elif match := _NOTIFY.search(line):
            total.interrupts[match.group(2)] += 1
            if window is not None:
                window.interrupts[match.group(2)] += 1
        elif match := _SERIAL.search(line):
            register = int(match.group(1), 16)
            value = int(match.group(2), 16)
            if register == _UART_LINE_CONTROL:
                divisor_latch = bool(value & _UART_DLAB)
                continue
            if register != _UART_DATA or divisor_latch:
                continue
            character = chr(value)
            if character != "\n":
                current_line.append(character)
                continue
            text = "".join(current_line).rstrip("\r")
            current_line.clear()
            console.append(text)
            if _BEGIN_MARK in text:
                if window is not None:
                    raise ValueError(
                        f"trace line {number}: {_BEGIN_MARK} inside a window"
                    )
                window = _Counter()
                windows.append(window)
            elif _END_MARK in text:
                if window is None:
                    raise ValueError(
                        f"trace line {number}: {_END_MARK} outside a window"
                    )
                window = None

    if current_line:
        console.append("".join(current_line))
    unmapped = {
        pointer: count
        for pointer, count in total.interrupts.items()
        if pointer not in index_of
    }
    return KickTrace(
        total=total.resolve(index_of),
        windows=[counter.resolve(index_of) for counter in windows],
        unmapped_interrupts=unmapped,
        console="\n".join(console),
    )
