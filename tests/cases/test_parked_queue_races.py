"""A parked TX queue stopped, reset or kicked, and the --ring-poll-us option.

A parked policy keeps one ring-check timer. A second park must not leave the
first timer armed and unreachable, because ``cancel`` (queue stop, reset,
break) can then cancel only the newer one, and the older one later flushes a
queue that the device no longer owns.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from backends.loopback import LoopbackBackend
from device.cli import main
from device.clock import VirtualClock
from device.net_device import VirtioNetDevice
from device.notifier import CallbackInterrupt
from virtio import DeviceStatus, GuestMemory, MemoryRegion, RingLayout, VirtioFeature

TX = 1
HEADER = bytes(12)
PARK_NS = 1_000_000
DESC = struct.Struct("<QIHH")
RING_BASE = 0x1000
DATA_BASE = 0x40000


class TxGuest:
    """The driver side of a TX ring of one-descriptor chains."""

    def __init__(self, memory: GuestMemory, layout: RingLayout) -> None:
        self.memory = memory
        self.layout = layout
        self.avail_idx = 0

    def add(self, number: int) -> None:
        """Post one 60-byte frame whose last byte is ``number``, without a kick."""
        head = self.avail_idx % self.layout.size
        address = DATA_BASE + 0x1000 * head
        frame = bytes.fromhex("ffffffffffff020000000002 88b5") + bytes(45)
        data = HEADER + frame + bytes([number])
        self.memory.write(address, data)
        descriptor = DESC.pack(address, len(data), 0, 0)
        self.memory.write(self.layout.desc + 16 * head, descriptor)
        slot = self.avail_idx % self.layout.size
        self.memory.write(self.layout.avail_ring_addr(slot), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.layout.avail_idx_addr, struct.pack("<H", self.avail_idx))

    @property
    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(self.layout.used_idx_addr, 2))[0]


def start_parking_device(
    mode: str, event_idx: bool
) -> tuple[VirtioNetDevice, TxGuest, LoopbackBackend]:
    memory = GuestMemory([MemoryRegion(0, bytearray(0x100000))])
    layout = RingLayout.packed_after(32, RING_BASE)
    backend = LoopbackBackend()
    device = VirtioNetDevice(
        backend,
        clock=VirtualClock(),
        interrupts=CallbackInterrupt(),
        tx_mode=mode,
        ring_poll_ns=PARK_NS,
    )
    features = VirtioFeature.VERSION_1
    if event_idx:
        features |= VirtioFeature.EVENT_IDX
    acknowledge = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
    device.write_status(DeviceStatus.ACKNOWLEDGE)
    device.write_status(acknowledge)
    device.write_driver_features(features)
    device.write_status(acknowledge | DeviceStatus.FEATURES_OK)
    device.set_memory(memory)
    device.setup_queue(TX, layout)
    device.write_status(acknowledge | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)
    return device, TxGuest(memory, layout), backend


def sent_numbers(backend: LoopbackBackend) -> list[int]:
    numbers = []
    while (record := backend.pop_sent()) is not None:
        numbers.append(record[1][-1])
    return numbers


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("mode", ["immediate", "bh", "timer"])
def test_kick_while_parked_then_restart(mode: str, event_idx: bool) -> None:
    # A kick can reach a parked queue when the driver kicked just before it
    # saw notifications go off, and it parks the policy a second time. After
    # GET_VRING_BASE and a restart, the stopped policy must not flush the old
    # queue object, so that each frame goes out once.
    device, guest, backend = start_parking_device(mode, event_idx)
    guest.add(1)
    device.handle_kick(TX)
    device.clock.advance(200_000)
    assert device.tx_policy.parked

    guest.add(2)
    device.handle_kick(TX)
    device.clock.advance(200_000)
    assert device.tx_policy.parked

    last_avail = device.stop_queue(TX)
    assert last_avail == 2
    device.set_memory(guest.memory)
    device.setup_queue(TX, guest.layout, last_avail, guest.used_idx)

    guest.add(3)
    device.handle_kick(TX)
    device.clock.advance(2 * PARK_NS)

    assert sent_numbers(backend) == [1, 2, 3]
    assert guest.used_idx == 3


@pytest.mark.parametrize("mode", ["immediate", "bh", "timer"])
def test_reset_while_parked_leaves_no_timer(mode: str) -> None:
    device, guest, backend = start_parking_device(mode, event_idx=False)
    guest.add(1)
    device.handle_kick(TX)
    device.clock.advance(5_000)
    guest.add(2)
    device.handle_kick(TX)
    device.clock.advance(5_000)

    device.write_status(0)

    # Nothing may run on the reset device's clock any more.
    assert device.clock.next_deadline() is None


def run_vhost_user_cli(capsys, tmp_path: Path, value: str) -> tuple[int, str]:
    code = main(
        [
            "vhost-user",
            "--socket",
            str(tmp_path / "net.sock"),
            "--to",
            "null",
            "--duration",
            "0.1",
            f"--ring-poll-us={value}",
        ]
    )
    return code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-nan"])
def test_ring_poll_us_not_finite_rejected(tmp_path: Path, capsys, value: str) -> None:
    code, output = run_vhost_user_cli(capsys, tmp_path, value)
    assert code == 2
    assert "invalid --ring-poll-us" in output
