"""Bad-input cases that need the driver to act in the middle of device work.

The case format runs driver actions only between device steps. The tests
here run them at a precise point inside the device instead: at a memory
fence (``GuestMemory.fence``, which ``DeviceQueue`` calls exactly between a
store and a later load), inside a backend call, or around one
``DeviceQueue`` method. Each builds its rings with a ``CaseRun`` and then
drives the device by hand.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from backends.base import SendStatus
from device.case import CaseRun, load_case
from device.features import DEFAULT_OFFER, NET_DEPENDENCIES, NetFeature
from device.net_device import VirtioNetDevice
from virtio import (
    DeviceQueue,
    DeviceStatus,
    FeatureError,
    VirtioFeature,
    need_event,
    validate_features,
)

V1 = "VIRTIO_F_VERSION_1"
EI = "VIRTIO_RING_F_EVENT_IDX"
MRG = "VIRTIO_NET_F_MRG_RXBUF"
FRAME = bytes.fromhex("525400123456525400000001" "0800") + bytes(range(46))
HEADER = bytes(12)
DESC = struct.Struct("<QIHH")


def frame(length: int, seed: int = 1) -> bytes:
    head = (
        bytes.fromhex("525400123456") + bytes([0x52, 0x54, 0, 0, 0, seed]) + b"\x08\0"
    )
    return head + bytes((seed + i) & 0xFF for i in range(length - len(head)))


def start(
    features: list[str], queues: dict[str, dict], *, status: int = 15, **extra: Any
) -> CaseRun:
    """Return a running ``CaseRun`` with ``queues`` set up and nothing written."""
    body = {
        "format": "virtio-net-case/1",
        "description": "race harness",
        "features": features,
        "memory": [{"gpa": 0, "size": 0x100000}],
        "queues": queues,
        "status": status,
        **extra,
    }
    run = CaseRun(load_case(body))
    for step in run.steps():
        run.apply(step)
    return run


def queue(size: int, desc: int = 0x1000, avail: int = 0x2000, used: int = 0x3000):
    return {"size": size, "desc": desc, "avail": avail, "used": used}


class Driver:
    """Raw driver-side access to one queue laid out by ``queue``."""

    def __init__(self, run: CaseRun, index: int) -> None:
        self.run = run
        self.memory = run.memory
        self.layout = run.queue_setups[index].layout
        self.avail_idx = 0

    def desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0):
        self.memory.write(
            self.layout.desc + 16 * index, DESC.pack(addr, length, flags, nxt)
        )

    def post(self, *heads: int) -> None:
        for head in heads:
            slot = self.avail_idx % self.layout.size
            self.u16(self.layout.avail_ring_addr(slot), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.u16(self.layout.avail_idx_addr, self.avail_idx)

    def u16(self, address: int, value: int) -> None:
        self.memory.write(address, struct.pack("<H", value))

    def read_u16(self, address: int) -> int:
        return struct.unpack("<H", self.memory.read(address, 2))[0]

    @property
    def used_idx(self) -> int:
        return self.read_u16(self.layout.used_idx_addr)

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack(
            "<II", self.memory.read(self.layout.used_elem_addr(slot), 8)
        )

    def used_ring_bytes(self) -> bytes:
        return self.memory.read(self.layout.used, self.layout.used_bytes)


def around(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    hook: Callable[[DeviceQueue], None],
    once: bool = True,
) -> list[int]:
    """Run ``hook(queue)`` before each call of ``DeviceQueue.name``; return the count."""
    original = getattr(DeviceQueue, name)
    calls = [0]

    def wrapper(self: DeviceQueue, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if not once or calls[0] == 1:
            hook(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeviceQueue, name, wrapper)
    return calls


# -- no lost wakeup when re-enabling notifications with EVENT_IDX ----------------------


def test_rx_refill_during_reenable_needs_no_kick(monkeypatch) -> None:
    run = start([V1, EI, MRG], {"0": queue(8)})
    driver = Driver(run, 0)
    for k in range(8):
        driver.desc(k, 0x20000 + k * 0x1000, 1000, 2)
    driver.post(0, 1, 2)
    decisions = []

    def refill(queue: DeviceQueue) -> None:
        # The device found too few buffers at avail.idx 3 and is about to
        # write avail_event. The driver posts three more and evaluates the
        # kick test with the avail_event it reads, but does not kick at all.
        old = driver.avail_idx
        driver.post(3, 4, 5)
        avail_event = driver.read_u16(driver.layout.avail_event_addr)
        decisions.append(need_event(avail_event, driver.avail_idx, old))

    around(monkeypatch, "enable_notification", refill)
    data = frame(4000)

    run.device.receive(None, data)

    assert decisions, "the device never re-enabled notifications"
    assert run.backend.frames_sent == 0
    assert driver.used_idx == 5
    lengths = [driver.used_elem(slot)[1] for slot in range(5)]
    assert lengths == [1000, 1000, 1000, 1000, 12]
    header = run.memory.read(0x20000, 12)
    assert struct.unpack_from("<H", header, 10)[0] == 5
    assert len(run.device.rx.held) == 0


# -- used.idx is stored before avail.flags is read -------------------------------------


def test_flags_read_after_used_idx_store(monkeypatch) -> None:
    run = start([V1], {"1": queue(4)})
    driver = Driver(run, 1)
    driver.memory.write(0x10000, HEADER + FRAME)
    driver.desc(0, 0x10000, 72)
    driver.u16(driver.layout.avail, 1)  # NO_INTERRUPT
    driver.post(0)
    seen = []

    def driver_turns_interrupts_on(queue: DeviceQueue) -> None:
        # The used element is written, used.idx not yet. The driver clears
        # NO_INTERRUPT, reads used.idx, finds no new work and goes idle.
        driver.u16(driver.layout.avail, 0)
        seen.append(driver.used_idx)

    around(monkeypatch, "publish", driver_turns_interrupts_on)

    run.device.handle_kick(1)

    assert seen == [0]
    assert driver.used_idx == 1
    assert run.interrupts.interrupts == {1: 1}


# -- len is written before used.idx ----------------------------------------------------


@pytest.mark.parametrize("direction", ["rx", "tx"])
def test_used_len_set_before_used_idx(direction: str) -> None:
    run = start([V1], {"0": queue(4), "1": queue(4, 0x4000, 0x5000, 0x6000)})
    index = 0 if direction == "rx" else 1
    driver = Driver(run, index)
    driver.memory.write(driver.layout.used + 4, b"\xff" * 32)  # stale garbage
    if direction == "rx":
        driver.desc(0, 0x20000, 1526, 2)
    else:
        driver.memory.write(0x10000, HEADER + FRAME)
        driver.desc(0, 0x10000, 72)
    driver.post(0)
    at_fence = []

    def fence() -> None:
        idx = driver.used_idx
        if idx:
            at_fence.append((idx, driver.used_elem(0)))

    run.memory.fence = fence

    if direction == "rx":
        run.device.receive(None, FRAME)
    else:
        run.device.handle_kick(1)

    expected_len = 72 if direction == "rx" else 0
    assert at_fence, "no fence after the used.idx store"
    assert at_fence[0] == (1, (0, expected_len))


# -- a reset during a transmit or a delivery -------------------------------------------


def test_reset_inside_backend_send(monkeypatch) -> None:
    run = start([V1, EI], {"1": queue(4)})
    driver = Driver(run, 1)
    for k in range(2):
        driver.memory.write(0x10000 + k * 0x1000, HEADER + frame(60, k + 1))
        driver.desc(k, 0x10000 + k * 0x1000, 72)
    driver.post(0, 1)
    at_reset = {}
    send = run.backend.send

    def send_then_reset(header, parts):
        status = send(header, parts)
        if not at_reset:
            run.device.write_status(0)
            at_reset["status"] = int(run.device.status.value)
            at_reset["used"] = driver.used_ring_bytes()
        return status

    monkeypatch.setattr(run.backend, "send", send_then_reset)

    run.device.handle_kick(1)

    assert at_reset["status"] == 0
    assert run.device.status.value == 0
    assert run.backend.frames_sent == 1
    assert driver.used_ring_bytes() == at_reset["used"]
    assert driver.used_idx == 0
    assert run.interrupts.interrupts == {}
    assert run.interrupts.config_interrupts == 0


def test_reset_inside_rx_delivery(monkeypatch) -> None:
    run = start([V1, MRG], {"0": queue(4)})
    driver = Driver(run, 0)
    for k in range(3):
        driver.desc(k, 0x20000 + k * 0x1000, 1000, 2)
        driver.memory.write(0x20000 + k * 0x1000, b"\xee" * 1000)
    driver.post(0, 1, 2)
    at_reset = []

    def reset(queue: DeviceQueue) -> None:
        # The first buffer is written; the driver resets before its used
        # element is added.
        run.device.write_status(0)
        at_reset.append(driver.used_ring_bytes())

    around(monkeypatch, "add_used", reset)

    run.device.receive(None, frame(2500))

    assert run.device.status.value == 0
    assert driver.used_ring_bytes() == at_reset[0]
    assert driver.used_idx == 0
    assert run.memory.read(0x21000, 1000) == b"\xee" * 1000
    assert run.memory.read(0x22000, 1000) == b"\xee" * 1000
    assert run.interrupts.interrupts == {}
    assert run.device.stats.drops["queue-stopped"] == 1


def test_busy_transmit_does_not_survive_reset() -> None:
    run = start([V1], {"1": queue(4)})
    driver = Driver(run, 1)
    driver.memory.write(0x10000, HEADER + FRAME)
    driver.desc(0, 0x10000, 72)
    driver.post(0)
    run.backend.fail_sends(1, SendStatus.BUSY)
    run.device.handle_kick(1)
    assert driver.used_idx == 0

    run.write_status(0)
    run.device.backend_writable()
    used_after_reset = driver.used_ring_bytes()
    run.write_status(15)
    run.device.handle_kick(1)

    assert used_after_reset[2:4] == b"\0\0"
    assert run.backend.sent_frames() == [FRAME]
    assert driver.used_idx == 1
    assert run.device.error is None
    assert run.device.queues[1].inuse == 0


# -- a guest that never stops refilling ------------------------------------------------


class RefillingDriver:
    """Posts a head again as soon as the device has completed it."""

    def __init__(self, run: CaseRun, size: int) -> None:
        self.driver = Driver(run, 1)
        self.size = size
        self.seen = 0
        self.refilling = True
        run.memory.write(0x10000, HEADER + FRAME)
        for head in range(size):
            self.driver.desc(head, 0x10000, 72)
        self.driver.post(*range(size))
        run.memory.fence = self.fence

    def fence(self) -> None:
        used = self.driver.used_idx
        while self.refilling and self.seen != used:
            head, _ = self.driver.used_elem(self.seen % self.size)
            self.driver.post(head)
            self.seen = (self.seen + 1) & 0xFFFF


@pytest.mark.parametrize("mode", ["immediate", "bh", "timer"])
def test_flood_is_served_in_budgets(mode: str) -> None:
    run = start([V1], {"1": queue(256)}, tx_mode=mode, tx_burst=64)
    flood = RefillingDriver(run, 256)
    sent = [run.backend.frames_sent]

    run.device.handle_kick(1)
    sent.append(run.backend.frames_sent)
    for _ in range(20):
        assert run.clock.run_next(), "the device stopped without a kick"
        sent.append(run.backend.frames_sent)

    passes = [after - before for before, after in zip(sent, sent[1:])]
    assert max(passes) <= 64
    assert sum(passes) >= 64 * 15
    assert flood.driver.used_idx == run.backend.frames_sent & 0xFFFF


@pytest.mark.parametrize("mode", ["immediate", "bh", "timer"])
def test_flood_ends_without_kick(mode: str) -> None:
    run = start([V1], {"1": queue(256)}, tx_mode=mode, tx_burst=64)
    flood = RefillingDriver(run, 256)
    run.device.handle_kick(1)
    for _ in range(5):
        run.clock.run_next()

    flood.refilling = False
    steps = 0
    while run.clock.run_next():
        steps += 1
        assert steps < 100

    assert flood.driver.used_idx == flood.driver.avail_idx
    assert run.device.queues[1].inuse == 0


def test_reset_during_flood_takes_effect() -> None:
    run = start([V1], {"1": queue(256)}, tx_burst=64)
    RefillingDriver(run, 256)
    run.device.handle_kick(1)
    run.clock.run_next()
    sent = run.backend.frames_sent

    run.device.write_status(0)

    assert not run.clock.run_next()
    assert run.backend.frames_sent == sent
    assert run.device.status.value == 0


def test_rx_served_between_tx_budgets() -> None:
    run = start(
        [V1], {"1": queue(256), "0": queue(4, 0x4000, 0x5000, 0x6000)}, tx_burst=64
    )
    RefillingDriver(run, 256)
    rx = Driver(run, 0)
    rx.desc(0, 0x90000, 1526, 2)
    rx.post(0)
    run.device.handle_kick(1)

    run.device.receive(None, FRAME)

    assert rx.used_idx == 1
    assert run.memory.read(0x90000 + 12, 60) == FRAME


# -- a kick while the device is processing the same queue ------------------------------


def test_kick_during_transmit_is_not_reentrant(monkeypatch) -> None:
    run = start([V1], {"1": queue(8)})
    driver = Driver(run, 1)
    for k in range(4):
        driver.memory.write(0x10000 + k * 0x1000, HEADER + frame(60, k + 1))
        driver.desc(k, 0x10000 + k * 0x1000, 72)
    driver.post(0, 1, 2, 3)
    send = run.backend.send
    depth = [0, 0]

    def send_and_kick(header, parts):
        depth[0] += 1
        depth[1] = max(depth)
        status = send(header, parts)
        run.device.handle_kick(1)
        depth[0] -= 1
        return status

    monkeypatch.setattr(run.backend, "send", send_and_kick)

    run.device.handle_kick(1)

    assert depth[1] == 1
    assert run.backend.sent_frames() == [frame(60, k + 1) for k in range(4)]
    assert [driver.used_elem(slot)[0] for slot in range(4)] == [0, 1, 2, 3]
    assert driver.used_idx == 4


# -- a broken device does O(1) work per event ------------------------------------------


def test_broken_device_does_no_ring_work(monkeypatch) -> None:
    run = start([V1], {"1": queue(4), "0": queue(4, 0x4000, 0x5000, 0x6000)})
    driver = Driver(run, 1)
    driver.post(4)  # head out of range
    run.device.handle_kick(1)
    assert run.device.error is not None
    calls = around(monkeypatch, "available", lambda queue: None, once=False)
    pops = around(monkeypatch, "pop", lambda queue: None, once=False)

    for _ in range(1000):
        run.device.handle_kick(1)
        run.device.handle_kick(0)
        run.device.receive(None, FRAME)
    run.clock.advance(10_000_000)

    assert calls[0] == 0
    assert pops[0] == 0
    assert run.interrupts.config_interrupts == 1


# -- the offered feature set keeps the dependencies of 5.1.3.1 -------------------------


def test_default_offer_is_consistent() -> None:
    validate_features(DEFAULT_OFFER, DEFAULT_OFFER, NET_DEPENDENCIES)


F = NetFeature


@pytest.mark.parametrize(
    "offer",
    [
        F.GUEST_TSO4,
        F.HOST_TSO4,
        F.MQ,
        F.CTRL_RX,
        F.CTRL_VLAN,
        F.GUEST_ECN | F.GUEST_CSUM,
        F.HOST_ECN | F.CSUM,
    ],
    ids=[
        "gtso4-no-gcsum",
        "htso4-no-csum",
        "mq",
        "ctrl-rx",
        "ctrl-vlan",
        "gecn",
        "hecn",
    ],
)
def test_inconsistent_offer_is_impossible(offer: int) -> None:
    from backends.loopback import LoopbackBackend

    with pytest.raises(FeatureError):
        VirtioNetDevice(LoopbackBackend(), offered=int(VirtioFeature.VERSION_1 | offer))


# -- mtu never changes -----------------------------------------------------------------


@pytest.mark.parametrize("features", [[V1, "VIRTIO_NET_F_MTU"], ["VIRTIO_NET_F_MTU"]])
def test_mtu_config_is_read_only(features: list[str]) -> None:
    run = start(features, {"1": queue(4)}, status=15 if V1 in features else 7)
    device = run.device

    device.write_config(10, struct.pack("<H", 9000))
    device.write_config(0, b"\xff" * 12)

    mtu = struct.unpack_from("<H", device.read_config(), 10)[0]
    assert mtu == 1500
    assert device.status.value & DeviceStatus.DRIVER_OK
